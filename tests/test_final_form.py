"""The best model is of the method's final form whenever the run reached it, and a run that did not says so."""

import json
from pathlib import Path

import pytest

import icot
from conftest import run_cli
from icot.compare import table
from icot.trainer.loop import Progress

COCONUT = ["--model", "micro", "--batch-size", "8", "--c-thought", "1", "--max-latent-stage", "2", "--epochs-per-stage",
           "0.2", "--max-steps", "20", "--max-eval-examples", "5"]  # 5 steps a stage: the final one (3) from step 15


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return icot.generate_mult("2x2", tmp_path_factory.mktemp("data"), train=200, valid=20, test=20)["train"].parent


def ended(run: Path) -> tuple[dict, dict]:
    """The run's end record and its best model's icot.json."""
    end = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end"
    return end, json.loads((run / "best" / "icot.json").read_text())


def test_a_final_form_model_replaces_one_of_an_earlier_stage_and_never_the_reverse():
    p = Progress()
    assert p.is_best((0.9, 0.99), final=False)
    p.best_score, p.best_final = [0.9, 0.99], False
    assert p.is_best((0.8, 0.9), final=False)  # the latest of an earlier stage is the nearest to the final form
    assert p.is_best((0.1, 0.5), final=True)  # far lower, but of the final form
    p.best_score, p.best_final = [0.1, 0.5], True
    assert not p.is_best((1.0, 1.0), final=False)  # a CoT model never displaces it
    assert not p.is_best((0.1, 0.4), final=True) and p.is_best((0.2, 0.5), final=True)


@pytest.mark.parametrize("method, args, final", [
    ("stepwise", ["--model", "micro", "--max-steps", "2", "--batch-size", "16", "--max-eval-examples", "5"], False),
    ("explicit", ["--model", "micro", "--max-steps", "2", "--batch-size", "16", "--max-eval-examples", "5"], True),
    ("coconut", [*COCONUT, "--max-train-seconds", "1e-9"], False),  # out of time after its first step, at stage 0
    ("coconut", COCONUT, True),
])
def test_the_end_record_and_the_saved_model_say_whether_it_is_of_the_final_form(data, tmp_path, capsys, method, args, final):
    run = tmp_path / "run"
    assert run_cli("train", "--method", method, "--data", data, "--out", run, *args) == 0
    end, meta = ended(run)
    assert end["best_final_form"] is final and meta["final_form"] is final
    card = (run / "best" / "README.md").read_text()
    assert (f"Its training ended before {method}'s final form: this model is of an earlier stage" in card) is not final
    if method == "coconut":
        assert meta["coconut_stage"] == (3 if final else 0)
    warned = [line for line in capsys.readouterr().err.splitlines() if "reached its final form" in line]
    assert warned == ([] if final else [f"icot: warning: the run ended before {method} reached its final form: best/ "
                                        f"holds a model of an earlier stage, so its accuracy is not {method}'s; expected "
                                        "a longer run (max_steps, epochs)"])


def test_the_comparison_table_counts_the_seeds_short_of_the_final_form():
    row = {"seeds": [1, 2, 3], "accuracy_mean": 0.5, "accuracy_std": 0.1, "accuracy_min": 0.4, "accuracy_max": 0.6,
           "examples_per_s_batch1": 10.0, "examples_per_s_batch64": 100.0, "generated_tokens": 5.0,
           "train_examples": 64, "train_seconds": 30.0}
    text = table({"stepwise": {**row, "seeds_short_of_final_form": [2]}, "nocot": {**row, "seeds_short_of_final_form": []}})
    lines = text.splitlines()
    assert lines[2].startswith("| stepwise | 3 (1 short †) | 0.500 ± 0.100 |")
    assert lines[3].startswith("| nocot | 3 | 0.500 ± 0.100 |")
    assert lines[-1].startswith("† runs that ended before the method's final form")
    assert "†" not in table({"nocot": {**row, "seeds_short_of_final_form": []}})


def test_a_checkpoint_from_before_the_final_form_was_kept_lets_the_next_validation_replace_its_best():
    old, new = Progress(), Progress()
    old.load_state_dict({"best_score": [1.0, 1.0], "best_step": 5})  # perhaps a CoT model of stepwise
    new.load_state_dict({"best_score": [1.0, 1.0], "best_step": 5, "best_final": True})
    assert old.is_best((0.1, 0.2), final=True) and not new.is_best((0.1, 0.2), final=True)

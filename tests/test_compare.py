"""icot compare: methods over seeds at an equal budget, reused, resumed, measured as icot eval measures."""

import json
import shutil
import statistics
from pathlib import Path

import pytest

from conftest import ROOT, checked_eval, run_cli, stopped_during

SPEC = """\
data: {data}
test: {data}/test.txt
seeds: [1, 2]
budget: {{examples: 128}}  # 4 steps of 32
out: {out}
speed_examples: 4
methods:
  - name: nocot
    config: {configs}/nocot.yaml
  - name: stepwise
    config: {configs}/stepwise.yaml
    overrides: {{model: {model}, lr: 1.0e-5}}
"""
SHIPPED = ROOT / "models" / "mult3x3-micro-stepwise"  # answers 3x3 without CoT


def write_configs(folder: Path) -> None:
    common = "batch_size: 32\nepochs: 100000\neval_every: 4\nsave_every: 2\nlog_every: 1\n"
    (folder / "nocot.yaml").write_text(f"method: nocot\nmodel: micro\nlr: 2.0e-3\n{common}")
    # the shipped model goes on without any CoT, as it was trained (every token removed from the start)
    (folder / "stepwise.yaml").write_text("method: stepwise\nkeep_position: true\nremove_start_from: 23\n"
                                          f"remove_all_when_remove_beyond: 1\nreset_optimizer: false\n{common}")


def good_spec(mult3_data, folder: Path) -> str:
    write_configs(folder)
    return SPEC.format(data=mult3_data, out=folder / "out", configs=folder, model=SHIPPED)


@pytest.fixture(scope="module")
def compared(mult3_data, tmp_path_factory):
    """A comparison of a from-scratch nocot model and a stepwise one trained on from the shipped 3x3
    model, 2 seeds each: a first `icot compare` stops (as on Ctrl-C) at step 2 of stepwise-seed1, a
    second one goes on."""
    import icot.methods

    folder = tmp_path_factory.mktemp("compare")
    spec = folder / "spec.yaml"
    spec.write_text(good_spec(mult3_data, folder))
    trainer_class = icot.methods.trainer_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(icot.methods, "trainer_class",
                      lambda method: stopped_during(trainer_class(method), 1) if method == "stepwise" else trainer_class(method))
        with pytest.raises(SystemExit) as stop:
            run_cli("compare", spec)
    assert stop.value.code == 130  # SIGINT's
    assert (folder / "out" / "runs" / "stepwise-seed1" / "checkpoints" / "latest").is_file()
    assert not (folder / "out" / "runs" / "stepwise-seed2").exists()
    assert run_cli("compare", spec) == 0
    return spec, folder / "out"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_table_holds_icot_evals_numbers_per_method(compared, mult3_data, tmp_path, capsys):
    spec, out = compared
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved["methods"]) == ["nocot", "stepwise"]
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")
            for line in (out / "compare.md").read_text().splitlines() if line.startswith(("| nocot", "| stepwise"))}
    assert list(rows) == ["nocot", "stepwise"]
    for method in ("nocot", "stepwise"):
        evals = [checked_eval(capsys, out / "runs" / f"{method}-seed{seed}" / "best", mult3_data / "test.txt",
                              tmp_path / f"{method}{seed}.json") for seed in (1, 2)]
        for seed, result in zip((1, 2), evals):
            run = saved["runs"][f"{method}-seed{seed}"]
            assert run["accuracy"] == result["accuracy"]
            assert run["generated_tokens"] == result["mean_generated_tokens"]
            assert run["train_examples"] == 128 and run["seed"] == seed  # the budget: 4 steps of 32 examples
            assert run["final_form"] is True  # stepwise: every CoT token removed from the start
        accuracies = [r["accuracy"] for r in evals]
        row = rows[method]
        assert row[1] == "2" and row[2] == f"{statistics.mean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f}"
        assert row[3] == f"{min(accuracies):.3f}-{max(accuracies):.3f}"
        assert row[6] == f"{statistics.mean(r['mean_generated_tokens'] for r in evals):.1f}" and row[7] == "128"
    # 4 steps from scratch learn nothing; the shipped model, trained on 4 more, still multiplies
    assert saved["methods"]["nocot"]["accuracy_max"] < 0.5 < 0.9 < saved["methods"]["stepwise"]["accuracy_min"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stopped_run_is_resumed_to_the_budget(compared):
    _, out = compared
    run = records(out / "runs" / "stepwise-seed1")
    events = [r.get("event") for r in run]
    assert events.count("start") == events.count("resume") == events.count("end") == 1
    assert events.index("start") < events.index("resume") < events.index("end")
    assert [r["step"] for r in run if r.get("event") == "resume"] == [2]  # from its checkpoint, not afresh
    assert [r["step"] for r in run if "loss" in r] == [1, 2, 3, 4] and run[-1]["step"] == 4


def test_a_second_run_reuses_every_run_and_measurement(compared, capsys):
    spec, out = compared
    files = [p for p in (out / "runs").rglob("*") if p.is_file()] + list((out / "evaluations").iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    table = (out / "compare.md").read_text()
    capsys.readouterr()
    assert run_cli("compare", spec) == 0
    printed = capsys.readouterr()
    assert printed.out.count("finished earlier, reused") == 4 and "train nocot" not in printed.err
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert (out / "compare.md").read_text() == table


def test_a_changed_budget_is_refused_for_runs_done_with_another(compared, capsys):
    spec, out = compared
    capsys.readouterr()
    assert run_cli("compare", spec, "--budget", "examples=256") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("icot: error: ") and "nocot-seed1: trained with max_steps 4, and the spec now gives 8" in err
    assert len(err.splitlines()) == 1


def test_a_wall_budget_stops_each_run_at_its_time(compared, tmp_path):
    spec, _ = compared
    out = tmp_path / "wall"
    assert run_cli("compare", spec, "--budget", "wall=1.5s", "--seeds", "7", "--out", out) == 0
    for method in ("nocot", "stepwise"):
        run = records(out / "runs" / f"{method}-seed7")
        clock = [r["train_seconds"] for r in run if "loss" in r]  # after each step (log_every 1)
        (end,) = [r for r in run if r.get("event") == "end"]
        # records round to the millisecond, so a step at 1.4996 s reads 1.5 and was not yet out of time
        assert all(t <= 1.5 for t in clock[:-1]) and clock[-1] == end["train_seconds"] >= 1.5
        assert [r["step"] for r in run if r.get("event") == "time_limit"] == [end["step"]] == [len(clock)]
    assert json.loads((out / "compare.json").read_text())["spec"]["budget"] == {"wall": 1.5}


def test_methods_trains_some_entries_and_a_finished_run_moved_in_is_reused(compared, tmp_path, capsys):
    """Two commands share the entries (--methods, each its --out); a run one finished moves into the other's."""
    spec, out = compared
    other = tmp_path / "other"
    assert run_cli("compare", spec, "--methods", "stepwise", "--seeds", "1", "--out", other) == 0
    assert sorted(p.name for p in (other / "runs").iterdir()) == ["stepwise-seed1"]
    assert list(json.loads((other / "compare.json").read_text())["methods"]) == ["stepwise"]
    shutil.copytree(out / "runs" / "nocot-seed1", other / "runs" / "nocot-seed1")
    capsys.readouterr()
    assert run_cli("compare", spec, "--seeds", "1", "--out", other) == 0
    printed = capsys.readouterr()
    assert printed.out.count("finished earlier, reused") == 2 and "train " not in printed.err
    assert list(json.loads((other / "compare.json").read_text())["methods"]) == ["nocot", "stepwise"]


BAD_SPECS = [  # (text replaced, its replacement; "": appended), the line reported, what the error says
    ("", "colour: red\n", 13, "unknown key 'colour'"),
    ("seeds: [1, 2]", "seeds: [1, 1]", 3, "a seed is repeated"),
    ("{examples: 128}", "{examples: -3}", 4, "expected a whole number of at least 1"),
    ("{examples: 128}", "{wall: soon}", 4, "expected a positive duration"),
    ("{examples: 128}", "{steps: 4}", 4, "unknown budget"),
    ("name: nocot", "name: stepwise", 10, "the name 'stepwise' is given twice"),
    ("lr: 1.0e-5", "seed: 3", 12, "seed is set by the comparison"),
    ("lr: 1.0e-5", "lr: fast", 10, "stepwise: config: lr: expected a number"),
    ("config: ", "confg: ", 9, "unknown key 'confg' in a method entry"),
    ("nocot.yaml", "none.yaml", 9, "none.yaml: no such file"),
    ("test.txt", "missing.txt", 2, "missing.txt: no such file"),
    ("examples: 128", "examples: 128, wall: 1m", 4, "expected one of `examples: N`"),
    ("methods:", "methods: [", 8, "invalid YAML"),
]


@pytest.mark.parametrize("old, new, line, fragment", BAD_SPECS)
def test_a_bad_spec_is_one_line_at_its_line_and_writes_nothing(old, new, line, fragment, mult3_data, tmp_path, capsys):
    good = good_spec(mult3_data, tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(good + new if not old else good.replace(old, new, 1))
    capsys.readouterr()
    assert run_cli("compare", spec) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"icot: error: {spec}:{line}: ") and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_bad_command_line_overrides(mult3_data, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(good_spec(mult3_data, tmp_path))
    for argv, fragment in ((["--budget", "lots"], "--budget lots: expected examples=N"),
                           (["--budget", "wall=0m"], "expected a positive duration"),
                           (["--seeds", "-1"], "--seeds [-1]: expected a list of whole numbers"),
                           (["--methods", "nocot", "kd"], f"--methods kd: no such entry in {spec}; expected some of: "
                                                          "nocot, stepwise"),
                           (["--out", str(spec)], "exists and is not a directory")):
        capsys.readouterr()
        assert run_cli("compare", spec, *argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()

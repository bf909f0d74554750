"""Shared fixtures: paths to the shipped reference data and one tiny trained model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests see the traceback of any exception the CLI's last guard would turn into one line: bugs fail loudly.
os.environ.setdefault("ICOT_TRACEBACK", "1")
# Under pytest-xdist each worker takes its share of the cores (at least one thread): models this small
# gain little from a second thread, so two one-thread workers on two cores beat one two-thread process.
# Set before torch starts (icot.demo does not import it), so the subprocesses that tests launch inherit it too.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from icot.demo import usable_cores

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "data" / "reference"


def run_cli(*args: str) -> int:
    from icot.cli import main

    return main([str(a) for a in args])


def mult_examples(a: int, b: int, n: int, seed: int) -> list:
    """n generated examples of AxB multiplication in the papers' format."""
    from icot.data.mult import MultTask, mult_example, sample_splits

    return [mult_example(x, y) for x, y in sample_splits(MultTask(a, b), {"train": n}, seed=seed)["train"]]


@pytest.fixture(scope="session")
def reference() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def mult3_data(tmp_path_factory) -> Path:
    """32 training examples of 3x3 multiplication; valid and test are the same 32 (overfitting)."""
    from icot.data.format import write_examples

    out = tmp_path_factory.mktemp("mult3")
    examples = mult_examples(3, 3, 32, seed=0)
    for split in ("train", "valid", "test"):
        write_examples(out / f"{split}.txt", examples)
    return out


@pytest.fixture(scope="session")
def explicit_run(mult3_data, tmp_path_factory) -> Path:
    """A micro explicit-CoT model trained until it has memorised its 32 examples."""
    run = tmp_path_factory.mktemp("runs") / "explicit"
    code = run_cli("train", "--method", "explicit", "--data", mult3_data, "--model", "micro", "--out", run,
                   "--lr", "3e-3", "--batch-size", "32", "--epochs", "200", "--eval-every", "100", "--log-every", "50",
                   "--save-every", "200")
    assert code == 0
    return run


# ----- answers checked here, independently of icot's own matching ---------------------------------

def true_answer(question: str) -> str:
    """A multiplication's answer in the data format (digits least significant first, padded to the
    operands' digits together), computed here from the question alone: `3 2 1 * 6 5 4` -> `8 8 0 6 5 0`."""
    a, b = (part.split() for part in question.split(" * "))
    product = int("".join(reversed(a))) * int("".join(reversed(b)))
    return " ".join(reversed(str(product).zfill(len(a) + len(b))))


def product_is_right(prediction: dict) -> bool:
    """A multiplication prediction's answer is its question's product (computed here)."""
    return " ".join(prediction["answer"].split()) == true_answer(prediction["question"])


def same_number(prediction: dict) -> bool:
    """A GSM8K prediction's answer denotes its reference's number (`$1,000.00` is 1000), else is its text."""
    from decimal import Decimal, InvalidOperation

    answer, reference = prediction["answer"], prediction["reference"]
    try:
        return Decimal(answer.replace(",", "").replace("$", "")) == Decimal(reference.replace(",", ""))
    except InvalidOperation:
        return answer.split() == reference.split()


def checked_eval(capsys, model, data_file, json_file, *extra, right=product_is_right) -> dict:
    """`icot eval --json`: its predictions are the data file's examples in order, each verdict is the
    one `right` gives here, and the accuracy printed is the share of right answers. The result."""
    import json
    import re

    from icot.data.format import read_examples

    capsys.readouterr()
    assert run_cli("eval", "--model", model, "--data", data_file, "--json", json_file, *extra) == 0
    printed = capsys.readouterr().out
    result = json.loads(Path(json_file).read_text())
    predictions = result["predictions"]
    examples = read_examples(data_file)[: len(predictions)]
    assert len(predictions) == result["examples"] > 0
    assert [(p["question"], p["reference"]) for p in predictions] == [(e.question, e.answer) for e in examples]
    verdicts = [right(p) for p in predictions]
    assert [p["correct"] for p in predictions] == verdicts
    accuracy = sum(verdicts) / len(verdicts)
    assert float(re.search(r"^accuracy\s+(\S+)$", printed, re.M).group(1)) == pytest.approx(accuracy, abs=5e-5)
    assert result["accuracy"] == pytest.approx(accuracy)
    return result


def checked_predict(capsys, model, a: int, b: int) -> str:
    """`icot predict A*B` prints the answer the Python API gives for the same question, and says
    `correct` exactly when it is the product computed here, written as the data writes it (digits
    least significant first, zero-padded), else `wrong: A*B = product`. The printed line."""
    import icot

    capsys.readouterr()
    assert run_cli("predict", "--model", model, f"{a}*{b}") == 0
    (line,) = capsys.readouterr().out.splitlines()
    prediction = icot.load(model).generate(f"{a}*{b}")  # the API, the same question
    shown = line[len(f"{a}*{b} = "):].split("  (")[0]
    assert line.startswith(f"{a}*{b} = ") and shown.lstrip("0") == (prediction.ordinary_answer or "(no answer)").lstrip("0")
    right = prediction.answer.split() == true_answer(prediction.question).split()
    verdict = line[len(f"{a}*{b} = {shown}  ("):]
    assert verdict.startswith("correct") if right else verdict.startswith(f"wrong: {a}*{b} = {a * b}")
    return line


def thought_toy():
    """A word tokenizer with the thought tokens (Coconut, CODI), and 3x3 and 2x3 examples (two prompt
    lengths): (tokenizer, thought token ids, layout, encoded examples)."""
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer
    from icot.methods.thoughts import add_thought_tokens
    from icot.models import build_preset

    examples = mult_examples(3, 3, 4, seed=1) + mult_examples(2, 3, 4, seed=2)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    marks = add_thought_tokens(tokenizer, build_preset("micro", len(tokenizer), tokenizer.eos_token_id))
    layout = Layout.for_tokenizer(tokenizer)
    return tokenizer, marks, layout, encode(tokenizer, layout, examples)


def stopped_during(trainer_class, step: int):
    """`trainer_class` receiving a stop signal (as on Ctrl-C) while it trains step `step` (0-based):
    the loop checkpoints after that step and stops."""
    import signal

    class Stopped(trainer_class):
        def on_step_begin(self):
            super().on_step_begin()
            if self.progress.step == step:
                self.stop_signal = signal.SIGINT

    return Stopped


def modules_after(code: str, *args) -> set[str]:
    """The modules a fresh Python process holds after running `code` (`args` its sys.argv[1:])."""
    import json
    import subprocess
    import sys

    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def modules_after_predict(model, question: str) -> set[str]:
    """The modules `icot predict --model MODEL QUESTION` imports, in a fresh process."""
    return modules_after("import sys\nfrom icot.cli import main\nassert main(['predict', '--model', *sys.argv[1:]]) == 0",
                         model, question)


def training_modules() -> set[str]:
    """What only training needs: the loop, every method's trainer module, LoRA, plotting."""
    from icot.methods.registry import METHODS

    return {"icot.trainer", "peft", "matplotlib"} | {method.trainer.partition(":")[0] for method in METHODS.values()}


def probed_loss_and_recompute(trainer, model, lm, batch):
    """A running-sum trainer's loss on `batch`, the `use_cache` each of its passes was given, and the batch
    recomputed here without the trainer: the plain LM's token scores and the probe's prediction read from its
    last hidden state."""
    import torch

    from icot.evaluate import token_scores

    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("use_cache", "absent")),
                                    with_kwargs=True)
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], output_hidden_states=True)
        predicted = model.probe(out.hidden_states[-1]).squeeze(-1)
    return loss, calls, token_scores(out.logits, batch["labels"]), predicted

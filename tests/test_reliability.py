"""Interruption, resume, several processes and guard rails of the shared training loop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from icot.data.format import write_examples
from conftest import mult_examples, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """256 examples of 2x2 multiplication and no validation file: best/ is the final model."""
    out = tmp_path_factory.mktemp("train_only")
    write_examples(out / "train.txt", mult_examples(2, 2, 256, seed=0))
    return out


def train_args(data, out, *extra):
    return ["train", "--method", "stepwise", "--data", str(data), "--model", "micro", "--out", str(out),
            "--batch-size", "16", "--lr", "1e-3", "--remove-per-epoch", "4", "--log-every", "1", *map(str, extra)]


def weights(run):
    return load_file(run / "best" / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close_weights(a, b):
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().mean() < 1e-4 and (a[k] - b[k]).abs().max() < 5e-3 for k in a)


def icot(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "icot.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_step(run, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(json.loads(l).get("step", -1) >= step and "loss" in l
                                    for l in metrics.read_text().splitlines()):
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


# every run in a subprocess with the same thread count: float sums depend on it
INTERRUPTIBLE = ["--epochs", "4", "--save-every", "5"]


@pytest.fixture(scope="module")
def uninterrupted(train_only, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert icot(*train_args(train_only, run, *INTERRUPTIBLE)).wait(timeout=300) == 0
    return weights(run)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(train_only, uninterrupted, tmp_path):
    """Stopped by SIGTERM, resumed, the resumed process killed outright, resumed again: the run ends
    with the weights of a run never interrupted."""
    run = tmp_path / "interrupted"
    process = icot(*train_args(train_only, run, *INTERRUPTIBLE))
    wait_for_step(run, 23, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM and "--resume" in process.stderr.read()
    assert any(json.loads(l).get("event") == "stopped" for l in (run / "metrics.jsonl").read_text().splitlines())
    process = icot("train", "--resume", str(run))
    wait_for_step(run, 42, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "best").exists()
    assert icot("train", "--resume", str(run)).wait(timeout=300) == 0
    assert same_weights(uninterrupted, weights(run))


def test_two_processes_match_one_process_with_the_same_global_batch(train_only, tmp_path):
    common = ["--epochs", "2", "--group-by-length", "false", "--removal-smoothing-lambda", "inf"]
    assert run_cli(*train_args(train_only, tmp_path / "one", *common)) == 0
    one_args = train_args(train_only, tmp_path / "one32", *common)
    one_args[one_args.index("--batch-size") + 1] = "32"
    assert run_cli(*one_args) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
                          "-m", "icot.cli", *train_args(train_only, tmp_path / "two", *common)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    start = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2 and start["steps_per_epoch"] == 8
    # Same data per step: losses agree to float precision, weights closely. Adam turns float-level
    # gradient differences on near-zero gradients into lr-sized steps, hence a mean-based check.
    assert close_weights(weights(tmp_path / "one32"), weights(tmp_path / "two"))
    assert not close_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))  # a different batch is caught
    records = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = lambda run: torch.tensor([r["loss"] for r in records(run) if "loss" in r])
    assert torch.allclose(losses(tmp_path / "one32"), losses(tmp_path / "two"), rtol=1e-3)
    removals = lambda run: [r for r in records(run) if r.get("event") == "removal"]
    assert removals(tmp_path / "one32") == removals(tmp_path / "two") != []


def one_line_error(capsys, code):
    """The error is one line of its own (progress bars may precede it), exit code 2, no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("icot: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_non_finite_loss_stops_with_a_clear_message(train_only, tmp_path, capsys):
    args = train_args(train_only, tmp_path / "nan", "--epochs", "2", "--save-every", "3", "--max-grad-norm", "0")
    args[args.index("--lr") + 1] = "1e30"
    err = one_line_error(capsys, run_cli(*args))
    assert "loss became nan at step 2" in err and "no checkpoint had been saved yet" in err
    good = train_args(train_only, tmp_path / "later", "--max-steps", "3", "--save-every", "3")
    assert run_cli(*good) == 0
    err = one_line_error(capsys, run_cli("train", "--resume", tmp_path / "later", "--max-steps", "20", "--lr", "1e30",
                                         "--max-grad-norm", "0"))
    checkpoint = tmp_path / "later" / "checkpoints" / "step-00000003"
    assert f"the last good checkpoint is {checkpoint}" in err and (checkpoint / "model.safetensors").exists()


def test_output_directory_that_cannot_be_written(train_only, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = one_line_error(capsys, run_cli(*train_args(train_only, blocker / "run", "--epochs", "1")))
    assert f"--out {blocker / 'run'}: {blocker} is a file, not a directory" in err


def test_sequences_longer_than_the_model(tmp_path, capsys):
    short = mult_examples(1, 1, 20, seed=0)  # 11 tokens
    long = mult_examples(2, 2, 12, seed=0)  # 21 tokens
    write_examples(tmp_path / "train.txt", short + long)
    err = one_line_error(capsys, run_cli(*train_args(tmp_path, tmp_path / "long", "--max-positions", "16")))
    assert "example 21 is 21 tokens long but the model has only 16 positions" in err and "max_len_drop" in err
    assert run_cli(*train_args(tmp_path, tmp_path / "drop", "--max-positions", "16", "--max-len-drop", "--max-steps", "2")) == 0
    events = [json.loads(l) for l in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()]
    assert [e["count"] for e in events if e.get("event") == "dropped_long_examples"] == [12]
    assert [e["train_examples"] for e in events if e.get("event") == "start"] == [20]


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("method: explicit\ndata: x\nout: y\n")
    assert "no checkpoint to resume from" in one_line_error(capsys, run_cli("train", "--resume", tmp_path))
    assert "not a run directory" in one_line_error(capsys, run_cli("train", "--resume", tmp_path / "none"))


def test_a_resumed_run_draws_the_same_dropout_masks(train_only, tmp_path):
    """GPT-2's dropout (0.1) is on in training; a run resumed mid-epoch must train exactly as the run
    that went straight on (a new data iterator must not draw from the RNG dropout uses)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from icot.data.format import read_examples
    from icot.data.tokenizers import word_tokenizer

    examples = read_examples(train_only / "train.txt")
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_layer=2, n_head=2, n_embd=32, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    assert config.resid_pdrop == config.attn_pdrop == 0.1
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-dropout")
    tokenizer.save_pretrained(tmp_path / "gpt2-dropout")
    args = ["train", "--method", "explicit", "--data", train_only, "--model", tmp_path / "gpt2-dropout",
            "--batch-size", "16", "--lr", "1e-3", "--log-every", "1", "--max-steps", "10", "--save-every", "4",
            "--keep-checkpoints", "3"]
    assert run_cli(*args, "--out", tmp_path / "straight") == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-00000004\n")
    assert run_cli("train", "--resume", tmp_path / "resumed") == 0
    losses = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 10
    assert same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))

"""Sharded training (FSDP2, `fsdp: true`) on two CPU processes (gloo), against one process at the
same global batch: GPT-2 and Llama shapes, LoRA, stepwise, Coconut and CODI, and exact resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

from icot.data.format import write_examples
from conftest import mult_examples, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# the same data per optimizer step: one process takes 32 rows, each of two takes 16
COMMON = ["--group-by-length", "false", "--log-every", "1", "--lr", "1e-3", "--model", "micro"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_data")
    write_examples(folder / "train.txt", mult_examples(2, 2, 256, seed=0))
    write_examples(folder / "valid.txt", mult_examples(2, 2, 32, seed=1))
    return folder


def one_process(data, out, method, *extra):
    assert run_cli("train", "--method", method, "--data", data, "--out", out, "--batch-size", "32", *COMMON,
                   *map(str, extra)) == 0


def launch(*args):
    """torchrun with two processes on a free port (--standalone: tests in parallel workers never collide)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)


def two_processes(data, out, method, *extra, resume=False):
    args = ["train", "--resume", str(out), *map(str, extra)] if resume else \
        ["train", "--method", method, "--data", str(data), "--out", str(out), "--batch-size", "16", *COMMON, "--fsdp",
         "true", *map(str, extra)]
    done = launch("-m", "icot.cli", *args)
    assert done.returncode == 0, done.stderr[-3000:]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return torch.tensor([r["loss"] for r in records(run) if "loss" in r])


def weights(run, name="model.safetensors"):
    return load_file(run / "best" / name)


def close_weights(a, b):
    """Adam turns float-level gradient differences on near-zero gradients into lr-sized steps: a
    mean-based bound, and a loose bound on any one weight."""
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().mean() < 1e-4 and (a[k] - b[k]).abs().max() < 5e-3 for k in a)


def check_matches(one, two, files=("model.safetensors",)):
    """Same losses at every step (float precision), close final weights; a different run is not close."""
    a, b = losses(one), losses(two)
    assert len(a) == len(b) > 0 and torch.allclose(a, b, rtol=1e-4), (a, b)
    for name in files:
        assert close_weights(weights(one, name), weights(two, name)), name


@pytest.fixture(scope="module")
def gpt2_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_gpt2")
    one_process(data, root / "one", "explicit", "--epochs", "2")
    two_processes(data, root / "two", "explicit", "--epochs", "2")
    return root


def test_two_sharded_processes_train_as_one_process(gpt2_runs):
    one, two = gpt2_runs / "one", gpt2_runs / "two"
    check_matches(one, two)
    start = records(two)[0]
    assert start["processes"] == 2 and start["steps_per_epoch"] == 8 and start["parameters"] == records(one)[0]["parameters"]
    # each process wrote its own shards of the model and optimizer state
    latest = (two / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (two / "checkpoints" / latest / "sharded").glob("*.distcp")) == ["__0_0.distcp",
                                                                                                  "__1_0.distcp"]
    # best/ is whole: a plain Hugging Face model with the same validation result the run logged
    assert AutoModelForCausalLM.from_pretrained(two / "best").num_parameters() == start["parameters"]
    vals = [r for r in records(two) if r.get("event") == "validation"]
    assert [r["val_accuracy"] for r in vals] == [r["val_accuracy"] for r in records(one) if r.get("event") == "validation"]
    assert len(vals) == 2


def test_a_resumed_sharded_run_ends_as_an_uninterrupted_one(data, gpt2_runs, tmp_path):
    run = tmp_path / "resumed"
    two_processes(data, run, "explicit", "--max-steps", "8")
    assert [r["step"] for r in records(run) if "loss" in r][-1] == 8
    two_processes(data, run, None, "--max-steps", "16", resume=True)
    assert torch.equal(losses(run), losses(gpt2_runs / "two"))
    a, b = weights(run), weights(gpt2_runs / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llama_with_lora_checkpointing_and_stepwise_removal(data, tmp_path):
    """Adapters on q_proj and v_proj of a Llama-shaped model, activation checkpointing, the CoT removed
    4 tokens an epoch with an optimizer reset at each removal: the sharded run follows the single process."""
    extra = ["--model", "tiny-llama", "--lora.r", "4", "--lora.target-modules", "[q_proj,v_proj]", "--max-steps", "8",
             "--remove-per-epoch", "4", "--removal-smoothing-lambda", "inf", "--gradient-checkpointing", "true"]
    one_process(data, tmp_path / "one", "stepwise", *extra)
    two_processes(data, tmp_path / "two", "stepwise", *extra)
    check_matches(tmp_path / "one", tmp_path / "two")
    assert records(tmp_path / "two")[0]["trainable_parameters"] < records(tmp_path / "two")[0]["parameters"] / 10
    assert any(r.get("event") == "removal" for r in records(tmp_path / "two"))


@pytest.mark.parametrize("method, extra, files", [
    ("coconut", ["--first-stage", "1", "--max-latent-stage", "2", "--c-thought", "1", "--epochs-per-stage", "0.25"],
     ("model.safetensors",)),
    ("codi", ["--thoughts", "2", "--projection-dim", "64"], ("model.safetensors", "codi_projection.safetensors")),
])
def test_continuous_thought_methods(data, tmp_path, method, extra, files):
    """Their thought passes run inside the model's forward, as sharding needs."""
    one_process(data, tmp_path / "one", method, "--max-steps", "8", *extra)
    two_processes(data, tmp_path / "two", method, "--max-steps", "8", *extra)
    check_matches(tmp_path / "one", tmp_path / "two", files)


def one_line_error(capsys, code):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("icot: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("method, extra, expected", [
    ("explicit", [], "run torchrun --nproc_per_node N"),
    ("kd", ["--teacher.epochs", "1"], "--method kd trains a teacher, an emulator and a student"),
    ("explicit", ["--precision", "fp16-mixed"], "expected precision bf16-mixed, bf16 or fp32"),
    ("explicit", ["--compile", "true"], "fsdp with compile is not supported"),
    ("stepwise", ["--rewind-below", "0.5", "--eval-every", "2", "--removal-pace", "adaptive"],
     "rewind_below with fsdp"),
])
def test_what_sharding_cannot_take_is_refused_before_any_work(data, tmp_path, capsys, method, extra, expected):
    out = tmp_path / "run"
    line = one_line_error(capsys, run_cli("train", "--method", method, "--data", data, "--out", out, "--fsdp", "true",
                                          *extra))
    assert expected in line and not out.exists()


def test_a_model_without_decoder_layers_is_refused():
    from icot.errors import UserError
    from icot.sharding import layer_classes

    with pytest.raises(UserError, match="no decoder layer class found in Sequential"):
        layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2))
    assert [c.__name__ for c in layer_classes(gpt2)] == ["GPT2Block"]


HELD = """
import json, sys, torch
from icot.api import trainer_for
from icot.plan import tensor_bytes
from icot.sharding import Sharded, local

trainer = trainer_for(json.loads(sys.argv[1]))
trainer.load_data()
model = Sharded(trainer.model, trainer.accelerator.device, 2, trainer.is_main, "fp32").model
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
model(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
params = list(model.parameters())
states = [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
held = {"parameter_bytes": tensor_bytes(local(p) for p in params),
        "gradient_bytes": tensor_bytes(local(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": tensor_bytes(states)}
if trainer.is_main:
    print(json.dumps(held))
"""


def test_the_fsdp_plan_equals_what_the_first_process_holds(data, tmp_path):
    """`--plan` for two sharded processes: the parameter, gradient and AdamW bytes of the first
    process (the largest pieces) after a real step."""
    from icot.api import train_config
    from icot.plan import plan

    values = {"method": "explicit", "model": "micro", "data": str(data), "out": str(tmp_path / "run"), "fsdp": True}
    script = tmp_path / "held.py"
    script.write_text(HELD)
    done = launch(script, json.dumps(values))
    assert done.returncode == 0, done.stderr[-3000:]
    held = json.loads(done.stdout.strip().splitlines()[-1])
    planned = plan(train_config(values)[1], processes=2)
    assert planned.strategy == "fsdp"
    assert {key: getattr(planned, key) for key in held} == held
    whole = plan(train_config({**values, "fsdp": False})[1])
    assert planned.parameter_bytes < whole.parameter_bytes * 0.52

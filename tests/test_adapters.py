"""LoRA adapters (peft) and gradient checkpointing (issue 46): what trains, what is saved, what is refused."""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_cli_errors import one_line_error

MICRO = {"layers": 2, "width": 128}  # the micro preset: GPT-2 blocks, c_attn maps 128 -> 3 x 128


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(data, out, *args):
    return run_cli("train", "--method", "explicit", "--data", data, "--out", out, "--batch-size", "8", "--lr", "3e-3",
                   "--log-every", "1", "--seed", "7", *args)


@pytest.fixture(scope="module")
def lora_run(explicit_run, mult3_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train(mult3_data, out, "--model", explicit_run / "best", "--lora.r", "4", "--max-steps", "8",
                 "--eval-every", "4") == 0
    return out


def test_only_the_adapters_train_and_best_is_a_plain_model_with_them_merged(lora_run, explicit_run):
    from transformers import AutoModelForCausalLM

    start = records(lora_run)[0]
    # peft's default for GPT-2 adapts c_attn: A (r x 128) and B (384 x r) in each of the 2 layers
    assert start["trainable_parameters"] == MICRO["layers"] * 4 * (MICRO["width"] + 3 * MICRO["width"])
    assert start["trainable_parameters"] < start["parameters"] / 50
    best = lora_run / "best"
    assert not (best / "adapter_config.json").exists()
    base, tuned = load_file(explicit_run / "best" / "model.safetensors"), load_file(best / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = sorted(k for k in base if not torch.equal(base[k], tuned[k]))
    assert changed and all(".attn.c_attn." in k for k in changed)  # the merged adapters, nothing else
    AutoModelForCausalLM.from_pretrained(best)  # a plain Hugging Face directory


def test_the_merged_model_answers_as_the_adapted_one_did_in_validation(lora_run, mult3_data):
    import icot

    validation = [r for r in records(lora_run) if r.get("event") == "validation"]
    best = max(validation, key=lambda r: (r["val_accuracy"], r["val_token_accuracy"]))
    result = icot.load(lora_run / "best").evaluate(mult3_data / "valid.txt")
    assert result["token_accuracy"] == pytest.approx(best["val_token_accuracy"], abs=1e-6)
    assert result["accuracy"] == pytest.approx(best["val_accuracy"])


def test_a_resumed_lora_run_continues_exactly(explicit_run, mult3_data, lora_run, tmp_path):
    out = tmp_path / "resumed"
    assert train(mult3_data, out, "--model", explicit_run / "best", "--lora.r", "4", "--max-steps", "4",
                 "--eval-every", "4") == 0
    assert run_cli("train", "--resume", out, "--max-steps", "8") == 0
    losses = lambda run: [r["loss"] for r in records(run) if "loss" in r]
    assert losses(out) == pytest.approx(losses(lora_run), rel=1e-6)


def test_a_target_module_the_model_lacks_is_one_line_and_nothing_is_written(explicit_run, mult3_data, tmp_path, capsys):
    out = tmp_path / "bad"
    line = one_line_error(capsys, train(mult3_data, out, "--model", explicit_run / "best", "--lora.r", "4",
                                        "--lora.target-modules", "[q_proj]"))
    assert "lora.target_modules ['q_proj']" in line and "c_attn" in line and not out.exists()


def test_gradient_checkpointing_trains_the_same_steps(mult3_data, tmp_path):
    for name, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        assert train(mult3_data, tmp_path / name, "--model", "micro", "--max-steps", "6", *flags) == 0
    losses = lambda run: torch.tensor([r["loss"] for r in records(run) if "loss" in r])
    assert torch.allclose(losses(tmp_path / "plain"), losses(tmp_path / "checkpointed"), rtol=1e-5)


@pytest.mark.parametrize("method, why", [("coconut", "KV cache"), ("kd", "eval mode")])
def test_gradient_checkpointing_is_refused_where_it_cannot_act(mult3_data, tmp_path, capsys, method, why):
    line = one_line_error(capsys, run_cli("train", "--method", method, "--data", mult3_data, "--out", tmp_path / "r",
                                          "--gradient-checkpointing"))
    assert "gradient_checkpointing" in line and not (tmp_path / "r").exists()


def test_two_processes_train_the_adapters_as_one_does_with_the_same_global_batch(explicit_run, mult3_data, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["train", "--method", "explicit", "--data", str(mult3_data), "--model", str(explicit_run / "best"),
            "--lora.r", "4", "--lr", "3e-3", "--log-every", "1", "--epochs", "2", "--group-by-length", "false",
            "--max-eval-examples", "4"]
    one = subprocess.run([sys.executable, "-m", "icot.cli", *args, "--out", str(tmp_path / "one"), "--batch-size", "8"],
                         env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
                          "-m", "icot.cli", *args, "--out", str(tmp_path / "two"), "--batch-size", "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert records(tmp_path / "two")[0]["processes"] == 2
    losses = lambda run: torch.tensor([r["loss"] for r in records(run) if "loss" in r])
    assert len(losses(tmp_path / "one")) == 8 and torch.allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-4)
    one_w, two_w = (load_file(tmp_path / run / "best" / "model.safetensors") for run in ("one", "two"))
    assert all((one_w[k] - two_w[k]).abs().max() < 1e-4 for k in one_w)

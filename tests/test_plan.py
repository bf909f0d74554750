"""`icot train --plan`: the memory plan on the meta device (icot.plan).

The planned parameter, gradient and AdamW bytes equal what a real process holds after a training
step; every shipped config plans offline; --require-fit refuses in one line, writing nothing."""

import os
from pathlib import Path

import pytest
import torch

from icot.api import train_config, trainer_for
from icot.cli import main
from icot.plan import activation_bytes, parse_memory, plan, tensor_bytes

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# a run directory no shipped config writes (docs/methods/coconut.md trains it by a command): its architecture given
PLAN_MODEL = {"coconut_gsm8k_gpt2": "gpt2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    lines = (ROOT / "data/reference/mult/4x4_valid.txt").read_text().splitlines()
    (folder / "train.txt").write_text("\n".join(lines[:40]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[40:50]) + "\n")
    return folder


def _settings(data, out, **values):
    return {"method": "explicit", "model": "micro", "data": str(data), "out": str(out), "batch_size": 4,
            "cpu": True, **values}


def _held_after_one_step(trainer) -> dict:
    """Bytes of the parameters, gradients and AdamW state a real process holds after one step on the
    model the Trainer builds (load_data: tokenizer, preset model, dtype, LoRA adapters)."""
    trainer.load_data()
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {"parameter_bytes": tensor_bytes(params), "gradient_bytes": tensor_bytes(grads),
            "optimizer_bytes": tensor_bytes(states), "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


@pytest.mark.parametrize("precision,lora", [("fp32", 0), ("bf16", 0), ("fp32", 4), ("bf16", 4)],
                         ids=["fp32", "bf16", "fp32-lora4", "bf16-lora4"])
def test_plan_equals_what_a_process_holds(data, tmp_path, precision, lora):
    values = _settings(data, tmp_path / "run", precision=precision,
                       lora={"r": lora, "target_modules": ["c_attn", "c_fc"]} if lora else {"r": 0})
    _, config = train_config(values)
    planned = plan(config)
    held = _held_after_one_step(trainer_for(values))
    for key, value in held.items():
        assert getattr(planned, key) == value, key
    assert planned.weight_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    if lora:
        assert 0 < planned.trainable < planned.parameters / 10
        assert planned.gradient_bytes < planned.parameter_bytes / 10
    else:
        assert planned.gradient_bytes == planned.parameter_bytes
    assert not (tmp_path / "run").exists()


def test_fsdp_divides_the_states(data, tmp_path):
    """Each tensor cut in 4 along its first dimension, padded; AdamW's step counts stay whole (the
    real allocation on two processes: tests/test_fsdp.py)."""
    _, config = train_config(_settings(data, tmp_path / "run", precision="bf16-mixed"))
    whole, sharded = plan(config), plan(config, strategy="fsdp", processes=4)
    for key in ("parameter_bytes", "gradient_bytes"):
        assert getattr(whole, key) / 4 <= getattr(sharded, key) < getattr(whole, key) / 4 * 1.01
    steps = whole.optimizer_bytes - 2 * whole.gradient_bytes  # 4 bytes a trainable tensor
    assert sharded.optimizer_bytes == 2 * sharded.gradient_bytes + steps
    assert sharded.gathered_bytes > 0 and whole.gathered_bytes == 0
    assert sharded.whole_bytes == 2 * whole.parameters and whole.whole_bytes == 0  # bf16: 2 bytes a weight
    assert sharded.activation_bytes == whole.activation_bytes
    _, fsdp_config = train_config(_settings(data, tmp_path / "run", precision="bf16-mixed", fsdp=True))
    assert plan(fsdp_config, processes=4) == sharded  # the config's fsdp picks the strategy


def test_activations_checkpointing_and_precision():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=1, activation_function="gelu_pytorch_tanh")
    s, b, h = 1024, 1, 768
    # Korthikanti et al.'s 34sbh per layer in 16-bit for GPT (4h GELU MLP, dropout), with the fused attention's
    # output (2sbh) for the s x s term; logits: 16-bit plus 8 bytes of fp32 per logit
    assert activation_bytes(config, b, s, "bf16-mixed", False) == 12 * 36 * s * b * h + s * b * 10
    assert activation_bytes(config, b, s, "fp32", False) == 2 * 12 * 36 * s * b * h + s * b * 12
    assert activation_bytes(config, b, s, "bf16", True) == (12 * 2 + 36) * s * b * h + s * b * 10


def _saved_bytes(model, b, s) -> int:
    """Bytes of the tensors autograd saves for the backward pass (parameters excluded), each storage once."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    return sum(size for key, size in seen.items() if key not in params)


@pytest.mark.parametrize("arch", ["gpt2", "gelu_new", "mistral"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_per_layer_match_what_autograd_saves(arch, precision):
    """The per-layer estimate within 10% of what autograd keeps (layers 4 minus layers 2, halved)."""
    from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

    def config(layers):
        if arch != "mistral":  # the presets' fused GELU, or hub GPT-2's own gelu_new
            return GPT2Config(n_layer=layers, n_embd=128, n_head=4, vocab_size=300, resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                              activation_function="gelu_pytorch_tanh" if arch == "gpt2" else "gelu_new")
        return MistralConfig(num_hidden_layers=layers, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=448, vocab_size=300)

    b, s = 2, 64
    measured, planned = [], []
    for layers in (2, 4):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(layers), attn_implementation="sdpa")
        model = model.to(torch.bfloat16) if precision == "bf16" else model
        measured.append(_saved_bytes(model, b, s))
        planned.append(activation_bytes(model.config, b, s, precision, False))
    per_layer_measured, per_layer_planned = (measured[1] - measured[0]) / 2, (planned[1] - planned[0]) / 2
    assert abs(per_layer_planned / per_layer_measured - 1) < 0.1


@pytest.mark.parametrize("text,value", [("80GB", 80 * 10**9), ("40GiB", 40 * 2**30), ("81920MiB", 81920 * 2**20),
                                        ("1.5 gb", 1_500_000_000), ("1000", 1000)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_plans_offline(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, config = train_config(str(path))
    existed = Path(config.out).exists()
    extra = ["--plan-model", PLAN_MODEL[path.stem]] if path.stem in PLAN_MODEL else []
    assert main(["train", "--config", str(path), "--plan", "--plan-gpu-memory", "80GB", *extra]) == 0
    out = capsys.readouterr().out
    assert "| parameters |" in out and "| total: peak" in out and "per GPU" in out
    assert Path(config.out).exists() == existed  # no run directory


def test_run_directory_without_a_producing_config_is_one_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", "configs/coconut_gsm8k_gpt2.yaml", "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("icot: error: model runs/gsm8k_gpt2_cot/best: cannot plan it offline") and "\n" not in err
    assert "--plan-model" in err


@pytest.mark.parametrize("plan_flag", [["--plan"], []], ids=["plan", "train"])
def test_require_fit_refuses_in_one_line_writing_nothing(data, tmp_path, capsys, plan_flag):
    out = tmp_path / "run"
    code = main(["train", "--method", "explicit", "--model", "micro", "--data", str(data), "--out", str(out), "--cpu",
                 *plan_flag, "--require-fit", "--plan-gpu-memory", "1MB"])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert err.startswith("icot: error: --require-fit: the plan does not fit:") and "\n" not in err
    assert "> 0.0 GB" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_unknown_architecture_is_one_line(data, tmp_path, capsys):
    code = main(["train", "--model", "nobody/no-such-model", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--plan"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("icot: error: model nobody/no-such-model: cannot plan it offline")


def test_mistral7b_plan(capsys, monkeypatch):
    """The paper's regime (one 80 GB GPU, pure bf16) and the sharded one (8 x 40 GB, fp32 master weights)."""
    monkeypatch.chdir(ROOT)
    _, config = train_config("configs/stepwise_gsm8k_mistral7b.yaml")
    one = plan(config, "configs/stepwise_gsm8k_mistral7b.yaml", gpu_memory=parse_memory("80GB"))
    assert one.parameters == 7_241_732_096  # Mistral-7B-v0.1
    assert one.weight_dtype == torch.bfloat16
    assert one.parameter_bytes == one.gradient_bytes == 2 * one.parameters
    assert one.optimizer_bytes == 4 * one.parameters + 4 * 291  # two bf16 moments, a step count per tensor
    assert 10e9 < one.activation_bytes < 20e9 and one.seq_len == 150 and one.micro_batch == 16
    assert one.fits and 65e9 < one.total_bytes < 80e9
    path = "configs/stepwise_gsm8k_mistral7b_fsdp8x40.yaml"
    _, config = train_config(path)
    sharded = plan(config, path, strategy="fsdp", processes=8, gpu_memory=parse_memory("40GB"))
    assert sharded.weight_dtype == torch.float32
    assert sharded.parameter_bytes == -(-4 * 7_241_732_096 // 8)
    assert sharded.fits and 10e9 < sharded.total_bytes < 30e9
    assert main(["train", "--config", path, "--plan", "--plan-strategy", "fsdp", "--plan-processes", "8",
                 "--plan-gpu-memory", "40GB"]) == 0
    assert "fits in 40.0 GB per GPU" in capsys.readouterr().out

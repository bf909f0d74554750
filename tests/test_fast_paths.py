"""The fast training paths compute what the plain ones do: vectorised CoT removal, data-loader
workers, length grouping by the lengths actually fed, and the benchmarks' plain loop itself."""

import functools
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from icot.cli import build_train_config
from icot.data.batching import collate, finish_batch, remove_cot
from icot.data.format import read_examples, write_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.evaluate import token_scores
from icot.methods import stepwise
from icot.models import build_preset
from icot.trainer import Trainer
from icot.trainer.loop import BatchOrder
from conftest import ROOT, REFERENCE, mult_examples

sys.path.insert(0, str(ROOT))  # the benchmarks package, for its plain loop
from benchmarks.plain_loop import plain_collate, plain_labels, plain_loss, remove_per_example  # noqa: E402


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """64 examples of 3x3 multiplication, no validation file: best/ is the final model."""
    out = tmp_path_factory.mktemp("fast_paths")
    write_examples(out / "train.txt", mult_examples(3, 3, 64, seed=1))
    return out


def train(data, out, *extra):
    """Stepwise internalization mid-schedule (5 tokens removed, smoothing λ = 1), 6 steps of batch 8."""
    args = ["--data", data, "--model", "micro", "--out", out, "--lr", "3e-3", "--batch-size", "8", "--max-steps", "6",
            "--epochs", "10", "--log-every", "1", "--remove-start-from", "5", "--remove-per-epoch", "1e-9",
            "--removal-smoothing-lambda", "1", *extra]
    trainer_cls, config = build_train_config(None, "stepwise", [str(a) for a in args])
    trainer_cls(config).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], load_file(out / "best" / "model.safetensors")


def identical(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def per_example_removal(batch, n_remove, side="left", keep_position=False, pad_id=0, gap_placement="authors"):
    """remove_cot done the plain way: the benchmarks' Python loop over rows with torch.cat."""
    assert side == "left" and not keep_position
    sep = int(batch["input_ids"][0, batch["first_sep"][0]])
    ids, lengths = remove_per_example(batch["input_ids"], batch["length"], n_remove, sep, False, pad_id)
    removed = torch.minimum(n_remove, batch["cot_len"])
    return finish_batch(ids, lengths, batch["first_sep"], batch["cot_len"] - removed)


def test_vectorised_removal_trains_exactly_like_per_example_removal(train_only, tmp_path, monkeypatch):
    fast_losses, fast_weights = train(train_only, tmp_path / "fast", "--no-group-by-length")
    monkeypatch.setattr(stepwise.trainer, "remove_cot", per_example_removal)
    plain_losses, plain_weights = train(train_only, tmp_path / "plain", "--no-group-by-length")
    assert len(fast_losses) == 6 and fast_losses == plain_losses
    assert identical(fast_weights, plain_weights)


def test_data_loader_workers_train_exactly_like_the_main_process(train_only, tmp_path):
    main_losses, main_weights = train(train_only, tmp_path / "main")
    worker_losses, worker_weights = train(train_only, tmp_path / "workers", "--num-workers", "2")
    assert main_losses == worker_losses and identical(main_weights, worker_weights)


@pytest.mark.skipif(os.environ.get("ICOT_COMPILE_TESTS") != "1",
                    reason="torch.compile takes minutes on a CPU; set ICOT_COMPILE_TESTS=1 to run")
def test_compiled_training_matches_eager_training(train_only, tmp_path):
    eager_losses, eager_weights = train(train_only, tmp_path / "eager")
    compiled_losses, compiled_weights = train(train_only, tmp_path / "compiled", "--compile")
    assert np.allclose(compiled_losses, eager_losses, rtol=1e-4, atol=0)
    assert all((compiled_weights[k] - eager_weights[k]).abs().max() < 1e-4 for k in eager_weights)


def padding(order: BatchOrder, fed_lengths: np.ndarray) -> float:
    batches = [fed_lengths[b] for b in order]
    return 1 - sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)


def test_length_grouping_sorts_by_the_lengths_fed_after_cot_removal():
    examples = read_examples(REFERENCE / "gsm8k" / "train_no_aug.txt")[:2048]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    without_cot = data.lengths - data.n_cot
    by_full_length = padding(BatchOrder(data.lengths, 32, 0, True), without_cot)
    by_fed_length = padding(BatchOrder(without_cot, 32, 0, True), without_cot)
    assert by_fed_length < 0.05 < 0.2 < by_full_length

    class Stub(stepwise.StepwiseTrainer):
        def __init__(self, config):  # only what batch_lengths reads
            self.config, self.train_data, self.steps_per_epoch, self.schedule, self.units = config, data, 10, None, None

    config = stepwise.StepwiseConfig(remove_per_epoch=5, remove_all_when_remove_beyond=12)
    trainer = Stub(config)
    assert (trainer.batch_lengths(0) == data.lengths).all()
    assert (trainer.batch_lengths(1) == data.lengths - np.minimum(data.n_cot, 5)).all()
    assert (trainer.batch_lengths(3) == without_cot).all()  # 15 scheduled, beyond 12: the whole CoT


def test_token_scores_match_cross_entropy_over_every_position():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 50, generator=gen)
    labels = torch.randint(0, 50, (4, 9), generator=gen)
    labels[:, :3] = -100
    labels[2] = -100  # a row with no target at all
    labels[1, 7:] = -100
    logits[:, :-1:2].scatter_add_(-1, labels[:, 1::2, None].clamp(min=0), torch.full((4, 4, 1), 10.0))  # some right
    loss, correct, count = token_scores(logits, labels)
    flat_logits, flat_targets = logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    has_target = flat_targets != -100
    assert torch.allclose(loss, expected) and count == has_target.sum()
    assert correct == ((flat_logits.argmax(-1) == flat_targets) & has_target).sum() > 5


def test_plain_loop_computes_the_same_loss_as_our_loop():
    examples = read_examples(REFERENCE / "mult" / "4x4_test.txt")[:16]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    torch.manual_seed(0)
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    n_remove = torch.randint(0, 50, (16,), generator=torch.Generator().manual_seed(0))
    ours = remove_cot(collate(data, range(16), layout.pad_id), n_remove, pad_id=layout.pad_id)
    loss_sum, _, count = token_scores(model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                                            position_ids=ours["position_ids"]).logits, ours["labels"])
    ids, lengths = plain_collate([data.row(i).tolist() for i in range(16)], layout.pad_id)
    ids, lengths = remove_per_example(ids, lengths, n_remove, layout.sep_id, False, layout.pad_id)
    assert torch.equal(ids, ours["input_ids"])
    model.set_attn_implementation("eager")
    plain = plain_loss(model, ids, plain_labels(ids, lengths, layout.sep_id, False))
    assert abs(plain.item() - (loss_sum / count).item()) < 1e-5


def test_a_compiled_run_validates_and_saves_the_eager_model(tmp_path, monkeypatch):
    """torch.compile wraps only the training forward: decoding through the compiled wrapper fails to
    trace the KV cache. Dynamo's "eager" backend traces the same graphs as inductor without the
    minutes of code generation."""
    write_examples(tmp_path / "train.txt", mult_examples(2, 2, 32, seed=1))
    write_examples(tmp_path / "valid.txt", mult_examples(2, 2, 8, seed=2))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    decoded_by, make_predictor = [], Trainer.predictor
    monkeypatch.setattr(Trainer, "predictor", lambda self, model: decoded_by.append(type(model)) or make_predictor(self, model))
    args = ["--data", tmp_path, "--model", "micro", "--out", tmp_path / "run", "--batch-size", "8", "--max-steps", "2",
            "--eval-every", "2", "--compile", "true"]
    trainer_cls, config = build_train_config(None, "explicit", [str(a) for a in args])
    trainer_cls(config).fit()
    assert decoded_by and set(decoded_by) == {GPT2LMHeadModel}
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best"), GPT2LMHeadModel)

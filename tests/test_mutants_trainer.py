"""Direct tests of trainer/loop.py, trainer/checkpoints.py, trainer/config.py and trainer/rundir.py for
their mutants (issue 50): calls with the expected values written out, and a few training runs of a micro
GPT-2 on eight 2x2 multiplications (a second or two each). docs/RESULTS.md, "Mutation testing", lists the
mutants each one kills."""

from __future__ import annotations

import io
import json
import math
import pickle
import signal
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from icot import errors
from icot.errors import UserError
from icot.trainer import loop
from icot.trainer.config import LoraSettings, TrainConfig
from icot.trainer.loop import (BatchOrder, EvaluationInterrupted, Progress, Trainer, TrainingInterrupted,
                               _Collate, _Indices, _Window)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """icot.errors.warn says each message once per process: every test sees its own warnings."""
    monkeypatch.setattr(errors, "_warned", set())


def warnings_of(capsys) -> list[str]:
    return [line.removeprefix("icot: warning: ") for line in capsys.readouterr().err.splitlines()
            if line.startswith("icot: warning: ")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Eight 2x2 multiplications to train on, two to validate on, two to test on."""
    from conftest import mult_examples
    from icot.data.format import write_examples

    folder = tmp_path_factory.mktemp("mult2")
    examples = mult_examples(2, 2, 12, seed=3)
    for split, part in (("train", examples[:8]), ("valid", examples[8:10]), ("test", examples[10:])):
        write_examples(folder / f"{split}.txt", part)
    return folder


def config(tmp_path, data_dir, **changes) -> TrainConfig:
    settings = dict(data=str(data_dir), model="micro", out=str(tmp_path / "run"), batch_size=4, max_positions=64,
                    eval_batch_size=4, lr=1e-3, log_every=1)
    return TrainConfig(**{**settings, **changes})


# ----- the interruptions ---------------------------------------------------------------------------

def test_an_interruption_names_its_signal_and_step_and_survives_pickling():
    stopped = TrainingInterrupted(15, 7)
    assert (stopped.signum, stopped.step, str(stopped)) == (15, 7, "signal 15 at step 7")
    assert stopped.describe("R") == "stopped by signal 15 at step 7, checkpoint saved; continue with: icot train --resume R"
    again = pickle.loads(pickle.dumps(stopped))
    assert type(again) is TrainingInterrupted and (again.signum, again.step) == (15, 7)
    tested = EvaluationInterrupted(2, 9, "M", "D")
    assert (tested.signum, tested.step, tested.model, tested.data, str(tested)) == (2, 9, "M", "D", "signal 2 at step 9")
    assert tested.describe("R") == ("stopped by signal 2 before the test evaluation ended; the best model is saved: test "
                                    "it with icot eval --model M --data D, or finish the run with icot train --resume R")
    again = pickle.loads(pickle.dumps(tested))
    assert type(again) is EvaluationInterrupted and (again.signum, again.step, again.model, again.data) == (2, 9, "M", "D")


# ----- Progress ----------------------------------------------------------------------------------------

def test_progress_state_round_trips_and_reads_checkpoints_from_before_best_score():
    p = Progress(epoch=2, step=5, best_score=[0.5, 0.25], best_final=False, method_state={"k": 1})
    state = p.state_dict()
    assert state["epoch"] == 2 and state["step"] == 5 and state["best_score"] == [0.5, 0.25] and state["method_state"] == {"k": 1}
    q = Progress()
    q.load_state_dict(state)
    assert q == p
    old = {"step": 3, "best_accuracy": 0.75, "best_token_accuracy": 0.5}
    q = Progress()
    q.load_state_dict(old)
    assert (q.step, q.best_score, q.best_final) == (3, [0.75, 0.5], False)
    assert old == {"step": 3, "best_accuracy": 0.75, "best_token_accuracy": 0.5}  # the caller's dict is left alone
    q = Progress()
    q.load_state_dict({"best_accuracy": -math.inf, "best_token_accuracy": -math.inf, "best_final": True})
    assert (q.best_score, q.best_final) == (None, True)
    q.load_state_dict({"best_accuracy": -math.inf, "best_token_accuracy": 0.5})  # exact match decides
    assert q.best_score is None
    q.best_score = [1.0, 1.0]
    q.forget_best()
    assert q.best_score is None


def test_is_best_prefers_the_final_form_then_the_higher_score():
    p = Progress()
    assert p.is_best((0.0, 0.0)) and p.is_best((0.0, 0.0), final=False)  # nothing saved yet
    p.best_score, p.best_final = [0.5, 0.5], True
    assert [p.is_best(s) for s in ((0.5, 0.5), (0.5, 0.6), (0.6, 0.0), (0.4, 1.0))] == [False, True, True, False]
    assert p.is_best((1.0, 1.0), final=False) is False
    p.best_final = False
    assert p.is_best((0.0, 0.0), final=True) is True
    assert p.is_best((0.0, 0.0), final=False) is True  # a later stage replaces an earlier one
    assert Progress().is_best((0.0, 0.0), False) is True


# ----- batches ----------------------------------------------------------------------------------------

def test_batch_order_without_grouping_is_the_seeded_permutation_cut_into_batches():
    order = BatchOrder(np.arange(10), 4, seed=5, group_by_length=False)
    assert len(order) == 3 and len(BatchOrder(np.arange(8), 4, 5, False)) == 2
    assert (order.lengths == np.arange(10)).all() and (order.batch_size, order.seed, order.group, order.epoch) == (4, 5, False, 0)
    expected = np.random.default_rng([5, 0]).permutation(10).tolist()
    assert list(order) == [expected[:4], expected[4:8], expected[8:]]
    order.epoch = 3
    expected = np.random.default_rng([5, 3]).permutation(10).tolist()
    assert list(order) == [expected[:4], expected[4:8], expected[8:]]
    assert all(type(i) is int for batch in order for i in batch)


def test_batch_order_with_grouping_sorts_each_run_of_64_batches_by_length_and_shuffles_the_batches():
    lengths = np.array([i % 7 * 10 + i // 7 for i in range(300)])  # all distinct
    order = BatchOrder(lengths, 2, seed=1, group_by_length=True)
    batches = list(order)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert len(batches) == 150 and all(len(b) == 2 for b in batches)
    rng = np.random.default_rng([1, 0])
    perm = rng.permutation(300)
    chunks = [perm[:128], perm[128:256], perm[256:]]
    ordered = [i for c in chunks for i in sorted(c, key=lambda i: -lengths[i])]
    cut = [ordered[i:i + 2] for i in range(0, 300, 2)]
    assert batches == [cut[i] for i in rng.permutation(150)]
    tied = BatchOrder(np.array([3, 3, 3, 3, 5, 5]), 3, seed=0, group_by_length=True)
    perm = np.random.default_rng([0, 0]).permutation(6)
    stable = [i for i in perm if i >= 4] + [i for i in perm if i < 4]  # equal lengths keep their drawn order
    assert sorted(map(tuple, tied)) == sorted([tuple(stable[:3]), tuple(stable[3:])])


def test_indices_and_collate_add_each_rows_index(data_dir):
    from icot.data.batching import collate
    from icot.data.format import read_examples
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer

    assert len(_Indices(5)) == 5 and _Indices(5)[3] == 3 and _Indices(5).n == 5
    from conftest import mult_examples

    examples = read_examples(data_dir / "train.txt") + mult_examples(2, 3, 1, seed=1)  # a longer row: padding
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    for drop in (False, True):
        batch = _Collate(data, 7, drop)([5, 8])
        expected = collate(data, [5, 8], 7, drop)
        assert (batch["input_ids"] == 7).any()
        assert set(batch) == {*expected, "index"} and batch["index"].tolist() == [5, 8]
        for key, value in expected.items():
            assert torch.equal(batch[key], value), key


# ----- bf16 on a CPU ----------------------------------------------------------------------------------

def test_emulated_bf16_is_warned_about_on_the_main_process_of_a_cpu_only(monkeypatch, capsys):
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    monkeypatch.setattr(loop, "native_bf16_cpu", lambda: False)
    loop.warn_if_bf16_emulated("fp32", cpu)
    loop.warn_if_bf16_emulated("bf16", SimpleNamespace(device=torch.device("cpu"), is_main_process=False))
    loop.warn_if_bf16_emulated("bf16", SimpleNamespace(device=torch.device("meta"), is_main_process=True))
    assert warnings_of(capsys) == []
    loop.warn_if_bf16_emulated("bf16-mixed", cpu)
    assert warnings_of(capsys) == ["precision bf16-mixed on a CPU without native bf16: torch emulates bf16 matrix "
                                   "products, many times slower than fp32; --precision fp32 is faster here"]
    monkeypatch.setattr(loop, "native_bf16_cpu", lambda: True)
    loop.warn_if_bf16_emulated("bf16", cpu)
    assert warnings_of(capsys) == []
    monkeypatch.undo()
    assert loop.native_bf16_cpu() is torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----- the logging window ---------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.wall, self.cpu = 100.0, 10.0

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu


class SumAccelerator:
    """One process: reduce gives back what it is given (recorded), on the CPU."""

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True

    def __init__(self):
        self.reduced = []

    def reduce(self, tensor, reduction):
        self.reduced.append(reduction)
        return tensor.clone()


def test_the_window_sums_a_logging_interval_and_times_only_from_mark(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    progress = Progress(train_seconds=1.0, train_cpu_seconds=0.5)
    window = _Window(progress)
    assert window.sums.dtype == torch.float64 and window.sums.tolist() == [0.0] * 5 and window.extra == {}
    assert (window.seconds, window.last, window.last_cpu) == (0.0, 100.0, 10.0)
    clock.wall, clock.cpu = 102.0, 11.0
    window.add(torch.tensor(6.0), torch.tensor(3), torch.tensor(4), torch.tensor(20), 2, {"part": 1.5})
    clock.wall, clock.cpu = 105.0, 11.5
    window.mark()  # a validation: not counted
    clock.wall, clock.cpu = 107.0, 12.5
    window.add(torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(1), torch.tensor(4), torch.tensor(12), 3,
               {"part": 0.5, "other": 4.0})
    assert window.seconds == 4.0 and progress.train_seconds == 5.0 and progress.train_cpu_seconds == 2.5
    assert window.sums.tolist() == [8.0, 4.0, 8.0, 32.0, 5.0]
    assert window.extra == {"part": [2.0, 2.0], "other": [4.0, 1.0]}
    acc = SumAccelerator()
    stats = window.reduce(acc)
    assert acc.reduced == ["sum", "sum"]
    assert stats == {"loss": 1.0, "token_accuracy": 0.5, "tokens_per_s": 8.0, "examples_per_s": 1.25, "examples": 5,
                     "other": 4.0, "part": 1.0}
    assert list(stats) == ["loss", "token_accuracy", "tokens_per_s", "examples_per_s", "examples", "other", "part"]
    assert type(stats["examples"]) is int
    assert window.sums.tolist() == [0.0] * 5 and window.extra == {} and window.seconds == 0.0
    empty = window.reduce(acc)  # nothing counted, no time: no division by zero
    assert empty == {"loss": 0.0, "token_accuracy": 0.0, "tokens_per_s": 0.0, "examples_per_s": 0.0, "examples": 0}
    window.add(torch.tensor(1.0), torch.tensor(1), torch.tensor(3), torch.tensor(3), 1, {"x": 1.0})
    window.sums[2] = 0.5  # a count below 1 divides by 1
    window.seconds = 0.5
    stats = window.reduce(acc)
    assert (stats["loss"], stats["token_accuracy"], stats["tokens_per_s"], stats["examples_per_s"]) == (1.0, 1.0, 6.0, 2.0)
    window.extra = {"y": [1.0, 0.0]}
    assert window.reduce(acc)["y"] == 1.0
    window.extra = {"z": [1.0, 3.0], "w": [1234.5678, 1.0]}  # summed in float64
    assert window.reduce(acc) == {"loss": 0.0, "token_accuracy": 0.0, "tokens_per_s": 0.0, "examples_per_s": 0.0,
                                  "examples": 0, "w": 1234.5678, "z": 0.333333}  # rounded to 6 places


# ----- small functions ------------------------------------------------------------------------------

def test_end_records_prefixes_infinity_and_signal_handlers():
    assert loop._is_end_record(b'{"event": "end", "step": 4}\n', 4)
    assert not loop._is_end_record(b'{"event": "end", "step": 4}', 4)  # half a line
    assert not loop._is_end_record(b'{"event": "end", "step": 5}\n', 4)
    assert not loop._is_end_record(b'{"event": "start", "step": 4}\n', 4)
    assert not loop._is_end_record(b'{"event": "end"\n', 4)
    assert not loop._is_end_record(b'[1]\n', 4)
    assert loop._prefixed("val_", {"a": 1, "b": 2}) == {"val_a": 1, "val_b": 2}
    assert loop.to_dict_json({"a": math.inf, "b": -math.inf, "c": 1.5, "d": "x", "e": 3}) == \
        {"a": "inf", "b": "inf", "c": 1.5, "d": "x", "e": 3}
    mine = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, print)
        loop._restore_signal_handlers({signal.SIGUSR1: None})
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        loop._restore_signal_handlers({signal.SIGUSR1: signal.SIG_IGN})
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, mine)


# ----- a Trainer's own methods, called directly ------------------------------------------------------

class RecordedAccelerator(SumAccelerator):
    """Accelerator's arguments, recorded (its state is one per process: a real one keeps its first settings)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs, self.process_index = kwargs, 2


def test_a_new_trainer_takes_its_settings(tmp_path, data_dir, monkeypatch):
    cfg = config(tmp_path, data_dir, seed=42, grad_accum=3, answer_match="exact")
    trainer = Trainer(cfg)
    assert trainer.config is cfg and trainer.resume is False and trainer.run_dir == tmp_path / "run"
    assert trainer.best_dir == tmp_path / "run" / "best" and trainer.progress == Progress()
    assert torch.equal(trainer.rng.get_state(), torch.Generator().manual_seed(42).get_state())
    assert trainer.matcher.mode == "exact"
    assert trainer.tokenizer is None and trainer.model is None and trainer.layout is None and trainer.task is None
    assert trainer.files == {} and trainer.copies == {} and trainer.splits is None and trainer.hub_splits is None
    assert trainer.train_data is None and trainer.valid_data is None and trainer.test_data is None
    assert (trainer.steps_per_epoch, trainer.total_steps) == (0, 0)
    assert trainer.optimizer is None and trainer.model_wrapped is None and trainer.sharding is None
    assert trainer.train_metrics == {} and trainer.stop_signal is None and trainer.stop_at_once is False
    assert trainer.last_validated is None and trainer.last_val_accuracy is None and trainer.last_saved is None
    assert trainer.method_name == "explicit" and trainer.is_main
    other = Trainer(config(tmp_path, data_dir), resume=True, best_dir=str(tmp_path / "b"))
    assert other.resume is True and other.best_dir == tmp_path / "b"
    monkeypatch.setattr(loop, "Accelerator", RecordedAccelerator)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = Trainer(cfg)
    kwargs = trainer.accelerator.kwargs
    assert set(kwargs) == {"mixed_precision", "gradient_accumulation_steps", "cpu", "dataloader_config", "log_with",
                           "project_config"}
    assert (kwargs["mixed_precision"], kwargs["gradient_accumulation_steps"], kwargs["cpu"], kwargs["log_with"]) == \
        ("no", 3, False, None)
    assert kwargs["dataloader_config"].non_blocking is True
    assert kwargs["project_config"].project_dir == str(tmp_path / "run")
    assert kwargs["project_config"].logging_dir == str(tmp_path / "run" / "tensorboard")
    assert torch.equal(trainer.rng.get_state(), torch.Generator().manual_seed(42 + 2 * 7919).get_state())
    precisions = {"fp32": "no", "bf16": "no", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}
    for precision, mixed in precisions.items():
        assert Trainer(config(tmp_path, data_dir, precision=precision)).accelerator.kwargs["mixed_precision"] == mixed
    assert Trainer(config(tmp_path, data_dir, cpu=True)).accelerator.kwargs["cpu"] is True
    assert Trainer(config(tmp_path, data_dir, report_to="tensorboard")).accelerator.kwargs["log_with"] == ["tensorboard"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # several CPU processes: Accelerate is told to use the CPU
    assert Trainer(cfg).accelerator.kwargs["cpu"] is (not torch.cuda.is_available())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Trainer(cfg).accelerator.kwargs["cpu"] is False


def test_a_trainer_refuses_settings_it_cannot_run(tmp_path, data_dir, monkeypatch):
    with pytest.raises(UserError) as error:
        Trainer(config(tmp_path, data_dir, fsdp=True))
    assert str(error.value) == ("fsdp: shards over processes a launcher starts; run torchrun --nproc_per_node N -m "
                                "icot.cli train ... (or accelerate launch), N being 1 or more")

    class EvalMode(Trainer):
        train_mode = False

    class Cached(Trainer):
        supports_gradient_checkpointing = False

    for cls, why in ((EvalMode, "trains in eval mode, where checkpointing does nothing"),
                     (Cached, "runs its training passes with the KV cache, which checkpointing turns off")):
        with pytest.raises(UserError) as error:
            cls(config(tmp_path, data_dir, gradient_checkpointing=True, method="nocot"))
        assert str(error.value) == f"gradient_checkpointing: --method nocot {why}; expected gradient_checkpointing false"
    assert Trainer(config(tmp_path, data_dir, gradient_checkpointing=True)).config.gradient_checkpointing
    monkeypatch.setenv("RANK", "0")
    assert Trainer(config(tmp_path, data_dir, fsdp=True)).config.fsdp  # under a launcher: accepted here


def test_the_learning_rate_warms_up_linearly_then_drops(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir, warmup_steps=4, lr_drop_step=6, lr_drop_factor=0.5))
    assert [trainer.lr_factor(s) for s in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert [trainer.schedule_factor(s) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    trainer.steps_undone = lambda: 2  # a method that undid 2 steps takes them again at their earlier values
    assert [trainer.lr_factor(s) for s in range(2, 10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5]
    trainer.total_steps = 7
    assert trainer.end_step() == 9  # later by the steps undone
    plain = Trainer(config(tmp_path, data_dir))
    assert [plain.lr_factor(s) for s in (0, 1, 1000)] == [1.0, 1.0, 1.0]
    assert [plain.schedule_factor(s) for s in (0, 5)] == [1.0, 1.0]
    assert plain.steps_undone() == 0 and plain.goal_reached() is False
    plain.total_steps = 7
    assert plain.end_step() == 7


def test_the_base_hooks_of_a_trainer(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    model = object()
    assert trainer.build_model(None, model) is model
    batch = {"a": 1}
    assert trainer.training_batch(batch) is batch
    assert trainer.competes_for_best() is True and trainer.in_final_form() is True
    assert trainer.method_state() == {} and trainer.method_state_for_checkpoint() == {}
    assert trainer.metadata() == {} and trainer.postfix() == {}
    from icot.data.tokenizers import word_tokenizer

    trainer.tokenizer = tokenizer = word_tokenizer(["1 2"])
    predictor = trainer.predictor("M")
    assert (predictor.model, predictor.tokenizer, predictor.cot_removed) == ("M", tokenizer, 0)
    trainer.train_data = SimpleNamespace(lengths=np.array([9, 7]), n_cot=np.array([4, 2]))
    assert trainer.batch_lengths(0).tolist() == [9, 7]
    trainer.drop_cot = True
    assert trainer.predictor("M").cot_removed == math.inf
    assert trainer.batch_lengths(3).tolist() == [5, 5]


def test_compute_loss_sums_the_target_tokens_of_a_batch(data_dir):
    from icot.data.batching import collate
    from icot.data.format import read_examples
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer
    from icot.models import build_preset

    examples = read_examples(data_dir / "train.txt")
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    batch = collate(encode(tokenizer, layout, examples), [0, 1, 2], layout.pad_id)
    batch["position_ids"] = batch["position_ids"] + 1  # the loss reads the batch's own positions
    torch.manual_seed(0)
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    loss = Trainer.compute_loss(None, model, batch)
    assert calls[0]["use_cache"] is False and calls[0]["attention_mask"] is batch["attention_mask"]
    assert calls[0]["position_ids"] is batch["position_ids"] and calls[0]["input_ids"] is batch["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="sum")
    assert loss.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.count.item() == mask.sum().item()
    assert loss.correct.item() == (logits[:, :-1].argmax(-1)[mask] == targets[mask]).sum().item()
    assert loss.metrics == {}


def test_the_optimizer_is_adamw_with_decay_on_every_weight_or_on_matrices_only(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir, lr=0.25, weight_decay=0.125))
    trainer.model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    adamw = trainer.new_optimizer()
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 1
    group = adamw.param_groups[0]
    assert (group["lr"], group["weight_decay"], len(group["params"])) == (0.25, 0.125, 4)
    trainer.config.decay_matrices_only = True
    groups = trainer.new_optimizer().param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["params"][0] is trainer.model[0].weight
    assert [g["weight_decay"] for g in groups] == [0.125, 0.0] and [g["lr"] for g in groups] == [0.25, 0.25]


def test_gradients_are_clipped_to_max_grad_norm(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir, max_grad_norm=0.5))
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    model = SimpleNamespace(parameters=lambda: [weight])
    clipped = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda params, norm: clipped.append(norm) or clip(params, norm)
    trainer.clip_gradients(model)
    torch.testing.assert_close(weight.grad, torch.tensor([0.3, 0.4]))
    assert clipped == [0.5]  # Accelerate's clipping (it unscales fp16 gradients first)
    trainer.sharding = object()  # sharded: torch's clipping of the whole gradient
    weight.grad = torch.tensor([3.0, 4.0])
    trainer.clip_gradients(model)
    torch.testing.assert_close(weight.grad, torch.tensor([0.3, 0.4]))
    assert clipped == [0.5]


def test_the_values_shared_across_processes_on_one_process(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    assert trainer.from_main(0.25) == 0.25 and type(trainer.from_main(2)) is float
    assert trainer.all_processes(True) is True and trainer.all_processes(False) is False
    assert trainer.max_over_processes(7) == 7 and type(trainer.max_over_processes(7)) is int
    trainer.accelerator = acc = SumAccelerator()
    assert trainer.max_over_processes(3) == 3 and acc.reduced == ["max"]
    assert trainer.all_processes(True) and trainer.from_main(0.5) == 0.5 and acc.reduced == ["max", "sum", "sum"]
    acc.is_main_process = False
    assert trainer.from_main(0.5) == 0.0  # only the main process's value counts
    acc.num_processes = 2
    assert trainer.all_processes(True) is False  # 1 of 2 processes


def test_reset_optimizer_state_clears_the_moments_keeping_the_settings(tmp_path, data_dir):
    from accelerate.optimizer import AcceleratedOptimizer

    trainer = Trainer(config(tmp_path, data_dir))
    weight = torch.nn.Parameter(torch.ones(2))
    adamw = torch.optim.AdamW([weight], lr=0.5)
    weight.grad = torch.ones(2)
    adamw.step()
    trainer.optimizer = adamw
    trainer.reset_optimizer_state()
    assert len(adamw.state) == 0 and adamw.param_groups[0]["lr"] == 0.5
    adamw.step()
    trainer.optimizer = AcceleratedOptimizer(adamw, device_placement=False)
    trainer.reset_optimizer_state()
    assert len(adamw.state) == 0


def test_the_run_length_is_said_and_a_drop_it_never_reaches_is_warned_about(tmp_path, data_dir, capsys):
    trainer = Trainer(config(tmp_path, data_dir, max_steps=6, lr_drop_step=6, max_train_seconds=2.5))
    trainer.total_steps, trainer.steps_per_epoch, trainer.train_data = 6, 4, [0] * 13
    trainer.state_length()
    trainer.check_run_length()
    out = capsys.readouterr()
    assert out.out == ("training 6 optimizer steps (max_steps 6, or 2.5 s of training if sooner (max_train_seconds)): "
                       "1.5 epochs of 4 steps, 13 training examples\n")
    assert out.err == ("icot: warning: lr_drop_step 6: the run ends after step 6 (max_steps, epochs), so the learning "
                       "rate never drops; expected a step below that\n")
    trainer.config.max_steps, trainer.config.max_train_seconds, trainer.config.epochs = None, None, 3
    trainer.config.lr_drop_step = 5
    trainer.state_length()
    trainer.check_run_length()
    out = capsys.readouterr()
    assert (out.out, out.err) == ("training 6 optimizer steps (epochs 3): 1.5 epochs of 4 steps, 13 training examples\n", "")
    trainer.config.lr_drop_step = None
    trainer.check_run_length()
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    trainer.config.lr_drop_step = 9
    trainer.state_length()
    trainer.check_run_length()
    assert capsys.readouterr() == ("", "")


def test_time_is_up_once_max_train_seconds_have_run(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.progress.train_seconds = 1e9
    assert trainer.time_is_up() is False
    trainer.config.max_train_seconds = 2.0
    assert [trainer.time_is_up() for trainer.progress.train_seconds in (1.9, 2.0, 2.1)] == [False, True, True]


def test_log_event_appends_a_json_line_with_infinity_as_a_string(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir, out=str(tmp_path / "new" / "run")))  # made with its parent
    logged = []
    trainer.accelerator.log = lambda values, step: logged.append((values, step))
    trainer.progress.step = 3
    trainer.log_event({"event": "x", "count": math.inf, "n": 2})
    trainer.log_event({"event": "y", "step": 9, "v": 0.5})
    lines = (tmp_path / "new" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"event": "x", "count": "inf", "n": 2}, {"event": "y", "step": 9, "v": 0.5}]
    assert logged == [({"x/n": 2}, 3), ({"y/v": 0.5}, 9)]
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    trainer.log_event({"event": "z"})
    assert len((tmp_path / "new" / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_cut_metrics_drops_what_follows_the_checkpoint_but_its_steps_end_record(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.progress.step = 4
    kept = b'{"step": 3}\n'
    end = b'{"event": "end", "step": 4}\n'
    tail = b'{"step": 4}\n' + end + b'{"event": "end", "step": 5}\n' + end + b'{"event": "end", "step": 4}'
    trainer.metrics_file.parent.mkdir()
    trainer.metrics_file.write_bytes(kept + tail)
    trainer.cut_metrics(None)
    assert trainer.metrics_file.read_bytes() == kept + tail
    trainer.cut_metrics(len(kept))
    assert trainer.metrics_file.read_bytes() == kept + end + end  # not the half line
    trainer.metrics_file.unlink()
    trainer.cut_metrics(3)
    assert not trainer.metrics_file.exists()


def test_a_non_finite_loss_or_weights_stop_training_naming_the_last_good_checkpoint(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.progress.step = 4
    trainer.check_finite(torch.tensor(1.5))
    with pytest.raises(UserError) as error:
        trainer.check_finite(torch.tensor(math.nan))
    assert str(error.value) == ("loss became nan at step 5; training stopped and no checkpoint had been saved yet (try a "
                                "lower lr, gradient clipping or fp32)")
    with pytest.raises(UserError):
        trainer.check_finite(torch.tensor(-math.inf))
    trainer.model_wrapped = torch.nn.Linear(2, 2)
    trainer.require_finite_weights()
    with torch.no_grad():
        trainer.model_wrapped.bias[1] = math.inf
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "latest").write_text("step-00000002\n")
    with pytest.raises(UserError) as error:
        trainer.require_finite_weights()
    assert str(error.value) == (f"weights became non-finite by step 4; training stopped and the last good checkpoint is "
                                f"{checkpoints / 'step-00000002'} (try a lower lr, gradient clipping or fp32)")
    records = [json.loads(line) for line in trainer.metrics_file.read_text().splitlines()]
    assert records == [{"event": "non_finite_loss", "step": 4}, {"event": "non_finite_loss", "step": 4},
                       {"event": "non_finite_weights", "step": 4}]


def test_a_resume_cannot_end_before_its_checkpoint_nor_at_it_without_a_best_model(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir, max_steps=5), resume=True)
    trainer.total_steps, trainer.progress.step = 5, 5
    trainer.refuse_passed_end()  # no validation data: nothing to wait for
    trainer.valid_data = "V"
    with pytest.raises(UserError) as error:
        trainer.refuse_passed_end()
    run = tmp_path / "run"
    assert str(error.value) == (f"--max-steps 5: {run} stopped at step 5 before its first validation, so it has no best "
                                "model yet; expected --max-steps above 5")
    trainer.best_dir.mkdir(parents=True)
    trainer.refuse_passed_end()
    trainer.progress.step = 6
    with pytest.raises(UserError) as error:
        trainer.refuse_passed_end()
    assert str(error.value) == (f"--max-steps 5: {run} is already at step 6 (checkpoints/latest), past the end this "
                                "sets (step 5); expected --max-steps of at least 6")
    trainer.config.max_steps, trainer.config.epochs, trainer.total_steps = None, 2, 4
    with pytest.raises(UserError) as error:
        trainer.refuse_passed_end()
    assert str(error.value).startswith(f"--epochs 2: {run} is already at step 6")


def test_signals_ask_for_a_checkpoint_first_and_stop_at_once_the_second_time(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    replaced = trainer._install_signal_handlers()
    try:
        assert replaced == {signal.SIGINT: before[0], signal.SIGTERM: before[1]}
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is not before[0]
        try:
            handler(signal.SIGTERM, None)
        except KeyboardInterrupt:
            pytest.fail("the first signal stopped at once")
        assert trainer.stop_signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        assert trainer.stop_signal == signal.SIGTERM  # the first one is kept
        trainer.stop_signal, trainer.stop_at_once = None, True
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        assert trainer.stop_signal == signal.SIGINT
    finally:
        loop._restore_signal_handlers(replaced)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    import threading

    elsewhere = []  # outside the main thread no handler can be set: none is replaced
    thread = threading.Thread(target=lambda: elsewhere.append(trainer._install_signal_handlers()))
    thread.start()
    thread.join()
    assert elsewhere == [{}]


def test_the_final_test_after_a_signal_says_how_to_test_again(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.test_metrics = lambda: {"test_accuracy": 1.0}
    trainer.files = {"test": "T"}
    trainer.progress.step = 6
    assert trainer.final_test() == {} and trainer.stop_at_once is True  # no test data
    trainer.test_data = "D"
    assert trainer.final_test() == {"test_accuracy": 1.0}
    trainer.stop_signal = signal.SIGTERM
    with pytest.raises(EvaluationInterrupted) as stopped:
        trainer.final_test()
    assert (stopped.value.signum, stopped.value.step, stopped.value.model, stopped.value.data) == \
        (signal.SIGTERM, 6, trainer.best_dir, "T")
    trainer.test_data = None
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.final_test()
    assert type(stopped.value) is TrainingInterrupted and (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 6)

    def interrupted():
        raise KeyboardInterrupt

    trainer.stop_signal, trainer.test_data, trainer.test_metrics = None, "D", interrupted
    with pytest.raises(EvaluationInterrupted) as stopped:
        trainer.final_test()
    assert stopped.value.signum == signal.SIGINT  # not a signal of ours: Ctrl-C


def test_best_summary_warns_when_the_best_model_is_not_of_the_final_form(tmp_path, data_dir, capsys):
    trainer = Trainer(config(tmp_path, data_dir))
    p = trainer.progress
    assert trainer.best_summary() == {"best_step": None, "best_val_accuracy": None, "best_final_form": True}
    p.best_step, p.best_score = 4, [0.75, 0.5]
    assert trainer.best_summary() == {"best_step": 4, "best_val_accuracy": 0.75, "best_final_form": True}
    assert warnings_of(capsys) == []
    p.best_final = False
    assert trainer.best_summary()["best_final_form"] is False
    assert warnings_of(capsys) == ["the run ended before explicit reached its final form: best/ holds a model of an "
                                   "earlier stage, so its accuracy is not explicit's; expected a longer run (max_steps, "
                                   "epochs)"]


def test_log_train_records_the_window_and_sets_the_bars_postfix(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.method_state = lambda: {"removed": 2}
    trainer.postfix = lambda: {"rm": 2}
    trainer.optimizer = SimpleNamespace(param_groups=[{"lr": 0.125}, {"lr": 9.0}])
    p = trainer.progress
    p.step, p.epoch, p.examples, p.train_seconds, p.train_cpu_seconds = 6, 1, 10, 1.23456, 0.12345
    window = _Window(p)
    window.seconds = 2.0
    window.add(torch.tensor(6.0), torch.tensor(3), torch.tensor(4), torch.tensor(20), 2, {})
    bar = SimpleNamespace(set_postfix=lambda **kw: postfix.update(kw))
    postfix = {}
    trainer.log_train(window, bar)
    stats = {"loss": 1.5, "token_accuracy": 0.75, "tokens_per_s": 10.0, "examples_per_s": 1.0}
    assert trainer.train_metrics == stats and p.examples == 12
    assert json.loads(trainer.metrics_file.read_text()) == {"step": 6, "epoch": 1, "lr": 0.125, **stats, "examples": 12,
                                                            "train_seconds": 1.235, "train_cpu_seconds": 0.123, "removed": 2}
    assert postfix == {"loss": "1.500", "tok_acc": "0.750", "tok_s": "10", "rm": 2}


# ----- training runs --------------------------------------------------------------------------------

def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_two_losses(cfg: TrainConfig, examples) -> tuple[float, float]:
    """The losses of the first two optimizer steps, computed here: the seeded model built as a new run
    builds it, the first two batches of the seeded order, every target token counted once, and one
    AdamW step between them at the warm-up's first learning rate with the gradient clipped."""
    from icot.data.batching import collate
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer
    from icot.models import build_preset

    torch.manual_seed(cfg.seed)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, cfg.max_positions)
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    adamw = torch.optim.AdamW(model.parameters(), lr=cfg.lr / cfg.warmup_steps, weight_decay=cfg.weight_decay)
    losses = []
    for indices in list(BatchOrder(data.lengths, cfg.batch_size, cfg.seed, True))[:2]:
        batch = collate(data, indices, layout.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask])
        losses.append(loss.item())
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) > cfg.max_grad_norm  # it clips
        adamw.step()
        adamw.zero_grad()
    return tuple(losses)


RUN_SETTINGS = dict(max_steps=5, warmup_steps=2, lr_drop_step=3, lr_drop_factor=0.5, eval_every=3, save_every=3,
                    keep_checkpoints=2, seed=8, max_grad_norm=0.5, max_new_tokens=10)  # seed 8: grouping reorders


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A 5-step run of 2 steps an epoch: warm-up over 2 steps, the learning rate halved from step 3, the
    gradient clipped to 0.5, validated and saved every 3 steps and at the end (2 checkpoints kept)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(tmp, data_dir, **RUN_SETTINGS)
    cfg.validate()
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
        warnings.simplefilter("always")
        summary = Trainer(cfg).fit()
    return cfg, Path(cfg.out), summary, SimpleNamespace(out=out.getvalue(), err=err.getvalue(), warnings=caught)


def test_training_run_logs_each_step_validates_saves_and_tests(trained, data_dir):
    from icot.data.format import read_examples
    from icot.models import build_preset

    cfg, run, summary, said = trained
    log = records(run)
    assert [r.get("event", "train") for r in log] == ["start", "train", "train", "train", "validation", "train", "train",
                                                       "validation", "end"]
    start = log[0]
    examples = read_examples(data_dir / "train.txt")
    parameters = sum(w.numel() for w in build_preset("micro", 40, 0, 64).parameters()) - 40 * 128
    assert start["parameters"] == start["trainable_parameters"] > parameters
    assert start == {"event": "start", "steps_per_epoch": 2, "total_steps": 5, "train_examples": 8, "longest_cot": 8,
                     "parameters": start["parameters"], "trainable_parameters": start["parameters"], "processes": 1,
                     "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_native_bf16": loop.native_bf16_cpu()}
    train = [r for r in log if "event" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and [r["epoch"] for r in train] == [0, 0, 1, 1, 2]
    assert [r["lr"] for r in train] == [5e-4, 1e-3, 1e-3, 5e-4, 5e-4]
    assert [r["examples"] for r in train] == [4, 8, 12, 16, 20]
    assert [train[0]["loss"], train[1]["loss"]] == pytest.approx(first_two_losses(cfg, examples), rel=1e-4)
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(0 <= r["token_accuracy"] <= 1 and r["tokens_per_s"] > 0 and r["examples_per_s"] > 0 for r in train)
    assert all(a["train_seconds"] <= b["train_seconds"] for a, b in zip(train, train[1:]))
    validations = [r for r in log if r.get("event") == "validation"]
    assert [(r["step"], r["epoch"]) for r in validations] == [(3, 1), (5, 2)]
    assert all(r["val_examples"] == 2 for r in validations)
    scores = [(r["val_accuracy"], r["val_token_accuracy"]) for r in validations]
    best = validations[scores.index(max(scores))]["step"]
    end = log[-1]
    assert end == summary
    assert (end["step"], end["best_step"], end["best_val_accuracy"], end["best_final_form"]) == \
        (5, best, max(scores)[0], True)
    assert end["train_seconds"] == train[-1]["train_seconds"] and end["test_examples"] == 2
    assert set(end) == {"event", "step", "train_seconds", "train_cpu_seconds", "best_step", "best_val_accuracy",
                        "best_final_form", "test_accuracy", "test_token_accuracy", "test_loss", "test_examples_per_s",
                        "test_mean_generated_tokens", "test_examples", "test_generation_seconds"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000003", "step-00000005"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000005\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "overwrite" not in saved and saved["max_steps"] == 5 and saved["seed"] == 8 and saved["data"] == str(data_dir)
    assert [str(w.message) for w in said.warnings] == []
    assert all(r["val_mean_generated_tokens"] <= 10 for r in validations) and end["test_mean_generated_tokens"] <= 10
    assert "validate: " in said.err and "test: " in said.err
    assert [p.suffix for p in (run / "plots").iterdir()] != []
    lines = said.out.splitlines()
    assert lines[0] == "training 5 optimizer steps (max_steps 5): 2.5 epochs of 2 steps, 8 training examples"
    assert [line for line in lines if line.startswith("step ")] == [
        f"step {r['step']}: val accuracy {r['val_accuracy']:.4f}, token accuracy {r['val_token_accuracy']:.4f}"
        for r in validations]
    assert lines[-1] == (f"test accuracy {end['test_accuracy']:.4f} (2 examples, {end['test_examples_per_s']:.1f} "
                         "examples/s)")
    assert "train explicit: 100%" in said.err and "5/5" in said.err and f"loss={train[-1]['loss']:.3f}" in said.err
    assert f"tok_acc={train[-1]['token_accuracy']:.3f}" in said.err and "tok_s=" in said.err


def test_training_run_saves_the_best_model_with_its_metadata_and_tests_it_as_reloaded(trained, data_dir):
    from icot.evaluate import evaluate
    from icot.data.layout import Layout, encode
    from icot.data.format import read_examples
    from icot.methods import load_predictor

    cfg, run, summary, said = trained
    metadata = json.loads((run / "best" / "icot.json").read_text())
    step = summary["best_step"]
    epoch = {3: 1, 5: 2}[step]
    expected = {"method": "explicit", "base_model": "micro", "train_file": str(data_dir / "train.txt"),
                "train_examples": 8, "task": "mult", "digits": "2x2", "step": step, "epoch": epoch, "final_form": True,
                "answer_match": "normalized"}
    assert {k: metadata.get(k) for k in expected} == expected
    assert metadata["parameters"] == records(run)[0]["parameters"]
    assert metadata["config"]["max_steps"] == 5 and "overwrite" not in metadata["config"]
    assert metadata["evaluation"]["data"] == str(data_dir / "test.txt")
    assert metadata["evaluation"]["accuracy"] == summary["test_accuracy"] and metadata["evaluation"]["batch_size"] == 4
    assert metadata["evaluation"]["training_data"] is False and metadata["evaluation"]["examples"] == 2
    assert metadata["evaluation"]["answer_match"] == "normalized" and metadata["evaluation"]["machine"].startswith("CPU")
    from icot import __version__

    assert metadata["icot_version"] == __version__
    assert (run / "best" / "README.md").exists()
    predictor = load_predictor(run / "best")
    test = encode(predictor.tokenizer, Layout.for_tokenizer(predictor.tokenizer), read_examples(data_dir / "test.txt"))
    result = evaluate(predictor, test, 4, max_new_tokens=10, progress=False)
    assert (result.accuracy, result.token_accuracy) == (summary["test_accuracy"], summary["test_token_accuracy"])


def test_training_run_resumed_trains_as_the_run_that_was_not_stopped(trained, tmp_path, data_dir, capsys):
    import shutil

    from icot.api import train

    cfg, run, summary, said = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "half a li')  # a killed run's last words
    capsys.readouterr()
    train(resume=resumed, max_steps=7)
    assert "7/7" in capsys.readouterr().err  # the bar starts at the checkpoint's step
    straight = tmp_path / "straight"
    Trainer(config(tmp_path, data_dir, **{**RUN_SETTINGS, "max_steps": 7, "out": str(straight)})).fit()
    log, whole = records(resumed), records(straight)
    assert log[:9] == records(run)
    assert [r.get("event", "train") for r in log[9:]] == ["resume", "train", "validation", "train", "validation", "end"]
    assert {k: log[9][k] for k in ("step", "epoch", "batch_in_epoch", "device")} == \
        {"step": 5, "epoch": 2, "batch_in_epoch": 1, "device": "cpu"}
    train_log = {r["step"]: r for r in log if "event" not in r}
    for r in whole:
        if "event" not in r:
            mine = train_log[r["step"]]
            assert (mine["epoch"], mine["lr"], mine["examples"]) == (r["epoch"], r["lr"], r["examples"])
            assert mine["loss"] == pytest.approx(r["loss"], rel=1e-4), r["step"]
    assert [r["step"] for r in log if r.get("event") == "validation"][-2:] == [6, 7]
    assert yaml.safe_load((resumed / "config.yaml").read_text())["max_steps"] == 7
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["latest", "step-00000006", "step-00000007"]
    with pytest.raises(UserError, match="already at step 7"):
        train(resume=resumed, max_steps=6)
    train(resume=resumed, max_steps=7)  # at its end already: nothing more to train
    assert [r.get("event", "train") for r in records(resumed)][-3:] == ["end", "resume", "end"]


class Drawing(Trainer):
    """A method that draws a number from its generator at every step."""

    def on_step_begin(self):
        self.draws = getattr(self, "draws", []) + [torch.rand(1, generator=self.rng).item()]


class Stopping(Drawing):
    """A SIGTERM arrives during the second step."""

    def on_step_begin(self):
        super().on_step_begin()
        if self.progress.step == 1:
            self.stop_signal = signal.SIGTERM


def test_training_run_stopped_by_a_signal_saves_a_checkpoint_and_a_resume_finishes_without_validation(tmp_path, data_dir, capsys):
    import shutil

    from conftest import mult_examples
    from icot.data.format import read_examples, write_examples

    train = tmp_path / "train.txt"  # a 2x3 example among the 2x2 ones: a batch with padding
    write_examples(train, read_examples(data_dir / "train.txt") + mult_examples(2, 3, 1, seed=1))
    cfg = config(tmp_path, data_dir, train_file=str(train), data=None, max_steps=3, seed=3, save_every=2)
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        Trainer(cfg, resume=True).fit()
    assert str(error.value) == f"{run}: no checkpoint to resume from"
    with pytest.raises(TrainingInterrupted) as stopped:
        Stopping(cfg).fit()
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 2)
    assert warnings_of(capsys)[0].startswith(f"data {train}: no validation split, so nothing picks")
    assert records(run)[-1] == {"event": "stopped", "signal": signal.SIGTERM, "step": 2}
    # saved at step 2 (save_every), then again for the signal, with its record: the first save of the step goes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002-2"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002-2\n" and not (run / "best").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "step-00000002-2" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as error:
        Trainer(config(tmp_path, data_dir, train_file=str(train), data=None, max_steps=3, seed=3, out=str(broken)),
                resume=True).fit()
    assert str(error.value).startswith(f"{broken / 'checkpoints' / 'step-00000002-2'}: cannot load this checkpoint (")
    assert str(error.value).endswith("); point checkpoints/latest at an older one or start a new run")
    (run / "checkpoints" / "step-00000003.tmp").mkdir()  # what a save killed midway left
    (run / "checkpoints" / "step-00000003.tmp" / "half").write_text("")
    resumed = Drawing(cfg, resume=True)
    summary = resumed.fit()
    assert {k: records(run)[4][k] for k in ("event", "step", "epoch", "batch_in_epoch")} == \
        {"event": "resume", "step": 2, "epoch": 0, "batch_in_epoch": 2}  # two of the epoch's three batches trained
    assert records(run)[5]["epoch"] == 0 and records(run)[0]["steps_per_epoch"] == 3
    generator = torch.Generator().manual_seed(3)
    assert resumed.draws == [torch.rand(3, generator=generator)[2].item()]  # the generator went on where it was
    assert summary == {**summary, "event": "end", "step": 3, "best_step": None, "best_val_accuracy": None,
                       "best_final_form": True}
    assert not any(k.startswith("test_") for k in summary)
    assert json.loads((run / "best" / "icot.json").read_text())["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    assert [r.get("event", "train") for r in records(run)] == ["start", "train", "train", "stopped", "resume", "train",
                                                               "end"]


class Goal(Trainer):
    """A method that reaches its goal at its first validation, and has no final form until step 3."""

    def goal_reached(self):
        return self.progress.step >= 2

    def in_final_form(self):
        return self.progress.step >= 3

    def after_validation(self, accuracy):
        self.seen = getattr(self, "seen", []) + [accuracy]


def test_training_run_with_a_goal_stops_at_its_validation(tmp_path, data_dir, capsys):
    cfg = config(tmp_path, data_dir, max_steps=6, eval_every=2, seed=5, report_to="tensorboard", tracker_project="tp")
    goal = Goal(cfg)
    summary = goal.fit()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tensorboard" / "tp").rglob("*"))
    log = records(tmp_path / "run")
    assert [r.get("event", "train") for r in log] == ["start", "train", "train", "validation", "goal_reached", "end"]
    assert log[4] == {"event": "goal_reached", "step": 2}
    assert goal.seen == [log[3]["val_accuracy"]] and not math.isnan(goal.seen[0])
    assert (summary["step"], summary["best_step"], summary["best_final_form"]) == (2, 2, False)
    assert any("the run ended before explicit reached its final form" in w for w in warnings_of(capsys))


def test_training_run_with_a_time_limit_stops_and_micro_batches_add_up_to_a_step(tmp_path, data_dir, capsys):
    from icot.data.format import read_examples, write_examples

    (tmp_path / "d").mkdir()
    for split in ("train", "valid"):
        write_examples(tmp_path / "d" / f"{split}.txt", [type(e)(e.question, "", e.answer)
                                                         for e in read_examples(data_dir / f"{split}.txt")])
    with open(tmp_path / "d" / "valid.txt", "a") as f:
        f.write("1 2 * 3 4|| #### zz\n")  # a word only validation has
    cfg = config(tmp_path, tmp_path / "d", epochs=2, max_train_seconds=1e-9, grad_accum=2, batch_size=2, log_every=5,
                 seed=5)
    summary = Trainer(cfg).fit()
    log = records(tmp_path / "run")
    assert [r.get("event", "train") for r in log] == ["start", "train", "time_limit", "validation", "end"]
    assert (log[0]["steps_per_epoch"], log[0]["total_steps"], log[0]["longest_cot"]) == (2, 4, 0)
    assert log[1]["step"] == 1 and log[1]["examples"] == 4
    assert log[2]["step"] == 1 and log[2]["train_seconds"] == log[1]["train_seconds"]
    assert summary["step"] == 1
    Trainer(cfg, resume=True).fit()  # its time is up already: nothing more to train
    assert [r.get("event", "train") for r in records(tmp_path / "run")][-3:] == ["end", "resume", "end"]
    assert f"{tmp_path / 'd' / 'valid.txt'}:3: 'zz' never occur in the training data, so the model cannot learn them; " \
        "1 of 3 valid examples have such words and will score wrong" in warnings_of(capsys)


# ----- the data, read and encoded ---------------------------------------------------------------------

def test_held_out_words_the_training_data_lacks_are_warned_about_by_file_and_line(tmp_path, data_dir, capsys):
    from icot.data.format import Example

    trainer = Trainer(config(tmp_path, data_dir))
    trainer.files = {"valid": "V.txt", "test": "T.txt"}
    train = [Example("1 2 * 3 4", "5", "6 7")]
    valid = [Example("1 2 * 3 4", "9", "6 7"), Example("8 2 * 3 4", "", "6 x y z w v u"), Example("8", "", "1")]
    trainer.warn_untrained_words(train, {"valid": valid, "test": [Example("5 6", "1 2 3 4 8", "7")], "none": None})
    assert warnings_of(capsys) == ["V.txt:2: '8', 'x', 'y', 'z', 'w' never occur in the training data, so the model "
                                   "cannot learn them; 2 of 3 valid examples have such words and will score wrong"]
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    trainer.warn_untrained_words(train, {"valid": valid})
    assert warnings_of(capsys) == []


def test_held_out_splits_that_copy_the_training_or_validation_data_are_warned_about(tmp_path, data_dir, capsys):
    from icot.data.format import Example
    from icot.data.sources import Split

    trainer = Trainer(config(tmp_path, data_dir))
    a, b = [Example("1", "", "2")], [Example("3", "", "4")]
    trainer.files = {"train": "A", "valid": "V", "test": "T"}
    trainer.copies = {"valid": True, "test": False}
    trainer.warn_copied_splits({"train": Split("A", a), "valid": Split("V", a), "test": Split("T", b)})
    assert warnings_of(capsys) == ["valid_file V holds the same examples as the training file A: its accuracy is "
                                   "training accuracy, not a held-out measure (use held-out examples for one)"]
    trainer.copies = {"valid": False, "test": False}
    trainer.warn_copied_splits({"train": Split("A", a), "valid": Split("V", b), "test": Split("T", b)})
    assert warnings_of(capsys) == ["test_file T holds the same examples as the validation file V, which picks the best "
                                   "model: its accuracy is not a held-out measure (use a separate test file for one)"]
    trainer.copies = {"valid": True, "test": True}  # a test copying both is said once, as a copy of the training data
    errors._warned.clear()
    trainer.warn_copied_splits({"train": Split("A", a), "valid": Split("V", a), "test": Split("T", a)})
    assert warnings_of(capsys) == [
        "valid_file V holds the same examples as the training file A: its accuracy is training accuracy, not a held-out "
        "measure (use held-out examples for one)",
        "test_file T holds the same examples as the training file A: its accuracy is training accuracy, not a held-out "
        "measure (use held-out examples for one)"]
    trainer.copies = {"valid": False, "test": False}
    trainer.warn_copied_splits({"train": Split("A", a), "valid": None, "test": Split("T", b)})
    trainer.warn_copied_splits({"train": Split("A", a), "valid": Split("V", b), "test": None})
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    trainer.copies = {"valid": True, "test": True}
    trainer.warn_copied_splits({"train": Split("A", a), "valid": Split("V", a), "test": Split("T", a)})
    assert warnings_of(capsys) == []


def test_read_data_reads_the_configs_files_and_says_when_there_is_no_validation(tmp_path, data_dir, capsys):
    cfg = config(tmp_path, data_dir, data=None, train_file=str(data_dir / "train.txt"), test_file=str(data_dir / "test.txt"))
    trainer = Trainer(cfg)
    splits = trainer.read_data(None)
    assert splits["valid"] is None and len(splits["train"].examples) == 8 and len(splits["test"].examples) == 2
    assert splits["train"].label == str(data_dir / "train.txt")
    assert warnings_of(capsys) == [
        f"data {data_dir / 'train.txt'}: no validation split, so nothing picks the best model (best/ is the last) and "
        "no setting watching validation can act; add one with --valid-file FILE, a valid file (valid.txt, .jsonl, .csv "
        "or .parquet) in the data directory, or rows whose split column says valid"]
    trainer = Trainer(config(tmp_path, data_dir, data=str(tmp_path / "d"), train_file=str(data_dir / "train.txt")))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text("1||2 #### 3\n")
    trainer.read_data(str(tmp_path / "d"))
    assert warnings_of(capsys)[0].startswith(f"data {tmp_path / 'd'}: no validation split")
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    assert len(trainer.read_data(str(data_dir))["valid"].examples) == 2
    trainer.read_inputs()
    assert len(trainer.splits["train"].examples) == 8 and trainer.hub_splits is None
    assert warnings_of(capsys) == []
    whole = Trainer(config(tmp_path, data_dir))
    whole.read_inputs()
    assert len(whole.splits["valid"].examples) == 2 and warnings_of(capsys) == []  # a validation split: nothing said
    from icot.data.sources import Columns

    records_file = tmp_path / "train.jsonl"
    records_file.write_text('{"problem": "1 2", "answer": "3"}\n')
    named = Trainer(config(tmp_path, data_dir, data=None, train_file=str(records_file), columns=Columns(question="problem")))
    assert named.read_data(None)["train"].examples[0].question == "1 2"


def test_a_hub_dataset_is_read_before_the_run_directory_is_written(tmp_path, data_dir, monkeypatch):
    from icot.data import sources

    monkeypatch.setattr(sources, "read_splits", lambda data, columns: ("read", data, columns))
    trainer = Trainer(config(tmp_path, data_dir, data="hf:owner/name"))
    trainer.read_inputs()
    assert trainer.hub_splits == ("read", "hf:owner/name", trainer.config.columns) and trainer.splits is None


def test_a_method_on_the_cot_refuses_data_without_one(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.files = {"train": "A.txt"}
    trainer.train_data = SimpleNamespace(n_cot=np.array([0, 2]))
    trainer.require_cot()
    trainer.train_data = SimpleNamespace(n_cot=np.array([0, 0]))
    with pytest.raises(UserError) as error:
        trainer.require_cot()
    assert str(error.value) == ("A.txt: no training example has a CoT (question||cot #### answer), which this method "
                                "works on; expected data with CoTs (--method nocot trains without)")


@pytest.fixture(scope="module")
def word_data(data_dir):
    from icot.data.format import read_examples
    from icot.data.layout import Layout
    from icot.data.tokenizers import word_tokenizer

    examples = read_examples(data_dir / "train.txt")
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    return tokenizer, Layout.for_tokenizer(tokenizer), examples


def test_encode_split_drops_or_refuses_rows_longer_than_the_models_positions(tmp_path, data_dir, word_data):
    from icot.data.layout import encode
    from icot.models import build_preset

    tokenizer, layout, examples = word_data
    examples = examples[:3] + [type(examples[0])(examples[0].question, examples[0].cot + " 1 2", examples[0].answer)]
    lengths = encode(tokenizer, layout, examples).lengths.tolist()
    longest = max(lengths)
    assert lengths.count(longest) == 1 and lengths.index(longest) == 3
    trainer = Trainer(config(tmp_path, data_dir, max_len_drop=True))
    trainer.tokenizer, trainer.layout = tokenizer, layout
    trainer.model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, longest)
    data = trainer.encode_split(examples, "S", keep=False)
    assert len(data) == 4 and data.examples is None and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert trainer.encode_split(examples, "S", keep=True).examples == examples
    trainer.keeps_examples = True
    assert trainer.encode_split(examples, "S", keep=False).examples == examples
    trainer.model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, longest - 1)
    data = trainer.encode_split(examples, "S", keep=False)
    assert data.lengths.tolist() == lengths[:3] and data.examples == examples[:3]
    assert records(tmp_path / "run") == [{"event": "dropped_long_examples", "split": "S", "count": 1,
                                          "max_positions": longest - 1}]
    trainer.keeps_examples = False
    assert trainer.encode_split(examples, "S", keep=False).examples is None
    trainer.model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, min(lengths) - 1)
    with pytest.raises(UserError) as error:
        trainer.encode_split(examples, "S", keep=False)
    assert str(error.value) == f"S: every example is longer than the model's {min(lengths) - 1} positions"
    trainer.config.max_len_drop = False
    trainer.model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, longest - 1)
    with pytest.raises(UserError) as error:
        trainer.encode_split(examples, "S", keep=False)
    assert str(error.value).startswith(f"S: example 4 is {longest} tokens long but the model has only {longest - 1}")


def test_a_preset_model_gets_a_word_vocabulary_and_a_pretrained_one_its_own_tokenizer(tmp_path, data_dir, word_data):
    from icot.models import save_model

    tokenizer, layout, examples = word_data
    texts = [f"{e.question} {e.cot} {e.answer}" for e in examples]
    built = []

    class Built(Trainer):
        def build_model(self, tokenizer, model):
            built.append((tokenizer, model))
            return model

    trainer = Built(config(tmp_path, data_dir, max_positions=48))
    tok, model = trainer.load_tokenizer_and_model(lambda: iter(texts))
    assert tok.get_vocab() == tokenizer.get_vocab() and built == [(tok, model)]
    assert model.config.n_positions == 48 and model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.dtype == torch.float32
    half = tmp_path / "half"
    save_model(model.to(torch.bfloat16), tok, half, {})  # a checkpoint saved in bf16 trains in fp32 unless asked
    assert Trainer(config(tmp_path, data_dir, model=str(half))).load_tokenizer_and_model(None)[1].dtype == torch.float32
    model = model.float()
    word, _ = Trainer(config(tmp_path, data_dir, tokenizer="word")).load_tokenizer_and_model(lambda: iter(texts))
    assert word.get_vocab() == tokenizer.get_vocab()  # 'word': the same vocabulary, said outright
    folder = tmp_path / "pretrained"
    save_model(model, tok, folder, {})
    trainer = Built(config(tmp_path, data_dir, model=str(folder), precision="bf16", gradient_checkpointing=True))
    tok, model = trainer.load_tokenizer_and_model(lambda: pytest.fail("a pretrained model keeps its vocabulary"))
    assert tok.get_vocab() == tokenizer.get_vocab() and model.dtype == torch.bfloat16
    assert model.is_activation_checkpointing
    trainer = Trainer(config(tmp_path, data_dir, model="micro", tokenizer=str(folder), precision="bf16"))
    tok, model = trainer.load_tokenizer_and_model(lambda: pytest.fail("a tokenizer is given"))
    assert tok.get_vocab() == tokenizer.get_vocab() and model.dtype == torch.bfloat16
    assert not model.is_activation_checkpointing
    trainer = Trainer(config(tmp_path, data_dir, model=str(folder), tokenizer="word"))
    with pytest.raises(UserError) as error:
        trainer.load_tokenizer_and_model(lambda: iter(texts))
    assert str(error.value) == "tokenizer: 'word' builds a new vocabulary and only fits a preset model trained from scratch"
    bigger = tmp_path / "bigger"
    tok.add_tokens(["extra1", "extra2"])
    tok.save_pretrained(bigger)
    trainer = Trainer(config(tmp_path, data_dir, model=str(folder), tokenizer=str(bigger), lora=LoraSettings(r=2)))
    tok, model = trainer.load_tokenizer_and_model(lambda: iter(texts))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 2
    assert type(model).__name__ == "PeftModelForCausalLM" and model.dtype == torch.float32


# ----- trainer/config.py ------------------------------------------------------------------------------

def refused(settings, message: str) -> None:
    with pytest.raises(UserError) as error:
        settings.validate()
    assert str(error.value) == message


def test_lora_settings_are_checked():

    LoraSettings().validate()
    LoraSettings(r=4, alpha=0.5, dropout=0.0, target_modules=["c_attn"], modules_to_save=["wte"]).validate()
    LoraSettings(r=1, dropout=0.999).validate()
    refused(LoraSettings(r=-1), "config: lora.r must not be negative, got -1")
    refused(LoraSettings(alpha=0.0), "config: lora.alpha must be positive, got 0.0")
    refused(LoraSettings(dropout=-0.5), "config: lora.dropout must not be negative, got -0.5")
    refused(LoraSettings(r=2, dropout=1.0), "config: lora.dropout must be below 1, got 1.0")
    for extra in ({"target_modules": ["c_attn"]}, {"modules_to_save": ["wte"]}):
        refused(LoraSettings(**extra), "config: lora.target_modules and lora.modules_to_save are read only with "
                                       "lora.r above 0")
    LoraSettings(target_modules=[], modules_to_save=[]).validate()


def test_train_config_validate_refuses_one_problem_at_a_time(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    ok = dict(data=str(data_dir), out=str(tmp_path / "run"))
    TrainConfig(**ok).validate()
    TrainConfig(train_file=str(data_dir / "train.txt"), out="o").validate()
    refused(TrainConfig(out="o"), "config: no training data; set data (a directory) or train_file")
    refused(TrainConfig(data=str(data_dir)), "config: out is required (the run directory)")
    for seed in (-1, 2**32):
        refused(TrainConfig(**ok, seed=seed), f"config: seed {seed}: expected a whole number from 0 to 2**32 - 1")
    TrainConfig(**ok, seed=0).validate()
    TrainConfig(**ok, seed=2**32 - 1).validate()
    refused(TrainConfig(**ok, lr=0.0), "config: lr must be positive, got 0.0")
    refused(TrainConfig(**ok, max_steps=0), "config: max_steps must be at least 1 (or null), got 0")
    refused(TrainConfig(**ok, lr_drop_factor=1.5), "config: lr_drop_factor must be in (0, 1], got 1.5")
    refused(TrainConfig(out="o", data="hf:openai/gsm8k:main:train"),
            "data: hf:openai/gsm8k:main:train: give the dataset without a split (hf:NAME[:CONFIG]); its train, "
            "validation and test splits are all used")
    TrainConfig(out="o", data="hf:openai/gsm8k:main").validate()
    refused(TrainConfig(**ok, tracker_project="p"), "config: tracker_project p is read only with report_to (a tracker "
                                                    "such as tensorboard or wandb); drop it or set that")
    TrainConfig(**ok, tracker_project="p", report_to="tensorboard").validate()
    refused(TrainConfig(**ok, fsdp=True, compile=True), "config: fsdp with compile is not supported; expected compile false")
    refused(TrainConfig(**ok, valid_file=str(data_dir / "train.txt")),
            f"valid_file {data_dir / 'train.txt'}: is the training file {data_dir / 'train.txt'}, so its accuracy "
            "would be training accuracy; expected held-out examples (icot data mult writes distinct splits)")


def test_fsdp_is_on_under_a_launcher_configured_for_it_and_refuses_what_it_cannot_combine_with(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = TrainConfig()
    cfg.check_fsdp()
    assert cfg.fsdp is False
    for value, on in (("true", True), ("TRUE", True), ("false", False), ("1", False)):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        cfg = TrainConfig(compile=True)
        if on:
            refused(SimpleNamespace(validate=cfg.check_fsdp), "config: fsdp with compile is not supported; expected "
                                                              "compile false")
        else:
            cfg.check_fsdp()
        assert cfg.fsdp is on
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    refused(SimpleNamespace(validate=TrainConfig(fsdp=True, precision="fp16-mixed").check_fsdp),
            "config: fsdp with precision fp16-mixed needs a sharded gradient scaler, which icot does not have; expected "
            "precision bf16-mixed, bf16 or fp32")
    for precision in ("fp32", "bf16", "bf16-mixed"):
        TrainConfig(fsdp=True, precision=precision).check_fsdp()
    TrainConfig(precision="fp16-mixed", compile=True).check_fsdp()


def test_held_out_files_that_are_the_training_or_validation_file_are_refused(tmp_path, data_dir):
    train, valid, test = (str(data_dir / f"{s}.txt") for s in ("train", "valid", "test"))

    def check(**files):
        return SimpleNamespace(validate=TrainConfig(**files).check_held_out_files)

    check(train_file=train, valid_file=valid, test_file=test).validate()
    refused(check(train_file=train, test_file=train), f"test_file {train}: is the training file {train}, so its "
            "accuracy would be training accuracy; expected held-out examples (icot data mult writes distinct splits)")
    link = tmp_path / "link.txt"
    link.symlink_to(train)
    refused(check(train_file=train, valid_file=str(link)), f"valid_file {link}: is the training file {train}, so its "
            "accuracy would be training accuracy; expected held-out examples (icot data mult writes distinct splits)")
    refused(check(train_file=train, valid_file=valid, test_file=valid), f"test_file {valid}: is the validation file, "
            "which picks the best model, so its accuracy would not be a held-out measure; expected a separate test file")
    refused(check(data=str(data_dir), test_file=valid), f"test_file {valid}: is the validation file, which picks the "
            "best model, so its accuracy would not be a held-out measure; expected a separate test file")
    refused(check(data=str(data_dir), valid_file=train), f"valid_file {train}: is the training file {train}, so its "
            "accuracy would be training accuracy; expected held-out examples (icot data mult writes distinct splits)")
    check(train_file=train, valid_file=str(tmp_path / "none.txt"), test_file=str(tmp_path / "none.txt")).validate()
    check(train_file=str(tmp_path / "none.txt"), valid_file=str(tmp_path / "none.txt")).validate()
    check(valid_file=valid, test_file=test).validate()
    (tmp_path / "empty").mkdir()
    check(data=str(tmp_path / "empty"), valid_file=train, test_file=train).validate()  # no training file: said later
    check(data="hf:openai/gsm8k:main", train_file=train, valid_file=valid).validate()
    refused(check(data="hf:openai/gsm8k:main", train_file=train, valid_file=train), f"valid_file {train}: is the "
            f"training file {train}, so its accuracy would be training accuracy; expected held-out examples (icot data "
            "mult writes distinct splits)")
    refused(check(data=str(tmp_path / "gone.txt"), train_file=train, valid_file=train), f"valid_file {train}: is the "
            f"training file {train}, so its accuracy would be training accuracy; expected held-out examples (icot data "
            "mult writes distinct splits)")  # data not there (said when the run starts): the files given alone
    refused(check(data=train, train_file=train, test_file=train), f"test_file {train}: is the training file {train}, "
            "so its accuracy would be training accuracy; expected held-out examples (icot data mult writes distinct "
            "splits)")  # data read whole: the files given alone


def test_data_files_and_whether_data_is_read_whole(tmp_path, data_dir):
    train, valid, test = (str(data_dir / f"{s}.txt") for s in ("train", "valid", "test"))
    assert TrainConfig(train_file="a").data_files() == {"train": "a", "valid": None, "test": None}
    assert TrainConfig(data=str(data_dir)).data_files() == {"train": train, "valid": valid, "test": test}
    assert TrainConfig(data=str(data_dir), test_file="t").data_files() == {"train": train, "valid": valid, "test": "t"}
    assert TrainConfig(data="hf:x/y", valid_file="v").data_files() == {"train": None, "valid": "v", "test": None}
    assert TrainConfig(data=train, test_file="t").data_files() == {"train": None, "valid": None, "test": "t"}
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train.jsonl").write_text("")
    assert TrainConfig(data=str(tmp_path / "only")).data_files() == {"train": str(tmp_path / "only" / "train.jsonl"),
                                                                      "valid": None, "test": None}
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError) as error:
        TrainConfig(data=str(tmp_path / "none")).data_files()
    assert str(error.value) == f"data: {tmp_path / 'none'} has no train file (train.txt, .jsonl, .json, .csv or .parquet)"
    assert TrainConfig(data=str(tmp_path / "none"), train_file="a").data_files()["train"] == "a"
    with pytest.raises(UserError) as error:
        TrainConfig(data=str(tmp_path / "missing")).data_files()
    assert str(error.value) == (f"data: {tmp_path / 'missing'} is not a directory or a file: no such path (expected a "
                                "data directory, a data file or hf:NAME)")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    assert [TrainConfig(data=d).data_is_one_source() for d in (None, "hf:x/y", train, str(data_dir), str(saved))] == \
        [False, True, True, False, True]
    assert TrainConfig(data=str(saved)).data_files() == {"train": None, "valid": None, "test": None}


def test_a_setting_on_validation_accuracy_needs_a_validation_file(tmp_path, data_dir):
    message = ("config: stop_at_accuracy watches validation accuracy: give a validation file (valid_file, or valid.txt "
               "in the data directory)")
    with pytest.raises(UserError) as error:
        TrainConfig(train_file="a").require_valid_file("stop_at_accuracy")
    assert str(error.value) == message
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text("")
    with pytest.raises(UserError):
        TrainConfig(data=str(tmp_path / "d")).require_valid_file("stop_at_accuracy")
    TrainConfig(data=str(data_dir)).require_valid_file("x")
    TrainConfig(train_file="a", valid_file="v").require_valid_file("x")
    TrainConfig(data=str(data_dir / "train.txt")).require_valid_file("x")  # its splits are known once read
    TrainConfig(data="hf:x/y").require_valid_file("x")


# ----- trainer/checkpoints.py -------------------------------------------------------------------------

def test_checkpoint_names_and_their_order():
    from icot.trainer.checkpoints import checkpoint_order

    assert checkpoint_order("step-00000100") == (100, 1)
    assert checkpoint_order("step-00000100-12") == (100, 12)
    for name in ("step-0000100", "step-000001000", "xstep-00000100", "step-00000100-", "step-00000100-2x", "latest"):
        assert checkpoint_order(name) is None, name


def test_an_unused_name_counts_the_saves_of_a_step(tmp_path):
    from icot.trainer.checkpoints import unused_checkpoint_name

    assert unused_checkpoint_name(tmp_path, 7) == "step-00000007"
    (tmp_path / "step-00000007").mkdir()
    assert unused_checkpoint_name(tmp_path, 7) == "step-00000007-2"
    (tmp_path / "step-00000007-2").mkdir()
    assert unused_checkpoint_name(tmp_path, 7) == "step-00000007-3"
    assert unused_checkpoint_name(tmp_path, 123456789) == "step-123456789"


def test_rotate_keeps_latest_and_the_newest_others(tmp_path):
    from icot.trainer.checkpoints import rotate

    def saved(*names):
        for name in names:
            (tmp_path / name).mkdir()
        (tmp_path / "latest").write_text("x")
        (tmp_path / "step-00000001.tmp").mkdir(exist_ok=True)

    def left():
        return sorted(p.name for p in tmp_path.iterdir())

    saved("step-00000002", "step-00000004", "step-00000006", "step-00000008")
    rotate(tmp_path, "step-00000008", 2)
    assert left() == ["latest", "step-00000001.tmp", "step-00000006", "step-00000008"]
    rotate(tmp_path, "step-00000008", 1)
    assert left() == ["latest", "step-00000001.tmp", "step-00000008"]
    # a resume from step 4 saved step 6 again: the earlier save of step 6 goes, and step 8 (abandoned) before step 4
    saved("step-00000004", "step-00000006", "step-00000006-2")
    rotate(tmp_path, "step-00000006-2", 4)
    assert left() == ["latest", "step-00000001.tmp", "step-00000004", "step-00000006-2", "step-00000008"]
    rotate(tmp_path, "step-00000006-2", 3)
    assert left() == ["latest", "step-00000001.tmp", "step-00000004", "step-00000006-2", "step-00000008"]
    rotate(tmp_path, "step-00000006-2", 2)
    assert left() == ["latest", "step-00000001.tmp", "step-00000004", "step-00000006-2"]
    (tmp_path / "step-00000009").write_text("a file, not a checkpoint")
    rotate(tmp_path, "step-00000006-2", 1)
    assert left() == ["latest", "step-00000001.tmp", "step-00000006-2", "step-00000009"]


def test_latest_names_a_whole_checkpoint_or_says_what_is_wrong(tmp_path):
    from icot.trainer.checkpoints import last_good, latest

    root = tmp_path / "checkpoints"
    with pytest.raises(UserError) as error:
        latest(tmp_path)
    assert str(error.value) == f"{tmp_path}: no checkpoint to resume from"
    assert last_good(tmp_path) == "no checkpoint had been saved yet"
    root.mkdir()
    (root / "step-00000003").mkdir()
    pointer = root / "latest"
    pointer.write_text(" step-00000003\n")
    assert latest(tmp_path) == root / "step-00000003"
    assert last_good(tmp_path) == f"the last good checkpoint is {root / 'step-00000003'}"
    up = "../checkpoints/step-00000003"
    for text, name in (("step-00000004\n", "step-00000004"), ("\n", ""), (up, up)):
        pointer.write_text(text)
        with pytest.raises(UserError) as error:
            latest(tmp_path)
        assert str(error.value) == (f"{pointer}: names a checkpoint that does not exist ({name!r}); point it at one of "
                                    f"{root}/step-* or start a new run")
    pointer.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"\(''\)"):
        latest(tmp_path)
    pointer.unlink()
    pointer.mkdir()
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        latest(tmp_path)


# ----- trainer/rundir.py ------------------------------------------------------------------------------

def test_a_new_run_directory_holds_the_config_and_the_marker_and_replaces_only_a_run_of_ours(tmp_path, data_dir):
    from icot.trainer.rundir import start_run_dir

    run = tmp_path / "run"
    calls = []
    cfg = config(tmp_path, data_dir, overwrite=True, seed=11)
    start_run_dir(run, cfg, True, lambda: calls.append("wait"), lambda: calls.append("read"))
    assert calls == ["read", "wait", "wait"]
    assert sorted(p.name for p in run.iterdir()) == [".icot", "config.yaml"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "overwrite" not in saved and saved["seed"] == 11 and list(saved)[:2] == ["method", "data"]
    (run / "old.txt").write_text("a file of the old run")
    start_run_dir(run, cfg, True, lambda: None, lambda: None)
    assert not (run / "old.txt").exists() and (run / "config.yaml").exists()
    (run / "old.txt").write_text("")
    calls.clear()
    start_run_dir(run, cfg, False, lambda: calls.append("wait"), lambda: calls.append("read"))  # another process
    assert calls == ["read", "wait", "wait"] and (run / "old.txt").exists()
    cfg.overwrite = False
    with pytest.raises(UserError, match=f"or --resume {run} to continue it"):
        start_run_dir(run, cfg, True, lambda: None, lambda: None)
    cfg.overwrite = True
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x.txt").write_text("")
    with pytest.raises(UserError) as error:
        start_run_dir(theirs, cfg, True, lambda: None, lambda: None)
    assert str(error.value).startswith(f"--out {theirs}: --overwrite replaces only a directory icot wrote")
    nested, empty = tmp_path / "a" / "b" / "run", tmp_path / "empty"
    empty.mkdir()
    for folder in (nested, empty):  # a new directory with its parents, or an empty one there already
        start_run_dir(folder, cfg, True, lambda: None, lambda: None)
        assert sorted(p.name for p in folder.iterdir()) == [".icot", "config.yaml"]
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(UserError):
        start_run_dir(blocked / "run", config(tmp_path, data_dir), True, lambda: None, lambda: None)


def test_the_run_directory_is_not_replaced_when_the_models_weights_are_damaged(tmp_path, data_dir, word_data):
    from icot.models import build_preset, save_model
    from icot.trainer.rundir import check_weights_readable, start_run_dir

    tokenizer = word_data[0]
    model_dir = tmp_path / "model"
    save_model(build_preset("micro", len(tokenizer), tokenizer.eos_token_id, 16), tokenizer, model_dir, {})
    check_weights_readable(SimpleNamespace(model=str(model_dir)))
    check_weights_readable(SimpleNamespace(model="micro"))
    (model_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(UserError) as error:
        check_weights_readable(SimpleNamespace(model=str(model_dir)))
    assert str(error.value).startswith(f"model {model_dir / 'model.safetensors'}: damaged weights file (")
    assert not str(error.value).endswith("(None)")  # safetensors' own words
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="damaged weights file"):
        check_weights_readable(SimpleNamespace(model=str(model_dir)))
    run = tmp_path / "run"
    cfg = config(tmp_path, data_dir, model=str(model_dir), overwrite=True)
    run.mkdir()
    (run / ".icot").write_text("")
    (run / "old.txt").write_text("")
    with pytest.raises(UserError, match="damaged weights file"):
        start_run_dir(run, cfg, True, lambda: None, lambda: None)
    assert (run / "old.txt").exists()


def test_an_unwritable_run_directory_is_one_line(tmp_path, data_dir, monkeypatch):
    from icot.trainer import rundir

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError) as error:
        rundir.start_run_dir(tmp_path / "run", config(tmp_path, data_dir), True, lambda: None, lambda: None)
    assert str(error.value) == f"{tmp_path / 'run'}: cannot write to the run directory (No space left on device)"
    monkeypatch.undo()
    probe_sizes = []
    write_bytes, unlink = Path.write_bytes, Path.unlink

    def write_seen(self, data):
        probe_sizes.append((self.name, len(data)))
        return write_bytes(self, data)

    def unlink_seen(self, *args, **kwargs):
        probe_sizes.append(self.name)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", write_seen)
    monkeypatch.setattr(Path, "unlink", unlink_seen)
    rundir.start_run_dir(tmp_path / "run2", config(tmp_path, data_dir), True, lambda: None, lambda: None)
    monkeypatch.undo()
    assert probe_sizes[:2] == [(".write-test", 1024 * 1024), ".write-test"]
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == [".icot", "config.yaml"]


def test_inputs_are_checked_before_the_run_directory(tmp_path, data_dir, word_data):
    from icot.models import build_preset, save_model
    from icot.trainer.rundir import check_data_readable, check_inputs

    assert check_inputs(config(tmp_path, data_dir)) == [data_dir]
    missing = tmp_path / "missing.txt"
    for field in ("train_file", "valid_file", "test_file"):
        with pytest.raises(UserError) as error:
            check_inputs(config(tmp_path, data_dir, **{field: str(missing)}))
        assert str(error.value) == f"{field} {missing}: no such file; expected a data file"
    with pytest.raises(UserError) as error:
        check_inputs(config(tmp_path, data_dir, test_file=str(tmp_path)))
    assert str(error.value) == f"test_file {tmp_path}: not a regular file (a pipe or a device); expected a data file"
    with pytest.raises(UserError, match="hub datasets are read by"):
        check_inputs(config(tmp_path, data_dir, test_file="hf:x/y"))
    assert check_inputs(config(tmp_path, "hf:x/y", test_file=str(missing))) == []  # the hub's files are not checked
    with pytest.raises(UserError) as error:
        check_inputs(config(tmp_path, data_dir, model=str(tmp_path / "nomodel")))
    assert str(error.value).startswith(f"model {tmp_path / 'nomodel'}: no such directory")
    with pytest.raises(UserError) as error:
        check_inputs(config(tmp_path, data_dir, tokenizer=str(tmp_path / "notok")))
    assert str(error.value).startswith(f"tokenizer {tmp_path / 'notok'}: no such directory")
    assert check_inputs(config(tmp_path, data_dir, tokenizer="word")) == [data_dir]
    tokenizer = word_data[0]
    model_dir = tmp_path / "model"
    save_model(build_preset("micro", len(tokenizer), tokenizer.eos_token_id, 16), tokenizer, model_dir, {})
    assert check_inputs(config(tmp_path, data_dir, model=str(model_dir), tokenizer=str(model_dir))) == \
        [data_dir, model_dir, model_dir]
    with pytest.raises(UserError, match="lora.target_modules \\['nothing'\\]: peft cannot adapt micro"):
        check_inputs(config(tmp_path, data_dir, lora=LoraSettings(r=2, target_modules=["nothing"])))
    check_inputs(config(tmp_path, data_dir, lora=LoraSettings(r=2, target_modules=["c_attn"])))
    check_inputs(config(tmp_path, data_dir, fsdp=True))
    check_data_readable(config(tmp_path, data_dir))
    check_data_readable(config(tmp_path, "hf:x/y"))
    bad = tmp_path / "bad.txt"
    bad.write_text("1||2 #### 3\nno separator\n")
    with pytest.raises(UserError, match=f"{bad}:2"):
        check_data_readable(config(tmp_path, data_dir, test_file=str(bad)))
    with pytest.raises(UserError, match=f"{bad}:2"):
        check_data_readable(config(tmp_path, data_dir, data=None, train_file=str(bad)))


class DeviceAccelerator(SumAccelerator):
    """Records the device of each tensor it is given to reduce (a GPU's, across processes), on `meta`."""

    device = torch.device("meta")

    def reduce(self, tensor, reduction):
        self.reduced.append(tensor.device)
        return torch.ones(tensor.shape, dtype=tensor.dtype)


def test_what_is_reduced_across_processes_is_on_the_accelerators_device(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.accelerator = acc = DeviceAccelerator()
    assert (trainer.from_main(0.5), trainer.all_processes(True), trainer.max_over_processes(3)) == (1.0, True, 1)
    window = _Window(Progress())
    window.add(torch.tensor(6.0), torch.tensor(3), torch.tensor(4), torch.tensor(20), 2, {"part": 1.5})
    assert window.reduce(acc)["part"] == 1.0
    assert acc.reduced == [torch.device("meta")] * 5

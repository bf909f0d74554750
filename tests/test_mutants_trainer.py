"""Direct tests of trainer/loop.py, trainer/checkpoints.py, trainer/config.py and trainer/rundir.py for
their mutants (issue 50): calls with the expected values written out, and a few training runs of a micro
GPT-2 on eight 2x2 multiplications (a second or two each). docs/RESULTS.md, "Mutation testing", lists the
mutants each one kills."""

from __future__ import annotations

import json
import math
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from icot import errors
from icot.errors import UserError
from icot.trainer import loop
from icot.trainer.config import TrainConfig
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
    examples = read_examples(data_dir / "train.txt")
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    for drop in (False, True):
        batch = _Collate(data, 0, drop)([5, 2])
        expected = collate(data, [5, 2], 0, drop)
        assert set(batch) == {*expected, "index"} and batch["index"].tolist() == [5, 2]
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
    assert window.reduce(acc)["loss"] == 1.0
    window.extra = {"y": [1.0, 0.0]}
    assert window.reduce(acc)["y"] == 1.0
    window.extra = {"z": [1.0, 3.0]}
    assert window.reduce(acc)["z"] == 0.333333  # rounded to 6 places


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
    trainer.clip_gradients(model)
    torch.testing.assert_close(weight.grad, torch.tensor([0.3, 0.4]))
    trainer.sharding = object()  # sharded: torch's clipping of the whole gradient
    weight.grad = torch.tensor([3.0, 4.0])
    trainer.clip_gradients(model)
    torch.testing.assert_close(weight.grad, torch.tensor([0.3, 0.4]))


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
    trainer = Trainer(config(tmp_path, data_dir))
    logged = []
    trainer.accelerator.log = lambda values, step: logged.append((values, step))
    trainer.progress.step = 3
    trainer.log_event({"event": "x", "count": math.inf, "n": 2})
    trainer.log_event({"event": "y", "step": 9, "v": 0.5})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"event": "x", "count": "inf", "n": 2}, {"event": "y", "step": 9, "v": 0.5}]
    assert logged == [({"x/n": 2}, 3), ({"y/v": 0.5}, 9)]
    trainer.accelerator = SumAccelerator()
    trainer.accelerator.is_main_process = False
    trainer.log_event({"event": "z"})
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_cut_metrics_drops_what_follows_the_checkpoint_but_its_steps_end_record(tmp_path, data_dir):
    trainer = Trainer(config(tmp_path, data_dir))
    trainer.progress.step = 4
    kept = b'{"step": 3}\n'
    tail = b'{"step": 4}\n{"event": "end", "step": 4}\n{"event": "end", "step": 5}\n{"event": "end", "step": 4}'
    trainer.metrics_file.parent.mkdir()
    trainer.metrics_file.write_bytes(kept + tail)
    trainer.cut_metrics(None)
    assert trainer.metrics_file.read_bytes() == kept + tail
    trainer.cut_metrics(len(kept))
    assert trainer.metrics_file.read_bytes() == kept + b'{"event": "end", "step": 4}\n'
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
        handler(signal.SIGTERM, None)
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
    p.step, p.epoch, p.examples, p.train_seconds, p.train_cpu_seconds = 6, 1, 10, 1.23456, 0.5
    window = _Window(p)
    window.seconds = 2.0
    window.add(torch.tensor(6.0), torch.tensor(3), torch.tensor(4), torch.tensor(20), 2, {})
    bar = SimpleNamespace(set_postfix=lambda **kw: postfix.update(kw))
    postfix = {}
    trainer.log_train(window, bar)
    stats = {"loss": 1.5, "token_accuracy": 0.75, "tokens_per_s": 10.0, "examples_per_s": 1.0}
    assert trainer.train_metrics == stats and p.examples == 12
    assert json.loads(trainer.metrics_file.read_text()) == {"step": 6, "epoch": 1, "lr": 0.125, **stats, "examples": 12,
                                                            "train_seconds": 1.235, "train_cpu_seconds": 0.5, "removed": 2}
    assert postfix == {"loss": "1.500", "tok_acc": "0.750", "tok_s": "10", "rm": 2}


# ----- training runs --------------------------------------------------------------------------------

def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_loss(cfg: TrainConfig, examples) -> float:
    """The first micro-batch's loss, computed here: the seeded model built as a new run builds it, on the
    first batch of the seeded order, every target token counted once."""
    from icot.data.batching import collate
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer
    from icot.models import build_preset

    torch.manual_seed(cfg.seed)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, cfg.max_positions)
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    first = next(iter(BatchOrder(data.lengths, cfg.batch_size, cfg.seed, True)))
    batch = collate(data, first, layout.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask]).item()


RUN_SETTINGS = dict(max_steps=5, warmup_steps=2, lr_drop_step=3, lr_drop_factor=0.5, eval_every=2, save_every=2,
                    keep_checkpoints=2, seed=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A 5-step run: warm-up over 2 steps, the learning rate halved from step 3, validated every 2 steps
    and at the end, a checkpoint every 2 steps and at the end (2 kept)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(tmp, data_dir, **RUN_SETTINGS)
    cfg.validate()
    summary = Trainer(cfg).fit()
    return cfg, Path(cfg.out), summary


def test_training_run_logs_each_step_validates_saves_and_tests(trained, data_dir):
    from icot.data.format import read_examples
    from icot.models import build_preset

    cfg, run, summary = trained
    log = records(run)
    assert [r.get("event", "train") for r in log] == ["start", "train", "train", "validation", "train", "train",
                                                       "validation", "train", "validation", "end"]
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
    assert train[0]["loss"] == pytest.approx(first_loss(cfg, examples), rel=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(0 <= r["token_accuracy"] <= 1 and r["tokens_per_s"] > 0 and r["examples_per_s"] > 0 for r in train)
    assert all(a["train_seconds"] <= b["train_seconds"] for a, b in zip(train, train[1:]))
    validations = [r for r in log if r.get("event") == "validation"]
    assert [(r["step"], r["epoch"]) for r in validations] == [(2, 0), (4, 1), (5, 2)]
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
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000005\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "overwrite" not in saved and saved["max_steps"] == 5 and saved["seed"] == 7 and saved["data"] == str(data_dir)


def test_training_run_saves_the_best_model_with_its_metadata_and_tests_it_as_reloaded(trained, data_dir):
    from icot.evaluate import evaluate
    from icot.data.layout import Layout, encode
    from icot.data.format import read_examples
    from icot.methods import load_predictor

    cfg, run, summary = trained
    metadata = json.loads((run / "best" / "icot.json").read_text())
    step = summary["best_step"]
    epoch = {2: 0, 4: 1, 5: 2}[step]
    expected = {"method": "explicit", "base_model": "micro", "train_file": str(data_dir / "train.txt"),
                "train_examples": 8, "task": "mult", "digits": "2x2", "step": step, "epoch": epoch, "final_form": True,
                "answer_match": "normalized"}
    assert {k: metadata.get(k) for k in expected} == expected
    assert metadata["parameters"] == records(run)[0]["parameters"]
    assert metadata["config"]["max_steps"] == 5 and "overwrite" not in metadata["config"]
    assert metadata["evaluation"]["data"] == str(data_dir / "test.txt")
    assert metadata["evaluation"]["accuracy"] == summary["test_accuracy"] and metadata["evaluation"]["batch_size"] == 4
    assert metadata["evaluation"]["training_data"] is False
    assert (run / "best" / "README.md").exists()
    predictor = load_predictor(run / "best")
    test = encode(predictor.tokenizer, Layout.for_tokenizer(predictor.tokenizer), read_examples(data_dir / "test.txt"))
    result = evaluate(predictor, test, 4, progress=False)
    assert (result.accuracy, result.token_accuracy) == (summary["test_accuracy"], summary["test_token_accuracy"])


def test_training_run_resumed_trains_as_the_run_that_was_not_stopped(trained, tmp_path, data_dir):
    import shutil

    from icot.api import train

    cfg, run, summary = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "half a li')  # a killed run's last words
    train(resume=resumed, max_steps=7)
    straight = tmp_path / "straight"
    Trainer(config(tmp_path, data_dir, **{**RUN_SETTINGS, "max_steps": 7, "out": str(straight)})).fit()
    log, whole = records(resumed), records(straight)
    assert log[:10] == records(run)
    assert [r.get("event", "train") for r in log[10:]] == ["resume", "train", "validation", "train", "validation", "end"]
    assert {k: log[10][k] for k in ("step", "epoch", "batch_in_epoch", "device")} == \
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


class Stopping(Trainer):
    """A SIGTERM arrives during the second step."""

    def on_step_begin(self):
        if self.progress.step == 1:
            self.stop_signal = signal.SIGTERM


def test_training_run_stopped_by_a_signal_saves_a_checkpoint_and_a_resume_finishes_without_validation(tmp_path, data_dir, capsys):
    cfg = config(tmp_path, data_dir, train_file=str(data_dir / "train.txt"), data=None, max_steps=3, seed=3)
    with pytest.raises(TrainingInterrupted) as stopped:
        Stopping(cfg).fit()
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 2)
    run = tmp_path / "run"
    assert warnings_of(capsys)[0].startswith(f"data {data_dir / 'train.txt'}: no validation split, so nothing picks")
    assert records(run)[-1] == {"event": "stopped", "signal": signal.SIGTERM, "step": 2}
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002\n" and not (run / "best").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    summary = Trainer(cfg, resume=True).fit()
    assert summary == {**summary, "event": "end", "step": 3, "best_step": None, "best_val_accuracy": None,
                       "best_final_form": True}
    assert not any(k.startswith("test_") for k in summary)
    assert json.loads((run / "best" / "icot.json").read_text())["step"] == 3
    assert [r.get("event", "train") for r in records(run)] == ["start", "train", "train", "stopped", "resume", "train",
                                                                "end"]


class Goal(Trainer):
    """A method that reaches its goal at its first validation, and has no final form until step 3."""

    def goal_reached(self):
        return self.progress.step >= 2

    def in_final_form(self):
        return self.progress.step >= 3


def test_training_run_with_a_goal_stops_at_its_validation(tmp_path, data_dir, capsys):
    cfg = config(tmp_path, data_dir, max_steps=6, eval_every=2, seed=5)
    summary = Goal(cfg).fit()
    log = records(tmp_path / "run")
    assert [r.get("event", "train") for r in log] == ["start", "train", "train", "validation", "goal_reached", "end"]
    assert log[4] == {"event": "goal_reached", "step": 2}
    assert (summary["step"], summary["best_step"], summary["best_final_form"]) == (2, 2, False)
    assert any("the run ended before explicit reached its final form" in w for w in warnings_of(capsys))


def test_training_run_with_a_time_limit_stops_and_micro_batches_add_up_to_a_step(tmp_path, data_dir):
    cfg = config(tmp_path, data_dir, max_steps=6, max_train_seconds=1e-9, grad_accum=2, batch_size=2, log_every=5,
                 seed=5)
    summary = Trainer(cfg).fit()
    log = records(tmp_path / "run")
    assert [r.get("event", "train") for r in log] == ["start", "train", "time_limit", "validation", "end"]
    assert log[0]["steps_per_epoch"] == 2 and log[1]["step"] == 1 and log[1]["examples"] == 4
    assert log[2]["step"] == 1 and log[2]["train_seconds"] == log[1]["train_seconds"]
    assert summary["step"] == 1

"""Direct tests of methods/stepwise/schedule.py, methods/stepwise/rewind.py, methods/baselines.py and
methods/running_sum.py for their mutants (issue 50): fast calls with the expected values written out,
no training run. docs/RESULTS.md, "Mutation testing", lists the mutants each one kills."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icot.methods.stepwise.rewind import Rewind, cpu_copy
from icot.methods.stepwise.schedule import (MAX_OFFSET, AdaptivePace, RemovalSchedule, StepUnits, offset_distribution,
                                            tokens_to_remove)


def stepwise_settings(**changes) -> SimpleNamespace:
    """The StepwiseConfig fields the schedules read, each with a value no other field has."""
    settings = dict(remove_per_epoch=2.0, pretrain_epochs=0.5, remove_start_from=3, remove_all_when_remove_beyond=9.5,
                    pace_accuracy=0.75, pace_min_steps=4, pace_max_steps=11, pace_late_from=6, pace_late_max_steps=13,
                    pace_late_until=8)
    return SimpleNamespace(**{**settings, **changes})


# ----- schedule.py -----------------------------------------------------------------------------------

def test_removal_schedule_from_config_rounds_each_interval_and_the_pretraining():
    schedule = RemovalSchedule.from_config(stepwise_settings(), 7)  # 7 / 2 = 3.5 steps a token, 3.5 of pretraining
    assert schedule == RemovalSchedule(steps_per_token=4, pretrain_steps=4, start_from=3, remove_all_beyond=9.5)
    assert RemovalSchedule.from_config(stepwise_settings(remove_per_epoch=4.0), 3).steps_per_token == 1  # 0.75 -> 1
    assert RemovalSchedule.from_config(stepwise_settings(remove_per_epoch=8.0), 3).steps_per_token == 1  # 0.375 -> 1
    assert RemovalSchedule.from_config(stepwise_settings(remove_per_epoch=3.0), 10).steps_per_token == 3
    assert type(RemovalSchedule.from_config(stepwise_settings(), 7).steps_per_token) is int
    assert RemovalSchedule.from_config(stepwise_settings(pretrain_epochs=1.25), 8).pretrain_steps == 10


def test_removal_schedule_counts_from_start_from_after_pretraining():
    schedule = RemovalSchedule(steps_per_token=3, pretrain_steps=2, start_from=1, remove_all_beyond=4)
    assert [schedule.in_pretraining(step) for step in range(4)] == [True, True, False, False]
    assert [schedule.scheduled(step) for step in range(13)] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, math.inf, math.inf]
    assert [RemovalSchedule(2).scheduled(step) for step in range(5)] == [0, 0, 1, 1, 2]


def test_adaptive_pace_from_config_takes_every_setting():
    pace = AdaptivePace.from_config(stepwise_settings(), 7)
    assert pace == AdaptivePace(target_accuracy=0.75, min_steps=4, max_steps=11, pretrain_steps=4, start_from=3,
                                remove_all_beyond=9.5, late_from=6, late_max_steps=13, late_until=8)
    assert AdaptivePace.from_config(stepwise_settings(pace_late_until=None), 7).late_until == math.inf
    assert AdaptivePace.from_config(stepwise_settings(pretrain_epochs=1.25), 8).pretrain_steps == 10


def test_adaptive_pace_latest_is_the_late_bound_inside_its_window_only():
    pace = AdaptivePace(0.9, 1, max_steps=11, pretrain_steps=2, late_from=6, late_max_steps=13, late_until=8)
    assert [pace.latest(count) for count in (5, 6, 7, 8, 9)] == [11, 13, 13, 11, 11]
    assert [pace.in_pretraining(step) for step in range(4)] == [True, True, False, False]
    assert AdaptivePace(0.9, 1, max_steps=11, late_max_steps=13).latest(50) == 11  # no late_from: never late
    assert AdaptivePace(0.9, 1, late_from=0, late_max_steps=13).latest(0) == 13
    assert AdaptivePace(0.9, 1, late_from=0, late_max_steps=13).latest(10**6) == 13  # no late_until: no end
    assert AdaptivePace(0.9, 1).latest(3) is None


def test_adaptive_pace_latest_full_removal_sums_the_latest_of_each_count():
    pace = AdaptivePace(0.9, 1, max_steps=3, pretrain_steps=5, start_from=2, late_from=4, late_max_steps=10,
                        late_until=5)
    assert pace.latest_full_removal(6) == 5 + 3 + 3 + 10 + 3  # counts 2, 3, 4 (late), 5
    assert pace.latest_full_removal(2) == 5  # nothing to remove past start_from
    beyond = AdaptivePace(0.9, 1, max_steps=3, pretrain_steps=5, start_from=1, remove_all_beyond=3.5)
    assert beyond.latest_full_removal(6) == 5 + 3 + 3 + 3  # counts 1, 2, 3; at 4 (ceil 3.5) all of it
    assert beyond.latest_full_removal(3) == 5 + 3 + 3  # a CoT shorter than remove_all_beyond
    assert AdaptivePace(0.9, 1, max_steps=3, remove_all_beyond=3).latest_full_removal(6) == 9
    assert AdaptivePace(0.9, 1, None, 5, 1).latest_full_removal(6) == math.inf
    assert AdaptivePace(0.9, 1, None, 5, 1).latest_full_removal(1) == 5  # nothing left to wait for


def test_adaptive_pace_next_count_at_each_boundary():
    pace = AdaptivePace(0.75, min_steps=4, max_steps=11, pretrain_steps=2, remove_all_beyond=6)
    assert pace.next_count(1, 2, 50, 1.0) == 2  # pretraining
    assert pace.next_count(2, 2, 4, 0.75) == 3  # ready: min_steps and target_accuracy both reached
    assert pace.next_count(2, 2, 3, 1.0) == 2  # too few steps
    assert pace.next_count(2, 2, 10, 0.74) == 2  # not accurate enough, not overdue
    assert pace.next_count(2, 2, 11, 0.0) == 3  # overdue at max_steps
    assert pace.next_count(2, 4, 4, 0.75) == 5
    assert pace.next_count(2, 5, 4, 0.75) == math.inf  # 6: remove_all_beyond reached
    assert pace.next_count(2, 5, 3, 0.75) == 5
    assert pace.next_count(2, math.inf, 50, 1.0) == math.inf
    assert AdaptivePace(0.75, 4).next_count(2, 2, 10**6, 0.5) == 2  # no max_steps: never overdue
    late = AdaptivePace(0.75, 4, max_steps=11, late_from=3, late_max_steps=20)
    assert late.next_count(0, 3, 11, 0.0) == 3 and late.next_count(0, 3, 20, 0.0) == 4


def test_offset_distribution_is_a_normalized_exponential_of_the_offset():
    probs = offset_distribution(0.5, size=4)
    weights = [math.exp(-0.5 * o) for o in range(4)]
    assert probs.dtype == torch.float64 and probs.shape == (4,)
    assert probs.tolist() == pytest.approx([w / sum(weights) for w in weights], rel=1e-12)
    assert offset_distribution(0.0, 5).tolist() == pytest.approx([0.2] * 5)
    assert offset_distribution(1.0).shape == (MAX_OFFSET,) == (100,)
    certain = offset_distribution(math.inf, size=3)
    assert certain.dtype == torch.float64 and certain.tolist() == [1.0, 0.0, 0.0]
    assert offset_distribution(math.inf).shape == (100,) and offset_distribution(math.inf)[0] == 1.0


def test_tokens_to_remove_adds_the_count_or_takes_the_whole_cot_on_the_cots_device():
    cot = torch.tensor([3, 10, 0])
    assert tokens_to_remove(2, cot, torch.tensor([0, 1, 5])).tolist() == [2, 3, 7]
    assert tokens_to_remove(2.0, cot, torch.tensor([0, 1, 5])).dtype == torch.int64
    whole = tokens_to_remove(math.inf, cot, torch.tensor([0, 1, 5]))
    assert whole.tolist() == [3, 10, 0]
    whole[0] = 99  # a copy: the batch's CoT lengths stay as they are
    assert cot.tolist() == [3, 10, 0]
    on_meta = tokens_to_remove(2, torch.empty(3, dtype=torch.int64, device="meta"), torch.tensor([0, 1, 5]))
    assert on_meta.device.type == "meta"


def test_step_units_from_step_ends_left_and_right():
    ends = [[2, 5, 9], [4], []]
    left = StepUnits.from_step_ends(ends)
    assert left.table.dtype == np.int64 and left.most == 3
    assert left.table.tolist() == [[0, 2, 5, 9], [0, 4, 4, 4], [0, 0, 0, 0]]
    right = StepUnits.from_step_ends(ends, side="right")
    assert right.table.tolist() == [[0, 4, 7, 9], [0, 4, 4, 4], [0, 0, 0, 0]]
    assert StepUnits.from_step_ends(ends, "left").table.tolist() == left.table.tolist()
    assert StepUnits.from_step_ends([[1, 3]]).table.tolist() == [[0, 1, 3]]  # the longest CoT: no column past it
    assert StepUnits.from_step_ends([]).table.shape == (0, 1)


def test_step_units_columns_and_tokens_per_row():
    units = StepUnits.from_step_ends([[2, 5, 9], [4], []])
    assert [units.column(k).tolist() for k in (0, 1, 2, 3, 4)] == [[0, 0, 0], [2, 4, 0], [5, 4, 0], [9, 4, 0],
                                                                   [9, 4, 0]]
    assert units.column(1.7).tolist() == [2, 4, 0] and units.column(math.inf).tolist() == [9, 4, 0]
    rows, offsets = torch.tensor([0, 0, 1, 0, 2]), torch.tensor([0, 1, 0, 3, 0])
    assert units.tokens(1, rows, offsets).tolist() == [2, 5, 4, 9, 0]  # 1 + 3 is past the last step: all
    assert units.tokens(0, rows, offsets).tolist() == [0, 2, 0, 9, 0]
    assert units.tokens(2.9, rows, offsets).tolist() == [5, 9, 4, 9, 0]
    assert units.tokens(math.inf, rows, torch.zeros(5, dtype=torch.int64)).tolist() == [9, 9, 4, 9, 0]
    assert units.tokens(1, rows, offsets).dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_units_and_rewind_points_on_a_cuda_run():
    units = StepUnits.from_step_ends([[2, 5, 9], [4]])
    rows, offsets = torch.tensor([1, 0], device="cuda"), torch.tensor([0, 1], device="cuda")
    tokens = units.tokens(1, rows, offsets)
    assert tokens.device.type == "cuda" and tokens.tolist() == [4, 5]  # on the batch's device
    point = cpu_copy({"weights": torch.ones(2, device="cuda")})
    assert point["weights"].device.type == "cpu"  # the rewind point holds no GPU memory


# ----- rewind.py -------------------------------------------------------------------------------------

def test_rewind_keeps_a_check_at_or_above_the_floor_and_tracks_the_best():
    last = Rewind(floor=0.5, patience=2, most=1)
    assert [last.keeps(a) for a in (0.49, 0.5, 0.8, 0.6)] == [False, True, True, True]
    assert last.best == 0.8
    best = Rewind(0.5, 2, 1, to="best")
    assert [best.keeps(a) for a in (0.49, 0.5, 0.5, 0.7, 0.6, 0.71)] == [False, True, False, True, False, True]
    assert best.best == 0.71
    start = Rewind(0.5, 2, 1, to="start")
    assert [start.keeps(a) for a in (0.49, 0.5, 1.0)] == [False, False, False] and start.best == -math.inf
    below = Rewind(0.5, 2, 1)
    below.keeps(0.2)
    assert below.best == -math.inf  # a check below the floor is no point, nor the best


def test_rewind_collapses_after_patience_checks_below_the_floor_with_a_point_and_rewinds_left():
    watch = Rewind(floor=0.5, patience=2, most=2)
    assert [watch.collapsed(a) for a in (0.1, 0.1)] == [False, False] and watch.below == 2  # no point yet
    watch.point = {}  # an empty point is a point still
    assert watch.collapsed(0.4) and watch.below == 3
    assert not watch.collapsed(0.5) and watch.below == 0  # at the floor: the count starts again
    assert [watch.collapsed(a) for a in (0.49, 0.49)] == [False, True]
    watch.rewinds = 1
    assert watch.collapsed(0.0)
    watch.rewinds = 2
    assert not watch.collapsed(0.0)  # at most `most` rewinds
    once = Rewind(floor=0.5, patience=1, most=1, point={"step": 3})
    assert once.collapsed(0.2) and not once.collapsed(0.9)


def test_cpu_copy_is_a_deep_copy_on_the_cpu():
    state = {"weights": torch.ones(2), "inner": {"steps": [torch.zeros(1)], "name": "adam"}}
    copy = cpu_copy(state)
    state["weights"].add_(1)
    state["inner"]["steps"][0].add_(5)
    state["inner"]["steps"].append(None)
    assert copy["weights"].tolist() == [1.0, 1.0] and copy["weights"].device.type == "cpu"
    assert [t.tolist() for t in copy["inner"]["steps"]] == [[0.0]] and copy["inner"]["name"] == "adam"


# ----- baselines.py ----------------------------------------------------------------------------------

def baseline_config(tmp_path, kind=None, **settings):
    from icot.methods.baselines import ExplicitConfig

    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("1 * 2||2 #### 2\n")
    files = dict(train_file=str(tmp_path / "train.txt"), valid_file=str(tmp_path / "valid.txt"), out=str(tmp_path / "run"))
    return (kind or ExplicitConfig)(**{**files, **settings})


@pytest.mark.parametrize("settings, message", [
    (dict(steps_past_goal=10, eval_every=10), "config: steps_past_goal counts from the validation that reaches "
                                              "stop_at_accuracy: set it"),
    (dict(stop_at_accuracy=0.0, eval_every=10), "config: stop_at_accuracy must be in (0, 1], got 0.0"),
    (dict(stop_at_accuracy=1.01, eval_every=10), "config: stop_at_accuracy must be in (0, 1], got 1.01"),
    (dict(stop_at_accuracy=0.5), "config: stop_at_accuracy is checked at each validation: set eval_every"),
    (dict(stop_at_accuracy=0.5, eval_every=10, valid_file=None),
     "config: stop_at_accuracy watches validation accuracy: give a validation file (valid_file, or valid.txt in the "
     "data directory)"),
    (dict(stop_at_accuracy=0.5, eval_every=10, steps_past_goal=-10),
     "config: steps_past_goal must be a non-negative multiple of eval_every (10), got -10"),
    (dict(stop_at_accuracy=0.5, eval_every=10, steps_past_goal=15),
     "config: steps_past_goal must be a non-negative multiple of eval_every (10), got 15"),
    (dict(stop_at_accuracy=0.5, eval_every=10, out=None), "config: out is required (the run directory)"),
    (dict(out=None), "config: out is required (the run directory)"),
])
def test_baseline_settings_are_checked_with_one_line_errors(tmp_path, settings, message):
    from icot.errors import UserError

    with pytest.raises(UserError) as error:
        baseline_config(tmp_path, **settings).validate()
    assert str(error.value) == message


@pytest.mark.parametrize("settings", [dict(), dict(eval_every=10), dict(stop_at_accuracy=1.0, eval_every=10),
                                      dict(stop_at_accuracy=0.01, eval_every=5, steps_past_goal=20),
                                      dict(stop_at_accuracy=0.5, eval_every=10, steps_past_goal=0)])
def test_baseline_settings_that_are_accepted(tmp_path, settings):
    baseline_config(tmp_path, **settings).validate()


def baseline_trainer(tmp_path, kind="explicit", **settings):
    from icot.methods.baselines import ExplicitTrainer, NoCotTrainer

    trainer_class = ExplicitTrainer if kind == "explicit" else NoCotTrainer
    config = baseline_config(tmp_path, trainer_class.config_class, **settings)
    return trainer_class(config, resume=True, best_dir=tmp_path / "elsewhere")


def validated(trainer, step: int, best_step: int | None, accuracy: float | None) -> bool:
    """goal_reached() after a validation at `step`, the best so far at `best_step` with `accuracy`."""
    p = trainer.progress
    p.step, p.best_step, p.best_score = step, best_step, None if accuracy is None else [accuracy, 0.0]
    return trainer.goal_reached()


def test_a_baseline_trainer_starts_without_a_goal_and_passes_its_arguments_on(tmp_path):
    trainer = baseline_trainer(tmp_path, stop_at_accuracy=0.5, eval_every=10)
    assert trainer.goal_step is None and trainer.resume is True and trainer.best_dir == tmp_path / "elsewhere"
    assert trainer.config.stop_at_accuracy == 0.5 and trainer.run_dir == tmp_path / "run"
    assert trainer.competes_for_best() and trainer.method_state() == {}
    assert trainer.metadata() == {"cot_removed": 0}
    defaults = type(trainer)(trainer.config)
    assert defaults.resume is False and defaults.best_dir == tmp_path / "run" / "best"


def test_the_goal_is_the_first_best_validation_at_stop_at_accuracy_then_steps_past_goal_more(tmp_path):
    trainer = baseline_trainer(tmp_path, stop_at_accuracy=0.5, eval_every=10, steps_past_goal=20)
    assert not validated(trainer, 10, 10, 0.49) and trainer.goal_step is None
    assert not validated(trainer, 20, 10, 0.9) and trainer.goal_step is None  # not this validation's score
    assert not validated(trainer, 30, 30, 0.5) and trainer.goal_step == 30  # reached, at the threshold itself
    assert not trainer.competes_for_best() and trainer.method_state() == {"goal_step": 30}
    assert not validated(trainer, 40, 40, 0.9) and trainer.goal_step == 30  # the first one stays the goal
    assert not validated(trainer, 49, 40, 0.9)
    assert validated(trainer, 50, 40, 0.9) and validated(trainer, 60, 40, 0.9)
    trainer.load_method_state({})
    assert trainer.goal_step is None and trainer.competes_for_best()
    trainer.load_method_state({"goal_step": 7})
    assert trainer.goal_step == 7 and trainer.method_state() == {"goal_step": 7}


def test_without_steps_past_goal_the_run_stops_at_the_goal_and_without_a_goal_never(tmp_path):
    at_once = baseline_trainer(tmp_path, stop_at_accuracy=0.5, eval_every=10)
    assert not validated(at_once, 10, 10, 0.3) and validated(at_once, 20, 20, 0.6) and at_once.goal_step == 20
    never = baseline_trainer(tmp_path, eval_every=10)
    assert not validated(never, 10, 10, 1.0) and never.goal_step is None


def test_reaches_goal_now_needs_this_validation_to_be_the_best_at_stop_at_accuracy(tmp_path):
    trainer = baseline_trainer(tmp_path, stop_at_accuracy=0.5, eval_every=10)
    p = trainer.progress
    for step, best_step, score, reached in [(10, 10, 0.5, True), (10, 10, 0.4999, False), (20, 10, 0.9, False),
                                            (10, 10, 1.0, True)]:
        p.step, p.best_step, p.best_score = step, best_step, [score, 0.7]
        assert trainer.reaches_goal_now() is reached
    p.step, p.best_step, p.best_score = 10, 10, [0.3, 0.9]  # the first number of the score is exact match
    assert trainer.reaches_goal_now() is False


@pytest.fixture(scope="module")
def mult_rows():
    """Four 2x2 multiplications (of two CoT lengths) and 2x3 ones, word-tokenized: (tokenizer, layout, examples)."""
    from conftest import mult_examples
    from icot.data.layout import Layout
    from icot.data.tokenizers import word_tokenizer

    examples = mult_examples(2, 2, 3, seed=5) + mult_examples(2, 3, 2, seed=6)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    return tokenizer, Layout.for_tokenizer(tokenizer), examples


def test_nocot_without_the_probe_trains_the_plain_lm(tmp_path, mult_rows):
    from icot.data.batching import collate
    from icot.data.layout import encode
    from icot.evaluate import token_scores
    from icot.models import build_preset

    tokenizer, layout, examples = mult_rows
    trainer = baseline_trainer(tmp_path, "nocot")
    assert trainer.running_sum is None and trainer.metadata() == {"cot_removed": "all"}
    defaults = type(trainer)(trainer.config)
    assert defaults.resume is False and defaults.best_dir == tmp_path / "run" / "best"
    assert trainer.resume is True and trainer.best_dir == tmp_path / "elsewhere" and trainer.goal_step is None
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    assert trainer.build_model(tokenizer, lm) is lm
    trainer.train_data = data = encode(tokenizer, layout, examples)
    trainer.prepare_data()
    assert trainer.train_data.examples == examples
    batch = collate(data, np.arange(4), layout.pad_id, drop_cot=True)
    assert trainer.training_batch(batch) is batch and "values" not in batch
    loss = trainer.compute_loss(lm, batch)
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits
    expected = token_scores(logits, batch["labels"])
    assert loss.loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (expected[1].item(), expected[2].item())
    trainer.tokenizer = tokenizer
    predictor = trainer.predictor(lm)
    assert predictor.model is lm and predictor.cot_removed == math.inf


def test_nocot_with_the_probe_labels_its_rows_and_adds_the_weighted_probe_loss(tmp_path, mult_rows):
    from icot.data.batching import collate
    from icot.data.layout import encode
    from conftest import probed_loss_and_recompute
    from icot.methods.running_sum import ProbedLM, RunningSum, value_table
    from icot.models import build_preset

    tokenizer, layout, examples = mult_rows
    trainer = baseline_trainer(tmp_path, "nocot", running_sum_weight=0.5, running_sum_positions="answer")
    assert isinstance(trainer.running_sum, RunningSum) and trainer.running_sum.config is trainer.config
    assert trainer.resume is True and trainer.best_dir == tmp_path / "elsewhere" and trainer.goal_step is None
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    model = trainer.build_model(tokenizer, lm)
    assert isinstance(model, ProbedLM) and model.lm is lm and model.layer == lm.config.n_layer - 1
    data = encode(tokenizer, layout, examples)
    trainer.train_data = data
    trainer.prepare_data()
    expected_values = value_table(encode(tokenizer, layout, examples), "answer")
    np.testing.assert_array_equal(trainer.running_sum.values, expected_values)
    assert trainer.train_data.examples is None  # only the values are used from here on
    batch = collate(data, np.array([3, 0, 4]), layout.pad_id, drop_cot=True)
    batch["index"] = torch.tensor([3, 0, 4])
    batch["position_ids"] = batch["position_ids"] + 2  # positions of its own: the ones passed are the ones used
    batch["attention_mask"][1, 1] = 0  # as is the mask
    assert trainer.training_batch(batch) is batch
    values = batch["values"]
    assert values.shape == batch["input_ids"].shape and values.dtype == torch.float32
    labelled = ~torch.isnan(values)
    assert labelled.sum(dim=1).tolist() == [5, 4, 5]  # the answer digits of each row: 2x3 products have 5
    answer_of_row_1 = [int(d) for d in examples[0].answer.split()]
    assert [round(float(v) * 10) % 10 for v in values[1][labelled[1]]] == answer_of_row_1
    loss, calls, (loss_sum, correct, count), predicted = probed_loss_and_recompute(trainer, model, lm, batch)
    assert calls == [False]  # training passes build no KV cache
    mse = ((predicted[labelled] - values[labelled]) ** 2).mean().item()
    assert loss.loss_sum.item() == pytest.approx(loss_sum.item() + 0.5 * count.item() * mse, rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (correct.item(), count.item())
    assert loss.metrics["running_sum_mse"].item() == pytest.approx(mse, rel=1e-5)
    trainer.tokenizer = tokenizer
    predictor = trainer.predictor(model)
    assert predictor.model is lm and predictor.cot_removed == math.inf


# ----- running_sum.py --------------------------------------------------------------------------------

NAN = math.nan
# 12 * 34 and 5 * 67 (digits written low first: `2 1 * 4 3`), word-tokenized: each row's ĉ; the answers' by hand
# (12 * 34 = 408: columns 2*4 = 8, 2*3 + 1*4 = 10, 1*3 + 1 = 4, 0 + 0 = 0; 5 * 67 = 335: 5*7 = 35, 5*6 + 3 = 33, 3)
ROW_WORDS = [["2", "1", "*", "4", "3", "EOS", "8", "4", "0", "+", "0", "6", "3", "0", "EOS", "####", "8", "0", "4", "0",
              "EOS"], ["5", "*", "7", "6", "EOS", "5", "3", "+", "0", "0", "3", "EOS", "####", "5", "3", "3", "EOS"]]
C_HATS = [NAN] * 6 + [8, 4, 0, NAN, 0, 6, 3, 0, NAN, NAN, 8, 10, 4, 0, NAN] + \
         [NAN] * 5 + [35, 3, NAN, 0, 30, 3, NAN, NAN, 35, 33, 3, NAN]
ANSWER_C_HATS = [NAN] * 16 + [8, 10, 4, 0, NAN] + [NAN] * 13 + [35, 33, 3, NAN]


def encoded(examples, tokenizer=None):
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer

    tokenizer = tokenizer or word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples] + ["9"])
    return encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)


def two_products():
    from icot.data.mult import mult_example

    return [mult_example(12, 34), mult_example(5, 67)]


def expected_table(c_hats) -> np.ndarray:
    return np.array(c_hats, dtype=np.float16) / np.float16(10)


def test_the_value_table_labels_each_cot_and_answer_digit_with_its_c_hat_over_10():
    from icot.methods.running_sum import value_table

    data = encoded(two_products())
    table = value_table(data)
    assert table.dtype == np.float16 and table.shape == (38,)
    np.testing.assert_array_equal(table, expected_table(C_HATS))
    np.testing.assert_array_equal(value_table(data, "all"), expected_table(C_HATS))
    np.testing.assert_array_equal(value_table(data, "answer"), expected_table(ANSWER_C_HATS))


def test_the_value_table_labels_interleaved_shapes_each_at_its_own_row():
    from icot.data.mult import mult_example
    from icot.methods.running_sum import value_table

    data = encoded([mult_example(5, 67), mult_example(12, 34), mult_example(8, 12), mult_example(99, 99)])
    table = value_table(data)
    rows = [table[data.offsets[i]:data.offsets[i + 1]] for i in range(4)]
    np.testing.assert_array_equal(rows[0], expected_table(C_HATS[21:]))
    np.testing.assert_array_equal(rows[1], expected_table(C_HATS[:21]))
    # 8 * 12 = 96 (`8 * 2 1`, answer `6 9 0`): 8*2 = 16, 8*1 + 1 = 9, 0 + 0 = 0
    assert [round(float(v) * 10) for v in rows[2][-4:-1]] == [16, 9, 0]
    # 99 * 99 = 9801 (`9 9 * 9 9`, answer `1 0 8 9`): 81, 81 + 81 + 8 = 170, 81 + 17 = 98, 0 + 9 = 9
    assert [round(float(v) * 10) for v in rows[3][-5:-1]] == [81, 170, 98, 9]


@pytest.mark.parametrize("bad, message", [
    (dict(cot="8 4 0 + 0 6 3 0 0"), "example 3"), (dict(answer="8 0 4 0 0"), "example 3"),
    (dict(cot="8 4 0 + 0 6 3"), "example 3"), (dict(answer="8 0 4"), "example 3")])
def test_an_example_that_does_not_tokenize_one_token_a_digit_is_refused_by_its_number(bad, message):
    import dataclasses

    from icot.data.mult import mult_example
    from icot.errors import UserError
    from icot.methods.running_sum import value_table

    examples = [mult_example(5, 67), mult_example(12, 34), dataclasses.replace(mult_example(12, 34), **bad)]
    with pytest.raises(UserError) as error:
        value_table(encoded(examples))
    assert str(error.value) == (f"running_sum_weight: training {message} does not tokenize to one token per digit; the "
                                "running-sum loss needs a tokenizer that gives each digit its own token (tokenizer: word "
                                "does)")


def test_operands_are_grouped_by_shape_in_order_of_first_appearance():
    from icot.data.mult import mult_example
    from icot.methods.running_sum import _operands_by_shape

    data = encoded([mult_example(5, 67), mult_example(12, 34), mult_example(8, 12), mult_example(99, 10)])
    groups = [(rows.tolist(), a.tolist(), b.tolist()) for rows, a, b in _operands_by_shape(data)]
    assert groups == [([0, 2], [[5], [8]], [[7, 6], [2, 1]]), ([1, 3], [[2, 1], [9, 9]], [[4, 3], [0, 1]])]


def test_labelling_shows_a_transient_progress_bar_from_100000_examples_on(capsys):
    from icot.methods.running_sum import _operands_by_shape

    class Many:
        def __init__(self, n: int):
            self.examples = two_products()[:1] * n

        def __len__(self):
            return len(self.examples)

    assert [rows.size for rows, _, _ in _operands_by_shape(Many(99_999))] == [99_999]
    assert capsys.readouterr().err == ""
    _operands_by_shape(Many(100_000))
    err = capsys.readouterr().err
    assert "running-sum labels:" in err and "/100000" in err and "ex/s" in err
    assert not err.endswith("\n")  # leave=False: the bar is erased when done


def test_an_example_that_is_not_a_multiplication_is_refused_by_its_number():
    from icot.data.format import Example
    from icot.errors import UserError
    from icot.methods.running_sum import _operands_by_shape

    examples = two_products() + [Example("1 2 + 3 4", "4 6", "4 6")]
    with pytest.raises(UserError) as error:
        _operands_by_shape(encoded(examples))
    assert str(error.value) == ("running_sum_weight: training example 3 is not a multiplication (expected 'DIGITS * "
                                "DIGITS'); the running-sum loss is defined for `icot data mult` data only")
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_batch_values_lay_the_table_out_as_collate_lays_out_the_rows():
    from icot.methods.running_sum import batch_values

    data = encoded(two_products())
    table = np.arange(38, dtype=np.float16)  # each token's own index
    values = batch_values(table, data, torch.tensor([1, 0]))
    assert values.dtype == torch.float32 and values.shape == (2, 21)
    assert values[0].tolist()[:17] == list(range(21, 38)) and all(math.isnan(v) for v in values[0].tolist()[17:])
    assert values[1].tolist() == list(range(21))
    no_cot = batch_values(table, data, torch.tensor([1, 0]), drop_cot=True)  # prompt, then SEP #### answer EOS
    assert no_cot.shape == (2, 13)
    assert no_cot[0].tolist()[:11] == [21, 22, 23, 24, 25, 32, 33, 34, 35, 36, 37]
    assert all(math.isnan(v) for v in no_cot[0].tolist()[11:])
    assert no_cot[1].tolist() == [0, 1, 2, 3, 4, 5, 14, 15, 16, 17, 18, 19, 20]
    assert batch_values(table, data, torch.tensor([0]), False).tolist() == [list(range(21))]


def test_probe_loss_is_the_mean_squared_error_over_labelled_tokens_and_heads():
    from icot.methods.running_sum import probe_loss

    values = torch.tensor([[0.5, NAN, 1.0], [NAN, 2.0, NAN]])
    predicted = torch.tensor([[1.5, 9.0, 1.0], [7.0, 0.0, 3.0]], dtype=torch.bfloat16)
    loss = probe_loss(predicted, values)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx((1 + 0 + 4) / 3)
    heads = torch.tensor([[[1.5, 0.5], [9, 9], [1.0, 3.0]], [[7, 7], [0.0, 2.0], [3, 3]]])  # [batch, tokens, 2 heads]
    assert probe_loss(heads, values).item() == pytest.approx((1 + 0 + 0 + 4 + 4 + 0) / 6)
    nothing = torch.tensor([[2.0, 3.0]], requires_grad=True)
    none_labelled = probe_loss(nothing, torch.tensor([[NAN, NAN]]))
    assert none_labelled.item() == 0.0
    none_labelled.backward()  # still a part of the graph: a batch without labels trains on
    assert nothing.grad.tolist() == [[0.0, 0.0]]


def test_running_sum_settings_are_checked(tmp_path):
    from icot.errors import UserError
    from icot.methods.running_sum import RunningSumConfig

    base = dict(train_file=str(tmp_path / "train.txt"), out=str(tmp_path / "run"))
    for settings, message in [
        (dict(running_sum_weight=-0.5), "config: running_sum_weight must be >= 0, got -0.5"),
        (dict(running_sum_weight=NAN), "config: running_sum_weight must be >= 0, got nan"),
        (dict(running_sum_probe="heads"), "config: running_sum_probe heads is read only with running_sum_weight above "
                                          "0; drop it or set that"),
        (dict(running_sum_positions="answer"), "config: running_sum_positions answer is read only with "
                                               "running_sum_weight above 0; drop it or set that"),
        (dict(running_sum_layer=0), "config: running_sum_layer 0 is read only with running_sum_weight above 0; drop it "
                                    "or set that"),
        (dict(running_sum_weight=1.0, out=None), "config: out is required (the run directory)")]:
        with pytest.raises(UserError) as error:
            RunningSumConfig(**{**base, **settings}).validate()
        assert str(error.value) == message
    RunningSumConfig(**base).validate()
    RunningSumConfig(**base, running_sum_weight=0.0).validate()
    RunningSumConfig(**base, running_sum_weight=2.0, running_sum_probe="heads", running_sum_positions="answer",
                     running_sum_layer=0).validate()


@pytest.fixture(scope="module")
def micro_lm():
    from icot.models import build_preset

    torch.manual_seed(0)
    return build_preset("micro", 12, 11).eval()


def test_a_probe_reads_a_layer_counted_from_either_end_and_refuses_one_the_model_lacks(micro_lm):
    from icot.errors import UserError
    from icot.methods.running_sum import ProbedLM

    assert [ProbedLM(micro_lm, layer).layer for layer in (-2, -1, 0, 1)] == [0, 1, 0, 1]
    for layer in (-3, 2):
        with pytest.raises(UserError) as error:
            ProbedLM(micro_lm, layer)
        assert str(error.value) == (f"config: running_sum_layer {layer} is not a layer of this 2-layer model (0 to 1, "
                                    "or negative from the end)")


def test_the_residual_probe_is_one_linear_with_bias_on_the_layers_output(micro_lm):
    from icot.methods.running_sum import ProbedLM

    probed = ProbedLM(micro_lm, 0)
    assert probed.probe.weight.shape == (1, 128) and probed.probe.bias.shape == (1,)
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    with torch.no_grad():
        out, predicted = probed(input_ids=ids)
        plain = micro_lm(input_ids=ids, output_hidden_states=True)
        expected = plain.hidden_states[1] @ probed.probe.weight[0] + probed.probe.bias[0]
    assert predicted.shape == (2, 4)
    torch.testing.assert_close(predicted, expected)
    torch.testing.assert_close(out.logits, plain.logits)
    last = ProbedLM(micro_lm, -1)
    with torch.no_grad():
        torch.testing.assert_close(last(input_ids=ids)[1], plain.hidden_states[2] @ last.probe.weight[0] +
                                   last.probe.bias[0])


def test_the_probes_take_the_models_device_and_dtype():
    from icot.methods.running_sum import HeadsProbedLM, ProbedLM
    from icot.models import build_preset

    lm = build_preset("micro", 12, 11).to(device="meta", dtype=torch.bfloat16)
    residual = ProbedLM(lm, 0).probe.weight
    assert (residual.device.type, residual.dtype) == ("meta", torch.bfloat16)
    heads = HeadsProbedLM(lm, 0).probes
    assert {(p.weight.device.type, p.weight.dtype) for p in heads} == {("meta", torch.bfloat16)}


def heads_probed_llama(head_dim: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    from icot.methods.running_sum import HeadsProbedLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=16)
    return HeadsProbedLM(LlamaForCausalLM(config).eval(), -1)


def test_a_heads_probe_per_head_without_bias_of_the_heads_width(micro_lm):
    from icot.methods.running_sum import HeadsProbedLM

    gpt2 = HeadsProbedLM(micro_lm, 0)  # 128 wide, 4 heads: 32 each
    assert (gpt2.layer, gpt2.num_heads, gpt2.head_dim) == (0, 4, 32)
    assert [tuple(p.weight.shape) for p in gpt2.probes] == [(1, 32)] * 4 and all(p.bias is None for p in gpt2.probes)
    llama = heads_probed_llama()  # 32 wide, 2 heads of 8 (head_dim set): the projection reads 16 features
    assert (llama.layer, llama.num_heads, llama.head_dim) == (1, 2, 8)
    assert [tuple(p.weight.shape) for p in llama.probes] == [(1, 8)] * 2 and all(p.bias is None for p in llama.probes)


@pytest.mark.parametrize("layer", [0, -1])
def test_each_heads_probe_reads_its_heads_part_of_the_output_projections_input(micro_lm, layer):
    from icot.methods.running_sum import HeadsProbedLM

    probed = HeadsProbedLM(micro_lm, layer)
    projection = micro_lm.transformer.h[layer].attn.c_proj
    seen = []
    hook = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    with torch.no_grad():
        out, z = probed(input_ids=ids)
        hook.remove()
        plain = micro_lm(input_ids=ids)
    assert not projection._forward_pre_hooks  # the probe's hook is gone after the pass
    expected = torch.stack([seen[0][..., h * 32:(h + 1) * 32] @ probed.probes[h].weight[0] for h in range(4)], -1)
    assert z.shape == (2, 5, 4)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(out.logits, plain.logits)


def test_heads_probes_on_llama_read_its_o_proj_input_of_heads_times_head_dim():
    probed = heads_probed_llama()
    seen = []
    probed.lm.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        _, z = probed(input_ids=torch.tensor([[1, 2, 3]]))
    expected = torch.stack([seen[0][..., h * 8:(h + 1) * 8] @ probed.probes[h].weight[0] for h in range(2)], -1)
    torch.testing.assert_close(z, expected)


def test_an_attention_output_of_another_width_than_heads_times_head_dim_is_refused(micro_lm):
    from icot.errors import UserError
    from icot.methods.running_sum import HeadsProbedLM

    probed = HeadsProbedLM(micro_lm, 1)
    probed.head_dim = 16
    with pytest.raises(UserError) as error:
        probed(input_ids=torch.tensor([[1, 2]]))
    assert str(error.value) == ("running_sum_probe heads: layer 1's attention output has 128 features, not 4 heads x 16")
    assert not micro_lm.transformer.h[1].attn.c_proj._forward_pre_hooks


def test_the_output_projection_is_found_by_its_known_names_in_order():
    from icot.errors import UserError
    from icot.methods.running_sum import OUTPUT_PROJECTIONS, output_projection

    nn = torch.nn
    o_proj, c_proj = nn.Linear(2, 2), nn.Linear(2, 2)
    llama_like = nn.ModuleDict({"self_attn": nn.ModuleDict({"o_proj": o_proj}), "mlp": nn.Linear(2, 2)})
    assert output_projection(llama_like) is o_proj
    both = nn.ModuleDict({"self_attn": nn.ModuleDict({"o_proj": o_proj}), "attn": nn.ModuleDict({"c_proj": c_proj})})
    assert output_projection(both) is c_proj  # GPT-2's name comes first
    opt_like = nn.ModuleDict({"self_attn": nn.ModuleDict({"out_proj": o_proj})})
    assert output_projection(opt_like) is o_proj
    with pytest.raises(UserError) as error:
        output_projection(nn.ModuleDict({"mixer": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}))
    assert str(error.value) == (f"running_sum_probe heads: no attention output projection ({', '.join(OUTPUT_PROJECTIONS)}) "
                                "in ModuleDict, whose modules are mixer, norm; use running_sum_probe residual")
    assert OUTPUT_PROJECTIONS[:2] == ("attn.c_proj", "self_attn.o_proj")


def test_a_heads_probe_on_a_model_without_a_known_projection_is_refused_when_made():
    from icot.errors import UserError
    from icot.methods.running_sum import HeadsProbedLM
    from icot.models import build_preset

    lm = build_preset("micro", 12, 11)
    del lm.transformer.h[1].attn.c_proj
    HeadsProbedLM(lm, 0)  # layer 0 still has its projection
    with pytest.raises(UserError, match="^running_sum_probe heads: no attention output projection .* in GPT2Block"):
        HeadsProbedLM(lm, 1)


def test_running_sum_wraps_labels_batches_and_weights_the_loss(tmp_path, micro_lm):
    from icot.data.batching import collate
    from icot.methods.running_sum import HeadsProbedLM, ProbedLM, RunningSum, RunningSumConfig

    config = RunningSumConfig(running_sum_weight=2.5, running_sum_layer=0)
    running = RunningSum(config)
    assert running.config is config and running.values is None
    residual = running.wrap(micro_lm)
    assert type(residual) is ProbedLM and residual.layer == 0 and residual.lm is micro_lm
    heads = RunningSum(RunningSumConfig(running_sum_weight=1.0, running_sum_probe="heads")).wrap(micro_lm)
    assert type(heads) is HeadsProbedLM and heads.layer == 1
    data = encoded(two_products())
    running.label(data)
    np.testing.assert_array_equal(running.values, expected_table(C_HATS))
    answers = RunningSum(RunningSumConfig(running_sum_weight=1.0, running_sum_positions="answer"))
    answers.label(data)
    np.testing.assert_array_equal(answers.values, expected_table(ANSWER_C_HATS))
    batch = collate(data, np.array([1, 0]), 11, drop_cot=True)
    batch["index"] = torch.tensor([1, 0])
    values = running.batch_values(data, batch, drop_cot=True)
    assert values.shape == (2, 13) and values[1, 8].item() == pytest.approx(0.8, rel=1e-3)  # 12 * 34's first ĉ / 10
    assert running.batch_values(data, batch).shape == (2, 21)  # with the CoT
    batch["input_ids"] = batch["input_ids"].to("meta")
    assert running.batch_values(data, batch, drop_cot=True).device.type == "meta"
    predicted = torch.tensor([[0.5, 1.0]], requires_grad=True)
    loss = running.loss((torch.tensor(7.0), torch.tensor(3), torch.tensor(11)), predicted, torch.tensor([[0.0, NAN]]))
    assert loss.loss_sum.item() == pytest.approx(7.0 + 2.5 * 11 * 0.25)
    assert (loss.correct.item(), loss.count.item()) == (3, 11)
    assert list(loss.metrics) == ["running_sum_mse"] and loss.metrics["running_sum_mse"].item() == 0.25
    assert loss.loss_sum.requires_grad and not loss.metrics["running_sum_mse"].requires_grad

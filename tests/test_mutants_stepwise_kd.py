"""Direct tests of methods/stepwise/trainer.py, methods/stepwise/config.py and methods/kd/ for their
mutants (issue 50): fast calls with the expected values written out, tiny models built here, no
training run. docs/RESULTS.md, "Mutation testing", lists the mutants each one kills."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import icot.methods.stepwise.trainer as sw
from icot import paths
from icot.errors import UserError

# ----- stepwise/trainer.py ---------------------------------------------------------------------------
# 12 * 34, 5 * 67 and 3 * 4 in the papers' format, word-tokenized (one token a word):
#   `2 1 * 4 3 SEP 8 4 0 + 0 6 3 0 SEP #### 8 0 4 0 EOS`   prompt 6, CoT 8, length 21; mult steps end at 3, 8
#   `5 * 7 6 SEP 5 3 + 0 0 3 SEP #### 5 3 3 EOS`            prompt 5, CoT 6, length 17; steps end at 2, 6
#   `3 * 4 SEP 2 1 SEP #### 2 1 EOS`                        prompt 4, CoT 2, length 11; one step
LENGTHS, N_COT = [21, 17, 11], [8, 6, 2]
STEP_TABLE_LEFT = [[0, 3, 8], [0, 2, 6], [0, 2, 2]]
STEP_TABLE_RIGHT = [[0, 5, 8], [0, 4, 6], [0, 2, 2]]


def three_products():
    from icot.data.mult import mult_example

    return [mult_example(12, 34), mult_example(5, 67), mult_example(3, 4)]


def encoded_products(examples=None):
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer

    examples = examples or three_products()
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer} 9" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    return tokenizer, layout, encode(tokenizer, layout, examples)


def stepwise_config(tmp_path, **settings):
    from icot.methods.stepwise import StepwiseConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("1 * 2||2 #### 2\n")
    files = dict(train_file=str(tmp_path / "train.txt"), valid_file=str(tmp_path / "valid.txt"), out=str(tmp_path / "run"))
    return StepwiseConfig(**{**files, **settings})


def stepwise(tmp_path, examples=None, **settings):
    """A StepwiseTrainer on the three products (tokenizer, layout and training data set, no model)."""
    trainer = sw.StepwiseTrainer(stepwise_config(tmp_path, **settings))
    trainer.tokenizer, trainer.layout, trainer.train_data = encoded_products(examples)
    return trainer


@pytest.fixture
def said(monkeypatch):
    """What the trainer warns (`warn`) and writes (`tqdm.write`), in order: ("warn"|"write", text)."""
    lines = []
    monkeypatch.setattr(sw, "warn", lambda message: lines.append(("warn", message)))
    monkeypatch.setattr(sw, "tqdm", SimpleNamespace(write=lambda message: lines.append(("write", message))))
    return lines


def events(trainer) -> list[dict]:
    path = trainer.run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_encoded_products_are_as_the_tests_assume():
    _, _, data = encoded_products()
    assert data.lengths.tolist() == LENGTHS and data.n_cot.tolist() == N_COT and data.n_prompt.tolist() == [6, 5, 4]


def test_a_stepwise_trainer_starts_from_its_settings(tmp_path):
    from icot.methods.running_sum import RunningSum
    from icot.methods.stepwise.rewind import Rewind
    from icot.methods.stepwise.schedule import offset_distribution

    trainer = sw.StepwiseTrainer(stepwise_config(tmp_path, removal_smoothing_lambda=0.5, remove_start_from=2,
                                                 pace_min_steps=7))
    assert trainer.resume is False and trainer.run_dir == tmp_path / "run" and trainer.best_dir == tmp_path / "run" / "best"
    assert torch.equal(trainer.offsets, offset_distribution(0.5))
    assert trainer.current == 2.0 and type(trainer.current) is float
    assert trainer.step_all_removed is False and trainer.resets == 0 and trainer.last_reset_step is None
    assert trainer.schedule is None and trainer.steps_at_count == 0 and trainer.begun_step is None and trainer.units is None
    assert trainer.recent.maxlen == 7 and len(trainer.recent) == 0
    assert trainer.step_tokens == [0.0, 0.0] and trainer.epoch_count == (-1, 2.0)
    assert trainer.running_sum is None and trainer.rewind is None and not trainer.probed
    assert trainer.keeps_examples is False
    resumed = sw.StepwiseTrainer(stepwise_config(tmp_path), resume=True)
    assert resumed.resume is True and resumed.current == 0.0 and resumed.epoch_count == (-1, 0.0)
    both = sw.StepwiseTrainer(stepwise_config(tmp_path, running_sum_weight=0.25, rewind_below=0.6, rewind_after=5,
                                              rewind_max=2, rewind_to="best"))
    assert isinstance(both.running_sum, RunningSum) and both.running_sum.config is both.config and both.probed
    assert both.rewind == Rewind(0.6, 5, 2, "best") and both.keeps_examples is True
    assert sw.StepwiseTrainer(stepwise_config(tmp_path, removal_unit="step")).keeps_examples is True


def test_build_model_wraps_the_lm_only_with_the_probe(tmp_path):
    from icot.methods.running_sum import ProbedLM
    from icot.models import build_preset

    tokenizer, _, _ = encoded_products()
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    assert stepwise(tmp_path).build_model(tokenizer, lm) is lm
    probed = stepwise(tmp_path, running_sum_weight=0.5, running_sum_layer=0).build_model(tokenizer, lm)
    assert isinstance(probed, ProbedLM) and probed.lm is lm and probed.layer == 0


def test_prepare_data_by_tokens_keeps_no_examples_and_no_step_units(tmp_path, said):
    trainer = stepwise(tmp_path)
    trainer.prepare_data()
    assert trainer.units is None and trainer.train_data.examples is None and said == []
    assert trainer.longest_cot() == ("tokens", 8) and type(trainer.longest_cot()[1]) is int


@pytest.mark.parametrize("side, table", [("left", STEP_TABLE_LEFT), ("right", STEP_TABLE_RIGHT)])
def test_prepare_data_by_steps_counts_each_examples_step_tokens(tmp_path, said, side, table):
    trainer = stepwise(tmp_path, removal_unit="step", removal_side=side)
    trainer.prepare_data()
    assert trainer.units.table.tolist() == table and trainer.train_data.examples is None
    assert trainer.longest_cot() == ("steps", 2) and said == []


def test_steps_that_split_by_a_separator_are_found_in_the_cot(tmp_path, said):
    trainer = stepwise(tmp_path, removal_unit="step", steps="separator", step_separator="+")
    trainer.prepare_data()
    assert trainer.units.table.tolist() == [[0, 4, 8], [0, 3, 6], [0, 2, 2]]  # the separator ends its step


def test_steps_that_never_split_a_cot_are_refused_with_the_setting_and_a_cot(tmp_path, said):
    trainer = stepwise(tmp_path, removal_unit="step", steps="separator", step_separator=";")
    with pytest.raises(UserError) as error:
        trainer.prepare_data()
    assert str(error.value) == ("steps separator ';': no training CoT splits into more than one step (e.g. '8 4 0 + 0 "
                                "6 3 0'), so removal_unit step would remove every whole CoT at once (removal_unit "
                                "token does not); expected steps that split it (mult for multiplication, gsm8k for "
                                "<<...>> steps, or separator with a step_separator the CoTs hold)")


def test_steps_auto_that_never_split_a_cot_are_refused_naming_what_auto_chose(tmp_path, said):
    from icot.data.mult import mult_example

    trainer = stepwise(tmp_path, [mult_example(3, 4), mult_example(2, 3)], removal_unit="step")
    with pytest.raises(UserError) as error:
        trainer.prepare_data()
    assert str(error.value).startswith("steps auto (mult): no training CoT splits into more than one step (e.g. '2 1'), "
                                       "so removal_unit step would remove every whole CoT at once")


def test_prepare_data_with_the_probe_labels_the_training_tokens(tmp_path, said):
    from icot.methods.running_sum import value_table

    trainer = stepwise(tmp_path, running_sum_weight=0.5, running_sum_positions="answer")
    expected = value_table(encoded_products()[2], "answer")
    trainer.prepare_data()
    np.testing.assert_array_equal(trainer.running_sum.values, expected)
    assert trainer.train_data.examples is None


def test_uneven_steps_with_keep_position_are_warned_with_the_first_uneven_count(tmp_path, said):
    trainer = stepwise(tmp_path, removal_unit="step", keep_position=True)
    trainer.prepare_data()
    assert said == [("warn", "keep_position with removal_unit step: the first 1 steps have different token counts "
                             "across examples (2 to 3); generation places the position gap by the median, so it "
                             "matches training only on average (keep_position: false avoids this)")]
    from icot.methods.stepwise.schedule import StepUnits

    said.clear()
    trainer.units = StepUnits(np.array([[0, 2, 5, 9], [0, 2, 5, 7], [0, 2, 5, 5]]))
    trainer.warn_uneven_steps()
    assert said[0][1].startswith("keep_position with removal_unit step: the first 3 steps have different token counts "
                                 "across examples (5 to 9);")
    said.clear()
    trainer.units = StepUnits(np.array([[0, 2, 5], [0, 2, 5]]))
    trainer.warn_uneven_steps()
    trainer.units = StepUnits(np.array([[0, 2, 5], [0, 3, 5]]))
    trainer.accelerator = SimpleNamespace(is_main_process=False)
    trainer.warn_uneven_steps()
    assert said == []
    even = stepwise(tmp_path, removal_unit="step")
    even.prepare_data()
    alone = stepwise(tmp_path, three_products()[:1], removal_unit="step", keep_position=True)
    alone.prepare_data()  # one example: every step count is even
    assert said == []


@pytest.mark.parametrize("settings, message", [
    (dict(remove_start_from=8), "config: remove_start_from 8: the longest training CoT has 8 tokens, so every CoT is "
                                "gone from the first step (that is --method nocot); expected less than 8"),
    (dict(remove_start_from=2, removal_unit="step"),
     "config: remove_start_from 2: the longest training CoT has 2 steps, so every CoT is gone from the first step "
     "(that is --method nocot); expected less than 2"),
    (dict(remove_all_when_remove_beyond=8.0), "config: remove_all_when_remove_beyond 8.0: the longest training CoT "
                                              "has 8 tokens, so every CoT is gone before the count reaches it; "
                                              "expected less than 8"),
    (dict(removal_pace="adaptive", pace_late_from=9, pace_late_max_steps=60),
     "config: pace_late_from 9: the longest training CoT has 8 tokens, so every CoT is gone before the count "
     "reaches it; expected less than 8"),
])
def test_counts_from_the_longest_cot_on_are_refused(tmp_path, said, settings, message):
    with pytest.raises(UserError) as error:
        stepwise(tmp_path, **settings).prepare_data()
    assert str(error.value) == message


@pytest.mark.parametrize("settings", [dict(remove_start_from=7), dict(remove_all_when_remove_beyond=7.5),
                                      dict(removal_pace="adaptive", pace_late_from=7, pace_late_max_steps=60),
                                      dict(remove_start_from=1, removal_unit="step")])
def test_counts_below_the_longest_cot_are_accepted(tmp_path, said, settings):
    stepwise(tmp_path, **settings).prepare_data()


def test_max_len_train_reports_the_share_of_long_examples_or_refuses_the_data(tmp_path, said):
    trainer = stepwise(tmp_path, max_len_train=12)  # without CoT: 13, 11, 9
    trainer.prepare_data()
    assert events(trainer) == [{"event": "longer_than_max_len_train", "max_len_train": 12,
                                "with_cot": pytest.approx(2 / 3), "without_cot": pytest.approx(1 / 3)}]
    assert said == [("write", "max_len_train 12: 66.7% of training examples are longer with their whole CoT, 33.3% "
                              "without it; batches holding them are skipped")]
    said.clear()
    fits = stepwise(tmp_path / "fits", max_len_train=21)
    fits.prepare_data()
    assert events(fits) == [{"event": "longer_than_max_len_train", "max_len_train": 21, "with_cot": 0.0,
                             "without_cot": 0.0}] and said == []
    quiet = stepwise(tmp_path / "quiet", max_len_train=12)
    quiet.accelerator = SimpleNamespace(is_main_process=False)
    quiet.report_long_examples()
    assert said == []
    with pytest.raises(UserError) as error:
        stepwise(tmp_path, max_len_train=8).prepare_data()
    assert str(error.value) == ("max_len_train 8: every training example is longer even without its CoT (the "
                                "shortest has 9 tokens); raise max_len_train")
    stepwise(tmp_path / "edge", max_len_train=9).prepare_data()  # 9 tokens fit in 9
    at_limit = stepwise(tmp_path / "limit", max_len_train=11)  # 11 tokens fit: 21, 17 longer; 13 without CoT
    at_limit.prepare_data()
    assert events(at_limit)[0]["with_cot"] == pytest.approx(2 / 3) and events(at_limit)[0]["without_cot"] == pytest.approx(1 / 3)
    assert not (tmp_path / "none" / "run").exists()
    stepwise(tmp_path / "none").report_long_examples()
    assert not (tmp_path / "none" / "run" / "metrics.jsonl").exists()


def scheduled_trainer(tmp_path, steps_per_epoch=4, total_steps=10, **settings):
    trainer = stepwise(tmp_path, **settings)
    trainer.steps_per_epoch, trainer.total_steps = steps_per_epoch, total_steps
    return trainer


@pytest.mark.parametrize("settings, total, message", [
    (dict(pretrain_epochs=3.0), 10, "pretrain_epochs 3.0: pretraining (12 steps) lasts the whole run (10 steps, max_steps, "
                                    "epochs), so no CoT token is ever removed; expected pretrain_epochs below epochs "
                                    "(--method explicit trains with the whole CoT)"),
    (dict(pretrain_epochs=2.5), 10, "pretrain_epochs 2.5: pretraining (10 steps) lasts the whole run (10 steps, max_steps, "
                                    "epochs), so no CoT token is ever removed; expected pretrain_epochs below epochs "
                                    "(--method explicit trains with the whole CoT)"),
    (dict(remove_per_epoch=2.0), 10, "remove_per_epoch 2.0: the fixed schedule removes 4 of the longest CoT's 8 tokens "
                                     "by the run's last step (10), so best/ will hold a model still trained with CoT "
                                     "left; full removal needs max_steps 17 (or a higher remove_per_epoch)"),
    (dict(remove_per_epoch=2.0, remove_start_from=1, pretrain_epochs=0.25), 10,
     "remove_per_epoch 2.0: the fixed schedule removes 5 of the longest CoT's 8 tokens by the run's last step (10), so "
     "best/ will hold a model still trained with CoT left; full removal needs max_steps 16 (or a higher "
     "remove_per_epoch)"),
    (dict(remove_per_epoch=2.0, remove_all_when_remove_beyond=5.5), 10,
     "remove_per_epoch 2.0: the fixed schedule removes 4 of the longest CoT's 8 tokens by the run's last step (10), so "
     "best/ will hold a model still trained with CoT left; full removal needs max_steps 13 (or a higher "
     "remove_per_epoch)"),
    (dict(remove_per_epoch=4.0), 8, "remove_per_epoch 4.0: the fixed schedule removes 7 of the longest CoT's 8 tokens "
                                    "by the run's last step (8), so best/ will hold a model still trained with CoT "
                                    "left; full removal needs max_steps 9 (or a higher remove_per_epoch)"),
    (dict(removal_pace="adaptive", pace_min_steps=1, pace_max_steps=2), 10,
     "pace_max_steps 2: the adaptive pace may take until step 16 to remove the longest CoT's 8 tokens, and the run ends "
     "at step 10; if it does, best/ will hold a model still trained with CoT left (expected max_steps above 16, or a "
     "lower pace_max_steps)"),
    (dict(removal_pace="adaptive", pace_min_steps=1, pace_max_steps=2), 16,
     "pace_max_steps 2: the adaptive pace may take until step 16 to remove the longest CoT's 8 tokens, and the run ends "
     "at step 16; if it does, best/ will hold a model still trained with CoT left (expected max_steps above 16, or a "
     "lower pace_max_steps)"),
])
def test_a_run_too_short_for_the_removal_is_warned(tmp_path, said, settings, total, message):
    trainer = scheduled_trainer(tmp_path, total_steps=total, **settings)
    trainer.check_run_length()
    assert said == [("warn", message)]
    said.clear()
    trainer.accelerator = SimpleNamespace(is_main_process=False)
    trainer.check_run_length()
    assert said == []


@pytest.mark.parametrize("settings, total", [(dict(remove_per_epoch=4.0), 9), (dict(remove_per_epoch=4.0), 10),
                                             (dict(pretrain_epochs=2.25, removal_pace="adaptive"), 10),
                                             (dict(removal_pace="adaptive", pace_min_steps=1, pace_max_steps=2), 17),
                                             (dict(removal_pace="adaptive"), 10)])
def test_a_run_long_enough_for_the_removal_is_not_warned(tmp_path, said, settings, total):
    scheduled_trainer(tmp_path, total_steps=total, **settings).check_run_length()
    assert said == []


def test_the_removal_schedule_is_made_once_fixed_or_adaptive(tmp_path):
    from icot.methods.stepwise.schedule import AdaptivePace, RemovalSchedule

    fixed = scheduled_trainer(tmp_path, steps_per_epoch=6, remove_per_epoch=2.0, pretrain_epochs=0.5)
    schedule = fixed.removal_schedule()
    assert schedule == RemovalSchedule(steps_per_token=3, pretrain_steps=3) and fixed.removal_schedule() is schedule
    adaptive = scheduled_trainer(tmp_path, steps_per_epoch=6, removal_pace="adaptive", pretrain_epochs=0.5,
                                 pace_min_steps=3)
    assert adaptive.removal_schedule() == AdaptivePace(0.9, 3, pretrain_steps=3)
    assert adaptive.removal_schedule() is adaptive.schedule


def test_batch_lengths_remove_the_count_at_the_epochs_first_step(tmp_path):
    fixed = scheduled_trainer(tmp_path, remove_per_epoch=2.0)  # one token every 2 steps, 4 steps an epoch
    assert fixed.batch_lengths(0).tolist() == LENGTHS
    assert fixed.batch_lengths(1).tolist() == [19, 15, 9] and fixed.batch_lengths(3).tolist() == [15, 11, 9]
    assert fixed.batch_lengths(1).dtype == np.int64
    adaptive = scheduled_trainer(tmp_path, removal_pace="adaptive")
    adaptive.current = 3.0
    assert adaptive.batch_lengths(0).tolist() == [18, 14, 9] and adaptive.epoch_count == (0, 3.0)
    adaptive.current = 5.0
    assert adaptive.batch_lengths(0).tolist() == [18, 14, 9]  # the count at the epoch's start
    assert adaptive.batch_lengths(1).tolist() == [16, 12, 9] and adaptive.epoch_count == (1, 5.0)
    steps = scheduled_trainer(tmp_path, remove_per_epoch=2.0, remove_start_from=1, removal_unit="step")
    steps.prepare_data()
    assert steps.batch_lengths(0).tolist() == [18, 15, 9] and steps.batch_lengths(1).tolist() == [13, 11, 9]


def test_next_count_follows_the_fixed_schedule(tmp_path):
    trainer = scheduled_trainer(tmp_path, remove_per_epoch=2.0, remove_start_from=1)
    trainer.removal_schedule()
    assert [trainer.next_count(step) for step in (0, 1, 2, 5)] == [1, 1, 2, 3]


def test_next_count_of_the_adaptive_pace_rises_once_the_recent_steps_are_right_enough(tmp_path):
    trainer = scheduled_trainer(tmp_path, removal_pace="adaptive", pace_min_steps=2, pace_accuracy=0.75,
                                pretrain_epochs=0.5, remove_start_from=1)
    trainer.removal_schedule()
    trainer.step_tokens = [9.0, 9.0]
    assert trainer.next_count(1) == 1.0 and len(trainer.recent) == 0 and trainer.steps_at_count == 0  # pretraining
    trainer.current, trainer.step_tokens = 1.0, [0.0, 0.0]
    assert trainer.next_count(2) == 1.0 and len(trainer.recent) == 0  # no step trained yet
    trainer.step_tokens = [2.0, 4.0]
    assert trainer.next_count(3) == 1.0 and list(trainer.recent) == [(2.0, 4.0)] and trainer.steps_at_count == 1
    trainer.step_tokens = [3.0, 4.0]
    assert trainer.next_count(4) == 1.0 and trainer.steps_at_count == 2  # 5 of 8 right: below 0.75
    trainer.step_tokens = [4.0, 4.0]
    assert trainer.next_count(5) == 2.0  # the last two steps: 7 of 8
    assert trainer.steps_at_count == 0 and len(trainer.recent) == 0
    one = scheduled_trainer(tmp_path, removal_pace="adaptive", pace_min_steps=1, pace_accuracy=1.0)
    one.removal_schedule()
    one.step_tokens = [1.0, 1.0]
    assert one.next_count(0) == 1.0


def micro_lm(tokenizer, seed=0):
    from icot.models import build_preset

    torch.manual_seed(seed)
    return build_preset("micro", len(tokenizer), tokenizer.eos_token_id)


def training_rows(trainer, indices=(0, 1, 2), drop_cot=False):
    from icot.data.batching import collate

    batch = collate(trainer.train_data, np.array(indices), trainer.layout.pad_id, drop_cot=drop_cot)
    batch["index"] = torch.tensor(indices)
    return batch


def test_compute_loss_counts_the_right_sequences_for_the_adaptive_pace(tmp_path):
    from icot.evaluate import token_scores

    trainer = stepwise(tmp_path, removal_pace="adaptive")
    lm = micro_lm(trainer.tokenizer)
    batch = training_rows(trainer)
    batch["position_ids"] = batch["position_ids"] + 1  # its own positions: the ones passed are the ones used
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits
    labels = batch["labels"]
    wanted = labels[1, 1:] != -100
    labels[1, 1:][wanted] = logits[1, :-1].argmax(-1)[wanted]  # row 1 predicted entirely right
    calls = []
    lm.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("use_cache", "absent")),
                                 with_kwargs=True)
    trainer.step_tokens = [1.0, 2.0]
    loss = trainer.compute_loss(lm, batch)
    assert trainer.step_tokens == [2.0, 5.0] and calls == [False]
    expected = token_scores(logits, labels)
    assert loss.loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (expected[1].item(), expected[2].item())
    fixed = stepwise(tmp_path)
    fixed.step_tokens = [1.0, 2.0]
    assert fixed.compute_loss(lm, batch).loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert fixed.step_tokens == [1.0, 2.0]


def test_compute_loss_with_the_probe_adds_the_weighted_probe_loss(tmp_path):
    from conftest import probed_loss_and_recompute

    trainer = stepwise(tmp_path, running_sum_weight=0.5, running_sum_positions="answer")
    lm = micro_lm(trainer.tokenizer)
    model = trainer.build_model(trainer.tokenizer, lm)
    trainer.prepare_data()
    batch = training_rows(trainer)
    batch["values"] = trainer.running_sum.batch_values(trainer.train_data, batch)
    loss, calls, (loss_sum, correct, count), predicted = probed_loss_and_recompute(trainer, model, lm, batch)
    assert calls == [False]  # training passes build no KV cache
    labelled = ~torch.isnan(batch["values"])
    mse = ((predicted[labelled] - batch["values"][labelled]) ** 2).mean().item()
    assert loss.loss_sum.item() == pytest.approx(loss_sum.item() + 0.5 * count.item() * mse, rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (correct.item(), count.item())
    assert trainer.step_tokens == [0.0, 0.0]


def with_optimizer(trainer):
    """A one-layer model and its AdamW with a step taken: state to reset, weights to rewind."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    trainer.model_wrapped = trainer.model = model
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    trainer.optimizer.step()
    return model


def test_a_step_where_the_count_rises_resets_the_optimizer_unless_every_cot_was_gone(tmp_path):
    trainer = scheduled_trainer(tmp_path, remove_per_epoch=4.0)  # one token a step
    with_optimizer(trainer)
    trainer.on_step_begin()
    assert trainer.current == 0.0 and trainer.begun_step == 0 and trainer.step_all_removed is True
    assert trainer.schedule is not None and events(trainer) == []
    trainer.progress.step, trainer.step_all_removed, trainer.step_tokens = 1, False, [3.0, 4.0]
    trainer.on_step_begin()
    assert trainer.current == 1.0 and trainer.step_tokens == [0.0, 0.0] and trainer.step_all_removed is True
    assert trainer.resets == 1 and trainer.last_reset_step == 1 and len(trainer.optimizer.state) == 0
    assert events(trainer) == [{"event": "removal", "step": 1, "removed": 1.0, "optimizer_reset": True}]
    with_optimizer(trainer)
    trainer.step_all_removed = False
    trainer.on_step_begin()  # again at step 1 (a batch skipped by max_len_train): nothing new
    assert trainer.step_all_removed is False and len(events(trainer)) == 1 and len(trainer.optimizer.state) == 2
    trainer.progress.step, trainer.step_all_removed = 2, True  # step 1 removed every CoT
    trainer.on_step_begin()
    assert trainer.resets == 1 and trainer.last_reset_step == 1 and len(trainer.optimizer.state) == 2
    assert events(trainer)[-1] == {"event": "removal", "step": 2, "removed": 2.0, "optimizer_reset": False}
    trainer.progress.step, trainer.step_all_removed = 3, False
    trainer.on_step_begin()
    assert trainer.resets == 2 and trainer.last_reset_step == 3 and len(trainer.optimizer.state) == 0


def test_a_step_where_the_count_stays_logs_nothing_and_keeps_the_optimizer(tmp_path):
    trainer = scheduled_trainer(tmp_path, remove_per_epoch=2.0)  # one token every 2 steps
    with_optimizer(trainer)
    trainer.on_step_begin()
    trainer.progress.step, trainer.step_all_removed = 1, False
    trainer.on_step_begin()
    assert trainer.current == 0.0 and trainer.resets == 0 and len(trainer.optimizer.state) == 2 and events(trainer) == []


def test_no_optimizer_reset_without_reset_optimizer_and_none_at_the_first_step(tmp_path):
    trainer = scheduled_trainer(tmp_path, remove_per_epoch=4.0, reset_optimizer=False)
    with_optimizer(trainer)
    trainer.progress.step = 3
    trainer.on_step_begin()
    assert trainer.current == 3.0 and trainer.resets == 0 and len(trainer.optimizer.state) == 2
    assert events(trainer) == [{"event": "removal", "step": 3, "removed": 3.0, "optimizer_reset": False}]
    first = scheduled_trainer(tmp_path / "first", remove_per_epoch=4.0, remove_start_from=2)
    first.current = 0.0
    first.on_step_begin()
    assert first.current == 2.0 and events(first) == []


def test_a_rewind_to_start_takes_its_point_at_the_first_step(tmp_path):
    trainer = scheduled_trainer(tmp_path, removal_pace="adaptive", rewind_below=0.5, rewind_to="start", eval_every=5)
    model = with_optimizer(trainer)
    trainer.on_step_begin()
    point = trainer.rewind.point
    assert point["step"] == 0 and point["schedule_step"] == 0 and point["removed"] == 0.0
    assert torch.equal(point["model"]["weight"], model.weight.detach()) and point["optimizer"]["state"]
    last = scheduled_trainer(tmp_path, removal_pace="adaptive", rewind_below=0.5, eval_every=5)
    with_optimizer(last)
    last.on_step_begin()
    assert last.rewind.point is None


def test_lr_factor_warms_up_again_after_each_reset(tmp_path):
    trainer = scheduled_trainer(tmp_path, warmup_after_reset=4)
    assert [trainer.lr_factor(step) for step in (0, 11)] == [1.0, 1.0]  # no reset yet
    trainer.last_reset_step = 10
    assert [trainer.lr_factor(step) for step in (10, 11, 13, 20)] == [0.25, 0.5, 1.0, 1.0]
    assert trainer.steps_undone() == 0
    plain = scheduled_trainer(tmp_path)
    plain.last_reset_step = 10
    assert plain.lr_factor(10) == 1.0
    slow = scheduled_trainer(tmp_path, warmup_after_reset=4, warmup_steps=20)
    slow.last_reset_step = 10
    assert slow.lr_factor(11) == pytest.approx(0.5) and slow.lr_factor(15) == pytest.approx(0.8)
    rewound = scheduled_trainer(tmp_path, removal_pace="adaptive", rewind_below=0.5, eval_every=5)
    rewound.rewind.steps_undone = 3
    assert rewound.steps_undone() == 3


def drawn_offsets(trainer, rows=3):
    from icot.methods.stepwise.schedule import offset_distribution

    rng = torch.Generator().manual_seed(trainer.config.seed)
    return torch.multinomial(offset_distribution(trainer.config.removal_smoothing_lambda), rows, replacement=True,
                             generator=rng)


def same_batch(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], equal_nan=True, msg=key)


def test_a_training_batch_removes_the_count_plus_drawn_offsets(tmp_path):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path, removal_smoothing_lambda=0.3, removal_side="right", keep_position=True,
                                gap_placement="in_place")
    trainer.removal_schedule()
    trainer.current, trainer.step_all_removed = 1.0, True
    offsets = drawn_offsets(trainer)
    assert offsets.tolist() == [0, 0, 2]  # the seed's draw
    batch = training_rows(trainer)
    expected = remove_cot(training_rows(trainer), offsets + 1, "right", True, trainer.layout.pad_id, "in_place")
    same_batch(trainer.training_batch(batch), expected)
    assert trainer.step_all_removed is False  # rows 0 and 1 keep CoT tokens


@pytest.mark.parametrize("placement, other", [("in_place", "authors"), ("authors", "in_place")])
def test_a_training_batch_places_the_position_gap_as_configured(tmp_path, placement, other):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path, removal_smoothing_lambda=math.inf, keep_position=True,
                                gap_placement=placement)
    trainer.removal_schedule()
    trainer.current = 3.0
    n = torch.tensor([3, 3, 3])
    expected = remove_cot(training_rows(trainer), n, "left", True, trainer.layout.pad_id, placement)
    assert not torch.equal(expected["position_ids"],
                           remove_cot(training_rows(trainer), n, "left", True, trainer.layout.pad_id, other)["position_ids"])
    same_batch(trainer.training_batch(training_rows(trainer)), expected)


def test_a_step_has_every_cot_removed_only_if_each_of_its_micro_batches_has(tmp_path):
    trainer = scheduled_trainer(tmp_path, removal_smoothing_lambda=math.inf)
    trainer.removal_schedule()
    trainer.current, trainer.step_all_removed = 2.0, True
    trainer.training_batch(training_rows(trainer, (0,)))  # 6 of 8 CoT tokens left
    trainer.training_batch(training_rows(trainer, (2,)))  # its 2 CoT tokens removed
    assert trainer.step_all_removed is False


def test_a_training_batch_in_pretraining_removes_the_start_count_without_offsets(tmp_path):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path, pretrain_epochs=1.0, remove_start_from=2, removal_smoothing_lambda=0.0)
    trainer.removal_schedule()
    trainer.current, trainer.step_all_removed = 5.0, True
    expected = remove_cot(training_rows(trainer), torch.tensor([2, 2, 2]), "left", False, trainer.layout.pad_id)
    same_batch(trainer.training_batch(training_rows(trainer)), expected)
    assert trainer.step_all_removed is False  # rows 0 and 1 keep CoT tokens
    nothing = scheduled_trainer(tmp_path, pretrain_epochs=1.0)
    nothing.removal_schedule()
    batch = training_rows(nothing)
    assert nothing.training_batch(batch) is batch and nothing.step_all_removed is False


def test_a_training_batch_with_every_cot_removed_keeps_step_all_removed(tmp_path):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path)
    trainer.removal_schedule()
    trainer.current, trainer.step_all_removed = math.inf, True
    expected = remove_cot(training_rows(trainer), torch.tensor(N_COT), "left", False, trainer.layout.pad_id)
    same_batch(trainer.training_batch(training_rows(trainer)), expected)
    assert trainer.step_all_removed is True


def test_a_training_batch_by_steps_removes_each_rows_step_tokens(tmp_path):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path, removal_unit="step", removal_smoothing_lambda=math.inf)
    trainer.prepare_data()
    trainer.removal_schedule()
    trainer.current, trainer.step_all_removed = 1.0, True
    batch = training_rows(trainer, (2, 0))
    expected = remove_cot(training_rows(trainer, (2, 0)), torch.tensor([2, 3]), "left", False, trainer.layout.pad_id)
    same_batch(trainer.training_batch(batch), expected)
    assert trainer.step_all_removed is False


def test_a_training_batch_with_the_probe_moves_the_values_with_their_tokens(tmp_path):
    from icot.data.batching import remove_cot

    trainer = scheduled_trainer(tmp_path, running_sum_weight=0.5, removal_smoothing_lambda=math.inf)
    trainer.prepare_data()
    trainer.removal_schedule()
    trainer.current = 2.0
    expected = training_rows(trainer)
    expected["values"] = trainer.running_sum.batch_values(trainer.train_data, expected)
    expected = remove_cot(expected, torch.tensor([2, 2, 2]), "left", False, trainer.layout.pad_id)
    same_batch(trainer.training_batch(training_rows(trainer)), expected)


def test_a_training_batch_longer_than_max_len_train_is_skipped(tmp_path, said):
    trainer = scheduled_trainer(tmp_path, max_len_train=19, removal_smoothing_lambda=math.inf)
    trainer.removal_schedule()
    trainer.current, trainer.progress.step = 1.0, 6
    assert trainer.training_batch(training_rows(trainer)) is None  # 21 - 1 = 20 tokens
    assert events(trainer) == [{"event": "skipped_long_batch", "step": 6, "length": 20}]
    trainer.current = 2.0
    assert trainer.training_batch(training_rows(trainer))["input_ids"].shape[1] == 19
    assert len(events(trainer)) == 1


def test_the_final_form_is_a_count_that_removes_the_longest_cot(tmp_path):
    trainer = stepwise(tmp_path)
    trainer.prepare_data()
    trainer.current = 7.0
    assert not trainer.in_final_form()
    trainer.current = 8.0
    assert trainer.in_final_form()


def rewinding(tmp_path, **settings):
    trainer = scheduled_trainer(tmp_path, removal_pace="adaptive", rewind_below=0.5, rewind_after=2, rewind_max=2,
                                eval_every=5, **settings)
    trainer.removal_schedule()
    return trainer, with_optimizer(trainer)


def test_a_validation_at_or_above_the_floor_becomes_the_rewind_point(tmp_path, said):
    trainer, model = rewinding(tmp_path)
    trainer.progress.step, trainer.current, trainer.steps_at_count = 7, 3.0, 2
    trainer.recent.extend([(1.0, 2.0)])
    trainer.step_tokens, trainer.step_all_removed = [1.0, 4.0], True
    trainer.rewind.steps_undone = 2
    trainer.after_validation(0.5)
    point = trainer.rewind.point
    assert {k: v for k, v in point.items() if k not in ("model", "optimizer")} == {
        "step": 7, "schedule_step": 5, "removed": 3.0, "steps_at_count": 2, "recent": [(1.0, 2.0)],
        "step_tokens": [1.0, 4.0], "all_removed": True}
    assert point["model"].keys() == model.state_dict().keys()
    assert torch.equal(point["model"]["weight"], model.weight.detach())
    assert point["model"]["weight"].data_ptr() != model.weight.data_ptr()  # a copy
    assert point["optimizer"]["state"][0]["exp_avg"].tolist() == trainer.optimizer.state_dict()["state"][0]["exp_avg"].tolist()
    trainer.progress.step = 8
    trainer.after_validation(0.49)
    assert trainer.rewind.point["step"] == 7 and trainer.rewind.below == 1 and said == []


def test_patience_checks_below_the_floor_go_back_to_the_point(tmp_path, said):
    trainer, model = rewinding(tmp_path)
    trainer.progress.step, trainer.current, trainer.steps_at_count = 4, 2.0, 1
    trainer.recent.extend([(1.0, 2.0), (2.0, 2.0)])
    trainer.step_tokens, trainer.step_all_removed = [1.0, 2.0], True
    trainer.rewind.steps_undone = 1  # an earlier rewind: the point's schedule is at step 3
    trainer.after_validation(0.9)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    trainer.optimizer.state.clear()
    trainer.progress.step, trainer.current, trainer.steps_at_count = 9, 4.0, 6
    trainer.recent.clear()
    trainer.step_tokens, trainer.step_all_removed = [0.0, 0.0], False
    trainer.after_validation(0.1)
    assert trainer.rewind.rewinds == 0 and trainer.rewind.below == 1 and torch.equal(model.weight.detach(), saved + 1)
    trainer.progress.step = 12
    trainer.after_validation(0.2)
    assert torch.equal(model.weight.detach(), saved) and len(trainer.optimizer.state) == 2
    assert trainer.current == 2.0 and trainer.steps_at_count == 1 and list(trainer.recent) == [(1.0, 2.0), (2.0, 2.0)]
    assert trainer.step_tokens == [1.0, 2.0] and trainer.step_all_removed is True
    assert trainer.rewind.rewinds == 1 and trainer.rewind.below == 0 and trainer.rewind.steps_undone == 9
    assert events(trainer) == [{"event": "rewind", "step": 12, "to_step": 4, "removed": 2.0, "rewinds": 1}]
    assert said == [("write", "step 12: validation below 0.5 for 2 checks; back to step 4's weights and removal count "
                              "(rewind 1 of 2)")]
    said.clear()
    del trainer.rewind.point["schedule_step"]  # a point taken before an earlier rewind
    trainer.progress.step = 20
    trainer.accelerator = SimpleNamespace(is_main_process=False, unwrap_model=lambda m, keep_torch_compile: m)
    trainer.go_back()
    assert trainer.rewind.steps_undone == 16 and trainer.rewind.rewinds == 2 and said == []


def test_no_rewind_watch_during_pretraining_without_rewind_below_or_before_the_cot_is_gone(tmp_path):
    none = scheduled_trainer(tmp_path, removal_pace="adaptive")
    none.after_validation(0.9)  # no rewind: nothing to do
    early, _ = rewinding(tmp_path, pretrain_epochs=1.0)
    early.progress.step = 3
    early.after_validation(0.9)
    assert early.rewind.point is None and early.rewind.below == 0
    early.progress.step = 4
    early.after_validation(0.1)
    assert early.rewind.below == 1
    start, _ = rewinding(tmp_path, rewind_to="start")
    start.rewind.point = {"step": 0}
    start.step_all_removed = False
    start.after_validation(0.1)
    assert start.rewind.below == 0
    start.step_all_removed = True
    start.after_validation(0.1)
    assert start.rewind.below == 1 and start.rewind.point == {"step": 0}


def test_removed_tokens_and_state_in_tokens_and_in_steps(tmp_path):
    tokens = stepwise(tmp_path)
    tokens.current = 3.0
    assert tokens.removed_tokens() == 3.0 and tokens.removed_state() == {"removed": 3.0}
    steps = stepwise(tmp_path, removal_unit="step")
    steps.prepare_data()
    steps.current = 1.0
    assert steps.removed_tokens() == 2.0 and type(steps.removed_tokens()) is float  # the median of 3, 2, 2
    assert steps.removed_state() == {"removed": 2.0, "removed_steps": 1.0}
    steps.current = 2.0
    assert steps.removed_tokens() == math.inf and steps.removed_state() == {"removed": math.inf, "removed_steps": 2.0}
    steps.current = 1.5
    assert steps.removed_tokens() == 2.0


def test_method_state_of_the_fixed_and_adaptive_paces(tmp_path):
    fixed = scheduled_trainer(tmp_path, steps_per_epoch=6, remove_per_epoch=2.0)
    fixed.current, fixed.resets = 2.0, 3
    assert fixed.method_state() == {"removed": 2.0, "optimizer_resets": 3, "steps_per_token": 3}
    fixed.removal_schedule()
    fixed.steps_per_epoch = 60
    assert fixed.method_state()["steps_per_token"] == 3  # the schedule made
    unset = scheduled_trainer(tmp_path, steps_per_epoch=0, remove_per_epoch=0.5)
    assert unset.method_state()["steps_per_token"] == 2  # before the run's length is known: 1 step an epoch
    adaptive, _ = rewinding(tmp_path)
    adaptive.current, adaptive.steps_at_count, adaptive.rewind.rewinds = 4.0, 5, 1
    assert adaptive.method_state() == {"removed": 4.0, "optimizer_resets": 0, "rewinds": 1, "steps_at_count": 5}


def test_checkpoint_state_round_trips_the_pace_and_the_rewind(tmp_path):
    trainer, _ = rewinding(tmp_path)
    trainer.current, trainer.steps_at_count, trainer.resets, trainer.last_reset_step = 4.0, 5, 2, 30
    trainer.recent.extend([(1.0, 2.0), (2.0, 2.0)])
    trainer.step_tokens, trainer.step_all_removed, trainer.epoch_count = [1.0, 3.0], True, (3, 2.0)
    trainer.rewind.below, trainer.rewind.rewinds, trainer.rewind.steps_undone, trainer.rewind.best = 1, 1, 6, 0.75
    trainer.rewind.point = {"step": 20}
    state = trainer.method_state_for_checkpoint()
    assert state == {"removed": 4.0, "optimizer_resets": 2, "rewinds": 1, "steps_at_count": 5,
                     "recent": [(1.0, 2.0), (2.0, 2.0)], "step_tokens": [1.0, 3.0], "all_removed": True,
                     "last_reset_step": 30, "epoch_count": [3, 2.0],
                     "rewind": {"below": 1, "rewinds": 1, "steps_undone": 6, "best": 0.75, "point": {"step": 20}}}
    state = json.loads(json.dumps(state))  # as a checkpoint keeps it: tuples become lists
    fresh, _ = rewinding(tmp_path)
    fresh.recent.append((9.0, 9.0))
    fresh.load_method_state(state)
    assert fresh.current == 4.0 and type(fresh.current) is float and fresh.steps_at_count == 5
    assert list(fresh.recent) == [(1.0, 2.0), (2.0, 2.0)] and fresh.step_tokens == [1.0, 3.0]
    assert fresh.step_all_removed is True and fresh.resets == 2 and fresh.last_reset_step == 30
    assert fresh.epoch_count == (3, 2.0)
    assert (fresh.rewind.below, fresh.rewind.rewinds, fresh.rewind.steps_undone, fresh.rewind.best) == (1, 1, 6, 0.75)
    assert fresh.rewind.point == {"step": 20} and (fresh.rewind.floor, fresh.rewind.patience) == (0.5, 2)
    old = {k: v for k, v in state.items() if k not in ("all_removed", "rewind")}
    fresh.load_method_state(old)  # a checkpoint from before these were kept
    assert fresh.step_all_removed is False and fresh.rewind.point == {"step": 20}
    plain = scheduled_trainer(tmp_path, removal_unit="step")
    assert plain.rewind_state() is None and plain.method_state_for_checkpoint()["rewind"] is None
    plain.prepare_data()
    plain.load_pace_state({"removed": 7.0, "removed_steps": 1.0, "steps_at_count": 0, "recent": [], "step_tokens": [0, 0]})
    assert plain.current == 1.0
    plain.load_method_state({**old, "removed_steps": 1.0, "rewind": {"below": 5}})  # without rewind_below: nothing to restore
    assert plain.rewind is None


@pytest.mark.parametrize("settings, current, gap", [
    (dict(), 4.0, (0, 0)),
    (dict(keep_position=True), 4.0, (4, 0)),
    (dict(keep_position=True, gap_placement="in_place"), 4.0, (4, 1)),
    (dict(keep_position=True, removal_side="right"), 4.0, (4, 2)),  # the median CoT: 6 tokens
    (dict(keep_position=True, removal_side="right", gap_placement="in_place"), 4.0, (4, 3)),
    (dict(keep_position=True, removal_side="right"), 9.0, (6, 0)),
    (dict(keep_position=True), 2.5, (2, 0)),
])
def test_the_position_gap_is_the_removed_count_up_to_the_median_cot(tmp_path, settings, current, gap):
    trainer = stepwise(tmp_path, **settings)
    trainer.current = current
    assert trainer.position_gap() == gap and all(type(g) is int for g in trainer.position_gap())


def test_the_predictor_and_metadata_carry_the_removal(tmp_path):
    from icot.methods.running_sum import ProbedLM

    trainer = stepwise(tmp_path, keep_position=True, removal_side="right", gap_placement="in_place")
    trainer.current = 4.0
    lm = micro_lm(trainer.tokenizer)
    predictor = trainer.predictor(lm)
    assert predictor.model is lm and predictor.tokenizer is trainer.tokenizer and predictor.cot_removed == 4.0
    assert (predictor.removal_side, predictor.keep_position, predictor.position_gap, predictor.position_gap_from,
            predictor.gap_placement) == ("right", True, 4, 3, "in_place")
    assert trainer.predictor(ProbedLM(lm, -1)).model is lm
    assert trainer.metadata() == {"cot_removed": 4, "removal_side": "right", "keep_position": True, "position_gap": 4,
                                  "position_gap_from": 3, "gap_placement": "in_place"}
    rewound, _ = rewinding(tmp_path)
    rewound.rewind.rewinds = 2
    rewound.current = 8.0
    assert rewound.metadata() == {"cot_removed": "all", "removal_side": "left", "keep_position": False,
                                  "position_gap": 0, "position_gap_from": 0, "gap_placement": "authors", "rewinds": 2}


def test_the_removed_label_is_all_from_the_longest_cot_on(tmp_path):
    trainer = stepwise(tmp_path)
    trainer.current = 7.0
    assert trainer.removed_label() == 7 and type(trainer.removed_label()) is int and trainer.postfix() == {"removed": 7}
    trainer.current = 8.0
    assert trainer.removed_label() == "all" and trainer.postfix() == {"removed": "all"}
    trainer.current = 0.0
    assert trainer.removed_label() == 0
    trainer.train_data.n_cot = np.zeros(0, dtype=np.int64)
    assert trainer.removed_label() == "all"


# ----- stepwise/config.py ----------------------------------------------------------------------------

ADAPTIVE = dict(removal_pace="adaptive")
REWIND = dict(removal_pace="adaptive", rewind_below=0.5, eval_every=10)


@pytest.mark.parametrize("settings, message", [
    (dict(removal_unit="step", steps="separator"),
     "config: steps 'separator' needs step_separator (the string between two steps)"),
    (dict(steps="mult"), "config: steps and step_separator are read only with removal_unit: step"),
    (dict(step_separator=";"), "config: steps and step_separator are read only with removal_unit: step"),
    (dict(remove_per_epoch=0.0), "config: remove_per_epoch must be positive, got 0.0"),
    (dict(remove_per_epoch=-2.0), "config: remove_per_epoch must be positive, got -2.0"),
    (dict(remove_per_epoch=math.nan), "config: remove_per_epoch must be positive, got nan"),
    (dict(removal_smoothing_lambda=-0.5),
     "config: removal_smoothing_lambda must be >= 0 (inf disables smoothing), got -0.5"),
    (dict(remove_all_when_remove_beyond=-1.0), "config: remove_all_when_remove_beyond, remove_start_from and "
                                               "pretrain_epochs must not be negative"),
    (dict(remove_start_from=-1), "config: remove_all_when_remove_beyond, remove_start_from and pretrain_epochs must "
                                 "not be negative"),
    (dict(pretrain_epochs=-0.5), "config: remove_all_when_remove_beyond, remove_start_from and pretrain_epochs must "
                                 "not be negative"),
    (dict(warmup_after_reset=-1), "config: warmup_after_reset must not be negative, got -1"),
    (dict(ADAPTIVE, pace_accuracy=0.0), "config: pace_accuracy must be in (0, 1], got 0.0"),
    (dict(ADAPTIVE, pace_accuracy=1.01), "config: pace_accuracy must be in (0, 1], got 1.01"),
    (dict(ADAPTIVE, pace_min_steps=0), "config: pace_min_steps must be at least 1 and pace_max_steps (if set) at least "
                                       "pace_min_steps"),
    (dict(ADAPTIVE, pace_min_steps=5, pace_max_steps=4),
     "config: pace_min_steps must be at least 1 and pace_max_steps (if set) at least pace_min_steps"),
    (dict(ADAPTIVE, pace_late_from=3), "config: pace_late_from and pace_late_max_steps go together (set both or neither)"),
    (dict(ADAPTIVE, pace_late_max_steps=60),
     "config: pace_late_from and pace_late_max_steps go together (set both or neither)"),
    (dict(pace_late_from=3, pace_late_max_steps=60),
     "config: pace_late_from and pace_late_max_steps need removal_pace: adaptive"),
    (dict(ADAPTIVE, pace_late_from=-1, pace_late_max_steps=60),
     "config: pace_late_from must not be negative and pace_late_max_steps must be at least pace_min_steps"),
    (dict(ADAPTIVE, pace_late_from=3, pace_late_max_steps=49),
     "config: pace_late_from must not be negative and pace_late_max_steps must be at least pace_min_steps"),
    (dict(ADAPTIVE, pace_late_until=5), "config: pace_late_until needs pace_late_from and must be greater than it"),
    (dict(ADAPTIVE, pace_late_from=3, pace_late_max_steps=60, pace_late_until=3),
     "config: pace_late_until needs pace_late_from and must be greater than it"),
    (dict(REWIND, rewind_below=0.0), "config: rewind_below must be in (0, 1], got 0.0"),
    (dict(REWIND, rewind_below=1.5), "config: rewind_below must be in (0, 1], got 1.5"),
    (dict(REWIND, rewind_after=0), "config: rewind_after and rewind_max must be at least 1"),
    (dict(REWIND, rewind_max=0), "config: rewind_after and rewind_max must be at least 1"),
    (dict(rewind_below=0.5, eval_every=10),
     "config: rewind_below needs removal_pace: adaptive (a fixed schedule counts steps, so a rewound count would jump "
     "back) and eval_every (it watches validation)"),
    (dict(REWIND, eval_every=None),
     "config: rewind_below needs removal_pace: adaptive (a fixed schedule counts steps, so a rewound count would jump "
     "back) and eval_every (it watches validation)"),
    (dict(REWIND, valid_file=None), "config: rewind_below watches validation accuracy: give a validation file "
                                    "(valid_file, or valid.txt in the data directory)"),
    (dict(gap_placement="in_place"), "config: gap_placement in_place is read only with keep_position: true; drop it or "
                                     "set that"),
    (dict(pace_accuracy=0.8), "config: pace_accuracy 0.8 is read only with removal_pace: adaptive; drop it or set that"),
    (dict(pace_min_steps=5), "config: pace_min_steps 5 is read only with removal_pace: adaptive; drop it or set that"),
    (dict(pace_max_steps=60), "config: pace_max_steps 60 is read only with removal_pace: adaptive; drop it or set that"),
    (dict(ADAPTIVE, remove_per_epoch=4.0), "config: remove_per_epoch 4.0 is read only with removal_pace: fixed "
                                           "(adaptive removes by accuracy); drop it or set that"),
    (dict(reset_optimizer=False, warmup_after_reset=5),
     "config: warmup_after_reset 5 is read only with reset_optimizer: true; drop it or set that"),
    (dict(rewind_after=4), "config: rewind_after 4 is read only with rewind_below; drop it or set that"),
    (dict(rewind_max=4), "config: rewind_max 4 is read only with rewind_below; drop it or set that"),
    (dict(rewind_to="best"), "config: rewind_to best is read only with rewind_below; drop it or set that"),
])
def test_stepwise_settings_are_checked_with_one_line_errors(tmp_path, settings, message):
    with pytest.raises(UserError) as error:
        stepwise_config(tmp_path, **settings).validate()
    assert str(error.value) == message


def test_rewind_below_with_fsdp_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError) as error:
        stepwise_config(tmp_path, **REWIND, fsdp=True).validate()
    assert str(error.value) == ("config: rewind_below with fsdp: a rewind point is a whole copy of the weights kept in "
                                "checkpoints, which sharded training does not keep; expected rewind_below null")


@pytest.mark.parametrize("settings", [
    dict(), dict(removal_unit="step"), dict(removal_unit="step", steps="separator", step_separator=";"),
    dict(removal_unit="step", steps="gsm8k"), dict(remove_per_epoch=0.01), dict(removal_smoothing_lambda=0.0),
    dict(removal_smoothing_lambda=math.inf), dict(remove_all_when_remove_beyond=0.0, remove_start_from=0,
                                                   pretrain_epochs=0.0), dict(warmup_after_reset=0),
    dict(reset_optimizer=False), dict(warmup_after_reset=3),
    dict(ADAPTIVE, pace_accuracy=1.0), dict(ADAPTIVE, pace_accuracy=0.01), dict(ADAPTIVE, pace_min_steps=1),
    dict(ADAPTIVE, pace_min_steps=5, pace_max_steps=5),
    dict(ADAPTIVE, pace_late_from=0, pace_late_max_steps=50),
    dict(ADAPTIVE, pace_late_from=3, pace_late_max_steps=60, pace_late_until=4),
    dict(REWIND), dict(REWIND, rewind_below=1.0, rewind_after=1, rewind_max=1, rewind_to="start"),
    dict(keep_position=True, gap_placement="in_place"),
])
def test_stepwise_settings_that_are_accepted(tmp_path, settings):
    stepwise_config(tmp_path, **settings).validate()


# ----- kd/states.py ----------------------------------------------------------------------------------

def test_parse_delta_takes_dynamic_or_a_positive_integer():
    from icot.methods.kd.states import parse_delta

    assert parse_delta("dynamic") == "dynamic" and parse_delta("3") == 3 and parse_delta("1") == 1
    assert type(parse_delta("12")) is int
    for bad in ("0", "-1", "x", "Dynamic", "1.5", ""):
        with pytest.raises(ValueError) as error:
            parse_delta(bad)
        assert error.value.args == (bad,)


def test_teacher_positions_by_hand():
    from icot.methods.kd.states import teacher_positions

    first, second = torch.tensor([2, 4]), torch.tensor([9, 6])
    # dynamic: 2 + l * 7/4 = 2, 3.75, 5.5, 7.25, 9 and 4 + l / 2 = 4, 4.5, 5, 5.5, 6 (ties to even)
    dynamic = teacher_positions(first, second, 5, "dynamic", "diagonal")
    assert dynamic.tolist() == [[2, 4, 6, 7, 9], [4, 4, 5, 6, 6]] and dynamic.dtype == torch.int64
    assert teacher_positions(first, second, 5, 3, "diagonal").tolist() == [[2, 5, 8, 9, 9], [4, 6, 6, 6, 6]]
    assert teacher_positions(first, second, 5, "2", "top_row").tolist() == [[2, 4, 6, 8, 9], [4, 6, 6, 6, 6]]
    assert teacher_positions(first, second, 1, "dynamic", "diagonal").tolist() == [[2], [4]]
    assert teacher_positions(first, second, 2, "dynamic", "diagonal").tolist() == [[2, 9], [4, 6]]
    on_meta = teacher_positions(first.to("meta"), second.to("meta"), 3, "dynamic", "diagonal")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3)
    assert teacher_positions(first, second, 3, "dynamic", "first_column").tolist() == [[2, 2, 2], [4, 4, 4]]
    assert teacher_positions(first, second, 3, 1, "last_column").tolist() == [[9, 9, 9], [6, 6, 6]]
    # 10 + l * 13/3 = 10, 14.33, 18.67, 23: exact at the last layer
    assert teacher_positions(torch.tensor([10]), torch.tensor([23]), 4, "dynamic", "bottom_row").tolist() == [[10, 14, 19, 23]]
    far = teacher_positions(torch.tensor([2**40]), torch.tensor([2**40 + 3]), 4, "dynamic", "diagonal")
    assert far.tolist() == [[2**40, 2**40 + 1, 2**40 + 2, 2**40 + 3]]  # float64: exact past float32's 24 bits


def collated_kd_rows():
    """`input SEP cot SEP ...` rows: first SEP at 3 and 2, CoT of 4 and 2 tokens; token ids 100 + column."""
    ids = 100 + torch.arange(12).repeat(2, 1)
    return {"input_ids": ids, "first_sep": torch.tensor([3, 2]), "cot_len": torch.tensor([4, 2])}


def test_the_positions_and_tokens_of_a_batch_are_read_between_its_two_seps():
    from icot.methods.kd.states import batch_second_sep, batch_teacher_positions, teacher_cot_tokens

    batch = collated_kd_rows()
    assert batch_second_sep(batch).tolist() == [8, 5]
    assert batch_teacher_positions(batch, 3, "dynamic", "diagonal").tolist() == [[3, 6, 8], [2, 4, 5]]  # 5.5 -> 6
    assert batch_teacher_positions(batch, 3, 2, "last_column").tolist() == [[8, 8, 8], [5, 5, 5]]
    assert teacher_cot_tokens(batch, 3, 2, "diagonal").tolist() == [[103, 105, 107], [102, 104, 105]]
    assert teacher_cot_tokens(batch, 2, "dynamic", "first_column").tolist() == [[103, 103], [102, 102]]


def test_positions_inside_cot_count_distinct_positions_strictly_between_the_seps():
    from icot.methods.kd.states import positions_inside_cot

    assert positions_inside_cot(6, 4, "dynamic", "diagonal") == 2  # 0, 2.33, 4.67, 7: 2 and 5
    assert positions_inside_cot(8, 5, "dynamic", "diagonal") == 3  # 0, 2.25, 4.5, 6.75, 9: 2, 4 and 7
    assert positions_inside_cot(2, 4, 1, "diagonal") == 2  # 0, 1, 2, 3: 1 and 2
    assert positions_inside_cot(2, 4, "dynamic", "diagonal") == 2  # the same, spread to the second SEP at 3
    assert positions_inside_cot(9, 6, 1, "diagonal") == 5
    assert positions_inside_cot(1, 5, 1, "diagonal") == 1  # 0, 1, 2, 2, 2: the CoT's one token
    assert positions_inside_cot(6, 4, "dynamic", "last_column") == 0


def test_few_thoughts_are_warned_with_the_median_cot_and_advice():
    from icot.methods.kd.states import few_thoughts_warning

    assert few_thoughts_warning([9, 2, 6], 4, "dynamic", "diagonal") == (
        "ICoT-KD: only 2 of the 4 teacher states fall inside the CoT (median 6 tokens, delta dynamic); the others sit on "
        "the separators, which carry nothing of the reasoning to distil. Use an integer delta that keeps them inside "
        "(delta: 2) or more layers")
    assert few_thoughts_warning([12, 2, 9, 6], 4, 5, "diagonal") == (  # the upper median, 9: 0, 5, 10, 10 inside
        "ICoT-KD: only 1 of the 4 teacher states fall inside the CoT (median 9 tokens, delta 5); the others sit on "
        "the separators, which carry nothing of the reasoning to distil. Use an integer delta that keeps them inside "
        "(delta: 3) or more layers")
    assert few_thoughts_warning([8], 5, "dynamic", "diagonal") is None  # 3 inside
    assert few_thoughts_warning([8, 1, 1], 5, "dynamic", "top_row").startswith("ICoT-KD: only 1 of the 5")
    assert few_thoughts_warning(np.array([2, 2]), 2, "dynamic", "first_column") is None
    assert few_thoughts_warning([2], 2, "dynamic", "last_column") is None
    assert few_thoughts_warning([], 2, "dynamic", "diagonal") is None
    assert few_thoughts_warning([2], 12, "dynamic", "diagonal").endswith(
        "(median 2 tokens, delta dynamic); the others sit on the separators, which carry nothing of the reasoning to "
        "distil. The CoT is too short for three states; KD has little to distil on this data")
    assert few_thoughts_warning([3], 3, "dynamic", "diagonal").endswith(
        "distil. Use a model with at least 4 layers (the paper: 12 to 24)")
    assert few_thoughts_warning([3], 4, 2, "diagonal").endswith("distil. Use an integer delta that keeps them inside "
                                                                 "(delta: 1) or more layers")


def test_source_layers_and_normalise():
    from icot.methods.kd.states import normalise, source_layers

    assert source_layers("bottom_row", 3) == [0, 0, 0] and source_layers("top_row", 3) == [2, 2, 2]
    assert source_layers("diagonal", 4) == [0, 1, 2, 3] and source_layers("first_column", 2) == [0, 1]
    states = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[0.0, 4.0], [-1.0, 1.0]]])
    expected = torch.tensor([[[-1.0, 1.0], [0.0, 0.0]], [[-1.0, 1.0], [-1.0, 1.0]]])  # mean 0, variance 1 (eps aside)
    torch.testing.assert_close(normalise(states), expected, atol=1e-4, rtol=0)
    wide = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, variance 3.5
    torch.testing.assert_close(normalise(wide), (wide - 3) / math.sqrt(3.5 + 1e-5))


# ----- kd/config.py ----------------------------------------------------------------------------------

def field_of(cls, name):
    import dataclasses

    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_the_kd_settings_declared_once_keep_their_defaults_and_help():
    from icot.methods.kd.config import CoupleConfig, CoupleStage, KDConfig, TeacherConfig, TeacherStatesConfig

    delta = ("the CoT distance between the teacher positions read for consecutive layers: 'dynamic' (the CoT spread "
             "evenly over the layers, the paper's) or a positive integer")
    subset = ("which teacher states feed the layers: the diagonal (the paper's), a column (the first or the second SEP "
              "at every layer) or a row (see kd/states.py)")
    for cls in (KDConfig, TeacherConfig, TeacherStatesConfig):
        assert field_of(cls, "delta").default == "dynamic" and field_of(cls, "delta").metadata["help"] == delta
        assert field_of(cls, "subset").default == "diagonal" and field_of(cls, "subset").metadata["help"] == subset
        assert field_of(cls, "subset").metadata["choices"] == ("diagonal", "first_column", "last_column", "top_row",
                                                               "bottom_row")
    assert field_of(KDConfig, "teacher_dir").default is None
    assert field_of(KDConfig, "student_dir").metadata["help"] == ("a trained student model directory (stage a, e.g. "
                                                                  "RUN/student/best); null: train one in this run")
    freeze = "keep the emulator's weights fixed while coupling; false: train it with the student"
    for cls in (CoupleConfig, CoupleStage):
        assert field_of(cls, "freeze_emulator").default is False
        assert field_of(cls, "freeze_emulator").metadata["help"] == freeze


def test_a_stages_settings_are_the_train_fields_null_by_default_with_their_bounds():
    import typing

    from icot.methods.kd.config import StageSettings

    names = ["epochs", "max_steps", "max_train_seconds", "lr", "batch_size", "warmup_steps", "eval_every", "save_every",
             "lr_drop_step", "lr_drop_factor"]
    assert [f.name for f in __import__("dataclasses").fields(StageSettings)] == names
    epochs = field_of(StageSettings, "epochs")
    assert epochs.default is None and epochs.metadata["bounds"] == ">=1" and epochs.metadata["resumable"] is True
    assert epochs.metadata["help"] == ("passes over the training data (read only without max_steps); null (the "
                                       "default): the top-level epochs")
    assert field_of(StageSettings, "max_steps").metadata["help"] == (
        "optimizer steps to train, however many epochs they take (when given, it wins over epochs, as in Hugging "
        "Face's Trainer); null (the default): the top-level max_steps")
    hints = typing.get_type_hints(StageSettings)
    assert hints["epochs"] == int | None and hints["lr"] == float | None and hints["max_steps"] == int | None
    assert StageSettings() == StageSettings(**dict.fromkeys(names))


@pytest.mark.parametrize("section, settings, message", [
    ("teacher", dict(epochs=0), "config: teacher.epochs must be at least 1 (or null), got 0"),
    ("student", dict(lr=0.0), "config: student.lr must be positive, got 0.0"),
    ("couple", dict(lr_drop_factor=1.5), "config: couple.lr_drop_factor must be in (0, 1], got 1.5"),
    ("student", dict(model="micro", init_from_teacher=True),
     "config: student.model and student.init_from_teacher both give the initial weights; keep one"),
    ("emulator", dict(model="micro", init_from_teacher=True),
     "config: emulator.model and emulator.init_from_teacher both give the initial weights; keep one"),
    ("emulator", dict(mixture_size=0), "config: emulator.mixture_size must be at least 1, got 0"),
    ("emulator", dict(mixture="token", mixture_size=2),
     "config: emulator.mixture_size is for the soft mixture; the token mixture has one component per vocabulary token "
     "(drop mixture_size)"),
    ("emulator", dict(softmax_temperature=0.0), "config: emulator.softmax_temperature must be positive, got 0.0"),
    ("emulator", dict(token_loss_weight=-1.0), "config: emulator.token_loss_weight must not be negative, got -1.0"),
    ("emulator", dict(token_loss_weight=math.nan), "config: emulator.token_loss_weight must not be negative, got nan"),
    ("emulator", dict(softmax_temperature=math.nan), "config: emulator.softmax_temperature must be positive, got nan"),
])
def test_stage_sections_are_checked_with_their_names(section, settings, message):
    from icot.methods.kd import config as kd_config

    cls = {"teacher": kd_config.TeacherStage, "student": kd_config.StudentStage, "emulator": kd_config.EmulatorStage,
           "couple": kd_config.CoupleStage}[section]
    with pytest.raises(UserError) as error:
        cls(**settings).validate()
    assert str(error.value) == message


def test_stage_sections_give_the_train_fields_they_set():
    from icot.methods.kd.config import CoupleStage, EmulatorStage, StudentStage

    assert StudentStage(epochs=3, lr=0.01, init_from_teacher=True).overrides() == {"epochs": 3, "lr": 0.01}
    assert StudentStage(model="micro").overrides() == {"model": "micro"}  # a TrainConfig field too
    assert CoupleStage(freeze_emulator=True, batch_size=4).overrides() == {"batch_size": 4}
    EmulatorStage(mixture="token", model="micro").validate()
    EmulatorStage(mixture="token", token_loss_weight=0.0).validate()  # no token loss
    EmulatorStage(token_loss_weight=0.5, softmax_temperature=0.01, mixture_size=1).validate()
    StudentStage(init_from_teacher=True).validate()
    assert EmulatorStage(mixture="token", softmax_temperature=0.5, token_loss_weight=0.0).mixture_values() == {
        "mixture": "token", "mixture_size": 1, "softmax_temperature": 0.5, "token_loss_weight": 0.0}


def kd_config(tmp_path, kind=None, **settings):
    from icot.methods.kd.config import KDConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("1 * 2||2 #### 2\n")
    files = dict(train_file=str(tmp_path / "train.txt"), valid_file=str(tmp_path / "valid.txt"), out=str(tmp_path / "run"))
    return (kind or KDConfig)(**{**files, **settings})


@pytest.mark.parametrize("kind, settings, message", [
    ("TeacherConfig", dict(delta="0"), "config: delta must be 'dynamic' or a positive integer, got '0'"),
    ("TeacherStatesConfig", dict(), "config: teacher_dir is required (a trained explicit-CoT model directory, e.g. "
                                    "RUN/teacher/best)"),
    ("StudentConfig", dict(teacher_dir="t", delta="x"), "config: delta must be 'dynamic' or a positive integer, got 'x'"),
    ("EmulatorConfig", dict(teacher_dir="t", mixture_size=0), "config: mixture_size must be at least 1, got 0"),
    ("EmulatorConfig", dict(delta="-2"), "config: teacher_dir is required (a trained explicit-CoT model directory, "
                                         "e.g. RUN/teacher/best)"),
    ("CoupleConfig", dict(student_dir="s"), "config: student_dir and emulator_dir are required (saved stage a and b "
                                            "models)"),
    ("CoupleConfig", dict(emulator_dir="e"), "config: student_dir and emulator_dir are required (saved stage a and b "
                                             "models)"),
    ("CoupleConfig", dict(student_dir="s", emulator_dir="e", out=None), "config: out is required (the run directory)"),
    ("TeacherConfig", dict(delta="3", out=None), "config: out is required (the run directory)"),
])
def test_the_stage_trainers_configs_are_checked(tmp_path, kind, settings, message):
    from icot.methods.kd import config as kd_config_module

    with pytest.raises(UserError) as error:
        kd_config(tmp_path, getattr(kd_config_module, kind), **settings).validate()
    assert str(error.value) == message


def test_the_stage_trainers_configs_that_are_accepted(tmp_path):
    from icot.methods.kd.config import CoupleConfig, EmulatorConfig, StudentConfig, TeacherConfig

    kd_config(tmp_path, TeacherConfig, delta="4").validate()
    kd_config(tmp_path, StudentConfig, teacher_dir="t").validate()
    kd_config(tmp_path, EmulatorConfig, teacher_dir="t", mixture="token").validate()
    kd_config(tmp_path, CoupleConfig, student_dir="s", emulator_dir="e").validate()
    assert kd_config(tmp_path, StudentConfig, teacher_dir="t").method == "kd"


@pytest.mark.parametrize("settings, message", [
    (dict(delta="0"), "config: delta must be 'dynamic' or a positive integer, got '0'"),
    (dict(lora={"r": 4}), "config: lora: ICoT-KD does not take adapters (its coupled stage trains two LMs, the "
                          "emulator's and the student's, at once); expected lora.r 0"),
    (dict(gradient_checkpointing=True), "config: gradient_checkpointing: ICoT-KD's stages train in eval mode (as its "
                                        "authors do), where checkpointing does nothing; expected gradient_checkpointing "
                                        "false"),
    (dict(teacher_dir="missing"), "config: teacher_dir missing is not a directory"),
    (dict(student_dir="missing"), "config: student_dir missing is not a directory"),
    (dict(emulator_dir="missing"), "config: emulator_dir missing is not a directory"),
    (dict(stage="student"), "config: stage 'student' needs teacher_dir (saved models of the earlier stages)"),
    (dict(stage="emulator"), "config: stage 'emulator' needs teacher_dir (saved models of the earlier stages)"),
    (dict(stage="couple"), "config: stage 'couple' needs student_dir and emulator_dir (saved models of the earlier "
                           "stages)"),
    (dict(stage="couple", student_dir="DIR"), "config: stage 'couple' needs emulator_dir (saved models of the earlier "
                                              "stages)"),
    (dict(stage="teacher", teacher_dir="DIR"),
     "config: stage 'teacher' trains a teacher; teacher_dir gives one already (drop one of them)"),
    (dict(stage="teacher", student={"epochs": 2}),
     "config: student.epochs is set, but this run does not train the student (stage teacher; teacher trained); drop "
     "the student settings"),
    (dict(teacher_dir="DIR", teacher={"lr": 0.1}),
     "config: teacher.lr is set, but this run does not train the teacher (stage all; student, emulator, couple "
     "trained); drop the teacher settings"),
    (dict(stage="couple", student_dir="DIR", emulator_dir="DIR", delta="3"),
     "config: delta and subset say where the teacher's states are read; the couple stage reads none (drop them)"),
    (dict(student_dir="DIR", emulator_dir="DIR", subset="top_row"),
     "config: delta and subset say where the teacher's states are read; the couple stage reads none (drop them)"),
])
def test_the_kd_config_is_checked_with_one_line_errors(tmp_path, settings, message):
    from icot.methods.kd.config import CoupleStage, StudentStage, TeacherStage

    settings = {k: str(tmp_path) if v == "DIR" else v for k, v in settings.items()}
    sections = {"teacher": TeacherStage, "student": StudentStage, "couple": CoupleStage}
    settings = {k: sections[k](**v) if k in sections else v for k, v in settings.items()}
    if "lora" in settings:
        from icot.trainer.config import LoraSettings

        settings["lora"] = LoraSettings(**settings["lora"])
    with pytest.raises(UserError) as error:
        kd_config(tmp_path, **settings).validate()
    assert str(error.value) == message


def test_the_kd_config_refuses_fsdp(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError) as error:
        kd_config(tmp_path, fsdp=True).validate()
    assert str(error.value) == ("config: fsdp: --method kd trains a teacher, an emulator and a student that read one "
                                "another's hidden states, each loaded whole; expected fsdp false")


def test_the_stages_a_kd_run_trains(tmp_path):
    from icot.methods.kd.config import CoupleStage, EmulatorStage

    d = str(tmp_path)
    assert kd_config(tmp_path).stages() == ["teacher", "student", "emulator", "couple"]
    assert kd_config(tmp_path, teacher_dir=d).stages() == ["student", "emulator", "couple"]
    assert kd_config(tmp_path, student_dir=d).stages() == ["teacher", "emulator", "couple"]
    assert kd_config(tmp_path, teacher_dir=d, emulator_dir=d).stages() == ["student", "couple"]
    assert kd_config(tmp_path, student_dir=d, emulator_dir=d).stages() == ["couple"]
    assert kd_config(tmp_path, stage="emulator", teacher_dir=d).stages() == ["emulator"]
    for settings in (dict(), dict(teacher_dir=d, delta="2"), dict(stage="teacher", delta="3", subset="top_row"),
                     dict(stage="emulator", teacher_dir=d, emulator=EmulatorStage(mixture="token")),
                     dict(stage="couple", student_dir=d, emulator_dir=d, couple=CoupleStage(freeze_emulator=True)),
                     dict(student_dir=d, emulator_dir=d)):
        kd_config(tmp_path, **settings).validate()


# ----- kd/modules.py ---------------------------------------------------------------------------------

def small_gpt2(tokenizer, layers=3, width=16, seed=0, dtype=None, dropout=0.0):
    """A GPT-2 of `layers` layers of width `width` on the products' vocabulary, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_layer=layers, n_embd=width, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(config).eval()
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def products():
    return encoded_products()


def answer_rows(products, indices=(0, 1, 2)):
    from icot.data.batching import collate
    from icot.methods.kd.predictor import answer_only

    _, layout, data = products
    return answer_only(collate(data, np.array(indices), layout.pad_id), layout.pad_id)


def lm_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def layer_inputs(model, run):
    """Each decoder layer's input during `run()`, as the layer saw it."""
    from icot.models import decoder_layers

    seen = []
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()),
        with_kwargs=True) for layer in decoder_layers(model)]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def test_an_mlp_is_h_4h_relu_h():
    from icot.methods.kd.modules import _mlp

    mlp = _mlp(6, 3)
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features, mlp[2].out_features) == (6, 12, 12, 3)


def test_the_student_reads_mlp_l_of_thought_l_at_each_rows_position(products):
    from icot.methods.kd.modules import MindReadingStudent

    tokenizer = products[0]
    lm = small_gpt2(tokenizer)
    student = MindReadingStudent(lm)
    assert len(student.thought_mlps) == 3 and student.thought_mlps[0][0].in_features == 16
    assert student.thought_mlps[2][2].out_features == 16 and student.num_layers == 3
    batch = answer_rows(products)
    plain = student(**lm_inputs(batch)).logits
    torch.testing.assert_close(plain, lm(**lm_inputs(batch)).logits)
    torch.manual_seed(1)
    thoughts, at = torch.randn(3, 3, 16), torch.tensor([5, 4, 3])
    out = student(thoughts=thoughts, thoughts_at=at, **lm_inputs(batch))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, read_by_hand(lm, student.thought_mlps, thoughts, at, batch))
    assert not torch.allclose(out.logits, plain)
    assert MindReadingStudent(small_gpt2(tokenizer).to("meta")).thought_mlps[2][0].weight.device.type == "meta"
    half = MindReadingStudent(small_gpt2(tokenizer, dtype=torch.bfloat16))
    assert half.thought_mlps[1][0].weight.dtype == torch.bfloat16
    with half.reading(thoughts, at):  # float32 thoughts into a bf16 model
        half.lm(**lm_inputs(batch))


def read_by_hand(lm, mlps, thoughts, at, batch):
    """The LM's logits with the input of layer l at (row, at[row]) replaced by mlps[l](thoughts[row, l])."""
    from icot.models import decoder_layers

    def replace(layer):
        def hook(module, args, kwargs):
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
            for row, column in enumerate(at.tolist()):
                hidden[row, column] = mlps[layer](thoughts[row, layer])
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs
        return hook

    handles = [layer.register_forward_pre_hook(replace(i), with_kwargs=True) for i, layer in enumerate(decoder_layers(lm))]
    try:
        return lm(**lm_inputs(batch)).logits
    finally:
        for handle in handles:
            handle.remove()


def emulated_by_hand(emulator, batch, at, forced=None):
    """The emulator's thoughts as the paper's code computes them, through hooks of this test's own on the full
    rows: at SEP before layer l, ẑ_l = MLP_l([h_l; m_l]); an LSTM over ẑ_l + context, attention over the
    earlier keys; out_proj([output; context]) replaces h_l."""
    from icot.models import decoder_layers

    thoughts, keys, run = [], [], {"context": None, "state": None}
    weight = emulator.mixture_components.weight
    rows = torch.arange(len(at))

    def step(layer, h):
        if emulator.mixture == "token":
            chosen = (h @ weight.T).argmax(-1) if forced is None else forced[:, layer]
            component = weight[chosen]
        elif emulator.mixture_size == 1:
            component = weight[0].expand(len(h), -1)
        else:
            component = torch.softmax(h @ weight.T / emulator.softmax_temperature, -1) @ weight
        thought = emulator.thought_mlps[layer](torch.cat([h, component], -1))
        thoughts.append(thought)
        context = torch.zeros_like(thought) if run["context"] is None else run["context"]
        out, run["state"] = emulator.lstm((thought + context).unsqueeze(0), run["state"])
        out = out.squeeze(0)
        if keys:
            past = torch.stack(keys, 1)
            weights = torch.softmax((past * emulator.query_proj(out)[:, None, :]).sum(-1), dim=1)
            context = (weights[:, :, None] * past).sum(1)
        run["context"] = context
        keys.append(emulator.key_proj(out))
        return emulator.out_proj(torch.cat([out, context], -1))

    def hook(layer):
        def replace(module, args, kwargs):
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
            hidden[rows, at] = step(layer, hidden[rows, at])
            return (hidden, *args[1:]), kwargs
        return replace

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(emulator.lm))]
    try:
        with torch.no_grad():
            emulator.lm(**lm_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(thoughts, 1)


@pytest.mark.parametrize("mixture, size", [("soft", 1), ("soft", 3), ("token", 1)])
def test_the_emulator_thinks_at_sep_layer_by_layer(products, mixture, size):
    from icot.methods.kd.modules import ThoughtEmulator

    tokenizer = products[0]
    lm = small_gpt2(tokenizer, layers=4)  # what layer 2 writes (its context from the keys of 0 and 1) reaches layer 3
    emulator = ThoughtEmulator(lm, size, 0.5, mixture)
    batch = answer_rows(products)
    batch["position_ids"] = batch["position_ids"] + 1  # positions and a mask of its own: the ones passed are used
    batch["attention_mask"][1, 1] = 0
    at = batch["first_sep"]
    calls = []
    lm.base_model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("use_cache", "absent")),
                                            with_kwargs=True)
    seen, (thoughts, logits) = layer_inputs(lm, lambda: emulator.emulate(*lm_inputs(batch).values(), at))
    assert calls[0] is False  # no KV cache
    rows = torch.arange(3)
    hs = [seen[layer][rows, at] for layer in range(4)]  # the inputs before the emulator writes at SEP
    assert seen[0].shape[1] == 6  # the columns up to the last SEP (at 5) only
    expected = emulated_by_hand(emulator, batch, at)
    torch.testing.assert_close(thoughts, expected)
    with torch.no_grad():
        torch.testing.assert_close(emulator(*lm_inputs(batch).values(), at), expected)
    assert thoughts.shape == (3, 4, 16)
    if mixture == "token":
        assert logits.shape == (3, 4, len(tokenizer))
        torch.testing.assert_close(logits[:, 1], hs[1] @ emulator.mixture_components.weight.T)
    else:
        assert logits is None


def test_the_token_mixture_is_teacher_forced_when_given_tokens(products):
    from icot.methods.kd.modules import ThoughtEmulator

    tokenizer = products[0]
    emulator = ThoughtEmulator(small_gpt2(tokenizer, layers=4), 5, 0.5, "token")
    assert emulator.mixture_size == len(tokenizer) and emulator.mixture == "token"
    h = torch.randn(2, 16)
    forced = torch.tensor([3, 1])
    component, logits = emulator.mixture_embedding(h, forced)
    torch.testing.assert_close(component, emulator.mixture_components.weight[[3, 1]])
    torch.testing.assert_close(logits, h @ emulator.mixture_components.weight.T)
    chosen, _ = emulator.mixture_embedding(h)
    torch.testing.assert_close(chosen, emulator.mixture_components.weight[logits.argmax(-1)])
    batch = answer_rows(products)
    tokens = torch.tensor([[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 1]])
    thoughts, _ = emulator.emulate(*lm_inputs(batch).values(), batch["first_sep"], cot_tokens=tokens)
    torch.testing.assert_close(thoughts, emulated_by_hand(emulator, batch, batch["first_sep"], tokens))


def test_the_emulators_modules_and_their_shapes(products):
    from icot.methods.kd.modules import ThoughtEmulator

    tokenizer = products[0]
    emulator = ThoughtEmulator(small_gpt2(tokenizer, dtype=torch.bfloat16), 4, 0.25)
    assert emulator.mixture == "soft" and emulator.softmax_temperature == 0.25 and emulator.mixture_size == 4
    assert len(emulator.thought_mlps) == 3 and emulator.thought_mlps[0][0].in_features == 32
    assert emulator.thought_mlps[0][2].out_features == 16
    assert emulator.mixture_components.weight.shape == (4, 16)
    assert (emulator.lstm.input_size, emulator.lstm.hidden_size, emulator.lstm.num_layers) == (16, 16, 1)
    assert emulator.key_proj.weight.shape == emulator.query_proj.weight.shape == (16, 16)
    assert emulator.out_proj.weight.shape == (16, 32)
    for module in (emulator.thought_mlps, emulator.mixture_components, emulator.lstm, emulator.key_proj,
                   emulator.query_proj, emulator.out_proj):
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    on_meta = ThoughtEmulator(small_gpt2(tokenizer).to("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}  # the modules go to the LM's device
    default = ThoughtEmulator(small_gpt2(tokenizer))
    assert (default.mixture, default.mixture_size, default.softmax_temperature) == ("soft", 1, 0.05)


def test_the_soft_mixture_averages_its_components_by_softmax(products):
    from icot.methods.kd.modules import ThoughtEmulator

    emulator = ThoughtEmulator(small_gpt2(products[0]), 3, 0.5)
    with torch.no_grad():
        emulator.mixture_components.weight.copy_(torch.tensor([[1.0] + [0.0] * 15, [0.0, 1.0] + [0.0] * 14,
                                                               [0.0] * 16]))
    h = torch.zeros(1, 16)
    h[0, 0] = 0.5  # logits 0.5, 0, 0 over temperature 0.5: 1, 0, 0
    component, logits = emulator.mixture_embedding(h)
    e = math.e
    assert logits is None
    assert component[0, :2].tolist() == pytest.approx([e / (e + 2), 1 / (e + 2)])
    single = ThoughtEmulator(small_gpt2(products[0]), 1)
    component, logits = single.mixture_embedding(torch.randn(4, 16))
    assert logits is None and component.shape == (4, 16)
    torch.testing.assert_close(component, single.mixture_components.weight.expand(4, -1))


@pytest.fixture(scope="module")
def kd_saved(products, tmp_path_factory):
    """A student, an emulator (soft, 2 components) and their coupled model, saved; and an explicit-CoT teacher."""
    from icot.methods.kd.modules import CoupledModel, MindReadingStudent, ThoughtEmulator
    from icot.models import save_model

    tokenizer = products[0]
    root = tmp_path_factory.mktemp("kd")
    teacher = small_gpt2(tokenizer, seed=3)
    save_model(teacher, tokenizer, root / "teacher", {"method": "explicit", "cot_removed": 0})
    student = MindReadingStudent(small_gpt2(tokenizer, seed=1))
    emulator = ThoughtEmulator(small_gpt2(tokenizer, seed=2), 2, 0.5)
    student.write(tokenizer, root / "student", {"method": "kd", "kd_stage": "student", "teacher": str(root / "teacher"),
                                                "delta": "2", "subset": "top_row"})
    emulator.write(tokenizer, root / "emulator", {"method": "kd", "kd_stage": "emulator", "mixture": "soft",
                                                  "mixture_size": 2, "softmax_temperature": 0.5})
    coupled = CoupledModel(emulator, student)
    coupled.save(tokenizer, root / "coupled", {"method": "kd", "kd_stage": "coupled"},
                 {"method": "kd", "kd_stage": "emulator", "mixture": "soft", "mixture_size": 2,
                  "softmax_temperature": 0.5})
    return SimpleNamespace(root=root, teacher=teacher, student=student, emulator=emulator, coupled=coupled)


def test_the_coupled_model_feeds_the_emulators_thoughts_to_the_student(products, kd_saved):
    coupled, student, emulator = kd_saved.coupled, kd_saved.student, kd_saved.emulator
    assert coupled.emulator is emulator and coupled.student is student and coupled.config is student.lm.config
    batch = answer_rows(products)
    at = batch["first_sep"]
    with torch.no_grad():
        torch.testing.assert_close(coupled(**lm_inputs(batch)).logits, student.lm(**lm_inputs(batch)).logits)
        thoughts = emulator(*lm_inputs(batch).values(), at)
        expected = student(thoughts=thoughts, thoughts_at=at, **lm_inputs(batch)).logits
        torch.testing.assert_close(coupled(thoughts_at=at, **lm_inputs(batch)).logits, expected)
        with coupled.thinking(*lm_inputs(batch).values(), at):
            torch.testing.assert_close(student.lm(**lm_inputs(batch)).logits, expected)


def test_saved_stage_models_reload_with_their_metadata(products, kd_saved):
    from icot.methods.kd.modules import EMULATOR_DIR, MODULES_FILE, load_coupled, load_emulator, load_student
    from icot.models import read_metadata

    root = kd_saved.root
    assert (MODULES_FILE, EMULATOR_DIR) == ("kd_modules.safetensors", "emulator")
    assert sorted(p.name for p in root.iterdir()) == ["coupled", "emulator", "student", "teacher"]
    assert (root / "coupled" / "kd_modules.safetensors").is_file()
    assert (root / "coupled" / "emulator" / "kd_modules.safetensors").is_file()
    assert read_metadata(root / "coupled" / "emulator")["kd_stage"] == "emulator"
    assert read_metadata(root / "coupled")["kd_stage"] == "coupled"
    batch = answer_rows(products)
    at = batch["first_sep"]
    with torch.no_grad():
        expected = kd_saved.coupled(thoughts_at=at, **lm_inputs(batch)).logits
        torch.testing.assert_close(load_coupled(root / "coupled")(thoughts_at=at, **lm_inputs(batch)).logits, expected)
        half = load_coupled(str(root / "coupled"), torch.bfloat16)
        assert half.emulator.lm.dtype == half.student.lm.dtype == torch.bfloat16
    student = load_student(str(root / "student"))
    torch.testing.assert_close(student.state_dict(), kd_saved.student.state_dict())
    assert load_student(root / "student", torch.bfloat16).thought_mlps[0][0].weight.dtype == torch.bfloat16
    emulator = load_emulator(str(root / "emulator"))
    assert (emulator.mixture, emulator.mixture_size, emulator.softmax_temperature) == ("soft", 2, 0.5)
    torch.testing.assert_close(emulator.state_dict(), kd_saved.emulator.state_dict())
    assert load_emulator(root / "emulator", torch.bfloat16).lstm.weight_hh_l0.dtype == torch.bfloat16


def test_an_emulator_saved_without_its_mixture_is_a_soft_one(products, kd_saved, tmp_path):
    import shutil

    from icot.methods.kd.modules import load_emulator

    folder = tmp_path / "old"
    shutil.copytree(kd_saved.root / "emulator", folder)
    meta = json.loads((folder / "icot.json").read_text())
    del meta["mixture"]
    (folder / "icot.json").write_text(json.dumps(meta))
    assert load_emulator(folder).mixture == "soft"
    meta["mixture"] = "token"
    (folder / "icot.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the model beside it"):
        load_emulator(folder)  # the token mixture has one component per vocabulary token


def test_saved_models_of_another_kind_are_refused_by_what_their_metadata_says(kd_saved, tmp_path):
    from icot.methods.kd.modules import kd_metadata, load_emulator, load_student

    root = kd_saved.root
    assert kd_metadata(root / "student", "student", "student_dir")["teacher"] == str(root / "teacher")
    for call, message in [
        (lambda: kd_metadata(root / "emulator", "student", "student_dir"),
         f"student_dir {root / 'emulator'}: not an ICoT-KD student (its icot.json says emulator)"),
        (lambda: kd_metadata(root / "teacher", "emulator", "emulator_dir"),
         f"emulator_dir {root / 'teacher'}: not an ICoT-KD emulator (its icot.json says explicit)"),
        (lambda: kd_metadata(tmp_path, "student", "x"), f"x {tmp_path}: not an ICoT-KD student (its icot.json says nothing)"),
        (lambda: load_student(root / "emulator"),
         f"student_dir {root / 'emulator'}: not an ICoT-KD student (its icot.json says emulator)"),
        (lambda: load_emulator(root / "student"),
         f"emulator_dir {root / 'student'}: not an ICoT-KD emulator (its icot.json says student)"),
    ]:
        with pytest.raises(UserError) as error:
            call()
        assert str(error.value) == message


def write_metadata(folder, meta):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "icot.json").write_text(json.dumps(meta))
    return folder


def test_a_teacher_must_write_its_whole_cot(kd_saved, tmp_path):
    from icot.methods.kd.modules import check_cot_teacher

    check_cot_teacher(kd_saved.root / "teacher")
    check_cot_teacher(tmp_path)  # no icot.json: nothing says otherwise
    for meta, how in [({"method": "stepwise", "cot_removed": 3}, "3 CoT tokens removed"),
                      ({"method": "stepwise", "cot_removed": "all"}, "all CoT tokens removed"),
                      ({"method": "explicit", "thoughts": 2, "cot_removed": 4}, "2 continuous thoughts in place of CoT steps")]:
        folder = write_metadata(tmp_path / meta["method"] / str(len(how)), meta)
        with pytest.raises(UserError) as error:
            check_cot_teacher(folder)
        assert str(error.value) == (f"teacher_dir {folder}: a {meta['method']} model trained with {how} (its icot.json); "
                                    "an ICoT-KD teacher writes its whole CoT: expected an explicit-CoT model (--method "
                                    "explicit)")


def test_stage_models_must_share_depth_width_and_vocabulary(products):
    from transformers import GPT2Config, GPT2LMHeadModel

    from icot.methods.kd.modules import check_same_shape

    tokenizer = products[0]
    reference = small_gpt2(tokenizer)
    check_same_shape(reference, "teacher T", small_gpt2(tokenizer, seed=5), "the student model S")
    for other, message in [
        (small_gpt2(tokenizer, layers=2), "S has 2 layers of width 16 but T has 3 of width 16; ICoT-KD needs the same "
                                          "number of layers and hidden size"),
        (small_gpt2(tokenizer, width=8), "S has 3 layers of width 8 but T has 3 of width 16; ICoT-KD needs the same "
                                         "number of layers and hidden size"),
        (GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer) + 1, n_layer=3, n_embd=16, n_head=2, n_positions=64)),
         "S and T have different vocabularies; they must share the teacher's tokenizer"),
    ]:
        with pytest.raises(UserError) as error:
            check_same_shape(reference, "T", other, "S")
        assert str(error.value) == message


# ----- kd/predictor.py -------------------------------------------------------------------------------

def test_answer_only_rows_are_input_sep_answer_eos(products):
    tokenizer = products[0]
    batch = answer_rows(products)
    words = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    eos = tokenizer.eos_token
    assert words == [["2", "1", "*", "4", "3", eos, "####", "8", "0", "4", "0", eos],
                     ["5", "*", "7", "6", eos, "####", "5", "3", "3", eos, eos, eos],
                     ["3", "*", "4", eos, "####", "2", "1", eos, eos, eos, eos, eos]]
    assert batch["labels"].tolist()[2] == [-100] * 4 + batch["input_ids"].tolist()[2][4:8] + [-100] * 4
    assert batch["position_ids"].tolist()[1] == list(range(10)) + [0, 0]
    assert batch["attention_mask"].sum(1).tolist() == [12, 10, 8] and batch["length"].tolist() == [12, 10, 8]
    assert batch["first_sep"].tolist() == [5, 4, 3] and batch["cot_len"].tolist() == [0, 0, 0]
    from icot.methods.kd.predictor import answer_only

    padded = answer_only(full_rows(products), pad_id=7)
    assert padded["input_ids"][2].tolist()[8:] == [7, 7, 7, 7]  # the padding asked for


def test_sep_columns_and_positions_of_left_padded_prompts():
    from icot.methods.kd.predictor import last_column, left_padded_positions

    column = last_column(torch.zeros(3, 7, dtype=torch.long))
    assert column.tolist() == [6, 6, 6] and column.dtype == torch.int64
    assert last_column(torch.zeros(2, 4, device="meta")).device.type == "meta"
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2]]


class Recorder:
    """A stand-in model: its contexts and calls are recorded, not run."""

    def __init__(self):
        self.calls = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def thinking(self, *args):
        self.calls.append(("thinking", args))
        return "thinking context"

    def reading(self, *args):
        self.calls.append(("reading", args))
        return "reading context"


def test_an_answer_only_predictor_forces_and_decodes_the_answer_alone(products, monkeypatch):
    import icot.methods.kd.predictor as kd_predictor

    tokenizer, layout, data = products
    predictor = kd_predictor.AnswerOnlyPredictor(model=Recorder(), tokenizer=tokenizer)
    assert predictor.cot_removed == math.inf
    forced = predictor.teacher_forced(data, np.array([2, 0]))
    same_batch(forced, answer_rows(products, (2, 0)))
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("####", "8", "0", "4")}
    sep = layout.sep_id
    assert predictor.decode([ids["####"], ids["8"], ids["0"], sep, ids["4"]]) == ("", "8 0")
    assert predictor.decode([ids["8"], ids["4"]]) == ("", "8 4")
    assert predictor.decode([ids["####"]]) == ("", "")
    assert predictor.decode([sep]) == ("", "")
    assert predictor.decode([ids["####"], ids["8"], tokenizer.unk_token_id, sep]) == ("", "8")  # special tokens dropped
    calls = []
    monkeypatch.setattr(kd_predictor, "greedy_generate", lambda *args, **kwargs: calls.append((args, kwargs)) or [[7]])
    assert predictor.generate([[1, 2]], 9) == [[7]]
    assert calls == [((predictor.model, [[1, 2]], sep, layout.pad_id, 9), {"stops": 1,
                                                                           "prompt_context": predictor.prompt_context})]


def test_an_answer_only_batch_goes_to_the_models_device(products):
    import icot.methods.kd.predictor as kd_predictor

    tokenizer, _, data = products
    model = Recorder()
    model.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
    forced = kd_predictor.AnswerOnlyPredictor(model=model, tokenizer=tokenizer).teacher_forced(data, np.array([1]))
    assert {v.device.type for v in forced.values()} == {"meta"}


def test_the_kd_predictor_thinks_at_sep_in_forced_and_generated_rows(products):
    from icot.methods.kd.predictor import KDPredictor

    model = Recorder()
    predictor = KDPredictor(model=model, tokenizer=products[0])
    batch = answer_rows(products)
    assert predictor.forward_context(batch) == "thinking context"
    assert model.calls[0][1] == (batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["first_sep"])
    ids, mask = torch.tensor([[0, 5, 6], [4, 5, 6]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert predictor.prompt_context(ids, mask) == "thinking context"
    args = model.calls[1][1]
    assert args[0] is ids and args[1] is mask
    assert args[2].tolist() == [[0, 0, 1], [0, 1, 2]] and args[3].tolist() == [2, 2]


def test_a_mind_reading_predictor_reads_its_teachers_states_of_the_gold_cot(products, kd_saved, monkeypatch):
    import icot.methods.kd.predictor as kd_predictor
    from icot.data.batching import collate
    from icot.methods.kd.states import extract_teacher_states

    tokenizer, layout, data = products
    model = Recorder()
    predictor = kd_predictor.MindReadingPredictor(model=model, tokenizer=tokenizer, teacher=kd_saved.teacher, delta="2",
                                                  subset="top_row")
    assert kd_predictor.MindReadingPredictor(model=model, tokenizer=tokenizer).delta == "dynamic"
    assert kd_predictor.MindReadingPredictor(model=model, tokenizer=tokenizer).subset == "diagonal"
    message = ("a mind-reading student (ICoT-KD stage a) answers only with its teacher's states of a gold CoT, i.e. in "
               "evaluation (icot eval); use the coupled model (RUN/best) for new questions")
    with pytest.raises(UserError) as error:
        predictor.generate([[1]], 4)
    assert str(error.value) == message
    forced = predictor.teacher_forced(data, np.array([1, 2]))
    same_batch(forced, answer_rows(products, (1, 2)))
    expected = extract_teacher_states(kd_saved.teacher, collate(data, np.array([1, 2]), layout.pad_id), 2, "top_row")
    torch.testing.assert_close(predictor.thoughts, expected)
    assert predictor.forward_context(forced) == "reading context"
    assert model.calls[0][1][0] is predictor.thoughts and model.calls[0][1][1].tolist() == [4, 3]
    ids, mask = torch.tensor([[0, 5, 6], [4, 5, 6]]), torch.ones(2, 3)
    assert predictor.prompt_context(ids, mask) == "reading context"
    assert model.calls[1][1][0] is predictor.thoughts and model.calls[1][1][1].tolist() == [2, 2]
    for rows in (1, 3):
        with pytest.raises(UserError) as error:
            predictor.prompt_context(torch.zeros(rows, 3, dtype=torch.long), torch.ones(rows, 3))
        assert str(error.value) == message
    with pytest.raises(UserError):
        predictor.forward_context({"input_ids": torch.zeros(3, 2), "first_sep": torch.zeros(3)})
    monkeypatch.setattr(kd_predictor, "greedy_generate", lambda model, prompts, sep, pad, most, **kwargs: [prompts, [most]])
    assert predictor.generate([[1], [2]], 4) == [[[1], [2]], [4]]
    with pytest.raises(UserError):
        predictor.generate([[1]], 4)


def test_a_saved_kd_model_loads_as_the_predictor_of_its_stage(products, kd_saved, tmp_path):
    from icot.methods.kd.modules import CoupledModel, MindReadingStudent
    from icot.methods.kd.predictor import KDPredictor, MindReadingPredictor, load_kd_predictor

    root = kd_saved.root
    coupled = load_kd_predictor(root / "coupled", {"kd_stage": "coupled"})
    assert type(coupled) is KDPredictor and isinstance(coupled.model, CoupledModel) and not coupled.model.training
    assert coupled.tokenizer.get_vocab() == products[0].get_vocab()
    assert load_kd_predictor(root / "coupled", {"kd_stage": "coupled"}, "meta").device.type == "meta"
    assert load_kd_predictor(str(root / "coupled"), {"kd_stage": "coupled"}, dtype=torch.bfloat16).model.student.lm.dtype \
        == torch.bfloat16
    meta = {"kd_stage": "student", "teacher": str(root / "teacher"), "delta": "2", "subset": "top_row"}
    student = load_kd_predictor(root / "student", meta)
    assert type(student) is MindReadingPredictor and isinstance(student.model, MindReadingStudent)
    assert (student.delta, student.subset) == ("2", "top_row") and not student.model.training
    assert not student.teacher.training
    torch.testing.assert_close(student.teacher.state_dict(), kd_saved.teacher.state_dict())
    torch.testing.assert_close(student.model.state_dict(), kd_saved.student.state_dict())
    on_meta = load_kd_predictor(root / "student", meta, "meta", torch.bfloat16)
    assert on_meta.device.type == "meta" and next(on_meta.teacher.parameters()).device.type == "meta"
    assert next(on_meta.teacher.parameters()).dtype == torch.bfloat16 and on_meta.model.lm.dtype == torch.bfloat16
    for meta, message in [
        ({**meta, "teacher": str(tmp_path / "gone")}, f"{root / 'student'}: its teacher {tmp_path / 'gone'} is gone; a "
                                                       "mind-reading student needs it to answer"),
        ({"kd_stage": "student"}, f"{root / 'student'}: its teacher None is gone; a mind-reading student needs it to answer"),
        ({"kd_stage": "student", "teacher": ""}, f"{root / 'student'}: its teacher  is gone; a mind-reading student needs "
                                                 "it to answer"),
        ({**meta, "teacher": str(root / "teacher" / "icot.json")}, f"{root / 'student'}: its teacher "
                                                                   f"{root / 'teacher' / 'icot.json'} is gone; a "
                                                                   "mind-reading student needs it to answer"),
        ({"kd_stage": "emulator"}, f"{root / 'student'}: an ICoT-KD thought emulator (stage b) predicts the teacher's "
                                   "hidden states, not answers; evaluate a coupled model (RUN/best) instead"),
        ({"kd_stage": "other"}, f"{root / 'student'}: unknown ICoT-KD stage 'other' in icot.json (expected coupled, "
                                "student or emulator)"),
        ({}, f"{root / 'student'}: unknown ICoT-KD stage 'None' in icot.json (expected coupled, student or emulator)"),
    ]:
        with pytest.raises(UserError) as error:
            load_kd_predictor(root / "student", meta)
        assert str(error.value) == message


def test_ready_puts_a_model_in_eval_mode_on_the_device_asked_for():
    from icot.methods.kd.predictor import _ready

    model = torch.nn.Linear(2, 2).train()
    assert _ready(model, None) is model and not model.training and model.weight.device.type == "cpu"
    assert _ready(torch.nn.Linear(2, 2), "meta").weight.device.type == "meta"


# ----- kd/stages.py ----------------------------------------------------------------------------------

@pytest.fixture
def stage_said(monkeypatch):
    """What the stages warn and write (tqdm.write); tqdm's bars run the loops they wrap, draw nothing and are
    recorded in `.bars` by their settings."""
    import icot.methods.kd.stages as stages

    class Said(list):
        bars = []

    lines = Said()
    lines.bars = []

    class Bars:
        def __call__(self, iterable, **settings):
            lines.bars.append(settings)
            return iterable

        def write(self, text):
            lines.append(("write", text))

    monkeypatch.setattr(stages, "warn", lambda message: lines.append(("warn", message)))
    monkeypatch.setattr(stages, "tqdm", Bars())
    return lines


def stage_trainer(tmp_path, products, kind, **settings):
    from icot.methods.kd import config as kd_config_module
    from icot.methods.kd import stages

    trainer_class = getattr(stages, kind)
    trainer = trainer_class(kd_config(tmp_path, trainer_class.config_class, **settings))
    trainer.tokenizer, trainer.layout, data = products
    trainer.train_data = trainer.valid_data = trainer.test_data = data
    assert trainer_class.config_class is getattr(kd_config_module, kind.replace("Trainer", "Config"))
    return trainer


def full_rows(products, indices=(0, 1, 2)):
    from icot.data.batching import collate

    _, layout, data = products
    return collate(data, np.array(indices), layout.pad_id)


def test_the_depth_warning_of_each_stage_before_it_trains(tmp_path, products, kd_saved, stage_said):
    from icot.methods.kd.stages import warn_few_thoughts

    teacher = stage_trainer(tmp_path, products, "TeacherTrainer", delta="2")
    teacher.model = small_gpt2(products[0])  # 3 layers: 0, 2, 4 (clipped to the second SEP): 2 and 4 inside 6
    teacher.prepare_data()
    assert stage_said == [("warn", "ICoT-KD: only 2 of the 3 teacher states fall inside the CoT (median 6 tokens, "
                                   "delta 2); the others sit on the separators, which carry nothing of the reasoning to "
                                   "distil. Use a model with at least 4 layers (the paper: 12 to 24)")]
    stage_said.clear()
    warn_few_thoughts(teacher, 8)
    assert stage_said == []  # 0, 2, 4, 6: three inside
    student = stage_trainer(tmp_path, products, "StudentTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            subset="first_column")
    student.teacher = kd_saved.teacher
    student.prepare_data()
    assert stage_said == []
    emulator = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"))
    emulator.teacher = kd_saved.teacher
    emulator.prepare_data()
    assert stage_said == [("warn", "ICoT-KD: only 1 of the 3 teacher states fall inside the CoT (median 6 tokens, "
                                   "delta dynamic); the others sit on the separators, which carry nothing of the "
                                   "reasoning to distil. Use a model with at least 4 layers (the paper: 12 to 24)")]
    stage_said.clear()
    emulator.accelerator = SimpleNamespace(is_main_process=False)
    warn_few_thoughts(emulator, 3)
    assert stage_said == []


def test_a_stage_without_cots_is_refused(tmp_path, products, kd_saved, stage_said):
    from icot.data.mult import mult_example

    import dataclasses

    no_cot = dataclasses.replace(mult_example(3, 4), cot="")
    for kind, settings in (("TeacherTrainer", {}), ("StudentTrainer", {"teacher_dir": "t"})):
        trainer = stage_trainer(tmp_path, encoded_products([no_cot]), kind, **settings)
        trainer.files = {"train": "T.txt"}
        with pytest.raises(UserError, match="^T.txt: no training example has a CoT"):
            trainer.prepare_data()


def test_a_teacher_states_stage_loads_its_frozen_teacher_beside_its_model(tmp_path, products, kd_saved):
    from icot.methods.kd.modules import MindReadingStudent, ThoughtEmulator

    teacher_dir = str(kd_saved.root / "teacher")
    trainer = stage_trainer(tmp_path, products, "StudentTrainer", teacher_dir=teacher_dir)
    assert trainer.teacher is None and trainer.resume is False and trainer.best_dir == tmp_path / "run" / "best"
    assert trainer.train_mode is False and trainer.stage == "student"
    lm = small_gpt2(products[0], seed=7).train()
    model = trainer.build_model(products[0], lm)
    assert isinstance(model, MindReadingStudent) and model.lm is lm and not model.training and not lm.training
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    torch.testing.assert_close(trainer.teacher.state_dict(), kd_saved.teacher.state_dict())
    half = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=teacher_dir, mixture="token",
                         softmax_temperature=0.2)
    emulator = half.build_model(products[0], small_gpt2(products[0], dtype=torch.bfloat16))
    assert isinstance(emulator, ThoughtEmulator) and next(half.teacher.parameters()).dtype == torch.bfloat16
    assert (emulator.mixture, emulator.softmax_temperature, emulator.mixture_size) == ("token", 0.2, len(products[0]))
    soft = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=teacher_dir, mixture_size=3)
    assert soft.build(small_gpt2(products[0])).mixture_size == 3
    with pytest.raises(UserError) as error:
        trainer.build_model(products[0], small_gpt2(products[0], layers=2))
    assert str(error.value) == (f"the student model {trainer.config.model} has 2 layers of width 16 but teacher "
                                f"{teacher_dir} has 3 of width 16; ICoT-KD needs the same number of layers and hidden size")
    on_meta = stage_trainer(tmp_path, products, "StudentTrainer", teacher_dir=teacher_dir)
    on_meta.accelerator = SimpleNamespace(device=torch.device("meta"))
    on_meta.build_model(products[0], small_gpt2(products[0]))
    assert next(on_meta.teacher.parameters()).device.type == "meta"  # the teacher goes to the run's device
    resumed = type(trainer)(trainer.config, True, tmp_path / "elsewhere")
    assert resumed.resume is True and resumed.best_dir == tmp_path / "elsewhere"


def test_a_teacher_states_stage_trains_on_answers_and_reads_the_teacher_from_the_cot(tmp_path, products, kd_saved):
    from icot.methods.kd.states import extract_teacher_states, teacher_cot_tokens

    trainer = stage_trainer(tmp_path, products, "StudentTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            delta="2", subset="bottom_row")
    trainer.teacher = kd_saved.teacher
    full = full_rows(products)
    batch = trainer.training_batch(full)
    assert batch["with_cot"] is full
    same_batch({k: v for k, v in batch.items() if k != "with_cot"}, answer_rows(products))
    torch.testing.assert_close(trainer.teacher_states(full), extract_teacher_states(kd_saved.teacher, full, 2, "bottom_row"))
    assert trainer.teacher_tokens(full).tolist() == teacher_cot_tokens(full, 3, 2, "bottom_row").tolist()
    trainer.config.subset = "first_column"
    assert trainer.teacher_tokens(full).tolist() == teacher_cot_tokens(full, 3, 2, "first_column").tolist()
    trainer.config.subset = "bottom_row"
    assert trainer.metadata() == {"kd_stage": "student", "teacher": str((kd_saved.root / "teacher").resolve()),
                                  "delta": "2", "subset": "bottom_row", "cot_removed": "all"}


def test_the_students_loss_reads_the_teachers_states_at_sep(tmp_path, products, kd_saved):
    from icot.evaluate import token_scores
    from icot.methods.kd.states import extract_teacher_states

    trainer = stage_trainer(tmp_path, products, "StudentTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            delta="1", subset="top_row")
    trainer.teacher = kd_saved.teacher
    student = kd_saved.student
    batch = trainer.training_batch(full_rows(products))
    batch["position_ids"] = batch["position_ids"] + 1  # positions and a mask of its own: the ones passed are used
    batch["attention_mask"][1, 1] = 0
    calls = []
    hook = student.lm.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("use_cache", "absent")),
                                                with_kwargs=True)
    loss = trainer.compute_loss(student, batch)
    hook.remove()
    assert calls == [False]  # training passes build no KV cache
    thoughts = extract_teacher_states(kd_saved.teacher, batch["with_cot"], 1, "top_row")
    with torch.no_grad():
        logits = read_by_hand(student.lm, student.thought_mlps, thoughts, batch["first_sep"], batch)
    expected = token_scores(logits, batch["labels"])
    assert loss.loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (expected[1].item(), expected[2].item())
    predictor = trainer.predictor(student)
    assert predictor.model is student and predictor.tokenizer is products[0] and predictor.teacher is kd_saved.teacher
    assert (predictor.delta, predictor.subset) == ("1", "top_row")


def test_the_emulators_losses_by_hand(tmp_path, products, kd_saved):
    from icot.methods.kd.modules import ThoughtEmulator
    from icot.methods.kd.states import extract_teacher_states, teacher_cot_tokens

    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            mixture="token", token_loss_weight=0.25, subset="top_row")
    trainer.teacher = kd_saved.teacher
    emulator = ThoughtEmulator(small_gpt2(products[0], seed=4), mixture="token")
    batch = trainer.training_batch(full_rows(products))
    batch["position_ids"] = batch["position_ids"] + 1  # positions and a mask of its own: the ones passed are used
    batch["attention_mask"][1, 1] = 0
    target = extract_teacher_states(kd_saved.teacher, batch["with_cot"], "dynamic", "top_row")
    tokens = teacher_cot_tokens(batch["with_cot"], 3, "dynamic", "top_row")
    emulation, token_loss, right, choices = trainer.emulation_losses(emulator, batch, forced=True)
    thoughts = emulated_by_hand(emulator, batch, batch["first_sep"], tokens)
    expected = ((thoughts - target) ** 2).sum(dim=(1, 2)) / 2
    torch.testing.assert_close(emulation, expected)
    with torch.no_grad():
        _, logits = emulator.emulate(*lm_inputs(batch).values(), batch["first_sep"], cot_tokens=tokens)
    log_probs = torch.log_softmax(logits, -1)
    expected_tokens = -log_probs.gather(2, tokens[:, :, None])[:, :, 0].sum(1)
    torch.testing.assert_close(token_loss, expected_tokens)
    assert right.item() == (logits.argmax(-1) == tokens).sum().item() and choices.item() == 9
    loss = trainer.compute_loss(emulator, batch)
    assert loss.loss_sum.item() == pytest.approx((expected + 0.25 * expected_tokens).sum().item(), rel=1e-5)
    assert loss.correct.item() == pytest.approx(right.item() * 3 / 9) and loss.count.item() == 3
    free, _, _, _ = trainer.emulation_losses(emulator, batch, forced=False)
    torch.testing.assert_close(free, ((emulated_by_hand(emulator, batch, batch["first_sep"]) - target) ** 2).sum((1, 2)) / 2)


def test_the_soft_emulator_has_no_token_choices(tmp_path, products, kd_saved):
    from icot.methods.kd.states import extract_teacher_states

    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"), delta="2")
    trainer.teacher = kd_saved.teacher
    emulator = kd_saved.emulator
    batch = trainer.training_batch(full_rows(products, (1, 0)))
    emulation, token_loss, right, choices = trainer.emulation_losses(emulator, batch, forced=True)
    target = extract_teacher_states(kd_saved.teacher, batch["with_cot"], 2, "diagonal")
    expected = ((emulated_by_hand(emulator, batch, batch["first_sep"]) - target) ** 2).sum((1, 2)) / 2
    torch.testing.assert_close(emulation, expected)
    assert token_loss.tolist() == [0.0, 0.0] and right.shape == choices.shape == () and right.item() == choices.item() == 0
    loss = trainer.compute_loss(emulator, batch)
    assert loss.loss_sum.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert loss.correct.item() == 0 and loss.count.item() == 2


def test_the_emulator_is_validated_by_its_emulation_loss(tmp_path, products, kd_saved, stage_said):
    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            eval_batch_size=2)
    trainer.teacher = kd_saved.teacher
    trainer.progress.step = 12
    emulation, _, _, _ = trainer.emulation_losses(kd_saved.emulator, trainer.training_batch(full_rows(products)), False)
    mean = emulation.sum().item() / 3
    scores, key = trainer.validation(kd_saved.emulator)
    assert scores == {"emulation_loss": pytest.approx(mean, rel=1e-5)} and key == (pytest.approx(-mean, rel=1e-5),)
    assert stage_said == [("write", f"step 12: val emulation loss {mean:.4f}")]
    assert stage_said.bars == [{"desc": "validate", "leave": False}]
    trainer.progress.best_step, trainer.progress.best_score = 10, (-2.5,)
    assert trainer.best_summary() == {"best_step": 10, "best_val_emulation_loss": 2.5}
    trainer.progress.best_step, trainer.progress.best_score = None, None
    assert trainer.best_summary() == {"best_step": None, "best_val_emulation_loss": None}
    assert trainer.metadata() == {"kd_stage": "emulator", "teacher": str((kd_saved.root / "teacher").resolve()),
                                  "delta": "dynamic", "subset": "diagonal", "cot_removed": "all", "mixture": "soft",
                                  "mixture_size": 1, "softmax_temperature": 0.05}


def test_the_token_emulator_is_tested_from_its_saved_best_model(tmp_path, products, kd_saved, stage_said):
    from icot.methods.kd.modules import ThoughtEmulator

    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            mixture="token", eval_batch_size=2)
    trainer.teacher = kd_saved.teacher
    emulator = ThoughtEmulator(small_gpt2(products[0], seed=4, dropout=0.5), mixture="token")  # tested in eval mode
    emulator.write(products[0], trainer.best_dir, {"method": "kd", "kd_stage": "emulator", "mixture": "token",
                                                   "mixture_size": len(products[0]), "softmax_temperature": 0.05})
    trainer.progress.step = 3
    emulation, _, right, choices = trainer.emulation_losses(emulator, trainer.training_batch(full_rows(products)), False)
    mean, accuracy = emulation.sum().item() / 3, right.item() / 9
    scores, _ = trainer.validation(emulator)
    assert scores == {"emulation_loss": pytest.approx(mean, rel=1e-5), "thought_token_accuracy": pytest.approx(accuracy)}
    assert stage_said == [("write", f"step 3: val emulation loss {mean:.4f}, val thought token accuracy {accuracy:.4f}")]
    stage_said.clear()
    assert trainer.test_metrics() == {"test_emulation_loss": pytest.approx(mean, rel=1e-5),
                                      "test_thought_token_accuracy": pytest.approx(accuracy)}
    assert stage_said == [("write", f"test emulation loss {mean:.4f} (3 examples)")]
    assert stage_said.bars[-1] == {"desc": "test", "leave": False}


def test_the_couple_stage_loads_the_student_and_the_emulator(tmp_path, products, kd_saved):
    from icot.methods.kd.modules import CoupledModel

    root = kd_saved.root
    trainer = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"),
                            emulator_dir=str(root / "emulator"))
    assert trainer.drop_cot is True and trainer.train_mode is False
    tokenizer, model = trainer.load_tokenizer_and_model(None)
    assert tokenizer.get_vocab() == products[0].get_vocab() and isinstance(model, CoupledModel) and not model.training
    torch.testing.assert_close(model.student.state_dict(), kd_saved.student.state_dict())
    torch.testing.assert_close(model.emulator.state_dict(), kd_saved.emulator.state_dict())
    assert all(p.requires_grad for p in model.emulator.parameters()) and model.student.lm.dtype == torch.float32
    frozen = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"),
                           emulator_dir=str(root / "emulator"), freeze_emulator=True, precision="bf16")
    _, model = frozen.load_tokenizer_and_model(None)
    assert not any(p.requires_grad for p in model.emulator.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert model.student.lm.dtype == model.emulator.lm.dtype == torch.bfloat16
    mixed = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"),
                          emulator_dir=str(root / "teacher"))
    with pytest.raises(UserError, match="emulator_dir .*: not an ICoT-KD emulator"):
        mixed.load_tokenizer_and_model(None)
    from icot.methods.kd.modules import ThoughtEmulator

    short = tmp_path / "short"
    ThoughtEmulator(small_gpt2(products[0], layers=2)).write(products[0], short, {
        "method": "kd", "kd_stage": "emulator", "mixture": "soft", "mixture_size": 1, "softmax_temperature": 0.05})
    unequal = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"), emulator_dir=str(short))
    with pytest.raises(UserError) as error:
        unequal.load_tokenizer_and_model(None)
    assert str(error.value) == (f"emulator {short} has 2 layers of width 16 but student {root / 'student'} has 3 of width "
                                "16; ICoT-KD needs the same number of layers and hidden size")
    assert trainer.metadata() == {"kd_stage": "coupled", "student": str((root / "student").resolve()),
                                  "emulator": str((root / "emulator").resolve()), "freeze_emulator": False,
                                  "cot_removed": "all"}
    assert frozen.metadata()["freeze_emulator"] is True


def test_the_couple_stage_answers_from_emulated_thoughts(tmp_path, products, kd_saved):
    from icot.data.batching import collate
    from icot.evaluate import token_scores
    from icot.methods.kd.predictor import KDPredictor

    root = kd_saved.root
    trainer = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"),
                            emulator_dir=str(root / "emulator"))
    _, layout, data = products
    batch = trainer.training_batch(collate(data, np.array([0, 1, 2]), layout.pad_id, drop_cot=True))
    same_batch(batch, answer_rows(products))
    batch["position_ids"] = batch["position_ids"] + 1  # positions and a mask of its own: the ones passed are used
    batch["attention_mask"][1, 1] = 0
    coupled = kd_saved.coupled
    calls = []
    hook = coupled.student.lm.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs.get("use_cache", "absent")), with_kwargs=True)
    loss = trainer.compute_loss(coupled, batch)
    hook.remove()
    assert calls == [False]
    thoughts = emulated_by_hand(kd_saved.emulator, batch, batch["first_sep"])
    with torch.no_grad():
        logits = read_by_hand(kd_saved.student.lm, kd_saved.student.thought_mlps, thoughts, batch["first_sep"], batch)
    expected = token_scores(logits, batch["labels"])
    assert loss.loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (expected[1].item(), expected[2].item())
    predictor = trainer.predictor(coupled)
    assert type(predictor) is KDPredictor and predictor.model is coupled and predictor.tokenizer is products[0]


def test_the_couple_stage_saves_the_emulator_inside_the_coupled_model(tmp_path, products, kd_saved):
    root = kd_saved.root
    trainer = stage_trainer(tmp_path, products, "CoupleTrainer", student_dir=str(root / "student"),
                            emulator_dir=str(root / "emulator"))
    trainer.full_metadata = lambda: {"method": "kd", "train_file": "T", **trainer.metadata(), "step": 4}
    saved = []
    model = SimpleNamespace(emulator=SimpleNamespace(mixture="token", mixture_size=40, softmax_temperature=0.3),
                            save=lambda *args: saved.append(args))
    trainer.save_best(model)
    assert saved == [(products[0], trainer.best_dir, {"method": "kd", "train_file": "T", **trainer.metadata(), "step": 4},
                      {"method": "kd", "train_file": "T", "step": 4, "kd_stage": "emulator", "mixture": "token",
                       "mixture_size": 40, "softmax_temperature": 0.3})]


# ----- kd/pipeline.py --------------------------------------------------------------------------------

@pytest.fixture
def pipeline_said(monkeypatch):
    import icot.methods.kd.pipeline as pipeline

    lines = []
    monkeypatch.setattr(pipeline, "tqdm", SimpleNamespace(write=lines.append))
    return lines


def kd_pipeline(tmp_path, resume=False, **settings):
    from icot.methods.kd.pipeline import KDTrainer

    return KDTrainer(kd_config(tmp_path, **settings), resume)


def test_a_pipeline_starts_from_its_config_and_checks_its_trackers_first(tmp_path, monkeypatch):
    import icot.methods.kd.pipeline as pipeline
    from icot.methods.kd.config import KDConfig
    from icot.methods.kd.pipeline import KDTrainer

    assert KDTrainer.config_class is KDConfig
    trainer = kd_pipeline(tmp_path)
    assert trainer.resume is False and trainer.run_dir == tmp_path / "run" and trainer.config.out == str(tmp_path / "run")
    assert trainer.is_main is True and kd_pipeline(tmp_path, True).resume is True
    assert KDTrainer(trainer.config).resume is False
    asked = []
    monkeypatch.setattr(pipeline, "trackers", SimpleNamespace(log_with=asked.append))
    kd_pipeline(tmp_path, report_to="tensorboard")
    assert asked == ["tensorboard"]


def test_a_pipeline_checks_the_saved_models_it_is_given(tmp_path, kd_saved):
    root = kd_saved.root
    sw = write_metadata(tmp_path / "stepwise", {"method": "stepwise", "cot_removed": 3})
    kd_pipeline(tmp_path, teacher_dir=str(root / "teacher"), student_dir=str(root / "student"),
                emulator_dir=str(root / "emulator")).check_given_models()
    kd_pipeline(tmp_path).check_given_models()
    for settings, message in [
        (dict(teacher_dir=str(sw)), f"teacher_dir {sw}: a stepwise model trained with 3 CoT tokens removed (its "
                                    "icot.json); an ICoT-KD teacher writes its whole CoT: expected an explicit-CoT model "
                                    "(--method explicit)"),
        (dict(student_dir=str(root / "emulator")), f"student_dir {root / 'emulator'}: not an ICoT-KD student (its "
                                                   "icot.json says emulator)"),
        (dict(emulator_dir=str(root / "student")), f"emulator_dir {root / 'student'}: not an ICoT-KD emulator (its "
                                                   "icot.json says student)"),
    ]:
        with pytest.raises(UserError) as error:
            kd_pipeline(tmp_path, **settings).check_given_models()
        assert str(error.value) == message


def test_a_new_pipeline_run_starts_its_directory_and_a_resumed_one_does_not(tmp_path, monkeypatch):
    import icot.methods.kd.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "start_run_dir", lambda *args: calls.append(args))
    monkeypatch.setattr(pipeline, "check_data_readable", lambda config: calls.append(("read", config)))
    trainer = kd_pipeline(tmp_path)
    trainer.prepare_run_dir()
    run, config, is_main, wait, read = calls[0]
    assert (run, config, is_main) == (trainer.run_dir, trainer.config, True) and callable(wait)
    read()
    assert calls[1] == ("read", trainer.config)
    kd_pipeline(tmp_path, resume=True).prepare_run_dir()
    assert len(calls) == 2


def test_each_pipeline_stages_config_is_the_top_level_with_its_section_on_top(tmp_path):
    from icot.methods.kd.config import CoupleStage, EmulatorStage, StudentStage, TeacherStage
    from icot.methods.kd.stages import CoupleTrainer, EmulatorTrainer, StudentTrainer, TeacherTrainer

    trainer = kd_pipeline(tmp_path, lr=0.002, delta="2", subset="top_row", epochs=3,
                          teacher=TeacherStage(epochs=5, model="micro-deep"), student=StudentStage(lr=0.01),
                          emulator=EmulatorStage(init_from_teacher=True, mixture="token", token_loss_weight=0.5),
                          couple=CoupleStage(freeze_emulator=True, batch_size=4))
    models = {"teacher": "T", "student": "S", "emulator": "E"}
    run = tmp_path / "run"
    teacher = trainer.stage_trainer("teacher", models, last=False)
    cfg = teacher.config
    assert type(teacher) is TeacherTrainer and cfg.method == "explicit" and (cfg.delta, cfg.subset) == ("2", "top_row")
    assert (cfg.epochs, cfg.model, cfg.lr, cfg.out, cfg.overwrite) == (5, "micro-deep", 0.002, str(run / "teacher"), True)
    assert teacher.best_dir == run / "teacher" / "best" and teacher.resume is False
    student = trainer.stage_trainer("student", models, last=False)
    cfg = student.config
    assert type(student) is StudentTrainer and (cfg.teacher_dir, cfg.tokenizer) == ("T", "T")
    assert (cfg.lr, cfg.epochs, cfg.model, cfg.delta, cfg.subset) == (0.01, 3, "tiny", "2", "top_row")
    emulator = trainer.stage_trainer("emulator", models, last=True)
    cfg = emulator.config
    assert type(emulator) is EmulatorTrainer and (cfg.teacher_dir, cfg.tokenizer, cfg.model) == ("T", "T", "T")
    assert (cfg.mixture, cfg.token_loss_weight, cfg.lr, cfg.delta) == ("token", 0.5, 0.002, "2")
    assert emulator.best_dir == run / "best" and cfg.out == str(run / "emulator")
    couple = trainer.stage_trainer("couple", models, last=True)
    cfg = couple.config
    assert type(couple) is CoupleTrainer and (cfg.student_dir, cfg.emulator_dir) == ("S", "E")
    assert (cfg.freeze_emulator, cfg.batch_size, cfg.lr, cfg.method) == (True, 4, 0.002, "kd")
    assert couple.best_dir == run / "best"
    plain = kd_pipeline(tmp_path).stage_trainer("couple", models, last=False)
    assert plain.config.freeze_emulator is False and plain.best_dir == run / "couple" / "best"


def test_a_resumed_pipeline_resumes_only_the_stages_with_a_checkpoint(tmp_path):
    models = {"teacher": "T", "student": "S", "emulator": "E"}
    (tmp_path / "run" / "student" / "checkpoints" / "latest").mkdir(parents=True)
    resumed = kd_pipeline(tmp_path, resume=True)
    assert resumed.stage_trainer("student", models, last=False).resume is True
    assert resumed.stage_trainer("emulator", models, last=False).resume is False
    assert kd_pipeline(tmp_path).stage_trainer("student", models, last=False).resume is False


def test_a_pipeline_stages_config_is_validated(tmp_path):
    from icot.methods.kd.config import EmulatorStage

    trainer = kd_pipeline(tmp_path, emulator=EmulatorStage(mixture="token"))
    trainer.config.emulator.softmax_temperature = 0.0
    with pytest.raises(UserError) as error:
        trainer.stage_trainer("emulator", {"teacher": "T"}, last=False)
    assert str(error.value) == "config: softmax_temperature must be positive, got 0.0"


def test_a_pipeline_stage_finished_earlier_is_not_trained_again(tmp_path, pipeline_said):
    from icot.methods.kd.pipeline import _end_record

    run_dir = tmp_path / "student"
    run_dir.mkdir()
    stage = SimpleNamespace(run_dir=run_dir, best_dir=run_dir / "best", fit=lambda: {"event": "end", "trained": True})
    resumed = kd_pipeline(tmp_path, resume=True)
    assert _end_record(run_dir) is None
    assert resumed.run_stage("student", stage) == {"event": "end", "trained": True}
    assert pipeline_said == [f"ICoT-KD student: training in {run_dir}"]
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n{"event": "end", "n": 1}\n{"step": 3}\n'
                                           '{"event": "end", "n": 2}\n{"event": "endless"}\n{"event": "end", "n": 3}\n')
    assert _end_record(run_dir) == {"event": "end", "n": 3}  # the last
    pipeline_said.clear()
    assert resumed.run_stage("student", stage) == {"event": "end", "n": 3}
    assert pipeline_said == [f"ICoT-KD student: finished earlier, best model {run_dir / 'best'}"]
    assert kd_pipeline(tmp_path).run_stage("student", stage) == {"event": "end", "trained": True}
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n')
    assert _end_record(run_dir) is None and resumed.run_stage("student", stage)["trained"] is True


def test_a_pipeline_runs_its_stages_in_order_each_from_the_last_ones_best_model(tmp_path, kd_saved, monkeypatch):
    import icot.methods.kd.pipeline as pipeline

    root = kd_saved.root
    trainer = kd_pipeline(tmp_path, teacher_dir=str(root / "teacher"))
    calls = []
    monkeypatch.setattr(pipeline, "plot_kd_stages", lambda run, out: calls.append(("plot", run, out)))
    monkeypatch.setattr(trainer, "prepare_run_dir", lambda: calls.append("prepare") or trainer.run_dir.mkdir(parents=True))

    run = tmp_path / "run"

    def stage_trainer(stage, models, last):
        assert (tmp_path / ".run.lock").exists()  # the run is locked against other commands meanwhile
        calls.append((stage, dict(models), last))
        return SimpleNamespace(best_dir=run / "best" if last else run / stage / "best")

    def run_stage(stage, stage_trainer):
        assert stage_trainer.best_dir in (run / "best", run / stage / "best")  # the trainer made for it
        return {"event": "end", "stage": stage, "accuracy": len(stage)}

    monkeypatch.setattr(trainer, "stage_trainer", stage_trainer)
    monkeypatch.setattr(trainer, "run_stage", run_stage)
    summary = trainer.fit()
    # each stage starts from the given teacher and the best models the stages before it save in RUN/<stage>/best
    models = {"teacher": str(root / "teacher"), "student": str(run / "student" / "best"),
              "emulator": str(run / "emulator" / "best")}
    assert calls == ["prepare", ("student", models, False), ("emulator", models, False), ("couple", models, True),
                     ("plot", run, run / "plots" / "stages.png")]
    assert trainer.stage_needs() == {"student": [], "emulator": [], "couple": ["student", "emulator"]}
    assert (run / "plots").is_dir()
    with paths.one_writer(run):  # the last stage again, as a resumed run does: its plots folder is there already
        trainer.fit_stage("couple")
    assert calls[-1] == ("plot", run, run / "plots" / "stages.png")
    assert summary == {"stage": "couple", "accuracy": 6, "stages": {"student": {"stage": "student", "accuracy": 7},
                                                                     "emulator": {"stage": "emulator", "accuracy": 8},
                                                                     "couple": {"stage": "couple", "accuracy": 6}}}
    assert not (tmp_path / ".run.lock").exists()  # the lock goes when the block ends
    monkeypatch.setattr(type(trainer), "is_main", property(lambda self: False))
    monkeypatch.setattr(trainer, "fit_locked", lambda: (tmp_path / ".run.lock").exists())
    assert trainer.fit() is False  # a process that does not write takes no lock
    bad = kd_pipeline(tmp_path, student_dir=str(root / "emulator"))
    with pytest.raises(UserError, match="not an ICoT-KD student"):
        bad.fit_locked()


def test_the_emulators_token_choices_are_counted_per_layer(tmp_path, products, kd_saved):
    from icot.methods.kd.states import extract_teacher_states, teacher_cot_tokens

    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir=str(kd_saved.root / "teacher"),
                            mixture="token")
    trainer.teacher = kd_saved.teacher
    batch = trainer.training_batch(full_rows(products))
    tokens = teacher_cot_tokens(batch["with_cot"], 3, "dynamic", "diagonal")
    logits = torch.zeros(3, 3, len(products[0]))
    logits[:, :, next(i for i in range(len(products[0])) if i not in tokens)] = 1.0  # a wrong choice by default
    logits[0, :, :] = torch.nn.functional.one_hot(tokens[0], len(products[0])) * 5.0  # row 0: every choice right
    logits[1, 2, tokens[1, 2]] = 5.0  # row 1: its last
    target = extract_teacher_states(kd_saved.teacher, batch["with_cot"], "dynamic", "diagonal")
    model = SimpleNamespace(mixture="token", emulate=lambda *args, cot_tokens: (target + 1.0, logits))
    emulation, token_loss, right, choices = trainer.emulation_losses(model, batch, forced=True)
    assert emulation.tolist() == [3 * 16 / 2] * 3 and right.item() == 4 and choices.item() == 9
    loss = trainer.compute_loss(model, batch)
    assert loss.correct.item() == pytest.approx(4 * 3 / 9) and loss.count.item() == 3  # a share of each row's 3 choices
    torch.testing.assert_close(token_loss, -torch.log_softmax(logits, -1).gather(2, tokens[:, :, None]).sum((1, 2)))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_emulators_right_share_is_a_fraction_of_each_examples_choices(tmp_path, products, device):
    trainer = stage_trainer(tmp_path, products, "EmulatorTrainer", teacher_dir="t", mixture="token", token_loss_weight=0.5)
    tokens = torch.tensor([[2]], device=device)
    logits = torch.tensor([[[0.0, 0.0, 3.0]]], device=device)  # the right choice
    trainer.teacher_states = lambda batch: torch.zeros(1, 1, 2, device=device)
    trainer.teacher_tokens = lambda batch: tokens
    model = SimpleNamespace(mixture="token", emulate=lambda *args, cot_tokens: (torch.ones(1, 1, 2, device=device), logits))
    batch = {"with_cot": None, "first_sep": torch.zeros(1, device=device),
             **{k: torch.zeros(1, 2, device=device) for k in ("input_ids", "attention_mask", "position_ids")}}
    _, _, right, choices = trainer.emulation_losses(model, batch, forced=True)
    loss = trainer.compute_loss(model, batch)
    assert choices.device.type == right.device.type == loss.count.device.type == device
    if device == "cpu":
        assert (right.item(), choices.item(), loss.correct.item(), loss.count.item()) == (1, 1, 1.0, 1)
        cross_entropy = -torch.log_softmax(logits[0, 0], -1)[2].item()
        assert loss.loss_sum.item() == pytest.approx(1.0 + 0.5 * cross_entropy)  # (1 + 1) / 2 for the emulation

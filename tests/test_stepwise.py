"""Stepwise internalization: schedule, smoothing, optimizer resets, best-model rule, resume, end to end."""

import json
import math

import pytest
import torch

from icot.cli import build_train_config
from icot.data.format import read_examples
from icot.errors import UserError
from icot.methods.stepwise import StepwiseConfig, StepwiseTrainer
from icot.methods.stepwise.rewind import Rewind
from icot.methods.stepwise.schedule import AdaptivePace, RemovalSchedule, StepUnits, offset_distribution, tokens_to_remove
from conftest import mult_examples, run_cli


def test_schedule_arithmetic():
    s = RemovalSchedule(steps_per_token=3)
    assert [s.scheduled(k) for k in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    s = RemovalSchedule(steps_per_token=2, pretrain_steps=4, start_from=5, remove_all_beyond=7)
    assert [s.scheduled(k) for k in range(10)] == [5, 5, 5, 5, 5, 5, 6, 6, math.inf, math.inf]
    assert s.in_pretraining(3) and not s.in_pretraining(4)


def test_schedule_from_paper_settings():
    class Config:
        remove_per_epoch, pretrain_epochs, remove_start_from, remove_all_when_remove_beyond = 8, 1, 0, math.inf

    # 808k examples / batch 32 = 25250 steps per epoch: one more token every round(25250 / 8) = 3156 steps
    s = RemovalSchedule.from_config(Config, 25250)
    assert s.steps_per_token == 3156 and s.pretrain_steps == 25250
    assert s.scheduled(25250 + 3155) == 0 and s.scheduled(25250 + 3156) == 1
    Config.remove_per_epoch = 1e6  # more tokens than steps: never a zero-step interval
    assert RemovalSchedule.from_config(Config, 100).steps_per_token == 1
    Config.pretrain_epochs = 0.4  # explicit CoT for part of an epoch (a model from scratch)
    assert RemovalSchedule.from_config(Config, 3125).pretrain_steps == 1250


def test_adaptive_pace_rules():
    pace = AdaptivePace(target_accuracy=0.9, min_steps=3, max_steps=10, pretrain_steps=2, remove_all_beyond=5)
    assert pace.next_count(1, 0, 50, 1.0) == 0  # still pretraining
    assert pace.next_count(5, 2, 2, 1.0) == 2  # too few steps at this count
    assert pace.next_count(5, 2, 9, 0.89) == 2  # not accurate enough yet
    assert pace.next_count(5, 2, 3, 0.9) == 3  # recovered: next token
    assert pace.next_count(5, 2, 10, 0.0) == 3  # overdue: next token anyway
    assert pace.next_count(5, 4, 3, 0.95) == math.inf  # beyond remove_all_beyond: all of it
    assert pace.next_count(5, math.inf, 3, 1.0) == math.inf
    assert AdaptivePace(0.9, 3).next_count(5, 2, 10_000, 0.5) == 2  # no max_steps: waits for accuracy


def test_the_adaptive_paces_latest_full_removal_adds_each_counts_latest_steps():
    pace = AdaptivePace(0.9, min_steps=1, max_steps=3, pretrain_steps=5, start_from=1, late_from=3, late_max_steps=10,
                        late_until=5)
    assert pace.latest_full_removal(6) == 5 + 3 + 3 + 10 + 10 + 3  # counts 1-5, the late ones 3 and 4
    assert AdaptivePace(0.9, 1, 3, 5, 1, remove_all_beyond=3.5).latest_full_removal(6) == 5 + 3 + 3 + 3  # 1-3, then all
    assert AdaptivePace(0.9, 1, None, 5, 1).latest_full_removal(6) == math.inf


def test_a_pace_that_may_end_after_the_run_is_warned_with_the_step_it_needs(mult3_data, tmp_path, capsys):
    """No step is all right at pace_accuracy 1.0, so each count lasts pace_max_steps: the latest is the real one."""
    pace = ["--removal-pace", "adaptive", "--pace-accuracy", "1.0", "--pace-min-steps", "1", "--pace-max-steps", "1"]
    longest = max(len(e.cot.split()) for e in read_examples(mult3_data / "train.txt"))
    _, records = train_stepwise(mult3_data, tmp_path / "short", "--max-steps", longest, *pace)
    warning = (f"icot: warning: pace_max_steps 1: the adaptive pace may take until step {longest} to remove the longest "
               f"CoT's {longest} tokens, and the run ends at step {longest}; if it does, best/ will hold a model still "
               f"trained with CoT left (expected max_steps above {longest}, or a lower pace_max_steps)")
    assert warning in capsys.readouterr().err.splitlines()
    assert [r["step"] for r in records if r.get("event") == "removal"][-1] == longest - 1  # one token left to the end
    assert records[-1]["best_final_form"] is False
    _, records = train_stepwise(mult3_data, tmp_path / "long", "--max-steps", longest + 1, *pace)
    assert "adaptive pace may take" not in capsys.readouterr().err
    assert [r["step"] for r in records if r.get("event") == "removal"][-1] == longest  # the last token: the last step
    assert records[-1]["best_final_form"] is True


def test_adaptive_pace_waits_longer_late_in_the_cot():
    pace = AdaptivePace(0.9, min_steps=3, max_steps=10, late_from=30, late_max_steps=40)
    assert pace.next_count(5, 29, 10, 0.0) == 30  # before late_from: overdue after max_steps
    assert pace.next_count(5, 30, 10, 0.0) == 30  # from late_from on: waits up to late_max_steps
    assert pace.next_count(5, 30, 39, 0.0) == 30
    assert pace.next_count(5, 30, 40, 0.0) == 31
    assert pace.next_count(5, 30, 3, 0.95) == 31  # the gate still passes early


def test_adaptive_pace_waits_longer_only_inside_its_window():
    pace = AdaptivePace(0.9, min_steps=3, max_steps=10, late_from=15, late_max_steps=40, late_until=24)
    assert pace.next_count(5, 14, 10, 0.0) == 15
    assert pace.next_count(5, 15, 10, 0.0) == 15 and pace.next_count(5, 23, 39, 0.0) == 23
    assert pace.next_count(5, 23, 40, 0.0) == 24
    assert pace.next_count(5, 24, 10, 0.0) == 25  # past the window: max_steps again


@pytest.mark.parametrize("late", [{"pace_late_from": 30}, {"pace_late_max_steps": 900},
                                  {"pace_late_from": 30, "pace_late_max_steps": 10},
                                  {"pace_late_from": 30, "pace_late_max_steps": 900, "removal_pace": "fixed"},
                                  {"pace_late_until": 24},
                                  {"pace_late_from": 30, "pace_late_max_steps": 900, "pace_late_until": 30}])
def test_late_pace_settings_are_checked(late):
    with pytest.raises(UserError, match="pace_late"):
        StepwiseConfig(train_file="x", out="run", pace_min_steps=50, **{"removal_pace": "adaptive", **late}).validate()


def test_smoothing_distribution():
    p = offset_distribution(4.0)
    assert p.shape == (100,) and abs(p.sum().item() - 1) < 1e-12
    assert torch.allclose(p[1:] / p[:-1], torch.full((99,), math.exp(-4.0), dtype=torch.float64))
    assert offset_distribution(math.inf)[0] == 1 and offset_distribution(math.inf)[1:].sum() == 0
    draws = torch.multinomial(offset_distribution(1.0), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((draws == 0).float().mean().item() - (1 - math.exp(-1))) < 0.01
    cot = torch.tensor([3, 10, 0])
    assert tokens_to_remove(2, cot, torch.tensor([0, 1, 5])).tolist() == [2, 3, 7]
    assert tokens_to_remove(math.inf, cot, torch.tensor([0, 1, 5])).tolist() == [3, 10, 0]


def test_step_units_count_tokens_per_example():
    units = StepUnits.from_step_ends([[4, 10, 17, 24], [3, 8], []])
    assert units.most == 4
    assert units.table.tolist() == [[0, 4, 10, 17, 24], [0, 3, 8, 8, 8], [0, 0, 0, 0, 0]]
    rows, offsets = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 1, 3])
    assert units.tokens(1, rows, offsets).tolist() == [4, 3, 10, 0]
    assert units.tokens(3, rows, offsets).tolist() == [17, 8, 24, 0]  # past the last step: the whole CoT
    assert units.tokens(math.inf, rows, offsets).tolist() == [24, 8, 24, 0]
    assert units.column(2).tolist() == [10, 8, 0] and units.column(math.inf).tolist() == [24, 8, 0]
    right = StepUnits.from_step_ends([[4, 10, 17, 24], [3, 8], []], side="right")  # the last k steps
    assert right.table.tolist() == [[0, 7, 14, 20, 24], [0, 5, 8, 8, 8], [0, 0, 0, 0, 0]]


def test_step_units_need_a_separator_to_split_on():
    with pytest.raises(UserError, match="step_separator"):
        StepwiseConfig(train_file="x", out="run", removal_unit="step", steps="separator").validate()
    StepwiseConfig(train_file="x", out="run", removal_unit="step", steps="separator", step_separator=";").validate()


@pytest.mark.parametrize("settings", [dict(removal_unit="step", steps="mult", step_separator=";"),
                                      dict(steps="mult"), dict(step_separator=";")])
def test_step_settings_that_would_be_ignored_are_refused(settings):
    with pytest.raises(UserError, match="read only with"):
        StepwiseConfig(train_file="x", out="run", **settings).validate()


def test_step_units_with_uneven_steps_warn_and_shorten_batches(tmp_path, capsys):
    """2x2 and 3x3 mixed: first steps of 3 and 4 tokens. Pretraining removes nothing; the length
    buckets follow each example's own steps; keep_position says generation's gap is a median."""
    from icot.data.format import write_examples

    data = tmp_path / "data"
    data.mkdir()
    write_examples(data / "train.txt", mult_examples(2, 2, 32, seed=0) + mult_examples(3, 3, 32, seed=0))
    trainer, records = train_stepwise(data, tmp_path / "run", "--epochs", "3", "--pretrain-epochs", "1",
                                      "--remove-per-epoch", "1", "--removal-unit", "step", "--keep-position",
                                      "--removal-smoothing-lambda", "inf", "--save-every", "100")
    assert "generation places the position gap by the median" in capsys.readouterr().err
    events = [r for r in records if r.get("event") == "removal"]
    assert [(e["step"], e["removed_steps"]) for e in events] == [(4, 1)]  # 2 steps per epoch after 1 epoch of CoT
    first_step = trainer.units.column(1)
    assert sorted(set(first_step.tolist())) == [3, 4]
    lengths = trainer.train_data.lengths
    assert (trainer.batch_lengths(2) == lengths - first_step).all() and (trainer.batch_lengths(0) == lengths).all()


class CotStartTrainer(StepwiseTrainer):
    """Records, per step, the first CoT token left in every row of the training batch."""

    def training_batch(self, batch):
        batch = super().training_batch(batch)
        first = batch["input_ids"].gather(1, (batch["first_sep"] + 1)[:, None])[:, 0]
        self.__dict__.setdefault("cot_starts", []).append((self.current, self.tokenizer.convert_ids_to_tokens(first.tolist())))
        return batch


def test_step_units_remove_whole_reasoning_steps(mult3_data, tmp_path):
    # 3x3 CoT: `p1 + p2 ( s12 ) + p3` in steps of 4, 6, 7, 7 tokens; one count every 2 steps
    trainer, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "12", "--remove-per-epoch", "0.5",
                                      "--removal-unit", "step", "--removal-smoothing-lambda", "inf", "--keep-position",
                                      "--eval-every", "12", "--save-every", "12", cls=CotStartTrainer)
    events = [r for r in records if r.get("event") == "removal"]
    assert [(e["step"], e["removed_steps"], e["removed"]) for e in events][:4] == [
        (2, 1, 4), (4, 2, 10), (6, 3, 17), (8, 4, "inf")]
    starts = {count: set(tokens) for count, tokens in trainer.cot_starts}
    assert starts[1] == {"+"} and starts[2] == {"("} and starts[3] == {"+"}  # the CoT left begins at a step
    assert starts[4] == {trainer.tokenizer.eos_token}  # all gone: the SEP before the answer follows the prompt
    meta = json.loads((tmp_path / "run" / "best" / "icot.json").read_text())
    assert meta["cot_removed"] == "all" and meta["position_gap"] == 24


class RecordingTrainer(StepwiseTrainer):
    """Records the AdamW state size at the start of every step, after any reset."""

    def on_step_begin(self):
        super().on_step_begin()
        self.__dict__.setdefault("state_sizes", []).append(len(self.optimizer.optimizer.state))


def train_stepwise(data, out, *extra, cls=StepwiseTrainer):
    args = ["--data", str(data), "--model", "micro", "--out", str(out), "--lr", "3e-3", "--batch-size", "32",
            "--log-every", "1", *map(str, extra)]
    trainer_cls, config = build_train_config(None, "stepwise", args)
    trainer = cls(config)
    trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, records


def test_optimizer_resets_exactly_when_the_count_rises(mult3_data, tmp_path):
    # 32 examples, batch 32: one step per epoch; 2 steps per token; CoT of 3x3 = 24 tokens
    trainer, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "60", "--remove-per-epoch", "0.5",
                                      "--removal-smoothing-lambda", "inf", "--eval-every", "60", "--save-every", "60",
                                      cls=RecordingTrainer)
    events = [r for r in records if r.get("event") == "removal"]
    assert [e["step"] for e in events] == list(range(2, 60, 2))
    assert [e["removed"] for e in events] == list(range(1, 30))
    # reset while CoT remains (counts 1..24); none once the previous step had removed it all
    assert [e["optimizer_reset"] for e in events] == [True] * 24 + [False] * 5
    sizes = trainer.state_sizes
    assert all(sizes[e["step"]] == 0 for e in events[:24])  # state really cleared
    assert all(sizes[e["step"]] > 0 for e in events[24:])
    logged = [r for r in records if "loss" in r]
    assert [r["removed"] for r in logged][:5] == [0, 0, 1, 1, 2] and all("steps_per_token" in r for r in logged)


def test_best_model_is_chosen_after_full_removal(mult3_data, tmp_path):
    _, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "40", "--remove-per-epoch", "1",
                                "--removal-smoothing-lambda", "inf", "--eval-every", "5", "--save-every", "40")
    validations = [r for r in records if r.get("event") == "validation"]
    full = [v for v in validations if v["removed"] >= 24]
    assert full, "the CoT must be fully removed before the end"
    # the first validation after full removal is always kept; later ones only if better (exact match, then tokens)
    best = max(full, key=lambda v: (v["val_accuracy"], v["val_token_accuracy"], -v["step"]))
    saved = json.loads((tmp_path / "run" / "best" / "icot.json").read_text())
    assert saved["step"] == best["step"] and saved["cot_removed"] == "all"


def test_adaptive_pace_removes_on_overdue_steps(mult3_data, tmp_path):
    # so early in training no step gets all 32 sequences right (pace_accuracy 1.0): each count lasts pace_max_steps
    _, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "12", "--removal-pace", "adaptive",
                                "--pace-accuracy", "1.0", "--pace-min-steps", "2", "--pace-max-steps", "3",
                                "--eval-every", "12", "--save-every", "12")
    events = [r for r in records if r.get("event") == "removal"]
    assert [(e["step"], e["removed"]) for e in events] == [(3, 1), (6, 2), (9, 3)]
    assert all(e["optimizer_reset"] for e in events)
    assert [r["steps_at_count"] for r in records if "loss" in r][:5] == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("pace", [["--remove-per-epoch", "0.5"],
                                  ["--removal-pace", "adaptive", "--pace-min-steps", "2", "--pace-max-steps", "3"],
                                  ["--removal-unit", "step", "--remove-per-epoch", "0.5", "--removal-smoothing-lambda", "1"],
                                  ["--remove-per-epoch", "0.5", "--keep-position", "--running-sum-weight", "1"]],
                         ids=["fixed", "adaptive", "step-units", "running-sum"])
def test_resumed_schedule_matches_uninterrupted_run(mult3_data, tmp_path, pace):
    common = [*pace, "--save-every", "5", "--eval-every", "6", "--seed", "3"]
    full, full_records = train_stepwise(mult3_data, tmp_path / "full", "--epochs", "12", *common)
    half, _ = train_stepwise(mult3_data, tmp_path / "half", "--epochs", "6", *common)
    assert run_cli("train", "--resume", tmp_path / "half", "--epochs", "12") == 0
    resumed_records = [json.loads(l) for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    removal = lambda rs: [(r["step"], r["removed"], r["optimizer_reset"]) for r in rs if r.get("event") == "removal"]
    assert removal(resumed_records) == removal(full_records)
    losses = lambda rs: [round(r["loss"], 5) for r in rs if "loss" in r]
    assert losses(resumed_records) == losses(full_records)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "best" / "model.safetensors")
    b = load_file(tmp_path / "half" / "best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_where_the_count_rises_after_full_removal_keeps_adam(tmp_path):
    """2x2, one token a step: all 8 CoT tokens are gone at step 8 and the count rises again at 10,
    where the run resumes. The step before had no CoT, so Adam is kept there, resumed or not."""
    from icot.data.format import write_examples

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        write_examples(data / f"{split}.txt", mult_examples(2, 2, 32, seed=0))
    common = ["--remove-per-epoch", "1", "--removal-smoothing-lambda", "inf", "--save-every", "10", "--eval-every", "10",
              "--seed", "3"]
    _, full_records = train_stepwise(data, tmp_path / "full", "--epochs", "12", *common)
    train_stepwise(data, tmp_path / "half", "--epochs", "10", *common)
    assert run_cli("train", "--resume", tmp_path / "half", "--epochs", "12") == 0
    resumed_records = [json.loads(l) for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    reset_at = lambda rs, step: next(r["optimizer_reset"] for r in rs if r.get("event") == "removal" and r["step"] == step)
    assert reset_at(full_records, 10) is reset_at(resumed_records, 10) is False
    losses = lambda rs: [r["loss"] for r in rs if "loss" in r]
    assert losses(resumed_records) == losses(full_records)


def test_whole_cot_removed_and_model_answers_without_cot(mult3_data, tmp_path):
    _, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "150", "--remove-per-epoch", "1",
                                "--keep-position", "--eval-every", "50", "--save-every", "150")
    end = records[-1]
    # no CoT generated: SEP, '####' and 6 answer digits, EOS
    assert end["test_mean_generated_tokens"] == 1 + 7 + 1
    meta = json.loads((tmp_path / "run" / "best" / "icot.json").read_text())
    assert meta["cot_removed"] == "all" and meta["keep_position"] and meta["position_gap"] == 24


def test_adaptive_pace_counts_optimizer_steps_not_skipped_batches(tmp_path):
    """Batches skipped by max_len_train are not steps: each count still lasts pace_max_steps steps."""
    from icot.data.format import write_examples

    data = tmp_path / "data"
    data.mkdir()
    write_examples(data / "train.txt", mult_examples(2, 2, 32, seed=0) + mult_examples(3, 3, 32, seed=0))
    short = max(len(f"{e.question} x {e.cot} x #### {e.answer} x".split()) for e in mult_examples(2, 2, 32, seed=0))
    _, records = train_stepwise(data, tmp_path / "run", "--epochs", "6", "--batch-size", "16", "--removal-pace", "adaptive",
                                "--pace-accuracy", "1.0", "--pace-min-steps", "2", "--pace-max-steps", "3",
                                "--max-len-train", short, "--save-every", "100")
    assert sum(r.get("event") == "skipped_long_batch" for r in records) >= 6  # the 3x3 half of every epoch
    events = [r for r in records if r.get("event") == "removal"]
    assert [(e["step"], e["removed"]) for e in events] == [(3 * k, k) for k in range(1, 5)]  # 12 steps in 6 epochs


def test_training_runs_in_train_mode_and_evaluation_in_eval_mode(explicit_run, mult3_data, tmp_path):
    """from_pretrained returns a model in eval mode: training must switch dropout on, evaluation off."""
    from icot.methods.baselines import ExplicitTrainer

    modes = []

    class Recording(ExplicitTrainer):
        def load_tokenizer_and_model(self, texts_for_vocab):
            tokenizer, model = super().load_tokenizer_and_model(texts_for_vocab)
            model.register_forward_pre_hook(lambda m, args, kwargs: modes.append((kwargs.get("use_cache"), m.training)),
                                            with_kwargs=True)
            return tokenizer, model

    _, config = build_train_config(None, "explicit", ["--data", str(mult3_data), "--model", str(explicit_run / "best"),
                                                      "--out", str(tmp_path / "run"), "--max-steps", "4", "--eval-every", "2"])
    Recording(config).fit()
    training = {mode for use_cache, mode in modes if use_cache is False}  # the loop's forward passes
    evaluation = {mode for use_cache, mode in modes if use_cache is not False}  # validation and decoding
    assert training == {True} and evaluation == {False}


def test_rewind_counts_checks_below_the_floor():
    watch = Rewind(floor=0.1, patience=2, most=1)
    assert not watch.collapsed(0.0) and not watch.collapsed(0.0)  # no point to go back to yet
    watch.point = {"step": 1}
    assert not watch.collapsed(0.5) and not watch.collapsed(0.05)  # a check at the floor starts the count again
    assert watch.collapsed(0.09)
    watch.rewinds = 1
    assert not watch.collapsed(0.0)  # at most `most` times


def test_rewind_keeps_the_last_or_the_best_check():
    last, best = Rewind(0.1, 2, 1), Rewind(0.1, 2, 1, to="best")
    assert [last.keeps(a) for a in (0.05, 0.5, 0.3, 0.3)] == [False, True, True, True]
    assert [best.keeps(a) for a in (0.05, 0.5, 0.3, 0.5, 0.6)] == [False, True, False, False, True]


@pytest.mark.parametrize("settings", [dict(rewind_below=0), dict(rewind_below=1.5), dict(rewind_below=0.1, rewind_after=0),
                                      dict(rewind_below=0.1, rewind_max=0), dict(rewind_below=0.1, removal_pace="fixed"),
                                      dict(rewind_below=0.1, eval_every=None), dict(rewind_below=0.1)])  # no validation file
def test_rewind_settings_are_checked(settings):
    config = {"train_file": "x", "out": "run", "removal_pace": "adaptive", "eval_every": 10, **settings}
    with pytest.raises(UserError, match="rewind"):
        StepwiseConfig(**config).validate()


class ScriptedValidation(StepwiseTrainer):
    """Validation accuracy as scripted per step; records the weights and AdamW state each check saw
    and those right after a rewind."""

    script = {step: 0.5 if step <= 5 else 0.0 for step in range(1, 13)}

    def from_main(self, value):
        step = self.progress.step
        model = self.accelerator.unwrap_model(self.model_wrapped)
        states = self.__dict__.setdefault("seen", {})
        states[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                        {k: s["exp_avg"].clone() for k, s in self.optimizer.optimizer.state.items()})
        return self.script[step]

    def go_back(self):
        super().go_back()
        model = self.accelerator.unwrap_model(self.model_wrapped)
        self.after_rewind = {k: v.clone() for k, v in model.state_dict().items()}
        self.moments_after_rewind = {k: s["exp_avg"].clone() for k, s in self.optimizer.optimizer.state.items()}


REWIND = ["--removal-pace", "adaptive", "--pace-accuracy", "1.0", "--pace-min-steps", "2", "--pace-max-steps", "3",
          "--eval-every", "1", "--max-eval-examples", "2", "--rewind-below", "0.1", "--rewind-after", "3", "--rewind-max", "1",
          "--seed", "3"]


def test_rewind_goes_back_to_the_last_good_check_and_the_data_goes_on(mult3_data, tmp_path):
    # one step per epoch; steps 4-6 train with 1 token removed, 7-9 with 2; checks from step 6 on below the floor
    trainer, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "12", "--save-every", "100", *REWIND,
                                      "--lr-drop-step", "7", cls=ScriptedValidation)
    rewinds = [r for r in records if r.get("event") == "rewind"]
    assert [(r["step"], r["to_step"], r["removed"], r["rewinds"]) for r in rewinds] == [(8, 5, 1, 1)]
    weights, moments = trainer.seen[5]
    assert all(torch.equal(trainer.after_rewind[k], w) for k, w in weights.items())
    assert not all(torch.equal(trainer.seen[8][0][k], w) for k, w in weights.items())  # they did move in between
    restored = trainer.moments_after_rewind  # AdamW's state went back too
    assert restored.keys() == moments.keys() and all(torch.equal(restored[k], m) for k, m in moments.items())
    assert not all(torch.equal(trainer.seen[8][1][k], m) for k, m in moments.items())
    logged = {r["step"]: r for r in records if "loss" in r}
    assert logged[8]["removed"] == 2 and logged[9]["removed"] == 1  # the count went back with the weights
    assert sorted(logged) == list(range(1, 13)) and records[-1]["step"] == 12  # no step repeated: the data went on
    assert logged[12]["rewinds"] == 1  # checks 9 to 11 fall below again: rewind_max 1 allows no second
    # the drop (x0.3 from the 8th step) came 3 steps later again: the rewind undid steps 6 to 8
    assert [logged[k]["lr"] / 3e-3 for k in range(7, 13)] == pytest.approx([1, 0.3, 1, 1, 0.3, 0.3])


class ScriptedStart(ScriptedValidation):
    """Every check at 0.0; also records the weights the run started from."""

    script = {step: 0.0 for step in range(1, 30)}

    def on_step_begin(self):
        if self.progress.step == 0:
            model = self.accelerator.unwrap_model(self.model_wrapped)
            self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        super().on_step_begin()


def test_rewind_to_start_draws_the_run_again_once_the_cot_is_gone(mult3_data, tmp_path):
    # one step per epoch, 3 steps a count; every CoT is gone from count 2 on (logged steps 7-8 of a draw),
    # so checks count from there: draws of 8 steps
    trainer, records = train_stepwise(mult3_data, tmp_path / "run", "--epochs", "40", "--max-steps", "12",
                                      "--save-every", "100", "--remove-all-when-remove-beyond", "2",
                                      "--removal-smoothing-lambda", "inf", *REWIND, "--rewind-to", "start",
                                      "--rewind-after", "2", "--rewind-max", "2", "--lr-drop-step", "4", cls=ScriptedStart)
    rewinds = [r for r in records if r.get("event") == "rewind"]
    assert [(r["step"], r["to_step"], r["removed"]) for r in rewinds] == [(8, 0, 0), (16, 0, 0)]  # not checks 1-6
    assert all(torch.equal(trainer.after_rewind[k], w) for k, w in trainer.initial.items())
    assert trainer.moments_after_rewind == {}  # a fresh optimizer
    logged = {r["step"]: r for r in records if "loss" in r}
    assert [logged[k]["removed"] for k in range(4, 13)] == [1, 1, 1, "inf", "inf", 0, 0, 0, 1]  # the count starts again
    # each draw's schedule starts again, and the end comes the 16 undone steps later: 12 + 16
    assert [logged[k]["lr"] / 3e-3 for k in range(1, 29)] == pytest.approx(([1] * 4 + [0.3] * 4) * 3 + [0.3] * 4)
    assert records[-1]["step"] == 28 and sorted(logged) == list(range(1, 29))


def test_rewind_point_travels_in_checkpoints(mult3_data, tmp_path):
    _, full = train_stepwise(mult3_data, tmp_path / "full", "--epochs", "12", "--save-every", "5", *REWIND,
                             cls=ScriptedValidation)
    train_stepwise(mult3_data, tmp_path / "half", "--epochs", "5", "--save-every", "5", *REWIND, cls=ScriptedValidation)
    # a resume may allow one more rewind: checks 9 to 11 below the floor then go back to step 5 again
    _, config = build_train_config(None, "stepwise", ["--epochs", "12", "--rewind-max", "2"], resume=str(tmp_path / "half"))
    ScriptedValidation(config, resume=True).fit()
    resumed = [json.loads(l) for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    events = lambda rs: [(r["step"], r["to_step"]) for r in rs if r.get("event") == "rewind"]
    assert events(full) == [(8, 5)] and events(resumed) == [(8, 5), (11, 5)]
    losses = lambda rs: [round(r["loss"], 5) for r in rs if "loss" in r]
    assert losses(resumed)[:11] == losses(full)[:11] and losses(resumed)[11] != losses(full)[11]

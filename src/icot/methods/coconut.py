"""Coconut: chain of continuous thought (Hao et al. 2024; facebookresearch/coconut).

The CoT is a list of steps (data/steps.py). Training runs a curriculum of stages; at stage k
each training row is

    [BOS] input SEP <bot> (k*c thoughts) <eot> steps k+1.. SEP #### answer EOS

where a thought is no token: its input embedding is the last-layer hidden state of the position
before it (`hidden_states[-1]`, as coconut.py feeds back), so thoughts run one position at a time,
the KV cache carrying everything before them (`continuous_forward`). The loss covers the
remaining steps and the answer, never the input, the markers or the thoughts (dataset.py,
get_cot_latent_dataset). Stage 0 is CoT training with the two markers; past `max_latent_stage`
every step is gone and the row keeps max_latent_stage*c thoughts (the authors'
pad_latent_to_max, which their GSM8K runs use: the count then never depends on the gold CoT,
so the model can answer new questions). At inference: input SEP <bot>, the thoughts, <eot>,
then greedy decoding of whatever language steps remain and the answer (coconut.py, generate).

Schedule as run.py: stage = first_stage + (training progress) // epochs_per_stage, counted here
in optimizer steps so a fraction of an epoch per stage is possible. With probability
uniform_prob a row instead takes a stage drawn uniformly from 0..(its number of steps).

Differences from the authors' code, on purpose:
- `reset_optimizer: stage` (default) clears AdamW's state when the stage changes, as the paper
  describes; the authors' run.py builds a new AdamW at every epoch, which `epoch` reproduces (the
  published GSM8K config uses it).
- Rows are left-padded so that every row's <bot> sits in one column (the authors' MyCollator
  aligns the first thought the same way); our BOS/SEP layout replaces their "\\n" separators.
- The best model (RUN/best) is chosen among validations at the final stage, where no language
  step is left, as for stepwise internalization; the authors pick a checkpoint by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from icot.config import choice, inherit, option
from icot.data.steps import KINDS, check_separator, resolve_kind, setting_label, token_step_ends, unsplit_error
from icot.errors import UserError
from icot.evaluate import token_scores
from icot.methods.coconut_model import CoconutPredictor, removed_and_thoughts
from icot.methods.thoughts import ThoughtLM, ThoughtTokens, add_thought_tokens, thought_batch
from icot.trainer import Loss, TrainConfig, Trainer



@dataclass
class CoconutConfig(TrainConfig):
    """Defaults are the authors' GSM8K settings (args/gsm_coconut.yaml); lr 1e-4, no clipping. Where
    the paper and their code differ, the code's: AdamW reset every epoch, shuffled batches. Their
    batch 32 is per GPU (4 GPUs: 128 a step); first_stage 0 is their code's default, their GSM8K
    recipe starts at 1 from a CoT model."""

    method: str = option("coconut", help="coconut: continuous thoughts replace the CoT's steps, stage by stage "
                                         "(Hao et al. 2024)")
    lr: float = inherit(TrainConfig, "lr", 1e-4, "the default here is the authors' (GSM8K)")
    max_grad_norm: float = inherit(TrainConfig, "max_grad_norm", 0.0, "the default here is the authors'")
    c_thought: int = option(2, help="continuous thoughts per replaced CoT step (the authors' GSM8K: 2)")
    epochs_per_stage: float = option(3.0, help="epochs at each stage of the curriculum (a fraction is allowed; the "
                                               "authors': 3)")
    max_latent_stage: int = option(3, help="the last stage that replaces one more step; past it every step is "
                                           "replaced by max_latent_stage x c_thought thoughts (the authors': 3)")
    first_stage: int = option(0, help="the stage training starts at (the authors' GSM8K run starts at 1 from a CoT "
                                      "model, their `resume: 3` epochs)")
    uniform_prob: float = option(0.0, help="the probability that a row takes a stage drawn uniformly from 0 to its "
                                           "number of steps instead of the scheduled one")
    reset_optimizer: str = choice("stage", "epoch", "never", default="epoch",
                                  help="clear AdamW's state at each epoch (the authors' run.py), at each stage "
                                       "change (the paper's text) or never")
    group_by_length: bool = inherit(TrainConfig, "group_by_length", False,
                                    "the default here is the authors' (their loader shuffles)")
    steps: str = choice(*KINDS, default="auto", help="how a CoT splits into steps (data/steps.py)")
    step_separator: str | None = option(None, help="steps separator: the string between two steps in a CoT (read "
                                                   "only with it)")

    def validate(self) -> None:
        super().validate()
        if self.c_thought < 1 or self.max_latent_stage < 1:
            raise UserError("config: c_thought and max_latent_stage must be at least 1")
        if not self.epochs_per_stage > 0:
            raise UserError(f"config: epochs_per_stage must be positive, got {self.epochs_per_stage}")
        if not 0 <= self.first_stage <= self.max_latent_stage + 1:
            raise UserError(f"config: first_stage must be in 0..max_latent_stage+1, got {self.first_stage}")
        if not 0 <= self.uniform_prob <= 1:
            raise UserError(f"config: uniform_prob must be in [0, 1], got {self.uniform_prob}")
        check_separator(self.steps, self.step_separator)


# ----- the curriculum ---------------------------------------------------------------------------


def check_curriculum(step_ends: list[list[int]], cots: list[str], steps: str, max_latent_stage: int) -> None:
    """The curriculum acts on this data: some CoT splits into steps (`steps` names the setting), and
    the last latent stage has a step to replace."""
    longest = max(map(len, step_ends), default=0)
    if longest < 2:
        raise unsplit_error(steps, cots, "stage 1 would replace every whole CoT")
    if max_latent_stage > longest:
        raise UserError(f"max_latent_stage {max_latent_stage}: the longest training CoT has {longest} steps under "
                        f"{steps}, so stages past {longest} have no step left to replace; expected at most {longest}")


# ----- training -----------------------------------------------------------------------------------


class CoconutTrainer(Trainer):
    config_class = CoconutConfig
    keeps_examples = True  # the CoT text is split into steps
    supports_gradient_checkpointing = False  # the thoughts run with the KV cache

    def __init__(self, config: CoconutConfig, resume: bool = False, best_dir=None):
        super().__init__(config, resume, best_dir)
        self.stage = config.first_stage
        self.resets = 0
        self.marks: ThoughtTokens | None = None
        self.step_kind: str | None = None
        self.step_ends: list[list[int]] = []

    @property
    def final_stage(self) -> int:
        return self.config.max_latent_stage + 1

    # ----- model and data ----------------------------------------------------------------------

    def build_model(self, tokenizer, model):
        self.marks = add_thought_tokens(tokenizer, model)
        return ThoughtLM(model, self.marks.latent)

    def prepare_data(self) -> None:
        cfg = self.config
        self.require_cot()
        self.step_kind = resolve_kind(cfg.steps, self.train_data.examples, cfg.step_separator)
        cots = [e.cot for e in self.train_data.examples]
        self.step_ends = token_step_ends(self.tokenizer, cots, self.step_kind, cfg.step_separator)
        check_curriculum(self.step_ends, cots, setting_label(cfg.steps, self.step_kind, cfg.step_separator),
                         cfg.max_latent_stage)
        self.train_data.examples = None  # only the step ends are needed from here on

    # ----- schedule ----------------------------------------------------------------------------

    def steps_per_stage(self) -> int:
        return max(1, round(self.config.epochs_per_stage * self.steps_per_epoch))

    def stage_at(self, step: int) -> int:
        return min(self.config.first_stage + step // self.steps_per_stage(), self.final_stage)

    def check_run_length(self) -> None:
        """A run that ends before the final stage would save a model of an earlier stage as Coconut's."""
        super().check_run_length()
        cfg, final = self.config, self.final_stage
        start = (final - cfg.first_stage) * self.steps_per_stage()
        if self.total_steps <= start:
            why = f"max_steps {cfg.max_steps}" if cfg.max_steps else f"epochs {cfg.epochs}"
            raise UserError(f"coconut: the run trains {self.total_steps} steps ({why}), but the final stage {final} (every "
                            f"CoT step a thought) starts at step {start} ({final - cfg.first_stage} stages of "
                            f"{self.steps_per_stage()} steps: epochs_per_stage {cfg.epochs_per_stage} x "
                            f"{self.steps_per_epoch} steps per epoch), so its best model would be one of stage "
                            f"{self.stage_at(self.total_steps - 1)}; expected max_steps above {start} (or fewer "
                            "epochs_per_stage)")

    def on_step_begin(self) -> None:
        cfg, p = self.config, self.progress
        stage = self.stage_at(p.step)
        changed, self.stage = stage != self.stage, stage
        new_epoch = p.batch_in_epoch == 0
        reset = p.step > 0 and ((cfg.reset_optimizer == "stage" and changed) or (cfg.reset_optimizer == "epoch" and new_epoch))
        if reset:
            self.reset_optimizer_state()
            self.resets += 1
        if changed:
            self.log_event({"event": "stage", "step": p.step, "stage": stage, "optimizer_reset": reset})

    def row_stages(self, n_rows: int, step_counts: list[int]) -> list[int]:
        """The scheduled stage, or with probability uniform_prob one drawn from 0..(row's steps)."""
        mixed = torch.rand(n_rows, generator=self.rng) < self.config.uniform_prob
        drawn = [int(torch.randint(n + 1, (1,), generator=self.rng)) for n in step_counts]
        return [d if m else self.stage for m, d in zip(mixed.tolist(), drawn)]

    def training_batch(self, batch: dict) -> dict:
        cfg = self.config
        indices = batch["index"].tolist()
        ends = [self.step_ends[i] for i in indices]
        stages = self.row_stages(len(indices), [len(e) for e in ends])
        plan = [removed_and_thoughts(s, e, cfg.c_thought, cfg.max_latent_stage) for s, e in zip(stages, ends)]
        built = thought_batch(self.train_data, indices, [r for r, _ in plan], [n for _, n in plan], self.marks,
                              self.layout.pad_id)
        return {k: v.to(self.accelerator.device) for k, v in built.items()}

    def in_final_form(self) -> bool:
        """The last step trained at the final stage (a validation follows the step it is numbered by)."""
        return self.progress.step > 0 and self.stage_at(self.progress.step - 1) >= self.final_stage

    def compute_loss(self, model, batch) -> Loss:
        out = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return Loss(*token_scores(out.logits, batch["labels"]))

    def batch_lengths(self, epoch: int) -> np.ndarray:
        """Row lengths at the stage scheduled at the epoch's first step (group_by_length)."""
        cfg = self.config
        stage = self.stage_at(epoch * self.steps_per_epoch)
        plan = [removed_and_thoughts(stage, e, cfg.c_thought, cfg.max_latent_stage) for e in self.step_ends]
        removed, thoughts = np.array([p[0] for p in plan]), np.array([p[1] for p in plan])
        return self.train_data.lengths - removed + thoughts + 2

    # ----- state, inference, metadata ------------------------------------------------------------

    def method_state(self) -> dict:
        return {"stage": self.stage, "optimizer_resets": self.resets}

    def load_method_state(self, state: dict) -> None:
        self.stage, self.resets = state["stage"], state["optimizer_resets"]

    def predictor(self, model) -> CoconutPredictor:
        cfg = self.config
        return CoconutPredictor(model, self.tokenizer, cot_removed=math.inf,
                                stage=self.stage, c_thought=cfg.c_thought, max_latent_stage=cfg.max_latent_stage,
                                marks=self.marks, steps=self.step_kind, step_separator=cfg.step_separator)

    def metadata(self) -> dict:
        cfg = self.config
        return {"coconut_stage": self.stage, "c_thought": cfg.c_thought, "max_latent_stage": cfg.max_latent_stage,
                "thoughts": min(self.stage, cfg.max_latent_stage) * cfg.c_thought, "thought_tokens": self.marks.as_dict(),
                "steps": self.step_kind, "step_separator": cfg.step_separator}

    def postfix(self) -> dict:
        return {"stage": self.stage}

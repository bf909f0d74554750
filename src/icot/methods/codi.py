"""CODI: continuous chain of thought via self-distillation (Shen et al. 2025; zhenyi4/codi).

One model learns two tasks at once, from every training example:

    teacher  [BOS] input SEP cot SEP #### answer EOS                   cross-entropy after the first SEP
    student  [BOS] input SEP <bot> (N thoughts) <eot> SEP #### answer EOS   cross-entropy after <eot>

A thought is no token: its input embedding is the last-layer hidden state of the position before
it passed through a projection MLP (Dropout, Linear H->D, GELU, Linear D->H, LayerNorm; src/model.py,
CODI.__init__), so the first thought comes from <bot>'s state; the thoughts run one position at a
time with the KV cache (coconut.continuous_forward). A distillation loss makes the student's hidden
states at the token just before the answer (the last token of `SEP ####`) match the teacher's at
the same token, at every layer, embedding output included (`hidden_states`), the teacher side
detached:

    distill = mean over layers of SmoothL1(student_l, teacher_l) / std(teacher_l)

std over the batch's teacher states of that layer (distill_loss_div_std; `l2` divides the MSE
by the variance, as their code). The loss is teacher_loss_weight * teacher CE +
student_loss_weight * student CE + distill_loss_weight * distill, each CE a mean over its
tokens. As the authors' data code (include_last_cot false), the teacher's CoT loses its last
step (for GSM8K the one that computes the answer). Inference: input SEP <bot>, N thoughts,
<eot>, then greedy decoding (test.py).

Defaults are the authors' GSM8K GPT-2 run (scripts/train_gpt2_gsm8k-aug.sh): 6 thoughts,
projection of width 768 with LayerNorm and no dropout, smooth-L1 divided by the teacher std,
all three weights 1 (20 for the distillation in their Llama-1B script), lr 3e-3 with 3% warm-up
and cosine decay, weight decay 0.1, gradient clipping 2.0.

Saved form: the LM as a plain Hugging Face directory (with the three thought tokens in its
tokenizer), the projection beside it in codi_projection.safetensors, the thought count and
projection shape in icot.json.

Differences from the authors' code, on purpose:
- All weights are trained; the authors train LoRA adapters (r 128, alpha 32) and the projection
  over bf16 weights, and their lr 3e-3 is an adapter's (icot has no LoRA).
- Our layout replaces theirs (`question [eos]`, `The answer is: X`): the distilled token is the
  last one before the answer (for GPT-2 their `:`, with a Llama tokenizer the lone space token
  their `+1` lands on), found by decoding the answer segment.
- Padding is masked and positions count from each row's first token. Their default
  (fix_attn_mask false) lets the thoughts and the answer attend to the question's left padding.
- The teacher runs once; its hidden states are detached for the targets. They run it twice
  (without gradient for the targets, with it for the CE), which differs only in dropout masks.
- The new tokens start as the embedding of `<<` (shared with Coconut), not resize's default; a
  third, never-read placeholder token marks the thought positions.
- The warm-up is linear from lr/warmup (theirs, Hugging Face's, starts at 0); with a valid set
  the best validation model is kept (they keep the last); examples are not filtered by length
  or sign of the answer (max_len_drop is icot's filter).
- Training logs: `loss` is the weighted total, `token_accuracy` the student's, and the three
  parts (teacher_ce, student_ce, distill) are means over the logging window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from icot.config import changed, choice, inherit, option
from icot.data.batching import collate, remove_cot
from icot.data.layout import ANSWER_MARK, EncodedSet
from icot.data.steps import KINDS, check_separator, resolve_kind, setting_label, token_step_ends, unsplit_error
from icot.errors import UserError, warn
from icot.evaluate import token_scores
from icot.methods.codi_model import CodiModel
from icot.methods.thoughts import ThoughtPredictor, ThoughtTokens, add_thought_tokens, thought_batch
from icot.trainer import Loss, TrainConfig, Trainer

PARTS = ("teacher_ce", "student_ce", "distill")


@dataclass
class CodiConfig(TrainConfig):
    """Defaults: scripts/train_gpt2_gsm8k-aug.sh and src/model.py's TrainingArguments."""

    method: str = option("codi", help="codi: continuous thoughts learned by self-distillation (Shen et al. 2025)")
    lr: float = inherit(TrainConfig, "lr", 3e-3, "the default here is the authors' (for LoRA adapters)")
    weight_decay: float = inherit(TrainConfig, "weight_decay", 0.1, "the default here is the authors'")
    group_by_length: bool = inherit(TrainConfig, "group_by_length", False,
                                    "the default here is the authors' (their Trainer shuffles)")
    decay_matrices_only: bool = inherit(TrainConfig, "decay_matrices_only", True,
                                        "the default here is the authors' (they train with transformers' Trainer)")
    max_grad_norm: float = inherit(TrainConfig, "max_grad_norm", 2.0, "the default here is the authors'")
    lr_schedule: str = choice("cosine", "constant", default="cosine",
                              help="after the warm-up: cosine decay to 0 (the authors') or constant")
    warmup_ratio: float = option(0.03, help="warm-up optimizer steps as a fraction of the run (warmup_steps, if "
                                            "larger, wins; the authors': 0.03)")
    thoughts: int = option(6, help="continuous thoughts between <bot> and <eot> (the authors' GSM8K: 6)")
    projection: bool = option(True, help="pass each thought through the projection MLP (the authors' use_prj); "
                                         "false: thoughts are the raw last hidden states")
    projection_dim: int = option(768, help="the projection MLP's inner width (the authors': 768)")
    projection_dropout: float = option(0.0, help="the projection MLP's dropout probability, in [0, 1)")
    projection_layer_norm: bool = option(True, help="end the projection MLP with a LayerNorm (the authors' do)")
    teacher_loss_weight: float = option(1.0, help="weight of the teacher's cross-entropy on the CoT and answer")
    student_loss_weight: float = option(1.0, help="weight of the student's cross-entropy on the answer after the "
                                                  "thoughts")
    distill_loss_weight: float = option(1.0, help="weight of the distillation loss (the authors': 1 for GPT-2, 20 "
                                                  "for Llama-1B)")
    distill_loss: str = choice("smooth_l1", "l2", default="smooth_l1", help="distance of the distillation loss")
    distill_div_std: bool = option(True, help="divide each layer's distillation loss by the teacher states' std "
                                              "(l2: variance), as the authors' distill_loss_div_std")
    include_last_step: bool = option(False, help="the teacher's CoT keeps its last step (the authors' "
                                                 "include_last_cot: false drops it)")
    steps: str = choice(*KINDS, default="auto", help="how a CoT splits into steps, to drop its last (data/steps.py)")
    step_separator: str | None = option(None, help="steps separator: the string between two steps in a CoT (read "
                                                   "only with it)")

    def validate(self) -> None:
        super().validate()
        if self.thoughts < 1 or self.projection_dim < 1:
            raise UserError("config: thoughts and projection_dim must be at least 1")
        if not 0 <= self.projection_dropout < 1:
            raise UserError(f"config: projection_dropout must be in [0, 1), got {self.projection_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        weights = [self.teacher_loss_weight, self.student_loss_weight, self.distill_loss_weight]
        if min(weights) < 0 or self.student_loss_weight == 0:
            raise UserError("config: the loss weights must not be negative, and student_loss_weight must be positive "
                            "(the student is the model that answers)")
        if not self.include_last_step:
            check_separator(self.steps, self.step_separator)
        elif self.steps != "auto" or self.step_separator:
            raise UserError("config: steps and step_separator say which step the teacher's CoT drops; they are read only "
                            "with include_last_step: false")
        shaped = [name for name in ("projection_dim", "projection_dropout", "projection_layer_norm") if changed(self, name)]
        if shaped and not self.projection:
            warn(f"config: {', '.join(shaped)}: read only with projection: true (projection: false has none to shape)")


# ----- the model ---------------------------------------------------------------------------------


def projection_shape(cfg: CodiConfig) -> dict | None:
    if not cfg.projection:
        return None
    return {"dim": cfg.projection_dim, "dropout": cfg.projection_dropout, "layer_norm": cfg.projection_layer_norm}


# ----- rows and the distilled token ------------------------------------------------------------------


def answer_offset(tokenizer, segment: tuple[int, ...]) -> int:
    """Index, in the tokens of `#### answer`, of the last token before the answer: the mark's last
    token, or a lone space token after it (a Llama tokenizer's '▁', where the authors' +1 lands)."""
    offset = 0
    for k in range(1, len(segment)):
        text = tokenizer.decode(list(segment[:k])).strip()
        if text == ANSWER_MARK:
            offset = k - 1
        elif len(text) > len(ANSWER_MARK):
            break
    return offset


def answer_offsets(tokenizer, data: EncodedSet) -> np.ndarray:
    """answer_offset of every row (computed once per distinct answer segment)."""
    segments = [tuple(data.row(i)[data.n_prompt[i] + data.n_cot[i] + 1 : -1].tolist()) for i in range(len(data))]
    known = {s: answer_offset(tokenizer, s) for s in set(segments)}
    return np.array([known[s] for s in segments], dtype=np.int64)


def teacher_cot_lengths(tokenizer, data: EncodedSet, kind: str, separator: str | None) -> np.ndarray:
    """CoT tokens the teacher keeps: all but the last step's (none left of a one-step CoT)."""
    ends = token_step_ends(tokenizer, [e.cot for e in data.examples], kind, separator)
    return np.array([e[-2] if len(e) > 1 else 0 for e in ends], dtype=np.int64)


def teacher_batch(data: EncodedSet, indices, cot_kept, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows `[BOS] input SEP cot[:kept] SEP #### answer EOS`, labels after the first SEP."""
    batch = collate(data, indices, pad_id)
    return remove_cot(batch, batch["cot_len"] - torch.as_tensor(cot_kept), side="right", pad_id=pad_id)


def distill_columns(teacher: dict, student: dict, offsets: torch.Tensor, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher column, student column) of each row's last token before the answer: `offsets`
    tokens into the answer segment, which starts after the second SEP, or after <eot> and SEP."""
    teacher_at = teacher["first_sep"] + teacher["cot_len"] + 2 + offsets
    student_at = (student["input_ids"] == end_id).int().argmax(1) + 2 + offsets
    return teacher_at, student_at


def distillation_loss(student_states, teacher_states, student_at, teacher_at, kind: str = "smooth_l1",
                      div_std: bool = True) -> torch.Tensor:
    """Mean over layers of the distance between the student's and the (detached) teacher's states
    at the given columns, each layer's divided by its teacher states' std (src/model.py)."""
    rows = torch.arange(len(student_at), device=student_at.device)
    total = 0.0
    for student_layer, teacher_layer in zip(student_states, teacher_states, strict=True):
        predicted = student_layer[rows, student_at].float()
        target = teacher_layer[rows, teacher_at].detach().float()
        distance = F.smooth_l1_loss(predicted, target) if kind == "smooth_l1" else F.mse_loss(predicted, target)
        if div_std:
            distance = distance / (target.std() if kind == "smooth_l1" else target.std() ** 2)
        total = total + distance
    return total / len(student_states)


# ----- training -------------------------------------------------------------------------------------


class CodiTrainer(Trainer):
    config_class = CodiConfig
    keeps_examples = True  # the CoT text is split into steps
    supports_gradient_checkpointing = False  # the thoughts run with the KV cache

    def __init__(self, config: CodiConfig, resume: bool = False, best_dir=None):
        super().__init__(config, resume, best_dir)
        self.marks: ThoughtTokens | None = None
        self.step_kind: str | None = None
        self.teacher_cot: np.ndarray | None = None  # the teacher's CoT tokens per training example
        self.answer_offsets: np.ndarray | None = None

    def build_model(self, tokenizer, lm):
        self.marks = add_thought_tokens(tokenizer, lm)
        return CodiModel(lm, self.marks.latent, projection_shape(self.config))

    def prepare_data(self) -> None:
        cfg, data = self.config, self.train_data
        self.require_cot()
        if cfg.include_last_step:
            self.teacher_cot = data.n_cot.copy()
        else:
            self.step_kind = resolve_kind(cfg.steps, data.examples, cfg.step_separator)
            self.teacher_cot = teacher_cot_lengths(self.tokenizer, data, self.step_kind, cfg.step_separator)
            self.check_teacher_keeps_cot()
        self.answer_offsets = answer_offsets(self.tokenizer, data)
        data.examples = None

    def check_teacher_keeps_cot(self) -> None:
        """Dropping the last step of CoTs that never split leaves the teacher no CoT to distil from."""
        cfg, data = self.config, self.train_data
        if not self.teacher_cot.any():
            raise unsplit_error(setting_label(cfg.steps, self.step_kind, cfg.step_separator), [e.cot for e in data.examples],
                                "dropping its last step leaves the teacher no CoT (include_last_step: true keeps it)")

    def batch_lengths(self, epoch: int) -> np.ndarray:
        """The teacher rows' lengths (longer than the student's whenever the CoT outlasts the thoughts)."""
        data = self.train_data
        return data.lengths - data.n_cot + self.teacher_cot

    def schedule_factor(self, step: int) -> float:
        """Linear warm-up over warmup_ratio of the run, then cosine decay to 0 (or constant)."""
        cfg = self.config
        warmup = max(cfg.warmup_steps, round(cfg.warmup_ratio * self.total_steps))
        if cfg.lr_schedule == "cosine" and step >= warmup:
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, self.total_steps - warmup)))
        return min(1.0, (step + 1) / max(warmup, 1))

    def training_batch(self, batch: dict) -> dict:
        indices = batch["index"].tolist()
        data, pad = self.train_data, self.layout.pad_id
        teacher = teacher_batch(data, indices, self.teacher_cot[indices], pad)
        student = thought_batch(data, indices, data.n_cot[indices].tolist(), [self.config.thoughts] * len(indices),
                                self.marks, pad)
        teacher_at, student_at = distill_columns(teacher, student, torch.from_numpy(self.answer_offsets[indices]),
                                                 self.marks.end)
        device = self.accelerator.device
        teacher, student = ({k: v.to(device) for k, v in rows.items()} for rows in (teacher, student))
        # input_ids and attention_mask: the student rows, which the loop counts in its statistics
        return {"teacher": teacher, "student": student, "teacher_at": teacher_at.to(device),
                "student_at": student_at.to(device), "input_ids": student["input_ids"],
                "attention_mask": student["attention_mask"]}

    def compute_loss(self, model, batch) -> Loss:
        cfg = self.config
        teacher_out, student_out = model(batch["teacher"], batch["student"])
        teacher_sum, _, teacher_count = token_scores(teacher_out.logits, batch["teacher"]["labels"])
        student_sum, student_correct, student_count = token_scores(student_out.logits, batch["student"]["labels"])
        distill = distillation_loss(student_out.hidden_states, teacher_out.hidden_states, batch["student_at"],
                                    batch["teacher_at"], cfg.distill_loss, cfg.distill_div_std)
        parts = torch.stack([teacher_sum / teacher_count.clamp(min=1), student_sum / student_count, distill])
        weights = parts.new_tensor([cfg.teacher_loss_weight, cfg.student_loss_weight, cfg.distill_loss_weight])
        # the loop divides by the count it is given: the student's tokens, also its token accuracy's
        return Loss((weights * parts).sum() * student_count, student_correct, student_count,
                    dict(zip(PARTS, parts.detach())))

    # ----- logging, state, inference, metadata -------------------------------------------------

    def postfix(self) -> dict:
        return {"distill": f"{self.train_metrics['distill']:.3f}"} if "distill" in self.train_metrics else {}

    def predictor(self, model) -> ThoughtPredictor:
        return ThoughtPredictor(model.thought_lm(), self.tokenizer, cot_removed=math.inf, marks=self.marks,
                                thoughts=self.config.thoughts)

    def metadata(self) -> dict:
        cfg = self.config
        return {"thoughts": cfg.thoughts, "thought_tokens": self.marks.as_dict(), "projection": projection_shape(cfg),
                "cot_removed": "all", "steps": self.step_kind, "step_separator": cfg.step_separator}

"""The trainers of ICoT-KD stages (a), (b) and (c), each on the shared training loop.

Every stage trains on `input SEP #### answer EOS` batches (see `predictor.answer_only`); stages
(a) and (b) also carry the full batch with its CoT, from which the frozen teacher's states are
read. As in the paper's code, these stages train with dropout off (their models stay in eval mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from icot.data.batching import batch_indices_by_length, collate
from icot.data.tokenizers import load_tokenizer
from icot.errors import warn
from icot.evaluate import token_scores
from icot.methods.baselines import ExplicitTrainer
from icot.methods.kd.config import CoupleConfig, EmulatorConfig, StudentConfig, TeacherConfig, TeacherStatesConfig
from icot.methods.kd.modules import (TOKEN, CoupledModel, MindReadingStudent, ThoughtEmulator, check_same_shape,
                                     load_emulator, load_student)
from icot.methods.kd.predictor import KDPredictor, MindReadingPredictor, answer_only
from icot.methods.kd.states import extract_teacher_states, few_thoughts_warning, parse_delta, teacher_cot_tokens
from icot.models import decoder_layers, load_model
from icot.trainer import Loss, Trainer


class _KDStageTrainer(Trainer):
    """What every ICoT-KD stage shares: the authors train stages (a)-(c) in eval mode (no dropout)."""

    train_mode = False


def warn_few_thoughts(trainer: Trainer, num_layers: int) -> None:
    """Before training: say so when the teacher states would hold little of the CoT."""
    cfg = trainer.config
    message = few_thoughts_warning(trainer.train_data.n_cot.tolist(), num_layers, parse_delta(cfg.delta), cfg.subset)
    if message and trainer.is_main:
        warn(message)


class TeacherTrainer(ExplicitTrainer):
    """ICoT-KD's teacher: an explicit-CoT model, plus the depth check before it trains."""

    config_class = TeacherConfig

    def prepare_data(self) -> None:
        self.require_cot()
        warn_few_thoughts(self, len(decoder_layers(self.model)))


class _TeacherStatesTrainer(_KDStageTrainer):
    """Stages (a) and (b): a frozen teacher supplies, for every batch, the states to learn from.
    Subclasses name their `stage` and `build(lm)` their model around the LM of `model` (a fresh
    one, or the teacher's weights with `init_from_teacher`)."""

    config_class = TeacherStatesConfig
    stage = ""

    def __init__(self, config: TeacherStatesConfig, resume: bool = False, best_dir=None):
        super().__init__(config, resume, best_dir)
        self.teacher = None  # the frozen teacher LM, loaded with the model

    def build_model(self, tokenizer, lm):
        cfg = self.config
        teacher = load_model(cfg.teacher_dir, dtype=lm.dtype)
        check_same_shape(teacher, f"teacher {cfg.teacher_dir}", lm, f"the {self.stage} model {cfg.model}")
        self.teacher = teacher.requires_grad_(False).eval().to(self.accelerator.device)
        return self.build(lm).eval()

    def prepare_data(self) -> None:
        self.require_cot()
        warn_few_thoughts(self, len(decoder_layers(self.teacher)))

    def training_batch(self, batch: dict) -> dict:
        return {**answer_only(batch, self.layout.pad_id), "with_cot": batch}

    def teacher_states(self, batch_with_cot: dict) -> torch.Tensor:
        return extract_teacher_states(self.teacher, batch_with_cot, parse_delta(self.config.delta), self.config.subset)

    def teacher_tokens(self, batch_with_cot: dict) -> torch.Tensor:
        layers = len(decoder_layers(self.teacher))
        return teacher_cot_tokens(batch_with_cot, layers, parse_delta(self.config.delta), self.config.subset)

    def metadata(self) -> dict:
        cfg = self.config
        return {"kd_stage": self.stage, "teacher": str(Path(cfg.teacher_dir).resolve()), "delta": cfg.delta,
                "subset": cfg.subset, "cot_removed": "all"}



class StudentTrainer(_TeacherStatesTrainer):
    """Stage (a): the student reads MLP_l(z_l) at SEP and learns to answer from it."""

    config_class = StudentConfig
    stage = "student"

    def build(self, lm) -> MindReadingStudent:
        return MindReadingStudent(lm)

    def compute_loss(self, model, batch: dict) -> Loss:
        thoughts = self.teacher_states(batch["with_cot"])
        logits = model(thoughts=thoughts, thoughts_at=batch["first_sep"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False).logits
        return Loss(*token_scores(logits, batch["labels"]))

    def predictor(self, model) -> MindReadingPredictor:
        return MindReadingPredictor(model, self.tokenizer, teacher=self.teacher, delta=self.config.delta,
                                    subset=self.config.subset)


class EmulatorTrainer(_TeacherStatesTrainer):
    """Stage (b): the emulator learns to predict the teacher's states from `input SEP` alone.

    Loss per example: Σ_l ||ẑ_l − z_l||² / 2, averaged over examples; with the token mixture, plus
    token_loss_weight · Σ_l CE(h_l·components, teacher token at t_l), components teacher-forced.
    The token accuracy logged is that of the mixture's token choice (0 for the soft mixture).
    Validation runs as inference does (the argmax token) and the best model has the lowest
    emulation loss.
    """

    config_class = EmulatorConfig
    stage = "emulator"

    def build(self, lm) -> ThoughtEmulator:
        cfg = self.config
        return ThoughtEmulator(lm, cfg.mixture_size, cfg.softmax_temperature, cfg.mixture)

    def emulation_losses(self, model, batch: dict, forced: bool):
        """(per-example emulation loss [batch], per-example token loss [batch], right token choices, choices)."""
        with_cot = batch["with_cot"]
        target = self.teacher_states(with_cot)
        tokens = self.teacher_tokens(with_cot) if model.mixture == TOKEN else None
        emulated, logits = model.emulate(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                         batch["first_sep"], cot_tokens=tokens if forced else None)
        emulation = (emulated.float() - target.float()).pow(2).sum(dim=(1, 2)) / 2
        if logits is None:
            zero = emulation.new_zeros(())
            return emulation, torch.zeros_like(emulation), zero, zero
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none").sum(dim=1)
        right = (logits.argmax(dim=-1) == tokens).sum()
        return emulation, token_loss, right, torch.tensor(tokens.numel(), device=right.device)

    def compute_loss(self, model, batch: dict) -> Loss:
        emulation, token_loss, right, choices = self.emulation_losses(model, batch, forced=True)
        examples = len(emulation)
        # the loop divides both the loss and the right choices by the count: examples, so the
        # right choices enter as a fraction of each example's L choices
        right_share = right.float() * examples / choices.clamp(min=1)
        loss = (emulation + self.config.token_loss_weight * token_loss).sum()
        return Loss(loss, right_share, torch.tensor(examples, device=emulation.device))

    @torch.no_grad()
    def mean_losses(self, model, data, desc: str) -> dict:
        """Emulation loss per example and the token choices' accuracy, as at inference."""
        loss, right, choices = 0.0, 0, 0
        for indices in tqdm(batch_indices_by_length(data.lengths, self.config.eval_batch_size), desc=desc, leave=False):
            full = {k: v.to(self.accelerator.device) for k, v in collate(data, indices, self.layout.pad_id).items()}
            emulation, _, batch_right, batch_choices = self.emulation_losses(model, self.training_batch(full), forced=False)
            loss, right, choices = loss + emulation.sum().item(), right + int(batch_right), choices + int(batch_choices)
        scores = {"emulation_loss": loss / len(data)}
        if choices:
            scores["thought_token_accuracy"] = right / choices
        return scores

    def validation(self, model) -> tuple[dict, tuple[float, ...]]:
        """The emulator has no answers to score: the best is the lowest emulation loss."""
        scores = self.mean_losses(model, self.valid_data, "validate")
        tqdm.write(f"step {self.progress.step}: " + ", ".join(f"val {k.replace('_', ' ')} {v:.4f}" for k, v in scores.items()))
        return scores, (-scores["emulation_loss"],)

    def best_summary(self) -> dict:
        best = self.progress.best_score
        return {"best_step": self.progress.best_step, "best_val_emulation_loss": -best[0] if best else None}

    def test_metrics(self) -> dict:
        emulator = load_emulator(self.best_dir).to(self.accelerator.device).eval()
        scores = self.mean_losses(emulator, self.test_data, "test")
        tqdm.write(f"test emulation loss {scores['emulation_loss']:.4f} ({len(self.test_data)} examples)")
        return {f"test_{k}": v for k, v in scores.items()}

    def metadata(self) -> dict:
        cfg = self.config
        return {**super().metadata(), "mixture": cfg.mixture, "mixture_size": cfg.mixture_size,
                "softmax_temperature": cfg.softmax_temperature}


class CoupleTrainer(_KDStageTrainer):
    """Stage (c): emulator and student end to end on the answer loss alone (no CoT, no teacher)."""

    config_class = CoupleConfig
    drop_cot = True

    def load_tokenizer_and_model(self, texts_for_vocab):
        cfg = self.config
        tokenizer = load_tokenizer(cfg.student_dir)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        student, emulator = load_student(cfg.student_dir, dtype), load_emulator(cfg.emulator_dir, dtype)
        check_same_shape(student.lm, f"student {cfg.student_dir}", emulator.lm, f"emulator {cfg.emulator_dir}")
        emulator.requires_grad_(not cfg.freeze_emulator)
        return tokenizer, CoupledModel(emulator, student).eval()

    def training_batch(self, batch: dict) -> dict:
        return answer_only(batch, self.layout.pad_id)

    def compute_loss(self, model, batch: dict) -> Loss:
        logits = model(thoughts_at=batch["first_sep"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        return Loss(*token_scores(logits, batch["labels"]))

    def predictor(self, model) -> KDPredictor:
        return KDPredictor(model, self.tokenizer)

    def save_best(self, model) -> None:
        metadata = self.full_metadata()
        emulator = model.emulator
        emulator_meta = {**{k: v for k, v in metadata.items() if k not in self.metadata()}, "kd_stage": "emulator",
                         "mixture": emulator.mixture, "mixture_size": emulator.mixture_size,
                         "softmax_temperature": emulator.softmax_temperature}
        model.save(self.tokenizer, self.best_dir, metadata, emulator_meta)

    def metadata(self) -> dict:
        cfg = self.config
        return {"kd_stage": "coupled", "student": str(Path(cfg.student_dir).resolve()),
                "emulator": str(Path(cfg.emulator_dir).resolve()), "freeze_emulator": cfg.freeze_emulator,
                "cot_removed": "all"}

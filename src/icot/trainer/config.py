"""The settings every method shares (TrainConfig): data, model, optimisation, evaluation, output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from icot import trackers
from icot.answers import MODES as ANSWER_MODES
from icot.config import changed, choice
from icot.data.format import is_hub_name
from icot.errors import UserError


@dataclass
class TrainConfig:
    """Settings shared by every method. Paper defaults: lr 5e-5, batch 32, AdamW, grad-clip 1."""

    method: str = "explicit"
    # data: a directory with train.txt, valid.txt (and test.txt), or explicit files
    data: str | None = None
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_len_drop: bool = False
    # model and tokenizer
    model: str = "tiny"
    tokenizer: str | None = None
    max_positions: int = 1024
    # optimisation
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    # from this step on, lr x lr_drop_factor (a from-scratch model settles once its CoT is gone)
    lr_drop_step: int | None = None
    lr_drop_factor: float = 0.3
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = choice("fp32", "bf16", "bf16-mixed", "fp16-mixed", default="fp32")
    seed: int = 1234
    group_by_length: bool = True
    num_workers: int = 0
    compile: bool = False
    cpu: bool = False
    # evaluation, logging, output
    eval_every: int | None = None
    eval_batch_size: int = 64
    max_new_tokens: int | None = None
    answer_match: str = choice(*ANSWER_MODES, default="normalized",
                               help="exact match of answers after number normalisation, or of the text (answers.py)")
    log_every: int = 10
    # experiment trackers as Accelerate names them: tensorboard, wandb, mlflow, ... (comma-separated), all, none
    report_to: str = "none"
    tracker_project: str = "implicit-cot"  # the W&B project, MLflow experiment and RUN/tensorboard/ subdirectory
    save_every: int | None = None
    keep_checkpoints: int = 1
    out: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.data is None and self.train_file is None:
            raise UserError("config: no training data; set data (a directory) or train_file")
        if self.out is None:
            raise UserError("config: out is required (the run directory)")
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's generators take
            raise UserError(f"config: seed {self.seed}: expected a whole number from 0 to 2**32 - 1")
        if is_hub_name(self.data):
            from icot.data.gsm8k import hub_dataset_spec

            hub_dataset_spec(self.data)
        positive = ["epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every", "max_positions", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"config: {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr_drop_factor <= 1:
            raise UserError(f"config: lr_drop_factor must be in (0, 1], got {self.lr_drop_factor}")
        for name in ["max_steps", "eval_every", "save_every", "max_train_examples", "max_eval_examples", "max_new_tokens",
                     "lr_drop_step"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"config: {name} must be at least 1 (or null), got {value}")
        if not self.lr > 0:
            raise UserError(f"config: lr must be positive, got {self.lr}")
        if not trackers.requested(self.report_to) and changed(self, "tracker_project"):
            raise UserError(f"config: tracker_project {self.tracker_project} is read only with report_to (a tracker such "
                            "as tensorboard or wandb); drop it or set that")
        for name in ["weight_decay", "max_grad_norm", "warmup_steps", "num_workers"]:
            if getattr(self, name) < 0:
                raise UserError(f"config: {name} must not be negative, got {getattr(self, name)}")
        self.check_held_out_files()

    def check_held_out_files(self) -> None:
        """Validation or test on the training file measures training accuracy under another name: the
        same file is refused (a copy of it is warned about when the data is read: Trainer.load_data).
        Files not there are reported when the run starts (check_inputs)."""
        local = not is_hub_name(self.data) and (self.data is None or Path(self.data).is_dir())
        try:
            files = self.data_files() if local else {"train": self.train_file, "valid": self.valid_file,
                                                     "test": self.test_file}
        except UserError:  # a data directory without a training file
            return
        train = files["train"]
        for split in ("valid", "test"):
            held_out = files[split]
            there = train and held_out and Path(train).is_file() and Path(held_out).is_file()
            if there and os.path.samefile(train, held_out):
                raise UserError(f"{split}_file {held_out}: is the training file {train}, so its accuracy would be "
                                "training accuracy; expected held-out examples (icot data mult writes distinct splits)")
        valid, test = files["valid"], files["test"]
        if valid and test and Path(valid).is_file() and Path(test).is_file() and os.path.samefile(valid, test):
            raise UserError(f"test_file {test}: is the validation file, which picks the best model, so its accuracy "
                            "would not be a held-out measure; expected a separate test file")

    def require_valid_file(self, setting: str) -> None:
        """`setting` acts on validation accuracy: without a validation file it could never act."""
        if self.data_files()["valid"] is None:
            raise UserError(f"config: {setting} watches validation accuracy: give a validation file (valid_file, or "
                            "valid.txt in the data directory)")

    def data_files(self) -> dict[str, str | None]:
        files = {"train": self.train_file, "valid": self.valid_file, "test": self.test_file}
        if self.data is not None:
            folder = Path(self.data)
            if not folder.is_dir():
                raise UserError(f"data: {folder} is not a directory (expected train.txt, valid.txt, test.txt)")
            for split in files:
                if files[split] is None:
                    candidates = [folder / f"{split}.txt", folder / f"{split}.jsonl"]
                    files[split] = next((str(c) for c in candidates if c.exists()), None)
            if files["train"] is None:
                raise UserError(f"data: {folder} has no train.txt or train.jsonl")
        return files


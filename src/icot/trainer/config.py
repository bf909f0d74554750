"""The settings every method shares (TrainConfig): data, model, optimisation, evaluation, output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from icot import trackers
from icot.answers import MODES as ANSWER_MODES
from icot.config import changed, check_bounds, choice, fields_with, option
from icot.data.format import is_hub_name
from icot.data.sources import Columns, is_saved_dataset, split_files
from icot.errors import UserError
from icot.methods.registry import METHODS


@dataclass
class LoraSettings:
    """Low-rank adapters (LoRA, through the `peft` library) instead of training every weight; best/
    holds the adapters merged into the weights, a plain Hugging Face model."""

    r: int = option(0, bounds=">=0", help="the adapters' rank; 0: no adapters, every weight trains")
    alpha: float = option(16.0, bounds=">0", help="LoRA's scaling numerator: the update is alpha / r x B A")
    dropout: float = option(0.0, bounds=">=0", help="dropout on the adapters' input")
    target_modules: list[str] | None = option(
        None, help="names of the modules to adapt (e.g. c_attn, c_proj, c_fc for GPT-2; q_proj, k_proj, v_proj, "
                   "o_proj for Llama); null: peft's default for the architecture")
    modules_to_save: list[str] | None = option(
        None, help="names of the LM's modules trained in full beside the adapters (e.g. wte); a method's own "
                   "modules (CODI's projection, the running-sum probe) always train")

    def validate(self) -> None:
        check_bounds(self, ["r", "alpha", "dropout"], "lora.")
        if not self.dropout < 1:
            raise UserError(f"config: lora.dropout must be below 1, got {self.dropout}")
        if not self.r and (self.target_modules or self.modules_to_save):
            raise UserError("config: lora.target_modules and lora.modules_to_save are read only with lora.r above 0")


@dataclass
class TrainConfig:
    """Settings shared by every method. Paper defaults: lr 5e-5, batch 32, AdamW, grad-clip 1."""

    method: str = option("explicit", help=f"the training method: {', '.join(METHODS)} (methods/registry.py)")
    data: str | None = option(None, help="a directory of train, valid (or validation) and test files (.txt, .jsonl, "
                                         ".json, .csv or .parquet), a directory written by datasets' save_to_disk, "
                                         "one such file (its split column, if any, names each row's split) or a hub "
                                         "dataset hf:NAME[:CONFIG] (docs/data.md); null: give the files one by one "
                                         "(train_file, ...)")
    train_file: str | None = option(None, help="the training file (any format data takes); null: the training split "
                                               "of data")
    valid_file: str | None = option(None, help="the validation file, which picks the best model; null: the "
                                               "validation split of data, else no validation")
    test_file: str | None = option(None, help="the test file, evaluated once at the end; null: the test split of "
                                              "data, else no test")
    columns: Columns = option(default_factory=Columns, help="which record fields are the question, CoT and answer "
                                                            "(--columns.question problem, ...)")
    max_train_examples: int | None = option(None, bounds=">=1",
                                            help="train on the first this many examples; null: all of them")
    max_eval_examples: int | None = option(None, bounds=">=1", resumable=True,
                                           help="validate and test on the first this many examples; null: all of them")
    max_len_drop: bool = option(False, help="drop examples longer than the model's positions (logged) instead of "
                                            "refusing the data")
    model: str = option("tiny", help="a preset shape trained from scratch (micro, tiny, gpt2-small, ...: models.py), "
                                     "or a pretrained model's directory or hub id")
    tokenizer: str | None = option(None, help="a tokenizer directory or hub id, or 'word' (a word-level vocabulary "
                                              "built from the data); null: the model's own, word-level for a preset")
    max_positions: int = option(1024, bounds=">=1", help="the position table of a preset model, in tokens (a "
                                                         "pretrained model keeps its own)")
    epochs: int = option(1, bounds=">=1", resumable=True,
                         help="passes over the training data (read only without max_steps)")
    max_steps: int | None = option(None, bounds=">=1", resumable=True,
                                   help="optimizer steps to train, however many epochs they take (when given, it "
                                        "wins over epochs, as in Hugging Face's Trainer); null: epochs decide")
    max_train_seconds: float | None = option(
        None, bounds=">0", resumable=True,
        help="stop training once it has run this many seconds (training and data loading, not validation: the "
             "train_seconds of the records), then validate, keep the best model and test as at the end of max_steps; "
             "the run still ends at max_steps or epochs if sooner; null: no time limit")
    lr: float = option(5e-5, bounds=">0", resumable=True, help="AdamW's learning rate (the papers': 5e-5)")
    weight_decay: float = option(0.01, bounds=">=0", resumable=True, help="AdamW's weight decay")
    decay_matrices_only: bool = option(False, help="weight decay on matrices only, not on biases and norm weights (the "
                                                   "1-D tensors), as transformers' Trainer groups them; false: on every "
                                                   "weight, as ICoT-SI's and Coconut's authors' AdamW")
    warmup_steps: int = option(0, bounds=">=0", resumable=True,
                               help="optimizer steps over which the learning rate rises linearly from 0 to lr")
    lr_drop_step: int | None = option(None, bounds=">=1", resumable=True,
                                      help="from this optimizer step on, the learning rate is lr x lr_drop_factor (a "
                                           "from-scratch model settles once its CoT is gone); null: never")
    lr_drop_factor: float = option(0.3, bounds="(0,1]", resumable=True,
                                   help="what the learning rate is multiplied by from lr_drop_step on")
    batch_size: int = option(32, bounds=">=1", help="training examples per micro-batch on each process; an optimizer "
                                                    "step takes batch_size x grad_accum x processes (the papers': 32)")
    grad_accum: int = option(1, bounds=">=1", help="micro-batches whose gradients add up to one optimizer step")
    max_grad_norm: float = option(1.0, bounds=">=0", resumable=True,
                                  help="clip the gradient to this norm (the papers': 1); 0: no clipping")
    precision: str = choice("fp32", "bf16", "bf16-mixed", "fp16-mixed", default="fp32",
                            help="fp32; bf16 (weights and compute in bfloat16); or mixed precision: "
                                 "autocast in bf16 or fp16 over fp32 weights")
    seed: int = option(1234, help="the seed of initialisation, data order and sampling (0 to 2**32 - 1)")
    group_by_length: bool = option(True, help="sort each run of 64 batches by length before cutting it into batches "
                                              "(less padding)")
    num_workers: int = option(0, bounds=">=0", resumable=True,
                              help="data-loading worker processes; 0: load in the training process")
    compile: bool = option(False, resumable=True, help="compile the model with torch.compile (dynamic shapes)")
    gradient_checkpointing: bool = option(
        False, help="recompute each decoder layer's activations in the backward pass instead of keeping them (the "
                    "model's own gradient_checkpointing_enable): less memory, about a third more compute")
    lora: LoraSettings = option(default_factory=LoraSettings, help="LoRA adapters (--lora.r 8, ...)")
    fsdp: bool = option(False, help="shard weights, gradients and optimizer state over the processes (FSDP2, one unit "
                                    "per decoder layer; run under torchrun or accelerate launch; docs/scale.md); "
                                    "also on when accelerate launch is configured for FSDP")
    cpu: bool = option(False, resumable=True, help="train on the CPU even if there is a GPU")
    eval_every: int | None = option(None, bounds=">=1", resumable=True,
                                    help="validate every this many optimizer steps; null: at the end of each epoch")
    eval_batch_size: int = option(64, bounds=">=1", resumable=True, help="examples per batch when validating and "
                                                                         "testing")
    max_new_tokens: int | None = option(None, bounds=">=1", resumable=True,
                                        help="the most tokens generated per example when evaluating; null: the "
                                             "longest target in the data plus 8")
    answer_match: str = choice(*ANSWER_MODES, default="normalized",
                               help="exact match of answers after number normalisation, or of the text (answers.py)")
    log_every: int = option(10, bounds=">=1", resumable=True, help="log the training loss every this many optimizer "
                                                                   "steps")
    report_to: str = option("none", resumable=True,
                            help="experiment trackers as Accelerate names them: tensorboard, wandb, mlflow, ... "
                                 "(comma-separated), all, or none")
    tracker_project: str = option("implicit-cot", resumable=True,
                                  help="the W&B project, MLflow experiment and RUN/tensorboard/ subdirectory (read "
                                       "only with report_to)")
    save_every: int | None = option(None, bounds=">=1", resumable=True,
                                    help="save a checkpoint every this many optimizer steps; null: at the end of "
                                         "each epoch")
    keep_checkpoints: int = option(1, bounds=">=1", resumable=True,
                                   help="how many of the latest checkpoints to keep (older ones are removed)")
    out: str | None = option(None, help="the run directory (required): config, metrics, checkpoints, best model")
    overwrite: bool = option(False, help="start afresh in out even if it holds a run (which is removed)")

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
        check_bounds(self, fields_with(TrainConfig, "bounds"))
        self.check_fsdp()
        if not trackers.requested(self.report_to) and changed(self, "tracker_project"):
            raise UserError(f"config: tracker_project {self.tracker_project} is read only with report_to (a tracker such "
                            "as tensorboard or wandb); drop it or set that")
        self.check_held_out_files()

    def check_fsdp(self) -> None:
        """What sharded training cannot combine with, refused before any work."""
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch, configured for FSDP
            self.fsdp = True
        if not self.fsdp:
            return
        if self.precision == "fp16-mixed":
            raise UserError("config: fsdp with precision fp16-mixed needs a sharded gradient scaler, which icot does not "
                            "have; expected precision bf16-mixed, bf16 or fp32")
        if self.compile:
            raise UserError("config: fsdp with compile is not supported; expected compile false")

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
        """`setting` acts on validation accuracy: without a validation file it could never act. (The
        splits of a single file or a saved or hub dataset are known once read: the run warns there.)"""
        if self.data_files()["valid"] is None and not self.data_is_one_source():
            raise UserError(f"config: {setting} watches validation accuracy: give a validation file (valid_file, or "
                            "valid.txt in the data directory)")

    def data_is_one_source(self) -> bool:
        """Whether data is read whole (a file, a saved or hub dataset) rather than as a directory of files."""
        if self.data is None:
            return False
        return is_hub_name(self.data) or not Path(self.data).is_dir() or is_saved_dataset(Path(self.data))

    def data_files(self) -> dict[str, str | None]:
        """The file of each split: train_file, ... where given, else the file of a data directory; a
        file or dataset read whole (data_is_one_source) gives only the files given."""
        files = {"train": self.train_file, "valid": self.valid_file, "test": self.test_file}
        if self.data is None or is_hub_name(self.data):
            return files
        folder = Path(self.data)
        if not folder.exists():
            raise UserError(f"data: {folder} is not a directory or a file: no such path (expected a data directory, a "
                            "data file or hf:NAME)")
        if self.data_is_one_source():
            return files
        found = split_files(folder)
        files = {split: files[split] or (str(found[split]) if found[split] else None) for split in files}
        if files["train"] is None:
            raise UserError(f"data: {folder} has no train file (train.txt, .jsonl, .json, .csv or .parquet)")
        return files

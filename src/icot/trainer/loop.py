"""The shared training loop (Hugging Face Accelerate) that every method runs on.

A method is a `Trainer` subclass with its own config dataclass (`config_class`). It overrides
only the hooks of the section "what methods override" below (docs/ARCHITECTURE.md has the
table and a worked example); everything else lives here: data, optimizer, mixed precision,
multi-process runs, logging, validation, the best model, checkpoints and resume, and the
plumbing a method needs from them (a per-process random generator saved in checkpoints,
`reset_optimizer_state`, `all_processes`, `max_over_processes`, `from_main`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from icot import __version__, adapters, paths, trackers
from icot.answers import AnswerMatcher
from icot.config import to_dict
from icot.data.batching import collate
from icot.data.format import is_hub_name
from icot.data.sources import read_run_data
from icot.data.layout import EncodedSet, Layout, check_fits, encode
from icot.data.mult import describe_task
from icot.data.tokenizers import load_tokenizer, word_tokenizer
from icot.errors import UserError, warn
from icot.evaluate import Predictor, evaluate, token_scores
from icot.modelcard import add_evaluation, evaluation_record, write_model_card
from icot.models import LMWithModules, build_preset, is_preset, load_model, max_positions, read_metadata, save_model
from icot.sharding import Sharded, local
from icot.trainer import checkpoints
from icot.trainer.checkpoints import CHECKPOINTS, LATEST
from icot.trainer.config import TrainConfig
from icot.trainer.rundir import start_run_dir, write_config


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was saved at `step` and the run can be resumed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step

    def __reduce__(self):  # picklable: a demo's worker process sends it back
        return type(self), (self.signum, self.step)

    def describe(self, run) -> str:
        """What happened and how to go on, as `icot train` prints it."""
        return f"stopped by signal {self.signum} at step {self.step}, checkpoint saved; continue with: icot train --resume {run}"


class EvaluationInterrupted(TrainingInterrupted):
    """A signal stopped the test evaluation (or came before it): training is over, the best model
    `model` is saved, and its test on `data` can be run again."""

    def __init__(self, signum: int, step: int, model, data):
        super().__init__(signum, step)
        self.model, self.data = model, data

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.model, self.data)

    def describe(self, run) -> str:
        return (f"stopped by signal {self.signum} before the test evaluation ended; the best model is saved: test it "
                f"with icot eval --model {self.model} --data {self.data}, or finish the run with icot train --resume {run}")


@dataclass
class Progress:
    """Where training is: saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    examples: int = 0
    # the best validation's score, compared as a tuple (higher is better): exact match, then token accuracy,
    # which breaks ties (a baseline at 0.000 keeps its best model, not its first); None: no best yet
    best_score: list[float] | None = None
    best_step: int | None = None
    best_final: bool = True  # whether the best model is in the method's final form (Trainer.in_final_form)
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of this process over the same spans: wall time inflates when runs share cores
    method_state: dict = field(default_factory=dict)
    rng_state: list | None = None  # Trainer.rng's; checkpoints from before it was kept hold it in method_state
    metrics_bytes: int | None = None  # length of metrics.jsonl at the checkpoint: a resume cuts what follows

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "best_accuracy" in state:  # checkpoints from before best_score
            best = state.pop("best_accuracy"), state.pop("best_token_accuracy")
            state["best_score"] = None if math.isinf(best[0]) else list(best)
        state.setdefault("best_final", False)  # checkpoints from before it was kept: the next validation replaces it
        for key, value in state.items():
            setattr(self, key, value)

    def forget_best(self) -> None:
        """The next validation result becomes the best model, whatever it is."""
        self.best_score = None

    def is_best(self, score: tuple, final: bool = True) -> bool:
        """Whether a validated model replaces the best one: a model of the method's final form replaces one
        that is not, and never the reverse; among final ones the higher score wins, and a model of an
        earlier stage replaces the one before it (the latest is the nearest to the final form)."""
        if self.best_score is None:
            return True
        if final != self.best_final:
            return final
        return not final or tuple(score) > tuple(self.best_score)


class Loss(typing.NamedTuple):
    """What `compute_loss` returns for one micro-batch: the summed loss, the correct and the counted
    target tokens (the loop divides the sum by the count), and extra numbers to log, each
    averaged over the micro-batches of a logging window (e.g. a loss's parts)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    metrics: dict = {}


class BatchOrder:
    """Batches of training indices, reshuffled each epoch from (seed, epoch) alone.

    With group_by_length, each run of 64 batches is sorted by length before it is cut into
    batches, and the batches are shuffled: little padding, same randomness across resumes.
    `lengths` are the rows' lengths as fed (the Trainer sets them each epoch: `batch_lengths`).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if self.group:
            span = 64 * self.batch_size
            chunks = [order[i : i + span] for i in range(0, len(order), span)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            yield batch.tolist()


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Collate:
    """Picklable collate function (DataLoader workers). `index` holds each row's index in the
    training set, for methods that rebuild rows from per-example data (Coconut's reasoning steps)."""

    def __init__(self, data: EncodedSet, pad_id: int, drop_cot: bool):
        self.data, self.pad_id, self.drop_cot = data, pad_id, drop_cot

    def __call__(self, indices):
        return {**collate(self.data, indices, self.pad_id, self.drop_cot), "index": torch.as_tensor(indices)}


def native_bf16_cpu() -> bool:
    """Whether oneDNN, which runs torch's CPU matrix products, has bf16 kernels for this CPU (x86 with
    AVX-512, Arm with BF16); without them bf16 is emulated."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_bf16_emulated(precision: str, accelerator: Accelerator) -> None:
    """Emulated bf16 is legal but slow enough to turn an hour's run into a day's: say so before it starts."""
    if precision.startswith("bf16") and accelerator.device.type == "cpu" and accelerator.is_main_process \
            and not native_bf16_cpu():
        warn(f"precision {precision} on a CPU without native bf16: torch emulates bf16 matrix products, many "
             "times slower than fp32; --precision fp32 is faster here")


class Trainer:
    config_class = TrainConfig
    drop_cot = False  # rows without their CoT, `input SEP SEP #### answer EOS`, in training and at inference
    train_mode = True  # dropout while training, as the model's config says (from_pretrained returns eval mode)
    keeps_examples = False  # the training set keeps each example's text (EncodedSet.examples) for prepare_data
    # gradient checkpointing disables the KV cache in training: a method whose training passes use it cannot have it
    supports_gradient_checkpointing = True

    def __init__(self, config: TrainConfig, resume: bool = False, best_dir: Path | None = None):
        self.config = config
        self.resume = resume
        mixed = {"fp32": "no", "bf16": "no", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}[config.precision]
        # Accelerate forms a gloo process group for several CPU processes (torchrun) only when told to use the CPU.
        cpu = config.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
        self.run_dir = Path(config.out)
        log_with = trackers.log_with(config.report_to)  # a missing tracker package fails here, before any work
        # Pinned batches copy to a GPU without blocking (the loader pins them when the device is CUDA).
        self.accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accum, cpu=cpu,
                                       dataloader_config=DataLoaderConfiguration(non_blocking=True),
                                       log_with=log_with or None,
                                       project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                                           logging_dir=str(self.run_dir / "tensorboard")))
        warn_if_bf16_emulated(config.precision, self.accelerator)
        if config.gradient_checkpointing and not (self.supports_gradient_checkpointing and self.train_mode):
            why = "trains in eval mode, where checkpointing does nothing" if not self.train_mode else \
                "runs its training passes with the KV cache, which checkpointing turns off"
            raise UserError(f"gradient_checkpointing: --method {config.method} {why}; expected gradient_checkpointing false")
        if config.fsdp and not (torch.distributed.is_initialized() or "RANK" in os.environ):
            raise UserError("fsdp: shards over processes a launcher starts; run torchrun --nproc_per_node N -m icot.cli "
                            "train ... (or accelerate launch), N being 1 or more")
        self.best_dir = Path(best_dir) if best_dir is not None else self.run_dir / "best"
        self.progress = Progress()
        # one generator per process for a method's random draws, saved in checkpoints (resume is exact)
        self.rng = torch.Generator().manual_seed(config.seed + 7919 * self.accelerator.process_index)
        # set by fit(): the data, model and optimizer
        self.tokenizer = self.model = self.layout = self.task = None
        self.files: dict[str, str | None] = {}  # each split's name in messages: its file, or SOURCE (split NAME)
        self.copies: dict[str, bool] = {}  # whether the valid and test splits hold the training examples
        self.splits = self.hub_splits = None  # the data read before a new run's directory is written (read_inputs)
        self.train_data: EncodedSet | None = None
        self.valid_data: EncodedSet | None = None
        self.test_data: EncodedSet | None = None
        self.steps_per_epoch = self.total_steps = 0
        self.optimizer = self.model_wrapped = None
        self.sharding = None  # a sharding.Sharded with fsdp
        self.train_metrics: dict = {}  # the last logging window's numbers (loss, token accuracy, a method's metrics)
        self.matcher = AnswerMatcher(config.answer_match)
        self.stop_signal: int | None = None
        self.stop_at_once = False  # set once training is over: a signal then stops the command at once
        self.last_validated: int | None = None
        self.last_val_accuracy: float | None = None  # on the main process, which alone validates
        self.last_saved: tuple | None = None  # (step, last validated step) of the last checkpoint

    # ----- what methods override -------------------------------------------------------------

    def build_model(self, tokenizer, model):
        """The model to train, from the loaded (or preset) LM and its tokenizer: a method adds tokens
        or wraps the LM with its modules here."""
        return model

    def prepare_data(self) -> None:
        """After the data is read and encoded, before any training: check that the method can act on
        it and compute what it needs per training example."""

    def on_step_begin(self) -> None:
        """Called before the first micro-batch of every optimizer step."""

    def training_batch(self, batch: dict) -> dict | None:
        """The micro-batch as the method trains on it (`index`: each row's training example), or None
        to skip it."""
        return batch

    def compute_loss(self, model, batch: dict) -> Loss:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        return Loss(*token_scores(logits, batch["labels"]))

    def competes_for_best(self) -> bool:
        """Whether the best-model record stands after this optimizer step; False resets it, so the next
        validation replaces the saved model (a baseline past its goal keeps its last model)."""
        return True

    def in_final_form(self) -> bool:
        """Whether the model as it is now is of the method's final form (stepwise: no CoT left to
        remove; Coconut: the last stage). Progress.is_best: such a model always replaces a saved one
        that is not, so a run that reaches the final form saves one; the end record says whether it did."""
        return True

    def after_validation(self, accuracy: float) -> None:
        """Called on every process after each validation, with its exact-match accuracy."""

    def predictor(self, model) -> Predictor:
        return Predictor(model, self.tokenizer, cot_removed=math.inf if self.drop_cot else 0)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step `step`: the schedule's, times lr_drop_factor
        from lr_drop_step on; steps a method undid are taken again at the schedule's earlier values."""
        cfg = self.config
        step -= self.steps_undone()
        dropped = cfg.lr_drop_step is not None and step >= cfg.lr_drop_step
        return self.schedule_factor(step) * (cfg.lr_drop_factor if dropped else 1.0)

    def schedule_factor(self, step: int) -> float:
        """The schedule before any drop: linear warm-up, then constant."""
        return min(1.0, (step + 1) / max(self.config.warmup_steps, 1))

    def method_state(self) -> dict:
        """Method state to log with every training record and save in checkpoints."""
        return {}

    def method_state_for_checkpoint(self) -> dict:
        """What a checkpoint keeps of the method (method_state unless it needs more to resume exactly)."""
        return self.method_state()

    def load_method_state(self, state: dict) -> None:
        pass

    def metadata(self) -> dict:
        """The method's fields of icot.json: what loading and decoding the saved model needs."""
        return {}

    def postfix(self) -> dict:
        """Numbers for the progress bar beside the loss."""
        return {}

    def batch_lengths(self, epoch: int) -> np.ndarray:
        """Length of each training row as this method feeds it during `epoch`: what group_by_length
        sorts by, so that batches hold rows of similar length after any CoT removal. A function of
        the epoch alone, so that a resumed run orders its batches alike."""
        data = self.train_data
        return data.lengths - data.n_cot if self.drop_cot else data.lengths

    # ----- set-up ----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare_run_dir(self) -> None:
        run = self.run_dir
        if self.resume:
            checkpoints.latest(self.run_dir)
            return
        start_run_dir(run, self.config, self.is_main, self.accelerator.wait_for_everyone, self.read_inputs)

    def load_tokenizer_and_model(self, texts_for_vocab):
        cfg = self.config
        if is_preset(cfg.model):
            tokenizer = word_tokenizer(texts_for_vocab()) if cfg.tokenizer in (None, "word") else load_tokenizer(cfg.tokenizer)
            model = build_preset(cfg.model, len(tokenizer), tokenizer.eos_token_id, cfg.max_positions)
        else:
            if cfg.tokenizer == "word":
                raise UserError("tokenizer: 'word' builds a new vocabulary and only fits a preset model trained from scratch")
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
            # fp32 weights unless pure bf16: a checkpoint saved in bf16 (Mistral's) would otherwise train in bf16
            model = load_model(cfg.model, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
        if cfg.precision == "bf16":
            model = model.to(torch.bfloat16)
        model = self.build_model(tokenizer, model)
        if cfg.gradient_checkpointing:
            adapters.enable_gradient_checkpointing(model, cfg.model)
        return tokenizer, adapters.add_lora(model, cfg.lora) if cfg.lora.r else model

    def read_inputs(self) -> None:
        """A new run's data, read before its run directory is written: bad data leaves nothing behind.
        A hub dataset is held until load_data writes it into the run."""
        cfg = self.config
        if is_hub_name(cfg.data):
            from icot.data.sources import read_splits

            self.hub_splits = read_splits(cfg.data, cfg.columns)
        else:
            self.splits = self.read_data(cfg.data)

    def read_data(self, data) -> dict:
        """The train, valid and test splits (sources.Split or None) of `data` and the config's files; a
        missing validation split is said once, with how to add one."""
        cfg = self.config
        files = {split: getattr(cfg, f"{split}_file") for split in ("train", "valid", "test")}
        splits = read_run_data(data, files, cfg.columns)
        if splits["valid"] is None and self.is_main:
            warn(f"data {cfg.data or cfg.train_file}: no validation split, so nothing picks the best model (best/ is "
                 "the last) and no setting watching validation can act; add one with --valid-file FILE, a valid file "
                 "(valid.txt, .jsonl, .csv or .parquet) in the data directory, or rows whose split column says valid")
        return splits

    def hub_data_folder(self) -> Path:
        """`data: hf:NAME[:CONFIG]`: its splits, read by read_inputs, written into RUN/data/ (a resumed
        run reads the same files)."""
        from icot.data.sources import write_splits

        folder = self.run_dir / "data"
        if self.is_main and self.hub_splits is not None:
            for split, path in write_splits(self.hub_splits, folder).items():
                tqdm.write(f"{path}: the {split} split of {self.config.data}")
        self.accelerator.wait_for_everyone()
        return folder

    def encode_split(self, examples, name: str, keep: bool) -> EncodedSet:
        keep = keep or self.keeps_examples
        data = encode(self.tokenizer, self.layout, examples, keep_examples=keep, desc=f"tokenizing {name}")
        limit = max_positions(self.model)
        if self.config.max_len_drop and limit is not None:
            fits = data.lengths <= limit
            if not fits.all():
                dropped = int((~fits).sum())
                self.log_event({"event": "dropped_long_examples", "split": name, "count": dropped, "max_positions": limit})
                examples = [e for e, ok in zip(examples, fits) if ok]
                if not examples:
                    raise UserError(f"{name}: every example is longer than the model's {limit} positions")
                data = encode(self.tokenizer, self.layout, examples, keep_examples=keep, desc=f"tokenizing {name}")
        check_fits(data, limit, name)
        return data

    def require_cot(self) -> None:
        """A method that works on the CoT has nothing to work on in data without one."""
        if not self.train_data.n_cot.any():
            raise UserError(f"{self.files['train']}: no training example has a CoT (question||cot #### answer), which "
                            "this method works on; expected data with CoTs (--method nocot trains without)")

    def load_data(self) -> None:
        cfg = self.config
        splits = self.read_data(self.hub_data_folder()) if is_hub_name(cfg.data) else (
            self.splits or self.read_data(cfg.data))
        self.splits = self.hub_splits = None  # the encoded sets hold what training needs
        train = splits["train"].examples[: cfg.max_train_examples]
        valid, test = ((s.examples[: limit] if s else None)
                       for s, limit in ((splits["valid"], cfg.max_eval_examples), (splits["test"], None)))

        def vocab_texts():
            for examples in (train, valid or [], test or []):
                for ex in examples:
                    yield f"{ex.question} {ex.cot} {ex.answer}"

        self.tokenizer, self.model = self.load_tokenizer_and_model(vocab_texts)
        self.layout = Layout.for_tokenizer(self.tokenizer)
        self.files = {split: s.label if s else None for split, s in splits.items()}
        self.task = describe_task(train)
        self.train_data = self.encode_split(train, self.files["train"], keep=False)
        self.valid_data = self.encode_split(valid, self.files["valid"], keep=True) if valid else None
        self.test_data = self.encode_split(test, self.files["test"], keep=True) if test else None
        self.copies = {split: s is not None and s.examples == splits["train"].examples
                       for split, s in splits.items() if split != "train"}
        self.warn_copied_splits(splits)
        if is_preset(cfg.model) and cfg.tokenizer in (None, "word"):
            self.warn_untrained_words(train, {"valid": valid, "test": test})
        self.prepare_data()

    def warn_untrained_words(self, train, held_out: dict) -> None:
        """A word-level vocabulary holds the words of every split, but training teaches only those of
        the training split: a question with another word (a digit written otherwise) scores wrong."""
        known = {word for ex in train for word in f"{ex.question} {ex.cot} {ex.answer}".split()}
        for split, examples in held_out.items():
            lines = [n for n, ex in enumerate(examples or [], 1)
                     if any(w not in known for w in f"{ex.question} {ex.answer}".split())]
            if lines and self.is_main:
                ex = examples[lines[0] - 1]
                new = [w for w in f"{ex.question} {ex.answer}".split() if w not in known]
                warn(f"{self.files[split]}:{lines[0]}: {', '.join(map(repr, new[:5]))} never occur in the training "
                     f"data, so the model cannot learn them; {len(lines)} of {len(examples)} {split} examples have "
                     "such words and will score wrong")

    def warn_copied_splits(self, splits: dict) -> None:
        """Validation or test data that copies the training data measures training accuracy (a test on
        it is recorded as such: test_metrics); a test copying the validation data measures the data
        that picked the best model."""
        if not self.is_main:
            return
        train = self.files["train"]
        for split in ("valid", "test"):
            if self.copies[split]:
                warn(f"{split}_file {self.files[split]} holds the same examples as the training file {train}: its "
                     "accuracy is training accuracy, not a held-out measure (use held-out examples for one)")
        valid, test = splits["valid"], splits["test"]
        if valid is not None and test is not None and valid.examples == test.examples and not self.copies["test"]:
            warn(f"test_file {test.label} holds the same examples as the validation file {valid.label}, which picks "
                 "the best model: its accuracy is not a held-out measure (use a separate test file for one)")

    # ----- logging ---------------------------------------------------------------------------

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log_event(self, record: dict) -> None:
        """A record into metrics.jsonl, and its numbers to the trackers once they have started."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(to_dict_json(record)) + "\n")
            self.accelerator.log(trackers.scalars(record), step=record.get("step", self.progress.step))

    def start_trackers(self) -> None:
        """Accelerate's trackers (report_to), given the resolved config as hyperparameters. A resumed
        run starts them after its checkpoint is loaded: TensorBoard then drops the points past it."""
        if not self.accelerator.log_with:
            return
        resumed_step = self.progress.step if self.resume else None
        try:
            self.accelerator.init_trackers(self.config.tracker_project, config=trackers.hparams(to_dict(self.config)),
                                           init_kwargs=trackers.init_kwargs(self.run_dir, resumed_step))
        except Exception as e:  # a tracker's own failure (no login, no server) is the user's to fix, in one line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise UserError(f"report_to {self.config.report_to}: the tracker did not start "
                            f"({type(e).__name__}: {first})") from None

    def cut_metrics(self, size: int | None) -> None:
        """Drop the records written after the checkpoint being resumed: the resumed run writes
        them again (a killed run may also have left half a line). The `end` record of the step
        resumed from stays: a finished run extended with more steps keeps the test result it had.
        Checkpoints from before `metrics_bytes` was saved keep everything."""
        if not (self.is_main and size is not None and self.metrics_file.exists()):
            return
        with open(self.metrics_file, "rb+") as f:
            f.seek(size)
            ends = [line for line in f.read().splitlines(keepends=True) if _is_end_record(line, self.progress.step)]
            f.truncate(size)
            f.seek(size)
            f.write(b"".join(ends))

    # ----- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train, the run directory locked against any other command meanwhile (paths.one_writer)."""
        with paths.one_writer(self.run_dir, hold=self.is_main):
            return self.fit_locked()

    def fit_locked(self) -> dict:
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.seed)
        self.prepare_run_dir()
        self.load_data()
        order = BatchOrder(self.train_data.lengths, cfg.batch_size, cfg.seed, cfg.group_by_length)
        loader = DataLoader(_Indices(len(self.train_data)), batch_sampler=order, num_workers=cfg.num_workers,
                            collate_fn=_Collate(self.train_data, self.layout.pad_id, self.drop_cot),
                            pin_memory=acc.device.type == "cuda",
                            # each new iterator draws a seed from this generator; from the global RNG it would
                            # shift dropout's masks in a resumed run, which starts an iterator mid-epoch
                            generator=torch.Generator().manual_seed(cfg.seed))
        self.steps_per_epoch = math.ceil(math.ceil(len(order) / acc.num_processes) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs  # max_steps, when given, wins (as in HF)
        self.state_length()
        self.check_run_length()
        model, loader = self.prepare_model_and_optimizer(loader)
        model.train(self.train_mode)  # evaluate() switches to eval mode and back
        if cfg.compile:  # dynamic: CoT removal changes the sequence length from batch to batch
            model = torch.compile(model, dynamic=True)
        self.model_wrapped = model
        acc.register_for_checkpointing(self.progress)
        if self.resume:
            self.load_checkpoint()
        self.start_trackers()
        p = self.progress
        # What a wall time depends on, in every start and resume: a run may move to another machine.
        where = {"device": str(acc.device), "torch_threads": torch.get_num_threads(),
                 **({"cpu_native_bf16": native_bf16_cpu()} if acc.device.type == "cpu" else {})}
        if self.resume:
            self.log_event({"event": "resume", "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
                            **where})
        else:
            self.log_event({"event": "start", "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                            "train_examples": len(self.train_data), "longest_cot": int(self.train_data.n_cot.max(initial=0)),
                            "parameters": sum(w.numel() for w in self.model.parameters()),
                            "trainable_parameters": sum(w.numel() for w in self.model.parameters() if w.requires_grad),
                            "processes": acc.num_processes, **where, **self.method_state()})
        replaced = self._install_signal_handlers()
        bar = tqdm(total=self.end_step(), initial=p.step, desc=f"train {self.method_name}", disable=not self.is_main,
                   dynamic_ncols=True)
        try:
            self.train_loop(model, loader, order, bar)
            bar.close()
            return self.finish()
        finally:
            bar.close()  # nothing if closed already
            acc.end_training()  # the trackers flush and close, also when training stops on an error or a signal
            _restore_signal_handlers(replaced)  # a Ctrl-C after icot.train returns is the caller's again

    def prepare_model_and_optimizer(self, loader):
        """AdamW and Accelerate's wrapping (DDP with several processes), or, with fsdp, the model sharded
        (sharding.py) and AdamW over its shards; Accelerate then places and divides the batches only."""
        cfg, acc = self.config, self.accelerator
        if not cfg.fsdp:
            optimizer = self.new_optimizer()
            model, self.optimizer, loader = acc.prepare(self.model, optimizer, loader)
            return model, loader
        self.sharding = Sharded(self.model, acc.device, acc.num_processes, self.is_main, cfg.precision)
        self.optimizer = self.new_optimizer()
        return self.model, acc.prepare(loader)

    def new_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the weights (frozen ones get no gradient, so no state); with decay_matrices_only,
        biases and norm weights (1-D) in a group of their own without weight decay."""
        params = list(self.model.parameters())
        groups = [{"params": params}]
        if self.config.decay_matrices_only:
            groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
        for group, decay in zip(groups, self.weight_decays()):
            group["weight_decay"] = decay
        return torch.optim.AdamW(groups, lr=self.config.lr)

    def weight_decays(self) -> list[float]:
        """Each parameter group's weight decay (new_optimizer): the config's, none on the 1-D group."""
        return [self.config.weight_decay, 0.0] if self.config.decay_matrices_only else [self.config.weight_decay]

    def clip_gradients(self, model) -> None:
        if self.sharding is not None:  # the norm of the whole gradient, from every process's shards
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
        else:
            self.accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)

    def train_loop(self, model, loader, order: BatchOrder, bar) -> None:
        cfg, acc, p = self.config, self.accelerator, self.progress
        window = _Window(p)
        done = p.step >= self.end_step() or self.goal_reached() or self.time_is_up()
        new_step = True
        while not done and (cfg.max_steps or p.epoch < cfg.epochs):
            order.epoch, order.lengths = p.epoch, self.batch_lengths(p.epoch)
            batches = acc.skip_first_batches(loader, p.batch_in_epoch) if p.batch_in_epoch else loader
            window.mark()
            for batch in batches:
                if new_step:
                    self.on_step_begin()
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * self.lr_factor(p.step)
                batch = self.training_batch(batch)
                p.batch_in_epoch += 1
                if batch is None:  # the method skipped it (max_len_train)
                    continue
                with acc.accumulate(model):
                    loss_sum, correct, count, metrics = self.compute_loss(model, batch)
                    loss = loss_sum / count.clamp(min=1)
                    self.check_finite(loss)
                    acc.backward(loss)
                    if acc.sync_gradients:  # the last micro-batch of an optimizer step
                        if cfg.max_grad_norm > 0:
                            self.clip_gradients(model)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                window.add(loss_sum.detach(), correct, count, batch["attention_mask"].sum(), len(batch["input_ids"]), metrics)
                new_step = acc.sync_gradients
                if not new_step:
                    continue
                p.step += 1
                if not self.competes_for_best():
                    p.forget_best()
                bar.update(1)
                out_of_time = self.time_is_up()
                if p.step % cfg.log_every == 0 or p.step == self.end_step() or out_of_time:
                    self.log_train(window, bar)
                if cfg.eval_every and p.step % cfg.eval_every == 0:
                    self.validate()
                if cfg.save_every and p.step % cfg.save_every == 0 and p.step < self.end_step():  # the last: below
                    self.save_checkpoint()
                if self.stop_signal is not None:  # logged first: the checkpoint keeps the records before it
                    self.log_event({"event": "stopped", "signal": self.stop_signal, "step": p.step})
                    self.last_saved = None  # save_every may have saved this step already: again, with this record
                    self.save_checkpoint()
                    raise TrainingInterrupted(self.stop_signal, p.step)
                window.mark()
                bar.total = self.end_step()
                if p.step >= bar.total:
                    done = True
                    break
                if self.last_validated == p.step and self.goal_reached():
                    self.log_event({"event": "goal_reached", "step": p.step})
                    done = True
                    break
                if out_of_time:
                    self.log_event({"event": "time_limit", "step": p.step, "train_seconds": round(p.train_seconds, 3)})
                    done = True
                    break
            if not done:
                p.epoch += 1
                p.batch_in_epoch = 0
            if (not cfg.eval_every or done) and self.last_validated != p.step:
                self.validate()
            if not cfg.save_every or done:  # without save_every, a checkpoint per epoch
                self.save_checkpoint()

    # ----- what methods call ----------------------------------------------------------------------

    def from_main(self, value: float | None) -> float:
        """A value only the main process has (it alone validates), on every process."""
        mine = torch.tensor([value if self.is_main else 0.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(mine, reduction="sum").item())

    def all_processes(self, flag: bool) -> bool:
        """Whether `flag` holds on every process."""
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.accelerator.num_processes)

    def max_over_processes(self, value: int) -> int:
        mine = torch.tensor([value], device=self.accelerator.device)
        return int(self.accelerator.reduce(mine, reduction="max").item())

    def reset_optimizer_state(self) -> None:
        """Clear AdamW's moments (as a new optimizer would start), keeping its settings."""
        adamw = self.optimizer.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else self.optimizer
        adamw.state.clear()

    def state_length(self) -> None:
        """Say how long the run trains, before it starts."""
        if self.is_main:
            epochs = self.total_steps / self.steps_per_epoch
            why = f"max_steps {self.config.max_steps}" if self.config.max_steps else f"epochs {self.config.epochs}"
            limit = self.config.max_train_seconds
            sooner = f", or {limit:g} s of training if sooner (max_train_seconds)" if limit is not None else ""
            tqdm.write(f"training {self.total_steps} optimizer steps ({why}{sooner}): {epochs:.3g} epochs of "
                       f"{self.steps_per_epoch} steps, {len(self.train_data)} training examples")

    def check_run_length(self) -> None:
        """Before training, once the run's length is known: a setting that acts from a step the run
        never reaches (it ends after total_steps) is warned about; a method whose final form comes
        after the end refuses the run (its best model would be of another method)."""
        drop = self.config.lr_drop_step
        if drop is not None and drop >= self.total_steps and self.is_main:
            warn(f"lr_drop_step {drop}: the run ends after step {self.total_steps} (max_steps, epochs), so the learning "
                 "rate never drops; expected a step below that")

    def end_step(self) -> int:
        """The step training ends at: total_steps, later by the steps a method undid (stepwise rewinds)."""
        return self.total_steps + self.steps_undone()

    def steps_undone(self) -> int:
        return 0

    def time_is_up(self) -> bool:
        """Whether training has run max_train_seconds; the main process's clock decides for every process."""
        limit = self.config.max_train_seconds
        return limit is not None and self.from_main(float(self.progress.train_seconds >= limit)) > 0

    def goal_reached(self) -> bool:
        """Whether training may stop before end_step, on every process alike: a method with a goal
        says when (baselines.py)."""
        return False

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            self.log_event({"event": "non_finite_loss", "step": self.progress.step})
            raise UserError(f"loss became {loss.item()} at step {self.progress.step + 1}; training stopped and "
                            f"{checkpoints.last_good(self.run_dir)} (try a lower lr, gradient clipping or fp32)")

    def require_finite_weights(self) -> None:
        """Weights are checked before they are saved or validated: a step can turn them into NaN
        with a finite loss, and such a model must never become a checkpoint or the best model."""
        finite = bool(torch.stack([torch.isfinite(local(p)).all() for p in self.model_wrapped.parameters()]).all())
        if not self.all_processes(finite):
            self.log_event({"event": "non_finite_weights", "step": self.progress.step})
            raise UserError(f"weights became non-finite by step {self.progress.step}; training stopped and "
                            f"{checkpoints.last_good(self.run_dir)} (try a lower lr, gradient clipping or fp32)")

    def log_train(self, window: "_Window", bar) -> None:
        p = self.progress
        stats = window.reduce(self.accelerator)
        p.examples += stats.pop("examples")
        self.train_metrics = stats
        self.log_event({"step": p.step, "epoch": p.epoch, "lr": self.optimizer.param_groups[0]["lr"], **stats,
                        "examples": p.examples, "train_seconds": round(p.train_seconds, 3),
                        "train_cpu_seconds": round(p.train_cpu_seconds, 3), **self.method_state()})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_acc=f"{stats['token_accuracy']:.3f}",
                        tok_s=f"{stats['tokens_per_s']:.0f}", **self.postfix())

    # ----- validation, best model, test -----------------------------------------------------

    @property
    def unwrapped_model(self):
        """The model without its distributed and torch.compile wrappers, on the same weights: decoding,
        saving and state dicts run eagerly (a compiled model fails to trace KV-cache decoding)."""
        return self.accelerator.unwrap_model(self.model_wrapped, keep_torch_compile=False)

    @contextmanager
    def whole_model(self):
        """The trained model, whole, for what the main process does alone (decoding, saving); every
        process enters the block (sharded weights are gathered), and only the main one may use it."""
        if self.sharding is None:
            yield self.unwrapped_model
        else:
            with self.sharding.gathered() as model:
                yield model

    @property
    def method_name(self) -> str:
        return self.config.method

    def validate(self) -> None:
        acc, p = self.accelerator, self.progress
        self.last_validated = p.step
        self.require_finite_weights()
        if self.valid_data is not None:
            with self.whole_model() as model:
                if self.is_main:
                    self.validate_on_main(model)
        acc.wait_for_everyone()
        if self.valid_data is not None:
            self.after_validation(self.from_main(self.last_val_accuracy))

    def validate_on_main(self, model) -> None:
        p = self.progress
        metrics, score = self.validation(model)
        self.log_event({"event": "validation", "step": p.step, "epoch": p.epoch, **_prefixed("val_", metrics),
                        **self.method_state()})
        self.last_val_accuracy = metrics.get("accuracy", math.nan)
        final = self.in_final_form()
        if p.is_best(score, final):
            p.best_score, p.best_step, p.best_final = list(score), p.step, final
            self.keep_best(model)

    def validation(self, model) -> tuple[dict, tuple[float, ...]]:
        """(metrics, score) of `model` on the validation set: the metrics are logged as val_*, and the
        validation of the highest score (a tuple: here exact match, then token accuracy) gives the
        best model."""
        result = evaluate(self.predictor(model), self.valid_data, self.config.eval_batch_size,
                          self.config.max_new_tokens, self.matcher, desc="validate")
        tqdm.write(f"step {self.progress.step}: val accuracy {result.accuracy:.4f}, token accuracy {result.token_accuracy:.4f}")
        return result.metrics(), (result.accuracy, result.token_accuracy)
    def keep_best(self, model) -> None:
        """The model becomes the best one: saved, with its model card beside it."""
        self.save_best(model)
        write_model_card(self.best_dir, read_metadata(self.best_dir))

    def save_best(self, model) -> None:
        """A plain LM as a Hugging Face directory (LoRA adapters merged into its weights); an LM with a
        method's modules saves them beside it."""
        with adapters.merged(model) as model:
            if isinstance(model, LMWithModules):
                model.save(self.tokenizer, self.best_dir, self.full_metadata())
            else:
                save_model(model, self.tokenizer, self.best_dir, self.full_metadata())

    def full_metadata(self) -> dict:
        """icot.json: how the model was trained and how to decode it; its model card is written from it."""
        config = {k: v for k, v in to_dict(self.config).items() if k != "overwrite"}
        return {"icot_version": __version__, "method": self.method_name, "base_model": self.config.model,
                "train_file": self.files["train"], "train_examples": len(self.train_data), **self.task,
                "parameters": sum(w.numel() for w in self.model.parameters()), "step": self.progress.step,
                "epoch": self.progress.epoch, "final_form": self.progress.best_final, "answer_match": self.config.answer_match,
                **self.metadata(), "config": config}

    def finish(self) -> dict:
        acc = self.accelerator
        if self.valid_data is None:
            self.require_finite_weights()
            self.progress.best_final = self.in_final_form()
            with self.whole_model() as model:
                if self.is_main:
                    self.keep_best(model)
        acc.wait_for_everyone()
        summary = {"event": "end", "step": self.progress.step, "train_seconds": round(self.progress.train_seconds, 3),
                   "train_cpu_seconds": round(self.progress.train_cpu_seconds, 3), **self.best_summary()}
        summary.update(self.final_test())
        self.log_event(summary)
        if self.is_main:
            from icot.report import plot_run

            plot_run(self.run_dir)
        acc.wait_for_everyone()
        return summary

    def final_test(self) -> dict:
        """The test metrics (on the main process, if there is a test set). Training is over and the
        best model saved: a signal now, or one that came during the last validation or save, stops
        the command at once, saying how to run the test again."""
        self.stop_at_once = True
        tested = self.test_data is not None and self.is_main
        try:
            if self.stop_signal is not None:  # it came during the last validation or save
                raise KeyboardInterrupt
            return self.test_metrics() if tested else {}
        except KeyboardInterrupt:
            signum, step = self.stop_signal or signal.SIGINT, self.progress.step  # no signum: not our handler's
            if tested:
                raise EvaluationInterrupted(signum, step, self.best_dir, self.files["test"]) from None
            raise TrainingInterrupted(signum, step) from None

    def best_summary(self) -> dict:
        p = self.progress
        if not p.best_final and self.is_main:
            warn(f"the run ended before {self.method_name} reached its final form: best/ holds a model of an earlier "
                 f"stage, so its accuracy is not {self.method_name}'s; expected a longer run (max_steps, epochs)")
        return {"best_step": p.best_step, "best_val_accuracy": p.best_score[0] if p.best_score else None,
                "best_final_form": p.best_final}

    def saved_predictor(self, path) -> Predictor:
        """The model saved in `path`, reloaded for inference as `icot eval` loads it."""
        from icot.methods import load_predictor

        return load_predictor(path, device=self.accelerator.device)

    def test_metrics(self) -> dict:
        """The saved best model, reloaded, on the test set."""
        predictor = self.saved_predictor(self.best_dir)
        result = evaluate(predictor, self.test_data, self.config.eval_batch_size, self.config.max_new_tokens,
                          self.matcher, desc="test")
        tqdm.write(f"test accuracy {result.accuracy:.4f} ({result.examples} examples, {result.examples_per_s:.1f} examples/s)")
        record = evaluation_record(result.metrics(), self.files["test"], self.config.eval_batch_size,
                                   self.config.answer_match, self.accelerator.device)
        record["training_data"] = self.copies["test"]  # the card then says so
        add_evaluation(self.best_dir, record)
        return _prefixed("test_", result.metrics())

    # ----- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write the full state aside, rename it into place, point `latest` at it, and only then
        delete the checkpoints it supersedes: a crash at any moment leaves `latest` naming a whole
        checkpoint. A step saved again (a second Ctrl-C, a resume from an earlier checkpoint) gets
        a new name, and the earlier save of that step goes once the new one is in place; a step is
        not saved again when it has not been validated since (the same state)."""
        acc = self.accelerator
        if self.last_saved == (self.progress.step, self.last_validated):
            return
        self.require_finite_weights()
        self.progress.method_state = self.method_state_for_checkpoint()
        self.progress.rng_state = self.rng.get_state().tolist()
        self.progress.metrics_bytes = self.metrics_file.stat().st_size if self.metrics_file.exists() else 0
        root = self.run_dir / CHECKPOINTS
        name = checkpoints.unused_checkpoint_name(root, self.progress.step)
        tmp = root / f"{name}.tmp"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        kept = "checkpoints/latest still names the last whole one" if (root / LATEST).is_file() else "no checkpoint is saved yet"
        with paths.writing_aside(tmp, f"checkpoint {root / name}", kept):
            acc.save_state(str(tmp))
            if self.sharding is not None:
                self.sharding.save(tmp, self.optimizer)
        acc.wait_for_everyone()
        if self.is_main:
            os.replace(tmp, root / name)
            paths.write_file(root / LATEST, name + "\n")
            checkpoints.rotate(root, name, self.config.keep_checkpoints)
        self.last_saved = (self.progress.step, self.last_validated)
        acc.wait_for_everyone()

    def load_checkpoint(self) -> None:
        checkpoint = checkpoints.latest(self.run_dir)
        try:
            self.accelerator.load_state(str(checkpoint))
            if self.sharding is not None:
                self.sharding.load(checkpoint, self.optimizer)
        except Exception as e:  # any unreadable or mismatched file: the checkpoint is unusable
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"{checkpoint}: cannot load this checkpoint ({type(e).__name__}: {first[:200]}); "
                            "point checkpoints/latest at an older one or start a new run") from None
        # the optimizer's saved state holds the weight decay it was saved with; a resume may change it
        for group, decay in zip(self.optimizer.param_groups, self.weight_decays()):
            group["weight_decay"] = decay
        self.load_method_state(self.progress.method_state)
        rng = self.progress.rng_state or self.progress.method_state.get("generator")
        if rng is not None:
            self.rng.set_state(torch.tensor(rng, dtype=torch.uint8))
        self.refuse_passed_end()
        self.cut_metrics(self.progress.metrics_bytes)
        if self.is_main:  # a later plain --resume goes on with what this one changed (max_steps, lr, ...)
            write_config(self.run_dir, self.config)

    def refuse_passed_end(self) -> None:
        """A resume cannot end before the checkpoint's step (training does not go back), nor at it when
        the run has no best model yet (it stopped before its first validation)."""
        step, end, cfg = self.progress.step, self.end_step(), self.config
        limit = f"max_steps {cfg.max_steps}" if cfg.max_steps == self.total_steps else f"epochs {cfg.epochs}"
        if step > end:
            raise UserError(f"--{limit.replace('_', '-')}: {self.run_dir} is already at step {step} (checkpoints/latest), "
                            f"past the end this sets (step {end}); expected --max-steps of at least {step}")
        if step == end and self.valid_data is not None and not self.best_dir.exists():
            raise UserError(f"--{limit.replace('_', '-')}: {self.run_dir} stopped at step {step} before its first "
                            f"validation, so it has no best model yet; expected --max-steps above {step}")

    def _install_signal_handlers(self) -> dict:
        """First SIGINT/SIGTERM: checkpoint after the current step, then exit. Second, or any once
        training is over (`stop_at_once`): stop now. Returns the handlers replaced."""
        def handler(signum, frame):
            now = self.stop_signal is not None or self.stop_at_once
            self.stop_signal = self.stop_signal or signum
            if now:
                raise KeyboardInterrupt

        replaced = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                replaced[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                break
        return replaced


class _Window:
    """Sums over the logging interval, reduced across processes when logged.

    Time counts from `mark()` (after validation, checkpoints) to each `add()`, so throughput
    and Progress.train_seconds (wall) and train_cpu_seconds cover training and data loading, not evaluation.
    """

    def __init__(self, progress: Progress):
        self.progress = progress
        self.sums = torch.zeros(5, dtype=torch.float64)
        self.extra: dict[str, list[float]] = {}  # a method's metrics: [sum, micro-batches]
        self.seconds = 0.0
        self.mark()

    def mark(self) -> None:
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def add(self, loss_sum, correct, count, tokens, examples, metrics: dict) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        self.seconds += now - self.last
        self.progress.train_seconds += now - self.last
        self.progress.train_cpu_seconds += now_cpu - self.last_cpu
        self.last, self.last_cpu = now, now_cpu
        values = [loss_sum.double().cpu(), correct.double().cpu(), count.double().cpu(), tokens.double().cpu(),
                  torch.tensor(float(examples), dtype=torch.float64)]
        self.sums += torch.stack(values)
        for name, value in metrics.items():
            total = self.extra.setdefault(name, [0.0, 0.0])
            total[0] += float(value)
            total[1] += 1

    def reduce(self, accelerator) -> dict:
        sums = accelerator.reduce(self.sums.to(accelerator.device), reduction="sum").cpu()
        seconds = max(self.seconds, 1e-9)
        loss_sum, correct, count, tokens, examples = sums.tolist()
        names = sorted(self.extra)
        extra = torch.tensor([self.extra[n] for n in names] or [[0.0, 0.0]], dtype=torch.float64)
        extra = accelerator.reduce(extra.to(accelerator.device), reduction="sum").cpu().tolist()
        self.sums.zero_()
        self.extra = {}
        self.seconds = 0.0
        return {"loss": loss_sum / max(count, 1), "token_accuracy": correct / max(count, 1),
                "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds, "examples": int(examples),
                **{name: round(total / max(n, 1), 6) for name, (total, n) in zip(names, extra)}}


def _restore_signal_handlers(replaced: dict) -> None:
    for sig, handler in replaced.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler not set from Python


def _is_end_record(line: bytes, step: int) -> bool:
    try:
        record = json.loads(line)
        return line.endswith(b"\n") and record.get("event") == "end" and record.get("step") == step
    except (ValueError, AttributeError):
        return False


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {prefix + k: v for k, v in metrics.items()}


def to_dict_json(record: dict) -> dict:
    """JSON has no infinity: write it as the string 'inf'."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in record.items()}


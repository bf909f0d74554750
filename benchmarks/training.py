"""Training throughput: our shared Trainer (stepwise internalization, mid-schedule, smoothing) vs the plain loop.

Both run the same model shape on the same rows with the same batch size, the scheduled removal
count fixed at `scheduled` (half the median CoT) and smoothing λ = 4, so every batch has rows of
several lengths. Each warms up for `warmup` optimizer steps, then `steps` steps are timed.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import clock, peak_memory, reset_peak_memory, rss_mib
from benchmarks.plain_loop import PlainStepwiseLoop
from icot.cli import build_train_config
from icot.data.format import read_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import load_tokenizer, word_tokenizer
from icot.methods.stepwise import StepwiseTrainer
from icot.methods.stepwise.schedule import offset_distribution
from icot.models import build_preset

SMOOTHING_LAMBDA = 4.0
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-5, 0.01, 1.0


class TimedStepwise(StepwiseTrainer):
    """The shared Trainer as it is, with a clock started before the first timed step and read right
    after the last one, and the tokens (after removal) and padded slots of the timed steps counted
    on the device (no extra synchronisation)."""

    def __init__(self, config, warmup: int, device: torch.device):
        super().__init__(config)
        self.warmup, self.device = warmup, device
        self.started = self.ended = None
        self.rss_before = 0.0
        self.tokens = torch.zeros((), dtype=torch.long)
        self.slots = 0

    def on_step_begin(self) -> None:
        if self.progress.step == self.warmup:
            self.rss_before = rss_mib()
            reset_peak_memory(self.device)
            self.tokens = self.tokens.to(self.device)
            self.started = clock(self.device)
        super().on_step_begin()

    def training_batch(self, batch: dict) -> dict | None:
        batch = super().training_batch(batch)
        if batch is not None and self.started is not None:
            self.tokens += batch["length"].sum()
            self.slots += batch["input_ids"].numel()
        return batch

    def log_train(self, window, bar) -> None:
        if self.progress.step == self.total_steps:
            self.ended = clock(self.device)
        super().log_train(window, bar)

    def finish(self) -> dict:  # the timed part is over: skip saving the model and plotting
        return {}


def train_overrides(spec: dict, run_dir: str) -> list[str]:
    total = spec["warmup"] + spec["steps"]
    args = ["--data", spec["data_dir"], "--model", spec["model"], "--out", run_dir, "--overwrite",
            "--batch-size", spec["batch_size"], "--max-steps", total, "--epochs", 1_000_000, "--log-every", total,
            "--lr", LR, "--weight-decay", WEIGHT_DECAY, "--max-grad-norm", MAX_GRAD_NORM, "--seed", spec["seed"],
            "--remove-start-from", spec["scheduled"], "--remove-per-epoch", 1e-9,  # the count stays where it starts
            "--removal-smoothing-lambda", SMOOTHING_LAMBDA, "--precision", "bf16-mixed" if spec["bf16"] else "fp32"]
    if spec["tokenizer"]:
        args += ["--tokenizer", spec["tokenizer"]]
    if spec["loop"] == "ours-compiled":
        args += ["--compile"]
    if spec["device"] == "cpu":
        args += ["--cpu"]
    return [str(a) for a in args]


def run_ours(spec: dict) -> dict:
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory(prefix="icot-bench-") as run_dir:
        _, config = build_train_config(None, "stepwise", train_overrides(spec, run_dir))
        trainer = TimedStepwise(config, spec["warmup"], device)
        trainer.fit()
        seconds = trainer.ended - trainer.started
        return {"seconds": seconds, "tokens": int(trainer.tokens), "slots": trainer.slots,
                "examples": spec["steps"] * spec["batch_size"], **peak_memory(device, trainer.rss_before)}


def training_rows(spec: dict):
    """(tokenizer, encoded training rows) exactly as the Trainer builds them."""
    examples = read_examples(f"{spec['data_dir']}/train.txt")
    if spec["tokenizer"]:
        tokenizer = load_tokenizer(spec["tokenizer"])
    else:
        tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    return tokenizer, encode(tokenizer, Layout.for_tokenizer(tokenizer), examples, keep_examples=False)


def run_plain(spec: dict) -> dict:
    device = torch.device(spec["device"])
    tokenizer, data = training_rows(spec)
    layout = Layout.for_tokenizer(tokenizer)
    torch.manual_seed(spec["seed"])
    model = build_preset(spec["model"], len(tokenizer), tokenizer.eos_token_id)
    model.set_attn_implementation("eager")
    model.to(device).train()
    loop = PlainStepwiseLoop(model, [data.row(i).tolist() for i in range(len(data))], layout.sep_id, layout.pad_id,
                             layout.bos_id is not None, spec["scheduled"], offset_distribution(SMOOTHING_LAMBDA),
                             spec["batch_size"], LR, WEIGHT_DECAY, MAX_GRAD_NORM, device, spec["bf16"], spec["seed"])
    total = spec["warmup"] + spec["steps"]
    tokens, slots, started, rss_before = 0, 0, None, 0.0
    for step in tqdm(range(total), desc="train plain", leave=False):
        if step == spec["warmup"]:
            rss_before = rss_mib()
            reset_peak_memory(device)
            started = clock(device)
        _, batch_tokens, batch_slots = loop.step(loop.next_indices())
        if started is not None:
            tokens, slots = tokens + batch_tokens, slots + batch_slots
    seconds = clock(device) - started
    return {"seconds": seconds, "tokens": tokens, "slots": slots, "examples": spec["steps"] * spec["batch_size"],
            **peak_memory(device, rss_before)}


def run_case(spec: dict) -> dict:
    result = run_plain(spec) if spec["loop"] == "plain" else run_ours(spec)
    seconds = max(result["seconds"], 1e-9)
    return {**result, "tokens_per_s": result["tokens"] / seconds, "examples_per_s": result["examples"] / seconds,
            "padding_fraction": 1 - result["tokens"] / result["slots"]}


def scheduled_for(data) -> int:
    """Mid-schedule: half the median CoT length of the training rows."""
    return int(np.median(data.n_cot)) // 2

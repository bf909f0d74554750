"""`icot demo`: the project in one command, on a CPU.

Generates a small multiplication task, trains a no-CoT model and an explicit-CoT model, then from
the explicit one a stepwise-internalized model, and an ICoT-KD pipeline on a deeper model (its
own teacher included: KD needs several teacher states inside the CoT, so more layers), evaluates
all of them on the same test set for accuracy and speed and writes a table and a plot to the
demo directory. On a CPU the runs that do not depend on each other train side by side, one process
each.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from icot import config as cfg, paths

KD_STAGES = ("teacher", "student", "emulator", "couple")


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains. `from`: start from that run's best model; `model`: another shape than `model`."""

    digits: str = "2x2"
    train: int = 6800  # of the 8100 pairs of 2-digit numbers; valid and test are disjoint from it
    valid: int = 300
    test: int = 1000
    model: str = "micro"
    batch_size: int = 64
    runs: dict = field(default_factory=lambda: {
        # the baseline gets the examples of explicit + stepwise (8500 steps): at 3000 steps it tested 0.157, at
        # 9500 0.58 (weight decay 0.01) and 0.62 (0.1), still rising; at 8500 on an AVX2 CPU 0.582 (0.1) and 0.391
        # (0.3: the stepwise run's weight decay holds this baseline back; docs/EXPERIMENTS.md)
        "nocot": {"method": "nocot", "lr": 2e-3, "max_steps": 8500, "eval_every": 500, "weight_decay": 0.1},
        # lr x0.3 from step 1000: at a constant 2e-3 seed 1234's validation fell from 0.99 (step 750) to 0.91-0.95
        # and its best model tested 0.987; with the drop 0.999, and its stepwise run 0.989 instead of 0.983
        "explicit": {"method": "explicit", "lr": 2e-3, "max_steps": 1500, "eval_every": 250, "lr_drop_step": 1000},
        # from scratch: positions kept in place (on 2x2 the authors' placement ended at 0.43-0.59 in three
        # runs, in place at 0.96-0.99 in five, 0.68 and 0.87 in two more: docs/EXPERIMENTS.md); the next token goes once
        # 90% of training sequences are right again, or after 600 steps; no optimizer resets (they undo
        # a small model's recovery); lr 1e-3 (2e-3 stalled in 3 of 5 runs), x0.3 once the CoT is long gone;
        # weight decay 0.3: a model that fits the 6800 training pairs without the rule stalls on held-out ones
        # (0.66 at 0.01, 0.63 at 0.1 on an AVX2 CPU, training token accuracy 0.998); 0.3 ended at 0.989, 0.995,
        # 0.996 for three seeds there (0.1: 0.997, 0.994, 0.997 on the earlier CPU); 7000 steps: every seed's
        # best model comes by step 6750, and 1000 more did not raise it (docs/EXPERIMENTS.md); Bai et al.'s
        # running-sum probe loss, as in the 3x3 and 4x4 recipes: seed 1234 0.996 with it, 0.989 without
        "stepwise": {"method": "stepwise", "lr": 1e-3, "max_steps": 7000, "eval_every": 250, "from": "explicit",
                     "keep_position": True, "gap_placement": "in_place", "removal_pace": "adaptive",
                     "pace_max_steps": 600, "reset_optimizer": False, "lr_drop_step": 6500, "weight_decay": 0.3,
                     "running_sum_weight": 1.0},
        # nano-deep: 6 layers (4 teacher states inside the 8-token CoT), width 64 to fit the demo's time; the
        # student and the emulator start from the teacher's weights (from scratch the student reading the
        # gold states stayed near 0.02, docs/EXPERIMENTS.md); the emulator's token mixture picks the
        # teacher's CoT token per layer; weight decay 0.1; the coupled stage at lr 3e-4, x0.3 from step 2000,
        # 500 steps fewer than configs/mult2x2_nano-deep_kd.yaml to fit the demo's 12 minutes (docs/RESULTS.md)
        "kd": {"method": "kd", "model": "nano-deep", "lr": 1e-3, "eval_every": 250, "weight_decay": 0.1,
               "teacher": {"max_steps": 1500, "lr": 2e-3}, "student": {"max_steps": 2000, "init_from_teacher": True},
               "emulator": {"max_steps": 1500, "mixture": "token", "init_from_teacher": True},
               "couple": {"max_steps": 2500, "lr": 3e-4, "lr_drop_step": 2000}},
    })
    speed_examples: int = 200

    def quick(self) -> "DemoPlan":
        """A few steps of everything: checks the path, learns nothing."""
        runs = {name: {**run, "max_steps": 20, "eval_every": 10} for name, run in self.runs.items()}
        runs["kd"].update({stage: {**runs["kd"][stage], "max_steps": 20} for stage in KD_STAGES})
        runs["stepwise"].update(pace_min_steps=2, pace_max_steps=2, remove_all_when_remove_beyond=4)
        return DemoPlan(self.digits, 1000, 50, 50, self.model, 32, runs, 20)


def make_data(plan: DemoPlan, out: Path) -> Path:
    from icot.data.format import write_examples
    from icot.data.mult import MultTask, mult_example, sample_splits

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    splits = sample_splits(MultTask.parse(plan.digits), {"test": plan.test, "valid": plan.valid, "train": plan.train}, seed=0)
    for name, pairs in splits.items():
        write_examples(folder / f"{name}.txt", (mult_example(a, b) for a, b in pairs))
    return folder


def train_run(plan: DemoPlan, name: str, data: Path, out: Path) -> Path:
    from icot.methods import trainer_class

    settings = dict(plan.runs[name])
    start = settings.pop("from", None)
    values = {"data": str(data), "model": str(out / start / "best") if start else plan.model, "epochs": 10_000,
              "batch_size": plan.batch_size, "out": str(out / name), "log_every": 50, **settings}
    trainer_cls = trainer_class(values["method"])
    trainer_cls(cfg.build(trainer_cls.config_class, values, f"demo {name}")).fit()
    return out / name


def chains(plan: DemoPlan) -> list[list[str]]:
    """The runs in independent groups: a run trained from another one follows it in its group."""
    groups: list[list[str]] = []
    for name, run in plan.runs.items():
        group = next((g for g in groups if run.get("from") in g), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    return groups


def schedule(plan: DemoPlan) -> list[list[str]]:
    """The groups, costliest first (steps x layers), so that the workers finish close together."""
    from icot.models import PRESETS

    def steps(run: dict) -> int:
        return sum(run[stage]["max_steps"] for stage in KD_STAGES if stage in run) or run["max_steps"]

    def cost(chain: list[str]) -> int:
        return sum(steps(plan.runs[name]) * PRESETS[model_of(plan, name)][1]["n_layer"] for name in chain)

    return sorted(chains(plan), key=cost, reverse=True)


def train_chain(plan: DemoPlan, chain: list[str], data: Path, out: Path, threads: int) -> list[str]:
    """One worker process: its group's runs in order, each run's output to DIR/logs/RUN.log."""
    import torch

    torch.set_num_threads(threads)
    (out / "logs").mkdir(exist_ok=True)
    for name in chain:
        with open(out / "logs" / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            train_run(plan, name, data, out)
    return chain


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(plan: DemoPlan) -> int:
    """On a CPU, one process per group, even with fewer cores: the system shares the cores among them,
    so the demo ends about when the work, spread over the cores, is done, not when a core that was
    given two groups in a row is; on a GPU, one."""
    import torch

    return 1 if torch.cuda.is_available() else len(chains(plan))


def train_all(plan: DemoPlan, data: Path, out: Path, jobs: int) -> None:
    """Every run; with jobs > 1, the independent groups side by side in that many processes, each
    with its share of the cores, at least one thread (two one-thread runs on two cores lose ~5% each;
    one run on two threads gains far less than 2x on models this small). With more processes than
    cores, a run's wall time counts the time it waited: its CPU time is what it cost."""
    if jobs <= 1:
        for name in plan.runs:
            train_run(plan, name, data, out)
        return
    groups = schedule(plan)
    threads = max(1, usable_cores() // jobs)
    print(f"training {' | '.join(' -> '.join(g) for g in groups)} in {jobs} processes "
          f"({threads} torch thread{'s' if threads > 1 else ''} each); logs: {out / 'logs'}", flush=True)
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(jobs, initializer=_worker_signals) as pool, \
            tqdm(total=len(plan.runs), desc="demo runs", unit="run") as bar:
        started = time.perf_counter()
        try:
            for done in as_completed([pool.submit(train_chain, plan, g, data, out, threads) for g in groups]):
                if done.exception():  # the groups not started yet are dropped; those running finish first
                    pool.shutdown(wait=False, cancel_futures=True)
                names = done.result()
                bar.update(len(names))
                bar.write(f"trained {' -> '.join(names)} ({(time.perf_counter() - started) / 60:.1f} min)")
        except KeyboardInterrupt:  # each worker's run stops after its current step, with a checkpoint
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_signals() -> None:
    """A worker leaves Ctrl-C to the run it trains (a checkpoint, then a stop) and ignores it
    between runs; SIGTERM ends it at once, as by default."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def training_cost(run: Path) -> dict:
    """Examples, wall seconds and CPU seconds of a run's training (CPU seconds: None for runs older than
    that record); ICoT-KD's is that of its stages."""
    from icot.report import read_metrics

    if not (run / "metrics.jsonl").exists() and (run / "couple").is_dir():
        costs = [training_cost(run / stage) for stage in KD_STAGES if (run / stage).is_dir()]
        return {key: None if any(c[key] is None for c in costs) else sum(c[key] for c in costs) for key in costs[0]}
    records = read_metrics(run)
    end = [r for r in records if r.get("event") == "end"][-1]  # a run resumed after its end has several
    trained = [r["examples"] for r in records if "loss" in r]
    return {"train_examples": trained[-1] if trained else 0, "train_seconds": end["train_seconds"],
            "train_cpu_seconds": end.get("train_cpu_seconds")}


def measure(model_dir: Path, test_file: Path, speed_examples: int) -> dict:
    """Test accuracy at batch 64, and examples/s at batch 1 (the papers' speed measure) and 64."""
    from icot.data.format import read_examples
    from icot.data.layout import encode
    from icot.evaluate import evaluate
    from icot.methods import load_predictor

    predictor = load_predictor(model_dir)
    examples = read_examples(test_file)
    name = Path(model_dir).parent.name
    full = evaluate(predictor, encode(predictor.tokenizer, predictor.layout, examples), 64, desc=f"test {name}")
    one = evaluate(predictor, encode(predictor.tokenizer, predictor.layout, examples[:speed_examples]), 1,
                   desc=f"batch-1 speed {name}")
    return {"accuracy": full.accuracy, "examples_per_s_batch1": one.examples_per_s,
            "examples_per_s_batch64": full.examples_per_s, "generated_tokens": full.mean_generated_tokens}


def measure_run(run: Path, test_file: Path, speed_examples: int) -> dict:
    """measure() of the run's best model, with the run's training examples and seconds."""
    return {**measure(run / "best", test_file, speed_examples), **training_cost(run)}


def model_of(plan: DemoPlan, name: str) -> str:
    """The model shape a run trains: its own, or that of the run it starts from."""
    run = plan.runs[name]
    return model_of(plan, run["from"]) if "from" in run else run.get("model", plan.model)


def table(results: dict) -> str:
    lines = ["| method | model | test accuracy | examples/s (batch 1) | examples/s (batch 64) | generated tokens | training examples | training time | training CPU time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['model']} | {r['accuracy']:.3f} | {r['examples_per_s_batch1']:.1f} | {r['examples_per_s_batch64']:.0f} | "
                     f"{r['generated_tokens']:.1f} | {r['train_examples']} | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['train_cpu_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def run_demo(out: str, overwrite: bool = False, quick: bool = False, jobs: int | None = None) -> dict:
    """The demo in `out`, locked against any other command meanwhile (paths.one_writer)."""
    with paths.one_writer(Path(out)):
        return _run_demo(Path(out), overwrite, quick, jobs)


def _run_demo(out: Path, overwrite: bool, quick: bool, jobs: int | None) -> dict:
    from icot.report import plot_accuracy_vs_removed

    plan = DemoPlan().quick() if quick else DemoPlan()
    if paths.check_fresh_dir(out, "--out", overwrite, hint=" or --out elsewhere"):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    paths.mark_as_ours(out)
    started = time.perf_counter()
    data = make_data(plan, out)
    train_all(plan, data, out, default_jobs(plan) if jobs is None else jobs)
    results = {name: {"model": model_of(plan, name), **measure_run(out / name, data / "test.txt", plan.speed_examples)}
               for name in plan.runs}
    for name, run in plan.runs.items():  # a model trained from another one also cost that one's training
        if "from" in run:
            for key in ("train_examples", "train_seconds", "train_cpu_seconds"):
                results[name][key] += results[run["from"]][key]
    plot = plot_accuracy_vs_removed([out / "stepwise"], out / "stepwise_accuracy_vs_removed.png")
    minutes = (time.perf_counter() - started) / 60
    report = (f"# icot demo: {plan.digits} multiplication, CPU\n\n{table(results)}\n\n"
              f"Test set: {plan.test} generated examples. Whole demo: {minutes:.1f} minutes.\n")
    paths.write_file(out / "results.md", report)
    paths.write_file(out / "results.json", json.dumps({"plan": plan.__dict__, "results": results, "minutes": minutes}, indent=2))
    print("\n" + report)
    print(f"plot: {plot}\nmodels: {', '.join(str(out / n / 'best') for n in plan.runs)}")
    return results

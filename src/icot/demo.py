"""`icot demo`: the project in one command, on a CPU.

Generates a small multiplication task, trains a no-CoT model and an explicit-CoT model, then from
the explicit one a stepwise-internalized model, and an ICoT-KD pipeline on a deeper model (its
own teacher included: KD needs several teacher states inside the CoT, so more layers), evaluates
all of them on the same test set for accuracy and speed and writes a table and a plot to the
demo directory. On a CPU the runs, and ICoT-KD's stages, train side by side as soon as the models
they start from are ready, one process each. Each run's settings are a config file shipped with the
package, demo_configs/RUN.yaml.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from icot import config as cfg, paths
from icot.errors import UserError

KD_STAGES = ("teacher", "student", "emulator", "couple")
CONFIGS = Path(__file__).parent / "demo_configs"
RUNS = ("nocot", "explicit", "stepwise", "kd")  # the table's rows, in this order


def load_runs(folder: Path = CONFIGS) -> dict:
    """Each run's settings from FOLDER/RUN.yaml, read as any config file (icot.config.load_yaml): the
    keys of its method's config, which override the demo's data, model and batch size, and one key of
    the demo's own, `from: RUN`: start from that run's best model (a run trained before this one)."""
    return {name: cfg.load_yaml(folder / f"{name}.yaml") for name in RUNS}


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains: its data, the model shape and batch size of every run that does not set
    its own, and the runs' settings by name (load_runs). `configs`: the folder the runs were read
    from, named in their error messages (None for runs given in code)."""

    digits: str = "2x2"
    train: int = 6800  # of the 8100 pairs of 2-digit numbers; valid and test are disjoint from it
    valid: int = 300
    test: int = 1000
    model: str = "micro"
    batch_size: int = 64
    runs: dict = field(default_factory=load_runs)
    speed_examples: int = 200
    configs: Path | None = CONFIGS
    seed: int = 1234  # every run's, unless its config sets one; the data's stays 0

    def quick(self) -> "DemoPlan":
        """An install check: a few steps of everything on a little data, so its models learn nothing."""
        runs = {name: {**run, "max_steps": 20, "eval_every": 10} for name, run in self.runs.items()}
        runs["kd"].update({stage: {**runs["kd"][stage], "max_steps": 20} for stage in KD_STAGES})
        runs["stepwise"].update(pace_min_steps=2, pace_max_steps=2, remove_all_when_remove_beyond=4)
        return replace(self, train=1000, valid=50, test=50, batch_size=32, runs=runs, speed_examples=20)


QUICK_NOTE = ("an install check, not a comparison: each run trains a few steps on a little data, so the models "
              "learn nothing and their accuracies mean nothing; `icot demo` without --quick compares the methods")


def plain(value):
    """`value` with each number or true/false read from YAML (icot.config.Plain) as that value, and
    paths as text: what results.json holds and the schedule counts."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, cfg.Plain):
        return value.value
    return str(value) if isinstance(value, Path) else value


def make_data(plan: DemoPlan, out: Path) -> Path:
    from icot.data.format import write_examples
    from icot.data.mult import MultTask, mult_example, sample_splits

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    splits = sample_splits(MultTask.parse(plan.digits), {"test": plan.test, "valid": plan.valid, "train": plan.train}, seed=0)
    for name, pairs in splits.items():
        write_examples(folder / f"{name}.txt", (mult_example(a, b) for a, b in pairs))
    return folder


def run_config(plan: DemoPlan, name: str, data: Path, out: Path):
    """Run `name`'s trainer class and config: its settings over the demo's data, model, batch size and
    run directory DIR/RUN, a `from` run's best model as its model."""
    from icot.methods import trainer_class

    where = str(plan.configs / f"{name}.yaml") if plan.configs else f"demo {name}"
    settings = dict(plan.runs[name])
    start = settings.pop("from", None)
    earlier = list(plan.runs)[:list(plan.runs).index(name)]
    if start is not None and start not in earlier:
        raise UserError(f"{where}: from: '{start}' is not a run trained before this one; expected one of: "
                        f"{', '.join(earlier) or 'none (it is the first)'}")
    values = {"data": str(data), "model": str(out / start / "best") if start else plan.model, "epochs": 10_000,
              "batch_size": plan.batch_size, "seed": plan.seed, "out": str(out / name), "log_every": 50, **settings}
    try:
        trainer_cls = trainer_class(str(values.get("method")))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return trainer_cls, cfg.build(trainer_cls.config_class, values, where)


@dataclass(frozen=True)
class Task:
    """One training process's work: a run, or one stage of an ICoT-KD run (whose student and emulator
    need only its teacher, so they train side by side); `needs`: the tasks whose models it starts from;
    `cost`: its steps x layers x width, about its compute, what orders the tasks ready at once."""

    run: str
    stage: str | None
    needs: tuple[str, ...]
    cost: int

    @property
    def name(self) -> str:
        return f"{self.run}-{self.stage}" if self.stage else self.run


def tasks(plan: DemoPlan, runs: dict) -> dict[str, Task]:
    """Every run's tasks by name, from the runs' (trainer class, config) (run_config): a run trained
    from another one needs that run's last task; a trainer with stages (ICoT-KD) gives its own."""
    from icot.models import PRESETS

    found: dict[str, Task] = {}
    for name, (trainer_cls, config) in runs.items():
        shape = PRESETS[model_of(plan, name)][1]
        size = shape["n_layer"] * shape["n_embd"]
        start = plan.runs[name].get("from")
        start = (next(t.name for t in reversed(found.values()) if t.run == start),) if start else ()
        if not hasattr(trainer_cls, "stage_needs"):
            found[name] = Task(name, None, start, config.max_steps * size)
            continue
        for stage, needs in trainer_cls(config).stage_needs().items():
            steps = getattr(config, stage).max_steps or config.max_steps
            found[f"{name}-{stage}"] = Task(name, stage, start + tuple(f"{name}-{s}" for s in needs), steps * size)
    return found


def remaining_cost(graph: dict[str, Task]) -> dict[str, int]:
    """Each task's cost plus that of the costliest chain of tasks that need it: the tasks ready at
    once start longest chain first, so that the processes finish close together."""
    after: dict[str, int] = {}

    def chain(name: str) -> int:
        if name not in after:
            after[name] = graph[name].cost + max((chain(t.name) for t in graph.values() if name in t.needs), default=0)
        return after[name]

    return {name: chain(name) for name in graph}


def train_task(task: Task, trainer_cls, config, out: Path, threads: int) -> str:
    """One worker's task, its output to DIR/logs/TASK.log: a run, or one stage of a KD run whose run
    directory the demo prepared."""
    import torch

    torch.set_num_threads(threads)
    (out / "logs").mkdir(exist_ok=True)
    with open(out / "logs" / f"{task.name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        trainer = trainer_cls(config)
        if task.stage:
            trainer.fit_stage(task.stage)
        else:
            trainer.fit()
    return task.name


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(graph: dict[str, Task]) -> int:
    """On a CPU, one one-thread process per core: the tasks ready take the cores longest chain first, so
    the longest chain (explicit -> stepwise) runs on a core of its own instead of sharing one and ending
    last, alone; on a GPU, one."""
    import torch

    return 1 if torch.cuda.is_available() else min(usable_cores(), len(graph))


def train_all(plan: DemoPlan, data: Path, out: Path, jobs: int | None = None) -> None:
    """Every run; with jobs > 1 (default_jobs if None), the tasks whose models are ready side by side
    in up to that many processes, each with its share of the cores, at least one thread (two one-thread
    runs on two cores lose ~5% each; one run on two threads gains far less than 2x on models this
    small). With more processes than cores, a run's wall time counts the time it waited: its CPU time
    is what it cost. Every run's config is built, and so checked, before any run trains."""
    runs = {name: run_config(plan, name, data, out) for name in plan.runs}
    graph = tasks(plan, runs)
    jobs = default_jobs(graph) if jobs is None else jobs
    if jobs <= 1:
        for trainer_cls, config in runs.values():
            trainer_cls(config).fit()
        return
    threads = max(1, usable_cores() // jobs)
    for name in {t.run for t in graph.values() if t.stage}:  # its stages train in the workers, in one run directory
        trainer_cls, config = runs[name]
        trainer_cls(config).prepare_run_dir()
    print(f"training {describe(graph)} in up to {jobs} processes ({threads} torch thread{'s' if threads > 1 else ''} "
          f"each); logs: {out / 'logs'}", flush=True)
    _run_graph(graph, runs, out, jobs, threads)


def describe(graph: dict[str, Task]) -> str:
    """The tasks, each with those it waits for: `nocot, explicit, stepwise (after explicit), ...`."""
    return ", ".join(f"{t.name} (after {' and '.join(t.needs)})" if t.needs else t.name for t in graph.values())


def ready_tasks(graph: dict[str, Task], done: set, running: set, priority: dict) -> list[Task]:
    """The tasks not done or running whose models are ready, the longest remaining chain first."""
    waiting = [t for t in graph.values() if t.name not in done | running and set(t.needs) <= done]
    return sorted(waiting, key=lambda t: -priority[t.name])


def _run_graph(graph: dict[str, Task], runs: dict, out: Path, jobs: int, threads: int) -> None:
    """Each task in a worker process once the tasks it needs are done, the longest remaining chain first."""
    from tqdm.auto import tqdm

    priority, done, running = remaining_cost(graph), set(), {}
    with ProcessPoolExecutor(jobs, initializer=_worker_signals) as pool, \
            tqdm(total=len(graph), desc="demo tasks", unit="task") as bar:
        started = time.perf_counter()
        try:
            while len(done) < len(graph):
                ready = ready_tasks(graph, done, set(running.values()), priority)
                for task in ready[:jobs - len(running)]:
                    running[pool.submit(train_task, task, *runs[task.run], out, threads)] = task.name
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.exception():  # the tasks not started yet are dropped; those running finish first
                        pool.shutdown(wait=False, cancel_futures=True)
                    done.add(future.result())
                    del running[future]
                    bar.update(1)
                    bar.write(f"trained {future.result()} ({(time.perf_counter() - started) / 60:.1f} min)")
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


def measure_run(run: Path, test_file: Path, speed_examples: int) -> dict:
    """icot.compare.measure() of the run's best model, with the run's training examples and seconds."""
    from icot.compare import measure
    from icot.report import training_cost

    return {**measure(run / "best", test_file, speed_examples), **training_cost(run)}


def how_measured(plan: DemoPlan) -> str:
    """How the accuracy and speed columns were measured: after all training, so no run trains beside them."""
    import torch

    threads = torch.get_num_threads()
    return (f"Measured after all training, one model at a time, with {threads} torch thread{'s' * (threads > 1)}: "
            f"accuracy and examples/s at batch 64 on every test example, examples/s at batch 1 on the first "
            f"{plan.speed_examples}.")


def model_of(plan: DemoPlan, name: str) -> str:
    """The model shape a run trains: its own, or that of the run it starts from."""
    run = plan.runs[name]
    return model_of(plan, run["from"]) if "from" in run else run.get("model", plan.model)


def table(results: dict) -> str:
    lines = ["| method | model | test accuracy | examples/s (batch 1) | examples/s (batch 64) | generated tokens | "
             "training examples | training time | training CPU time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['model']} | {r['accuracy']:.3f} | {r['examples_per_s_batch1']:.1f} | "
                     f"{r['examples_per_s_batch64']:.0f} | "
                     f"{r['generated_tokens']:.1f} | {r['train_examples']} | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['train_cpu_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def run_demo(out: str, overwrite: bool = False, quick: bool = False, jobs: int | None = None, seed: int = 1234) -> dict:
    """The demo in `out`, locked against any other command meanwhile (paths.one_writer)."""
    with paths.one_writer(Path(out)):
        return _run_demo(Path(out), overwrite, quick, jobs, seed)


def _run_demo(out: Path, overwrite: bool, quick: bool, jobs: int | None, seed: int) -> dict:
    from icot.report import plot_accuracy_vs_removed

    plan = replace(DemoPlan().quick() if quick else DemoPlan(), seed=seed)
    if paths.check_fresh_dir(out, "--out", overwrite, hint=" or --out elsewhere"):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    paths.mark_as_ours(out)
    if quick:
        print(f"icot demo --quick: {QUICK_NOTE}", flush=True)
    started = time.perf_counter()
    data = make_data(plan, out)
    train_all(plan, data, out, jobs)
    results = {name: {"model": model_of(plan, name), **measure_run(out / name, data / "test.txt", plan.speed_examples)}
               for name in plan.runs}
    for name, run in plan.runs.items():  # a model trained from another one also cost that one's training
        if "from" in run:
            for key in ("train_examples", "train_seconds", "train_cpu_seconds"):
                results[name][key] += results[run["from"]][key]
    plot = plot_accuracy_vs_removed([out / "stepwise"], out / "stepwise_accuracy_vs_removed.png")
    minutes = (time.perf_counter() - started) / 60
    note = f"This is {QUICK_NOTE}.\n\n" if quick else ""
    report = (f"# icot demo{' --quick' if quick else ''}: {plan.digits} multiplication, CPU\n\n{note}{table(results)}\n\n"
              f"Test set: {plan.test} generated examples. Seed {plan.seed}. {how_measured(plan)} "
              f"Whole demo: {minutes:.1f} minutes.\n")
    paths.write_file(out / "results.md", report)
    record = {"plan": plain(plan.__dict__), "results": results, "minutes": minutes}
    paths.write_file(out / "results.json", json.dumps(record, indent=2))
    print("\n" + report)
    print(f"plot: {plot}\nmodels: {', '.join(str(out / n / 'best') for n in plan.runs)}")
    return results

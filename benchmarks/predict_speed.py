"""How long one `icot predict` takes, against importing torch and transformers, in one run.

    python benchmarks/predict_speed.py                # 5 rounds
    python benchmarks/predict_speed.py --rounds 9 --model models/mult3x3-micro-stepwise --question 907*555

Each round runs, one after the other in fresh processes (so that a busy spell of a shared machine
falls on all of them alike):

- *bare*: `python -c "import torch, transformers"`;
- *predict*: `python -m icot.cli predict --model MODEL QUESTION`, this checkout's `src/`;
- *transformers alone*: the same model directory loaded with `AutoTokenizer` and
  `AutoModelForCausalLM.from_pretrained` and run once, no icot: what any program answering with
  this model pays for the libraries' modules (transformers imports its model classes, generation
  and loading code only when a model is loaded, not at `import transformers`).

Prints the medians of wall-clock time and of CPU time (user + system of the process, which a
machine shared with other work inflates less than the wall clock), predict minus bare and
predict / bare (and the same against transformers alone), and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE = "import torch, transformers"
TRANSFORMERS_ALONE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    model(**tokenizer("1 2 3", return_tensors="pt"))
"""


def commands(model: str, question: str) -> dict[str, list[str]]:
    return {
        "bare": [sys.executable, "-c", BARE],
        "predict": [sys.executable, "-m", "icot.cli", "predict", "--model", model, question],
        "transformers alone": [sys.executable, "-c", TRANSFORMERS_ALONE, model],
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `command`."""
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ...: exit {done.returncode}\n{done.stderr}")
    return seconds, children_cpu() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="models/mult4x4-tiny-stepwise")
    parser.add_argument("--question", default="1234*5678")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cases = commands(args.model, args.question)
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, command in cases.items():
            runs[name].append(timed(command, env))
    load_after = os.getloadavg()
    print(f"{args.rounds} rounds, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({os.cpu_count()} CPUs)")
    print("| command | wall s, median | CPU s, median | wall s, all |\n|---|---|---|---|")
    wall = {name: statistics.median(w for w, _ in values) for name, values in runs.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in runs.items()}
    for name, values in runs.items():
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {' '.join(f'{w:.2f}' for w, _ in values)} |")
    for base in ("bare", "transformers alone"):
        for clock, median in (("wall", wall), ("CPU", cpu)):
            print(f"{clock}: predict - {base} {median['predict'] - median[base]:+.2f} s, "
                  f"predict / {base} {median['predict'] / median[base]:.2f}")


if __name__ == "__main__":
    main()

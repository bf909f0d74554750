"""Methods side by side: trained models of any method measured the same way on one test file.

    python benchmarks/methods.py --test data/3x3_200k/test.txt \\
        explicit=runs/explicit stepwise=runs/stepwise coconut=runs/coconut codi=models/some-model-dir

Each NAME=PATH is a run directory (its best model is measured, and its training examples and
seconds come from its metrics.jsonl; an ICoT-KD run sums its stages) or a model directory
(training cost not known: a dash). Per model: exact-match accuracy on the whole test file
at batch 64, examples/s at batch 1 (the papers' measure, on the first --speed-examples lines)
and at batch 64, and tokens generated per example. Prints a markdown table and writes it, with
the machine, the date and the command line, to --out (markdown) and beside it as JSON; an existing
file is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # this checkout's icot and benchmarks, not installed ones

from benchmarks.common import machine_info, quiet_libraries  # noqa: E402
from icot.api import resolve_device  # noqa: E402
from icot.compare import measure  # noqa: E402
from icot.errors import UserError  # noqa: E402
from icot.paths import check_output_file  # noqa: E402
from icot.report import training_cost  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=PATH", help="a run directory or a model directory")
    parser.add_argument("--test", required=True, type=Path, help="the test file (one example per line)")
    parser.add_argument("--speed-examples", type=int, default=200, help="lines timed at batch 1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/methods.md"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and its .json) if they exist")
    args = parser.parse_args(argv)
    pairs = [m.partition("=") for m in args.models]
    bad = [m for m, (_, sep, path) in zip(args.models, pairs) if not sep or not Path(path).is_dir()]
    if bad:
        parser.error(f"not NAME=DIRECTORY (an existing run or model directory): {', '.join(bad)}")
    if not args.test.is_file():
        parser.error(f"--test {args.test}: no such file")
    args.models = {name: Path(path) for name, _, path in pairs}
    try:
        for out in (args.out, args.out.with_suffix(".json")):
            check_output_file(out, "--out", args.overwrite, inputs=[args.test])
    except UserError as e:
        parser.error(str(e))
    return args


def measure_one(path: Path, test: Path, speed_examples: int) -> dict:
    is_run = (path / "best").is_dir()
    result = measure(path / "best" if is_run else path, test, speed_examples)
    cost = training_cost(path) if is_run else {"train_examples": None, "train_seconds": None, "train_cpu_seconds": None}
    return {**result, **cost}


def table(results: dict) -> str:
    lines = ["| method | test accuracy | examples/s (batch 1) | examples/s (batch 64) | generated tokens | "
             "training examples | training time |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        trained = (f"{r['train_examples']} | {r['train_seconds'] / 60:.1f} min" if r["train_seconds"] is not None
                   else "– | –")
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['examples_per_s_batch1']:.1f} | "
                     f"{r['examples_per_s_batch64']:.0f} | {r['generated_tokens']:.1f} | {trained} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    results = {name: measure_one(path, args.test, args.speed_examples) for name, path in args.models.items()}
    facts = machine_info(resolve_device())  # where measure() runs: icot eval's default device
    report = f"{table(results)}\n\nTest file: {args.test}. Machine and command: {json.dumps(facts)}.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "machine": facts, "test": str(args.test),
                                                         "models": {k: str(v) for k, v in args.models.items()}}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

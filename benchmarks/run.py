"""The benchmark suite: training and decoding throughput and peak memory, in one run on one machine.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--bf16] [--model tiny] [--out benchmarks/results/NAME.json]

Every case runs in its own process (so its peak memory is its own) and prints one JSON line; this
script collects them, prints markdown tables and the targets as PASS/FAIL, and writes a JSON file
with the machine, the command and every measurement. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # this checkout's icot and benchmarks, not installed ones
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm.auto import tqdm  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import device_of, machine_info, quiet_libraries  # noqa: E402

REFERENCE = ROOT / "data" / "reference"
MULT_FILES = {"4x4": REFERENCE / "mult" / "4x4_test.txt", "9x9": REFERENCE / "mult" / "9x9_test.txt"}
GSM8K_TRAIN = REFERENCE / "gsm8k" / "train_no_aug.txt"
MULT_TRAIN_DIGITS = "4x4"
BPE_VOCAB = 4096

# How much work each case does (the full run with `tiny` on 2 CPU cores: see benchmarks/README.md).
SIZES = {
    "full": {"train_batch": 32, "train_warmup": 3, "train_steps": {"mult": 60, "gsm8k": 20}, "mult_train_rows": 4096,
             "b1_examples": 50, "b128_examples": 512, "hf_examples": 25, "repeats": 3},
    "quick": {"train_batch": 32, "train_warmup": 1, "train_steps": {"mult": 3, "gsm8k": 2}, "mult_train_rows": 256,
              "b1_examples": 3, "b128_examples": 128, "hf_examples": 2, "repeats": 1},
}
DECODE_BATCH = 128


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps and examples per case: checks that it works")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in training, bf16 weights in decoding")
    parser.add_argument("--model", default="tiny", help="model preset (micro, tiny, small, gpt2-small, ...)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our loop with torch.compile (compiling takes minutes on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results file (default benchmarks/results/<device>-<model>[-quick].json)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return parser.parse_args(argv)


def run_one_case(spec: dict) -> None:
    """Child process: measure one case and print its result as the last line of stdout."""
    quiet_libraries()
    if spec["kind"] == "train":
        from benchmarks import training as module
    else:
        from benchmarks import decoding as module
    print(json.dumps(module.run_case(spec)), flush=True)


def in_child(spec: dict) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark case failed (exit {done.returncode}): {json.dumps(spec)}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**spec, **result, "case_wall_seconds": time.perf_counter() - start}


def prepare_training_data(work: Path, size: dict, seed: int) -> list[dict]:
    """A generated multiplication training file and GSM8K with a BPE tokenizer trained on it."""
    from icot.data.format import write_examples
    from icot.data.mult import MultTask, mult_example, sample_splits
    from icot.data.tokenizers import save_tokenizer, train_bpe
    from benchmarks.training import scheduled_for, training_rows

    mult = work / f"mult{MULT_TRAIN_DIGITS}"
    mult.mkdir()
    pairs = sample_splits(MultTask.parse(MULT_TRAIN_DIGITS), {"train": size["mult_train_rows"]}, seed=seed)["train"]
    write_examples(mult / "train.txt", [mult_example(a, b) for a, b in pairs])
    gsm8k, bpe = work / "gsm8k", work / "bpe"
    gsm8k.mkdir()
    (gsm8k / "train.txt").symlink_to(GSM8K_TRAIN)
    save_tokenizer(train_bpe([GSM8K_TRAIN], BPE_VOCAB), bpe)
    datasets = [{"data": f"mult {MULT_TRAIN_DIGITS}", "key": "mult", "data_dir": str(mult), "tokenizer": None},
                {"data": f"GSM8K (BPE {BPE_VOCAB})", "key": "gsm8k", "data_dir": str(gsm8k), "tokenizer": str(bpe)}]
    for d in datasets:
        _, rows = training_rows(d)
        d["scheduled"] = scheduled_for(rows)
    return datasets


def training_specs(args, size: dict, datasets: list[dict]) -> list[dict]:
    specs = []
    for d in datasets:
        for loop in ("plain", "ours") + (("ours-compiled",) if args.compile else ()):
            specs.append({"kind": "train", "loop": loop, **d, "model": args.model, "batch_size": size["train_batch"],
                          "warmup": size["train_warmup"], "steps": size["train_steps"][d["key"]],
                          "device": args.device, "bf16": args.bf16, "seed": args.seed})
    return specs


def decoding_specs(args, size: dict) -> list[dict]:
    paths = [("ours", 1, size["b1_examples"]), ("ours", DECODE_BATCH, size["b128_examples"]), ("hf", 1, size["hf_examples"])]
    specs = []
    for name, file in MULT_FILES.items():
        for method in ("nocot", "implicit", "explicit"):
            for path, batch, examples in paths:
                specs.append({"kind": "decode", "file_name": name, "file": str(file), "method": method, "path": path,
                              "batch_size": batch, "examples": examples, "repeats": size["repeats"],
                              "model": args.model, "device": args.device, "bf16": args.bf16, "seed": args.seed})
    return specs


def default_out(args) -> Path:
    name = f"{args.device}-{args.model}{'-bf16' if args.bf16 else ''}{'-quick' if args.quick else ''}.json"
    return BENCH / "results" / name


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        run_one_case(json.loads(args.case))
        return 0
    device = device_of(args.device)
    quiet_libraries()
    size = SIZES["quick" if args.quick else "full"]
    info = machine_info(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="icot-bench-data-") as work:
        datasets = prepare_training_data(Path(work), size, args.seed)
        specs = training_specs(args, size, datasets) + decoding_specs(args, size)
        results = [in_child(spec) for spec in tqdm(specs, desc="benchmark cases", unit="case")]
    training = [r for r in results if r["kind"] == "train"]
    decoding = [r for r in results if r["kind"] == "decode"]
    summary = report.summarise(training, decoding, device, args.model, args.bf16)
    info["total_wall_seconds"] = time.perf_counter() - started
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"quick": args.quick, "model": args.model, "bf16": args.bf16, "compile": args.compile, "seed": args.seed,
                "sizes": size, "decode_batch": DECODE_BATCH}
    out.write_text(json.dumps({"machine": info, "settings": settings, "training": training, "decoding": decoding,
                               **summary}, indent=2) + "\n")
    print(report.markdown(info, args, training, decoding, summary))
    print(f"\n{len(results)} cases in {info['total_wall_seconds'] / 60:.1f} minutes; results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

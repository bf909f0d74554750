"""Ratios, targets and the markdown report of one benchmark run."""

from __future__ import annotations

TRAIN_TARGET = 1.5  # our loop vs the plain loop, real (unpadded) tokens/s
BATCHED_TARGET = 10.0  # batch 128 vs batch 1, examples/s, on the CPU
IMPLICIT_NOCOT_TOLERANCE = 0.10  # implicit within 10% of no-CoT
LOOP_NAMES = {"plain": "plain (per-example removal, unsorted padding, eager attention)", "ours": "ours (shared Trainer)",
              "ours-compiled": "ours with torch.compile"}
PATH_NAMES = {"ours": "ours (batched, KV cache)", "hf": "HF generate, per example"}
# The papers' batch-1 throughput of ICoT-SI with GPT-2 Small on their GPU (examples/s).
PAPER_BATCH1 = {"4x4": 17.5, "9x9": 10.6}


def _index(decoding: list[dict]) -> dict:
    return {(r["file_name"], r["method"], r["path"], r["batch_size"]): r for r in decoding}


def _at_least(name: str, value: float, threshold: float) -> dict:
    return {"target": name, "value": value, "rule": f">= {threshold:.2f}", "pass": value >= threshold}


def _near_one(name: str, value: float, tolerance: float) -> dict:
    return {"target": name, "value": value, "rule": f"within 1 ± {tolerance:.2f}", "pass": abs(value - 1) <= tolerance}


def training_ratios(training: list[dict]) -> dict:
    """{data: {loop: {measure: our loop / the plain loop}}} in tokens/s and examples/s.

    Tokens/s counts real tokens (no padding): with length grouping, which batches fall in the timed
    steps changes the examples per second a lot on variable-length data, and the tokens per second little.
    """
    plain = {r["data"]: r for r in training if r["loop"] == "plain"}
    ratios: dict = {}
    for r in training:
        if r["loop"] != "plain":
            base = plain[r["data"]]
            ratios.setdefault(r["data"], {})[r["loop"]] = {m: r[m] / base[m] for m in ("tokens_per_s", "examples_per_s")}
    return ratios


def decoding_ratios(decoding: list[dict]) -> dict:
    ix = _index(decoding)
    files = list(dict.fromkeys(r["file_name"] for r in decoding))
    batches = sorted({r["batch_size"] for r in decoding if r["path"] == "ours"})
    speed = lambda f, m, b, p="ours": ix[f, m, p, b]["examples_per_s"]
    top = max(batches)
    return {f: {
        "batched_over_batch1": {m: speed(f, m, top) / speed(f, m, 1) for m in ("nocot", "implicit", "explicit")},
        "ours_over_hf_batch1": {m: speed(f, m, 1) / speed(f, m, 1, "hf") for m in ("nocot", "implicit", "explicit")},
        "implicit_over_nocot": {b: speed(f, "implicit", b) / speed(f, "nocot", b) for b in batches},
        "implicit_over_explicit": {b: speed(f, "implicit", b) / speed(f, "explicit", b) for b in batches},
        "generated_length_ratio": ix[f, "explicit", "ours", 1]["tokens_per_example"]
                                  / ix[f, "implicit", "ours", 1]["tokens_per_example"],
    } for f in files}


def targets(train: dict, decode: dict, device) -> list[dict]:
    out = [_at_least(f"training {data}: our loop / plain loop, tokens/s", r["ours"]["tokens_per_s"], TRAIN_TARGET)
           for data, r in train.items()]
    for f, d in decode.items():
        if device.type == "cpu":
            out += [_at_least(f"decoding {f} {m}: batch 128 / batch 1", r, BATCHED_TARGET)
                    for m, r in d["batched_over_batch1"].items()]
        out += [_near_one(f"decoding {f} batch {b}: implicit / no-CoT", r, IMPLICIT_NOCOT_TOLERANCE)
                for b, r in d["implicit_over_nocot"].items()]
    if "9x9" in decode:
        d = decode["9x9"]
        out += [_at_least(f"decoding 9x9 batch {b}: implicit / explicit (threshold: explicit / implicit generated length)",
                          r, d["generated_length_ratio"]) for b, r in d["implicit_over_explicit"].items()]
    return out


def summarise(training: list[dict], decoding: list[dict], device, model: str, bf16: bool) -> dict:
    train, decode = training_ratios(training), decoding_ratios(decoding)
    summary = {"training_ratios": train, "decoding_ratios": decode, "targets": targets(train, decode, device)}
    if device.type == "cuda" and model == "gpt2-small":
        summary["paper_reference"] = {"note": "the papers' numbers: ICoT-SI, GPT-2 Small, batch 1, their GPU (different "
                                              "hardware, trained models)", "examples_per_s": PAPER_BATCH1}
    return summary


def _mem(r: dict) -> str:
    if "peak_cuda_allocated_mib" in r:
        return f"{r['peak_cuda_allocated_mib']:.0f}"
    return f"{r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] - r['rss_before_mib']:+.0f})"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def training_table(training: list[dict], ratios: dict) -> list[str]:
    rows = []
    for r in training:
        ratio = ratios[r["data"]][r["loop"]] if r["loop"] != "plain" else None
        ratio_text = f"{ratio['tokens_per_s']:.2f}x ({ratio['examples_per_s']:.2f}x)" if ratio else ""
        rows.append([r["data"], LOOP_NAMES[r["loop"]], r["scheduled"], r["steps"], f"{100 * r['padding_fraction']:.1f}%",
                     f"{r['tokens_per_s']:.0f}", f"{r['examples_per_s']:.1f}", _mem(r), ratio_text])
    return _table(["data", "loop", "CoT tokens removed (+ smoothing)", "timed steps", "padding", "tokens/s",
                   "examples/s", "peak memory MiB", "ours / plain: tokens/s (examples/s)"], rows)


def decoding_table(decoding: list[dict], paper: dict | None) -> list[str]:
    rows = [[r["file_name"], r["method"], PATH_NAMES[r["path"]], r["batch_size"], f"{r['tokens_per_example']:.0f}",
             r["examples"], f"{r['examples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", _mem(r)] for r in decoding]
    if paper:
        rows += [[f, "implicit (trained ICoT-SI)", "the papers' number: GPT-2 Small, their GPU", 1, "", "", v, "", ""]
                 for f, v in paper["examples_per_s"].items()]
    return _table(["file", "method", "path", "batch", "tokens generated / example", "examples", "examples/s",
                   "tokens/s", "peak memory MiB"], rows)


def ratio_lines(decode: dict) -> list[str]:
    lines = []
    for f, d in decode.items():
        parts = [f"implicit/explicit {_ratios(d['implicit_over_explicit'])}",
                 f"generated-length ratio explicit/implicit {d['generated_length_ratio']:.2f}",
                 f"implicit/no-CoT {_ratios(d['implicit_over_nocot'])}",
                 "batch 128 / batch 1: " + ", ".join(f"{m} {r:.1f}x" for m, r in d["batched_over_batch1"].items()),
                 "ours / HF generate at batch 1: " + ", ".join(f"{m} {r:.2f}x" for m, r in d["ours_over_hf_batch1"].items())]
        lines.append(f"- {f}: " + "; ".join(parts))
    return lines


def _ratios(by_batch: dict) -> str:
    return ", ".join(f"{r:.2f}x at batch {b}" for b, r in by_batch.items())


def markdown(info: dict, args, training: list[dict], decoding: list[dict], summary: dict) -> str:
    device = info["device"] + (f" ({info['gpu']})" if "gpu" in info else "")
    # CPU runs since 2026-12-05 record it
    bf16 = {True: " (native bf16)", False: " (bf16 emulated)", None: ""}[info.get("cpu_native_bf16")]
    out = [f"# icot benchmarks{' (quick: a smoke test, not a measurement)' if args.quick else ''}", "",
           f"{info['date']}; {info['cpu']}{bf16}, {info['cpu_cores_usable']} usable cores, torch {info['torch']} with "
           f"{info['torch_threads']} threads, device {device}, model `{args.model}`{', bf16' if args.bf16 else ''}",
           f"command: `{info['command']}`", "",
           "## Training: stepwise internalization mid-schedule (smoothing λ = 4), same model, data, batch size", "",
           *training_table(training, summary["training_ratios"]), "",
           "Peak memory: GPU peak allocation, or on the CPU the process's peak RSS (and its rise during the timed "
           "steps); each case runs in its own process.", "",
           "## Decoding (random-initialised models; each example generates exactly the tokens its trained method "
           "emits: explicit CoT + SEP + answer + EOS, implicit and no-CoT SEP + answer + EOS)", "",
           *decoding_table(decoding, summary.get("paper_reference")), "", *ratio_lines(summary["decoding_ratios"]), "",
           "## Targets", ""]
    out += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']}: {t['value']:.2f} ({t['rule']})"
            for t in summary["targets"]]
    return "\n".join(out)

#!/usr/bin/env bash
# The GPU check (issue 46): on one GPU, in under 10 minutes, a GPT-2-Small-shaped model (the
# `gpt2-small` preset, 124M parameters, from scratch) trains 300 steps of explicit CoT on 4x4
# multiplication in bf16-mixed, then with gradient checkpointing, then sharded (fsdp: true, one process
# under torchrun), then LoRA adapters on the first run's model; each run must lower its loss and save a
# model that decodes; icot eval gives
# examples/s at batch 1 and 64. Prints one
# summary at the end (and writes it to $OUT/gpu_check.md when OUT is set, e.g. by the device tool).
#
#     bash benchmarks/gpu_check.sh            # needs a CUDA GPU and this checkout installed (pip install -e ".[dev]")
set -euo pipefail -f  # -f: the options below hold brackets, not file patterns
cd "$(dirname "$0")/.."
work=$(mktemp -d)
out=${OUT:-$work}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$work/gpu.txt"

icot data mult --digits 4x4 --out "$work/data" --train 40000 --valid 200 --test 0
cp data/reference/mult/4x4_test.txt "$work/data/test.txt"
common=(--method explicit --data "$work/data" --model gpt2-small --batch-size 32 --lr 1e-4 --max-steps 300
        --eval-every 300 --max-eval-examples 200 --log-every 25 --precision bf16-mixed --save-every 1000)

declare -A extra=([bf16]="" [checkpointing]="--gradient-checkpointing" [fsdp]="--fsdp true"
                  [lora]="--model $work/bf16/best --lora.r 16 --lora.target-modules [c_attn,c_proj,c_fc] --lr 1e-3")
for run in bf16 checkpointing fsdp lora; do
    launch=(icot)
    [[ $run == fsdp ]] && launch=(python -m torch.distributed.run --nproc_per_node 1 -m icot.cli)
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e" -o "$work/$run.time" "${launch[@]}" train "${common[@]}" --out "$work/$run" ${extra[$run]} \
        > "$work/$run.log" 2>&1 || { tail -20 "$work/$run.log"; exit 1; }
done
for batch in 1 64; do
    icot eval --model "$work/bf16/best" --data "$work/data/test.txt" --batch-size "$batch" --max-examples 500 \
        --json "$work/eval_b$batch.json" > /dev/null
done

python - "$work" "$out" <<'EOF'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = [f"GPU: {(work / 'gpu.txt').read_text().strip()}", "",
         "| run | first loss | last loss | train examples/s | wall s | test accuracy |",
         "|---|---|---|---|---|---|"]
ok = True
for run in ("bf16", "checkpointing", "fsdp", "lora"):
    records = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    end = records[-1]
    ok &= train[-1]["loss"] < 0.9 * train[0]["loss"] and (work / run / "best" / "model.safetensors").exists()
    speed = sum(r["examples_per_s"] for r in train[1:]) / max(len(train) - 1, 1)
    lines.append(f"| {run} | {train[0]['loss']:.3f} | {train[-1]['loss']:.3f} | {speed:.0f} | "
                 f"{(work / f'{run}.time').read_text().strip()} | "
                 f"{end.get('test_accuracy', float('nan')):.3f} |")
lines.append("")
for batch in (1, 64):
    result = json.loads((work / f"eval_b{batch}.json").read_text())
    lines.append(f"decoding at batch {batch}: {result['examples_per_s']:.1f} examples/s, accuracy {result['accuracy']:.3f}")
lines.append(f"\ncheck: {'PASS' if ok else 'FAIL'} (each run's loss falls by a tenth or more and its best model is saved)")
text = "\n".join(lines)
print(text)
(out / "gpu_check.md").write_text(text + "\n")
sys.exit(0 if ok else 1)
EOF

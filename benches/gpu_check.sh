#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU. Each figure is one JSON file in OUT:
# - stage 1: the paper-size prior step (1024 x 6, 32-d, batch 32,768 x mc 4), f32 and bf16;
# - stage 2: the ViT-B and ViT-L autoencoder steps at 256 px (batch 32 and 16);
# - stage 3: MAR-B training steps/s in bf16 and f32, sampling images/s (64 iterations x 100 steps);
# then `summary.txt`: vectors/s or images/s, peak GPU memory (nvidia-smi, sampled every 0.5 s) and
# the fraction of the GPU's peak FLOP/s (matrix-product FLOPs from each JSON, against the data-sheet
# f32 and bf16 dense peaks of the GPUs named in PEAKS below).
#
# Build on a machine with the toolchain (the GPU machine needs no network), then run there:
#   cargo build --release --no-default-features --features wgpu     # or --features cuda
#   benches/gpu_check.sh target/release/flowalign wgpu OUT_DIR       # or cuda
# `benches/gpu_check.sh target/release/flowalign cpu OUT_DIR` runs every step on the CPU at smoke
# sizes (the same commands and flags; only the device and the sizes differ), in under a minute.
#
# Each figure has its own time limit, so a slow or failing one leaves the others' JSON.
set -uo pipefail
usage="usage: gpu_check.sh FLOWALIGN_BINARY wgpu|cuda|cpu OUT_DIR"
bin=${1:?$usage}
device=${2:?$usage}
out=${3:?$usage}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true

step() { # name seconds-limit flowalign-bench-args...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS mon=""
    if command -v nvidia-smi >/dev/null && [ "$device" != cpu ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
            >"$out/$name.mem" 2>/dev/null &
        mon=$!
    fi
    timeout "$limit" "$bin" bench "$@" --device "$device" --out "$out/$name.json" \
        >"$out/$name.log" 2>&1
    local rc=$?
    [ -n "$mon" ] && kill "$mon" 2>/dev/null
    echo "   exit $rc after $((SECONDS - start))s; $(tail -n 1 "$out/$name.log" | cut -c1-300)"
}

if [ "$device" = cpu ]; then
    prior=(--width 256 --depth 3 --batch 256 --seconds 3 --rounds 1 --no-peer)
    ae_b=(--model tiny --batch 1 --seconds 3 --no-peer)
    ae_l=(--model tiny --batch 2 --seconds 3 --no-peer)
    gen=(--gen-preset small --batch 2 --seconds 3 --no-peer)
    sample=(--gen-preset small --batch 2 --seconds 2 --iters 4 --head-steps 10 --sample-batch 2 --no-peer)
else
    prior=(--batch 32768 --seconds 15)
    ae_b=(--model vit-b --batch 32 --seconds 15)
    ae_l=(--model vit-l --batch 16 --seconds 15)
    gen=(--batch 64 --seconds 20)
    sample=(--batch 8 --seconds 3 --iters 64 --head-steps 100 --sample-batch 64)
fi
step prior-f32 60 prior --precision f32 "${prior[@]}"
step prior-bf16 60 prior --precision bf16 "${prior[@]}"
step ae-vitb 70 ae --precision f32 "${ae_b[@]}"
step ae-vitl 80 ae --precision f32 "${ae_l[@]}"
step gen-train-bf16 80 gen --precision bf16 --no-sampling "${gen[@]}"
step gen-train-f32 80 gen --precision f32 --no-sampling "${gen[@]}"
step gen-sample 120 gen --precision f32 "${sample[@]}"

# The summary (python3 where there is one; the JSON files stand on their own otherwise).
python3 - "$out" "$device" <<'PY' | tee "$out/summary.txt" || echo "no python3: read the JSON files in $out"
import json, os, sys
out, device = sys.argv[1], sys.argv[2]
# Data-sheet dense peaks in TFLOP/s: (f32, bf16).
PEAKS = {"H200": (67.0, 989.4), "H100": (67.0, 989.4), "A100": (19.5, 312.0), "L40S": (91.6, 362.1),
         "L4": (30.3, 121.0), "A10": (31.2, 125.0), "RTX 4090": (82.6, 165.2)}
name = ""
try:
    name = open(os.path.join(out, "gpu.txt")).read().splitlines()[1].split(",")[0]
except (OSError, IndexError):
    pass
peak = next((v for k, v in PEAKS.items() if k in name), None)
print(f"device: {device} {name or '(no nvidia-smi)'}; data-sheet peak f32/bf16 TFLOP/s: {peak}")

def load(n):
    try:
        return json.load(open(os.path.join(out, n + ".json")))
    except (OSError, ValueError):
        return None

def mem(n):
    try:
        return max(int(l) for l in open(os.path.join(out, n + ".mem")) if l.strip().isdigit())
    except (OSError, ValueError):
        return None

def row(n, rate, unit, flops, bf16):
    tf = rate * flops / 1e12 if rate and flops else None
    frac = tf / peak[1 if bf16 else 0] if tf and peak else None
    print(f"{n:16s} {rate or 0:12.1f} {unit:10s} GPU mem {mem(n) or '-':>7} MiB  "
          f"{tf or 0:8.2f} TFLOP/s  {'%.1f %%' % (100 * frac) if frac else '-':>7} of peak")

for n, bf16 in (("prior-f32", False), ("prior-bf16", True)):
    d = load(n)
    if d:
        v = d.get("flowalign", {}).get("vectors_per_sec") or d.get("vectors_per_sec")
        row(n, v, "vectors/s", d.get("train_flops_per_vector"), bf16)
for n in ("ae-vitb", "ae-vitl"):
    d = load(n)
    if d:
        row(n, d.get("train_images_per_sec"), "images/s",
            (d.get("flops_per_step") or 0) / max(d.get("batch", 1), 1), False)
for n, bf16 in (("gen-train-bf16", True), ("gen-train-f32", False)):
    d = load(n)
    if d:
        row(n, d.get("flowalign", {}).get("train_latents_per_sec"), "latents/s", None, bf16)
d = load("gen-sample")
if d:
    print("gen-sample       " + json.dumps(d.get("sampling"))[:300])
PY
echo "results in $out"

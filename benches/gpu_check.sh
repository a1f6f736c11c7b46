#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU: stage-3 MAR-B training steps/s and peak memory in bf16
# and f32, MAR-B sampling images/s (64 iterations x 100 time points, guidance off and on), and the
# stage-1 prior step, each as one JSON file in OUT.
#
# Build on a machine with the toolchain (the GPU machine needs no network), then run there:
#   cargo build --release --no-default-features --features wgpu     # or --features cuda
#   benches/gpu_check.sh target/release/flowalign wgpu OUT_DIR       # or cuda
#
# Each figure has its own time limit, so a slow or failing one leaves the others' JSON.
set -uo pipefail
bin=${1:?usage: gpu_check.sh FLOWALIGN_BINARY wgpu|cuda OUT_DIR}
device=${2:?usage: gpu_check.sh FLOWALIGN_BINARY wgpu|cuda OUT_DIR}
out=${3:?usage: gpu_check.sh FLOWALIGN_BINARY wgpu|cuda OUT_DIR}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true

step() { # name seconds-limit flowalign-args...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$bin" bench "$@" --device "$device" --out "$out/$name.json" \
        >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start))s; $(tail -n 1 "$out/$name.log" | cut -c1-300)"
}

step gen-train-bf16 100 gen --precision bf16 --batch 64 --seconds 20 --no-sampling
step gen-train-f32 100 gen --precision f32 --batch 64 --seconds 20 --no-sampling
step gen-sample 150 gen --precision f32 --batch 8 --seconds 3 --iters 64 --head-steps 100 \
    --sample-batch 64
step prior-bf16 60 prior --precision bf16 --seconds 15
echo "results in $out"

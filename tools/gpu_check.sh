#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one prepared run (about 6-8 minutes on an H100/H200), for a
# session that is lent a GPU machine. It times the sampler by stage (one step and 25 guided steps at 512²,
# bf16, compiled, CUDA graphs; plain and fast paths at batch 1, 8, 32) and a 0.5B training step at 512²
# and 256² (bf16, block-compiled), and the degradation; every table goes to $OUT (or ./gpu_results).
#
# The device's Python has torch and timm but no diffusers (the SD2.1-shaped VAE of the 0.5B rows): carry it
# as wheels. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib-metadata
# then run with `.whl` carried:   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # one step of the check: its own time limit, its output kept, and the next step runs whatever happens
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tee -a "$out/log.txt" | tail -n 25
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
run sample_graphs 200 python3 -m tools.bench_sample --preset 0.5B --size 512 --batch 1 --steps 1,25 --dtypes bf16 \
    --paths fast --compile --cuda-graphs --bench-json "$out/sample_graphs.json"
run sample_batches 150 python3 -m tools.bench_sample --preset 0.5B --size 512 --batch 1,8,32 --steps 1 --dtypes bf16 \
    --paths plain,fast --bench-json "$out/sample_batches.json"
run train_512 100 python3 -m tools.bench_train --preset 0.5B --size 512 --batch 16 --steps 10 --device cuda --bf16 --compile \
    --bench-json "$out/train_512.json"
run train_256 100 python3 -m tools.bench_train --preset 0.5B --size 256 --batch 64 --steps 10 --device cuda --bf16 --compile \
    --bench-json "$out/train_256.json"
run degrade 30 python3 -m tools.bench_degrade --device cuda --batch 8

#!/usr/bin/env bash
# Runs every benchmark at the paper's shapes on the GPU machine and keeps the tables in $OUT.
# From the device tool, after benchmarks/fetch_gpu_wheels.sh here:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:.whl/stubs:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/bench-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, tokamax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
python3 -m benchmarks.grouped_matmul 2>&1 | tee "$OUT/grouped_matmul.txt"
python3 -m benchmarks.token_permute 2>&1 | tee "$OUT/token_permute.txt"
python3 -m benchmarks.moe_block 2>&1 | tee "$OUT/moe_block.txt"
python3 -m benchmarks.inference 2>&1 | tee "$OUT/inference.txt"
# One H100 holds neither model whole with Adam states: 8 layers, 4 x 4,096 tokens per step.
python3 -m benchmarks.train_step --layers 8 --batch 4 --seq 4096 --steps 10 2>&1 | tee "$OUT/train_step.txt"

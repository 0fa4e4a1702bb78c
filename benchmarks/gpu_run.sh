#!/usr/bin/env bash
# Runs the GPU checks and every benchmark at the paper's shapes on the GPU machine, keeps each
# table in $OUT, and gathers them into $OUT/RESULTS-gpu.md, ready for benchmarks/RESULTS.md.
# Every table's title carries the device, and those of the kernel and block benchmarks the dense
# matmul ceiling and copy bandwidth measured in the same run.
# From the device tool, after benchmarks/fetch_gpu_wheels.sh here:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:.whl/stubs:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/bench-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, tokamax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
# The kernels that run only on a GPU (tokamax's, and the Mosaic GPU permute and combine behind
# "pallas") against their references first: a timing of a wrong kernel is no use.
JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m benchmarks.token_permute 2>&1 | tee "$OUT/token_permute.txt"
python3 -m benchmarks.grouped_matmul 2>&1 | tee "$OUT/grouped_matmul.txt"
python3 -m benchmarks.moe_block 2>&1 | tee "$OUT/moe_block.txt"
python3 -m benchmarks.inference 2>&1 | tee "$OUT/inference.txt"
# One H100 holds neither model whole with Adam states: 8 layers, 4 x 4,096 tokens per step.
python3 -m benchmarks.train_step --layers 8 --batch 4 --seq 4096 --steps 10 2>&1 | tee "$OUT/train_step.txt"

# The section for RESULTS.md: the device and the GPU tests' verdict, then each table under its
# title in bold (a title is the line before a table that names the jax version).
{
  echo "## $(sed -n 2p "$OUT/device.txt" | cut -d, -f1), $(date +%Y-%m-%d)"
  echo
  echo '```'
  cat "$OUT/device.txt"
  echo "tests/test_gpu.py: $(tail -n 1 "$OUT/gpu_tests.txt")"
  echo '```'
  for table in token_permute grouped_matmul moe_block inference train_step; do
    awk '!/^\|/ && /, jax [0-9]/ { print "\n**" $0 "**\n"; next } /^\|/ { print }' "$OUT/$table.txt"
  done
} > "$OUT/RESULTS-gpu.md"
echo "wrote $OUT/RESULTS-gpu.md"

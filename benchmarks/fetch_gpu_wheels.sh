#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels the benchmark GPU machine lacks: its image has
# Python 3.12 with jax/jaxlib 0.11.2, flax, optax, orbax-checkpoint, numpy, absl-py and no
# network. tokamax 0.0.17 imports xprof when imported, for benchmarking helpers this project
# does not use: a two-line stand-in package is written instead of the real (large) one.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for package in tokamax==0.0.17 qwix einshape jaxtyping wadler-lindig immutabledict pydantic \
               pydantic-core typing-inspection annotated-types typing-extensions tensorboardx \
               protobuf opt-einsum tqdm; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$package"
done
mkdir -p .whl/stubs/xprof/cli
echo '"""Stand-in: tokamax imports xprof at import time; the benchmarks never call it."""' \
  > .whl/stubs/xprof/__init__.py
touch .whl/stubs/xprof/cli/__init__.py
cat > .whl/stubs/xprof/cli/tools.py <<'PY'
def get_kernel_stats_tool(*args, **kwargs):
    raise RuntimeError("xprof stand-in: profiling is not available on this machine")
PY
ls .whl

#!/usr/bin/env bash
# The GPU checks (benchmarks/bench_gpu.py) on a bare CUDA machine whose python3 has PyTorch and
# no internet: packages travel as wheels in .whl/ (Ray as a trimmed tarball, the wheel being too
# big to carry), routescope as its source tree. Figures and the log go to $OUT (default gpu-results/).
# Usage: bash benchmarks/gpu_wheels.sh (here, once), then on the GPU machine
#        bash benchmarks/run_gpu.sh [bench_gpu.py options]
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
REPO=$(pwd)
export PYTHONUNBUFFERED=1
SITE=/tmp/routescope-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
if [ -f .whl/ray-lite.tar.xz ]; then tar xJf .whl/ray-lite.tar.xz -C "$SITE" || exit 1; fi
# The package layout of pyproject.toml (routescope.workers is workers/, ...), without a build step.
mkdir -p "$SITE/routescope" && cp -r routescope/. "$SITE/routescope/"
for m in workers cluster viewer; do rm -rf "${SITE:?}/routescope/$m"; cp -r "$m" "$SITE/routescope/$m"; done
export PYTHONPATH=$SITE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -P -c "import torch, transformers, transformer_lens, ray, routescope.workers.stage as s; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)" || exit 1
WORK=/dev/shm/routescope-bench
avail=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
if [ "${avail:-0}" -lt 48 ]; then WORK=/tmp/routescope-bench; fi
echo "work dir: $WORK (/dev/shm has ${avail:-?} GiB free)"
# Run from elsewhere: Ray workers put the driver's directory first on sys.path, where the source
# tree's routescope/ (without workers/ etc.) would shadow the package.
cd /tmp && python3 "$REPO/benchmarks/bench_gpu.py" --out "$OUT" --work "$WORK" "$@" 2>&1 | tee "$OUT/bench_gpu.log"

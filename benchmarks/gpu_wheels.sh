#!/usr/bin/env bash
# Fill .whl/ with what benchmarks/run_gpu.sh installs on a GPU machine that has CUDA PyTorch,
# transformers' own dependencies and no internet (the device image of this workplace): wheels
# for CPython 3.12 of the packages routescope needs beyond that image, and Ray as a tarball with
# the parts routescope never imports removed (its wheel, ~80 MB, is over the 64 MiB a device call
# may carry). Versions are the ones in this checkout's .venv. Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=(transformer_lens transformers datasets dill multiprocess huggingface_hub httpx2 httpcore2 truststore
      beartype typeguard fancy-einsum jsonschema jsonschema-specifications referencing rpds-py click)
mkdir -p .whl
args=()
for p in "${PKGS[@]}"; do args+=("$p==$(ver "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${args[@]}"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$tmp" "ray==$(ver ray)"
(cd "$tmp" && unzip -q ray-*.whl && rm -rf ray/jars ray/rllib ray/tune ray/train ray/data ray/serve \
    ray/dashboard/client ray/llm ray/air/examples && tar cf - ray ray-*.dist-info | xz -T2 -6 > ray-lite.tar.xz)
mv "$tmp/ray-lite.tar.xz" .whl/
rm -rf "$tmp"
du -sh .whl

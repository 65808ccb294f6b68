#!/usr/bin/env bash
# Score prediction files side by side (the paper's Table 1 / Figure 4) into metrics.json, metrics.md and
# position.png:
#   bash launch/eval.sh --predictions out/flythinker.jsonl out/baseline.jsonl --out out/eval \
#       [--names FlyThinker Baseline] [--tokenizer GENERATOR_DIR] [--bertscore-model ROBERTA_DIR]
# Hardware: CPU is enough (ROUGE/BLEU/METEOR are CPU-only); a GPU, when present, only speeds up
# BERTScore (default: the packaged all-MiniLM-L6-v2; BERTSCORE_MODEL=none skips it).
# Needs NLTK's WordNet + punkt_tab for METEOR: bash scripts/install_wordnet.sh (scripts/setup.sh runs it).
# Arguments are passed through to `python -m evaluation.report`; later flags override the defaults below.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([[ -x "$REPO_ROOT/.venv/bin/python" ]] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
BERTSCORE_MODEL="${BERTSCORE_MODEL:-default}"   # default (packaged all-MiniLM-L6-v2), a local folder, or none
TOKENIZER="${TOKENIZER:-}"                   # generator tokenizer folder; empty = the tiny tokenizer

defaults=(--bertscore-model "$BERTSCORE_MODEL")
if [[ -n "$TOKENIZER" ]]; then defaults+=(--tokenizer "$TOKENIZER"); fi

# No cd: relative prediction/output paths stay relative to the caller's directory.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m evaluation.report "${defaults[@]}" "$@"

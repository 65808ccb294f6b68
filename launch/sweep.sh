#!/usr/bin/env bash
# Hyperparameter sweeps on Ray Tune: concurrent trials, retries from checkpoints, resume, early stopping.
#   bash launch/sweep.sh +sweep=lam                      # laptop/CI: tiny pair, CPU, private local Ray
#   bash launch/sweep.sh +sweep=positions fusion.lam=1.0 sweep.max_concurrent_trials=2
#   ray job submit --working-dir . -- bash launch/sweep.sh +sweep=reasoner_size task=product_review
# Sweeps live in configs/sweep/ (sweep.space + settings); comma lists sweep too: bash launch/sweep.sh fusion.lam=0.5,1.0
# Trials write <sweep.storage_path>/<sweep.name>/trials/<overrides>/ (metrics.jsonl, checkpoints, final/);
# the sweep folder gets results.jsonl, results.md and plots/. Rerunning the same command resumes the sweep.
set -euo pipefail

PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-data}
SYNTHETIC_TASK=${SYNTHETIC_TASK:-product_review}

cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# The embedded default runs on assets made here, once: the tiny model pair and the synthetic data.
source launch/_assets.sh
prepare_default_assets "$@"

exec "$PYTHON" -m recipe.sweep "$@"

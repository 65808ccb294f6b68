#!/usr/bin/env bash
# Hyperparameter sweeps as Hydra multiruns, one training run per point, sequentially on one Ray cluster:
#   bash launch/sweep.sh +sweep=lam                      # laptop/CI: tiny pair, CPU (a few minutes per point)
#   bash launch/sweep.sh +sweep=positions fusion.lam=1.0
#   ray job submit --working-dir . -- bash launch/sweep.sh +sweep=reasoner_size task=product_review
# Sweeps live in configs/sweep/; any Hydra sweep syntax works too: bash launch/sweep.sh fusion.lam=0.5,1.0
# Every point writes checkpoints/<project>/<override string>/ (metrics.jsonl, final/); reruns resume.
set -euo pipefail

cd "$(dirname "$0")/.."
exec bash launch/train.sh --multirun "$@"

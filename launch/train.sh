#!/usr/bin/env bash
# Laptop / CI (CPU, local Ray, tiny pair, synthetic data; a few minutes on 2 cores):
#   bash launch/train.sh [hydra overrides]
# GPU cluster (e.g. one node of 8 x 80 GB):
#   ray job submit --working-dir . -- bash launch/train.sh model_pair=qwen2.5-3b-3b task=product_review
# Overrides are Hydra's: key=value (configs/flythinker_trainer.yaml), group=option (configs/*/).
set -euo pipefail

PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-data}
SYNTHETIC_TASK=${SYNTHETIC_TASK:-product_review}

cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
# Offline unless you opt in (HF_HUB_OFFLINE=0 bash launch/...): a mistyped local path then fails at once
# instead of retrying the model hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# The embedded default runs on assets made here, once: the tiny model pair and the synthetic data.
source launch/_assets.sh
prepare_default_assets "$@"

exec "$PYTHON" -m recipe.main_flythinker "$@"

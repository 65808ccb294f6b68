#!/usr/bin/env bash
# Laptop / CI (CPU, local Ray, 2 workers; the tiny model that `bash launch/train.sh` exported):
#   bash launch/generate.sh [hydra overrides]
# GPU cluster (one node of 8 GPUs, the paper's sampling: temperature 0.8, top-p 0.95, 1536 new tokens):
#   ray job submit --working-dir . -- bash launch/generate.sh model.path=checkpoints/flythinker/qwen2.5-3b-3b/final \
#     data.files=[data/longlamp/product_review/test.parquet] output.path=predictions/qwen2.5-3b-3b.jsonl \
#     generation.max_new_tokens=1536 generation.batch_size=64 trainer.device=cuda trainer.n_gpus_per_node=8
# Overrides are Hydra's key=value (configs/flythinker_generate.yaml). Rerunning resumes the same output.path.
set -euo pipefail

PYTHON=${PYTHON:-python}

cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
# Offline unless you opt in (HF_HUB_OFFLINE=0 bash launch/...): a mistyped local path then fails at once
# instead of retrying the model hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

exec "$PYTHON" -m evaluation.main_generate "$@"

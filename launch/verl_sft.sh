#!/usr/bin/env bash
# FlyThinker inside verl's OWN SFT trainer (the `flythinker` engine; nothing of our trainer runs).
# Laptop / CI (CPU, tiny pair, synthetic data, 2 torchrun ranks; about a minute on 2 cores):
#   bash launch/verl_sft.sh [hydra overrides]
# Any verl key passes through, e.g.
#   bash launch/verl_sft.sh data.train_files=data/longlamp/product_review/train.parquet \
#     data.val_files=data/longlamp/product_review/val.parquet trainer.total_training_steps=100 \
#     trainer.default_local_dir=checkpoints/verl_sft/pr trainer.save_freq=50 \
#     model.path=Qwen/Qwen2.5-3B-Instruct engine.reasoner_path=Qwen/Qwen2.5-0.5B-Instruct \
#     engine.lam=0.5 engine.positions=global engine.projection=pad trainer.device=cuda
# GPU cluster, verl's Ray trainer (one process per GPU, TrainingWorker + the same engine):
#   ray job submit --working-dir . -- python -m verl.trainer.sft_trainer_ray --config-dir configs/verl \
#     engine=flythinker model.path=Qwen/Qwen2.5-3B-Instruct engine.reasoner_path=Qwen/Qwen2.5-3B-Instruct \
#     data.train_files=data/longlamp/product_review/train.parquet data.max_length=2800 \
#     trainer.n_gpus_per_node=8 trainer.device=cuda
# Training data: the `messages` parquet data_prep writes (verl's multi-turn SFT format; loss on assistant
# turns). At the last step the FlyThinker export lands in
#   <trainer.default_local_dir>/global_step_<N>/flythinker/   (flythinker.json, generator/, reasoner/)
# which launch/generate.sh and launch/eval.sh take as the model. NPROC sets the ranks (default 2).
set -euo pipefail

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
DATA_DIR=${DATA_DIR:-data}
SYNTHETIC_TASK=${SYNTHETIC_TASK:-product_review}

cd "$(dirname "$0")/.."
REPO=$(pwd)
export TOKENIZERS_PARALLELISM=false
# Registers the `flythinker` engine (and the CPU platform) in every rank, installed or not.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export VERL_USE_EXTERNAL_MODULES="flythinker_worker.verl_engine${VERL_USE_EXTERNAL_MODULES:+,$VERL_USE_EXTERNAL_MODULES}"

# Embedded default: the tiny pair and synthetic data, made here once (as launch/train.sh does).
args=" $* "
defaults=()
if [[ "$args" != *" model.path="* ]]; then
  if [[ ! -f "$DATA_DIR/tiny_models/generator/config.json" ]]; then
    "$PYTHON" -m flythinker_worker.tiny --out "$DATA_DIR/tiny_models"
  fi
  defaults+=("model.path=$DATA_DIR/tiny_models/generator" "engine.reasoner_path=$DATA_DIR/tiny_models/reasoner"
             "model.enable_gradient_checkpointing=false" "optim.lr=2e-3" "optim.weight_decay=0.0"
             "optim.lr_warmup_steps_ratio=0.05" "data.train_batch_size=8" "data.micro_batch_size_per_gpu=2"
             "trainer.total_epochs=4" "trainer.experiment_name=tiny")
fi
if [[ "$args" != *" data.train_files="* ]]; then
  if [[ ! -f "$DATA_DIR/synthetic/$SYNTHETIC_TASK/train.parquet" ]]; then
    "$PYTHON" -m data_prep.synthetic --out "$DATA_DIR/synthetic/raw"
    "$PYTHON" -m data_prep.longlamp --task "$SYNTHETIC_TASK" --source "$DATA_DIR/synthetic/raw/$SYNTHETIC_TASK" \
      --out "$DATA_DIR/synthetic/$SYNTHETIC_TASK"
  fi
  defaults+=("data.train_files=$DATA_DIR/synthetic/$SYNTHETIC_TASK/train.parquet"
             "data.val_files=$DATA_DIR/synthetic/$SYNTHETIC_TASK/val.parquet")
fi
if [[ "$args" != *" trainer.device="* ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  defaults+=("trainer.device=cpu" "data.num_workers=0")
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m verl.trainer.sft_trainer \
  --config-dir "$REPO/configs/verl" engine=flythinker \
  data.messages_key=messages data.max_length=3072 data.truncation=right \
  trainer.n_gpus_per_node="$NPROC" trainer.project_name=flythinker trainer.logger=[console] \
  trainer.default_local_dir=checkpoints/verl_sft/flythinker \
  "${defaults[@]}" "$@"

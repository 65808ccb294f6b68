#!/usr/bin/env bash
# Sourced by launch/train.sh and launch/sweep.sh (not run on its own): makes, once, the assets the embedded
# default trains on -- the tiny model pair and the synthetic data -- unless the overrides pick others.
# Uses PYTHON, DATA_DIR and SYNTHETIC_TASK from the caller.

prepare_default_assets() {
  local args=" $* "
  if [[ "$args" != *" model_pair="* || "$args" == *" model_pair=tiny "* ]]; then
    if [[ ! -f "$DATA_DIR/tiny_models/generator/config.json" ]]; then
      "$PYTHON" -m flythinker_worker.tiny --out "$DATA_DIR/tiny_models"
    fi
  fi
  if [[ "$args" != *" task="* || "$args" == *" task=synthetic "* ]]; then
    if [[ ! -f "$DATA_DIR/synthetic/$SYNTHETIC_TASK/train.parquet" ]]; then
      "$PYTHON" -m data_prep.synthetic --out "$DATA_DIR/synthetic/raw"
      "$PYTHON" -m data_prep.longlamp --task "$SYNTHETIC_TASK" --source "$DATA_DIR/synthetic/raw/$SYNTHETIC_TASK" \
        --out "$DATA_DIR/synthetic/$SYNTHETIC_TASK"
    fi
  fi
}

#!/usr/bin/env bash
# make demo   (or, with the venv active: bash launch/demo.sh [training overrides])
# The whole loop on the embedded default, CPU only (2 cores, ~5 min): synthetic LongLaMP-style data ->
# train FlyThinker and the SFT baseline (lam 0) on the tiny pair -> generate on the test split ->
# metrics side by side (the paper's Table 1 / Figure 4 layout, tiny scale).
set -euo pipefail

OUT=${OUT:-checkpoints/flythinker}
SYSTEMS=(tiny tiny_sft)            # trainer.experiment_name of each run
METHODS=(flythinker sft)
NAMES=(FlyThinker SFT)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-320}

cd "$(dirname "$0")/.."

for i in "${!SYSTEMS[@]}"; do
  echo "== train ${NAMES[$i]} =="
  bash launch/train.sh method="${METHODS[$i]}" trainer.experiment_name="${SYSTEMS[$i]}" "$@"
done
predictions=()
for run in "${SYSTEMS[@]}"; do
  echo "== generate with $run =="
  # 320 new tokens reach the [300, end) position segment of the Figure 4 layout.
  bash launch/generate.sh model.path="$OUT/$run/final" output.path="$OUT/$run/predictions/test.jsonl" \
    generation.max_new_tokens="$MAX_NEW_TOKENS"
  predictions+=("$OUT/$run/predictions/test.jsonl")
done
echo "== metrics =="
bash launch/eval.sh --predictions "${predictions[@]}" --names "${NAMES[@]}" --out "$OUT/eval"
cat "$OUT/eval/metrics.md"
echo "(tiny random-init models trained for minutes: the numbers check the pipeline, not the method)"
for run in "${SYSTEMS[@]}"; do echo "model: $OUT/$run/final"; done
echo "predictions: ${predictions[*]}"
echo "metrics: $OUT/eval/{metrics.json,metrics.md,position.png}"

#!/usr/bin/env bash
# make demo   (or, with the venv active: bash launch/demo.sh [training overrides])
# The whole loop on the embedded default, CPU only (2 cores, ~4 min): synthetic LongLaMP-style data ->
# train FlyThinker and the SFT baseline (lam 0) on the tiny pair -> generate on the test split with the
# paper's four systems (configs/system/: Non-pers, RAG, SFT, FlyThinker) -> metrics side by side (the
# paper's Table 1 / Figure 4 layout, tiny scale).
set -euo pipefail

OUT=checkpoints/flythinker        # where configs/system/*.yaml look for the trained models
RUNS=(tiny tiny_sft)               # trainer.experiment_name of each training run
METHODS=(flythinker sft)
SYSTEMS=(non_pers rag sft flythinker)
NAMES=(Non-pers RAG SFT FlyThinker)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-320}  # reaches the [300, end) position segment of the Figure 4 layout
PYTHON=${PYTHON:-python}

cd "$(dirname "$0")/.."

for i in "${!RUNS[@]}"; do
  echo "== train ${METHODS[$i]} =="
  bash launch/train.sh method="${METHODS[$i]}" trainer.experiment_name="${RUNS[$i]}" "$@"
done
# Non-pers reads prompts without history: the same test users, prepared with --retriever none.
if [[ ! -f data/synthetic/product_review_nohistory/test.parquet ]]; then
  "$PYTHON" -m data_prep.longlamp --task product_review --source data/synthetic/raw/product_review \
    --out data/synthetic/product_review_nohistory --retriever none
fi
predictions=()
for system in "${SYSTEMS[@]}"; do
  echo "== generate: $system =="
  bash launch/generate.sh +system="$system" generation.max_new_tokens="$MAX_NEW_TOKENS" \
    output.path="$OUT/predictions/$system.jsonl"
  predictions+=("$OUT/predictions/$system.jsonl")
done
echo "== metrics =="
bash launch/eval.sh --predictions "${predictions[@]}" --names "${NAMES[@]}" --out "$OUT/eval"
cat "$OUT/eval/metrics.md"
echo "(tiny random-init models trained for minutes: the numbers check the pipeline, not the method)"
for run in "${RUNS[@]}"; do echo "model: $OUT/$run/final"; done
echo "predictions: ${predictions[*]}"
echo "metrics: $OUT/eval/{metrics.json,metrics.md,position.png}"

#!/usr/bin/env bash
# make demo   (or, with the venv active: bash launch/demo.sh [training overrides])
# The whole loop on CPU, ~10 min on 2 cores (measured: 690 s at load average 2-5, 850 s at 5-6; the
# per-step numbers are in checkpoints/flythinker/demo_*/seed*/metrics.jsonl): synthetic LongLaMP-style
# reviews whose user traits live in the user's history -> train FlyThinker and the SFT baseline (lam 0),
# SEEDS seeds each -> generate on the test split with the paper's four systems for every seed
# (configs/system/demo_*.yaml) -> metrics pooled over seeds (per-row 95% bootstrap CIs, paired bootstrap
# vs FlyThinker) next to the across-seed mean ± std, and a one-line reading made from those numbers by
# rules (evaluation/seeds.py).
# A seed S sets the model init (data/demo/models/seedS), the data order and dropout (trainer.seed=S) and the
# sampling (generation.seed=S). Environment knobs (defaults in brackets):
#   SEEDS [3] seeds per system        STEPS [200] training steps per run     SIZE [demo] model size (demo|tiny)
#   USERS [240] synthetic users       TEST_ROWS [48] test rows per system and seed
#   MAX_NEW_TOKENS [160]              BERTSCORE_MODEL [default] (none skips BERTScore)
# e.g. smoke run: SEEDS=1 STEPS=4 TEST_ROWS=4 MAX_NEW_TOKENS=16 BERTSCORE_MODEL=none bash launch/demo.sh
set -euo pipefail

SEEDS=${SEEDS:-3}
STEPS=${STEPS:-200}
SIZE=${SIZE:-demo}
USERS=${USERS:-240}
TEST_ROWS=${TEST_ROWS:-48}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-160}  # the demo's reviews end (EOS) after ~40-90 tokens
BERTSCORE_MODEL=${BERTSCORE_MODEL:-default}
PYTHON=${PYTHON:-python}
DATA=data/demo                          # configs/task/synthetic_demo.yaml, configs/model_pair/demo.yaml read here
OUT=checkpoints/flythinker/demo         # configs/system/demo_*.yaml write predictions here
SYSTEMS=(non_pers rag sft flythinker)
NAMES=(Non-pers RAG SFT FlyThinker)

cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
seed_list=$(seq -s, 1 "$SEEDS")

# Data and initial models, remade only when their settings change.
data_key="users=$USERS preset=demo history_k=1 template-default-system-prompt"
if [[ "$(cat "$DATA/.settings" 2>/dev/null)" != "$data_key" ]]; then
  echo "== data: $data_key =="
  rm -rf "$DATA/raw" "$DATA/product_review" "$DATA/product_review_nohistory"
  "$PYTHON" -m data_prep.synthetic --preset demo --tasks product_review --users "$USERS" --out "$DATA/raw"
  "$PYTHON" -m data_prep.longlamp --task product_review --source "$DATA/raw/product_review" \
    --out "$DATA/product_review" --history-k 1 --no-progress
  # Non-pers reads prompts without history: the same test users, prepared with --retriever none.
  "$PYTHON" -m data_prep.longlamp --task product_review --source "$DATA/raw/product_review" \
    --out "$DATA/product_review_nohistory" --retriever none --no-progress
  echo "$data_key" > "$DATA/.settings"
fi
model_key="size=$SIZE seeds=$seed_list"
if [[ "$(cat "$DATA/models/.settings" 2>/dev/null)" != "$model_key" ]]; then
  echo "== initial models: $model_key =="
  rm -rf "$DATA/models"
  "$PYTHON" -m flythinker_worker.tiny --size "$SIZE" --seed $(seq 1 "$SEEDS") --out "$DATA/models/seed{seed}"
  echo "$model_key" > "$DATA/models/.settings"
fi

# Every run starts fresh (one Python process and Ray instance per method, the seeds as a Hydra multirun).
rm -rf checkpoints/flythinker/demo_flythinker checkpoints/flythinker/demo_sft "$OUT"
for method in flythinker sft; do
  echo "== train $method, seeds $seed_list, $STEPS steps =="
  bash launch/train.sh -m method="$method" model_pair=demo task=synthetic_demo \
    trainer.experiment_name="demo_$method" trainer.seed="$seed_list" trainer.total_training_steps="$STEPS" \
    hydra.sweep.dir="$OUT/hydra/train_$method" "$@"
done

echo "== generate: ${SYSTEMS[*]}, seeds $seed_list =="
bash launch/generate.sh -m +system="$(printf 'demo_%s,' "${SYSTEMS[@]}" | sed 's/,$//')" \
  generation.seed="$seed_list" generation.max_new_tokens="$MAX_NEW_TOKENS" data.max_rows="$TEST_ROWS" \
  hydra.sweep.dir="$OUT/hydra/generate"

echo "== metrics =="
args=()
for i in "${!SYSTEMS[@]}"; do
  args+=(--system "${NAMES[$i]}")
  for seed in $(seq 1 "$SEEDS"); do args+=("$OUT/predictions/${SYSTEMS[$i]}_seed$seed.jsonl"); done
done
"$PYTHON" -m evaluation.seeds "${args[@]}" --seeds $(seq 1 "$SEEDS") --against SFT \
  --bertscore-model "$BERTSCORE_MODEL" --out "$OUT/eval" > "$OUT/eval.log" 2>&1 || { cat "$OUT/eval.log"; exit 1; }

sed '/^## By generated-token position/,$d' "$OUT/eval/metrics.md"
echo "== two test rows (seed 1) =="
"$PYTHON" - "$OUT/predictions" <<'EOF'
import json, sys
rows = {name: [json.loads(line) for line in open(f"{sys.argv[1]}/{name}_seed1.jsonl")] for name in ("flythinker", "sft")}
for k in range(min(2, len(rows["flythinker"]))):
    fly, sft = rows["flythinker"][k], next(r for r in rows["sft"] if r["id"] == rows["flythinker"][k]["id"])
    print(f"[{fly['id']}] reference:  {fly['reference']}\n  FlyThinker: {fly['prediction']}\n  SFT:        {sft['prediction']}")
EOF
echo
grep '^Reading:' "$OUT/eval.log" || true
echo "(Non-pers and RAG are the untrained random-init generator: at this scale they write noise; the paper's"
echo " are instruction-tuned LLMs. SFT and FlyThinker are ~1M-parameter models trained for $STEPS steps.)"
echo "predictions: $OUT/predictions/   metrics: $OUT/eval/{metrics.json,metrics.md,position.png}"
echo "wall time $(( $(date +%s) - start )) s; load average (1/5/15 min) at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"

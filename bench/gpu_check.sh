#!/usr/bin/env bash
# GPU checks, run by a session that is lent a GPU:   bash bench/gpu_check.sh [section ...]
# Sections run in order, each on its own; with no arguments all of them. Every section writes its log
# under ${OUT:-gpu_check_out}/ and the script stops at the first failing section.
# Needs torch (CUDA) + transformers; Ray/verl are not needed for the decode section.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
SECTIONS=("$@")
[[ ${#SECTIONS[@]} -eq 0 ]] && SECTIONS=(decode)

wants() { local s; for s in "${SECTIONS[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

# ==== decode ================================================================================================
# Expected: ~5-7 min on one H100 (random init on the GPU takes seconds; the slow parts are today's decoder
# at ~22 tok/s and the first torch.compile + CUDA-graph capture of the 60-layer paired step, ~1-2 min).
# 1. CUDA tests of the fast decoder (teacher forcing fp32/bf16, graphs, overlap, continuous batching,
#    device-independent sampling, flash-attn and vLLM when installed; they skip otherwise).
# 2. 3B + 0.5B-shaped random-init pair, bf16, batch 1 and 8, 128 new tokens: new vs today's HF per-step
#    paired loop (target >= 4x), paired / generator-only vs the ideal 1 + W_R/W_G, and at batch 1 the
#    achieved bytes/s = (W_G + W_R) / step time against the card's HBM bandwidth (target >= 70%).
# 3. Continuous batching of 32 mixed-length prompts vs padded static batches (target ratio <= 0.7).
if wants decode; then
  echo "== decode: CUDA tests =="
  timeout 900 "$PYTHON" -m pytest -q tests/test_gpu.py -k "static or fast or vllm or flash or noise" \
    2>&1 | tee "$OUT/decode_tests.log"
  echo "== decode: bench, 3b-0.5b bf16 =="
  timeout 900 "$PYTHON" -m bench.decode --preset 3b-0.5b --device cuda --dtype bf16 --batch-sizes 1 8 \
    --new-tokens 128 --reps 3 --json "$OUT/decode_bench.json" 2>&1 | tee "$OUT/decode_bench.log"
  echo "== decode: continuous batching, 3b-0.5b bf16 =="
  timeout 600 "$PYTHON" -m bench.decode --preset 3b-0.5b --device cuda --dtype bf16 --only-continuous \
    --reps 2 --cb-slots 8 --json "$OUT/decode_continuous.json" 2>&1 | tee "$OUT/decode_continuous.log"
fi

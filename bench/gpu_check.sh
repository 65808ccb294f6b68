#!/usr/bin/env bash
# GPU checks, run by a session that is lent a GPU:   bash bench/gpu_check.sh [train] [decode]
# Hardware: one CUDA GPU (written for an H100 80 GB); torch (CUDA) + transformers, no Ray, verl or network.
# Sections run in order, each on its own; with no arguments all of them (~10-13 min on one H100). Every
# section writes its logs and JSON under ${OUT:-gpu_check_out}/ and the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
SECTIONS=("$@")
[[ ${#SECTIONS[@]} -eq 0 ]] && SECTIONS=(train decode)

wants() { local s; for s in "${SECTIONS[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

# ==== train =================================================================================================
# Expected: ~5-7 min on one H100.
# 1. CUDA tests: the FSDP2 bf16 step in our layout (root never resharded) against fp32, CUDA paired decoding
#    against teacher forcing, and the tiny form of the training check.
# 2. bench.gpu_train_check under torchrun (world size 1, NCCL): a 0.5B + 0.5B-shaped random-init pair,
#    bf16 FSDP2 vs fp32 (1e-2), packed vs padded, then tokens/s, MFU and peak memory (vs the analytic
#    model) for padded / packed / selective checkpointing / per-block compile, and FlyThinker vs SFT
#    against the FLOP ideal.
if wants train; then
  echo "== train: CUDA tests =="
  timeout 600 "$PYTHON" -m pytest -q tests/test_gpu.py -k "fsdp2 or rank0_load or teacher_forcing_on_cuda or train_check" \
    2>&1 | tee "$OUT/train_tests.log"
  echo "== train: bench, 0.5b + 0.5b bf16 FSDP2 =="
  timeout 900 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m bench.gpu_train_check \
    --json "$OUT/train_bench.json" 2>&1 | tee "$OUT/train_bench.log"
fi

# ==== decode ================================================================================================
# Expected: ~5-7 min on one H100 (random init on the GPU takes seconds; the slow parts are today's decoder
# at ~22 tok/s and torch.compile: one decoder layer per model and batch size, plus the sampler).
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

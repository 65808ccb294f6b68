"""The training part of bench/gpu_check.sh: one GPU, torch + transformers only (no Ray, no verl).

    torchrun --nproc_per_node 1 -m bench.gpu_train_check --json out.json        (or plain python -m ...)
    python -m bench.gpu_train_check --device cpu --preset tiny --length-scale 0.1   (CPU smoke run)

Random-init Qwen2.5-0.5B-shaped generator + reasoner (0.49B each), FSDP2 (world size 1) in our layout:
 1. accuracy: bf16 FSDP2 loss vs an fp32 copy (relative 1e-2), packed rows vs padded rows (fp32: 1e-4,
    bf16: 1e-2), one optimizer step with a finite gradient norm;
 2. throughput on a synthetic length distribution (prompt U[200,1600], response U[50,1000] tokens), each
    variant warmed up then timed: padded micro-batches of 4 rows vs rows packed to a token budget (target
    >= 1.5x tokens/s), full vs selective activation checkpointing, per-block torch.compile, and SFT
    (lam = 0) for the FlyThinker/SFT step-time ratio against the FLOP ideal (target <= 1.05x) and MFU of
    both models together; peak CUDA memory of each variant next to bench.memory's analytic model.
Expected runtime on one H100: ~4-6 min (two inductor compiles of a 0.5B block, ~1 min each).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from bench.workload import packed_batch, padded_batch, train_step
from flythinker_worker.utils import write_json_atomic

def synthetic_lengths(n, seed, scale=1.0):
    rng = random.Random(seed)
    return [max(4, int(scale * (rng.randint(200, 1600) + rng.randint(50, 1000)))) for _ in range(n)]


def pack(lengths, budget):
    """Greedy token-budget micro-batches (verl's dynamic batch size, in arrival order)."""
    groups, current = [], []
    for n in lengths:
        if current and sum(current) + n > budget:
            groups.append(current)
            current = []
        current.append(n)
    return groups + [current]


# ---- the check ------------------------------------------------------------------------------------------------

def build_pair(preset, device, dtype=torch.float32, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.memory import QWEN25
    from flythinker_worker.model import FlyThinker
    from flythinker_worker.tiny import tiny_config

    shapes = {"0.5b": [QWEN25["0.5B"], QWEN25["0.5B"]], "tiny": None}[preset]
    lms = []
    for i, role in enumerate(("generator", "reasoner")):
        config = tiny_config(role) if shapes is None else Qwen2Config(**shapes[i], max_position_embeddings=32768)
        torch.manual_seed(seed + i)
        with torch.device(device):
            lms.append(Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa"))
    return FlyThinker(lms[0], lms[1], lam=0.5).to(device), [lm.config.to_dict() for lm in lms]


def flops_per_step(shapes, lengths, with_reasoner=True):
    """Model FLOPs (fwd + bwd = 3 x fwd; recompute not counted) of the rows: 6 x matmul params x tokens
    (the generator's LM head included, the reasoner's unused) + causal attention 6 x layers x d x sum len^2."""
    from bench.memory import param_counts

    tokens, sq = sum(lengths), sum(n * n for n in lengths)
    total = 0.0
    for i, s in enumerate(shapes[: 2 if with_reasoner else 1]):
        c = param_counts(s)
        matmul = c["layers"] + (s["vocab_size"] * s["hidden_size"] if i == 0 else 0)
        total += 6 * matmul * tokens + 6 * s["num_hidden_layers"] * s["hidden_size"] * sq
    return total


def timed(model, optimizer, batches, device, steps, warmup):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step_batches in batches[:warmup]:
        train_step(model, optimizer, step_batches, torch.bfloat16 if device == "cuda" else torch.float32)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step_batches in batches[warmup:warmup + steps]:
        train_step(model, optimizer, step_batches, torch.bfloat16 if device == "cuda" else torch.float32)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return (time.perf_counter() - start) / steps, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=["0.5b", "tiny"], default=None)
    parser.add_argument("--rows", type=int, default=16, help="rows per step (the global batch of one GPU)")
    parser.add_argument("--budget", type=int, default=8192, help="token budget of a packed micro-batch")
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM)")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to skip (e.g. compile)")
    parser.add_argument("--json", default="bench_results/gpu_train_check.json", help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    device, preset = args.device, args.preset or ("0.5b" if args.device == "cuda" else "tiny")
    import torch.distributed as dist

    from bench.memory import analytic
    from flythinker_worker.sharding import compile_blocks, enable_checkpointing, shard_flythinker

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report, t0 = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": preset}, \
        time.perf_counter()

    # 1. accuracy: fp32 reference (packed vs padded), then bf16 FSDP2 from the same weights.
    model, shapes = build_pair(preset, device)
    vocab = shapes[0]["vocab_size"]
    lengths = synthetic_lengths(4, 0, args.length_scale)
    packed, padded = packed_batch(lengths, vocab, device=device), padded_batch(lengths, vocab, device=device)
    with torch.no_grad():
        ref = float(model(packed["input_ids"], None, labels=packed["labels"], position_ids=packed["position_ids"]).loss)
        ref_padded = float(model(padded["input_ids"], padded["attention_mask"], labels=padded["labels"]).loss)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shard_flythinker(model, device, dtype, False, True)  # fp32 master weights, bf16 compute, fp32 reduce
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    with torch.no_grad():
        low = float(model(packed["input_ids"], None, labels=packed["labels"], position_ids=packed["position_ids"]).loss)
        low_padded = float(model(padded["input_ids"], padded["attention_mask"], labels=padded["labels"]).loss)
    loss = train_step(model, optimizer, [packed], dtype)
    acc = {"fp32_loss": ref, "packed_vs_padded_fp32": abs(ref - ref_padded) / ref,
           "bf16_vs_fp32": abs(low - ref) / ref, "packed_vs_padded_bf16": abs(low - low_padded) / low,
           "step_loss": loss}
    acc["ok"] = acc["packed_vs_padded_fp32"] < 1e-4 and acc["bf16_vs_fp32"] < 1e-2 and \
        acc["packed_vs_padded_bf16"] < 1e-2
    report["accuracy"] = acc
    print(f"[train-check] accuracy {json.dumps(acc)}", flush=True)

    # 2. throughput variants on the same FSDP2 model (checkpointing / compile switched in place).
    n_steps = args.warmup + args.steps
    step_rows = [synthetic_lengths(args.rows, 100 + s, args.length_scale) for s in range(n_steps)]
    as_padded = [[padded_batch(r[i:i + 4], vocab, s, device) for i in range(0, len(r), 4)]
                 for s, r in enumerate(step_rows)]
    as_packed = [[packed_batch(g, vocab, s, device) for g in pack(r, args.budget)] for s, r in enumerate(step_rows)]
    flops = {lam: sum(flops_per_step(shapes, r, lam > 0) for r in step_rows[args.warmup:]) / args.steps
             for lam in (0.0, 0.5)}
    tokens = sum(sum(r) for r in step_rows[args.warmup:]) / args.steps
    variants = [("padded_mb4_full", 0.5, "full", False, as_padded), ("packed_full", 0.5, "full", False, as_packed),
                ("packed_selective", 0.5, "selective", False, as_packed),
                ("sft_packed_selective", 0.0, "selective", False, as_packed),
                ("packed_selective_compiled", 0.5, "selective", True, as_packed),
                ("sft_packed_selective_compiled", 0.0, "selective", True, as_packed)]
    report["variants"], compiled = {}, False
    for name, lam, ckpt, compile_, batches in variants:
        if any(s in name for s in args.skip):
            continue
        if compile_ and not compiled:
            compile_blocks(model, "inductor" if device == "cuda" else "aot_eager")
            compiled = True
        enable_checkpointing(model, ckpt)
        model.lam = lam
        seconds, peak = timed(model, optimizer, batches, device, args.steps, args.warmup)
        model.lam = 0.5
        budget = args.budget if batches is as_packed else 4 * max(max(r) for r in step_rows)
        est = analytic(shapes[0], shapes[1] if lam else None, 1, budget, ckpt, True)["total"]
        r = {"step_s": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak, "analytic_gib": est,
             "mfu": flops[lam] / seconds / (args.peak_tflops * 1e12) if device == "cuda" else None}
        report["variants"][name] = r
        print(f"[train-check] {name}: {json.dumps(r)}", flush=True)
    v = report["variants"]
    summary = {"flop_ideal": flops[0.5] / flops[0.0]}
    if "padded_mb4_full" in v and "packed_full" in v:
        summary["packed_over_padded_tokens_per_s"] = v["packed_full"]["tokens_per_s"] / v["padded_mb4_full"]["tokens_per_s"]
    for suffix in ("packed_selective", "packed_selective_compiled"):
        if suffix in v and f"sft_{suffix}" in v:
            ratio = v[suffix]["step_s"] / v[f"sft_{suffix}"]["step_s"]
            summary[f"ratio_{suffix}"] = ratio
            summary[f"ratio_over_ideal_{suffix}"] = ratio / summary["flop_ideal"]
    summary["seconds"] = time.perf_counter() - t0
    report["summary"] = summary
    print(f"[train-check] summary {json.dumps(summary)}", flush=True)
    write_json_atomic(args.json, report)
    print(f"results -> {args.json}")
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()

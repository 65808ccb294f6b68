"""Training step time of FlyThinker (reasoner + generator, lam != 0) vs SFT of the generator alone (lam 0)
on the same batch, in ONE process, the two variants interleaved step by step so that load from other
jobs on a shared machine hits both alike. No Ray, no FSDP: a single device, forward + backward + AdamW.

    python -m bench.train                                  # tiny pair, CPU, fp32 (defaults below)
    python -m bench.train --generator /models/Qwen2.5-7B-Instruct \
        --reasoner /models/Qwen2.5-1.5B-Instruct --device cuda --dtype bf16 \
        --batch-size 2 --seq-len 2048 --warmup 3 --steps 10 --gradient-checkpointing

Measured figures: README.md, section Performance.

A model folder with config.json but no weight files is built random-init from its config (timing does
not depend on the weight values), so GPU machines without downloaded weights can still measure.

What is compared. Both variants share ONE generator module and ONE AdamW (generator + reasoner
parameters): the SFT step leaves the reasoner's grads None, so AdamW skips them and its step costs
what an SFT-only optimizer costs. Sharing keeps GPU memory at one generator + one optimizer state;
the price is that the SFT variant's peak memory includes the resident reasoner weights and its AdamW
state (reported as the "resident reasoner" line), which an SFT-only job would not hold.

The ideal ratio. A forward + backward costs ~6 FLOPs per matmul parameter per token, so the ideal
FlyThinker/SFT time ratio is 1 + N_R / N_G. Printed three ways:
  non-embedding      N = parameters minus the input-embedding and LM-head tables (the usual convention)
  with embeddings    N = every parameter (tied tables counted once)
  as run (matmuls)   N_R = reasoner non-embedding (FlyThinker runs reasoner.base_model: no LM head),
                     N_G = generator non-embedding + V * d_G (its LM head IS a matmul per token)
The last is the closest FLOP count of what actually runs; attention's T^2 term, the embedding lookups,
norms and the optimizer step are left out of all three. The quotient measured / ideal is printed for
each; ~1 means the reasoner costs what its FLOPs say.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from flythinker_worker.model import IGNORE_INDEX, FlyThinker
from flythinker_worker.utils import DTYPES, write_json_atomic

def param_counts(model) -> dict[str, int]:
    """total (tied tables once), embedding (input table + an untied LM head), non_embedding, head (V * d)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied table once
    tables = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    head = model.get_output_embeddings()
    head_numel = head.weight.numel() if head is not None else 0
    if head is not None:
        tables[id(head.weight)] = head_numel
    embedding = sum(tables.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "head": head_numel}


def ideal_ratios(fly: FlyThinker) -> dict[str, float]:
    """FLOP-ideal FlyThinker/SFT step-time ratios 1 + N_R/N_G under the three counting conventions.
    A `projection: linear` layer is a per-token matmul of the FlyThinker side: counted with N_R."""
    g, r = param_counts(fly.generator), param_counts(fly.reasoner)
    extra = sum(p.numel() for p in fly.projection.parameters()) if fly.projection is not None else 0
    return {"non_embedding": 1 + (r["non_embedding"] + extra) / g["non_embedding"],
            "with_embeddings": 1 + (r["total"] + extra) / g["total"],
            "as_run": 1 + (r["non_embedding"] + extra) / (g["non_embedding"] + g["head"])}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))


def _from_config(folder: Path, dtype, device, attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device(device):  # initialise in place: a 7B random init on CPU then .to() is slow
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def build(args) -> tuple[FlyThinker, FlyThinker, int, str]:
    """(flythinker, sft sharing its generator, vocabulary bound for random ids, description)."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if args.generator is None:
        from flythinker_worker.tiny import tiny_pair

        generator, reasoner, tokenizer = tiny_pair(args.seed)
        generator, reasoner, vocab, what = generator.to(device, dtype), reasoner.to(device, dtype), len(tokenizer), \
            "tiny pair (flythinker_worker.tiny, random init)"
        fly = FlyThinker(generator, reasoner, lam=args.lam, projection=args.projection, vocab_size=vocab)
    else:
        gen_path, rsn_path = Path(args.generator), Path(args.reasoner)
        if _has_weights(gen_path) and _has_weights(rsn_path):
            from flythinker_worker.loading import load_flythinker

            fly, tokenizer = load_flythinker(str(gen_path), str(rsn_path), lam=args.lam, positions="global",
                                             projection=args.projection, dtype=dtype, attn_implementation=args.attn)
            fly.to(device)
            vocab, what = len(tokenizer), f"{gen_path} + {rsn_path} (weights)"
        else:
            generator = _from_config(gen_path, dtype, device, args.attn)
            reasoner = _from_config(rsn_path, dtype, device, args.attn)
            vocab = min(generator.config.vocab_size, reasoner.config.vocab_size)
            fly = FlyThinker(generator, reasoner, lam=args.lam, projection=args.projection, vocab_size=vocab)
            what = f"{gen_path} + {rsn_path} (random init from config.json)"
    sft = FlyThinker(fly.generator, None, lam=0.0, vocab_size=fly.vocab_size)  # the SAME generator module
    if args.gradient_checkpointing:
        fly.generator.gradient_checkpointing_enable()
        fly.reasoner.gradient_checkpointing_enable()
    fly.train()
    sft.train()
    return fly, sft, vocab, what


def make_batch(batch_size: int, seq_len: int, prompt_len: int, vocab: int, seed: int, device) -> dict:
    """Random token ids (B, T); the first `prompt_len` positions are prompt (no loss), the rest response."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    labels = input_ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    return {k: v.to(device) for k, v in
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: FlyThinker, optimizer, batch: dict, device) -> tuple[float, float, int]:
    """One forward + backward + AdamW step: (seconds, loss, peak bytes on CUDA or 0)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)  # None grads: AdamW skips the reasoner in the SFT step
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} (lower --lr?)")
    return seconds, loss.item(), peak


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def bench(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda but torch sees no CUDA device")
    torch.manual_seed(args.seed)
    fly, sft, vocab, what = build(args)
    optimizer = torch.optim.AdamW([p for p in fly.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=0.025)
    prompt_len = args.seq_len // 2 if args.prompt_len is None else args.prompt_len
    batch = make_batch(args.batch_size, args.seq_len, prompt_len, vocab, args.seed, device)
    variants = {"sft": sft, "flythinker": fly}
    times = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    for _ in range(args.warmup):
        for model in variants.values():
            train_step(model, optimizer, batch, device)
    for step in range(args.steps):
        # alternate which variant goes first so drifts (thermal, other jobs) hit both alike
        order = list(variants) if step % 2 == 0 else list(reversed(variants))
        for name in order:
            seconds, _, peak = train_step(variants[name], optimizer, batch, device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
        print(f"step {step + 1}/{args.steps}: sft {1e3 * times['sft'][-1]:.1f} ms, "
              f"flythinker {1e3 * times['flythinker'][-1]:.1f} ms", file=sys.stderr, flush=True)
    tokens = args.batch_size * args.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["flythinker"] / median["sft"]
    # Robustness checks on a shared box: the two steps of one round see the same load, so their ratio
    # is less exposed to drift; the best step of each is the least disturbed by other jobs.
    paired = statistics.median(f / s for f, s in zip(times["flythinker"], times["sft"]))
    best = min(times["flythinker"]) / min(times["sft"])
    ideal = ideal_ratios(fly)
    return {"setup": what, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "prompt_len": prompt_len,
            "warmup": args.warmup, "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
            "params": {"generator": param_counts(fly.generator), "reasoner": param_counts(fly.reasoner),
                       "projection": sum(p.numel() for p in fly.projection.parameters()) if fly.projection is not None else 0},
            "median_ms": {k: 1e3 * v for k, v in median.items()},
            "min_ms": {k: 1e3 * min(t) for k, t in times.items()},
            "iqr_ms": {k: 1e3 * _iqr(t) for k, t in times.items()},
            "tokens_per_s": {k: tokens / v for k, v in median.items()},
            "peak_mem_gib": {k: v / 2 ** 30 for k, v in peaks.items()} if device.type == "cuda" else None,
            "ratio": ratio, "ratio_paired_median": paired, "ratio_best": best, "ideal": ideal, "quotient": {k: ratio / v for k, v in ideal.items()}}


def report_lines(r: dict) -> list[str]:
    g, rs = r["params"]["generator"], r["params"]["reasoner"]
    lines = [f"setup: {r['setup']} on {r['device']} ({r['dtype']}, {r['threads']} threads), B={r['batch_size']} "
             f"T={r['seq_len']} (prompt {r['prompt_len']}), warm-up {r['warmup']}, timed {r['steps']} steps "
             "per variant, interleaved" + (", gradient checkpointing" if r["gradient_checkpointing"] else ""),
             f"params generator: total {g['total']:,}, embedding tables {g['embedding']:,}, "
             f"non-embedding {g['non_embedding']:,}, LM head {g['head']:,}",
             f"params reasoner:  total {rs['total']:,}, embedding tables {rs['embedding']:,}, "
             f"non-embedding {rs['non_embedding']:,} (its LM head is not run)"
             + (f"; linear projection {r['params']['projection']:,}" if r["params"]["projection"] else "")]
    for name in ("sft", "flythinker"):
        mem = f", peak {r['peak_mem_gib'][name]:.2f} GiB" if r["peak_mem_gib"] else ""
        lines.append(f"{name:<10} median {r['median_ms'][name]:9.2f} ms/step (min {r['min_ms'][name]:.2f}, "
                     f"IQR {r['iqr_ms'][name]:.2f}), {r['tokens_per_s'][name]:10.1f} tokens/s{mem}")
    if r["peak_mem_gib"]:
        lines.append("(peak memory: both variants share one process, so sft's includes the resident reasoner "
                     "weights and AdamW state)")
    lines.append(f"measured ratio flythinker/sft: {r['ratio']:.4f} (ratio of medians; median of per-round "
                 f"ratios {r['ratio_paired_median']:.4f}, ratio of best steps {r['ratio_best']:.4f})")
    labels = {"non_embedding": "non-embedding params", "with_embeddings": "all params, embeddings counted",
              "as_run": "as run: reasoner body / generator body + LM head"}
    for key, label in labels.items():
        lines.append(f"ideal 1 + N_R/N_G ({label}): {r['ideal'][key]:.6f}  measured/ideal {r['quotient'][key]:.4f}")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", help="HF model folder (weights, or config.json only: random init)")
    parser.add_argument("--reasoner", help="HF model folder; required with --generator")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation for real models")
    parser.add_argument("--projection", choices=["pad", "linear"], default="pad")
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, help="loss-free prefix per row (default seq-len/2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default="bench_results/train.json", help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    if (args.generator is None) != (args.reasoner is None):
        parser.error("give both --generator and --reasoner, or neither (tiny pair)")
    for path in (args.generator, args.reasoner):
        if path is not None and not (Path(path) / "config.json").exists():
            parser.error(f"{path} is not an HF model folder (no config.json)")
    if args.lam == 0:
        parser.error("--lam must be non-zero: lam 0 is the SFT variant this compares against")
    if min(args.batch_size, args.seq_len, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch-size, --seq-len and --steps must be >= 1, --warmup >= 0")
    prompt_len = args.seq_len // 2 if args.prompt_len is None else args.prompt_len
    if not 0 <= prompt_len < args.seq_len - 1:
        parser.error("--prompt-len must leave at least 2 response tokens (a next-token loss)")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args)
    print("\n".join(report_lines(result)))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, result)
    print(f"results -> {args.json}")
    return result


if __name__ == "__main__":
    main()

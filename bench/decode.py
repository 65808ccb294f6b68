"""Decode throughput of FlyThinker's paired decoders, in ONE process, the systems interleaved repetition by
repetition so that load from other jobs on a shared machine hits all alike. Random-init Qwen2 pairs built
from config (timing does not depend on the weight values); no EOS in the main grid, so every row decodes
exactly `new` tokens (tok/s = batch * new / wall time, prefill included).

    python -m bench.decode                                    # CPU fp32: generator 8L d512 + reasoner 4L d256
    python -m bench.decode --batch-sizes 8 --new-tokens 128   # the CPU target cell only
    python -m bench.decode --preset 3b-0.5b --device cuda --dtype bf16 --batch-sizes 1 8 32  # GPU form

Systems (columns):
  new       PairedDecoder backend "static" (fast_decoding: static caches, sync-free step; CUDA: compiled
            parts + one CUDA graph per step, reasoner on a side stream; --overlap on: also on CPU, in a
            helper thread)
  today     PairedDecoder backend "hf": the per-step HF DynamicCache loop (the reference)
  gen-new   the generator alone (lam 0) through the new path
  hf        HF `generate` of the generator alone (DynamicCache; on CUDA also `hf-static`:
            cache_implementation="static", which transformers compiles)
Ratios (from each system's best repetition, and as the median of the per-repetition ratios): new/today;
paired/gen-only (= new time / gen-new time, i.e. tok/s ratio inverted) against the ideal 1 + W_R/W_G
(weights read per step); on CUDA at batch 1 the achieved bandwidth (W_G + W_R) / step time against the
card's HBM bandwidth (--hbm-gbps, default from the device name). On a shared machine pass --reps 6 or more.

--continuous: 32 prompts of mixed lengths (16..128 tokens), sampled, with an EOS set that makes rows stop
at geometric-like lengths (capped at --cb-new-tokens): padded static batches of --cb-slots (the new
decoder's `generate`, in arrival order) against continuous batching (`generate_many`, same slot count);
the outputs must be equal row by row (the seed contract; exact in fp32, while in bf16 on CUDA kernels
chosen by batch shape round differently and a near-tie can flip a token), and the time ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from flythinker_worker.decoding import PairedDecoder
from flythinker_worker.model import FlyThinker
from flythinker_worker.utils import DTYPES, write_json_atomic

PRESETS = {
    # name: (generator config, reasoner config), Qwen2 fields
    "cpu": (dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2048, vocab_size=2048),
            dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=2048)),
    # Qwen2.5-3B / Qwen2.5-0.5B shapes (tied embeddings, vocab 151936).
    "3b-0.5b": (dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                     intermediate_size=11008, vocab_size=151936),
                dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936)),
}
HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "H800": 3350.0}


def ideal_ratio(model: FlyThinker) -> float:
    """1 + W_R / W_G: the bytes a paired step reads over a generator-only step (weights read per token:
    the generator's matrices + LM head, the reasoner's matrices without an LM head)."""
    def weights(lm, head: bool) -> int:
        n = sum(p.numel() for name, p in lm.base_model.named_parameters() if "embed_tokens" not in name)
        return n + (lm.lm_head.weight.numel() if head else 0)

    if not model.uses_reasoner:
        return 1.0
    return 1.0 + weights(model.reasoner, False) / weights(model.generator, True)


def weight_bytes(model: FlyThinker) -> tuple[int, int]:
    """(W_G, W_R): bytes of weights one decode step reads per model (embedding rows read are negligible)."""
    def nbytes(lm, head: bool) -> int:
        n = sum(p.numel() * p.element_size() for name, p in lm.base_model.named_parameters()
                if "embed_tokens" not in name)
        return n + (lm.lm_head.weight.numel() * lm.lm_head.weight.element_size() if head else 0)

    w_r = nbytes(model.reasoner, False) if model.uses_reasoner else 0
    return nbytes(model.generator, True), w_r


def build(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> FlyThinker:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    models = []
    for i, fields in enumerate(PRESETS[preset]):
        cfg = Qwen2Config(**fields, tie_word_embeddings=True, max_position_embeddings=32768,
                          rope_theta=1e6 if preset != "cpu" else 1e4)
        torch.manual_seed(seed + i)
        with torch.device(device):
            models.append(Qwen2ForCausalLM(cfg).to(dtype).eval())
    return FlyThinker(models[0], models[1], lam=0.5).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def systems(pair: FlyThinker, device: str, sampling: dict, wanted: list[str], overlap: bool | None = None):
    """name -> callable(ids, new_tokens) decoding every row to exactly new_tokens. `overlap`: the new
    decoder's reasoner/generator overlap (None: its default)."""
    gen_only = FlyThinker(pair.generator, None, lam=0.0).eval()
    new, today = PairedDecoder(pair, "static", overlap=overlap), PairedDecoder(pair, "hf")
    gen_new = PairedDecoder(gen_only, "static")

    def ours(decoder):
        return lambda ids, n: decoder.generate(ids, max_new_tokens=n, seed=list(range(ids.shape[0])), **sampling)

    def hf(cache=None):
        kw = dict(do_sample=sampling["temperature"] > 0, max_new_tokens=None, pad_token_id=0, eos_token_id=None)
        if kw["do_sample"]:
            kw.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0)
        if cache:
            kw["cache_implementation"] = cache

        def run(ids, n):
            return pair.generator.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                           min_new_tokens=n, **{k: v for k, v in kw.items() if k != "max_new_tokens"})
        return run

    table = {"new": ours(new), "today": ours(today), "gen-new": ours(gen_new), "hf": hf()}
    if device == "cuda":
        table["hf-static"] = hf("static")
    return {k: v for k, v in table.items() if k in wanted or (k == "hf-static" and "hf" in wanted)}


def grid(args, pair, device) -> list[dict]:
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    runs = systems(pair, device, sampling, args.systems, {"auto": None, "on": True, "off": False}[args.overlap])
    vocab = pair.generator.config.vocab_size
    w_g, w_r = weight_bytes(pair)
    ideal = ideal_ratio(pair)
    rows = []
    for batch in args.batch_sizes:
        for new in args.new_tokens:
            torch.manual_seed(batch * 1000 + new)
            ids = torch.randint(3, vocab, (batch, args.prompt_len), device=device)
            times = {name: [] for name in runs}
            for name, fn in runs.items():  # warm-up: compile / graph capture / allocator, not timed
                for _ in range(args.warmup):
                    fn(ids, new)
            for _ in range(args.reps):
                for name, fn in runs.items():
                    times[name].append(timed(lambda: fn(ids, new), device))
            best = {name: min(t) for name, t in times.items()}  # min: the least disturbed repetition
            row = {"batch": batch, "new": new, **{f"{n}_tok_s": batch * new / t for n, t in best.items()},
                   "times": times}
            # Also the median over repetitions of each repetition's own ratio: both systems of a
            # repetition ran back to back, so a burst of load from other jobs cancels out.
            def per_rep(a: str, b: str) -> float:
                return statistics.median(x / y for x, y in zip(times[a], times[b]))

            if "new" in best and "today" in best:
                row["new_over_today"] = best["today"] / best["new"]
                row["new_over_today_median"] = per_rep("today", "new")
            if "new" in best and "gen-new" in best:
                row["paired_over_gen"] = best["new"] / best["gen-new"]
                row["paired_over_gen_median"] = per_rep("new", "gen-new")
                row["ideal"] = ideal
                row["paired_over_gen_vs_ideal"] = row["paired_over_gen"] / ideal
            if "new" in best:
                step = best["new"] / new  # prefill included: a slight overestimate of the step time
                row["new_ms_per_step"] = 1e3 * step
                row["new_bytes_per_s"] = (w_g + w_r) / step
            if "today" in best:
                row["today_ms_per_step"] = 1e3 * best["today"] / new
                row["today_bytes_per_s"] = (w_g + w_r) / (best["today"] / new)
            rows.append(row)
            print_row(row, args.hbm_gbps)
    return rows


def print_row(row: dict, hbm_gbps: float | None) -> None:
    cols = [f"B={row['batch']:<3d} new={row['new']:<4d}"]
    for key, value in row.items():
        if key.endswith("_tok_s"):
            cols.append(f"{key[:-6]} {value:8.1f} tok/s")
    if "new_over_today" in row:
        cols.append(f"new/today {row['new_over_today']:.2f}x (per-rep median {row['new_over_today_median']:.2f}x)")
    if "paired_over_gen" in row:
        cols.append(f"paired/gen-only {row['paired_over_gen']:.3f} (ideal {row['ideal']:.3f}, "
                    f"{row['paired_over_gen_vs_ideal']:.3f}x ideal; per-rep median "
                    f"{row['paired_over_gen_median'] / row['ideal']:.3f}x ideal)")
    if "new_ms_per_step" in row:
        bw = row["new_bytes_per_s"] / 1e9
        pct = f", {100 * bw / hbm_gbps:.0f}% of {hbm_gbps:.0f} GB/s" if hbm_gbps else ""
        cols.append(f"new {row['new_ms_per_step']:.2f} ms/step {bw:.0f} GB/s{pct}")
    print(" | ".join(cols), flush=True)


def continuous(args, pair, device) -> dict:
    """Padded static batches vs continuous batching of one mixed-length workload (new decoder both ways)."""
    vocab = pair.generator.config.vocab_size
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(16, 129, (args.cb_prompts,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    seeds = list(range(1000, 1000 + len(prompts)))
    # Random-init logits are nearly flat: with k EOS ids of V, a row stops with probability ~k/V per step.
    eos = list(range(3, 3 + max(1, round(vocab * args.cb_stop_prob))))
    sampling = dict(max_new_tokens=args.cb_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    eos_token_id=eos, pad_token_id=0)
    decoder = PairedDecoder(pair, "static")
    slots = args.cb_slots

    def static():
        out = []
        for begin in range(0, len(prompts), slots):
            group = prompts[begin:begin + slots]
            width = max(map(len, group))
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(group):
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
            res = decoder.generate(ids.to(device), mask.to(device), seed=seeds[begin:begin + slots], **sampling)
            out += [res.sequences[i, width:width + int(res.num_generated[i])].tolist() for i in range(len(group))]
        return out

    results = {}

    def cont():
        results["continuous"] = decoder.generate_many(prompts, seeds, slots=slots, **sampling)[0]

    def stat():
        results["static"] = static()

    times = {"static": [], "continuous": []}
    for _ in range(args.warmup):
        stat(), cont()
    for _ in range(args.reps):
        times["static"].append(timed(stat, device))
        times["continuous"].append(timed(cont, device))
    equal = results["static"] == results["continuous"]
    out_lengths = [len(r) for r in results["continuous"]]
    ratio = min(times["continuous"]) / min(times["static"])
    print(f"continuous batching: {len(prompts)} prompts (lengths {min(lengths)}-{max(lengths)}), outputs "
          f"{min(out_lengths)}-{max(out_lengths)} tokens (mean {statistics.mean(out_lengths):.0f}), {slots} slots: "
          f"static {min(times['static']):.2f}s, continuous {min(times['continuous']):.2f}s, "
          f"ratio {ratio:.2f} (target <= 0.7); outputs equal: {equal}", flush=True)
    return {"times": times, "ratio": ratio, "outputs_equal": equal, "output_lengths": out_lengths}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--systems", nargs="+", default=["new", "today", "gen-new", "hf"],
                        choices=["new", "today", "gen-new", "hf"])
    parser.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                        help="the new decoder's reasoner/generator overlap (auto: on with CUDA, off on CPU)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per cell (default 1 cuda, 0 cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth (default from device name)")
    parser.add_argument("--continuous", action="store_true", help="also run the continuous-batching workload")
    parser.add_argument("--only-continuous", action="store_true")
    parser.add_argument("--cb-prompts", type=int, default=32)
    parser.add_argument("--cb-slots", type=int, default=8)
    parser.add_argument("--cb-new-tokens", type=int, default=512)
    parser.add_argument("--cb-stop-prob", type=float, default=1 / 256)
    parser.add_argument("--json", default="bench_results/decode.json", help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.hbm_gbps is None and args.device == "cuda":
        name = torch.cuda.get_device_name()
        args.hbm_gbps = next((v for k, v in HBM_GBPS.items() if k in name), None)
    pair = build(args.preset, args.device, dtype)
    w_g, w_r = weight_bytes(pair)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"decode bench: preset {args.preset}, {device_name}, {dtype}, prompt {args.prompt_len} tokens, "
          f"temperature {args.temperature} top-p {args.top_p}; W_G {w_g / 1e6:.1f} MB, W_R {w_r / 1e6:.1f} MB, "
          f"ideal paired/gen-only {ideal_ratio(pair):.3f}", flush=True)
    result = {"preset": args.preset, "device": device_name, "dtype": str(dtype), "w_g": w_g, "w_r": w_r}
    if not args.only_continuous:
        result["grid"] = grid(args, pair, args.device)
    if args.continuous or args.only_continuous:
        result["continuous"] = continuous(args, pair, args.device)
    write_json_atomic(args.json, result)
    print(f"results -> {args.json}")
    return result


if __name__ == "__main__":
    main()

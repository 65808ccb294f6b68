"""Training memory: measured per-rank peak RSS on N CPU ranks, and the analytic per-GPU memory of every
configs/model_pair/* on its configured GPUs, so a user sees whether a config fits before launching.

    python -m bench.memory                       # N = 2 and 4, a ~60M-param random-init pair, + the table
    python -m bench.memory --ranks 2 4 8 --preset tiny --json memory.json
    python -m bench.memory --analytic-only --gpu-gb 80

Measured (CPU, gloo, fp32, the engine's own pieces: sharding / loading / export): each rank resets its
peak RSS (/proc/self/clear_refs) before a phase and reads VmHWM after it; a phase's number is that peak
minus the rank's RSS before the model existed (imports, process group). Phases: init (rank-0 read +
broadcast into shards), step (AdamW state + one packed forward/backward), export (streamed HF shards),
sync (the rollout weight sync's gather: buckets of 16 MiB here, 512 MiB by default). init is reported
above the baseline; step / export / sync as the rise over the phase's start (freed heap trimmed first).
`--mode old` measures the previous path (every rank loads the whole pair, export and sync through one
full state dict).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from pathlib import Path

import torch

from flythinker_worker.utils import write_json_atomic

GIB = 1 << 30
# Qwen2.5 shapes (config.json of the Instruct checkpoints), used when a model path is not on this machine.
QWEN25 = {"0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
          "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
          "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
          "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)}


# ---- analytic model -------------------------------------------------------------------------------------------

def shape_of(path: str, role: str = "generator") -> dict | None:
    """A model's shape: its local config.json, else the Qwen2.5 size named in the path, else (the folders
    the launch scripts write from flythinker_worker.tiny, which may not exist yet) the tiny or demo preset,
    else None."""
    config = Path(path) / "config.json"
    if config.exists():
        return json.loads(config.read_text())
    qwen = next((dict(s) for size, s in QWEN25.items() if f"-{size}" in path), None)
    if qwen is not None:
        return qwen
    preset = "demo" if "/demo/" in path else "tiny" if "tiny_models" in path else None
    if preset is None:
        return None
    from flythinker_worker.tiny import load_tiny_tokenizer, tiny_config

    return tiny_config(role, preset, vocab_size=len(load_tiny_tokenizer())).to_dict()


def param_counts(s: dict) -> dict:
    """(layer params, table params, total) of a Qwen2-shaped LM (q/k/v biases, SwiGLU MLP, RMSNorms)."""
    d, i, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"] * \
        s["num_key_value_heads"]
    layer = 2 * d * d + d + 2 * (d * kv + kv) + 3 * d * i + 2 * d
    tables = s["vocab_size"] * d * (1 if s.get("tie_word_embeddings", False) else 2)
    return {"layer": layer, "layers": layer * s["num_hidden_layers"], "tables": tables,
            "total": layer * s["num_hidden_layers"] + tables + d}


def analytic(gen: dict, rsn: dict | None, gpus: int, tokens: int, checkpointing: str | None,
             no_sync: bool, param_bytes: int = 2) -> dict[str, float]:
    """GiB per GPU of a step: fp32 master params + fp32 grads + Adam (m, v) sharded over `gpus`; the
    unsharded fp32 gradient accumulators of no-sync micro-batches; the root (tables, norms) held
    unsharded in param dtype and two layers gathered (one prefetched); activations of `tokens` packed tokens
    (checkpointing: each layer's bf16 input kept + one layer's working set; selective: + matmul/attention
    outputs; none: every layer's working set); the generator's logits (bf16 + fp32 log-softmax + its grad)."""
    lms = [(gen, param_counts(gen))] + ([(rsn, param_counts(rsn))] if rsn else [])
    total = sum(c["total"] for _, c in lms)
    out = {"params": 4 * total / gpus, "grads": 4 * total / gpus, "adam": 8 * total / gpus,
           "no_sync_grads": 4 * total if no_sync else 0.0,
           "gathered": param_bytes * sum(c["tables"] + 2 * c["layer"] for _, c in lms)}
    act = 0.0
    for s, _ in lms:
        d, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
        kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
        working = tokens * (10 * d + 4 * kv + 4 * i) * 2  # one layer's saved tensors for backward, bf16
        if checkpointing is None:
            act += n * working
        else:
            act += n * tokens * d * 2 + working
            if checkpointing == "selective":
                act += n * tokens * (4 * d + 2 * kv + 2 * i) * 2
    out["activations"] = act
    out["logits"] = tokens * gen["vocab_size"] * (2 + 4 + 4)
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values()) + 3.0  # + CUDA context, NCCL buffers, allocator slack
    return out


def config_table(gpu_gb: float) -> list[dict]:
    """The analytic step memory of every configs/model_pair/*.yaml with its own settings."""
    import yaml

    rows = []
    for path in sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "configs/model_pair/*.yaml"))):
        cfg = yaml.safe_load(Path(path).read_text())
        model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
        gen = shape_of(model.get("generator", {}).get("path", ""), "generator")
        rsn = shape_of(model.get("reasoner", {}).get("path", ""), "reasoner")
        if gen is None:
            continue
        gpus = trainer.get("nnodes", 1) * trainer.get("n_gpus_per_node", 8)
        tokens = data.get("max_token_len_per_gpu", 8192) if data.get("use_dynamic_bsz", True) else \
            data.get("micro_batch_size_per_gpu", 1) * (data.get("max_prompt_length", 1600) +
                                                       data.get("max_response_length", 1000))
        ckpt = (model.get("activation_checkpointing", "full") if model.get("enable_gradient_checkpointing")
                else None)
        no_sync = cfg.get("fsdp", {}).get("no_sync_accumulation", True)
        param_bytes = 4 if cfg.get("fsdp", {}).get("param_dtype") == "fp32" else 2
        est = analytic(gen, rsn, gpus, tokens, ckpt, no_sync, param_bytes)
        rows.append({"config": Path(path).stem, "gpus": gpus, "tokens_per_gpu": tokens, "checkpointing": ckpt,
                     "no_sync": no_sync, **{k: round(v, 2) for k, v in est.items()},
                     "fits": est["total"] <= gpu_gb})
    return rows


# ---- measured: N CPU ranks ----------------------------------------------------------------------------------

PRESETS = {"tiny": None,  # flythinker_worker.tiny's pair
           "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=32000),
                     dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=32000))}


def write_pair(preset: str, out: Path) -> Path:
    from flythinker_worker.tiny import load_tiny_tokenizer, tiny_config, write_tiny_pair

    if PRESETS[preset] is None:
        return write_tiny_pair(out)
    from transformers import Qwen2ForCausalLM

    tokenizer = load_tiny_tokenizer()
    for seed, (role, sizes) in enumerate(zip(("generator", "reasoner"), PRESETS[preset])):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(tiny_config(role, **sizes)).save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    return out


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _rank(rank, world, port, root, out, mode):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from bench.workload import packed_batch, train_step
    from flythinker_worker.export import export_flythinker, gather_bucket, weight_buckets
    from flythinker_worker.loading import build_on_meta, load_flythinker
    from flythinker_worker.rank0_load import load_from_rank0, materialize, release_host_memory
    from flythinker_worker.sharding import full_state_dict, shard_flythinker

    base, peaks = _rss("VmRSS"), {}
    gen, rsn = f"{root}/generator", f"{root}/reasoner"

    def phase(name, fn):
        import gc

        gc.collect()
        release_host_memory()  # hand freed heap back, so RSS at the start is what is held
        dist.barrier()
        start = _rss("VmRSS")
        _reset_peak()
        result = fn()
        dist.barrier()
        peaks[name] = _rss("VmHWM") - (base if name == "init" else start)
        peaks[f"{name}_held_before"] = start - base
        return result

    def init():
        if mode == "old":  # every rank reads the whole pair, then shards it
            model, _ = load_flythinker(gen, rsn, 0.5, "global", "pad")
            return shard_flythinker(model, "cpu", torch.float32, False, True)
        model, _, reader = build_on_meta(gen, rsn, 0.5, "global", "pad")
        shard_flythinker(model, "cpu", torch.float32, False, True)
        materialize(model, "cpu")
        load_from_rank0(model, reader if rank == 0 else None)
        return model

    model = phase("init", init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.generator.get_input_embeddings().weight.shape[0]
    phase("step", lambda: train_step(model, optimizer, [packed_batch([64] * 4, vocab, seed=rank)]))

    def export():
        target = Path(out) / f"export_{mode}_{world}"
        if mode == "old":
            state = full_state_dict(model)
            if rank == 0:
                model.save_pretrained(target, state_dict=state)
            dist.barrier()
        else:
            export_flythinker(model, target, shard_bytes=64 << 20)

    phase("export", export)
    def sync():
        if mode == "old":  # one whole state dict on rank 0 (what the unbucketed sync shipped)
            full_state_dict(model)
            return
        for names in weight_buckets(model, 16 << 20, torch.float32):  # what sync_weights streams
            gather_bucket(model, names, torch.float32)

    phase("sync", sync)
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "base": base, "pair_fp32": fp32,
                                                            **peaks}))
    dist.destroy_process_group()


def measure(world: int, root: Path, mode: str) -> list[dict]:
    from flythinker_worker.ports import free_ports

    port = free_ports()[0]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_rank, args=(world, port, str(root), out, mode), nprocs=world)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--mode", choices=["new", "old", "both"], default="both")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU for the fit column")
    parser.add_argument("--analytic-only", action="store_true")
    parser.add_argument("--json", default="bench_results/memory.json", help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    report = {"analytic": config_table(args.gpu_gb), "measured": []}
    print(f"analytic per-GPU step memory (GiB; {args.gpu_gb:g} GB GPUs):")
    keys = ["params", "grads", "adam", "no_sync_grads", "gathered", "activations", "logits", "total"]
    print(f"{'config':<18}{'gpus':>5}{'tokens':>7} " + "".join(f"{k[:10]:>11}" for k in keys) + "  fits")
    for row in report["analytic"]:
        print(f"{row['config']:<18}{row['gpus']:>5}{row['tokens_per_gpu']:>7} "
              + "".join(f"{row[k]:>11.2f}" for k in keys) + f"  {'yes' if row['fits'] else 'NO'}")
    if not args.analytic_only:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_pair(args.preset, Path(tmp))
            modes = ["old", "new"] if args.mode == "both" else [args.mode]
            print(f"\nmeasured peak RSS (MiB; init above the rank's baseline, others above the phase's start), "
                  f"preset {args.preset}, fp32 CPU:")
            print(f"{'mode':<5}{'N':>3}{'rank':>5}{'init':>9}{'step':>9}{'export':>9}{'sync':>9}"
                  f"{'init/F':>8}{'target':>8}")
            for world in args.ranks:
                for mode in modes:
                    for r in measure(world, root, mode):
                        f = r["pair_fp32"]
                        r.update(mode=mode, world=world, init_over_f=r["init"] / f, target=1 / world + 0.15)
                        report["measured"].append(r)
                        print(f"{mode:<5}{world:>3}{r['rank']:>5}" + "".join(
                            f"{r[k] / 2**20:>9.1f}" for k in ("init", "step", "export", "sync"))
                            + f"{r['init_over_f']:>8.2f}{r['target']:>8.2f}")
            print(f"(F = fp32 bytes of the pair = {report['measured'][0]['pair_fp32'] / 2**20:.1f} MiB; "
                  "target: init <= F/N + 0.15 F)" if report["measured"] else "")
    write_json_atomic(args.json, report)
    print(f"results -> {args.json}")
    return report


if __name__ == "__main__":
    main()

"""The scale-contract pieces of sharding.py / loading.py / export.py on 2 gloo ranks (torch + transformers
only, no Ray, no verl): rank-0 load with broadcast equals a plain load, the streamed export equals the full
state dict (sharded files, chosen dtype, tied table once), the embedding-norm scale from the local shard,
and no unsafe torch.load anywhere."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import single_rank_env

from flythinker_worker.ports import free_ports

REPO = Path(__file__).resolve().parents[1]


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined by a gloo group (env://)."""
    torch.multiprocessing.spawn(_entry, args=(fn, world, free_ports()[0], args), nprocs=world, join=True)


def _entry(rank, fn, world, port, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _load_sharded(path, reasoner, projection, **load_options):
    from flythinker_worker.loading import build_on_meta
    from flythinker_worker.rank0_load import load_from_rank0, materialize
    from flythinker_worker.sharding import shard_flythinker

    model, tokenizer, reader = build_on_meta(path, reasoner, 0.5, "global", projection)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated before sharding
    shard_flythinker(model, "cpu", torch.float32, False, True)
    materialize(model, "cpu")
    load_from_rank0(model, reader if torch.distributed.get_rank() == 0 else None, **load_options)
    return model, tokenizer


def _init_and_export(rank, world, root, out):
    """Every check on the same 2 ranks (one process start); rank 0 writes the numbers to out/results.json."""
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from flythinker_worker import FlyThinker
    from flythinker_worker.export import export_flythinker
    from flythinker_worker.loading import load_flythinker
    from flythinker_worker.model import embedding_scale
    from flythinker_worker.sharding import full_state_dict, mean_embedding_norm

    results = {}
    gen, rsn = f"{root}/generator", f"{root}/reasoner"
    for projection in ("pad", "linear"):
        # stream_bytes=0: every row-sharded tensor is streamed by rows (the path of big tables), none broadcast.
        streamed = full_state_dict(_load_sharded(gen, rsn, projection, stream_bytes=0)[0])
        model, tokenizer = _load_sharded(gen, rsn, projection)
        state = full_state_dict(model)
        weight = model.generator.get_input_embeddings().weight
        scale = mean_embedding_norm(weight, torch.float32)
        export = Path(out) / f"export_{projection}"
        # 40 kB files: the tiny pair (~1.3 MB) is written as many shards + an index.
        export_flythinker(model, export, tokenizer, shard_bytes=40_000)
        export_flythinker(model, Path(out) / f"bf16_{projection}", tokenizer, dtype=torch.bfloat16,
                          shard_bytes=40_000)
        if rank == 0:
            ref, _ = load_flythinker(gen, rsn, 0.5, "global", projection)
            ref_state = ref.state_dict()
            buffers, ref_buffers = dict(model.named_buffers()), dict(ref.named_buffers())
            exported = FlyThinker.from_pretrained(export, dtype=torch.float32).state_dict()
            exported16 = FlyThinker.from_pretrained(Path(out) / f"bf16_{projection}").state_dict()
            files = sorted(p.name for p in (export / "generator").glob("*.safetensors"))
            keys = set()
            for name in files:
                with safe_open(str(export / "generator" / name), "pt") as f:
                    keys |= set(f.keys())
            plain = AutoModelForCausalLM.from_pretrained(export / "generator", dtype=torch.float32)
            results[projection] = {
                "init_vs_plain": _max_diff(state, ref_state), "streamed_vs_plain": _max_diff(streamed, ref_state),
                "buffers": _max_diff(buffers, ref_buffers),
                "export_vs_full": _max_diff(exported, state),
                "bf16_dtypes": sorted({str(v.dtype) for v in exported16.values()}),
                "bf16_vs_full": _max_diff({k: v.to(torch.bfloat16) for k, v in state.items()}, exported16),
                "generator_files": len(files), "lm_head_written": "lm_head.weight" in keys,
                "plain_tied": plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr(),
                "index": (export / "generator" / "model.safetensors.index.json").exists(),
                "largest_file": max(p.stat().st_size for p in export.rglob("*.safetensors")),
                "largest_tensor": max(v.numel() * v.element_size() for v in state.values()),
                "scale": float(scale), "scale_ref": float(embedding_scale(ref.generator)),
                "projection_init": _max_diff({k: v for k, v in state.items() if k.startswith("projection.")},
                                             {k: v for k, v in ref_state.items() if k.startswith("projection.")})
                if projection == "linear" else 0.0}
        dist.barrier()
    # A FlyThinker checkpoint folder as the source (what resuming from an export does).
    model, _ = _load_sharded(str(Path(out) / "export_linear"), None, "linear")
    state = full_state_dict(model)
    if rank == 0:
        exported = FlyThinker.from_pretrained(Path(out) / "export_linear", dtype=torch.float32).state_dict()
        results["from_checkpoint"] = _max_diff(state, exported)
        (Path(out) / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    from flythinker_worker.tiny import write_tiny_pair

    root = tmp_path_factory.mktemp("pair")
    write_tiny_pair(root)
    out = tmp_path_factory.mktemp("out")
    spawn(_init_and_export, 2, str(root), str(out))
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_rank0_broadcast_init_equals_plain_load(two_rank_results, projection):
    r = two_rank_results[projection]
    assert r["init_vs_plain"] == 0.0 and r["buffers"] == 0.0 and r["projection_init"] == 0.0
    assert r["streamed_vs_plain"] == 0.0
    assert two_rank_results["from_checkpoint"] == 0.0


@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_streamed_export_equals_full_state_dict(two_rank_results, projection):
    r = two_rank_results[projection]
    assert r["export_vs_full"] == 0.0
    assert r["generator_files"] > 1 and r["index"]  # written as several shard files
    # A file holds at most the budget, or one tensor larger than it (the embedding tables here), + header.
    assert r["largest_file"] <= max(40_000, r["largest_tensor"]) + 16_384
    assert not r["lm_head_written"] and r["plain_tied"]  # tied table written once, plain HF re-ties it
    assert r["bf16_dtypes"] == ["torch.bfloat16"] and r["bf16_vs_full"] == 0.0


def test_embedding_scale_from_local_shards(two_rank_results):
    r = two_rank_results["pad"]
    assert r["scale"] == pytest.approx(r["scale_ref"], rel=1e-6)


def test_no_unsafe_torch_load():
    """Per-rank state is JSON / tensors-only; every torch.load in our code says weights_only=True."""
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part in (".venv", "node_modules", ".git") for part in path.parts):
            continue
        text = path.read_text(errors="ignore")
        if path.name == "test_sharding.py":
            continue
        if "weights_only=False" in text:
            offenders.append(f"{path}: weights_only=False")
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call and "weights_only" not in call.split(",")[0]:
                offenders.append(f"{path}: torch.load({call})")
    assert not offenders, offenders


@pytest.mark.parametrize("mode, every, compiled", [("full", 1, False), ("selective", 1, False),
                                                   ("selective", 2, True)])
def test_checkpointing_modes_and_compiled_blocks_equal_plain(mode, every, compiled):
    """Selective / every-k-th activation checkpointing and per-block compile (aot_eager on CPU: the same
    graph capture as inductor without a C++ build) give the plain model's loss and gradients."""
    from conftest import make_pair

    from flythinker_worker import FlyThinker
    from flythinker_worker.sharding import compile_blocks, enable_checkpointing

    batch = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = batch.clone()
    labels[:, :5] = -100

    def run(configure):
        generator, reasoner, _ = make_pair()
        model = FlyThinker(generator, reasoner, lam=0.5).train()
        configure(model)
        loss = model(batch, torch.ones_like(batch), labels=labels).loss
        loss.backward()
        return float(loss), {n: p.grad for n, p in model.named_parameters()}

    def configure(model):
        enable_checkpointing(model, mode, every)
        if compiled:
            compile_blocks(model, "aot_eager")

    ref_loss, ref_grads = run(lambda model: None)
    loss, grads = run(configure)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_weight_buckets_cover_every_tensor_once_within_the_limit():
    from flythinker_worker.export import gather_bucket, weight_buckets
    from flythinker_worker.model import FlyThinker
    from flythinker_worker.tiny import tiny_pair

    model = FlyThinker(*tiny_pair()[:2])
    state = model.state_dict()
    limit = 64 * 1024
    buckets = weight_buckets(model, limit, torch.bfloat16)
    assert [name for bucket in buckets for name in bucket] == list(state)  # all, once, in order
    for bucket in buckets:
        size = sum(state[n].numel() * 2 for n in bucket)
        assert size <= limit or len(bucket) == 1  # only a single tensor above the limit stands alone
    sizes = [sum(state[n].numel() * 2 for n in b) for b in buckets]
    assert all(a + state[b[0]].numel() * 2 > limit for a, b in zip(sizes, buckets[1:]))  # greedy: none merges
    got = gather_bucket(model, buckets[1], torch.bfloat16)  # no process group: this process is rank 0
    assert list(got) == buckets[1] and all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[n], state[n].to(torch.bfloat16)) for n in got)


def test_a_taken_master_port_is_a_clear_error(monkeypatch):
    """Another process holding MASTER_PORT: init_distributed names the port and the way out, instead of
    torch's bare EADDRINUSE from inside the store."""
    import socket

    import torch.distributed as dist

    from flythinker_worker.sharding import init_distributed

    assert not dist.is_initialized()
    port = single_rank_env(monkeypatch)
    with socket.socket() as holder:
        holder.bind(("", port))
        holder.listen()
        with pytest.raises(RuntimeError, match=f"MASTER_PORT {port} on 127.0.0.1 was taken.*master_port_range"):
            init_distributed("cpu")
    assert not dist.is_initialized()


def test_a_sharded_run_with_an_untied_reasoner_head_resumes(monkeypatch, tmp_path):
    """The reasoner's LM head is never used (FlyThinker reads its hidden states): untied, it is frozen, so the
    optimizer holds no state for it and a sharded (DCP) train state saved after a step loads into a fresh
    run, with the step, the weights and the optimizer moments back."""
    import torch.distributed as dist

    from flythinker_worker.loading import build_on_meta
    from flythinker_worker.rank0_load import load_from_rank0, materialize
    from flythinker_worker.sharding import (StepScale, clip_and_step, init_distributed, load_train_state,
                                            param_groups, save_train_state, shard_flythinker)
    from flythinker_worker.tiny import tiny_pair

    generator, reasoner, tok = tiny_pair(0, reasoner_overrides=dict(tie_word_embeddings=False))
    for name, lm in (("generator", generator), ("reasoner", reasoner)):
        lm.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    single_rank_env(monkeypatch)
    init_distributed("cpu")

    def build():
        model, _, reader = build_on_meta(str(tmp_path / "generator"), str(tmp_path / "reasoner"), 0.5, "global",
                                         "pad")
        shard_flythinker(model, "cpu", torch.float32, False, True)
        materialize(model, "cpu")
        load_from_rank0(model, reader)
        return model, torch.optim.AdamW(param_groups(model, 1e-3, None, 0.01))

    try:
        model, optimizer = build()
        assert not model.reasoner.lm_head.weight.requires_grad
        ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
        with StepScale(model, torch.float32):
            model(ids, labels=ids).loss.backward()
        clip_and_step(model, optimizer, 1.0)
        save_train_state(tmp_path / "state", model, optimizer, None, 1)
        resumed, resumed_optimizer = build()
        assert load_train_state(tmp_path / "state", resumed, resumed_optimizer, None) == 1
        for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(a.full_tensor(), b.full_tensor()), name
        moments = [s["exp_avg"].full_tensor() for s in optimizer.state.values()]
        assert len(moments) > 0 and all(torch.equal(a, s["exp_avg"].full_tensor())
                                        for a, s in zip(moments, resumed_optimizer.state.values()))
    finally:
        dist.destroy_process_group()

"""FSDP2 layout of FlyThinker and the pieces of a training step that every trainer shares (our verl worker,
the verl engine, the GPU check). torch only: no Ray, no verl, so it also runs where only torch is installed."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .model import FlyThinker
from .utils import local_device, write_json_atomic

logger = logging.getLogger(__name__)


def init_distributed(device: str) -> torch.device:
    """Join the process group verl's Worker env describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    torch_device = local_device(device)
    if not dist.is_initialized():
        try:
            # On CUDA also gloo for CPU tensors: with fsdp.cpu_offload the shards and gradients live on the
            # host, and the embedding-norm all-reduce, gradient clipping and full_tensor() gathers run there.
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device == "cuda" else "gloo",
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            raise RuntimeError(
                f"MASTER_PORT {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} was taken by "
                "another process between the worker group choosing it and rank 0 binding it. Groups made by "
                "recipe.workers choose from flythinker_worker.ports.master_port_range(), outside the kernel's "
                "ephemeral ports; a RayWorkerGroup of your own should pass master_port_range=... too.") from err
    return torch_device


def shard_flythinker(model, device: str, param_dtype: torch.dtype, cpu_offload: bool,
                     reshard_after_forward: bool):
    """fully_shard every decoder layer of both LMs, then ONE root over the FlyThinker module (separate
    roots break fusion, which reads the generator's embedding table outside the generator's forward).

    `reshard_after_forward` applies to the layers only: the root (embedding tables, LM head, final norms,
    projection) is never resharded after forward. Resharding it crashes the first CUDA backward
    ("setStorage: sizes [151936, 1536] ... out of bounds for storage of size 0" on the generator's
    embedding / tied LM head, measured on an H100 with NCCL; gloo does not show it), and the backward
    would all-gather it again at once anyway (verl's engine and torchtitan keep it unsharded too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for _, layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of every decoder layer of both LMs: the FSDP units."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(layer)], layer) for lm in (model.generator, model.reasoner) if lm is not None
            for layer in lm.base_model.layers]


def model_units(model) -> list[tuple[str, list[str]]]:
    """The pair in load/export units, in state-dict order: (module name, its state-dict keys relative to
    it). A decoder layer is one unit; every other module that owns tensors directly (embedding tables,
    final norms, LM heads, projection) is its own unit. A tied tensor appears once, under its first name
    (the input embedding; a tied LM head owns nothing new). Same on every rank (a function of the layout)."""
    layers = [name + "." for name, _ in decoder_layers(model)]
    units: dict[str, list[str]] = {}
    seen = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner = next((p[:-1] for p in layers if key.startswith(p)), key.rpartition(".")[0])
        units.setdefault(owner, []).append(key[len(owner) + 1:] if owner else key)
    return list(units.items())


# ---- activation checkpointing and per-block compile (applied before sharding, as torchtitan does) -----------

CHECKPOINTING = ("full", "selective")


def _saved_ops() -> set:
    """Ops whose outputs selective checkpointing keeps: matmuls and attention kernels (the FLOPs); the rest
    of a layer (norms, rotary, SiLU, residual adds: memory-bound, cheap) is recomputed in backward."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flash = getattr(torch.ops, "flash_attn", None)  # flash-attn's varlen kernel (packed rows on CUDA)
    for n in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        if flash is not None and hasattr(flash, n):
            ops.add(getattr(flash, n).default)
    return ops


def _selective_contexts():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model, mode: str = "full", every: int = 1) -> None:
    """Activation checkpointing of both LMs' decoder layers (HF's per-layer hook). `mode` full: a layer keeps
    only its input and recomputes everything in backward; selective: it also keeps the outputs of matmuls
    and attention and recomputes only the cheap elementwise ops (less recompute, ~ (4d + 2d_kv + 2I) x 2
    bytes more per token and layer in bf16). `every` k: only every k-th layer is checkpointed."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation checkpointing mode must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    if every < 1:
        raise ValueError(f"checkpoint every k-th layer needs k >= 1, got {every}")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_contexts
    for lm in (model.generator, model.reasoner):
        if lm is None:
            continue
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for index, layer in enumerate(lm.base_model.layers):
            layer.gradient_checkpointing = index % every == 0


def compile_blocks(model, backend: str = "inductor") -> None:
    """torch.compile every decoder layer's forward on its own (torchtitan's per-block compile): one small
    graph reused by all layers of an LM, fused elementwise kernels (fewer launches: the reasoner's cost at
    the paper's sizes), while FSDP's hooks and the checkpoint wrapper stay eager around it. Parameter
    names are unchanged (no `_orig_mod.`), so checkpoints, loading and export are unaffected."""
    for _, layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=None)


# ---- the embedding-norm scale, once per step ---------------------------------------------------------------------

@torch.no_grad()
def mean_embedding_norm(weight: torch.Tensor, dtype: torch.dtype, chunk_rows: int = 8192) -> torch.Tensor:
    """s = mean_v ||E[v]||_2 of a (V, d) table, whole or row-sharded (DTensor: this rank's rows, then one
    all-reduce). Rows are cast to `dtype` (the forward's param dtype, as the forward sees them) and
    normed in fp32 `chunk_rows` at a time: no fp32 copy of the table. Returns an fp32 scalar."""
    from torch.distributed.tensor import DTensor

    local = weight.to_local() if isinstance(weight, DTensor) else weight
    total = torch.zeros((), dtype=torch.float64, device=local.device)
    for rows in local.detach().split(chunk_rows):
        total += rows.to(dtype).float().norm(dim=-1).sum().double()
    if isinstance(weight, DTensor):
        dist.all_reduce(total, group=weight.device_mesh.get_group())
    return (total / weight.shape[0]).float()


class StepScale:
    """`with StepScale(model, dtype):` sets model.step_scale for one step (all its micro-batches)."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __enter__(self):
        if isinstance(self.model, FlyThinker) and self.model.uses_reasoner:
            self.model.step_scale = mean_embedding_norm(self.model.generator.get_input_embeddings().weight,
                                                        self.dtype)

    def __exit__(self, *exc):
        if isinstance(self.model, FlyThinker):
            self.model.step_scale = None


def param_groups(model, lr: float, reasoner_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups: generator (+ projection) and reasoner lrs; no decay on biases and norm weights."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "reasoner" if name.startswith("reasoner.") else "generator"
        decay = param.ndim >= 2
        key = (role, decay)
        if key not in groups:
            group_lr = reasoner_lr if role == "reasoner" and reasoner_lr is not None else lr
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
                           "name": f"{role}{'' if decay else '_no_decay'}"}
        groups[key]["params"].append(param)
    return list(groups.values())


# ---- the step ----------------------------------------------------------------------------------------------

def clip_and_step(model, optimizer, max_norm: float) -> float:
    """Clip the (sharded) gradients to `max_norm` and step the optimizer; a non-finite norm skips the
    update (gradients are dropped). Returns the global gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
    else:
        logger.warning("non-finite grad norm %s: update skipped", norm)
        optimizer.zero_grad(set_to_none=True)
    return norm


@contextlib.contextmanager
def no_gradient_sync(model):
    """Backward inside accumulates unsharded gradients without reduce-scatter (FSDP2's no_sync): use on
    every micro-batch but the last of a step, whose backward reduce-scatters the sum once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---- training state: sharded, restartable --------------------------------------------------------------------

SHARDS = "shards"  # torch.distributed.checkpoint of model + optimizer (any world size can read it)


def _rank_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"train_state_rank{rank}.json", directory / f"rng_rank{rank}.pt"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_train_state(directory: str | os.PathLike, model, optimizer, scheduler, step: int,
                     save_optimizer: bool = True, save_extra: bool = True) -> None:
    """Model (+ optimizer) as sharded DCP (`shards/`), and per rank the scheduler state and step (JSON) and
    the RNG states (tensors only: loadable with weights_only=True). Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(_dcp_state(model, optimizer if save_optimizer else None), checkpoint_id=str(directory / SHARDS))
    if save_extra:
        state_file, rng_file = _rank_files(directory, dist.get_rank())
        extra = {"step": int(step), "scheduler": scheduler.state_dict() if scheduler is not None else None}
        write_json_atomic(state_file, extra)  # TypeError here: a scheduler whose state is not plain data
        tmp = rng_file.with_name(rng_file.name + ".tmp")
        torch.save(_rng_state(), tmp)
        os.replace(tmp, rng_file)
    dist.barrier()


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def load_train_state(directory: str | os.PathLike, model, optimizer, scheduler, load_optimizer: bool = True,
                     load_extra: bool = True) -> int:
    """Restore what `save_train_state` wrote into an already sharded model (and its optimizer, scheduler
    and this rank's RNG); returns the saved step (0 when `load_extra` is off)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    directory = Path(directory)
    if not (directory / SHARDS).is_dir():
        raise FileNotFoundError(f"{directory} holds no FlyThinker training state ({SHARDS}/ missing)")
    load_optimizer = load_optimizer and optimizer is not None
    state = _dcp_state(model, optimizer if load_optimizer else None)
    dcp.load(state, checkpoint_id=str(directory / SHARDS))
    if load_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    if not load_extra:
        return 0
    state_file, rng_file = _rank_files(directory, dist.get_rank())
    extra = json.loads(state_file.read_text())
    if scheduler is not None and extra.get("scheduler") is not None:
        scheduler.load_state_dict(extra["scheduler"])
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(extra["step"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights, keys as in FlyThinker.state_dict() (rank 0 holds them; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

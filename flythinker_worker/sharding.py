"""FSDP2 layout of FlyThinker and the pieces of a training step that every trainer shares (our verl worker,
the verl engine, the GPU check). torch only: no Ray, no verl, so it also runs where only torch is installed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .utils import local_device


def init_distributed(device: str) -> torch.device:
    """Join the process group verl's Worker env describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    torch_device = local_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
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
    for lm in (model.generator, model.reasoner):
        if lm is not None:
            for layer in lm.base_model.layers:
                fully_shard(layer, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


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

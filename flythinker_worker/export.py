"""Streamed export of a sharded FlyThinker to the checkpoint layout `FlyThinker.from_pretrained` loads
(flythinker.json, generator/ and reasoner/ as HF safetensors shards + index, projection.safetensors,
tokenizer files), without gathering the whole model anywhere.

The pair is walked unit by unit (`sharding.model_units`: a decoder layer, an embedding table, a norm, an
LM head): all ranks all-gather one unit (torch's full-state-dict helper, rank 0 receives it on the CPU),
rank 0 casts it to the export dtype and appends it to the current shard file of its LM, which is written
as soon as it would exceed `shard_bytes`. Peak on rank 0: one shard file + one unit; on other ranks one
unit. A tied LM head is written once (as the input embedding, HF's convention). torch only (+ safetensors).
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .model import CONFIG_NAME, PROJECTION_WEIGHTS
from .sharding import model_units
from .utils import atomic_directory

DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB: HF loaders read a shard at a time; small enough to bound the peak


class ShardWriter:
    """HF safetensors shards of one LM: `model.safetensors`, or `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json` when more than one file is needed."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []  # (temp file, its keys)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, give the files HF's names, write the index when sharded."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, keys) in enumerate(self.files, start=1):
            name = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_lm_files(lm, folder: Path, dtype: torch.dtype | None) -> None:
    """config.json (architectures and dtype as written) and generation_config.json of one LM."""
    config = copy.deepcopy(lm.config)
    config.architectures = [type(lm).__name__.removeprefix("FSDP")]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(lm, "generation_config", None) is not None and lm.can_generate():
        lm.generation_config.save_pretrained(folder)


def export_flythinker(model, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
                      shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write the FlyThinker checkpoint layout of a (sharded or plain) model in `dtype` (None: as trained),
    through a temp folder renamed into place by rank 0. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    writer_rank = not distributed or dist.get_rank() == 0
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with atomic_directory(directory) if writer_rank else nullcontext() as out:
        parts = [p for p in ("generator", "reasoner") if getattr(model, p, None) is not None]
        writers = {p: ShardWriter(out / p, shard_bytes) for p in parts} if writer_rank else {}
        projection = {}
        for unit, keys in model_units(model):
            # (unit tensors, full): all ranks gather, rank 0 receives them on the CPU, others get {}.
            module = model.get_submodule(unit)
            full = get_model_state_dict(module, options=options) if distributed else module.state_dict()
            if writer_rank:
                for key in keys:
                    tensor = full[key].detach()
                    tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                    part, _, name = f"{unit}.{key}".partition(".")
                    if part == "projection":
                        projection[name] = tensor.contiguous()
                    else:
                        writers[part].add(name, tensor)
            del full
        if writer_rank:
            for part, writer in writers.items():
                writer.close()
                _write_lm_files(getattr(model, part), out / part, dtype)
            if projection:
                from safetensors.torch import save_file

                save_file(projection, str(out / PROJECTION_WEIGHTS), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
                tokenizer.save_pretrained(str(out / "generator"))
            (out / CONFIG_NAME).write_text(json.dumps(model.fusion_config(), indent=2) + "\n")
    if distributed:
        dist.barrier()


# ---- weight sync in buckets ------------------------------------------------------------------------------------

def weight_buckets(model, bucket_bytes: int, dtype: torch.dtype) -> list[list[str]]:
    """The names of `model.state_dict()` (an FSDP2 module: shapes only, nothing gathered) in order, grouped
    into buckets of at most `bucket_bytes` once cast to `dtype`; a tensor larger than that is a bucket of
    its own. Every rank computes the same plan."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    buckets, current, size = [], [], 0
    for name, value in model.state_dict().items():
        nbytes = value.numel() * itemsize
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def gather_bucket(model, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Full CPU tensors of `names` in `dtype` on rank 0 (None elsewhere). Collective: every rank gathers
    each tensor in turn, so a rank never holds more than one full tensor besides rank 0's bucket."""
    state = model.state_dict()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name in names:
        value = state[name]
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if rank0:
            out[name] = full.detach().to("cpu", dtype).contiguous()
        del full
    return out if rank0 else None

"""Filling a sharded model built on the meta device from weights that only rank 0 reads. torch only (no
Ray, no verl).

Per unit (`sharding.model_units`: a decoder layer, a table, a norm...), rank 0 reads the unit's tensors
and the other ranks receive their shards:
  - row-sharded tensors (FSDP2's Shard(0)) of at least `stream_bytes` (the embedding tables, LM heads) are
    streamed: rank 0 reads one rank's rows at a time from the file (safetensors slices) and sends them to
    that rank, so no process ever holds the whole tensor;
  - everything else goes through torch's broadcast-from-rank-0 state-dict loading, which gives every rank
    a whole-tensor receive buffer (at most one decoder layer's tensor here).
Peak per rank: its shards + one tensor below `stream_bytes` or one rank's rows of a bigger one."""

from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist

from .sharding import model_units


def materialize(model, device: torch.device | str) -> None:
    """Allocate the (sharded) parameters of a model built with parameters on meta: `to_empty` creates
    every tensor uninitialised, so the real buffers (rotary inv_freq: in no checkpoint) are put back."""
    buffers = {}
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise ValueError(f"buffer {name} is on the meta device; build with parameters_on_meta()")
        buffers[name] = buffer.detach().clone()
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)


def load_from_rank0(model, read=None, stream_bytes: int = 16 << 20) -> None:
    """Fill a sharded, materialised model (see the module docstring). Rank 0 passes `read`, a
    `loading.WeightReader` (or anything with its `check(shapes)`, `__call__(keys)` and `rows(key, start,
    stop)`); the other ranks pass None. Keys as in model.state_dict(); tensors in any dtype. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    units = model_units(model)
    tensors = model.state_dict(keep_vars=True)
    error = [None]
    if dist.get_rank() == 0:
        try:  # every key present with the shape the model expects, before any rank waits on a transfer
            read.check({full: tuple(tensors[full].shape) for unit, keys in units for full in _full(unit, keys)})
        except Exception as err:  # noqa: BLE001  (every rank must learn it, or the others wait forever)
            error = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"loading the pair on rank 0 failed: {error[0]}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for unit, keys in units:
        module = model.get_submodule(unit) if unit else model
        # The same split on every rank: it depends on the layout only.
        streamed = [key for key in keys if _row_sharded(module, key, stream_bytes)]
        for key in streamed:
            full_key = _full(unit, [key])[0]
            _stream_rows(module.get_parameter(key), (lambda a, b, k=full_key: read.rows(k, a, b))
                         if dist.get_rank() == 0 else None)
        rest = [key for key in keys if key not in streamed]
        if rest:
            state = {}
            if dist.get_rank() == 0:
                full = read(_full(unit, rest))
                state = {key: full[full_key] for key, full_key in zip(rest, _full(unit, rest))}
                del full
            set_model_state_dict(module, state, options=options)
            del state
        release_host_memory()
    dist.barrier()


def _full(unit: str, keys: list[str]) -> list[str]:
    return [f"{unit}.{key}" if unit else key for key in keys]


def _row_sharded(module, key: str, min_bytes: int) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    try:
        param = module.get_parameter(key)
    except AttributeError:  # a buffer
        return False
    return isinstance(param, DTensor) and tuple(param.placements) == (Shard(0),) and \
        param.numel() * param.element_size() >= min_bytes


def row_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each rank under Shard(0): torch.chunk's split, which FSDP2 uses (trailing
    ranks may get none)."""
    chunks = torch.arange(rows).chunk(world)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
    return bounds + [(rows, rows)] * (world - len(bounds))


@torch.no_grad()
def _stream_rows(param, rows_of) -> None:
    """Rank 0 (`rows_of(start, stop)` reads checkpoint rows) sends each rank its rows of `param` in turn;
    the others (rows_of None) receive theirs into their shard."""
    rank = dist.get_rank()
    bounds = row_bounds(param.shape[0], dist.get_world_size())
    local = param.to_local()  # (rows of this rank, *rest)
    assert local.shape[0] == bounds[rank][1] - bounds[rank][0], "FSDP2 no longer shards rows as torch.chunk"
    # The mesh's device, not the shard's: with CPU offload the shards live on the host but NCCL needs CUDA.
    mesh_type = param.device_mesh.device_type
    device = torch.device(mesh_type, torch.cuda.current_device()) if mesh_type == "cuda" else torch.device(mesh_type)
    if rank == 0:
        for dst, (start, stop) in enumerate(bounds):
            if stop == start:
                continue
            rows = rows_of(start, stop).to(device=device, dtype=param.dtype).contiguous()
            if dst == 0:
                local.copy_(rows)
            else:
                dist.send(rows, dst=dst)
            del rows
    elif local.shape[0]:
        rows = torch.empty(local.shape, dtype=param.dtype, device=device)
        dist.recv(rows, src=0)
        local.copy_(rows)


def release_host_memory() -> None:
    """Return freed heap to the OS (glibc `malloc_trim`; elsewhere a no-op): glibc keeps freed buffers in
    the heap, so each unit's transient buffers stayed resident (+55 MiB per rank on a 200 MiB pair)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None

"""Typed configuration of the training worker, and the strict mapping -> dataclass builder that the
driver uses for the whole config: an unknown key or a bad value is a ValueError naming it."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .model import Positions, Projection, parse_enum
from .sharding import CHECKPOINTING


def _fail(path: str, message: str):
    raise ValueError(f"config {path}: {message}")


def _convert(value, annotation, path: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], path)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, path)
    if origin in (list, tuple):
        if isinstance(value, str):  # `trainer.logger=console` on the command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        return origin(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)) if args else origin(value)
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # nan/inf never make a sensible hyperparameter
            _fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    return value


def build(cls, mapping: Any, path: str = ""):
    """Instantiate dataclass `cls` from a nested mapping (e.g. an OmegaConf container), strictly."""
    if mapping is None:
        mapping = {}
    if isinstance(mapping, cls):
        return mapping
    if not isinstance(mapping, dict):
        _fail(path or cls.__name__, f"expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        where = ".".join(p for p in (path, unknown[0]) if p)
        raise ValueError(f"unknown config key '{where}'; valid keys under '{path or '<root>'}': "
                         f"{', '.join(sorted(fields))}")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        if str(err).startswith("config "):
            raise
        raise ValueError(f"config {path or cls.__name__}: {err}") from None


def check(condition: bool, path: str, message: str) -> None:
    """Value check for __post_init__: raises ValueError naming the key."""
    if not condition:
        _fail(path, message)


def check_attn_implementation(value: str, path: str) -> None:
    check(value in ATTN_IMPLEMENTATIONS, path, f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {value!r}")


@dataclass
class PathConfig:
    path: str = ""


# transformers' attention back-ends (flash_attention_* need the `gpu` extra on CUDA).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class ModelConfig:
    generator: PathConfig = field(default_factory=PathConfig)
    reasoner: PathConfig = field(default_factory=PathConfig)  # empty path with lam=0: SFT only
    attn_implementation: str = "sdpa"
    enable_gradient_checkpointing: bool = False
    # With enable_gradient_checkpointing: full | selective (keep matmul/attention outputs, recompute the
    # elementwise ops), applied to every `checkpoint_every`-th decoder layer of both LMs.
    activation_checkpointing: str = "full"
    checkpoint_every: int = 1
    trust_remote_code: bool = False

    def __post_init__(self):
        check(bool(self.generator.path), "model.generator.path", "is required")
        check_attn_implementation(self.attn_implementation, "model.attn_implementation")
        check(self.activation_checkpointing in CHECKPOINTING, "model.activation_checkpointing",
              f"must be one of {', '.join(CHECKPOINTING)}, got {self.activation_checkpointing!r}")
        check(self.checkpoint_every >= 1, "model.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")


@dataclass
class FusionConfig:
    lam: float = 0.5
    positions: str = "global"
    projection: str = "pad"

    def __post_init__(self):
        # lam < 0 would subtract the reasoner's signal: never meant, and a sign typo trains silently.
        check(self.lam >= 0, "fusion.lam", f"must be >= 0 (0 = SFT of the generator), got {self.lam}")
        parse_enum(Positions, self.positions, "fusion.positions")
        parse_enum(Projection, self.projection, "fusion.projection")


# linear: HF Trainer's default and the authors' (warmup, then linear decay to 0; min_lr_ratio unused).
LR_SCHEDULERS = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    lr: float = 5e-6
    reasoner_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.025
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.01
    lr_scheduler: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0

    def __post_init__(self):
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.reasoner_lr is None or self.reasoner_lr >= 0, "optim.reasoner_lr", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.lr_scheduler in LR_SCHEDULERS, "optim.lr_scheduler",
              f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"needs two values in [0, 1), got {self.betas}")
        check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.clip_grad > 0, "optim.clip_grad", f"must be > 0, got {self.clip_grad}")


@dataclass
class FSDPConfig:
    param_dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    # Reduce-scatter gradients after a step's last micro-batch only (earlier ones accumulate unsharded).
    no_sync_accumulation: bool = True
    # torch.compile each decoder layer (fewer, fused kernels); backend: inductor (GPU) | aot_eager | ...
    compile_blocks: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self):
        check(self.param_dtype in ("auto", "bf16", "fp32"), "fsdp.param_dtype",
              f"must be auto, bf16 or fp32, got {self.param_dtype!r}")


@dataclass
class ExportConfig:
    """The exported model (final/ and engine exports): HF safetensors written a layer at a time."""

    dtype: str = "auto"  # auto (= fsdp.param_dtype as resolved) | bf16 | fp32
    shard_mb: int = 2048  # one safetensors file at most this big (bounds the writer's memory)

    def __post_init__(self):
        check(self.dtype in ("auto", "bf16", "fp32"), "export.dtype", f"must be auto, bf16 or fp32, got {self.dtype!r}")
        check(self.shard_mb >= 1, "export.shard_mb", f"must be >= 1, got {self.shard_mb}")


@dataclass
class WorkerConfig:
    """What one training worker needs; built by the driver from the full config."""

    model: ModelConfig
    fusion: FusionConfig
    optim: OptimConfig
    fsdp: FSDPConfig
    micro_batch_size_per_gpu: int
    total_training_steps: int
    device: str = "cpu"
    seed: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    # Token-budget micro-batches (verl's names): rows packed without padding up to max_token_len_per_gpu
    # tokens each; false: micro_batch_size_per_gpu rows each (still packed, no padding).
    use_dynamic_bsz: bool = False
    max_token_len_per_gpu: int = 8192

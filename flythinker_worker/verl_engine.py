"""FlyThinker as a verl engine: strategy `flythinker` in verl's engine registry, so verl's own trainers
(`sft_trainer`, `sft_trainer_ray`, anything on `TrainingWorker`) train the pair by configuration alone:
`engine=flythinker engine.reasoner_path=<reasoner> engine.lam=0.5 model.path=<generator>` (with
`--config-dir <repo>/configs/verl`). Our own trainer's worker (`fsdp_worker`) wraps this same engine.

Scale contract: the pair is built on meta, sharded as ONE FSDP2 module, filled from rank 0 (the only weight
reader); micro-batches are packed rows (token budget with use_dynamic_bsz); gradients reduce-scattered once
per step; s computed once per step from the local shards; verl's loss gets per-token log-probs (global token
mean); checkpoints are sharded DCP; exports (`<global_step_N>/flythinker/` at the last step) are streamed.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import platform as _platform  # noqa: F401  (the CPU platform is registered before verl's engines import)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils import torch_functional as verl_F  # noqa: E402
from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager  # noqa: E402
from verl.utils.dataset.dataset_utils import DatasetPadMode  # noqa: E402
from verl.utils.device import get_device_name  # noqa: E402
from verl.workers.config import EngineConfig  # noqa: E402
from verl.workers.config.optimizer import build_optimizer  # noqa: E402
from verl.workers.engine.base import BaseEngine, BaseEngineCtx, EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngine  # noqa: E402
from verl.workers.engine.utils import detach_tree, postprocess_batch_func, prepare_micro_batches  # noqa: E402
from verl.workers.utils.padding import build_attention_mask_from_nested  # noqa: E402

from .config import LR_SCHEDULERS  # noqa: E402
from .export import export_flythinker  # noqa: E402
from .loading import build_on_meta  # noqa: E402
from .model import CONFIG_NAME, Positions, Projection, parse_enum  # noqa: E402
from .rank0_load import load_from_rank0, materialize  # noqa: E402
from .sharding import (CHECKPOINTING, StepScale, clip_and_step, compile_blocks,  # noqa: E402
                       enable_checkpointing, full_state_dict, load_train_state, no_gradient_sync, param_groups,
                       save_train_state, shard_flythinker)
from .utils import local_device, resolve_dtype  # noqa: E402
from .verl_logprobs import token_logprobs  # noqa: E402

logger = logging.getLogger(__name__)

STRATEGY = "flythinker"
EXPORT_DIR = "flythinker"  # <trainer.default_local_dir>/global_step_N/flythinker/
DTYPES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}


def _fail(key: str, message: str):
    raise ValueError(f"config engine.{key}: {message}")


@dataclass
class FlyThinkerEngineConfig(EngineConfig):
    """verl engine config of FlyThinker (`engine._target_`); validated when verl builds it at start-up.

    The generator is verl's `model.path` (model.enable_gradient_checkpointing, model.trust_remote_code and
    model.use_remove_padding apply to both LMs); the fusion settings live here."""

    strategy: str = STRATEGY
    # Reasoner checkpoint (same tokenizer as the generator); empty only with lam = 0 (plain generator SFT).
    reasoner_path: str = ""
    # Fusion: u_t = E_G[x_t] + lam * m_t * fit(r_{t-1}); positions picks m_t, projection picks fit.
    lam: float = 0.5
    positions: str = "global"
    projection: str = "pad"
    # Learning rate of the reasoner's parameters; null: optim.lr.
    reasoner_lr: Optional[float] = None
    # FSDP2 parameter dtype: auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32; reduce and master are fp32.
    dtype: str = "auto"
    # FSDP2 CPUOffloadPolicy (parameters, gradients and optimizer state live on the host).
    offload_policy: bool = False
    # Reshard decoder layers after forward (the root is never resharded; DESIGN.md section 3).
    reshard_after_forward: bool = True
    # Reduce-scatter gradients after the last micro-batch only (until then FSDP2 holds the pair's unsharded
    # gradients in fp32 on every rank; one reduce-scatter per step instead of one per micro-batch).
    use_no_sync_for_gradient_accumulation: bool = True
    attn_implementation: str = "sdpa"
    # With model.enable_gradient_checkpointing: full | selective (keep matmul/attention outputs, recompute
    # the elementwise ops), on every `checkpoint_every`-th decoder layer.
    activation_checkpointing: str = "full"
    checkpoint_every: int = 1
    # torch.compile each decoder layer (torchtitan's per-block compile); backend inductor | aot_eager | ...
    compile_blocks: bool = False
    compile_backend: str = "inductor"
    # lr schedule; null: optim.lr_scheduler_type. `linear` (HF Trainer's default, the authors' schedule:
    # warmup then linear decay to 0) is handled here because verl's optimizer config knows constant|cosine.
    lr_scheduler_type: Optional[str] = None
    # Export (HF safetensors, streamed unit by unit): dtype auto (= dtype) | bf16 | fp32; shard file size.
    export_dtype: str = "auto"
    export_shard_mb: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != STRATEGY:
            _fail("strategy", f"the FlyThinker engine config needs strategy={STRATEGY!r}, got {self.strategy!r}")
        for key, enum_cls in (("positions", Positions), ("projection", Projection)):
            try:
                parse_enum(enum_cls, getattr(self, key), f"engine.{key}")
            except ValueError as err:
                raise ValueError(f"config {err}") from None
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            _fail("lam", f"must be a finite number, got {self.lam!r}")
        if self.lam != 0 and not self.reasoner_path:
            _fail("reasoner_path", f"is required when engine.lam != 0 (lam={self.lam})")
        if self.reasoner_lr is not None and self.reasoner_lr < 0:
            _fail("reasoner_lr", f"must be >= 0 or null, got {self.reasoner_lr}")
        if str(self.dtype).lower() not in DTYPES:
            _fail("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.param_offload or self.optimizer_offload:
            _fail("param_offload" if self.param_offload else "optimizer_offload",
                  "is not supported by the flythinker engine; use engine.offload_policy=true (FSDP2 CPU offload)")
        if self.use_fused_kernels:
            _fail("use_fused_kernels", "is not supported by the flythinker engine")
        for key, allowed in (("activation_checkpointing", CHECKPOINTING), ("export_dtype", tuple(DTYPES)),
                             ("lr_scheduler_type", (None, *LR_SCHEDULERS))):
            if getattr(self, key) not in allowed:
                _fail(key, f"must be one of {', '.join(map(str, allowed))}, got {getattr(self, key)!r}")
        for key in ("checkpoint_every", "export_shard_mb"):
            if getattr(self, key) < 1:
                _fail(key, f"must be >= 1, got {getattr(self, key)}")

    @property
    def param_dtype_name(self) -> str:
        return DTYPES[str(self.dtype).lower()]


class FlyThinkerCheckpointManager(BaseCheckpointManager):
    """verl's checkpoint contract (save/load contents, retention) over our sharded DCP training state."""

    def save_checkpoint(self, local_path: str, hdfs_path: str = None, global_step: int = 0,
                        max_ckpt_to_keep: int = None, export: bool = False):
        if hdfs_path is not None:
            logger.warning("the flythinker engine does not copy checkpoints to HDFS (%s ignored)", hdfs_path)
        if self.rank == 0:
            self.ensure_checkpoint_capacity(max_ckpt_to_keep)
        save_train_state(local_path, self.model, self.optimizer, self.lr_scheduler, global_step,
                         save_optimizer=self.should_save_optimizer and self.optimizer is not None,
                         save_extra=self.should_save_extra)
        if export or self.should_save_hf_model:
            self.engine.export(Path(local_path) / EXPORT_DIR)
        if self.rank == 0:
            self.register_checkpoint(local_path, max_ckpt_to_keep)

    def load_checkpoint(self, local_path: str, hdfs_path: str = None, del_local_after_load: bool = False) -> int:
        return load_train_state(local_path, self.model, self.optimizer, self.lr_scheduler,
                                load_optimizer=self.should_load_optimizer, load_extra=self.should_load_extra)


class _ModeCtx(BaseEngineCtx):
    def __enter__(self):
        super().__enter__()
        self.engine.module.train(self.mode == "train")

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.mode == "train" and (self.zero_grad_on_exit or exc_type is not None):
            self.engine.optimizer_zero_grad()
        super().__exit__(exc_type, exc_val, exc_tb)


@EngineRegistry.register(model_type="language_model", backend=STRATEGY, device=["cuda", "cpu"])
class FlyThinkerEngine(BaseEngine):
    """Reasoner + Generator as one FSDP2 module behind verl's engine interface."""

    def __init__(self, model_config, engine_config: FlyThinkerEngineConfig, optimizer_config, checkpoint_config,
                 device: Optional[str] = None):
        """`device` (cpu | cuda): default verl's platform device."""
        super().__init__()
        if not isinstance(engine_config, FlyThinkerEngineConfig):
            raise ValueError(f"strategy {STRATEGY!r} needs engine._target_="
                             f"{FlyThinkerEngineConfig.__module__}.{FlyThinkerEngineConfig.__name__}, got "
                             f"{type(engine_config).__name__}")
        for key in ("lora_rank", "lora_adapter_path", "use_liger", "use_fused_kernels"):
            if model_config.get(key, None):
                raise ValueError(f"config model.{key}: not supported by the flythinker engine")
        self.model_config, self.engine_config = model_config, engine_config
        self.optimizer_config, self.checkpoint_config, self.mode = optimizer_config, checkpoint_config, None
        self.rank, self.device_type = dist.get_rank(), device or get_device_name()
        self.device = local_device(self.device_type)
        self.module = self.optimizer = self.lr_scheduler = self.tokenizer = None

    # ---- build ------------------------------------------------------------------------------------------

    def initialize(self):
        """Build the pair with its parameters on meta (every rank), checkpointing / compile per config, shard
        it, allocate the shards, fill them from rank 0 (the only reader of weight files: per-rank peak = the
        pair / N + one layer), then the optimizer and the lr schedule. fp32 master weights."""
        cfg, model_cfg = self.engine_config, self.model_config
        torch.manual_seed(cfg.seed)
        model, self.tokenizer, reader = build_on_meta(
            model_cfg.local_path or model_cfg.path, cfg.reasoner_path or None, cfg.lam, cfg.positions,
            cfg.projection, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
            trust_remote_code=model_cfg.get("trust_remote_code", False))
        self.param_counts = {"generator_params": sum(p.numel() for p in model.generator.parameters()),
                             "reasoner_params": sum(p.numel() for p in model.reasoner.parameters())
                             if model.reasoner is not None else 0}
        if model_cfg.get("enable_gradient_checkpointing", False):
            enable_checkpointing(model, cfg.activation_checkpointing, cfg.checkpoint_every)
        if cfg.compile_blocks:
            compile_blocks(model, cfg.compile_backend)
        self.param_dtype = resolve_dtype(cfg.param_dtype_name, self.device_type)
        self.module = shard_flythinker(model, self.device_type, self.param_dtype, cfg.offload_policy,
                                       cfg.reshard_after_forward)
        materialize(self.module, torch.device("cpu") if cfg.offload_policy else self.device)
        load_from_rank0(self.module, reader if self.rank == 0 else None)
        if not cfg.forward_only:
            opt = self.optimizer_config
            groups = param_groups(self.module, opt.lr, cfg.reasoner_lr, opt.weight_decay)
            self.optimizer = build_optimizer(groups, opt)
            self.lr_scheduler = build_lr_scheduler(self.optimizer, opt, cfg.lr_scheduler_type, self.rank)
        self.checkpoint_manager = FlyThinkerCheckpointManager(
            self.module, self.optimizer, self.lr_scheduler, processing_class=self.tokenizer,
            checkpoint_config=self.checkpoint_config)
        self.checkpoint_manager.engine = self
        if self.rank == 0:
            logger.warning("FlyThinker engine ready: world=%d device=%s dtype=%s lam=%s positions=%s %s",
                           dist.get_world_size(), self.device_type, self.param_dtype, cfg.lam, cfg.positions,
                           self.param_counts)

    # ---- verl's engine interface --------------------------------------------------------------------------

    is_param_offload_enabled = property(lambda self: False)  # FSDP2 offload: engine.offload_policy
    is_optimizer_offload_enabled = property(lambda self: False)

    def train_mode(self, **kwargs):
        return _ModeCtx(self, "train", **kwargs)

    def eval_mode(self, **kwargs):
        return _ModeCtx(self, "eval", **kwargs)

    def get_data_parallel_rank(self):
        return dist.get_rank()

    def get_data_parallel_size(self):
        return dist.get_world_size()

    def get_data_parallel_group(self):
        return dist.group.WORLD

    is_mp_src_rank_with_outputs = lambda self: True  # noqa: E731  (data parallel only)

    def optimizer_zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> float:
        return clip_and_step(self.module, self.optimizer, self.optimizer_config.clip_grad)

    def lr_scheduler_step(self) -> float:
        self.lr_scheduler.step()
        return self.lr_scheduler.get_last_lr()[0]

    def current_lrs(self) -> dict[str, float]:
        """The lr of each parameter group (generator, reasoner, ...) for the next step."""
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only=False) -> Any:
        """Micro-batches of this rank's share; verl's losses divide by the global loss-token count."""
        num_tokens = data["loss_mask"].sum().to(self.device)
        dist.all_reduce(num_tokens, group=self.get_data_parallel_group())
        tu.assign_non_tensor(data, batch_num_tokens=num_tokens.item(), dp_size=self.get_data_parallel_size())
        return_model_output = tu.get_non_tensor_data(data=data, key="return_model_output", default=False)
        micro_batches, indices = prepare_micro_batches(data=data, dp_group=self.get_data_parallel_group(),
                                                       same_micro_num_in_dp=True)
        outputs = []
        # s (the generator's mean embedding norm) once for all micro-batches: the weights do not change.
        with StepScale(self.module, self.param_dtype):
            for index, micro_batch in enumerate(micro_batches):
                # Gradients are reduce-scattered after the last micro-batch only (accumulated unsharded).
                defer = (not forward_only and index < len(micro_batches) - 1
                         and self.engine_config.use_no_sync_for_gradient_accumulation)
                with torch.no_grad() if forward_only else nullcontext(), \
                        no_gradient_sync(self.module) if defer else nullcontext():
                    loss, output = self.forward_step(micro_batch, loss_function, forward_only)
                    if not forward_only:
                        loss.backward()
                        if not return_model_output:
                            output.pop("model_output", None)
                outputs.append(output)
        return postprocess_batch_func(output_lst=outputs, indices=indices, data=data)

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        """Joint forward of one micro-batch (nested rows: verl's no-padding layout) -> per-token log-probs
        log p(x_{t+1} | u_<=t) (and entropy on request), then verl's loss function."""
        pad_mode = tu.get_non_tensor_data(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING)
        if pad_mode != DatasetPadMode.NO_PADDING:
            raise ValueError(f"the flythinker engine reads data.pad_mode=no_padding batches, got {pad_mode}")
        micro_batch = micro_batch.to(self.device)
        logits = self._forward_logits(micro_batch)  # (total tokens, V): every row's real tokens, in order
        input_ids = micro_batch["input_ids"]
        offsets = input_ids.offsets()
        temperature = micro_batch["temperature"] if "temperature" in micro_batch.keys() else 1.0
        if isinstance(temperature, torch.Tensor):
            logits = logits / verl_F.expand_as_nested(temperature.float(), input_ids).values().unsqueeze(-1)
        elif float(temperature) != 1.0:
            logits = logits / float(temperature)
        next_ids = torch.roll(input_ids.values(), shifts=-1, dims=0)  # a row's last is masked by the loss
        entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(
            token_logprobs(logits, next_ids, inplace_backward=not entropy), offsets)}
        if entropy:
            model_output["entropy"] = torch.nested.nested_tensor_from_jagged(
                verl_F.entropy_from_logits(logits), offsets)
        if loss_function is not None:
            loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                          dp_group=self.get_data_parallel_group())
        else:
            assert forward_only, "forward_only must be True when loss_function is None"
            loss, metrics = torch.tensor(1.0, device=self.device), {}
        return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}

    def _forward_logits(self, micro_batch: TensorDict) -> torch.Tensor:
        input_ids, position_ids = micro_batch["input_ids"], micro_batch["position_ids"]
        response = micro_batch["loss_mask"] if "loss_mask" in micro_batch.keys() else None
        if position_ids.dim() == 3:
            raise ValueError("the flythinker engine does not take multi-dimensional (mrope) position_ids")
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            # Packed: one row of all sequences; position_ids restart at 0 per sequence, so attention is
            # block-causal and the latent shift never crosses a sequence boundary.
            out = self.module(input_ids.values().unsqueeze(0), None, position_ids=position_ids.values().unsqueeze(0),
                              response_mask=None if response is None else response.values().unsqueeze(0))
            return out.logits[0]
        lengths = input_ids.offsets().diff()
        shape = (len(lengths), int(lengths.max()))
        pad_id = tu.get_non_tensor_data(data=micro_batch, key="pad_token_id", default=0) or 0
        mask = build_attention_mask_from_nested(input_ids, shape[1])
        padded = torch.nested.to_padded_tensor(input_ids, padding=pad_id, output_size=shape)
        positions = torch.nested.to_padded_tensor(position_ids, padding=0, output_size=shape)
        response = None if response is None else torch.nested.to_padded_tensor(response, 0, output_size=shape)
        logits = self.module(padded, mask, position_ids=positions, response_mask=response).logits
        return logits[mask.bool()]

    # ---- checkpoints and weights ----------------------------------------------------------------------------

    def save_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None, export: Optional[bool] = None, **kwargs) -> None:
        """Sharded training state under `local_path`; with `export` (default: at the last training step)
        also the FlyThinker layout under `local_path/flythinker/`."""
        if export is None:
            total = self.optimizer_config.total_training_steps if self.optimizer_config is not None else -1
            export = total is not None and total > 0 and global_step >= total
        self.checkpoint_manager.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep,
                                                export=export)
        if self.rank == 0 and export:
            print(f"[flythinker] exported {Path(local_path) / EXPORT_DIR} ({CONFIG_NAME}, generator/, reasoner/)",
                  flush=True)

    def load_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, del_local_after_load: bool = True,
                        **kwargs) -> int:
        """Restore `save_checkpoint`'s state; returns the saved step."""
        return self.checkpoint_manager.load_checkpoint(local_path, hdfs_path, del_local_after_load)

    def export(self, directory: str | os.PathLike) -> None:
        """The FlyThinker layout of the current weights, streamed a unit at a time in engine.export_dtype
        (collective; rank 0 writes; peak there: one shard file of engine.export_shard_mb + one layer)."""
        cfg = self.engine_config
        name = DTYPES[str(cfg.export_dtype).lower()]
        dtype = self.param_dtype if name == "auto" else resolve_dtype(name, self.device_type)
        export_flythinker(self.module, directory, self.tokenizer, dtype=dtype,
                          shard_bytes=cfg.export_shard_mb << 20)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU weights on rank 0 ({} elsewhere); collective."""
        return full_state_dict(self.module)

    def get_per_tensor_param(self, **kwargs):
        """(name, full tensor) for every weight, streamed one tensor at a time (weight sync to a paired
        decoder); names as in FlyThinker.state_dict(). Collective: all ranks iterate."""
        def tensors():
            for name, value in self.module.state_dict().items():
                yield name, value.full_tensor() if hasattr(value, "full_tensor") else value

        return tensors(), None


def build_lr_scheduler(optimizer, optim_config, scheduler_type: Optional[str] = None, rank: int = 0):
    """verl's constant / cosine schedule with warmup from optim.*, or `linear`: HF Trainer's default (the
    authors'), lr * t / w during warmup, then lr * (T - t) / (T - w) down to 0 (min_lr_ratio unused)."""
    scheduler_type = scheduler_type or optim_config.lr_scheduler_type
    if scheduler_type != "linear":
        holder = type("_Holder", (), {"optimizer_config": optim_config, "rank": rank})()
        return FSDPEngine._build_lr_scheduler(holder, optimizer)
    from transformers import get_linear_schedule_with_warmup

    total = optim_config.total_training_steps
    warmup = optim_config.lr_warmup_steps
    if warmup is None or warmup <= 0:
        warmup = int(optim_config.lr_warmup_steps_ratio * total)
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)


def register() -> None:
    """Entry-point / VERL_USE_EXTERNAL_MODULES target; importing this module registered the engine."""

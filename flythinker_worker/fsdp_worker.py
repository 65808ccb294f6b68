"""verl Worker that trains FlyThinker for our own driver (recipe/trainer.py). It wraps the FlyThinker verl
engine (`verl_engine.FlyThinkerEngine`, the one verl's own trainers use): one module holding the reasoner
and the generator, FSDP2-sharded layer by layer plus one root, one forward and one backward per
micro-batch (the paper's joint NLL), sharded DCP checkpoints, the FlyThinker export.

Gradients are normalised by the GLOBAL response-token count (all micro-batches, all ranks), so the update
does not depend on micro-batch size or data-parallel width. Runs on CUDA/NCCL or CPU/gloo.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from tensordict import TensorDict
from verl import DataProto
from verl.base_config import BaseConfig
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.config import CheckpointConfig
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPOptimizerConfig
from verl.workers.utils.losses import sft_loss

from .config import WorkerConfig
from .export import gather_bucket, weight_buckets
from .model import IGNORE_INDEX
from .sharding import init_distributed
from .utils import resolve_dtype
from .verl_engine import FlyThinkerEngine, FlyThinkerEngineConfig

logger = logging.getLogger(__name__)


@dataclass
class FlyThinkerModelConfig(BaseConfig):
    """The part of verl's `model` config (HFModelConfig) the engine reads, for callers without a verl
    model config (our worker). `path` may also be a FlyThinker checkpoint folder."""

    path: str = ""
    local_path: str | None = None
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = False
    use_remove_padding: bool = True


def engine_configs(cfg: WorkerConfig):
    """(model, engine, optimizer, checkpoint) verl configs of the engine for our WorkerConfig."""
    model = FlyThinkerModelConfig(path=cfg.model.generator.path, trust_remote_code=cfg.model.trust_remote_code,
                                  enable_gradient_checkpointing=cfg.model.enable_gradient_checkpointing)
    fsdp, opt = cfg.fsdp, cfg.optim
    engine = FlyThinkerEngineConfig(
        reasoner_path=cfg.model.reasoner.path, lam=cfg.fusion.lam, positions=cfg.fusion.positions,
        projection=cfg.fusion.projection, reasoner_lr=opt.reasoner_lr, dtype=fsdp.param_dtype,
        offload_policy=fsdp.cpu_offload, reshard_after_forward=fsdp.reshard_after_forward,
        use_no_sync_for_gradient_accumulation=fsdp.no_sync_accumulation, compile_blocks=fsdp.compile_blocks,
        compile_backend=fsdp.compile_backend, activation_checkpointing=cfg.model.activation_checkpointing,
        checkpoint_every=cfg.model.checkpoint_every, attn_implementation=cfg.model.attn_implementation,
        seed=cfg.seed, use_dynamic_bsz=cfg.use_dynamic_bsz, max_token_len_per_gpu=cfg.max_token_len_per_gpu,
        micro_batch_size_per_gpu=cfg.micro_batch_size_per_gpu, lr_scheduler_type=opt.lr_scheduler,
        export_dtype=cfg.export.dtype, export_shard_mb=cfg.export.shard_mb)
    optim = FSDPOptimizerConfig(  # verl's config knows constant | cosine; `linear` is the engine's
        lr=opt.lr, weight_decay=opt.weight_decay, betas=tuple(opt.betas), clip_grad=opt.clip_grad,
        lr_warmup_steps_ratio=opt.warmup_ratio, total_training_steps=cfg.total_training_steps,
        lr_scheduler_type="constant" if opt.lr_scheduler == "linear" else opt.lr_scheduler,
        min_lr_ratio=opt.min_lr_ratio, override_optimizer_config={"eps": opt.eps})
    return model, engine, optim, CheckpointConfig()


def engine_batch(batch, micro_batch_size: int, max_token_len: int | None = None) -> TensorDict:
    """A padded batch (input_ids, attention_mask, labels; any padding side) as the engine's verl batch:
    nested rows of real tokens with position_ids and loss_mask (labels != -100), the layout verl's SFT
    dataset and `sft_loss` use. `max_token_len`: micro-batches to that token budget (verl's dynamic
    batch size), else `micro_batch_size` rows each; either way the rows are packed without padding."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    rows = [(ids[i][mask[i]], labels[i][mask[i]]) for i in range(len(ids))]
    loss_mask = []
    for _, row_labels in rows:
        row_mask = (row_labels != IGNORE_INDEX).long()
        row_mask[0] = 0  # the first token is never predicted
        loss_mask.append(row_mask)
    nested = partial(torch.nested.as_nested_tensor, layout=torch.jagged)
    return tu.get_tensordict(
        {"input_ids": nested([r for r, _ in rows]), "loss_mask": nested(loss_mask),
         "position_ids": nested([torch.arange(len(r), device=r.device) for r, _ in rows])},
        {"use_remove_padding": True, "use_dynamic_bsz": max_token_len is not None,
         "micro_batch_size_per_gpu": micro_batch_size, "temperature": 1.0, "pad_mode": "no_padding",
         **({} if max_token_len is None else {"max_token_len_per_gpu": max_token_len})})


class FlyThinkerTrainWorker(Worker):
    """One data-parallel rank of FlyThinker training."""

    def __init__(self, config: WorkerConfig):
        super().__init__()
        self.config = config
        self.step = 0
        self.loss_fn = partial(sft_loss, config=None)

    # ---- set-up -----------------------------------------------------------------------------------------

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict:
        """Load both LMs, shard them, build AdamW and the lr schedule. Returns parameter counts."""
        cfg = self.config
        self.device = init_distributed(cfg.device)
        self.engine = FlyThinkerEngine(*engine_configs(cfg), device=cfg.device)
        self.engine.initialize()
        return dict(self.engine.param_counts)

    # ---- steps ------------------------------------------------------------------------------------------

    def _global_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _engine_batch(self, data: DataProto) -> TensorDict:
        cfg = self.config
        return engine_batch(data.batch, cfg.micro_batch_size_per_gpu,
                            cfg.max_token_len_per_gpu if cfg.use_dynamic_bsz else None)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def train_batch(self, data: DataProto) -> DataProto:
        """One optimizer step on this rank's shard of the global batch; metrics are global."""
        start = time.perf_counter()
        batch = self._engine_batch(data)
        lrs = self.engine.current_lrs()
        with self.engine.train_mode():
            output = self.engine.train_batch(batch, loss_function=self.loss_fn)
        self.engine.lr_scheduler_step()
        self.step += 1
        # Each micro-batch loss is (its NLL sum) / global tokens * world: their sum over ranks / world is
        # the global token mean.
        (loss,) = self._global_sum([sum(output["loss"])])
        tokens = int(tu.get(batch, "batch_num_tokens"))
        seconds = time.perf_counter() - start
        metrics = {"loss": loss / self.world_size, "grad_norm": float(output["metrics"]["grad_norm"]),
                   "lr": lrs.get("generator", next(iter(lrs.values()))), "tokens": tokens,
                   "step_seconds": seconds, "tokens_per_second": tokens / seconds}
        if "reasoner" in lrs:
            metrics["lr_reasoner"] = lrs["reasoner"]
        return DataProto(meta_info={"metrics": metrics if self.rank == 0 else None})

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def validate_batch(self, data: DataProto) -> DataProto:
        """Summed response NLL and token count over the global batch (no update)."""
        batch = self._engine_batch(data)
        with self.engine.eval_mode():
            output = self.engine.infer_batch(batch, loss_function=self.loss_fn)
        tokens = int(tu.get(batch, "batch_num_tokens"))
        (scaled,) = self._global_sum([sum(output["loss"])])
        metrics = {"val_loss_sum": scaled * tokens / self.world_size, "val_tokens": tokens}
        return DataProto(meta_info={"metrics": metrics if self.rank == 0 else None})

    # ---- state ------------------------------------------------------------------------------------------

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, directory: str) -> None:
        """Sharded model + optimizer (torch.distributed.checkpoint), per-rank scheduler/step (JSON), RNG."""
        self.engine.save_checkpoint(directory, global_step=self.step, export=False)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored step."""
        self.step = self.engine.load_checkpoint(directory)
        return self.step

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_model(self, directory: str) -> None:
        """Write the full model in the FlyThinker checkpoint layout (rank 0 writes)."""
        self.engine.export(directory)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_full_weights(self) -> dict[str, torch.Tensor] | None:
        """Unsharded CPU weights (rank 0; None elsewhere), to inspect a run; rollout syncs stream buckets instead
        (weight_bucket_count / get_weight_bucket)."""
        state = self.engine.full_state_dict()
        return state if self.rank == 0 else None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_cached_memory(self) -> None:
        """Hand the CUDA caching allocator's free blocks back (a colocated rollout is about to generate on
        the same GPU: after a step the activations' blocks stay reserved by this process otherwise)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def weight_bucket_count(self, bucket_mb: float, dtype: str) -> int:
        """How many buckets `get_weight_bucket` splits the weights into (same on every rank)."""
        return len(self._bucket_plan(bucket_mb, dtype))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_weight_bucket(self, index: int, bucket_mb: float, dtype: str) -> dict[str, torch.Tensor] | None:
        """Bucket `index` of the unsharded weights in `dtype` (rank 0; None elsewhere); every rank must call
        it (it gathers). With `weight_bucket_count`, a rollout sync streams the weights in bounded pieces."""
        names = self._bucket_plan(bucket_mb, dtype)[index]
        return gather_bucket(self.engine.module, names, resolve_dtype(dtype, self.config.device))

    def _bucket_plan(self, bucket_mb: float, dtype: str) -> list[list[str]]:
        key = (bucket_mb, dtype)
        if getattr(self, "_plan_key", None) != key:
            self._plan = weight_buckets(self.engine.module, int(bucket_mb * 2**20),
                                        resolve_dtype(dtype, self.config.device))
            self._plan_key = key
        return self._plan


"""verl Worker that trains FlyThinker: ONE module holding the reasoner and the generator, FSDP2-sharded
layer by layer plus one root, one forward and one backward per micro-batch (the paper's joint NLL).

Gradients are normalised by the GLOBAL response-token count (all micro-batches, all ranks), so the update
does not depend on micro-batch size or data-parallel width. Runs on CUDA/NCCL or CPU/gloo.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.utils.torch_functional import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from .config import WorkerConfig
from .loading import load_flythinker
from .model import IGNORE_INDEX
from .sharding import init_distributed, param_groups, shard_flythinker
from .utils import resolve_dtype

logger = logging.getLogger(__name__)


class FlyThinkerTrainWorker(Worker):
    """One data-parallel rank of FlyThinker training."""

    def __init__(self, config: WorkerConfig):
        super().__init__()
        self.config = config
        self.step = 0

    # ---- set-up -----------------------------------------------------------------------------------------

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict:
        """Load both LMs, shard them, build AdamW and the lr schedule. Returns parameter counts."""
        cfg = self.config
        self.device = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_flythinker(
            cfg.model.generator.path, cfg.model.reasoner.path or None, cfg.fusion.lam, cfg.fusion.positions,
            cfg.fusion.projection, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code)
        counts = {"generator_params": sum(p.numel() for p in model.generator.parameters()),
                  "reasoner_params": sum(p.numel() for p in model.reasoner.parameters())
                  if model.reasoner is not None else 0}
        if cfg.model.enable_gradient_checkpointing:
            for lm in (model.generator, model.reasoner):
                if lm is not None:
                    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        param_dtype = resolve_dtype(cfg.fsdp.param_dtype, cfg.device)
        if not cfg.fsdp.cpu_offload:
            model.to(self.device)
        self.model = shard_flythinker(model, cfg.device, param_dtype, cfg.fsdp.cpu_offload,
                                      cfg.fsdp.reshard_after_forward)
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, opt.lr, opt.reasoner_lr, opt.weight_decay),
                                           betas=tuple(opt.betas), eps=opt.eps)
        warmup = int(opt.warmup_ratio * cfg.total_training_steps)
        if opt.lr_scheduler == "cosine":
            self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, cfg.total_training_steps,
                                                             min_lr_ratio=opt.min_lr_ratio)
        else:
            self.scheduler = get_constant_schedule_with_warmup(self.optimizer, warmup)
        if self.rank == 0:
            logger.warning("FlyThinker worker ready: world=%d device=%s dtype=%s %s", self.world_size,
                           cfg.device, param_dtype, counts)
        return counts

    # ---- steps ------------------------------------------------------------------------------------------

    def _micro_batches(self, data: DataProto):
        batch = data.batch.to(self.device)
        return batch, batch.split(self.config.micro_batch_size_per_gpu)

    def _all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def train_batch(self, data: DataProto) -> DataProto:
        """One optimizer step on this rank's shard of the global batch; metrics are global."""
        start = time.perf_counter()
        batch, micro_batches = self._micro_batches(data)
        local_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        (global_tokens,) = self._all_reduce([local_tokens])
        # FSDP averages gradients over ranks; dividing each rank's NLL sum by global/world makes that
        # average the global token mean.
        normaliser = max(global_tokens, 1.0) / self.world_size
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in micro_batches:
            out = self.model(micro["input_ids"], micro["attention_mask"], labels=micro["labels"],
                             num_items_in_batch=normaliser)
            out.loss.backward()
            loss_sum += float(out.loss.detach()) * normaliser
        grad_norm = self._clip_gradients()
        if torch.isfinite(torch.tensor(grad_norm)):
            self.optimizer.step()
        else:
            logger.warning("step %d: non-finite grad norm %s, update skipped", self.step + 1, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.scheduler.step()
        self.step += 1
        (total_loss,) = self._all_reduce([loss_sum])
        seconds = time.perf_counter() - start
        metrics = {"loss": total_loss / max(global_tokens, 1.0), "grad_norm": grad_norm,
                   "lr": lrs.get("generator", next(iter(lrs.values()))), "tokens": int(global_tokens),
                   "step_seconds": seconds, "tokens_per_second": global_tokens / seconds}
        if "reasoner" in lrs:
            metrics["lr_reasoner"] = lrs["reasoner"]
        return DataProto(meta_info={"metrics": metrics if self.rank == 0 else None})

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.clip_grad)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def validate_batch(self, data: DataProto) -> DataProto:
        """Summed response NLL and token count over the global batch (no update)."""
        batch, micro_batches = self._micro_batches(data)
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for micro in micro_batches:
                out = self.model(micro["input_ids"], micro["attention_mask"], labels=micro["labels"],
                                 num_items_in_batch=1)
                loss_sum += float(out.loss)
                tokens += int(out.num_tokens)
        total_loss, total_tokens = self._all_reduce([loss_sum, tokens])
        metrics = {"val_loss_sum": total_loss, "val_tokens": int(total_tokens)}
        return DataProto(meta_info={"metrics": metrics if self.rank == 0 else None})

    # ---- state ------------------------------------------------------------------------------------------

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, directory: str) -> None:
        """Sharded model + optimizer (torch.distributed.checkpoint) and per-rank scheduler/RNG/step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(directory) / "shards"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rng},
                   Path(directory) / f"worker_rank{self.rank}.pt")
        dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(directory) / "shards"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        extra = torch.load(Path(directory) / f"worker_rank{self.rank}.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step = extra["step"]
        torch.set_rng_state(extra["rng"]["cpu"])
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng"]["cuda"])
        return self.step

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_model(self, directory: str) -> None:
        """Write the full model in the FlyThinker checkpoint layout (rank 0 writes)."""
        state = self._full_state_dict()
        if self.rank == 0:
            self.model.save_pretrained(directory, tokenizer=self.tokenizer, state_dict=state)
        dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_full_weights(self) -> dict[str, torch.Tensor] | None:
        """Unsharded CPU weights (rank 0; None elsewhere), to sync a rollout worker without disk."""
        state = self._full_state_dict()
        return state if self.rank == 0 else None

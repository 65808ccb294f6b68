"""verl Worker that generates with FlyThinker: batched lock-step paired decoding (PairedDecoder) on
DataProto prompts, in a worker group separate from training. Pure inference: no process group.

Weights come from disk (a FlyThinker checkpoint, or HF generator/reasoner folders) at `init_model`, and
can be replaced in memory from the training group (`load_weights(train_group.get_full_weights()[0])`),
so validation-time generation needs no disk round trip.

`generate` contract (DP_COMPUTE_PROTO: the driver's batch is split evenly over the workers, so its size
must be a multiple of the worker count; recipe.rollout pads with filler rows and drops them):
  batch:      input_ids (B, P) long, LEFT-padded; attention_mask (B, P); seed (B,) long, one per row
  meta_info:  max_new_tokens, temperature, top_p, top_k, eos_token_id (int | list), pad_token_id
  returns:    responses (B, max_new_tokens) long, right-padded with pad_token_id (a fixed width, so the
              workers' outputs concatenate); response_length (B,) long (EOS included);
              meta_info["metrics"]: per-worker dict of lists (rank, rows, new_tokens, seconds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register

from .config import FusionConfig, check, check_attn_implementation
from .decoding import PairedDecoder
from .model import CONFIG_NAME, FlyThinker
from .utils import DTYPES, check_model_source, local_device, resolve_dtype

logger = logging.getLogger(__name__)
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "eos_token_id", "pad_token_id")


@dataclass
class RolloutModelConfig:
    """Which model to generate with (the `model` section of configs/flythinker_generate.yaml):

    - `path` = a FlyThinker checkpoint folder (has flythinker.json; e.g. the trainer's `final/` export):
      its own fusion settings unless `fusion` is given.
    - `path` = a plain HF generator folder, `fusion.lam != 0` and `reasoner_path`: the pair built exactly
      as the training worker builds it (so `load_weights` from that training group fits key for key).
    - `generator_only: true` (or a plain HF folder with no `fusion`, or `fusion.lam == 0`): the generator
      alone, lam = 0, the reasoner never loaded. The untrained Instruct model gives the paper's
      "Non-pers" / "RAG" baselines (the prompt decides which). With a FlyThinker checkpoint, its
      `generator/` is used.
    """

    path: str = ""
    reasoner_path: str = ""
    fusion: FusionConfig | None = None  # None: the checkpoint's own settings (lam 0 for a plain generator)
    generator_only: bool = False
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self):
        check(bool(self.path), "model.path", "is required (a FlyThinker checkpoint or an HF generator folder)")
        check_attn_implementation(self.attn_implementation, "model.attn_implementation")
        check(self.dtype in ("auto", *DTYPES), "model.dtype",
              f"must be auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        pair = self.fusion is not None and self.fusion.lam != 0 and not self.generator_only
        check(not pair or self.is_checkpoint or bool(self.reasoner_path), "model.reasoner_path",
              "is required when model.path is a plain HF generator and model.fusion.lam != 0")

    @property
    def is_checkpoint(self) -> bool:
        return (Path(self.path) / CONFIG_NAME).exists()


@dataclass
class RolloutConfig:
    """What one rollout worker needs: the model and the device."""

    model: RolloutModelConfig
    device: str = "cpu"  # cpu | cuda

    def __post_init__(self):
        check(self.device in ("cpu", "cuda"), "trainer.device", f"must be cpu or cuda, got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.model.dtype, self.device)


def build_rollout_model(cfg: RolloutConfig) -> FlyThinker:
    """The FlyThinker the config names, on CPU in `cfg.torch_dtype` (see RolloutModelConfig's cases)."""
    from transformers import AutoModelForCausalLM

    from .loading import load_flythinker

    m = cfg.model
    check_model_source(m.path, "model.path")
    if m.reasoner_path:
        check_model_source(m.reasoner_path, "model.reasoner_path")
    path = Path(m.path)
    kwargs = dict(dtype=cfg.torch_dtype, attn_implementation=m.attn_implementation,
                  trust_remote_code=m.trust_remote_code)
    lam = m.fusion.lam if m.fusion is not None else None
    if m.generator_only or lam == 0 or (lam is None and not m.is_checkpoint):
        generator = AutoModelForCausalLM.from_pretrained(path / "generator" if m.is_checkpoint else path, **kwargs)
        return FlyThinker(generator, None, lam=0.0)
    if m.fusion is None:
        return FlyThinker.from_pretrained(path, **kwargs)
    model, _ = load_flythinker(m.path, m.reasoner_path or None, m.fusion.lam, m.fusion.positions,
                               m.fusion.projection, **kwargs)
    return model


class FlyThinkerRolloutWorker(Worker):
    """One generation replica: a full FlyThinker copy and a PairedDecoder."""

    def __init__(self, config: RolloutConfig):
        super().__init__()
        self.config = config
        self.model = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict:
        """Load the model onto this worker's device. Returns a summary (params, lam, dtype, device)."""
        cfg = self.config
        self.device = local_device(cfg.device)
        self.model = build_rollout_model(cfg).to(self.device).eval()
        self.decoder = PairedDecoder(self.model)
        summary = {"params": sum(p.numel() for p in self.model.parameters()), "lam": self.model.lam,
                   "has_reasoner": self.model.reasoner is not None, "dtype": str(cfg.torch_dtype),
                   "device": str(self.device)}
        if self.rank == 0:
            logger.warning("FlyThinker rollout worker ready: world=%d %s", self.world_size, summary)
        return summary

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Replace every weight with `state_dict` (keys as FlyThinker.state_dict(), e.g. the training
        group's get_full_weights()[0]); strict: a missing or unexpected key is an error. Returns the count."""
        if self.model is None:
            raise RuntimeError("call init_model() before load_weights()")
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_weights expects a state dict, got {type(state_dict).__name__} (pass "
                            "get_full_weights()[0]: rank 0's weights; the other ranks return None)")
        expected = set(self.model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"load_weights: state dict does not fit this rollout model (lam="
                             f"{self.model.lam}, reasoner={self.model.reasoner is not None}): missing "
                             f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        # load_state_dict copies into the existing (device, dtype) tensors, casting fp32 -> bf16 as needed.
        self.model.load_state_dict(state_dict, strict=True)
        return len(state_dict)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def generate(self, data: DataProto) -> DataProto:
        """Paired decoding of this worker's rows (see the module docstring for the contract)."""
        if self.model is None:
            raise RuntimeError("call init_model() before generate()")
        missing = [k for k in SAMPLING_KEYS if k not in data.meta_info]
        if missing:
            raise ValueError(f"generate: meta_info lacks sampling keys {missing}")
        sampling = {k: data.meta_info[k] for k in SAMPLING_KEYS}
        start = time.perf_counter()
        input_ids = data.batch["input_ids"].to(self.device)
        attention_mask = data.batch["attention_mask"].to(self.device)
        seeds = [int(s) for s in data.batch["seed"].tolist()]
        out = self.decoder.generate(input_ids, attention_mask, seed=seeds, **sampling)
        generated = out.sequences[:, input_ids.shape[1]:].cpu()  # (b, n <= max_new_tokens)
        width = sampling["max_new_tokens"]
        responses = torch.full((generated.shape[0], width), sampling["pad_token_id"], dtype=torch.long)
        responses[:, :generated.shape[1]] = generated
        lengths = out.num_generated.cpu()
        metrics = {"rank": self.rank, "rows": int(generated.shape[0]), "new_tokens": int(lengths.sum()),
                   "seconds": time.perf_counter() - start}
        # Only "metrics" may differ between workers: DataProto.concat merges it into a dict of lists.
        return DataProto.from_dict(tensors={"responses": responses, "response_length": lengths},
                                   meta_info={"metrics": metrics})

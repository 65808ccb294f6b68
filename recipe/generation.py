"""Driver-side generation helpers around a FlyThinkerRolloutWorker group: chat-template tokenisation,
left padding, per-row seeds, filler rows, weight sync from the training group, decoding to text, and a
resumable predictions JSONL writer. The driver never touches ranks or devices.

Validation-time generation in the trainer (a rollout group kept in sync with the training group):

    rollout, pool = make_rollout_group(rollout_config_from_training(cfg), cfg.trainer.n_gpus_per_node,
                                       cfg.trainer.nnodes)              # once; runs init_model
    sync_weights(train_group, rollout)                                  # each validation
    texts = generate_texts(rollout, tokenizer, prompts, cfg.val_generation,
                           row_seeds(cfg.trainer.seed, ids), max_prompt_length=cfg.data.max_prompt_length)
    ...
    release_worker_group(rollout, pool)

On GPU a rollout group of its own needs GPUs of its own; to share the training GPUs, make the training
pool with max_colocate_count=2 and pass it as make_rollout_group(..., resource_pool=pool).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from verl import DataProto

from flythinker_worker.config import check
from flythinker_worker.rollout_worker import FlyThinkerRolloutWorker, RolloutConfig, RolloutModelConfig
from .data import pad_token_id
from .workers import make_worker_group, release_worker_group

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """Decoding settings; temperature 0 is greedy. The dataclass defaults are the paper's (temperature
    0.8, top-p 0.95, up to 1536 new tokens)."""

    max_new_tokens: int = 1536
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0: off

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "generation.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "generation.top_k", f"must be >= 0, got {self.top_k}")


# ---- worker group ------------------------------------------------------------------------------------------

def make_rollout_group(config: RolloutConfig, n_workers_per_node: int, nnodes: int = 1, resource_pool=None):
    """(group, pool): a FlyThinkerRolloutWorker group with the model loaded (init_model done).

    Without `resource_pool`: a pool of its own, nnodes x n_workers_per_node processes (one GPU each on
    cuda). With one (e.g. the training group's, made with max_colocate_count=2 so that each bundle takes
    two processes and each gets half a GPU): the rollout workers sit beside the training ranks, and the
    returned pool is None (the owner frees it). Free the group with `release_worker_group(group, pool)`."""
    if resource_pool is None:
        group, pool = make_worker_group(FlyThinkerRolloutWorker, config.device, n_workers_per_node, nnodes,
                                        config=config)
    else:
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

        worker = RayClassWithInitArgs(ray.remote(FlyThinkerRolloutWorker), config=config)
        group, pool = RayWorkerGroup(resource_pool, worker, device_name=config.device), None
    try:
        group.init_model()
    except BaseException:
        release_worker_group(group, pool)
        raise
    return group, pool


def rollout_config_from_training(cfg) -> RolloutConfig:
    """A rollout config whose model matches the training worker's key for key (same generator/reasoner
    folders and fusion settings, built by the same load_flythinker), so `sync_weights` fits strictly.
    `cfg` is a recipe.config.FlyThinkerConfig. bf16 on GPU, fp32 on CPU, as training computes."""
    model = RolloutModelConfig(path=cfg.model.generator.path, reasoner_path=cfg.model.reasoner.path,
                               fusion=cfg.fusion, dtype=cfg.fsdp.param_dtype,  # same names: auto|bf16|fp32
                               attn_implementation=cfg.model.attn_implementation,
                               trust_remote_code=cfg.model.trust_remote_code)
    return RolloutConfig(model=model, device=cfg.trainer.device)


def sync_weights(train_group, rollout_group) -> int:
    """Copy the training group's current weights into every rollout worker, in memory. Every training
    rank must take part in get_full_weights (it gathers the FSDP shards); rank 0's result goes to the
    rollout workers as an ObjectRef, which Ray resolves in each worker without a detour via the driver.
    Returns the number of tensors loaded."""
    import ray

    refs = train_group.execute_all_async("get_full_weights")
    counts = rollout_group.load_weights(refs[0])
    ray.get(refs[1:])  # surface errors on the other ranks
    return counts[0]


# ---- prompts -----------------------------------------------------------------------------------------------

def row_seed(base_seed: int, row_id: str) -> int:
    """A row's sampling seed from (base seed, row id) alone (crc32: stable across processes, unlike
    hash()), so a row's sample is the same whatever the batching or the worker count."""
    return zlib.crc32(f"{base_seed}:{row_id}".encode("utf-8"))


def row_seeds(base_seed: int, row_ids: Sequence[str]) -> list[int]:
    return [row_seed(base_seed, str(i)) for i in row_ids]


def tokenize_prompts(tokenizer, prompts_messages: Sequence[Sequence[dict]], max_prompt_length: int | None = None
                     ) -> list[list[int]]:
    """Chat-templated prompt ids with the assistant header appended (add_generation_prompt). Prompts over
    budget keep their LAST tokens (the query and the assistant header), as training does."""
    out = []
    for messages in prompts_messages:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max len) long, padded on the LEFT (decoding appends on the right)."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask


def eos_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> list[int]:
    """The tokenizer's EOS plus the generator's generation_config EOS ids (Qwen2.5-Instruct also stops at
    <|endoftext|>), when `model_dir` (an HF folder or a FlyThinker checkpoint) has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if model_dir is not None:
        for folder in (Path(model_dir), Path(model_dir) / "generator"):
            path = folder / "generation_config.json"
            if path.exists():
                extra = json.loads(path.read_text()).get("eos_token_id")
                ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
                break
    if not ids:
        raise ValueError("no EOS token: the tokenizer has no eos_token_id and no generation_config names one")
    return sorted(set(int(i) for i in ids))


# ---- generation --------------------------------------------------------------------------------------------

def sampling_meta(sampling, pad_id: int, eos_ids: Sequence[int]) -> dict[str, Any]:
    """meta_info for FlyThinkerRolloutWorker.generate from any object with max_new_tokens, temperature,
    top_p (and optionally top_k): a SamplingConfig, or the trainer's ValGenerationConfig."""
    return {"max_new_tokens": int(sampling.max_new_tokens), "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p), "top_k": int(getattr(sampling, "top_k", 0)),
            "eos_token_id": list(eos_ids), "pad_token_id": int(pad_id)}


def generate_ids(worker_group, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], sampling,
                 pad_id: int, eos_ids: Sequence[int]) -> tuple[list[list[int]], dict]:
    """Generated ids per row (EOS included, padding removed) and the workers' metrics (dict of lists).
    The batch is topped up with copies of its last row to a multiple of the worker count (DP_COMPUTE_PROTO
    splits evenly); their outputs are dropped. Per-row seeds make that harmless."""
    if len(prompt_ids) != len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
    n = len(prompt_ids)
    if n == 0:
        return [], {}
    filler = -n % worker_group.world_size
    prompt_ids = list(prompt_ids) + [prompt_ids[-1]] * filler
    seeds = list(seeds) + [seeds[-1]] * filler
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    data = DataProto.from_dict(tensors={"input_ids": input_ids, "attention_mask": attention_mask,
                                        "seed": torch.tensor(seeds, dtype=torch.long)},
                               meta_info=sampling_meta(sampling, pad_id, eos_ids))
    out = worker_group.generate(data)
    responses, lengths = out.batch["responses"][:n], out.batch["response_length"][:n]
    return [responses[i, :int(lengths[i])].tolist() for i in range(n)], out.meta_info.get("metrics", {})


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids, special tokens (EOS, chat markers) skipped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def generate_texts(worker_group, tokenizer, prompts_messages: Sequence[Sequence[dict]], sampling,
                   seeds: Sequence[int], *, max_prompt_length: int | None = None, batch_size: int | None = None,
                   eos_ids: Sequence[int] | None = None) -> list[str]:
    """Generated texts for chat prompts (system + user messages, no assistant turn), one per prompt, in
    order. `sampling`: anything with max_new_tokens/temperature/top_p[/top_k]; `seeds`: one per prompt
    (row_seeds(base, ids)); `batch_size`: rows per worker-group call (None: all at once)."""
    pad_id = pad_token_id(tokenizer)
    eos_ids = list(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer)
    step = batch_size or max(len(prompts_messages), 1)
    texts = []
    for begin in range(0, len(prompts_messages), step):
        ids = tokenize_prompts(tokenizer, prompts_messages[begin:begin + step], max_prompt_length)
        generated, _ = generate_ids(worker_group, ids, seeds[begin:begin + step], sampling, pad_id, eos_ids)
        texts += [decode(tokenizer, g) for g in generated]
    return texts


# ---- resumable predictions file ----------------------------------------------------------------------------

class PredictionWriter:
    """Predictions JSONL, one object per line with a unique `id`, appended and flushed per batch, so a
    killed run loses at most its current batch. Reopening reads the ids already there (`done`) and
    repairs a torn last line (a partial write from a crash) by truncating it away; a bad line anywhere
    else is an error, never silently dropped. `settings` (what changes the outputs: model, data,
    sampling, seed) is kept in `<path>.meta.json`; resuming with different settings is refused."""

    def __init__(self, path: str | os.PathLike, settings: dict | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in (self.path, self.meta_path):
                p.unlink(missing_ok=True)
        self._check_settings(settings)
        self.done: set[str] = self._recover() if self.path.exists() else set()
        self._file = open(self.path, "a", encoding="utf-8")

    def _check_settings(self, settings: dict | None) -> None:
        if settings is None:
            return
        settings = json.loads(json.dumps(settings))  # the JSON view (tuples -> lists) for comparing
        if self.meta_path.exists() and self.path.exists():
            old = json.loads(self.meta_path.read_text())
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
                raise ValueError(f"{self.path} was generated with other settings ({changes}); use another "
                                 "output.path, or output.overwrite=true to start over")
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.meta_path)

    def _recover(self) -> set[str]:
        data = self.path.read_bytes()
        lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
        done, offset, keep = set(), 0, 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
            try:
                record = json.loads(line) if line.strip() else None
                ok = record is None or (isinstance(record, dict) and "id" in record)
            except ValueError:
                ok = False
            complete = number < len(lines)  # newline-terminated
            if not ok or not complete:
                if last:
                    break  # a torn tail: dropped below
                raise ValueError(f"{self.path} line {number} is not a predictions record; fix or delete the file")
            offset += len(line) + 1
            if record is not None:
                if record["id"] in done:
                    raise ValueError(f"{self.path} line {number}: duplicate id {record['id']!r}")
                done.add(str(record["id"]))
            keep = offset
        if keep < len(data):
            logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path,
                           len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        return done

    def write(self, records: Sequence[dict]) -> None:
        """Append `records` (each with a new `id`) and flush them to disk."""
        for record in records:
            if record["id"] in self.done:
                raise ValueError(f"id {record['id']!r} is already in {self.path}")
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.done.add(record["id"])
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

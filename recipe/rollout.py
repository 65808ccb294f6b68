"""Driver-side generation helpers around a FlyThinkerRolloutWorker group: chat-template tokenisation,
left padding, per-row seeds, filler rows, weight sync from the training group, decoding to text. Used by
the trainer (validation-time generation) and by evaluation.main_generate. The driver never touches ranks
or devices.

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
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from verl import DataProto

from flythinker_worker.decode_common import left_pad
from flythinker_worker.rollout_worker import FlyThinkerRolloutWorker, RolloutConfig, RolloutModelConfig

from .data import pad_token_id, prompt_ids
from .workers import make_worker_group, release_worker_group, worker_group


# ---- worker group ------------------------------------------------------------------------------------------

def make_rollout_group(config: RolloutConfig, n_workers_per_node: int, nnodes: int = 1, resource_pool=None):
    """(group, pool): a FlyThinkerRolloutWorker group with the model loaded (init_model done; its per-worker
    summaries in `group.summaries`).

    Without `resource_pool`: a pool of its own, nnodes x n_workers_per_node processes (one GPU each on
    cuda). With one (e.g. the training group's, made with max_colocate_count=2 so that each bundle takes
    two processes and each gets half a GPU): the rollout workers sit beside the training ranks, and the
    returned pool is None (the owner frees it). Free the group with `release_worker_group(group, pool)`."""
    if resource_pool is None:
        group, pool = make_worker_group(FlyThinkerRolloutWorker, config.device, n_workers_per_node, nnodes,
                                        config=config)
    else:
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs

        worker = RayClassWithInitArgs(ray.remote(FlyThinkerRolloutWorker), config=config)
        group, pool = worker_group(resource_pool, worker, config.device), None
    try:
        group.summaries = group.init_model()  # per worker: params, lam, dtype, device, backend, engine
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
    # Colocated with the training workers on the same GPUs: the rollout's weights wait on the host.
    return RolloutConfig(model=model, device=cfg.trainer.device, park_weights=cfg.trainer.device == "cuda")


def sync_weights(train_group, rollout_group, dtype: str = "fp32", bucket_mb: float = 512) -> int:
    """Copy the training group's current weights into every rollout worker, in memory, streamed in buckets
    of at most `bucket_mb` MiB in `dtype` (the rollout's compute dtype): every training rank gathers one
    bucket (FSDP shards), rank 0's bucket goes to the rollout workers as an ObjectRef that Ray resolves in
    each worker without a detour via the driver, and the next bucket is gathered only after the workers
    copied this one. So no process ever holds the whole state. Returns the number of tensors loaded."""
    import ray

    count = train_group.weight_bucket_count(bucket_mb, dtype)[0]
    loaded = 0
    for index in range(count):
        refs = train_group.execute_all_async("get_weight_bucket", index, bucket_mb, dtype)
        loaded = rollout_group.load_weight_bucket(refs[0], index, count)[0]
        ray.get(refs[1:])  # surface errors on the other ranks
        del refs
    return loaded


# ---- prompts -----------------------------------------------------------------------------------------------

def row_seed(base_seed: int, row_id: str) -> int:
    """A row's sampling seed from (base seed, row id) alone (crc32: stable across processes, unlike
    hash()), so a row's sample is the same whatever the batching or the worker count."""
    return zlib.crc32(f"{base_seed}:{row_id}".encode("utf-8"))


def row_seeds(base_seed: int, row_ids: Sequence[str]) -> list[int]:
    return [row_seed(base_seed, str(i)) for i in row_ids]


def tokenize_prompts(tokenizer, prompts_messages: Sequence[Sequence[dict]], max_prompt_length: int | None = None
                     ) -> list[list[int]]:
    """Chat-templated prompt ids of each prompt, cut as training cuts them (recipe.data.prompt_ids)."""
    return [prompt_ids(tokenizer, messages, max_prompt_length)[0] for messages in prompts_messages]


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

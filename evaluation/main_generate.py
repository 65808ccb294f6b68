"""Hydra entry point of FlyThinker generation: a parquet split -> a predictions JSONL that
`python -m evaluation.report` (launch/eval.sh) scores.

    python -m evaluation.main_generate [overrides]          # or: bash launch/generate.sh [overrides]

One JSON object per row: id, user_id, task, prompt (the user-turn text), prediction, reference,
n_tokens (generated tokens, EOS included), seconds (the row's batch wall time / rows in the batch).
Resumable: rerunning with the same output.path skips the ids already written (a torn last line from a
crash is repaired), and per-row seeds make every row's sample independent of batching and worker count,
so an interrupted-and-resumed file equals an uninterrupted one: exactly in fp32; in bf16 on GPUs kernels
picked by batch shape can flip a near-tie, so resume with the same batch size, workers and decoding.slots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from flythinker_worker.config import check
from flythinker_worker.rollout_worker import RolloutConfig, RolloutDecodingConfig, RolloutModelConfig
from flythinker_worker.model import check_checkpoint
from flythinker_worker.utils import check_model_source

from recipe.config import SamplingConfig, build_from_tree
from recipe.rollout import decode, eos_token_ids, generate_ids, pad_token_id, row_seeds, tokenize_prompts

from .predictions import PredictionWriter

logger = logging.getLogger(__name__)


@dataclass
class GenerateDataConfig:
    files: list[str] = field(default_factory=list)  # parquet files with `id` and `prompt` (data_prep output)
    max_prompt_length: int = 1600  # longer prompts keep their last tokens, as in training
    max_rows: int | None = None  # only the first N rows (smoke runs); null: all

    def __post_init__(self):
        check(bool(self.files), "data.files", "is required (parquet files with `id` and `prompt` columns)")
        check(self.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
        check(self.max_rows is None or self.max_rows >= 1, "data.max_rows", "must be >= 1 or null")


@dataclass
class OutputConfig:
    path: str = ""  # predictions JSONL; <path>.meta.json records the settings it was made with
    overwrite: bool = False  # true: start over instead of resuming

    def __post_init__(self):
        check(bool(self.path), "output.path", "is required")


@dataclass
class GenerationConfig(SamplingConfig):
    seed: int = 1  # base seed; a row's seed is crc32("<seed>:<id>")
    batch_size: int = 8  # rows per worker-group call (split over the workers)
    max_batches: int | None = None  # stop after N batches this run (resume later); null: all

    def __post_init__(self):
        super().__post_init__()
        check(self.batch_size >= 1, "generation.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_batches is None or self.max_batches >= 1, "generation.max_batches", "must be >= 1 or null")


@dataclass
class GenerateTrainerConfig:
    device: str = "cpu"  # cpu | cuda
    nnodes: int = 1
    n_gpus_per_node: int = 2  # rollout workers per node (on CPU: processes)

    def __post_init__(self):
        check(self.device in ("cpu", "cuda"), "trainer.device", f"must be cpu or cuda, got {self.device!r}")
        check(self.nnodes >= 1 and self.n_gpus_per_node >= 1, "trainer.n_gpus_per_node", "needs >= 1 worker")


@dataclass
class GenerateConfig:
    model: RolloutModelConfig = field(default_factory=RolloutModelConfig)
    data: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: GenerateTrainerConfig = field(default_factory=GenerateTrainerConfig)
    decoding: RolloutDecodingConfig = field(default_factory=RolloutDecodingConfig)

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(model=self.model, device=self.trainer.device, decoding=self.decoding)

    def settings(self) -> dict[str, Any]:
        """What decides the outputs (not batch size, worker count or device): a resumed run must match."""
        g = self.generation
        return {"model": asdict(self.model), "dtype": str(self.rollout_config().torch_dtype),
                "data_files": list(self.data.files), "max_prompt_length": self.data.max_prompt_length,
                "sampling": {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                             "top_k": g.top_k, "seed": g.seed},
                # Samplers differ between backends (torch.Generator vs counter-based noise): a file is
                # resumed only with the decoder that started it.
                "decoder": {"backend": self.decoding.backend, "engine": self.decoding.engine}}


def load_generate_config(tree: Any) -> GenerateConfig:
    """GenerateConfig from an OmegaConf tree or a dict; ValueError naming any bad key or value."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    return build_from_tree(GenerateConfig, {"model": {}, "data": {}, "output": {}, **tree})


def read_prompt_rows(files: list[str], max_rows: int | None = None) -> list[dict]:
    """Rows (id, user_id, task, prompt messages, reference) of the parquet files in order; ids unique."""
    rows, seen = [], set()
    for path in files:
        if not Path(path).exists():
            raise FileNotFoundError(f"data.files: {path} not found")
        frame = pd.read_parquet(path)
        for column in ("id", "prompt"):
            if column not in frame.columns:
                raise ValueError(f"data.files: {path} has no `{column}` column (prepare it with data_prep)")
        for record in frame.to_dict("records"):
            row_id = str(record["id"])
            if row_id in seen:
                raise ValueError(f"data.files: duplicate id {row_id!r} in {path}; ids key the resumable output")
            seen.add(row_id)
            reference = record.get("reference", record.get("response"))
            rows.append({"id": row_id, "user_id": record.get("user_id"), "task": record.get("task"),
                         "messages": [dict(m) for m in record["prompt"]],
                         "reference": None if reference is None else str(reference)})
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    return rows


def user_text(messages: list[dict]) -> str:
    """The last user turn's text (history + query), without the chat template or system prompt."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def run(tree) -> str:
    """Validate the config, generate the missing rows into output.path; returns that path."""
    from transformers import AutoTokenizer

    cfg = load_generate_config(tree)
    check_model_source(cfg.model.path, "model.path")
    if cfg.model.is_checkpoint:
        check_checkpoint(cfg.model.path, tokenizer=True)
    if cfg.model.reasoner_path:
        check_model_source(cfg.model.reasoner_path, "model.reasoner_path")
    rows = read_prompt_rows(cfg.data.files, cfg.data.max_rows)
    writer = PredictionWriter(cfg.output.path, cfg.settings(), overwrite=cfg.output.overwrite)
    try:
        todo = [row for row in rows if row["id"] not in writer.done]
        print(f"[generate] {len(rows)} rows, {len(rows) - len(todo)} already in {cfg.output.path}, "
              f"{len(todo)} to go", flush=True)
        if todo:
            _generate(cfg, rows, todo, writer, AutoTokenizer.from_pretrained(
                cfg.model.path, trust_remote_code=cfg.model.trust_remote_code))
    finally:
        writer.close()
    return cfg.output.path


def _generate(cfg: GenerateConfig, rows: list[dict], todo: list[dict], writer: PredictionWriter, tokenizer):
    from recipe.rollout import make_rollout_group
    from recipe.workers import init_ray, release_worker_group

    g = cfg.generation
    pad_id, eos_ids = pad_token_id(tokenizer), eos_token_ids(tokenizer, cfg.model.path)
    init_ray(cfg.trainer.device)
    group, pool = make_rollout_group(cfg.rollout_config(), cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes)
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate", dynamic_ncols=True)
    try:
        # engine auto resolves per worker (vLLM where it imports): a resumed file must keep its sampler.
        writer.pin("engine_used", sorted({summary["engine"] for summary in group.summaries}))
        for number, begin in enumerate(range(0, len(todo), g.batch_size)):
            if g.max_batches is not None and number >= g.max_batches:
                print(f"[generate] stopped after generation.max_batches={g.max_batches}; rerun to resume", flush=True)
                break
            batch = todo[begin:begin + g.batch_size]
            batch_start = time.perf_counter()
            prompt_ids = tokenize_prompts(tokenizer, [r["messages"] for r in batch], cfg.data.max_prompt_length)
            generated, _ = generate_ids(group, prompt_ids, row_seeds(g.seed, [r["id"] for r in batch]), g,
                                        pad_id, eos_ids)
            seconds = (time.perf_counter() - batch_start) / len(batch)
            writer.write([{"id": r["id"], "user_id": r["user_id"], "task": r["task"],
                           "prompt": user_text(r["messages"]), "prediction": decode(tokenizer, ids),
                           "reference": r["reference"], "n_tokens": len(ids), "seconds": seconds}
                          for r, ids in zip(batch, generated)])
            tokens += sum(len(ids) for ids in generated)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
    finally:
        bar.close()
        release_worker_group(group, pool)
    print(f"[generate] {len(writer.done)} rows in {cfg.output.path} ({tokens} new tokens, "
          f"{time.perf_counter() - start:.1f} s this run)", flush=True)


@hydra.main(config_path="../configs", config_name="flythinker_generate", version_base=None)
def main(tree: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(tree)


if __name__ == "__main__":
    main()

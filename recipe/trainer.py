"""The Ray driver loop: data, one FlyThinker worker group, steps with a progress bar, logging,
validation, atomic checkpoints, exact resume, and the final export. The driver never touches ranks."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from tqdm import tqdm
from transformers import AutoTokenizer
from verl import DataProto
from verl.utils.tracking import Tracking

from flythinker_worker.fsdp_worker import FlyThinkerTrainWorker
from flythinker_worker.utils import atomic_directory

from . import checkpointing
from .config import FlyThinkerConfig
from .data import SFTDataset, conversation, train_batch_indices
from .rollout import (eos_token_ids, generate_texts, make_rollout_group, rollout_config_from_training, row_seeds,
                      sync_weights)
from .workers import first_metrics, make_worker_group, release_worker_group

logger = logging.getLogger(__name__)


# on_step(step, total_steps, metrics, checkpoint_dir): called after every step (after its validation and
# checkpoint); checkpoint_dir is the checkpoint written at this step, or None. The sweep driver reports to
# Ray Tune through it (recipe/sweep.py).
StepHook = Callable[[int, int, dict, str | None], None]


class FlyThinkerTrainer:
    def __init__(self, cfg: FlyThinkerConfig, on_step: StepHook | None = None):
        self.cfg = cfg
        self.on_step = on_step
        self.out_dir = Path(cfg.trainer.default_local_dir)
        self.ckpt_root = checkpointing.checkpoint_root(cfg.trainer.default_local_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # ---- set-up -----------------------------------------------------------------------------------------

    def _load_data(self):
        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.generator.path,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        d = cfg.data
        self.train_data = SFTDataset(d.train_files, self.tokenizer, d.max_prompt_length, d.max_response_length,
                                     desc="tokenising train")
        self.val_data = None
        if d.val_files:
            self.val_data = SFTDataset(d.val_files, self.tokenizer, d.max_prompt_length,
                                       d.max_response_length, desc="tokenising val")
        self.steps_per_epoch = len(self.train_data) // d.train_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train_batch_size={d.train_batch_size} exceeds the {len(self.train_data)} "
                             "training rows")
        self.total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * self.steps_per_epoch

    def _resume_point(self) -> Path | None:
        mode = self.cfg.trainer.resume_mode
        if mode == "disable":
            return None
        if mode == "resume_path":
            path = Path(self.cfg.trainer.resume_from_path)
            if not (path / checkpointing.COMPLETE).exists():
                raise ValueError(f"trainer.resume_from_path={path} is not a complete checkpoint")
            return path
        return checkpointing.latest(self.ckpt_root)

    # ---- loop -------------------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train to trainer.total_training_steps (or epochs); returns the exported model directory. The
        caller holds the output folder's RunLock (recipe.main_flythinker.run does)."""
        cfg = self.cfg
        self.resume = self._resume_point()
        if self.resume is not None:  # before any work: a changed config must not cost a worker start-up
            for key, (old, new) in checkpointing.check_resume(self.resume, asdict(cfg)).items():
                print(f"[flythinker] resuming with {key}: {old!r} -> {new!r}", flush=True)
        self._load_data()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # With validation-time generation, each bundle also hosts one rollout worker (half a GPU each).
        self.generating = cfg.val_generation.num_samples > 0 and self.val_data is not None
        self.workers, self.pool = make_worker_group(FlyThinkerTrainWorker, cfg.trainer.device,
                                                    cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes,
                                                    colocate=2 if self.generating else 1,
                                                    config=cfg.worker_config(self.total_steps))
        self.rollout = None
        try:
            return self._train()
        finally:
            if self.rollout is not None:
                release_worker_group(self.rollout, None)
            release_worker_group(self.workers, self.pool)

    def _train(self) -> Path:
        cfg = self.cfg
        counts = self.workers.init_model()[0]
        self.num_params = counts["generator_params"] + counts["reasoner_params"]
        step = 0
        resume = self.resume
        if resume is not None:
            step = self.workers.load_checkpoint(str(resume))[0]
            assert step == checkpointing.read_driver_state(resume)["step"]
            print(f"[flythinker] resumed from {resume} at step {step}", flush=True)
        # Records past the restart point come from a crashed (or an earlier, fresh-started) run.
        for path in (self.metrics_path, self.out_dir / "val_generations.jsonl"):
            checkpointing.truncate_jsonl(path, step)
        tracking = Tracking(cfg.trainer.project_name, cfg.trainer.experiment_name, list(cfg.trainer.logger),
                            config=asdict(cfg))
        print(f"[flythinker] {len(self.train_data)} train rows, {self.steps_per_epoch} steps/epoch, "
              f"{self.total_steps} steps, world {cfg.trainer.world_size} x {cfg.trainer.device}, "
              f"generator {counts['generator_params']:,} + reasoner {counts['reasoner_params']:,} params",
              flush=True)
        bar = tqdm(total=self.total_steps, initial=step, desc="train", dynamic_ncols=True)
        while step < self.total_steps:
            indices = train_batch_indices(step, len(self.train_data), cfg.data.train_batch_size,
                                          cfg.trainer.seed, cfg.data.shuffle)
            batch = DataProto.from_dict(self.train_data.collate(indices))
            metrics = first_metrics(self.workers.train_batch(batch))
            step += 1
            metrics.update(step=step, epoch=(step - 1) // self.steps_per_epoch)
            last = step == self.total_steps
            if self._due(cfg.trainer.test_freq, step, last):
                metrics.update(self.validate(step))
                metrics.update(self.validate_generation(step))
            self._log(tracking, metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            checkpoint = self.save(step) if self._due(cfg.trainer.save_freq, step, last) else None
            if self.on_step is not None:
                self.on_step(step, self.total_steps, metrics, None if checkpoint is None else str(checkpoint))
        bar.close()
        final = self.out_dir / "final"
        with atomic_directory(final) as partial:  # renamed only once complete: final/ is never torn
            self.workers.export_model(str(partial))
        print(f"[flythinker] done: model -> {final}, metrics -> {self.metrics_path}, "
              f"checkpoints -> {self.ckpt_root}", flush=True)
        return final

    @staticmethod
    def _due(freq: int, step: int, last: bool) -> bool:
        return last or (freq > 0 and step % freq == 0)

    def _log(self, tracking, metrics: dict, step: int) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        tracking.log({k if k.startswith("val") else f"train/{k}": v for k, v in clean.items() if k != "step"},
                     step=step)

    def validate(self, step: int) -> dict:
        """Validation loss over the whole val set (token mean)."""
        if self.val_data is None:
            return {}
        start = time.perf_counter()
        world, size = self.cfg.trainer.world_size, self.cfg.data.val_batch_size
        per = world * self.cfg.data.micro_batch_size_per_gpu
        loss_sum = tokens = 0.0
        for begin in range(0, len(self.val_data), size):
            indices = list(range(begin, min(begin + size, len(self.val_data))))
            indices += [None] * (-len(indices) % per)  # filler rows carry no loss
            out = first_metrics(self.workers.validate_batch(DataProto.from_dict(self.val_data.collate(indices))))
            loss_sum += out["val_loss_sum"]
            tokens += out["val_tokens"]
        return {"val_loss": loss_sum / max(tokens, 1), "val_seconds": time.perf_counter() - start}

    def validate_generation(self, step: int) -> dict:
        """Generate for the first val_generation.num_samples validation prompts with the current weights
        (synced in memory to a colocated rollout group), score them, and keep the texts."""
        if not self.generating:
            return {}
        cfg, vg = self.cfg, self.cfg.val_generation
        start = time.perf_counter()
        if self.rollout is None:
            self.rollout, _ = make_rollout_group(rollout_config_from_training(cfg), cfg.trainer.n_gpus_per_node,
                                                 cfg.trainer.nnodes, resource_pool=self.pool)
        sync_weights(self.workers, self.rollout, dtype=cfg.fsdp.param_dtype, bucket_mb=vg.sync_bucket_mb)
        self.workers.release_cached_memory()  # the rollout generates on the same GPUs
        rows = self.val_data.rows[:vg.num_samples]
        conversations = [conversation(row) for row in rows]
        references = [row.get("reference") or messages[-1]["content"]
                      for row, messages in zip(rows, conversations)]
        ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
        texts = generate_texts(self.rollout, self.tokenizer, [m[:-1] for m in conversations], vg,
                               row_seeds(cfg.trainer.seed, ids), max_prompt_length=cfg.data.max_prompt_length,
                               eos_ids=eos_token_ids(self.tokenizer, cfg.model.generator.path))
        with open(self.out_dir / "val_generations.jsonl", "a") as f:
            for row_id, text, reference in zip(ids, texts, references):
                record = {"step": step, "id": row_id, "prediction": text, "reference": reference}
                f.write(json.dumps(record) + "\n")
        # Scoring is evaluation's job; imported only when validation-time generation is on, so training
        # itself never loads the metric packages (rouge-score, sacrebleu, nltk).
        from evaluation.metrics import compute_metrics, nltk_data_present

        scores = compute_metrics(texts, references, self.tokenizer, position=False, meteor=nltk_data_present())
        out = {f"val_gen/{k}": scores[k] for k in ("rouge1", "rougeL", "bleu", "meteor")
               if isinstance(scores.get(k), (int, float))}
        out["val_gen/seconds"] = time.perf_counter() - start
        return out

    def save(self, step: int) -> Path:
        state = {"step": step, "total_steps": self.total_steps, "seed": self.cfg.trainer.seed,
                 "time": time.time()}
        # fp32 weights + AdamW's two moments (sharded or not, the bytes add up to this), 10% headroom.
        needed = int(self.num_params * 12 * 1.1)
        return checkpointing.write(self.ckpt_root, step, lambda tmp: self.workers.save_checkpoint(str(tmp)),
                                   state, self.cfg.trainer.max_ckpt_to_keep, config=asdict(self.cfg),
                                   needed_bytes=needed)

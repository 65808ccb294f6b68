"""The recipe's typed config: the worker sections (flythinker_worker.config) plus data, trainer and
validation-time generation. Built strictly from the Hydra/OmegaConf tree at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flythinker_worker.config import (ExportConfig, FSDPConfig, FusionConfig, ModelConfig, OptimConfig,
                                      WorkerConfig, build, check)
from flythinker_worker.utils import check_model_source

LOGGERS = ("console", "tensorboard", "wandb", "mlflow", "swanlab", "file")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 1600
    max_response_length: int = 1000
    train_batch_size: int = 64
    micro_batch_size_per_gpu: int = 1
    val_batch_size: int = 16
    shuffle: bool = True
    # Micro-batches to a token budget (verl's names): each rank's rows are packed, without padding, into
    # micro-batches of at most max_token_len_per_gpu tokens (micro_batch_size_per_gpu is then unused).
    use_dynamic_bsz: bool = True
    max_token_len_per_gpu: int = 8192

    def __post_init__(self):
        check(bool(self.train_files), "data.train_files", "is required (parquet files with `messages`)")
        for key in ("max_prompt_length", "max_response_length", "train_batch_size",
                    "micro_batch_size_per_gpu", "val_batch_size", "max_token_len_per_gpu"):
            check(getattr(self, key) > 0, f"data.{key}", f"must be > 0, got {getattr(self, key)}")
        longest = self.max_prompt_length + self.max_response_length
        check(not self.use_dynamic_bsz or self.max_token_len_per_gpu >= longest, "data.max_token_len_per_gpu",
              f"{self.max_token_len_per_gpu} is below the longest row, max_prompt_length + max_response_length "
              f"= {longest}")


@dataclass
class TrainerConfig:
    total_epochs: int = 5
    total_training_steps: int | None = None  # None: total_epochs over the training set
    nnodes: int = 1
    n_gpus_per_node: int = 8  # on CPU: worker processes per node
    device: str = "cuda"  # cuda | cpu
    default_local_dir: str = "checkpoints/flythinker"
    save_freq: int = -1  # steps; <= 0: only at the end
    test_freq: int = -1  # steps; <= 0: only at the end
    resume_mode: str = "auto"  # auto | disable | resume_path
    resume_from_path: str | None = None
    max_ckpt_to_keep: int | None = 2
    logger: list[str] = field(default_factory=lambda: ["console"])
    project_name: str = "flythinker"
    experiment_name: str = "default"
    seed: int = 1

    def __post_init__(self):
        check(self.device in ("cuda", "cpu"), "trainer.device", f"must be cuda or cpu, got {self.device!r}")
        check(self.resume_mode in ("auto", "disable", "resume_path"), "trainer.resume_mode",
              f"must be auto, disable or resume_path, got {self.resume_mode!r}")
        check(self.resume_mode != "resume_path" or bool(self.resume_from_path), "trainer.resume_from_path",
              "is required with resume_mode=resume_path")
        check(self.nnodes >= 1 and self.n_gpus_per_node >= 1, "trainer.n_gpus_per_node", "needs >= 1 worker")
        check(self.total_epochs >= 1, "trainer.total_epochs", "must be >= 1")
        check(self.total_training_steps is None or self.total_training_steps >= 1,
              "trainer.total_training_steps", "must be >= 1 or null")
        check(self.max_ckpt_to_keep is None or self.max_ckpt_to_keep >= 1, "trainer.max_ckpt_to_keep",
              "must be >= 1 or null")
        for name in self.logger:
            check(name in LOGGERS, "trainer.logger", f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node


@dataclass
class SamplingConfig:
    """Decoding settings (the `generation` section); temperature 0 is greedy. The dataclass defaults are
    the paper's (temperature 0.8, top-p 0.95, up to 1536 new tokens)."""

    max_new_tokens: int = 1536
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0: off

    section = "generation"  # config path prefix in error messages (a class attribute, not a key)

    def __post_init__(self):
        s = self.section
        check(self.max_new_tokens >= 1, f"{s}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"{s}.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"{s}.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"{s}.top_k", f"must be >= 0, got {self.top_k}")


@dataclass
class ValGenerationConfig(SamplingConfig):
    """Every trainer.test_freq steps: generate for a few validation prompts and log their metrics."""

    num_samples: int = 0  # 0: off
    sync_bucket_mb: int = 512  # weights stream to the rollout workers in pieces of at most this many MiB
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    section = "val_generation"

    def __post_init__(self):
        super().__post_init__()
        check(self.num_samples >= 0, "val_generation.num_samples", f"must be >= 0, got {self.num_samples}")
        check(self.sync_bucket_mb >= 1, "val_generation.sync_bucket_mb", f"must be >= 1, got {self.sync_bucket_mb}")


@dataclass
class FlyThinkerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    val_generation: ValGenerationConfig = field(default_factory=ValGenerationConfig)

    def __post_init__(self):
        per_step = self.trainer.world_size * self.data.micro_batch_size_per_gpu
        check(self.data.train_batch_size % per_step == 0, "data.train_batch_size",
              f"{self.data.train_batch_size} must be a multiple of world size x micro_batch_size_per_gpu "
              f"= {self.trainer.world_size} x {self.data.micro_batch_size_per_gpu}")
        check(self.fusion.lam == 0 or bool(self.model.reasoner.path), "model.reasoner.path",
              "is required when fusion.lam != 0")

    def worker_config(self, total_training_steps: int) -> WorkerConfig:
        return WorkerConfig(model=self.model, fusion=self.fusion, optim=self.optim, fsdp=self.fsdp,
                            micro_batch_size_per_gpu=self.data.micro_batch_size_per_gpu,
                            total_training_steps=total_training_steps, device=self.trainer.device,
                            seed=self.trainer.seed, export=self.export, use_dynamic_bsz=self.data.use_dynamic_bsz,
                            max_token_len_per_gpu=self.data.max_token_len_per_gpu)


def check_sources(cfg: FlyThinkerConfig) -> None:
    """The files a run reads exist (model folders, or hub ids when hub access is allowed; data files),
    each failure naming its key; called at start-up, before Ray starts."""
    check_model_source(cfg.model.generator.path, "model.generator.path")
    if cfg.fusion.lam != 0:
        check_model_source(cfg.model.reasoner.path, "model.reasoner.path")
    for key in ("train_files", "val_files"):
        for path in getattr(cfg.data, key):
            if not Path(path).is_file():
                raise FileNotFoundError(f"data.{key}: {path} not found (prepare data with data_prep; relative "
                                        f"paths start at {Path.cwd()})")


def build_from_tree(cls, tree: Any):
    """Dataclass `cls` from a Hydra/OmegaConf tree or a plain dict (its `hydra` and `sweep` sections
    ignored), strictly."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    # `hydra` is Hydra's own; `sweep` is recipe.sweep's (a Hydra multirun over a sweep config trains each
    # point with plain `run`, so its sweep section is ignored there).
    return build(cls, {k: v for k, v in tree.items() if k not in ("hydra", "sweep")})


def load_config(tree: Any) -> FlyThinkerConfig:
    """FlyThinkerConfig from an OmegaConf tree or a plain dict; ValueError naming any bad key/value."""
    return build_from_tree(FlyThinkerConfig, tree)

"""Hydra entry point of FlyThinker training.

    python -m recipe.main_flythinker [overrides]          # or: bash launch/train.sh [overrides]
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from .config import load_config

RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VERL_LOGGING_LEVEL": "WARNING"}}


def init_ray(device: str) -> None:
    """Join the cluster `ray job submit` (RAY_ADDRESS) points at, or start a private local one."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"runtime_env": RUNTIME_ENV}
    if not os.environ.get("RAY_ADDRESS") and device == "cpu":
        # A private instance (never someone's `ray start` cluster); logical CPUs so that training and
        # rollout groups (one CPU per worker each) fit on a 2-core laptop.
        kwargs.update(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 8))
    ray.init(**kwargs)


def run(tree) -> str:
    """Validate the config, start or join Ray, train; returns the exported model folder."""
    cfg = load_config(tree)
    init_ray(cfg.trainer.device)
    from .trainer import FlyThinkerTrainer

    return str(FlyThinkerTrainer(cfg).fit())


@hydra.main(config_path="../configs", config_name="flythinker_trainer", version_base=None)
def main(tree: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(tree)


if __name__ == "__main__":
    main()

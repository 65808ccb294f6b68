"""Hydra entry point of FlyThinker training.

    python -m recipe.main_flythinker [overrides]          # or: bash launch/train.sh [overrides]
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from .config import load_config
from .workers import init_ray


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

"""Hydra entry point of FlyThinker training.

    python -m recipe.main_flythinker [overrides]          # or: bash launch/train.sh [overrides]
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from . import checkpointing
from .config import check_sources, load_config
from .run_lock import RunLock
from .workers import init_ray


def run(tree, on_step=None) -> str:
    """Validate the config and its paths, lock the output folder, start or join Ray, train; returns the
    exported model folder. Everything that can be checked fails here, before Ray starts. `on_step` is
    FlyThinkerTrainer's per-step hook (recipe.trainer.StepHook), e.g. the sweep's Ray Tune reporting."""
    cfg = load_config(tree)
    check_sources(cfg)
    with RunLock(cfg.trainer.default_local_dir):
        removed = checkpointing.remove_stale_temps(checkpointing.checkpoint_root(cfg.trainer.default_local_dir))
        if removed:
            logging.getLogger(__name__).warning("removed %d temp checkpoint dirs of a dead run", len(removed))
        init_ray(cfg.trainer.device)
        from .trainer import FlyThinkerTrainer

        return str(FlyThinkerTrainer(cfg, on_step=on_step).fit())


@hydra.main(config_path="../configs", config_name="flythinker_trainer", version_base=None)
def main(tree: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(tree)


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny random-init pairs in fp32 on CPU."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# d_R < d_G (the tiny default, zero-pad fusion) and d_R == d_G.
REASONER_WIDTHS = {
    "dR<dG": {},
    "dR=dG": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
}


def make_pair(width: str = "dR<dG", seed: int = 0, **reasoner):
    """Tiny (generator, reasoner, tokenizer); `reasoner` holds Qwen2Config overrides for the reasoner."""
    from flythinker_worker.tiny import tiny_pair

    overrides = {**REASONER_WIDTHS[width], **reasoner}
    # A wider init than HF's 0.02 makes random logits peaked, so greedy argmax has no near-ties.
    generator, reasoner, tokenizer = tiny_pair(seed, generator_overrides=dict(initializer_range=0.1),
                                               reasoner_overrides=dict(initializer_range=0.1, **overrides))
    return generator, reasoner, tokenizer


@pytest.fixture
def pair():
    return make_pair()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny model pair + synthetic product-review parquet, made once per session, as launch/train.sh does."""
    import subprocess
    import sys

    from flythinker_worker.tiny import write_tiny_pair

    root = tmp_path_factory.mktemp("assets")
    write_tiny_pair(root / "tiny_models")
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(root / "raw")], check=True,
                   cwd=REPO, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_prep.longlamp", "--task", "product_review", "--source",
                    str(root / "raw" / "product_review"), "--out", str(root / "product_review")],
                   check=True, cwd=REPO, capture_output=True)
    return root


def single_rank_env(monkeypatch, port: int | None = None) -> int:
    """env:// variables of a world of one (torchrun's, for init_distributed) on `port`, by default a free
    local one; returns the port."""
    from flythinker_worker.ports import free_ports

    port = free_ports()[0] if port is None else port
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    return port


def tiny_overrides(assets, out_dir, *extra):
    """Hydra overrides pointing the embedded default at session assets and a private output dir."""
    return [f"model.generator.path={assets}/tiny_models/generator",
            f"model.reasoner.path={assets}/tiny_models/reasoner",
            f"data.train_files=[{assets}/product_review/train.parquet]",
            f"data.val_files=[{assets}/product_review/val.parquet]",
            f"trainer.default_local_dir={out_dir}", *extra]


def compose(overrides):
    """The training config as Hydra composes it for `python -m recipe.main_flythinker <overrides>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        return hydra_compose(config_name="flythinker_trainer", overrides=list(overrides))


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance for in-process worker groups (never joins another cluster)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()

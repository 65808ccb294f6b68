"""Start-up validation: every shipped config composes and validates; a wrong key or value names itself."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, compose, tiny_overrides

from flythinker_worker.config import OptimConfig, build
from recipe.config import load_config

BASE = ["data.train_files=[x.parquet]"]


@pytest.mark.parametrize("pair", ["tiny", "qwen2.5-3b-3b", "qwen2.5-3b-1.5b", "qwen2.5-3b-0.5b", "qwen2.5-7b-1.5b"])
@pytest.mark.parametrize("task", ["synthetic", "product_review", "abstract_generation", "topic_writing"])
@pytest.mark.parametrize("method", ["flythinker", "sft"])
def test_every_group_combination_validates(pair, task, method):
    cfg = load_config(compose([f"model_pair={pair}", f"task={task}", f"method={method}"]))
    assert (cfg.fusion.lam == 0) == (method == "sft")
    if pair.startswith("qwen"):  # the paper's optimiser settings
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio, cfg.data.train_batch_size,
                cfg.trainer.total_epochs, cfg.fsdp.param_dtype) == (5e-6, 0.025, 0.01, 64, 5, "bf16")


@pytest.mark.parametrize("override, message", [
    ("+data.bogus=1", "unknown config key 'data.bogus'"),
    ("+optimizer.lr=1", "unknown config key 'optimizer'"),
    ("fusion.positions=everywhere", "fusion.positions='everywhere' is not one of"),
    ("fusion.projection=mlp", "fusion.projection='mlp'"),
    ("trainer.device=tpu", "trainer.device"),
    ("data.train_batch_size=7", "data.train_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.resume_mode=sometimes", "trainer.resume_mode"),
    ("trainer.logger=[console,nope]", "unknown logger 'nope'"),
    ("data.micro_batch_size_per_gpu=two", "data.micro_batch_size_per_gpu: expected an integer"),
    ("model.reasoner.path=''", "model.reasoner.path"),
    ("fusion.lam=-1", "fusion.lam: must be >= 0"),
    ("fusion.lam=inf", "fusion.lam: expected a finite number"),
    ("val_generation.temperature=-1", "val_generation.temperature: must be >= 0"),
    ("val_generation.top_p=0", "val_generation.top_p: must be in (0, 1]"),
    ("optim.eps=-1e-8", "optim.eps: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas: needs two values in [0, 1)"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1]"),
    ("model.attn_implementation=fast", "model.attn_implementation: must be one of"),
])
def test_bad_key_or_value_names_it(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(compose([override]))


def test_build_rejects_wrong_types_and_keys():
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        build(OptimConfig, {"learning_rate": 1.0}, "optim")
    with pytest.raises(ValueError, match="optim.lr: expected a number, got 'fast'"):
        build(OptimConfig, {"lr": "fast"}, "optim")
    assert build(OptimConfig, {"lr": 3}, "optim").lr == 3.0


def test_cli_fails_at_start_up_naming_the_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    for override, needle in (("+fusion.lamda=1", "fusion.lamda"), ("fusion.lam=high", "fusion.lam"),
                             ("model.generator.path=data/tiny_model/generatr", "model.generator.path")):
        proc = subprocess.run([sys.executable, "-m", "recipe.main_flythinker", override,
                               f"trainer.default_local_dir={tmp_path}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert needle in proc.stderr + proc.stdout
        assert "Started a local Ray instance" not in proc.stderr  # failed before any work


def test_sources_are_checked_naming_the_key(tmp_path, monkeypatch, tiny_assets):
    from recipe.config import check_sources

    good = tiny_overrides(tiny_assets, tmp_path)
    check_sources(load_config(compose(good)))  # the real assets pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [("model.generator.path=no/such/folder", "model.generator.path=no/such/folder: no such local folder"),
             ("model.reasoner.path=Qwen/Qwen2.5-0.5B", "Hub downloads are off"),
             (f"model.generator.path={tiny_assets}", "has no config.json"),
             ("data.val_files=[missing.parquet]", "data.val_files: missing.parquet not found")]
    for override, message in cases:
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            check_sources(load_config(compose(good + [override])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # opted in: a hub id is left to transformers
    check_sources(load_config(compose(good + ["model.reasoner.path=Qwen/Qwen2.5-0.5B"])))


@pytest.mark.parametrize("system", ["non_pers", "rag", "sft", "flythinker"])
def test_paper_systems_are_generation_configs(system):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from evaluation.main_generate import load_generate_config

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        cfg = load_generate_config(hydra_compose(config_name="flythinker_generate", overrides=[f"+system={system}"]))
    baseline = system in ("non_pers", "rag")
    assert cfg.model.generator_only == baseline  # the untrained generator alone: lam 0, no reasoner
    assert ("nohistory" in cfg.data.files[0]) == (system == "non_pers")
    assert system in cfg.output.path or not baseline

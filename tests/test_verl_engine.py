"""FlyThinker inside verl's own SFT trainer (`launch/verl_sft.sh`: torchrun, 2 gloo ranks, the `flythinker`
engine) against our trainer's worker on the same batches; resume from verl's checkpoint; the export; config
errors at start-up."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, tiny_overrides

STEPS, BATCH, MICRO, LR = 3, 8, 2, 2e-3
BIN = str(Path(sys.executable).parent)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"}


def verl_overrides(assets, *extra):
    return [f"model.path={assets}/tiny_models/generator", f"engine.reasoner_path={assets}/tiny_models/reasoner",
            f"data.train_files={assets}/product_review/train.parquet", f"data.train_batch_size={BATCH}",
            f"data.micro_batch_size_per_gpu={MICRO}", "model.enable_gradient_checkpointing=false",
            f"optim.lr={LR}", "optim.weight_decay=0.01", "optim.lr_warmup_steps_ratio=0.0", "engine.seed=1",
            *extra]


def run_verl_sft(assets, out_dir: Path, *extra) -> dict[int, dict]:
    """`bash launch/verl_sft.sh` (verl's sft_trainer, 2 ranks); returns the logged metrics by step."""
    log = out_dir.with_suffix(".jsonl")
    cmd = ["bash", "launch/verl_sft.sh", *verl_overrides(assets, f"trainer.total_training_steps={STEPS}",
                                                        f"trainer.default_local_dir={out_dir}",
                                                        "trainer.logger=[console,file]", *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, "VERL_FILE_LOGGER_PATH": str(log)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["step"]: r["data"] for r in records if "train/loss" in r["data"]}


def verl_batches(assets):
    """The global batches verl's sft_trainer feeds its 2 ranks (its dataset, its DistributedSampler order),
    as padded (input_ids, attention_mask, labels) batches for our worker: rank 0's rows first."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from torch.utils.data import DistributedSampler
    from transformers import AutoTokenizer
    from verl.trainer.sft_trainer import create_sft_dataset

    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra_compose("sft_trainer_engine", overrides=["data.max_length=3072", "data.truncation=right"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "tiny_models/generator")
    data = create_sft_dataset(str(assets / "product_review/train.parquet"), cfg.data, tokenizer, None)
    per_rank = BATCH // 2
    orders = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, drop_last=True)) for r in (0, 1)]
    for step in range(STEPS):
        rows = [data[i] for order in orders for i in order[step * per_rank:(step + 1) * per_rank]]
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
                 "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
                 "labels": torch.full((len(rows), width), -100, dtype=torch.long)}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = row["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.where(row["loss_mask"].bool(), row["input_ids"], -100)
        yield batch


def our_worker_steps(assets, tmp_path):
    """Our trainer's worker group (Ray, 2 gloo ranks) on verl's batches: per-step metrics, final weights."""
    from verl import DataProto

    from flythinker_worker.fsdp_worker import FlyThinkerTrainWorker
    from recipe.config import load_config
    from recipe.workers import first_metrics, make_worker_group, release_worker_group

    cfg = load_config(compose(tiny_overrides(
        assets, tmp_path / "ours", f"data.train_batch_size={BATCH}", f"data.micro_batch_size_per_gpu={MICRO}",
        f"optim.lr={LR}", "optim.warmup_ratio=0.0", "optim.weight_decay=0.01", "trainer.seed=1")))
    group, pool = make_worker_group(FlyThinkerTrainWorker, "cpu", 2, config=cfg.worker_config(STEPS))
    try:
        group.init_model()
        metrics = [first_metrics(group.train_batch(DataProto.from_dict(batch))) for batch in verl_batches(assets)]
        weights = group.get_full_weights()[0]
    finally:
        release_worker_group(group, pool)
    return metrics, weights


def engine_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights in verl's checkpoint of the engine (sharded DCP), gathered in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "shards", target)
    return torch.load(target, weights_only=True)["model"]


@pytest.mark.slow
def test_verl_sft_trainer_equals_our_trainer_resumes_and_exports(tiny_assets, tmp_path, ray_local):
    from flythinker_worker import FlyThinker

    whole = run_verl_sft(tiny_assets, tmp_path / "whole", "trainer.save_freq=2")
    assert sorted(whole) == list(range(1, STEPS + 1))

    # Resume from verl's step-2 checkpoint in a fresh directory: the next step is the same step.
    resumed = run_verl_sft(tiny_assets, tmp_path / "resumed", "trainer.resume_mode=resume_path",
                           f"trainer.resume_from_path={tmp_path / 'whole' / 'global_step_2'}")
    assert sorted(resumed) == [3]
    print(f"[verl-engine] resumed step 3: loss {resumed[3]['train/loss']:.8f} vs {whole[3]['train/loss']:.8f}")
    assert resumed[3]["train/loss"] == pytest.approx(whole[3]["train/loss"], rel=1e-6)
    assert resumed[3]["train/grad_norm"] == pytest.approx(whole[3]["train/grad_norm"], rel=1e-6)

    # Our trainer's worker on the same batches, seed and optimizer: the same losses and gradient norms.
    ours, our_weights = our_worker_steps(tiny_assets, tmp_path)
    for step, metrics in enumerate(ours, start=1):
        verl_loss, verl_norm = whole[step]["train/loss"], whole[step]["train/grad_norm"]
        print(f"[verl-engine] step {step}: loss verl {verl_loss:.8f} ours {metrics['loss']:.8f} "
              f"(rel {abs(metrics['loss'] - verl_loss) / verl_loss:.1e}), grad norm verl {verl_norm:.8f} ours "
              f"{metrics['grad_norm']:.8f} (rel {abs(metrics['grad_norm'] - verl_norm) / verl_norm:.1e})")
        assert metrics["loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-5), step
        assert metrics["grad_norm"] == pytest.approx(whole[step]["train/grad_norm"], rel=1e-4), step
    assert whole[1]["train/loss"] > whole[STEPS]["train/loss"]  # it learns

    # The export at the last step loads with FlyThinker.from_pretrained and holds the engine's weights.
    export = tmp_path / "whole" / f"global_step_{STEPS}" / "flythinker"
    model = FlyThinker.from_pretrained(export, dtype=torch.float32)
    assert json.loads((export / "flythinker.json").read_text())["lam"] == 0.5
    exported = model.state_dict()
    saved = engine_weights(tmp_path / "whole" / f"global_step_{STEPS}")
    assert set(exported) == set(saved) == set(our_weights)
    for name, value in exported.items():
        assert torch.equal(value, saved[name]), name
        torch.testing.assert_close(value, our_weights[name], atol=1e-4, rtol=0, msg=name)
    assert not (tmp_path / "whole" / "global_step_2" / "flythinker").exists()  # only at the end by default


def compose_verl(*overrides):
    """verl's sft_trainer config as its @hydra.main composes it with our config folder on the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose("sft_trainer_engine", overrides=[
            f"hydra.searchpath=[file://{REPO}/configs/verl]", "engine=flythinker", *overrides])


@pytest.mark.parametrize("override, key", [
    ("engine.positions=everywhere", "engine.positions"), ("engine.projection=mlp", "engine.projection"),
    ("engine.lam=nan", "engine.lam"), ("engine.reasoner_path=", "engine.reasoner_path"),
    ("engine.dtype=int8", "engine.dtype"), ("+engine.lamda=0.3", "lamda")])
def test_bad_fusion_value_fails_when_verl_builds_the_engine_config(override, key):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose_verl("engine.reasoner_path=/some/reasoner", override)
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        omega_conf_to_dataclass(cfg.engine)


def test_unknown_fusion_key_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lamda"):
        compose_verl("engine.lamda=0.3")


def test_engine_config_round_trip():
    from verl.utils.config import omega_conf_to_dataclass

    from flythinker_worker.verl_engine import FlyThinkerEngineConfig

    engine = omega_conf_to_dataclass(compose_verl("engine.reasoner_path=/r", "engine.lam=0.25",
                                                  "engine.positions=output_only").engine)
    assert isinstance(engine, FlyThinkerEngineConfig)
    assert (engine.strategy, engine.lam, engine.positions, engine.reasoner_path) == ("flythinker", 0.25,
                                                                                     "output_only", "/r")


@pytest.mark.slow
def test_verl_ray_sft_trainer_runs_on_cpu(tiny_assets, tmp_path):
    """verl's Ray SFT trainer (TrainingWorker + the same engine) on 2 CPU workers of a private Ray."""
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "verl.trainer.sft_trainer_ray", "--config-dir", f"{REPO}/configs/verl",
           "engine=flythinker", "data.messages_key=messages", "data.max_length=3072", "data.truncation=right",
           "data.num_workers=0", "trainer.device=cpu", "trainer.n_gpus_per_node=2", "trainer.logger=[console]",
           "trainer.total_training_steps=1", f"trainer.default_local_dir={out}", *verl_overrides(tiny_assets)]
    env = {**ENV, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "train/loss:" in proc.stdout
    assert (out / "global_step_1" / "flythinker" / "flythinker.json").exists()

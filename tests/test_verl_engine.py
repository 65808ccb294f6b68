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


# ---- the engine on 2 gloo ranks without Ray: packing, token budget, gradient sync, scale, lr schedule ----------

def _padded_rows(lengths, vocab, seed=0):
    """A right-padded batch of random rows; the first half of each row is prompt (no loss)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    batch = {"input_ids": torch.zeros(len(lengths), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(lengths), width, dtype=torch.long),
             "labels": torch.full((len(lengths), width), -100, dtype=torch.long)}
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=generator)
        batch["input_ids"][i, :n], batch["attention_mask"][i, :n] = ids, 1
        batch["labels"][i, n // 2:n] = ids[n // 2:]
    return batch


def _engine_variants(rank, world, root, out):
    """One engine; the same global batch through every micro-batching path; grads gathered on rank 0."""
    from functools import partial

    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import sft_loss

    import flythinker_worker.model as model_module
    import flythinker_worker.sharding as sharding
    from flythinker_worker.config import FSDPConfig, FusionConfig, ModelConfig, OptimConfig, PathConfig, WorkerConfig
    from flythinker_worker.fsdp_worker import engine_batch, engine_configs
    from flythinker_worker.verl_engine import FlyThinkerEngine

    calls = {"table_copy": 0, "scale": 0, "sync": []}
    original_scale, original_norm = model_module.embedding_scale, sharding.mean_embedding_norm
    model_module.embedding_scale = lambda g: (calls.__setitem__("table_copy", calls["table_copy"] + 1),
                                              original_scale(g))[1]
    sharding.mean_embedding_norm = lambda *a, **k: (calls.__setitem__("scale", calls["scale"] + 1),
                                                    original_norm(*a, **k))[1]
    cfg = WorkerConfig(model=ModelConfig(generator=PathConfig(f"{root}/generator"),
                                         reasoner=PathConfig(f"{root}/reasoner")),
                       fusion=FusionConfig(lam=0.5), optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
                       fsdp=FSDPConfig(param_dtype="fp32"), micro_batch_size_per_gpu=1, total_training_steps=4,
                       device="cpu")
    engine = FlyThinkerEngine(*engine_configs(cfg), device="cpu")
    engine.initialize()
    real_sync = engine.module.set_requires_gradient_sync
    engine.module.set_requires_gradient_sync = lambda flag, **k: (calls["sync"].append(flag), real_sync(flag, **k))
    lengths = [23, 7, 15, 30, 11, 19, 5, 26]  # rank 0: the first 4 rows, rank 1: the last 4
    full = _padded_rows(lengths, 200)
    mine = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}
    variants = {"padded_mb2": (2, None, False), "packed_mb1": (1, None, True), "packed_mb4": (4, None, True),
                "budget_40": (1, 40, True), "packed_mb1_sync_every": (1, None, True)}
    results = {}
    for name, (micro, budget, packed) in variants.items():
        object.__setattr__(engine.engine_config, "use_no_sync_for_gradient_accumulation",
                           name != "packed_mb1_sync_every")  # verl configs are frozen
        batch = engine_batch(mine, micro, budget)
        tu.assign_non_tensor(batch, use_remove_padding=packed)
        calls.update(table_copy=0, scale=0, sync=[])
        with engine.train_mode(zero_grad_on_exit=True):
            output = engine.forward_backward_batch(batch, partial(sft_loss, config=None))
            grads = {n: p.grad.full_tensor() for n, p in engine.module.named_parameters()}
        loss = torch.tensor([sum(output["loss"])], dtype=torch.float64)
        dist.all_reduce(loss)
        results[name] = {"loss": float(loss) / world, "grads": grads, "calls": dict(calls),
                         "micro_batches": len(output["loss"])}
    if rank == 0:
        torch.save({k: v["grads"] for k, v in results.items()}, f"{out}/grads.pt")
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "grads"} for k, v in results.items()}
        Path(f"{out}/summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def engine_variants(tmp_path_factory):
    from test_sharding import spawn

    from flythinker_worker.tiny import write_tiny_pair

    root, out = tmp_path_factory.mktemp("pair"), tmp_path_factory.mktemp("variants")
    write_tiny_pair(root)
    spawn(_engine_variants, 2, str(root), str(out))
    return (json.loads((out / "summary.json").read_text()), torch.load(out / "grads.pt", weights_only=True),
            root)


def test_packed_and_token_budget_equal_padded(engine_variants):
    """fp32 CPU: packed rows (position ids restarting per row, the latent shift stopping at row ends) give
    the padded path's loss and gradients, for any micro-batching (rows or a token budget)."""
    summary, grads, _ = engine_variants
    reference = summary["padded_mb2"]["loss"]
    assert summary["budget_40"]["micro_batches"] > summary["packed_mb4"]["micro_batches"] == 1
    for name in ("packed_mb1", "packed_mb4", "budget_40", "packed_mb1_sync_every"):
        assert summary[name]["loss"] == pytest.approx(reference, rel=1e-5), name
        for key, value in grads["padded_mb2"].items():
            torch.testing.assert_close(grads[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_padded_engine_equals_one_process_forward(engine_variants):
    """The engine's loss on 2 ranks = FlyThinker's own padded forward of the whole batch in one process."""
    from flythinker_worker.loading import load_flythinker

    summary, _, root = engine_variants
    model, _ = load_flythinker(f"{root}/generator", f"{root}/reasoner", 0.5, "global", "pad")
    batch = _padded_rows([23, 7, 15, 30, 11, 19, 5, 26], 200)
    loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    assert summary["packed_mb1"]["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_gradient_sync_on_last_micro_batch_and_scale_once_per_step(engine_variants):
    summary, _, _ = engine_variants
    # 4 rows per rank in micro-batches of 1: no reduce-scatter on the first 3, then one.
    assert summary["packed_mb1"]["calls"]["sync"] == [False, True] * 3
    assert summary["packed_mb1_sync_every"]["calls"]["sync"] == []
    for name, record in summary.items():
        assert record["calls"]["scale"] == 1, name  # once per step, from the local shard
        assert record["calls"]["table_copy"] == 0, name  # never the fp32 copy of the whole table


def test_linear_lr_schedule_matches_hf_formula():
    """optim.lr_scheduler=linear: lr * t / w in warmup, then lr * (T - t) / (T - w), down to 0."""
    from verl.workers.config import FSDPOptimizerConfig

    from flythinker_worker.verl_engine import build_lr_scheduler

    lr, total, ratio = 1e-3, 20, 0.1
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    config = FSDPOptimizerConfig(lr=lr, lr_warmup_steps_ratio=ratio, total_training_steps=total)
    scheduler = build_lr_scheduler(optimizer, config, "linear")
    warmup = int(ratio * total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr * t / warmup if t < warmup else lr * (total - t) / (total - warmup) for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == 0.0
    json.dumps(scheduler.state_dict())  # per-rank state is JSON (no pickles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_in_pieces_equal_log_softmax(dtype):
    """The engine's per-token log-probs over several pieces (and a ragged last one) equal log_softmax
    gathered at the labels, values and gradients."""
    from flythinker_worker.verl_logprobs import token_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(23, 50, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (23,), generator=gen)
    got = token_logprobs(logits, labels, chunk=5)
    (got.float() * torch.arange(23)).sum().backward()
    grad, logits.grad = logits.grad, None
    want = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    (want * torch.arange(23)).sum().backward()
    tol = 1e-5 if dtype is torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.float(), logits.grad.float(), atol=tol, rtol=tol)

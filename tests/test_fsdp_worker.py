"""The FSDP2 worker on two gloo ranks against a plain single-process training step."""

import pytest
import torch
from conftest import compose, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl import DataProto

from flythinker_worker import FlyThinker
from flythinker_worker.fsdp_worker import FlyThinkerTrainWorker
from recipe.config import load_config
from recipe.data import SFTDataset
from recipe.workers import first_metrics, make_worker_group, release_worker_group

pytestmark = pytest.mark.slow
LR, CLIP = 1e-2, 1.0


def reference_step(assets, batch, lam):
    """One AdamW step of FlyThinker (or the bare generator when lam=0) in one process, whole batch at once."""
    generator = AutoModelForCausalLM.from_pretrained(assets / "tiny_models/generator", dtype=torch.float32)
    if lam == 0:
        model = generator  # plain HF SFT: its own mean-over-tokens loss
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    else:
        reasoner = AutoModelForCausalLM.from_pretrained(assets / "tiny_models/reasoner", dtype=torch.float32)
        model = FlyThinker(generator, reasoner, lam=lam)
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0).step()
    prefix = "generator." if lam == 0 else ""
    return (float(loss), float(grad_norm), {prefix + k: v for k, v in model.state_dict().items()},
            {prefix + k: v for k, v in start.items()})


@pytest.mark.parametrize("lam, checkpointing", [(0.5, False), (0.0, False), (0.5, True)])
def test_two_gloo_workers_equal_one_process(ray_local, tiny_assets, tmp_path, lam, checkpointing):
    cfg = load_config(compose(tiny_overrides(
        tiny_assets, tmp_path, f"fusion.lam={lam}", f"model.enable_gradient_checkpointing={checkpointing}",
        "data.train_batch_size=4", "data.micro_batch_size_per_gpu=1",
        f"optim.lr={LR}", "optim.warmup_ratio=0.0", "optim.weight_decay=0.0", f"optim.clip_grad={CLIP}")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tiny_models/generator")
    data = SFTDataset(cfg.data.train_files, tokenizer, 512, 192)
    # Rows of unequal response length: per-rank or per-micro-batch means would not match.
    batch = data.collate([0, 5, 9, 13])
    assert len(set((batch["labels"] != -100).sum(1).tolist())) > 1

    group, pool = make_worker_group(FlyThinkerTrainWorker, "cpu", 2, config=cfg.worker_config(10))
    try:
        group.init_model()
        metrics = first_metrics(group.train_batch(DataProto.from_dict(dict(batch))))
        weights = group.get_full_weights()[0]
    finally:
        release_worker_group(group, pool)

    loss, grad_norm, expected, start = reference_step(tiny_assets, batch, lam)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert metrics["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert set(weights) == set(expected) and (lam == 0) == (not any(k.startswith("reasoner.") for k in weights))
    moved = 0.0
    for name, value in expected.items():
        # Adam turns gradients near its eps into O(lr) updates either way, so a handful of entries with
        # ~1e-9 gradients differ by up to ~1e-5; wrong gradients would be off by O(lr) = 1e-2.
        torch.testing.assert_close(weights[name], value, atol=1e-4, rtol=0, msg=name)
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 5e-3  # the step really moved the weights by ~lr

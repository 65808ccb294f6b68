"""The driver end to end in-process on the tiny default: loss falls, validation, checkpoints, export."""

import json

import pytest
import torch
from conftest import compose, tiny_overrides
from transformers import AutoModelForCausalLM

from flythinker_worker import FlyThinker, PairedDecoder
from recipe import checkpointing
from recipe.main_flythinker import run

pytestmark = pytest.mark.slow


def test_train_on_synthetic_data(ray_local, tiny_assets, tmp_path):
    final = run(compose(tiny_overrides(tiny_assets, tmp_path, "trainer.total_training_steps=16",
                                       "trainer.save_freq=8", "trainer.test_freq=8")))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    for key in ("loss", "grad_norm", "lr", "tokens", "step_seconds", "tokens_per_second"):
        assert all(key in r for r in records), key
    losses = [r["loss"] for r in records]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses  # random init: ~7.6 -> < 6.5
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16]

    root = checkpointing.checkpoint_root(str(tmp_path))
    assert checkpointing.latest(root) == root / "global_step_16"
    assert (root / "global_step_8" / checkpointing.COMPLETE).exists()

    model = FlyThinker.from_pretrained(final)
    assert (model.lam, model.positions.value, model.reasoner is not None) == (0.5, "global", True)
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny_models/generator")
    trained = AutoModelForCausalLM.from_pretrained(f"{final}/generator")  # plain transformers
    delta = (trained.model.embed_tokens.weight - initial.model.embed_tokens.weight).abs().max()
    assert delta > 1e-3
    torch.testing.assert_close(trained.lm_head.weight, model.generator.lm_head.weight)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a review."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=False)
    out = PairedDecoder(model).generate(prompt, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)
    assert out.sequences.shape[1] > prompt.shape[1]

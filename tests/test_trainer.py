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
    # Validation-time generation (tiny default: 4 prompts) on a rollout group synced from training.
    for r in records:
        assert ("val_gen/rouge1" in r) == (r["step"] in (8, 16))
    generations = [json.loads(line) for line in (tmp_path / "val_generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [8] * 4 + [16] * 4
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    late = [g for g in generations if g["step"] == 16]
    expected = 100 * sum(scorer.score(g["reference"], g["prediction"])["rouge1"].fmeasure for g in late) / 4
    assert records[-1]["val_gen/rouge1"] == pytest.approx(expected, rel=1e-6)

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


def test_resume_refuses_a_changed_lr_and_applies_bookkeeping(ray_local, tiny_assets, tmp_path, capsys):
    base = tiny_overrides(tiny_assets, tmp_path, "trainer.save_freq=2", "val_generation.num_samples=0")
    run(compose(base + ["trainer.total_training_steps=2"]))
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.002 -> 0\.0001") as err:
        run(compose(base + ["trainer.total_training_steps=4", "optim.lr=1e-4"]))
    assert "global_step_2" in str(err.value) and "total_training_steps" not in str(err.value)
    capsys.readouterr()
    run(compose(base + ["trainer.total_training_steps=4"]))  # bookkeeping only: resumes at step 2
    out = capsys.readouterr().out
    assert "resuming with trainer.total_training_steps: 2 -> 4" in out and "resumed from" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["lr"] for r in records} == {0.002}

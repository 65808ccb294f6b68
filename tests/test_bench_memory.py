"""bench.memory's analytic model (every model_pair config) and the CPU helpers the GPU check shares."""

from pathlib import Path

import pytest
import torch


def test_analytic_table_covers_every_pair_config():
    from bench.memory import config_table

    rows = {r["config"]: r for r in config_table(80.0)}
    # Every shipped pair, also tiny and demo before their model folders exist (a fresh clone).
    shipped = {p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "model_pair").glob("*.yaml")}
    assert shipped == set(rows)
    big = rows["qwen2.5-7b-1.5b"]
    # 7.6B + 1.5B params: fp32 master + grads + Adam = 16 bytes/param over 8 GPUs.
    assert big["params"] + big["grads"] + big["adam"] == pytest.approx(16 * 9.16e9 / 8 / 2**30, rel=0.02)
    assert all(r["total"] > 0 for r in rows.values())


def test_param_counts_match_transformers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.memory import param_counts

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    assert param_counts(shape)["total"] == sum(p.numel() for p in model.parameters())


def test_packed_and_padded_batches_hold_the_same_rows():
    from bench.gpu_train_check import pack, packed_batch, padded_batch

    lengths = [5, 9, 3]
    packed, padded = packed_batch(lengths, 100), padded_batch(lengths, 100)
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][padded["attention_mask"].bool()])
    assert packed["position_ids"][0].tolist() == [*range(5), *range(9), *range(3)]
    assert pack([5, 9, 3, 7], 12) == [[5], [9, 3], [7]]

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

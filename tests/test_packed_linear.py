"""packed_linear: packed oneDNN projections equal nn.Linear, the static step with them equals the step
without them, and a weight changed in place is never decoded with stale packed copies."""

import pytest
import torch
from conftest import make_pair
from test_decoding import VOCAB_LO, left_padded

from flythinker_worker import FlyThinker
from flythinker_worker.fast_decoding import FastPairedDecoder
from flythinker_worker.packed_linear import PackedLinear, PackedLM, packing_available

needs_packing = pytest.mark.skipif(not packing_available(torch.float32), reason="no oneDNN packed linears here")


@needs_packing
def test_fused_packed_linear_equals_the_separate_linears():
    torch.manual_seed(0)
    with_bias, without_bias = torch.nn.Linear(16, 24), torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(5, 1, 16)
    fused = PackedLinear(with_bias, without_bias)
    assert fused.splits == [24, 8]
    expected = torch.cat([with_bias(x), without_bias(x)], dim=-1)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert PackedLinear(without_bias).bias is None


@needs_packing
def test_packed_step_equals_the_hf_module_step():
    """Same greedy tokens and logits (fp32 rounding) with and without packed weights, over left padding."""
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0).eval()
    torch.manual_seed(3)
    ids, mask = left_padded([torch.randint(VOCAB_LO, len(tok), (n,)) for n in (3, 9, 6)], tok.pad_token_id)
    packed = FastPairedDecoder(model)
    plain = FastPairedDecoder(model, pack_weights=False)
    assert packed.pack_weights and not plain.pack_weights
    a = packed.generate(ids, mask, max_new_tokens=10, output_logits=True)
    b = plain.generate(ids, mask, max_new_tokens=10, output_logits=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


@needs_packing
def test_weights_changed_in_place_are_repacked():
    """A weight sync writes through state_dict tensors in place (the rollout worker's path): the next call
    must decode the new weights, i.e. equal a decoder built after the change."""
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0).eval()
    ids = torch.randint(VOCAB_LO, len(tok), (2, 6))
    decoder = FastPairedDecoder(model)
    before = decoder.generate(ids, max_new_tokens=8, output_logits=True)
    packed = decoder._packed["generator"]
    assert not packed.stale()
    state = model.state_dict()
    torch.manual_seed(9)
    for name in ("generator.model.layers.0.mlp.down_proj.weight", "reasoner.model.layers.1.self_attn.q_proj.bias"):
        state[name].copy_(torch.randn_like(state[name]))
    assert packed.stale()
    after = decoder.generate(ids, max_new_tokens=8, output_logits=True)
    fresh = FastPairedDecoder(model).generate(ids, max_new_tokens=8, output_logits=True)
    assert not torch.allclose(before.logits, after.logits)
    assert torch.equal(after.sequences, fresh.sequences)
    torch.testing.assert_close(after.logits, fresh.logits, rtol=0, atol=0)


def test_packing_is_refused_where_it_cannot_run():
    generator, reasoner, _ = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    with pytest.raises(ValueError, match="pack_weights"):
        FastPairedDecoder(model, compile=True, pack_weights=True)
    assert not FastPairedDecoder(model, compile=True).pack_weights
    assert not packing_available(torch.bfloat16)


@needs_packing
def test_packed_lm_covers_every_projection():
    generator, _, _ = make_pair()
    packed = PackedLM(generator, head=True)
    n_layers = generator.config.num_hidden_layers
    assert len(packed.layers) == n_layers
    layer = generator.model.layers[0]
    hidden = generator.config.hidden_size
    x = torch.randn(3, 1, hidden)
    attn = layer.self_attn
    torch.testing.assert_close(packed.layers[0].qkv(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1),
                               rtol=1e-5, atol=1e-5)
    residual = torch.randn(3, hidden)
    torch.testing.assert_close(packed.layers[0].mlp_residual(x[:, 0], residual), residual + layer.mlp(x[:, 0]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.layers[0].o.plus(x[:, 0], residual), residual + attn.o_proj(x[:, 0]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.lm_head(x), generator.lm_head(x), rtol=1e-5, atol=1e-5)

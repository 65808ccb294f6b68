"""FlyThinker forward: the DESIGN section 1 formula, causality, batch invariance, lam=0, fusion numerics,
global token-mean loss, checkpoints."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pair
from transformers import AutoModelForCausalLM

from flythinker_worker import FlyThinker

VOCAB_LO = 3  # ids below are special tokens


def reference_logits(generator, reasoner, ids, lam, gate, detach_norm=True):
    """DESIGN's formula for ONE unpadded sequence, written as an explicit loop over positions.
    ids (T,), gate (T,) bool = m_t. Returns (T, V) logits."""
    table = generator.get_input_embeddings().weight
    s = table.detach().norm(dim=1).mean()
    h = reasoner.model(ids[None]).last_hidden_state[0]  # (T, d_R)
    d_g = table.shape[1]
    rows = [table[ids[0]]]
    for t in range(1, len(ids)):
        norm = h[t - 1].norm()
        r = s * h[t - 1] / (norm.detach() if detach_norm else norm)
        fitted = torch.cat([r, r.new_zeros(d_g - r.shape[0])])
        rows.append(table[ids[t]] + lam * float(gate[t]) * fitted)
    return generator(inputs_embeds=torch.stack(rows)[None]).logits[0]


def gate_for(positions, n_prompt, length):
    response = torch.arange(length) >= n_prompt
    return {"global": torch.ones(length, dtype=torch.bool), "input_only": ~response,
            "output_only": response}[positions]


@pytest.mark.parametrize("width", ["dR<dG", "dR=dG"])
@pytest.mark.parametrize("positions", ["global", "input_only", "output_only"])
def test_forward_equals_formula(width, positions):
    # One lam suffices: the reference applies lam as a plain factor per position (lam != 1 catches a
    # missing or squared factor; test_gradients_follow_the_formula_with_detached_norms runs lam 1.5).
    lam = 0.5
    generator, reasoner, tok = make_pair(width)
    model = FlyThinker(generator, reasoner, lam=lam, positions=positions)
    torch.manual_seed(1)
    ids = torch.randint(VOCAB_LO, len(tok), (12,))
    n_prompt = 7
    labels = ids.clone()
    labels[:n_prompt] = -100
    with torch.no_grad():
        got = model(ids[None], labels=labels[None]).logits[0]
        want = reference_logits(generator, reasoner, ids, lam, gate_for(positions, n_prompt, 12))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_follow_the_formula_with_detached_norms(pair):
    """Scale s and ||h_t|| are constants for autograd: the reasoner's gradient matches the reference
    with detached norms and differs from one that differentiates through them."""
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=1.5)
    torch.manual_seed(11)
    ids = torch.randint(VOCAB_LO, len(tok), (10,))
    target = torch.randn(10, len(tok))

    def reasoner_grads(logits):
        reasoner.zero_grad()
        generator.zero_grad()
        (logits * target).sum().backward()
        return torch.cat([p.grad.flatten() for p in reasoner.parameters()])

    got = reasoner_grads(model(ids[None]).logits[0])
    everywhere = torch.ones(10, dtype=torch.bool)
    want = reasoner_grads(reference_logits(generator, reasoner, ids, 1.5, everywhere))
    through_norm = reasoner_grads(reference_logits(generator, reasoner, ids, 1.5, everywhere, detach_norm=False))
    assert (got - want).norm() / want.norm() < 1e-5
    assert (got - through_norm).norm() / want.norm() > 1e-3  # 100x the tolerance above


def test_causality(pair):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=2.0)
    torch.manual_seed(2)
    ids = torch.randint(VOCAB_LO, len(tok), (1, 16))
    changed = ids.clone()
    changed[0, 9:] = torch.randint(VOCAB_LO, len(tok), (7,))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the future does change the future


@pytest.mark.parametrize("positions", ["global", "output_only"])
def test_batch_invariance_left_padding(pair, positions):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=1.0, positions=positions)
    torch.manual_seed(3)
    lengths = [6, 11, 9]
    seqs = [torch.randint(VOCAB_LO, len(tok), (n,)) for n in lengths]
    n_prompt = 4
    width = max(lengths)
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = seq
        mask[i, width - len(seq):] = 1
        labels[i, width - len(seq) + n_prompt:] = seq[n_prompt:]
    with torch.no_grad():
        batched = model(ids, mask, labels=labels).logits
        for i, seq in enumerate(seqs):
            alone_labels = seq.clone()
            alone_labels[:n_prompt] = -100
            alone = model(seq[None], labels=alone_labels[None]).logits[0]
            torch.testing.assert_close(batched[i, width - len(seq):], alone, atol=1e-5, rtol=1e-5)


def test_packed_rows_never_cross_a_boundary(pair):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=1.0)
    torch.manual_seed(4)
    a, b = torch.randint(VOCAB_LO, len(tok), (7,)), torch.randint(VOCAB_LO, len(tok), (5,))
    packed_ids = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(packed_ids, position_ids=position_ids).logits[0]
        torch.testing.assert_close(packed[:7], model(a[None]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[7:], model(b[None]).logits[0], atol=1e-5, rtol=1e-5)


def _forbid_calls(module):
    def boom(*args, **kwargs):
        raise AssertionError("reasoner must not run when lam == 0")

    module.forward = boom
    module.model.forward = boom


def test_lam_zero_is_the_bare_generator(pair):
    generator, reasoner, tok = pair
    torch.manual_seed(5)
    ids = torch.randint(VOCAB_LO, len(tok), (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        bare = generator(ids, labels=labels)
    _forbid_calls(reasoner)
    for model in (FlyThinker(generator, reasoner, lam=0.0), FlyThinker(generator, None)):
        with torch.no_grad():
            out = model(ids, labels=labels)
        torch.testing.assert_close(out.logits, bare.logits, atol=0, rtol=0)
        torch.testing.assert_close(out.loss, bare.loss, atol=1e-6, rtol=1e-6)


def test_reasoner_gets_gradients_only_when_lam_positive(pair):
    generator, reasoner, tok = pair
    ids = torch.randint(VOCAB_LO, len(tok), (2, 10))
    for lam, expect_grad in ((0.5, True), (0.0, False)):
        model = FlyThinker(copy.deepcopy(generator), copy.deepcopy(reasoner), lam=lam)
        model(ids, labels=ids).loss.backward()
        grads = [p.grad for p in model.reasoner.parameters()]
        has_grad = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert has_grad == expect_grad, f"lam={lam}"
        if expect_grad:  # every reasoner layer feeds the final state
            layer0 = model.reasoner.model.layers[0].self_attn.q_proj.weight.grad
            assert layer0 is not None and layer0.abs().sum() > 0


def test_added_vector_has_norm_lam_times_s(pair):
    generator, reasoner, tok = pair
    lam = 0.7
    model = FlyThinker(generator, reasoner, lam=lam)
    ids = torch.randint(VOCAB_LO, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the first real token (index 3) gets nothing
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        fused = model.fused_embeddings(ids, mask, positions)
        added = fused - generator.get_input_embeddings()(ids)
    s = generator.get_input_embeddings().weight.detach().norm(dim=1).mean()
    norms = added.norm(dim=-1)
    expected = torch.full_like(norms, lam * float(s))
    expected[:, 0] = 0
    expected[1, :4] = 0
    torch.testing.assert_close(norms, expected, atol=1e-5, rtol=1e-5)
    d_r = reasoner.config.hidden_size
    assert added[..., d_r:].abs().max() == 0  # zero pad: only the first d_R dims move


@pytest.mark.parametrize("reasoner_width", [32, 64, 96])
def test_linear_projection_any_sizes(reasoner_width):
    generator, reasoner, tok = make_pair(hidden_size=reasoner_width, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1)
    model = FlyThinker(generator, reasoner, lam=1.0, projection="linear")
    assert model.projection.weight.shape == (64, reasoner_width)
    ids = torch.randint(VOCAB_LO, len(tok), (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    if reasoner_width <= 64:  # the init is the pad map, so lam means the same as with `pad`
        padded = FlyThinker(generator, reasoner, lam=1.0, projection="pad")
        torch.testing.assert_close(out.logits, padded(ids).logits, atol=1e-6, rtol=1e-6)


def test_config_errors_name_the_problem():
    generator, reasoner, tok = make_pair(hidden_size=96, intermediate_size=64, num_attention_heads=2,
                                         num_key_value_heads=1)
    with pytest.raises(ValueError, match="projection='pad'.*96"):
        FlyThinker(generator, reasoner, projection="pad")
    generator, reasoner, tok = make_pair(vocab_size=len(tok) + 8)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        FlyThinker(generator, reasoner)
    # The same tokenizer with differently padded tables (Qwen2.5-7B vs 1.5B) is fine once stated.
    FlyThinker(generator, reasoner, vocab_size=len(tok))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        FlyThinker(generator, reasoner, vocab_size=len(tok) + 9)
    with pytest.raises(ValueError, match="positions='everywhere'"):
        FlyThinker(generator, None, positions="everywhere")
    with pytest.raises(ValueError, match="projection='mlp'"):
        FlyThinker(generator, None, projection="mlp")


def test_loss_is_response_token_mean(pair):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=0.5)
    ids = torch.randint(VOCAB_LO, len(tok), (2, 10))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, :3] = -100
    out = model(ids, labels=labels)
    logp = F.log_softmax(out.logits.float(), dim=-1)
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(10) if labels[b, t] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)
    assert int(out.num_tokens) == len(terms) == 4 + 7


def test_micro_batches_match_one_batch_under_global_token_mean(pair):
    generator, reasoner, tok = pair
    torch.manual_seed(6)
    ids = torch.randint(VOCAB_LO, len(tok), (4, 12))
    labels = ids.clone()
    for b, n_prompt in enumerate([3, 8, 5, 10]):  # unequal response lengths: a per-micro mean would differ
        labels[b, :n_prompt] = -100
    whole = FlyThinker(copy.deepcopy(generator), copy.deepcopy(reasoner), lam=0.5)
    micro = FlyThinker(copy.deepcopy(generator), copy.deepcopy(reasoner), lam=0.5)
    loss_whole = whole(ids, labels=labels).loss
    loss_whole.backward()
    total = int((labels[:, 1:] != -100).sum())
    loss_micro = sum(micro(ids[b:b + 1], labels=labels[b:b + 1], num_items_in_batch=total).loss
                     for b in range(4))
    for b in range(4):
        micro(ids[b:b + 1], labels=labels[b:b + 1], num_items_in_batch=total).loss.backward()
    torch.testing.assert_close(loss_micro, loss_whole, atol=1e-6, rtol=1e-6)
    for (name, p1), p2 in zip(whole.named_parameters(), micro.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_save_load_round_trip(tmp_path, pair, projection):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=0.3, positions="output_only", projection=projection)
    if model.projection is not None:
        with torch.no_grad():
            model.projection.weight.add_(0.01 * torch.randn_like(model.projection.weight))
    model.save_pretrained(tmp_path, tokenizer=tok)
    for name in ("generator/config.json", "generator/model.safetensors", "reasoner/model.safetensors",
                 "flythinker.json", "tokenizer.json", "generator/tokenizer.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "projection.safetensors").exists() == (projection == "linear")
    loaded = FlyThinker.from_pretrained(tmp_path)
    assert (loaded.lam, loaded.positions.value, loaded.projection_kind.value) == (0.3, "output_only", projection)
    ids = torch.randint(VOCAB_LO, len(tok), (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels=labels).logits, model(ids, labels=labels).logits,
                                   atol=0, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "generator")
        torch.testing.assert_close(plain(ids).logits, generator(ids).logits, atol=0, rtol=0)

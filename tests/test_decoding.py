"""PairedDecoder: incremental lock-step decoding reproduces the teacher-forced forward; sampling, EOS.
Every behaviour is checked on both backends: "static" (fast_decoding, the default) and "hf" (the
reference loop over HF DynamicCaches)."""

import pytest
import torch
from conftest import make_pair

from flythinker_worker import FlyThinker, PairedDecoder, sample_next

VOCAB_LO = 3
BACKENDS = ["static", "hf"]


def left_padded(seqs, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = seq
        mask[i, width - len(seq):] = 1
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", ["dR<dG", "dR=dG"])
@pytest.mark.parametrize("positions", ["global", "input_only", "output_only"])
def test_incremental_decoding_reproduces_teacher_forcing(width, positions, backend):
    generator, reasoner, tok = make_pair(width)
    model = FlyThinker(generator, reasoner, lam=0.5, positions=positions).eval()
    torch.manual_seed(7)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)) for n in (5, 9)]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    new = 10
    out = PairedDecoder(model, backend=backend).generate(ids, mask, max_new_tokens=new, output_logits=True)
    assert out.sequences.shape == (2, 9 + new) and out.logits.shape == (2, new, len(tok))
    # Teacher-force each row alone on prompt + generated, the generated part marked as response.
    for i, prompt in enumerate(prompts):
        full = torch.cat([prompt, out.sequences[i, 9:]])
        labels = full.clone()
        labels[:len(prompt)] = -100
        with torch.no_grad():
            forced = model(full[None], labels=labels[None]).logits[0, len(prompt) - 1:-1]  # (new, V)
        torch.testing.assert_close(out.logits[i], forced, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.sequences[i, 9:], forced.argmax(-1))


def test_auto_backend_is_static_and_equals_the_reference(pair):
    generator, reasoner, tok = pair
    model = FlyThinker(generator, reasoner, lam=1.0)
    assert PairedDecoder(model).resolved_backend() == "static"
    torch.manual_seed(3)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)) for n in (3, 11, 7, 1)]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    fast = PairedDecoder(model).generate(ids, mask, max_new_tokens=12, output_logits=True)
    ref = PairedDecoder(model, backend="hf").generate(ids, mask, max_new_tokens=12, output_logits=True)
    assert torch.equal(fast.sequences, ref.sequences) and torch.equal(fast.num_generated, ref.num_generated)
    torch.testing.assert_close(fast.logits, ref.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        PairedDecoder(model, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reasoner_matters_in_decoding(pair, backend):
    generator, reasoner, tok = pair
    ids = torch.randint(VOCAB_LO, len(tok), (1, 8))
    with_reasoner = PairedDecoder(FlyThinker(generator, reasoner, lam=2.0), backend=backend).generate(
        ids, max_new_tokens=6, output_logits=True)
    bare = PairedDecoder(FlyThinker(generator, None), backend=backend).generate(ids, max_new_tokens=6,
                                                                                output_logits=True)
    assert (with_reasoner.logits - bare.logits).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_of_decoding(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0), backend=backend)
    torch.manual_seed(8)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)) for n in (4, 12, 9)]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    batched = decoder.generate(ids, mask, max_new_tokens=8, output_logits=True)
    alone = decoder.generate(prompts[0][None], max_new_tokens=8, output_logits=True)
    assert torch.equal(batched.sequences[0, 12:], alone.sequences[0, 4:])
    torch.testing.assert_close(batched.logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_zero_decoding_never_runs_the_reasoner(pair, backend):
    generator, reasoner, tok = pair
    ids = torch.randint(VOCAB_LO, len(tok), (2, 6))
    expected = generator.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids),
                                  pad_token_id=tok.pad_token_id, eos_token_id=None)

    def boom(*a, **k):
        raise AssertionError("reasoner ran")

    reasoner.forward = reasoner.model.forward = boom
    out = PairedDecoder(FlyThinker(generator, reasoner, lam=0.0), backend=backend).generate(ids, max_new_tokens=5)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_only_skips_reasoner_steps(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0, positions="input_only"), backend=backend)
    calls = []
    original = reasoner.model.forward
    reasoner.model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    decoder.generate(torch.randint(VOCAB_LO, len(tok), (1, 6)), max_new_tokens=5)
    assert len(calls) == 1  # the prefill only: generated tokens get no latent under input_only


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_deterministic_for_a_seed(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0), backend=backend)
    ids = torch.randint(VOCAB_LO, len(tok), (3, 6))
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = decoder.generate(ids, seed=11, **kwargs).sequences
    b = decoder.generate(ids, seed=11, **kwargs).sequences
    c = decoder.generate(ids, seed=12, **kwargs).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_seeds_make_sampling_independent_of_the_batch(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0), backend=backend)
    torch.manual_seed(10)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)) for n in (5, 8)]
    ids, mask = left_padded(prompts, tok.pad_token_id)
    kwargs = dict(max_new_tokens=10, temperature=1.2, top_p=0.9)
    batched = decoder.generate(ids, mask, seed=[21, 22], **kwargs).sequences[:, 8:]
    for i, (prompt, seed) in enumerate(zip(prompts, [21, 22])):
        alone = decoder.generate(prompt[None], seed=[seed], **kwargs).sequences[0, len(prompt):]
        assert torch.equal(batched[i], alone)
    with pytest.raises(ValueError, match="seed has 1 entries for 2 rows"):
        decoder.generate(ids, mask, seed=[1], **kwargs)


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    rng = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next(logits, temperature=1.0, generator=rng, **kw).unique().tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the nucleus stops there
    assert support(top_p=0.81) == {0, 1, 2}
    assert support(top_p=0.3) == {0}
    assert support(top_k=3, top_p=0.6) == {0, 1}
    # Frequencies follow the renormalised nucleus (0.5, 0.3) / 0.8.
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=rng)
    assert abs(float((draws == 0).float().mean()) - 0.625) < 0.03
    assert torch.equal(sample_next(logits[:2], temperature=0.0), torch.tensor([0, 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_ends_a_row_and_pads_its_tail(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0), backend=backend)
    torch.manual_seed(9)
    ids = torch.randint(VOCAB_LO, len(tok), (3, 6))
    free = decoder.generate(ids, max_new_tokens=10).sequences[:, 6:]
    eos = int(free[0, 3])
    pad = tok.pad_token_id
    out = decoder.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad)
    new = out.sequences[:, 6:]
    for i in range(3):
        hits = (free[i] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 10
        assert int(out.num_generated[i]) == stop
        assert torch.equal(new[i, :stop], free[i, :stop])  # greedy prefix is unchanged up to EOS
        assert (new[i, stop:] == pad).all()
    assert new.shape[1] == max(int(n) for n in out.num_generated)  # stops once every row ended


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(pair, backend):
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner), backend=backend)
    ids = torch.randint(VOCAB_LO, len(tok), (1, 4))
    for kwargs, name in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                         (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")):
        with pytest.raises(ValueError, match=name):
            decoder.generate(ids, **kwargs)
    right_padded = torch.ones(1, 4, dtype=torch.long)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        decoder.generate(ids, right_padded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_many_equals_each_row_alone(pair, backend):
    """The rollout worker's entry point: prompts as id lists, one seed each, fewer slots than prompts."""
    generator, reasoner, tok = pair
    decoder = PairedDecoder(FlyThinker(generator, reasoner, lam=1.0), backend=backend)
    torch.manual_seed(4)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)).tolist() for n in (6, 2, 9, 4, 7)]
    seeds = [5, 2**33 + 1, 0, 77, 6]
    kwargs = dict(max_new_tokens=9, temperature=1.3, top_p=0.9)
    first = [decoder.generate(torch.tensor([p]), seed=[s], **kwargs).sequences[0, len(p):].tolist()
             for p, s in zip(prompts, seeds)]
    eos = [first[0][2], first[3][5]]  # two rows stop early, the others run to the limit
    expected = []
    for p, s in zip(prompts, seeds):
        out = decoder.generate(torch.tensor([p]), seed=[s], eos_token_id=eos, pad_token_id=0, **kwargs)
        expected.append(out.sequences[0, len(p):len(p) + int(out.num_generated[0])].tolist())
    got, _ = decoder.generate_many(prompts, seeds, eos_token_id=eos, pad_token_id=0, slots=2, **kwargs)
    assert got == expected
    assert len({len(r) for r in got}) > 1

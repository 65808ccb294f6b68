"""fast_decoding: the counter-based sampler (uniformity, the seed contract), continuous batching, the
step traced as one graph, other Llama-family architectures, fallback for unsupported models."""

import math
import threading

import pytest
import torch
from conftest import make_pair
from test_decoding import VOCAB_LO, left_padded

from flythinker_worker import FlyThinker, PairedDecoder
from bench.decode import ideal_ratio
from flythinker_worker.fast_decoding import FastPairedDecoder
from flythinker_worker.sampling import filter_scores, sample_tokens, uniform_noise
from flythinker_worker.static_lm import unsupported_reason


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts.double() - expected.double()) ** 2 / expected.double()).sum())


def chi_square_bound(dof: int, z: float = 4.0) -> float:
    """An upper bound of chi^2(dof) at ~z standard deviations (Wilson-Hilferty): a 1-in-30000 false alarm."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_uniform_noise_is_uniform_and_independent():
    seeds = torch.arange(64, dtype=torch.long) * 7919 + 2**32 - 5  # seeds above 2^32 count too
    counters = torch.arange(64, dtype=torch.long)
    u = torch.cat([uniform_noise(seeds, counters.roll(k), 512) for k in range(4)])  # (256, 512)
    assert float(u.min()) > 0 and float(u.max()) < 1
    bins = 64
    counts = torch.bincount((u.flatten() * bins).long(), minlength=bins)
    assert chi_square(counts, torch.full((bins,), u.numel() / bins)) < chi_square_bound(bins - 1)
    # Pairs of neighbours (vocabulary entries v, v+1; counters k, k+1; seeds S, S+1) fill the 8x8 grid evenly.
    grid = 8
    for a, b in ((u[:, :-1], u[:, 1:]),
                 (uniform_noise(seeds, counters, 512), uniform_noise(seeds, counters + 1, 512)),
                 (uniform_noise(seeds, counters, 512), uniform_noise(seeds + 1, counters, 512))):
        cell = (a * grid).long() * grid + (b * grid).long()
        counts = torch.bincount(cell.flatten(), minlength=grid * grid)
        assert chi_square(counts, torch.full((grid * grid,), cell.numel() / grid ** 2)) < chi_square_bound(63)
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.02


def test_samples_follow_the_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 20000
    logits = probs.log().expand(n, 5).contiguous()
    seeds, counters = torch.arange(n) // 100, torch.arange(n) % 100

    def draws(**kw):
        return torch.bincount(sample_tokens(logits, seeds, counters, temperature=1.0, **kw), minlength=5)

    counts = draws()
    assert chi_square(counts, probs * n) < chi_square_bound(4)
    nucleus = draws(top_p=0.7)  # 0.4 + 0.3 reaches 0.7
    assert nucleus[2:].sum() == 0
    assert chi_square(nucleus[:2], torch.tensor([4 / 7, 3 / 7]) * n) < chi_square_bound(1)
    assert draws(top_k=1)[1:].sum() == 0
    # Temperature 0.5 squares the probabilities (renormalised).
    sharp = probs ** 2 / (probs ** 2).sum()
    counts = torch.bincount(sample_tokens(logits, seeds, counters, temperature=0.5), minlength=5)
    assert chi_square(counts, sharp * n) < chi_square_bound(4)
    assert torch.equal(sample_tokens(logits[:3], seeds[:3], counters[:3]), torch.zeros(3, dtype=torch.long))


def test_filter_scores_matches_the_reference_sampler_support():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    from flythinker_worker import sample_next

    for kw in (dict(top_k=5), dict(top_p=0.6), dict(top_k=10, top_p=0.8)):
        kept = torch.isfinite(filter_scores(logits, 0.7, kw.get("top_k", 0), kw.get("top_p", 1.0)))
        rng = torch.Generator().manual_seed(1)
        support = torch.zeros_like(kept)
        for _ in range(300):
            support[torch.arange(6), sample_next(logits, 0.7, generator=rng, **kw)] = True
        assert bool((support <= kept).all())


def test_nucleus_equals_its_definition_with_ties_and_infinities():
    """filter_scores' top-p set against the definition computed pair by pair: token v is kept iff the mass
    of the tokens strictly more likely than v is below top_p (so ties at the boundary are kept together)."""
    torch.manual_seed(4)
    logits = torch.randn(5, 300) * 3
    logits[0, :10] = float("-inf")
    logits[1, 5], logits[1, 6] = -0.0, 0.0
    logits[2, ::7] = 1.5  # a tie of 43 tokens
    logits[3] = -logits[3].abs()  # all negative
    logits[4, :150] = logits[4, 150:]  # every token tied with one other
    for top_p in (0.3, 0.9, 0.999):
        kept = torch.isfinite(filter_scores(logits, 0.8, 0, top_p))
        probs = (logits.double() / 0.8).softmax(-1)
        above = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)  # (B, V)
        assert torch.equal(kept, above < top_p), top_p
    tie = logits[2:3].clone()
    tie[0, ::7] = 20.0  # the tie holds nearly all the mass: exactly the tied tokens survive
    assert torch.equal(torch.isfinite(filter_scores(tie, 1.0, 0, 0.5))[0], tie[0] == 20.0)


def test_a_rows_kth_token_depends_only_on_seed_k_and_logits():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    seeds, counters = torch.tensor([3, 9, 2**40, 5]), torch.tensor([0, 7, 1, 7])
    batch = sample_tokens(logits, seeds, counters, temperature=1.0, top_p=0.9)
    for i in range(4):
        alone = sample_tokens(logits[i:i + 1], seeds[i:i + 1], counters[i:i + 1], temperature=1.0, top_p=0.9)
        assert int(alone) == int(batch[i])
    # Reordering the batch permutes the samples.
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(sample_tokens(logits[perm], seeds[perm], counters[perm], temperature=1.0, top_p=0.9),
                       batch[perm])
    # Different seeds / counters give different streams.
    many = sample_tokens(logits[:1].expand(200, -1), torch.arange(200), torch.zeros(200, dtype=torch.long), 1.0)
    assert len(set(many.tolist())) > 50


def test_continuous_batching_refills_slots_and_matches_rows_alone():
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    fast = FastPairedDecoder(model, sync_every=3)  # the CUDA cadence: finished flags read every 3 steps
    torch.manual_seed(5)
    prompts = [torch.randint(VOCAB_LO, len(tok), (n,)).tolist() for n in (12, 3, 8, 8, 1, 15, 6)]
    seeds = list(range(100, 107))
    kwargs = dict(max_new_tokens=10, temperature=0.9, top_k=50)
    free = [fast.generate(torch.tensor([p]), seed=[s], **kwargs).sequences[0, len(p):].tolist()
            for p, s in zip(prompts, seeds)]
    eos = [free[1][1], free[4][4], free[6][6]]
    alone = []
    for p, s in zip(prompts, seeds):
        out = PairedDecoder(model).generate(torch.tensor([p]), seed=[s], eos_token_id=eos, **kwargs)
        alone.append(out.sequences[0, len(p):len(p) + int(out.num_generated[0])].tolist())
    got, stats = fast.generate_many(prompts, seeds, eos_token_id=eos, slots=3, **kwargs)
    assert got == alone
    assert stats["prefills"] > 1  # slots were refilled while others were decoding


def test_padded_batch_slots_and_seed_int():
    """An int seed gives row i the seed `seed + i`: the same as a list of those seeds."""
    generator, reasoner, tok = make_pair()
    decoder = FastPairedDecoder(FlyThinker(generator, reasoner, lam=1.0))
    ids = torch.randint(VOCAB_LO, len(tok), (3, 5))
    kwargs = dict(max_new_tokens=6, temperature=1.0)
    assert torch.equal(decoder.generate(ids, seed=40, **kwargs).sequences,
                       decoder.generate(ids, seed=[40, 41, 42], **kwargs).sequences)


def test_step_traces_as_one_graph_without_host_syncs():
    """torch.compile(fullgraph=True) of the step's parts (reasoner, generator, sampler + state update) fails
    on any graph break, e.g. a host sync (`.item()`, `bool(t)`) or data-dependent Python control flow: the
    same parts that CUDA graph capture replays. aot_eager traces without generating code (fast on CPU)."""
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    torch.manual_seed(6)
    ids, mask = left_padded([torch.randint(VOCAB_LO, len(tok), (n,)) for n in (4, 7)], tok.pad_token_id)
    kwargs = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=[1, 2], output_logits=True)
    eager = FastPairedDecoder(model).generate(ids, mask, **kwargs)
    decoder = FastPairedDecoder(model, compile=True, compile_backend="aot_eager")
    compiled = decoder.generate(ids, mask, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(eager.logits, compiled.logits, atol=1e-5, rtol=1e-5)
    # The compiled units are a decoder layer and the sampler; the eager glue between them (embedding
    # lookups, the latent fit, the LM head) must be free of host syncs too: each whole part traces as one.
    for part in (decoder._reasoner_part, decoder._generator_part):
        torch.compile(part, backend="eager", fullgraph=True, dynamic=False)(decoder._session)
    # A long-lived process meets many sessions (lengths, batch sizes, models): more than torch's default
    # of 8 compiled entries per function, past which a fullgraph compile raises.
    for n in range(2, 12):
        assert decoder.generate(ids, mask, max_new_tokens=n).sequences.shape[1] == ids.shape[1] + n


@pytest.mark.parametrize("pack_weights", [True, False])
def test_steps_undone_without_the_kv_caches_leave_no_trace(monkeypatch, pack_weights):
    """CUDA-graph warm-up and capture run real steps and then restore the session's state but not its KV
    caches (decode_session.snapshot): what the undone steps wrote at cache indices >= each row's restored
    position must be overwritten before it is read. Here every call's first step is preceded by three
    undone steps: tokens and logits equal an undisturbed decode (also in generate_many)."""
    from flythinker_worker.decode_session import restore, snapshot

    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    torch.manual_seed(8)
    ids, mask = left_padded([torch.randint(VOCAB_LO, len(tok), (n,)) for n in (6, 3)], tok.pad_token_id)
    kwargs = dict(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=[1, 2], output_logits=True)
    prompts = [[int(t) for t in row[m.bool()]] for row, m in zip(ids, mask)]
    many = dict(max_new_tokens=9, temperature=0.8, top_p=0.9, slots=1)
    plain = FastPairedDecoder(model, pack_weights=pack_weights)
    expected, expected_many = plain.generate(ids, mask, **kwargs), plain.generate_many(prompts, [1, 2], **many)[0]

    real = FastPairedDecoder._build_step

    def with_undone_steps(self, s):
        step, undone = real(self, s), []

        def first_after_undo(kv_len):
            if not undone:
                saved = snapshot(s)
                for _ in range(3):
                    step(None)
                restore(s, saved)
                undone.append(True)
            step(kv_len)
        return first_after_undo

    monkeypatch.setattr(FastPairedDecoder, "_build_step", with_undone_steps)
    decoder = FastPairedDecoder(model, pack_weights=pack_weights)
    got = decoder.generate(ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.logits, expected.logits)
    assert decoder.generate_many(prompts, [1, 2], **many)[0] == expected_many


def test_cuda_graph_sessions_are_rounded_up_for_reuse():
    """With CUDA graphs a session's shapes are rounded up (slots to a power of 2, cache length and max_new to
    multiples of 256; max_new not with output_logits, whose buffer is slots x max_new x vocab) and never
    below the current session's, so later calls replay its graph instead of alternating between shapes;
    each call's own max_new_tokens then stops the rows (Session.limit). Host logic, checked without a GPU."""
    generator, reasoner, tok = make_pair()
    decoder = FastPairedDecoder(FlyThinker(generator, reasoner, lam=1.0))
    decoder.cuda_graph = True  # only _key is exercised: no graph is built
    key = decoder._key(3, 300, 0.8, 0, 0.9, (2,), 0, 40, False)
    assert (key.slots, key.max_len, key.max_new, key.lam) == (4, 512, 256, 1.0)
    assert decoder._key(3, 300, 0.8, 0, 0.9, (2,), 0, 40, True).max_new == 40
    decoder._session = type("Held", (), {"key": key})()
    assert decoder._key(2, 100, 0.8, 0, 0.9, (2,), 0, 7, False) == key
    grown = decoder._key(5, 100, 0.8, 0, 0.9, (2,), 0, 7, False)  # more slots: grows, keeps the longer cache
    assert (grown.slots, grown.max_len, grown.max_new) == (8, 512, 256)


def helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flythinker-reasoner")]


def test_cpu_overlap_runs_the_reasoner_in_a_helper_thread_with_the_same_outputs(monkeypatch):
    """overlap on CPU (opt-in): every step's reasoner part runs in a helper thread while the generator runs
    in the caller's; tokens and logits equal the sequential step's, also under inference_mode (thread-local,
    so the helper must adopt it: an in-place write to an inference tensor outside it raises); the helper
    ends with the call (an idle one slowed later CPU work), also in generate_many and on an error, and an
    error in the reasoner reaches the caller."""
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    torch.manual_seed(7)
    ids, mask = left_padded([torch.randint(VOCAB_LO, len(tok), (n,)) for n in (5, 9, 2)], tok.pad_token_id)
    kwargs = dict(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=[4, 5, 6], output_logits=True)
    threads, real = [], FastPairedDecoder._reasoner_part

    def recorded(self, s, kv_len=None):
        threads.append(threading.get_ident())
        return real(self, s, kv_len)

    monkeypatch.setattr(FastPairedDecoder, "_reasoner_part", recorded)
    assert FastPairedDecoder(model).overlap is False  # CPU default: sequential (slower overlapped on 2 cores)
    sequential = FastPairedDecoder(model).generate(ids, mask, **kwargs)
    assert threads and set(threads) == {threading.get_ident()}
    threads.clear()
    with torch.inference_mode():
        overlapped = FastPairedDecoder(model, overlap=True).generate(ids, mask, **kwargs)
    assert len(threads) == 7 and threading.get_ident() not in threads  # 8 tokens: 1 from prefill, 7 steps
    assert helper_threads() == []
    assert torch.equal(sequential.sequences, overlapped.sequences)
    torch.testing.assert_close(sequential.logits, overlapped.logits, atol=1e-5, rtol=1e-5)
    assert FastPairedDecoder(FlyThinker(generator, None)).overlap is False  # nothing to overlap

    prompts = [[int(t) for t in row[m.bool()]] for row, m in zip(ids, mask)]
    threads.clear()
    decoder = FastPairedDecoder(model, overlap=True)
    many, _ = decoder.generate_many(prompts, [4, 5, 6], max_new_tokens=8, temperature=0.8, top_p=0.9, slots=2)
    assert threads and threading.get_ident() not in threads and helper_threads() == []
    assert many == FastPairedDecoder(model).generate_many(prompts, [4, 5, 6], max_new_tokens=8, temperature=0.8,
                                                          top_p=0.9, slots=2)[0]

    def broken(self, s, kv_len=None):
        raise RuntimeError("reasoner failed")

    monkeypatch.setattr(FastPairedDecoder, "_reasoner_part", broken)
    with pytest.raises(RuntimeError, match="reasoner failed"):
        decoder.generate(ids, mask, **kwargs)
    assert helper_threads() == []


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_other_llama_family_models_match_teacher_forcing(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(seed, hidden, heads, kv):
        torch.manual_seed(seed)
        cfg = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                                   head_dim=hidden // heads, max_position_embeddings=256, initializer_range=0.1,
                                   tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(cfg).eval()

    model = FlyThinker(build(0, 64, 4, 2), build(1, 32, 2, 1), lam=0.5).eval()
    assert unsupported_reason(model.generator) is None
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)) for n in (4, 9)]
    ids, mask = left_padded(prompts, 0)
    out = PairedDecoder(model, backend="static").generate(ids, mask, max_new_tokens=8, output_logits=True)
    for i, prompt in enumerate(prompts):
        full = torch.cat([prompt, out.sequences[i, 9:]])
        with torch.no_grad():
            forced = model(full[None]).logits[0, len(prompt) - 1:-1]
        torch.testing.assert_close(out.logits[i], forced, atol=1e-4, rtol=1e-4)


def test_unsupported_models_fall_back_to_the_reference():
    generator, reasoner, tok = make_pair()
    reasoner.config.layer_types = ["sliding_attention"] * reasoner.config.num_hidden_layers
    model = FlyThinker(generator, reasoner, lam=1.0)
    assert "sliding" in FastPairedDecoder.supports(model)
    assert PairedDecoder(model).resolved_backend() == "hf"
    with pytest.raises(ValueError, match="backend='hf'"):
        PairedDecoder(model, backend="static").generate(torch.randint(VOCAB_LO, len(tok), (1, 4)))
    # lam 0 never runs the reasoner, so the generator alone decides.
    assert PairedDecoder(FlyThinker(generator, reasoner, lam=0.0)).resolved_backend() == "static"


def test_options_are_checked():
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0)
    with pytest.raises(ValueError, match="CUDA"):
        FastPairedDecoder(model, cuda_graph=True)
    with pytest.raises(ValueError, match="attention"):
        FastPairedDecoder(model, attention="xformers")
    assert 1 < ideal_ratio(model) < 2 and ideal_ratio(FlyThinker(generator, None)) == 1.0

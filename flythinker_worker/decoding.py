"""Lock-step paired decoding for FlyThinker: one KV cache per model, the reasoner latent carried per
sequence. Plain torch + transformers.

Step t feeds the just-sampled token x_t to BOTH models, with no data dependency between them:
  reasoner:  x_t                                -> r_t      (kept for step t+1)
  generator: E_G[x_t] + lam * m_t * fit(r_{t-1}) -> logits for x_{t+1}
Two backends behind one `generate`:
  - "static" (fast_decoding.FastPairedDecoder, the default for the Llama family: qwen2/qwen3/llama/mistral):
    preallocated per-slot KV caches, one sync-free step for reasoner + generator + sampler, on-device
    counter-based per-row sampling, torch.compile + one CUDA graph per step on CUDA; `generate_many` adds
    continuous batching. Its seed contract is in sampling's docstring.
  - "hf" (this module's `prefill`/`step` loop over HF DynamicCaches): the reference the tests compare
    against, and the fallback for architectures the static step does not cover. Its sampler draws from
    torch.Generators (one per row when `seed` is a list).
Greedy outputs of the two are equal (fp32, and to the teacher-forced forward); sampled outputs differ
because the samplers differ, each deterministic per row under its own contract.
"""

from __future__ import annotations

import torch

from .decode_common import DecodeState, GenerateOutput, check_sampling, hf_prefill, reasoner_steps
from .model import FlyThinker
from .sampling import sample_next

BACKENDS = ("auto", "static", "hf")


class PairedDecoder:
    """Batched lock-step decoding of a `FlyThinker` (left-padded prompts).

    `backend`: "auto" (default: "static" when fast_decoding supports both models, else "hf"), "static",
    or "hf" (the reference). `fast_options` go to FastPairedDecoder (compile, cuda_graph, overlap,
    attention, sync_every)."""

    def __init__(self, model: FlyThinker, backend: str = "auto", **fast_options):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.model = model
        self.backend = backend
        self.fast_options = fast_options
        self._fast = None

    def resolved_backend(self) -> str:
        """The backend `generate` uses for this model ("static" or "hf")."""
        if self.backend != "auto":
            return self.backend
        from .fast_decoding import FastPairedDecoder

        return "hf" if FastPairedDecoder.supports(self.model) else "static"

    @property
    def fast(self):
        """The FastPairedDecoder (created once: it keeps its buffers and CUDA graphs between calls)."""
        if self._fast is None:
            from .fast_decoding import FastPairedDecoder

            reason = FastPairedDecoder.supports(self.model)
            if reason:
                raise ValueError(f"backend 'static' cannot run this model ({reason}); use backend='hf'")
            self._fast = FastPairedDecoder(self.model, **self.fast_options)
        return self._fast

    @property
    def reasoner_steps(self) -> bool:
        """Whether generated tokens get a latent, i.e. whether the reasoner must run after prefill."""
        return reasoner_steps(self.model)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Run R over the prompt, then G over the fused prompt. Returns logits for x_P (B, V) and state."""
        return hf_prefill(self.model, input_ids, attention_mask)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed x_t (B,) to both models; returns logits for x_{t+1} (B, V) and advances `state`."""
        model = self.model
        tokens = tokens[:, None]  # (B, 1)
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)], dim=-1)
        embeds = model.generator.get_input_embeddings()(tokens)  # (B, 1, d_G)
        if self.reasoner_steps:
            # A generated token is a response token: global and output_only both gate it in.
            embeds = embeds + model.lam * state.latent.to(embeds.dtype)
            states, out = model.reasoner_states(tokens, state.attention_mask, state.next_position,
                                                past_key_values=state.reasoner_cache, use_cache=True)
            state.reasoner_cache, state.latent = out.past_key_values, model.latents(states, state.scale)
        out = model.generator(inputs_embeds=embeds, attention_mask=state.attention_mask,
                              position_ids=state.next_position, past_key_values=state.generator_cache,
                              use_cache=True)
        state.generator_cache = out.past_key_values
        state.next_position = state.next_position + 1
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 seed: int | list[int] | None = None, output_logits: bool = False) -> GenerateOutput:
        """Decode up to `max_new_tokens` per row; temperature 0 is greedy. Rows stop at EOS and are padded
        with `pad_token_id` (default: the first EOS id) after it; decoding ends when all rows stopped.
        `seed`: a list gives each row its own sampler, so a row's sample does not depend on its
        neighbours (how the rollout worker makes sampling independent of batching). One int: backend
        "static" gives row i the seed `seed + i`, backend "hf" seeds one generator for the batch."""
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        if self.resolved_backend() == "static":
            return self.fast.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k,
                                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                                      output_logits=output_logits)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           device=input_ids.device, dtype=torch.long)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if len(eos) else 0
        rngs = None
        if isinstance(seed, (list, tuple)):
            if len(seed) != input_ids.shape[0]:
                raise ValueError(f"seed has {len(seed)} entries for {input_ids.shape[0]} rows")
            rngs = [torch.Generator(device=input_ids.device).manual_seed(int(s)) for s in seed]
        elif seed is not None:
            rngs = torch.Generator(device=input_ids.device).manual_seed(seed)

        logits, state = self.prefill(input_ids, attention_mask)
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        num_generated = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        tokens_out, logits_out = [], []
        for t in range(max_new_tokens):
            if output_logits:
                logits_out.append(logits.float())
            if isinstance(rngs, list) and temperature > 0:
                tokens = torch.cat([sample_next(logits[i:i + 1], temperature, top_k, top_p, rng)
                                    for i, rng in enumerate(rngs)])
            else:
                tokens = sample_next(logits, temperature, top_k, top_p, rngs)
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            num_generated += (~finished).long()
            finished = finished | torch.isin(tokens, eos)
            tokens_out.append(tokens)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            logits = self.step(tokens, state)
        sequences = torch.cat([input_ids, torch.stack(tokens_out, dim=1)], dim=1)
        return GenerateOutput(sequences=sequences, num_generated=num_generated,
                              logits=torch.stack(logits_out, dim=1) if output_logits else None)

    @torch.no_grad()
    def generate_many(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int = 256,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                      eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                      slots: int = 8) -> tuple[list[list[int]], dict]:
        """Generated ids (EOS included, no padding) for each prompt (a list of token ids) with its seed, in
        input order, and stats. Backend "static": continuous batching over `slots` cache slots
        (FastPairedDecoder.generate_many). Backend "hf": padded batches of `slots` prompts of similar
        length. Either way each row equals `generate` of that row alone with `seed=[its seed]`."""
        if self.resolved_backend() == "static":
            return self.fast.generate_many(prompts, seeds, max_new_tokens, temperature, top_p, top_k,
                                           eos_token_id, pad_token_id, slots=slots)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        device = self.model.generator.get_input_embeddings().weight.device
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[int] | None] = [None] * len(prompts)
        for begin in range(0, len(order), max(1, slots)):
            group = order[begin:begin + max(1, slots)]
            width = max(len(prompts[i]) for i in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(group):
                ids[j, width - len(prompts[i]):] = torch.as_tensor(prompts[i], dtype=torch.long)
                mask[j, width - len(prompts[i]):] = 1
            out = self.generate(ids.to(device), mask.to(device), max_new_tokens, temperature, top_p, top_k,
                                eos_token_id, pad_token_id, seed=[seeds[i] for i in group])
            for j, i in enumerate(group):
                results[i] = out.sequences[j, width:width + int(out.num_generated[j])].tolist()
        return results, {"batches": -(-len(prompts) // max(1, slots))}

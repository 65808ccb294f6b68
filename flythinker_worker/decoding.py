"""Lock-step paired decoding for FlyThinker: one KV cache per model, the reasoner latent carried per
sequence. Plain torch + transformers.

Step t feeds the just-sampled token x_t to BOTH models, with no data dependency between them:
  reasoner:  x_t                                -> r_t      (kept for step t+1)
  generator: E_G[x_t] + lam * m_t * fit(r_{t-1}) -> logits for x_{t+1}
`prefill` and `step` are the whole backend surface; a static-cache / CUDA-graph / two-stream backend
replaces them without touching `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import FlyThinker, Positions, embedding_scale, position_ids_from_mask


@dataclass
class DecodeState:
    """Per-batch decoding state between steps."""

    generator_cache: object  # transformers Cache
    reasoner_cache: object | None  # None when the reasoner is not needed after prefill
    attention_mask: torch.Tensor  # (B, L) long, L = tokens seen so far
    next_position: torch.Tensor  # (B, 1) long: position id of the next fed token
    latent: torch.Tensor | None  # (B, 1, d_G): fit(r_{t-1}) for the next fed token
    scale: torch.Tensor  # s, fp32 scalar, the same one training uses


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P + N): prompt as given, then generated tokens, pad after EOS
    num_generated: torch.Tensor  # (B,) tokens generated per row, EOS included
    logits: torch.Tensor | None = None  # (B, N, V) raw next-token logits, when asked


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy when temperature == 0, else temperature, then top-k,
    then top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the most likely token always has mass_before 0: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_p, top_k):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


class PairedDecoder:
    """Batched lock-step decoding of a `FlyThinker` (left-padded prompts)."""

    def __init__(self, model: FlyThinker):
        self.model = model

    @property
    def reasoner_steps(self) -> bool:
        """Whether generated tokens get a latent, i.e. whether the reasoner must run after prefill."""
        return self.model.uses_reasoner and self.model.positions is not Positions.INPUT_ONLY

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Run R over the prompt, then G over the fused prompt. Returns logits for x_P (B, V) and state."""
        model = self.model
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: every row's last position must be a real token")
        positions = position_ids_from_mask(attention_mask)
        embeds = model.generator.get_input_embeddings()(input_ids)  # (B, P, d_G)
        scale = embedding_scale(model.generator)
        reasoner_cache, latent = None, None
        if model.uses_reasoner:
            states, out = model.reasoner_states(input_ids, attention_mask, positions,
                                                use_cache=self.reasoner_steps)
            latents = model.latents(states, scale)  # (B, P, d_G)
            # Every prompt token is a prompt token: response_mask is all zero here.
            gate = model.position_gate(attention_mask, torch.zeros_like(attention_mask)) & (positions > 0)
            embeds = model.fuse(embeds, latents, gate)
            if self.reasoner_steps:
                reasoner_cache, latent = out.past_key_values, latents[:, -1:]
        out = model.generator(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1)
        state = DecodeState(generator_cache=out.past_key_values, reasoner_cache=reasoner_cache,
                            attention_mask=attention_mask.long(), next_position=positions[:, -1:] + 1,
                            latent=latent, scale=scale)
        return out.logits[:, -1], state

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
        `seed`: one int seeds the batch; a list gives each row its own sampler, so a row's sample does not
        depend on its neighbours (how the rollout worker makes sampling independent of batching)."""
        _check_sampling(max_new_tokens, temperature, top_p, top_k)
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

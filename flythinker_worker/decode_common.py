"""What both paired decoders share: the prompt prefill over HF caches (DESIGN: R over the prompt, then G over
the fused prompt), the state and output types, and the sampling-argument checks. Plain torch + transformers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import FlyThinker, Positions, embedding_scale, position_ids_from_mask
from .sampling import check_sampling

__all__ = ["DecodeState", "GenerateOutput", "check_sampling", "hf_prefill", "left_pad", "reasoner_steps"]


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


def reasoner_steps(model: FlyThinker) -> bool:
    """Whether generated tokens get a latent, i.e. whether the reasoner must run after prefill."""
    return model.uses_reasoner and model.positions is not Positions.INPUT_ONLY


@torch.no_grad()
def hf_prefill(model: FlyThinker, input_ids: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, DecodeState]:
    """Run R over the left-padded prompt, then G over the fused prompt, with HF DynamicCaches. Returns the
    logits for x_P (B, V) and the state the reference decoder steps from (the fast decoder copies its
    caches into static ones)."""
    keep_reasoner = reasoner_steps(model)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last position must be a real token")
    positions = position_ids_from_mask(attention_mask)
    embeds = model.generator.get_input_embeddings()(input_ids)  # (B, P, d_G)
    scale = embedding_scale(model.generator)
    reasoner_cache, latent = None, None
    if model.uses_reasoner:
        states, out = model.reasoner_states(input_ids, attention_mask, positions,
                                            use_cache=keep_reasoner)
        latents = model.latents(states, scale)  # (B, P, d_G)
        # Every prompt token is a prompt token: response_mask is all zero here.
        gate = model.position_gate(attention_mask, torch.zeros_like(attention_mask)) & (positions > 0)
        embeds = model.fuse(embeds, latents, gate)
        if keep_reasoner:
            reasoner_cache, latent = out.past_key_values, latents[:, -1:]
    out = model.generator(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1)
    state = DecodeState(generator_cache=out.past_key_values, reasoner_cache=reasoner_cache,
                        attention_mask=attention_mask.long(), next_position=positions[:, -1:] + 1,
                        latent=latent, scale=scale)
    return out.logits[:, -1], state


def left_pad(prompts, pad: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest) long, padded on the LEFT (decoding appends on the
    right). `prompts`: token-id lists, none empty."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if len(p) == 0)} is empty")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)

"""FlyThinker: a Reasoner LM whose per-token latent is added to a Generator LM's input embedding one
position later (DESIGN.md section 1). Plain torch + transformers; knows nothing about distribution.

    u_0 = E_G[x_0],    u_t = E_G[x_t] + lam * m_t * fit(r_{t-1})  (t >= 1, x_{t-1} a real token)
    r_t = s * h_t / ||h_t||,   h = R.model(x).last_hidden_state,   s = mean_v ||E_G[v]||  (detached)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

CONFIG_NAME = "flythinker.json"
PROJECTION_WEIGHTS = "projection.safetensors"
IGNORE_INDEX = -100


class Positions(str, Enum):
    """Which Generator positions receive the Reasoner's latent."""

    GLOBAL = "global"  # every position (the paper's default)
    INPUT_ONLY = "input_only"  # positions whose token is in the prompt
    OUTPUT_ONLY = "output_only"  # positions whose token is in the response


class Projection(str, Enum):
    """How a d_R latent is fitted to d_G."""

    PAD = "pad"  # d_R <= d_G: add into the first d_R dims (paper-faithful)
    LINEAR = "linear"  # learned Linear(d_R, d_G), initialised to the pad map


def parse_enum(enum_cls, value, name: str):
    """`value` as a member of `enum_cls`, or a ValueError naming `name` and the allowed values."""
    try:
        return enum_cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{name}={value!r} is not one of: {allowed}") from None


@dataclass
class FlyThinkerOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # scalar: sum of response-token NLL / normaliser
    num_tokens: torch.Tensor | None = None  # scalar: response tokens in this batch


def hidden_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[1]


def embedding_scale(generator: PreTrainedModel) -> torch.Tensor:
    """s = mean L2 norm of the rows of the Generator's input-embedding table, detached, fp32 scalar."""
    weight = generator.get_input_embeddings().weight.detach()
    return weight.float().norm(dim=-1).mean()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padding-aware positions: the first real token of every row is position 0. (B, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def validate_pair(generator: PreTrainedModel, reasoner: PreTrainedModel | None, projection: Projection,
                  vocab_size: int | None) -> None:
    """Refuse pairs that cannot share token ids or whose widths the projection cannot fit."""
    if reasoner is None:
        return
    gen_vocab = generator.get_input_embeddings().weight.shape[0]
    rsn_vocab = reasoner.get_input_embeddings().weight.shape[0]
    if vocab_size is None and gen_vocab != rsn_vocab:
        raise ValueError(
            f"vocabulary mismatch: generator embeds {gen_vocab} tokens, reasoner {rsn_vocab}; both models "
            "read the same token ids. If both use one tokenizer and only pad their tables differently "
            "(e.g. Qwen2.5-7B vs 1.5B), pass vocab_size=len(tokenizer).")
    if vocab_size is not None and min(gen_vocab, rsn_vocab) < vocab_size:
        raise ValueError(f"vocabulary mismatch: vocab_size={vocab_size} but the generator embeds "
                         f"{gen_vocab} and the reasoner {rsn_vocab} tokens")
    d_r, d_g = hidden_size(reasoner), hidden_size(generator)
    if projection is Projection.PAD and d_r > d_g:
        raise ValueError(f"projection='pad' needs d_R <= d_G, got reasoner hidden size {d_r} > generator "
                         f"hidden size {d_g}; use projection='linear'")


class FlyThinker(nn.Module):
    """Reasoner + Generator trained jointly with next-token NLL in one forward pass.

    `reasoner=None` or `lam=0` is plain SFT of the generator: the reasoner is never run.
    `step_scale`: when a trainer sets it (flythinker_worker.sharding.StepScale: s computed once per optimizer
    step from the sharded table), forwards use it instead of recomputing s from the whole table.
    """

    step_scale: torch.Tensor | None = None

    def __init__(self, generator: PreTrainedModel, reasoner: PreTrainedModel | None = None, lam: float = 0.5,
                 positions: str | Positions = "global", projection: str | Projection = "pad",
                 vocab_size: int | None = None):
        super().__init__()
        self.positions = parse_enum(Positions, positions, "positions")
        self.projection_kind = parse_enum(Projection, projection, "projection")
        if not isinstance(lam, (int, float)) or lam != lam:
            raise ValueError(f"lam must be a finite number, got {lam!r}")
        validate_pair(generator, reasoner, self.projection_kind, vocab_size)
        self.generator = generator
        self.reasoner = reasoner
        self.lam = float(lam)
        self.vocab_size = vocab_size
        head = reasoner.get_output_embeddings() if reasoner is not None else None
        if head is not None and head.weight is not reasoner.get_input_embeddings().weight:
            # FlyThinker reads the reasoner's hidden states, never its LM head: an untied head gets no
            # gradient, so a sharded optimizer state has no entry for it and a resume would miss its key.
            # Frozen, it is still saved and exported.
            head.weight.requires_grad_(False)
        self.projection = None
        if reasoner is not None and self.projection_kind is Projection.LINEAR:
            d_r, d_g = hidden_size(reasoner), hidden_size(generator)
            weight = generator.get_input_embeddings().weight
            self.projection = nn.Linear(d_r, d_g, bias=True, device=weight.device, dtype=weight.dtype)
            # Start as the pad map (identity into the first dims) so lam means the same at init.
            with torch.no_grad():
                nn.init.eye_(self.projection.weight)
                self.projection.bias.zero_()

    @property
    def uses_reasoner(self) -> bool:
        return self.reasoner is not None and self.lam != 0.0

    # ---- fusion ---------------------------------------------------------------------------------------

    def reasoner_states(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        """Final-norm hidden states of the reasoner, (B, T, d_R), plus its model output (for caches)."""
        out = self.reasoner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, **kwargs)
        return out.last_hidden_state, out

    def latents(self, states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """fit(r): rescale reasoner states to norm `scale` and fit them to d_G. (..., d_R) -> (..., d_G)."""
        h = states.float()
        # The norm is detached (DESIGN): gradients flow through the direction of h only.
        r = h * (scale / h.norm(dim=-1, keepdim=True).detach().clamp_min(1e-12))
        r = r.to(states.dtype)
        if self.projection is not None:
            return self.projection(r)
        d_g = hidden_size(self.generator)
        return F.pad(r, (0, d_g - r.shape[-1])) if r.shape[-1] < d_g else r

    def position_gate(self, attention_mask: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
        """m_t for positions t (B, T), float: which tokens receive a latent under `positions`."""
        real = attention_mask.bool()
        if self.positions is Positions.GLOBAL:
            return real
        if response_mask is None:
            raise ValueError(f"positions={self.positions.value!r} needs response_mask or labels")
        response = response_mask.bool() & real
        return response if self.positions is Positions.OUTPUT_ONLY else real & ~response

    def fuse(self, input_embeds, latents, gate) -> torch.Tensor:
        """u_t = E_G[x_t] + lam * gate_t * latents_{t-1}. input_embeds (B, T, d_G), latents (B, T, d_G),
        gate (B, T) bool, already false where x_{t-1} is not a real token of the same sequence."""
        shifted = torch.zeros_like(latents)
        shifted[:, 1:] = latents[:, :-1]
        return input_embeds + (self.lam * gate.unsqueeze(-1).to(latents.dtype)) * shifted

    def fused_embeddings(self, input_ids, attention_mask, position_ids, response_mask=None, packed=False):
        """Generator input embeddings u (B, T, d_G). `position_ids` (B, T) restart at 0 at every sequence
        start (left padding, or packing), so `position_ids > 0` says x_{t-1} is a real token of the SAME
        sequence: the shift never crosses a pad or a packing boundary."""
        embeds = self.generator.get_input_embeddings()(input_ids)
        if not self.uses_reasoner:
            return embeds
        states, _ = self.reasoner_states(input_ids, None if packed else attention_mask, position_ids,
                                         use_cache=False)
        scale = embedding_scale(self.generator) if self.step_scale is None else self.step_scale.to(states.device)
        latents = self.latents(states, scale)
        gate = self.position_gate(attention_mask, response_mask) & (position_ids > 0)
        return self.fuse(embeds, latents, gate)

    # ---- training forward -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, response_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None
                ) -> FlyThinkerOutput:
        """Teacher-forced forward. input_ids (B, T); labels aligned with input_ids (-100 = ignored, shifted
        inside). `num_items_in_batch` (HF convention) divides the summed NLL instead of this batch's
        token count, so micro-batches and data-parallel ranks add up to the global token mean.
        Packed rows: give `position_ids` (B, T) restarting at 0 per sequence and no attention_mask;
        transformers then masks attention block-causally and the latent shift stops at boundaries."""
        packed = attention_mask is None and position_ids is not None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if response_mask is None and labels is not None:
            response_mask = labels != IGNORE_INDEX
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        embeds = self.fused_embeddings(input_ids, attention_mask, position_ids, response_mask, packed)
        logits = self.generator(inputs_embeds=embeds, attention_mask=None if packed else attention_mask,
                                position_ids=position_ids, use_cache=False).logits
        if labels is None:
            return FlyThinkerOutput(logits=logits)
        loss_sum, num_tokens = response_nll(logits, labels)
        denom = num_tokens.clamp_min(1) if num_items_in_batch is None else num_items_in_batch
        return FlyThinkerOutput(logits=logits, loss=loss_sum / denom, num_tokens=num_tokens)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def fusion_config(self) -> dict:
        import transformers

        return {
            "lam": self.lam, "positions": self.positions.value, "projection": self.projection_kind.value,
            "has_reasoner": self.reasoner is not None, "vocab_size": self.vocab_size,
            "generator_hidden_size": hidden_size(self.generator),
            "reasoner_hidden_size": hidden_size(self.reasoner) if self.reasoner is not None else None,
            "versions": {"flythinker": _package_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
        }

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write DESIGN's checkpoint layout: generator/, reasoner/, flythinker.json, projection.safetensors,
        tokenizer files (top level and inside generator/ so it loads with plain transformers).
        `state_dict` (full, unsharded, keys as in `self.state_dict()`) overrides the live weights."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        parts = {"generator": self.generator, "reasoner": self.reasoner}
        for name, model in parts.items():
            if model is None:
                continue
            sub = None
            if state_dict is not None:
                sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            model.save_pretrained(out / name, state_dict=sub)
        if self.projection is not None:
            source = self.projection.state_dict() if state_dict is None else {
                k[len("projection."):]: v for k, v in state_dict.items() if k.startswith("projection.")}
            save_file({k: v.detach().cpu().contiguous() for k, v in source.items()}, str(out / PROJECTION_WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out / "generator"))
        (out / CONFIG_NAME).write_text(json.dumps(self.fusion_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        **model_kwargs) -> FlyThinker:
        """Load a checkpoint written by `save_pretrained`; `model_kwargs` go to both HF loaders."""
        from safetensors.torch import load_file

        directory = Path(directory)
        check_checkpoint(directory)
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        generator = AutoModelForCausalLM.from_pretrained(directory / "generator", **model_kwargs)
        reasoner_dir = stored_reasoner(directory, cfg)
        reasoner = AutoModelForCausalLM.from_pretrained(reasoner_dir, **model_kwargs) if reasoner_dir else None
        model = cls(generator, reasoner, lam=cfg["lam"], positions=cfg["positions"],
                    projection=cfg["projection"], vocab_size=cfg.get("vocab_size"))
        if model.projection is not None:
            model.projection.load_state_dict(load_file(str(directory / PROJECTION_WEIGHTS)))
        return model


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def missing_checkpoint_files(directory: str | os.PathLike, tokenizer: bool = False) -> list[str]:
    """The files a complete FlyThinker checkpoint at `directory` lacks (relative names; [] when complete).
    `tokenizer`: also require the tokenizer files that generation and training read."""
    root = Path(directory)
    if not (root / CONFIG_NAME).exists():
        return [CONFIG_NAME]
    cfg = json.loads((root / CONFIG_NAME).read_text())
    parts = ["generator"] + (["reasoner"] if cfg.get("has_reasoner", (root / "reasoner").exists()) else [])
    missing = []
    for part in parts:
        if not (root / part / "config.json").exists():
            missing.append(f"{part}/config.json")
        if not any((root / part / name).exists() for name in WEIGHT_FILES):
            missing.append(f"{part}/model.safetensors (or another weights file)")
    if "reasoner" in parts and cfg.get("projection") == Projection.LINEAR.value and \
            not (root / PROJECTION_WEIGHTS).exists():
        missing.append(PROJECTION_WEIGHTS)
    if tokenizer and not (root / "tokenizer_config.json").exists():
        missing.append("tokenizer_config.json (and the tokenizer's vocabulary files)")
    return missing


def stored_reasoner(directory: str | os.PathLike, config: dict) -> Path | None:
    """The reasoner folder of a FlyThinker checkpoint (`config`: its flythinker.json), None when it was
    saved without one (an SFT run)."""
    folder = Path(directory) / "reasoner"
    return folder if config.get("has_reasoner", folder.exists()) else None


def check_checkpoint(directory: str | os.PathLike, tokenizer: bool = False) -> None:
    """FileNotFoundError naming every file a FlyThinker checkpoint lacks."""
    missing = missing_checkpoint_files(directory, tokenizer)
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete FlyThinker checkpoint: missing "
                                f"{', '.join(missing)}")


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled positions and their count. logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("flythinker-recipe")
    except Exception:  # not installed (e.g. a copied source tree)
        return "unknown"

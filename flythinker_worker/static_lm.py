"""A decoder-only LM (Llama family: qwen2, qwen3, llama, mistral) stepping on preallocated per-slot KV
caches, built from the HF model's own submodules (norms, projections, MLP); only the attention core is
ours. Plain torch + transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model, max_len: int | None = None) -> str | None:
    """None when the static-cache step can run this HF causal LM exactly, else why not."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    base = model.base_model
    if not all(hasattr(base, a) for a in ("layers", "norm", "embed_tokens", "rotary_emb")):
        return "the model does not have the Llama-family layout (layers, norm, embed_tokens, rotary_emb)"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window layers are not supported"
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral" and window is not None and (max_len is None or window < max_len):
        return f"sliding_window {window} is shorter than the sequence"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"rope_type {rope!r} depends on the sequence length"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", "flash_attention_2", None):
        return f"attn_implementation {cfg._attn_implementation!r}"
    return None


# ---- one LM with a static per-slot KV cache -------------------------------------------------------------------

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StaticLM(torch.nn.Module):
    """A Llama-family HF causal LM's decoder layers driven one token per slot per step over a static cache.

    The KV tensors are registered buffers (stable addresses: CUDA graphs read and write them in place).
    `layout` "bhld" (slots, kv_heads, len, head_dim) feeds SDPA; "blhd" feeds flash-attn's
    `flash_attn_with_kvcache`, which writes and attends per row with `cache_seqlens`."""

    def __init__(self, hf_model, slots: int, max_len: int, attention: str = "sdpa"):
        super().__init__()
        self.hf = [hf_model]  # not a submodule: the weights stay owned by the FlyThinker
        base = hf_model.base_model
        cfg = hf_model.config
        # Plain attributes, not submodules: `.to()` / `named_buffers()` of this cache see only its buffers.
        for name, part in (("layers", base.layers), ("norm", base.norm), ("embed", base.embed_tokens)):
            object.__setattr__(self, name, part)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.attention = attention
        self.packed = None  # a packed_linear.PackedLM (CPU decode), set per call by the decoder
        self.layer_fn = decode_layer  # or a torch.compile of it, set by the decoder
        self._views = None  # per-layer cache views for the packed step (`_cache_views`)
        self.slots, self.max_len = slots, max_len
        weight = self.embed.weight
        shape = (slots, self.n_kv, max_len, self.head_dim) if attention == "sdpa" else \
            (slots, max_len, self.n_kv, self.head_dim)
        for i in range(len(self.layers)):
            # zeros, not empty: masked-out entries take weight 0 in P @ V, and 0 * NaN would be NaN.
            self.register_buffer(f"k{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype))
            self.register_buffer(f"v{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype))
        # RoPE tables for every position, from the model's own rotary module (same fp32 maths, same cast).
        positions = torch.arange(max_len, device=weight.device)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, device=weight.device, dtype=weight.dtype), positions)
        self.register_buffer("cos", cos[0].contiguous())
        self.register_buffer("sin", sin[0].contiguous())
        half = self.head_dim // 2
        self.register_buffer("sin_signed", torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1))
        self.register_buffer("arange", torch.arange(max_len, device=weight.device))
        self.register_buffer("rows", torch.arange(slots, device=weight.device))

    def cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @torch.no_grad()
    def load_prefill(self, dynamic_cache, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copy a left-padded prefill's DynamicCache (n rows, width P) into `slots` (n,) so that each row's
        first real token sits at index 0. `lengths` (n,): real tokens per row."""
        for i, layer in enumerate(dynamic_cache.layers):
            keys, values = layer.keys, layer.values  # (n, kv_heads, P, head_dim), already rotated
            width = keys.shape[2]
            if width > self.max_len:
                raise ValueError(f"prompt width {width} exceeds the cache length {self.max_len}")
            # Row j's real tokens are its last lengths[j] columns: gather them to the front.
            src = (torch.arange(width, device=keys.device)[None] + (width - lengths)[:, None]).clamp(max=width - 1)
            index = src[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            k_cache, v_cache = self.cache(i)
            for cache, new in ((k_cache, keys), (v_cache, values)):
                shifted = new.gather(2, index).to(cache.dtype)
                if self.attention != "sdpa":
                    shifted = shifted.transpose(1, 2)
                    cache[slots, :width] = shifted
                else:
                    cache[slots, :, :width] = shifted

    def forward(self, embeds: torch.Tensor, pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """embeds (B, 1, d) of the fed tokens, pos (B,) their positions (= cache indices). Writes their K/V
        and returns the final-norm hidden states (B, 1, d). `kv_len`: attend over the first kv_len cache
        entries only (an upper bound of every pos + 1; None: all)."""
        kv_len = kv_len or self.max_len
        if self.packed is not None:
            return self._forward_packed(embeds, pos, kv_len)
        cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]  # (B, 1, 1, D)
        if self.attention == "sdpa":
            visible = (self.arange[:kv_len][None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        else:
            visible = pos.to(torch.int32)  # flash-attn's cache_seqlens
        x = embeds
        for i, layer in enumerate(self.layers):
            x = self.layer_fn(self, layer, x, *self.cache(i), pos, cos, sin, visible)
        return self.norm(x)

    @torch.no_grad()  # inference only; and the cached cache views must never meet grad-mode writes
    def _forward_packed(self, embeds: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`forward` on CPU with the packed weights of `self.packed` (same maths in ~25 ops per layer instead
        of ~40: on 2 CPU cores a small op costs as much as ~100 KB of weight reads): 2-D activations; fused
        qkv and gate/up products; q and k rotated in one op; grouped-query attention as two batched products
        over each kv head's query group, against cache views made once; both residual adds in the GEMMs'
        epilogues; fused RMSNorm. SDPA layout only."""
        batch, heads, kv, dim = embeds.shape[0], self.n_heads, self.n_kv, self.head_dim
        group = heads // kv
        cos = self.cos.index_select(0, pos)[:, None, :]  # (B, 1, D)
        sin = self.sin_signed.index_select(0, pos)[:, None, :]
        index = pos[:, None, None, None].expand(batch, kv, 1, dim)
        # Additive mask over the attended cache entries, shared by every layer: (B * kv, group, L).
        bias = torch.zeros(batch, 1, 1, kv_len, dtype=embeds.dtype, device=embeds.device).masked_fill_(
            (self.arange[:kv_len][None, :] > pos[:, None])[:, None, None, :], float("-inf"))
        bias = bias.expand(batch, kv, group, kv_len).reshape(batch * kv, group, kv_len)
        x = embeds.reshape(batch, -1)  # (B, d)
        for layer, fast, (k_cache, v_cache, keys_t, values) in zip(self.layers, self.packed.layers,
                                                                   self._cache_views()):
            attn = layer.self_attn
            qkv = fast.qkv.linear(_rms(layer.input_layernorm, x)).view(batch, heads + 2 * kv, dim)
            qk, v = qkv.split((heads + kv, kv), dim=1)
            if hasattr(attn, "q_norm"):  # qwen3: per-head norms before the rotation
                qk = torch.cat((_rms(attn.q_norm, qk[:, :heads]), _rms(attn.k_norm, qk[:, heads:])), dim=1)
            # rotate_half(x) * sin == roll(x, D/2) * sin_signed (sin with its first half negated)
            qk = torch.addcmul(qk * cos, qk.roll(dim // 2, dims=-1), sin)  # (B, heads + kv, D)
            q, k = qk.split((heads, kv), dim=1)
            k_cache.scatter_(2, index, k.unsqueeze(2))
            v_cache.scatter_(2, index, v.unsqueeze(2))
            scores = torch.baddbmm(bias, q.reshape(batch * kv, group, dim), keys_t[:, :, :kv_len],
                                   alpha=attn.scaling)  # (B * kv, group, L)
            out = torch.bmm(scores.softmax(-1), values[:, :kv_len])  # (B * kv, group, D)
            x = fast.o.plus(out.view(batch, heads * dim), x)  # a new tensor: `embeds` is never written
            x = fast.mlp_residual(_rms(layer.post_attention_layernorm, x), x)
        return _rms(self.norm, x).view(batch, 1, -1)

    def _cache_views(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: K and V caches, K as (slots * kv, D, max_len) and V as (slots * kv, max_len, D) views."""
        k0 = self.k0
        if self._views is None or self._views[0][0].data_ptr() != k0.data_ptr():
            rows = self.slots * self.n_kv
            self._views = [(k, v, k.view(rows, self.max_len, self.head_dim).transpose(1, 2),
                            v.view(rows, self.max_len, self.head_dim))
                           for k, v in (self.cache(i) for i in range(len(self.layers)))]
        return self._views


def decode_layer(lm: StaticLM, layer, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One HF decoder layer of `lm` for one token per slot: x (B, 1, d) -> (B, 1, d); writes K/V at index
    pos[b] of slot b. cos/sin (B, 1, 1, D); `visible`: the attended entries (B, 1, 1, L) (sdpa) or the int32
    cache lengths (flash). The unit that `torch.compile` compiles: every layer of a model has the same
    shapes, so one compiled graph serves them all (compile time does not grow with depth)."""
    batch, dim = x.shape[0], lm.head_dim
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(batch, 1, -1, dim)
    k = attn.k_proj(h).view(batch, 1, -1, dim)
    v = attn.v_proj(h).view(batch, 1, -1, dim)
    if hasattr(attn, "q_norm"):  # qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, D)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if lm.attention == "sdpa":
        # An index_put, not scatter_: inductor makes it an in-place write of B columns, while it compiles a
        # scatter_ into a clone and copy-back of the whole cache (every layer, every step).
        k_cache[lm.rows[:batch], :, pos] = k[:, :, 0]  # (B, kv, D) into column pos[b] of slot b
        v_cache[lm.rows[:batch], :, pos] = v[:, 0]
        # Grouped-query attention as kv "heads" of `group` queries each (query head h reads kv head
        # h // group, as HF's repeat_kv): no K/V repeat, and the mask is accepted by SDPA's memory-efficient
        # CUDA kernel (enable_gqa would leave only the math kernel with a mask).
        kv_len = visible.shape[-1]
        out = F.scaled_dot_product_attention(q.reshape(batch, lm.n_kv, lm.n_heads // lm.n_kv, dim),
                                             k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                             attn_mask=visible, scale=attn.scaling)  # (B, kv, group, D)
        out = out.reshape(batch, 1, -1)
    else:  # flash-attn: appends k/v at cache_seqlens per row, attends to [0, cache_seqlens]
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(q.transpose(1, 2), k_cache, v_cache, k=k.transpose(1, 2), v=v,
                                      cache_seqlens=visible, softmax_scale=attn.scaling, causal=True)
        out = out.reshape(batch, 1, -1)
    x = x + attn.o_proj(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """An HF Llama-family RMSNorm module applied through F.rms_norm (same maths, fewer Python-level ops)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401  (only whether it imports)
    except Exception:
        return False
    return True

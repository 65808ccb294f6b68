"""Pre-packed projections for CPU decoding. Plain torch + transformers.

Why: a decode step multiplies a handful of rows (one per slot) by every weight matrix. On CPU, torch's
default GEMM for such skinny products reaches ~5-9 GB/s of weight reads on our 2-core machines, while
oneDNN with the weight pre-packed into its blocked layout reaches ~17-20 GB/s (8 rows, fp32, measured
here), and a decode step is a pass over all weights.
So the static-cache step, on CPU, multiplies by packed copies: q/k/v as one matrix, gate/up as one
matrix, o, down and the LM head; o and down add the residual in the GEMM's epilogue
(`_linear_pointwise.binary`, "add"). The ops (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`)
are the ones torch.compile's CPU freezing pass emits for low-precision or dynamic-batch linears (for fp32
it picks MKL's packed GEMM, which reached only ~7 GB/s here); we call them eagerly, so there is no
compiler and no frozen (unsyncable) weights.

The packed copies cost one extra copy of the weights in host memory; they are rebuilt whenever a
parameter changes (its version counter or storage), so an in-place weight sync is never decoded with
stale copies (a write through `.data` bypasses the version counter: build a new decoder after one).
Where the ops are missing or disagree with `F.linear` (a self-check at first use), the step uses the HF
modules as before."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
PACK_ROWS_HINT = 16


@functools.lru_cache(maxsize=None)
def packing_available(dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears run here for `dtype` (CPU) and agree with F.linear."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
        x, other = torch.randn(3, 16, generator=gen), torch.randn(3, 24, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        ref = F.linear(x, weight, bias)
        pointwise = torch.ops.mkldnn._linear_pointwise
        pairs = [(pointwise(x, packed, bias, "none", [], ""), ref),
                 (pointwise.binary(x, other, packed, bias, "add"), ref + other)]
        ok = all(torch.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in pairs)
    except (RuntimeError, AttributeError) as exc:  # op missing in this build
        logger.info("packed CPU linears unavailable (%s): decoding with F.linear", exc)
        return False
    if not ok:
        logger.warning("packed CPU linears disagree with F.linear here: decoding with F.linear")
    return ok


class PackedLinear:
    """y = x @ W.T + b for one or more nn.Linear fused along the output dimension (their outputs are
    consecutive slices of y, sizes `splits`)."""

    def __init__(self, *linears: torch.nn.Linear):
        weights = [lin.weight.detach() for lin in linears]
        self.splits = [w.shape[0] for w in weights]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        # The batch-size hint picks oneDNN's blocking: 16 was best or near best at 1, 8 and 32 rows (measured).
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        biases = [lin.bias for lin in linears]
        if all(b is None for b in biases):
            self.bias = None
        else:  # a fused matrix needs one bias vector: zeros for the parts that have none
            self.bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                                   for b, w in zip(biases, weights)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) -> (..., sum(splits))."""
        # 2-D in: oneDNN's 3-D path is up to 2x slower for wide matrices (measured, 4096 x 512).
        y = self.linear(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, d_in) -> x @ W.T + b (n, d_out)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x @ W.T + b + other, the add in the GEMM's epilogue (no extra op). x (n, d_in), other (n, d_out)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "add")


class PackedLayer:
    """The projections of one Llama-family decoder layer: qkv (fused), o, gate_up (fused), down."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = PackedLinear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = PackedLinear(attn.o_proj)
        self.gate_up = PackedLinear(mlp.gate_proj, mlp.up_proj)
        self.down = PackedLinear(mlp.down_proj)
        self.act = mlp.act_fn

    def mlp_residual(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + down(act(gate(h)) * up(h)) for h, x (n, d); the residual add rides in down's epilogue."""
        gate, up = self.gate_up.linear(h).split(self.gate_up.splits, dim=-1)  # views of one fresh output
        return self.down.plus(self.act(gate).mul_(up), x)


class PackedLM:
    """Packed copies of one HF causal LM's decoder projections (and optionally its LM head), tagged with
    the parameters' versions so that `stale()` tells when a weight changed in place."""

    def __init__(self, hf_model, head: bool):
        base = hf_model.base_model
        self.layers = [PackedLayer(layer) for layer in base.layers]
        self.lm_head = PackedLinear(hf_model.lm_head) if head else None
        self._params = [p for p in hf_model.parameters()]
        self._tag = self._current_tag()

    def _current_tag(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self._params)

    def stale(self) -> bool:
        return self._current_tag() != self._tag

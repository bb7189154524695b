"""Pure-PyTorch references of every adapter method: the oracle the kernels are tested against and the path that
runs wherever the kernels cannot (CPU without Triton's interpreter, ``FASTPEFT_BACKEND=reference``, no Triton).

No Triton here. Shapes (the contract every implementation follows):
    x       [..., K]   activations, any strides, fp32 / fp16 / bf16; compute runs in x.dtype
    weight  [N, K]     frozen base weight (a transposed view for Conv1D is fine)
    bias    [N] | None
    LoRA    lora_A [r, K], lora_B [N, r] (fp32 by default), scaling = alpha / r (rsLoRA: alpha / sqrt(r))
            Y = x·Wᵀ + bias + scaling · ((D ⊙ x)·Aᵀ)·Bᵀ      D: inverted-dropout mask on the LoRA input only, as PEFT
    DoRA    LoRA's A, B, scaling + magnitude m [N] (fp32); n = ‖W + s·B·A‖ per output row, detached (PEFT)
            Y = x·Wᵀ + bias + (m/n - 1)⊙base + (m/n)⊙s·(h·Aᵀ)·Bᵀ   h = dropped-out input (x when p = 0)
            base = x·Wᵀ (PEFT: result - bias) when p = 0, else h·Wᵀ (a second base product, as PEFT)
    IA3     ia3_l [N, 1] (output scaling) or [1, K] (feedforward / input scaling)
            output:      Y = (x·Wᵀ + bias) ⊙ l        (PEFT scales the bias too)
            feedforward: Y = (x ⊙ l)·Wᵀ + bias
    4-bit   packed bytes + QuantState stand for W (``ops/nf4_format.py``); W is dequantized to the state's dtype,
            then cast to x.dtype, as bitsandbytes' Linear4bit computes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .nf4_format import nf4_dequantize_reference

__all__ = [
    "lora_delta_reference",
    "lora_linear_reference",
    "dora_weight_norm_reference",
    "dora_update_reference",
    "dora_linear_reference",
    "ia3_linear_reference",
    "nf4_weight_reference",
    "nf4_lora_linear_reference",
    "nf4_ia3_linear_reference",
    "lora_mixed_delta_reference",
]


def lora_delta_reference(
    h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The LoRA term scaling·(h·Aᵀ)·Bᵀ in PEFT's order of operations (h is the dropped-out input).

    As PEFT: the input is cast to the adapter's dtype, so fp32 adapters on a bf16 / fp16 model give an fp32
    term (the caller adds it to the base output and casts back, as PEFT does)."""
    if h.dtype != lora_A.dtype and h.dtype in (torch.float16, torch.bfloat16) and lora_A.dtype == torch.float32:
        h = h.to(lora_A.dtype)
    return F.linear(F.linear(h, lora_A.to(h.dtype)), lora_B.to(h.dtype)) * scaling


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-PyTorch LoRA linear: the oracle the kernels are tested against.

    dropout_mask, when given, has x's shape and holds 0 or 1/(1-p) (already scaled).

    >>> x = torch.randn(2, 5, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)
    >>> lora_linear_reference(x, w, None, a, b, 2.0).shape
    torch.Size([2, 5, 8])
    """
    out = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    h = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    return (out + lora_delta_reference(h, lora_A, lora_B, scaling)).to(out.dtype)


def dora_weight_norm_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                               scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ over each output row, fp32 [N] (PEFT's ``get_weight_norm`` with fp32 adapters). weight [N, K].

    >>> dora_weight_norm_reference(torch.eye(3), torch.zeros(1, 3), torch.zeros(3, 1), 1.0)
    tensor([1., 1., 1.])
    """
    w = weight.to(torch.float32) + scaling * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
    return torch.linalg.norm(w, dim=1)


def dora_initial_magnitude_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                     scaling: float, adapter_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """DoRA's initial magnitude as PEFT computes it when it creates the adapter, held in fp32 [N]: ‖W + s·B·A‖ per
    output row in ``adapter_dtype``, the dtype PEFT has cast the new adapter to by then (the base weight's dtype for a
    floating-point base; None = fp32, as for a 4-bit base, whose adapter PEFT leaves in fp32). For fp16, B·A is formed
    in fp32 and rounded, as PEFT does. For a 16-bit dtype this is the norm rounded to 16 bits (up to ~0.4 % off the
    exact norm), which PEFT's training then starts from: matching it keeps the two libraries' loss curves together
    (docs/dora.md). weight [N, K] (any float dtype: a dequantized 4-bit weight too).

    >>> dora_initial_magnitude_reference(torch.eye(3), torch.zeros(1, 3), torch.zeros(3, 1), 1.0)
    tensor([1., 1., 1.])
    """
    if adapter_dtype is None or adapter_dtype == torch.float32:
        return dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    a, b = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype)
    delta = (b.float() @ a.float()).to(adapter_dtype) if adapter_dtype == torch.float16 else b @ a
    w = weight.to(adapter_dtype) + scaling * delta
    return torch.linalg.norm(w, dim=1).to(adapter_dtype).to(torch.float32)


def dora_update_reference(
    x: torch.Tensor,
    result: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropped: Optional[torch.Tensor] = None,
    weight_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PEFT's DoRA on top of the base output ``result`` (= x·Wᵀ + bias, in the base's dtype), in PEFT's order.

    ``dropped``: the dropped-out input (training with dropout > 0), else None. As PEFT: the input is cast to the
    adapters' dtype; the norm uses the detached LoRA weight and is itself detached; at p = 0 the base term is
    ``result - bias`` (no second GEMM), with dropout it is a second product ``dropped·Wᵀ``.
    ``weight_norm``: a precomputed n (fp32 [N]) instead of computing it here.
    """
    dtype = lora_A.dtype
    h = x.to(dtype) if dropped is None else dropped.to(dtype)
    w = weight.to(dtype)
    if weight_norm is None:
        weight_norm = dora_weight_norm_reference(w, lora_A.detach(), lora_B.detach(), scaling)
    scale = (magnitude / weight_norm.detach().to(magnitude.dtype)).view(1, -1)
    if dropped is None:
        base = result if bias is None else result - bias.to(result.dtype)
    else:
        base = F.linear(h, w)
    lora = F.linear(F.linear(h, lora_A), lora_B)
    return (result + ((scale - 1) * base + scale * lora * scaling)).to(result.dtype)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_mask=None):
    """Pure-PyTorch DoRA linear (the oracle): dense base output, then ``dora_update_reference``.

    dropout_mask, when given, has x's shape and holds 0 or 1/(1-p); it is applied in x.dtype, as the kernels do.

    >>> x = torch.randn(2, 5, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.zeros(8, 4)
    >>> m = dora_weight_norm_reference(w, a, b, 2.0)
    >>> torch.allclose(dora_linear_reference(x, w, None, a, b, m, 2.0), x @ w.t(), atol=1e-5)
    True
    """
    result = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    dropped = None if dropout_mask is None else x * dropout_mask.to(x.dtype)
    return dora_update_reference(x, result, weight, bias, lora_A, lora_B, magnitude, scaling, dropped)


def ia3_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """Pure-PyTorch IA3 linear in x.dtype: the oracle the kernels are tested against.

    >>> x = torch.randn(3, 16); w = torch.randn(8, 16)
    >>> ia3_linear_reference(x, w, None, torch.ones(8, 1), feedforward=False).shape
    torch.Size([3, 8])
    """
    l = ia3_l.reshape(-1).to(x.dtype)
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if feedforward:
        return F.linear(x * l, w, b)
    return F.linear(x, w, b) * l


def nf4_weight_reference(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` exactly as bnb's Linear4bit computes with it: dequantize to the state's dtype,
    then cast to the compute dtype."""
    w = nf4_dequantize_reference(packed, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


def nf4_lora_linear_reference(x, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_mask=None):
    """Pure-PyTorch QLoRA linear in x.dtype (the oracle): the dense reference on the dequantized weight.

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 16))
    >>> nf4_lora_linear_reference(torch.randn(3, 16), packed, qs, None, torch.randn(2, 16), torch.randn(8, 2), 1.0).shape
    torch.Size([3, 8])
    """
    w = nf4_weight_reference(packed, quant_state, x.dtype)
    return lora_linear_reference(x, w, bias, lora_A, lora_B, scaling, dropout_mask)


def nf4_ia3_linear_reference(x, packed, quant_state, bias, ia3_l, feedforward: bool):
    """Pure-PyTorch IA3 on a 4-bit base (the oracle)."""
    w = nf4_weight_reference(packed, quant_state, x.dtype)
    return ia3_linear_reference(x, w, bias, ia3_l, feedforward)


def lora_mixed_delta_reference(y2d: torch.Tensor, x2d: torch.Tensor, adapter_of_segment: torch.Tensor, tokens: int,
                               a_stack: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Oracle of ``ops/kernels/sgmv.py``: y + s_a·(x·A_aᵀ)·B_aᵀ per segment of ``tokens`` rows (a = -1: no
    adapter), in fp32, rounded once to y's dtype. Returns a new tensor."""
    adapter_of_row = adapter_of_segment.long().repeat_interleave(tokens)
    out = y2d.float().clone()
    for a in adapter_of_segment.unique().tolist():
        if a < 0:
            continue
        rows = (adapter_of_row == a).nonzero().squeeze(1)
        shrunk = x2d.index_select(0, rows).float() @ a_stack[a].float().t()
        out.index_add_(0, rows, (shrunk @ b_stack[a].float().t()) * scales[a].float())
    return out.to(y2d.dtype)

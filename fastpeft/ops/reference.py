"""Pure-PyTorch references of every adapter method: the oracle the kernels are tested against and the path that
runs wherever the kernels cannot (CPU without Triton's interpreter, ``FASTPEFT_BACKEND=reference``, no Triton).

No Triton here. Shapes (the contract every implementation follows):
    x       [..., K]   activations, any strides, fp32 / fp16 / bf16; compute runs in x.dtype
    weight  [N, K]     frozen base weight (a transposed view for Conv1D is fine)
    bias    [N] | None
    LoRA    lora_A [r, K], lora_B [N, r] (fp32 by default), scaling = alpha / r (rsLoRA: alpha / sqrt(r))
            Y = x·Wᵀ + bias + scaling · ((D ⊙ x)·Aᵀ)·Bᵀ      D: inverted-dropout mask on the LoRA input only, as PEFT
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
    "ia3_linear_reference",
    "nf4_weight_reference",
    "nf4_lora_linear_reference",
    "nf4_ia3_linear_reference",
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

"""Trainable tokens' math: a frozen embedding / linear head whose rows ``index`` are replaced by ``rows``,

    W' = weight.index_copy(0, index, rows)        embedding(x, W')        or        x · W'ᵀ + bias

computed without what PEFT's plain autograd over W' costs: PEFT's backward forms the gradient of the whole W'
([num_rows, dim]; for a head a full weight-gradient GEMM) to keep ``len(index)`` rows of it.

* ``embedding_with_rows``: the base lookup, and the trained rows' values at the positions that hold a trained id
  (``slots[x]``: the id's row in ``rows``, -1 for other ids). The same numbers as embedding(x, W') (the same rows
  are read); the rows' gradient is embedding's own sum over positions. For plain lookups only: max_norm,
  scale_grad_by_freq, sparse and a trained padding row need PEFT's computation.
* ``linear_with_rows``: forward x · W'ᵀ as PEFT (W' built, then one GEMM: the very same logits); backward
  grad_x = grad · W' as PEFT, and the rows' gradient from the trained columns of grad only,
  grad_rows = grad[:, index]ᵀ · x (a [len(index), dim] GEMM instead of [num_rows, dim]). W' is built again in
  backward rather than kept between the passes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["embedding_with_rows", "linear_with_rows"]


def embedding_with_rows(x: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                        padding_idx: Optional[int] = None) -> torch.Tensor:
    """embedding(x, W') for a frozen ``weight``; ``slots`` [num_rows]: row of ``rows`` per id, -1 if untrained."""
    out = F.embedding(x, weight, padding_idx=padding_idx)
    where = slots[x]
    trained = F.embedding(where.clamp(min=0), rows)
    return torch.where((where >= 0).unsqueeze(-1), trained, out)


class _LinearWithRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, index, rows):
        replaced = weight.index_copy(0, index, rows)
        ctx.save_for_backward(x, weight, index, rows)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, replaced, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, index, rows = ctx.saved_tensors
        grad_x = grad_bias = grad_rows = None
        # under autocast the forward GEMM ran in a lower dtype than x / weight: grad is in that dtype
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.index_copy(0, index, rows).to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4]:
            trained = grad.index_select(-1, index).reshape(-1, index.numel())
            grad_rows = (trained.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(rows.dtype)
        return grad_x, None, grad_bias, None, grad_rows


def linear_with_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """x · W'ᵀ + bias for a frozen ``weight`` (``weight.requires_grad`` must be False: its gradient is not formed)."""
    if weight.requires_grad:
        raise ValueError("linear_with_rows forms no gradient for weight; it must be frozen")
    return _LinearWithRows.apply(x, weight, bias, index, rows)

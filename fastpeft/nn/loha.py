"""LohaLinear: a drop-in for a frozen nn.Linear with LoHa adapters (PEFT's ``loha.Linear``).

LoHa: ΔW = s·(W1a·W1b) ⊙ (W2a·W2b), W1a, W2a [out, r], W1b, W2b [r, in], s = alpha / r. PEFT builds the dense
[out, in] ΔW every call and runs one more full GEMM, F.linear(x, ΔW), plus two in backward.

The Hadamard product of two rank-r products is one product of rank r²:

    ΔW[o, i] = Σ_p Σ_q W1a[o, p]·W2a[o, q] · W1b[p, i]·W2b[q, i]  =  (B'·A')[o, i]
    B'[o, (p, q)] = W1a[o, p]·W2a[o, q]   (out × r², row-wise Kronecker)
    A'[(p, q), i] = W1b[p, i]·W2b[q, i]   (r² × in, column-wise Kronecker = Khatri-Rao)

so x·ΔWᵀ = s·(x·A'ᵀ)·B'ᵀ runs on LoRA's operators / kernels at rank r², and autograd takes dA', dB' back to the
four factors. Per token this costs 2·r²·(in + out) FLOPs instead of 2·in·out, so it is the fast path while
r²·(in + out) < in·out (r ≤ 45 for a 4096 × 4096 layer, r ≤ 32 for 2048 × 2048); beyond that the layer builds ΔW
as PEFT does. Rank dropout (training) scales ΔW's rows, i.e. B''s rows; module dropout skips the adapter for a call.
Both draw from torch's RNG exactly as PEFT does (one torch.rand(1) per adapted call in training, then
torch.rand(out) for rank dropout), so a seeded run drops the same rows.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import bases
from .lycoris import LycorisLinear

__all__ = ["LohaLinear", "khatri_rao_pair"]


def khatri_rao_pair(w1a, w1b, w2a, w2b) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A' [r1·r2, in], B' [out, r1·r2]) with B'·A' = (w1a·w1b) ⊙ (w2a·w2b); differentiable."""
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    b_prime = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(out, r1 * r2)
    a_prime = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(r1 * r2, w1b.shape[1])
    return a_prime, b_prime


class LohaLinear(LycorisLinear):
    """Frozen nn.Linear + LoHa adapters.

    >>> layer = LohaLinear(nn.Linear(16, 8), "default", r=2, alpha=4, init_weights=False)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "loha"
    method = "LoHa"
    TABLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__(base_layer, adapter_name)
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights)

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool = True) -> None:
        # LoHa always rescales kept rows by 1/mean (PEFT's LoHa has no rank_dropout_scale switch)
        self._register(adapter_name, r, alpha, rank_dropout, module_dropout, rank_dropout_scale=True)
        out_f, in_f = self.out_features, self.in_features
        # PEFT's draws in PEFT's order: four Kaiming-uniform(a=√5) tensors, the last one zero unless init_weights=False
        factors = [torch.empty(out_f, r), torch.empty(r, in_f), torch.empty(out_f, r), torch.empty(r, in_f)]
        for i, tensor in enumerate(factors):
            if i == 3 and init_weights:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        self._store(adapter_name, dict(zip(self.TABLES, factors)))

    def factored(self, name: str) -> bool:
        """Whether the rank-r² product beats building ΔW (see the module docstring)."""
        r2 = self.r[name] ** 2
        return r2 * (self.in_features + self.out_features) < self.in_features * self.out_features

    def delta_weight(self, name: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s·(W1a·W1b) ⊙ (W2a·W2b) as [out, in] (PEFT's order), rows scaled by ``rows`` (rank dropout)."""
        w1a, w1b = self.hada_w1_a[name], self.hada_w1_b[name]
        w2a, w2b = self.hada_w2_a[name], self.hada_w2_b[name]
        weight = ((w1a @ w1b) * (w2a @ w2b)) * self.scaling[name]
        if rows is not None:
            weight = weight * rows.to(weight.device).view(-1, 1)
        return weight

    def _forward_dense(self, x, name, cpp):
        if not self.factored(name):
            return self._forward_reference(x, name)
        skip, rows = self._skip_and_rows(name)
        base = self.base_layer
        if skip:
            return bases.base_forward(base, x)
        lora_A, lora_B = khatri_rao_pair(self.hada_w1_a[name], self.hada_w1_b[name], self.hada_w2_a[name],
                                         self.hada_w2_b[name])
        if rows is not None:
            lora_B = lora_B * rows.to(lora_B.device).unsqueeze(-1)
        return self._forward_lora_pair(x, lora_A, lora_B, self.scaling[name], 0.0, cpp)

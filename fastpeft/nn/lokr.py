"""LokrLinear: a drop-in for a frozen nn.Linear with LoKr adapters (PEFT's ``lokr.Linear``).

LoKr: ΔW = s·(W1 ⊗ W2), a Kronecker product of W1 [out_l, in_m] and W2 [out_k, in_n] with out = out_l·out_k and
in = in_m·in_n (each dimension split into two factors near its square root, PEFT's ``decompose_factor`` rule);
W1 (with ``decompose_both``) and W2 may themselves be rank-r products. s = alpha / r. PEFT builds the dense
[out, in] ΔW every call (out·in values) and runs one more full GEMM, F.linear(x, ΔW), plus two in backward.

The Kronecker structure needs neither: with x viewed as X [M, in_m, in_n] (input index i = i_m·in_n + i_n, the
layout of ⊗),

    (x·ΔWᵀ)[m, o_l·out_k + o_k] = s·Σ_{i_m, i_n} W1[o_l, i_m]·W2[o_k, i_n]·X[m, i_m, i_n] = s·(W1·X_m·W2ᵀ)[o_l, o_k]

two small batched GEMMs: T = X·W2ᵀ [M, in_m, out_k] (2·M·in·out_k FLOPs), then W1·T [M, out_l, out_k]
(2·M·in_m·out FLOPs). At 4096 × 4096 (64·64 each way) that is 2·M·(4096·64 + 64·4096), 1/32 of the dense GEMM
PEFT adds, and nothing of size out·in is ever formed. Autograd takes the gradients back to the factors. Rank
dropout scales output rows, i.e. the result's columns; module dropout skips the adapter (PEFT's random draws,
``LycorisLinear``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import bases
from .lycoris import LycorisLinear

__all__ = ["LokrLinear", "factor_pair"]


def factor_pair(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """Split ``dimension`` into two factors as PEFT's LoKr does: ``factor`` itself when it divides (in that order),
    else the divisor pair m ≤ n closest to √dimension with m ≤ ``factor`` (any m for -1).

    >>> factor_pair(4096), factor_pair(14336), factor_pair(127), factor_pair(128, 4), factor_pair(128, 64)
    ((64, 64), (112, 128), (1, 127), (4, 32), (64, 2))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    best = (1, dimension)
    for m in range(1, int(math.isqrt(dimension)) + 1):
        if dimension % m:
            continue
        n = dimension // m
        low = m if m <= limit else (n if n <= limit else None)
        if low is None:
            continue
        pair = (min(m, n), max(m, n)) if low == m else (n, m)
        if sum(pair) < sum(best) or (sum(pair) == sum(best) and pair[0] > best[0]):
            best = (min(pair), max(pair))
    return best


class LokrLinear(LycorisLinear):
    """Frozen nn.Linear + LoKr adapters.

    >>> layer = LokrLinear(nn.Linear(16, 8), "default", r=2, alpha=4, init_weights=False)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "lokr"
    method = "LoKr"
    TABLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, init_weights=True, decompose_both: bool = False,
                 decompose_factor: int = -1, rank_dropout_scale: bool = False) -> None:
        super().__init__(base_layer, adapter_name)
        self.kron_shape: dict = {}
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights, decompose_both,
                          decompose_factor, rank_dropout_scale)

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights=True, decompose_both: bool = False,
                     decompose_factor: int = -1, rank_dropout_scale: bool = False) -> None:
        self._register(adapter_name, r, alpha, rank_dropout, module_dropout, rank_dropout_scale)
        in_m, in_n = factor_pair(self.in_features, decompose_factor)
        out_l, out_k = factor_pair(self.out_features, decompose_factor)
        self.kron_shape[adapter_name] = (out_l, out_k, in_m, in_n)
        full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = not (r < max(out_k, in_n) / 2)
        shapes = {}
        if full_w1:
            shapes["lokr_w1"] = (out_l, in_m)
        else:
            shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r), (r, in_m)
        if full_w2:
            shapes["lokr_w2"] = (out_k, in_n)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, r), (r, in_n)
        # PEFT's draws in PEFT's order (w1 side, then w2 side); which tensors start at zero depends on the init:
        # True -> the W1 side's first factor; "lycoris" -> the W2 side's last factor; False -> none
        zero = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}}.get(init_weights, set())
        tensors = {}
        for table, shape in shapes.items():
            tensor = torch.empty(shape)
            if table in zero:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            tensors[table] = tensor
        self._store(adapter_name, tensors)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.kron_shape[adapter_name]

    def _factors(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W1 [out_l, in_m], W2 [out_k, in_n]), products formed where the adapter stores them low-rank."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def delta_weight(self, name: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s·(W1 ⊗ W2) as [out, in] (PEFT's order), rows scaled by ``rows`` (rank dropout)."""
        w1, w2 = self._factors(name)
        weight = torch.kron(w1, w2.contiguous()) * self.scaling[name]
        if rows is not None:
            weight = weight * rows.to(weight.device).view(-1, 1)
        return weight

    def _forward_dense(self, x, name, cpp):
        """base(x) + s·(W1·X·W2ᵀ), never forming ΔW; the Kronecker term in x's dtype (fp32 accumulation in the
        GEMMs), added to the base output as the LoRA paths do."""
        result = bases.base_forward(self.base_layer, x)
        skip, rows = self._skip_and_rows(name)
        if skip:
            return result
        out_l, out_k, in_m, in_n = self.kron_shape[name]
        w1, w2 = self._factors(name)
        lead = x.shape[:-1]
        blocks = x.reshape(-1, in_m, in_n)
        inner = torch.matmul(blocks, w2.to(x.dtype).t())          # [M, in_m, out_k]
        delta = torch.matmul(w1.to(x.dtype), inner).reshape(*lead, out_l * out_k)  # [M, out_l, out_k]
        scale = self.scaling[name]
        delta = delta * (rows.to(device=x.device, dtype=x.dtype) * scale if rows is not None else scale)
        return result + delta.to(result.dtype)

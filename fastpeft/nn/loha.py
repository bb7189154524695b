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
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import HAS_TRITON, cpp_ops
from . import bases
from .layer import AdapterLayer

if HAS_TRITON:
    from ..ops.kernels import custom_ops

__all__ = ["LohaLinear", "khatri_rao_pair"]


def khatri_rao_pair(w1a, w1b, w2a, w2b) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A' [r1·r2, in], B' [out, r1·r2]) with B'·A' = (w1a·w1b) ⊙ (w2a·w2b); differentiable."""
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    b_prime = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(out, r1 * r2)
    a_prime = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(r1 * r2, w1b.shape[1])
    return a_prime, b_prime


class LohaLinear(AdapterLayer):
    """Frozen nn.Linear + LoHa adapters.

    >>> layer = LohaLinear(nn.Linear(16, 8), "default", r=2, alpha=4, init_weights=False)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "loha"

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, init_weights: bool = True) -> None:
        if bases.is_conv1d(base_layer) or bases.is_linear4bit(base_layer):
            # PEFT's LoHa adapts nn.Linear / Conv layers only: transformers' Conv1D and 4-bit layers are refused there
            raise TypeError(f"LoHa adapts torch.nn.Linear layers; this one is a {type(base_layer).__name__} (PEFT's "
                            "LoHa does not adapt it either)")
        super().__init__(base_layer, adapter_name)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.r: dict = {}
        self.alpha: dict = {}
        self.scaling: dict = {}
        self.rank_dropout: dict = {}
        self.module_dropout: dict = {}
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights)

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool = True) -> None:
        if adapter_name in self.hada_w1_a:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"LoHa rank r must be positive, got {r}")
        out_f, in_f = self.out_features, self.in_features
        # PEFT's draws in PEFT's order: four Kaiming-uniform(a=√5) tensors, the last one zero unless init_weights=False
        factors = [torch.empty(out_f, r), torch.empty(r, in_f), torch.empty(out_f, r), torch.empty(r, in_f)]
        for i, tensor in enumerate(factors):
            if i == 3 and init_weights:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        device = self._param_device()
        for table, tensor in zip((self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b), factors):
            table[adapter_name] = nn.Parameter(tensor.to(device))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = float(rank_dropout)
        self.module_dropout[adapter_name] = float(module_dropout)

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            del table[adapter_name]
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.hada_w1_a.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name], self.hada_w2_a[adapter_name],
                self.hada_w2_b[adapter_name]]

    def _has_adapter(self, name: str) -> bool:
        return name in self.hada_w1_a

    def factored(self, name: str) -> bool:
        """Whether the rank-r² product beats building ΔW (see the module docstring)."""
        r2 = self.r[name] ** 2
        return r2 * (self.in_features + self.out_features) < self.in_features * self.out_features

    # -- training-time randomness, as PEFT draws it ----------------------------------------------------------
    def _skip_and_rows(self, name: str) -> Tuple[bool, Optional[torch.Tensor]]:
        """(skip this adapter for the call, rank-dropout row scale or None). PEFT draws torch.rand(1) on every
        training call (module dropout), then torch.rand(out) when rank_dropout > 0."""
        if not self.training:
            return False, None
        if not bool(torch.rand(1) > self.module_dropout[name]):
            return True, None
        p = self.rank_dropout[name]
        if not p:
            return False, None
        keep = (torch.rand(self.out_features) > p).to(torch.float32)
        return False, keep / keep.mean()

    def delta_weight(self, name: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s·(W1a·W1b) ⊙ (W2a·W2b) as [out, in] (PEFT's order), rows scaled by ``rows`` (rank dropout)."""
        w1a, w1b = self.hada_w1_a[name], self.hada_w1_b[name]
        w2a, w2b = self.hada_w2_a[name], self.hada_w2_b[name]
        weight = ((w1a @ w1b) * (w2a @ w2b)) * self.scaling[name]
        if rows is not None:
            weight = weight * rows.to(weight.device).view(-1, 1)
        return weight

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        """PEFT's computation: base(x) + F.linear(x, ΔW), x cast to ΔW's dtype (fp32 adapters: an fp32 term)."""
        result = bases.base_forward(self.base_layer, x)
        skip, rows = self._skip_and_rows(name)
        if skip:
            return result
        delta = self.delta_weight(name, rows)
        return (result + F.linear(x.to(delta.dtype), delta)).to(x.dtype)

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
        bias, scaling = getattr(base, "bias", None), self.scaling[name]
        if cpp:
            return cpp_ops.lora_linear(x, base.weight, bias, lora_A, lora_B, scaling)
        return custom_ops.lora_linear(x, base.weight, bias, lora_A, lora_B, scaling, 0.0, None)

    def _forward_nf4(self, x, name, compiled):  # pragma: no cover - 4-bit bases are refused in __init__
        raise TypeError("LoHa on a 4-bit base is not supported")

    # -- merge ----------------------------------------------------------------------------------------
    def _merge_into_base(self, name: str) -> None:
        weight = self._base_weight_for_merge()
        weight.add_(self.delta_weight(name).detach().to(weight.dtype))

    def _unmerge_from_base(self, name: str) -> None:
        weight = self._base_weight_for_merge()
        weight.sub_(self.delta_weight(name).detach().to(weight.dtype))

    def _merged_weight(self, name, weight, bias):
        return weight + self.delta_weight(name).detach().to(weight.device), bias

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"

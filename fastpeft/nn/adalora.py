"""AdaLoraLinear: a drop-in for a frozen linear layer with AdaLoRA adapters (PEFT's ``adalora.SVDLinear``).

AdaLoRA (https://openreview.net/forum?id=lq62uWRJjiY) keeps each update in SVD shape, P·Λ·Q:

    y = base(x) + (dropout(x) · (A ⊙ E)ᵀ · Bᵀ) · s / (ranknum + 1e-5)      A [r, in], E [r, 1], B [out, r]

with s = lora_alpha (or r when lora_alpha is 0) and ranknum = r as built. That is LoRA with A' = (A ⊙ E)·s/(ranknum
+ 1e-5), B' = B and scaling 1, so the fast paths form A' (r·in multiplies, nothing next to the GEMMs) and run the
LoRA operators / kernels unchanged; autograd carries dA' back to A and E. The rank allocator (fastpeft/adalora.py)
prunes by zeroing entries of E, and a saved pattern shrinks r (``resize``) while ranknum keeps the rank the
adapter was trained with, so the scaling stays.

Names mirror PEFT's (``lora_A[name]``, ``lora_E[name]``, ``lora_B[name]``, ``ranknum[name]`` parameters in
ParameterDicts, ``lora_dropout[name]``), so parameter names are PEFT's. ``ranknum`` is a frozen parameter, as in
PEFT, and not part of adapter files.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from . import bases
from .layer import AdapterLayer, warn_once

__all__ = ["AdaLoraLinear"]

RANKNUM_EPS = 1e-5  # PEFT's: the update is divided by ranknum + 1e-5


class AdaLoraLinear(AdapterLayer):
    """Frozen base layer + AdaLoRA adapters.

    >>> layer = AdaLoraLinear(nn.Linear(16, 8), "default", r=4, lora_alpha=8)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    >>> tuple(layer.lora_A["default"].shape), tuple(layer.lora_E["default"].shape), float(layer.ranknum["default"])
    ((4, 16), (4, 1), 4.0)
    """

    adapter_kind = "adalora"
    TABLES = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float = 1.0,
                 lora_dropout: float = 0.0, init_lora_weights: bool = True) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                     init_lora_weights: bool = True) -> None:
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"AdaLoRA's rank must be an integer >= 0, got {r!r}")
        device = self._param_device()
        # PEFT's draws, in its order, from torch's global RNG: A, E, B ~ N(0, 1), ranknum's placeholder, then (with
        # init_lora_weights) E zeroed and A, B redrawn from N(0, 0.02²)
        lora_A = torch.randn(r, self.in_features)
        lora_E = torch.randn(r, 1)
        lora_B = torch.randn(self.out_features, r)
        torch.randn(1)  # ranknum's initial value, overwritten with r: drawn only to keep PEFT's RNG stream
        if init_lora_weights:
            nn.init.zeros_(lora_E)
            nn.init.normal_(lora_A, mean=0.0, std=0.02)
            nn.init.normal_(lora_B, mean=0.0, std=0.02)
        self._store(adapter_name, lora_A.to(device), lora_E.to(device), lora_B.to(device),
                    torch.full((1,), float(r), device=device))
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)

    def _store(self, name: str, lora_A, lora_E, lora_B, ranknum) -> None:
        self.lora_A[name] = nn.Parameter(lora_A)
        self.lora_E[name] = nn.Parameter(lora_E)
        self.lora_B[name] = nn.Parameter(lora_B)
        self.ranknum[name] = nn.Parameter(ranknum, requires_grad=False)

    @torch.no_grad()
    def resize(self, adapter_name: str, kept: Sequence[bool]) -> None:
        """Keep only the singular triplets ``kept`` marks (a rank pattern entry, length r): r shrinks, ranknum stays
        (PEFT's resize_modules_by_rank_pattern, so the scaling the adapter was trained with stays). New Parameter
        objects replace the old ones (their shapes change)."""
        if len(kept) != self.r[adapter_name]:
            raise ValueError(f"a rank pattern of length {len(kept)} cannot select from this layer's "
                             f"{self.r[adapter_name]} singular values (adapter {adapter_name!r})")
        index = torch.tensor(list(kept), dtype=torch.bool, device=self.lora_A[adapter_name].device)
        keep_grad = self.lora_A[adapter_name].requires_grad
        self._store(adapter_name, self.lora_A[adapter_name][index].clone(), self.lora_E[adapter_name][index].clone(),
                    self.lora_B[adapter_name][:, index].clone(), self.ranknum[adapter_name].detach().clone())
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(keep_grad)
        self.r[adapter_name] = int(index.sum())

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_E, self.lora_B, self.ranknum, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]]

    def _has_adapter(self, name: str) -> bool:
        return name in self.lora_A

    # -- the LoRA pair this adapter amounts to ------------------------------------------------------------
    def lora_pair(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A' = (A ⊙ E)·s / (ranknum + 1e-5) [r, in], B' = B [out, r]), differentiable in A, E, B."""
        factor = self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)
        return self.lora_A[name] * self.lora_E[name] * factor, self.lora_B[name]

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout._modules[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        """Pure PyTorch in PEFT's order: (dropout(x)·(A ⊙ E)ᵀ·Bᵀ)·s / (ranknum + 1e-5), x cast to A's dtype."""
        result = bases.base_forward(self.base_layer, x)
        lora_A, lora_E, lora_B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(lora_A.dtype))
        delta = (h @ (lora_A * lora_E).T @ lora_B.T) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)
        return (result + delta).to(result.dtype)

    def _forward_dense(self, x, name, cpp):
        if self.r[name] == 0:  # everything pruned: the update is exactly zero
            return bases.base_forward(self.base_layer, x)
        lora_A, lora_B = self.lora_pair(name)
        return self._forward_lora_pair(x, lora_A, lora_B, 1.0, self._dropout_p(name), cpp)

    def _forward_nf4(self, x, name, compiled):
        # 4-bit bases run PEFT's computation (the reference path: the base's own 4-bit forward plus the adapter in
        # fp32). On the QLoRA kernels, whose adapter products round dS to the activation dtype, lora_E's bf16
        # gradient (a sum over in_features of dA'·A, prone to cancellation) was more than 2x PEFT's own bf16 error
        # against an fp32 twin on an H200 (benchmarks/results/h200/gpu_tests_2026-11-30.txt); the C++ operator of
        # dense bases keeps ~16 bits there and passes.
        warn_once("adalora-nf4-reference", "fastpeft: AdaLoRA on 4-bit bases runs PEFT's computation (the reference "
                  "path), not the QLoRA kernels: their bf16 gradient of lora_E is not yet within PEFT's own error")
        return self._forward_reference(x, name)

    # -- merge ----------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """B·(A ⊙ E)·s / (ranknum + 1e-5) as [out, in] in fp32 (PEFT's get_delta_weight, untransposed)."""
        delta = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name])
        return (delta * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)).detach()

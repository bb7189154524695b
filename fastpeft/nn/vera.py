"""VeraLinear: a drop-in for a frozen linear layer with VeRA adapters (PEFT's ``vera.Linear``).

VeRA (https://arxiv.org/abs/2310.11454) shares one pair of frozen random projections across all adapted layers
and trains two vectors per layer:

    y = base(x) + λ_b ⊙ (B_s · (λ_d ⊙ (A_s · dropout(x))))        A_s = vera_A[:, :in] (r × in),
                                                                    B_s = vera_B[:out, :] (out × r)

which is LoRA with A' = diag(λ_d)·A_s, B' = diag(λ_b)·B_s and scaling 1. So the fast paths form A' and B' (r·in +
out·r multiplies, nothing next to the GEMMs) and run the LoRA operators / kernels unchanged; autograd carries
their gradients dA', dB' back to the vectors: dλ_d = rowsum(dA' ⊙ A_s), dλ_b = rowsum(dB' ⊙ B_s).

Names mirror PEFT's (``vera_lambda_b[name]``, ``vera_lambda_d[name]``, ``vera_A`` / ``vera_B`` tables keyed by
adapter name, ``vera_dropout[name]``), so parameter names are PEFT's. The projection tables are one
``VeraProjections`` module per model that every VeraLinear holds as a submodule (so ``.to()`` moves them once), with
non-persistent buffers: the model's state dict does not repeat them per layer; adapter files carry them once, as
PEFT's ``base_model.vera_A`` / ``base_model.vera_B``.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn

from ..ops import HAS_TRITON
from . import bases
from ._rng import dropout_seed
from .layer import AdapterLayer

if HAS_TRITON:
    from ..ops.kernels import custom_ops

__all__ = ["VeraLinear", "VeraProjections", "vera_projections"]


class VeraProjections(nn.Module):
    """One frozen projection per adapter name (non-persistent buffers), shared by every VeraLinear of a model."""

    def __init__(self) -> None:
        super().__init__()

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def set(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def remove(self, name: str) -> None:
        self._buffers.pop(name, None)

    def keys(self) -> List[str]:
        return list(self._buffers.keys())


def _kaiming_uniform(shape: Tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's draw for the projections: U(-b, b) with b = √3·√2/√fan_in, fan_in = shape[1], from the given generator
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, prng_key: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vera_A [r, max_in], vera_B [max_out, r]) in fp32 on the CPU, drawn as PEFT draws them from
    ``torch.Generator("cpu").manual_seed(prng_key)``: A first, then B."""
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


class VeraLinear(AdapterLayer):
    """Frozen base layer + VeRA adapters over shared projections.

    >>> tables = VeraProjections(), VeraProjections()
    >>> a, b = vera_projections(r=4, max_in=16, max_out=8, prng_key=0)
    >>> tables[0].set("default", a); tables[1].set("default", b)
    >>> layer = VeraLinear(nn.Linear(16, 8), "default", *tables, r=4)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "vera"

    def __init__(self, base_layer: nn.Module, adapter_name: str, vera_A: VeraProjections, vera_B: VeraProjections,
                 r: int, vera_dropout: float = 0.0, d_initial: float = 0.1, init_weights: bool = True) -> None:
        super().__init__(base_layer, adapter_name)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict = {}
        self.vera_A = vera_A
        self.vera_B = vera_B
        self.update_layer(adapter_name, r, vera_dropout, d_initial, init_weights)

    def update_layer(self, adapter_name: str, r: int, vera_dropout: float = 0.0, d_initial: float = 0.1,
                     init_weights: bool = True) -> None:
        if adapter_name in self.vera_lambda_b:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if adapter_name not in self.vera_A or adapter_name not in self.vera_B:
            raise ValueError(f"no VeRA projections for adapter {adapter_name!r}")
        rows, max_in = self.vera_A[adapter_name].shape
        max_out, cols = self.vera_B[adapter_name].shape
        if (rows, cols) != (r, r) or max_in < self.in_features or max_out < self.out_features:
            raise ValueError(f"VeRA projections of shapes {(rows, max_in)} / {(max_out, cols)} cannot serve a layer "
                             f"{self.in_features} -> {self.out_features} at r={r}")
        device = self._param_device()
        # PEFT's draws, in its order (torch's global RNG: λ_d ~ N(0, 1) before init_weights overwrites it)
        lambda_b = torch.ones(self.out_features)
        lambda_d = torch.randn(r)
        if init_weights:
            lambda_d.fill_(d_initial)
            lambda_b.zero_()
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(device))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(device))
        self.vera_dropout[adapter_name] = nn.Dropout(p=vera_dropout) if vera_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.vera_lambda_b, self.vera_lambda_d, self.vera_dropout):
            del table[adapter_name]
        del self.r[adapter_name]
        # the shared projections go with the adapter: every layer that holds it is deleting it now (an adapter is
        # deleted from all its layers at once), so removing them from the shared tables on the first is safe
        self.vera_A.remove(adapter_name)
        self.vera_B.remove(adapter_name)

    @property
    def adapter_names(self) -> List[str]:
        return list(self.vera_lambda_b.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name]]

    def _has_adapter(self, name: str) -> bool:
        return name in self.vera_lambda_b

    # -- the LoRA pair this adapter amounts to ------------------------------------------------------------
    def _sliced(self, name: str, device) -> Tuple[torch.Tensor, torch.Tensor]:
        vera_A = self.vera_A[name][:, : self.in_features]
        vera_B = self.vera_B[name][: self.out_features, :]
        return vera_A.to(device), vera_B.to(device)

    def lora_pair(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A' = diag(λ_d)·A_s [r, in], B' = diag(λ_b)·B_s [out, r]) in fp32, differentiable in λ_d, λ_b."""
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        vera_A, vera_B = self._sliced(name, lambda_d.device)
        return lambda_d.unsqueeze(-1) * vera_A.float(), lambda_b.unsqueeze(-1) * vera_B.float()

    def _dropout_p(self, name: str) -> float:
        dropout = self.vera_dropout._modules[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        """Pure PyTorch in PEFT's order: λ_b ⊙ (B_s·(λ_d ⊙ (A_s·dropout(x)))), the input cast to the vectors' dtype."""
        result = bases.base_forward(self.base_layer, x)
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        vera_A, vera_B = self._sliced(name, x.device)
        h = self.vera_dropout[name](x.to(lambda_d.dtype))
        delta = lambda_b * nn.functional.linear(lambda_d * nn.functional.linear(h, vera_A.to(h.dtype)),
                                                vera_B.to(h.dtype))
        return (result + delta).to(result.dtype)

    def _forward_dense(self, x, name, cpp):
        lora_A, lora_B = self.lora_pair(name)
        return self._forward_lora_pair(x, lora_A, lora_B, 1.0, self._dropout_p(name), cpp)

    def _forward_nf4(self, x, name, compiled):
        base = self.base_layer
        packed, quant_state = bases.nf4_parts(base)
        cd = bases.compute_dtype(base, x)
        p = self._dropout_p(name)
        seed = dropout_seed() if p > 0 else None
        lora_A, lora_B = self.lora_pair(name)
        y = custom_ops.nf4_lora_linear(x.to(cd), packed, quant_state, bases.base_bias(base), lora_A, lora_B, 1.0, p,
                                       seed)
        return y.to(x.dtype)

    # -- merge ----------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """(λ_b ⊙ B_s)·(λ_d ⊙ A_s) as [out, in] in fp32."""
        lora_A, lora_B = self.lora_pair(name)
        return (lora_B @ lora_A).detach()

"""LoraLinear: a drop-in for a frozen linear layer with one or more LoRA adapters.

Its attribute names mirror PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``lora_dropout[name]``), so state-dict keys are PEFT's and PEFT tooling that reads them keeps working.
The module holds parameters and chooses a path (``AdapterLayer``); the math lives in ``fastpeft.ops``.
How one adapter computes is its ``LoraVariant`` (``lora_variant[name]``): plain LoRA is ``LoraVariant`` itself,
and a variant such as DoRA subclasses it and overrides what it changes (PEFT's LoraLayer / LoraVariant split).
"""
from __future__ import annotations

import math
from typing import Dict, List, Union

import torch
import torch.nn as nn

from ..ops import HAS_TRITON, cpp_ops
from ..ops.reference import lora_delta_reference
from . import bases
from ._rng import current_rank, dropout_draw, dropout_seed
from .layer import AdapterLayer

if HAS_TRITON:
    from ..ops.kernels import custom_ops


class LoraVariant:
    """How one LoRA adapter of a ``LoraLinear`` computes, merges and initialises. This base class IS plain
    LoRA (Y = base(x) + s·(D⊙x)·Aᵀ·Bᵀ); a variant overrides the methods it changes. Stateless: per-adapter
    state lives on the layer (``layer.lora_A[name]`` etc.), so one instance serves every adapter."""

    kind = "lora"

    def init(self, layer: "LoraLinear", adapter_name: str) -> None:
        """Extra parameters / buffers the variant needs, made after lora_A / lora_B exist (plain LoRA: none)."""

    def forward_reference(self, layer: "LoraLinear", name: str, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch, PEFT's order: base(x) + lora_B(lora_A(dropout(x))) * scaling, dropout from torch's RNG."""
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        result = bases.base_forward(layer.base_layer, x)
        delta = lora_delta_reference(layer.lora_dropout[name](x), lora_A, lora_B, layer.scaling[name])
        return (result + delta).to(result.dtype)

    def forward_dense(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, cpp: bool) -> torch.Tensor:
        """The C++ operator (``cpp``: one dispatcher call, C++ autograd) or the Triton kernels (autograd Function in
        eager, custom op under torch.compile). Both draw the dropout seed from torch's CPU RNG (nn/_rng.py)."""
        base = layer.base_layer
        weight = base.weight.t() if layer.fan_in_fan_out else base.weight
        lora_A, lora_B, bias = layer.lora_A[name].weight, layer.lora_B[name].weight, getattr(base, "bias", None)
        if cpp:
            if p > 0:
                return cpp_ops.lora_linear(x, weight, bias, lora_A, lora_B, layer.scaling[name], p, dropout_draw(),
                                           current_rank())
            return cpp_ops.lora_linear(x, weight, bias, lora_A, lora_B, layer.scaling[name])
        seed = dropout_seed() if p > 0 else None
        return custom_ops.lora_linear(x, weight, bias, lora_A, lora_B, layer.scaling[name], p, seed)

    def forward_nf4(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, compiled: bool) -> torch.Tensor:
        """QLoRA kernels, in the layer's compute dtype as bnb's Linear4bit. Under torch.compile the same call
        reaches the fastpeft::nf4_lora_fwd custom op (one graph node, no break; kernels/custom_ops.py)."""
        base = layer.base_layer
        packed, quant_state = bases.nf4_parts(base)
        cd = bases.compute_dtype(base, x)
        seed = dropout_seed() if p > 0 else None  # an int in eager, a 0-dim tensor under compile (nn/_rng.py)
        y = custom_ops.nf4_lora_linear(x.to(cd), packed, quant_state, bases.base_bias(base), layer.lora_A[name].weight,
                                       layer.lora_B[name].weight, layer.scaling[name], p, seed)
        return y.to(x.dtype)

    def delta_weight(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        """scaling·B·A as [out, in] in fp32."""
        a = layer.lora_A[name].weight.float()
        b = layer.lora_B[name].weight.float()
        return (b @ a) * layer.scaling[name]

    def merged_weight(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> torch.Tensor:
        """base weight [out, in] (fp32) + this adapter."""
        return weight + self.delta_weight(layer, name).to(weight.device)

    def merge(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> None:
        """Add this adapter into the stored base weight in place (Conv1D weights are [in, out])."""
        delta = self.delta_weight(layer, name)
        weight.add_((delta.t() if layer.fan_in_fan_out else delta).to(weight.dtype))

    def unmerge(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> None:
        delta = self.delta_weight(layer, name)
        weight.sub_((delta.t() if layer.fan_in_fan_out else delta).to(weight.dtype))


PLAIN_LORA = LoraVariant()


class LoraLinear(AdapterLayer):
    """Frozen base layer + LoRA adapters.

    >>> layer = LoraLinear(nn.Linear(16, 8), "default", r=4, lora_alpha=8)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_variant: Dict[str, LoraVariant] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    # -- adapters -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                     variant: LoraVariant = PLAIN_LORA):
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        device = self._param_device()
        # Adapter parameters live in fp32 whatever the base dtype (as PEFT); compute casts to the input dtype.
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1.0 / r)
            nn.init.zeros_(lora_B.weight)
        # init_lora_weights=False keeps nn.Linear's random init for both (non-zero delta, useful for tests).
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_variant[adapter_name] = variant
        variant.init(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_variant):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def _has_adapter(self, name: str) -> bool:
        return name in self.lora_A._modules

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout._modules[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    def _forward_reference(self, x, name):
        return self.lora_variant[name].forward_reference(self, name, x)

    def _forward_dense(self, x, name, cpp):
        return self.lora_variant[name].forward_dense(self, name, x, self._dropout_p(name), cpp)

    def _forward_nf4(self, x, name, compiled):
        return self.lora_variant[name].forward_nf4(self, name, x, self._dropout_p(name), compiled)

    # -- merge ----------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change of the [out, in] weight, in fp32."""
        return self.lora_variant[adapter_name].delta_weight(self, adapter_name)

    def _merge_into_base(self, name: str) -> None:
        self.lora_variant[name].merge(self, name, self._base_weight_for_merge())

    def _unmerge_from_base(self, name: str) -> None:
        self.lora_variant[name].unmerge(self, name, self._base_weight_for_merge())

    def _merged_weight(self, name, weight, bias):
        return self.lora_variant[name].merged_weight(self, name, weight), bias

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"

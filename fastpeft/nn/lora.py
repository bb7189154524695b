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

from .layer import AdapterLayer
from .variants import DORA, PLAIN_LORA, DoraVariant, LoraVariant


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
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_variant: Dict[str, LoraVariant] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (PEFT's attribute name)
        self._dora_norms: Dict[str, tuple] = {}  # DoRA: cached weight norm out of training (variants.py)
        self._dora_merge_norms: Dict[str, torch.Tensor] = {}  # DoRA: the unmerged norm of a merged adapter
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora)

    # -- adapters -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                     use_dora: bool = False):
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
        variant = DORA if use_dora else PLAIN_LORA
        self.lora_variant[adapter_name] = variant
        variant.init(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.lora_variant[adapter_name].forget(self, adapter_name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_variant):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return self.lora_variant[adapter_name].parameters_of(self, adapter_name)

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

    def train(self, mode: bool = True):
        self._dora_norms.clear()  # the DoRA norm cache serves eval-mode inference only
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"

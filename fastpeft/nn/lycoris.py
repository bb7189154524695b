"""LycorisLinear: what LoHa and LoKr layers share (PEFT's ``LycorisLayer``): per-adapter r / alpha / scaling, rank and
module dropout drawn from torch's RNG exactly as PEFT draws them, a dense ΔW for merging and for the reference path
(PEFT's computation: base(x) + F.linear(x, ΔW)), and the nn.Linear-only rule. A subclass names its parameter tables
(``TABLES``), creates its parameters (``_create``), gives ``delta_weight`` and a fast ``_forward_dense``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import bases
from .layer import AdapterLayer

__all__ = ["LycorisLinear"]


class LycorisLinear(AdapterLayer):
    """Frozen nn.Linear + LyCORIS-family adapters (LoHa, LoKr)."""

    TABLES: Tuple[str, ...] = ()  # the nn.ParameterDict attributes holding the adapter's parameters (PEFT's names)
    method = ""  # "LoHa" / "LoKr", for messages

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        if bases.is_conv1d(base_layer) or bases.is_linear4bit(base_layer):
            # PEFT's LyCORIS methods adapt nn.Linear / Conv layers only: Conv1D and 4-bit layers are refused there too
            raise TypeError(f"{self.method} adapts torch.nn.Linear layers; this one is a {type(base_layer).__name__} "
                            f"(PEFT's {self.method} does not adapt it either)")
        super().__init__(base_layer, adapter_name)
        for table in self.TABLES:
            setattr(self, table, nn.ParameterDict())
        self.r: dict = {}
        self.alpha: dict = {}
        self.scaling: dict = {}
        self.rank_dropout: dict = {}
        self.module_dropout: dict = {}
        self.rank_dropout_scale: dict = {}

    def _register(self, adapter_name: str, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                  rank_dropout_scale: bool) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"{self.method} rank r must be positive, got {r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = float(rank_dropout)
        self.module_dropout[adapter_name] = float(module_dropout)
        self.rank_dropout_scale[adapter_name] = bool(rank_dropout_scale)

    def _store(self, adapter_name: str, tensors: dict) -> None:
        device = self._param_device()
        for table, tensor in tensors.items():
            getattr(self, table)[adapter_name] = nn.Parameter(tensor.to(device))

    def delete_adapter(self, adapter_name: str) -> None:
        for table in self.TABLES:
            getattr(self, table).pop(adapter_name, None)
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout,
                      self.rank_dropout_scale):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.r.keys())

    def adapter_parameters(self, adapter_name: str):
        return [getattr(self, t)[adapter_name] for t in self.TABLES if adapter_name in getattr(self, t)]

    def _has_adapter(self, name: str) -> bool:
        return name in self.r

    # -- training-time randomness, as PEFT draws it ----------------------------------------------------------
    def _skip_and_rows(self, name: str) -> Tuple[bool, Optional[torch.Tensor]]:
        """(skip this adapter for the call, rank-dropout row scale or None). PEFT draws torch.rand(1) on every
        training call (module dropout), then torch.rand(out) when rank_dropout > 0."""
        if not self.training:
            return False, None
        draw = torch.rand(1)  # drawn even when module dropout is off, as PEFT does: the RNG stream stays PEFT's
        # only a real module dropout branches on the draw (a data-dependent branch: a graph break under compile)
        if self.module_dropout[name] and not bool(draw > self.module_dropout[name]):
            return True, None
        p = self.rank_dropout[name]
        if not p:
            return False, None
        keep = (torch.rand(self.out_features) > p).to(torch.float32)
        return False, (keep / keep.mean() if self.rank_dropout_scale[name] else keep)

    def delta_weight(self, name: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        """PEFT's computation: base(x) + F.linear(x, ΔW), x cast to ΔW's dtype (fp32 adapters: an fp32 term)."""
        result = bases.base_forward(self.base_layer, x)
        skip, rows = self._skip_and_rows(name)
        if skip:
            return result
        delta = self.delta_weight(name, rows)
        return (result + F.linear(x.to(delta.dtype), delta)).to(x.dtype)

    def _forward_nf4(self, x, name, compiled):  # pragma: no cover - 4-bit bases are refused in __init__
        raise TypeError(f"{self.method} on a 4-bit base is not supported")

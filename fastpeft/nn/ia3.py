"""IA3Linear: a drop-in for a frozen linear layer with IA3 scaling vectors.

Attribute names mirror PEFT's ``ia3.Linear`` (``base_layer``, ``ia3_l[name]``, ``is_feedforward``): the
vector is [out, 1] for output scaling and [1, in] for feedforward (input) scaling, as PEFT stores it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..ops import custom_ops
from ..ops import ia3 as ia3_ops
from . import base as B


class IA3Linear(nn.Module):
    """Frozen base layer + IA3 vectors.

    >>> layer = IA3Linear(nn.Linear(16, 8), "default", is_feedforward=False)
    >>> layer(torch.randn(4, 16)).shape
    torch.Size([4, 8])
    """

    adapter_kind = "ia3"

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool = True):
        super().__init__()
        if not B.supported_base(base_layer):
            raise TypeError(f"IA3Linear cannot wrap {type(base_layer).__name__}; supported: {B.SUPPORTED_BASE_TYPES}")
        self.base_layer = base_layer
        self.in_features, self.out_features = B.base_features(base_layer)
        self.fan_in_fan_out = B.is_conv1d(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.backend = B.resolve_backend()
        self.update_layer(adapter_name, init_ia3_weights)
        B.warm_nf4_state(self.base_layer)  # 4-bit base: kernel constants ready before any torch.compile trace

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() can (re)quantize or move a 4-bit base: refresh the constants the compiled path reads
        out = super()._apply(fn, *args, **kwargs)
        B.warm_nf4_state(self.base_layer)
        return out

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        if adapter_name in self.ia3_l:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        weight = getattr(self.base_layer, "weight", None)
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        value = torch.ones(shape, device=device) if init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(value.float())

    def delete_adapter(self, adapter_name: str) -> None:
        del self.ia3_l[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.ia3_l.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.ia3_l[adapter_name]]

    def _forward_nf4(self, x, ia3_l):
        """QLoRA-style IA3 kernels (fastpeft.ops.nf4_lora) in the layer's compute dtype, as bnb's Linear4bit."""
        from ..ops.nf4_lora import nf4_ia3_linear

        packed, quant_state = B.nf4_parts(self.base_layer)
        cd = B.compute_dtype(self.base_layer, x)
        y = nf4_ia3_linear(x.to(cd), packed, quant_state, B.base_bias(self.base_layer), ia3_l, self.is_feedforward)
        return y.to(x.dtype)

    def _forward_nf4_compiled(self, x, ia3_l):
        """_forward_nf4 through the fastpeft::nf4_ia3_fwd custom op, for torch.compile (no graph break; see
        LoraLinear._forward_nf4_compiled for how the 4-bit state is read while tracing)."""
        packed, quant_state = B.nf4_parts(self.base_layer)
        cd = B.compute_dtype(self.base_layer, x)
        y = custom_ops.nf4_ia3_linear(x.to(cd), packed, quant_state, B.base_bias(self.base_layer), ia3_l,
                                      self.is_feedforward)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.disable_adapters or self.merged_adapters or name not in self.ia3_l:
            return B.base_forward(self.base_layer, x)
        ia3_l = self.ia3_l[name]
        if B.wants_triton(self.backend, x):
            if B.is_linear4bit(self.base_layer) and B.nf4_parts(self.base_layer) is not None:
                if torch.compiler.is_compiling():  # torch.library op: no graph break
                    if not B.nf4_constants_ready(self.base_layer):  # see LoraLinear.forward
                        return _forward_nf4_eager(self, x, ia3_l)
                    return self._forward_nf4_compiled(x, ia3_l)
                return self._forward_nf4(x, ia3_l)
            fused = custom_ops.ia3_linear  # autograd.Function in eager, torch.library op under torch.compile
            if fused is not None and not B.is_linear4bit(self.base_layer):
                weight = B.dense_weight(self.base_layer)
                return fused(x, weight, B.base_bias(self.base_layer), ia3_l, self.is_feedforward)
            B.warn_once(
                f"ia3-fallback-{B.is_linear4bit(self.base_layer)}",
                "fastpeft: no Triton IA3 kernel for this base layer yet "
                f"({type(self.base_layer).__name__}); using the reference path",
            )
        scale = ia3_l.reshape(-1).to(x.dtype)
        if self.is_feedforward:
            return B.base_forward(self.base_layer, x * scale)
        return B.base_forward(self.base_layer, x) * scale

    # -- merge ----------------------------------------------------------------------------------------
    def _scale_weight(self, factor: torch.Tensor) -> None:
        """Multiply the base weight (and, for output scaling, the bias) by the IA3 vector, in place."""
        if B.is_linear4bit(self.base_layer):
            raise NotImplementedError(
                "merge() on a 4-bit base would re-quantize the weight (lossy); use fastpeft.merge_and_unload()"
            )
        weight = self.base_layer.weight
        vec = factor.reshape(-1)
        if self.is_feedforward:  # scales input columns: [out, in] * [1, in]
            shaped = vec.reshape(-1, 1) if self.fan_in_fan_out else vec.reshape(1, -1)
        else:  # scales output rows: [out, in] * [out, 1]
            shaped = vec.reshape(1, -1) if self.fan_in_fan_out else vec.reshape(-1, 1)
        weight.mul_(shaped.to(weight.dtype))
        bias = B.base_bias(self.base_layer)
        if not self.is_feedforward and bias is not None:
            bias.mul_(vec.to(bias.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        name = self.active_adapter
        if self.merged_adapters or name not in self.ia3_l:
            return
        self._scale_weight(self.ia3_l[name].data.float())
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._scale_weight(1.0 / self.ia3_l[name].data.float())

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype) -> nn.Linear:
        weight = B.dense_weight(self.base_layer).to(torch.float32)
        bias = B.base_bias(self.base_layer)
        bias = None if bias is None else bias.to(torch.float32)
        name = self.active_adapter
        if name in self.ia3_l and not self.merged_adapters:
            vec = self.ia3_l[name].data.float().reshape(-1).to(weight.device)
            if self.is_feedforward:
                weight = weight * vec.reshape(1, -1)
            else:
                weight = weight * vec.reshape(-1, 1)
                bias = None if bias is None else bias * vec
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.to(dtype))
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend}, feedforward={self.is_feedforward}, adapters={self.adapter_names}"


_forward_nf4_eager = torch.compiler.disable(IA3Linear._forward_nf4)  # see nn/lora.py

"""IA3Linear: a drop-in for a frozen linear layer with IA3 scaling vectors.

Attribute names mirror PEFT's ``ia3.Linear`` (``base_layer``, ``ia3_l[name]``, ``is_feedforward``): the
vector is [out, 1] for output scaling and [1, in] for feedforward (input) scaling, as PEFT stores it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import HAS_TRITON, cpp_ops
from . import bases, mixed_batch
from .layer import AdapterLayer

if HAS_TRITON:
    from ..ops.kernels import custom_ops


class IA3Linear(AdapterLayer):
    """Frozen base layer + IA3 vectors.

    >>> layer = IA3Linear(nn.Linear(16, 8), "default", is_feedforward=False)
    >>> layer(torch.randn(4, 16)).shape
    torch.Size([4, 8])
    """

    adapter_kind = "ia3"

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool = True):
        super().__init__(base_layer, adapter_name)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self._mixed_rows = None  # mixed batches: (names, rows, device, adapters) -> each batch row's vector index
        self.update_layer(adapter_name, init_ia3_weights)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        if adapter_name in self.ia3_l:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self._param_device()
        value = torch.ones(shape, device=device) if init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(value.float())

    def delete_adapter(self, adapter_name: str) -> None:
        del self.ia3_l[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.ia3_l.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.ia3_l[adapter_name]]

    def _has_adapter(self, name: str) -> bool:
        return name in self.ia3_l

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        scale = self.ia3_l[name].reshape(-1).to(x.dtype)
        if self.is_feedforward:
            return bases.base_forward(self.base_layer, x * scale)
        return bases.base_forward(self.base_layer, x) * scale

    def _forward_dense(self, x, name, cpp):
        base = self.base_layer
        ia3 = cpp_ops.ia3_linear if cpp else custom_ops.ia3_linear
        return ia3(x, bases.dense_weight(base), bases.base_bias(base), self.ia3_l[name], self.is_feedforward)

    def _forward_hot(self, x, name):
        # an nn.Linear base (exactly): the general path's C++ operator call, read from the dicts
        base = self._modules["base_layer"]
        vector = self._modules["ia3_l"]._parameters.get(name)
        if type(base) is not nn.Linear or vector is None:
            return None
        params = base._parameters
        return cpp_ops.ia3_linear(x, params["weight"], params["bias"], vector, self.is_feedforward)

    def _forward_nf4(self, x, name, compiled):
        """IA3 kernels on a 4-bit base, in the layer's compute dtype as bnb's Linear4bit (under torch.compile:
        the fastpeft::nf4_ia3_fwd custom op)."""
        base = self.base_layer
        packed, quant_state = bases.nf4_parts(base)
        cd = bases.compute_dtype(base, x)
        y = custom_ops.nf4_ia3_linear(x.to(cd), packed, quant_state, bases.base_bias(base), self.ia3_l[name],
                                      self.is_feedforward)
        return y.to(x.dtype)

    # -- mixed-adapter batches ----------------------------------------------------------------------------
    def _forward_mixed(self, x: torch.Tensor, names) -> torch.Tensor:
        """One adapter per row in one pass: the rows' vectors gathered from the live ``ia3_l`` parameters (ones for
        "__base__" rows and adapters this layer lacks) scale one base product's output, or its input
        (feedforward). Where the C++ operators serve this layer's single-adapter calls (``_dense_path`` "cpp":
        backend cpp, or auto on CUDA) on an nn.Linear base, without autograd, eager: the same fp32 products rounded
        once, so each row equals its adapter's own run bit for bit. Elsewhere one pass per adapter."""
        base = self._modules["base_layer"]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or type(base) is not nn.Linear or \
                x.dim() < 2 or self.merged_adapters or self._dense_path(x) != "cpp":
            return super()._forward_mixed(x, names)
        vectors = self._modules["ia3_l"]._parameters
        order = tuple(vectors)
        key = (tuple(names), x.shape[0], x.device, order)
        hit = self._mixed_rows
        if hit is None or hit[0] != key:
            rows = mixed_batch.adapter_of_rows(names, x.shape[0], order)
            hit = self._mixed_rows = (key, torch.tensor([len(order) if r < 0 else r for r in rows], device=x.device))
        width = self.in_features if self.is_feedforward else self.out_features
        table = torch.cat([torch.stack([v.reshape(-1) for v in vectors.values()]).float(),
                           torch.ones(1, width, device=x.device)])  # live values; the last row: no adapter
        scale = table.index_select(0, hit[1]).view(x.shape[0], *([1] * (x.dim() - 2)), width)
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if weight.dtype != x.dtype:  # the operator computes in x's dtype too
            weight, bias = weight.to(x.dtype), (None if bias is None else bias.to(x.dtype))
        if self.is_feedforward:  # (x⊙l)·Wᵀ + b: x⊙l in fp32, rounded to x's dtype, as the operator's scale pass
            return F.linear((x * scale).to(x.dtype), weight, bias)
        return (F.linear(x, weight, bias) * scale).to(x.dtype)

    # -- merge ----------------------------------------------------------------------------------------
    def _scale_weight(self, factor: torch.Tensor) -> None:
        """Multiply the base weight (and, for output scaling, the bias) by the IA3 vector, in place."""
        weight = self._base_weight_for_merge()
        vec = factor.reshape(-1)
        if self.is_feedforward:  # scales input columns: [out, in] * [1, in]
            shaped = vec.reshape(-1, 1) if self.fan_in_fan_out else vec.reshape(1, -1)
        else:  # scales output rows: [out, in] * [out, 1]
            shaped = vec.reshape(1, -1) if self.fan_in_fan_out else vec.reshape(-1, 1)
        weight.mul_(shaped.to(weight.dtype))
        bias = bases.base_bias(self.base_layer)
        if not self.is_feedforward and bias is not None:
            bias.mul_(vec.to(bias.dtype))

    def _merge_into_base(self, name: str) -> None:
        self._scale_weight(self.ia3_l[name].data.float())

    def _unmerge_from_base(self, name: str) -> None:
        self._scale_weight(1.0 / self.ia3_l[name].data.float())

    def _merged_weight(self, name, weight, bias):
        vec = self.ia3_l[name].data.float().reshape(-1).to(weight.device)
        if self.is_feedforward:
            return weight * vec.reshape(1, -1), bias
        return weight * vec.reshape(-1, 1), (None if bias is None else bias * vec)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, feedforward={self.is_feedforward}, adapters={self.adapter_names}"

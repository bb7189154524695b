"""LoraLinear: a drop-in for a frozen linear layer with one or more LoRA adapters.

Its attribute names mirror PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``lora_dropout[name]``), so state-dict keys are PEFT's and PEFT tooling that reads them keeps working.
The module only chooses a path and holds parameters; the math lives in ``fastpeft.ops.lora``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Union

import torch
import torch.nn as nn

from ..ops import custom_ops
from ..ops import lora as lora_ops
from . import base as B
from ._rng import dropout_seed


class LoraLinear(nn.Module):
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
        super().__init__()
        if not B.supported_base(base_layer):
            raise TypeError(
                f"LoraLinear cannot wrap {type(base_layer).__name__}; supported: {B.SUPPORTED_BASE_TYPES}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = B.base_features(base_layer)
        self.fan_in_fan_out = B.is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.backend = B.resolve_backend()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
        B.warm_nf4_state(self.base_layer)  # 4-bit base: kernel constants ready before any torch.compile trace

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() can (re)quantize or move a 4-bit base: refresh the constants the compiled path reads
        out = super()._apply(fn, *args, **kwargs)
        B.warm_nf4_state(self.base_layer)
        return out

    # -- adapters -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, use_rslora=False):
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

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def _param_device(self):
        weight = getattr(self.base_layer, "weight", None)
        return weight.device if weight is not None and weight.device.type != "meta" else None

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Hot path: plain dict lookups (self._modules) instead of nn.Module.__getattr__, each base-layer test
        # once -- eager training is host-bound on slow hosts (benchmarks/host_overhead.py).
        name = self.active_adapter
        mods = self._modules
        base = mods["base_layer"]
        a_mods = mods["lora_A"]._modules
        if self.disable_adapters or self.merged_adapters or name not in a_mods:
            return B.base_forward(base, x)
        lora_A = a_mods[name].weight
        lora_B = mods["lora_B"]._modules[name].weight
        scaling = self.scaling[name]
        dropout = mods["lora_dropout"]._modules[name]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        if B.wants_triton(self.backend, x):
            four_bit = B.is_linear4bit(base)
            if four_bit and B.nf4_parts(base) is not None:
                if torch.compiler.is_compiling():  # torch.library op: no graph break (see _forward_nf4_compiled)
                    if not B.nf4_constants_ready(base):  # state replaced since build / .to(): run this call
                        return _forward_nf4_eager(self, x, lora_A, lora_B, scaling, p)  # eagerly (fills it)
                    return self._forward_nf4_compiled(x, lora_A, lora_B, scaling, p)
                return self._forward_nf4(x, lora_A, lora_B, scaling, p)
            fused = custom_ops.lora_linear  # autograd.Function in eager, torch.library op under torch.compile
            if fused is not None and not four_bit:
                seed = dropout_seed() if p > 0 else None  # torch CPU RNG + rank: see nn/_rng.py
                weight = base.weight.t() if B.is_conv1d(base) else base.weight
                return fused(x, weight, getattr(base, "bias", None), lora_A, lora_B, scaling, p, seed)
            B.warn_once(
                f"lora-fallback-{B.is_linear4bit(self.base_layer)}",
                "fastpeft: no Triton LoRA kernel for this base layer yet "
                f"({type(self.base_layer).__name__}); using the reference path",
            )
        result = B.base_forward(self.base_layer, x)
        # PEFT's order: base(x) + lora_B(lora_A(dropout(x))) * scaling; dropout uses torch's RNG like PEFT.
        return (result + lora_ops.lora_delta_reference(dropout(x), lora_A, lora_B, scaling)).to(result.dtype)

    def _forward_nf4(self, x, lora_A, lora_B, scaling, p):
        """QLoRA kernels (fastpeft.ops.nf4_lora): compute in the layer's compute dtype, as bnb's Linear4bit."""
        from ..ops.nf4_lora import nf4_lora_linear

        packed, quant_state = B.nf4_parts(self.base_layer)
        cd = B.compute_dtype(self.base_layer, x)
        seed = dropout_seed() if p > 0 else None  # the same draw as the dense kernels (nn/_rng.py)
        y = nf4_lora_linear(x.to(cd), packed, quant_state, B.base_bias(self.base_layer), lora_A, lora_B, scaling, p, seed)
        return y.to(x.dtype)

    # Under torch.compile: the same computation through the fastpeft::nf4_lora_fwd custom op, traced by dynamo
    # (one graph node per layer, no graph break). Dynamo only reads attributes here -- the Params4bit's .data and
    # .quant_state, the state's tensors -- and never runs an op on the Params4bit itself; the scalars that need
    # the state's data (offset, code id) are trace-time constants (custom_ops._nf4_constants). (Tracing
    # _forward_nf4 itself graph-breaks in kernel_state on float(offset), and under torch 2.13 dynamo then
    # recursed without end through Params4bit.__torch_function__: why this was torch.compiler.disable'd.)
    # No per-module cache of the kernel tensors: it would need a freshness check (data_ptr / device) that
    # dynamo cannot trace without a break either, while attribute reads are guarded by dynamo itself.
    # Separate from _forward_nf4 so eager calls pay no extra dispatch.
    def _forward_nf4_compiled(self, x, lora_A, lora_B, scaling, p):
        packed, quant_state = B.nf4_parts(self.base_layer)
        cd = B.compute_dtype(self.base_layer, x)
        seed = dropout_seed() if p > 0 else None  # a 0-dim tensor under compile (nn/_rng.py): no .item()
        y = custom_ops.nf4_lora_linear(x.to(cd), packed, quant_state, B.base_bias(self.base_layer), lora_A, lora_B,
                                       scaling, p, seed)
        return y.to(x.dtype)

    # -- merge ----------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling·B·A as [out, in] in fp32."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    def _merge_target(self) -> torch.Tensor:
        if B.is_linear4bit(self.base_layer):
            raise NotImplementedError(
                "merge() on a 4-bit base would re-quantize the weight (lossy); use fastpeft.merge_and_unload(), "
                "which dequantizes and merges into a dense layer"
            )
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        name = self.active_adapter
        if self.merged_adapters or name not in self.lora_A:
            return
        weight = self._merge_target()
        delta = self.delta_weight(name)
        weight.add_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self._merge_target()
            delta = self.delta_weight(name)
            weight.sub_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear (on the weight's device) holding base + active adapter (for merge_and_unload)."""
        weight = B.dense_weight(self.base_layer).to(torch.float32)
        name = self.active_adapter
        if name in self.lora_A and not self.merged_adapters:
            weight = weight + self.delta_weight(name).to(weight.device)
        bias = B.base_bias(self.base_layer)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.to(dtype))
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"


# One graph break, taken only when the state's kernel constants are missing (the next call recompiles into the
# custom-op path). A break *inside* the traced NF4 path sends dynamo into bnb's Params4bit, which recursed
# without end (torch 2.13): the whole call is kept out of tracing instead.
_forward_nf4_eager = torch.compiler.disable(LoraLinear._forward_nf4)

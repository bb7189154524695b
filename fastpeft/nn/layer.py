"""AdapterLayer: what every adapted-layer drop-in shares (LoRA and IA3 build on it).

It holds the bookkeeping once (the base layer, features, the active / merged / disabled adapter state, the
backend chosen when it was built), refreshes the 4-bit kernel constants after ``.to()``, makes the forward
decision, and owns the merge tail. Subclasses say what their adapter parameters are and implement one method
per path:

    path            when                                                             subclass method
    "reference"     no kernels wanted / possible (CPU under auto, backend reference, _forward_reference(x, name)
                    no Triton, bf16 in Triton's interpreter, bnb's CPU-packed 4-bit)
    dense           kernels on a Linear / Conv1D base: the C++ operators (auto on    _forward_dense(x, name, cpp)
                    CUDA when they build, backend cpp) or the Triton kernels
    nf4 C++         a method's C++ operator on a 4-bit base (eager; backend cpp, or   _forward_nf4_cpp(x, name)
                    auto on CUDA where it suits the call), when it returns a result
    "nf4"           Triton kernels on a 4-bit base (eager, or under torch.compile)   _forward_nf4(x, name, compiled)
    outside graph   4-bit under torch.compile when the QuantState's kernel constants _forward_nf4(x, name, False)
                    are missing: that one call runs eagerly (fills them)            via _nf4_outside_graph
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .. import settings
from ..ops import HAS_TRITON, KERNEL_DTYPES, cpp_ops
from . import bases, mixed_batch
from ._rng import current_rank, dropout_draw, dropout_seed

if HAS_TRITON:
    from ..ops.kernels import custom_ops

_warned: set = set()
# class -> torch.compiler.disable(cls._forward_nf4_eager): the single compile-disabled 4-bit fallback. Made when
# the first 4-bit layer of a class is built (torch.compiler.disable imports torch._dynamo: ~0.8 s, not at import).
_OUTSIDE_GRAPH: Dict[type, object] = {}


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class AdapterLayer(nn.Module):
    """Base of the adapted-layer drop-ins (``LoraLinear``, ``IA3Linear``): a frozen base layer + adapters.

    Subclasses define ``adapter_kind``, ``adapter_names``, ``adapter_parameters(name)``, ``delete_adapter``, the
    ``_forward_*`` methods of the module docstring, and either ``delta_weight(name)`` (an additive [out, in] change:
    the default merge hooks use it) or the merge hooks ``_merge_into_base(name)``, ``_unmerge_from_base(name)`` and
    ``_merged_weight(name, weight, bias)`` themselves.
    """

    adapter_kind = ""
    wraps_embeddings = False  # LoraEmbedding: an nn.Embedding base instead of a linear-type one
    has_nf4_cpp = False  # LoraLinear: a C++ operator for 4-bit bases (_forward_nf4_cpp)

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if self.wraps_embeddings != bases.is_embedding(base_layer) or not (
                bases.supported_base(base_layer) or self.wraps_embeddings):
            raise TypeError(f"{type(self).__name__} cannot wrap {type(base_layer).__name__}; supported: "
                            f"{'torch.nn.Embedding' if self.wraps_embeddings else bases.SUPPORTED_BASE_TYPES}")
        backend = settings.get().backend
        if backend == "triton" and not HAS_TRITON:
            raise ValueError("FASTPEFT_BACKEND=triton but Triton is not installed (pip install triton, on Linux); "
                             "use FASTPEFT_BACKEND=auto or reference")
        if backend == "cpp" and not cpp_ops.available():
            raise ValueError(f"FASTPEFT_BACKEND=cpp but fastpeft's C++ operators cannot be built here: "
                             f"{cpp_ops.EXTENSION.toolchain_problem() or 'see the warning above'}; use "
                             "FASTPEFT_BACKEND=auto, triton or reference")
        self.base_layer = base_layer
        self.in_features, self.out_features = bases.base_features(base_layer)
        self.fan_in_fan_out = bases.is_conv1d(base_layer)
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.backend = backend
        if bases.is_linear4bit(base_layer):
            if type(self) not in _OUTSIDE_GRAPH:
                _OUTSIDE_GRAPH[type(self)] = torch.compiler.disable(type(self)._forward_nf4_eager)
            bases.warm_nf4_state(base_layer)  # kernel constants ready before any torch.compile trace
        self._load_cpp_ops_if_cuda()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() can (re)quantize or move a 4-bit base: refresh the constants the compiled path reads
        out = super()._apply(fn, *args, **kwargs)
        bases.warm_nf4_state(self.base_layer)
        self._load_cpp_ops_if_cuda()
        return out

    def _load_cpp_ops_if_cuda(self) -> None:
        """Under ``auto``, load (the first time: build) the C++ operators as soon as the base weight is on a CUDA
        device. A torch.compile trace never loads them (``cpp_ops.available()`` is False while dynamo traces), so a
        model patched and compiled before any eager call used to trace the Triton custom ops instead: on an H200 a
        host-bound compiled step (1B shape, one device call: 1.02x compiled PEFT, against 1.17x with the operators;
        benchmarks/results/h200/INDEX.md, session 18). CPU-only models never ask (no build attempt)."""
        if getattr(self, "backend", None) != "auto" or cpp_ops.loaded() or torch.compiler.is_compiling() or \
                self.wraps_embeddings or (bases.is_linear4bit(self.base_layer) and not self.has_nf4_cpp):
            return  # (4-bit bases ask only for a method with a 4-bit operator, as _forward_adapter does)
        weight = getattr(self.base_layer, "weight", None)
        if weight is not None and weight.is_cuda:
            cpp_ops.available()  # warns once (and the layers keep their Triton path) where it cannot build

    # -- what subclasses provide -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _param_device(self) -> Optional[torch.device]:
        """Where new adapter parameters go: the base weight's device, the meta device included (as PEFT)."""
        weight = getattr(self.base_layer, "weight", None)
        return weight.device if weight is not None else None

    # -- forward ------------------------------------------------------------------------------------------
    def _dense_path(self, x: torch.Tensor) -> str:
        """"cpp" (the C++ operators), "triton" (the Triton kernels) or "reference" for a Linear / Conv1D base."""
        backend = self.backend
        if backend == "reference":
            return "reference"
        if backend == "cpp":
            return "cpp"
        if backend == "auto":
            if not x.is_cuda or x.dtype not in KERNEL_DTYPES:  # float64: PyTorch's math, not an operator's error
                return "reference"
            if cpp_ops.available():  # the first call may build the extension (cached on disk afterwards)
                return "cpp"
            return "triton" if HAS_TRITON else "reference"
        return "triton" if self._triton_can_run(x) else "reference"

    def _triton_can_run(self, x: torch.Tensor) -> bool:
        if not HAS_TRITON:
            return False
        if not x.is_cuda and not settings.get().triton_interpret:
            warn_once("triton-cpu", "fastpeft: the Triton kernels run on CPU tensors only in Triton's interpreter "
                      "(TRITON_INTERPRET=1, set before Python starts); these layers use the PyTorch reference path "
                      "(the same numbers) instead")
            return False
        if not x.is_cuda and settings.get().triton_interpret and x.dtype == torch.bfloat16:
            warn_once("bf16-interpreter", "fastpeft: bfloat16 in Triton's interpreter (TRITON_INTERPRET=1) would give "
                      "wrong numbers (its bf16 arithmetic is broken); these layers use the PyTorch reference "
                      "path instead. Use float16 / float32 to run the kernels in the interpreter.")
            return False
        return True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The hot path: an eager call the C++ operators serve (backend cpp, or auto on CUDA, the extension loaded),
        # adapters on and unmerged, no mixed batch. Its checks read the module's dicts directly and skip the
        # general path's layers of calls: ~30 µs of Python per call on a slow host, paid again in the recompute of
        # every checkpointed layer (issue 13). The subclass's _forward_hot returns None where it does not apply
        # (then the general path below decides, with the same result).
        # A mixed batch (adapter_names=) in the same state goes straight to _forward_mixed: decode runs it per layer
        # and token.
        state = self.__dict__
        if not state["disable_adapters"] and not state["merged_adapters"] and cpp_ops.loaded() and (
                state["backend"] == "cpp" or (state["backend"] == "auto" and x.is_cuda and x.dtype in KERNEL_DTYPES)) \
                and not torch.compiler.is_compiling():
            names = mixed_batch.eager_current()
            if names is not None:
                return self._forward_mixed(x, names)
            y = self._forward_hot(x, state["active_adapter"])
            if y is not None:
                return y
        names = mixed_batch.current()
        if names is not None and not self.disable_adapters:
            return self._forward_mixed(x, names)
        name = self.active_adapter
        base = self._modules["base_layer"]  # plain dict lookup: the hot path is host-bound on slow hosts
        if self.disable_adapters or self.merged_adapters or not self._has_adapter(name):
            return bases.base_forward(base, x)
        return self._forward_adapter(x, name)

    def _forward_hot(self, x: torch.Tensor, name: str) -> Optional[torch.Tensor]:
        """The C++ operator's result for adapter ``name`` when this layer's state allows the hot path of
        ``forward`` (its caller checked backend, device, disable / merge, mixed batch, compile), else None. Must
        give exactly what the general path gives. Default: never applies."""
        return None

    def _forward_mixed(self, x: torch.Tensor, names) -> torch.Tensor:
        """One adapter per row (nn/mixed_batch.py): each adapter's rows through its single-adapter path."""
        if self.merged_adapters:
            raise ValueError("adapter_names= cannot run while adapters are merged into the base weights: "
                             "fastpeft.unmerge(model) first")
        base = self._modules["base_layer"]

        def run(sub: torch.Tensor, name: str) -> torch.Tensor:
            if name == mixed_batch.BASE or not self._has_adapter(name):  # PEFT: a layer without it runs the base
                return bases.base_forward(base, sub)
            return self._forward_adapter(sub, name)

        return mixed_batch.forward_mixed(x, names, run)

    def _forward_adapter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The path decision of the module docstring for adapter ``name``."""
        base = self._modules["base_layer"]
        if not bases.is_linear4bit(base):
            path = self._dense_path(x)
            if path == "reference":
                return self._forward_reference(x, name)
            return self._forward_dense(x, name, path == "cpp")
        # 4-bit bases: the method's C++ operator where it has one and the call suits it (_forward_nf4_cpp), else
        # the Triton QLoRA kernels (under auto on CUDA tensors, cpp, triton)
        if self._nf4_cpp_wanted(x):
            y = self._forward_nf4_cpp(x, name)
            if y is not None:
                return y
        if self.backend == "reference" or (self.backend == "auto" and not x.is_cuda) or not self._triton_can_run(x):
            return self._forward_reference(x, name)
        if bases.nf4_parts(base) is None:
            warn_once(f"cpu-packed-{self.adapter_kind}", "fastpeft: bitsandbytes repacked this 4-bit weight for its "
                      "CPU inference kernel; the kernels cannot read that layout, so these layers use the "
                      "PyTorch reference path")
            return self._forward_reference(x, name)
        if torch.compiler.is_compiling():
            if not bases.nf4_constants_ready(base):  # state replaced since build / .to(): this call runs eagerly
                return _OUTSIDE_GRAPH[type(self)](self, x, name)
            return self._forward_nf4(x, name, True)
        return self._forward_nf4(x, name, False)

    def _nf4_cpp_wanted(self, x: torch.Tensor) -> bool:
        """Whether a 4-bit layer's call may take the C++ operators: the method has one (``has_nf4_cpp``), and backend
        cpp (any device) or auto on CUDA tensors of a kernel dtype with the extension built; eager only (under
        torch.compile the Triton custom ops). Methods without one never ask for the extension (no build attempt)."""
        if not self.has_nf4_cpp:
            return False
        backend = self.backend
        if backend == "cpp":
            return not torch.compiler.is_compiling()
        return (backend == "auto" and x.is_cuda and x.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling()
                and cpp_ops.available())

    def _forward_nf4_cpp(self, x: torch.Tensor, name: str) -> Optional[torch.Tensor]:
        """Adapter ``name`` on a 4-bit base through the method's C++ operator, or None where it has none or the call
        does not suit it (the Triton path then runs). Default: none."""
        return None

    def _forward_lora_pair(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                           dropout_p: float, cpp: bool) -> torch.Tensor:
        """base(x) + scaling·((D⊙x)·Aᵀ)·Bᵀ on the Linear / Conv1D base through LoRA's C++ operator (``cpp``: one
        dispatcher call, C++ autograd) or its Triton kernels (autograd Function in eager, custom op under compile):
        the dense path of every method that forms a LoRA pair (LoRA, VeRA, LoHa, AdaLoRA). The dropout seed comes
        from torch's CPU RNG (nn/_rng.py)."""
        base = self._modules["base_layer"]
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        bias = getattr(base, "bias", None)
        if cpp:
            if dropout_p > 0:
                return cpp_ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_draw(),
                                           current_rank())
            return cpp_ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling)
        seed = dropout_seed() if dropout_p > 0 else None
        return custom_ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)

    def _forward_nf4_eager(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Kept out of tracing as a whole (_OUTSIDE_GRAPH): a graph break *inside* the traced 4-bit path sends dynamo
        # into bnb's Params4bit, which recursed without end (torch 2.13).
        return self._forward_nf4(x, name, False)

    def _has_adapter(self, name: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- merge ----------------------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        if bases.is_linear4bit(self.base_layer):
            raise NotImplementedError(
                "merge() on a 4-bit base would re-quantize the weight (lossy); use fastpeft.merge_and_unload(), "
                "which dequantizes and merges into a dense layer"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight (dense bases; 4-bit raises)."""
        name = self.active_adapter
        if self.merged_adapters or not self._has_adapter(name):
            return
        self._check_mergeable()
        self._merge_into_base(name)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters out of the base weight again (up to floating-point rounding)."""
        while self.merged_adapters:
            self._unmerge_from_base(self.merged_adapters.pop())

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear (on the weight's device) holding base + active adapter (for merge_and_unload)."""
        weight = bases.dense_weight(self.base_layer).to(torch.float32)
        bias = bases.base_bias(self.base_layer)
        bias = None if bias is None else bias.to(torch.float32)
        name = self.active_adapter
        if self._has_adapter(name) and not self.merged_adapters:
            weight, bias = self._merged_weight(name, weight, bias)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.to(dtype))
        return out

    def _base_weight_for_merge(self) -> torch.Tensor:
        return self.base_layer.weight

    # The merge hooks of the methods whose adapter adds ``delta_weight(name)`` ([out, in], fp32) to the frozen weight
    # (VeRA, LoHa, LoKr, AdaLoRA); LoRA (through its variants), IA3 and OFT override them.
    def _merge_into_base(self, name: str) -> None:
        weight, delta = self._base_weight_for_merge(), self.delta_weight(name).detach()
        weight.add_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))

    def _unmerge_from_base(self, name: str) -> None:
        weight, delta = self._base_weight_for_merge(), self.delta_weight(name).detach()
        weight.sub_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))

    def _merged_weight(self, name: str, weight: torch.Tensor, bias):
        return weight + self.delta_weight(name).detach().to(weight.device), bias

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"

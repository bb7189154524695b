"""How one LoRA adapter of a ``LoraLinear`` computes, merges and initialises (PEFT's LoraVariant split).

    LoraVariant / PLAIN_LORA   plain LoRA: Y = base(x) + s·(D⊙x)·Aᵀ·Bᵀ
    DoraVariant / DORA         DoRA (``use_dora=True``): the LoRA-updated weight's direction, rescaled per output
                               row by a trainable magnitude m (``lora_magnitude_vector[name].weight``, fp32 [out])

Variants are stateless: per-adapter state lives on the layer (``layer.lora_A[name]`` etc.), so one instance
serves every adapter; the layer passes itself in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops import HAS_TRITON, cpp_ops, graph_capturing
from ..ops.nf4_format import kernel_state
from ..ops.reference import (dora_initial_magnitude_reference, dora_update_reference, dora_weight_norm_reference,
                             lora_delta_reference)
from . import bases
from ._rng import current_rank, dropout_draw, dropout_seed
from .layer import warn_once
from .mixed_batch import TransientCache

if HAS_TRITON:
    from ..ops.kernels import custom_ops
    from ..ops.kernels.nf4_lora import nf4_path

# "LoraLinear" in the annotations below is fastpeft.nn.lora.LoraLinear (not imported: lora.py imports this module)
__all__ = ["LoraVariant", "PLAIN_LORA", "DoraVariant", "DORA", "DoraMagnitude", "nf4_cpp_plan"]


class LoraVariant:
    """How one LoRA adapter of a ``LoraLinear`` computes, merges and initialises. This base class IS plain
    LoRA (Y = base(x) + s·(D⊙x)·Aᵀ·Bᵀ); a variant overrides the methods it changes. Stateless: per-adapter
    state lives on the layer (``layer.lora_A[name]`` etc.), so one instance serves every adapter."""

    kind = "lora"
    _instance_name = "PLAIN_LORA"  # the module-level instance (below) that copies and pickles resolve to

    def __reduce__(self):
        # One stateless instance per variant, compared by identity (LoraLinear's hot path, projection groups): a
        # deepcopy or pickle of a layer must give back that instance, not a new one -- a new one silently sent
        # every copied layer down the general path. A string here means "the global of that name in this module".
        return self._instance_name

    def init(self, layer: "LoraLinear", adapter_name: str) -> None:
        """Extra parameters / buffers the variant needs, made after lora_A / lora_B exist (plain LoRA: none)."""

    def parameters_of(self, layer: "LoraLinear", name: str):
        """The adapter's trainable parameters."""
        return [layer.lora_A[name].weight, layer.lora_B[name].weight]

    def forget(self, layer: "LoraLinear", name: str) -> None:
        """Drop what ``init`` added when the adapter is deleted (plain LoRA: nothing)."""

    def forward_reference(self, layer: "LoraLinear", name: str, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch, PEFT's order: base(x) + lora_B(lora_A(dropout(x))) * scaling, dropout from torch's RNG."""
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        result = bases.base_forward(layer.base_layer, x)
        delta = lora_delta_reference(layer.lora_dropout[name](x), lora_A, lora_B, layer.scaling[name])
        return (result + delta).to(result.dtype)

    def forward_dense(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, cpp: bool) -> torch.Tensor:
        """The C++ operator (``cpp``: one dispatcher call, C++ autograd) or the Triton kernels (autograd Function in
        eager, custom op under torch.compile). Both draw the dropout seed from torch's CPU RNG (nn/_rng.py)."""
        return layer._forward_lora_pair(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name],
                                        p, cpp)

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

    def forward_nf4_cpp(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
        """QLoRA through the C++ operator (one dispatcher call, C++ autograd; W dequantized per GEMM, never kept), in
        the layer's compute dtype, or None where the Triton path serves the call better: under backend auto the
        sizes at which ``nf4_path`` picks the in-kernel-dequant GEMM or the decode GEMV (they read W as 4 bits;
        the operator writes and reads it dense)."""
        plan = nf4_cpp_plan(layer, x)
        if plan is None:
            return None
        packed, ks, cd = plan
        modules = layer._modules  # the dicts, not module attribute lookups: the hot path calls this per layer
        bias = bases.base_bias(modules["base_layer"])
        lora_A = modules["lora_A"]._modules[name]._parameters["weight"]
        lora_B = modules["lora_B"]._modules[name]._parameters["weight"]
        xc = x if x.dtype == cd else x.to(cd)  # (Tensor.to costs ~2 µs even when it returns x itself)
        if p > 0:
            y = cpp_ops.nf4_lora_linear(xc, packed, ks, bias, lora_A, lora_B, layer.scaling[name], p, dropout_draw(),
                                        current_rank())
        else:
            y = cpp_ops.nf4_lora_linear(xc, packed, ks, bias, lora_A, lora_B, layer.scaling[name])
        return y if y.dtype == x.dtype else y.to(x.dtype)

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


def nf4_cpp_plan(layer: "LoraLinear", x: torch.Tensor):
    """(packed bytes, KernelState, compute dtype) when a 4-bit layer's call takes the C++ operators, else None: bnb's
    CPU-packed layout (the reference reads it), a base weight that requires grad (the operators take it frozen), and
    under backend auto the sizes the Triton path serves from the 4-bit bytes directly (``nf4_path`` "fused":
    training's small M; no-grad decode takes the NF4 GEMV on that path).

    The triple is kept on the layer (``_nf4_plans``, a TransientCache: copies and pickles start empty) under a key of
    cheap reads -- the base weight's identity and storage, the QuantState's and its absmax's identities, bnb's CPU
    packing flag, the layer's compute dtype, x's device and dtype -- so any replaced weight, state or absmax, or
    another device / dtype, rebuilds it. The hot path pays the key per call (~2 µs) instead of the lookups it
    replaces (~11 µs on the CI host: nf4_parts, kernel_state's device normalisation, compute_dtype)."""
    base = layer._modules["base_layer"]
    weight = base.weight
    if getattr(weight, "requires_grad", False):
        return None
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    key = (id(weight), weight.data_ptr(), id(state), id(getattr(state, "absmax", None)),
           getattr(state, "packing_format_for_cpu", False), getattr(base, "compute_dtype", None), x.device, x.dtype)
    cache = layer.__dict__.get("_nf4_plans")
    hit = None if cache is None else cache.get("plan")
    if hit is not None and hit[0] == key:
        plan = hit[1]
    else:
        parts = bases.nf4_parts(base)
        if parts is None:
            return None
        packed, quant_state = parts
        plan = (packed, kernel_state(quant_state, x.device), bases.compute_dtype(base, x))
        if cache is None:  # layers built (or unpickled) before the cache existed
            cache = layer.__dict__["_nf4_plans"] = TransientCache()
        cache["plan"] = (key, plan)
    if layer.backend == "auto" and HAS_TRITON and nf4_path(x.numel() // max(1, x.shape[-1]), plan[1],
                                                           plan[2]) == "fused":
        return None
    return plan


# Out of training on the C++ operators, inputs of 17 to this many rows take LoRA's operator and a g⊙· rescale
# (host-bound sizes: one dispatcher call and one in-place multiply); the others go to dora_linear with the cached
# norm, whose dora_infer runs LoRA's decode kernels with g and the bias in the last one (up to
# _DORA_DECODE_MAX_ROWS rows) or the base GEMM, the shrink and one output pass taking g = m / n itself (H200,
# benchmarks/results/h200/INDEX.md, session 26: 1.02-1.08x LoRA's GPU time at M = 4096, 1.01-1.03x at M = 16).
_RESCALE_MAX_ROWS = 64
# Decode-sized inference with a cached norm goes to dora_linear itself: its CUDA operator then runs LoRA's decode
# kernels with g and the bias folded into the expand (csrc/adapter_cuda.cu: kDecodeAutoMaxM, the same 16 rows)
_DORA_DECODE_MAX_ROWS = 16


class DoraMagnitude(nn.Module):
    """Holds one DoRA adapter's magnitude vector as ``.weight`` (fp32 [out]): PEFT's ``lora_magnitude_vector[name]``
    is a module with that parameter, so state-dict keys (``...lora_magnitude_vector.<name>.weight``) match."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class DoraVariant(LoraVariant):
    """DoRA (PEFT ``use_dora=True``): Y = base(x) + (g-1)⊙base_term + g⊙s·(D⊙x)·Aᵀ·Bᵀ with g = m / ‖W + s·B·A‖ per
    output row, the norm detached (PEFT / the DoRA paper §4.3); at p = 0 base_term is x·Wᵀ (so Y = g⊙(x·Wᵀ +
    s·x·Aᵀ·Bᵀ) + bias), with dropout PEFT's second base product (D⊙x)·Wᵀ. Math and kernels:
    ``fastpeft/ops/kernels/dora.py``; oracle: ``ops/reference.py: dora_update_reference``.

    Out of training (module in eval mode, no autograd), the norm is cached per adapter and recomputed whenever the
    base weight, lora_A, lora_B or the magnitude change (tensor identity and version counters), so unmerged
    inference does not pay for the norm (docs/dora.md has what it costs against LoRA)."""

    kind = "dora"
    _instance_name = "DORA"

    def init(self, layer: "LoraLinear", adapter_name: str) -> None:
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if lora_A.device.type == "meta":
            magnitude = torch.empty(layer.out_features, device="meta", dtype=torch.float32)
        else:
            # PEFT: ‖W + s·B·A‖ of the weights at creation (B = 0 at the default init), computed in the dtype PEFT
            # has cast the new adapter to: the base weight's if that is floating point (a 4-bit base's stays fp32)
            base_weight = bases.dense_weight(layer.base_layer)  # a 4-bit base: dequantized
            adapter_dtype = None if bases.is_linear4bit(layer.base_layer) else base_weight.dtype
            with torch.no_grad():
                magnitude = dora_initial_magnitude_reference(base_weight.to(lora_A.device), lora_A, lora_B,
                                                             layer.scaling[adapter_name], adapter_dtype)
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def parameters_of(self, layer: "LoraLinear", name: str):
        return super().parameters_of(layer, name) + [layer.lora_magnitude_vector[name].weight]

    def forget(self, layer: "LoraLinear", name: str) -> None:
        del layer.lora_magnitude_vector[name]
        layer._dora_norms.pop(name, None)
        layer._dora_merge_norms.pop(name, None)

    # -- forward --------------------------------------------------------------------------------------
    def forward_reference(self, layer: "LoraLinear", name: str, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch in PEFT's order (``dora_update_reference``), dropout from torch's RNG as PEFT."""
        base = layer.base_layer
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        result = bases.base_forward(base, x)
        dropout = layer.lora_dropout[name]
        dropped = None
        if layer.training and isinstance(dropout, nn.Dropout):
            dropped = dropout(x.to(lora_A.dtype))  # PEFT casts to the adapter dtype, then drops
        return dora_update_reference(x, result, bases.dense_weight(base), bases.base_bias(base), lora_A, lora_B,
                                     layer.lora_magnitude_vector[name].weight, layer.scaling[name], dropped)

    def _kernels_can_run(self, layer: "LoraLinear", x: torch.Tensor) -> bool:
        if not HAS_TRITON:
            warn_once("dora-no-triton", "fastpeft: DoRA's kernels need Triton, which is not installed; DoRA layers "
                      "use the PyTorch reference path")
            return False
        if getattr(getattr(layer.base_layer, "weight", None), "requires_grad", False):
            # the kernels treat the base weight as frozen: autograd through the reference path instead (same
            # numbers, PEFT's speed)
            warn_once("dora-trainable-base", "fastpeft: a DoRA layer's base weight requires grad; DoRA's kernels "
                      "treat it as frozen, so such layers run the PyTorch reference path (PEFT's numbers and speed)")
            return False
        return layer._triton_can_run(x)

    def _cached_scale(self, layer: "LoraLinear", name: str, weight: torch.Tensor, norm_of,
                      parts: Optional[tuple] = None) -> Optional[torch.Tensor]:
        """g = m / n (fp32 [out]) from the cache when the layer is out of training (eval mode, no autograd, eager),
        recomputed when the base weight, lora_A, lora_B or the magnitude changed; None in training. ``parts``:
        (lora_A, lora_B, magnitude) when the caller has them (the hot path reads them from the dicts)."""
        if layer.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or graph_capturing():
            layer._dora_norms.pop(name, None)  # nothing kept from inside a CUDA graph capture (ops.graph_capturing)
            return None
        if parts is None:
            parts = (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight)
        lora_A, lora_B, magnitude = parts
        # a flat tuple of cheap reads (the hot path pays it per call): storage, in-place version and dtype of each
        # tensor, the device once (moving one of them alone changes its storage)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, lora_A.data_ptr(), lora_A._version,
               lora_A.dtype, lora_B.data_ptr(), lora_B._version, lora_B.dtype, magnitude.data_ptr(),
               magnitude._version, magnitude.dtype, layer.scaling[name])
        hit = layer._dora_norms.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = norm_of()
        scale = magnitude.to(torch.float32) / norm
        layer._dora_norms[name] = (key, scale, norm)
        return scale

    @staticmethod
    def _rescaled(y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Inference with a cached scale: g⊙(x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias from LoRA's own no-bias path (the C++ op, the
        NF4 GEMV): LoRA's host cost plus one or two in-place kernels; g stays fp32 inside the multiply."""
        y.mul_(scale)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def _weight_sq_norm(layer: "LoraLinear", param: torch.Tensor, dense_of, extra=None) -> Optional[torch.Tensor]:
        """‖W‖² per output row (fp32) of the frozen base weight as ``dense_of()`` gives it ([out, in]; ``param`` is
        the base layer's parameter it comes from: the dense weight, or a 4-bit base's packed bytes), kept on the
        layer and recomputed when the parameter changes: another tensor object, another storage or a version counter
        that moved in place, or when ``extra`` changes (4-bit: the dequantization's dtype and the KernelState, which
        is rebuilt when the QuantState's absmax is replaced). The key holds plain values (no reference that would
        keep a replaced weight alive, nothing that stops the model from pickling) and is a few cheap reads: the hot
        path pays it on every call. None under torch.compile or a CUDA graph capture (the C++ operator then computes
        it in the call)."""
        if torch.compiler.is_compiling() or graph_capturing():
            return None
        key = (id(param), param.data_ptr(), param._version, extra)
        hit = layer._dora_weight_sq
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            value = torch.linalg.vector_norm(dense_of(), dim=1, dtype=torch.float32).square_()
        layer._dora_weight_sq = (key, value)
        return value

    def forward_cpp(self, layer: "LoraLinear", name: str, x: torch.Tensor) -> torch.Tensor:
        """DoRA without dropout through the C++ operator (one dispatcher call, C++ autograd; csrc/adapter_ops.cpp):
        in training with ‖W‖² kept per layer, out of training with the cached norm. Inference up to 16 rows passes
        the cached norm to the operator, whose CUDA kernel is then LoRA's decode path with g and the bias in its
        last kernel (as many launches as LoRA); 17-64 rows take LoRA's operator rescaled by the cached g."""
        modules = layer._modules  # the dicts, not module attribute lookups: the hot path calls this per layer
        base = modules["base_layer"]
        if type(base) is nn.Linear:
            base_weight, bias = base._parameters["weight"], base._parameters["bias"]
        else:  # Conv1D, subclasses, parametrized weights: whatever the module's attributes give
            base_weight, bias = base.weight, getattr(base, "bias", None)
        weight = base_weight.t() if layer.fan_in_fan_out else base_weight
        lora_A = modules["lora_A"]._modules[name]._parameters["weight"]
        lora_B = modules["lora_B"]._modules[name]._parameters["weight"]
        magnitude = modules["lora_magnitude_vector"]._modules[name]._parameters["weight"]
        scaling = layer.scaling[name]
        norm_of = custom_ops.dora_weight_norm if (HAS_TRITON and x.is_cuda) else dora_weight_norm_reference
        scale = self._cached_scale(layer, name, base_weight, lambda: norm_of(weight, lora_A, lora_B, scaling),
                                   (lora_A, lora_B, magnitude))
        if scale is not None:
            rows = x.numel() // max(1, x.shape[-1])
            if _DORA_DECODE_MAX_ROWS < rows <= _RESCALE_MAX_ROWS:
                return self._rescaled(cpp_ops.lora_linear(x, weight, None, lora_A, lora_B, scaling), scale, bias)
            return cpp_ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, None,
                                       layer._dora_norms[name][2])
        return cpp_ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling,
                                   self._weight_sq_norm(layer, base_weight, lambda: weight), None)

    def forward_dense(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, cpp: bool) -> torch.Tensor:
        """Without dropout in effect and with the C++ operators (``cpp``): ``forward_cpp``. Else the Triton DoRA
        kernels + cuBLAS (PEFT's dropout formula: a second base product), out of training with the cached norm."""
        if cpp and p == 0 and not getattr(layer.base_layer.weight, "requires_grad", False):
            return self.forward_cpp(layer, name, x)
        if not self._kernels_can_run(layer, x):
            return self.forward_reference(layer, name, x)
        base = layer.base_layer
        weight = base.weight.t() if layer.fan_in_fan_out else base.weight
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        magnitude, scaling = layer.lora_magnitude_vector[name].weight, layer.scaling[name]
        bias = getattr(base, "bias", None)
        scale = self._cached_scale(layer, name, base.weight,
                                   lambda: custom_ops.dora_weight_norm(weight, lora_A, lora_B, scaling))
        seed = dropout_seed() if p > 0 else None
        norm = None if scale is None else layer._dora_norms[name][2]
        return custom_ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, norm)

    def forward_nf4_cpp(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
        """QDoRA without dropout in training through the C++ operator (W dequantized per GEMM, never kept; ‖W‖² kept
        per layer), or None: with dropout in effect (PEFT's second base product: the Triton path), out of training
        (the Triton path's cached norm and GEMV) and where ``nf4_cpp_plan`` says so."""
        if p > 0 or not (layer.training or torch.is_grad_enabled()):
            return None
        plan = nf4_cpp_plan(layer, x)
        if plan is None:
            return None
        packed, ks, cd = plan
        modules = layer._modules  # (see PLAIN_LORA.forward_nf4_cpp)
        base = modules["base_layer"]
        w_sq = self._weight_sq_norm(layer, base.weight, lambda: cpp_ops.nf4_dequantize(packed, ks, cd), (cd, id(ks)))
        y = cpp_ops.nf4_dora_linear(x if x.dtype == cd else x.to(cd), packed, ks, bases.base_bias(base),
                                    modules["lora_A"]._modules[name]._parameters["weight"],
                                    modules["lora_B"]._modules[name]._parameters["weight"],
                                    modules["lora_magnitude_vector"]._modules[name]._parameters["weight"],
                                    layer.scaling[name], w_sq)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def forward_nf4(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, compiled: bool) -> torch.Tensor:
        """QDoRA: W dequantized per GEMM into the shared buffer (forward and backward), in the compute dtype; out of
        training the cached norm, and for decode-sized inputs QLoRA's path (the NF4 GEMV) rescaled by g."""
        base = layer.base_layer
        if getattr(base.weight, "requires_grad", False):
            warn_once("dora-trainable-base", "fastpeft: a DoRA layer's base weight requires grad; DoRA's kernels "
                      "treat it as frozen, so such layers run the PyTorch reference path (PEFT's numbers and speed)")
            return self.forward_reference(layer, name, x)
        packed, quant_state = bases.nf4_parts(base)
        cd = bases.compute_dtype(base, x)
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        magnitude, scaling = layer.lora_magnitude_vector[name].weight, layer.scaling[name]
        bias = bases.base_bias(base)
        scale = self._cached_scale(layer, name, packed, lambda: custom_ops.nf4_weight_norm(
            packed, quant_state, lora_A, lora_B, scaling, cd))
        if scale is not None and x.numel() <= _RESCALE_MAX_ROWS * x.shape[-1]:
            y = custom_ops.nf4_lora_linear(x.to(cd), packed, quant_state, None, lora_A, lora_B, scaling)
            return self._rescaled(y, scale, None if bias is None else bias.to(cd)).to(x.dtype)
        seed = dropout_seed() if p > 0 else None
        norm = None if scale is None else layer._dora_norms[name][2]
        y = custom_ops.nf4_dora_linear(x.to(cd), packed, quant_state, bias, lora_A, lora_B, magnitude, scaling, p,
                                       seed, norm)
        return y.to(x.dtype)

    # -- merge ----------------------------------------------------------------------------------------
    def _factor(self, layer: "LoraLinear", name: str, norm: torch.Tensor) -> torch.Tensor:
        return (layer.lora_magnitude_vector[name].weight.detach().float() / norm).view(-1, 1)

    def merged_weight(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> torch.Tensor:
        """g⊙(W + ΔW) with n from the unmerged weight (PEFT's merge), fp32 [out, in]."""
        delta = self.delta_weight(layer, name).to(weight.device)
        norm = torch.linalg.norm(weight.float() + delta, dim=1)
        return self._factor(layer, name, norm).to(weight.device) * (weight.float() + delta)

    def merge(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> None:
        stored = weight.t() if layer.fan_in_fan_out else weight  # [out, in] view of the stored weight
        delta = self.delta_weight(layer, name).to(weight.device)
        merged = stored.float() + delta
        norm = torch.linalg.norm(merged, dim=1)
        layer._dora_merge_norms[name] = norm  # unmerge needs the norm of the unmerged weight
        stored.copy_((self._factor(layer, name, norm) * merged).to(weight.dtype))
        layer._dora_norms.pop(name, None)

    def unmerge(self, layer: "LoraLinear", name: str, weight: torch.Tensor) -> None:
        stored = weight.t() if layer.fan_in_fan_out else weight
        delta = self.delta_weight(layer, name).to(weight.device)
        factor = self._factor(layer, name, layer._dora_merge_norms.pop(name))
        stored.copy_((stored.float() / factor - delta).to(weight.dtype))
        layer._dora_norms.pop(name, None)


DORA = DoraVariant()

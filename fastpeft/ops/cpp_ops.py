"""The adapted layers as C++ operators (``csrc/adapter_ops.cpp``, CUDA kernels in ``csrc/adapter_cuda.cu``).

Why C++: an eager layer in Python (module call, autograd.Function, Triton's launch binder, a Python backward)
cost ~0.9 ms of host time per fwd+bwd on the benchmark machine, 5.6× a plain Linear. Here the layer is one
dispatcher call forward (``torch.ops.fastpeft_ops.lora_linear``) whose backward autograd runs in C++, and whose
GPU work is cuBLAS GEMMs plus small elementwise kernels (the math and precision: the header of
csrc/adapter_cuda.cu). Under torch.compile the same op traces into ``fastpeft_ops::lora_fwd`` / ``lora_bwd``
graph nodes (their Meta kernels give the shapes): no graph break, no Python inside.

The extension is built on first use (``ops/csrc.py``; about a minute, cached on disk). Where it cannot be built
(no compiler / ninja / nvcc, ``FASTPEFT_CSRC=0``) ``available()`` is False, says why once, and the layers keep
their Triton path. PyTorch only: no Triton here.

>>> import torch
>>> from fastpeft.ops import cpp_ops
>>> if cpp_ops.available():   # builds the CPU (or CUDA) extension the first time
...     y = cpp_ops.lora_linear(torch.randn(2, 3, 16), torch.randn(8, 16), None, torch.randn(4, 16),
...                             torch.randn(8, 4), 2.0)
...     assert y.shape == (2, 3, 8)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .csrc import Extension
from .nf4_format import KernelState

__all__ = ["available", "loaded", "lora_linear", "lora_group_linear", "dora_linear", "ia3_linear", "nf4_dequantize",
           "nf4_lora_linear", "nf4_dora_linear", "nf4_lora_group_linear", "dora_group_linear",
           "nf4_dora_group_linear", "mixed_adapters", "MixedAdapterSet", "lora_mixed_delta_", "lora_mixed_linear",
           "MIXED_MAX_RANK", "EXTENSION"]

MIXED_MAX_RANK = 64  # the largest adapter rank lora_mixed_delta_ takes (csrc/adapter_cuda.cu: kMixedMaxRank)

EXTENSION = Extension("fastpeft_ops", "LoRA / IA3 operators", cpu_sources=["adapter_ops.cpp"],
                      cuda_sources=["adapter_cuda.cu", "nf4_dequant.cu"],
                      headers=["adapter_common.h", "device_ptx.cuh"])


_OPS: dict = {}  # the OpOverloads, resolved once (a torch.ops attribute chain per call costs host time)


def available() -> bool:
    """Whether ``torch.ops.fastpeft_ops`` is loaded (tries to build it once; warns once if it cannot)."""
    if _OPS:
        return True
    if torch.compiler.is_compiling():
        return False  # never build (file system checks, a compiler run) while dynamo traces: the Triton path then
    if not EXTENSION.available():
        return False
    _OPS["lora"] = torch.ops.fastpeft_ops.lora_linear.default
    _OPS["lora_group"] = torch.ops.fastpeft_ops.lora_group_linear.default
    _OPS["dora"] = torch.ops.fastpeft_ops.dora_linear.default
    _OPS["ia3"] = torch.ops.fastpeft_ops.ia3_linear.default
    _OPS["nf4_dequantize"] = torch.ops.fastpeft_ops.nf4_dequantize.default
    _OPS["nf4_lora"] = torch.ops.fastpeft_ops.nf4_lora_linear.default
    _OPS["nf4_dora"] = torch.ops.fastpeft_ops.nf4_dora_linear.default
    _OPS["nf4_lora_group"] = torch.ops.fastpeft_ops.nf4_lora_group_linear.default
    _OPS["dora_group"] = torch.ops.fastpeft_ops.dora_group_linear.default
    _OPS["nf4_dora_group"] = torch.ops.fastpeft_ops.nf4_dora_group_linear.default
    # decode calls the two mixed-batch operators per layer and token: their C++ entry points directly (OpOverload's
    # Python __call__ adds ~0.5 µs a call)
    _OPS["mixed"] = torch.ops.fastpeft_ops.lora_mixed_delta_.default._op
    _OPS["mixed_linear"] = torch.ops.fastpeft_ops.lora_mixed_linear.default._op
    _OPS["mixed_new"] = torch.ops.fastpeft_ops.mixed_adapters_new.default
    _OPS["mixed_free"] = torch.ops.fastpeft_ops.mixed_adapters_free.default
    return True


def loaded() -> bool:
    """Whether the operators are loaded already (``available()`` ran and succeeded). Never builds anything: the
    layers' hot path asks this on every call, and falls back to the general path (which calls ``available()``)."""
    return bool(_OPS)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, seed: Optional[Tensor] = None, rank: int = 0) -> Tensor:
    """Y = x·Wᵀ + bias + scaling·((D⊙x)·Aᵀ)·Bᵀ, differentiable (C++ autograd). ``seed``: the raw dropout draw as a
    0-dim int64 CPU tensor (``nn/_rng.py: dropout_draw``), required when dropout_p > 0; ``rank`` is folded in
    as fastpeft/nn/_rng.py folds it. Call ``available()`` first."""
    return _OPS["lora"](x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, rank)


def lora_group_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], lora_A: Sequence[Tensor],
                      lora_B: Sequence[Tensor], scaling: float) -> List[Tensor]:
    """Sibling LoRA projections of one input as one call (no dropout, frozen bases): member i's output is
    ``lora_linear(x, weights[i], biases[i], lora_A[i], lora_B[i], scaling)`` (``biases`` empty: none). On CUDA at
    16 bits, one rank and more than 64 rows the members share x's shrink, the dA GEMM and a dX accumulated by
    cuBLAS (csrc/adapter_cuda.cu: grouped LoRA); otherwise they run one by one inside the call. Differentiable.
    Call ``available()`` first."""
    return _OPS["lora_group"](x, weights, biases, lora_A, lora_B, scaling)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float, weight_sq_norm: Optional[Tensor] = None, weight_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA without dropout on a frozen base (csrc/adapter_ops.cpp has the math): Y = g⊙(x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias,
    g = magnitude / ‖W + s·B·A‖ per output row (the norm detached, as PEFT). Differentiable in x, bias, lora_A,
    lora_B and magnitude (C++ autograd). ``weight_sq_norm``: ‖W‖² per row (fp32 [out]) if the caller keeps it for
    the frozen W, else computed; ``weight_norm``: a cached n (no norm work). Call ``available()`` first."""
    return _OPS["dora"](x, weight, bias, lora_A, lora_B, magnitude, scaling, weight_sq_norm, weight_norm)


def ia3_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_l: Tensor, feedforward: bool) -> Tensor:
    """IA3: output scaling Y = (x·Wᵀ + bias)⊙l, feedforward Y = (x⊙l)·Wᵀ + bias; differentiable (C++ autograd).
    Call ``available()`` first."""
    return _OPS["ia3"](x, weight, bias, ia3_l, feedforward)


def _nf4_args(packed: Tensor, ks: KernelState) -> tuple:
    """The schema's 4-bit weight arguments: the packed bytes, the KernelState's tensors, then its numbers."""
    return (packed, ks.absmax, ks.code, ks.code2, ks.absmax2, ks.offset, ks.blocksize, ks.blocksize2, ks.nested,
            ks.shape[0], ks.state_dtype)


def nf4_dequantize(packed: Tensor, ks: KernelState, dtype: torch.dtype) -> Tensor:
    """The dense [N, K] weight of bnb 4-bit bytes (``ks``: its ``ops/nf4_format.py: kernel_state``) in ``dtype``,
    the same bits as ``nf4_dequantize_reference`` (dequantized to the state's dtype first when that is neither fp32
    nor ``dtype``, as bnb). Call ``available()`` first.

    >>> from fastpeft.ops.nf4_format import kernel_state, nf4_dequantize_reference
    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> if available():
    ...     packed, qs = quantize_nf4(torch.randn(8, 64))
    ...     w = nf4_dequantize(packed, kernel_state(qs, "cpu"), torch.float32)
    ...     assert torch.equal(w, nf4_dequantize_reference(packed, qs, torch.float32))
    """
    return _OPS["nf4_dequantize"](*_nf4_args(packed, ks), ks.shape[1], dtype)


def nf4_lora_linear(x: Tensor, packed: Tensor, ks: KernelState, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, scaling: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                    rank: int = 0) -> Tensor:
    """QLoRA: ``lora_linear`` with W = dequant(packed) in x's dtype (the layer's compute dtype), dequantized per GEMM
    that reads it (forward, and the backward's dX) and never kept. Differentiable in x, bias, lora_A, lora_B.
    Call ``available()`` first."""
    return _OPS["nf4_lora"](x, *_nf4_args(packed, ks), bias, lora_A, lora_B, scaling, dropout_p, seed, rank)


def nf4_dora_linear(x: Tensor, packed: Tensor, ks: KernelState, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, magnitude: Tensor, scaling: float, weight_sq_norm: Optional[Tensor] = None,
                    weight_norm: Optional[Tensor] = None) -> Tensor:
    """QDoRA without dropout: ``dora_linear`` with W = dequant(packed) in x's dtype, dequantized per GEMM that reads
    it and never kept. ``weight_sq_norm``: ‖W‖² per row of that W (fp32 [out]) if the caller keeps it. Call
    ``available()`` first."""
    return _OPS["nf4_dora"](x, *_nf4_args(packed, ks), bias, lora_A, lora_B, magnitude, scaling, weight_sq_norm,
                            weight_norm)


def nf4_lora_group_linear(x: Tensor, weights: Sequence[Tuple[Tensor, KernelState]], biases: Sequence[Tensor],
                          lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], scaling: float) -> List[Tensor]:
    """Sibling QLoRA projections of one input as one call: ``lora_group_linear`` with W_i = dequant(packed_i) in x's
    dtype (``weights``: one (packed bytes, KernelState) pair per member; the states must share one ``state_dtype``),
    dequantized per call that reads them (the forward, and the backward's dX) and never kept. Member i's output is
    ``nf4_lora_linear(x, *weights[i], biases[i], lora_A[i], lora_B[i], scaling)``, up to the order in which the
    members' dX are added. No dropout. Differentiable in x, the biases, lora_A and lora_B. Call ``available()``
    first.

    >>> from fastpeft.ops.nf4_format import kernel_state
    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> if available():
    ...     x = torch.randn(5, 64)
    ...     weights = [(p, kernel_state(qs, "cpu")) for p, qs in (quantize_nf4(torch.randn(n, 64)) for n in (8, 4))]
    ...     A = [torch.randn(2, 64), torch.randn(2, 64)]; B = [torch.randn(8, 2), torch.randn(4, 2)]
    ...     ys = nf4_lora_group_linear(x, weights, [], A, B, 0.5)
    ...     alone = [nf4_lora_linear(x, p, ks, None, a, b, 0.5) for (p, ks), a, b in zip(weights, A, B)]
    ...     assert all(torch.allclose(y, y1, atol=1e-5) for y, y1 in zip(ys, alone))
    """
    return _OPS["nf4_lora_group"](x, *_nf4_group_args(weights, "nf4_lora_group_linear"), biases, lora_A, lora_B,
                                  scaling)


def _nf4_group_args(weights: Sequence[Tuple[Tensor, KernelState]], op: str) -> tuple:
    """The grouped schemas' 4-bit arguments: per-member lists of ``_nf4_args``' entries, one shared state dtype."""
    states = [ks for _, ks in weights]
    state_dtype = states[0].state_dtype if states else torch.float32
    if any(ks.state_dtype != state_dtype for ks in states):
        raise ValueError(f"{op}: the members' quantization states must share one dtype, got "
                         f"{sorted({str(ks.state_dtype) for ks in states})}")
    return ([p for p, _ in weights], [ks.absmax for ks in states], [ks.code for ks in states],
            [ks.code2 for ks in states], [ks.absmax2 for ks in states], [ks.offset for ks in states],
            [ks.blocksize for ks in states], [ks.blocksize2 for ks in states], [ks.nested for ks in states],
            [ks.shape[0] for ks in states], state_dtype)


def dora_group_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], lora_A: Sequence[Tensor],
                      lora_B: Sequence[Tensor], magnitudes: Sequence[Tensor], scaling: float,
                      weight_sq_norms: Sequence[Tensor] = ()) -> List[Tensor]:
    """Sibling DoRA projections of one input (no dropout, frozen bases) as one call: member i's output is
    ``dora_linear(x, weights[i], biases[i], lora_A[i], lora_B[i], magnitudes[i], scaling, weight_sq_norms[i])``
    (``biases`` / ``weight_sq_norms`` empty: none / computed), each member's kernels as it runs alone, in one autograd
    node; the members' dX are summed in the call. Differentiable in x, the biases, lora_A, lora_B and the magnitudes.
    Call ``available()`` first.

    >>> if available():
    ...     x, ws = torch.randn(5, 16), [torch.randn(8, 16), torch.randn(4, 16)]
    ...     A, B = [torch.randn(2, 16)] * 2, [torch.randn(8, 2), torch.randn(4, 2)]
    ...     m = [torch.rand(8) + 1, torch.rand(4) + 1]
    ...     ys = dora_group_linear(x, ws, [], A, B, m, 0.5)
    ...     assert all(torch.allclose(y, dora_linear(x, w, None, a, b, mi, 0.5), atol=1e-5)
    ...                for y, w, a, b, mi in zip(ys, ws, A, B, m))
    """
    return _OPS["dora_group"](x, weights, biases, lora_A, lora_B, magnitudes, scaling, weight_sq_norms)


def nf4_dora_group_linear(x: Tensor, weights: Sequence[Tuple[Tensor, KernelState]], biases: Sequence[Tensor],
                          lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], magnitudes: Sequence[Tensor],
                          scaling: float, weight_sq_norms: Sequence[Tensor] = ()) -> List[Tensor]:
    """QDoRA siblings as one call: ``dora_group_linear`` with W_i = dequant(packed_i) in x's dtype (``weights``: one
    (packed bytes, KernelState) pair per member, one state dtype), each dequantized when its member runs (forward,
    and the backward's dX) and never kept. Call ``available()`` first."""
    return _OPS["nf4_dora_group"](x, *_nf4_group_args(weights, "nf4_dora_group_linear"), biases, lora_A, lora_B,
                                  magnitudes, scaling, weight_sq_norms)


class MixedAdapterSet:
    """A layer's adapters registered with the mixed-batch operators (``mixed_adapters``): ``handle`` is what the
    operators take, ``len()`` the number of adapters. The registered set holds handles to the given tensors, not
    copies; it is freed when this object is (or by ``free()``), after which the operators refuse the handle."""

    __slots__ = ("handle", "_count", "_free")

    def __init__(self, lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], scales: Sequence[float]):
        self.handle = int(_OPS["mixed_new"](list(lora_A), list(lora_B), [float(s) for s in scales]))
        self._count = len(lora_A)
        self._free = _OPS["mixed_free"]  # kept here: at interpreter exit the module's globals may be gone first

    def __len__(self) -> int:
        return self._count

    def free(self) -> None:
        """Forget the set now (idempotent)."""
        if self._free is not None:
            self._free(self.handle)
            self._free = None

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001 -- interpreter shutdown: the operators may be unloaded already
            pass

    def __reduce__(self):
        raise TypeError("a MixedAdapterSet holds a handle into this process's operator registry: it cannot be "
                        "pickled or copied; build one from the adapters with cpp_ops.mixed_adapters")


def mixed_adapters(lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], scales: Sequence[float]) -> MixedAdapterSet:
    """The adapter set the mixed-batch operators take: every adapter's A [r_a, K], B [N, r_a] and scaling, index
    a = its place in these lists, registered under an int handle (a ``MixedAdapterSet``). It holds handles to the
    given tensors, not copies (in-place updates are seen by the next call; shapes are checked at every call). Build
    it once and pass it to every call: decode calls the operators per layer and token, and one int costs far less
    host time than 2n tensors and n floats (or a ``torch.classes`` object, which Python probes with a raised and
    caught AttributeError at every call). Call ``available()`` first.

    >>> import torch
    >>> if available():
    ...     adapters = mixed_adapters([torch.randn(2, 16)], [torch.randn(8, 2)], [0.5])
    ...     assert len(adapters) == 1 and isinstance(adapters.handle, int)
    """
    return MixedAdapterSet(lora_A, lora_B, scales)


def lora_mixed_delta_(y2d: Tensor, x2d: Tensor, adapter_of_segment: Tensor, tokens: int, adapters) -> Tensor:
    """Mixed-adapter batches (inference, no autograd): ``y2d`` [M, N] += s_a·(x2d·A_aᵀ)·B_aᵀ for every segment of
    ``tokens`` rows, a = ``adapter_of_segment[b]`` (int32 on y's device; -1: no adapter), in fp32 with y rounded
    once; returns ``y2d``. ``adapters``: a ``mixed_adapters(...)`` set (ranks may differ, up to ``MIXED_MAX_RANK``).
    Indices must lie in [-1, len(adapters)): the CPU kernel raises on a larger one; the CUDA kernels leave its rows
    unchanged (checking would cost a device sync per call; fastpeft's layers build the indices themselves). Eager
    only (fastpeft's layers run their per-adapter path under torch.compile; a compiled graph would hold the set's
    handle as a constant). Call ``available()`` first.

    >>> import torch
    >>> if available():
    ...     y = torch.zeros(4, 8); x = torch.randn(4, 16)
    ...     a = [torch.randn(2, 16), torch.randn(3, 16)]; b = [torch.randn(8, 2), torch.randn(8, 3)]
    ...     seg = torch.tensor([1, -1], dtype=torch.int32)
    ...     _ = lora_mixed_delta_(y, x, seg, 2, mixed_adapters(a, b, [1.0, 0.5]))
    ...     assert torch.allclose(y[:2], 0.5 * (x[:2] @ a[1].t()) @ b[1].t(), atol=1e-5) and not y[2:].any()
    """
    _OPS["mixed"](y2d, x2d, adapter_of_segment, tokens, adapters.handle)
    return y2d


def lora_mixed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter_of_segment: Tensor, tokens: int,
                      adapters) -> Tensor:
    """A mixed batch's dense layer in one call (inference, no autograd): ``F.linear(x, weight, bias)`` [..., N],
    then ``lora_mixed_delta_`` on it (x [batch, ..., K], segments of ``tokens`` rows of its flattened rows), in one
    dispatcher entry instead of two (decode is host-bound): the two calls' numbers, except that on CUDA, at decode
    sizes (<= 8 rows of 16-bit x, fp32 adapters of rank <= 32) the base product is fastpeft's decode GEMV with every
    row's LoRA term in its epilogue: two launches (the base product's sums then run in another order than cuBLAS's,
    as the one-adapter decode path's do). Eager only, as ``lora_mixed_delta_``. Call ``available()`` first.

    >>> import torch
    >>> if available():
    ...     x = torch.randn(2, 3, 16); w = torch.randn(8, 16)
    ...     a = [torch.randn(2, 16)]; b = [torch.randn(8, 2)]
    ...     seg = torch.tensor([0, -1], dtype=torch.int32)
    ...     y = lora_mixed_linear(x, w, None, seg, 3, mixed_adapters(a, b, [0.5]))
    ...     want = torch.nn.functional.linear(x, w)
    ...     want[0] += 0.5 * (x[0] @ a[0].t()) @ b[0].t()
    ...     assert torch.allclose(y, want, atol=1e-4)
    """
    return _OPS["mixed_linear"](x, weight, bias, adapter_of_segment, tokens, adapters.handle)

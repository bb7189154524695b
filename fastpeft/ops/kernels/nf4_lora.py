"""LoRA / IA3 on a frozen bitsandbytes 4-bit (NF4 / FP4) base: QLoRA.

The base weight W [N, K] is never kept dense: it lives as bnb's packed bytes + QuantState (see
``fastpeft/ops/nf4_format.py`` for the format). Two ways to run the base GEMMs, chosen per call by ``nf4_path``:

  "buffer" (large M, compute-bound): dequantize W with the one-pass Triton kernel into a *reused* buffer
           (one per device / dtype / stream, grown to the largest layer, shared by all layers; never saved
           for backward) and run the dense LoRA / IA3 composition of ``kernels/lora.py`` / ``kernels/ia3.py`` on
           it (cuBLAS base GEMM + the fused LoRA kernels). Backward dequantizes again into the buffer.
           Extra cost over a dense bf16 layer: one dequant per GEMM that reads W, i.e. 2.5 bytes per weight
           written+read (~14 µs for 4096x4096 at the copy bandwidth) against 2·M·N·K FLOPs (~180 µs at
           M=4096): a few % at M=4096.
  "fused"  (small M, memory-bound): one Triton GEMM that dequantizes W tiles in registers right before
           tl.dot (``kernels/nf4_matmul.py``): W is read once as 0.5 bytes per weight instead of dequant-write-read
           (4.5 bytes per weight). The LoRA term Z (forward: s·S·Bᵀ + bias; dX: D⊙(dS·A), mask regenerated)
           comes from kernels/lora.py and enters the GEMM as its C input (added in fp32 before the one
           rounding), as cuBLAS's beta=1 does in the dense path; split-K with fp32 atomics keeps all SMs busy
           when M / N give few tiles.

Shapes as in ``fastpeft/ops/reference.py``:
    x [..., K]; packed + quant_state (W [N, K]); bias [N] | None; lora_A [r, K]; lora_B [N, r]
    Y = x·dequant(W)ᵀ + bias + scaling · ((D ⊙ x)·Aᵀ)·Bᵀ
The compute dtype is x.dtype (callers cast x to the layer's compute_dtype first, as bnb's Linear4bit does).
W is dequantized to the state's dtype and then cast to the compute dtype, as bnb does (one rounding when
the two agree or the state is fp32).
"""
from __future__ import annotations

from typing import Any

import torch

from ... import settings
from .. import graph_capturing
from ..dropout import lora_dropout_mask
from ..nf4_format import KernelState, kernel_state
from ..reference import nf4_ia3_linear_reference, nf4_lora_linear_reference
from . import ia3 as ia3_ops
from . import lora as lora_ops
from .common import as_2d, check_kernel_dtype, triton_ok
from .nf4_dequant import dequantize_into
from .nf4_gemv import nf4_lora_gemv
from .nf4_matmul import nf4_matmul

__all__ = [
    "dequantize_to",
    "nf4_lora_linear",
    "nf4_ia3_linear",
    "nf4_path",
    "FUSED_MAX_M",
]


# ----------------------------------------------------------------------------------------------------------
# Dequantized weight: the reused buffer
# ----------------------------------------------------------------------------------------------------------

_BUFFERS: dict = {}


def _buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat scratch tensor shared by every layer on (device, dtype, current stream); grows, never shrinks.

    Safe because each user consumes it before the next kernel on the same stream overwrites it (stream
    order); keyed by stream so two streams never share one. Never returned to callers beyond one op.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), dtype, stream)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop(key, None)
        buf = torch.empty(numel, device=device, dtype=dtype)
        _BUFFERS[key] = buf
    return buf


def dequantize_to(packed: torch.Tensor, ks: KernelState, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """W [N, K] in ``dtype`` from the Triton kernel; with ``reuse`` a view of the shared buffer (valid until
    the next dequantization on this stream: consume it, never keep it). Dequantized to the state's dtype and
    then cast (two roundings, as bnb) when the two differ and the state's is not fp32."""
    sd = ks.state_dtype
    reuse = reuse and not graph_capturing()  # a graph must own its scratch (see ops.graph_capturing)
    if sd == dtype or sd == torch.float32:
        out = _buffer(packed.device, dtype, ks.numel) if reuse else torch.empty(ks.numel, device=packed.device,
                                                                                  dtype=dtype)
        return dequantize_into(packed, ks, out[: ks.numel]).view(ks.shape)
    w = dequantize_into(packed, ks, torch.empty(ks.numel, device=packed.device, dtype=sd))
    return w.view(ks.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Dispatch: buffer + cuBLAS vs in-kernel dequant, per M (from measurements, benchmarks/results/h100/nf4_*.json)
# ----------------------------------------------------------------------------------------------------------

# Largest M for which the fused in-kernel-dequant GEMM is used, by weight size: (min N*K, max M), first match.
# Measured on an H100 (benchmarks/results/h100/nf4_crossover_graph_2026-11-24.json: fwd+bwd GPU time, CUDA
# graph, cold L2; Llama-3-8B shapes): fused wins up to M=64 on gate/up / down (58.7M weights; at M=64 267 vs
# 316 us, 295 vs 318), up to M=32 on q/o (16.8M; 99 vs 109 us, then 121 vs 114 at 64) and up to M=16 on k/v
# (4.2M; 54 vs 57 us, then 61 vs 57 at 32). Other GPUs use the same table until measured.
FUSED_MAX_M = ((32 << 20, 64), (8 << 20, 32), (0, 16))


def _fused_max_m(numel: int) -> int:
    override = settings.get().nf4_fused_max_m
    if override is not None:
        return override
    for min_numel, max_m in FUSED_MAX_M:
        if numel >= min_numel:
            return max_m
    return 0


def nf4_path(M: int, ks: KernelState, dtype: torch.dtype) -> str:
    """"fused" (in-kernel dequant GEMM) or "buffer" (dequant into the shared buffer + cuBLAS) for this call.

    settings.nf4_gemm (FASTPEFT_NF4_GEMM) = auto | fused | buffer; auto uses "fused" for M up to the FUSED_MAX_M
    entry of this weight's size (16 / 32 / 64; settings.nf4_fused_max_m overrides) when the weight allows it
    (even K, state dtype fp32 or the compute dtype). The forward's choice is saved for its backward.
    """
    mode = settings.get().nf4_gemm
    K = ks.shape[-1]
    sd = ks.state_dtype
    fusable = K % 2 == 0 and (sd == dtype or sd == torch.float32)
    if mode == "buffer" or not fusable or torch.are_deterministic_algorithms_enabled():
        return "buffer"  # (the fused kernel's split-K uses atomics: not bitwise reproducible)
    if mode == "fused":
        return "fused"
    return "fused" if M <= _fused_max_m(ks.numel) else "buffer"


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------

def nf4_lora_forward_2d(x2, packed, ks: KernelState, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                        path: str, reuse_buffer: bool = True):
    """QLoRA forward on a 2-D x [M, K], no autograd: (Y [M, N] in x2.dtype, S' = s·(D⊙x)·Aᵀ fp32 [M, r]).

    path: ``nf4_path``'s choice for this call. The building block of ``_NF4LoraFn`` and of the
    ``fastpeft::nf4_lora_fwd`` custom op: both give these numbers. reuse_buffer: dequantize into the shared
    scratch buffer (eager); the custom ops pass False, since a compiled graph may run inside CUDA-graph trees,
    whose warm-up and recording allocate from a private pool that must not keep a shared buffer alive.
    """
    if path == "fused":
        # Z = s·(D⊙X)·Aᵀ·Bᵀ + bias from kernels/lora.py, then Y = Z + X·dequant(W)ᵀ in one fused GEMM
        b = None if bias is None else bias.to(x2.dtype)
        P = lora_ops.lora_s_partials(x2, lora_A, dropout_p, seed)
        Z, S = lora_ops.lora_expand(P, lora_B, b, scaling, x2.dtype)  # S = S' (fp32, scaled)
        return nf4_matmul(x2, packed, ks, c_in=Z), S
    w = dequantize_to(packed, ks, x2.dtype, reuse_buffer)
    return lora_ops.lora_forward_2d(x2, w, bias, lora_A, lora_B, scaling, dropout_p, seed)


def nf4_lora_backward_2d(dy2, x2, S, packed, ks: KernelState, lora_A, lora_B, scaling: float, dropout_p: float,
                         seed, path: str, need_x: bool = True, need_b: bool = False, need_A: bool = True,
                         need_B: bool = True, separate_outputs: bool = False, reuse_buffer: bool = True):
    """QLoRA backward on 2-D tensors, no autograd: (dX [M, K] | None, db fp32 [N] | None, dA fp32 [r, K] | None,
    dB fp32 [N, r] | None). dy2 in x2.dtype; S and path as the forward gave / used them.
    separate_outputs: dA and dB never share a storage (torch.library ops may not return aliasing tensors)."""
    if path == "fused":
        # dS, dB; then dA and Z2 = D⊙(dS·A) in one pass over X (kernels/lora.py); then dX = Z2 + dY·dequant(W)
        dS, dB = lora_ops.lora_ds_db(dy2, lora_B, S, scaling)
        dA, Z2 = (lora_ops.lora_da_dx(x2, dS, lora_A, dropout_p, seed, need_dA=need_A, need_dx=need_x)
                  if (need_A or need_x) else (None, None))
        dx2 = nf4_matmul(dy2, packed, ks, nn_layout=True, c_in=Z2) if need_x else None
        db = dy2.sum(0, dtype=torch.float32) if need_b else None
    else:
        w = dequantize_to(packed, ks, x2.dtype, reuse_buffer) if need_x else None
        dx2, _, db, dA, dB = lora_ops.lora_backward_2d(
            dy2, x2, S, w, lora_A, lora_B, scaling, dropout_p, seed,
            need_x, False, need_b, need_A, need_B, separate_outputs=separate_outputs)
    return dx2, db, dA, (dB if need_B else None)


class _NF4LoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, ks, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2 = as_2d(x)
        ctx.path = path = nf4_path(x2.shape[0], ks, x.dtype)  # the backward uses the same path
        y2, S = nf4_lora_forward_2d(x2, packed, ks, bias, lora_A, lora_B, scaling, dropout_p, seed, path)
        ctx.save_for_backward(x, S, lora_A, lora_B)
        ctx.packed, ctx.ks = packed, ks  # frozen module state, not activations
        ctx.scaling, ctx.dropout_p, ctx.seed = float(scaling), float(dropout_p), seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], ks.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, S, lora_A, lora_B = ctx.saved_tensors
        need_x, _, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        dx2, db, dA, dB = nf4_lora_backward_2d(
            as_2d(dy).to(x.dtype), as_2d(x), S, ctx.packed, ctx.ks, lora_A, lora_B, ctx.scaling,
            ctx.dropout_p, ctx.seed, ctx.path, need_x, need_b, need_A, need_B)
        return (
            None if dx2 is None else dx2.view(x.shape),
            None, None,
            None if db is None else db.to(ctx.bias_dtype),
            None if dA is None else dA.to(lora_A.dtype),
            None if dB is None else dB.to(lora_B.dtype),
            None, None, None,
        )


def nf4_lora_linear(x, packed, quant_state: Any, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                    seed=None) -> torch.Tensor:
    """QLoRA linear: Y = x·dequant(W)ᵀ + bias + scaling·((D⊙x)·Aᵀ)·Bᵀ in x.dtype, differentiable in x, bias,
    lora_A, lora_B. The base stays 4-bit; W is dequantized per GEMM (shared buffer) or inside the GEMM.

    Without autograd work and at M <= 16 (decode) this takes the NF4 GEMV (``kernels/nf4_gemv.py``: CUDA
    kernel when it builds, else Triton). dropout_p > 0 needs a seed (the mask is regenerated, never stored).
    On a device Triton cannot run on, the reference path with the same mask. bf16 in Triton's interpreter
    raises (``check_kernel_dtype``).

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 16))
    >>> nf4_lora_linear(torch.randn(3, 16), packed, qs, None, torch.randn(2, 16), torch.randn(8, 2), 1.0).shape
    torch.Size([3, 8])
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("nf4_lora_linear: dropout_p > 0 needs a seed")
    check_kernel_dtype(x.dtype, "nf4_lora_linear")
    if not triton_ok(x):
        mask = lora_dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype) if dropout_p > 0 else None
        return nf4_lora_linear_reference(x, packed, quant_state, bias, lora_A, lora_B, scaling, mask)
    ks = kernel_state(quant_state, x.device)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))
    M = x.numel() // max(1, x.shape[-1])
    if (not grad and dropout_p == 0.0 and M <= 16 and x.is_cuda and settings.get().nf4_gemm != "buffer"
            and ks.shape[-1] % 2 == 0):
        y2 = nf4_lora_gemv(as_2d(x), packed, ks, bias, lora_A, lora_B, scaling)
        return y2.view(*x.shape[:-1], ks.shape[0])
    return _NF4LoraFn.apply(x, packed, ks, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)


# ----------------------------------------------------------------------------------------------------------
# IA3
# ----------------------------------------------------------------------------------------------------------

def nf4_ia3_forward_2d(x2, packed, ks: KernelState, bias, ia3_l, feedforward: bool, reuse_buffer: bool = True):
    """IA3 forward on a 4-bit base, 2-D x [M, K], no autograd: (Y [M, N], saved) with saved as
    ``kernels/ia3.py: ia3_forward_2d`` gives it (x2 for feedforward scaling, Yb = x·Wᵀ + b for output scaling).
    The building block of ``_NF4IA3Fn`` and of the ``fastpeft::nf4_ia3_fwd`` custom op."""
    w = dequantize_to(packed, ks, x2.dtype, reuse_buffer)
    return ia3_ops.ia3_forward_2d(x2, w, bias, ia3_l, feedforward)


def nf4_ia3_backward_2d(dy2, saved, packed, ks: KernelState, ia3_l, feedforward: bool, need_x: bool = True,
                        need_b: bool = False, reuse_buffer: bool = True):
    """IA3 backward on a 4-bit base, 2-D tensors (saved: the forward's, 2-D), no autograd:
    (dX | None, db fp32 [N] | None, dl fp32 [len(l)]). Feedforward computes in saved's (x's) dtype."""
    if feedforward:
        dy2 = dy2.to(saved.dtype)
    w = dequantize_to(packed, ks, dy2.dtype, reuse_buffer)  # feedforward needs G = dY·W for dl anyway
    dx, _, db, dl = ia3_ops.ia3_backward_2d(dy2, saved, w, ia3_l, feedforward, need_x, False, need_b)
    return dx, db, dl


class _NF4IA3Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, ks, bias, ia3_l, feedforward):
        y2, saved = nf4_ia3_forward_2d(as_2d(x), packed, ks, bias, ia3_l, feedforward)
        ctx.save_for_backward(x if feedforward else saved, ia3_l)
        ctx.packed, ctx.ks = packed, ks
        ctx.feedforward, ctx.x_shape = feedforward, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], ks.shape[0])

    @staticmethod
    def backward(ctx, dy):
        saved, ia3_l = ctx.saved_tensors
        need_x, _, _, need_b, need_l = ctx.needs_input_grad[:5]
        dx, db, dl = nf4_ia3_backward_2d(as_2d(dy), as_2d(saved) if ctx.feedforward else saved, ctx.packed,
                                         ctx.ks, ia3_l, ctx.feedforward, need_x, need_b)
        return (
            None if dx is None else dx.view(ctx.x_shape),
            None, None,
            None if db is None else db.to(ctx.bias_dtype),
            dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
            None,
        )


def nf4_ia3_linear(x, packed, quant_state: Any, bias, ia3_l, feedforward: bool) -> torch.Tensor:
    """IA3 on a 4-bit base: the dense IA3 composition (``kernels/ia3.py``) on W dequantized into the shared
    buffer (forward, and again in backward); differentiable in x, bias, ia3_l.

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 16))
    >>> nf4_ia3_linear(torch.randn(3, 16), packed, qs, None, torch.ones(8, 1), feedforward=False).shape
    torch.Size([3, 8])
    """
    check_kernel_dtype(x.dtype, "nf4_ia3_linear")
    if not triton_ok(x):
        return nf4_ia3_linear_reference(x, packed, quant_state, bias, ia3_l, feedforward)
    return _NF4IA3Fn.apply(x, packed, kernel_state(quant_state, x.device), bias, ia3_l, bool(feedforward))

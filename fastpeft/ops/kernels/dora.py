"""DoRA on a frozen linear (or 4-bit) base: the Triton kernels and the autograd Function over them.

The math (PEFT's ``DoraLinearVariant``, oracle: ``fastpeft/ops/reference.py: dora_update_reference``), with
s = scaling, S' = s·(D⊙X)·Aᵀ (fp32 [M, r]), n = ‖W + s·B·A‖ per output row (detached), g = m / n:
    p = 0 : Y = g⊙Z + b                        Z = X·Wᵀ + S'·Bᵀ          (PEFT: base + (g-1)⊙base + g⊙s·lora)
    p > 0 : Y = X·Wᵀ + b + g⊙Zd - Zd0          Zd0 = (D⊙X)·Wᵀ, Zd = Zd0 + S'·Bᵀ   (PEFT's second base product)
    backward: dZ = g⊙dY ; dm = (Σ_rows dY⊙Z) / n ; dA, dB, Z2 = D⊙(s·(dZ·B)·A) from the LoRA kernels on dY with
              g folded into B (dZ·B = dY·(g⊙B); dB = g⊙(dYᵀ·S')): no 16-bit rounding of g⊙dY on the adapter side
              p = 0 : dX = Z2 + dZ·W
              p > 0 : dX = Z2 + D⊙((g-1)⊙dY·W) + dY·W
Never built: B·A, W + s·B·A (the norm kernel forms s·B·A one [BN, BK] tile at a time in registers), or a
dequantized copy of a 4-bit W beyond the shared per-GEMM buffer the QLoRA path already uses.

Kernels and what bounds them:
    _dora_norm_kernel     n² = Σ_k (W + s·B·A)²: reads W once (N·K·elem), FLOPs 2·N·K·r for the tile products --
                          with r = 16 ~16 FLOP/B on bf16 W, under the H200's ridge: bytes-bound.
    _dora_fwd_kernel      the forward epilogue: sums the S' partials, Y = g⊙(Z0 + S'·Bᵀ) + (b | ZX - Z0); reads Z0
                          (and ZX) once, writes Y once (may overwrite Z0 in place). Bytes-bound like LoRA's
                          beta=1 addmm it replaces (same M·N reads + writes).
    _dora_bwd_kernel      one pass over dY and Z0: writes dZ = g⊙dY (and (g-1)⊙dY for p > 0), adds the column
                          sums of dY⊙(Z0 + S'·Bᵀ)/n into dm (fp32 atomics, (M/BM)·N of them). Bytes-bound. Then
                          kernels/lora.py's LoRA backward kernels on dY with g⊙B. (Folding LoRA's dS / dB into this pass
                          was measured slower on the H200 at N = 14336: 0.83 ms against 0.29 ms for the two
                          passes -- its (M/BM)·N·r dB atomics and hi / lo MMAs; see docs/performance-log.md.)
    _dropout_apply_kernel D⊙X with the in-kernel Philox mask (p > 0: the second base product's input, and the
                          mask on its dX term). Bytes-bound.
Saved for backward: x, S' (fp32 [M, r]), Z0 = X·Wᵀ (p = 0) or (D⊙X)·Wᵀ (p > 0) in x.dtype [M, N], g and 1/n
(fp32 [N]), the seed; parameters by reference (a 4-bit base is dequantized again in the backward).
Precision: as kernels/lora.py (fp32 adapter operands; fp32 inputs use IEEE dots). The norm's tile products use
TF32x3 for 16-bit weights (~fp32 accuracy at tensor-core speed) and IEEE for fp32.
Under torch.use_deterministic_algorithms(True) the norm runs unsplit and the backward's dZ / dm / dS / dB come from
torch ops and cuBLAS (no atomics): bitwise reproducible.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..dropout import dropout_threshold, keep_scale_rounded
from ..nf4_format import KernelState, kernel_state
from . import lora as lora_ops
from .common import as_2d, ceil_div, check_kernel_dtype, interpreting, keep_tile, mask_fast, next_pow2_16, num_sms
from .nf4_lora import dequantize_to

__all__ = ["dora_weight_norm", "dora_forward_2d", "dora_backward_2d", "dora_linear", "nf4_dora_linear"]


@triton.jit
def _dora_norm_kernel(
    W, A, B, NORM2, scaling, N, K, R, k_per_split,
    swn, swk, sar, sak, sbn, sbr,
    PRECISION: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # One program per BN output rows and K-slice (split so that narrow weights still fill the GPU): bytes-bound
    # (module docstring). Writes / atomically adds the squared norms; the caller takes the square root.
    rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < N
    rr = tl.arange(0, BR)
    rrmask = rr < R
    rk = tl.arange(0, BK)
    b = tl.load(B + rows[:, None] * sbn + rr[None, :] * sbr, mask=rmask[:, None] & rrmask[None, :], other=0.0)
    b = b.to(tl.float32) * scaling
    acc = tl.zeros((BN,), dtype=tl.float32)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BK):
        cols = k0 + rk
        kmask = cols < k_end
        w = tl.load(W + rows[:, None] * swn + cols[None, :] * swk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(A + rr[:, None] * sar + cols[None, :] * sak, mask=rrmask[:, None] & kmask[None, :], other=0.0)
        v = w.to(tl.float32) + tl.dot(b, a.to(tl.float32), input_precision=PRECISION)
        acc += tl.sum(v * v, axis=1)
    if ATOMIC:
        tl.atomic_add(NORM2 + rows, acc, mask=rmask)
    else:
        tl.store(NORM2 + rows, acc, mask=rmask)


@triton.jit
def _dora_fwd_kernel(
    P, B, Z0, ZX, BIAS, G, Y, S, scaling, M, N, R, SPLITS, n_per_split,
    sps, spm, spr, sbn, sbr, szm, szn, sxm, sxn, sym, syn, ssm, ssr,
    HAS_ZX: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # The forward epilogue (module docstring): bytes-bound; Y may be Z0 itself (each element read, then written,
    # by the same program).
    pid_n = tl.program_id(1)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    rr = tl.arange(0, BR)
    rrmask = rr < R
    smask = rmask[:, None] & rrmask[None, :]
    s_acc = tl.zeros((BM, BR), dtype=tl.float32)
    for i in range(0, SPLITS):  # fixed order: the forward is deterministic
        s_acc += tl.load(P + i * sps + rows[:, None] * spm + rr[None, :] * spr, mask=smask, other=0.0)
    s_acc = s_acc * scaling
    if pid_n == 0:
        tl.store(S + rows[:, None] * ssm + rr[None, :] * ssr, s_acc, mask=smask)
    rn = tl.arange(0, BN)
    n_begin = pid_n * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for n0 in range(n_begin, n_end, BN):
        cols = (n0 + rn).to(tl.int64)
        nmask = cols < n_end
        m2 = rmask[:, None] & nmask[None, :]
        b = tl.load(B + cols[None, :] * sbn + rr[:, None] * sbr, mask=rrmask[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            lora = tl.dot(s_acc, b.to(tl.float32), input_precision="ieee")
        else:
            lora = tl.dot(s_acc, b.to(tl.float32))
        z0 = tl.load(Z0 + rows[:, None] * szm + cols[None, :] * szn, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(G + cols, mask=nmask, other=0.0)
        y = g[None, :] * (z0 + lora)
        if HAS_ZX:
            y += tl.load(ZX + rows[:, None] * sxm + cols[None, :] * sxn, mask=m2, other=0.0).to(tl.float32) - z0
        elif HAS_BIAS:
            y += tl.load(BIAS + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * sym + cols[None, :] * syn, y.to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _dora_bwd_kernel(
    DY, Z0, S, B, G, INV_N, DZ, DZB, DM, M, N, R,
    sym, syn, szm, szn, ssm, ssr, sbn, sbr,
    HAS_DZB: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # One [BM, BN] tile per program: bytes-bound (module docstring). dZ / dZb are contiguous [M, N].
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < M
    nmask = cols < N
    m2 = rmask[:, None] & nmask[None, :]
    rr = tl.arange(0, BR)
    rrmask = rr < R
    s_t = tl.load(S + rows[:, None] * ssm + rr[None, :] * ssr, mask=rmask[:, None] & rrmask[None, :], other=0.0)
    b = tl.load(B + cols[None, :] * sbn + rr[:, None] * sbr, mask=rrmask[:, None] & nmask[None, :], other=0.0)
    if IEEE:
        lora = tl.dot(s_t, b.to(tl.float32), input_precision="ieee")
    else:
        lora = tl.dot(s_t, b.to(tl.float32))
    dy = tl.load(DY + rows[:, None] * sym + cols[None, :] * syn, mask=m2, other=0.0).to(tl.float32)
    z = tl.load(Z0 + rows[:, None] * szm + cols[None, :] * szn, mask=m2, other=0.0).to(tl.float32) + lora
    g = tl.load(G + cols, mask=nmask, other=0.0)
    out = rows[:, None] * N + cols[None, :]
    tl.store(DZ + out, (g[None, :] * dy).to(DZ.dtype.element_ty), mask=m2)
    if HAS_DZB:
        tl.store(DZB + out, ((g[None, :] - 1.0) * dy).to(DZB.dtype.element_ty), mask=m2)
    inv_n = tl.load(INV_N + cols, mask=nmask, other=0.0)
    tl.atomic_add(DM + cols, tl.sum(dy * z, axis=0) * inv_n, mask=nmask)


@triton.jit
def _dropout_apply_kernel(
    X, OUT, seed, thr, keep_scale, M, K, sxm, sxk, som, sok,
    FAST4: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    # OUT = D⊙X with the LoRA dropout mask of ops/dropout.py over a row-major [M, K] index space (the mask the
    # LoRA kernels regenerate): bytes-bound, one read and one write; OUT may be X (in place).
    DT = X.dtype.element_ty
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    m2 = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * sxm + cols[None, :] * sxk, mask=m2, other=0.0)
    keep = keep_tile(seed, rows, k0, K, thr, BM, BK, FAST4)
    tl.store(OUT + rows[:, None] * som + cols[None, :] * sok, tl.where(keep, x * keep_scale, 0.0).to(DT), mask=m2)


# ---------------------------------------------------------------- launchers
def apply_dropout(x2: torch.Tensor, p: float, seed: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """D⊙X for a 2-D X (any strides) with the mask ``lora_dropout_mask(x2.shape, p, seed)`` defines, in x2.dtype,
    into ``out`` (a new contiguous tensor by default; ``out=x2`` works in place)."""
    M, K = x2.shape
    out = torch.empty((M, K), device=x2.device, dtype=x2.dtype) if out is None else out
    BM, BK = (16, 32) if interpreting() else (32, 128)
    _dropout_apply_kernel[(ceil_div(M, BM), ceil_div(K, BK))](
        x2, out, int(seed), dropout_threshold(p), keep_scale_rounded(p, x2.dtype), M, K,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), FAST4=mask_fast(K), BM=BM, BK=BK, num_warps=4,
    )
    return out


@functools.lru_cache(maxsize=1024)
def _norm_plan(N: int, K: int, R: int, fp32: bool, sms: int, deterministic: bool):
    BR = next_pow2_16(R)
    if interpreting():
        BN, BK, precision = 16, 32, "ieee"
    else:
        BN, BK, precision = 32, (64 if BR <= 32 else 32), ("ieee" if fp32 else "tf32x3")
    n_n = ceil_div(N, BN)
    splits = 1 if deterministic else max(1, min(ceil_div(K, 4 * BK), ceil_div(4 * sms, n_n)))
    k_per = ceil_div(ceil_div(K, splits), BK) * BK
    return BN, BK, BR, precision, n_n, ceil_div(K, k_per), k_per


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """n = ‖W + s·B·A‖ per output row, fp32 [N], without forming B·A; weight [N, K] any strides and float dtype.

    >>> w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)  # doctest: +SKIP
    >>> dora_weight_norm(w.cuda(), a.cuda(), b.cuda(), 2.0).shape  # doctest: +SKIP
    torch.Size([8])
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    BN, BK, BR, precision, n_n, splits, k_per = _norm_plan(N, K, R, weight.dtype == torch.float32,
                                                            num_sms(weight.device),
                                                            torch.are_deterministic_algorithms_enabled())
    out = (torch.zeros if splits > 1 else torch.empty)(N, device=weight.device, dtype=torch.float32)
    sw, sa, sb = weight.stride(), lora_A.stride(), lora_B.stride()
    _dora_norm_kernel[(n_n, splits)](
        weight, lora_A, lora_B, out, float(scaling), N, K, R, k_per, sw[0], sw[1], sa[0], sa[1], sb[0], sb[1],
        PRECISION=precision, ATOMIC=splits > 1, BN=BN, BK=BK, BR=BR, num_warps=4, num_stages=3,
    )
    return out.sqrt_()


@functools.lru_cache(maxsize=1024)
def _fwd_plan(M: int, N: int, R: int, sms: int):
    BR = next_pow2_16(R)
    if interpreting():
        BM, BN = 16, 32
    else:
        BM, BN = (64 if M >= 64 else 16), (128 if BR <= 32 else 64)
    n_m = ceil_div(M, BM)
    splits = max(1, min(ceil_div(N, BN), ceil_div(2 * sms, n_m)))
    n_per = ceil_div(ceil_div(N, splits), BN) * BN
    return BM, BN, BR, n_m, ceil_div(N, n_per), n_per


def _dora_epilogue(P, lora_B, Z0, ZX, bias, g, scaling: float, out: torch.Tensor):
    """(Y, S'): Y = g⊙(Z0 + S'·Bᵀ) + (ZX - Z0 | bias) into ``out`` (may be Z0 or ZX), S' = s·ΣP."""
    _, M, R = P.shape
    N = lora_B.shape[0]
    BM, BN, BR, n_m, splits, n_per = _fwd_plan(M, N, R, num_sms(P.device))
    S = torch.empty((M, R), device=P.device, dtype=torch.float32)
    zx = ZX if ZX is not None else Z0
    _dora_fwd_kernel[(n_m, splits)](
        P, lora_B, Z0, zx, bias if bias is not None else g, g, out, S, float(scaling), M, N, R, P.shape[0], n_per,
        P.stride(0), P.stride(1), P.stride(2), lora_B.stride(0), lora_B.stride(1), Z0.stride(0), Z0.stride(1),
        zx.stride(0), zx.stride(1), out.stride(0), out.stride(1), S.stride(0), S.stride(1),
        HAS_ZX=ZX is not None, HAS_BIAS=bias is not None, IEEE=Z0.dtype == torch.float32,
        BM=BM, BN=BN, BR=BR, num_warps=4,
    )
    return out, S


def dora_forward_2d(x2, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float, seed,
                    weight_norm: Optional[torch.Tensor] = None, keep_for_backward: bool = True):
    """DoRA forward on a 2-D x [M, K], no autograd: (Y [M, N] in x2.dtype, S' fp32 [M, r], Z0 [M, N] | None,
    g = m/n fp32 [N], 1/n fp32 [N]). ``weight`` is the dense [N, K] base weight (a 4-bit base: dequantized by the
    caller); ``weight_norm`` a cached n (inference) or None; ``keep_for_backward=False`` lets Y overwrite Z0.
    The building block of the autograd Function and of the custom op."""
    dt = x2.dtype
    w = weight if weight.dtype == dt else weight.to(dt)
    n = dora_weight_norm(weight, lora_A, lora_B, scaling) if weight_norm is None else weight_norm
    g = magnitude.detach().to(torch.float32) / n
    inv_n = n.reciprocal()
    b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
    if dropout_p > 0.0:
        dropped = apply_dropout(x2, dropout_p, seed)
        P = lora_ops.lora_s_partials(dropped, lora_A)
        Z0 = torch.mm(dropped, w.t())
        ZX = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
        y2, S = _dora_epilogue(P, lora_B, Z0, ZX, None, g, scaling, out=ZX)
    else:
        P = lora_ops.lora_s_partials(x2, lora_A)
        Z0 = torch.mm(x2, w.t())
        out = torch.empty_like(Z0) if keep_for_backward else Z0
        y2, S = _dora_epilogue(P, lora_B, Z0, None, b, g, scaling, out=out)
    return y2, S, (Z0 if keep_for_backward else None), g, inv_n


def _dora_grads_torch(dy2, Z0, S, lora_B, g, inv_n, need_dzb: bool):
    """The backward kernel's outputs from torch ops (deterministic mode): (dZ, dZb | None, dm fp32 [N])."""
    dy = dy2.to(torch.float32)
    z = Z0.to(torch.float32) + S @ lora_B.to(torch.float32).t()
    dm = (dy * z).sum(0) * inv_n
    dZb = ((g - 1.0) * dy).to(dy2.dtype) if need_dzb else None
    return (g * dy).to(dy2.dtype), dZb, dm


def _dora_grads(dy2, Z0, S, lora_B, g, inv_n, need_dzb: bool):
    """(dZ = g⊙dY, dZb = (g-1)⊙dY | None, dm = Σ_rows dY⊙(Z0 + S'·Bᵀ) / n) in one pass over dY."""
    M, N = dy2.shape
    R = S.shape[1]
    BR = next_pow2_16(R)
    BM, BN = (16, 32) if interpreting() else (64, 64 if BR <= 32 else 32)
    dZ = torch.empty((M, N), device=dy2.device, dtype=dy2.dtype)
    dZb = torch.empty((M, N), device=dy2.device, dtype=dy2.dtype) if need_dzb else None
    dm = torch.zeros(N, device=dy2.device, dtype=torch.float32)
    _dora_bwd_kernel[(ceil_div(M, BM), ceil_div(N, BN))](
        dy2, Z0, S, lora_B, g, inv_n, dZ, dZb if need_dzb else dZ, dm, M, N, R,
        dy2.stride(0), dy2.stride(1), Z0.stride(0), Z0.stride(1), S.stride(0), S.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        HAS_DZB=need_dzb, IEEE=dy2.dtype == torch.float32, BM=BM, BN=BN, BR=BR, num_warps=4,
    )
    return dZ, dZb, dm


def dora_backward_2d(dy2, x2, S, Z0, g, inv_n, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                     need_x: bool = True, need_b: bool = False, need_A: bool = True, need_B: bool = True,
                     need_m: bool = True, separate_outputs: bool = False):
    """DoRA backward on 2-D tensors, no autograd: (dX | None, db fp32 [N] | None, dA fp32 [r, K] | None,
    dB fp32 [N, r] | None, dm fp32 [N] | None). dy2 in x2.dtype; S, Z0, g, inv_n as the forward returned them;
    ``weight`` dense [N, K] (needed only for dX)."""
    dt = x2.dtype
    p = dropout_p
    need_dzb = p > 0.0 and need_x
    if torch.are_deterministic_algorithms_enabled():  # torch ops and cuBLAS only: bitwise reproducible
        dZ, dZb, dm = _dora_grads_torch(dy2, Z0, S, lora_B, g, inv_n, need_dzb)
    else:
        dZ, dZb, dm = _dora_grads(dy2, Z0, S, lora_B, g, inv_n, need_dzb)
    # LoRA's adapter gradients for the output gradient dZ = g⊙dY, with g folded into the small operands instead of
    # rounding g⊙dY to 16 bits: dS = s·dZ·B = s·dY·(g⊙B) and dB = dZᵀ·S' = g⊙(dYᵀ·S') (PEFT keeps g·dY in fp32).
    # kernels/lora.py: dS, dB in one pass over dY, then dA and Z2 in one pass over X; cuBLAS only in
    # deterministic mode.
    g_col = g.view(-1, 1)
    dA, dB, Z2 = lora_ops.lora_adapter_grads_2d(dy2, x2, S, lora_A, lora_B * g_col, scaling, p, seed, need_A,
                                                need_B, need_x, separate_outputs)
    if dB is not None:
        dB.mul_(g_col)
    dx2 = None
    if need_x:
        w = weight if weight.dtype == dt else weight.to(dt)
        if p > 0.0:
            base = torch.mm(dZb, w)
            apply_dropout(base, p, seed, out=base)  # D⊙((g-1)⊙dY·W), in place
            dx2 = Z2.add_(base).addmm_(dy2, w)
        else:
            dx2 = Z2.addmm_(dZ, w)  # Z2 + dZ·W, Z2 read by cuBLAS as C (beta=1)
    db = dy2.sum(0, dtype=torch.float32) if need_b else None
    return dx2, db, dA, (dB if need_B else None), (dm if need_m else None)


# ---------------------------------------------------------------- autograd
class _DoraLinearFn(torch.autograd.Function):
    """Y = DoRA(x) over a dense base (``ks`` None: ``weight`` is W [N, K]) or a 4-bit one (``weight`` holds the
    packed bytes, ``ks`` their KernelState: W is dequantized into the shared buffer per GEMM, forward and
    backward). Gradients for x, bias, lora_A, lora_B and magnitude; the base weight is frozen."""

    @staticmethod
    def forward(ctx, x, weight, ks, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_norm):
        x2 = as_2d(x)
        w = weight if ks is None else dequantize_to(weight, ks, x.dtype)
        y2, S, Z0, g, inv_n = dora_forward_2d(x2, w, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed,
                                              weight_norm)
        ctx.save_for_backward(x, S, Z0, g, inv_n, lora_A, lora_B, magnitude)
        ctx.weight, ctx.ks = weight, ks  # frozen module state, not activations
        ctx.scaling, ctx.dropout_p, ctx.seed = float(scaling), float(dropout_p), seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, S, Z0, g, inv_n, lora_A, lora_B, magnitude = ctx.saved_tensors
        need_x, _, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:7]
        w = None
        if need_x:
            w = ctx.weight if ctx.ks is None else dequantize_to(ctx.weight, ctx.ks, x.dtype)
        dx2, db, dA, dB, dm = dora_backward_2d(
            as_2d(dy).to(x.dtype), as_2d(x), S, Z0, g, inv_n, w, lora_A, lora_B, ctx.scaling, ctx.dropout_p,
            ctx.seed, need_x, need_b, need_A, need_B, need_m)
        return (
            None if dx2 is None else dx2.view(x.shape),
            None, None,
            None if db is None else db.to(ctx.bias_dtype),
            None if dA is None else dA.to(lora_A.dtype),
            None if dB is None else dB.to(lora_B.dtype),
            None if dm is None else dm.to(magnitude.dtype),
            None, None, None, None,
        )


def _check(x, dropout_p, seed, what):
    if dropout_p > 0.0 and seed is None:
        raise ValueError(f"{what}: dropout_p > 0 needs a seed")
    check_kernel_dtype(x.dtype, what)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0, seed=None,
                weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA linear on a frozen dense base (the Triton kernels + cuBLAS), PEFT's numbers: see the module docstring.
    Differentiable in x, bias, lora_A, lora_B and magnitude (not in weight). ``weight_norm``: a cached n.

    >>> x = torch.randn(2, 3, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)  # doctest: +SKIP
    >>> dora_linear(x.cuda(), w.cuda(), None, a.cuda(), b.cuda(), torch.ones(8).cuda(), 2.0).shape  # doctest: +SKIP
    torch.Size([2, 3, 8])
    """
    _check(x, dropout_p, seed, "dora_linear")
    return _DoraLinearFn.apply(x, weight, None, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p),
                               seed, weight_norm)


def nf4_weight_norm(packed: torch.Tensor, quant_state: Any, lora_A, lora_B, scaling: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """n for a 4-bit base: the weight dequantized (to ``dtype``, as the forward computes with it) into the shared
    buffer, then ``dora_weight_norm``."""
    ks = kernel_state(quant_state, packed.device)
    return dora_weight_norm(dequantize_to(packed, ks, dtype), lora_A, lora_B, scaling)


def nf4_dora_linear(x, packed, quant_state: Any, bias, lora_A, lora_B, magnitude, scaling: float,
                    dropout_p: float = 0.0, seed=None, weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """QDoRA: ``dora_linear`` over a 4-bit base (bnb NF4 / FP4 bytes + QuantState); x in the compute dtype."""
    _check(x, dropout_p, seed, "nf4_dora_linear")
    ks: KernelState = kernel_state(quant_state, x.device)
    return _DoraLinearFn.apply(x, packed, ks, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p),
                               seed, weight_norm)

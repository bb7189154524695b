"""LoRA on a frozen linear base: the fused Triton kernels and the autograd Function over them.

Shapes and the math: ``fastpeft/ops/reference.py`` (the oracle); dropout mask: ``fastpeft/ops/dropout.py``.
M = prod(x.shape[:-1]); s = scaling.
    forward : S' = s·(D⊙X)·Aᵀ ; Z = S'·Bᵀ + b       _lora_fwd_rows_kernel (one launch: one pass over X, writes Z)
              Y = Z + X·Wᵀ                          cuBLAS addmm_ with beta=1: Z is read in the GEMM epilogue
    backward: dS = s·dY·B, dB = dYᵀ·S'              _lora_ds_db_kernel (one pass over dY)
              dA = dSᵀ·(D⊙X), Z2 = D⊙(dS·A)         _lora_da_dx_kernel (one pass over X, mask regenerated once)
              dX = Z2 + dY·W                        cuBLAS addmm_ with beta=1
    The K-split pair _lora_s_kernel + _lora_expand_kernel (more programs, two launches) serves the 4-bit fused
    and decode paths (``kernels/nf4_lora.py``, ``kernels/nf4_gemv.py``), which add Z inside their own GEMM.
Saved for backward: x (the caller's tensor object), S' [M, r] fp32, the seed; parameters by reference.
Precision: the adapter operands (A, B, S', dS) stay fp32 and the activation tiles are widened, so the small
products run with fp32 operands -- TF32 on NVIDIA tensor cores for bf16/fp16 activations (10-bit mantissa:
~8x closer to PEFT's fp32 LoRA term than bf16 operands, measured on GPU), full fp32 for fp32 activations.
These kernels are memory-bound, so the wider operands cost registers, not time.
Under torch.use_deterministic_algorithms(True) the backward composes cuBLAS calls instead of the fp32-atomic
kernels (same math, bitwise reproducible, slower, and it materialises the dropout mask once).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dropout import dropout_threshold, keep_scale_rounded, lora_dropout_mask
from ..reference import lora_linear_reference
from .common import as_2d, ceil_div, check_kernel_dtype, dot_ieee, interpreting, keep_tile, mask_fast, next_pow2_16, num_sms, triton_ok

__all__ = ["lora_s_partials", "lora_expand", "lora_fwd_rows", "lora_ds_db", "lora_da_dx", "lora_forward_2d",
           "lora_adapter_grads_2d", "lora_backward_2d",
           "lora_linear"]


@triton.jit
def _s_rows(X, A, seed, thr, keep_scale, rows, rmask, rr, rrmask, k_begin, k_end, K, sxm, sxk, sar, sak,
            DROPOUT: tl.constexpr, FAST4: tl.constexpr, IEEE: tl.constexpr,
            BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """fp32 [BM, BR] = (D⊙X)[rows, k_begin:k_end]·A[:, k_begin:k_end]ᵀ: one pass over those X columns, the
    mask applied on the fly (rounded in x.dtype, as the reference), products with fp32 operands."""
    DT = X.dtype.element_ty
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        kmask = (k0 + rk) < k_end
        x = tl.load(X + rows[:, None] * sxm + (k0 + rk)[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if DROPOUT:
            keep = keep_tile(seed, rows, k0, K, thr, BM, BK, FAST4)
            x = tl.where(keep, x * keep_scale, 0.0).to(DT)  # keep_scale already rounded to x.dtype
        x = x.to(tl.float32)
        a = tl.load(A + rr[:, None] * sar + (k0 + rk)[None, :] * sak, mask=rrmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(x, tl.trans(a), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(a), acc)
    return acc


@triton.jit
def _z_rows(B, BIAS, Z, s_t, rows, rmask, rr, rrmask, n_begin, n_end, sbn, sbr, szm, szn,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr):
    """Z[rows, n_begin:n_end] = s_t·B[n_begin:n_end]ᵀ (+ bias), s_t fp32 [BM, BR]; stored in Z's dtype."""
    rn = tl.arange(0, BN)
    for n0 in range(n_begin, n_end, BN):
        cols = (n0 + rn).to(tl.int64)
        nmask = cols < n_end
        b = tl.load(B + cols[None, :] * sbn + rr[:, None] * sbr, mask=rrmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        if IEEE:
            z = tl.dot(s_t, b, input_precision="ieee")
        else:
            z = tl.dot(s_t, b)
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + rows[:, None] * szm + cols[None, :] * szn, z.to(Z.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _lora_s_kernel(
    X, A, P, seed, thr, keep_scale, M, K, R, k_per_split,
    sxm, sxk, sar, sak, sps, spm, spr,
    DROPOUT: tl.constexpr, FAST4: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # Bound: bytes. Reads X once (M·K·elem); A (r·K·4) is re-read from L2 by each of the M/BM row blocks;
    # writes fp32 partials (#K-splits·M·r·4, a few % of X). FLOPs 2·M·K·r: ~8 FLOP/B, far under the ridge.
    # Split over K as well as M so that small M still fills the GPU.
    pid_s = tl.program_id(1)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    rr = tl.arange(0, BR)
    rrmask = rr < R
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = _s_rows(X, A, seed, thr, keep_scale, rows, rmask, rr, rrmask, k_begin, k_end, K, sxm, sxk, sar, sak,
                  DROPOUT, FAST4, IEEE, BM, BK, BR)
    tl.store(P + pid_s * sps + rows[:, None] * spm + rr[None, :] * spr, acc, mask=rmask[:, None] & rrmask[None, :])


@triton.jit
def _lora_expand_kernel(
    P, B, BIAS, Z, S, scaling, M, N, R, SPLITS, n_per_split,
    sps, spm, spr, sbn, sbr, szm, szn, ssm, ssr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # Bound: bytes. Writes Z = S'·Bᵀ + b once (M·N·elem); reads the S partials (#splits·M·r·4) once per
    # N-split and B (N·r·4, L2-resident). FLOPs 2·M·N·r: ~r FLOP/B, under the ridge.
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
    n_begin = pid_n * n_per_split
    _z_rows(B, BIAS, Z, s_acc, rows, rmask, rr, rrmask, n_begin, tl.minimum(n_begin + n_per_split, N),
            sbn, sbr, szm, szn, HAS_BIAS, IEEE, BN)


@triton.jit
def _lora_fwd_rows_kernel(
    X, A, B, BIAS, Z, S, seed, thr, keep_scale, scaling, M, K, N, R,
    sxm, sxk, sar, sak, sbn, sbr, szm, szn, ssm, ssr,
    DROPOUT: tl.constexpr, FAST4: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # The whole LoRA forward term in ONE launch: each program owns BM rows, reduces S' = s·(D⊙X)·Aᵀ over all
    # of K, then writes Z = S'·Bᵀ + b for those rows over all of N. Bound: bytes -- X read once (M·K·elem),
    # Z written once (M·N·elem); A and B are re-read from L2 by each of the M/BM programs. One launch instead
    # of two (K-split partials + expand) because the layer is host-bound on slow hosts; the K-split pair is
    # kept for the Triton-GEMM and fused-NF4 paths.
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    rr = tl.arange(0, BR)
    rrmask = rr < R
    acc = _s_rows(X, A, seed, thr, keep_scale, rows, rmask, rr, rrmask, 0, K, K, sxm, sxk, sar, sak,
                  DROPOUT, FAST4, IEEE, BM, BK, BR) * scaling
    tl.store(S + rows[:, None] * ssm + rr[None, :] * ssr, acc, mask=rmask[:, None] & rrmask[None, :])
    _z_rows(B, BIAS, Z, acc, rows, rmask, rr, rrmask, 0, N, sbn, sbr, szm, szn, HAS_BIAS, IEEE, BN)


@triton.jit
def _lora_ds_db_kernel(
    DY, B, S, DS, DB, scaling, M, N, R, n_per_split,
    sym, syn, sbn, sbr, ssm, ssr, sdsm, sdsr, sdbn, sdbr,
    DS_ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # Bound: bytes. Reads dY once (M·N·elem); S', B tiny. fp32 atomics: (M/BM)·N·r for dB and
    # (#N-splits)·M·r for dS -- a few % of the dY bytes at BM=128. FLOPs 4·M·N·r: memory-bound.
    # dS = s·dY·B ; dB = dYᵀ·S' (S' already carries s).
    DT = DY.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    rr = tl.arange(0, BR)
    rrmask = rr < R
    rn = tl.arange(0, BN)
    s_t = tl.load(S + rows[:, None] * ssm + rr[None, :] * ssr, mask=rmask[:, None] & rrmask[None, :], other=0.0)
    # dY stays in its 16-bit dtype (exact) and the fp32 operands S' and B are split into hi + lo 16-bit parts:
    # two 16-bit MMAs per product keep ~16 mantissa bits of S' and B (PEFT computes this term in fp32) at
    # 16-bit MMA speed (TF32 operands here ran 2-3x slower on H100: the transposed fp32 dY tile).
    s_hi = s_t.to(DT)
    s_lo = (s_t - s_hi.to(tl.float32)).to(DT)
    ds = tl.zeros((BM, BR), dtype=tl.float32)
    n_begin = pid_s * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for n0 in range(n_begin, n_end, BN):
        cols = (n0 + rn).to(tl.int64)
        nmask = cols < n_end
        dy = tl.load(DY + rows[:, None] * sym + cols[None, :] * syn, mask=rmask[:, None] & nmask[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * sbn + rr[None, :] * sbr, mask=nmask[:, None] & rrmask[None, :], other=0.0).to(tl.float32)
        if IEEE:
            ds = tl.dot(dy, b, ds, input_precision="ieee")
            db = tl.dot(tl.trans(dy), s_t, input_precision="ieee")
        else:
            b_hi = b.to(DT)
            b_lo = (b - b_hi.to(tl.float32)).to(DT)
            ds = tl.dot(dy, b_hi, ds)
            ds = tl.dot(dy, b_lo, ds)
            dyt = tl.trans(dy)
            db = tl.dot(dyt, s_hi)
            db = tl.dot(dyt, s_lo, db)
        tl.atomic_add(DB + cols[:, None] * sdbn + rr[None, :] * sdbr, db, mask=nmask[:, None] & rrmask[None, :])
    ds_ptr = DS + rows[:, None] * sdsm + rr[None, :] * sdsr
    if DS_ATOMIC:
        tl.atomic_add(ds_ptr, ds * scaling, mask=rmask[:, None] & rrmask[None, :])
    else:
        tl.store(ds_ptr, ds * scaling, mask=rmask[:, None] & rrmask[None, :])


@triton.jit
def _lora_da_dx_kernel(
    X, DS, A, DA, Z2, seed, thr, keep_scale, M, K, R, m_per_split,
    sxm, sxk, sdsm, sdsr, sar, sak, sdar, sdak, szm, szk,
    DROPOUT: tl.constexpr, FAST4: tl.constexpr, NEED_DA: tl.constexpr, NEED_DX: tl.constexpr,
    ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # Bound: bytes. Reads X once (M·K·elem, for dA) and writes Z2 = D⊙(dS·A) once (M·K·elem, for dX; cuBLAS
    # then adds dY·W into it with beta=1, reading it in its epilogue); the mask is regenerated once for both.
    # dS (M·r·4) and A (r·K·4) come from L2; dA: (#M-splits)·r·K fp32 atomics. FLOPs 4·M·K·r.
    DT = X.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    kmask = cols < K
    rr = tl.arange(0, BR)
    rrmask = rr < R
    rm = tl.arange(0, BM)
    if NEED_DX:
        a = tl.load(A + rr[:, None] * sar + cols[None, :] * sak, mask=rrmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    m_begin = pid_s * m_per_split
    m_end = tl.minimum(m_begin + m_per_split, M)
    for m0 in range(m_begin, m_end, BM):
        rows = (m0 + rm).to(tl.int64)
        rmask = rows < m_end
        m2 = rmask[:, None] & kmask[None, :]
        ds = tl.load(DS + rows[:, None] * sdsm + rr[None, :] * sdsr, mask=rmask[:, None] & rrmask[None, :], other=0.0)
        if DROPOUT:
            keep = keep_tile(seed, rows, pid_k * BK, K, thr, BM, BK, FAST4)
        if NEED_DA:
            x = tl.load(X + rows[:, None] * sxm + cols[None, :] * sxk, mask=m2, other=0.0)
            if DROPOUT:
                x = tl.where(keep, x * keep_scale, 0.0).to(DT)  # keep_scale already rounded to x.dtype
            x = x.to(tl.float32)
            if IEEE:
                acc = tl.dot(tl.trans(ds), x, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(ds), x, acc)
        if NEED_DX:
            if IEEE:
                t = tl.dot(ds, a, input_precision="ieee")
            else:
                t = tl.dot(ds, a)
            if DROPOUT:
                t = tl.where(keep, t * keep_scale, 0.0)
            tl.store(Z2 + rows[:, None] * szm + cols[None, :] * szk, t.to(DT), mask=m2)
    if NEED_DA:
        da_ptr = DA + rr[:, None] * sdar + cols[None, :] * sdak
        if ATOMIC:
            tl.atomic_add(da_ptr, acc, mask=rrmask[:, None] & kmask[None, :])
        else:
            tl.store(da_ptr, acc, mask=rrmask[:, None] & kmask[None, :])


# ---------------------------------------------------------------- launchers
def _dropout_args(p: float, seed, dtype=torch.float32):
    """(on, seed, integer threshold, keep scale 1/(1-p) rounded to dtype as the reference's mask.to(x.dtype))."""
    if p > 0.0:
        if seed is None:
            raise ValueError("lora_linear: dropout_p > 0 needs a seed")
        return True, int(seed), dropout_threshold(p), keep_scale_rounded(p, dtype)
    return False, 0, 0, 1.0


def _splits(work_items: int, per_program_min: int, device) -> int:
    """How many programs to split a loop over, so that the grid holds ~2 programs per SM."""
    return max(1, min(per_program_min, ceil_div(2 * num_sms(device), max(1, work_items))))


# Launch plans, cached per shape: the layers are host-bound on slow hosts (benchmarks/scripts/host_overhead.py), so
# block sizes and split counts are computed once per (shape, rank, device) rather than on every call.
@functools.lru_cache(maxsize=1024)
def _ds_db_plan(M: int, N: int, R: int, sms: int):
    BR = next_pow2_16(R)
    if interpreting():
        BM, BN = 16, 32
    else:
        BM = 128 if M >= 2048 else 64 if M >= 256 else 16
        BN = 64 if BR <= 32 else 32
    n_m = ceil_div(M, BM)
    splits = max(1, min(ceil_div(N, BN), ceil_div(2 * sms, n_m)))
    n_per = ceil_div(ceil_div(N, splits), BN) * BN
    splits = ceil_div(N, n_per)
    return BM, BN, BR, n_m, splits, n_per, (8 if BM >= 128 else 4)


@functools.lru_cache(maxsize=1024)
def _da_dx_plan(M: int, K: int, R: int, sms: int):
    BR = next_pow2_16(R)
    if interpreting():
        BM, BK = 16, 32
    else:
        BM, BK = (32, 128) if BR <= 32 else (32, 64) if BR <= 64 else (16, 32)
    n_k = ceil_div(K, BK)
    splits = max(1, min(ceil_div(M, BM), ceil_div(2 * sms, n_k)))
    m_per = ceil_div(ceil_div(M, splits), BM) * BM
    splits = ceil_div(M, m_per)
    return BM, BK, BR, n_k, splits, m_per


@functools.lru_cache(maxsize=256)
def _fwd_rows_plan(R: int):
    BR = next_pow2_16(R)
    if interpreting():
        return 16, 32, 32, BR
    return 16, (128 if BR <= 32 else 64 if BR <= 64 else 32), (128 if BR <= 32 else 64), BR


def lora_s_partials(x2: torch.Tensor, lora_A: torch.Tensor, p: float = 0.0, seed=None) -> torch.Tensor:
    """fp32 partial sums [splits, M, r] of (D⊙X)·Aᵀ over K-slices; X 2-D with any strides."""
    M, K = x2.shape
    R = lora_A.shape[0]
    do, sd, thr, ks = _dropout_args(p, seed, x2.dtype)
    BR = next_pow2_16(R)
    if interpreting():
        BM, BK = 16, 32
    else:
        BM = 64 if M >= 64 else 16
        BK = 128 if BR <= 32 else 64 if BR <= 64 else 32
    n_m = ceil_div(M, BM)
    splits = _splits(n_m, ceil_div(K, BK), x2.device)
    k_per = ceil_div(ceil_div(K, splits), BK) * BK
    splits = ceil_div(K, k_per)
    P = torch.empty((splits, M, R), device=x2.device, dtype=torch.float32)
    _lora_s_kernel[(n_m, splits)](
        x2, lora_A, P, sd, thr, ks, M, K, R, k_per,
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), P.stride(0), P.stride(1), P.stride(2),
        DROPOUT=do, FAST4=mask_fast(K), IEEE=dot_ieee(x2.dtype), BM=BM, BK=BK, BR=BR,
        num_warps=4, num_stages=4,
    )
    return P


def lora_expand(P: torch.Tensor, lora_B: torch.Tensor, bias, scaling: float, dtype: torch.dtype):
    """(Z, S'): S' = scaling·ΣP (fp32 [M, r]) and Z = S'·Bᵀ + bias in dtype [M, N], in one launch."""
    _, M, R = P.shape
    N = lora_B.shape[0]
    BR = next_pow2_16(R)
    if interpreting():
        BM, BN = 16, 32
    else:
        BM = 64 if M >= 64 else 16
        BN = 128 if BR <= 32 else 64
    n_m = ceil_div(M, BM)
    n_splits = _splits(n_m, ceil_div(N, BN), P.device)
    n_per = ceil_div(ceil_div(N, n_splits), BN) * BN
    n_splits = ceil_div(N, n_per)
    Z = torch.empty((M, N), device=P.device, dtype=dtype)
    S = torch.empty((M, R), device=P.device, dtype=torch.float32)
    _lora_expand_kernel[(n_m, n_splits)](
        P, lora_B, bias if bias is not None else Z, Z, S, float(scaling), M, N, R, P.shape[0], n_per,
        P.stride(0), P.stride(1), P.stride(2), lora_B.stride(0), lora_B.stride(1),
        Z.stride(0), Z.stride(1), S.stride(0), S.stride(1),
        HAS_BIAS=bias is not None, IEEE=dot_ieee(dtype), BM=BM, BN=BN, BR=BR, num_warps=4,
    )
    return Z, S


def lora_fwd_rows(x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias, scaling: float,
                  p: float = 0.0, seed=None):
    """(Z, S') in one launch: S' = scaling·(D⊙X)·Aᵀ (fp32 [M, r]) and Z = S'·Bᵀ + bias (x.dtype [M, N])."""
    M, K = x2.shape
    R = lora_A.shape[0]
    N = lora_B.shape[0]
    do, sd, thr, ks = _dropout_args(p, seed, x2.dtype) if p > 0.0 else (False, 0, 0, 1.0)
    BM, BK, BN, BR = _fwd_rows_plan(R)
    Z = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    S = torch.empty((M, R), device=x2.device, dtype=torch.float32)
    sx, sa, sb = x2.stride(), lora_A.stride(), lora_B.stride()
    _lora_fwd_rows_kernel[(ceil_div(M, BM),)](
        x2, lora_A, lora_B, bias if bias is not None else Z, Z, S, sd, thr, ks, float(scaling), M, K, N, R,
        sx[0], sx[1], sa[0], sa[1], sb[0], sb[1], N, 1, R, 1,
        DROPOUT=do, FAST4=K % 8 == 0, HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32,
        BM=BM, BK=BK, BN=BN, BR=BR, num_warps=4, num_stages=3,
    )
    return Z, S


def lora_ds_db(dy2: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling: float, extra_zeros: int = 0):
    """dS = s·dY·B (fp32 [M, r]) and dB = dYᵀ·S' (fp32 [N, r]; S' = s·S already scaled) in one pass over dY.

    extra_zeros > 0: also returns a zero-filled fp32 vector of that length, carved from the same zero-fill
    (one memset per backward instead of two: the dA atomics target)."""
    M, N = dy2.shape
    R = lora_B.shape[1]
    BM, BN, BR, n_m, splits, n_per, warps = _ds_db_plan(M, N, R, num_sms(dy2.device))
    n_ds = M * R if splits > 1 else 0
    buf = torch.zeros(N * R + n_ds + extra_zeros, device=dy2.device, dtype=torch.float32)
    dB = buf[: N * R].view(N, R)
    dS = buf[N * R: N * R + n_ds].view(M, R) if splits > 1 else torch.empty((M, R), device=dy2.device, dtype=torch.float32)
    sy, sb, ss = dy2.stride(), lora_B.stride(), S.stride()
    _lora_ds_db_kernel[(n_m, splits)](
        dy2, lora_B, S, dS, dB, float(scaling), M, N, R, n_per,
        sy[0], sy[1], sb[0], sb[1], ss[0], ss[1], R, 1, R, 1,
        DS_ATOMIC=splits > 1, IEEE=dy2.dtype == torch.float32, BM=BM, BN=BN, BR=BR, num_warps=warps,
    )
    if extra_zeros:
        return dS, dB, buf[N * R + n_ds:]
    return dS, dB


def lora_da_dx(x2: torch.Tensor, dS: torch.Tensor, lora_A: torch.Tensor, p: float = 0.0, seed=None,
               need_dA: bool = True, need_dx: bool = True, zeros=None):
    """(dA, Z2): dA = dSᵀ·(D⊙X) (fp32 [r, K]) and Z2 = D⊙(dS·A) (x.dtype [M, K]) in one pass over X,
    the mask regenerated once from the seed. Either output may be skipped (None). `zeros`: an optional
    zero-filled fp32 vector of r·K elements to accumulate dA into (see lora_ds_db's extra_zeros)."""
    M, K = x2.shape
    R = dS.shape[1]
    do, sd, thr, ks = _dropout_args(p, seed, x2.dtype) if p > 0.0 else (False, 0, 0, 1.0)
    BM, BK, BR, n_k, splits, m_per = _da_dx_plan(M, K, R, num_sms(x2.device))
    atomic = need_dA and splits > 1
    if not need_dA:
        dA = None
    elif zeros is not None:
        dA = zeros.view(R, K)
    else:
        dA = (torch.zeros if atomic else torch.empty)((R, K), device=x2.device, dtype=torch.float32)
    Z2 = torch.empty((M, K), device=x2.device, dtype=x2.dtype) if need_dx else None
    sx, sd_, sa = x2.stride(), dS.stride(), lora_A.stride()
    _lora_da_dx_kernel[(n_k, splits)](
        x2, dS, lora_A, dA if need_dA else dS, Z2 if need_dx else dS, sd, thr, ks, M, K, R, m_per,
        sx[0], sx[1], sd_[0], sd_[1], sa[0], sa[1], K, 1, K, 1,
        DROPOUT=do, FAST4=K % 8 == 0, NEED_DA=need_dA, NEED_DX=need_dx, ATOMIC=atomic,
        IEEE=x2.dtype == torch.float32, BM=BM, BK=BK, BR=BR, num_warps=4, num_stages=3,
    )
    return dA, Z2


# ---------------------------------------------------------------- layer
def _param_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lora_forward_2d(x2, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """Forward on a 2-D x [M, K]: returns (Y [M, N] in x.dtype, S' = scaling·(D⊙x)·Aᵀ as fp32 [M, r]).

    The building block of the autograd Function and of the custom op: no autograd here.
    """
    dt = x2.dtype
    w = _param_dtype(weight, dt)
    b = None if bias is None else _param_dtype(bias, dt)
    y2, S = lora_fwd_rows(x2, lora_A, lora_B, b, scaling, dropout_p, seed)  # y2 = S'·Bᵀ + b ...
    y2.addmm_(x2, w.t())  # ... + X·Wᵀ: cuBLAS reads y2 as C (beta=1) in its epilogue
    return y2, S


def _deterministic_backward(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed, need_A, need_x):
    """The backward's adapter terms from cuBLAS calls only (no atomics): bitwise reproducible."""
    dt = x2.dtype
    dS = torch.mm(dy2, _param_dtype(lora_B, dt)).float() * scaling
    dB = torch.mm(dy2.t(), S.to(dt)).float()
    mask = lora_dropout_mask(x2.shape, dropout_p, seed, x2.device, dt) if dropout_p > 0 else None
    dA = torch.mm(dS.to(dt).t(), x2 if mask is None else x2 * mask).float() if need_A else None
    Z2 = None
    if need_x:
        Z2 = torch.mm(dS.to(dt), _param_dtype(lora_A, dt))
        if mask is not None:
            Z2.mul_(mask)
    return dS, dB, dA, Z2


def lora_adapter_grads_2d(dy2, x2, S, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                          need_A: bool = True, need_B: bool = True, need_z2: bool = True,
                          separate_outputs: bool = False):
    """The adapter part of the LoRA backward on 2-D tensors: (dA fp32 [r, K] | None, dB fp32 [N, r] | None,
    Z2 = D⊙(s·(dY·B)·A) in x2.dtype [M, K] | None), the input-gradient term of the adapter (callers add dY·W).
    dy2 in x2.dtype; S is forward's S' (already scaled). DoRA calls this with its own dY (kernels/dora.py)."""
    if torch.are_deterministic_algorithms_enabled():
        _, dB, dA, Z2 = _deterministic_backward(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed, need_A, need_z2)
    else:
        rk = lora_A.shape[0] * x2.shape[1] if (need_A and not separate_outputs) else 0
        dS, dB, *zeros = lora_ds_db(dy2, lora_B, S, scaling, extra_zeros=rk)
        dA, Z2 = (lora_da_dx(x2, dS, lora_A, dropout_p, seed, need_dA=need_A, need_dx=need_z2,
                             zeros=zeros[0] if zeros else None)
                  if (need_A or need_z2) else (None, None))
    return dA, (dB if need_B else None), Z2


def lora_backward_2d(dy2, x2, S, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                     need_x: bool = True, need_w: bool = False, need_b: bool = False,
                     need_A: bool = True, need_B: bool = True, separate_outputs: bool = False):
    """Backward on 2-D tensors: returns (dX [M, K] | None, dW | None, db (fp32 [N]) | None,
    dA (fp32 [r, K]) | None, dB (fp32 [N, r]) | None). dy2 must already be in x2.dtype; S is forward's S'.

    dA and dB may share one zero-filled storage (one memset); separate_outputs=True gives each its own
    (torch.library custom ops may not return aliasing tensors)."""
    w = _param_dtype(weight, x2.dtype) if need_x else None
    dA, dB, Z2 = lora_adapter_grads_2d(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed, need_A, need_B,
                                       need_x, separate_outputs)
    dx2 = Z2.addmm_(dy2, w) if need_x else None  # Z2 + dY·W, Z2 read by cuBLAS as C (beta=1)
    dw = torch.mm(dy2.t(), x2) if need_w else None
    db = dy2.sum(0, dtype=torch.float32) if need_b else None
    return dx2, dw, db, dA, dB


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        N = weight.shape[0]
        x2 = as_2d(x)
        y2, S = lora_forward_2d(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, S, weight, lora_A, lora_B)
        ctx.scaling = float(scaling)
        ctx.dropout_p = float(dropout_p)
        ctx.seed = seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x, S, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy2 = as_2d(dy)
        if dy2.dtype != x.dtype:
            dy2 = dy2.to(x.dtype)
        dx2, dw, db, dA, dB = lora_backward_2d(
            dy2, as_2d(x), S, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed,
            need_x, need_w, need_b, need_A, need_B,
        )
        return (
            None if dx2 is None else dx2.view(x.shape),
            None if dw is None else _param_dtype(dw, weight.dtype),
            None if db is None else _param_dtype(db, ctx.bias_dtype),
            None if dA is None else _param_dtype(dA, lora_A.dtype),
            None if dB is None else _param_dtype(dB, lora_B.dtype),
            None, None, None,
        )


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None) -> torch.Tensor:
    """Y = x·Wᵀ + bias + scaling·((D⊙x)·Aᵀ)·Bᵀ, differentiable, with the fused kernels.

    dropout_p > 0 needs a seed (drawn by the caller from torch's CPU RNG per forward); the mask is
    regenerated inside the kernels and never stored. On a device Triton cannot run on (CPU without
    TRITON_INTERPRET=1) this falls back to the reference with the same mask. bf16 in Triton's interpreter
    raises (its bf16 arithmetic is wrong; ``check_kernel_dtype``).

    >>> x = torch.randn(2, 3, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)
    >>> lora_linear(x, w, None, a, b, 2.0).shape
    torch.Size([2, 3, 8])
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear: dropout_p > 0 needs a seed")
    check_kernel_dtype(x.dtype, "lora_linear")
    if not triton_ok(x):
        mask = lora_dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype) if dropout_p > 0 else None
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, mask)
    return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)


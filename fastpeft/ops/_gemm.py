"""One Triton GEMM with the adapter terms folded into its prologue / epilogue.

    C[M, N] = (P ⊙ ps[k])[M, K] · Q[K, N]                   (PRO_SCALE: IA3 feedforward fwd, IA3 output-scaling dX)
              + lora_scale · D ⊙ (L[M, R] · Rm[R, N])       (HAS_LORA: LoRA fwd with L=S, Rm=Bᵀ; LoRA dX with L=dS, Rm=A, D=dropout)
              + bias[N]                                      (HAS_BIAS)
    CB = C (before column scaling)                           (STORE_BASE: IA3 output-scaling keeps X·Wᵀ+b for dl)
    RED[n] += Σ_m E[m, n] · C[m, n] (before column scaling)  (EPI_REDUCE: IA3 feedforward dl = Σ_m X ⊙ (dY·W))
    C *= cs[N]                                               (COL_SCALE: IA3 output-scaling fwd, IA3 feedforward dX)

Bound: compute, 2·M·N·K FLOPs (plus 2·M·N·R for the LoRA K-steps, ≤ 0.4% at R=16, K ≥ 4096); bytes
(M·K + K·N + M·N)·elem plus one extra M·N read for EPI_REDUCE. Any strides (W may be a transposed view),
any M/N/K (masked tails). Tiles ≤ ~96 KB of shared memory so the configs also fit A100 / consumer parts.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import ceil_div, dot_ieee, dropout_threshold, interpreting, keep_scale_rounded, keep_tile, mask_fast, next_pow2_16


@triton.jit
def _gemm_epi_kernel(
    P, Q, C, BIAS, L, RM, PS, CS, E, RED, CB,
    M, N, K, R, lora_scale, seed, thr, keep_scale, M_BUCKET,
    spm, spk, sqk, sqn, scm, scn, slm, slr, srr, srn, sem, sen,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DROPOUT: tl.constexpr, FAST4: tl.constexpr,
    PRO_SCALE: tl.constexpr, COL_SCALE: tl.constexpr, EPI_REDUCE: tl.constexpr, STORE_BASE: tl.constexpr,
    IEEE: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    DT = C.dtype.element_ty
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n  # grouped order: GROUP_M row-tiles share each Q column panel in L2
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mmask = rm < M
    nmask = rn < N
    # wrapped rows/cols (modulo, not tl.where: a select with a constant branch hides the contiguity of
    # the fast dimension from the compiler and turns the NN-layout loads scalar -- measured 70 TFLOP/s)
    rm_l = rm % M
    rn_l = rn % N
    rk = tl.arange(0, BK)
    p_ptr = P + rm_l[:, None] * spm + rk[None, :] * spk
    q_ptr = Q + rk[:, None] * sqk + rn_l[None, :] * sqn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = rk < K - k0
        p = tl.load(p_ptr, mask=kmask[None, :], other=0.0)
        q = tl.load(q_ptr, mask=kmask[:, None], other=0.0)
        if PRO_SCALE:
            ps = tl.load(PS + k0 + rk, mask=kmask, other=0.0).to(DT)
            p = (p * ps[None, :]).to(DT)
        if IEEE:
            acc = tl.dot(p, q, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
        p_ptr += BK * spk
        q_ptr += BK * sqk

    if HAS_LORA:  # R extra K-steps: acc += lora_scale · D ⊙ (L_tile · Rm_tile)
        rr = tl.arange(0, BR)
        rrmask = rr < R
        lt = tl.load(L + rm_l[:, None] * slm + rr[None, :] * slr, mask=rrmask[None, :], other=0.0).to(DT)
        rt = tl.load(RM + rr[:, None] * srr + rn_l[None, :] * srn, mask=rrmask[:, None], other=0.0)
        rt = (rt * lora_scale).to(DT)
        if IEEE:
            t = tl.dot(lt, rt, input_precision="ieee")
        else:
            t = tl.dot(lt, rt)
        if LORA_DROPOUT:
            keep = keep_tile(seed, rm, pid_n * BN, N, thr, BM, BN, FAST4)
            t = tl.where(keep, t * keep_scale, 0.0)
        acc += t
    if HAS_BIAS:
        acc += tl.load(BIAS + rn_l).to(tl.float32)[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if STORE_BASE:
        tl.store(CB + rm[:, None] * scm + rn[None, :] * scn, acc.to(DT), mask=cmask)
    if EPI_REDUCE:
        e = tl.load(E + rm_l[:, None] * sem + rn_l[None, :] * sen, mask=cmask, other=0.0).to(tl.float32)
        tl.atomic_add(RED + rn, tl.sum(e * acc.to(DT).to(tl.float32), axis=0), mask=nmask)
    if COL_SCALE:
        acc = acc * tl.load(CS + rn_l).to(DT).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(DT), mask=cmask)


def _configs():
    # (BM, BN, BK, stages, warps); smem = (BM·BK + BK·BN)·2·stages ≤ 96 KB
    raw = [
        (128, 128, 64, 3, 8),
        (128, 256, 32, 3, 8),
        (256, 128, 32, 3, 8),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w) for bm, bn, bk, s, w in raw]


_gemm_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "HAS_LORA", "LORA_DROPOUT", "PRO_SCALE", "COL_SCALE", "EPI_REDUCE", "STORE_BASE"],
    reset_to_zero=["RED"],
    restore_value=[],
)(_gemm_epi_kernel)


def _m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two, so a new sequence length does not re-run the autotuner."""
    return triton.next_power_of_2(max(16, int(M)))


def gemm_epi(
    p: torch.Tensor,  # [M, K]
    q: torch.Tensor,  # [K, N] (any strides, e.g. weight.t())
    bias: Optional[torch.Tensor] = None,
    lora: Optional[tuple] = None,  # (L [M, R], Rm [R, N], scale)
    dropout: Optional[tuple] = None,  # (p, seed) applied to the LoRA term, index over [M, N]
    pro_scale: Optional[torch.Tensor] = None,  # [K]
    col_scale: Optional[torch.Tensor] = None,  # [N]
    epi_reduce: Optional[tuple] = None,  # (E [M, N], RED fp32 [N] zero-initialised)
    store_base: bool = False,
    out_dtype: Optional[torch.dtype] = None,
):
    M, K = p.shape
    N = q.shape[1]
    dt = out_dtype or p.dtype
    c = torch.empty((M, N), device=p.device, dtype=dt)
    cb = torch.empty((M, N), device=p.device, dtype=dt) if store_base else c
    dummy = c
    if lora is not None:
        L, Rm, lscale = lora
        R = L.shape[1]
    else:
        L, Rm, lscale, R = dummy, dummy, 1.0, 1
    if dropout is not None and dropout[0] > 0:
        dp, seed = dropout
        thr, has_do = dropout_threshold(dp), True
        kscale = keep_scale_rounded(dp, dt)
    else:
        seed, thr, kscale, has_do = 0, 0, 1.0, False
    E, RED = epi_reduce if epi_reduce is not None else (dummy, dummy)
    args = (
        p, q, c, bias if bias is not None else dummy, L, Rm,
        pro_scale if pro_scale is not None else dummy, col_scale if col_scale is not None else dummy,
        E, RED, cb,
        M, N, K, R, float(lscale), int(seed), int(thr), float(kscale), _m_bucket(M),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), c.stride(0), c.stride(1),
        L.stride(0), L.stride(1), Rm.stride(0), Rm.stride(1), E.stride(0), E.stride(1),
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None, LORA_DROPOUT=has_do, FAST4=mask_fast(N),
        PRO_SCALE=pro_scale is not None, COL_SCALE=col_scale is not None, EPI_REDUCE=epi_reduce is not None,
        STORE_BASE=store_base, IEEE=dot_ieee(dt), BR=next_pow2_16(R),
    )
    if interpreting():
        bm, bn, bk = 32, 32, 32
        grid = (ceil_div(M, bm) * ceil_div(N, bn),)
        _gemm_epi_kernel[grid](*args, **flags, BM=bm, BN=bn, BK=bk, GROUP_M=4)
    elif os.environ.get("FASTPEFT_AUTOTUNE", "1") == "0" or flags["IEEE"]:
        # fp32 (IEEE dot, no tensor cores) also takes this: the big tensor-core tiles of the autotune list
        # spill when the dot runs on CUDA cores and took minutes to compile on H100
        # one fixed configuration, no benchmarking: for tests that sweep many odd shapes (each new shape
        # would otherwise compile and time every configuration) -- numerics are the same for every config
        bm, bn, bk = (64, 64, 32) if flags["IEEE"] else (64, 128, 64)
        grid = (ceil_div(M, bm) * ceil_div(N, bn),)
        _gemm_epi_kernel[grid](*args, **flags, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_stages=3, num_warps=4)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
        _gemm_tuned[grid](*args, **flags)
    return (c, cb) if store_base else c

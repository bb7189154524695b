"""The small-M 4-bit GEMM: one Triton kernel that dequantizes weight tiles in registers right before tl.dot.

    nn_layout=False (forward):  C[M, N] = CIN + P[M, K]·dequant(W)ᵀ
    nn_layout=True  (dX):       C[M, K] = CIN + P[M, N]·dequant(W)

Used by the QLoRA training path at small M (``kernels/nf4_lora.py``, "fused") and by the Triton decode path
(``kernels/nf4_gemv.py``): W is read once as 0.5 bytes per weight instead of dequantize-write-read (4.5 bytes per
weight). CIN carries the LoRA term (+ bias), computed first by ``kernels/lora.py``'s shrink / expand kernels,
and is added in fp32 before the one rounding, as cuBLAS's beta=1 does in the dense path; split-K with fp32
atomics keeps all SMs busy when M / N give few tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..nf4_format import KernelState
from .common import ceil_div, dot_ieee, interpreting, num_sms
from .nf4_dequant import block_absmax, code_value

__all__ = ["nf4_matmul"]


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, rn, kb, nmask, kbmask, K,
            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, QT: tl.constexpr,
            GROUPS: tl.constexpr):
    """fp32 W[rn, 2*kb : 2*kb + 2] tile as [len(rn), 2*len(kb)] (K even: a row starts on a byte).

    GROUPS > 0: the tile's K range starts on a 4-bit block boundary and spans GROUPS whole blocks (or lies in
    one, GROUPS = 1): one absmax per (row, block), broadcast over the block's weights -- the per-element
    lookup (GROUPS = 0, any layout) costs up to three gathers per weight and made this kernel ALU-bound."""
    byte_off = rn[:, None] * (K // 2) + kb[None, :]
    m = nmask[:, None] & kbmask[None, :]
    byte = tl.load(packed_ptr + byte_off, mask=m, other=0).to(tl.int32)
    if GROUPS == 1:
        blk = (rn * K + tl.min(kb, axis=0) * 2) // BLOCKSIZE
        a = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, nmask, NESTED, BLOCKSIZE2)[:, None]
    elif GROUPS > 1:
        blk = (rn * K + tl.min(kb, axis=0) * 2) // BLOCKSIZE
        g = tl.arange(0, GROUPS)
        a_g = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk[:, None] + g[None, :],
                           nmask[:, None] & (g[None, :] >= 0), NESTED, BLOCKSIZE2)  # [rows, GROUPS]
        a = tl.reshape(tl.broadcast_to(a_g[:, :, None], (a_g.shape[0], GROUPS, BLOCKSIZE // 2)),
                       (a_g.shape[0], GROUPS * (BLOCKSIZE // 2)))
    else:
        a = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, (byte_off * 2) // BLOCKSIZE, m, NESTED,
                         BLOCKSIZE2)
    hi = code_value(byte >> 4, code_ptr, QT) * a
    lo = code_value(byte & 15, code_ptr, QT) * a
    return tl.interleave(hi, lo)


@triton.jit
def _nf4_mm_kernel(
    P, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, C, CIN,
    offset, M, N, K, i_per_split,
    spm, spi, scm, scj, sim, sij,
    NN: tl.constexpr, SPLIT: tl.constexpr, HAS_CIN: tl.constexpr, IEEE: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, QT: tl.constexpr,
    GROUPS: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr,
):
    # NN=False (forward):  C[M, N] = CIN + P[M, K]·dequant(W)ᵀ
    # NN=True  (dX):       C[M, K] = CIN + P[M, N]·dequant(W)
    # CIN carries the LoRA term (+bias) computed first by ops.lora's kernels, as cuBLAS's beta=1 does in the
    # dense path. I = reduction dim, J = output dim. Bound (small M): bytes, N·K/2 packed + absmax read once
    # (P, CIN, C are M·(N+K) elements: tiny at small M). FLOPs 2·M·N·K; far under the ridge at M <= ~64, so
    # the dequant ALU work hides under the weight stream. SPLIT: split-K, fp32 atomics into a zeroed C.
    DT = P.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    I = N if NN else K
    J = K if NN else N
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rj = (pid_j * BJ + tl.arange(0, BJ)).to(tl.int64)
    mmask = rm < M
    jmask = rj < J
    i_begin = pid_s * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    acc = tl.zeros((BM, BJ), dtype=tl.float32)
    for i0 in range(i_begin, i_end, BI):
        ri = (i0 + tl.arange(0, BI)).to(tl.int64)
        imask = ri < i_end
        p = tl.load(P + rm[:, None] * spm + ri[None, :] * spi, mask=mmask[:, None] & imask[None, :], other=0.0)
        if NN:  # W rows = reduction (n), W byte-columns = output (k)
            kb = (pid_j * (BJ // 2) + tl.arange(0, BJ // 2)).to(tl.int64)
            w = _w_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, ri, kb, imask,
                        kb < K // 2, K, BLOCKSIZE, BLOCKSIZE2, NESTED, QT, GROUPS).to(DT)
        else:  # W rows = output (n), W byte-columns = reduction (k)
            kb = (i0 // 2 + tl.arange(0, BI // 2)).to(tl.int64)
            w = tl.trans(_w_tile(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, rj, kb, jmask,
                                 kb < i_end // 2, K, BLOCKSIZE, BLOCKSIZE2, NESTED, QT, GROUPS).to(DT))
        if IEEE:
            acc = tl.dot(p, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, w, acc)
    cmask = mmask[:, None] & jmask[None, :]
    c_ptr = C + rm[:, None] * scm + rj[None, :] * scj
    if SPLIT:
        tl.atomic_add(c_ptr, acc, mask=cmask)
    else:
        if HAS_CIN:
            acc += tl.load(CIN + rm[:, None] * sim + rj[None, :] * sij, mask=cmask, other=0.0).to(tl.float32)
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=cmask)


def _fused_blocks(M: int, I: int, J: int, device):
    if interpreting():
        return 16, 32, 32, 1
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    BJ = 64
    BI = 256 if M <= 32 else 128
    tiles = ceil_div(M, BM) * ceil_div(J, BJ)
    target = 2 * num_sms(device)
    split = max(1, min(ceil_div(I, BI), ceil_div(target, tiles)))
    return BM, BJ, BI, split


def _absmax_groups(K: int, bs: int, extent: int) -> int:
    """How many 4-bit blocks a W tile of ``extent`` weights along K spans when tiles start on block
    boundaries (1: inside one block; 0: not aligned -- the kernel then looks absmax up per element)."""
    if K % bs:
        return 0
    if bs % extent == 0:
        return 1
    return extent // bs if extent % bs == 0 else 0


def nf4_matmul(p2: torch.Tensor, packed: torch.Tensor, ks: KernelState, nn_layout: bool = False,
               c_in: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
    """In-kernel-dequant GEMM in p2.dtype: nn_layout=False: c_in + P[M, K]·dequant(W)ᵀ -> [M, N];
    nn_layout=True: c_in + P[M, N]·dequant(W) -> [M, K]. W = ks.shape [N, K], K even (rows start on a byte).
    c_in (optional, [M, out]) is added in fp32 before the one rounding (split=1) or after the fp32 split-K sum.

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4; from fastpeft.ops.nf4_format import kernel_state
    >>> packed, qs = quantize_nf4(torch.randn(32, 64))
    >>> nf4_matmul(torch.randn(3, 64), packed, kernel_state(qs, "cpu")).shape
    torch.Size([3, 32])
    """
    N, K = ks.shape
    if K % 2:
        raise ValueError(f"nf4_matmul needs an even in_features, got {K} (use the buffer path)")
    M, I = p2.shape
    J = K if nn_layout else N
    if I != (N if nn_layout else K):
        raise ValueError(f"nf4_matmul: operand has {I} columns, the weight {ks.shape} needs "
                         f"{N if nn_layout else K}")
    if c_in is not None and tuple(c_in.shape) != (M, J):
        raise ValueError(f"nf4_matmul: c_in must be [{M}, {J}], got {tuple(c_in.shape)}")
    dt = p2.dtype
    BM, BJ, BI, auto_split = _fused_blocks(M, I, J, p2.device)
    split = auto_split if split is None else max(1, int(split))
    i_per = ceil_div(ceil_div(I, split), BI) * BI
    split = ceil_div(I, i_per)
    if split > 1:
        c = torch.zeros((M, J), device=p2.device, dtype=torch.float32)
    else:
        c = torch.empty((M, J), device=p2.device, dtype=dt)
    cin = c_in if c_in is not None else c
    bs = ks.blocksize
    groups = _absmax_groups(K, bs, BJ if nn_layout else BI)
    fp = {"enable_fp_fusion": False} if p2.is_cuda else {}
    b = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed
    _nf4_mm_kernel[(ceil_div(M, BM), ceil_div(J, BJ), split)](
        p2, b, ks.absmax, ks.code, ks.code2, ks.absmax2, c, cin,
        ks.offset, M, N, K, i_per,
        p2.stride(0), p2.stride(1), c.stride(0), c.stride(1), cin.stride(0), cin.stride(1),
        NN=nn_layout, SPLIT=split > 1, HAS_CIN=c_in is not None, IEEE=dot_ieee(dt),
        BLOCKSIZE=bs, BLOCKSIZE2=ks.blocksize2, NESTED=ks.nested, QT=ks.qt, GROUPS=groups,
        BM=BM, BJ=BJ, BI=BI, num_warps=4, **fp,
    )
    if split > 1:
        if c_in is not None:
            c += c_in
        return c.to(dt)
    return c


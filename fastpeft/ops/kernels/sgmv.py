"""Mixed-adapter LoRA in one pass (the SGMV idea of Punica / S-LoRA): every row of a batch adds its own
adapter's s·(x·Aᵀ)·Bᵀ to the base output, for any number of adapters and ranks, in two launches.

Layout: the batch's rows come in segments of ``tokens`` rows (one segment = one batch row of a [B, T, K]
input: all its tokens use the same adapter). ``adapter_of_segment[b]`` is the adapter index of segment b, or
-1 for the base model ("__base__", or a layer that lacks that adapter). All adapters of a layer are stacked
once (``a_stack`` [n, R, K], ``b_stack`` [n, N, R], zero-padded to the largest rank R; the scalings in
``scales`` [n]), so the kernels pick an adapter by index and no Python loop runs over adapters.

    shrink:  S[rows of b, :] = X[rows of b, :] · A[a(b)]ᵀ                  (fp32, [M, R])
    expand:  Y[rows of b, :] += scales[a(b)] · S[rows of b, :] · B[a(b)]ᵀ  (fp32 accumulate, one rounding)

What bounds them: decode (one token per segment) reads each used adapter's A and B once — 4·R·(K + N)
bytes in fp32 — and the rows of X / Y; prefill is bounded by the same reads plus 2·M·R·(K + N) FLOPs in
fp32 dots (full fp32: the adapters are fp32, as PEFT keeps them, and the reference is fp32). Both are small
next to the base layer's weight read (N·K·2 bytes dense, N·K/2 in 4 bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import lora_mixed_delta_reference
from .common import check_kernel_dtype, next_pow2_16, triton_ok

__all__ = ["lora_mixed_delta_", "lora_mixed_delta_reference"]


@triton.jit
def _sgmv_shrink_kernel(X, A, SEG, S, T, K, R, sxm, sxk, sab, sar, sak, ssm, ssr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    adapter = tl.load(SEG + seg)
    if adapter >= 0:
        t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = t < T
        rows = (seg * T + t).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        a_base = A + adapter.to(tl.int64) * sab
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x = tl.load(X + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_base + rr[None, :] * sar + kk[:, None] * sak, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        tl.store(S + rows[:, None] * ssm + rr[None, :] * ssr, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(Y, S, B, SCALE, SEG, T, N, R, sym, syn, ssm, ssr, sbb, sbn, sbr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    adapter = tl.load(SEG + seg)
    if adapter >= 0:
        t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = t < T
        rows = (seg * T + t).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        s = tl.load(S + rows[:, None] * ssm + rr[None, :] * ssr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(B + adapter.to(tl.int64) * sbb + cols[None, :] * sbn + rr[:, None] * sbr,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        delta = tl.dot(s, b.to(tl.float32), input_precision="ieee") * tl.load(SCALE + adapter)
        ptrs = Y + rows[:, None] * sym + cols[None, :] * syn
        ok = row_ok[:, None] & n_ok[None, :]
        y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + delta).to(Y.dtype.element_ty), mask=ok)


def lora_mixed_delta_(y2d: torch.Tensor, x2d: torch.Tensor, adapter_of_segment: torch.Tensor, tokens: int,
                      a_stack: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Add each segment's adapter delta to ``y2d`` in place (see the module docstring) and return it.

    y2d: [M, N] (the base output, written in place); x2d: [M, K] (any strides); adapter_of_segment: int32 [M /
    tokens] on the device (-1: no adapter); a_stack: [n, R, K]; b_stack: [n, N, R]; scales: fp32 [n].
    """
    M, K = x2d.shape
    N = y2d.shape[1]
    if y2d.shape[0] != M or M % tokens or adapter_of_segment.numel() != M // tokens:
        raise ValueError(f"lora_mixed_delta_: {M} rows, {tokens} tokens per segment and "
                         f"{adapter_of_segment.numel()} segments do not agree (y {tuple(y2d.shape)})")
    if not (triton_ok(x2d) and triton_ok(y2d)):
        raise ValueError("lora_mixed_delta_: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    check_kernel_dtype(x2d.dtype, "lora_mixed_delta_")
    check_kernel_dtype(y2d.dtype, "lora_mixed_delta_")
    R = a_stack.shape[1]
    segments = M // tokens
    block_r = next_pow2_16(R)
    block_m = 16 if tokens <= 16 else (32 if tokens <= 32 else 64)
    m_blocks = triton.cdiv(tokens, block_m)
    s = torch.empty((M, R), dtype=torch.float32, device=x2d.device)
    if M == 0:
        return y2d
    _sgmv_shrink_kernel[(segments, m_blocks)](
        x2d, a_stack, adapter_of_segment, s, tokens, K, R, x2d.stride(0), x2d.stride(1),
        a_stack.stride(0), a_stack.stride(1), a_stack.stride(2), s.stride(0), s.stride(1),
        BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=block_r)
    block_n = 64
    _sgmv_expand_kernel[(segments, m_blocks, triton.cdiv(N, block_n))](
        y2d, s, b_stack, scales, adapter_of_segment, tokens, N, R, y2d.stride(0), y2d.stride(1),
        s.stride(0), s.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return y2d

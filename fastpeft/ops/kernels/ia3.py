"""IA3 on a frozen linear base: Triton scaling / column-reduction kernels around cuBLAS GEMMs.

Shapes and the math: ``fastpeft/ops/reference.py`` (``ia3_linear_reference``, the oracle).
output scaling (feedforward=False):
  fwd  Yb = X·Wᵀ + b (cuBLAS addmm, kept for dl: the same M×N activation PEFT keeps); Y = Yb ⊙ l (_scale_cols_kernel)
  bwd  dl = Σ_m Yb ⊙ dY, db = l ⊙ Σ_m dY, and dY⊙l, in one pass (_ia3_colreduce_kernel); dX = (dY⊙l)·W (cuBLAS)
feedforward (input) scaling:
  fwd  Y = (X ⊙ l)·Wᵀ + b              x⊙l (_scale_cols_kernel) then cuBLAS
  bwd  G = dY·W (cuBLAS); dl = Σ_m X ⊙ G and dX = G ⊙ l in place, one pass (_ia3_colreduce_kernel)
(A Triton GEMM with l in its prologue / epilogue was measured slower than these compositions on an H100 at
every Llama-8B shape -- docs/performance-log.md, 2026-11-23 -- and was removed.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ia3_linear_reference
from .common import as_2d, ceil_div, check_kernel_dtype, interpreting, num_sms, triton_ok

__all__ = ["scale_cols", "ia3_colreduce", "ia3_forward_2d", "ia3_backward_2d", "ia3_linear"]


@triton.jit
def _ia3_colreduce_kernel(
    A, Bm, L, OUT, RED, SUM, M, N, m_per_split,
    sam, san, sbm, sbn, som, son,
    WRITE_OUT: tl.constexpr, NEED_SUM: tl.constexpr, ATOMIC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    # Bound: bytes. Reads A and Bm once (2·M·N·elem), writes OUT = A⊙l (M·N·elem) when asked;
    # column sums RED[n] += Σ_m A⊙Bm and SUM[n] += Σ_m A in fp32 ((#M-splits)·N atomics).
    DT = A.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    nmask = cols < N
    l = tl.load(L + cols, mask=nmask, other=0.0).to(DT)
    red = tl.zeros((BN,), dtype=tl.float32)
    tot = tl.zeros((BN,), dtype=tl.float32)
    rm = tl.arange(0, BM)
    m_begin = pid_s * m_per_split
    m_end = tl.minimum(m_begin + m_per_split, M)
    for m0 in range(m_begin, m_end, BM):
        rows = (m0 + rm).to(tl.int64)
        msk = (rows < m_end)[:, None] & nmask[None, :]
        a = tl.load(A + rows[:, None] * sam + cols[None, :] * san, mask=msk, other=0.0)
        b = tl.load(Bm + rows[:, None] * sbm + cols[None, :] * sbn, mask=msk, other=0.0)
        red += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
        if NEED_SUM:
            tot += tl.sum(a.to(tl.float32), axis=0)
        if WRITE_OUT:
            tl.store(OUT + rows[:, None] * som + cols[None, :] * son, (a * l[None, :]).to(DT), mask=msk)
    if ATOMIC:
        tl.atomic_add(RED + cols, red, mask=nmask)
        if NEED_SUM:
            tl.atomic_add(SUM + cols, tot, mask=nmask)
    else:
        tl.store(RED + cols, red, mask=nmask)
        if NEED_SUM:
            tl.store(SUM + cols, tot, mask=nmask)


@triton.jit
def _scale_cols_kernel(A, L, OUT, M, N, m_per_split, sam, san, som, son, BM: tl.constexpr, BN: tl.constexpr):
    # Bound: bytes. Reads A once and writes OUT = A ⊙ l[None, :] once (2·M·N·elem); l is loaded once per program.
    # (torch's broadcast multiply by an [N] vector took the generic, non-vectorised elementwise path on H100:
    # 0.17 ms for 4096x14336 bf16, ~2x this kernel's byte floor.)
    DT = OUT.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    nmask = cols < N
    l = tl.load(L + cols, mask=nmask, other=0.0).to(DT)
    rm = tl.arange(0, BM)
    m_begin = pid_s * m_per_split
    m_end = tl.minimum(m_begin + m_per_split, M)
    for m0 in range(m_begin, m_end, BM):
        rows = (m0 + rm).to(tl.int64)
        msk = (rows < m_end)[:, None] & nmask[None, :]
        a = tl.load(A + rows[:, None] * sam + cols[None, :] * san, mask=msk, other=0.0)
        tl.store(OUT + rows[:, None] * som + cols[None, :] * son, (a * l[None, :]).to(DT), mask=msk)


def scale_cols(a: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """a ⊙ l[None, :] for a 2-D a [M, N] (any strides) and l [N] (any float dtype; cast to a.dtype as PEFT does)."""
    M, N = a.shape
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    BM, BN = (16, 32) if interpreting() else (32, 256)
    n_n = ceil_div(N, BN)
    splits = max(1, min(ceil_div(M, BM), ceil_div(4 * num_sms(a.device), n_n)))
    m_per = ceil_div(ceil_div(M, splits), BM) * BM
    splits = ceil_div(M, m_per)
    _scale_cols_kernel[(n_n, splits)](
        a, l, out, M, N, m_per, a.stride(0), a.stride(1), out.stride(0), out.stride(1), BM=BM, BN=BN, num_warps=4,
    )
    return out


def ia3_colreduce(a, b, l, out=None, need_sum=False):
    """(red, sum): red[n] = Σ_m a⊙b, sum[n] = Σ_m a (fp32); writes out = a ⊙ l when out is given."""
    M, N = a.shape
    BM, BN = (16, 32) if interpreting() else (32, 128)
    n_n = ceil_div(N, BN)
    splits = max(1, min(ceil_div(M, BM), ceil_div(4 * num_sms(a.device), n_n)))
    m_per = ceil_div(ceil_div(M, splits), BM) * BM
    splits = ceil_div(M, m_per)
    alloc = torch.zeros if splits > 1 else torch.empty
    red = alloc((N,), device=a.device, dtype=torch.float32)
    tot = alloc((N,), device=a.device, dtype=torch.float32) if need_sum else red
    o = out if out is not None else a
    _ia3_colreduce_kernel[(n_n, splits)](
        a, b, l, o, red, tot, M, N, m_per,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), o.stride(0), o.stride(1),
        WRITE_OUT=out is not None, NEED_SUM=need_sum, ATOMIC=splits > 1, BM=BM, BN=BN, num_warps=4,
    )
    return red, (tot if need_sum else None)


def ia3_forward_2d(x2, weight, bias, ia3_l, feedforward: bool):
    """Forward on a 2-D x [M, K]: returns (Y [M, N], saved) where saved is what backward needs besides the
    parameters: x2 itself for feedforward scaling, Yb = x·Wᵀ + b for output scaling. No autograd here."""
    dt = x2.dtype
    w = weight if weight.dtype == dt else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    l = ia3_l.reshape(-1)
    if feedforward:
        xl = scale_cols(x2, l)
        y2 = torch.addmm(b, xl, w.t()) if b is not None else torch.mm(xl, w.t())
        return y2, x2
    yb = torch.addmm(b, x2, w.t()) if b is not None else torch.mm(x2, w.t())
    return scale_cols(yb, l), yb


def ia3_backward_2d(dy2, saved, weight, ia3_l, feedforward: bool, need_x: bool = True, need_w: bool = False, need_b: bool = False):
    """Backward on 2-D tensors: returns (dX | None, dW | None, db (fp32) | None, dl (fp32 [len(l)]))."""
    dt = dy2.dtype
    w = weight if weight.dtype == dt else weight.to(dt)
    l = ia3_l.reshape(-1)
    dx = dw = db = None
    if feedforward:
        x2 = saved
        dx = torch.mm(dy2, w)
        dl, _ = ia3_colreduce(dx, x2, l, out=dx)  # dl from G, then G ← G⊙l in place
        if need_w:
            dw = torch.mm(dy2.t(), scale_cols(x2, l))
        if need_b:
            db = dy2.sum(0, dtype=torch.float32)
        return (dx if need_x else None), dw, db, dl
    yb = saved
    if need_w:
        raise NotImplementedError("ia3_linear: gradient for an output-scaled trainable base weight")
    dyl = torch.empty_like(dy2) if need_x else None
    dl, tot = ia3_colreduce(dy2, yb, l, out=dyl, need_sum=need_b)
    if need_x:
        dx = torch.mm(dyl, w)
    if need_b:
        db = tot * l.float()
    return dx, dw, db, dl


class _IA3LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, feedforward):
        N = weight.shape[0]
        x2 = as_2d(x)
        y2, saved = ia3_forward_2d(x2, weight, bias, ia3_l, feedforward)
        # feedforward: save the caller's x object (shared with sibling layers), not the 2-D view
        ctx.save_for_backward(x if feedforward else saved, weight, ia3_l)
        ctx.feedforward = feedforward
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        saved, weight, ia3_l = ctx.saved_tensors
        need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
        dy2 = as_2d(dy)
        if ctx.feedforward:
            saved = as_2d(saved)
        dx, dw, db, dl = ia3_backward_2d(dy2, saved, weight, ia3_l, ctx.feedforward, need_x, need_w, need_b)
        return (
            None if dx is None else dx.view(ctx.x_shape),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(ctx.bias_dtype),
            dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
            None,
        )


def ia3_linear(x, weight, bias, ia3_l, feedforward: bool) -> torch.Tensor:
    """IA3 linear: cuBLAS GEMMs with the scaling and dl reduction in Triton passes (module docstring); differentiable.

    Falls back to the reference on devices Triton cannot run on (CPU without TRITON_INTERPRET=1); bf16 in
    Triton's interpreter raises (``check_kernel_dtype``).

    >>> ia3_linear(torch.randn(3, 16), torch.randn(8, 16), None, torch.ones(8, 1), feedforward=False).shape
    torch.Size([3, 8])
    """
    check_kernel_dtype(x.dtype, "ia3_linear")
    if not triton_ok(x):
        return ia3_linear_reference(x, weight, bias, ia3_l, feedforward)
    return _IA3LinearFn.apply(x, weight, bias, ia3_l, bool(feedforward))


"""LoRA / IA3 on a frozen bitsandbytes 4-bit (NF4 / FP4) base: QLoRA.

The base weight W [N, K] is never kept dense: it lives as bnb's packed bytes + QuantState (see
``fastpeft.ops.nf4`` for the format). Two ways to run the base GEMMs, chosen per call by ``nf4_path``:

  "buffer" (large M, compute-bound): dequantize W with the one-pass Triton kernel into a *reused* buffer
           (one per device / dtype / stream, grown to the largest layer, shared by all layers; never saved
           for backward) and run the dense LoRA / IA3 composition of ``fastpeft.ops.lora`` / ``ops.ia3`` on
           it (cuBLAS base GEMM + the fused LoRA kernels). Backward dequantizes again into the buffer.
           Extra cost over a dense bf16 layer: one dequant per GEMM that reads W, i.e. 2.5 bytes per weight
           written+read (~14 µs for 4096x4096 at the copy bandwidth) against 2·M·N·K FLOPs (~180 µs at
           M=4096): a few % at M=4096.
  "fused"  (small M, memory-bound): one Triton GEMM that dequantizes W tiles in registers right before
           tl.dot (``_nf4_mm_kernel``): W is read once as 0.5 bytes per weight instead of dequant-write-read
           (4.5 bytes per weight). The LoRA term Z (forward: s·S·Bᵀ + bias; dX: D⊙(dS·A), mask regenerated)
           comes from ops.lora's kernels and enters the GEMM as its C input (added in fp32 before the one
           rounding), as cuBLAS's beta=1 does in the dense path; split-K with fp32 atomics keeps all SMs busy
           when M / N give few tiles.

Shapes as in ``fastpeft.ops.lora``:
    x [..., K]; packed + quant_state (W [N, K]); bias [N] | None; lora_A [r, K]; lora_B [N, r]
    Y = x·dequant(W)ᵀ + bias + scaling · ((D ⊙ x)·Aᵀ)·Bᵀ
The compute dtype is x.dtype (callers cast x to the layer's compute_dtype first, as bnb's Linear4bit does).
W is dequantized to the state's dtype and then cast to the compute dtype, as bnb does (one rounding when
the two agree or the state is fp32).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from . import ia3 as ia3_ops
from . import lora as lora_ops
from ._common import as_2d, ceil_div, dot_ieee, interpreting, num_sms, triton_ok
from .nf4 import block_absmax, code_value, kernel_state, nf4_dequantize_reference, nf4_dequantize_triton

__all__ = [
    "dequantize_to",
    "nf4_weight_reference",
    "nf4_lora_linear",
    "nf4_lora_linear_reference",
    "nf4_ia3_linear",
    "nf4_ia3_linear_reference",
    "nf4_matmul",
    "nf4_path",
    "FUSED_MAX_M",
]


# ----------------------------------------------------------------------------------------------------------
# Dequantized weight: reference and the reused buffer
# ----------------------------------------------------------------------------------------------------------

def _state_dtype(quant_state) -> torch.dtype:
    return getattr(quant_state, "dtype", None) or torch.float32


def nf4_weight_reference(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` exactly as bnb's Linear4bit computes with it: dequantize to the state's dtype,
    then cast to the compute dtype."""
    w = nf4_dequantize_reference(packed, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


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


def release_buffers() -> None:
    """Free the shared dequantization buffers (they are re-created on the next call)."""
    _BUFFERS.clear()


def dequantize_to(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """W [N, K] in ``dtype`` from the Triton kernel; with ``reuse`` a view of the shared buffer (valid until
    the next dequantization on this stream: consume it, never keep it)."""
    sd = _state_dtype(quant_state)
    n = int(torch.Size(quant_state.shape).numel())
    if sd == dtype or sd == torch.float32:
        out = _buffer(packed.device, dtype, n) if reuse else None
        return nf4_dequantize_triton(packed, quant_state, dtype, out=out)
    return nf4_dequantize_triton(packed, quant_state, sd).to(dtype)  # two roundings, as bnb


# ----------------------------------------------------------------------------------------------------------
# Fused in-kernel dequant GEMM (small M)
# ----------------------------------------------------------------------------------------------------------

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


def nf4_matmul(p2: torch.Tensor, packed: torch.Tensor, quant_state: Any, nn_layout: bool = False,
               c_in: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
    """In-kernel-dequant GEMM in p2.dtype: nn_layout=False: c_in + P[M, K]·dequant(W)ᵀ -> [M, N];
    nn_layout=True: c_in + P[M, N]·dequant(W) -> [M, K]. W = quant_state.shape [N, K], K even (rows start on
    a byte). c_in (optional, [M, out]) is added in fp32 before the one rounding (split=1) or after the fp32
    split-K sum."""
    N, K = (int(d) for d in quant_state.shape)
    if K % 2:
        raise ValueError(f"nf4_matmul needs an even in_features, got {K} (use the buffer path)")
    M, I = p2.shape
    J = K if nn_layout else N
    if I != (N if nn_layout else K):
        raise ValueError(f"nf4_matmul: operand has {I} columns, the weight {tuple(quant_state.shape)} needs "
                         f"{N if nn_layout else K}")
    if c_in is not None and tuple(c_in.shape) != (M, J):
        raise ValueError(f"nf4_matmul: c_in must be [{M}, {J}], got {tuple(c_in.shape)}")
    dt = p2.dtype
    ks = kernel_state(quant_state, p2.device)
    BM, BJ, BI, auto_split = _fused_blocks(M, I, J, p2.device)
    split = auto_split if split is None else max(1, int(split))
    i_per = ceil_div(ceil_div(I, split), BI) * BI
    split = ceil_div(I, i_per)
    if split > 1:
        c = torch.zeros((M, J), device=p2.device, dtype=torch.float32)
    else:
        c = torch.empty((M, J), device=p2.device, dtype=dt)
    cin = c_in if c_in is not None else c
    bs = ks["bs"]
    groups = _absmax_groups(K, bs, BJ if nn_layout else BI)
    fp = {"enable_fp_fusion": False} if p2.is_cuda else {}
    b = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed
    _nf4_mm_kernel[(ceil_div(M, BM), ceil_div(J, BJ), split)](
        p2, b, ks["absmax"], ks["code"], ks["code2"], ks["absmax2"], c, cin,
        ks["offset"], M, N, K, i_per,
        p2.stride(0), p2.stride(1), c.stride(0), c.stride(1), cin.stride(0), cin.stride(1),
        NN=nn_layout, SPLIT=split > 1, HAS_CIN=c_in is not None, IEEE=dot_ieee(dt),
        BLOCKSIZE=bs, BLOCKSIZE2=ks["bs2"], NESTED=ks["nested"], QT=ks["qt"], GROUPS=groups,
        BM=BM, BJ=BJ, BI=BI, num_warps=4, **fp,
    )
    if split > 1:
        if c_in is not None:
            c += c_in
        return c.to(dt)
    return c


# ----------------------------------------------------------------------------------------------------------
# Dispatch: buffer + cuBLAS vs in-kernel dequant, per M (from measurements, benchmarks/results/h100/nf4_*.json)
# ----------------------------------------------------------------------------------------------------------

# Largest M for which the fused in-kernel-dequant GEMM is used, by weight size: (min N*K, max M), first match.
# Measured on an H100 (benchmarks/results/h100/nf4_crossover_graph_2026-11-24.json: fwd+bwd GPU time, CUDA
# graph, cold L2; Llama-3-8B shapes): fused wins up to M=64 on gate/up / down (58.7M weights; at M=64 267 vs
# 316 us, 295 vs 318), up to M=32 on q/o (16.8M; 99 vs 109 us, then 121 vs 114 at 64) and up to M=16 on k/v
# (4.2M; 54 vs 57 us, then 61 vs 57 at 32). Other GPUs use the same table until measured.
FUSED_MAX_M = ((32 << 20, 64), (8 << 20, 32), (0, 16))


def _fused_max_m(device, numel: int) -> int:
    env = os.environ.get("FASTPEFT_NF4_FUSED_MAX_M")
    if env is not None:
        return int(env)
    for min_numel, max_m in FUSED_MAX_M:
        if numel >= min_numel:
            return max_m
    return 0


def nf4_path(M: int, quant_state: Any, dtype: torch.dtype, device) -> str:
    """"fused" (in-kernel dequant GEMM) or "buffer" (dequant into the shared buffer + cuBLAS).

    FASTPEFT_NF4_GEMM = auto | fused | buffer overrides; auto uses "fused" for M up to the FUSED_MAX_M entry
    of this weight's size (16 / 32 / 64; env FASTPEFT_NF4_FUSED_MAX_M overrides) when the weight allows it (even
    K, state dtype fp32 or the compute dtype).
    """
    mode = os.environ.get("FASTPEFT_NF4_GEMM", "auto")
    if mode not in ("auto", "fused", "buffer"):
        raise ValueError(f"FASTPEFT_NF4_GEMM must be auto, fused or buffer, got {mode!r}")
    K = int(quant_state.shape[-1])
    sd = _state_dtype(quant_state)
    fusable = K % 2 == 0 and (sd == dtype or sd == torch.float32)
    if mode == "buffer" or not fusable or torch.are_deterministic_algorithms_enabled():
        return "buffer"  # (the fused kernel's split-K uses atomics: not bitwise reproducible)
    if mode == "fused":
        return "fused"
    numel = int(quant_state.shape[0]) * K
    return "fused" if M <= _fused_max_m(device, numel) else "buffer"


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------

def nf4_lora_linear_reference(x, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_mask=None):
    """Pure-PyTorch QLoRA linear in x.dtype (the oracle): dense-reference LoRA on the dequantized weight."""
    w = nf4_weight_reference(packed, quant_state, x.dtype)
    return lora_ops.lora_linear_reference(x, w, bias, lora_A, lora_B, scaling, dropout_mask)


def _dense_triton_gemm(M, N, K) -> bool:
    pick = getattr(lora_ops, "_use_triton_gemm", None)
    return bool(pick(M, N, K)) if pick is not None else False


def nf4_lora_plan(M: int, quant_state: Any, dtype: torch.dtype, device) -> tuple:
    """(path, triton_gemm): the per-call GEMM choices of the QLoRA forward, which its backward reuses.
    A function of (M, the weight's shape / dtype, dtype, device, env), so a backward can also recompute it."""
    path = nf4_path(M, quant_state, dtype, device)
    if path == "fused":
        return path, False
    return path, _dense_triton_gemm(M, int(quant_state.shape[0]), int(quant_state.shape[-1]))


def nf4_lora_forward_2d(x2, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                        plan: Optional[tuple] = None):
    """QLoRA forward on a 2-D x [M, K], no autograd: (Y [M, N] in x2.dtype, S' = s·(D⊙x)·Aᵀ fp32 [M, r]).

    plan: ``nf4_lora_plan``'s (path, triton_gemm) for this call (computed when None). The building block of
    ``_NF4LoraFn`` and of the ``fastpeft::nf4_lora_fwd`` custom op: both give these numbers.
    """
    path, triton_gemm = plan if plan is not None else nf4_lora_plan(x2.shape[0], quant_state, x2.dtype, x2.device)
    if path == "fused":
        # Z = s·(D⊙X)·Aᵀ·Bᵀ + bias from ops.lora's kernels, then Y = Z + X·dequant(W)ᵀ in one fused GEMM
        b = None if bias is None else bias.to(x2.dtype)
        P = lora_ops.lora_s_partials(x2, lora_A, dropout_p, seed)
        Z, S = lora_ops.lora_expand(P, lora_B, b, scaling, x2.dtype)  # S = S' (fp32, scaled)
        return nf4_matmul(x2, packed, quant_state, c_in=Z), S
    w = dequantize_to(packed, quant_state, x2.dtype)
    return lora_ops.lora_forward_2d(x2, w, bias, lora_A, lora_B, scaling, dropout_p, seed, triton_gemm)


def nf4_lora_backward_2d(dy2, x2, S, packed, quant_state, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                         plan: tuple, need_x: bool = True, need_b: bool = False, need_A: bool = True,
                         need_B: bool = True, separate_outputs: bool = False):
    """QLoRA backward on 2-D tensors, no autograd: (dX [M, K] | None, db fp32 [N] | None, dA fp32 [r, K] | None,
    dB fp32 [N, r] | None). dy2 in x2.dtype; S and plan as the forward gave / used them.
    separate_outputs: dA and dB never share a storage (torch.library ops may not return aliasing tensors)."""
    path, triton_gemm = plan
    if path == "fused":
        # dS, dB; then dA and Z2 = D⊙(dS·A) in one pass over X (ops.lora); then dX = Z2 + dY·dequant(W)
        dS, dB = lora_ops.lora_ds_db(dy2, lora_B, S, scaling)
        dA, Z2 = (lora_ops.lora_da_dx(x2, dS, lora_A, dropout_p, seed, need_dA=need_A, need_dx=need_x)
                  if (need_A or need_x) else (None, None))
        dx2 = nf4_matmul(dy2, packed, quant_state, nn_layout=True, c_in=Z2) if need_x else None
        db = dy2.sum(0, dtype=torch.float32) if need_b else None
    else:
        w = dequantize_to(packed, quant_state, x2.dtype) if need_x else None
        dx2, _, db, dA, dB = lora_ops.lora_backward_2d(
            dy2, x2, S, w, lora_A, lora_B, scaling, dropout_p, seed, triton_gemm,
            need_x, False, need_b, need_A, need_B, separate_outputs=separate_outputs)
    return dx2, db, dA, (dB if need_B else None)


class _NF4LoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2 = as_2d(x)
        ctx.plan = plan = nf4_lora_plan(x2.shape[0], quant_state, x.dtype, x.device)
        y2, S = nf4_lora_forward_2d(x2, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, seed, plan)
        ctx.save_for_backward(x, S, lora_A, lora_B)
        ctx.packed, ctx.quant_state = packed, quant_state  # frozen module state, not activations
        ctx.scaling, ctx.dropout_p, ctx.seed = float(scaling), float(dropout_p), seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], int(quant_state.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, S, lora_A, lora_B = ctx.saved_tensors
        need_x, _, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        dx2, db, dA, dB = nf4_lora_backward_2d(
            as_2d(dy).to(x.dtype), as_2d(x), S, ctx.packed, ctx.quant_state, lora_A, lora_B, ctx.scaling,
            ctx.dropout_p, ctx.seed, ctx.plan, need_x, need_b, need_A, need_B)
        return (
            None if dx2 is None else dx2.view(x.shape),
            None, None,
            None if db is None else db.to(ctx.bias_dtype),
            None if dA is None else dA.to(lora_A.dtype),
            None if dB is None else dB.to(lora_B.dtype),
            None, None, None,
        )


def nf4_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                    seed=None) -> torch.Tensor:
    """QLoRA linear: Y = x·dequant(W)ᵀ + bias + scaling·((D⊙x)·Aᵀ)·Bᵀ in x.dtype, differentiable in x, bias,
    lora_A, lora_B. The base stays 4-bit; W is dequantized per GEMM (shared buffer) or inside the GEMM.

    Without autograd work and at M <= 16 (decode) this takes the NF4 GEMV (``fastpeft.ops.nf4_gemv``:
    CUDA kernel when it builds, else Triton). dropout_p > 0 needs a seed (the mask is regenerated, never
    stored). On a device Triton cannot run on, the reference path with the same mask.

    >>> import torch; from fastpeft.ops.nf4 import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 16))
    >>> y = nf4_lora_linear_reference(torch.randn(3, 16), packed, qs, None, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    >>> y.shape
    torch.Size([3, 8])
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("nf4_lora_linear: dropout_p > 0 needs a seed")
    if not triton_ok(x):
        mask = lora_ops.lora_dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype) if dropout_p > 0 else None
        return nf4_lora_linear_reference(x, packed, quant_state, bias, lora_A, lora_B, scaling, mask)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))
    M = x.numel() // max(1, x.shape[-1])
    if not grad and dropout_p == 0.0 and M <= 16 and x.is_cuda:
        from .nf4_gemv import nf4_lora_gemv  # noqa: PLC0415

        if os.environ.get("FASTPEFT_NF4_GEMM", "auto") != "buffer" and int(quant_state.shape[-1]) % 2 == 0:
            y2 = nf4_lora_gemv(as_2d(x), packed, quant_state, bias, lora_A, lora_B, scaling)
            return y2.view(*x.shape[:-1], int(quant_state.shape[0]))
    return _NF4LoraFn.apply(x, packed, quant_state, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)


# ----------------------------------------------------------------------------------------------------------
# IA3
# ----------------------------------------------------------------------------------------------------------

def nf4_ia3_linear_reference(x, packed, quant_state, bias, ia3_l, feedforward: bool):
    """Pure-PyTorch IA3 on a 4-bit base (the oracle)."""
    w = nf4_weight_reference(packed, quant_state, x.dtype)
    return ia3_ops.ia3_linear_reference(x, w, bias, ia3_l, feedforward)


def nf4_ia3_forward_2d(x2, packed, quant_state, bias, ia3_l, feedforward: bool):
    """IA3 forward on a 4-bit base, 2-D x [M, K], no autograd: (Y [M, N], saved) with saved as
    ``ops.ia3.ia3_forward_2d`` gives it (x2 for feedforward scaling, Yb = x·Wᵀ + b for output scaling).
    The building block of ``_NF4IA3Fn`` and of the ``fastpeft::nf4_ia3_fwd`` custom op."""
    w = dequantize_to(packed, quant_state, x2.dtype)
    return ia3_ops.ia3_forward_2d(x2, w, bias, ia3_l, feedforward, False)


def nf4_ia3_backward_2d(dy2, saved, packed, quant_state, ia3_l, feedforward: bool, need_x: bool = True,
                        need_b: bool = False):
    """IA3 backward on a 4-bit base, 2-D tensors (saved: the forward's, 2-D), no autograd:
    (dX | None, db fp32 [N] | None, dl fp32 [len(l)]). Feedforward computes in saved's (x's) dtype."""
    if feedforward:
        dy2 = dy2.to(saved.dtype)
    w = dequantize_to(packed, quant_state, dy2.dtype)  # feedforward needs G = dY·W for dl anyway
    dx, _, db, dl = ia3_ops.ia3_backward_2d(dy2, saved, w, ia3_l, feedforward, False, need_x, False, need_b)
    return dx, db, dl


class _NF4IA3Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, ia3_l, feedforward):
        y2, saved = nf4_ia3_forward_2d(as_2d(x), packed, quant_state, bias, ia3_l, feedforward)
        ctx.save_for_backward(x if feedforward else saved, ia3_l)
        ctx.packed, ctx.quant_state = packed, quant_state
        ctx.feedforward, ctx.x_shape = feedforward, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], int(quant_state.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        saved, ia3_l = ctx.saved_tensors
        need_x, _, _, need_b, need_l = ctx.needs_input_grad[:5]
        dx, db, dl = nf4_ia3_backward_2d(as_2d(dy), as_2d(saved) if ctx.feedforward else saved, ctx.packed,
                                         ctx.quant_state, ia3_l, ctx.feedforward, need_x, need_b)
        return (
            None if dx is None else dx.view(ctx.x_shape),
            None, None,
            None if db is None else db.to(ctx.bias_dtype),
            dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
            None,
        )


def nf4_ia3_linear(x, packed, quant_state, bias, ia3_l, feedforward: bool) -> torch.Tensor:
    """IA3 on a 4-bit base: the dense IA3 composition (``fastpeft.ops.ia3``) on W dequantized into the shared
    buffer (forward, and again in backward); differentiable in x, bias, ia3_l."""
    if not triton_ok(x):
        return nf4_ia3_linear_reference(x, packed, quant_state, bias, ia3_l, feedforward)
    return _NF4IA3Fn.apply(x, packed, quant_state, bias, ia3_l, bool(feedforward))

"""Triton side of bitsandbytes' 4-bit format: one-pass dequantization and the device helpers other 4-bit kernels
share (code values from a select tree, block absmax undoing double quant), plus the one Triton kernel that
quantization needs (bnb's approximate CUDA reciprocal).

The format and the PyTorch reference: ``fastpeft/ops/nf4_format.py``. Kernels take a ``KernelState`` (the typed
view of a QuantState) and the packed bytes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..nf4_format import KernelState, _check_state, _packed_bytes, kernel_state, nf4_dequantize_reference
from .common import interpreting, triton_ok

__all__ = ["code_value", "block_absmax", "dequantize_into", "nf4_dequantize_triton", "nf4_dequantize", "rcp_approx"]


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, out_ptr,
    offset, n_bytes, n_elem,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # Bytes floor (what one pass must move): n/2 packed bytes + 4*ceil(n/blocksize) absmax bytes read
    # (double quant: ceil(n/blocksize) uint8 codes + 4*ceil(n/blocksize/256) bytes), n * itemsize(out) written
    # (n*2 for bf16). Each program reads BYTES contiguous packed bytes (16-byte vector loads per thread for
    # BYTES >= 16 * threads) and writes 2*BYTES contiguous outputs; the absmax / code gathers hit L1/L2.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BYTES + tl.arange(0, BYTES)
    in_bytes = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=in_bytes, other=0).to(tl.int32)
    blk = (offs * 2) // BLOCKSIZE  # an even blocksize keeps both nibbles of a byte in one block
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=in_bytes, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=in_bytes, other=0.0)
        absmax = tl.load(code2_ptr + qa) * a2 + offset  # fp fusion is off at launch: product rounded, then sum
    else:
        absmax = tl.load(absmax_ptr + blk, mask=in_bytes, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * absmax
    lo = tl.load(code_ptr + (byte & 15)) * absmax
    vals = tl.interleave(hi, lo)  # element 2j = high nibble, 2j+1 = low nibble
    eoffs = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if OUT_BF16:
        # fp32 -> bf16 round-to-nearest-even in integer ops (out_ptr is the int16 view of the bf16 output):
        # the same bits as torch's .to(bfloat16) on every backend (the interpreter's own cast truncates).
        bits = vals.to(tl.uint32, bitcast=True)
        rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rne = tl.where(vals != vals, 0x7FC0, rne)  # NaN stays a quiet NaN
        tl.store(out_ptr + eoffs, rne.to(tl.int16), mask=eoffs < n_elem)
    else:
        tl.store(out_ptr + eoffs, vals.to(out_ptr.dtype.element_ty), mask=eoffs < n_elem)


# The 16 code values as a 4-level select tree on the nibble's bits: no memory access per element
# (the alternative, LUT="load", gathers code[q] from a 64-byte array that stays in L1).
@triton.jit
def _code_select(q, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                 C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
                 C8: tl.constexpr, C9: tl.constexpr, C10: tl.constexpr, C11: tl.constexpr,
                 C12: tl.constexpr, C13: tl.constexpr, C14: tl.constexpr, C15: tl.constexpr):
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v0 = tl.where(b1, tl.where(b0, C3, C2), tl.where(b0, C1, C0))
    v1 = tl.where(b1, tl.where(b0, C7, C6), tl.where(b0, C5, C4))
    v2 = tl.where(b1, tl.where(b0, C11, C10), tl.where(b0, C9, C8))
    v3 = tl.where(b1, tl.where(b0, C15, C14), tl.where(b0, C13, C12))
    return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0)).to(tl.float32)


@triton.jit
def code_value(q, code_ptr, QT: tl.constexpr):
    """fp32 code value of int32 nibbles q: QT 0 = NF4, 1 = FP4 (select trees), 2 = load code_ptr[q]."""
    if QT == 0:
        return _code_select(q, -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
    elif QT == 1:
        return _code_select(q, 0.0, 0.005208333333333333, 0.6666666865348816, 1.0,
                            0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
                            0.0, -0.005208333333333333, -0.6666666865348816, -1.0,
                            -0.3333333432674408, -0.5, -0.1666666716337204, -0.25)
    else:
        return tl.load(code_ptr + q)


@triton.jit
def block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mask, NESTED: tl.constexpr,
                 BLOCKSIZE2: tl.constexpr):
    """fp32 absmax of 4-bit blocks ``blk`` (undoing double quant: code2[q] * absmax2 rounded, then + offset)."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.load(code2_ptr + qa) * a2 + offset  # launched with fp fusion off: two roundings, like bnb
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequant_rows_kernel(
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, out_ptr,
    offset, n_bytes, n_elem,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, QT: tl.constexpr,
    HB: tl.constexpr, ROWS: tl.constexpr, RNE_INT: tl.constexpr,
):
    # Bytes floor: n/2 packed bytes + absmax (4·n/blocksize; double quant n/blocksize + 4·n/blocksize/256)
    # read, n·itemsize(out) written: 2.5 bytes per weight for bf16 out, i.e. 42 MB for 4096x4096 (14 µs
    # at 2.96 TB/s). The program is a [ROWS, HB] tile of packed bytes, each row HB = min(blocksize/2, 256)
    # contiguous bytes inside one 4-bit block: 16-byte vector loads, one absmax per row (not per element),
    # the code from a select tree (registers), 2·HB contiguous outputs per row.
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS)
    byte0 = row * HB
    offs = byte0[:, None] + tl.arange(0, HB)[None, :]
    byte = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
    absmax = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, (byte0 * 2) // BLOCKSIZE, byte0 < n_bytes,
                          NESTED, BLOCKSIZE2)
    hi = code_value(byte >> 4, code_ptr, QT) * absmax[:, None]
    lo = code_value(byte & 15, code_ptr, QT) * absmax[:, None]
    vals = tl.interleave(hi, lo)  # [ROWS, 2*HB]: element 2j = high nibble, 2j+1 = low nibble
    eoffs = (row * (2 * HB))[:, None] + tl.arange(0, 2 * HB)[None, :]
    emask = eoffs < n_elem
    if RNE_INT:
        # fp32 -> bf16 round-to-nearest-even in integer ops (out_ptr is the int16 view of the bf16 output):
        # the interpreter's own cast truncates; on the GPU the native cast is already RNE.
        bits = vals.to(tl.uint32, bitcast=True)
        rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rne = tl.where(vals != vals, 0x7FC0, rne)  # NaN stays a quiet NaN
        tl.store(out_ptr + eoffs, rne.to(tl.int16), mask=emask)
    else:
        tl.store(out_ptr + eoffs, vals.to(out_ptr.dtype.element_ty), mask=emask)


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def dequantize_into(packed: torch.Tensor, ks: KernelState, out: torch.Tensor, bytes_per_program: int = 4096,
                    lut: str = "select", num_warps: int = 4) -> torch.Tensor:
    """Dequantize into ``out`` (contiguous, ``ks.numel`` elements of fp32 / fp16 / bf16, on packed's device);
    returns ``out``. No validation: callers hold a KernelState made for these bytes (``kernel_state``).
    lut: "select" (code values from a select tree in registers) or "load" (gathered from the 16-entry code in
    L1); both give the same bits."""
    n = ks.numel
    if n == 0:
        return out
    b = _packed_bytes(packed)
    n_bytes = (n + 1) // 2
    qt = ks.qt if lut == "select" else 2
    rne_int = out.dtype == torch.bfloat16 and interpreting()
    dst = out.view(torch.int16) if rne_int else out
    fp = {"enable_fp_fusion": False} if packed.is_cuda else {}  # code2*absmax2 + offset: two roundings
    bs = ks.blocksize
    if _pow2(bs):
        HB = min(bs // 2, 256)
        BYTES = max(HB, min(triton.next_power_of_2(int(bytes_per_program)), triton.next_power_of_2(n_bytes)))
        grid = (triton.cdiv(n_bytes, BYTES),)
        _dequant_rows_kernel[grid](b, ks.absmax, ks.code, ks.code2, ks.absmax2, dst, ks.offset,
                                   n_bytes, n, BLOCKSIZE=bs, BLOCKSIZE2=ks.blocksize2, NESTED=ks.nested, QT=qt,
                                   HB=HB, ROWS=BYTES // HB, RNE_INT=rne_int, num_warps=num_warps, **fp)
        return out
    # any other even blocksize: the per-element kernel
    BYTES = max(16, min(1024, triton.next_power_of_2(n_bytes)))
    _dequant_4bit_kernel[(triton.cdiv(n_bytes, BYTES),)](
        b, ks.absmax, ks.code, ks.code2, ks.absmax2, dst, ks.offset, n_bytes, n,
        BLOCKSIZE=bs, BLOCKSIZE2=ks.blocksize2, NESTED=ks.nested, BYTES=BYTES, OUT_BF16=rne_int, num_warps=4, **fp)
    return out


def nf4_dequantize_triton(packed: torch.Tensor, quant_state: Any, out_dtype: Optional[torch.dtype] = None,
                          bytes_per_program: int = 4096, out: Optional[torch.Tensor] = None,
                          lut: str = "select", num_warps: int = 4) -> torch.Tensor:
    """One-pass Triton dequantization (CUDA, or any device under TRITON_INTERPRET=1), bit-exact with
    ``nf4_dequantize_reference`` (and bnb's ``dequantize_4bit``).

    out: an optional contiguous tensor of ``out_dtype`` with at least numel elements (e.g. a reused buffer);
    the result is then a view of it.
    """
    if not triton_ok(packed):
        raise RuntimeError("nf4_dequantize_triton needs a CUDA tensor (or TRITON_INTERPRET=1)")
    n, _ = _check_state(packed, quant_state)
    out_dtype = out_dtype or quant_state.dtype or torch.float32
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be fp32/fp16/bf16, got {out_dtype}")
    if lut not in ("select", "load"):
        raise ValueError(f"lut must be 'select' or 'load', got {lut!r}")
    device = packed.device
    if out is None:
        out = torch.empty(quant_state.shape, dtype=out_dtype, device=device)
    else:
        if out.dtype != out_dtype or not out.is_contiguous() or out.numel() < n or out.device != device:
            raise ValueError(f"out must be a contiguous {out_dtype} tensor on {device} with >= {n} elements")
        out = out.reshape(-1)[:n].view(quant_state.shape)
    if n == 0:
        return out
    dequantize_into(packed, kernel_state(quant_state, device), out.view(-1), bytes_per_program, lut, num_warps)
    return out


def nf4_dequantize(packed: torch.Tensor, quant_state: Any, out_dtype: Optional[torch.dtype] = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dequantize bnb 4-bit bytes + QuantState to a dense ``[*quant_state.shape]`` tensor.

    backend: "auto" (Triton on CUDA tensors, the PyTorch reference elsewhere), "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1) or "reference". All give the same bits.
    """
    if backend == "auto":
        backend = "triton" if packed.is_cuda else "reference"
    if backend == "triton":
        return nf4_dequantize_triton(packed, quant_state, out_dtype)
    if backend == "reference":
        return nf4_dequantize_reference(packed, quant_state, out_dtype)
    raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


@triton.jit
def _rcp_approx_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # 1/x exactly as nvcc --use_fast_math compiles ``1.0f / x`` (bnb's kQuantizeBlockwise): the MUFU
    # approximation, flush-to-zero. Tiny (one value per 256 absmax): no bandwidth concern.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                  pack=1)
    tl.store(out_ptr + offs, r, mask=mask)


def rcp_approx(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``rcp.approx.ftz.f32`` of a CUDA (NVIDIA) tensor: bnb's CUDA ``1.0f / absmax`` under fast math."""
    if not x.is_cuda or torch.version.hip is not None or interpreting():
        raise RuntimeError("rcp_approx needs an NVIDIA CUDA tensor (the PTX instruction has no CPU equivalent)")
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _rcp_approx_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024, num_warps=4)
    return out


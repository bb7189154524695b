"""bitsandbytes 4-bit weights (NF4 / FP4): dequantize bnb's own packed bytes + QuantState, and quantize to
the same bytes bnb writes.

Format (DESIGN.md §3; every fact below was checked against bitsandbytes 0.50.2 on CPU):
    weight [N, K] (any shape) flattened row-major into n elements; element 2j -> high nibble of byte j,
    element 2j+1 -> low nibble; odd n pads one zero value. Bytes are stored as uint8 [ceil(n/2), 1], or the
    same bytes viewed as another ``quant_storage`` dtype (e.g. bf16 [ceil(n/2)/2, 1] for FSDP).
    value = code[q] * absmax[i // blocksize]           (fp32 product, then one rounding to the output dtype)
    double quant (compress_statistics=True): absmax is uint8 codes into the 256-entry signed dynamic code:
        absmax[b] = code2[qa[b]] * absmax2[b // blocksize2] + offset     (fp32, product rounded, then sum)

Quantization (bnb's rules, reproduced here; not its code):
    * input -> fp32; blocks of ``blocksize`` flat elements; absmax[b] = max |x| over the block.
    * full blocks:  s = x * fl(1 / max(absmax, 1e-38)); the stored absmax keeps its true value (0 stays 0).
      tail block (n % blocksize != 0): a = max(max |x|, 1e-38); s = x / a; the stored absmax is that clamped a.
    * s is clamped to [-1, 1] and mapped to the nearest code by the fp32 midpoints of the *sorted* code, a value
      exactly on a midpoint going to the lower code (FP4's two zeros: 0 -> nibble 0, (0, mid] -> nibble 8).
    * double quant: offset = mean(absmax) (fp32 torch mean on the tensor's device); c = absmax - offset is
      blockwise quantized in blocks of 256 with the dynamic code: absmax2 = max |c| per block (no clamp),
      y = c * fl(1 / absmax2), then the code index. bnb's CPU library does that last step through a 65536-entry
      table: g = trunc(fl(fl(fl(y + 1) * 32767.5) + 0.5)), index = nearest code to g / 32767.5 - 1, and a NaN y
      (an all-equal absmax sub-block, absmax2 = 0) gives index 0. This is *not* the exactly-nearest code
      (it can be one or two codes off near 0). ``nested_rounding="bnb-cpu"`` reproduces it bit for bit.
      bnb's CUDA kernel (kQuantizeBlockwise + dQuantize, built with --use_fast_math) instead computes
      y = c * rcp(absmax2) with the *approximate* hardware reciprocal (``1.0f / x`` under fast math is
      ``rcp.approx.ftz.f32``, up to 1 ulp off the IEEE quotient), then a 7-step binary search over the sorted
      code (pivots 127 +- 64 +- ... +- 1) and a final midpoint test ``(a + b) * 0.5f`` against the two
      neighbours the search bracketed: the nearest code, except that a value exactly on a midpoint goes to
      the even index, and a NaN y (absmax2 = 0) gives index 0. ``"bnb-cuda"`` reproduces that (the
      reciprocal through the same PTX instruction from a Triton kernel); ``"nearest"`` is the exactly-nearest
      code of the IEEE y (ties to the lower code).

Two dequantize implementations: ``nf4_dequantize_reference`` (vectorized PyTorch, any device) and
``nf4_dequantize_triton`` (one memory pass). ``nf4_dequantize`` picks one. Nothing here imports bitsandbytes
except ``quantize_nf4`` (to return a real ``QuantState`` when it is installed).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from fastpeft.ops._common import interpreting, triton_ok

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "code_for",
    "dynamic_code",
    "NF4QuantState",
    "dequantize_absmax",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_dequantize_triton",
    "quantize_nf4",
]

# The 16 NF4 values (index 0..15), exactly the fp32 values bitsandbytes dequantizes with.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bnb's FP4 (e2m1-like, bias chosen by bnb) values, read off dequantize_4bit of every nibble with absmax 1:
# index 0..7 positive magnitudes, 8..15 the same with the sign bit; both zeros are +0.0.
FP4_CODE = (
    0.0, 1.0 / 192.0, 2.0 / 3.0, 1.0, 1.0 / 3.0, 0.5, 1.0 / 6.0, 0.25,
    0.0, -1.0 / 192.0, -2.0 / 3.0, -1.0, -1.0 / 3.0, -0.5, -1.0 / 6.0, -0.25,
)
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_NESTED_BLOCKSIZE = 256
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def code_for(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 code of ``quant_type`` ("nf4" | "fp4")."""
    if quant_type not in _CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(_CODES[quant_type], dtype=torch.float32, device=device)


def dynamic_code(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic code (256 sorted fp32 values) bnb uses for the nested absmax.

    Level i = 0..6 splits [0.1, 1] (fp32 linspace) into 2**i equal parts; the part midpoints scaled by
    10**(i - 6), both signs, plus 0 and 1: 2 * 127 + 2 = 256 values, sorted ascending.
    """
    parts = []
    for level in range(7):
        edges = torch.linspace(0.1, 1.0, 2**level + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = mids * (10.0 ** (level - 6))
        parts += [scaled, -scaled]
    parts.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    code = torch.cat(parts).sort().values
    assert code.numel() == 256
    return code.to(device) if device is not None else code


@dataclasses.dataclass
class NF4QuantState:
    """Field-for-field stand-in for ``bitsandbytes.functional.QuantState`` (used when bnb is not installed)."""

    absmax: torch.Tensor
    shape: Optional[torch.Size] = None
    code: Optional[torch.Tensor] = None
    blocksize: Optional[int] = None
    quant_type: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    offset: Optional[torch.Tensor] = None
    state2: Optional["NF4QuantState"] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


# ----------------------------------------------------------------------------------------------------------
# Reading a QuantState
# ----------------------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(math.prod(tuple(shape)))


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed tensor as a flat uint8 tensor (reinterpreting a quant_storage dtype such as bf16)."""
    p = packed.contiguous()
    if p.dtype != torch.uint8:
        p = p.reshape(-1).view(torch.uint8)
    return p.reshape(-1)


def _state_code(qs: Any) -> torch.Tensor:
    code = getattr(qs, "code", None)
    if code is None or code.numel() != 16:
        code = code_for(qs.quant_type)
    return code.to(torch.float32)


def _check_state(packed: torch.Tensor, qs: Any) -> tuple[int, int]:
    if getattr(qs, "shape", None) is None or getattr(qs, "blocksize", None) is None:
        raise ValueError("quant_state needs .shape and .blocksize")
    qt = getattr(qs, "quant_type", None)
    if qt not in _CODES:
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qt!r}")
    n = _numel(qs.shape)
    bs = int(qs.blocksize)
    if bs <= 0 or bs % 2:
        raise ValueError(f"blocksize must be a positive even number, got {bs}")
    nbytes = packed.numel() * packed.element_size()
    if nbytes < (n + 1) // 2:
        raise ValueError(f"packed holds {nbytes} bytes, shape {tuple(qs.shape)} needs {(n + 1) // 2}")
    nblocks = -(-n // bs)
    if qs.absmax.numel() < nblocks:
        raise ValueError(f"absmax has {qs.absmax.numel()} entries, {nblocks} blocks of {bs} need more")
    return n, bs


def dequantize_absmax(quant_state: Any) -> torch.Tensor:
    """fp32 per-block absmax, undoing double quantization when the state has a ``state2``."""
    st2 = getattr(quant_state, "state2", None)
    absmax = quant_state.absmax
    if st2 is None:
        return absmax.float()
    q = absmax.reshape(-1).long()
    bs2 = int(st2.blocksize)
    a2 = st2.absmax.float().reshape(-1)
    scale = a2.repeat_interleave(bs2)[: q.numel()] if a2.numel() * bs2 >= q.numel() else None
    if scale is None:
        raise ValueError("state2.absmax too short for the nested codes")
    prod = st2.code.float()[q] * scale  # rounded to fp32 first ...
    offset = quant_state.offset if quant_state.offset is not None else 0.0
    return prod + offset  # ... then the offset is added (bnb does the same two roundings)


# ----------------------------------------------------------------------------------------------------------
# Dequantize: reference
# ----------------------------------------------------------------------------------------------------------

def nf4_dequantize_reference(packed: torch.Tensor, quant_state: Any, out_dtype: Optional[torch.dtype] = None
                             ) -> torch.Tensor:
    """Pure-PyTorch dequantization of bnb 4-bit bytes (NF4 or FP4) to ``out_dtype`` (default: the state's dtype)."""
    n, bs = _check_state(packed, quant_state)
    out_dtype = out_dtype or quant_state.dtype or torch.float32
    device = packed.device
    b = _packed_bytes(packed)[: (n + 1) // 2]
    q = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)[:n].long()
    vals = _state_code(quant_state).to(device)[q]
    nblocks = -(-n // bs)
    absmax = dequantize_absmax(quant_state).to(device).reshape(-1)[:nblocks]
    pad = nblocks * bs - n
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    out = (vals.view(nblocks, bs) * absmax.view(nblocks, 1)).view(-1)[:n]
    return out.to(out_dtype).reshape(quant_state.shape)


# ----------------------------------------------------------------------------------------------------------
# Dequantize: Triton
# ----------------------------------------------------------------------------------------------------------

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


def quant_type_id(quant_state: Any, lut: str = "select") -> int:
    """Which code the kernels use: 0 NF4 / 1 FP4 select tree (when the state's code is bnb's), 2 = load."""
    qt = getattr(quant_state, "quant_type", None)
    if lut == "select" and qt in _CODES:
        code = getattr(quant_state, "code", None)
        if code is None or code.numel() != 16 or torch.equal(code.detach().float().cpu(),
                                                             torch.tensor(_CODES[qt], dtype=torch.float32)):
            return 0 if qt == "nf4" else 1
    return 2


def kernel_state(quant_state: Any, device) -> dict:
    """The QuantState as the tensors / scalars the kernels take, cached on the state object per device.

    Keys: code (fp32 [16]), absmax (fp32, or uint8 codes when nested), code2, absmax2, offset (float),
    bs, bs2, nested, qt (the select-tree id), n.
    """
    device = torch.device(device)
    cache = getattr(quant_state, "_fastpeft_kstate", None)
    key = (str(device), id(quant_state.absmax))
    if cache is not None and cache.get("key") == key:
        return cache
    st2 = getattr(quant_state, "state2", None)
    code = _state_code(quant_state).to(device).contiguous()
    if st2 is not None:
        absmax = quant_state.absmax.reshape(-1).to(device).contiguous()
        code2 = st2.code.to(device=device, dtype=torch.float32).contiguous()
        absmax2 = st2.absmax.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        offset = float(quant_state.offset) if quant_state.offset is not None else 0.0
        bs2 = int(st2.blocksize)
    else:
        absmax = quant_state.absmax.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        code2, absmax2, offset, bs2 = code, absmax, 0.0, 1
    ks = dict(key=key, code=code, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset,
              bs=int(quant_state.blocksize), bs2=bs2, nested=st2 is not None, qt=quant_type_id(quant_state),
              n=_numel(quant_state.shape))
    try:
        quant_state._fastpeft_kstate = ks
    except AttributeError:  # a state type that refuses new attributes: no cache
        pass
    return ks


def kernel_quant_state(absmax: torch.Tensor, code: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor,
                       offset: float, blocksize: int, blocksize2: int, nested: bool, qt: int, quant_type: str,
                       shape, dtype: torch.dtype) -> NF4QuantState:
    """A light QuantState rebuilt from ``kernel_state``'s tensors and scalars, its kernel_state cache pre-filled.

    For code that receives the state as plain tensors + numbers (the torch.library ops of
    ``fastpeft.ops.custom_ops``, whose schemas cannot carry a QuantState): ``kernel_state(result, device)``
    returns the given tensors as they are -- no ``.to(device)``, no ``float(offset)`` sync, no code comparison.
    The tensors must already be what kernel_state would make: on the kernels' device, contiguous, flat absmax
    (fp32, or the uint8 codes when ``nested``), fp32 code / code2 / absmax2 (non-nested: code2 = code,
    absmax2 = absmax, blocksize2 = 1). ``qt`` is ``quant_type_id``'s answer for the original state.

    >>> packed, qs = quantize_nf4(torch.randn(8, 64))
    >>> ks = kernel_state(qs, "cpu")
    >>> light = kernel_quant_state(ks["absmax"], ks["code"], ks["code2"], ks["absmax2"], ks["offset"], ks["bs"],
    ...                            ks["bs2"], ks["nested"], ks["qt"], qs.quant_type, qs.shape, qs.dtype)
    >>> kernel_state(light, "cpu")["absmax"] is ks["absmax"]
    True
    """
    state2 = NF4QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32) if nested else None
    shape = torch.Size(shape)
    qs = NF4QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type,
                       dtype=dtype, offset=offset if nested else None, state2=state2)
    qs._fastpeft_kstate = dict(key=(str(absmax.device), id(absmax)), code=code, absmax=absmax, code2=code2,
                               absmax2=absmax2, offset=float(offset), bs=int(blocksize), bs2=int(blocksize2),
                               nested=bool(nested), qt=int(qt), n=_numel(shape))
    return qs


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def nf4_dequantize_triton(packed: torch.Tensor, quant_state: Any, out_dtype: Optional[torch.dtype] = None,
                          bytes_per_program: int = 4096, out: Optional[torch.Tensor] = None,
                          lut: str = "select", num_warps: int = 4) -> torch.Tensor:
    """One-pass Triton dequantization (CUDA, or any device under TRITON_INTERPRET=1).

    out: an optional contiguous tensor of ``out_dtype`` with at least numel elements (e.g. a reused buffer);
    the result is then a view of it. lut: "select" (code values from a select tree in registers) or "load"
    (gathered from the 16-entry code in L1). Both give the same bits.
    """
    if not triton_ok(packed):
        raise RuntimeError("nf4_dequantize_triton needs a CUDA tensor (or TRITON_INTERPRET=1)")
    n, bs = _check_state(packed, quant_state)
    out_dtype = out_dtype or quant_state.dtype or torch.float32
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be fp32/fp16/bf16, got {out_dtype}")
    if lut not in ("select", "load"):
        raise ValueError(f"lut must be 'select' or 'load', got {lut!r}")
    device = packed.device
    b = _packed_bytes(packed)
    n_bytes = (n + 1) // 2
    if out is None:
        out = torch.empty(quant_state.shape, dtype=out_dtype, device=device)
    else:
        if out.dtype != out_dtype or not out.is_contiguous() or out.numel() < n or out.device != device:
            raise ValueError(f"out must be a contiguous {out_dtype} tensor on {device} with >= {n} elements")
        out = out.reshape(-1)[:n].view(quant_state.shape)
    if n == 0:
        return out
    ks = kernel_state(quant_state, device)
    qt = ks["qt"] if lut == "select" else 2
    out_bf16 = out_dtype == torch.bfloat16
    rne_int = out_bf16 and interpreting()
    dst = out.view(torch.int16) if rne_int else out
    fp = {"enable_fp_fusion": False} if device.type == "cuda" else {}  # code2*absmax2 + offset: two roundings
    if _pow2(bs):
        HB = min(bs // 2, 256)
        BYTES = max(HB, min(triton.next_power_of_2(int(bytes_per_program)), triton.next_power_of_2(n_bytes)))
        grid = (triton.cdiv(n_bytes, BYTES),)
        _dequant_rows_kernel[grid](b, ks["absmax"], ks["code"], ks["code2"], ks["absmax2"], dst, ks["offset"],
                                   n_bytes, n, BLOCKSIZE=bs, BLOCKSIZE2=ks["bs2"], NESTED=ks["nested"], QT=qt,
                                   HB=HB, ROWS=BYTES // HB, RNE_INT=rne_int, num_warps=num_warps, **fp)
        return out
    # any other even blocksize: the per-element kernel
    BYTES = max(16, min(1024, triton.next_power_of_2(n_bytes)))
    _dequant_4bit_kernel[(triton.cdiv(n_bytes, BYTES),)](
        b, ks["absmax"], ks["code"], ks["code2"], ks["absmax2"], dst, ks["offset"], n_bytes, n,
        BLOCKSIZE=bs, BLOCKSIZE2=ks["bs2"], NESTED=ks["nested"], BYTES=BYTES, OUT_BF16=rne_int, num_warps=4, **fp)
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


# ----------------------------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------------------------

def _nearest_sorted(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the nearest entry by fp32 midpoints of the sorted code; on a midpoint: the lower."""
    order = torch.sort(code, stable=True).indices
    srt = code[order]
    mids = (srt[:-1] + srt[1:]) / 2
    pos = torch.bucketize(values, mids, right=False)
    return order[pos]


def _scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's 4-bit block scaling of flat fp32 x: (scaled values in [-1, 1], stored fp32 absmax)."""
    n = x.numel()
    full = n - n % blocksize
    xf = x[:full].view(-1, blocksize)
    absmax = xf.abs().amax(dim=1)
    scaled = (xf * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    if full < n:
        a = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, a.reshape(1)])
        scaled = torch.cat([scaled, x[full:] / a])
    return scaled.clamp(-1.0, 1.0), absmax


@functools.lru_cache(maxsize=8)
def _bnb_cpu_table(device: torch.device) -> torch.Tensor:
    """bnb's CPU lookup table: cell g (0..65535) -> index of the dynamic code nearest to g / 32767.5 - 1."""
    code = dynamic_code()
    cells = torch.arange(65536, dtype=torch.float32) / 32767.5 - 1.0
    idx = torch.cat([(c.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1) for c in cells.split(8192)])
    return idx.to(torch.uint8).to(device)


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


def dquantize_bnb_cuda(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bnb's CUDA ``dQuantize<0>`` (non-stochastic) of fp32 y against a sorted 256-entry code, vectorized:
    7 binary-search steps from pivot 127, then the midpoint test against the bracketing neighbours (a value
    on a midpoint keeps the search's final, even pivot; NaN ends at index 0). Returns int64 indices."""
    code = code.to(device=y.device, dtype=torch.float32)
    y = y.to(torch.float32)
    pivot = torch.full_like(y, 127, dtype=torch.long)
    upper_p = torch.full_like(pivot, 255)
    lower_p = torch.zeros_like(pivot)
    lower = torch.full_like(y, -1.0)
    upper = torch.full_like(y, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = y > val
        lower_p = torch.where(gt, pivot, lower_p)
        lower = torch.where(gt, val, lower)
        upper_p = torch.where(gt, upper_p, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    gt = y > val
    take_upper = y > (upper + val) * 0.5
    take_lower = y < (lower + val) * 0.5
    return torch.where(gt, torch.where(take_upper, upper_p, pivot), torch.where(take_lower, lower_p, pivot))


def _quantize_dynamic(c: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise (256) 8-bit dynamic quantization of flat fp32 c: (uint8 codes, fp32 absmax2)."""
    n = c.numel()
    nb = -(-n // _NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(c, (0, nb * _NESTED_BLOCKSIZE - n)).view(nb, _NESTED_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=1)  # zero padding never raises a block's max |c|
    if rounding == "bnb-cuda":
        inv = rcp_approx(absmax2)  # bnb CUDA: approximate reciprocal (fast math), then one fp32 product
        y = (padded * inv.unsqueeze(1)).reshape(-1)[:n]  # absmax2 = 0 -> 0 * inf = NaN -> index 0
        return dquantize_bnb_cuda(y, dynamic_code(c.device)).to(torch.uint8), absmax2
    y = (padded * (1.0 / absmax2).unsqueeze(1)).reshape(-1)[:n]  # absmax2 = 0 -> 0 * inf = NaN
    if rounding == "bnb-cpu":
        g = torch.floor((y + 1.0) * 32767.5 + 0.5)  # three separately rounded fp32 ops, as bnb's CPU kernel
        g = torch.nan_to_num(g, nan=0.0).clamp(0, 65535).long()
        q = _bnb_cpu_table(c.device)[g]
    elif rounding == "nearest":
        q = _nearest_sorted(torch.nan_to_num(y, nan=-1.0).clamp(-1.0, 1.0), dynamic_code(c.device)).to(torch.uint8)
    else:
        raise ValueError(f"nested_rounding must be 'auto', 'bnb-cpu', 'bnb-cuda' or 'nearest', got {rounding!r}")
    return q, absmax2


def _make_state(**fields):
    try:
        from bitsandbytes.functional import QuantState  # noqa: PLC0415
    except Exception:  # bitsandbytes missing or broken: same field names, our dataclass
        return NF4QuantState(**fields)
    return QuantState(**fields)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True,
                 quant_type: str = "nf4", quant_storage: torch.dtype = torch.uint8,
                 nested_rounding: str = "auto"):
    """Quantize ``weight`` to bnb's 4-bit format: ``(packed, quant_state)`` with the bytes bnb's
    ``quantize_4bit`` writes (packed uint8 ``[ceil(n/2), 1]`` or viewed as ``quant_storage``; absmax; nested
    codes, offset and state2 when ``compress_statistics``).

    nested_rounding picks how the nested absmax codes are rounded: "bnb-cpu" (bnb's CPU table, bit-exact with
    bitsandbytes on CPU), "bnb-cuda" (bnb's CUDA kernel: approximate reciprocal + binary search; NVIDIA GPUs
    only), "nearest" (exactly nearest code) or "auto" ("bnb-cpu" on CPU tensors, "bnb-cuda" on NVIDIA CUDA
    tensors, "nearest" elsewhere). The 4-bit codes, absmax, offset and absmax2 do not depend on it.
    Returns a real ``bitsandbytes.functional.QuantState`` when bitsandbytes imports, else ``NF4QuantState``.
    """
    if quant_type not in _CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in _BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weight must be fp32/fp16/bf16, got {weight.dtype}")
    if nested_rounding == "auto":
        if weight.device.type == "cpu":
            nested_rounding = "bnb-cpu"
        elif weight.is_cuda and torch.version.hip is None and not interpreting():
            nested_rounding = "bnb-cuda"
        else:
            nested_rounding = "nearest"
    if nested_rounding not in ("bnb-cpu", "bnb-cuda", "nearest"):
        raise ValueError(f"nested_rounding must be 'auto', 'bnb-cpu', 'bnb-cuda' or 'nearest', got {nested_rounding!r}")
    device = weight.device
    x = weight.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    scaled, absmax = _scale_blocks(x, blocksize)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad nibble is the code of 0.0
    code = code_for(quant_type, device)
    q = _nearest_sorted(scaled, code).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        if packed.numel() % itemsize:
            raise ValueError(f"{packed.numel()} packed bytes cannot be viewed as {quant_storage} "
                             f"({itemsize} bytes per element)")
        packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
    fields = dict(shape=weight.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=weight.dtype)
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, absmax2 = _quantize_dynamic(absmax - offset, nested_rounding)
        state2 = _make_state(absmax=absmax2, code=dynamic_code(device), blocksize=_NESTED_BLOCKSIZE,
                             dtype=torch.float32)
        state = _make_state(absmax=qabsmax, offset=offset, state2=state2, **fields)
    else:
        state = _make_state(absmax=absmax, **fields)
    return packed, state

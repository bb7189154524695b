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

This module is PyTorch only (no Triton): the format constants, ``NF4QuantState`` (bnb's QuantState fields,
for when bnb is missing), the reference dequantization (the oracle and the CPU path) and ``KernelState``, the
one typed view of a QuantState that every 4-bit kernel takes. Quantization lives in ``ops/nf4_quantize.py``,
the Triton dequantization in ``ops/kernels/nf4_dequant.py``. Nothing here imports bitsandbytes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple

import torch

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "BLOCKSIZES",
    "code_for",
    "dynamic_code",
    "NF4QuantState",
    "dequantize_absmax",
    "nf4_dequantize_reference",
    "KernelState",
    "kernel_state",
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
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


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
# What the kernels take: one typed view of a QuantState
# ----------------------------------------------------------------------------------------------------------

def quant_type_id(quant_state: Any, lut: str = "select") -> int:
    """Which code the kernels use: 0 NF4 / 1 FP4 select tree (when the state's code is bnb's), 2 = load."""
    qt = getattr(quant_state, "quant_type", None)
    if lut == "select" and qt in _CODES:
        code = getattr(quant_state, "code", None)
        if code is None or code.numel() != 16 or torch.equal(code.detach().float().cpu(),
                                                             torch.tensor(_CODES[qt], dtype=torch.float32)):
            return 0 if qt == "nf4" else 1
    return 2



@dataclasses.dataclass(frozen=True)
class KernelState:
    """A QuantState as the 4-bit kernels read it: tensors on the kernels' device plus plain numbers.

    code      fp32 [16]                     the 4-bit code (NF4 / FP4 values)
    absmax    fp32 [blocks], or uint8 codes when ``nested`` (double quant)
    code2     fp32 [256] nested code        (non-nested: the same tensor as ``code``)
    absmax2   fp32 [blocks / blocksize2]    (non-nested: the same tensor as ``absmax``)
    offset    float (nested only; else 0),  blocksize, blocksize2 (non-nested: 1), nested,
    qt        the code's kernel id (0 NF4 select tree, 1 FP4 select tree, 2 load the code from memory)
    quant_type "nf4" | "fp4";  shape of the dense weight ((N, K) for a layer);  state_dtype the weight's dtype before
              quantization (bnb dequantizes to it; the compute dtype may differ)
    The packed bytes are not part of it: they are a parameter (FSDP2 re-gathers it), passed beside.

    ``kernel_state(quant_state, device)`` builds it once and caches it on the QuantState; the torch.library
    ops of ``ops/kernels/custom_ops.py`` pass it as ``op_tensors()`` + ``op_scalars()`` and rebuild it with
    ``from_op_args`` (a custom-op schema cannot carry a Python object).

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 64))
    >>> ks = kernel_state(qs, "cpu")
    >>> KernelState.from_op_args(*ks.op_tensors(), *ks.op_scalars()).shape
    (8, 64)
    """

    code: torch.Tensor
    absmax: torch.Tensor
    code2: torch.Tensor
    absmax2: torch.Tensor
    offset: float
    blocksize: int
    blocksize2: int
    nested: bool
    qt: int
    quant_type: str
    shape: Tuple[int, ...]
    state_dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def op_tensors(self) -> tuple:
        return (self.absmax, self.code, self.code2, self.absmax2)

    def op_scalars(self) -> tuple:
        return (self.offset, self.blocksize, self.blocksize2, self.nested, self.qt, self.quant_type,
                self.shape[0], self.shape[1], self.state_dtype)

    @classmethod
    def from_op_args(cls, absmax, code, code2, absmax2, offset: float, blocksize: int, blocksize2: int,
                     nested: bool, qt: int, quant_type: str, N: int, K: int, state_dtype: torch.dtype):
        return cls(code=code, absmax=absmax, code2=code2, absmax2=absmax2, offset=float(offset),
                   blocksize=int(blocksize), blocksize2=int(blocksize2), nested=bool(nested), qt=int(qt),
                   quant_type=str(quant_type), shape=(int(N), int(K)), state_dtype=state_dtype)


_CACHE_ATTR = "_fastpeft_kstate"


def _state_tensors(quant_state: Any, device) -> tuple:
    """(code, absmax, code2, absmax2) on ``device`` in the kernels' layout; only tensor ops, so dynamo can
    trace them from the QuantState's attributes (see ``traced_kernel_state``)."""
    code = quant_state.code
    if code is None or code.numel() != 16:
        code = code_for(quant_state.quant_type)
    code = code.to(device=device, dtype=torch.float32).contiguous()
    st2 = getattr(quant_state, "state2", None)
    if st2 is not None:
        absmax = quant_state.absmax.reshape(-1).to(device).contiguous()
        code2 = st2.code.to(device=device, dtype=torch.float32).contiguous()
        absmax2 = st2.absmax.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    else:
        absmax = quant_state.absmax.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        code2, absmax2 = code, absmax
    return code, absmax, code2, absmax2


def kernel_state(quant_state: Any, device) -> KernelState:
    """The ``KernelState`` of a QuantState on ``device``, cached on the state (rebuilt when the device or the
    absmax tensor changes). Reads ``offset`` with one host sync the first time (a 0-dim tensor in bnb)."""
    device = torch.device(device)
    key = (str(device), id(quant_state.absmax))
    cached = getattr(quant_state, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    _check_quant_state(quant_state)
    code, absmax, code2, absmax2 = _state_tensors(quant_state, device)
    st2 = getattr(quant_state, "state2", None)
    offset = float(quant_state.offset) if st2 is not None and quant_state.offset is not None else 0.0
    ks = KernelState(code=code, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset,
                     blocksize=int(quant_state.blocksize), blocksize2=int(st2.blocksize) if st2 is not None else 1,
                     nested=st2 is not None, qt=quant_type_id(quant_state), quant_type=str(quant_state.quant_type),
                     shape=tuple(int(d) for d in quant_state.shape), state_dtype=getattr(quant_state, "dtype", None) or torch.float32)
    try:
        setattr(quant_state, _CACHE_ATTR, (key, ks))
    except AttributeError:  # a state type that refuses new attributes: no cache
        pass
    return ks


def cached_kernel_state(quant_state: Any) -> Optional[KernelState]:
    """The cached KernelState (any device) or None: plain attribute reads, safe while dynamo traces."""
    cached = getattr(quant_state, _CACHE_ATTR, None)
    return None if cached is None else cached[1]


def traced_kernel_state(quant_state: Any, device) -> KernelState:
    """For torch.compile: the tensors traced from the QuantState's attributes (dynamo lifts them as graph inputs
    and guards on them, so a graph always reads the state's current tensors), the numbers from the cached
    KernelState (dynamo reads them as constants: ``offset`` would need a ``.item()``, which breaks a graph).
    Raises if the cache is missing (fill it eagerly: ``kernel_state``)."""
    cached = cached_kernel_state(quant_state)
    if cached is None:
        raise RuntimeError("fastpeft: this 4-bit layer's kernel constants are not prepared (its QuantState was "
                           "replaced after the layer was built); run one eager forward or model.to(device) first")
    code, absmax, code2, absmax2 = _state_tensors(quant_state, device)
    return dataclasses.replace(cached, code=code, absmax=absmax, code2=code2, absmax2=absmax2)


def _check_quant_state(qs: Any) -> None:
    if getattr(qs, "shape", None) is None or getattr(qs, "blocksize", None) is None:
        raise ValueError("quant_state needs .shape and .blocksize")
    if getattr(qs, "quant_type", None) not in _CODES:
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {getattr(qs, 'quant_type', None)!r}")


# ----------------------------------------------------------------------------------------------------------
# Quantization helpers shared by ops/nf4_quantize.py (PyTorch)
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


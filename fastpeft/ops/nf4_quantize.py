"""Quantize a weight to bitsandbytes' 4-bit bytes (NF4 / FP4, optional double quant), in PyTorch on the weight's
device. The rules reproduced here (not bnb's code) are in ``fastpeft/ops/nf4_format.py``'s docstring.

The nested absmax rounding "bnb-cuda" needs bnb's approximate CUDA reciprocal, which one Triton kernel
reproduces (``ops/kernels/nf4_dequant.py: rcp_approx``); without Triton that rounding is unavailable and
"auto" on a CUDA tensor uses "nearest" with a warning (the 4-bit codes and absmax are unaffected; only the
8-bit nested absmax codes can differ from bnb's by one step).
"""
from __future__ import annotations

import warnings

import torch

from .. import settings
from . import HAS_TRITON
from .nf4_format import (
    _CODES,
    _NESTED_BLOCKSIZE,
    BLOCKSIZES,
    NF4QuantState,
    _bnb_cpu_table,
    _nearest_sorted,
    _scale_blocks,
    code_for,
    dynamic_code,
)

if HAS_TRITON:
    from .kernels.nf4_dequant import rcp_approx
else:  # no way to run bnb's approximate reciprocal
    rcp_approx = None

__all__ = ["quantize_nf4", "dquantize_bnb_cuda"]


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
        if rcp_approx is None:
            raise RuntimeError("nested_rounding='bnb-cuda' needs Triton (bnb's approximate CUDA reciprocal is "
                               "reproduced by a Triton kernel); use 'nearest' or install triton")
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
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weight must be fp32/fp16/bf16, got {weight.dtype}")
    if nested_rounding == "auto":
        if weight.device.type == "cpu":
            nested_rounding = "bnb-cpu"
        elif weight.is_cuda and torch.version.hip is None and not settings.get().triton_interpret:
            if rcp_approx is not None:
                nested_rounding = "bnb-cuda"
            else:
                warnings.warn("fastpeft.quantize_nf4: Triton is not installed, so bnb's CUDA rounding of the nested "
                              "absmax codes cannot be reproduced; using the exactly-nearest code (4-bit codes and "
                              "absmax unchanged; a nested code can differ from bitsandbytes' by one step)",
                              stacklevel=2)
                nested_rounding = "nearest"
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

"""Shared pieces of the Triton kernels: where they may run, small launch helpers, the in-kernel dropout mask.

The mask itself is defined in ``fastpeft/ops/dropout.py`` (PyTorch); ``keep_tile`` regenerates it inside
kernels bit for bit.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import settings

__all__ = ["interpreting", "triton_ok", "check_kernel_dtype", "keep_tile", "mask_fast", "next_pow2_16",
           "dot_ieee", "as_2d", "ceil_div", "num_sms"]

# Triton decides interpreter-or-compiler when a kernel is decorated (module import), so the answer is fixed for
# the process; settings read it once (no environment lookups on any launch: host time).
_INTERPRETING = settings.get().triton_interpret


def interpreting() -> bool:
    return _INTERPRETING


def triton_ok(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on t's device (CUDA, or any device under TRITON_INTERPRET=1)."""
    return t.is_cuda or _INTERPRETING


def check_kernel_dtype(dtype: torch.dtype, what: str) -> None:
    """Refuse bf16 in Triton's interpreter: its bf16 arithmetic (casts and tl.dot) is wrong and gave NaN
    outputs without a word. On a GPU (compiled kernels) bf16 is fine."""
    if _INTERPRETING and dtype == torch.bfloat16:
        raise ValueError(f"{what}: bfloat16 cannot run in Triton's interpreter (TRITON_INTERPRET=1): its bf16 "
                         "arithmetic is wrong. Use float16 / float32 there, the reference path "
                         "(FASTPEFT_BACKEND=reference), or a GPU")


def mask_fast(K: int) -> bool:
    """Whether keep_tile may take its vectorised path for rows of length K (one Philox call per 8 columns)."""
    return K % 8 == 0


def next_pow2_16(n: int) -> int:
    """Block size for a small dimension (the rank): a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(n)))


def dot_ieee(dtype: torch.dtype) -> bool:
    """fp32 dots run in full fp32 (no TF32) so the fp32 path matches the reference to ~1e-5."""
    return dtype == torch.float32


@triton.jit
def keep_tile(seed, rows, k0, K, thr, BM: tl.constexpr, BK: tl.constexpr, FAST4: tl.constexpr):
    """Keep mask [BM, BK] for rows (int64 [BM]) and columns k0 .. k0+BK of a row-major [*, K] view.

    FAST4 must be ``mask_fast(K)`` (K % 8 == 0; k0 a multiple of 8): one Philox call per 8 consecutive
    columns, its four words split into 16-bit halves and interleaved back. Otherwise: per element, counter
    i // 8, word (i % 8) // 2, half i % 2 (same values, 8x the integer work).
    Cost: 7 Philox rounds per 8 elements (integer multiplies) -- hidden under memory traffic in the
    memory-bound kernels that call it.
    """
    if FAST4:
        ctr = (rows[:, None] * K + k0) // 8 + tl.arange(0, BK // 8)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, ctr, 7)
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BM, BK // 2))
        lo = words & 0xFFFF
        hi = (words >> 16) & 0xFFFF
        bits = tl.reshape(tl.join(lo, hi), (BM, BK))
    else:
        flat = rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, flat // 8, 7)
        w = (flat % 8) // 2
        word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        bits = tl.where(flat % 2 == 0, word & 0xFFFF, (word >> 16) & 0xFFFF)
    return bits.to(tl.int32) >= thr


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] as a view when the strides allow it (no copy), else a contiguous copy (never saved)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device) -> int:
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

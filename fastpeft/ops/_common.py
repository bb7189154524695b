"""Shared pieces of the Triton ops: when to run Triton, the seeded dropout mask, small launch helpers.

Dropout mask definition (the one every kernel and `lora_dropout_mask` follow):
    element index i = flat row-major index over the 2-D [M, K] view of x
    bits(i)  = component i % 4 of Philox4x32-10(key = seed, counter = i // 4), i.e. exactly Triton's
               ``tl.randint4x(seed, i // 4)`` with an int64 counter (low 32 bits in c0, high in c1, c2 = c3 = 0)
    keep(i)  = (bits(i) >> 8) >= thr,   thr = ceil(p * 2**24)   (an exact integer test: keep-rate 1 - thr/2**24)
    D(i)     = keep(i) / (1 - p)
One Philox call serves four consecutive elements, so the kernels pay a quarter of the integer work per element.
The mask is never stored by the training path: each kernel that reads X or writes dX recomputes it.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ok(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on t's device (CUDA, or any device under TRITON_INTERPRET=1)."""
    return t.is_cuda or interpreting()


def dropout_threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return int(math.ceil(p * (1 << 24)))


def next_pow2_16(n: int) -> int:
    """Block size for a small dimension (the rank): a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(n)))


def dot_ieee(dtype: torch.dtype) -> bool:
    """fp32 dots run in full fp32 (no TF32) so the fp32 path matches the reference to ~1e-5."""
    return dtype == torch.float32


def _philox4x32_torch(seed: int, ctr: torch.Tensor):
    """Philox4x32-10 on int64 tensors, bit-identical to triton.language.randint4x(seed, ctr) for int64 ctr >= 0."""
    c0 = ctr & _M32
    c1 = (ctr >> 32) & _M32
    c2 = torch.zeros_like(ctr)
    c3 = torch.zeros_like(ctr)
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0 = _PHILOX_ROUND_B * c2  # < 2**64: wraps in int64, the bits are exact
        p1 = _PHILOX_ROUND_A * c0
        c0, c2 = ((p0 >> 32) & _M32) ^ c1 ^ k0, ((p1 >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = p0 & _M32, p1 & _M32
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_keep_torch(M: int, K: int, p: float, seed: int, device) -> torch.Tensor:
    """Boolean keep mask [M, K] computed in PyTorch (any device), identical to the kernels' mask."""
    thr = dropout_threshold(p)
    idx = torch.arange(M * K, device=device, dtype=torch.int64)
    r = _philox4x32_torch(seed, idx // 4)
    j = idx % 4
    bits = torch.where(j == 0, r[0], torch.where(j == 1, r[1], torch.where(j == 2, r[2], r[3])))
    return ((bits >> 8) >= thr).reshape(M, K)


@triton.jit
def keep_tile(seed, rows, k0, K, thr, BM: tl.constexpr, BK: tl.constexpr, FAST4: tl.constexpr):
    """Keep mask [BM, BK] for rows (int64 [BM]) and columns k0 .. k0+BK of a row-major [*, K] view.

    FAST4 (K % 4 == 0 and k0 % 4 == 0): one Philox call per 4 consecutive columns, interleaved back.
    Otherwise: per element, counter i // 4, component i % 4 (same values, 4x the integer work).
    Cost: ~10 Philox rounds per 4 elements (integer multiplies) -- hidden under memory traffic in the
    memory-bound kernels that call it.
    """
    if FAST4:
        ctr = (rows[:, None] * K + k0) // 4 + tl.arange(0, BK // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, ctr)
        bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BM, BK))
    else:
        flat = rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, flat // 4)
        j = flat % 4
        bits = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return (bits >> 8).to(tl.int32) >= thr


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] as a view when the strides allow it (no copy), else a contiguous copy (never saved)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


@functools.lru_cache(maxsize=64)
def keep_scale_rounded(p: float, dtype: torch.dtype) -> float:
    """1/(1-p) rounded to dtype, as the reference's mask.to(x.dtype) (cached: no per-call tensor work)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype).item())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

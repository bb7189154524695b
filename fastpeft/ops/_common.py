"""Shared pieces of the Triton ops: when to run Triton, the seeded dropout mask, small launch helpers.

Dropout mask definition (the one every kernel and `lora_dropout_mask` follow):
    element index i = flat row-major index over the 2-D [M, K] view of x
    words(c) = Philox4x32-7(key = seed, counter = c), i.e. Triton's ``tl.randint4x(seed, c, n_rounds=7)`` with an
               int64 counter (low 32 bits in c0, high in c1, c2 = c3 = 0)
    bits(i)  = 16-bit half (i % 2: 0 = low, 1 = high) of word (i % 8) // 2 of words(i // 8)
    keep(i)  = bits(i) >= thr,   thr = ceil(p * 2**16)   (an exact integer test: keep-rate 1 - thr/2**16,
               within 2**-16 of 1 - p; the kept values are scaled by exactly 1/(1-p), as torch's dropout)
    D(i)     = keep(i) / (1 - p)
Why 7 rounds and 16 bits: the mask is regenerated in three passes over X-sized data, and Philox-10 with one
24-bit draw per element cost up to 15% of a layer's fwd+bwd on H100 (benchmarks/NOTES.md). Philox4x32-7 is the
smallest round count its authors report as passing TestU01's BigCrush; 16-bit thresholds resolve p to 1.5e-5.
One Philox call now serves eight elements (was four): ~1/3 of the integer work per element.
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


# Triton decides interpreter-or-compiler when a kernel is decorated (module import), so the answer is fixed
# for the process from then on; reading it once also keeps os.environ out of every launch (host time).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def triton_ok(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on t's device (CUDA, or any device under TRITON_INTERPRET=1)."""
    return t.is_cuda or interpreting()


PHILOX_ROUNDS = 7
MASK_BITS = 16


def dropout_threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return int(math.ceil(p * (1 << MASK_BITS)))


def mask_fast(K: int) -> bool:
    """Whether keep_tile may take its vectorised path for rows of length K (one Philox call per 8 columns)."""
    return K % 8 == 0


def next_pow2_16(n: int) -> int:
    """Block size for a small dimension (the rank): a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(n)))


def dot_ieee(dtype: torch.dtype) -> bool:
    """fp32 dots run in full fp32 (no TF32) so the fp32 path matches the reference to ~1e-5."""
    return dtype == torch.float32


def _philox4x32_torch(seed: int, ctr: torch.Tensor, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-`rounds` on int64 tensors, bit-identical to tl.randint4x(seed, ctr, n_rounds) for int64 ctr >= 0."""
    c0 = ctr & _M32
    c1 = (ctr >> 32) & _M32
    c2 = torch.zeros_like(ctr)
    c3 = torch.zeros_like(ctr)
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
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
    r = _philox4x32_torch(seed, idx // 8)
    w = (idx % 8) // 2
    word = torch.where(w == 0, r[0], torch.where(w == 1, r[1], torch.where(w == 2, r[2], r[3])))
    bits = torch.where(idx % 2 == 0, word & 0xFFFF, (word >> 16) & 0xFFFF)
    return (bits >= thr).reshape(M, K)


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


@functools.lru_cache(maxsize=64)
def keep_scale_rounded(p: float, dtype: torch.dtype) -> float:
    """1/(1-p) rounded to dtype, as the reference's mask.to(x.dtype) (cached: no per-call tensor work)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype).item())


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

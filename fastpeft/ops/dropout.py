"""The LoRA dropout mask, defined once, in PyTorch (no Triton): the kernels regenerate exactly this mask.

Definition (every kernel and ``lora_dropout_mask`` follow it):
    element index i = flat row-major index over the 2-D [M, K] view of x
    words(c) = Philox4x32-7(key = seed, counter = c), i.e. Triton's ``tl.randint4x(seed, c, n_rounds=7)`` with an
               int64 counter (low 32 bits in c0, high in c1, c2 = c3 = 0)
    bits(i)  = 16-bit half (i % 2: 0 = low, 1 = high) of word (i % 8) // 2 of words(i // 8)
    keep(i)  = bits(i) >= thr,   thr = ceil(p * 2**16)   (an exact integer test: keep-rate 1 - thr/2**16,
               within 2**-16 of 1 - p; the kept values are scaled by exactly 1/(1-p), as torch's dropout)
    D(i)     = keep(i) / (1 - p)
Why 7 rounds and 16 bits: the mask is regenerated in three passes over X-sized data, and Philox-10 with one
24-bit draw per element cost up to 15% of a layer's fwd+bwd on H100 (docs/performance-log.md). Philox4x32-7 is
the smallest round count its authors report as passing TestU01's BigCrush; 16-bit thresholds resolve p to 1.5e-5.
One Philox call serves eight elements. The training path never stores the mask: each kernel that reads X or
writes dX recomputes it.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["PHILOX_ROUNDS", "MASK_BITS", "dropout_threshold", "keep_scale_rounded", "dropout_keep_torch",
           "lora_dropout_mask"]

PHILOX_ROUNDS = 7
MASK_BITS = 16

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def dropout_threshold(p: float) -> int:
    """The integer keep threshold on 16-bit draws for dropout probability p in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return int(math.ceil(p * (1 << MASK_BITS)))


@functools.lru_cache(maxsize=64)
def keep_scale_rounded(p: float, dtype: torch.dtype) -> float:
    """1/(1-p) rounded to dtype, as the reference's mask.to(x.dtype) (cached: no per-call tensor work)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype).item())


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


def lora_dropout_mask(shape, p: float, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """The exact dropout mask the kernels regenerate (0 or 1/(1-p)), materialised with x's shape.

    >>> m = lora_dropout_mask((2, 3, 8), 0.5, seed=1, device="cpu")
    >>> sorted(set(m.flatten().tolist())) == [0.0, 2.0]
    True
    """
    shape = tuple(shape)
    K = shape[-1]
    M = math.prod(shape[:-1])
    if p <= 0.0:
        return torch.ones(shape, device=device, dtype=dtype)
    keep = dropout_keep_torch(M, K, p, seed, device)
    return (keep.to(torch.float32) * (1.0 / (1.0 - p))).to(dtype).reshape(shape)

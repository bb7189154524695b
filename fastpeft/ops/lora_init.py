"""LoRA initialisations that read the frozen base weight: PiSSA, OLoRA, LoftQ -- the math, PyTorch only.

Each function takes the base weight as ``[out, in]`` fp32 and returns ``(lora_A [r, in], lora_B [out, r],
new_base [out, in])``, all fp32; the caller writes ``new_base`` back into the layer in the layer's dtype. The
formulas and their order of operations are PEFT's (``peft/tuners/lora/layer.py``: ``pissa_init``, ``olora_init``;
``peft/utils/loftq_utils.py``: ``loftq_init``), so the same weight (and, for the randomized SVD, the same torch
RNG state) gives the same adapter:

    PiSSA   W = V·S·Uᴴ (full SVD, or torch.svd_lowrank with ``niter`` iterations);  S_r' = S_r / scaling
            A = diag(√S_r')·Uᴴ_r,  B = V_r·diag(√S_r'),  base ← W − scaling·B·A   (the principal part moves to
            the adapter, the residual stays frozen)
    OLoRA   W = Q·R (QR);  A = R_r (first r rows),  B = Q_r (first r columns),  base ← W − scaling·B·A
    LoftQ   for num_iter rounds: Q = dequant(nf4(W − B·A)) (B·A = 0 at first), B·A = best rank-r fit of W − Q
            (SVD: B = U_r·√S_r, A = √S_r·Vᴴ_r);  base ← Q.  The adapter is *not* scaled: PEFT's LoftQ ignores
            lora_alpha here, so W ≈ Q + B·A only when scaling = 1.

Cost: one SVD / QR of an [out, in] matrix per layer (O(out·in·min(out, in)) FLOPs; the randomized SVD
O(out·in·r·niter)), in fp32 on the weight's device. These run once, when the adapter is created.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .nf4_format import nf4_dequantize_reference
from .nf4_quantize import quantize_nf4

__all__ = ["pissa_factors", "olora_factors", "loftq_factors", "LOFTQ_BITS"]

Factors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# LoftQ quantization fastpeft reproduces: bitsandbytes' NF4 with blocksize 64, no double quantization (what
# PEFT's loftq_init asks bnb for). PEFT's 8-bit variant (bnb Int8Params) is not implemented.
LOFTQ_BITS = (4,)


def _check_rank(weight: torch.Tensor, r: int, method: str) -> None:
    if r > min(weight.shape):
        raise ValueError(
            f"init_lora_weights={method!r} needs r <= min(out_features, in_features) = {min(weight.shape)} "
            f"for a weight of shape {tuple(weight.shape)}, got r={r}"
        )


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None) -> Factors:
    """PiSSA: the top-r singular triplets of ``weight`` [out, in] (fp32) become the adapter, the rest the base.
    ``niter`` None: exact SVD (torch.linalg.svd); an int: torch.svd_lowrank(q=r, niter=niter), which draws from
    torch's global RNG."""
    _check_rank(weight, r, "pissa" if niter is None else f"pissa_niter_{niter}")
    if niter is None:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        v_r, s_r, uh_r = v[:, :r], s[:r], uh[:r]
    else:
        v_r, s_r, u_r = torch.svd_lowrank(weight, r, niter=niter)
        uh_r = u_r.t()
    s_r = s_r / scaling
    lora_A = torch.diag(torch.sqrt(s_r)) @ uh_r
    lora_B = v_r @ torch.diag(torch.sqrt(s_r))
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int, scaling: float) -> Factors:
    """OLoRA: the first r columns of Q and rows of R of ``weight`` = Q·R ([out, in], fp32)."""
    _check_rank(weight, r, "olora")
    q, rmat = torch.linalg.qr(weight)
    lora_A, lora_B = rmat[:r].contiguous(), q[:, :r].contiguous()
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(weight)) in bitsandbytes' NF4 (blocksize 64, no double quant), fp32, bit-exact with
    bnb's ``Params4bit(..., compress_statistics=False, quant_type="nf4")`` + ``dequantize_4bit``."""
    packed, state = quantize_nf4(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    return nf4_dequantize_reference(packed, state, out_dtype=torch.float32).reshape(weight.shape)


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, r: int, num_bits: int = 4, num_iter: int = 1) -> Factors:
    """LoftQ: alternate NF4 quantization of ``weight`` [out, in] (fp32) and a rank-r SVD fit of what it lost;
    returns the adapter and the dequantized NF4 base (quantizing that base to NF4 again gives the same codes)."""
    if num_bits not in LOFTQ_BITS:
        raise ValueError(f"fastpeft implements LoftQ with loftq_bits in {LOFTQ_BITS} (bitsandbytes NF4), got "
                         f"{num_bits}; PEFT's 8-bit LoftQ is not supported")
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter <= 0:
        raise ValueError(f"loftq_iter must be a positive integer, got {num_iter!r}")
    _check_rank(weight, r, "loftq")
    residual = weight.clone()
    for i in range(num_iter):
        quantized = nf4_round_trip(residual)
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = torch.sqrt(torch.diag(s))
        lora_B = u @ root[:, :r]
        lora_A = root[:r, :] @ vh
        if i + 1 < num_iter:
            residual = weight - lora_B @ lora_A
    return lora_A, lora_B, quantized

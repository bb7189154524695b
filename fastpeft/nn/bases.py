"""The frozen base layers the drop-ins wrap, and how to read them.

  * ``torch.nn.Linear``                  weight [out, in]
  * ``transformers.pytorch_utils.Conv1D`` weight [in, out] (GPT-2; PEFT's fan_in_fan_out)
  * ``bitsandbytes.nn.Linear4bit``        packed NF4/FP4 weight + QuantState (and fastpeft's bnb-free ``NF4Linear``)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import HAS_TRITON
from ..ops.nf4_format import cached_kernel_state, kernel_state, nf4_dequantize_reference

if HAS_TRITON:
    from ..ops.kernels.nf4_dequant import nf4_dequantize_triton

SUPPORTED_BASE_TYPES = "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit"


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes ``Linear4bit`` (NF4 / FP4) or fastpeft's bnb-free ``NF4Linear`` (fastpeft.quantize)."""
    if getattr(module, "is_fastpeft_nf4", False):
        return True
    # FSDP2 replaces the Params4bit by a plain / DTensor parameter without .quant_state: then the state sits on the
    # layer (bnb's recovery slot, filled by fastpeft.distributed.prepare_fsdp2 and transformers' 4-bit loader)
    return type(module).__name__ == "Linear4bit" and (
        hasattr(getattr(module, "weight", None), "quant_state") or getattr(module, "quant_state", None) is not None
    )


def supported_base(module: nn.Module) -> bool:
    """A linear-type base every adapter method wraps (embeddings: ``is_embedding``, LoRA only)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module)


def is_embedding(module: nn.Module) -> bool:
    """``nn.Embedding`` (and subclasses such as scaled word embeddings): LoRA's ``LoraEmbedding`` wraps it."""
    return isinstance(module, nn.Embedding)


def quant_state_of(module: nn.Module):
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def nf4_parts(module: nn.Module):
    """(packed bytes, QuantState) of a 4-bit base in bnb's standard layout, or None when bnb has repacked the
    weight in place for its CPU inference kernel (only the reference path reads that layout)."""
    qs = quant_state_of(module)
    if qs is None:
        raise ValueError(f"{type(module).__name__} has no quant_state: the weight was never quantized "
                         "(move the model to a device, or load it with BitsAndBytesConfig)")
    if getattr(qs, "packing_format_for_cpu", False):
        return None
    return module.weight.data, qs


def warm_nf4_state(module: nn.Module) -> None:
    """Fill the kernel-side cache of a quantized 4-bit base's QuantState (``ops/nf4_format.py: kernel_state``)
    now, in eager code: under torch.compile the NF4 custom ops read its numbers as constants. A no-op for other
    bases and for a 4-bit layer whose weight is not quantized yet or is on the meta device."""
    if not is_linear4bit(module):
        return
    state = quant_state_of(module)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return
    weight = getattr(module, "weight", None)
    if weight is not None and weight.device.type != "meta":
        kernel_state(state, weight.device)


def nf4_constants_ready(module: nn.Module) -> bool:
    """Whether warm_nf4_state's cache is on the base's QuantState (plain attribute reads: safe while dynamo
    traces)."""
    state = quant_state_of(module)
    return state is not None and cached_kernel_state(state) is not None


def base_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    if is_embedding(module):  # PEFT's naming for embeddings: in = vocabulary rows, out = embedding width
        return int(module.num_embeddings), int(module.embedding_dim)
    return int(module.in_features), int(module.out_features)


def dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a 4-bit base in the state's dtype, dequantized by fastpeft (bit-exact with
    bitsandbytes' ``dequantize_4bit``; Triton on CUDA when installed, PyTorch elsewhere; bnb not needed)."""
    parts = nf4_parts(module)
    if parts is None:
        return _dequantize_cpu_packed(module.weight.data, quant_state_of(module))
    packed, state = parts
    if packed.is_cuda and HAS_TRITON:
        return nf4_dequantize_triton(packed, state)
    return nf4_dequantize_reference(packed, state)


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize a weight that bnb repacked in place for its CPU inference kernel.

    bnb 0.50's ``Linear4bit.forward`` on an AVX512-BF16 CPU, in eval mode without grad, rewrites the weight
    once: nibbles regrouped in tiles of 32 output rows (low nibbles = first 32 of each 64-entry group) and
    absmax stored as bf16 [in/blocksize, out], double quant folded in. ``dequantize_4bit`` no longer reads
    that layout correctly (it returns garbage silently), so unpack it here without touching the module.
    """
    n, k = state.shape
    groups = packed.view(torch.uint8).reshape(-1, 32)
    idx = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # [N/32 * K/2, 64]
    idx = idx.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    absmax = state.absmax.float().t().repeat_interleave(state.blocksize, dim=1)  # [N, K]
    weight = state.code.to(device=absmax.device, dtype=torch.float32)[idx.long()] * absmax
    return weight.to(getattr(state, "original_dtype", torch.float32))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as [out, in] (a view for Linear / Conv1D; dequantized for Linear4bit)."""
    if is_conv1d(module):
        return module.weight.t()
    if is_linear4bit(module):
        return dequantize_linear4bit(module)
    return module.weight


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    cd = getattr(module, "compute_dtype", None) if is_linear4bit(module) else None
    return cd if cd is not None else x.dtype


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Frozen base output. Linear4bit: dequantize (to the state's dtype, then the compute dtype, as bnb), then
    matmul in the layer's compute dtype (reference path)."""
    if is_linear4bit(module):
        cd = compute_dtype(module, x)
        w = dequantize_linear4bit(module).to(cd)
        b = None if module.bias is None else module.bias.to(cd)
        return F.linear(x.to(cd), w, b).to(x.dtype)
    return module(x)


def base_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)

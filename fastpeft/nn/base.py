"""What every drop-in shares: the backend choice and access to the frozen base weight.

Base layers we wrap:
  * ``torch.nn.Linear``                  weight [out, in]
  * ``transformers.pytorch_utils.Conv1D`` weight [in, out] (GPT-2; PEFT's fan_in_fan_out)
  * ``bitsandbytes.nn.Linear4bit``        packed NF4/FP4 weight + QuantState
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("reference", "triton", "auto")
_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def resolve_backend() -> str:
    """Read FASTPEFT_BACKEND once (per drop-in): reference | triton | auto (default)."""
    value = os.environ.get("FASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND={value!r} is not valid; use one of {', '.join(BACKENDS)}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def wants_triton(backend: str, x: torch.Tensor) -> bool:
    """auto: Triton kernels on CUDA tensors when Triton is installed; reference everywhere else."""
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and triton_available()


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module)


SUPPORTED_BASE_TYPES = "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit"


def base_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return int(module.in_features), int(module.out_features)


def dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes Linear4bit, dequantized (reference path)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


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
    """Frozen base output. Linear4bit: dequantize, then matmul in the layer's compute dtype (reference path)."""
    if is_linear4bit(module):
        cd = compute_dtype(module, x)
        w = dequantize_linear4bit(module).to(cd)
        b = None if module.bias is None else module.bias.to(cd)
        return F.linear(x.to(cd), w, b).to(x.dtype)
    return module(x)


def base_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)

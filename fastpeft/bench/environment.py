"""The machine a benchmark runs on: library versions and git commit, the device's name, slug and memory, the
measured bf16 GEMM rate (the MFU denominator), and the device synchronisation / memory-freeing helpers the
timing loops share.
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
from typing import Dict, Optional

import torch

from .. import __version__ as _fastpeft_version

# the repository root when fastpeft runs from a checkout (fastpeft/bench/environment.py -> three levels up)
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


def have(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "fastpeft"):
        out[dist] = _version(dist)
    if out["fastpeft"] is None:
        out["fastpeft"] = _fastpeft_version
    out["fastpeft_git"] = _git_commit()
    return out


def _git_commit() -> Optional[str]:
    try:
        res = subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return res.stdout.strip() or None
    except Exception:
        return None


def device_name(device: str) -> str:
    """The GPU's name; on CPU the processor and the torch threads in use now (a CPU run sets one) out of the
    machine's logical CPUs."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return (f"CPU ({platform.processor() or platform.machine()}, {n} torch thread{'' if n == 1 else 's'} "
            f"of {os.cpu_count()} logical CPUs)")


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; other GPUs: lower-case alphanumerics; 'cpu' without a GPU."""
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def gpu_memory_bytes(device: str) -> Optional[int]:
    return torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None


def gemm_tflops(device: str) -> Optional[float]:
    """Measured bf16 GEMM rate (8192³, median of triton.testing.do_bench): the MFU denominator."""
    if device != "cuda":
        return None
    import triton

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / ms / 1e9


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()

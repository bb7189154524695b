"""Building fastpeft's C++ / CUDA extensions (``csrc/``): one home for the toolchain checks, the on-disk cache and
the build-error messages. PyTorch only (no Triton).

Extensions are built on first use with ninja through ``torch.utils.cpp_extension.load`` and cached under
``settings.csrc_cache`` (``FASTPEFT_CSRC_CACHE``; default ``~/.cache/fastpeft/csrc``), one folder per torch
version, CUDA version and source hash. ``FASTPEFT_CSRC=0`` turns them all off (the Triton / PyTorch paths run).

    Extension("fastpeft_ops", cpu_sources=[...], cuda_sources=[...]).load()
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from typing import List, Optional, Sequence

import torch

from .. import settings

__all__ = ["Extension", "CSRC_DIR"]

# the repository's csrc/ (fastpeft/ops/ -> two levels up)
CSRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


class Extension:
    """One extension: its sources (C++ always, CUDA when ``with_cuda``) and its build state in this process.

    ``python_module``: the sources define a PYBIND11 module (``load`` returns it); otherwise they only register
    ``TORCH_LIBRARY`` operators (``load`` returns None once ``torch.ops.<namespace>`` holds them).
    """

    def __init__(self, name: str, what: str, cpu_sources: Sequence[str] = (), cuda_sources: Sequence[str] = (),
                 headers: Sequence[str] = (), python_module: bool = False, cuda_required: bool = False):
        self.name, self.what = name, what
        self.cpu_sources, self.cuda_sources, self.headers = list(cpu_sources), list(cuda_sources), list(headers)
        self.python_module, self.cuda_required = python_module, cuda_required
        self._module = None
        self._loaded = False
        self._error: Optional[BaseException] = None

    # -- what can be built here ----------------------------------------------------------------------------
    def with_cuda(self) -> bool:
        return bool(self.cuda_sources) and torch.cuda.is_available() and torch.version.cuda is not None

    def _paths(self, names) -> List[str]:
        return [os.path.join(CSRC_DIR, n) for n in names]

    def sources(self) -> List[str]:
        return self._paths(self.cpu_sources + (self.cuda_sources if self.with_cuda() else []))

    def toolchain_problem(self) -> Optional[str]:
        """None when this extension can be built here, else a sentence naming what is missing."""
        if not settings.get().csrc:
            return "FASTPEFT_CSRC=0 turns the C++ / CUDA extensions off"
        if self.cuda_required and not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if self.cuda_required and torch.version.cuda is None:
            return "this torch build has no CUDA support"
        missing = [p for p in self._paths(self.cpu_sources + self.cuda_sources + self.headers) if not os.path.exists(p)]
        if missing:
            return f"sources not found: {missing} (install fastpeft from a source checkout)"
        from torch.utils import cpp_extension  # imports setuptools (~0.3 s): only once an extension is wanted

        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return "no C++ compiler (c++ / g++) on PATH"
        if self.with_cuda():
            cuda_home = cpp_extension.CUDA_HOME
            nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
            if not nvcc or not os.path.exists(nvcc):
                return (f"nvcc not found (CUDA_HOME={cuda_home!r}): install the CUDA toolkit matching torch's CUDA "
                        f"{torch.version.cuda} and set CUDA_HOME")
        return None

    def build_dir(self) -> str:
        h = hashlib.sha256()
        for p in self.sources() + self._paths(self.headers):
            with open(p, "rb") as f:
                h.update(f.read())
        cuda = f"cu{torch.version.cuda}" if self.with_cuda() else "cpu"
        tag = f"{self.name}-torch{torch.__version__}-{cuda}-{h.hexdigest()[:12]}".replace("+", "_")
        path = os.path.join(settings.get().csrc_cache, tag)
        os.makedirs(path, exist_ok=True)
        return path

    # -- build + load -----------------------------------------------------------------------------------------
    def load(self, verbose: bool = False):
        """Build (first call; cached on disk) and load. Raises RuntimeError naming the missing piece or carrying
        the compiler's error; a failed build is not retried in this process."""
        if self._loaded:
            return self._module
        if self._error is not None:
            raise self._error
        problem = self.toolchain_problem()
        if problem is not None:
            self._error = RuntimeError(f"fastpeft csrc ({self.what}) cannot be built: {problem}. fastpeft uses its "
                                       "Triton / PyTorch paths instead (FASTPEFT_CSRC=0 skips the attempt)")
            raise self._error
        from torch.utils import cpp_extension  # see toolchain_problem

        build = self.build_dir()
        flags = ["-O3"]
        cuda = self.with_cuda()
        try:
            module = cpp_extension.load(
                name=self.name + "_" + os.path.basename(build).rsplit("-", 1)[-1], sources=self.sources(),
                build_directory=build, extra_cflags=flags + (["-DWITH_CUDA"] if cuda else []),
                extra_cuda_cflags=flags + ["-lineinfo"], extra_include_paths=[CSRC_DIR], with_cuda=cuda,
                is_python_module=self.python_module, verbose=verbose)
        except Exception as exc:  # compiler / linker errors: keep the useful part, say where the build lives
            self._error = RuntimeError(f"fastpeft csrc ({self.what}) failed to build in {build}; fastpeft uses its "
                                       f"Triton / PyTorch paths instead:\n{compiler_message(exc)}")
            raise self._error from exc
        self._module = module if self.python_module else None
        self._loaded = True
        return self._module

    def available(self) -> bool:
        """Whether the extension is (or can be made) loaded: tries once, warns once on failure."""
        if self._loaded:
            return True
        if self._error is not None:
            return False
        try:
            self.load()
        except RuntimeError as exc:
            if settings.get().csrc:
                warnings.warn(str(exc), stacklevel=3)
            return False
        return True


def compiler_message(exc: BaseException, tail_chars: int = 6000) -> str:
    """The build error for a human: lines that say "error" first, then the END of the compiler output (nvcc /
    ninja print the failing command first and the diagnostic last, so a head-truncated message loses it)."""
    parts = []
    e: Optional[BaseException] = exc
    while e is not None and len(parts) < 4:  # torch wraps ninja's CalledProcessError (which holds the output)
        out = getattr(e, "output", None) or getattr(e, "stdout", None)
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        parts.append(str(out) if out else str(e))
        e = e.__cause__ or e.__context__
    text = max(parts, key=len) if parts else str(exc)
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    errors = [ln.strip() for ln in text.splitlines()
              if "error" in ln.lower() and not ln.lstrip().startswith(("/", "File ", "Traceback"))][:12]
    tail = text if len(text) <= tail_chars else f"[... {len(text) - tail_chars} chars cut ...]\n{text[-tail_chars:]}"
    head = f"{first}\n" + ("error lines:\n  " + "\n  ".join(errors) + "\n" if errors else "")
    return f"{head}--- end of the compiler output ---\n{tail}"

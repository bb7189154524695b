"""fastpeft's switches: read from the environment once, when fastpeft is imported, and validated there.

| variable | values | default | what it changes |
| --- | --- | --- | --- |
| ``FASTPEFT_BACKEND`` | ``auto`` · ``cpp`` · ``triton`` · ``reference`` | ``auto`` | ``auto``: on CUDA tensors the C++ operators (``csrc/``, built on first use) or, where they cannot be built, the Triton kernels; the pure-PyTorch reference on other devices. ``cpp``: the C++ operators on any device (their CPU build is what CI tests). ``triton``: the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1`` (bf16 there falls back to the reference with a warning: the interpreter's bf16 arithmetic is wrong). ``reference``: never the kernels. 4-bit bases: LoRA (any dropout) and DoRA without dropout take the C++ 4-bit operators under ``cpp`` (any device, any size) and under ``auto`` on CUDA at training sizes; everything else on a 4-bit base runs the Triton QLoRA kernels (table below). Each adapter layer takes the value current when it is built. |
| ``FASTPEFT_NF4_GEMM`` | ``auto`` · ``fused`` · ``buffer`` | ``auto`` | 4-bit bases: in-kernel-dequant GEMM (``fused``), dequantize into a shared buffer + cuBLAS (``buffer``), or by M and weight size (``auto``; ``docs/qlora.md``). ``buffer`` also turns off the decode GEMV. |
| ``FASTPEFT_NF4_FUSED_MAX_M`` | an integer ≥ 0 | unset | overrides the largest M that ``auto`` sends to the fused GEMM (unset: the measured table in ``ops/kernels/nf4_lora.py``). |
| ``FASTPEFT_GROUP_PROJECTIONS`` | ``1`` · ``0`` | ``1`` | ``1``: ``patch`` links sibling LoRA layers that read the same input (q/k/v, gate/up; ``nn/projection_groups.py``) so that, once a forward has shown them called with one tensor, the first call computes all of them in one C++ operator (eager, training sizes; LoRA and QLoRA, DoRA and QDoRA in training; same numbers up to the order of additions). ``0``: every layer on its own. Taken when ``patch`` runs. |
| ``FASTPEFT_CSRC`` | ``1`` · ``0`` | ``1`` | ``0``: never build or use the C++ / CUDA extensions (``csrc/``); the Triton paths run instead (``FASTPEFT_BACKEND=cpp`` then raises). |
| ``FASTPEFT_CSRC_CACHE`` | a directory | ``~/.cache/fastpeft/csrc`` | where the C++ / CUDA extensions are built and cached. |

``TRITON_INTERPRET`` is Triton's own variable (``1``: kernels run in Triton's interpreter, also on CPU
tensors); it is read here too, once, because Triton itself decides when the kernels are defined.

A value outside the allowed ones raises a ``ValueError`` at ``import fastpeft`` naming the variable and the
allowed values. Changing ``os.environ`` after the import changes nothing; in a running process use
``override`` (tests, benchmarks) or ``reload``.

>>> from fastpeft import settings
>>> settings.get().backend in ("auto", "triton", "reference")
True
>>> with settings.override(nf4_gemm="buffer"):
...     settings.get().nf4_gemm
'buffer'
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Mapping, Optional

__all__ = ["Settings", "get", "override", "reload", "from_environ"]

BACKENDS = ("auto", "cpp", "triton", "reference")
NF4_GEMMS = ("auto", "fused", "buffer")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated switches (see the module docstring for the table)."""

    backend: str = "auto"
    nf4_gemm: str = "auto"
    nf4_fused_max_m: Optional[int] = None
    csrc: bool = True
    group_projections: bool = True
    csrc_cache: str = os.path.join(os.path.expanduser("~"), ".cache", "fastpeft", "csrc")
    triton_interpret: bool = False

    def __post_init__(self) -> None:
        _check_choice("backend", "FASTPEFT_BACKEND", self.backend, BACKENDS)
        _check_choice("nf4_gemm", "FASTPEFT_NF4_GEMM", self.nf4_gemm, NF4_GEMMS)
        m = self.nf4_fused_max_m
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise ValueError(f"FASTPEFT_NF4_FUSED_MAX_M / nf4_fused_max_m must be an integer >= 0 or unset, got {m!r}")
        if not isinstance(self.group_projections, bool):
            raise ValueError("FASTPEFT_GROUP_PROJECTIONS / group_projections must be 1 or 0 (True / False), got "
                             f"{self.group_projections!r}")
        if not isinstance(self.csrc, bool):
            raise ValueError(f"FASTPEFT_CSRC / csrc must be 1 or 0 (True / False), got {self.csrc!r}")
        if not isinstance(self.csrc_cache, str) or not self.csrc_cache:
            raise ValueError(f"FASTPEFT_CSRC_CACHE / csrc_cache must be a directory path, got {self.csrc_cache!r}")


def _check_choice(field: str, variable: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{variable}={value!r} (settings.{field}) is not valid; use one of {', '.join(allowed)}")


def _flag(variable: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(f"{variable}={raw!r} is not valid; use 1 or 0")
    return raw == "1"


def from_environ(environ: Mapping[str, str]) -> Settings:
    """Settings from an environment mapping (validated; an unset or empty variable takes its default)."""
    defaults = Settings()

    def raw(name: str) -> Optional[str]:
        value = environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    max_m = raw("FASTPEFT_NF4_FUSED_MAX_M")
    if max_m is not None:
        try:
            max_m_value: Optional[int] = int(max_m)
        except ValueError:
            raise ValueError(f"FASTPEFT_NF4_FUSED_MAX_M={max_m!r} is not valid; use an integer >= 0") from None
    else:
        max_m_value = None
    csrc = raw("FASTPEFT_CSRC")
    group = raw("FASTPEFT_GROUP_PROJECTIONS")
    interp = raw("TRITON_INTERPRET")
    return Settings(
        backend=(raw("FASTPEFT_BACKEND") or defaults.backend).lower(),
        nf4_gemm=(raw("FASTPEFT_NF4_GEMM") or defaults.nf4_gemm).lower(),
        nf4_fused_max_m=max_m_value,
        csrc=defaults.csrc if csrc is None else _flag("FASTPEFT_CSRC", csrc),
        group_projections=(defaults.group_projections if group is None
                           else _flag("FASTPEFT_GROUP_PROJECTIONS", group)),
        csrc_cache=raw("FASTPEFT_CSRC_CACHE") or defaults.csrc_cache,
        triton_interpret=interp == "1",
    )


_current: Settings = from_environ(os.environ)


def get() -> Settings:
    """The settings in force (a frozen dataclass: read fields, do not assign them)."""
    return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Temporarily change settings in this process (validated like the environment), e.g. in tests:
    ``with settings.override(backend="reference"): layer = fastpeft.LoraLinear(...)``.

    ``triton_interpret`` cannot change: Triton fixed it when the kernels were defined."""
    global _current
    if "triton_interpret" in changes and changes["triton_interpret"] != _current.triton_interpret:
        raise ValueError("triton_interpret cannot change after import: Triton decided it when the kernels were "
                         "defined; set TRITON_INTERPRET before the first import of fastpeft")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise TypeError(f"unknown settings {unknown}; known: {[f.name for f in dataclasses.fields(Settings)]}")
    before = _current
    _current = dataclasses.replace(before, **changes)
    try:
        yield _current
    finally:
        _current = before


def reload(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Re-read the environment (``os.environ`` by default), for a process that sets the variables after
    importing fastpeft. ``TRITON_INTERPRET`` keeps the value Triton already used."""
    global _current
    fresh = from_environ(os.environ if environ is None else environ)
    _current = dataclasses.replace(fresh, triton_interpret=_current.triton_interpret)
    return _current

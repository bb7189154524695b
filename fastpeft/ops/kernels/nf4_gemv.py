"""Decode path (M <= 16 tokens, no autograd): NF4 / FP4 GEMV fused with the LoRA shrink / expand.

    y = x·dequant(W)ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ        x [M, K] with M <= 16

Two implementations, same contract:
  * CUDA C++ (``csrc/nf4_gemv.cu``), built on first use with ninja through ``torch.utils.cpp_extension.load``
    and cached under ``~/.cache/fastpeft/csrc/`` (``FASTPEFT_CSRC_CACHE`` overrides). Needs nvcc (CUDA
    toolkit; ``CUDA_HOME``) and ninja; ``load_extension()`` raises a RuntimeError that names what is missing.
    Bound: the weight stream, N·K/2 bytes + absmax (target >= 70% of HBM bandwidth at M=1). The M <= 16 rows
    fill one tensor-core tile (mma m16n8k16), so M = 1 and M = 16 cost about the same. fp16 / bf16 x only.
  * Triton fallback: ``kernels/lora.py``'s shrink / expand kernels + the in-kernel-dequant GEMM of
    ``kernels/nf4_matmul.py`` (used when the extension cannot be built, for shapes it does not take, or with
    ``FASTPEFT_CSRC=0``).
``nf4_lora_gemv`` picks one; the first failure to build warns once and the Triton path is used from then on.
Building: ``ops/csrc.py``.
"""
from __future__ import annotations

import warnings

import torch

from ... import settings
from ..csrc import Extension
from ..nf4_format import KernelState
from .lora import lora_expand, lora_s_partials
from .nf4_matmul import nf4_matmul

MAX_M = 16
EXTENSION = Extension("fastpeft_nf4_gemv", "NF4 decode GEMV", cuda_sources=["nf4_gemv.cu"], headers=["device_ptx.cuh"],
                      python_module=True, cuda_required=True)


def toolchain_problem():
    """None when the CUDA decode extension can be built here, else a sentence naming what is missing."""
    return EXTENSION.toolchain_problem()


def load_extension(verbose: bool = False):
    """Build (first call; cached on disk) and import the CUDA decode extension. Raises RuntimeError naming
    the missing piece (device, nvcc, ninja) or carrying the compiler's error."""
    return EXTENSION.load(verbose)


def set_kernel_variant(variant: int) -> int:
    """Which form of the CUDA GEMV kernel later calls launch: 2 (the default) the weights as the mma's 16-row side
    and x as its 8-token side, with lean code-table addressing (4.8 SASS instructions per weight in its main loop,
    80 registers at M <= 8); 3 the same with a table of code pairs, one shared-memory read per packed byte and
    its address in one instruction (~3.3 per weight; 2's bits by construction; a 64 KB table per block); 0 the
    original form (x as the 16-row side; 7.6 instructions per weight); 1 the original with the lean addressing
    (6.1; the original's bits by construction). Forms 0 and 2 compute the same products; the tensor core sums each
    16 of them in another arrangement, so their last bits may differ (both are held to the same bounds against fp32
    math). ``csrc/nf4_gemv.cu``, LEAN, SWAP and PAIR. Returns the previous value: the A/B switch of benchmarks and
    tests. Builds the extension if needed."""
    # checked here, not only in C++: the lent H200's builds crash formatting an int into an error message
    if variant not in (0, 1, 2, 3) or isinstance(variant, bool):
        raise ValueError("set_kernel_variant takes 0 (original), 1 (lean), 2 (lean, operands swapped; the default) "
                         f"or 3 (2 with a code-pair table), got {variant!r}")
    return int(load_extension().set_kernel_variant(int(variant)))


MAX_K_SPLIT = 8


def set_k_split(k_split: int) -> int:
    """Over how many blocks the CUDA GEMV splits each 16-row tile's K (a thread-block cluster; sm_90+, always 1 on
    older GPUs): 0 (the default) chooses per call: 2 where the grid of N/16 tiles leaves more than half the SMs
    idle, as a K/V projection of 1,024 features does on an H200, else 1 (``csrc/nf4_gemv.cu``, ``k_split_auto``);
    1 never splits; 2..8 fixes it. On an H200 a split was slower for every Llama-8B projection but K/V, where the
    per-call rule's 2 took 6.9 -> 5.8 µs at M = 1 (9.2 -> 8.1 with LoRA). A split changes the fp32 summation order
    of the base product, so its last bits, not its bounds; every split is deterministic. Returns the previous
    value. Builds the extension if needed."""
    if not isinstance(k_split, int) or isinstance(k_split, bool) or not 0 <= k_split <= MAX_K_SPLIT:
        raise ValueError(f"set_k_split takes 0 (chosen per call) or 1..{MAX_K_SPLIT}, got {k_split!r}")
    return int(load_extension().set_k_split(int(k_split)))


def k_split_for(N: int, K: int) -> int:
    """The K split a CUDA GEMV call with N output features and K input features would take now on the current CUDA
    device (``set_k_split`` and the device decide it)."""
    if not (N >= 1 and K >= 32):
        raise ValueError(f"k_split_for takes N >= 1 and K >= 32; got N={N}, K={K}")
    return int(load_extension().k_split_for(int(N), int(K)))


def _cuda_ok(x2, ks: KernelState) -> bool:
    """Shapes / dtypes the CUDA kernel takes (the rest go to Triton): 16-bit x [M <= 16, K % 16 == 0] with unit
    column stride, power-of-two blocksize >= 32 (every bnb blocksize is one), K % 128 == 0."""
    bs = ks.blocksize
    # K % 128 == 0 (whole 128-weight segments; every Llama / Mistral / Qwen2 / Gemma / Phi-3 width): the kernel's
    # partial-last-segment path (K % 128 in 32..96) is fixed but has not run on a GPU yet, so it is not dispatched
    return (x2.is_cuda and x2.shape[0] <= MAX_M and x2.shape[1] % 128 == 0 and bs >= 32 and bs & (bs - 1) == 0
            and x2.stride(1) == 1 and x2.dtype in (torch.float16, torch.bfloat16))


def nf4_lora_gemv_cuda(x2, packed, ks: KernelState, bias, lora_A, lora_B, scaling: float, overlap: bool = True):
    """The CUDA kernel (raises if the extension cannot be built or the shape is not supported). ``overlap``: with
    LoRA, the GEMV is launched as a programmatic dependent of the shrink (sm_90+), so that its weight stream runs
    beside the shrink and only its epilogue waits for it; False launches them one after the other (a benchmark's
    A/B; the result is the same bits)."""
    ext = load_extension()
    if not _cuda_ok(x2, ks):
        raise ValueError("nf4_lora_gemv_cuda takes CUDA float16 / bfloat16 x [M <= 16, K % 128 == 0] with unit "
                         "column stride and a power-of-two blocksize")
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # the kernel reads x rows with 16-byte loads
        x2 = x2.clone(memory_format=torch.contiguous_format)
    b = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if b.data_ptr() % 16:  # 16-byte loads of the packed weight (bnb / torch allocations always satisfy this)
        b = b.clone()
    N = ks.shape[0]
    A = None if lora_A is None else lora_A.float().contiguous()
    Bm = None if lora_B is None else lora_B.float().contiguous()
    bias = None if bias is None else bias.to(x2.dtype).contiguous()
    return ext.nf4_gemv_lora(x2, b, ks.absmax, ks.code, ks.code2, ks.absmax2, ks.offset,
                             ks.nested, ks.blocksize, ks.blocksize2, N, bias, A, Bm, float(scaling), bool(overlap))


def nf4_lora_gemv_triton(x2, packed, ks: KernelState, bias, lora_A, lora_B, scaling: float):
    """Triton path: Z = s·(x·Aᵀ)·Bᵀ + bias (kernels/lora.py), then y = Z + x·dequant(W)ᵀ through the
    in-kernel-dequant GEMM (kernels/nf4_matmul.py; tl.dot on M padded to 16). (A no-tl.dot Triton GEMV was
    measured slower at every shape and M <= 16 on an H100 -- nf4_decode_graph_mma-v2_2026-11-24.json -- and
    removed.)"""
    b = None if bias is None else bias.to(x2.dtype)
    if lora_A is None:
        return nf4_matmul(x2, packed, ks, c_in=None if b is None else b.expand(x2.shape[0], -1))
    P = lora_s_partials(x2, lora_A, 0.0, None)
    Z, _ = lora_expand(P, lora_B, b, scaling, x2.dtype)
    return nf4_matmul(x2, packed, ks, c_in=Z)


_failed = False  # the extension failed to build once: Triton from then on (no rebuild attempt per token)


def nf4_lora_gemv(x2, packed, ks: KernelState, bias, lora_A, lora_B, scaling: float, backend: str = "auto"):
    """Decode forward (no autograd) for x2 [M <= 16, K]: CUDA kernel when it builds, else Triton.

    backend: "auto" | "cuda" | "triton". FASTPEFT_CSRC=0 makes "auto" skip the CUDA extension. lora_A /
    lora_B None: the base GEMV alone.
    """
    global _failed
    if backend not in ("auto", "cuda", "triton"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'triton', got {backend!r}")
    if backend == "cuda":
        return nf4_lora_gemv_cuda(x2, packed, ks, bias, lora_A, lora_B, scaling)
    if backend == "auto" and not _failed and settings.get().csrc and x2.is_cuda and _cuda_ok(x2, ks):
        try:
            return nf4_lora_gemv_cuda(x2, packed, ks, bias, lora_A, lora_B, scaling)
        except RuntimeError as exc:
            _failed = True
            warnings.warn(f"{exc} -- using the Triton decode path", stacklevel=2)
    return nf4_lora_gemv_triton(x2, packed, ks, bias, lora_A, lora_B, scaling)

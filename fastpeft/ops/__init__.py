"""Math of the adapter methods. The bottom layer: nothing here imports fastpeft.nn or the model-level modules.

PyTorch only (work everywhere):
    dropout.py       the LoRA dropout mask, defined once (the kernels regenerate exactly this mask)
    reference.py     pure-PyTorch LoRA / DoRA / IA3 / 4-bit references: the oracle and the CPU path
    nf4_format.py    bitsandbytes' 4-bit format: codes, QuantState stand-in, reference dequantization, KernelState
    nf4_quantize.py  quantization to bnb's bytes (its "bnb-cuda" nested rounding uses one Triton kernel)
Triton (``ops/kernels/``, imported only where Triton imports; ``HAS_TRITON`` says whether it does):
    kernels/common.py       launch helpers and the in-kernel dropout mask
    kernels/lora.py, ia3.py the fused LoRA / IA3 layers (autograd Functions over Triton + cuBLAS)
    kernels/nf4_dequant.py  one-pass dequantization, the code / absmax device helpers
    kernels/nf4_matmul.py   the small-M GEMM that dequantizes weight tiles in registers
    kernels/nf4_gemv.py     decode (M <= 16, no grad): CUDA C++ GEMV (csrc/) or Triton
    kernels/nf4_lora.py     LoRA / IA3 on 4-bit bases (training)
    kernels/dora.py         DoRA on dense and 4-bit bases (norm, forward epilogue, backward; LoRA's kernels inside)
    kernels/custom_ops.py   the layers as torch.library ops (torch.compile)
"""
import torch

# The dtypes the C++ and Triton kernels compute in. Others (float64) take the PyTorch reference under backend auto;
# a backend forced to cpp / triton raises for them (the operators' own dtype errors).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch.cuda.is_current_stream_capturing's own query (a placeholder that must not be called on CPU-only builds,
# hence the is_initialized() guard below). Called directly: the public wrapper and torch.cuda.is_available() before
# it cost ~10-20 µs per call on slow hosts, and mixed-batch decode asks once per layer and token.
_STREAM_CAPTURING = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (torch.cuda.graph, or torch.compile's
    mode="reduce-overhead" recording). Code that keeps tensors between calls (a scratch buffer, a norm cache)
    must not do so then: a tensor made during capture belongs to the graph's memory pool, and a buffer made
    before it could be freed or regrown after it while the graph still writes to its address. Before CUDA is
    initialised nothing can be capturing."""
    return _STREAM_CAPTURING is not None and torch.cuda.is_initialized() and bool(_STREAM_CAPTURING())


DROPOUT_IN_GRAPH_ERROR = (
    "fastpeft: LoRA dropout (lora_dropout > 0) cannot run inside a CUDA graph (torch.cuda.graph, or "
    "torch.compile(mode=\"reduce-overhead\")): its per-call seed comes from torch's CPU generator, so the graph "
    "would replay one dropout mask forever. Use lora_dropout=0 (or model.eval()) with CUDA graphs, or torch.compile "
    "without them (mode=\"default\")")


def refuse_dropout_in_graph() -> None:
    """Raise DROPOUT_IN_GRAPH_ERROR while a CUDA graph is being captured (the C++ operators check the same)."""
    if graph_capturing():
        raise RuntimeError(DROPOUT_IN_GRAPH_ERROR)


try:
    import triton  # noqa: F401  (the kernels need it; the reference path does not)

    HAS_TRITON = True
except ImportError:  # e.g. macOS / Windows, where pyproject does not install it
    HAS_TRITON = False

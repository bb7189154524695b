"""pytest-benchmark view of benchmarks/scripts/bench_nf4.py: `pytest benchmarks/tier/test_bench_nf4.py --benchmark-only`.

CUDA: Llama-3-8B shapes (dequant of one weight, QLoRA layer fwd+bwd at M=4096, decode at M=1); CPU: tiny
shapes in fp32 with the Triton kernels interpreted, so the command never breaks.
"""
import pytest
import torch

import bench_nf4 as nf4_bench  # benchmarks/scripts/ (on sys.path: benchmarks/conftest.py)

CUDA = torch.cuda.is_available()
SHAPES = nf4_bench.LLAMA8B if CUDA else nf4_bench.TINY
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("proj", ["q/o", "gate/up"])
def test_dequant(benchmark, proj):
    from fastpeft.ops.kernels import nf4_dequant as nf4

    K, N = SHAPES[proj]
    _, packed, qs = nf4_bench._quant(N, K, DEVICE, DTYPE)
    out = benchmark(lambda: (nf4.nf4_dequantize_triton(packed, qs, DTYPE), _sync()))
    assert out is not None


@pytest.mark.parametrize("method,p", [("dense", 0.0), ("peft_qlora", 0.0), ("fastpeft_qlora", 0.0),
                                      ("fastpeft_qlora", 0.05)])
@pytest.mark.parametrize("proj", list(SHAPES))
def test_qlora_layer_fwd_bwd(benchmark, proj, method, p):
    K, N = SHAPES[proj]
    M = 4096 if CUDA else 16
    try:
        m = nf4_bench._layer(method, K, N, DEVICE, DTYPE, p)
    except ImportError as e:
        pytest.skip(f"{method}: {e}")
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def step():
        m(x).backward(dy)
        _sync()

    benchmark(step)
    assert x.grad is not None


@pytest.mark.parametrize("proj", ["q/o", "down"])
def test_decode_m1(benchmark, proj):
    from fastpeft.ops.kernels import nf4_gemv
    from fastpeft.ops.nf4_format import kernel_state

    K, N = SHAPES[proj]
    _, packed, qs = nf4_bench._quant(N, K, DEVICE, DTYPE)
    A = torch.randn(16, K, device=DEVICE) * 0.02
    B = torch.randn(N, 16, device=DEVICE) * 0.02
    x = torch.randn(1, K, device=DEVICE, dtype=DTYPE)
    y = benchmark(lambda: (nf4_gemv.nf4_lora_gemv(x, packed, kernel_state(qs, x.device), None, A, B, 2.0, backend="auto" if CUDA else "triton"),
                           _sync())[0])
    assert y.shape == (1, N)

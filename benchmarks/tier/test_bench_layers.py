"""pytest-benchmark view of benchmarks/scripts/bench_layers.py: `pytest benchmarks --benchmark-only`.

On CUDA: Llama-3-8B projection shapes at M=4096 and 16, bf16; on CPU: tiny shapes, fp32 (the Triton
kernels run under the interpreter), so the command never breaks. Ratios vs the dense base go into
extra_info; benchmarks/scripts/bench_layers.py prints the side-by-side table and writes the JSON.
"""
import pytest
import torch

import bench_layers as layers  # benchmarks/scripts/ (on sys.path: benchmarks/conftest.py)

CUDA = torch.cuda.is_available()
SHAPES = layers.LLAMA8B if CUDA else layers.TINY
MS = [4096, 16] if CUDA else [16]
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEVICE = "cuda" if CUDA else "cpu"
METHODS = ["dense", "peft_lora", "peft_lora_p05", "fastpeft_lora", "fastpeft_lora_p05", "peft_ia3", "fastpeft_ia3"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("proj", list(SHAPES))
@pytest.mark.parametrize("M", MS)
def test_layer(benchmark, M, proj, method, bwd):
    K, N = SHAPES[proj]
    torch.manual_seed(0)
    try:
        fn, _ = layers.build(method, K, N, DTYPE, DEVICE, proj == "down")
    except ImportError as e:
        pytest.skip(f"{method}: {e}")
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    if bwd:
        x.requires_grad_()
    g = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    step = layers.make_step(fn, x, g, bwd)

    def timed():
        step()
        _sync()

    timed()  # warm-up: compilation / autotuning stays out of the numbers
    benchmark.extra_info.update(M=M, K=K, N=N, method=method, pass_="fwd+bwd" if bwd else "fwd")
    benchmark.pedantic(timed, rounds=10 if CUDA else 2, iterations=1, warmup_rounds=2 if CUDA else 0)

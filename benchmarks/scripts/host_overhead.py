"""Host cost per call of the pieces a fastpeft layer is made of (CUDA only): where the eager host time goes.

    python benchmarks/scripts/host_overhead.py [--out host.json]

Each row: median host time (µs) of one call, measured with perf_counter while the GPU is kept busy by queued
matmuls (so no call waits on the device). Tiny tensors: the numbers are pure launch / dispatch / Python cost.
"""
import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's fastpeft
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@triton.jit
def _noop4(X, Y, n, m):
    pass


@triton.jit
def _noop30(A, B, C, D, E, F, G, H, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8,
            b9, C1: tl.constexpr, C2: tl.constexpr):
    pass


def host_us(fn, n=200):
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        fn()
    ts = []
    for i in range(n):
        if i % 20 == 0:
            torch.cuda.synchronize()
            for _ in range(8):
                big @ big  # ~1.5 ms of queued work per 20 calls
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = "cuda"
    t = torch.randn(16, 16, device=dev)
    rows = {}
    rows["torch.empty"] = host_us(lambda: torch.empty((16, 16), device=dev))
    rows["torch.zeros"] = host_us(lambda: torch.zeros((16, 16), device=dev))
    rows["torch.mm"] = host_us(lambda: torch.mm(t, t))
    rows["triton noop, 4 args"] = host_us(lambda: _noop4[(1,)](t, t, 16, 16))
    args30 = [t] * 8 + list(range(1, 21))
    rows["triton noop, 30 args"] = host_us(lambda: _noop30[(1,)](*args30, C1=1, C2=2))

    from fastpeft.ops import lora as L

    M, K, N, r = 16, 64, 64, 16
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    A = torch.randn(r, K, device=dev, requires_grad=True)
    B = torch.randn(N, r, device=dev, requires_grad=True)
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    rows["lora_fwd_rows (one launch)"] = host_us(lambda: L.lora_fwd_rows(x.detach(), A.detach(), B.detach(), None, 2.0))
    rows["lora_linear fwd (no grad)"] = host_us(lambda: L.lora_linear(x.detach(), w, None, A.detach(), B.detach(), 2.0))
    rows["lora_linear fwd+bwd"] = host_us(lambda: L.lora_linear(x, w, None, A, B, 2.0).backward(g))
    rows["F.linear fwd+bwd"] = host_us(lambda: torch.nn.functional.linear(x, w).backward(g))

    from fastpeft.nn.lora import LoraLinear

    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    layer = LoraLinear(lin, "default", r=r, lora_alpha=32).train()
    rows["LoraLinear fwd+bwd"] = host_us(lambda: layer(x).backward(g))
    try:
        import peft
        from peft.tuners.lora import Linear as PLinear

        lin2 = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        pl = PLinear(lin2, "default", config=peft.LoraConfig(r=r, lora_alpha=32), r=r, lora_alpha=32).train()
        pl.lora_A["default"].float()
        pl.lora_B["default"].float()
        rows["PEFT lora.Linear fwd+bwd"] = host_us(lambda: pl(x).backward(g))
    except Exception as e:  # noqa: BLE001
        rows["PEFT lora.Linear fwd+bwd"] = f"skipped: {e!r}"[:120]
    try:
        from fastpeft.ops import nf4
        from fastpeft.ops.nf4_lora import nf4_lora_linear

        packed, qs = nf4.quantize_nf4(torch.randn(N, K, device=dev, dtype=torch.bfloat16), blocksize=64,
                                      compress_statistics=True)
        rows["nf4_dequantize_triton"] = host_us(lambda: nf4.nf4_dequantize_triton(packed, qs, torch.bfloat16))
        rows["nf4_lora_linear fwd+bwd (buffer)"] = host_us(
            lambda: nf4_lora_linear(x, packed, qs, None, A, B, 2.0).backward(g))
    except Exception as e:  # noqa: BLE001
        rows["nf4"] = f"skipped: {e!r}"[:200]
    for k, v in rows.items():
        print(f"{k:40s} {v if isinstance(v, str) else f'{v:8.1f} us'}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows_us": rows}, f, indent=1)


if __name__ == "__main__":
    main()

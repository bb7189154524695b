"""Timing shared by the benchmark scripts (benchmarks/scripts/): eager median time per call (``timeit``), GPU time
per call from a CUDA-graph replay (``graph_ms``), which leaves host time (Python, launches) out, and host time per
call with the GPU kept busy (``host_us``), which leaves GPU time out."""
from __future__ import annotations

import time

import torch


def timeit(step, device) -> float:
    """Median ms per call of ``step`` (eager, host included): triton.testing.do_bench on CUDA (L2 flushed
    between calls), on CPU the middle of three wall-clock calls after one warm-up call."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    step()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def graph_ms(calls, reps: int = 20, warmup: int = 2) -> float:
    """GPU time per call, ms. ``calls``: zero-argument callables captured back to back in ONE CUDA graph (give
    each its own copy of the weights, together larger than L2, and each call reads its weights from HBM), then
    replayed ``reps`` times. Eager decode / small-M layers are host-bound on the device's CPU; this is the time
    a CUDA-graphed or compiled caller sees."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (allocations, autotuning) outside the capture
        for _ in range(warmup):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (reps * len(calls))


def host_us(fn, n: int = 200) -> float:
    """Median host µs of one ``fn()`` call (CUDA), measured with perf_counter while queued matmuls keep the GPU busy,
    so that no call waits on the device: launch, dispatch and Python cost only."""
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

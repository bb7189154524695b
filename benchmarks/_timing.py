"""GPU-time measurement shared by the benchmarks: CUDA-graph replay, so host time (Python, launches) is left out."""
from __future__ import annotations

import torch


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

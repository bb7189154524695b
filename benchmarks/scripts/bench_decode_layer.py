"""One LoRA projection at decode sizes: GPU time per call under CUDA-graph replay (what compiled static-cache
decode sees: no host cost left) and host time per eager call, for fastpeft's CUDA compositions against the frozen
base's F.linear and PEFT's eager composition of the same math.

    python benchmarks/scripts/bench_decode_layer.py --M 1 8 16 32 --out decode_layer.json     (CUDA only)

Per Llama-3.1-8B projection shape and M: `--copies` distinct weight sets (so W is read from HBM as in a real
decode step, not from L2) are called once each inside one captured graph; the graph is replayed `--replays`
times and timed with CUDA events; GPU µs per call = total / (replays * copies), the median of `--repeats`.
Rows: base (F.linear), peft (F.linear + (x.float() @ Aᵀ) @ Bᵀ * s cast back: PEFT's Linear.forward in eager),
fastpeft decode / fused / split-gemm (torch.ops.fastpeft_ops.set_lora_cuda_path 2 / 1 / 0; "auto" picks decode at
small M without dropout). "decode" computes the base product in its own GEMV with the expand in the epilogue, the
GEMV a programmatic dependent of the shrink ("no pdl": launched plainly after the shrink); inside a CUDA graph it
does so only for weights whose 16-column tiles fit its resident blocks, so the graph column of gate/up is cuBLAS +
expand while its host column (eager) is the GEMV. "cublas + expand" is session 21's composition (set_decode_gemv 0:
cuBLAS's GEMV, then the expand as a programmatic dependent of it; "no pdl": launched plainly; "no fork": the shrink
kept on the capture's stream, set_decode_fork 0). Floor: bytes (W, adapters, x, y) over the copy bandwidth measured
in the same run.
Host µs per call: wall time of 64 eager calls issued without a sync (no_grad), before the launch queue fills.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
for _p in (os.path.join(BENCH, "helpers"), os.path.dirname(BENCH)):  # the timing helpers, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_timing import graph_ms  # noqa: E402
from fastpeft.ops import cpp_ops  # noqa: E402

LLAMA8B = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
RANK, SCALING = 16, 2.0
PATHS = {"fastpeft decode": 2, "fastpeft decode, cublas + expand": 2,
         "fastpeft decode, cublas + expand, no pdl": 2, "fastpeft decode, cublas + expand, no fork, no pdl": 2,
         "fastpeft decode, no pdl": 2, "fastpeft fused": 1, "fastpeft split-gemm": 0}
# The cuBLAS composition forks its shrink onto a side stream while a graph is captured (set_decode_fork -1, auto);
# programmatic dependent launch (set_decode_pdl -1) makes its expand a dependent of cuBLAS's GEMV, and our GEMV one
# of the shrink. These rows turn them off (0) to measure what each buys under graph replay. Values: (fork, pdl).
OVERLAP = {"fastpeft decode, no pdl": (-1, 0), "fastpeft decode, cublas + expand, no pdl": (-1, 0),
           "fastpeft decode, cublas + expand, no fork, no pdl": (0, 0)}
# The decode forward's base product: its own GEMV with the expand in the epilogue (set_decode_gemv -1, auto) or
# cuBLAS followed by the expand kernel (0, session 21's composition).
GEMV = {"fastpeft decode, cublas + expand": 0,
        "fastpeft decode, cublas + expand, no pdl": 0, "fastpeft decode, cublas + expand, no fork, no pdl": 0}


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the floor's ceiling."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * src.element_size() / (start.elapsed_time(end) / 1e3)


def graph_us(fn, copies: int, replays: int, repeats: int) -> float:
    """Median over ``repeats`` captures of bench_timing.graph_ms: µs per call of ``fn(i)``, i over the copies."""
    calls = [functools.partial(fn, i) for i in range(copies)]
    return statistics.median(graph_ms(calls, reps=replays, warmup=3) for _ in range(repeats)) * 1e3


def host_us(fn, copies: int, calls: int = 64) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in range(calls):
        fn(n % copies)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / calls


def kernel_us(fn, copies: int, calls: int = 24) -> dict:
    """Mean CUDA time per call of each kernel an eager call launches (torch.profiler; kernels serialized as in
    the stream, so these add up to the call's GPU time without the gaps a graph removes)."""
    from torch.profiler import ProfilerActivity, profile

    for n in range(copies):
        fn(n)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for n in range(calls):
            fn(n % copies)
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.count > 0:
            out[evt.key[:60]] = round(evt.device_time_total / calls, 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--replays", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", action="store_true", help="also record each row's per-kernel CUDA time (profiler)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_layer.py measures CUDA graphs: it needs a GPU")
    if not cpp_ops.available():  # builds / loads torch.ops.fastpeft_ops (warns with the compiler's message)
        sys.exit("bench_decode_layer.py: the fastpeft_ops extension is not available")
    ops = torch.ops.fastpeft_ops
    bw = copy_bandwidth()
    torch.manual_seed(0)
    rows = []
    for proj, (K, N) in LLAMA8B.items():
        W = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(a.copies)]
        A = [torch.randn(RANK, K, device="cuda") / K**0.5 for _ in range(a.copies)]
        B = [torch.randn(N, RANK, device="cuda") / RANK**0.5 for _ in range(a.copies)]
        for M in a.M:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            impls = {
                "base": lambda i: torch.nn.functional.linear(x, W[i]),
                "peft": lambda i: (torch.nn.functional.linear(x, W[i])
                                   + (x.float() @ A[i].t()) @ B[i].t() * SCALING).to(torch.bfloat16),
            }
            for name in PATHS:
                impls[name] = lambda i: cpp_ops.lora_linear(x, W[i], None, A[i], B[i], SCALING)
            floor_bytes = {"base": N * K * 2 + (M * K + M * N) * 2}
            lora_bytes = floor_bytes["base"] + RANK * (K + N) * 4
            with torch.no_grad():
                for name, fn in impls.items():
                    before = ops.set_lora_cuda_path(PATHS.get(name, -1))
                    fork, pdl = OVERLAP.get(name, (-1, -1))
                    before_fork, before_pdl = ops.set_decode_fork(fork), ops.set_decode_pdl(pdl)
                    before_gemv = ops.set_decode_gemv(GEMV.get(name, -1))
                    try:
                        gpu = graph_us(fn, a.copies, a.replays, a.repeats)
                        host = host_us(fn, a.copies)
                        kernels = kernel_us(fn, a.copies) if a.kernels else None
                    finally:
                        ops.set_lora_cuda_path(before)
                        ops.set_decode_fork(before_fork)
                        ops.set_decode_pdl(before_pdl)
                        ops.set_decode_gemv(before_gemv)
                    floor = floor_bytes.get(name, lora_bytes) / bw * 1e6
                    rows.append({"proj": proj, "K": K, "N": N, "M": M, "impl": name, "gpu_us": round(gpu, 2),
                                 "floor_us": round(floor, 2), "host_us": round(host, 2)})
                    if kernels is not None:
                        rows[-1]["kernels_us"] = kernels
                        print("    " + "; ".join(f"{k}: {v}" for k, v in kernels.items()), flush=True)
                    print(f"{proj:8s} M={M:3d} {name:48s} gpu {gpu:7.2f} us  floor {floor:6.2f}  host {host:6.2f} us",
                          flush=True)
    base_of = {(r["proj"], r["M"]): r["gpu_us"] for r in rows if r["impl"] == "base"}
    for r in rows:
        r["gpu_vs_base"] = round(r["gpu_us"] / base_of[(r["proj"], r["M"])], 3)
        r["extra_us"] = round(r["gpu_us"] - base_of[(r["proj"], r["M"])], 2)
    out = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "copy_bandwidth_GBps": round(bw / 1e9, 1), "rank": RANK,
        "dtype": "bfloat16", "copies": a.copies, "replays": a.replays, "repeats": a.repeats, "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

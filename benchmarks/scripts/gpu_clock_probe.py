"""How a GPU's GEMM speed drifts from a cold start: one bf16 GEMM shape run back to back for ``--seconds``, with its
achieved TFLOP/s, the SM clock, temperature and power reported every ``--every`` seconds.

    python benchmarks/scripts/gpu_clock_probe.py [--shape 4096 4096 4096] [--seconds 60] [--every 2] [--out f.json]

Why: a benchmark that times method A and then method B right after the device was idle would favour A if a cold GPU
ran faster at first. On the H200 it does not (session 27: the first 2.5 s ran at 648 TFLOP/s, then 667-676 at the
700 W power cap); profile_layer.py's ``--heat`` covers those first seconds. CUDA only.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from profile_layer import gpu_state  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[4096, 4096, 4096], metavar=("M", "N", "K"))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_clock_probe.py needs a CUDA device")
    M, N, K = a.shape
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    flop = 2.0 * M * N * K
    samples = [{"t_s": 0.0, "tflops": None, **gpu_state()}]
    print(f"start: {samples[0]}", flush=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        calls = 0
        e0.record()
        start = time.perf_counter()
        while time.perf_counter() - start < a.every:
            for _ in range(50):
                x @ w.t()
            calls += 50
            torch.cuda.synchronize()
        e1.record()
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / calls
        row = {"t_s": round(time.perf_counter() - t0, 2), "ms_per_gemm": ms, "tflops": flop / ms / 1e9, **gpu_state()}
        samples.append(row)
        print(f"t {row['t_s']:6.1f} s  {row['ms_per_gemm']:.4f} ms  {row['tflops']:6.1f} TFLOP/s  "
              f"sm {row.get('sm_mhz')} MHz  {row.get('temp_c')} C  {row.get('power_w')} W", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
                       "samples": samples}, f, indent=1)


if __name__ == "__main__":
    main()

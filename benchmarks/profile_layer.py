"""Device time vs wall time of one layer fwd+bwd (torch.profiler): separates kernel cost from host overhead.

    PYTHONPATH=. python benchmarks/profile_layer.py      (CUDA only)
"""
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile

import layers  # noqa: E402


def main():
    dev = "cuda"
    for proj in ("q/o", "k/v"):
        K, N = layers.LLAMA8B[proj]
        for method in ("dense", "peft_lora", "fastpeft_lora", "fastpeft_lora_p05", "fastpeft_ia3"):
            torch.manual_seed(0)
            fn, _ = layers.build(method, K, N, torch.bfloat16, dev, False)
            x = torch.randn(4096, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(4096, N, device=dev, dtype=torch.bfloat16)
            step = layers.make_step(fn, x, g, True)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            n = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
            rows = {}
            for e in prof.key_averages():
                if e.device_time_total > 0:
                    rows[e.key[:60]] = e.device_time_total / n / 1e3
            tot = sum(rows.values())
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step()
            end.record()
            torch.cuda.synchronize()
            wall = start.elapsed_time(end) / n
            print(f"{proj:4s} {method:18s} device {tot:.4f} ms  back-to-back {wall:.4f} ms")
            for k, v in sorted(rows.items(), key=lambda kv: -kv[1])[:8]:
                print(f"      {v:.4f} ms  {k}")


if __name__ == "__main__":
    main()

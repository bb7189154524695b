"""Host time of one adapted projection at decode size, one adapter against a mixed batch (CUDA only): where the
mixed batch's decode time goes, one layer call at a time (a whole generate on the lent hosts swings by +-30 %).

    python benchmarks/scripts/bench_mixed_layer.py [--adapters 8] [--rows 8] [--shape 4096,4096] [--rounds 5]
                                                   [--profile] [--out mixed_layer.json]

Rows, each the median host µs of one call with the GPU kept busy by queued matmuls (so no call waits on it), in
--rounds rounds of alternating order (the median of the rounds' medians; every round in the JSON):
  F.linear                      the frozen base alone
  op lora_linear                cpp_ops.lora_linear, one adapter (the decode GEMV at <= 8 rows)
  op lora_mixed_linear          cpp_ops.lora_mixed_linear, one adapter per row (--adapters adapters)
  op lora_mixed_linear, no gemv the same with fastpeft_ops.set_decode_gemv(0) (cuBLAS + the mixed kernels)
  module one adapter            LoraLinear(x) under no_grad (the hot path)
  module mixed                  LoraLinear(x) with adapter_names set (nn/mixed_batch.py), and "no gemv" as above
bf16 x [rows, 1, in], r = 16 fp32 adapters (PEFT's default), no bias. --profile prints the CPU self time per op of
50 mixed module calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _p in (os.path.join(ROOT, "benchmarks", "helpers"), ROOT):  # the timing helpers, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_timing import host_us  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--shape", default="4096,4096", help="in_features,out_features")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mixed_layer.py needs a GPU (it times CUDA host paths)")
    K, N = (int(v) for v in a.shape.split(","))
    import fastpeft
    from fastpeft.nn import mixed_batch
    from fastpeft.ops import cpp_ops

    if not cpp_ops.available():
        raise SystemExit("bench_mixed_layer.py needs the C++ extension")
    torch.manual_seed(0)
    dt = torch.bfloat16
    base = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dt)
    names = [f"task{i}" for i in range(a.adapters)]
    layer = fastpeft.LoraLinear(base, names[0], r=16, lora_alpha=32, init_lora_weights=False)
    for name in names[1:]:
        layer.update_layer(name, r=16, lora_alpha=32, init_lora_weights=False)
    layer = layer.to("cuda").eval()  # fp32 adapters on the bf16 base, as patch keeps them
    x = torch.randn(a.rows, 1, K, device="cuda", dtype=dt)
    row_names = tuple(names[i % a.adapters] for i in range(a.rows))
    w = base.weight
    A, B = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight
    with torch.no_grad():
        kernel, adapters, order = layer._mixed_plan(x)  # the layer's own cached plan, as its mixed calls use it
    assert kernel == "cpp", kernel
    seg = layer._segment_adapters(row_names, a.rows, x.device, order)

    def mixed_module():
        token = mixed_batch.set_names(row_names)
        try:
            return layer(x)
        finally:
            mixed_batch.reset(token)

    def no_gemv(fn):
        def run():
            previous = torch.ops.fastpeft_ops.set_decode_gemv(0)
            try:
                return fn()
            finally:
                torch.ops.fastpeft_ops.set_decode_gemv(previous)
        return run

    set_names_only = lambda: mixed_batch.reset(mixed_batch.set_names(row_names))  # noqa: E731
    toggle_only = no_gemv(lambda: None)
    cases = {
        "F.linear": lambda: torch.nn.functional.linear(x, w),
        "op lora_linear": lambda: cpp_ops.lora_linear(x, w, None, A, B, 2.0),
        "op lora_mixed_linear": lambda: cpp_ops.lora_mixed_linear(x, w, None, seg, 1, adapters),
        "op lora_mixed_linear, no gemv": no_gemv(lambda: cpp_ops.lora_mixed_linear(x, w, None, seg, 1, adapters)),
        "module one adapter": lambda: layer(x),
        "module mixed": mixed_module,
        "module mixed, no gemv": no_gemv(mixed_module),
        "set_names + reset (in module mixed)": set_names_only,
        "set_decode_gemv toggle (in the no-gemv rows)": toggle_only,
    }
    rounds = {k: [] for k in cases}
    with torch.no_grad():
        for rnd in range(a.rounds):
            keys = list(cases) if rnd % 2 == 0 else list(reversed(cases))
            for k in keys:
                rounds[k].append(host_us(cases[k], n=300))
        rows = {k: statistics.median(v) for k, v in rounds.items()}
        for k, v in rows.items():
            print(f"{k:48s} {v:8.1f} us   rounds {', '.join(f'{t:.1f}' for t in rounds[k])}")
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            for label, fn in (("module mixed", mixed_module), ("module one adapter", lambda: layer(x))):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(50):
                        fn()
                    torch.cuda.synchronize()
                print(f"\n== {label}: CPU self time per op, 50 calls")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                max_name_column_width=70))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "adapters": a.adapters,
            "rows": a.rows, "shape": [K, N], "rounds": a.rounds, "host_us": rows, "host_us_rounds": rounds}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    main()

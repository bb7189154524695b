"""Where one layer's fwd+bwd time goes: kernels (GPU time) vs the host (Python, launches, autograd).

    python benchmarks/scripts/profile_layer.py [--M 4096 16] [--proj q/o k/v] [--methods ...] [--no-grad] [--out f.json]

Per (projection, M, method), four numbers, all in ms per fwd+bwd (per forward with --no-grad):
  graph   : replay of a CUDA graph of the step -- the GPU work alone, launch gaps removed
  b2b     : back-to-back steps timed with events, no sync in between -- what a training loop sees when the
            host is the bottleneck (b2b >> graph means host-bound)
  host    : host time to enqueue one step (perf_counter around step(), GPU kept busy so nothing waits)
  kernels : sum of kernel times from torch.profiler, with the top kernels listed
CUDA only.

Clocks. The H200 runs full-power GEMMs at its 700 W cap (~1550 MHz, ~670 TFLOP/s at 4096³ with randn data;
gpu_clock_probe.py, session 27) and reaches that state within ~2.5 s of a cold start, so before the first row
``--heat`` seconds of 8192³ GEMMs bring it there, every row records the SM clock, temperature and power
(nvidia-smi, read between timings), and ``--rounds R`` times each (M, projection)'s methods R times in alternating
order (ABC, CBA, ...), reporting the median graph time (``graph_ms_rounds`` keeps them all). Read GEMM times from
the graph column: in the profiler's per-kernel list an adapted layer's base GEMMs come out ~12 % slower than the
dense layer's (q/o 0.207 vs 0.184 ms, session 27) while the graph totals leave no room for that.
A method named ``name:hook=value`` runs ``name`` with ``torch.ops.fastpeft_ops.set_<hook>(value)`` in effect around
each step: an operator's switch (``fastpeft_lora_layer:lora_cuda_path=1``) timed beside its default in one process.
Backward: ``torch.autograd.grad`` of x and the adapter parameters (``--accumulate``: ``.backward()`` as before
session 27, which adds one [M, in] gradient accumulation per call to every method).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # benchmarks/scripts/
BENCH = os.path.dirname(HERE)
for _p in (HERE, os.path.join(BENCH, "helpers"), os.path.dirname(BENCH)):  # bench_layers, timing, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_layers as layers  # noqa: E402
import bench_timing  # noqa: E402


def graph_ms(step, n=20):
    return bench_timing.graph_ms([step], reps=n, warmup=3)


def b2b_ms(step, n=30):
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        step()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def host_ms(step, n=30):
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        for _ in range(4):  # ~5 ms of queued GPU work, so the host never waits on the device
            big @ big
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    ts.sort()
    return ts[len(ts) // 2]


def kernels(step, n=10, top=8):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if e.device_time_total > 0 and e.device_type.name == "CUDA":
            rows[e.key[:70]] = rows.get(e.key[:70], 0.0) + e.device_time_total / n / 1e3
    return sum(rows.values()), sorted(rows.items(), key=lambda kv: -kv[1])[:top]


def heat(seconds: float) -> None:
    """Full-power bf16 GEMMs for ``seconds``: the device at its working temperature before anything is timed."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(16):
            a @ a
        torch.cuda.synchronize()


def gpu_state() -> dict:
    """SM clock (MHz), temperature (C) and power (W) now, from nvidia-smi; {} where it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,temperature.gpu,power.draw",
                              "--format=csv,noheader,nounits", "-i", str(torch.cuda.current_device())],
                             capture_output=True, text=True, timeout=10).stdout.strip().split(",")
        return {"sm_mhz": float(out[0]), "temp_c": float(out[1]), "power_w": float(out[2])}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {}


def split_hook(method):
    """'name:hook=value' -> (name, (hook, value)): the row runs with torch.ops.fastpeft_ops.set_<hook>(value) in effect
    (a side-by-side timing of an operator's switch in one process); plain 'name' -> (name, None)."""
    if ":" not in method:
        return method, None
    name, _, setting = method.partition(":")
    hook, _, value = setting.partition("=")
    if not hook or not value.lstrip("-").isdigit():
        raise SystemExit(f"--methods: {method!r} is not NAME or NAME:HOOK=INT")
    return name, (hook, int(value))


def with_hook(step, hook):
    """step with the operator switch `hook` (hook, value) set around each call (a graph capture records the kernels
    the switch chose), or step itself"""
    if hook is None:
        return step
    setter = getattr(torch.ops.fastpeft_ops, "set_" + hook[0])

    def run():
        before = setter(hook[1])
        try:
            step()
        finally:
            setter(before)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, nargs="*", default=[4096, 16])
    ap.add_argument("--proj", nargs="*", default=list(layers.LLAMA8B))
    ap.add_argument("--methods", nargs="*",
                    default=["dense", "peft_lora", "fastpeft_lora", "fastpeft_lora_triton", "fastpeft_lora_p05",
                             "peft_ia3", "fastpeft_ia3", "fastpeft_ia3_triton"])
    ap.add_argument("--no-grad", action="store_true", help="forward only under torch.no_grad (inference)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--heat", type=float, default=10.0,
                    help="seconds of 8192³ GEMMs before the first row (0: none), see the module docstring")
    ap.add_argument("--rounds", type=int, default=3, help="graph timings per row, methods in alternating order")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per row (by GPU time)")
    ap.add_argument("--accumulate", action="store_true",
                    help="backward by .backward() into .grad (the harness before session 27)")
    a = ap.parse_args()
    if a.rounds < 1 or a.heat < 0:
        ap.error("--rounds must be >= 1 and --heat >= 0")
    # a fixed dropout seed: the per-call CPU draw + .item() in layers._seed would forbid graph capture
    layers._seed = lambda: 1234
    if a.heat:
        before = gpu_state()
        heat(a.heat)
        print(f"heat {a.heat:.0f} s: {before} -> {gpu_state()}", flush=True)
    out = []
    for M in a.M:
        for proj in a.proj:
            K, N = layers.LLAMA8B[proj]
            ff = proj == "down"
            steps, rows = {}, {}
            for method in a.methods:
                torch.manual_seed(0)
                base_method, hook = split_hook(method)
                fn, params = layers.build(base_method, K, N, torch.bfloat16, "cuda", ff)
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                if a.no_grad and hasattr(fn, "eval"):
                    fn.eval()  # PEFT layers: inference mode (dropout off)
                steps[method] = with_hook(layers.make_step(fn, x, g, not a.no_grad, None if a.accumulate else params),
                                          hook)
                for _ in range(5):
                    steps[method]()
                rows[method] = {"M": M, "proj": proj, "method": method, "grad": not a.no_grad,
                                "graph_ms_rounds": [], "gpu_state": []}
            for r in range(a.rounds):  # alternating order: a drift in clocks lands on every method alike
                for method in (a.methods if r % 2 == 0 else a.methods[::-1]):
                    row = rows[method]
                    row["gpu_state"].append(gpu_state())
                    try:
                        row["graph_ms_rounds"].append(graph_ms(steps[method]))
                    except Exception as e:  # capture can fail for code that syncs; say so
                        row["graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            for method in a.methods:
                row, step = rows[method], steps[method]
                row["graph_ms"] = statistics.median(row["graph_ms_rounds"]) if row["graph_ms_rounds"] else None
                row["b2b_ms"] = b2b_ms(step)
                row["host_ms"] = host_ms(step)
                row["kernel_ms"], top = kernels(step, top=a.top)
                row["top"] = top
                out.append(row)
                gm = f"{row['graph_ms']:.4f}" if row["graph_ms"] is not None else "  fail"
                spread = (f" [{min(row['graph_ms_rounds']):.4f}-{max(row['graph_ms_rounds']):.4f}]"
                          if row["graph_ms_rounds"] else "")
                clock = row["gpu_state"][0].get("sm_mhz") if row["gpu_state"] else None
                print(f"M={M:5d} {proj:7s} {method:20s} graph {gm}{spread}  b2b {row['b2b_ms']:.4f}  "
                      f"host {row['host_ms']:.4f}  kernels {row['kernel_ms']:.4f}  sm {clock} MHz", flush=True)
                for k, v in top:
                    print(f"        {v:.4f}  {k}")
            del steps
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "heat_s": a.heat, "rounds": a.rounds,
                       "backward": ".backward() into .grad" if a.accumulate else "torch.autograd.grad",
                       "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

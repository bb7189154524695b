"""Host cost per call of an adapted layer and of the pieces it is made of (CUDA only): where eager host time goes.

    python benchmarks/scripts/host_overhead.py [--out host.json] [--profile] [--group-rounds 3] [--group-shape 64,128]

Each row: median host time (µs) of one call, measured with perf_counter while the GPU is kept busy by queued
matmuls (so no call waits on the device). Tiny tensors: the numbers are pure launch / dispatch / Python cost.
Layer rows call the module (nn.Module call included) with an input that requires grad, as inside a model; the
"ratio" section divides each by F.linear's row of the same kind in the same run (issue 13's targets: LoRA
<= 1.5x, IA3 <= 1.3x, LoRA on NF4 <= 2x F.linear fwd+bwd; forward without grad <= 1.5x F.linear's).
The "q/k/v" rows time three sibling projections one by one against their projection group (nn/projection_groups.py)
for LoRA, QLoRA, DoRA and QDoRA, in ``--group-rounds`` rounds of alternating order (median; every round in the JSON's
``group_rounds_us``): single host timings have swung by up to 2x between processes on the lent hosts.
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's fastpeft
for _p in (os.path.join(ROOT, "benchmarks", "helpers"), ROOT):  # the timing helpers, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_timing import host_us  # noqa: E402


@triton.jit
def _noop4(X, Y, n, m):
    pass


@triton.jit
def _noop30(A, B, C, D, E, F, G, H, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8,
            b9, C1: tl.constexpr, C2: tl.constexpr):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also print the CPU-side op times of a few rows")
    ap.add_argument("--group-rounds", type=int, default=3,
                    help="q/k/v group rows: timings per row, one by one and grouped in alternating order (median)")
    ap.add_argument("--group-shape", default="64,128",
                    help="q/k/v group rows: in_features,rows (e.g. 4096,4096 for the 8B step's q/k/v)")
    a = ap.parse_args()
    try:
        group_K, group_M = (int(v) for v in a.group_shape.split(","))
    except ValueError:
        ap.error(f"--group-shape takes in_features,rows as two integers, got {a.group_shape!r}")
    if a.group_rounds < 1 or group_K < 1 or group_M < 1:
        ap.error("--group-rounds and --group-shape's numbers must be >= 1")
    import fastpeft
    from fastpeft import settings
    from fastpeft.ops import cpp_ops

    dev = "cuda"
    t = torch.randn(16, 16, device=dev)
    rows = {}
    rows["torch.empty"] = host_us(lambda: torch.empty((16, 16), device=dev))
    rows["torch.zeros"] = host_us(lambda: torch.zeros((16, 16), device=dev))
    rows["torch.mm"] = host_us(lambda: torch.mm(t, t))
    rows["triton noop, 4 args"] = host_us(lambda: _noop4[(1,)](t, t, 16, 16))
    args30 = [t] * 8 + list(range(1, 21))
    rows["triton noop, 30 args"] = host_us(lambda: _noop30[(1,)](*args30, C1=1, C2=2))

    M, K, N, r = 16, 64, 64, 16
    dt = torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(M, N, device=dev, dtype=dt)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt).requires_grad_(False)
    rows["F.linear fwd+bwd"] = host_us(lambda: torch.nn.functional.linear(x, lin.weight).backward(g))
    rows["F.linear fwd (no grad)"] = host_us(lambda: _no_grad(lambda: torch.nn.functional.linear(x, lin.weight)))
    rows["nn.Linear fwd+bwd"] = host_us(lambda: lin(x).backward(g))
    rows["cpp extension available"] = bool(cpp_ops.available())

    def layers(backend):
        with settings.override(backend=backend):
            lora = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32).train()
            lora_do = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32, lora_dropout=0.05).train()
            ia3 = fastpeft.IA3Linear(lin, "default", is_feedforward=False).train()
            ia3_ff = fastpeft.IA3Linear(lin, "default", is_feedforward=True).train()
        return lora, lora_do, ia3, ia3_ff

    for backend in ("auto", "triton"):
        lora, lora_do, ia3, ia3_ff = layers(backend)
        tag = "fastpeft default (C++ op)" if backend == "auto" and cpp_ops.available() else f"fastpeft {backend}"
        rows[f"{tag} LoRA fwd+bwd"] = host_us(lambda: lora(x).backward(g))
        rows[f"{tag} LoRA fwd (no grad)"] = host_us(lambda: _no_grad(lambda: lora(x)))
        rows[f"{tag} LoRA dropout 0.05 fwd+bwd"] = host_us(lambda: lora_do(x).backward(g))
        rows[f"{tag} IA3 fwd+bwd"] = host_us(lambda: ia3(x).backward(g))
        rows[f"{tag} IA3 feedforward fwd+bwd"] = host_us(lambda: ia3_ff(x).backward(g))
    if cpp_ops.available():
        w = lin.weight
        A = torch.randn(r, K, device=dev, requires_grad=True)
        B = torch.randn(N, r, device=dev, requires_grad=True)
        rows["cpp_ops.lora_linear fwd+bwd (no module)"] = host_us(
            lambda: cpp_ops.lora_linear(x, w, None, A, B, 2.0).backward(g))
        lora, *_ = layers("auto")
        torch.ops.fastpeft_ops.set_lora_cuda_path(0)  # the split-GEMM composition, for comparison
        rows["fastpeft C++ op, split-GEMM composition, LoRA fwd+bwd"] = host_us(lambda: lora(x).backward(g))
        torch.ops.fastpeft_ops.set_lora_cuda_path(-1)
    try:
        import peft
        from peft.tuners.ia3 import Linear as PIA3
        from peft.tuners.lora import Linear as PLinear

        pl = PLinear(lin, "default", config=peft.LoraConfig(r=r, lora_alpha=32), r=r, lora_alpha=32).train()
        pl.lora_A["default"].float()
        pl.lora_B["default"].float()
        rows["PEFT lora.Linear fwd+bwd"] = host_us(lambda: pl(x).backward(g))
        pi = PIA3(lin, "default", config=peft.IA3Config(target_modules=["x"]), fan_in_fan_out=False,
                  is_feedforward=False).train()
        rows["PEFT ia3.Linear fwd+bwd"] = host_us(lambda: pi(x).backward(g))
    except Exception as e:  # noqa: BLE001
        rows["PEFT"] = f"skipped: {e!r}"[:200]
    try:
        q = fastpeft.NF4Linear.from_linear(torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt))
        nf4 = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32).train()
        rows["fastpeft LoRA on NF4 fwd+bwd"] = host_us(lambda: nf4(x).backward(g))
        # the training-size paths at this tiny size: the buffer GEMM (Triton) and the C++ 4-bit operators
        for backend in ("triton", "cpp") if cpp_ops.available() else ("triton",):
            with settings.override(backend=backend, nf4_gemm="buffer"):
                tag = "C++ op" if backend == "cpp" else "Triton, buffer GEMM"
                nf4 = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32).train()
                rows[f"fastpeft LoRA on NF4 fwd+bwd, {tag}"] = host_us(lambda: nf4(x).backward(g))
                qdora = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32, use_dora=True).train()
                rows[f"fastpeft DoRA on NF4 fwd+bwd, {tag}"] = host_us(lambda: qdora(x).backward(g))
        with settings.override(backend="auto"):
            dora = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32, use_dora=True).train()
            rows["fastpeft default DoRA fwd+bwd"] = host_us(lambda: dora(x).backward(g))
            # 128 rows (training sizes take these paths): F.linear, LoRA (split-GEMM composition), and the 4-bit
            # layers through the hot path into the C++ 4-bit operators (auto takes them above 64 rows)
            x128 = torch.randn(128, K, device=dev, dtype=dt, requires_grad=True)
            g128 = torch.randn(128, N, device=dev, dtype=dt)
            rows["F.linear fwd+bwd, 128 rows"] = host_us(
                lambda: torch.nn.functional.linear(x128, lin.weight).backward(g128))
            lora = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32).train()
            rows["fastpeft default LoRA fwd+bwd, 128 rows"] = host_us(lambda: lora(x128).backward(g128))
            rows["fastpeft default DoRA fwd+bwd, 128 rows"] = host_us(lambda: dora(x128).backward(g128))
            nf4 = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32).train()
            rows["fastpeft default LoRA on NF4 fwd+bwd, 128 rows"] = host_us(lambda: nf4(x128).backward(g128))
            qdora = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32, use_dora=True).train()
            rows["fastpeft default DoRA on NF4 fwd+bwd, 128 rows"] = host_us(lambda: qdora(x128).backward(g128))
    except Exception as e:  # noqa: BLE001
        rows["nf4"] = f"skipped: {e!r}"[:200]
    if cpp_ops.available():
        group_rows, group_rounds = _group_rows(dev, dt, group_K, group_M, r, a.group_rounds)
        rows.update(group_rows)

    if a.profile:
        profiled = {"F.linear fwd+bwd": lambda: torch.nn.functional.linear(x, lin.weight).backward(g)}
        lora, *_ = layers("auto")
        profiled["LoraLinear (default) fwd+bwd"] = lambda: lora(x).backward(g)
        if cpp_ops.available():
            profiled["cpp_ops.lora_linear fwd+bwd"] = lambda: cpp_ops.lora_linear(x, w, None, A, B, 2.0).backward(g)
            x128 = torch.randn(128, K, device=dev, dtype=dt, requires_grad=True)
            g128 = torch.randn(128, N, device=dev, dtype=dt)
            with settings.override(backend="auto"):
                lora128 = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32).train()
                q = fastpeft.NF4Linear.from_linear(torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt))
                nf4_128 = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32).train()
            profiled["LoraLinear (default) fwd+bwd, 128 rows"] = lambda: lora128(x128).backward(g128)
            profiled["LoraLinear on NF4 (default) fwd+bwd, 128 rows"] = lambda: nf4_128(x128).backward(g128)
            with settings.override(backend="auto"):
                dora128 = fastpeft.LoraLinear(lin, "default", r=r, lora_alpha=32, use_dora=True).train()
                qdora128 = fastpeft.LoraLinear(q, "default", r=r, lora_alpha=32, use_dora=True).train()
            profiled["DoRA (default) fwd+bwd, 128 rows"] = lambda: dora128(x128).backward(g128)
            profiled["DoRA on NF4 (default) fwd+bwd, 128 rows"] = lambda: qdora128(x128).backward(g128)
        for name, fn in profiled.items():
            print(f"\n== profile: {name} (50 calls; CPU self time per op)")
            print(_profile(fn))

    base = rows["F.linear fwd+bwd"]
    base_ng = rows["F.linear fwd (no grad)"]
    base128 = rows.get("F.linear fwd+bwd, 128 rows")
    ratios = {k: round(v / (base_ng if "no grad" in k else base128 if "128 rows" in k else base), 2)
              for k, v in rows.items()
              if isinstance(v, float) and any(w in k for w in ("LoRA", "IA3", "DoRA", "lora", "ia3"))
              and not k.startswith("q/k/v")}  # three layers a row: compared with each other, not with one F.linear
    for k, v in rows.items():
        print(f"{k:48s} {v if isinstance(v, (str, bool)) else f'{v:8.1f} us'}"
              + (f"   {ratios[k]:.2f}x F.linear" if k in ratios else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "group_rounds_us": group_rounds if cpp_ops.available() else {},
                       "group_shape": [group_K, group_M],
                       "triton": triton.__version__, "rows_us": rows, "ratio_vs_F.linear": ratios}, f, indent=1)


class _Attention(torch.nn.Module):
    """q / k / v on one input, as a decoder layer calls them (what nn/projection_groups.py groups)."""

    def __init__(self, K, dev, dt):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, torch.nn.Linear(K, K, bias=False, device=dev, dtype=dt).requires_grad_(False))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _group_rows(dev, dt, K, M, r, rounds):
    """Host time of q / k / v fwd+bwd (K -> K each, M rows), one by one against one grouped operator, for LoRA, DoRA
    and their 4-bit forms (the settings' group_projections off / on; the group confirmed by the warm-up calls). Every
    row is timed ``rounds`` times, the rows in alternating order (forward, then reversed), so drift of the host shows
    as spread instead of as a difference between rows: (medians by row, every round's value by row)."""
    import statistics

    import fastpeft
    from fastpeft import settings

    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    grads = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(3)]
    calls = {}
    for method, dora, quantized in (("LoRA", False, False), ("QLoRA", False, True), ("DoRA", True, False),
                                    ("QDoRA", True, True)):
        for group in (False, True):
            torch.manual_seed(0)
            module = _Attention(K, dev, dt)
            if quantized:
                for name in ("q_proj", "k_proj", "v_proj"):
                    setattr(module, name, fastpeft.NF4Linear.from_linear(getattr(module, name)))
            with settings.override(backend="auto", group_projections=group):
                fastpeft.patch(module, fastpeft.LoraConfig(r=r, lora_alpha=32, use_dora=dora,
                                                           target_modules=["q_proj", "k_proj", "v_proj"]))
            module.train()
            label = f"q/k/v {method} fwd+bwd, {M} rows, K={K}, {'grouped' if group else 'one by one'}"
            calls[label] = lambda module=module: torch.autograd.backward(module(x), grads)
    timings = {label: [] for label in calls}
    for i in range(rounds):
        for label in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            timings[label].append(host_us(calls[label]))
    return {label: statistics.median(v) for label, v in timings.items()}, timings


def _profile(fn, n=50):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=26, max_name_column_width=60)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


if __name__ == "__main__":
    main()

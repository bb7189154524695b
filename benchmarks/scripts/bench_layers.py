"""Layer benchmarks: one Llama-3-8B projection, frozen dense base vs PEFT vs fastpeft (LoRA r=16, IA3).

    python benchmarks/scripts/bench_layers.py --out results.json     (GPU: full shapes; CPU: tiny shapes)

Each row: method, projection, M, fwd ms and fwd+bwd ms (median of triton.testing.do_bench on CUDA, with
L2 flushed between calls; wall clock on CPU), ratio vs the dense base, and the floor (FLOPs and bytes over
the ceilings measured in the same run). Also imported by benchmarks/scripts/profile_layer.py and the
pytest-benchmark tier (benchmarks/tier/test_bench_layers.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
for _p in (os.path.join(BENCH, "helpers"), os.path.dirname(BENCH)):  # the timing helpers, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)
from bench_timing import timeit  # noqa: E402  (eager median ms per call; see its docstring)

# Llama-3-8B projections (in=K, out=N); k/v, q/o and gate/up share shapes and are timed once each.
LLAMA8B = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
TINY = {"q/o": (64, 64), "k/v": (64, 16), "gate/up": (64, 176), "down": (176, 64)}
RANK = 16
ALPHA = 32


def _seed():
    return int(torch.randint(0, 2**62, (1,)).item())


def build(method: str, K: int, N: int, dtype, device, feedforward: bool):
    """Returns (module-like callable, list of trainable params). All adapters random (never zeros)."""
    base = torch.nn.Linear(K, N, bias=False).to(device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    if method == "dense":
        return base, []
    if method.startswith("peft_lora"):
        import peft
        from peft.tuners.lora import Linear as PLinear

        p = 0.05 if method.endswith("p05") else 0.0
        m = PLinear(base, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p),
                    r=RANK, lora_alpha=ALPHA, lora_dropout=p)
        m.lora_A["default"].float()  # get_peft_model's default autocast_adapter_dtype keeps adapters fp32
        m.lora_B["default"].float()
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
        m.base_layer.weight.requires_grad_(False)
        m.train()
        return m, [m.lora_A["default"].weight, m.lora_B["default"].weight]
    if method.startswith("peft_dora"):
        import peft
        from peft.tuners.lora import Linear as PLinear

        p = 0.05 if method.endswith("p05") else 0.0
        m = PLinear(base, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, use_dora=True),
                    r=RANK, lora_alpha=ALPHA, lora_dropout=p)
        m.float()  # adapters fp32 as get_peft_model leaves them; the base back to its dtype below
        m.base_layer.to(dtype)
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
        m.base_layer.weight.requires_grad_(False)
        m.train()
        return m, [m.lora_A["default"].weight, m.lora_B["default"].weight, m.lora_magnitude_vector["default"].weight]
    if method in ("fastpeft_dora", "fastpeft_dora_p05"):
        from fastpeft.ops.kernels.dora import dora_linear, dora_weight_norm

        p = 0.05 if "p05" in method else 0.0
        A = (torch.randn(RANK, K, device=device) / K**0.5).requires_grad_()
        B = (torch.randn(N, RANK, device=device) * 0.02).requires_grad_()
        w = base.weight
        with torch.no_grad():
            norm = dora_weight_norm(w, A, B, ALPHA / RANK)
            mag = (norm * (1 + 0.1 * torch.rand_like(norm))).requires_grad_()

        def f(x):
            # out of autograd the layer serves the cached norm (nn/variants.py); in training it is recomputed
            cached = None if torch.is_grad_enabled() else norm
            return dora_linear(x, w, None, A, B, mag, ALPHA / RANK, p, _seed() if p > 0 else None, cached)

        return f, [A, B, mag]
    if method in ("fastpeft_lora_layer", "fastpeft_dora_layer", "fastpeft_qlora_layer", "fastpeft_qdora_layer"):
        # the drop-in module (what patch() installs): its path decision, and for DoRA out of training the cached
        # norm with LoRA's path rescaled (nn/variants.py). q*: the same on an NF4 + double-quant base
        # (fastpeft.quantize's NF4Linear: bnb's bytes without bitsandbytes)
        from fastpeft.nn import LoraLinear
        from fastpeft.quantize import NF4Linear

        if method.startswith("fastpeft_q"):
            base = NF4Linear.from_linear(base, compute_dtype=dtype).to(device)
        dora = method in ("fastpeft_dora_layer", "fastpeft_qdora_layer")
        m = LoraLinear(base, "default", r=RANK, lora_alpha=ALPHA, use_dora=dora)
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
        params = list(m.adapter_parameters("default"))
        if dora:
            with torch.no_grad():
                params[-1].mul_(1 + 0.1 * torch.rand_like(params[-1]))
        m.train()
        return m, params
    if method == "peft_ia3":
        import peft
        from peft.tuners.ia3 import Linear as PIA3

        cfg = peft.IA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
        m = PIA3(base, "default", config=cfg, fan_in_fan_out=False, is_feedforward=feedforward)
        m.ia3_l["default"].data = (torch.rand_like(m.ia3_l["default"].float()) + 0.5)
        m.base_layer.weight.requires_grad_(False)
        return m, [m.ia3_l["default"]]
    if method in ("fastpeft_lora", "fastpeft_lora_p05", "fastpeft_lora_triton", "fastpeft_lora_p05_triton",
                  "fastpeft_lora_split", "fastpeft_lora_p05_split"):
        from fastpeft.nn._rng import dropout_draw
        from fastpeft.ops import cpp_ops
        from fastpeft.ops.kernels.lora import lora_linear

        if cpp_ops.available():  # the C++ op's CUDA composition: *_split forces the split-GEMM one
            torch.ops.fastpeft_ops.set_lora_cuda_path(0 if method.endswith("_split") else -1)
        p = 0.05 if "p05" in method else 0.0
        A = (torch.randn(RANK, K, device=device) / K**0.5).requires_grad_()
        B = (torch.randn(N, RANK, device=device) * 0.02).requires_grad_()
        w = base.weight
        if not method.endswith("_triton") and cpp_ops.available():  # the default path on CUDA: the C++ operator
            def f(x):
                return cpp_ops.lora_linear(x, w, None, A, B, ALPHA / RANK, p, dropout_draw() if p > 0 else None)
        else:
            def f(x):
                return lora_linear(x, w, None, A, B, ALPHA / RANK, p, _seed() if p > 0 else None)

        return f, [A, B]
    if method in ("fastpeft_ia3", "fastpeft_ia3_triton"):
        from fastpeft.ops import cpp_ops
        from fastpeft.ops.kernels.ia3 import ia3_linear

        l = (torch.rand((1, K) if feedforward else (N, 1), device=device) + 0.5).requires_grad_()
        w = base.weight
        ia3 = ia3_linear if method.endswith("_triton") or not cpp_ops.available() else cpp_ops.ia3_linear

        def f(x):
            return ia3(x, w, None, l, feedforward)

        return f, [l]
    raise ValueError(method)


# fastpeft rows run the library's default path on CUDA (the C++ operators, ops/cpp_ops.py; the Triton kernels where
# the extension cannot be built); *_split rows force the C++ op's split-GEMM CUDA composition, *_triton rows the
# Triton kernels. (The *_triton / *_cublas rows of the
# 2026-11-23 results chose a Triton GEMM through switches the library has since dropped with that GEMM.)
METHODS = ["dense", "peft_lora", "peft_lora_p05", "fastpeft_lora", "fastpeft_lora_p05", "fastpeft_lora_split",
           "fastpeft_lora_p05_split", "fastpeft_lora_triton", "fastpeft_lora_p05_triton", "peft_ia3", "fastpeft_ia3",
           "fastpeft_ia3_triton", "peft_dora", "peft_dora_p05", "fastpeft_dora", "fastpeft_dora_p05", "fastpeft_lora_layer",
           "fastpeft_dora_layer"]


def make_step(fn, x, g, bwd: bool, params=None):
    """One call of ``fn`` on ``x``: forward only under no_grad, or forward + backward with ``g`` as dY. With
    ``params`` (the trainable tensors) the backward returns the gradients of x and params instead of accumulating
    them into ``.grad``: a model's layer hands dX to the op below it, and the first micro-batch's parameter
    gradients are assigned, not added, so a step with ``.backward`` times one [M, in] add per call that a real
    layer does not pay (the same for every method: it pulls the ratios towards 1)."""
    if not bwd:
        def step():
            with torch.no_grad():
                fn(x)
        return step
    if params is not None:
        inputs = [x] + [p for p in params if p.requires_grad]

        def step():
            torch.autograd.grad(fn(x), inputs, g)
        return step

    def step():
        y = fn(x)
        y.backward(g)
    return step


def ceilings(device):
    """Measured bf16 GEMM TFLOP/s (8192³) and device copy GB/s (read + write)."""
    if device != "cuda":
        return {"gemm_tflops": None, "copy_gbps": None}
    import triton

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    src = torch.randn(256 * 2**20, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms_c = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return {"gemm_tflops": 2 * 8192**3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / ms_c / 1e6}


def floor_ms(M, K, N, bwd, ceil):
    """Frozen base: fwd = one GEMM, fwd+bwd = two (Y and dX). Adapter terms are < 1% of either count."""
    if ceil["gemm_tflops"] is None:
        return None
    e = 2
    flops = 2 * M * N * K * (2 if bwd else 1)
    byts = (M * K + K * N + M * N) * e * (2 if bwd else 1)
    return max(flops / (ceil["gemm_tflops"] * 1e9), byts / (ceil["copy_gbps"] * 1e6))


def run(shapes=None, Ms=None, methods=None, dtype=torch.bfloat16, device=None, log=print):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        shapes = shapes or TINY
        Ms = Ms or [16]
        dtype = torch.float32
    shapes = shapes or LLAMA8B
    Ms = Ms or [4096, 16]
    methods = methods or METHODS
    ceil = ceilings(device)
    log(f"ceilings: {ceil}")
    rows = []
    for M in Ms:
        for name, (K, N) in shapes.items():
            ff = name == "down"
            dense = {}
            for method in methods:
                torch.manual_seed(0)
                try:
                    fn, _params = build(method, K, N, dtype, device, ff)
                except ImportError as e:  # peft missing
                    log(f"skip {method}: {e}")
                    continue
                x = torch.randn(M, K, device=device, dtype=dtype)
                xg = x.clone().requires_grad_()
                g = torch.randn(M, N, device=device, dtype=dtype)
                row = {"proj": name, "K": K, "N": N, "M": M, "method": method, "feedforward": ff}
                for bwd in (False, True):
                    key = "fwdbwd" if bwd else "fwd"
                    ms = timeit(make_step(fn, xg if bwd else x, g, bwd), device)
                    row[f"{key}_ms"] = ms
                    if method == "dense":
                        dense[key] = ms
                    row[f"{key}_x_dense"] = ms / dense[key] if key in dense else None
                    fl = floor_ms(M, K, N, bwd, ceil)
                    row[f"{key}_floor_ms"] = fl
                    row[f"{key}_x_floor"] = ms / fl if fl else None
                rows.append(row)
                log(f"M={M:5d} {name:8s} {method:26s} fwd {row['fwd_ms']:.4f} ms ({row['fwd_x_dense']:.3f}x)"
                    f"  fwd+bwd {row['fwdbwd_ms']:.4f} ms ({row['fwdbwd_x_dense']:.3f}x)")
                del fn
    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": str(dtype),
        "rank": RANK,
        "ceilings": ceil,
        "rows": rows,
    }
    return info


def table(info) -> str:
    out = ["| M | proj | method | fwd ms | ×dense | fwd+bwd ms | ×dense | ×floor (fwd+bwd) |", "|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        xf = f"{r['fwdbwd_x_floor']:.2f}" if r["fwdbwd_x_floor"] else "-"
        out.append(f"| {r['M']} | {r['proj']} | {r['method']} | {r['fwd_ms']:.4f} | {r['fwd_x_dense']:.3f} | "
                   f"{r['fwdbwd_ms']:.4f} | {r['fwdbwd_x_dense']:.3f} | {xf} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--M", type=int, nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    a = ap.parse_args()
    info = run(Ms=a.M, methods=a.methods)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    print(table(info))

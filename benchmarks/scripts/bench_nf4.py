"""QLoRA / NF4 benchmarks: dequant bandwidth, layer fwd+bwd (dense bf16 vs PEFT+bnb vs fastpeft), the
buffer-vs-fused crossover in M, and decode (M = 1, 16) against the weight-bandwidth floor.

    python benchmarks/scripts/bench_nf4.py --out nf4.json        (CUDA: Llama-3-8B shapes; CPU: tiny shapes)

Times: median of triton.testing.do_bench on CUDA (L2 flushed between calls), wall clock on CPU. Every
section records the floor it is measured against (bytes / measured copy bandwidth). Sections that need
bitsandbytes' CUDA library or PEFT are skipped (with the reason in the JSON) when those are missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    # Triton's own switch (not a fastpeft setting): read once, when fastpeft defines its kernels, so it is set
    # here, before the import below; under pytest, benchmarks/conftest.py and tests/conftest.py set it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
for _p in (os.path.join(BENCH, "helpers"), os.path.dirname(BENCH)):  # the timing helpers, the repo's fastpeft
    if _p not in sys.path:
        sys.path.insert(0, _p)
from bench_timing import graph_ms, timeit  # noqa: E402  (CUDA-graph GPU time, eager median; see their docstrings)

import fastpeft  # noqa: E402
from fastpeft import settings  # noqa: E402  (the FASTPEFT_* switches: settings.override restores them on exit)

LLAMA8B = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
TINY = {"q/o": (64, 64), "k/v": (64, 32), "gate/up": (64, 128), "down": (128, 64)}
RANK, ALPHA = 16, 32
K_SPLITS = (1,)  # decode_graph's fixed K splits of the CUDA GEMV beside the per-call default (1: never split; session 32
# swept 1, 2, 3, 4, 6, 8: 2 won on k/v only)


def bench(fn, cuda: bool) -> float:
    """Median ms (eager, host included): bench_timing.timeit (triton do_bench on CUDA, wall clock on CPU)."""
    return timeit(fn, "cuda" if cuda else "cpu")


def _copies(nbytes: int, cold_bytes: int = 160 << 20) -> int:
    """Weight copies needed so that one graph replay streams ``cold_bytes`` (> 3x the H100's 50 MB L2)."""
    return max(2, -(-cold_bytes // max(1, nbytes)))


def copy_bandwidth(device, cuda) -> float:
    n = (256 << 20) if cuda else (4 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), cuda)
    return 2 * n / (ms * 1e-3) / 1e9  # GB/s (read + write)


def _quant(N, K, device, dtype, bs=64, dq=True):
    from fastpeft.ops.nf4_quantize import quantize_nf4

    w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
    return w, *quantize_nf4(w, blocksize=bs, compress_statistics=dq)


def dequant_section(shapes, device, cuda, bw, rows):
    from fastpeft.ops.kernels import nf4_dequant as nf4

    dtype = torch.bfloat16 if cuda else torch.float32
    for name, (K, N) in shapes.items():
        if name in ("k/v", "down"):
            continue
        _, packed, qs = _quant(N, K, device, dtype)
        n = N * K
        nbytes = n // 2 + qs.absmax.numel() + 4 * qs.state2.absmax.numel() + n * torch.finfo(dtype).bits // 8
        floor_ms = nbytes / (bw * 1e9) * 1e3
        out = torch.empty(n, dtype=dtype, device=device)
        variants = [("select", 4096, 4), ("select", 8192, 8), ("select", 2048, 4), ("load", 4096, 4)]
        if not cuda:
            variants = variants[:1]
        for lut, bpp, nw in variants:
            ms = bench(lambda: nf4.nf4_dequantize_triton(packed, qs, dtype, out=out, lut=lut, bytes_per_program=bpp,
                                                         num_warps=nw), cuda)
            rows.append(dict(section="dequant", shape=name, N=N, K=K, impl=f"fastpeft lut={lut} bytes={bpp} warps={nw}",
                             ms=ms, GBps=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms, frac_of_copy_bw=floor_ms / ms))
        if cuda:
            try:
                import bitsandbytes.functional as bnbf

                pb, sb = bnbf.quantize_4bit(torch.randn(N, K, device=device, dtype=dtype) * 0.02, blocksize=64,
                                            compress_statistics=True, quant_type="nf4")
                ms = bench(lambda: bnbf.dequantize_4bit(pb, sb), cuda)
                rows.append(dict(section="dequant", shape=name, N=N, K=K, impl="bitsandbytes", ms=ms,
                                 GBps=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms, frac_of_copy_bw=floor_ms / ms))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(section="dequant", shape=name, impl="bitsandbytes", skipped=repr(exc)))


def _bnb_layer(K, N, device, dtype):
    import bitsandbytes as bnb

    lin = torch.nn.Linear(K, N, bias=False, dtype=dtype)
    lin.weight.data.normal_(0, 0.02)
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    q = q.to(device)
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = False
    return lin.to(device), q


def _layer(method, K, N, device, dtype, p):
    """(callable module, params) for method in dense | peft_qlora | fastpeft_qlora."""
    lin, q = _bnb_layer(K, N, device, dtype)
    lin.weight.requires_grad_(False)
    if method == "dense":
        return lin
    if method == "peft_qlora":
        import peft
        from peft.tuners.lora.bnb import Linear4bit as PLinear4bit

        m = PLinear4bit(q, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p), r=RANK,
                        lora_alpha=ALPHA, lora_dropout=p, init_lora_weights=False)
        m.train()
        return m
    # each layer takes the backend current when it is built; on CPU the kernels run under the interpreter
    with settings.override(backend="auto" if device.type == "cuda" else "triton"):
        m = fastpeft.LoraLinear(q, "default", r=RANK, lora_alpha=ALPHA, lora_dropout=p, init_lora_weights=False)
    m.train()
    return m


def layer_section(shapes, device, cuda, rows, Ms, methods, paths=("auto",), log=None):
    """fwd+bwd and no-grad forward per (shape, M, method, path); with ``log`` each row is also printed as it
    lands (a run cut by its time limit keeps what it measured)."""
    dtype = torch.bfloat16 if cuda else torch.float32
    for name, (K, N) in shapes.items():
        for M in Ms:
            for method, p in methods:
                for path in (paths if method == "fastpeft_qlora" else ("-",)):
                    try:
                        with settings.override(nf4_gemm=path if path != "-" else "auto"):  # read per call
                            m = _layer(method, K, N, device, dtype, p)
                            x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
                            dy = torch.randn(M, N, device=device, dtype=dtype)

                            def fwd_bwd():
                                y = m(x)
                                y.backward(dy)

                            def fwd():
                                with torch.no_grad():
                                    m(x)

                            t_fb = bench(fwd_bwd, cuda)
                            t_f = bench(fwd, cuda)
                        rows.append(dict(section="layer", shape=name, K=K, N=N, M=M, method=method, dropout=p,
                                         path=path, fwd_bwd_ms=t_fb, fwd_nograd_ms=t_f))
                        if log:
                            print(json.dumps(rows[-1]), flush=True)
                    except Exception as exc:  # noqa: BLE001
                        rows.append(dict(section="layer", shape=name, M=M, method=method, dropout=p, path=path,
                                         skipped=repr(exc)[:400]))
    # ratios against the dense base of the same shape / M
    base = {(r["shape"], r["M"]): r["fwd_bwd_ms"] for r in rows if r.get("section") == "layer"
            and r.get("method") == "dense" and "fwd_bwd_ms" in r}
    for r in rows:
        if r.get("section") == "layer" and "fwd_bwd_ms" in r and (r["shape"], r["M"]) in base:
            r["ratio_vs_dense"] = r["fwd_bwd_ms"] / base[(r["shape"], r["M"])]


def decode_section(shapes, device, cuda, bw, rows, Ms=(1, 4, 16)):
    from fastpeft.ops.kernels import nf4_gemv, nf4_lora
    from fastpeft.ops.nf4_format import kernel_state

    dtype = torch.bfloat16 if cuda else torch.float32
    problem = nf4_gemv.toolchain_problem() if cuda else "no CUDA"
    build_s = None
    if cuda and problem is None:
        t = time.perf_counter()
        try:
            nf4_gemv.load_extension()
            build_s = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001
            problem = repr(exc)[:600]
    rows.append(dict(section="decode_build", toolchain_problem=problem, build_or_load_s=build_s))
    for name, (K, N) in shapes.items():
        _, packed, qs = _quant(N, K, device, dtype)
        A = torch.randn(RANK, K, device=device) * 0.02
        B = torch.randn(N, RANK, device=device) * 0.02
        wbytes = N * K // 2 + qs.absmax.numel() + 4 * qs.state2.absmax.numel()
        floor_ms = wbytes / (bw * 1e9) * 1e3
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            impls = {
                "fastpeft triton mm": lambda: nf4_gemv.nf4_lora_gemv_triton(x, packed, kernel_state(qs, x.device), None, A, B, 2.0),
            }
            if cuda and problem is None:
                impls["fastpeft cuda gemv"] = lambda: nf4_gemv.nf4_lora_gemv(x, packed, kernel_state(qs, x.device), None, A, B, 2.0, backend="cuda")

            def buffer_path():
                w = nf4_lora.dequantize_to(packed, kernel_state(qs, packed.device), dtype)
                return torch.addmm(((x @ A.to(dtype).t()) @ B.to(dtype).t()) * 2.0, x, w.t())

            impls["fastpeft dequant-buffer + cuBLAS"] = buffer_path
            if cuda:
                try:
                    _, q = _bnb_layer(K, N, device, dtype)
                    import peft
                    from peft.tuners.lora.bnb import Linear4bit as PLinear4bit

                    pm = PLinear4bit(q, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA), r=RANK,
                                     lora_alpha=ALPHA, init_lora_weights=False).eval()
                    impls["PEFT+bnb"] = lambda: pm(x)
                    impls["bnb base only"] = lambda: q(x)
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(section="decode", shape=name, impl="PEFT+bnb", skipped=repr(exc)[:300]))
            for impl, fn in impls.items():
                try:
                    with torch.no_grad():
                        ms = bench(fn, cuda)
                    rows.append(dict(section="decode", shape=name, K=K, N=N, M=M, impl=impl, us=ms * 1e3,
                                     floor_us=floor_ms * 1e3, frac_of_copy_bw=floor_ms / ms,
                                     weight_GBps=wbytes / (ms * 1e-3) / 1e9))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(section="decode", shape=name, M=M, impl=impl, skipped=repr(exc)[:400]))


def _kernel_form(call, variant=None, k_split=None):
    """call() with another form of the CUDA GEMV kernel than the default (nf4_gemv.set_kernel_variant: 0 the
    original, 1 its lean addressing, 3 the code-pair table; the default 2 is the lean one with the mma operands
    swapped) and / or another K split (nf4_gemv.set_k_split: 1..8 blocks a tile; the default 0 chooses per call);
    captured into the graph as launched."""
    from fastpeft.ops.kernels import nf4_gemv

    previous = (nf4_gemv.set_kernel_variant(variant) if variant is not None else None,
                nf4_gemv.set_k_split(k_split) if k_split is not None else None)
    try:
        return call()
    finally:
        if previous[0] is not None:
            nf4_gemv.set_kernel_variant(previous[0])
        if previous[1] is not None:
            nf4_gemv.set_k_split(previous[1])


def decode_graph_section(shapes, device, bw, rows, Ms=(1, 4, 8, 16)):
    """Decode (no grad, M <= 16) GPU time per layer call against the weight-byte floor, CUDA-graph timed with
    cold L2 (graph_ms). Impls: CUDA MMA GEMV (with LoRA -- its GEMV overlapping the shrink, and not: "no overlap" --,
    without LoRA; and its other forms, ``set_kernel_variant(0 / 1 / 3)``: "original form", "lean", "pair", with and
    without LoRA), the Triton fallback,
    dequant-buffer + cuBLAS,
    bnb base only, PEFT+bnb, and a copy moving the same bytes (half read, half written): what one launch moving
    these bytes reaches at this size, where the big-copy bandwidth floor (floor_us) ignores launch and ramp-up
    time."""
    from fastpeft.ops.kernels import nf4_gemv, nf4_lora
    from fastpeft.ops.nf4_format import kernel_state

    dtype = torch.bfloat16
    problem = nf4_gemv.toolchain_problem()
    t = time.perf_counter()
    default_form = None
    try:
        nf4_gemv.load_extension()
        default_form = nf4_gemv.set_kernel_variant(2)  # read the default (the unlabelled rows' form), then restore it
        nf4_gemv.set_kernel_variant(default_form)
    except Exception as exc:  # noqa: BLE001
        problem = repr(exc)[:600]
    rows.append(dict(section="decode_graph_build", toolchain_problem=problem, build_or_load_s=time.perf_counter() - t,
                     default_kernel_variant=default_form))
    for name, (K, N) in shapes.items():
        wbytes = N * K // 2 + N * K // 64 + 4 * (N * K // (64 * 256))  # packed + uint8 absmax + nested fp32
        lora_bytes = 4 * RANK * (K + N)
        floor_us = wbytes / (bw * 1e9) * 1e6
        n_copies = _copies(wbytes)
        weights = [_quant(N, K, device, dtype)[1:] for _ in range(n_copies)]
        A = torch.randn(RANK, K, device=device) * 0.02
        B = torch.randn(N, RANK, device=device) * 0.02
        bnb_layers = []
        try:
            import peft
            from peft.tuners.lora.bnb import Linear4bit as PLinear4bit

            for _ in range(n_copies):
                _, q = _bnb_layer(K, N, device, dtype)
                pm = PLinear4bit(q, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA), r=RANK,
                                 lora_alpha=ALPHA, init_lora_weights=False).eval()
                bnb_layers.append((q, pm))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(section="decode_graph", shape=name, impl="bnb", skipped=repr(exc)[:300]))
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            try:  # the K split the default rows' calls take (chosen per call)
                default_k_split = nf4_gemv.k_split_for(N, K)
            except Exception:  # noqa: BLE001
                default_k_split = None
            impls = {
                "fastpeft cuda mma gemv": lambda pk, qs: nf4_gemv.nf4_lora_gemv(x, pk, kernel_state(qs, x.device), None, A, B, 2.0,
                                                                                backend="cuda"),
                "fastpeft cuda mma gemv, no overlap": lambda pk, qs: nf4_gemv.nf4_lora_gemv_cuda(
                    x, pk, kernel_state(qs, x.device), None, A, B, 2.0, overlap=False),
                "fastpeft cuda mma gemv, base only": lambda pk, qs: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, None, None, 0.0, backend="cuda"),
                "fastpeft cuda mma gemv, original form": lambda pk, qs: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, A, B, 2.0, backend="cuda"), variant=0),
                "fastpeft cuda mma gemv, original form, base only": lambda pk, qs: _kernel_form(
                    lambda: nf4_gemv.nf4_lora_gemv(x, pk, kernel_state(qs, x.device), None, None, None, 0.0,
                                                   backend="cuda"), variant=0),
                "fastpeft cuda mma gemv, lean": lambda pk, qs: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, A, B, 2.0, backend="cuda"), variant=1),
                "fastpeft cuda mma gemv, lean, base only": lambda pk, qs: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, None, None, 0.0, backend="cuda"), variant=1),
                "fastpeft cuda mma gemv, pair": lambda pk, qs: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, A, B, 2.0, backend="cuda"), variant=3),
                "fastpeft cuda mma gemv, pair, base only": lambda pk, qs: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                    x, pk, kernel_state(qs, x.device), None, None, None, 0.0, backend="cuda"), variant=3),
                "fastpeft triton mm": lambda pk, qs: nf4_gemv.nf4_lora_gemv_triton(x, pk, kernel_state(qs, x.device), None, A, B, 2.0),
                "fastpeft dequant-buffer + cuBLAS": lambda pk, qs: torch.addmm(
                    ((x @ A.to(dtype).t()) @ B.to(dtype).t()) * 2.0, x, nf4_lora.dequantize_to(pk, kernel_state(qs, pk.device), dtype).t()),
            }
            for k_split in K_SPLITS:  # fixed K splits, base only (the default chooses one per call)
                impls[f"fastpeft cuda mma gemv, base only, k split {k_split}"] = (
                    lambda pk, qs, k_split=k_split: _kernel_form(lambda: nf4_gemv.nf4_lora_gemv(
                        x, pk, kernel_state(qs, x.device), None, None, None, 0.0, backend="cuda"), k_split=k_split))
            if M == Ms[0]:
                half = wbytes // 2
                copy_of = {id(pk): (torch.empty(half, dtype=torch.uint8, device=device),
                                    torch.empty(half, dtype=torch.uint8, device=device)) for pk, _ in weights}
                impls["copy, same bytes"] = lambda pk, qs: copy_of[id(pk)][1].copy_(copy_of[id(pk)][0])
            for impl, fn in impls.items():
                try:
                    with torch.no_grad():
                        us = graph_ms([(lambda pk=pk, qs=qs: fn(pk, qs)) for pk, qs in weights]) * 1e3
                    rows.append(dict(section="decode_graph", shape=name, K=K, N=N, M=M, impl=impl, us=us,
                                     floor_us=floor_us, frac_of_copy_bw=floor_us / us, copies=n_copies,
                                     lora_bytes=lora_bytes, default_k_split=default_k_split))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(section="decode_graph", shape=name, M=M, impl=impl, skipped=repr(exc)[:400]))
                print(json.dumps(rows[-1]), flush=True)
            for impl, pick in (("bnb base only", 0), ("PEFT+bnb", 1)):
                if not bnb_layers:
                    break
                try:
                    with torch.no_grad():
                        us = graph_ms([(lambda m=layer[pick]: m(x)) for layer in bnb_layers]) * 1e3
                    rows.append(dict(section="decode_graph", shape=name, K=K, N=N, M=M, impl=impl, us=us,
                                     floor_us=floor_us, frac_of_copy_bw=floor_us / us, copies=n_copies))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(section="decode_graph", shape=name, M=M, impl=impl, skipped=repr(exc)[:400]))
                print(json.dumps(rows[-1]), flush=True)
        del weights, bnb_layers
        torch.cuda.empty_cache()


def crossover_graph_section(shapes, device, bw, rows, Ms=(1, 4, 16, 32, 64, 128, 256, 512)):
    """Training fwd+bwd GPU time per layer (CUDA graph, cold L2) for the two NF4 paths -- "fused" (in-kernel
    dequant GEMM) vs "buffer" (dequant into the shared buffer + cuBLAS) -- and the dense bf16 base, per M:
    the measurement behind ``fastpeft/ops/kernels/nf4_lora.py: FUSED_MAX_M``."""
    dtype = torch.bfloat16
    for name, (K, N) in shapes.items():
        wbytes = N * K // 2 + N * K // 64
        n_copies = _copies(wbytes)
        layers = []
        for _ in range(n_copies):
            lin, q = _bnb_layer(K, N, device, dtype)
            with settings.override(backend="auto"):  # taken by the layer when it is built
                m = fastpeft.LoraLinear(q, "default", r=RANK, lora_alpha=ALPHA, init_lora_weights=False).train()
            layers.append((lin.requires_grad_(False), m))
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            floor_us = 2 * wbytes / (bw * 1e9) * 1e6  # forward + dX each stream the 4-bit weight once
            for path in ("dense", "buffer", "fused"):
                try:
                    def step(mod):
                        mod(x).backward(dy)

                    with settings.override(nf4_gemm="auto" if path == "dense" else path):  # read per call
                        us = graph_ms([(lambda mod=(lin if path == "dense" else m): step(mod))
                                       for lin, m in layers]) * 1e3
                    rows.append(dict(section="crossover_graph", shape=name, K=K, N=N, M=M, path=path,
                                     fwd_bwd_us=us, nf4_floor_us=floor_us, copies=n_copies))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(section="crossover_graph", shape=name, M=M, path=path,
                                     skipped=repr(exc)[:400]))
                print(json.dumps(rows[-1]), flush=True)
        del layers
        torch.cuda.empty_cache()


def env_info(device):
    import triton

    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("bitsandbytes", "peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"unavailable: {exc!r}"[:200]
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="dequant,decode,layer,crossover",
                    help="comma-separated; CUDA only: decode_graph, crossover_graph (GPU time, cold L2)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shapes = LLAMA8B if cuda else TINY
    rows: list = []
    out = dict(env=env_info(device), rows=rows)
    bw = copy_bandwidth(device, cuda)
    out["copy_GBps"] = bw
    sections = args.sections.split(",")
    steps = {
        "dequant": lambda: dequant_section(shapes, device, cuda, bw, rows),
        "decode": lambda: decode_section(shapes, device, cuda, bw, rows),
        "layer": lambda: layer_section(shapes, device, cuda, rows, [4096 if cuda else 64],
                                       [("dense", 0.0), ("peft_qlora", 0.0), ("fastpeft_qlora", 0.0),
                                        ("peft_qlora", 0.05), ("fastpeft_qlora", 0.05)]),
        "crossover": lambda: layer_section({k: shapes[k] for k in ("q/o", "gate/up", "down")}, device, cuda, rows,
                                           [1, 8, 16, 32, 64, 128, 256, 512] if cuda else [1, 16],
                                           [("fastpeft_qlora", 0.0)], paths=("buffer", "fused"),
                                           log=args.out),
    }
    steps["decode_graph"] = lambda: decode_graph_section(shapes, device, bw, rows)
    steps["crossover_graph"] = lambda: crossover_graph_section(shapes, device, bw, rows)
    for s in sections:
        t = time.perf_counter()
        try:
            steps[s]()
        except Exception:  # noqa: BLE001
            rows.append(dict(section=s, error=traceback.format_exc()[-1500:]))
        print(f"[nf4 bench] {s}: {time.perf_counter() - t:.1f}s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    for r in rows:
        print(json.dumps(r))
    return out


if __name__ == "__main__":
    main()

"""Where one training step's time goes: one extra step under ``torch.profiler``, its kernels (CPU ops on a
CPU-only run) attributed to the innermost op that launched them and summed into buckets (linear, nf4 dequant,
attention, norm+elementwise, loss, optimizer).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from .environment import sync

BUCKETS = ["linear", "nf4 dequant", "attention", "norm+elementwise", "loss", "optimizer"]
_RULES = [  # first match on the innermost op that matches wins
    ("optimizer", ("optimizer.step", "adamw", "_fused_adam", "zero_grad", "_foreach_")),
    ("loss", ("cross_entropy", "crossentropy", "nll_loss", "nllloss", "log_softmax", "logsoftmax",
              "bench::loss")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "sdpa", "fmha")),
    ("nf4 dequant", ("dequant",)),
    ("linear", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mmbackward",
                "addmmbackward", "bmmbackward", "lora", "ia3", "matmul4bit", "gemm", "_scaled_mm")),
]


def classify(names: List[str]) -> str:
    """Bucket of a kernel from the op names around its launch, innermost first (default: norm+elementwise:
    RMSNorm, SwiGLU, RoPE, residual adds, dtype casts, embedding...)."""
    for name in names:
        low = name.lower()
        for bucket, keys in _RULES:
            if any(k in low for k in keys):
                return bucket
    return "norm+elementwise"


def profile_step(prep: Any, device: str) -> Dict[str, Any]:
    """One more training step of ``prep`` (a harness.Prepared: model, batch, optimizer, step function) under
    torch.profiler: device time per bucket (CPU time on a CPU-only run).

    Kernels are attributed to the innermost profiled op that launched them (aten ops, autograd Functions
    such as fastpeft's _LoraLinearFn / bnb's MatMul4Bit, and their backward nodes; recomputed layers count
    as themselves). The loss bucket is HF's loss function (logits upcast, log-softmax, NLL) in forward and
    the log-softmax / NLL backward nodes; the output head's matmul is linear.
    """
    model = prep.model
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    had_loss_fn = "_loss_function" in root.__dict__
    orig = root.loss_function

    def loss_fn(*a, **k):
        with record_function("bench::loss"):
            return orig(*a, **k)

    root.loss_function = loss_fn
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        sync(device)
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            prep.step()
            sync(device)
            wall = time.perf_counter() - t
    finally:
        if had_loss_fn:
            root.loss_function = orig
        else:
            root.__dict__.pop("_loss_function", None)
    t_parse = time.perf_counter()
    events = prof.events()
    buckets = {b: 0.0 for b in BUCKETS}
    attributed = 0.0
    kernels_total = 0.0
    top: Dict[str, List[float]] = {}
    for evt in events:
        if device == "cuda" and evt.device_type == DeviceType.CUDA:
            dur = evt.time_range.elapsed_us()
            kernels_total += dur
            acc = top.setdefault(evt.name, [0.0, 0])
            acc[0] += dur
            acc[1] += 1
            continue
        if evt.device_type != DeviceType.CPU or getattr(evt, "is_async", False):
            continue
        if device == "cuda":  # the kernels this op launched itself (children's kernels sit on the children)
            parts = [(k.name, k.duration) for k in evt.kernels if k.duration > 0]
        else:
            parts = [(evt.name, evt.self_cpu_time_total)] if evt.self_cpu_time_total > 0 else []
        if not parts:
            continue
        names, e = [], evt
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        bucket = classify(names)
        for kname, t_us in parts:
            # a dequant kernel launched inside an adapter's autograd Function still counts as dequant
            buckets["nf4 dequant" if "dequant" in kname.lower() else bucket] += t_us
            attributed += t_us
            if device != "cuda":
                acc = top.setdefault(kname, [0.0, 0])
                acc[0] += t_us
                acc[1] += 1
    total = max(kernels_total, attributed)
    out = {b: v / 1e3 for b, v in buckets.items()}
    out["other (unattributed)"] = max(total - attributed, 0.0) / 1e3
    top_rows = sorted(top.items(), key=lambda kv: -kv[1][0])[:15]
    return {"ms": out, "busy_ms": total / 1e3, "wall_ms": wall * 1e3, "time": "device" if device == "cuda" else "cpu",
            "top": [{"name": n[:160], "ms": v[0] / 1e3, "calls": v[1]} for n, v in top_rows],
            "parse_s": time.perf_counter() - t_parse}


"""One benchmark run: the plan's configurations in order, with a progress bar and a running time estimate
(rescaled as configurations finish; ``--budget-s`` skips what would end past the budget), the JSON rewritten
after every configuration (a killed run keeps what it measured), then markdown and plots.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import settings
from .environment import device_name, device_slug, gemm_tflops, gpu_memory_bytes, versions
from .harness import new_row, run_config
from .plan import ALPHA, DROPOUT, IA3_TARGETS, MODELS, RANK, SCHEMA, GiB, batch_shape_of, make_plan, predict_s
from .reporting import free_stem, markdown, output_stem, require_plotting, write_json, write_plots

def run(models: List[str], methods: List[str], device: str, steps: int, warmup: int, out_dir: Optional[str],
        profile_methods: List[str], dtype: torch.dtype = torch.bfloat16, budget_s: Optional[float] = None,
        plots: bool = True, backend: Optional[str] = None, progress: bool = True,
        log: Callable[[str], None] = print, overwrite: bool = False,
        compile_mode: Optional[str] = None, batch_shape: Optional[tuple] = None) -> Dict[str, Any]:
    """Run the plan; write JSON after each configuration and markdown + plots at the end, under
    ``step_<date>[_<models>]`` or, if an earlier run wrote files under that name and ``overwrite`` is off,
    the first free ``..._run2``, ``..._run3`` (``reporting.free_stem``). ``compile_mode``: every row's step runs
    ``torch.compile(model, mode=compile_mode)`` (the files are named ``step_compile-<mode>_<date>...``).
    ``batch_shape``: (batch, tokens per sequence) for every model instead of its default (``plan.SEQ``); the
    files then end in ``_b<batch>x<seq>``."""
    t_start = time.perf_counter()
    date = datetime.date.today().isoformat()
    info: Dict[str, Any] = {
        "schema": SCHEMA, "date": date, "device": device_name(device), "device_slug": device_slug(device),
        "gpu_memory_gib": (gpu_memory_bytes(device) or 0) / GiB or None, "versions": versions(),
        "settings": {"dtype": str(dtype).replace("torch.", ""), "rank": RANK, "lora_alpha": ALPHA,
                     "lora_dropout": DROPOUT, "ia3_targets": IA3_TARGETS, "steps": steps, "warmup": warmup,
                     "gradient_checkpointing": "non-reentrant", "optimizer": "torch AdamW" + (
                         " (fused)" if device == "cuda" else ""), "attention": "sdpa",
                     "fastpeft_backend": backend or settings.get().backend, "compile": compile_mode,
                     "shapes": {m: {**MODELS[m], "batch": batch_shape_of(m, batch_shape)[0],
                                    "seq": batch_shape_of(m, batch_shape)[1]} for m in models}},
        "gemm_tflops": None, "rows": [], "notes": [],
    }
    if device != "cuda":
        info["notes"].append("No CUDA device: tiny shapes on the CPU; numbers are a smoke test, not a measurement; "
                             "peak memory is the process's peak RSS.")
    if plots:
        require_plotting()
    out_dir = out_dir or os.path.join("benchmarks", "results", info["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    stem = free_stem(out_dir, output_stem(models, date, compile_mode, batch_shape), overwrite)
    info["gemm_tflops"] = gemm_tflops(device)
    if info["gemm_tflops"]:
        log(f"bf16 GEMM 8192^3: {info['gemm_tflops']:.0f} TFLOP/s (the MFU denominator)")
    plan = make_plan(models, methods)
    profile_model = models[-1]  # the largest model of the run (models are ordered small to large)
    profiled = [s.method in profile_methods and s.model == profile_model for s in plan]
    predicted = [predict_s(s, steps, warmup, prof, batch_shape) for s, prof in zip(plan, profiled)]
    log(f"plan: {len(plan)} configurations, about {sum(predicted):.0f} s by the H100 priors"
        + (f" (budget {budget_s:.0f} s)" if budget_s else ""))
    bar = _progress(len(plan), progress)
    done_pred = done_real = 0.0
    for k, spec in enumerate(plan):
        scale = (done_real / done_pred) if done_pred > 0 else 1.0
        remaining = scale * sum(predicted[k:])
        elapsed = time.perf_counter() - t_start
        bar.set_postfix_str(f"{spec.label} | {elapsed:.0f} s, ~{remaining:.0f} s left")
        if budget_s is not None and elapsed + scale * predicted[k] > budget_s:
            row = new_row(spec)
            row.update(status="skipped", reason=f"time budget: {elapsed:.0f} s elapsed + ~{scale * predicted[k]:.0f} s "
                                                f"predicted > --budget-s {budget_s:.0f}")
        else:
            row = run_config(spec, device, dtype, steps, warmup, info["gemm_tflops"], profile=profiled[k],
                             backend=backend, log=bar.write, compile_mode=compile_mode, batch_shape=batch_shape)
            if row.get("wall_s") and row["status"] != "skipped":
                done_pred += predicted[k]
                done_real += row["wall_s"]
        info["rows"].append(row)
        bar.write(describe(row))
        bar.update(1)
        write_json(info, stem + ".json")
    bar.close()
    info["wall_s"] = time.perf_counter() - t_start
    write_json(info, stem + ".json")
    md = markdown(info)
    with open(stem + ".md", "w") as f:
        f.write(md)
    files = [stem + ".json", stem + ".md"]
    if plots:
        files += write_plots(info, stem)
    info["files"] = files
    log(md)
    log(f"wrote {', '.join(files)} in {info['wall_s']:.0f} s")
    return info


class _NoBar:
    def __init__(self, log=print):
        self.write = log

    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        raise SystemExit("fastpeft.bench: tqdm is needed for the progress bar: pip install -e '.[bench]' "
                         "(or pass --no-progress)")
    return tqdm(total=total, desc="bench", unit="cfg", file=sys.stderr, mininterval=0, dynamic_ncols=False,
                ncols=110)


def describe(row: Dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['label']:<48} {row['status'].upper()}: {row['reason']}"
    mem = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f} GiB"
    mem_label = "host RSS" if row.get("peak_kind") == "rss" else "peak"
    mfu = "" if row.get("mfu") is None else f"  MFU {100 * row['mfu']:.1f}%"
    prof = ""
    if isinstance(row.get("profile"), dict) and "ms" in row["profile"]:
        p = row["profile"]
        prof = "\n    profile (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p["ms"].items() if v > 0) + \
            f" | busy {p['busy_ms']:.1f} of wall {p['wall_ms']:.1f}"
    leak = row.get("allocated_before_gib") or 0.0
    if leak > 0.25:
        prof += f"\n    warning: {leak:.2f} GiB still allocated before this configuration was built (counted in its peak)"
    return (f"{row['label']:<48} {row['tokens_per_s']:>10,.0f} tok/s  step {1e3 * row['step_s']:.1f} ms  {mem_label} {mem}"
            f"{mfu}  loss {row['loss_first']:.3f}->{row['loss_last']:.3f}  (build {row['build_s']:.1f} s){prof}")


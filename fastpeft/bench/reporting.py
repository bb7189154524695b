"""The benchmark's outputs: the step JSON (written atomically), the markdown tables (peak memory, speed with
the targets' verdicts, the profiler breakdown, what was not measured), the PNG plots (tokens/s and peak memory,
PEFT vs fastpeft per method) and ``report``, which merges the JSON of split runs and writes all of them again.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from .plan import (
    IMPL_LABEL,
    LEAN_MEMORY_TARGET,
    MEMORY_TARGET,
    METHOD_LABEL,
    MODELS,
    SEQ,
    SPEED_TARGET,
    TABLE_ORDER,
    peft_baseline,
)
from .profiling import BUCKETS


# -- files -----------------------------------------------------------------------------------------------
OUTPUT_SUFFIXES = (".json", ".md", "_tokens.png", "_memory.png")  # what one run writes per stem


def output_stem(models: List[str], date: str, compile_mode: Optional[str] = None,
                batch_shape: Optional[tuple] = None) -> str:
    tag = "" if set(models) >= {"1b", "8b"} or models == ["tiny"] else "_" + "-".join(models)
    kind = "" if compile_mode is None else f"compile-{compile_mode}_"
    shape = "" if not batch_shape else f"_b{batch_shape[0]}x{batch_shape[1]}"
    return f"step_{kind}{date}{tag}{shape}"


def _batch_seq(info, model: str) -> tuple:
    """(batch, tokens per sequence) the run used for ``model``: its recorded shape, else the default."""
    shape = info.get("settings", {}).get("shapes", {}).get(model) or {}
    return (shape["batch"], shape["seq"]) if "batch" in shape and "seq" in shape else SEQ[model]


def free_stem(out_dir: str, name: str, overwrite: bool = False) -> str:
    """``out_dir/name``, or -- when an earlier run already wrote files under that name and ``overwrite`` is off --
    the first free ``name_run2``, ``name_run3``, ... (a second run on the same day keeps the first one's files)."""
    base = os.path.join(out_dir, name)
    if overwrite:
        return base
    stem, k = base, 1
    while any(os.path.exists(stem + suffix) for suffix in OUTPUT_SUFFIXES):
        k += 1
        stem = f"{base}_run{k}"
    return stem


def write_json(info: Dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, path)


# -- tables ----------------------------------------------------------------------------------------------
def _find(rows, model, method, impl):
    for r in rows:
        if r["model"] == model and r["method"] == method and r["impl"] == impl:
            return r
    return None


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _status(r) -> str:
    if r["status"] == "oom":
        est = r.get("estimate_gib")
        tried = "not tried" not in (r.get("reason") or "")
        return "OOM" + (f" (est. {est:.0f} GiB{'' if tried else ', not tried'})" if est else "")
    return r["status"]


def _gib(r) -> str:
    if r is None:
        return "not run"
    if r["status"] == "ok":
        return "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f} GiB"
    return _status(r)


def _models_in(rows) -> List[str]:
    order = ["1b", "8b"] + [m for m in MODELS if m not in ("1b", "8b")]
    present = {r["model"] for r in rows}
    return [m for m in order if m in present]


def host_rss(info) -> bool:
    """Whether the run's 'peak' numbers are the process's peak RSS (a CPU run), not GPU memory: then the report
    says so and compares no memory between PEFT and fastpeft (the whole process's RSS is not the adapters')."""
    kinds = {r.get("peak_kind") for r in info["rows"] if _ok(r)}
    return "rss" in kinds or (not kinds and info.get("device_slug") == "cpu")


def memory_table(info) -> List[str]:
    rows = info["rows"]
    rss = host_rss(info)
    methods = [m for m in ("lora", "lora_fused", "lora_offload", "qlora", "qlora_fused", "qlora_offload", "ia3", "dora",
                           "qdora", "vera", "loha", "lokr", "oft", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning",
                           "trainable_tokens")
               if m in ("lora", "qlora", "ia3") or any(r.get("method") == m for r in rows)]
    out = ["| model | Full FT | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
           "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for model in _models_in(rows):
        cells = []
        cells.append(_gib(_find(rows, model, "full_ft", "torch")))
        for method in methods:
            p, f = _find(rows, model, peft_baseline(method), "peft"), _find(rows, model, method, "fastpeft")
            if p is None and f is None:
                cells.append("not run")
                continue
            ratio = ""
            if not rss and _ok(p) and _ok(f) and p.get("peak_gib") and f.get("peak_gib") is not None:
                ratio = f" ({f['peak_gib'] / p['peak_gib']:.2f}×)"
            cells.append(f"PEFT {_gib(p)} → fastpeft {_gib(f)}{ratio}")
        out.append(f"| {MODELS[model]['name']} | " + " | ".join(cells) + " |")
    return out


def _tps(r) -> str:
    if r is None:
        return "not run"
    if r["status"] == "ok":
        return f"{r['tokens_per_s']:,.0f}"
    return _status(r)


def _mfu(r) -> str:
    return f"{100 * r['mfu']:.1f}%" if _ok(r) and r.get("mfu") is not None else "-"


def speed_table(info) -> List[str]:
    rows = info["rows"]
    judge = info.get("device_slug") != "cpu"  # no target verdicts on a CPU smoke run
    rss = host_rss(info)  # CPU run: the memory columns are the process's RSS, without a PEFT-vs-fastpeft ratio
    mem_cols = "host RSS PEFT | host RSS fastpeft |" if rss else "peak PEFT | peak fastpeft | memory × |"
    out = ["| model | method | PEFT tok/s | fastpeft tok/s | × vs PEFT | MFU PEFT | MFU fastpeft | "
           f"{mem_cols} targets |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | " + ("" if rss else "--- | ") + "--- |"]
    for model in _models_in(rows):
        name = MODELS[model]["name"]
        full = _find(rows, model, "full_ft", "torch")
        if full is not None:
            out.append(f"| {name} | Full FT (plain transformers) | {_tps(full)} | | | {_mfu(full)} | | {_gib(full)} "
                       f"| |{'' if rss else ' |'} |")
        for method in TABLE_ORDER:
            p, f = _find(rows, model, peft_baseline(method), "peft"), _find(rows, model, method, "fastpeft")
            if f is None and method != peft_baseline(method):
                continue  # a fastpeft-only row that did not run: PEFT's plain row has its own line
            if p is None and f is None:
                continue
            speed = mem = "-"
            verdict = []
            if _ok(p) and _ok(f):
                s = f["tokens_per_s"] / p["tokens_per_s"]
                speed = f"{s:.2f}×"
                if judge and method in SPEED_TARGET:
                    verdict.append(f"speed ≥{SPEED_TARGET[method]:g}× {'met' if s >= SPEED_TARGET[method] else 'missed'}")
                if not rss and p.get("peak_gib") and f.get("peak_gib") is not None:
                    m = f["peak_gib"] / p["peak_gib"]
                    mem = f"{m:.2f}×"
                    if judge and method in SPEED_TARGET:
                        verdict.append(f"memory ≤{MEMORY_TARGET:g}× {'met' if m <= MEMORY_TARGET else 'missed'}")
                    if judge and method in LEAN_MEMORY_TARGET:
                        t = LEAN_MEMORY_TARGET[method]
                        verdict.append(f"memory ≤{t:g}× PEFT {'met' if m <= t else 'missed'}")
            plain = _find(rows, model, peft_baseline(method), "fastpeft")
            if judge and method != peft_baseline(method) and _ok(f) and _ok(plain):
                verdict.append(f"{f['tokens_per_s'] / plain['tokens_per_s']:.2f}× fastpeft {METHOD_LABEL[plain['method']]}")
            if judge and _ok(f) and _ok(full) and method.startswith("lora"):
                verdict.append(f"{f['tokens_per_s'] / full['tokens_per_s']:.2f}× Full FT")
            out.append(f"| {name} | {METHOD_LABEL[method]} | {_tps(p)} | {_tps(f)} | {speed} | {_mfu(p)} | {_mfu(f)} | "
                       f"{_gib(p)} | {_gib(f)} |{'' if rss else f' {mem} |'} {'; '.join(verdict)} |")
    return out


def first_step_table(info) -> List[str]:
    """Seconds of each compiled row's first step (tracing + compiling + running), PEFT's and fastpeft's side by side."""
    rows = [r for r in info["rows"] if _ok(r) and r.get("first_step_s") is not None]
    if not rows:
        return []
    out = ["| model | method | plain transformers s | PEFT s | fastpeft s |", "| --- | --- | --- | --- | --- |"]
    for model in _models_in(rows):
        for method in ["full_ft"] + TABLE_ORDER:
            cells = []
            for impl in ("torch", "peft", "fastpeft"):
                r = _find(rows, model, method, impl)
                cells.append(f"{r['first_step_s']:.1f}" if r is not None else "")
            if any(cells):
                out.append(f"| {MODELS[model]['name']} | {METHOD_LABEL[method]} | " + " | ".join(cells) + " |")
    return out


def profile_table(info) -> List[str]:
    prof_rows = [r for r in info["rows"] if isinstance(r.get("profile"), dict) and "ms" in r["profile"]]
    if not prof_rows:
        return []
    keys = BUCKETS + ["other (unattributed)"]
    unit = "device ms" if prof_rows[0]["profile"].get("time") == "device" else "CPU ms"
    out = [f"| model | method | impl | " + " | ".join(keys) + f" | busy ({unit}) | step wall ms |",
           "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    for r in prof_rows:
        p = r["profile"]
        busy = p["busy_ms"] or 1.0
        cells = [f"{p['ms'].get(k, 0.0):.1f} ({100 * p['ms'].get(k, 0.0) / busy:.0f}%)" for k in keys]
        out.append(f"| {r['model_name']} | {METHOD_LABEL[r['method']]} | {IMPL_LABEL[r['impl']]} | " + " | ".join(cells)
                   + f" | {p['busy_ms']:.1f} | {p['wall_ms']:.1f} |")
    return out


def markdown(info) -> str:
    v = info["versions"]
    st = info["settings"]
    gemm = info.get("gemm_tflops")
    head = [
        f"# Whole training step: PEFT vs fastpeft ({info['device']}, {info['date']})",
        "",
        f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, liger-kernel {v.get('liger-kernel') or 'not installed'}, "
        f"fastpeft {v.get('fastpeft')} ({v.get('fastpeft_git') or 'no git'}); backend {st.get('fastpeft_backend')}.",
        f"Random-init model shapes built from configs, {st['dtype']}, sdpa attention, "
        + ", ".join(f"{MODELS[m]['name']}: batch {_batch_seq(info, m)[0]} × {_batch_seq(info, m)[1]} tokens"
                    for m in _models_in(info["rows"]))
        + f"; gradient checkpointing ({st['gradient_checkpointing']}), {st['optimizer']}; r={st['rank']}, "
        f"alpha={st['lora_alpha']} on all linear layers but the head; IA3 on k, v, down. Tokens/s = median of "
        f"{st['steps']} timed steps after {st['warmup']} warm-up steps; peak = "
        + ("`torch.cuda.max_memory_allocated` (weights, grads, optimizer states, activations)." if gemm else
           "peak RSS of the process (CPU smoke test)."),
    ]
    if gemm:
        head.append(f"MFU = model FLOPs per step / step time / measured bf16 GEMM rate ({gemm:.0f} TFLOP/s, 8192³). "
                    "Model FLOPs count what the step must do with checkpointing: decoder linears 2·N·T forward + "
                    "2·N·T recompute + 2·N·T input grad (+ 2·N·T weight grad for Full FT), head without recompute, "
                    "causal attention at half the square (×4 for forward, recompute, backward); adapter FLOPs "
                    "(< 1%) left out.")
    if any(r.get("method") != peft_baseline(r.get("method")) for r in info["rows"] if r.get("method") in METHOD_LABEL):
        head.append("Rows '+ fused loss' (fastpeft.enable_fused_loss) and '+ offload' (also "
                    "fastpeft.enable_activation_offload) are fastpeft-only: their PEFT columns repeat PEFT's plain "
                    "LoRA / QLoRA row of the same run.")
    head += ["Full FT = plain transformers, bf16 weights, grads and AdamW states (8 B/param, no fp32 master "
             "weights); where its estimate exceeds the GPU's memory it is recorded as OOM without trying.",
             "PEFT QLoRA = PEFT's recipe: `prepare_model_for_kbit_training` (upcasts embeddings, norms and head to "
             "fp32) + `get_peft_model`; fastpeft QLoRA = `fastpeft.patch` on the same NF4 base (bf16 elsewhere). "
             "The 4-bit base is built by swapping each linear layer for a bitsandbytes `Linear4bit` (nf4, double "
             "quant, bf16 compute) quantized from the random bf16 weights."]
    mode = st.get("compile")
    if mode:
        head.append(f"Compiled: every row's step calls `torch.compile(model, mode={mode!r})` (Full FT's plain model, "
                    "PEFT's PeftModel, the patched model alike); the optimizer step stays eager. Tokens/s are "
                    "steps after the warm-up (which compiles" + (" and records the CUDA graphs" if mode ==
                    "reduce-overhead" else "") + "); the compiling first step is in its own table.")
    for n in info.get("notes", []):
        head.append(f"Note: {n}")
    memory_heading = ("## Peak host RSS (CPU run: resident memory of the whole benchmark process, not GPU memory; "
                      "no PEFT-vs-fastpeft ratio)" if host_rss(info) else "## Peak memory")
    lines = head + ["", memory_heading, ""] + memory_table(info) + ["", "## Speed", ""] + speed_table(info)
    first = first_step_table(info)
    if first:
        lines += ["", "## First (compiling) step", ""] + first
    prof = profile_table(info)
    if prof:
        lines += ["", "## Where one step's time goes (torch profiler, one step)", "",
                  "Kernels attributed to the innermost op that launched them; linear = base and adapter "
                  "matmuls (incl. fastpeft's fused LoRA / IA3 kernels), nf4 dequant = kernels named dequant* "
                  "(bnb's and fastpeft's separate dequantize passes; a dequant fused into a GEMM counts as linear), "
                  "loss = HF loss (upcast, log-softmax, NLL), "
                  "norm+elementwise = everything else (RMSNorm, SwiGLU, RoPE, residuals, casts, embedding). "
                  "busy = summed kernel time; wall − busy ≈ launch / host gaps.", ""] + prof
    problems = [r for r in info["rows"] if r["status"] in ("skipped", "error")]
    if problems:
        lines += ["", "## Not measured", ""] + [f"- {r['label']}: {r['status']}: {r['reason']}" for r in problems]
    return "\n".join(lines) + "\n"


def require_plotting():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fastpeft.bench: matplotlib is needed for the PNG plots: pip install -e '.[bench]' "
                         "(or pass --no-plots)")


def write_plots(info, stem: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = info["rows"]
    files = []
    mem_label = ("peak host RSS GiB, whole process (CPU run; not GPU memory)" if host_rss(info)
                 else "peak allocated GiB (lower is better)")
    for key, fname, ylabel in (("tokens_per_s", "_tokens.png", "tokens / s (higher is better)"),
                               ("peak_gib", "_memory.png", mem_label)):
        models = _models_in(rows)
        fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], models):
            labels, peft_v, fast_v = [], [], []
            full = _find(rows, model, "full_ft", "torch")
            for method in TABLE_ORDER:
                p, f = _find(rows, model, method, "peft"), _find(rows, model, method, "fastpeft")
                if p is None and f is None:
                    continue
                labels.append(METHOD_LABEL[method].replace(", ", "\n").replace(" + ", "\n+ "))
                peft_v.append(p.get(key) if _ok(p) and p.get(key) is not None else 0.0)
                fast_v.append(f.get(key) if _ok(f) and f.get(key) is not None else 0.0)
            x = list(range(len(labels)))
            w = 0.38
            ax.bar([i - w / 2 for i in x], peft_v, w, label="PEFT", color="#9e9e9e")
            ax.bar([i + w / 2 for i in x], fast_v, w, label="fastpeft", color="#1f77b4")
            for i, (a, b) in enumerate(zip(peft_v, fast_v)):
                for xv, val in ((i - w / 2, a), (i + w / 2, b)):
                    ax.text(xv, val, "n/a" if val == 0 else (f"{val:,.0f}" if key == "tokens_per_s" else f"{val:.1f}"),
                            ha="center", va="bottom", fontsize=7)
            if _ok(full) and full.get(key) is not None:
                ax.axhline(full[key], color="#d62728", linestyle="--", linewidth=1, label="Full FT")
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
            title = f"{MODELS[model]['name']}, batch {_batch_seq(info, model)[0]}×{_batch_seq(info, model)[1]}"
            if full is not None and full["status"] != "ok":
                title += f" (Full FT: {_status(full)})"
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle(f"{info['device']} — {info['date']}", fontsize=10)
        fig.tight_layout()
        path = stem + fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def report(json_paths: List[str], out_dir: Optional[str], plots: bool, log=print, overwrite: bool = False
           ) -> Dict[str, Any]:
    """Merge the rows of several step JSONs (e.g. a 1b and an 8b run) and write markdown + plots (under a free
    name unless ``overwrite``: see ``free_stem``)."""
    infos = []
    for p in json_paths:
        with open(p) as f:
            infos.append(json.load(f))
    info = dict(infos[0])
    merged: Dict[tuple, Dict[str, Any]] = {}
    for row in (r for i in infos for r in i["rows"]):  # a later run's row replaces an earlier one, unless it
        key = (row["model"], row["method"], row["impl"])  # did not run and the earlier one did
        if key not in merged or row["status"] == "ok" or merged[key]["status"] != "ok":
            merged[key] = row
    info["rows"] = list(merged.values())
    for i in infos[1:]:
        if i["device"] != info["device"]:
            info.setdefault("notes", []).append(f"rows from another device too: {i['device']} ({i['date']})")
    info["settings"] = dict(info["settings"])
    info["settings"]["shapes"] = {k: v for i in infos for k, v in i["settings"].get("shapes", {}).items()}
    models = _models_in(info["rows"])
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_paths[0]))
    os.makedirs(out_dir, exist_ok=True)
    stem = free_stem(out_dir, output_stem(models, info["date"]), overwrite)
    if plots:
        require_plotting()
    write_json(info, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(info))
    files = [stem + ".json", stem + ".md"] + (write_plots(info, stem) if plots else [])
    log(markdown(info))
    log("wrote " + ", ".join(files))
    info["files"] = files
    return info


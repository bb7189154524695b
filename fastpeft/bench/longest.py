"""The "longest sequence" benchmark: under a memory cap, the longest sequence (batch 1) each configuration
trains for 3 steps, with tokens/s and peak memory at each length tried.

    python -m fastpeft.bench --longest --model 8b --caps 24,80 --max-seq 65536

The cap is ``torch.cuda.set_per_process_memory_fraction(cap / GPU memory)`` (the caching allocator refuses to
grow past it), set after the model is built (a user with a 24 GiB GPU loads a quantized checkpoint; the
benchmark quantizes a random bf16 model, which needs more memory only while it is built). Lengths start at
``start`` and double; the first out-of-memory ends a row (out of memory is a result, recorded, not a crash), and
so does ``max_seq`` or a row's time budget (then the longest length is a lower bound, said so).
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .environment import device_name, device_slug, free_memory, versions
from .harness import prepare
from .plan import GiB, METHOD_LABEL, MODELS, Spec
from .reporting import free_stem, write_json

SCHEMA = "fastpeft.bench.longest/1"
# (impl, method) rows: PEFT's plain recipes against fastpeft's, plain and with the memory options
LONGEST_ROWS: List[Tuple[str, str]] = [("peft", "qlora"), ("fastpeft", "qlora"), ("fastpeft", "qlora_offload"),
                                       ("peft", "lora"), ("fastpeft", "lora"), ("fastpeft", "lora_offload")]
STEPS = 3


def _try_length(prep, seq: int, vocab: int, device: str) -> Dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(seq)
    prep.batches = [torch.randint(0, vocab, (1, seq), generator=gen).to(device)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for _ in range(STEPS):
            t = time.perf_counter()
            loss = prep.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError as e:
        prep.optimizer.zero_grad(set_to_none=True)
        return {"seq": seq, "status": "oom", "reason": str(e).splitlines()[0][:200]}
    if not torch.isfinite(loss):
        return {"seq": seq, "status": "error", "reason": f"non-finite loss {float(loss)}"}
    step = times[-1]
    return {"seq": seq, "status": "ok", "step_s": step, "tokens_per_s": seq / step, "step_s_all": times,
            "peak_gib": torch.cuda.max_memory_allocated() / GiB, "loss": float(loss)}


def longest_row(impl: str, method: str, model: str, cap_gib: float, start: int, max_seq: int, row_budget_s: float,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """One (impl, method) under one cap: lengths start, 2·start, ... until OOM, max_seq or the time budget."""
    spec = Spec(model, method, impl)
    row: Dict[str, Any] = {"impl": impl, "method": method, "label": spec.label, "cap_gib": cap_gib, "lengths": []}
    device = "cuda"
    total = torch.cuda.get_device_properties(0).total_memory
    free_memory(device)
    t0 = time.perf_counter()
    prep = None
    try:
        prep = prepare(spec, device, torch.bfloat16, batch_shape=(1, max_seq))
        free_memory(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total))
        row["weights_gib"] = torch.cuda.memory_allocated() / GiB
        seq = start
        while seq <= max_seq:
            spent = time.perf_counter() - t0
            last = next((r for r in reversed(row["lengths"]) if r["status"] == "ok"), None)
            if last is not None and spent + STEPS * last["step_s"] * 2.5 > row_budget_s:
                row["stopped"] = f"time budget ({row_budget_s:.0f} s) before {seq}"
                break
            result = _try_length(prep, seq, MODELS[model]["vocab_size"], device)
            row["lengths"].append(result)
            log(f"  cap {cap_gib:g} GiB {spec.label} seq {seq}: {result['status']}"
                + (f" {result['tokens_per_s']:,.0f} tok/s peak {result['peak_gib']:.1f} GiB" if result["status"] == "ok"
                   else ""))
            if result["status"] != "ok":
                break
            seq *= 2
        else:
            row["stopped"] = f"max_seq {max_seq} reached"
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"OOM while building: {str(e).splitlines()[0][:200]}"
    except Exception as e:  # recorded; the run goes on
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    finally:
        if prep is not None:
            prep.close()
        del prep
        torch.cuda.set_per_process_memory_fraction(1.0)
        free_memory(device)
    ok = [r for r in row["lengths"] if r["status"] == "ok"]
    row["longest"] = ok[-1]["seq"] if ok else None
    row["longest_is_lower_bound"] = bool(ok) and ok[-1] is row["lengths"][-1]
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_longest(model: str, caps_gib: List[float], rows: List[Tuple[str, str]], start: int, max_seq: int,
                row_budget_s: float, out_dir: Optional[str], log: Callable[[str], None] = print) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("fastpeft.bench --longest needs a CUDA GPU (memory caps are GPU memory)")
    date = datetime.date.today().isoformat()
    info = {"schema": SCHEMA, "date": date, "device": device_name("cuda"), "device_slug": device_slug("cuda"),
            "versions": versions(), "model": model, "model_name": MODELS[model]["name"], "steps": STEPS,
            "start": start, "max_seq": max_seq, "row_budget_s": row_budget_s, "results": []}
    out_dir = out_dir or os.path.join("benchmarks", "results", info["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    stem = free_stem(out_dir, f"longest_{date}_{model}")
    for cap in caps_gib:
        for impl, method in rows:
            info["results"].append(longest_row(impl, method, model, cap, start, max_seq, row_budget_s, log))
            write_json(info, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(longest_markdown(info))
    log(longest_markdown(info))
    log(f"wrote {stem}.json, {stem}.md")
    return info


def longest_markdown(info: Dict[str, Any]) -> str:
    v = info["versions"]
    out = [f"# Longest trainable sequence under a memory cap ({info['device']}, {info['date']})", "",
           f"torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, peft "
           f"{v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}. {info['model_name']} shape, random weights, bf16, "
           f"batch 1, gradient checkpointing, AdamW, r=16 all-linear; {info['steps']} training steps per length, "
           f"lengths from {info['start']} doubling to at most {info['max_seq']}; tokens/s of the last step.", "",
           "| cap | configuration | longest | tokens/s there | peak GiB there | weights GiB | stopped by |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in info["results"]:
        ok = [x for x in r["lengths"] if x["status"] == "ok"]
        last = ok[-1] if ok else None
        bad = next((x for x in r["lengths"] if x["status"] != "ok"), None)
        why = r.get("error") or (f"{bad['status']} at {bad['seq']}" if bad else r.get("stopped", ""))
        longest = "none" if last is None else f"{'≥ ' if r['longest_is_lower_bound'] else ''}{last['seq']:,}"
        out.append(f"| {r['cap_gib']:g} GiB | {METHOD_LABEL[r['method']]} [{r['impl']}] | {longest} | "
                   f"{'' if last is None else format(last['tokens_per_s'], ',.0f')} | "
                   f"{'' if last is None else format(last['peak_gib'], '.1f')} | {r.get('weights_gib', 0):.1f} | {why} |")
    by = {(r["cap_gib"], r["impl"], r["method"]): r.get("longest") for r in info["results"]}
    lines = []
    for cap in sorted({r["cap_gib"] for r in info["results"]}):
        for plain in ("qlora", "lora"):
            p = by.get((cap, "peft", plain))
            for method in (plain, plain + "_offload"):
                f = by.get((cap, "fastpeft", method))
                if p and f:
                    lines.append(f"- {cap:g} GiB, {METHOD_LABEL[method]}: {f / p:.1f}× PEFT's longest")
    return "\n".join(out + [""] + lines) + "\n"

"""Unmerged LoRA decode at base speed (issue 15): HF generate with the static cache under torch.compile (HF's recipe
for fast generate: ``cache_implementation="static"``, which compiles the decoding forward with CUDA graphs,
``mode="reduce-overhead"``) against the same compiled base model, and eager generate (dynamic cache) against the
eager base, side by side in one run, at each --batch.

    python benchmarks/scripts/bench_decode_compiled.py --batch 1 8 --out decode_compiled.json
    python benchmarks/scripts/bench_decode_compiled.py --layers 8 ...   (the 8B shape's layers, fewer of them: the
        compile of 32 layers outran a 600 s device call; per-layer costs are the same, the head's share grows)
    ... --overlap-ab                (compiled LoRA three times: as auto runs it -- the decode shrink on a side stream
        in the capture, the expand a programmatic dependent of the GEMV --, without the latter
        (torch.ops.fastpeft_ops.set_decode_pdl 0), and without either (also set_decode_fork 0))
    ... --gemv-ab                   (LoRA also with the base product by cuBLAS and a separate expand kernel,
        set_decode_gemv 0, instead of the decode forward's own GEMV with the expand in its epilogue; eager and
        compiled rows)
    ... --skip-compiled             (eager rows only: no compile, so the model's full depth fits a device call)
    ... --profile DIR               (after each compiled row, one more generate under torch.profiler: the kernel
        table and GPU time per generated token, written to DIR)

Random-init weights (nothing is downloaded), bf16, sdpa. fastpeft: one LoRA adapter, r=16, alpha=32 on every
linear layer but the head, random B (the adapter changes the output), not merged. Each row: greedy generate of
--new-tokens after a --prompt-token prompt; tokens/s = batch * new tokens / median time of --repeats runs after a
first (compiling) run, whose time is recorded too. The compiled rows also record Dynamo's graph count and graph
breaks for each model, and the greedy tokens of the compiled LoRA model are checked against its eager run.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import CompileConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastpeft  # noqa: E402
from fastpeft.bench.harness import assert_kv_cache, enable_kv_cache, llama_config  # noqa: E402
from fastpeft.ops import cpp_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of the script (tiny model, no compile)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def dynamo_counts():
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def gpu_bursts(events, gap_us: float = 40.0, min_kernels: int = 20) -> dict:
    """Where a decode step's GPU time goes, from a chrome trace's events: the kernels (and copies) sorted by start,
    cut into bursts wherever the GPU idles ``gap_us`` or more (the host between steps). Overlapping kernels (a side
    stream's) extend one burst. Among bursts of at least ``min_kernels`` kernels (graph replays), the one of median
    span gives: its span, its kernels' summed time and count (span - sum = the gaps between dependent kernels, or
    a negative number where kernels overlapped); and the median idle time between all bursts (the host's share).

    >>> k = lambda ts, dur: {"cat": "kernel", "ts": float(ts), "dur": float(dur)}  # the trace's µs are floats
    >>> gpu_bursts([k(0, 10), k(11, 10), k(100, 5)], min_kernels=2)
    {'bursts': 1, 'median_span_us': 21.0, 'its_kernel_sum_us': 20.0, 'its_kernels': 2, 'median_idle_between_us': 79.0}
    """
    ks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    bursts, idle = [], []
    for start, end in ks:
        if bursts and start - bursts[-1][1] < gap_us:
            b = bursts[-1]
            b[1] = max(b[1], end)
            b[2] += end - start
            b[3] += 1
        else:
            if bursts:
                idle.append(start - bursts[-1][1])
            bursts.append([start, end, end - start, 1])
    big = sorted((b for b in bursts if b[3] >= min_kernels), key=lambda b: b[1] - b[0])
    if not big:
        return {}
    mid = big[len(big) // 2]
    return {"bursts": len(big), "median_span_us": round(mid[1] - mid[0], 1), "its_kernel_sum_us": round(mid[2], 1),
            "its_kernels": mid[3], "median_idle_between_us": round(statistics.median(idle), 1) if idle else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the model's); fewer shorten the compile (8B: > 5 min at 32 layers)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true", help="eager rows only")
    ap.add_argument("--overlap-ab", action="store_true",
                    help="compiled rows: LoRA as auto runs it, without the expand's programmatic dependent launch "
                         "(no pdl), and without that and the shrink's side stream (no fork, no pdl)")
    ap.add_argument("--gemv-ab", action="store_true",
                    help="LoRA also with cuBLAS's GEMV and a separate expand (set_decode_gemv 0), eager and compiled")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one more generate per compiled row; kernel tables go to DIR")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    config = llama_config(a.model)
    if a.layers is not None:
        config.num_hidden_layers = a.layers
    with torch.device(DEVICE):
        base = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").eval()
    enable_kv_cache(base)
    cfg = fastpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    ours = fastpeft.patch(copy.deepcopy(base), cfg).eval()
    for model in (base, ours):
        model.requires_grad_(False)  # served models: no parameter asks for gradients (the same guards for both)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, vocab, (b, a.prompt), generator=gen).to(DEVICE) for b in a.batch}
    rows, tokens_of = [], {}

    def generate(model, batch, compiled):
        prompt = prompts[batch]
        kw = ({"cache_implementation": "static", "compile_config": CompileConfig(dynamic=False)} if compiled
              else {"disable_compile": True})
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, use_cache=True, **kw)

    def measure(model, impl, batch, compiled):
        if compiled:
            # both models are LlamaForCausalLM: HF compiles their __call__, one code object, so one model's graphs
            # count against the other's recompile limit (and their guards fail on each other's parameters)
            torch._dynamo.reset()
        before = dynamo_counts()
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            # eager rows check that each step feeds one token (a KV cache in use); the compiled rows use the static
            # cache by construction, and the check's Python hook would be traced and recompile the graph every step
            out = generate(model, batch, compiled) if compiled else assert_kv_cache(
                model, lambda: generate(model, batch, compiled))
            sync()
            first = time.perf_counter() - t
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                generate(model, batch, compiled)
                sync()
                times.append(time.perf_counter() - t)
        after = dynamo_counts()
        s = statistics.median(times)
        row = {"impl": impl, "mode": "compiled static cache" if compiled else "eager", "batch": batch, "s": s,
               "runs_s": times, "first_s": first, "tokens_per_s": batch * a.new_tokens / s,
               "graphs_added": after["graphs"] - before["graphs"],
               "graph_breaks_added": after["graph_breaks"] - before["graph_breaks"]}
        rows.append(row)
        tokens_of[(impl, row["mode"], batch)] = out.cpu()
        if compiled and a.profile:
            row["profile"] = profile_generate(model, impl, batch)
        print(f"{row['mode']:22s} batch={batch:3d} {impl:26s} {row['tokens_per_s']:10,.1f} tok/s "
              f"(first run {first:.1f} s; graphs +{row['graphs_added']}, breaks +{row['graph_breaks_added']}; runs "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times)} ms)", flush=True)

    def step_spans(prof):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            with open(tmp.name) as f:
                return gpu_bursts(json.load(f).get("traceEvents", []))

    def profile_generate(model, impl, batch):
        """Kernel table of one more (compiled, warm) generate; GPU time per generated token = the kernels' total
        CUDA time / new tokens (prefill included: 1 of new_tokens + 1 forwards)."""
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync()
            t = time.perf_counter()
            generate(model, batch, True)
            sync()
            wall = time.perf_counter() - t
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.device_time_total for e in events)
        spans = step_spans(prof)
        os.makedirs(a.profile, exist_ok=True)
        tag = impl.replace("(", "").replace(")", "").replace(",", "").replace(" ", "-")
        path = os.path.join(a.profile, f"decode_profile_b{batch}_{tag}.txt")
        with open(path, "w") as f:
            f.write(f"{impl}, batch {batch}, {a.new_tokens} new tokens, wall {wall * 1e3:.1f} ms, "
                    f"kernels {gpu_us / 1e3:.1f} ms ({gpu_us / a.new_tokens:.1f} us per token)\n")
            f.write(f"GPU bursts (kernels closer than 40 us): {json.dumps(spans)}\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
        print(f"    profile: {gpu_us / a.new_tokens:.1f} us of kernels per token, wall {wall * 1e3:.1f} ms -> {path}",
              flush=True)
        print(f"    bursts: {spans}", flush=True)
        return {"kernel_us_per_token": gpu_us / a.new_tokens, "wall_s": wall, "bursts": spans,
                "kernel_us_per_token_by_name": {e.key[:80]: round(e.device_time_total / a.new_tokens, 2)
                                                for e in sorted(events, key=lambda e: -e.device_time_total)[:25]}}

    ops = torch.ops.fastpeft_ops if DEVICE == "cuda" and cpp_ops.available() else None
    if (a.overlap_ab or a.gemv_ab) and ops is None:
        sys.exit("--overlap-ab / --gemv-ab need the fastpeft_ops extension on a GPU")
    # the same model with the decode forward's testing hooks set (torch.ops.fastpeft_ops.set_decode_*): suffix,
    # hooks, and whether eager rows get it too (the overlaps only matter inside a CUDA graph; the GEMV's choice
    # moves eager host time as well)
    variants = []
    if a.overlap_ab:
        variants += [(", no pdl", {"pdl": 0}, False), (", no fork, no pdl", {"fork": 0, "pdl": 0}, False)]
    if a.gemv_ab:
        variants += [(", cublas + expand", {"gemv": 0}, True)]

    setters = {"fork": ops.set_decode_fork, "pdl": ops.set_decode_pdl, "gemv": ops.set_decode_gemv} if variants else {}

    def measure_lora(batch, compiled):
        measure(ours, "fastpeft LoRA (unmerged)", batch, compiled)
        for suffix, hooks, eager_too in variants:
            if not (compiled or eager_too):
                continue
            before = {k: setters[k](v) for k, v in hooks.items()}
            try:
                measure(ours, "fastpeft LoRA (unmerged)" + suffix, batch, compiled)
            finally:
                for k, v in before.items():
                    setters[k](v)

    # compiled modes: False = eager, True = static cache + compile (CUDA only: the CPU run is a smoke test)
    modes = [False] if DEVICE != "cuda" or a.skip_compiled else ([True] if a.skip_eager else [False, True])
    for compiled in modes:
        for batch in a.batch:
            measure(base, "base (no adapters)", batch, compiled)
            measure_lora(batch, compiled)
    summary = []
    for compiled in modes:
        mode = "compiled static cache" if compiled else "eager"
        for batch in a.batch:
            get = {r["impl"]: r["tokens_per_s"] for r in rows if r["mode"] == mode and r["batch"] == batch}
            line = {"mode": mode, "batch": batch,
                    "lora_vs_base": get["fastpeft LoRA (unmerged)"] / get["base (no adapters)"]}
            for suffix, _, _ in variants:
                if "fastpeft LoRA (unmerged)" + suffix in get:
                    key = "lora" + suffix.replace(",", "").replace(" ", "_") + "_vs_base"
                    line[key] = get["fastpeft LoRA (unmerged)" + suffix] / get["base (no adapters)"]
            # with --profile: the GPU time a decode step's graph adds over the base's (median graph span), which
            # the lent hosts' swings between runs do not move as they move tokens/s
            spans = {r["impl"]: r["profile"]["bursts"].get("median_span_us") for r in rows
                     if r["mode"] == mode and r["batch"] == batch and r.get("profile", {}).get("bursts")}
            if spans.get("base (no adapters)"):
                for impl, span in spans.items():
                    if impl != "base (no adapters)" and span:
                        line["extra_graph_us_" + impl.replace("fastpeft LoRA (unmerged)", "lora").replace(",", "")
                             .replace(" ", "_")] = round(span - spans["base (no adapters)"], 1)
            for impl, key in (("fastpeft LoRA (unmerged)", "compiled_tokens_equal_eager"),
                              ("base (no adapters)", "base_compiled_tokens_equal_eager")):
                # the fraction of greedy tokens that agree: random-init logits are near ties, so Inductor's other
                # rounding flips some argmaxes for the base model too (its line is the control)
                if (impl, "eager", batch) in tokens_of and compiled:
                    eager, comp = tokens_of[(impl, "eager", batch)], tokens_of[(impl, mode, batch)]
                    line[key] = bool(torch.equal(eager, comp))
                    line[key.replace("equal", "agree")] = (eager == comp).float().mean().item()
            summary.append(line)
            print(line, flush=True)
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "model": a.model, "layers": config.num_hidden_layers,
            "prompt": a.prompt,
            "new_tokens": a.new_tokens, "repeats": a.repeats, "rows": rows, "summary": summary}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()

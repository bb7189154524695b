"""Mixed-adapter batches at the Llama-3.1-8B shape (CUDA): tokens/s of one batch whose rows use N different
LoRA adapters (``adapter_names=[...]``) against the same batch on one adapter, and against PEFT's
adapter_names path, side by side in one run (issue 15's targets: mixed >= 0.85x one adapter, >= 3x PEFT).

    python benchmarks/scripts/bench_mixed.py --adapters 8 32 --out mixed.json
    python benchmarks/scripts/bench_mixed.py --kinds decode --skip-peft --gemv-ab --out mixed_decode.json

Random-init weights (nothing is downloaded), bf16, sdpa, eager, no autograd. r=16, alpha=32 on every linear
layer but the head; the adapters' B are random (so every adapter changes the output). Rows:
  prefill  one forward of [batch, --prefill] tokens, no cache (tokens/s = batch * prefill / time)
  decode   generate(--new-tokens) greedy after a 16-token prompt, HF's dynamic cache (tokens/s = batch * new / time)
for impl in fastpeft (the mixed batch in one pass per layer: the C++ operator under the default backend),
fastpeft with one adapter for every row (no adapter_names), PEFT with adapter_names, and the base model without
adapters. --kinds picks the rows (prefill, decode; default both). --two-call-row adds the mixed batch with each dense
layer as two operator calls (F.linear, then lora_mixed_delta_): an A/B of lora_mixed_linear's single call. Each row
records all its timed runs (runs_s) besides their median. --triton-row adds the mixed batch through the Triton kernels (stacked copies of the adapters) for a side
by side of the two one-pass paths; --peft-repeats shortens PEFT's rows (its 32-adapter decode runs ~30 s each).
--rounds R times the base and fastpeft rows R times in alternating order and takes every ratio within a round
(median over rounds in the summary, each round's in `*_rounds`): the lent hosts' speed drifts within a call.
"""
import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastpeft  # noqa: E402
from fastpeft.bench.harness import assert_kv_cache, enable_kv_cache, llama_config  # noqa: E402
from fastpeft.ops import cpp_ops  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of the script (tiny model)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats):
    """(median, all, garbage collections per generation during the timed runs) of ``repeats`` timed runs of fn after
    one untimed one, in seconds (the collections: a slow run beside a full collection is the collector's, not the
    kernels')."""
    fn()
    sync()
    times = []
    before = [g["collections"] for g in gc.get_stats()]
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, [g["collections"] - b for g, b in zip(gc.get_stats(), before)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-repeats", type=int, default=None, help="timed repeats of PEFT's rows (default --repeats)")
    ap.add_argument("--triton-row", action="store_true", help="also time the mixed batch on the Triton kernels")
    ap.add_argument("--two-call-row", action="store_true",
                    help="also time the mixed batch with each dense layer as two operator calls (F.linear, then "
                         "lora_mixed_delta_) instead of lora_mixed_linear's one: an A/B of the fused call")
    ap.add_argument("--gemv-ab", action="store_true",
                    help="also time the mixed batch with fastpeft_ops.set_decode_gemv(0): decode-sized layers then "
                         "run cuBLAS + the mixed kernels instead of the decode GEMV with every row's expand in its "
                         "epilogue (an A/B in one process)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the base and every fastpeft row this many times in alternating order (reversed on odd "
                         "rounds); ratios are taken within a round and their median reported (the lent hosts drift "
                         "by +-30 %% within a call)")
    ap.add_argument("--kinds", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"],
                    help="which rows to time (default both)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also write profiler tables (GPU kernels, host ops, Python) of one run per row to DIR")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    with torch.device(DEVICE):
        base = transformers.LlamaForCausalLM._from_config(llama_config(a.model), dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").eval()
    enable_kv_cache(base)
    n_max = max(a.adapters)
    names = [f"task{i}" for i in range(n_max)]
    cfg = fastpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    rows = []
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    current_round = [0]

    def record(impl, kind, n, batch, timing, tokens):
        seconds, runs, collections = timing
        row = {"impl": impl, "kind": kind, "adapters": n, "batch": batch, "s": seconds, "runs_s": runs,
               "tokens_per_s": tokens / seconds, "round": current_round[0], "gc_collections": collections}
        rows.append(row)
        print(f"{kind:8s} adapters={n:3d} batch={batch:3d} {impl:22s} {row['tokens_per_s']:12,.0f} tok/s "
              f"({seconds * 1e3:.1f} ms; runs {', '.join(f'{t * 1e3:.0f}' for t in runs)})", flush=True)

    def profile_row(fn, label):
        """Kernel and host tables of one run of fn: torch.profiler by GPU time and by self CPU time, cProfile's
        Python functions by own time (decode is host-bound: where its host time goes)."""
        import cProfile
        import io
        import pstats

        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
            sync()
        python = cProfile.Profile()
        python.enable()
        fn()
        sync()
        python.disable()
        text = io.StringIO()
        pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(20)
        table = prof.key_averages()
        os.makedirs(a.profile, exist_ok=True)
        with open(os.path.join(a.profile, label.replace(" ", "_").replace("(", "").replace(")", "") + ".txt"), "w") as f:
            if DEVICE == "cuda":
                f.write(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90) + "\n")
            f.write(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90) + "\n")
            f.write(text.getvalue())

    def two_call_mixed_linear(x, weight, bias, segments, tokens, adapters):
        y = torch.nn.functional.linear(x, weight, bias)
        cpp_ops.lora_mixed_delta_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), segments, tokens, adapters)
        return y

    def measure(model, impl, n, adapter_names, repeats=None):
        repeats = repeats or a.repeats
        batch = n
        prompt = torch.randint(0, vocab, (batch, a.prefill), generator=gen).to(DEVICE)
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        with torch.no_grad():
            if "prefill" in a.kinds:
                s = timed(lambda: model(input_ids=prompt, use_cache=False, **kw), repeats)
                record(impl, "prefill", n, batch, s, batch * a.prefill)
                if a.profile and current_round[0] == 0:
                    profile_row(lambda: model(input_ids=prompt, use_cache=False, **kw), f"prefill_{impl}_{n}")
            if "decode" not in a.kinds:
                return
            short = prompt[:, :16]
            mask = torch.ones_like(short)
            def decode():
                return model.generate(input_ids=short, attention_mask=mask, max_new_tokens=a.new_tokens,
                                      min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, use_cache=True,
                                      **kw)

            assert_kv_cache(model, decode)
            s = timed(decode, repeats)
            if a.profile and current_round[0] == 0:
                profile_row(decode, f"decode_{impl}_{n}")
            record(impl, "decode", n, batch, s, batch * a.new_tokens)

    ours = fastpeft.patch(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        fastpeft.add_adapter(ours, name, cfg)
    ours.eval()

    def triton_mixed(n):
        layers = [m for m in ours.modules() if isinstance(m, fastpeft.LoraLinear)]
        for m in layers:
            m.backend = "triton"  # the mixed batch through ops/kernels/sgmv.py (the base path is the same)
        try:
            measure(ours, "fastpeft mixed (triton)", n, names[:n])
        finally:
            for m in layers:
                m.backend = "auto"
                m._mixed_cache.pop("stacks", None)

    def no_gemv_mixed(n):
        previous = torch.ops.fastpeft_ops.set_decode_gemv(0)
        try:
            measure(ours, "fastpeft mixed (no decode gemv)", n, names[:n])
        finally:
            torch.ops.fastpeft_ops.set_decode_gemv(previous)

    def two_call_mixed(n):
        fused, cpp_ops.lora_mixed_linear = cpp_ops.lora_mixed_linear, two_call_mixed_linear
        try:
            measure(ours, "fastpeft mixed (two calls)", n, names[:n])
        finally:
            cpp_ops.lora_mixed_linear = fused

    entries = [lambda n: measure(base, "base (no adapters)", n, None),
               lambda n: measure(ours, "fastpeft mixed", n, names[:n]),
               lambda n: measure(ours, "fastpeft one adapter", n, None)]
    if a.triton_row:
        entries.append(triton_mixed)
    if a.gemv_ab and cpp_ops.available():
        entries.append(no_gemv_mixed)
    if a.two_call_row:
        entries.append(two_call_mixed)
    for n in a.adapters:
        for rnd in range(a.rounds):
            current_round[0] = rnd
            for entry in (entries if rnd % 2 == 0 else entries[::-1]):
                entry(n)
    current_round[0] = 0
    state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    del ours
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    if not a.skip_peft:
        import peft

        pcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        theirs = peft.get_peft_model(base, pcfg, adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, pcfg)
        missing = theirs.base_model.model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys[:3]
        theirs.eval()
        for n in a.adapters:
            measure(theirs, "PEFT mixed", n, names[:n], a.peft_repeats)
    def per_round(n, kind, impl):
        """{round: tokens/s} of one row."""
        return {r["round"]: r["tokens_per_s"] for r in rows
                if r["adapters"] == n and r["kind"] == kind and r["impl"] == impl}

    def ratio(n, kind, num, den):
        """(median over rounds, every round's) num / den, each round's rows divided by each other."""
        top, bottom = per_round(n, kind, num), per_round(n, kind, den)
        ratios = [top[r] / bottom[r] for r in sorted(top) if r in bottom]
        return (statistics.median(ratios), ratios) if ratios else (None, [])

    def fastest_ratio(n, kind, num, den):
        """num / den from each row's fastest run over all rounds (tokens over the shortest run): on a host that
        drifts within a call, the runs least slowed by it; None without both rows."""
        def best(impl):
            runs = [(r["batch"] * (a.prefill if kind == "prefill" else a.new_tokens), t) for r in rows
                    if r["adapters"] == n and r["kind"] == kind and r["impl"] == impl for t in r["runs_s"]]
            return max(tokens / t for tokens, t in runs) if runs else None
        top, bottom = best(num), best(den)
        return None if top is None or bottom is None else top / bottom

    summary = []
    for n in a.adapters:
        for kind in a.kinds:
            line = {"adapters": n, "kind": kind}
            for key, num, den in (("mixed_vs_one_adapter", "fastpeft mixed", "fastpeft one adapter"),
                                  ("mixed_vs_base", "fastpeft mixed", "base (no adapters)"),
                                  ("one_adapter_vs_base", "fastpeft one adapter", "base (no adapters)"),
                                  ("fused_vs_two_calls", "fastpeft mixed", "fastpeft mixed (two calls)"),
                                  ("gemv_vs_no_gemv", "fastpeft mixed", "fastpeft mixed (no decode gemv)"),
                                  ("cpp_vs_triton", "fastpeft mixed", "fastpeft mixed (triton)")):
                median, ratios = ratio(n, kind, num, den)
                if median is not None:
                    line[key] = median
                    if a.rounds > 1:
                        line[key + "_rounds"] = ratios
                    line[key + "_fastest_runs"] = fastest_ratio(n, kind, num, den)
            peft_row = per_round(n, kind, "PEFT mixed")
            if peft_row:  # PEFT is timed once: against the median of our rounds
                line["mixed_vs_peft"] = statistics.median(per_round(n, kind, "fastpeft mixed").values()) / peft_row[0]
            summary.append(line)
            print(line)
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "model": a.model, "kinds": a.kinds, "prefill": a.prefill, "new_tokens": a.new_tokens, "repeats": a.repeats,
            "peft_repeats": a.peft_repeats or a.repeats, "rounds": a.rounds, "rows": rows, "summary": summary}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()

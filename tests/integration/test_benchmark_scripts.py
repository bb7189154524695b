"""The benchmark scripts under benchmarks/scripts/ leave the process as they found it.

`pytest benchmarks --benchmark-only` runs the NF4 tier (which builds its layers through
benchmarks/scripts/bench_nf4.py) before the whole-step tier in the same process. bench_nf4.py used to set
``os.environ["FASTPEFT_BACKEND"] = "triton"`` (and FASTPEFT_NF4_GEMM) and never restore it, so every later
fastpeft row ran the interpreted Triton kernels in bf16 on the CPU and three step rows came out NaN. Its
switches now go through ``fastpeft.settings.override``, which restores them on exit.
"""
import contextlib
import gc
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from fastpeft import bench, settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "benchmarks", "scripts")


def _load(name: str):
    """Import benchmarks/scripts/<name>.py as its own module (the scripts import each other by file name)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(f"_fastpeft_benchmark_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _one_thread():
    """torch on one thread for the block (the tiny CPU runs here are steadier and quicker so), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_nf4_benchmark_restores_settings_and_environment():
    environ = dict(os.environ)
    before = settings.get()
    nf4b = _load("bench_nf4")
    cpu = torch.device("cpu")
    K, N = nf4b.TINY["q/o"]
    nf4b._layer("fastpeft_qlora", K, N, cpu, torch.float32, 0.0)
    rows = []
    nf4b.layer_section({"q/o": (K, N)}, cpu, False, rows, [16], [("fastpeft_qlora", 0.0)], paths=("buffer", "fused"))
    assert [r["path"] for r in rows] == ["buffer", "fused"]
    assert all("fwd_bwd_ms" in r for r in rows), rows  # both paths ran (a failure is recorded as 'skipped')
    assert dict(os.environ) == environ  # nothing set or removed
    assert settings.get() == before


def test_step_row_after_the_nf4_benchmark_has_a_finite_loss():
    """The order of `pytest benchmarks --benchmark-only`: NF4 layers first, then a bf16 whole-step row (IA3 was
    one of the rows that came out NaN after the leak)."""
    nf4b = _load("bench_nf4")
    K, N = nf4b.TINY["q/o"]
    nf4b._layer("fastpeft_qlora", K, N, torch.device("cpu"), torch.float32, 0.0)
    with _one_thread():
        row = bench.run_config(bench.Spec("tiny", "ia3", "fastpeft"), "cpu", torch.bfloat16, 2, 0, None,
                               log=lambda s: None)
    assert row["status"] == "ok", row.get("reason")
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])


def test_step_alternate_times_both_libraries_in_turns_and_restores_the_collector(tmp_path):
    """benchmarks/scripts/step_alternate.py: rows alternate PEFT / fastpeft, host time never exceeds the step's
    time, and the garbage collector is left as it was (enabled, nothing frozen)."""
    alternate = _load("step_alternate")
    out = tmp_path / "alt.json"
    with _one_thread():
        assert alternate.main(["--model", "tiny", "--method", "ia3", "--rounds", "2", "--steps", "1", "--warmup", "0",
                               "--gc", "freeze", "--first", "fastpeft", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["impl"]) for r in rows] == [(0, "fastpeft"), (0, "peft"), (1, "fastpeft"), (1, "peft")]
    for r in rows:
        assert 0 < r["host_ms"] <= r["wall_ms"] and r["tokens_per_s"] > 0 and len(r["wall_ms_all"]) == 1
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_step_alternate_compares_a_setting_in_one_process(tmp_path, monkeypatch, capsys):
    """--setting NAME=V1,V2: one fastpeft row per value, built and run under that value (A B B A over rounds),
    PEFT's row as the control; a bad name or value is refused naming what is allowed."""
    alternate = _load("step_alternate")
    seen = []
    real = alternate.time_row

    def spy(spec, *args):
        seen.append((spec.impl, settings.get().group_projections))
        return real(spec, *args)

    monkeypatch.setattr(alternate, "time_row", spy)
    out = tmp_path / "alt.json"
    with _one_thread():
        assert alternate.main(["--model", "tiny", "--method", "lora", "--rounds", "2", "--steps", "1", "--warmup", "0",
                               "--first", "fastpeft", "--setting", "group_projections=0,1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["label"]) for r in rows] == [
        (0, "fastpeft[group_projections=False]"), (0, "fastpeft[group_projections=True]"), (0, "peft"),
        (1, "fastpeft[group_projections=True]"), (1, "fastpeft[group_projections=False]"), (1, "peft")]
    default = settings.get().group_projections
    assert seen == [("fastpeft", False), ("fastpeft", True), ("peft", default), ("fastpeft", True),
                    ("fastpeft", False), ("peft", default)]
    for bad, match in (("nope=1", "one of"), ("group_projections=2", "use 0 or 1"), ("backend=fast", "not valid")):
        with pytest.raises(SystemExit):
            alternate.main(["--model", "tiny", "--setting", bad])
        assert match in capsys.readouterr().err


def test_step_alternate_compares_an_operator_hook_in_one_process(tmp_path, monkeypatch, capsys):
    """--op-hook NAME=V1,V2: one fastpeft row per value of torch.ops.fastpeft_ops.set_NAME, set around the row and
    restored after it; PEFT's row runs under the mode that was there; bad names and values are refused."""
    from fastpeft.ops import cpp_ops

    if not cpp_ops.available():
        pytest.skip("the C++ operators are not built here")
    alternate = _load("step_alternate")
    ops = torch.ops.fastpeft_ops
    seen = []
    real = alternate.time_row

    def spy(spec, *args):
        mode = ops.set_lora_sum_order(-1)
        ops.set_lora_sum_order(mode)
        seen.append((spec.impl, mode))
        return real(spec, *args)

    monkeypatch.setattr(alternate, "time_row", spy)
    out = tmp_path / "alt.json"
    before = ops.set_lora_sum_order(-1)
    try:
        with _one_thread():
            assert alternate.main(["--model", "tiny", "--method", "lora", "--rounds", "2", "--steps", "1",
                                   "--warmup", "0", "--op-hook", "lora_sum_order=0,1", "--json", str(out)]) == 0
        assert ops.set_lora_sum_order(-1) == -1  # restored after every row
    finally:
        ops.set_lora_sum_order(before)
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["peft", "fastpeft[lora_sum_order=0]", "fastpeft[lora_sum_order=1]",
                                          "peft", "fastpeft[lora_sum_order=1]", "fastpeft[lora_sum_order=0]"]
    assert seen == [("peft", -1), ("fastpeft", 0), ("fastpeft", 1), ("peft", -1), ("fastpeft", 1), ("fastpeft", 0)]
    for bad, match in (("nope=1", "operator switch"), ("lora_sum_order=x", "integers"),
                       ("lora_sum_order=5", "mode must be")):
        with pytest.raises(SystemExit):
            alternate.main(["--model", "tiny", "--op-hook", bad])
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        alternate.main(["--model", "tiny", "--op-hook", "lora_sum_order=0,1", "--setting", "group_projections=0,1"])
    assert "give one of them" in capsys.readouterr().err


def test_step_alternate_compares_methods_in_one_process(tmp_path, capsys):
    """--method M1,M2: one fastpeft row per method in turns (A B B A), PEFT's row of the first method as the control;
    a method combined with --setting, a repeated or unknown method, or one that cannot run here is refused."""
    alternate = _load("step_alternate")
    out = tmp_path / "alt.json"
    with _one_thread():
        assert alternate.main(["--model", "tiny", "--method", "lora,ia3", "--rounds", "2", "--steps", "1",
                               "--warmup", "0", "--first", "fastpeft", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["method"], r["impl"]) for r in rows] == [
        (0, "lora", "fastpeft"), (0, "ia3", "fastpeft"), (0, "lora", "peft"),
        (1, "ia3", "fastpeft"), (1, "lora", "fastpeft"), (1, "lora", "peft")]
    assert [r["label"] for r in rows[:3]] == ["lora fastpeft", "ia3 fastpeft", "lora peft"]
    bad_cases = [(["--method", "lora,ia3", "--setting", "group_projections=0,1"], "one of them"),
                 (["--method", "lora,lora"], "distinct"), (["--method", "lora,nope"], "not allowed")]
    if not torch.cuda.is_available():
        bad_cases.append((["--method", "lora,lora_liger"], "lora_liger"))
    for argv, match in bad_cases:
        with pytest.raises(SystemExit):
            alternate.main(["--model", "tiny"] + argv)
        assert match in capsys.readouterr().err


def test_step_alternate_without_the_peft_control(tmp_path):
    """--no-control: fastpeft's rows only, still in turns (A B, B A)."""
    alternate = _load("step_alternate")
    out = tmp_path / "alt.json"
    with _one_thread():
        assert alternate.main(["--model", "tiny", "--method", "lora,dora", "--rounds", "2", "--steps", "1",
                               "--warmup", "0", "--no-control", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["method"], r["impl"]) for r in rows] == [
        (0, "lora", "fastpeft"), (0, "dora", "fastpeft"), (1, "dora", "fastpeft"), (1, "lora", "fastpeft")]
    assert all(r["tokens_per_s"] > 0 and len(r["gc_ms_all"]) == 1 for r in rows)


def test_step_alternate_clocks_the_collector():
    """The collector clock counts a full collection and its time, and step_alternate leaves gc.callbacks as it
    found them."""
    alternate = _load("step_alternate")
    clock = alternate._CollectorClock()
    gc.callbacks.append(clock)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(clock)
    assert clock.full == 1 and clock.ms > 0
    callbacks = list(gc.callbacks)
    with _one_thread():
        alternate.main(["--model", "tiny", "--method", "lora", "--rounds", "1", "--steps", "1", "--warmup", "0",
                        "--no-control"])
    assert gc.callbacks == callbacks


@pytest.mark.parametrize("method", ["fastpeft_qlora_layer", "fastpeft_qdora_layer", "fastpeft_dora_layer"])
def test_layer_step_returns_gradients_without_accumulating(method):
    """bench_layers.make_step with the trainable params (profile_layer.py's default since session 27) takes the
    gradients by torch.autograd.grad: the same values .backward() accumulates, and nothing left in any .grad. The
    q* methods wrap an NF4 base (fastpeft.quantize, no bitsandbytes)."""
    layers = _load("bench_layers")
    torch.manual_seed(0)
    fn, params = layers.build(method, 64, 48, torch.float32, "cpu", False)
    if method.startswith("fastpeft_q"):
        assert type(fn.base_layer).__name__ == "NF4Linear"
    x = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 48)
    layers.make_step(fn, x, g, True, params)()
    assert x.grad is None and all(p.grad is None for p in params)
    layers.make_step(fn, x, g, True)()
    want = [x.grad] + [p.grad for p in params]
    got = torch.autograd.grad(fn(x), [x] + params, g)
    assert all(w is not None and torch.equal(a, w) for a, w in zip(got, want))


def test_decode_benchmarks_decode_with_a_kv_cache(tmp_path, monkeypatch):
    """bench_mixed.py and bench_decode_compiled.py time generate() with a KV cache. Until session 11 their models came
    from fastpeft.bench.harness.llama_config (use_cache=False, which generate() copies into generation_config), so
    every "decode" step re-ran the whole sequence. The harness's check, which both call on every decode row, fails on
    such a model and passes after enable_kv_cache; the decode script's CPU smoke run passes it."""
    import transformers

    from fastpeft.bench.harness import assert_kv_cache, enable_kv_cache, llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(llama_config("tiny"), attn_implementation="sdpa").eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))

    def run():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                              min_new_tokens=3, do_sample=False, pad_token_id=0)

    with pytest.raises(AssertionError, match="no KV cache"):
        assert_kv_cache(model, run)
    assert assert_kv_cache(enable_kv_cache(model), run).shape == (2, 8)

    decode = _load("bench_decode_compiled")
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode_compiled.py", "--model", "tiny", "--batch", "1", "2",
                                      "--new-tokens", "3", "--repeats", "1", "--out", str(out)])
    decode.main()
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["batch"]) for r in rows} == {(impl, b) for impl in ("base (no adapters)",
                                                                             "fastpeft LoRA (unmerged)") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU the script runs its benchmark")
def test_decode_layer_benchmark_refuses_a_cpu_machine_by_name():
    """bench_decode_layer.py times CUDA-graph replays: without a GPU it must say so, not crash half-way."""
    decode_layer = _load("bench_decode_layer")
    with pytest.raises(SystemExit, match="needs a GPU"):
        decode_layer.main(["--M", "1"])


def test_decode_profile_bursts_measure_graph_spans_and_overlap():
    """bench_decode_compiled.py --profile compares decode steps by their graph span (the host's swings move
    tokens/s between runs, not this): steps are cut at idle gaps, a side stream's overlapping kernel extends the
    step without adding to its span, CPU events and short bursts (the host's small launches between steps) are left
    out, and the step of median span is reported."""
    decode = _load("bench_decode_compiled")

    def k(ts, dur, cat="kernel"):
        return {"cat": cat, "ts": ts, "dur": dur}

    steps = []
    for i, n in enumerate((3, 5, 4)):  # three "replays" of n back-to-back kernels, 1 us apart, 500 us apart
        t0 = 1000.0 * i
        steps += [k(t0 + 11 * j, 10) for j in range(n)]
    steps.append(k(1000.0 + 2, 8))  # a kernel on a side stream inside the second replay: overlaps, no new span
    steps.append(k(1700.0, 3))  # a lone kernel between replays (logits processing): its own short burst
    steps.append({"cat": "cpu_op", "ts": 1701.0, "dur": 500})  # not GPU work
    out = decode.gpu_bursts(steps, min_kernels=3)
    assert out["bursts"] == 3
    assert out["median_span_us"] == 43.0  # the 4-kernel replay: 3 gaps of 1 us, 4 kernels of 10 us
    assert out["its_kernel_sum_us"] == 40.0 and out["its_kernels"] == 4
    by_span = decode.gpu_bursts([e for e in steps if e["ts"] < 1100], min_kernels=3)
    assert by_span["bursts"] == 2
    five = decode.gpu_bursts([e for e in steps if 1000 <= e["ts"] < 1100], min_kernels=3)
    assert five["median_span_us"] == 54.0 and five["its_kernels"] == 6 and five["its_kernel_sum_us"] == 58.0
    assert decode.gpu_bursts([k(0, 5)], min_kernels=3) == {}


def test_host_overhead_group_rows_alternate_their_order_and_keep_the_median(monkeypatch):
    """benchmarks/scripts/host_overhead.py: the q/k/v group rows (one by one and grouped, four methods) are timed
    in rounds whose order alternates, each row's median kept and every round's value returned. Timed on the CPU
    with a stand-in clock (the script's own clock needs CUDA): the i-th timing reads i."""
    host = _load("host_overhead")
    ticks = []

    def fake_host_us(fn):
        fn()
        ticks.append(None)
        return float(len(ticks))

    monkeypatch.setattr(host, "host_us", fake_host_us)
    medians, rounds = host._group_rows("cpu", torch.float32, 64, 80, 4, 3)
    assert len(medians) == 8 and medians.keys() == rounds.keys()
    labels = list(rounds)
    assert [rounds[k][0] for k in labels] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # round 0 in order
    assert [rounds[k][1] for k in labels] == [16.0, 15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0]  # round 1 reversed
    assert all(medians[k] == sorted(rounds[k])[1] for k in labels)
    assert sum("grouped" in k for k in labels) == 4 and all("80 rows, K=64" in k for k in labels)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU the script runs its benchmark")
def test_mixed_layer_benchmark_refuses_a_cpu_machine_by_name():
    """bench_mixed_layer.py times CUDA host paths: without a GPU it says so."""
    mixed_layer = _load("bench_mixed_layer")
    with pytest.raises(SystemExit, match="needs a GPU"):
        mixed_layer.main(["--rows", "1"])


def test_mixed_benchmark_rounds_alternate_and_take_ratios_within_a_round(tmp_path, monkeypatch):
    """bench_mixed.py --rounds: the base and fastpeft rows are timed once per round (the lent hosts drift within a
    call, so a ratio of rows timed minutes apart measures the drift); each summary ratio is the median of the
    rounds' own ratios, and every round's is kept."""
    import statistics

    mixed = _load("bench_mixed")
    out = tmp_path / "mixed.json"
    monkeypatch.setattr(sys, "argv", ["bench_mixed.py", "--model", "tiny", "--adapters", "2", "--kinds", "decode",
                                      "--skip-peft", "--rounds", "3", "--repeats", "1", "--new-tokens", "2",
                                      "--out", str(out)])
    mixed.main()
    info = json.loads(out.read_text())
    seen = {(r["impl"], r["round"]) for r in info["rows"]}
    impls = ("base (no adapters)", "fastpeft mixed", "fastpeft one adapter")
    assert seen == {(impl, rnd) for impl in impls for rnd in range(3)}
    speed = {(r["impl"], r["round"]): r["tokens_per_s"] for r in info["rows"]}
    want = [speed["fastpeft mixed", rnd] / speed["fastpeft one adapter", rnd] for rnd in range(3)]
    line = info["summary"][0]
    assert line["mixed_vs_one_adapter_rounds"] == pytest.approx(want)
    assert line["mixed_vs_one_adapter"] == pytest.approx(statistics.median(want))
    fastest = {impl: max(r["batch"] * 2 / t for r in info["rows"] if r["impl"] == impl for t in r["runs_s"])
               for impl in impls}  # 2 new tokens a row
    assert line["mixed_vs_one_adapter_fastest_runs"] == pytest.approx(
        fastest["fastpeft mixed"] / fastest["fastpeft one adapter"])
    assert all(isinstance(r["gc_collections"], list) and len(r["gc_collections"]) == 3 for r in info["rows"])


def test_sass_mix_counts_the_main_loop_span_by_opcode(tmp_path, capsys):
    """sass_mix.py (static instruction mix from an nvdisasm listing): the span runs from the first to the last anchor
    instruction, predicates are dropped, register moves are counted, and only the named kernels are read."""
    sass = _load("sass_mix")
    listing = """
//--------------------- .text._Z6kernelILi0EEvv --------------------------
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   IMAD.MOV.U32 R8, RZ, RZ, R20 ;
        /*0030*/               @P0 LDS R9, [R10] ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/                   EXIT ;
//--------------------- .text._Z5otherv --------------------------
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
"""
    body = sass.kernels(listing)["_Z6kernelILi0EEvv"]
    mix = sass.loop_mix(body, "HMMA")
    assert (mix["static"], mix["anchors"], mix["span"], mix["moves"]) == (6, 2, 4, 1)
    assert mix["by_opcode"] == {"HMMA": 2, "IMAD": 1, "LDS": 1}
    path = tmp_path / "k.sass"
    path.write_text(listing)
    assert sass.main([str(path), "--kernel", "kernelILi0", "--work", "2"]) == 0
    out = capsys.readouterr().out
    assert "span 4 (2.00 per unit of work), register moves 1" in out and "_Z5otherv" not in out
    assert sass.main([str(path), "--kernel", "missing"]) == 1

"""Smoke tests for `python -m fastpeft.bench` (the whole-step benchmark) on tiny shapes.

The CPU run exercises the same code as the GPU run (build, NF4 swap, PEFT / fastpeft setup, timing, profiler
breakdown, tables, plots), so a typo in it fails here rather than on the device.
"""
import json
import math
import os
import re
import sys

import pytest
import torch
import transformers

from fastpeft import bench

CUDA = torch.cuda.is_available()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One full tiny run: every method, PEFT and fastpeft, one profiled method (bench.main, as the CLI)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--model", "tiny", "--steps", "2", "--warmup", "1", "--out-dir", str(out), "--no-progress",
            "--profile", "lora,qlora"]
    if not _has_matplotlib():
        args.append("--no-plots")
    threads = torch.get_num_threads()
    rc = bench.main(args)
    assert torch.get_num_threads() == threads  # the CPU run's one-thread setting is undone
    files = sorted(os.listdir(out))
    stem = f"step_{json.load(open(out / [f for f in files if f.endswith('.json')][0]))['date']}"
    with open(out / f"{stem}.json") as f:
        info = json.load(f)
    with open(out / f"{stem}.md") as f:
        md = f.read()
    return {"rc": rc, "out": out, "files": files, "stem": stem, "info": info, "md": md}


def test_one_row_per_method_and_implementation(smoke):
    assert smoke["rc"] == 0
    rows = smoke["info"]["rows"]
    got = [(r["method"], r["impl"]) for r in rows]
    want = [(s.method, s.impl) for s in bench.make_plan(["tiny"], bench.METHODS)]
    assert got == want
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r  # tiny shapes: nothing may fail or run out of memory
        if r["status"] == "skipped":
            assert r["reason"], r  # never silently
            assert r["method"] == "lora_liger" or not CUDA, r


def test_numbers_are_sane(smoke):
    rows = [r for r in smoke["info"]["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in rows} >= {"full_ft", "lora", "lora_dropout", "ia3", "qlora", "qlora_dropout"}
    for r in rows:
        assert r["tokens"] == 2 * 64
        assert len(r["step_s_all"]) == 2 and all(t > 0 for t in r["step_s_all"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert 10 < r["tokens_per_s"] < 1e8
        # random init over a 512-token vocabulary: cross entropy starts near ln(512); AdaLoRA's loss adds 0.5 x the
        # orthogonality penalty, ~√init_r at init (A, B ~ N(0, 0.02²): A·Aᵀ − I ≈ −I)
        expected = math.log(512) + (0.5 * math.sqrt(bench.plan.ADALORA_INIT_R) if r["method"] == "adalora" else 0.0)
        assert abs(r["loss_first"] - expected) < 0.5 and math.isfinite(r["loss_last"])
        assert r["peak_gib"] is None or 0 < r["peak_gib"] < 64
        assert r["trainable_params"] > 0
        assert r["flops_per_step"] > 0
    by = {(r["method"], r["impl"]): r for r in rows}
    # the same adapters on both sides: same trainable parameter counts
    for method in ("lora", "lora_dropout", "ia3", "qlora"):
        assert by[(method, "peft")]["trainable_params"] == by[(method, "fastpeft")]["trainable_params"], method
    # AdaLoRA: on a bf16 model PEFT's fp32 upcast re-creates each layer's ranknum as a trainable parameter (PEFT
    # 0.21.2; it builds it frozen); fastpeft keeps it frozen: one parameter more per adapted layer on PEFT's side
    adapted = bench.plan.MODELS["tiny"]["num_hidden_layers"] * 7  # all linear layers but the head
    assert by[("adalora", "peft")]["trainable_params"] - by[("adalora", "fastpeft")]["trainable_params"] == adapted
    assert by[("full_ft", "torch")]["trainable_params"] > 3 * by[("lora", "peft")]["trainable_params"]
    # same weights, same batch, adapters start as a no-op (B = 0, l = 1): same first loss on both sides
    for method in ("lora", "ia3", "qlora", "adalora"):
        assert by[(method, "peft")]["loss_first"] == pytest.approx(by[(method, "fastpeft")]["loss_first"], rel=2e-2)


def test_profile_breakdown(smoke):
    profiled = [r for r in smoke["info"]["rows"] if "profile" in r]
    assert {(r["method"], r["impl"]) for r in profiled} == {(m, i) for m in ("lora", "qlora") for i in ("peft", "fastpeft")}
    for r in profiled:
        p = r["profile"]
        assert "error" not in p, p
        assert set(p["ms"]) == set(bench.BUCKETS) | {"other (unattributed)"}
        assert p["ms"]["linear"] > 0 and p["ms"]["attention"] > 0
        assert sum(p["ms"].values()) == pytest.approx(p["busy_ms"], rel=1e-6)
        assert p["top"] and p["top"][0]["ms"] > 0
    peft_q = next(r for r in profiled if r["method"] == "qlora" and r["impl"] == "peft")
    assert peft_q["profile"]["ms"]["nf4 dequant"] > 0  # bnb dequantizes the 4-bit weights every step


def test_markdown_and_plots(smoke):
    md = smoke["md"]
    assert ("## Peak host RSS" if not CUDA else "## Peak memory") in md  # CPU: labelled as the process's RSS
    assert "## Speed" in md and "## Where one step's time goes" in md
    assert ("| model | Full FT | LoRA r=16 | LoRA r=16 + fused loss | LoRA r=16 + fused loss + offload | QLoRA r=16 | "
            "QLoRA r=16 + fused loss | QLoRA r=16 + fused loss + offload | IA3 |") in md
    assert "are fastpeft-only: their PEFT columns repeat PEFT's plain" in md
    assert "tiny Llama (2 layers)" in md and "PEFT " in md and "→ fastpeft" in md
    for label in ("LoRA r=16", "LoRA r=16, dropout 0.05", "QLoRA r=16", "QLoRA r=16, dropout 0.05", "IA3",
                  "LoRA r=16 + fused loss", "QLoRA r=16 + fused loss + offload"):
        assert f"| {label} |" in md, label
    assert "smoke test" in md  # a CPU run says what it is
    if not CUDA:
        assert "liger" in md.lower()  # skipped rows name their reason
    pngs = [f for f in smoke["files"] if f.endswith(".png")]
    if _has_matplotlib():
        assert sorted(pngs) == [f"{smoke['stem']}_memory.png", f"{smoke['stem']}_tokens.png"]
        for f in pngs:
            with open(smoke["out"] / f, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert pngs == []
    assert len(smoke["files"]) <= 8 and not any(os.path.isdir(smoke["out"] / f) for f in smoke["files"])


def test_report_merges_runs(smoke, tmp_path):
    src = str(smoke["out"] / f"{smoke['stem']}.json")
    first = json.loads(open(src).read())
    for r in first["rows"]:  # a first run cut short by --budget-s: its IA3 rows did not run
        if r["method"] == "ia3":
            r.update(status="skipped", reason="time budget")
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(first))
    info = bench.report([str(cut), src], str(tmp_path), plots=False, log=lambda s: None)
    assert len(info["rows"]) == len(smoke["info"]["rows"])  # one row per configuration
    assert all(r["status"] == "ok" for r in info["rows"] if r["method"] == "ia3")  # the later run's rows won
    assert (tmp_path / f"{smoke['stem']}.md").read_text().count("| tiny Llama (2 layers) |") >= 1


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'.*--no-plots"):
        bench.main(["--model", "tiny", "--methods", "ia3", "--out-dir", str(tmp_path), "--no-progress"])


def test_bad_arguments_say_what_is_allowed(tmp_path):
    with pytest.raises(SystemExit, match="unknown method.*lora"):
        bench.main(["--model", "tiny", "--methods", "lora,boft", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown --profile"):
        bench.main(["--model", "tiny", "--profile", "xyz", "--out-dir", str(tmp_path)])
    if not CUDA:
        with pytest.raises(SystemExit, match="needs a CUDA GPU.*--model tiny"):
            bench.main(["--model", "8b", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("model", ["1b", "8b", "tiny", "qwen1.5b", "tiny-qwen"])
def test_parameter_accounting_matches_transformers(model):
    """The FLOP / memory model counts the same parameters as the real model (built on meta: no memory)."""
    kind = transformers.Qwen2ForCausalLM if bench.arch_of(model) == "qwen2" else transformers.LlamaForCausalLM
    with torch.device("meta"):
        m = kind(bench.model_config(model))
    assert bench.total_params(model) == sum(p.numel() for p in m.parameters())
    lin = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    lp = bench.linear_params(model)
    assert lp["decoder"] + lp["head"] == lin


def test_flops_and_full_ft_estimate():
    for model in ("1b", "8b"):
        batch, seq = bench.SEQ[model]
        tokens = batch * seq
        n = sum(bench.linear_params(model).values())
        lora, full = bench.step_flops(model, "lora"), bench.step_flops(model, "full_ft")
        # frozen base: ~6·N·T (forward, recompute, input grad) vs full FT ~8·N·T, plus attention
        assert 6 * n * tokens < lora < 6.6 * n * tokens
        assert 1.25 < full / lora < 1.34
    # Full FT 8B: 8 B/param of states alone is ~60 GiB; the logits and activations add several GiB
    est = bench.full_ft_estimate_bytes("8b") / bench.GiB
    assert 62 < est < 75


def test_classify_buckets():
    assert bench.classify(["aten::mm", "aten::linear"]) == "linear"
    assert bench.classify(["cudaLaunchKernel", "_LoraLinearFnBackward", "autograd::engine::evaluate_function: x"]) == "linear"
    assert bench.classify(["bitsandbytes::dequantize_4bit", "MatMul4Bit"]) == "nf4 dequant"
    assert bench.classify(["aten::_log_softmax", "aten::log_softmax", "bench::loss"]) == "loss"
    assert bench.classify(["aten::_to_copy", "aten::to", "bench::loss"]) == "loss"
    assert bench.classify(["aten::_scaled_dot_product_flash_attention"]) == "attention"
    assert bench.classify(["aten::_fused_adamw_", "Optimizer.step#AdamW.step"]) == "optimizer"
    assert bench.classify(["aten::mul", "aten::rsqrt"]) == "norm+elementwise"


def test_device_slug_and_outputs_stem():
    assert bench.device_slug("cpu") == "cpu"
    assert bench.output_stem(["1b", "8b"], "2026-01-02") == "step_2026-01-02"
    assert bench.output_stem(["8b"], "2026-01-02") == "step_2026-01-02_8b"
    assert bench.output_stem(["tiny"], "2026-01-02") == "step_2026-01-02"


def test_full_ft_past_gpu_memory_is_recorded_as_oom_without_trying(monkeypatch):
    monkeypatch.setattr(bench.harness, "gpu_memory_bytes", lambda device: 40 * bench.GiB)  # where run_config looks it up
    row = bench.run_config(bench.Spec("8b", "full_ft", "torch"), "cuda", torch.bfloat16, 1, 0, None)
    assert row["status"] == "oom" and "estimated" in row["reason"] and "not tried" in row["reason"]
    assert row["estimate_gib"] > 40


def _gpu_like_info():
    """Rows as a GPU run writes them (MFU, OOM, error), to check the report formatting without a GPU."""
    rows = []
    for model, base in (("1b", 20000.0), ("8b", 5000.0)):
        for spec in bench.make_plan([model], bench.METHODS):
            row = bench.new_row(spec)
            if spec.method == "full_ft" and model == "8b":
                row.update(status="oom", reason="OOM (estimated 90.0 GiB > 79.1 GiB): not tried", estimate_gib=90.0)
            elif spec.method == "lora_liger" and spec.impl == "fastpeft":
                row.update(status="error", reason="RuntimeError: boom")
            else:
                speed = base * (2.5 if spec.impl == "fastpeft" else 1.0)
                row.update(status="ok", tokens=4096, step_s=4096 / speed, step_s_all=[4096 / speed] * 3,
                           tokens_per_s=speed, peak_gib=20.0 * (0.7 if spec.impl == "fastpeft" else 1.0),
                           peak_kind="allocated", loss_first=11.9, loss_last=11.8, flops_per_step=1e14, mfu=0.41)
            rows.append(row)
    return {"schema": bench.SCHEMA, "date": "2026-01-02", "device": "NVIDIA H100 80GB HBM3", "device_slug": "h100",
            "versions": bench.versions(), "gemm_tflops": 750.0, "notes": [], "rows": rows,
            "settings": {"dtype": "bfloat16", "rank": 16, "lora_alpha": 32, "steps": 5, "warmup": 2,
                         "gradient_checkpointing": "non-reentrant", "optimizer": "torch AdamW (fused)",
                         "fastpeft_backend": "auto"}}


def test_gpu_report_formatting(tmp_path):
    info = _gpu_like_info()
    md = bench.markdown(info)
    assert "| Llama-3.1-8B | OOM (est. 90 GiB, not tried) |" in md
    assert "| Llama-3.2-1B | 20.0 GiB | PEFT 20.0 GiB → fastpeft 14.0 GiB (0.70×) |" in md
    assert "| Llama-3.2-1B | LoRA r=16 | 20,000 | 50,000 | 2.50× | 41.0% | 41.0% |" in md
    assert "speed ≥2× met; memory ≤0.75× met; 2.50× Full FT" in md
    assert "speed ≥3× missed" in md  # QLoRA at 2.5×
    assert "MFU = model FLOPs per step" in md and "750 TFLOP/s" in md
    assert "- 8b LoRA r=16 + Liger [fastpeft]: error: RuntimeError: boom" in md
    if _has_matplotlib():
        files = bench.write_plots(info, str(tmp_path / "x"))
        assert [os.path.basename(f) for f in files] == ["x_tokens.png", "x_memory.png"]


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090")])
def test_gpu_slug(monkeypatch, name, slug):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert bench.device_slug("cuda") == slug


# -- CPU-run report problems (issue: bench on a CPU-only machine) -------------------------------------------
def _section(md: str, heading_start: str) -> str:
    """The text of the markdown section whose heading starts with ``heading_start`` (up to the next '## ')."""
    start = md.index(heading_start)
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


@pytest.mark.skipif(CUDA, reason="a CPU run's report (peak = process RSS)")
def test_cpu_memory_is_labelled_host_rss_not_gpu_memory(smoke):
    """On a CPU run the 'memory' numbers are the whole process's peak RSS: the report must say so and must not
    compare them as if they were the adapters' GPU memory (every cell used to read '0.5 GiB ... (1.00×)')."""
    md = smoke["md"]
    assert "## Peak memory\n" not in md  # the GPU run's heading, unqualified
    mem = _section(md, "## Peak host RSS")
    assert "not GPU memory" in mem.splitlines()[0]
    assert "×)" not in mem  # no PEFT-vs-fastpeft memory ratio from process RSS
    speed = _section(md, "## Speed")
    header = next(line for line in speed.splitlines() if line.startswith("| model | method"))
    assert "host RSS PEFT" in header and "peak PEFT" not in header and "memory ×" not in header
    ok = [r for r in smoke["info"]["rows"] if r["status"] == "ok"]
    assert ok and all(r["peak_kind"] == "rss" for r in ok)


def test_second_run_the_same_day_does_not_overwrite(tmp_path):
    args = ["--model", "tiny", "--methods", "ia3", "--steps", "1", "--warmup", "0", "--out-dir", str(tmp_path),
            "--no-progress", "--no-plots"]
    assert bench.main(args) == 0
    first = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in first if f.endswith(".json")]) == 1
    saved = {f: (tmp_path / f).read_bytes() for f in first}
    assert bench.main(args) == 0
    second = sorted(p.name for p in tmp_path.iterdir())
    assert set(second) > set(first) and len([f for f in second if f.endswith(".json")]) == 2, second
    for f, data in saved.items():  # the first run's files are untouched
        assert (tmp_path / f).read_bytes() == data, f
    new_json = [f for f in second if f.endswith(".json") and f not in first][0]
    assert json.loads((tmp_path / new_json).read_text())["rows"]
    # --overwrite replaces the first run's files instead of adding a third set
    assert bench.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == second


def test_help_says_what_a_second_run_does(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in out and "_run2" in out


def test_skip_reason_says_skipped_once(monkeypatch):
    """A configuration that cannot run is reported as 'skipped: <reason>', so the reason must not say
    'skipped' again (it read 'skipped: liger not installed: skipped (pip install liger-kernel)')."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "liger_kernel" else real(name, *a, **k))
    row = bench.run_config(bench.Spec("tiny", "lora_liger", "fastpeft"), "cpu", torch.float32, 1, 0, None,
                           log=lambda s: None)
    assert row["status"] == "skipped" and "liger" in row["reason"].lower() and "pip install liger-kernel" in row["reason"]
    info = _gpu_like_info()
    info["rows"] = [row]
    line = next(s for s in bench.markdown(info).splitlines() if s.startswith(f"- {row['label']}"))
    assert line.lower().count("skipped") == 1, line
    assert bench.describe(row).lower().count("skipped") == 1, bench.describe(row)


@pytest.mark.skipif(CUDA or not _has_matplotlib(), reason="the CPU run's plot title (needs matplotlib)")
def test_plot_title_states_the_threads_actually_used(monkeypatch, tmp_path):
    """The CPU run sets torch to one thread; the plots' title (the device string) said os.cpu_count() threads."""
    import matplotlib.figure

    titles = []
    real = matplotlib.figure.Figure.suptitle

    def record(self, t, *a, **k):
        titles.append(t)
        return real(self, t, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", record)
    assert bench.main(["--model", "tiny", "--methods", "ia3", "--steps", "1", "--warmup", "0", "--out-dir",
                       str(tmp_path), "--no-progress"]) == 0
    assert len(titles) == 2  # tokens and memory plots
    for t in titles:
        m = re.search(r"(\d+) (?:torch )?threads?\b", t)
        assert m and int(m.group(1)) == 1, t  # torch ran on one thread


def test_fastpeft_only_rows_have_no_peft_twin_and_the_same_first_loss(smoke):
    """The memory options change memory, not numbers: a fused-loss / offload row starts from the same loss as
    fastpeft's plain row (same weights and batch), and only fastpeft runs it."""
    by = {(r["method"], r["impl"]): r for r in smoke["info"]["rows"]}
    for method, plain in bench.FASTPEFT_ONLY.items():
        assert (method, "peft") not in by
        row = by[(method, "fastpeft")]
        assert row["status"] == "ok", row
        assert row["loss_first"] == pytest.approx(by[(plain, "fastpeft")]["loss_first"], rel=1e-3)


def test_longest_markdown_reads_results():
    from fastpeft.bench.longest import longest_markdown

    ok = lambda seq, tps: {"seq": seq, "status": "ok", "tokens_per_s": tps, "peak_gib": 20.0}
    info = {"device": "GPU", "date": "d", "versions": {}, "model_name": "Llama-3.1-8B", "steps": 3, "start": 2048,
            "max_seq": 8192, "results": [
                {"impl": "peft", "method": "qlora", "cap_gib": 24.0, "weights_gib": 9.0, "longest": 2048,
                 "longest_is_lower_bound": False, "lengths": [ok(2048, 900.0), {"seq": 4096, "status": "oom"}]},
                {"impl": "fastpeft", "method": "qlora_offload", "cap_gib": 24.0, "weights_gib": 6.0, "longest": 8192,
                 "longest_is_lower_bound": True, "stopped": "max_seq 8192 reached",
                 "lengths": [ok(2048, 1000.0), ok(4096, 990.0), ok(8192, 950.0)]}]}
    md = longest_markdown(info)
    assert "| 24 GiB | QLoRA r=16 [peft] | 2,048 | 900 | 20.0 | 9.0 | oom at 4096 |" in md
    assert "| ≥ 8,192 | 950 |" in md and "4.0× PEFT's longest" in md


def test_longest_needs_a_gpu_and_valid_rows():
    if CUDA:
        pytest.skip("checks the CPU refusal")
    with pytest.raises(SystemExit, match="CUDA"):
        bench.main(["--longest"])


def test_compile_option_checks_its_arguments_and_names_its_files(tmp_path):
    with pytest.raises(SystemExit):  # argparse: not one of the modes
        bench.main(["--model", "tiny", "--compile", "fast", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--compile needs --warmup >= 2"):
        bench.main(["--model", "tiny", "--compile", "reduce-overhead", "--warmup", "1", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="compile_mode must be None or one of"):
        bench.harness.prepare(bench.Spec("tiny", "lora", "fastpeft"), "cpu", compile_mode="fast")
    assert bench.output_stem(["8b"], "2026-01-02", "reduce-overhead") == "step_compile-reduce-overhead_2026-01-02_8b"


def test_compiled_run_reports_the_first_step_side_by_side():
    info = _gpu_like_info()
    info["settings"]["compile"] = "reduce-overhead"
    for row in info["rows"]:
        if row["status"] == "ok":
            row["first_step_s"] = {"torch": 30.0, "peft": 40.0, "fastpeft": 20.0}[row["impl"]]
    md = bench.markdown(info)
    assert "`torch.compile(model, mode='reduce-overhead')`" in md and "records the CUDA graphs" in md
    assert "| Llama-3.2-1B | Full FT | 30.0 |  |  |" in md
    assert "| Llama-3.2-1B | LoRA r=16 |  | 40.0 | 20.0 |" in md
    assert "## First (compiling) step" not in bench.markdown(_gpu_like_info())  # eager runs: no such table


def test_qwen_shape_and_batch_option_run_and_are_recorded(tmp_path):
    # issue 13 asks for other Llama-like families and batch shapes: a Qwen2 model (bias on q / k / v, 2 KV heads,
    # tied embeddings) at a batch shape given on the command line, PEFT and fastpeft side by side
    rc = bench.main(["--model", "tiny-qwen", "--methods", "lora", "--batch", "3x16", "--steps", "1", "--warmup", "1",
                     "--no-plots", "--no-progress", "--out-dir", str(tmp_path)])
    assert rc == 0
    (json_file,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert json_file.endswith("_tiny-qwen_b3x16.json"), json_file
    with open(tmp_path / json_file) as f:
        info = json.load(f)
    assert info["settings"]["shapes"]["tiny-qwen"]["batch"] == 3 and info["settings"]["shapes"]["tiny-qwen"]["seq"] == 16
    rows = {r["impl"]: r for r in info["rows"]}
    assert set(rows) == {"peft", "fastpeft"}
    for r in rows.values():
        assert r["status"] == "ok" and (r["batch"], r["seq"], r["tokens"]) == (3, 16, 48), r
    assert abs(rows["peft"]["loss_first"] - rows["fastpeft"]["loss_first"]) < 1e-4  # same model, same batch
    with open(tmp_path / json_file.replace(".json", ".md")) as f:
        assert "tiny Qwen2 (2 layers): batch 3 × 16 tokens" in f.read()
    base = bench.build_base("tiny-qwen", "cpu", torch.float32)
    assert isinstance(base, transformers.Qwen2ForCausalLM)
    attn = base.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    assert base.config.num_key_value_heads == 2 and base.config.tie_word_embeddings


def test_batch_option_checks_its_argument(tmp_path):
    for bad in ("8x", "0x16", "2x-1", "abc", "2x3x4"):
        with pytest.raises(SystemExit, match="--batch must be BATCHxTOKENS"):
            bench.main(["--model", "tiny", "--batch", bad, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--batch does not apply to --longest"):
        bench.main(["--longest", "--batch", "2x16", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--batch does not apply to --report"):
        bench.main(["--report", "x.json", "--batch", "2x16", "--out-dir", str(tmp_path)])
    assert bench.output_stem(["1b"], "2026-01-02", None, (8, 2048)) == "step_2026-01-02_1b_b8x2048"
    assert bench.batch_shape_of("1b") == bench.SEQ["1b"] and bench.batch_shape_of("1b", (8, 2048)) == (8, 2048)
    # FLOPs scale with the tokens (same sequence length: the attention term too)
    assert bench.step_flops("1b", "lora", (8, 2048)) == pytest.approx(4 * bench.step_flops("1b", "lora"))
    assert bench.full_ft_estimate_bytes("1b", (8, 2048)) > bench.full_ft_estimate_bytes("1b")
    if not CUDA:
        with pytest.raises(SystemExit, match="needs a CUDA GPU.*tiny-qwen"):
            bench.main(["--model", "qwen1.5b", "--out-dir", str(tmp_path)])


def test_liger_rows_are_skipped_with_a_reason_on_qwen(monkeypatch):
    monkeypatch.setattr(bench.harness, "have", lambda name: True)
    why = bench.unavailable(bench.Spec("qwen1.5b", "lora_liger", "fastpeft"), "cuda")
    assert why and "Llama modules only" in why
    assert bench.unavailable(bench.Spec("1b", "lora_liger", "fastpeft"), "cuda") is None
    with pytest.raises(ValueError, match="not a Llama one"):
        bench.llama_config("qwen1.5b")

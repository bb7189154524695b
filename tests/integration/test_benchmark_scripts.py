"""The benchmark scripts under benchmarks/scripts/ leave the process as they found it.

`pytest benchmarks --benchmark-only` runs the NF4 tier (which builds its layers through
benchmarks/scripts/bench_nf4.py) before the whole-step tier in the same process. bench_nf4.py used to set
``os.environ["FASTPEFT_BACKEND"] = "triton"`` (and FASTPEFT_NF4_GEMM) and never restore it, so every later
fastpeft row ran the interpreted Triton kernels in bf16 on the CPU and three step rows came out NaN. Its
switches now go through ``fastpeft.settings.override``, which restores them on exit.
"""
import gc
import importlib.util
import json
import math
import os
import sys

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = bench.run_config(bench.Spec("tiny", "ia3", "fastpeft"), "cpu", torch.bfloat16, 2, 0, None,
                               log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert row["status"] == "ok", row.get("reason")
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])


def test_step_alternate_times_both_libraries_in_turns_and_restores_the_collector(tmp_path):
    """benchmarks/scripts/step_alternate.py: rows alternate PEFT / fastpeft, host time never exceeds the step's
    time, and the garbage collector is left as it was (enabled, nothing frozen)."""
    alternate = _load("step_alternate")
    out = tmp_path / "alt.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert alternate.main(["--model", "tiny", "--method", "ia3", "--rounds", "2", "--steps", "1", "--warmup", "0",
                               "--gc", "freeze", "--first", "fastpeft", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["impl"]) for r in rows] == [(0, "fastpeft"), (0, "peft"), (1, "fastpeft"), (1, "peft")]
    for r in rows:
        assert 0 < r["host_ms"] <= r["wall_ms"] and r["tokens_per_s"] > 0 and len(r["wall_ms_all"]) == 1
    assert gc.isenabled() and gc.get_freeze_count() == 0

"""pytest-benchmark view of the whole-training-step tier (fastpeft.bench): `pytest benchmarks --benchmark-only`.

One test per (method, implementation): PEFT and fastpeft for LoRA, LoRA dropout 0.05, QLoRA, QLoRA dropout
0.05, IA3 and LoRA + Liger, plus plain Full FT. Default shapes: the tiny 2-layer Llama (CPU or GPU: a few
seconds). The real shapes take minutes and need a GPU; opt in with

    FASTPEFT_BENCH_MODEL=1b pytest benchmarks/tier/test_bench_step.py --benchmark-only     (or 8b)

tokens/s and peak memory go into extra_info; ``python -m fastpeft.bench`` prints the side-by-side tables and
writes JSON / markdown / plots. Whatever cannot run is skipped with the reason (pytest -ra shows it).
"""
import os

import pytest
import torch

from fastpeft import bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODEL = os.environ.get("FASTPEFT_BENCH_MODEL", "tiny").strip().lower()
if MODEL not in bench.MODELS:
    raise ValueError(f"FASTPEFT_BENCH_MODEL={MODEL!r}: use one of {', '.join(bench.MODELS)}")
SPECS = bench.make_plan([MODEL], bench.METHODS)
WARMUP, ROUNDS = (2, 5) if MODEL != "tiny" else (1, 3)


@pytest.fixture(scope="module", autouse=True)
def _cpu_threads():
    """Tiny shapes on a CPU: one thread is faster and steadier than an OpenMP team (restored afterwards)."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.model}-{s.method}-{s.impl}")
def test_step(benchmark, spec):
    if MODEL != "tiny" and not CUDA:
        pytest.skip(f"FASTPEFT_BENCH_MODEL={MODEL} needs a CUDA GPU (unset it for the tiny shapes)")
    why = bench.unavailable(spec, DEVICE)
    if why:
        pytest.skip(why)
    if spec.method == "full_ft" and CUDA:
        est, cap = bench.full_ft_estimate_bytes(MODEL), bench.gpu_memory_bytes(DEVICE)
        if est > cap:
            pytest.skip(f"OOM (estimated {est / bench.GiB:.1f} GiB > {cap / bench.GiB:.1f} GiB): not tried")
    bench.free_memory(DEVICE)
    oom = None
    prep = bench.prepare(spec, DEVICE, torch.bfloat16)
    try:
        peak = bench.PeakMemory(DEVICE)
        peak.reset()
        losses = []

        def step():
            losses.append(prep.step())
            bench.sync(DEVICE)

        try:
            benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
        except torch.cuda.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:200]
        else:
            batch, seq = bench.SEQ[MODEL]
            median = benchmark.stats.stats.median
            pk = peak.peak_bytes()
            benchmark.extra_info.update(
                model=MODEL, method=spec.method, impl=spec.impl, tokens=batch * seq,
                tokens_per_s=batch * seq / median, peak_gib=None if pk is None else pk / bench.GiB,
                peak_kind=peak.kind, trainable_params=prep.trainable,
            )
            values = [float(x) for x in losses]
            assert all(v == v and abs(v) < 1e4 for v in values), values  # finite, no blow-up
    finally:
        prep.close()
        bench.free_memory(DEVICE)
    if oom:
        pytest.skip(f"OOM: {oom}")

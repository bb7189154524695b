"""Whole-training-step benchmark: PEFT vs fastpeft, side by side in one run.

The command line of ``python -m fastpeft.bench`` (``fastpeft/bench/__main__.py`` calls ``main``): parses the
options, picks the models, methods, steps and device, runs the plan (``runner.run``) or, with ``--report``,
merges earlier runs' JSON (``reporting.report``).
"""
from __future__ import annotations

import argparse
import warnings

import torch
import transformers

from .. import settings
from .environment import have
from .harness import COMPILE_MODES
from .longest import LONGEST_ROWS, run_longest
from .plan import CPU_MODELS, METHODS, MODELS, QUICK_METHODS, SEQ
from .reporting import report
from .runner import run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastpeft.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS) + ["all"], default=None,
                    help="model shape (default: all = 1b and 8b on CUDA; tiny on a CPU-only machine). qwen1.5b: "
                         "Qwen2.5-1.5B (bias on q/k/v, 2 KV heads, tied embeddings); tiny-qwen: its CPU smoke shape")
    ap.add_argument("--batch", default=None, metavar="BxT",
                    help="batch size x tokens per sequence for every row, e.g. 8x2048 (default: "
                         + ", ".join(f"{m} {b}x{t}" for m, (b, t) in SEQ.items()) + ")")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated, from {','.join(METHODS)} (default: all; --quick: {','.join(QUICK_METHODS)})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; CPU 3; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; CPU 1; quick 1)")
    ap.add_argument("--out-dir", default=None, help="where the files go (default benchmarks/results/<gpu>/)")
    ap.add_argument("--liger", dest="liger", action="store_true", default=None,
                    help="add the Liger rows (default: when liger_kernel is installed)")
    ap.add_argument("--no-liger", dest="liger", action="store_false")
    ap.add_argument("--profile", nargs="?", const="lora,qlora", default="",
                    help="profile one extra step of these methods on the run's largest model, both sides "
                         "(default when given: lora,qlora)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, no dropout variants")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip (and say so) configurations that would end past this many seconds")
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib needed)")
    ap.add_argument("--no-progress", action="store_true", help="plain log lines instead of a tqdm bar")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--backend", choices=["auto", "cpp", "triton", "reference"], default=None,
                    help="backend of the fastpeft rows (fastpeft.settings; default: FASTPEFT_BACKEND's, else auto)")
    ap.add_argument("--compile", default=None, choices=list(COMPILE_MODES), metavar="MODE",
                    help="run every row's step through torch.compile(model, mode=MODE), PEFT's and fastpeft's alike: "
                         + ", ".join(COMPILE_MODES) + " (reduce-overhead = CUDA graphs; needs --warmup >= 2)")
    ap.add_argument("--longest", action="store_true",
                    help="instead of the step table: the longest sequence (batch 1) each configuration trains under "
                         "memory caps (fastpeft/bench/longest.py; CUDA only)")
    ap.add_argument("--caps", default="24,80", help="--longest: memory caps in GiB (default 24,80)")
    ap.add_argument("--start-seq", type=int, default=2048, help="--longest: first length (doubling from there)")
    ap.add_argument("--max-seq", type=int, default=65536, help="--longest: longest length tried")
    ap.add_argument("--row-budget-s", type=float, default=240.0,
                    help="--longest: stop a row (lower bound) before a length that would end past this many seconds")
    ap.add_argument("--longest-rows", default=None,
                    help="--longest: impl:method pairs, comma-separated (default: "
                         + ",".join(f"{i}:{m}" for i, m in LONGEST_ROWS) + ")")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="no run: merge these step JSONs and write markdown + plots")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the files of an earlier run with the same name (default: never; a second run "
                         "on the same day writes step_<date>_run2.*, then _run3.*, ...)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        if a.batch is not None:
            raise SystemExit("fastpeft.bench: --batch does not apply to --report (the runs' JSON record their shapes)")
        report(a.report, a.out_dir, plots=not a.no_plots, overwrite=a.overwrite)
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.longest:
        if a.compile is not None:
            raise SystemExit("fastpeft.bench: --compile does not apply to --longest")
        if a.batch is not None:
            raise SystemExit("fastpeft.bench: --batch does not apply to --longest (it searches the sequence length "
                             "at batch 1)")
        return _longest(a, device)
    if a.model is None or a.model == "all":
        models = ["1b", "8b"] if device == "cuda" else ["tiny"]
    else:
        models = [a.model]
    if device != "cuda" and not set(models) <= set(CPU_MODELS):
        raise SystemExit(f"fastpeft.bench: --model {a.model} needs a CUDA GPU; on this machine use --model tiny "
                         "(the default without a GPU) or tiny-qwen")
    batch_shape = _batch_shape(a.batch)
    if device != "cuda":
        s = MODELS[models[0]]
        b, t = batch_shape or SEQ[models[0]]
        print(f"fastpeft.bench: no CUDA device -> tiny shapes on the CPU ({s['name']}, hidden {s['hidden_size']}, "
              f"batch {b} x {t} tokens): a smoke test, not a measurement", flush=True)
    if a.backend == "triton" and device != "cuda" and not settings.get().triton_interpret:
        raise SystemExit("fastpeft.bench: --backend triton without a GPU needs TRITON_INTERPRET=1 in the "
                         "environment (set before Python starts) and --dtype fp32")
    methods = a.methods.split(",") if a.methods else (QUICK_METHODS if a.quick else METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"fastpeft.bench: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if a.liger is False:
        methods = [m for m in methods if m != "lora_liger"]
    elif a.liger is True and not have("liger_kernel"):
        raise SystemExit("fastpeft.bench: --liger given but liger_kernel is not importable (pip install liger-kernel)")
    profile_methods = [m for m in a.profile.split(",") if m] if a.profile else []
    bad = [m for m in profile_methods if m not in METHODS]
    if bad:
        raise SystemExit(f"fastpeft.bench: unknown --profile method(s) {bad}; choose from {', '.join(METHODS)}")
    cpu = device != "cuda"
    steps = a.steps if a.steps is not None else (3 if (a.quick or cpu) else 5)
    warmup = a.warmup if a.warmup is not None else (2 if a.compile else 1 if (a.quick or cpu) else 2)
    if steps < 1 or warmup < 0:
        raise SystemExit("fastpeft.bench: --steps must be >= 1 and --warmup >= 0")
    if a.compile is not None and warmup < 2:
        raise SystemExit(f"fastpeft.bench: --compile needs --warmup >= 2 (the first step compiles; under "
                         f"reduce-overhead the second records the CUDA graphs), got {warmup}")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    if cpu:
        # Tiny shapes: one thread is faster and far steadier than an OpenMP team on a busy machine.
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(gradient|activation)_checkpointing.*", category=FutureWarning)
            info = run(models, methods, device, steps, warmup, a.out_dir, profile_methods, dtype=dtype,
                       budget_s=a.budget_s, plots=not a.no_plots, backend=a.backend, progress=not a.no_progress,
                       overwrite=a.overwrite, compile_mode=a.compile, batch_shape=batch_shape)
    finally:
        torch.set_num_threads(threads)
    bad_rows = [r for r in info["rows"] if r["status"] == "error"]
    return 1 if bad_rows else 0



def _batch_shape(text):
    """``--batch BxT`` as (B, T), or None when not given; a clear error for anything else."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"fastpeft.bench: --batch must be BATCHxTOKENS with two positive integers (e.g. 8x2048), "
                         f"got {text!r}")
    return int(parts[0]), int(parts[1])


def _longest(a, device: str) -> int:
    if device != "cuda":
        raise SystemExit("fastpeft.bench --longest needs a CUDA GPU (the caps are GPU memory)")
    model = a.model if a.model not in (None, "all") else "8b"
    try:
        caps = [float(c) for c in a.caps.split(",") if c]
    except ValueError:
        raise SystemExit(f"fastpeft.bench: --caps must be comma-separated numbers of GiB, got {a.caps!r}") from None
    rows = LONGEST_ROWS
    if a.longest_rows:
        rows = []
        for item in a.longest_rows.split(","):
            impl, _, method = item.partition(":")
            if impl not in ("peft", "fastpeft") or method not in METHODS or method == "full_ft":
                raise SystemExit(f"fastpeft.bench: --longest-rows item {item!r} must be peft:METHOD or "
                                 f"fastpeft:METHOD with METHOD in {', '.join(m for m in METHODS if m != 'full_ft')}")
            rows.append((impl, method))
    if not caps or any(c <= 0 for c in caps) or a.start_seq < 1 or a.max_seq < a.start_seq:
        raise SystemExit("fastpeft.bench: --caps must be > 0 and 1 <= --start-seq <= --max-seq")
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(gradient|activation)_checkpointing.*", category=FutureWarning)
        info = run_longest(model, caps, rows, a.start_seq, a.max_seq, a.row_budget_s, a.out_dir)
    return 1 if any(r.get("error") for r in info["results"]) else 0

"""Whole-step A/B in alternation: PEFT and fastpeft rows of one method built and timed in turns (A B A B ...), in one
process, to tell a real gap from order or drift (``python -m fastpeft.bench`` always runs PEFT first).

Per row it records the step's wall time (synchronised before and after, as the bench) and its host time: the
time until ``step()`` returns, before the final synchronisation. Where host ≈ wall the step is host-bound.
``--gc freeze`` moves everything alive after the build into the permanent generation (``gc.freeze()``) so the
collector does not rescan it during the timed steps; ``--gc off`` disables it while timing.

    python benchmarks/scripts/step_alternate.py --model 1b --method prompt_tuning --rounds 3 --steps 10
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastpeft.bench import harness  # noqa: E402
from fastpeft.bench.plan import METHODS, SEQ, Spec  # noqa: E402


def time_row(spec: Spec, device: str, steps: int, warmup: int, gc_mode: str) -> dict:
    prep = harness.prepare(spec, device)
    was_enabled, frozen_before = gc.isenabled(), gc.get_freeze_count()
    try:
        walls, hosts = [], []
        if gc_mode == "freeze":
            gc.collect()
            gc.freeze()
        elif gc_mode == "off":
            gc.disable()
        collections_before = sum(s["collections"] for s in gc.get_stats())
        for i in range(warmup + steps):
            harness.sync(device)
            t = time.perf_counter()
            prep.step()
            host = time.perf_counter() - t
            harness.sync(device)
            wall = time.perf_counter() - t
            if i >= warmup:
                walls.append(wall)
                hosts.append(host)
        collections = sum(s["collections"] for s in gc.get_stats()) - collections_before
    finally:
        if was_enabled:
            gc.enable()
        if gc_mode == "freeze" and frozen_before == 0:  # a process that froze objects itself keeps them frozen
            gc.unfreeze()
        prep.close()
        del prep
        harness.free_memory(device)
    batch, seq = SEQ[spec.model]
    return {"impl": spec.impl, "wall_ms": 1e3 * statistics.median(walls), "host_ms": 1e3 * statistics.median(hosts),
            "tokens_per_s": batch * seq / statistics.median(walls), "wall_ms_all": [1e3 * w for w in walls],
            "gc_collections": collections}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", choices=sorted(SEQ))
    ap.add_argument("--method", default="prompt_tuning", choices=[m for m in METHODS if m != "full_ft"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gc", default="on", choices=["on", "freeze", "off"])
    ap.add_argument("--first", default="peft", choices=["peft", "fastpeft"], help="which row opens each round")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    order = ["peft", "fastpeft"] if args.first == "peft" else ["fastpeft", "peft"]
    rows = []
    for r in range(args.rounds):
        for impl in order:
            row = time_row(Spec(args.model, args.method, impl), device, args.steps, args.warmup, args.gc)
            row["round"] = r
            rows.append(row)
            print(f"round {r} {impl:9s} wall {row['wall_ms']:7.1f} ms  host {row['host_ms']:7.1f} ms  "
                  f"{row['tokens_per_s']:9,.0f} tok/s  gc collections {row['gc_collections']}", flush=True)
    for impl in order:
        walls = [x["wall_ms"] for x in rows if x["impl"] == impl]
        print(f"{impl:9s} median over rounds: {statistics.median(walls):.1f} ms (spread {min(walls):.1f}-{max(walls):.1f})")
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "args": vars(args)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

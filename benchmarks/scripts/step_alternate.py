"""Whole-step A/B in alternation: PEFT and fastpeft rows of one method built and timed in turns (A B A B ...), in one
process, to tell a real gap from order or drift (``python -m fastpeft.bench`` always runs PEFT first).

Per row it records the step's wall time (synchronised before and after, as the bench) and its host time: the
time until ``step()`` returns, before the final synchronisation. Where host ≈ wall the step is host-bound. It also
records the timed steps' peak CUDA memory (``peak_gib``), the garbage collections and the time Python's collector
spent in each timed step (``gc_ms_all``; full, generation-2 collections counted apart): on a host-bound 8B step one
full collection is a stall of a fraction of a second.
``--gc freeze`` moves everything alive after the build into the permanent generation (``gc.freeze()``) so the
collector does not rescan it during the timed steps; ``--gc off`` disables it while timing.

``--setting NAME=V1,V2`` times fastpeft once per value of one of ``fastpeft.settings`` (e.g.
``group_projections=0,1``), each row built and run under ``settings.override``: an A/B of a switch in one process,
where separate processes on the lent hosts differ by more than the effect (session 19). The values take turns in
the order given in even rounds and reversed in odd ones (A B B A), and PEFT's row stays as the control.

``--op-hook NAME=V1,V2`` does the same for one of the C++ operators' testing switches,
``torch.ops.fastpeft_ops.set_NAME`` (e.g. ``lora_sum_order=0,1``), set around each row's build and timed steps.

``--method M1,M2`` compares methods the same way: one fastpeft row per method, in turns (A B B A), PEFT's row of the
first method as the control (e.g. ``lora,lora_liger``: fastpeft with and without Liger-Kernel, session 20);
``--no-control`` leaves PEFT's row out (fastpeft DoRA against fastpeft LoRA, session 27).

    python benchmarks/scripts/step_alternate.py --model 1b --method prompt_tuning --rounds 3 --steps 10
    python benchmarks/scripts/step_alternate.py --model 1b --method lora --rounds 4 --setting group_projections=0,1
    python benchmarks/scripts/step_alternate.py --model 8b --method lora --rounds 2 --no-control --op-hook lora_sum_order=0,1
    python benchmarks/scripts/step_alternate.py --model 1b --method lora,lora_liger --rounds 4 --first fastpeft
    python benchmarks/scripts/step_alternate.py --model 8b --method lora,dora,qlora,qdora --rounds 3 --no-control
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastpeft import settings  # noqa: E402
from fastpeft.bench import harness  # noqa: E402
from fastpeft.ops import cpp_ops  # noqa: E402
from fastpeft.bench.plan import METHODS, SEQ, Spec  # noqa: E402


def parse_setting(text: str):
    """"name=v1,v2" -> (name, [values typed as the setting's default: bool 0/1, int, or str]); ValueError names
    what is wrong and what is allowed."""
    known = {f: getattr(settings.Settings(), f) for f in settings.Settings.__dataclass_fields__}
    name, sep, raw = text.partition("=")
    if not sep or name not in known or not raw:
        raise ValueError(f"--setting takes NAME=V1,V2 with NAME one of {sorted(known)}, got {text!r}")
    default, values = known[name], []
    for v in raw.split(","):
        if isinstance(default, bool):
            if v not in ("0", "1"):
                raise ValueError(f"--setting {name}: use 0 or 1, got {v!r}")
            values.append(v == "1")
        elif name == "nf4_fused_max_m":
            values.append(None if v == "none" else int(v))
        else:
            values.append(v)
    for v in values:
        with settings.override(**{name: v}):  # validated as the environment is
            pass
    return name, values


def parse_op_hook(text: str):
    """"name=v1,v2" -> (name, [int values]) for torch.ops.fastpeft_ops.set_<name>; ValueError names what is wrong.
    The values are checked by the hook itself (each set and restored here)."""
    name, sep, raw = text.partition("=")
    setter = getattr(torch.ops.fastpeft_ops, "set_" + name, None) if sep and name and cpp_ops.available() else None
    if setter is None or not raw:
        raise ValueError(f"--op-hook takes NAME=V1,V2 with torch.ops.fastpeft_ops.set_NAME an operator switch "
                         f"(the C++ operators must be built), got {text!r}")
    try:
        values = [int(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"--op-hook {name}: the values must be integers, got {raw!r}") from None
    for v in values:
        try:
            setter(setter(v))  # set v, then restore what was there
        except RuntimeError as e:
            raise ValueError(f"--op-hook {name}={v}: {e}") from None
    return name, values


@contextmanager
def _op_hook(name: str, value: int):
    setter = getattr(torch.ops.fastpeft_ops, "set_" + name)
    before = setter(value)
    try:
        yield
    finally:
        setter(before)


class _CollectorClock:
    """Time Python's cyclic collector spends per timed step, by generation (gc.callbacks): on a host-bound step a
    full (generation 2) collection over a large model's objects is a visible stall (~0.3 s on the CI host at 8B)."""

    def __init__(self):
        self.ms, self.full, self._t0 = 0.0, 0, None
        self.step_ms: list = []

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += 1e3 * (time.perf_counter() - self._t0)
            self.full += info["generation"] == 2
            self._t0 = None


def time_row(spec: Spec, device: str, steps: int, warmup: int, gc_mode: str) -> dict:
    prep = harness.prepare(spec, device)
    was_enabled, frozen_before = gc.isenabled(), gc.get_freeze_count()
    clock = _CollectorClock()
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
            if i == warmup:
                gc.callbacks.append(clock)
                if device == "cuda":  # the timed steps' peak (the build's and warm-up's transients excluded)
                    torch.cuda.reset_peak_memory_stats()
            before = clock.ms
            t = time.perf_counter()
            prep.step()
            host = time.perf_counter() - t
            harness.sync(device)
            wall = time.perf_counter() - t
            if i >= warmup:
                walls.append(wall)
                hosts.append(host)
                clock.step_ms.append(clock.ms - before)
        collections = sum(s["collections"] for s in gc.get_stats()) - collections_before
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    finally:
        if clock in gc.callbacks:
            gc.callbacks.remove(clock)
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
            "gc_collections": collections, "gc_full_collections": clock.full, "gc_ms_all": clock.step_ms,
            "peak_gib": peak_gib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", choices=sorted(SEQ))
    ap.add_argument("--method", default="prompt_tuning",
                    help="a method, or several comma-separated (one fastpeft row each, in turns); from "
                         f"{','.join(m for m in METHODS if m != 'full_ft')}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gc", default="on", choices=["on", "freeze", "off"])
    ap.add_argument("--first", default="peft", choices=["peft", "fastpeft"], help="which row opens each round")
    ap.add_argument("--no-control", action="store_true",
                    help="no PEFT row: fastpeft's rows only (e.g. --method lora,dora,qlora,qdora at 8B, where PEFT's "
                         "4-bit row alone takes longer than all of them)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--setting", help="NAME=V1,V2: one fastpeft row per value of this fastpeft.settings field")
    ap.add_argument("--op-hook", help="NAME=V1,V2: one fastpeft row per value of torch.ops.fastpeft_ops.set_NAME")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
    methods = [m for m in args.method.split(",") if m]
    allowed = [m for m in METHODS if m != "full_ft"]
    bad = [m for m in methods if m not in allowed]
    if bad or not methods or len(set(methods)) != len(methods):
        ap.error(f"--method: {bad or methods} not allowed; one or more distinct of {','.join(allowed)}")
    if sum(map(bool, (len(methods) > 1, args.setting, args.op_hook))) > 1:
        ap.error("--method with several methods, --setting and --op-hook each compare one thing; give one of them")
    try:
        setting = parse_setting(args.setting) if args.setting else None
        op_hook = parse_op_hook(args.op_hook) if args.op_hook else None
    except ValueError as e:
        ap.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m in methods:  # e.g. lora_liger without liger_kernel or CUDA: say so before anything is built
        why = harness.unavailable(Spec(args.model, m, "fastpeft"), device)
        if why:
            ap.error(f"--method {m}: {why}")
    # (method, setting variant or None) per fastpeft row of a round
    if setting is not None:
        variants = [(methods[0], (setting[0], v)) for v in setting[1]]
    elif op_hook is not None:
        variants = [(methods[0], (op_hook[0], v)) for v in op_hook[1]]
    else:
        variants = [(m, None) for m in methods]
    rows = []
    for r in range(args.rounds):
        fast = [("fastpeft",) + v for v in (variants if r % 2 == 0 else variants[::-1])]
        control = [] if args.no_control else [("peft", methods[0], None)]
        order = control + fast if args.first == "peft" else fast + control
        for impl, method, variant in order:
            label = impl if variant is None else f"{impl}[{variant[0]}={variant[1]}]"
            if len(methods) > 1:
                label = f"{method} {label}"
            if variant is None:
                switch = nullcontext()
            elif op_hook is not None:
                switch = _op_hook(*variant)
            else:
                switch = settings.override(**{variant[0]: variant[1]})
            with switch:
                row = time_row(Spec(args.model, method, impl), device, args.steps, args.warmup, args.gc)
            row["method"] = method
            row["round"], row["label"] = r, label
            rows.append(row)
            print(f"round {r} {label:12s} wall {row['wall_ms']:7.1f} ms  host {row['host_ms']:7.1f} ms  "
                  f"{row['tokens_per_s']:9,.0f} tok/s  gc collections {row['gc_collections']} "
                  f"({row['gc_full_collections']} full, {sum(row['gc_ms_all']):.0f} ms in the timed steps)"
                  + ("" if row["peak_gib"] is None else f"  peak {row['peak_gib']:.2f} GiB"), flush=True)
    for label in dict.fromkeys(x["label"] for x in rows):
        walls = [x["wall_ms"] for x in rows if x["label"] == label]
        print(f"{label:12s} median over rounds: {statistics.median(walls):.1f} ms (spread {min(walls):.1f}-{max(walls):.1f})")
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "args": vars(args)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

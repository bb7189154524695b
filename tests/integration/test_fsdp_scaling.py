"""CPU smoke test of benchmarks/scripts/fsdp_scaling.py: torchrun, gloo, tiny Llama, LoRA, QLoRA and DoRA, fastpeft and PEFT.

A 1-process run (the baseline) and a 2-process run with --baseline; checks the JSON each writes: every row ran
on every rank with tokens/s > 0 and memory fields, both impls are there, fastpeft and PEFT agree on the loss of
step 0 (same seed, same weights, dropout 0; fp32, fastpeft's reference backend), rank 0 sees the same loss at
world size 1 and 2 (the weights do not depend on the sharding), and the scaling efficiency is computed
against the baseline; the 2-process run also profiles one step per configuration (--profile: every rank steps, rank 0
writes).
"""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SCRIPT = os.path.join(ROOT, "benchmarks", "scripts", "fsdp_scaling.py")
METHODS = ["lora", "qlora", "dora"]
IMPLS = ["fastpeft", "peft"]


def _have(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _torchrun(nproc, out, tmp_path, *extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the reference backend: interpreted Triton would take minutes
    env.update(FASTPEFT_BACKEND="reference", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           SCRIPT, "--model", "tiny", "--steps", "2", "--warmup", "1", "--seq", "32", "--methods", ",".join(METHODS),
           "--impl", ",".join(IMPLS), "--out", str(out), *extra]
    res = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


def _check(info, world):
    assert info["world_size"] == world and info["backend"] == "gloo"
    rows = {(r["method"], r["impl"]): r for r in info["rows"]}
    assert set(rows) == {(m, i) for m in METHODS for i in IMPLS}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("reason"))
        assert [r["rank"] for r in row["per_rank"]] == list(range(world))
        for r in row["per_rank"]:
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["tokens"] == 2 * 32, (key, r)
            assert r["peak_gib"] is not None and r["peak_gib"] > 0 and "build_peak_gib" in r, (key, r)
        assert row["tokens_per_s_per_gpu"] > 0 and row["peak_gib_max"] > 0
        assert abs(row["tokens_per_s_total"] - sum(r["tokens_per_s"] for r in row["per_rank"])) < 1e-6
    for m in METHODS:
        f, p = rows[(m, "fastpeft")], rows[(m, "peft")]
        assert abs(f["loss_step0"] - p["loss_step0"]) <= 1e-4, (m, f["loss_step0"], p["loss_step0"])
    return rows


@pytest.mark.skipif(not dist.is_available() or not _have("peft") or not _have("bitsandbytes"),
                    reason="needs torch.distributed, peft and bitsandbytes")
def test_fsdp_scaling_cpu_smoke(tmp_path):
    one = _check(_torchrun(1, tmp_path / "one.json", tmp_path), 1)
    two = _check(_torchrun(2, tmp_path / "two.json", tmp_path, "--baseline", str(tmp_path / "one.json"),
                           "--profile", str(tmp_path / "prof")), 2)
    for m in METHODS:
        for impl in IMPLS:
            assert "Self CPU time total" in (tmp_path / f"prof_{m}_{impl}.txt").read_text()
    for key, row in two.items():
        assert row["baseline_tokens_per_s_per_gpu"] == pytest.approx(one[key]["tokens_per_s_per_gpu"])
        assert row["scaling_efficiency"] == pytest.approx(row["tokens_per_s_per_gpu"]
                                                          / one[key]["tokens_per_s_per_gpu"])
        # rank 0 trains on the same tokens with the same weights at both world sizes
        assert abs(row["per_rank"][0]["local_loss_step0"] - one[key]["per_rank"][0]["local_loss_step0"]) <= 1e-4, key
    for row in one.values():
        assert row["scaling_efficiency"] == 1.0

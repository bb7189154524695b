"""The examples run and say nothing that is not ours (third-party deprecation noise is filtered in the examples)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_runs_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTPEFT_", "TRITON_INTERPRET"))}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--steps", "3",
                          "--out", str(tmp_path / "adapter")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PEFT reload: relative difference" in run.stdout
    noise = [line for line in run.stderr.splitlines() if "Warning" in line or "warn" in line.lower()]
    assert noise == [], noise


def test_serve_adapters_runs_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTPEFT_", "TRITON_INTERPRET"))}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_adapters.py"), "--adapters", "3",
                          "--dir", str(tmp_path / "adapters"), "--new-tokens", "4"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("alone: same") == 4 and "outputs match" in run.stdout
    noise = [line for line in run.stderr.splitlines() if "Warning" in line or "warn" in line.lower()]
    assert noise == [], noise

"""Without Triton (macOS / Windows, where pyproject does not install it) fastpeft imports, patches and trains on
the pure-PyTorch reference path with PEFT's numbers."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")

SCRIPT = r"""
import sys
sys.modules["triton"] = None  # hide Triton from the import system: `import triton` raises ImportError
import copy, torch, peft
import fastpeft
from fastpeft.ops import HAS_TRITON
from helpers import random_ids, rel_err, tiny_model

assert not HAS_TRITON
assert not any(name == "triton" or name.startswith("triton.") for name, mod in sys.modules.items() if mod is not None)
base = tiny_model("llama")
cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
ours = fastpeft.patch(copy.deepcopy(base), cfg)
with torch.no_grad():  # PEFT's random adapter weights into ours (same names once PEFT's prefix is dropped)
    src = {n[len("base_model.model."):]: p for n, p in theirs.named_parameters()}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            p.copy_(src[n])
assert ours.model.layers[0].self_attn.q_proj.backend == "auto"
ids = random_ids()
lp = theirs(input_ids=ids, labels=ids).loss
lo = ours(input_ids=ids, labels=ids).loss
lp.backward(); lo.backward()
assert rel_err(lo, lp) <= 1e-5, (lo, lp)
ga = ours.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
gp = theirs.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
assert rel_err(ga, gp) <= 1e-5
opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
opt.step()
assert ours(input_ids=ids, labels=ids).loss < lo
packed, qs = fastpeft.ops.nf4_quantize.quantize_nf4(torch.randn(16, 64))  # the 4-bit format helpers too
print("ok")
"""


def test_patch_and_train_without_triton():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-4000:]

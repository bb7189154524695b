"""`accelerate launch` with FSDP2 on a fastpeft-patched model, end to end on CPU (2 processes, gloo).

Runs the real launcher (accelerate's CLI, the `accelerate` console script's own entry point) on
examples/accelerate_fsdp.yaml + examples/train_accelerate.py, overriding only the port (a free one) and asking
for 2 processes; nothing CPU-specific is passed (`--cpu` would pick accelerate's 1-process launcher, no FSDP).
The script's JSON report must show that accelerate applied FSDP2 (decoder layers and root are FSDPModules, every
parameter a DTensor), the loss fell, and the adapter fastpeft.save_adapter wrote from the shards loads into
PEFT with exactly the tensors the run trained (gathered independently by the script), at their full shapes.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SCRIPT = os.path.join(ROOT, "examples", "train_accelerate.py")
CONFIG = os.path.join(ROOT, "examples", "accelerate_fsdp.yaml")
STEPS = 12
LAYERS = 2


def _have(mod):
    return importlib.util.find_spec(mod) is not None


def _script():
    """The example script as a module (its helpers are checked in-process); examples/ goes on sys.path while it
    loads, as it is when the script runs, for its ``from _quiet import ...``."""
    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return mod


def _launch(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the reference backend: interpreted Triton would take minutes
    env.update(FASTPEFT_BACKEND="reference", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", CONFIG, "--num_processes", "2", "--main_process_port", "0",
           SCRIPT, "--steps", str(STEPS), "--layers", str(LAYERS), "--out", str(tmp_path / "adapter"),
           "--report", str(report)]
    res = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=80)
    assert res.returncode == 0, (f"accelerate launch failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    with open(report) as f:
        return json.load(f)


@pytest.mark.skipif(not _have("accelerate"), reason="accelerate is not installed (pip install -e '.[test]')")
@pytest.mark.skipif(not _have("peft"), reason="peft is not installed (pip install -e '.[test]')")
@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_accelerate_launch_fsdp2_trains_and_saves_peft_adapter(tmp_path):
    import peft
    from safetensors.torch import load_file

    info = _launch(tmp_path)

    # accelerate applied FSDP2, not DDP: one FSDP unit per decoder layer plus the root, all parameters sharded
    assert info["world_size"] == 2
    assert info["distributed_type"] == "FSDP" and info["is_fsdp2"], info
    assert info["wrapper"] == "FSDPLlamaForCausalLM", info
    assert {"FSDPLlamaDecoderLayer", "FSDPLlamaForCausalLM"} <= set(info["fsdp_wrapped_classes"]), info
    # 7 LoRA-wrapped linears per layer, lora_A and lora_B each
    assert info["n_trainable_dtensor_params"] == info["n_trainable_params"] == 2 * 7 * LAYERS, info
    assert info["n_dtensor_params"] == info["n_params"], info

    # it trained: the toy task is learnable, the loss falls well beyond step-to-step noise
    losses = info["losses"]
    assert len(losses) == STEPS and all(l == l for l in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses

    # the saved adapter: PEFT loads it onto the same base and holds exactly the trained (gathered) tensors
    trained = torch.load(info["tensors"])
    assert len(trained) == info["n_trainable_params"]
    on_disk = load_file(os.path.join(info["adapter_dir"], "adapter_model.safetensors"))
    assert set(on_disk) == {"base_model.model." + n.replace(".default.", ".") for n in trained}
    mod = _script()
    base = mod.tiny_llama(LAYERS)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = peft.PeftModel.from_pretrained(base, info["adapter_dir"])
    loaded = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert set(loaded) == {"base_model.model." + n for n in trained}
    for name, full in trained.items():
        module, which = name.split(".lora_")
        layer = linears[module]
        want = (8, layer.in_features) if which.startswith("A") else (layer.out_features, 8)
        assert tuple(full.shape) == want, (name, tuple(full.shape), want)  # whole tensors, not one rank's shard
        assert torch.equal(loaded["base_model.model." + name], full), name
        assert torch.equal(on_disk["base_model.model." + name.replace(".default.", ".")], full), name
    assert any(float(t.abs().max()) > 0 for n, t in trained.items() if ".lora_B." in n)  # B starts at 0

    # and what PEFT loaded is the trained adapter: it has learned the task the base model has not
    ids = mod.CountingTokens(n=8).ids
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids, labels=ids).loss.item()
        with model.disable_adapter():
            plain = model(input_ids=ids, labels=ids).loss.item()
    assert tuned < plain - 0.3, (tuned, plain)

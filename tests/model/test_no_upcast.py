"""fastpeft never upcasts frozen parameters (PEFT's prepare_model_for_kbit_training casts the norms, the
embeddings and the head to fp32, which costs memory): after patch, every parameter and buffer that was there
before keeps its dtype, device and storage, for LoRA, DoRA, IA3 and QLoRA on a bf16 model."""
import pytest
import torch

import fastpeft
from helpers import tiny_model_for_nf4


def _dtypes(model):
    out = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    out.update({"buffer:" + n: (b.dtype, b.data_ptr()) for n, b in model.named_buffers()})
    return out


def _original_names(name):
    # a patched layer keeps the original weights under base_layer / original_module (PEFT's naming)
    return name.replace(".base_layer", "").replace(".original_module", "")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "qlora", "qlora_modules_to_save"])
def test_patch_keeps_every_frozen_tensor_in_its_dtype(method):
    model = tiny_model_for_nf4("llama", seed=0, dtype=torch.bfloat16).train()
    if method.startswith("qlora"):
        fastpeft.quantize_nf4(model, compute_dtype=torch.bfloat16, module_type="fastpeft")
    before = _dtypes(model)
    if method == "ia3":
        cfg = fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        cfg = fastpeft.LoraConfig(r=4, target_modules="all-linear", use_dora=method == "dora",
                                  modules_to_save=["lm_head"] if method.endswith("modules_to_save") else None)
    fastpeft.patch(model, cfg)
    after = {_original_names(n): v for n, v in _dtypes(model).items()}
    kept = [n for n in before if n in after]
    assert len(kept) == len(before), sorted(set(before) - set(after))
    for name in kept:
        assert after[name] == before[name], (name, before[name], after[name])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and all(dict(model.named_parameters())[n].dtype == torch.bfloat16 for n in frozen)

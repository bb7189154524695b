"""Same config + same weights => same logits and adapter gradients as PEFT (the oracle)."""
import copy

import peft
import pytest
import torch

import fastpeft
from helpers import ARCHS, random_ids, rel_err, set_settings, tiny_model

FP32_TOL = 1e-5


def _peft_and_ours(base, peft_cfg, backend, monkeypatch):
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(peft_cfg))
    set_settings(monkeypatch, backend=backend)
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(peft_cfg))
    # Copy PEFT's (random) adapter weights into ours: parameter names match after dropping the wrapper prefix.
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters()}
    copied = 0
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.copy_(theirs[name])
                copied += 1
    assert copied > 0
    return peft_model, ours


def _compare(peft_model, ours, ids, train=True):
    peft_model.train(train)
    ours.train(train)
    out_p = peft_model(input_ids=ids, labels=ids)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_p.logits) <= FP32_TOL
    out_p.loss.backward()
    out_o.loss.backward()
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_grads = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs.keys()
    for name, param in ours_grads.items():
        assert param.grad is not None, name
        assert rel_err(param.grad, theirs[name].grad) <= FP32_TOL, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_lora_all_linear_matches_peft(arch, backend, monkeypatch):
    base = tiny_model(arch)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model, ours = _peft_and_ours(base, cfg, backend, monkeypatch)
    _compare(peft_model, ours, random_ids(seed=ARCHS.index(arch)))  # not hash(): salted per process


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_default_targets_rslora_bias_match_peft(arch, monkeypatch):
    base = tiny_model(arch, seed=3)
    cfg = peft.LoraConfig(r=6, lora_alpha=5, use_rslora=True, bias="all", init_lora_weights=False,
                          target_modules=None if arch != "phi3" else ["qkv_proj", "gate_up_proj"])
    peft_model, ours = _peft_and_ours(base, cfg, "reference", monkeypatch)
    _compare(peft_model, ours, random_ids(seed=5))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_lora_patterns_layers_and_modules_to_save_match_peft(backend, monkeypatch):
    base = tiny_model("llama", seed=4)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3},
        layers_to_transform=[1], layers_pattern="layers", modules_to_save=["lm_head"],
    )
    peft_model, ours = _peft_and_ours(base, cfg, backend, monkeypatch)
    layer0 = ours.model.layers[0].self_attn.q_proj
    layer1 = ours.model.layers[1]
    assert type(layer0).__name__ == "Linear"  # layers_to_transform=[1] leaves layer 0 alone
    assert layer1.mlp.down_proj.r["default"] == 2 and layer1.self_attn.k_proj.scaling["default"] == 3 / 4
    _compare(peft_model, ours, random_ids(seed=6))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_ia3_matches_peft(arch, backend, monkeypatch):
    base = tiny_model(arch, seed=7)
    if arch == "phi3":
        cfg = peft.IA3Config(target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False)
    else:
        cfg = peft.IA3Config(init_ia3_weights=False)
    peft_model, ours = _peft_and_ours(base, cfg, backend, monkeypatch)
    _compare(peft_model, ours, random_ids(seed=8))


def test_lora_dropout_matches_peft_with_same_rng(monkeypatch):
    """The reference path draws its dropout mask from torch's RNG in PEFT's order: same seed, same mask."""
    base = tiny_model("llama", seed=9)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_lora_weights=False)
    peft_model, ours = _peft_and_ours(base, cfg, "reference", monkeypatch)
    ids = random_ids(seed=10)
    torch.manual_seed(123)
    out_p = peft_model.train()(input_ids=ids, labels=ids)
    torch.manual_seed(123)
    out_o = ours.train()(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_p.logits) <= FP32_TOL
    torch.manual_seed(124)
    out_other = ours(input_ids=ids, labels=ids)
    assert rel_err(out_other.logits, out_p.logits) > 1e-4  # the mask really is random


def test_patch_accepts_fastpeft_config_same_as_peft_config(monkeypatch):
    base = tiny_model("qwen2", seed=11)
    ours_peft_cfg = fastpeft.patch(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ours_fp_cfg = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert [n for n, _ in ours_peft_cfg.named_parameters()] == [n for n, _ in ours_fp_cfg.named_parameters()]
    assert fastpeft.get_nb_trainable_parameters(ours_peft_cfg) == fastpeft.get_nb_trainable_parameters(ours_fp_cfg)


def test_trainable_parameter_counts_match_peft():
    base = tiny_model("mistral", seed=12)
    cfg = peft.LoraConfig(r=4, target_modules="all-linear")
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = fastpeft.patch(copy.deepcopy(base), cfg)
    assert fastpeft.get_nb_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()

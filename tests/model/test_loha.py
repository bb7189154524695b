"""LoHa (fastpeft.LoHaConfig / LohaLinear) against PEFT's LoHa: the same factors from the same seed, logits and
factor gradients (fp32 <= 1e-5) on every path -- the kernel paths run the rank-r² Khatri-Rao product on LoRA's
operators --, rank and module dropout drawing PEFT's random numbers, PEFT's files both ways, merge, errors."""
import copy
import json

import peft
import pytest
import torch

import fastpeft
from fastpeft.nn.loha import khatri_rao_pair
from helpers import random_ids, rel_err, set_settings, tiny_model

TOL = 1e-5
PREFIX = "base_model.model."
BACKENDS = ["reference", "triton", "cpp"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(arch="llama", backend="reference", monkeypatch=None, **extra):
    base = tiny_model(arch, seed=1)
    kw = {**dict(r=4, alpha=8, target_modules=TARGETS, init_weights=False), **extra}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kw))
    if monkeypatch is not None:
        set_settings(monkeypatch, backend=backend)
    torch.manual_seed(0)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoHaConfig(**kw))
    return base, theirs, ours


def _compare(theirs, ours, train=False, seed=None, tol=TOL):
    theirs.train(train)
    ours.train(train)
    ids = random_ids(batch=2, seq=9)
    outs = []
    for model in (theirs, ours):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model(input_ids=ids, labels=ids))
    assert rel_err(outs[1].logits, outs[0].logits) <= tol
    for out in outs:
        out.loss.backward()
    grads_t = {n[len(PREFIX):]: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_o.keys() == grads_t.keys() and any("hada_w1_a" in n for n in grads_o)
    for name, grad in grads_o.items():
        assert rel_err(grad, grads_t[name]) <= tol, name


def test_khatri_rao_pair_is_the_hadamard_product():
    torch.manual_seed(0)
    w1a, w1b, w2a, w2b = torch.randn(37, 3), torch.randn(3, 23), torch.randn(37, 5), torch.randn(5, 23)
    a, b = khatri_rao_pair(w1a, w1b, w2a, w2b)
    assert a.shape == (15, 23) and b.shape == (37, 15)
    assert torch.allclose(b @ a, (w1a @ w1b) * (w2a @ w2b), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_factors_and_numbers_as_peft(arch, backend, monkeypatch):
    _, theirs, ours = _pair(arch, backend, monkeypatch)
    params_t = {n[len(PREFIX):]: p for n, p in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        assert torch.equal(param, params_t[name]), name
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, fastpeft.LohaLinear) and layer.factored("default")  # r=4: the rank-16 product
    _compare(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_and_module_dropout_draw_pefts_random_numbers(backend, monkeypatch):
    _, theirs, ours = _pair(backend=backend, monkeypatch=monkeypatch, rank_dropout=0.3, module_dropout=0.4)
    _compare(theirs, ours, train=True, seed=5)


def test_default_init_is_a_no_op_and_patterns_apply():
    base, theirs, ours = _pair(init_weights=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    layer = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.r["default"] == 2 and layer.hada_w1_a["default"].shape == (48, 2)
    assert ours.get_submodule("model.layers.0.self_attn.v_proj").scaling["default"] == 3 / 4
    _compare(theirs, ours)


def test_large_rank_builds_the_weight_as_peft_does(monkeypatch):
    _, theirs, ours = _pair(backend="cpp", monkeypatch=monkeypatch, r=24)  # 576·(48+48) > 48·48
    assert not ours.get_submodule("model.layers.0.self_attn.q_proj").factored("default")
    _compare(theirs, ours)


def test_pefts_file_format_both_ways(tmp_path):
    base, theirs, ours = _pair()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")).keys()
    with open(tmp_path / "ours" / "adapter_config.json") as fh, open(tmp_path / "theirs" / "adapter_config.json") as fh2:
        cfg_o, cfg_t = json.load(fh), json.load(fh2)
    cfg_t["target_modules"] = sorted(cfg_t["target_modules"])
    assert cfg_o == cfg_t
    ids = random_ids()
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
        assert rel_err(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits) <= TOL
        loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "theirs"))
        assert rel_err(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


def test_merge_unmerge_merge_and_unload_and_several_adapters():
    _, _, ours = _pair()
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        fastpeft.merge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        fastpeft.add_adapter(ours, "other", fastpeft.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
        fastpeft.set_adapter(ours, "other")
        assert not torch.equal(ours(input_ids=ids).logits, want)
        fastpeft.set_adapter(ours, "default")
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        merged = fastpeft.merge_and_unload(ours)
        assert not any(isinstance(m, fastpeft.LohaLinear) for m in merged.modules())
        assert rel_err(merged(input_ids=ids).logits, want) <= TOL


def test_unsupported_bases_and_bad_config_are_refused():
    gpt2 = tiny_model("gpt2", seed=1)
    with pytest.raises(TypeError, match="LoHa adapts torch.nn.Linear"):
        fastpeft.patch(gpt2, fastpeft.LoHaConfig(target_modules=["c_attn"]))
    assert "_fastpeft_state" not in gpt2.__dict__
    from helpers import nf4_tiny_model
    with pytest.raises(TypeError, match="LoHa adapts torch.nn.Linear"):
        fastpeft.patch(nf4_tiny_model("llama"), fastpeft.LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        fastpeft.LoHaConfig(rank_dropout=1.0)
    with pytest.raises(ValueError, match="rank_pattern"):
        fastpeft.LoHaConfig(rank_pattern={"q_proj": 0})
    cfg = fastpeft.config.to_fastpeft_config(peft.LoHaConfig(r=6, alpha=3, target_modules=["q_proj"]))
    assert isinstance(cfg, fastpeft.LoHaConfig) and cfg.scaling_for("x.q_proj") == 0.5


@pytest.mark.gpu
def test_gpu_bf16_loha_kernels_against_an_fp32_twin(monkeypatch):
    """bf16 LoHa through the GPU operators (the rank-r² product on LoRA's C++ operator) against the fp32 reference
    twin, within max(1e-2, 2x the same bf16 model's error on the reference path)."""
    from helpers import check_bf16_against_fp32_twin
    check_bf16_against_fp32_twin(fastpeft.LoHaConfig(r=8, alpha=16, target_modules="all-linear", init_weights=False),
                                 False, monkeypatch)

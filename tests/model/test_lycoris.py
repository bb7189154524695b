"""LoHa and LoKr (fastpeft.LoHaConfig / LohaLinear, LoKrConfig / LokrLinear) against PEFT's: the same factors from
the same seed, logits and factor gradients (fp32 <= 1e-5) on every path -- LoHa's fast path runs the rank-r²
Khatri-Rao product on LoRA's operators, LoKr's applies W1 ⊗ W2 as two small GEMMs without forming ΔW --, rank and
module dropout drawing PEFT's random numbers, PEFT's files both ways, merge, several adapters, errors."""
import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.nn.loha import khatri_rao_pair
from fastpeft.nn.lokr import factor_pair
from helpers import check_bf16_against_fp32_twin, nf4_tiny_model, random_ids, rel_err, set_settings, tiny_model

TOL = 1e-5
PREFIX = "base_model.model."
BACKENDS = ["reference", "triton", "cpp"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = {  # method -> (fastpeft config, PEFT config, layer, a parameter table every adapter has, name in errors)
    "loha": (fastpeft.LoHaConfig, peft.LoHaConfig, fastpeft.LohaLinear, "hada_w1_a", "LoHa"),
    "lokr": (fastpeft.LoKrConfig, peft.LoKrConfig, fastpeft.LokrLinear, "lokr_w2", "LoKr"),
}


def _pair(method, arch="llama", backend="reference", monkeypatch=None, **extra):
    ours_cfg, theirs_cfg = METHODS[method][:2]
    base = tiny_model(arch, seed=1)
    kw = {**dict(r=4, alpha=8, target_modules=TARGETS, init_weights=False), **extra}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg(**kw))
    if monkeypatch is not None:
        set_settings(monkeypatch, backend=backend)
    torch.manual_seed(0)
    ours = fastpeft.patch(copy.deepcopy(base), ours_cfg(**kw))
    return base, theirs, ours


def _compare(method, theirs, ours, train=False, seed=None, tol=TOL):
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
    assert grads_o.keys() == grads_t.keys() and any(METHODS[method][3] in n for n in grads_o)
    for name, grad in grads_o.items():
        assert rel_err(grad, grads_t[name]) <= tol, name


# -- what only one of the two has ---------------------------------------------------------------------------------
def test_khatri_rao_pair_is_the_hadamard_product():
    torch.manual_seed(0)
    w1a, w1b, w2a, w2b = torch.randn(37, 3), torch.randn(3, 23), torch.randn(37, 5), torch.randn(5, 23)
    a, b = khatri_rao_pair(w1a, w1b, w2a, w2b)
    assert a.shape == (15, 23) and b.shape == (37, 15)
    assert torch.allclose(b @ a, (w1a @ w1b) * (w2a @ w2b), atol=1e-5)


def test_factor_pairs_and_the_blocked_product_equal_the_kronecker_delta():
    from peft.tuners.lokr.layer import factorization
    for dim in (1, 7, 48, 88, 127, 4096, 4231, 14336):
        for factor in (-1, 2, 4, 16):
            assert factor_pair(dim, factor) == factorization(dim, factor), (dim, factor)
    layer = fastpeft.LokrLinear(torch.nn.Linear(88, 48), "default", r=4, alpha=4, init_weights=False)
    layer.backend = "cpp"  # the blocked product, on any device
    x = torch.randn(3, 5, 88)
    fast = layer._forward_dense(x, "default", True)
    dense = layer.base_layer(x) + torch.nn.functional.linear(x, layer.delta_weight("default"))
    assert rel_err(fast, dense) <= 1e-6


def test_loha_at_a_large_rank_builds_the_weight_as_peft_does(monkeypatch):
    _, theirs, ours = _pair("loha", backend="cpp", monkeypatch=monkeypatch, r=24)  # 576·(48+48) > 48·48
    assert not ours.get_submodule("model.layers.0.self_attn.q_proj").factored("default")
    _compare("loha", theirs, ours)


@pytest.mark.parametrize("extra", [dict(decompose_both=True, r=2), dict(init_weights="lycoris"),
                                   dict(decompose_factor=4), dict(rank_dropout=0.3, rank_dropout_scale=True)])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_lokr_decompositions_and_inits_match_peft(extra, backend, monkeypatch):
    _, theirs, ours = _pair("lokr", backend=backend, monkeypatch=monkeypatch, **extra)
    params_t = {n[len(PREFIX):]: p for n, p in theirs.named_parameters()}
    assert {n for n, _ in ours.named_parameters()} == set(params_t)
    _compare("lokr", theirs, ours, train="rank_dropout" in extra, seed=3)


# -- both ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_factors_and_numbers_as_peft(method, arch, backend, monkeypatch):
    _, theirs, ours = _pair(method, arch, backend, monkeypatch)
    params_t = {n[len(PREFIX):]: p for n, p in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        assert torch.equal(param, params_t[name]), name
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, METHODS[method][2])
    if method == "loha":
        assert layer.factored("default")  # r=4: the rank-16 product
    else:
        assert layer.kron_shape["default"] == (6, 8, 6, 8)
    _compare(method, theirs, ours)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_and_module_dropout_draw_pefts_random_numbers(method, backend, monkeypatch):
    _, theirs, ours = _pair(method, backend=backend, monkeypatch=monkeypatch, rank_dropout=0.3, module_dropout=0.4)
    _compare(method, theirs, ours, train=True, seed=5)


@pytest.mark.parametrize("method", list(METHODS))
def test_default_init_is_a_no_op_and_patterns_apply(method):
    base, theirs, ours = _pair(method, init_weights=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    layer = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.r["default"] == 2
    if method == "loha":
        assert layer.hada_w1_a["default"].shape == (48, 2)
    else:
        assert "default" in layer.lokr_w2_a  # r < max(out_k, in_n) / 2: W2 low-rank
    assert ours.get_submodule("model.layers.0.self_attn.v_proj").scaling["default"] == 3 / 4
    _compare(method, theirs, ours)


@pytest.mark.parametrize("method", list(METHODS))
def test_pefts_file_format_both_ways(method, tmp_path):
    base, theirs, ours = _pair(method)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
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


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_unmerge_merge_and_unload_and_several_adapters(method):
    ours_cfg, _, layer_type = METHODS[method][:3]
    _, _, ours = _pair(method)
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        fastpeft.merge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        fastpeft.add_adapter(ours, "other", ours_cfg(r=2, target_modules=["q_proj"], init_weights=False))
        fastpeft.set_adapter(ours, "other")
        assert not torch.equal(ours(input_ids=ids).logits, want)
        fastpeft.set_adapter(ours, "default")
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        merged = fastpeft.merge_and_unload(ours)
        assert not any(isinstance(m, layer_type) for m in merged.modules())
        assert rel_err(merged(input_ids=ids).logits, want) <= TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_unsupported_bases_and_bad_config_are_refused(method):
    ours_cfg, theirs_cfg, _, _, label = METHODS[method]
    gpt2 = tiny_model("gpt2", seed=1)
    with pytest.raises(TypeError, match=f"{label} adapts torch.nn.Linear"):
        fastpeft.patch(gpt2, ours_cfg(target_modules=["c_attn"]))
    assert "_fastpeft_state" not in gpt2.__dict__
    with pytest.raises(TypeError, match=f"{label} adapts torch.nn.Linear"):
        fastpeft.patch(nf4_tiny_model("llama"), ours_cfg(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        ours_cfg(rank_dropout=1.0)
    with pytest.raises(ValueError, match="rank_pattern"):
        ours_cfg(rank_pattern={"q_proj": 0})
    cfg = fastpeft.config.to_fastpeft_config(theirs_cfg(r=6, alpha=3, target_modules=["q_proj"]))
    assert isinstance(cfg, ours_cfg) and cfg.scaling_for("x.q_proj") == 0.5
    if method == "lokr":
        with pytest.raises(ValueError, match="init_weights must be True, False or 'lycoris'"):
            fastpeft.LoKrConfig(init_weights="pissa")
        with pytest.raises(ValueError, match="decompose_factor"):
            fastpeft.LoKrConfig(decompose_factor=0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(METHODS))
def test_gpu_bf16_against_an_fp32_twin(method, monkeypatch):
    """bf16 on the GPU paths (LoHa: the rank-r² product on LoRA's C++ operator; LoKr: the blocked Kronecker product
    in bf16 GEMMs) against the fp32 reference twin, within max(1e-2, 2x the same bf16 model's error on the reference
    path)."""
    check_bf16_against_fp32_twin(METHODS[method][0](r=8, alpha=16, target_modules="all-linear", init_weights=False),
                                 False, monkeypatch)

"""OFT (fastpeft.OFTConfig / OftLinear) against PEFT's: the same generators from the same seed, logits and generator
gradients (fp32 <= 1e-5) on the reference path (PEFT's order of operations) and the fast path (x + x·(R - I) as one
batched GEMM over the blocks), every parametrisation (Cayley, Cayley-Neumann with several term counts, COFT,
block_share, r or oft_block_size, PEFT's block-size fix-up), PEFT's files both ways, merge, several adapters,
mixed batches, biases, errors."""
import copy
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.oft.layer import OFTRotationModule
from safetensors.torch import load_file

import fastpeft
from fastpeft.ops.oft import adjusted_divisor, block_diagonal, cayley_rotation, coft_project, rotate_blocks
from helpers import (PEFT_PREFIX as PREFIX, assert_same_snapshot, check_bf16_against_fp32_twin, nf4_tiny_model,
                     peft_and_fastpeft, random_ids, rel_err, set_settings, state_snapshot, tiny_model)

TOL = 1e-5
BACKENDS = ["reference", "cpp"]  # "cpp": the fast path on any device (the C++ extension is not used by OFT)
TARGETS = ["q_proj", "v_proj", "down_proj"]  # in_features 48, 48, 88: block size 8 gives 6, 6 and 11 blocks


def _pair(arch="llama", backend="reference", monkeypatch=None, **extra):
    base = tiny_model(arch, seed=1)
    kw = {**dict(oft_block_size=8, target_modules=TARGETS, init_weights=False), **extra}
    return (base, *peft_and_fastpeft(base, "OFTConfig", 0, monkeypatch, backend, **kw))


def _compare(theirs, ours, train=False, tol=TOL, labels=True):
    theirs.train(train)
    ours.train(train)
    ids = random_ids(batch=2, seq=9)
    outs = [model(input_ids=ids, labels=ids) for model in (theirs, ours)]
    assert rel_err(outs[1].logits, outs[0].logits) <= tol
    for out in outs:
        out.loss.backward()
    grads_t = {n[len(PREFIX):]: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_o.keys() == grads_t.keys() and any(".oft_R.default.weight" in n for n in grads_o)
    for name, grad in grads_o.items():
        assert rel_err(grad, grads_t[name]) <= tol, name


def _params(model, strip=False):
    return {(n[len(PREFIX):] if strip else n): p for n, p in model.named_parameters()}


# -- the math, against PEFT's rotation module -------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [2, 5, 8])
def test_cayley_neumann_and_exact_cayley_equal_pefts(block_size):
    torch.manual_seed(0)
    vec = torch.randn(3, block_size * (block_size - 1) // 2) * (0.4 / block_size)  # spectral norm < 1: the series converges
    module = OFTRotationModule(3, vec.shape[1], block_size, 3 * block_size)
    for terms in range(1, 8):
        want = module._cayley_batch(vec, block_size, True, terms)
        assert torch.equal(cayley_rotation(vec, block_size, True, terms), want), terms
    exact = cayley_rotation(vec, block_size, use_neumann=False)
    assert torch.equal(exact, module._cayley_batch(vec, block_size, False))
    eye = torch.eye(block_size)
    for neumann in (True, False):  # the fast path's R - I, formed without the identity where it can be
        offset = cayley_rotation(vec, block_size, neumann, minus_identity=True)
        assert torch.allclose(offset + eye, cayley_rotation(vec, block_size, neumann), atol=1e-6)
    eye = torch.eye(block_size).expand_as(exact)
    assert torch.allclose(exact @ exact.transpose(-1, -2), eye, atol=1e-6)  # orthogonal
    # the series approaches (I + Q)(I - Q)^-1, the exact form's transpose (PEFT's two options differ in Q's sign)
    errors = [(cayley_rotation(vec, block_size, True, k) - exact.transpose(-1, -2)).norm() for k in (2, 5, 9, 15)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.05


@pytest.mark.parametrize("eps", [1e-3, 0.05, 10.0])
def test_coft_projection_equals_pefts(eps):
    torch.manual_seed(1)
    vec = torch.randn(4, 10) * 0.01
    module = OFTRotationModule(4, 10, 5, 20, coft=True, eps=eps)
    assert torch.equal(coft_project(vec, 5, eps), module._project_batch(vec, eps=eps))
    norms = torch.linalg.vector_norm(coft_project(vec, 5, eps), dim=1) * 2 ** 0.5  # Frobenius norm of each Q
    assert (norms <= eps / 2 + 1e-6).all()  # radius eps / sqrt(4 blocks)


def test_block_rotation_is_the_dense_block_diagonal_product():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 28)
    blocks = torch.randn(7, 4, 4)
    assert rel_err(rotate_blocks(x, blocks), x @ block_diagonal(blocks)) <= 1e-6
    shared = torch.randn(1, 4, 4)
    assert rel_err(rotate_blocks(x, shared), x @ block_diagonal(shared, 7)) <= 1e-6
    assert rel_err(rotate_blocks(x, blocks, plus_input=True), x + x @ block_diagonal(blocks)) <= 1e-6
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        rotate_blocks(torch.randn(2, 30), blocks)


def test_block_size_fix_up_is_pefts():
    from peft.tuners.oft.layer import OFTLayer
    for features in (1, 7, 48, 88, 97, 4096, 11008, 14336):
        for wanted in (1, 2, 3, 16, 30, 32, 64, 100, 20000):
            assert adjusted_divisor(features, wanted) == OFTLayer.adjust_oft_parameters(None, features, wanted), \
                (features, wanted)


# -- whole models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generators_and_numbers_as_peft(arch, backend, monkeypatch):
    targets = ["qkv_proj", "down_proj"] if arch == "phi3" else TARGETS  # phi3: fused qkv (48 -> 96)
    _, theirs, ours = _pair(arch, backend, monkeypatch, target_modules=targets)
    params_t = _params(theirs, strip=True)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in params_t.items() if p.requires_grad}
    for name, param in ours.named_parameters():
        assert torch.equal(param, params_t[name]), name
    assert {n for n, _ in ours.named_buffers() if "oft_R" in n} == \
        {n[len(PREFIX):] for n, _ in theirs.named_buffers() if "oft_R" in n}  # PEFT's rows / cols index buffers
    assert ours.state_dict().keys() == {k[len(PREFIX):] for k in theirs.state_dict()}
    assert fastpeft.get_nb_trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    layer = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, fastpeft.OftLinear)
    assert (layer.r["default"], layer.oft_block_size["default"]) == (11, 8)
    assert layer.oft_R["default"].weight.shape == (11, 28)
    _compare(theirs, ours)


@pytest.mark.parametrize("extra", [
    dict(use_cayley_neumann=False),
    dict(num_cayley_neumann_terms=2), dict(num_cayley_neumann_terms=3), dict(num_cayley_neumann_terms=8),
    dict(coft=True, eps=1e-2), dict(coft=True),  # eps 6e-5: every generator is projected
    dict(block_share=True), dict(block_share=True, use_cayley_neumann=False, coft=True, eps=0.1),
    dict(r=4, oft_block_size=0),  # r given: blocks of 12 and 22
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrisations_match_peft(extra, backend, monkeypatch):
    _, theirs, ours = _pair(backend=backend, monkeypatch=monkeypatch, **extra)
    _compare(theirs, ours, train=True)
    if extra.get("coft"):  # the generators were projected in place, as PEFT's forward does
        name = "model.layers.0.self_attn.q_proj.oft_R.default.weight"
        assert not torch.equal(_params(ours)[name], _params(_pair(**extra)[2])[name])  # vs the same, never run
        for name, param in _params(ours).items():
            if "oft_R" in name:
                assert rel_err(param, _params(theirs, strip=True)[name]) <= 1e-6, name


@pytest.mark.parametrize("targets", [None, "all-linear", r".*\.1\.mlp\.(up|gate)_proj"],
                         ids=["defaults", "all-linear", "regex"])
def test_target_selection_is_pefts(targets, tmp_path):
    _, theirs, ours = _pair(target_modules=targets, oft_block_size=4)
    adapted_t = sorted(n[len(PREFIX):] for n, m in theirs.named_modules() if hasattr(m, "oft_R"))
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, fastpeft.OftLinear)) == adapted_t
    assert len(adapted_t) >= 2 and not any("lm_head" in n for n in adapted_t)
    _compare(theirs, ours)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with open(tmp_path / "ours" / "adapter_config.json") as fh, open(tmp_path / "theirs" / "adapter_config.json") as fh2:
        cfg_o, cfg_t = json.load(fh), json.load(fh2)
    if isinstance(cfg_t["target_modules"], list):
        cfg_t["target_modules"] = sorted(cfg_t["target_modules"])
    assert cfg_o == cfg_t


def test_block_size_that_does_not_divide_is_moved_as_peft_moves_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, theirs, ours = _pair(oft_block_size=32)  # the default: 48 -> 24, 88 -> 22
    moved = {str(w.message) for w in caught if "Adjusted" in str(w.message)}
    assert moved == {"Invalid `oft_block_size` (32)! Adjusted `oft_block_size` to (24).",
                     "Invalid `oft_block_size` (32)! Adjusted `oft_block_size` to (22)."}
    assert ours.get_submodule("model.layers.0.mlp.down_proj").r["default"] == 4
    _compare(theirs, ours)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, theirs, ours = _pair(r=5, oft_block_size=0)  # 48 -> r 4 (blocks of 12), 88 -> r 4 (blocks of 22)
    assert "Invalid `r` (5)! Adjusted `r` to (4)." in {str(w.message) for w in caught}
    _compare(theirs, ours)


def test_module_dropout_changes_nothing_and_draws_nothing_as_in_peft():
    with pytest.warns(UserWarning, match="module_dropout=0.5 has no effect"):
        _, theirs, ours = _pair(module_dropout=0.5)
    ids = random_ids()
    states = []
    outs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)
        outs.append(model(input_ids=ids).logits)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    assert rel_err(outs[1], outs[0]) <= TOL
    ours.eval()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, outs[1]) <= TOL
    _compare(theirs, ours, train=True)


def test_default_init_is_the_identity():
    base, theirs, ours = _pair(init_weights=True)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    assert all(torch.count_nonzero(p) == 0 for n, p in ours.named_parameters() if "oft_R" in n)
    _compare(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_share", [False, True])
def test_layer_on_odd_shapes_3d_and_non_contiguous_inputs(backend, block_share, monkeypatch):
    set_settings(monkeypatch, backend=backend)
    torch.manual_seed(3)
    base = torch.nn.Linear(35, 13)
    cfg = peft.OFTConfig(oft_block_size=7, init_weights=False, block_share=block_share, target_modules=["x"])
    torch.manual_seed(4)
    theirs = peft.tuners.oft.layer.Linear(copy.deepcopy(base), "default", config=cfg, r=0)
    torch.manual_seed(4)
    ours = fastpeft.OftLinear(copy.deepcopy(base), "default", oft_block_size=7, init_weights=False,
                              block_share=block_share)
    assert torch.equal(ours.oft_R["default"].weight, theirs.oft_R["default"].weight)
    assert ours._dense_path(torch.randn(1, 35)) == backend  # the fast path runs under "cpp"
    strided = (torch.randn(6, 4, 70)[..., ::2], torch.randn(35, 3, 2).permute(2, 1, 0))
    assert not any(x.is_contiguous() for x in strided)
    for x in (torch.randn(5, 35), torch.randn(2, 3, 35)) + strided:
        x_o, x_t = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_o, y_t = ours(x_o), theirs(x_t)
        assert y_o.shape == y_t.shape == x.shape[:-1] + (13,)
        assert rel_err(y_o, y_t) <= TOL
        grad = torch.randn_like(y_t)
        y_o.backward(grad)
        y_t.backward(grad)
        assert rel_err(x_o.grad, x_t.grad) <= TOL
    assert rel_err(ours.oft_R["default"].weight.grad, theirs.oft_R["default"].weight.grad) <= TOL


def test_pefts_file_format_both_ways(tmp_path):
    base, theirs, ours = _pair(coft=True, eps=0.1, num_cayley_neumann_terms=4)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    saved_o = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert saved_o.keys() == load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight" in saved_o
    with open(tmp_path / "ours" / "adapter_config.json") as fh, open(tmp_path / "theirs" / "adapter_config.json") as fh2:
        cfg_o, cfg_t = json.load(fh), json.load(fh2)
    cfg_t["target_modules"] = sorted(cfg_t["target_modules"])
    assert cfg_o == cfg_t
    ids = random_ids()
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
        assert rel_err(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits) <= TOL
        loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "theirs"))
        assert isinstance(loaded.get_submodule("model.layers.0.self_attn.q_proj"), fastpeft.OftLinear)
        assert rel_err(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("bias", ["oft_only", "all"])
def test_biases_train_and_save_as_in_peft(bias, tmp_path):
    base, theirs, ours = _pair("qwen2", bias=bias)  # qwen2: q / v projections have biases
    trainable_t = {n[len(PREFIX):] for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable_t
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in trainable_t
    _compare(theirs, ours, train=True)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    saved_o = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    saved_t = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert saved_o.keys() == saved_t.keys()
    assert any(k.endswith("q_proj.base_layer.bias") for k in saved_o)
    loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "ours"))
    bias_key = "model.layers.0.self_attn.q_proj.base_layer.bias"
    assert torch.equal(dict(loaded.named_parameters())[bias_key], dict(ours.named_parameters())[bias_key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_unmerge_merge_and_unload_match_pefts_weights(backend, monkeypatch):
    _, theirs, ours = _pair(backend=backend, monkeypatch=monkeypatch, block_share=True)
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        before = {n: p.clone() for n, p in ours.named_parameters()}
        fastpeft.merge(ours)
        theirs.merge_adapter()
        merged_t = _params(theirs, strip=True)
        name = "model.layers.1.mlp.down_proj.base_layer.weight"
        assert rel_err(_params(ours)[name], merged_t[name]) <= 1e-6
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        for n, p in ours.named_parameters():
            assert rel_err(p, before[n]) <= 1e-6, n
        merged = fastpeft.merge_and_unload(ours)
        assert not any(isinstance(m, fastpeft.OftLinear) for m in merged.modules())
        assert rel_err(merged(input_ids=ids).logits, want) <= TOL
        assert rel_err(merged.get_submodule("model.layers.1.mlp.down_proj").weight,
                       merged_t["model.layers.1.mlp.down_proj.base_layer.weight"]) <= 1e-6


def test_several_adapters_disable_delete_and_mixed_batches():
    base, _, ours = _pair()
    ids = random_ids(batch=3)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
        fastpeft.add_adapter(ours, "other", fastpeft.OFTConfig(oft_block_size=4, target_modules=["q_proj", "o_proj"],
                                                               init_weights=False, use_cayley_neumann=False))
        assert ours.get_submodule("model.layers.0.self_attn.o_proj").oft_R["other"].weight.shape == (12, 6)
        fastpeft.set_adapter(ours, "other")
        other = ours(input_ids=ids).logits
        assert rel_err(other, want) > 1e-3
        with fastpeft.disable_adapter(ours):
            assert rel_err(ours(input_ids=ids).logits, base_logits) <= TOL
        mixed = ours(input_ids=ids, adapter_names=["other", "__base__", "default"]).logits
        assert rel_err(mixed[0], other[0]) <= TOL
        assert rel_err(mixed[1], base_logits[1]) <= TOL
        assert rel_err(mixed[2], want[2]) <= TOL
        fastpeft.set_adapter(ours, "default")
        fastpeft.delete_adapter(ours, "other")
        assert all("other" not in n for n, _ in ours.named_parameters())
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL


@pytest.mark.parametrize("backend", ["reference", "triton"])  # triton: the NF4 kernels (interpreter on CPU)
def test_4bit_bases_match_peft_on_bitsandbytes(backend, monkeypatch):
    base = nf4_tiny_model("llama")
    kw = dict(oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kw))
    set_settings(monkeypatch, backend=backend)
    torch.manual_seed(0)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.OFTConfig(**kw))
    calls = []
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    original = layer._forward_nf4
    monkeypatch.setattr(layer, "_forward_nf4", lambda *a: calls.append(1) or original(*a))
    _compare(theirs, ours)
    assert len(calls) == (1 if backend == "triton" else 0)  # the kernel path ran where it should
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        with pytest.raises(NotImplementedError, match="merge_and_unload"):
            fastpeft.merge(ours)
        merged = fastpeft.merge_and_unload(ours)  # dequantized into dense layers
        assert rel_err(merged(input_ids=ids).logits, want) <= TOL


def test_fastpeft_nf4_base_equals_the_dequantized_dense_base():
    """OFT on a 4-bit base computes OFT of the dequantized base. The untargeted 4-bit layers run bitsandbytes' own
    CPU forward, so the check needs bitsandbytes' CPU dequantization to be right on this machine: on some CPUs
    (bitsandbytes 0.50.2's native CPU path, seen 2026-11-30) it does not reproduce its own quantization (41% off
    its input where NF4's error is 9%). There the test is skipped, naming why, instead of testing bitsandbytes."""
    import bitsandbytes.functional as bnb_functional

    from fastpeft.nn import bases
    model = fastpeft.quantize_nf4(tiny_model("llama", seed=1))
    probe = model.get_submodule("model.layers.0.self_attn.q_proj")
    theirs = bnb_functional.dequantize_4bit(probe.weight.data, probe.weight.quant_state).float()
    if not torch.allclose(theirs, bases.dequantize_linear4bit(probe).float(), rtol=1e-6, atol=1e-7):
        pytest.skip("bitsandbytes' CPU dequantize_4bit disagrees with the NF4 format on this machine (its forward "
                    "would be wrong too); fastpeft's own dequantization is checked in tests/ops")
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if bases.is_linear4bit(module):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = bases.dequantize_linear4bit(module).float()
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    cfg = fastpeft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False)
    torch.manual_seed(0)
    ours = fastpeft.patch(model, cfg)
    assert bases.is_linear4bit(ours.get_submodule("model.layers.0.self_attn.q_proj").base_layer)
    torch.manual_seed(0)
    twin = fastpeft.patch(dense, cfg)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, twin(input_ids=ids).logits) <= 1e-5


def test_unsupported_bases_are_refused_and_the_model_is_left_as_it_was():
    gpt2 = tiny_model("gpt2", seed=1)
    with pytest.raises(TypeError, match="OFT adapts torch.nn.Linear"):
        fastpeft.patch(gpt2, fastpeft.OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
    assert "_fastpeft_state" not in gpt2.__dict__
    # atomic: q_proj layers are built before the embedding is refused; nothing of them stays
    model = tiny_model("llama", seed=1)
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="Embedding"):
        fastpeft.patch(model, fastpeft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "embed_tokens"]))
    assert_same_snapshot(before, state_snapshot(model))


def test_config_rules_and_errors(tmp_path):
    with pytest.raises(ValueError, match="either r .* or oft_block_size"):
        fastpeft.OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ValueError, match="r or oft_block_size non-zero"):
        fastpeft.OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="bias must be one of 'none', 'all', 'oft_only'"):
        fastpeft.OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="module_dropout must be in"):
        fastpeft.OFTConfig(module_dropout=1.0)
    with pytest.raises(ValueError, match="coft must be True or False"):
        fastpeft.OFTConfig(coft=1)
    with pytest.raises(TypeError, match="did you mean 'oft_block_size'"):
        fastpeft.OFTConfig(oft_blocksize=8)
    cfg = fastpeft.config.to_fastpeft_config(peft.OFTConfig(r=4, oft_block_size=0, block_share=True,
                                                            target_modules=["q_proj"]))
    assert isinstance(cfg, fastpeft.OFTConfig) and (cfg.r, cfg.oft_block_size, cfg.block_share) == (4, 0, True)
    with pytest.raises(ValueError, match="PEFT < 0.14"):  # PEFT refuses these files too
        fastpeft.config.to_fastpeft_config({"peft_type": "OFT", "r": 8, "target_modules": ["q_proj"]})
    with pytest.warns(UserWarning, match="Cayley-Neumann"):
        fastpeft.config.to_fastpeft_config({"peft_type": "OFT", "oft_block_size": 8, "use_cayley_neumann": True,
                                            "peft_version": "0.17.1"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, ours = _pair(fan_in_fan_out=True)
    assert any("Setting fan_in_fan_out to False" in str(w.message) for w in caught)
    assert fastpeft.active_adapter(ours) == "default"
    fastpeft.save_adapter(ours, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="hot-swap of OFT adapters is not supported"):
        fastpeft.hotswap_adapter(ours, str(tmp_path / "a"))


def test_a_peft_oft_model_is_not_converted_in_place():
    _, theirs, _ = _pair()
    before = state_snapshot(theirs)
    with pytest.raises(TypeError, match="not a LoRA or IA3 layer"):
        fastpeft.patch(theirs)
    assert_same_snapshot(before, state_snapshot(theirs))


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_gpu_bf16_against_an_fp32_twin(four_bit, monkeypatch):
    """bf16 on the fast path (x + x·(R - I) in bf16 GEMMs; on 4-bit bases the NF4 kernels) against the fp32
    reference twin, within max(1e-2, 2x the same bf16 model's error on the reference path)."""
    check_bf16_against_fp32_twin(fastpeft.OFTConfig(oft_block_size=32, target_modules="all-linear",
                                                    init_weights=False), four_bit, monkeypatch)


def test_docstring_examples_run():
    import doctest

    from fastpeft.nn import oft as nn_oft
    from fastpeft.ops import oft as ops_oft
    for module in (ops_oft, nn_oft):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
    result = doctest.DocTestRunner().run(doctest.DocTestFinder().find(fastpeft.OFTConfig)[0])
    assert result.attempted > 0 and result.failed == 0

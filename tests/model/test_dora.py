"""DoRA (use_dora=True): PEFT's numbers on every path, PEFT's format both ways, merge, conversion, bad input."""
import copy
import json
import os

import peft
import pytest
import torch

import fastpeft
from fastpeft.nn import LoraLinear
from fastpeft.ops.dropout import lora_dropout_mask
from fastpeft.ops.reference import dora_linear_reference, dora_weight_norm_reference
from helpers import ARCHS, random_ids, rel_err, set_settings, state_snapshot, assert_same_snapshot, tiny_model

FP32_TOL = 1e-5
BACKENDS = ["reference", "triton", "cpp"]  # on CPU: "triton" / "cpp" run the Triton kernels in the interpreter


def _targets(arch):
    return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else "all-linear"


def _pair(base, cfg, backend, monkeypatch):
    """A PEFT DoRA model and ours built from the same config, our trainable tensors copied from PEFT's."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    set_settings(monkeypatch, backend=backend)
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg))
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters()}
    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n[len("base_model.model."):] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours_trainable) == peft_trainable  # magnitudes included, same names
    with torch.no_grad():
        for name, param in ours_trainable.items():
            param.copy_(theirs[name])
    return peft_model, ours


def _compare(peft_model, ours, ids, train=True, seed=None):
    peft_model.train(train)
    ours.train(train)
    if seed is not None:
        torch.manual_seed(seed)
    out_p = peft_model(input_ids=ids, labels=ids)
    if seed is not None:
        torch.manual_seed(seed)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_p.logits) <= FP32_TOL
    out_p.loss.backward()
    out_o.loss.backward()
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert rel_err(param.grad, theirs[name].grad) <= FP32_TOL, name


def _perturb_magnitudes(*models):
    """Magnitudes away from the norm (g != 1) and identical in both models, so the rescaling is exercised."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in models:
            gen.manual_seed(0)
            for name, param in sorted(model.named_parameters()):
                if "lora_magnitude_vector" in name:
                    param.mul_(0.5 + torch.rand(param.shape, generator=gen).to(param.device))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_matches_peft(arch, backend, monkeypatch):
    base = tiny_model(arch, seed=21)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(arch), init_lora_weights=False, use_dora=True)
    peft_model, ours = _pair(base, cfg, backend, monkeypatch)
    _perturb_magnitudes(peft_model, ours)
    _compare(peft_model, ours, random_ids(seed=ARCHS.index(arch) + 20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_bias_rslora_patterns_and_eval_match_peft(backend, monkeypatch):
    base = tiny_model("qwen2", seed=22)  # q/k/v carry a bias
    cfg = peft.LoraConfig(r=6, lora_alpha=5, use_rslora=True, bias="all", init_lora_weights=False, use_dora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3},
                          alpha_pattern={"k_proj": 2})
    peft_model, ours = _pair(base, cfg, backend, monkeypatch)
    _compare(peft_model, ours, random_ids(seed=23))
    with torch.no_grad():  # eval without grad: our norm cache serves the second call
        ids = random_ids(seed=24)
        ref = peft_model.eval()(input_ids=ids).logits
        for _ in range(2):
            assert rel_err(ours.eval()(input_ids=ids).logits, ref) <= FP32_TOL


def test_dora_dropout_matches_peft_with_same_rng(monkeypatch):
    """The reference path draws its mask from torch's RNG in PEFT's order, and uses PEFT's dropout formula (a
    second base product on the dropped-out input): same seed, same numbers."""
    base = tiny_model("llama", seed=25)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_lora_weights=False, use_dora=True)
    peft_model, ours = _pair(base, cfg, "reference", monkeypatch)
    _perturb_magnitudes(peft_model, ours)
    _compare(peft_model, ours, random_ids(seed=26), seed=123)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_layer_kernels_match_oracle(dtype, dropout, conv1d, monkeypatch):
    """The Triton path of one layer (interpreter on CPU) against the oracle with the same dropout mask: odd
    shapes, 3-D non-contiguous input, bias, Conv1D's transposed weight."""
    set_settings(monkeypatch, backend="triton")
    torch.manual_seed(31)
    K, N = 37, 29
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(N, K)
        torch.nn.init.normal_(base.weight, std=0.2)
        torch.nn.init.normal_(base.bias)
    else:
        base = torch.nn.Linear(K, N)
    base = base.to(dtype).requires_grad_(False)  # frozen, as patch leaves it (a trainable base takes the reference)
    layer = LoraLinear(base, "default", r=5, lora_alpha=7, lora_dropout=dropout, init_lora_weights=False,
                       use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(N) + 0.5)
    layer.train()
    x = torch.randn(11, 3, K, dtype=dtype).transpose(0, 1).requires_grad_(True)  # [3, 11, K], non-contiguous
    torch.manual_seed(5)
    y = layer(x)
    # the seed the layer drew: same generator state, same draw (nn/_rng.py)
    torch.manual_seed(5)
    from fastpeft.nn._rng import dropout_seed
    seed = dropout_seed() if dropout else None
    weight = base.weight.t() if conv1d else base.weight
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    x_ref = x.detach().float().requires_grad_(True)
    mask = lora_dropout_mask(x.shape, dropout, seed, x.device, dtype).float() if dropout else None
    y_ref = dora_linear_reference(x_ref, weight.detach().float(), base.bias.detach().float(), *twins[:2], twins[2],
                                  layer.scaling["default"], mask)
    tol = FP32_TOL if dtype == torch.float32 else 3e-3
    assert rel_err(y.float(), y_ref) <= tol
    grad = torch.randn_like(y_ref)
    (y.float() * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert rel_err(x.grad.float(), x_ref.grad) <= tol
    for mine, ref in zip(params, twins):
        assert rel_err(mine.grad, ref.grad) <= tol


def test_dora_deterministic_mode_is_bitwise_reproducible():
    from fastpeft.ops.kernels.dora import dora_linear

    torch.manual_seed(4)
    x = torch.randn(19, 40)
    w, a, b, m = torch.randn(24, 40), torch.randn(3, 40), torch.randn(24, 3), torch.rand(24) + 0.5

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, m)]
        y = dora_linear(leaves[0], w, None, *leaves[1:3], leaves[3], 1.5, 0.2, 9)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    fast = run()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v, f in zip(first, second, fast):
        assert torch.equal(u, v) and rel_err(u, f) <= FP32_TOL


def test_dora_weight_norm_kernel_matches_reference():
    from fastpeft.ops.kernels.dora import dora_weight_norm
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        w = torch.randn(53, 41).to(dtype).t()  # [41, 53] strided view, odd sizes
        a, b = torch.randn(7, 53), torch.randn(41, 7)
        got = dora_weight_norm(w, a, b, 0.37)
        assert rel_err(got, dora_weight_norm_reference(w, a, b, 0.37)) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_dora_norm_cache_follows_weight_changes(backend, monkeypatch):
    set_settings(monkeypatch, backend=backend)
    layer = LoraLinear(torch.nn.Linear(16, 8).requires_grad_(False), "default", r=2, lora_alpha=2,
                       init_lora_weights=False, use_dora=True)
    layer.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        assert "default" in layer._dora_norms
        layer.lora_B["default"].weight.add_(0.5)  # an optimizer-like in-place update bumps the version
        second = layer(x)
    ref = dora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                                layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight,
                                layer.scaling["default"])
    assert rel_err(second, ref) <= FP32_TOL and rel_err(first, ref) > 1e-3
    mid = torch.randn(20, 16)  # 17-64 rows: LoRA's operator rescaled by the cached g (3 rows above: the DoRA operator)
    with torch.no_grad():
        got_mid = layer(mid)
    ref_mid = dora_linear_reference(mid, layer.base_layer.weight, layer.base_layer.bias,
                                    layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                    layer.lora_magnitude_vector["default"].weight, layer.scaling["default"])
    assert rel_err(got_mid, ref_mid) <= FP32_TOL
    layer.train()
    assert not layer._dora_norms
    layer.eval()
    big = torch.randn(2, 70, 16)  # more rows than the rescale path takes: the DoRA kernels with the cached norm
    with torch.no_grad():
        got, again = layer(big), layer(big)
    ref = dora_linear_reference(big, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                                layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight,
                                layer.scaling["default"])
    assert rel_err(got, ref) <= FP32_TOL and torch.equal(got, again) and "default" in layer._dora_norms


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_cpp_operator_keeps_the_base_norm_per_weight_version(conv1d, monkeypatch):
    """The C++ operator's path in training: ‖W‖² is kept on the layer and recomputed when the frozen weight changes
    in place (version counter) or is replaced; every call gives the oracle's numbers and gradients."""
    from fastpeft.ops import cpp_ops

    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    from transformers.pytorch_utils import Conv1D

    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(3)
    base = Conv1D(8, 16) if conv1d else torch.nn.Linear(16, 8)
    with torch.no_grad():
        base.weight.normal_(std=0.3)
        base.bias.normal_()
    base.requires_grad_(False)
    layer = LoraLinear(base, "default", r=3, lora_alpha=5, init_lora_weights=False, use_dora=True).train()
    calls = []
    real = cpp_ops.dora_linear
    monkeypatch.setattr(cpp_ops, "dora_linear", lambda *a: calls.append(a[7] is not None) or real(*a))
    x = torch.randn(2, 5, 16, requires_grad=True)

    def check():
        w = base.weight.t() if conv1d else base.weight
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                  layer.lora_magnitude_vector["default"].weight]
        for t in [x] + params:
            t.grad = None
        y = layer(x)
        y.square().sum().backward()
        got = [x.grad] + [p.grad for p in params]
        refs = [t.detach().clone().requires_grad_() for t in [x] + params]
        want = dora_linear_reference(refs[0], w, base.bias, refs[1], refs[2], refs[3], layer.scaling["default"])
        assert rel_err(y, want) <= FP32_TOL
        want.square().sum().backward()
        for a, r in zip(got, refs):
            assert rel_err(a, r.grad) <= FP32_TOL

    check()
    key, first = layer._dora_weight_sq
    check()
    assert layer._dora_weight_sq[1] is first  # kept
    with torch.no_grad():
        base.weight.mul_(1.5)  # in place: the version counter moves
    check()
    assert layer._dora_weight_sq[1] is not first
    base.weight = torch.nn.Parameter(torch.randn_like(base.weight), requires_grad=False)  # replaced
    check()
    assert calls and all(calls)  # every training call went through the operator with ‖W‖² given


def test_qdora_cpp_keeps_the_dequantized_weight_norm_per_base_version(monkeypatch):
    """QDoRA through the C++ 4-bit operator: ‖W‖² of the dequantized weight is kept on the layer, recomputed when the
    packed bytes change in place or the QuantState is replaced; every call gives the oracle's numbers."""
    from fastpeft.nn import bases
    from fastpeft.ops import cpp_ops
    from fastpeft.ops.nf4_format import nf4_dequantize_reference

    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(4)
    base = fastpeft.NF4Linear.from_linear(torch.nn.Linear(64, 12, bias=True))
    layer = LoraLinear(base, "default", r=3, lora_alpha=5, init_lora_weights=False, use_dora=True).train()
    calls = []
    real = cpp_ops.nf4_dora_linear
    monkeypatch.setattr(cpp_ops, "nf4_dora_linear", lambda *a: calls.append(a[8] is not None) or real(*a))
    x = torch.randn(2, 5, 64)

    def check():
        packed, qs = bases.nf4_parts(base)
        w = nf4_dequantize_reference(packed, qs, torch.float32)
        a, b, m = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                   layer.lora_magnitude_vector["default"].weight)
        want = dora_linear_reference(x, w, base.bias, a, b, m, layer.scaling["default"])
        assert rel_err(layer(x), want) <= FP32_TOL
        assert torch.allclose(layer._dora_weight_sq[1], w.square().sum(1), rtol=1e-6)

    check()
    first = layer._dora_weight_sq[1]
    check()
    assert layer._dora_weight_sq[1] is first  # kept
    with torch.no_grad():
        base.weight[:4] ^= 0x11  # other codes, in place: the version counter moves
    check()
    second = layer._dora_weight_sq[1]
    assert second is not first
    packed, qs = bases.nf4_parts(base)
    qs.absmax = qs.absmax.clone()  # a replaced QuantState part: a new KernelState
    check()
    assert layer._dora_weight_sq[1] is not second
    assert len(calls) == 4 and all(calls)  # every call went through the operator with ‖W‖² given


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merge_unmerge_and_merge_and_unload_match_peft(arch, monkeypatch):
    base = tiny_model(arch, seed=27)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(arch), init_lora_weights=False, use_dora=True)
    peft_model, ours = _pair(base, cfg, "reference", monkeypatch)
    _perturb_magnitudes(peft_model, ours)
    ids = random_ids(seed=28)
    with torch.no_grad():
        unmerged = ours.eval()(input_ids=ids).logits
        fastpeft.merge(ours)
        merged = ours(input_ids=ids).logits
        peft_model.eval().merge_adapter()
        assert rel_err(merged, peft_model(input_ids=ids).logits) <= FP32_TOL
        assert rel_err(merged, unmerged) <= FP32_TOL
        fastpeft.unmerge(ours)
        assert rel_err(ours(input_ids=ids).logits, unmerged) <= FP32_TOL
        plain = fastpeft.merge_and_unload(ours)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        assert rel_err(plain(input_ids=ids).logits, unmerged) <= FP32_TOL


def test_dora_save_load_both_ways(tmp_path, monkeypatch):
    base = tiny_model("llama", seed=29)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                          use_dora=True)
    peft_model, ours = _pair(base, cfg, "reference", monkeypatch)
    _perturb_magnitudes(ours)
    ids = random_ids(seed=30)
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
    # ours -> PEFT
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "adapter_config.json") as fh:
        assert json.load(fh)["use_dora"] is True
    loaded_p = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel_err(loaded_p.eval()(input_ids=ids).logits, expected) <= FP32_TOL
    # PEFT -> ours
    _perturb_magnitudes(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded_o = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel_err(loaded_o.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits) <= FP32_TOL
    mags = [n for n, _ in loaded_o.named_parameters() if "lora_magnitude_vector" in n]
    assert len(mags) == 4


def test_dora_file_without_magnitudes_is_refused_and_model_unchanged(tmp_path, monkeypatch):
    base = tiny_model("llama", seed=32)
    set_settings(monkeypatch, backend="reference")
    plain = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    fastpeft.save_adapter(plain, str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["use_dora"] = True
    path.write_text(json.dumps(data))
    model = copy.deepcopy(base)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        fastpeft.load_adapter(model, str(tmp_path))
    assert_same_snapshot(before, state_snapshot(model))


def test_patch_converts_peft_dora_model(monkeypatch):
    base = tiny_model("mistral", seed=33)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                          init_lora_weights=False, use_dora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _perturb_magnitudes(peft_model)
    ids = random_ids(seed=34)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    mags = {n: p for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
    set_settings(monkeypatch, backend="reference")
    converted = fastpeft.patch(peft_model)
    assert isinstance(converted.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear)
    after = {n: p for n, p in converted.named_parameters() if "lora_magnitude_vector" in n}
    assert all(after[n] is p for n, p in mags.items())  # the very same parameters: optimizers stay valid
    with torch.no_grad():
        assert rel_err(converted(input_ids=ids).logits, expected) <= FP32_TOL


def test_dora_trainable_parameter_count_and_initial_magnitudes_match_peft():
    base = tiny_model("gemma", seed=35)
    cfg = peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = fastpeft.patch(copy.deepcopy(base), cfg)
    assert fastpeft.get_nb_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters()}
    mags = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == 14
    for name, param in mags.items():  # B = 0 at the default init: both are the base weight's row norms
        assert rel_err(param, theirs[name]) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_16bit_initial_magnitudes_and_training_match_peft(dtype):
    # PEFT computes a new adapter's magnitude in the base weight's dtype (it has cast the adapter to it by then), so
    # on a 16-bit model its m is the row norm rounded to 16 bits, and its training starts from g = m/n != 1. An
    # exact fp32 norm would start elsewhere and drift from PEFT's loss curve (8B bench: 12.04 vs 11.75 after 7 steps).
    base = tiny_model("llama", seed=37).to(dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = fastpeft.patch(copy.deepcopy(base), cfg)
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters()}
    mags = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == 14
    for name, param in mags.items():
        assert param.dtype == torch.float32 and torch.equal(param, theirs[name]), name
    with torch.no_grad():  # the same lora_A too (B = 0 in both): then the two trainings are the same computation
        for name, param in ours.named_parameters():
            if "lora_A" in name:
                param.copy_(theirs[name])
    ids = random_ids(2, 24, seed=38)
    losses = []
    for model in (peft_model, ours):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        run = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]  # it trains
    # the same computation: 0 measured here; the exact fp32 init parts from PEFT's by 4e-6 (fp16) to 1.5e-5 (bf16)
    assert max(abs(a - b) / abs(a) for a, b in zip(*losses)) <= 1e-6, losses


def test_dora_delete_and_disable_adapter(monkeypatch):
    base = tiny_model("llama", seed=36)
    set_settings(monkeypatch, backend="reference")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                                   init_lora_weights=False))
    fastpeft.add_adapter(model, "plain", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids = random_ids(seed=37)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        with fastpeft.disable_adapter(model):
            assert rel_err(model(input_ids=ids).logits, base_logits) <= 1e-6
        assert rel_err(model(input_ids=ids).logits, base_logits) > 1e-4
    fastpeft.delete_adapter(model, "default")
    layer = model.model.layers[0].self_attn.q_proj
    assert "default" not in layer.lora_magnitude_vector and not any("magnitude" in k for k in model.state_dict())


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        fastpeft.LoraConfig(use_dora="yes")


# -- GPU: bf16 against PEFT's own error -------------------------------------------------------------------------
def _twin_errors(models, ids):
    """Logits and trainable-parameter grads of each model, as fp32."""
    out = []
    for model in models:
        model.train()
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = {n.replace("base_model.model.", ""): p.grad.detach().float()
                 for n, p in model.named_parameters() if p.requires_grad}
        out.append((res.logits.detach().float(), grads))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_dora_bf16_within_pefts_own_error(dropout, monkeypatch):
    """bf16 DoRA with the kernels on a GPU against an fp32 twin (same weights, PEFT in fp32): fastpeft's error
    must be within max(1e-2, 2x PEFT's own bf16 error) for logits and every gradient. With dropout the masks
    differ (our Philox masks vs torch's RNG), so only the loss is compared with PEFT's (within 5%); the exact
    dropout check is test_dora_layer_kernels_match_oracle (same mask)."""
    import transformers
    from helpers import tiny_config

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 256, 512, 4, 2
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda().eval()
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout,
                           init_lora_weights=False, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(dense), copy.deepcopy(lcfg))
    _perturb_magnitudes(theirs)
    set_settings(monkeypatch, backend="auto")
    ours = fastpeft.patch(copy.deepcopy(dense), copy.deepcopy(lcfg))
    twin = peft.get_peft_model(copy.deepcopy(dense).float(), copy.deepcopy(lcfg))
    src = {n.replace("base_model.model.", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for model in (ours, twin):
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(src[n.replace("base_model.model.", "")])
    ids = random_ids(seed=3).cuda()
    if dropout:
        losses = []
        for model in (theirs, ours):
            torch.manual_seed(0)
            losses.append(model.train()(input_ids=ids, labels=ids).loss.item())
        assert abs(losses[0] - losses[1]) <= 0.05 * abs(losses[0])  # different masks: statistical agreement
        return
    (lr, gr), (lp, gp), (lo, go) = _twin_errors([twin, theirs, ours], ids)
    err_p, err_o = rel_err(lp, lr), rel_err(lo, lr)
    report = [f"logits rel err vs fp32: fastpeft {err_o:.4g}, PEFT {err_p:.4g}"]
    bad = [] if err_o <= max(1e-2, 2.0 * err_p) else ["logits"]
    assert go.keys() == gp.keys() == gr.keys() and len(go) > 0
    for n in go:
        e_p, e_o = rel_err(gp[n], gr[n]), rel_err(go[n], gr[n])
        report.append(f"{n}: grad rel err vs fp32 fastpeft {e_o:.4g}, PEFT {e_p:.4g}")
        if not e_o <= max(2.0 * e_p, 1e-2):
            bad.append(n)
    print("\n".join(report))
    assert not bad, "\n".join(["failed: " + ", ".join(bad)] + report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gpu_dora_kernels_odd_shapes(dtype, dropout):
    """The compiled kernels on odd shapes (37×4231 input, 45 outputs, r = 5), 3-D non-contiguous input, bias, and
    the 4-bit path, against the fp32 oracle with the same mask (also run under compute-sanitizer)."""
    from fastpeft.ops.kernels.dora import dora_linear, nf4_dora_linear
    from fastpeft.ops.nf4_format import nf4_dequantize_reference
    from fastpeft.ops.nf4_quantize import quantize_nf4

    torch.manual_seed(0)
    K, N, R = 4231, 45, 5
    x = torch.randn(37, 2, K, device="cuda", dtype=dtype).transpose(0, 1).requires_grad_(True)
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    params = [torch.randn(R, K, device="cuda") / K**0.5, torch.randn(N, R, device="cuda") * 0.1,
              torch.rand(N, device="cuda") + 0.5]
    seed = 77 if dropout else None
    mask = lora_dropout_mask(x.shape, dropout, seed, x.device, dtype).float() if dropout else None
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    packed, qs = quantize_nf4(w, blocksize=64)  # on the GPU, state dtype = the compute dtype
    for weight_kind in ("dense", "nf4"):
        mine = [p.clone().requires_grad_(True) for p in params]
        twins = [p.clone().requires_grad_(True) for p in params]
        x.grad = None
        if weight_kind == "dense":
            y = dora_linear(x, w, bias, *mine[:2], mine[2], 1.3, dropout, seed)
            w_ref = w.float()
        else:
            y = nf4_dora_linear(x, packed, qs, bias, *mine[:2], mine[2], 1.3, dropout, seed)
            w_ref = nf4_dequantize_reference(packed, qs).float()
        x_ref = x.detach().float().requires_grad_(True)
        y_ref = dora_linear_reference(x_ref, w_ref, bias.float(), *twins[:2], twins[2], 1.3, mask)
        assert torch.isfinite(y).all() and rel_err(y.float(), y_ref) <= tol, weight_kind
        grad = torch.randn_like(y_ref)
        (y.float() * grad).sum().backward()
        (y_ref * grad).sum().backward()
        assert rel_err(x.grad.float(), x_ref.grad) <= tol, weight_kind
        for a, b in zip(mine, twins):
            assert rel_err(a.grad, b.grad) <= tol, weight_kind


@pytest.mark.gpu
def test_gpu_compiled_dora_model_matches_eager_without_graph_breaks(monkeypatch):
    """torch.compile (inductor) of a patched bf16 DoRA model: no graph break, the loss and the trained adapters
    of two steps agree with eager within bf16 rounding."""
    import torch._dynamo as dynamo

    set_settings(monkeypatch, backend="auto")
    torch.manual_seed(0)
    base = tiny_model("llama", seed=40).to(torch.bfloat16).cuda()
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    eager = fastpeft.patch(base, cfg).train()
    compiled = copy.deepcopy(eager)
    ids = random_ids(seed=41).cuda()
    dynamo.reset()
    explanation = dynamo.explain(compiled)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    dynamo.reset()
    compiled.forward = torch.compile(compiled.forward)
    for model in (eager, compiled):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model._losses = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            model._losses.append(loss.item())
    assert abs(eager._losses[0] - compiled._losses[0]) <= 2e-2 * abs(eager._losses[0])
    assert abs(eager._losses[1] - compiled._losses[1]) <= 2e-2 * abs(eager._losses[1])


def test_dora_with_a_trainable_base_weight_says_it_takes_the_reference_path(monkeypatch):
    from fastpeft.nn import layer as layer_mod

    set_settings(monkeypatch, backend="triton")
    layer_mod._warned.discard("dora-trainable-base")
    base = torch.nn.Linear(16, 8)  # requires grad: DoRA's kernels treat W as frozen
    layer = LoraLinear(base, "default", r=2, lora_alpha=4, init_lora_weights=False, use_dora=True).train()
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="base weight requires grad.*reference path"):
        y = layer(x)
    ref = dora_linear_reference(x, base.weight, base.bias, layer.lora_A["default"].weight,
                                layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight,
                                layer.scaling["default"])
    assert rel_err(y, ref) <= FP32_TOL
    y.sum().backward()
    assert base.weight.grad is not None  # the base weight trains, through autograd

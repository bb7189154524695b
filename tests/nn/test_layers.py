"""LoraLinear / IA3Linear modules against the ops references, on every base type, and backend choice."""
import warnings

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from fastpeft import settings
from fastpeft.nn import IA3Linear, LoraLinear
from fastpeft.nn import bases as B
from fastpeft.nn import layer as layer_module
from fastpeft.ops import cpp_ops
from fastpeft.ops.reference import dora_linear_reference, ia3_linear_reference, lora_linear_reference
from helpers import rel_err, set_settings


def _random_lora(layer: LoraLinear):
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()


def _conv1d(in_f, out_f):
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.weight.normal_(std=0.1)
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_linear_reference_path_matches_op(kind, monkeypatch):
    set_settings(monkeypatch, backend="reference")
    in_f, out_f = 37, 29
    base = nn.Linear(in_f, out_f) if kind == "linear" else _conv1d(in_f, out_f)
    layer = LoraLinear(base, "default", r=5, lora_alpha=7)
    _random_lora(layer)
    x = torch.randn(3, 7, in_f)
    w = base.weight if kind == "linear" else base.weight.t()
    want = lora_linear_reference(x, w, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 7 / 5)
    got = layer(x)
    assert got.shape == (3, 7, out_f)
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, base(x)) > 1e-3  # the adapter really contributes


def test_lora_adapter_params_are_fp32_and_grads_flow_with_bf16_input(monkeypatch):
    set_settings(monkeypatch, backend="reference")
    base = nn.Linear(24, 16).to(torch.bfloat16)
    layer = LoraLinear(base, "default", r=4, lora_alpha=8)
    _random_lora(layer)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # compute runs in the input's dtype
    y.float().square().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ia3_linear_reference_path_matches_op(kind, feedforward, monkeypatch):
    set_settings(monkeypatch, backend="reference")
    in_f, out_f = 31, 23
    base = nn.Linear(in_f, out_f) if kind == "linear" else _conv1d(in_f, out_f)
    layer = IA3Linear(base, "default", is_feedforward=feedforward, init_ia3_weights=False)
    x = torch.randn(2, 9, in_f)
    w = base.weight if kind == "linear" else base.weight.t()
    want = ia3_linear_reference(x, w, base.bias, layer.ia3_l["default"], feedforward)
    assert rel_err(layer(x), want) <= 1e-6
    assert layer.ia3_l["default"].shape == ((1, in_f) if feedforward else (out_f, 1))


def test_backend_setting_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="auto, cpp, triton, reference"):
        set_settings(monkeypatch, backend="cuda-please")


def test_backend_is_resolved_once_per_layer(monkeypatch):
    set_settings(monkeypatch, backend="reference")
    layer = LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)
    set_settings(monkeypatch, backend="triton")
    assert layer.backend == "reference"
    assert layer._dense_path(torch.randn(1, 4)) == "reference"
    auto = LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)
    auto.backend = "auto"
    assert auto._dense_path(torch.randn(1, 4)) == "reference"  # auto never picks kernels for CPU tensors
    # explicit triton on CPU tensors: the kernels in Triton's interpreter, else the reference (with a warning)
    expected = "triton" if settings.get().triton_interpret else "reference"
    assert LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)._dense_path(torch.randn(1, 4)) == expected
    set_settings(monkeypatch, backend="cpp")
    if cpp_ops.available():
        assert LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)._dense_path(torch.randn(1, 4)) == "cpp"


def test_cpp_backend_layers_match_the_reference(monkeypatch):
    """backend "cpp": the layers run the C++ operators (their CPU build here) with the reference's numbers."""
    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    torch.manual_seed(0)
    base = nn.Linear(37, 29)
    set_settings(monkeypatch, backend="reference")
    ref_lora = LoraLinear(base, "default", r=5, lora_alpha=7, init_lora_weights=False)
    ref_ia3 = IA3Linear(base, "default", is_feedforward=True, init_ia3_weights=False)
    set_settings(monkeypatch, backend="cpp")
    cpp_lora = LoraLinear(base, "default", r=5, lora_alpha=7)
    cpp_ia3 = IA3Linear(base, "default", is_feedforward=True)
    cpp_lora.load_state_dict(ref_lora.state_dict())
    cpp_ia3.load_state_dict(ref_ia3.state_dict())
    calls = []
    real = cpp_ops.lora_linear
    monkeypatch.setattr(cpp_ops, "lora_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 7, 37)
    for ref, cpp in ((ref_lora, cpp_lora), (ref_ia3, cpp_ia3)):
        want, got = ref(x), cpp(x)
        assert rel_err(got, want) <= 1e-6
        want.square().sum().backward()
        got.square().sum().backward()
        for (n, p_ref), (_, p_cpp) in zip(ref.named_parameters(), cpp.named_parameters()):
            if p_ref.requires_grad and p_ref.grad is not None:
                assert rel_err(p_cpp.grad, p_ref.grad) <= 1e-5, n
    assert calls  # the LoRA layer really went through the C++ operator


def _lora_states(layer: LoraLinear):
    """(label, set-up) for the states the hot path must see through: each leaves the layer in that state."""
    def merged():
        layer.merge()

    def unmerged():
        layer.unmerge()

    def disabled():
        layer.disable_adapters = True

    def enabled():
        layer.disable_adapters = False

    def other():
        layer.active_adapter = "drop"  # dropout 0.25

    def missing():
        layer.active_adapter = "nowhere"  # no such adapter on this layer: the base

    def dora():
        layer.active_adapter = "dora"

    def evaluation():
        layer.eval()

    def training():
        layer.train()

    def default():
        layer.active_adapter = "default"

    return [("default", default), ("dropout, training", other), ("dropout, eval", evaluation),
            ("default, eval", default), ("train again", training), ("no such adapter", missing),
            ("dora", dora), ("disabled", disabled), ("enabled", enabled), ("merged", merged),
            ("unmerged", unmerged), ("default last", default)]


def _hot_and_general(monkeypatch, layer, x, grad=True):
    """One call of ``layer`` through the hot path and one through the general path alone (``_forward_hot``
    returning None), with the same dropout draw: [(output, [x.grad] + trainable params' grads, [whether the hot
    path served each call]) for hot, general]."""
    taken = []
    real_hot = type(layer)._forward_hot

    def spy(self, x, name):
        out = real_hot(self, x, name)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(type(layer), "_forward_hot", spy)
    outs = []
    for hot in (True, False):
        if not hot:
            layer._forward_hot = lambda x, name: None  # the general path alone
        taken.clear()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)  # the dropout draw
        with torch.set_grad_enabled(grad):
            y = layer(x)
        if grad:
            y.square().sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        outs.append((y.detach(), grads, list(taken)))
        layer.__dict__.pop("_forward_hot", None)
    monkeypatch.setattr(type(layer), "_forward_hot", real_hot)
    return outs


def _assert_same(outs, label):
    (y_hot, g_hot, _), (y_gen, g_gen, _) = outs
    assert torch.equal(y_hot, y_gen), label
    for a, b in zip(g_hot, g_gen):
        assert (a is None and b is None) or torch.equal(a, b), label


@pytest.mark.filterwarnings("ignore:fastpeft. a DoRA layer's base weight requires grad")
@pytest.mark.parametrize("has_bias", [False, True])
def test_hot_path_gives_the_general_paths_result_in_every_state(monkeypatch, has_bias):
    """AdapterLayer.forward's hot path (the C++ operator straight from the module's dicts) against the general path
    in every state a layer can be in: outputs and gradients bitwise equal, and the hot path taken exactly where
    it applies (plain LoRA / IA3 on an nn.Linear, adapters on and unmerged, no dropout in effect)."""
    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(37, 29, bias=has_bias), "default", r=5, lora_alpha=7, init_lora_weights=False)
    layer.update_layer("drop", r=3, lora_alpha=3, lora_dropout=0.25, init_lora_weights=False)
    layer.update_layer("dora", r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    x = torch.randn(2, 7, 37, requires_grad=True)
    expect_hot = {"default": True, "dropout, training": False, "dropout, eval": True, "default, eval": True,
                  "train again": True, "no such adapter": False, "dora": False, "disabled": None, "enabled": False,
                  "merged": None, "unmerged": False, "default last": True}
    for label, setup in _lora_states(layer):
        setup()
        outs = _hot_and_general(monkeypatch, layer, x)
        _assert_same(outs, label)
        taken_hot = outs[0][2]
        want = expect_hot[label]
        # None: forward never asks (disabled / merged are decided before); else whether the hot path served it
        assert taken_hot == ([] if want is None else [want]), label
    # IA3: the same, for its two kinds and an unknown active adapter
    for feedforward in (False, True):
        ia3 = IA3Linear(nn.Linear(37, 29, bias=has_bias), "default", is_feedforward=feedforward,
                        init_ia3_weights=False)
        for active in ("default", "nowhere"):
            ia3.active_adapter = active
            assert (ia3._forward_hot(x, active) is not None) == (active == "default")
            want = IA3Linear._forward_adapter(ia3, x, active) if active == "default" else ia3.base_layer(x)
            assert torch.equal(ia3(x), want)


@pytest.mark.parametrize("has_bias", [False, True])
def test_dora_hot_path_gives_the_general_paths_result(monkeypatch, has_bias):
    """DoRA on a frozen nn.Linear takes the hot path (its C++ operator straight from forward) in training, in eval
    mode with autograd and in no-grad inference (the cached norm), and not with dropout in effect; each time the
    output and gradients are bitwise the general path's."""
    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(2)
    base = nn.Linear(37, 29, bias=has_bias)
    base.requires_grad_(False)
    layer = LoraLinear(base, "dora", r=3, lora_alpha=5, use_dora=True, init_lora_weights=False)
    layer.update_layer("dora_drop", r=2, lora_alpha=4, lora_dropout=0.3, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        for m in layer.lora_magnitude_vector.values():
            m.weight.mul_(torch.rand_like(m.weight) + 0.5)  # away from the norm
    x = torch.randn(3, 5, 37, requires_grad=True)
    for label, active, training, grad, want_hot in [("train", "dora", True, True, True),
                                                    ("dropout, train", "dora_drop", True, True, False),
                                                    ("eval, autograd", "dora", False, True, True),
                                                    ("eval, no grad", "dora", False, False, True),
                                                    ("dropout, eval", "dora_drop", False, False, True),
                                                    ("train again", "dora", True, True, True)]:
        layer.active_adapter = active
        layer.train(training)
        outs = _hot_and_general(monkeypatch, layer, x, grad)
        _assert_same(outs, label)
        assert outs[0][2] == [want_hot], label
    # the kept ‖W‖² follows the weight: replaced in place, the next training call must see the new one
    layer.active_adapter = "dora"
    layer.train()
    with torch.no_grad():
        base.weight.mul_(1.5)
    y = layer(x)
    want = dora_linear_reference(x.detach(), base.weight, base.bias, layer.lora_A["dora"].weight.detach(),
                                 layer.lora_B["dora"].weight.detach(),
                                 layer.lora_magnitude_vector["dora"].weight.detach(), layer.scaling["dora"])
    assert rel_err(y, want) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_float64_on_cuda_under_auto_runs_the_reference(kind, monkeypatch):
    """The kernels compute in fp32 / fp16 / bf16; a float64 layer on CUDA under backend auto runs PyTorch's math
    (the reference's numbers) instead of raising the operators' dtype error."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA only")
    set_settings(monkeypatch, backend="auto")
    base = nn.Linear(16, 12).double().cuda()
    if kind == "lora":
        layer = LoraLinear(base, "default", r=4, lora_alpha=8, init_lora_weights=False).double().cuda()
    else:
        layer = IA3Linear(base, "default", is_feedforward=False, init_ia3_weights=False).double().cuda()
    x = torch.randn(2, 3, 16, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        want = layer._forward_reference(x, "default")
        assert torch.equal(layer(x), want) and layer(x).dtype == torch.float64


def test_hot_path_skips_conv1d_and_cpu_tensors_under_auto(monkeypatch):
    """auto on CPU tensors keeps the reference path (the hot path is for CUDA under auto), and a Conv1D base
    (transposed weight) never takes it."""
    if not cpp_ops.available():
        pytest.skip("the C++ extension cannot be built here")
    calls = []
    real = cpp_ops.lora_linear
    monkeypatch.setattr(cpp_ops, "lora_linear", lambda *a: calls.append(1) or real(*a))
    set_settings(monkeypatch, backend="auto")
    auto = LoraLinear(nn.Linear(8, 6), "default", r=2, lora_alpha=2)
    auto(torch.randn(3, 8))
    assert not calls
    set_settings(monkeypatch, backend="cpp")
    conv = LoraLinear(_conv1d(8, 6), "default", r=2, lora_alpha=2, init_lora_weights=False)
    assert conv._forward_hot(torch.randn(3, 8), "default") is None
    x = torch.randn(3, 8)
    want = lora_linear_reference(x, conv.base_layer.weight.t(), conv.base_layer.bias,
                                 conv.lora_A["default"].weight, conv.lora_B["default"].weight, 1.0)
    assert rel_err(conv(x), want) <= 1e-6
    assert calls  # the general path's C++ call


@pytest.mark.skipif(not settings.get().triton_interpret, reason="CPU tensors in Triton's interpreter only")
def test_triton_backend_on_4bit_base_runs_qlora_kernels(monkeypatch):
    """A 4-bit base under the triton backend runs the QLoRA kernels (ops/kernels/nf4_lora.py): no fallback warning."""
    bnb = pytest.importorskip("bitsandbytes")
    set_settings(monkeypatch, backend="triton")
    layer_module._warned.clear()
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    packed = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.weight = packed._quantize("cpu")  # quantizes on CPU (bitsandbytes >= 0.45)
    q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    assert B.is_linear4bit(q) and q.weight.quant_state is not None
    layer = LoraLinear(q, "default", r=4, lora_alpha=4)
    _random_lora(layer)
    x = torch.randn(3, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = layer(x)
        y2 = layer(x)
    msgs = [str(w.message) for w in caught if "fastpeft" in str(w.message)]
    assert msgs == []
    w = B.dequantize_linear4bit(q)
    want = lora_linear_reference(x, w, q.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 1.0)
    assert rel_err(y1, want) <= 1e-6 and torch.equal(y1, y2)


@pytest.mark.skipif(torch.cuda.is_available() or not settings.get().triton_interpret,
                    reason="CPU tensors in Triton's interpreter only")
@pytest.mark.parametrize("kind", ["lora_dropout", "ia3_output", "ia3_feedforward"])
def test_bf16_in_the_interpreter_falls_back_to_the_reference_with_a_warning(kind, monkeypatch):
    """bf16 arithmetic is wrong in Triton's interpreter (it gave NaN logits for IA3 and LoRA with dropout, without
    a word): the layer says so once and computes on the reference path, with the reference's numbers."""
    def build(backend):
        set_settings(monkeypatch, backend=backend)
        torch.manual_seed(0)
        base = nn.Linear(40, 24).to(torch.bfloat16)
        if kind == "lora_dropout":
            layer = LoraLinear(base, "default", r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
        else:
            layer = IA3Linear(base, "default", is_feedforward=kind == "ia3_feedforward", init_ia3_weights=False)
        return layer.train()

    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)
    layer_module._warned.clear()
    kernels, reference = build("triton"), build("reference")
    with pytest.warns(UserWarning, match="bfloat16 in Triton's interpreter"):
        torch.manual_seed(1)
        got = kernels(x)
    torch.manual_seed(1)
    want = reference(x)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.is_available() or not settings.get().triton_interpret,
                    reason="CPU tensors in Triton's interpreter only")
def test_bf16_kernels_refuse_to_run_in_the_interpreter():
    from fastpeft.ops.kernels.ia3 import ia3_linear
    from fastpeft.ops.kernels.lora import lora_linear

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 cannot run in Triton's interpreter"):
        lora_linear(x, w, None, torch.randn(2, 16), torch.randn(8, 2), 1.0, 0.1, 3)
    with pytest.raises(ValueError, match="bfloat16 cannot run in Triton's interpreter"):
        ia3_linear(x, w, None, torch.ones(8, 1), False)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapters_follow_the_base_weight_onto_the_meta_device(kind):
    """A base built on the meta device (deferred init) gets its adapters on meta too, as PEFT makes them."""
    with torch.device("meta"):
        base = nn.Linear(16, 8)
    if kind == "lora":
        layer = LoraLinear(base, "default", r=4, lora_alpha=8)
        layer.update_layer("second", 2, 2)
    else:
        layer = IA3Linear(base, "default", is_feedforward=False)
        layer.update_layer("second")
    assert {p.device.type for p in layer.parameters()} == {"meta"}


def test_triton_backend_on_cpu_tensors_without_the_interpreter_uses_the_reference_and_says_so(monkeypatch):
    """Triton cannot launch on CPU pointers outside its interpreter: the layer runs the reference path (the
    oracle, the same numbers) with a warning instead of failing inside Triton's launcher."""
    from helpers import set_settings

    set_settings(monkeypatch, backend="triton", triton_interpret=False)
    monkeypatch.setattr(layer_module, "_warned", set())
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 7), "default", r=3, lora_alpha=6)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 12)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET"):
        y = layer(x)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = base(x) + (x @ a.t() @ b.t()) * layer.scaling["default"]
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)

"""LoraLinear / IA3Linear modules against the ops references, on every base type, and backend choice."""
import warnings

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from fastpeft.nn import IA3Linear, LoraLinear
from fastpeft.nn import base as B
from fastpeft.ops.ia3 import ia3_linear_reference
from fastpeft.ops.lora import lora_linear_reference
from conftest import rel_err


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
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
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
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
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
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    in_f, out_f = 31, 23
    base = nn.Linear(in_f, out_f) if kind == "linear" else _conv1d(in_f, out_f)
    layer = IA3Linear(base, "default", is_feedforward=feedforward, init_ia3_weights=False)
    x = torch.randn(2, 9, in_f)
    w = base.weight if kind == "linear" else base.weight.t()
    want = ia3_linear_reference(x, w, base.bias, layer.ia3_l["default"], feedforward)
    assert rel_err(layer(x), want) <= 1e-6
    assert layer.ia3_l["default"].shape == ((1, in_f) if feedforward else (out_f, 1))


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="reference, triton, auto"):
        LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)


def test_backend_is_resolved_once_per_layer(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    layer = LoraLinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    assert layer.backend == "reference"
    assert B.wants_triton(layer.backend, torch.randn(1, 4)) is False
    assert B.wants_triton("auto", torch.randn(1, 4)) is False  # auto never picks Triton for CPU tensors
    assert B.wants_triton("triton", torch.randn(1, 4)) is True


def test_triton_backend_on_4bit_base_runs_qlora_kernels(monkeypatch):
    """A 4-bit base under the triton backend runs the QLoRA kernels (fastpeft.ops.nf4_lora): no fallback warning."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    B._warned.clear()
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

"""The C++ LoRA operators with 16-bit adapters of the activations' dtype (csrc/adapter_ops.cpp: lora_native16):
what FSDP2's MixedPrecisionPolicy(param_dtype=bf16), DeepSpeed's bf16 mode and model.to(torch.bfloat16) hand the
layers. PEFT then computes its adapter in that dtype; the operators do too (no fp32 copies, no hi / lo splits, S in
x's dtype) and must stay within PEFT's own error against the float64 truth. CPU here (ATen GEMMs: the composition
CUDA runs too); the gpu-marked tests run the CUDA build at training and decode sizes."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.ops import cpp_ops
from helpers import DEVICE, make_weight, make_x, random_ids, rel_err, set_settings, tiny_model

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")
OPS = torch.ops.fastpeft_ops if cpp_ops.available() else None
DTYPES = [torch.bfloat16, torch.float16]


def _inputs(dtype, M, K, N, r, has_bias, layout, device, seed=0):
    torch.manual_seed(seed)
    x = make_x((1, M), K, dtype, layout, device).requires_grad_()
    w = make_weight(N, K, dtype, False, device)
    bias = (torch.randn(N, device=device) * 0.5).to(dtype).requires_grad_() if has_bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, device=device) / r**0.5).to(dtype).requires_grad_()
    return x, w, bias, A, B


def _peft_order(x, w, bias, A, B, s):
    """PEFT's lora.Linear with adapters in x's dtype: base(x) + lora_B(lora_A(x)) * scaling, every step rounded."""
    return F.linear(x, w, bias) + F.linear(F.linear(x, A), B) * s


def _check(dtype, M, K, N, r, has_bias, layout, device=DEVICE, s=2.0):
    x, w, bias, A, B = _inputs(dtype, M, K, N, r, has_bias, layout, device)
    leaves = [t for t in (x, bias, A, B) if t is not None]
    g = torch.randn(*x.shape[:-1], N, device=device).to(dtype)
    results = {}
    for name in ("ours", "peft", "truth"):
        twins = [t.detach().clone().requires_grad_() for t in leaves]
        if name == "truth":
            twins = [t.double().detach().requires_grad_() for t in twins]
        tx, tb = twins[0], twins[1] if has_bias else None
        tA, tB = twins[-2], twins[-1]
        tw = w.double() if name == "truth" else w
        if name == "ours":
            y = cpp_ops.lora_linear(tx, tw, tb, tA, tB, s)
        else:
            y = _peft_order(tx, tw, tb, tA, tB, s)
        y.backward(g.double() if name == "truth" else g)
        results[name] = [y] + [t.grad for t in twins]
    ours, peft, truth = results["ours"], results["peft"], results["truth"]
    names = ["y", "x"] + (["bias"] if has_bias else []) + ["A", "B"]
    for name, a, p, t in zip(names, ours, peft, truth):
        assert a.dtype == dtype, (name, a.dtype)  # gradients of 16-bit adapters in their dtype
        own = rel_err(p, t)
        assert rel_err(a, t) <= max(2 * own, 1e-2 if dtype == torch.bfloat16 else 2e-3), (name, rel_err(a, t), own)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(37, 67, 45, 5), (1, 64, 48, 8), (70, 96, 33, 16)])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("layout", ["contig", "strided_k"])
def test_16bit_adapters_within_peft_error(dtype, M, K, N, r, has_bias, layout):
    _check(dtype, M, K, N, r, has_bias, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_keeps_s_and_grads_in_the_adapter_dtype_only_where_it_applies(dtype):
    x, w, _, A, B = (t.detach() if t is not None else None for t in _inputs(dtype, 9, 32, 24, 4, False, "contig",
                                                                           DEVICE))
    x = x.reshape(-1, x.shape[-1])
    y, S = OPS.lora_fwd(x, w, None, A, B, 2.0, 0.0, None, 0)
    assert y.dtype == dtype and S.dtype == dtype
    _, dA, dB = OPS.lora_bwd(torch.randn_like(y), x, S, w, A, B, 2.0, 0.0, None, 0, True, True, True)
    assert dA.dtype == dtype and dB.dtype == dtype
    # fp32 adapters, or dropout: the fp32-S composition, fp32 gradients (autograd casts them to the parameter)
    for A2, B2, p, seed in ((A.float(), B.float(), 0.0, None), (A, B, 0.1, torch.tensor(5))):
        _, S2 = OPS.lora_fwd(x, w, None, A2, B2, 2.0, p, seed, 0)
        assert S2.dtype == torch.float32
        _, dA2, dB2 = OPS.lora_bwd(torch.randn_like(y), x, S2, w, A2, B2, 2.0, p, seed, 0, True, True, True)
        assert dA2.dtype == torch.float32 and dB2.dtype == torch.float32


def test_opcheck_with_16bit_adapters():
    """The Meta kernels give the dtypes the CPU kernels give (torch.compile allocates from them)."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(6, 24, dtype=dt, requires_grad=True)
    w, b = torch.randn(20, 24, dtype=dt), torch.randn(20, dtype=dt, requires_grad=True)
    a = torch.randn(4, 24, dtype=dt, requires_grad=True)
    bb = torch.randn(20, 4, dtype=dt, requires_grad=True)
    torch.library.opcheck(OPS.lora_linear, (x, w, b, a, bb, 2.0, 0.0, None, 0))
    S = torch.randn(6, 4, dtype=dt)
    torch.library.opcheck(OPS.lora_fwd, (x.detach(), w, b.detach(), a.detach(), bb.detach(), 2.0, 0.0, None, 0))
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(OPS.lora_bwd, (torch.randn(6, 20, dtype=dt), x.detach(), S, w, a.detach(), bb.detach(),
                                             2.0, 0.0, None, 0) + need)
    ws = [torch.randn(20, 24, dtype=dt), torch.randn(12, 24, dtype=dt)]
    for adapters32 in (False, True):  # all 16-bit: S in bf16; one fp32 member: S in fp32, each member's own grads
        As = [torch.randn(4, 24, dtype=dt, requires_grad=True),
              torch.randn(4, 24, dtype=torch.float32 if adapters32 else dt, requires_grad=True)]
        Bs = [torch.randn(20, 4, dtype=dt, requires_grad=True),
              torch.randn(12, 4, dtype=torch.float32 if adapters32 else dt, requires_grad=True)]
        torch.library.opcheck(OPS.lora_group_linear, (x, ws, [], As, Bs, 2.0))


@pytest.mark.parametrize("mixed", [False, True])
def test_group_with_16bit_adapters_matches_its_members(mixed):
    """q/k/v as one grouped call equals the members called alone (dtypes included), also when one member's
    adapters are fp32 (the group's S is then fp32 and each member keeps its own composition)."""
    dt = torch.bfloat16
    torch.manual_seed(3)
    x = torch.randn(2, 21, 32, dtype=dt)
    ws = [torch.randn(n, 32, dtype=dt) / 6 for n in (32, 16, 16)]
    As = [(torch.randn(4, 32) / 6).to(torch.float32 if (mixed and i == 2) else dt) for i in range(3)]
    Bs = [(torch.randn(n, 4) / 2).to(a.dtype) for n, a in zip((32, 16, 16), As)]
    runs = []
    for grouped in (True, False):
        xi = x.clone().requires_grad_()
        Ai = [a.clone().requires_grad_() for a in As]
        Bi = [b.clone().requires_grad_() for b in Bs]
        ys = (cpp_ops.lora_group_linear(xi, ws, [], Ai, Bi, 2.0) if grouped else
              [cpp_ops.lora_linear(xi, w, None, a, b, 2.0) for w, a, b in zip(ws, Ai, Bi)])
        sum((y.float() * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        runs.append((ys, xi.grad, [a.grad for a in Ai], [b.grad for b in Bi]))
    (ys_g, dx_g, dA_g, dB_g), (ys_s, dx_s, dA_s, dB_s) = runs
    for a, b in zip(ys_g + dA_g + dB_g, ys_s + dA_s + dB_s):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert rel_err(dx_g, dx_s) < 1e-2  # the members' dX summed in another order


def test_model_cast_to_bf16_trains_within_peft_error(monkeypatch):
    """A patched tiny Llama cast to bf16 (its adapters too, as under FSDP2's bf16 policy) on the C++ operators,
    against PEFT's model cast the same way, both measured against an fp32 twin: logits and adapter gradients."""
    from peft import LoraConfig, get_peft_model

    set_settings(monkeypatch, backend="cpp")
    base = tiny_model("llama", seed=4)
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    loaded = ours.load_state_dict({k.replace("base_model.model.", ""): v for k, v in theirs.state_dict().items()},
                                  strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    twin = copy.deepcopy(theirs)  # fp32: the truth
    ids = random_ids(seed=6)
    out = {}
    for name, model in (("truth", twin), ("peft", theirs.to(torch.bfloat16)), ("ours", ours.to(torch.bfloat16))):
        model.train()
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (res.logits, grads)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert out["ours"][1].keys() == out["truth"][1].keys() and len(out["ours"][1]) == 2 * 7 * 2
    own = rel_err(out["peft"][0].float(), out["truth"][0])
    assert rel_err(out["ours"][0].float(), out["truth"][0]) <= max(2 * own, 1e-2), own
    for name, grad in out["ours"][1].items():
        assert grad.dtype == torch.bfloat16
        own = rel_err(out["peft"][1][name], out["truth"][1][name])
        assert rel_err(grad, out["truth"][1][name]) <= max(2 * own, 1e-2), (name, own)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(4096, 4096, 1024), (4096, 4096, 14336), (1, 4096, 4096), (16, 4096, 4096),
                                   (37, 4231, 1000), (100, 14336, 4096)])
def test_gpu_16bit_adapters_within_peft_error(dtype, M, K, N):
    _check(dtype, M, K, N, 16, False, "contig", device="cuda")
    _check(dtype, M, K, N, 16, True, "strided_k", device="cuda")


def test_compiles_with_16bit_adapters_and_matches_eager():
    """torch.compile allocates the operators' outputs from the Meta kernels: with 16-bit adapters S and the adapter
    gradients are 16-bit there too, and the compiled call gives eager's numbers."""
    import torch._dynamo as dynamo

    torch.manual_seed(2)
    dt = torch.bfloat16
    x = torch.randn(3, 5, 24, dtype=dt)
    w, b = torch.randn(20, 24, dtype=dt), torch.randn(20, dtype=dt)
    A = (torch.randn(4, 24) / 5).to(dt).requires_grad_()
    Bw = (torch.randn(20, 4) / 2).to(dt).requires_grad_()

    def f(x):
        return cpp_ops.lora_linear(x, w, b, A, Bw, 2.0)

    dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(x)
    out_c.float().sum().backward()
    grads_c = [A.grad.clone(), Bw.grad.clone()]
    A.grad = Bw.grad = None
    out_e = f(x)
    out_e.float().sum().backward()
    assert out_c.dtype == dt and torch.equal(out_c, out_e)
    for gc, t in zip(grads_c, (A, Bw)):
        assert gc.dtype == dt and torch.equal(gc, t.grad)
    dynamo.reset()

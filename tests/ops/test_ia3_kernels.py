"""fastpeft/ops/kernels/ia3.py: IA3 kernels vs the pure-PyTorch reference (CPU: Triton interpreter, fp32/fp16; GPU: bf16/fp16)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpeft.ops.kernels.ia3 import ia3_colreduce, ia3_linear
from fastpeft.ops.reference import ia3_linear_reference
from helpers import DEVICE, make_weight, make_x, rel_err

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _run_and_check(dtype, B, T, K, N, layout, w_t, has_bias, feedforward, l_flat, device=DEVICE, tol=None):
    x = make_x((B, T), K, dtype, layout, device).requires_grad_()
    w = make_weight(N, K, dtype, w_t, device)
    bias = (torch.randn(N, dtype=dtype, device=device) * 0.5).requires_grad_() if has_bias else None
    n = K if feedforward else N
    shape = (n,) if l_flat else ((1, n) if feedforward else (n, 1))
    l = (torch.rand(shape, device=device) + 0.5).requires_grad_()  # fp32 parameter, away from 1 so it matters

    y = ia3_linear(x, w, bias, l, feedforward)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    xr = x.detach().double().requires_grad_()
    lr = l.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if has_bias else None
    yr = ia3_linear_reference(xr, w.double(), br, lr, feedforward)
    yr.backward(g.double())
    tol = tol or TOL[dtype]
    assert rel_err(y, yr) < tol
    assert rel_err(x.grad, xr.grad) < tol
    assert l.grad.dtype == torch.float32 and l.grad.shape == l.shape
    assert rel_err(l.grad, lr.grad) < tol
    if has_bias:
        assert rel_err(bias.grad, br.grad) < tol


@settings(max_examples=50 if DEVICE == "cpu" else 16, deadline=None)  # GPU: each new shape compiles kernels
@given(
    dtype=st.sampled_from([torch.float32, torch.float16]),
    B=st.integers(1, 3), T=st.integers(1, 13),
    K=st.integers(3, 72), N=st.integers(3, 72),
    layout=st.sampled_from(["contig", "strided_k", "transposed_bt", "2d"]),
    w_t=st.booleans(), has_bias=st.booleans(), feedforward=st.booleans(), l_flat=st.booleans(),
)
def test_ia3_linear_matches_reference(dtype, B, T, K, N, layout, w_t, has_bias, feedforward, l_flat):
    _run_and_check(dtype, B, T, K, N, layout, w_t, has_bias, feedforward, l_flat)


def test_colreduce_directly():
    M, N = 83, 70
    a = torch.randn(M, N, device=DEVICE)
    b = torch.randn(M, N, device=DEVICE)
    l = torch.rand(N, device=DEVICE) + 0.5
    out = torch.empty_like(a)
    red, tot = ia3_colreduce(a, b, l, out=out, need_sum=True)
    torch.testing.assert_close(red, (a.double() * b.double()).sum(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tot, a.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, a * l)


def test_ia3_saves_no_extra_input_copy():
    """Feedforward IA3 saves x by reference (no x⊙l copy); output scaling saves X·Wᵀ+b (M×N), as PEFT."""
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    h = x * 1.0
    w = make_weight(16, 24, torch.float32, False)
    l_ff = torch.rand(1, 24, device=DEVICE, requires_grad=True)
    l_out = torch.rand(16, 1, device=DEVICE, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y1 = ia3_linear(h, w, None, l_ff, True)
    acts = [t for t in packed if t.untyped_storage().data_ptr() not in {w.untyped_storage().data_ptr(), l_ff.data_ptr()}]
    assert len(acts) == 1 and acts[0] is h
    packed.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y2 = ia3_linear(h, w, None, l_out, False)
    acts = [t for t in packed if t.untyped_storage().data_ptr() not in {w.untyped_storage().data_ptr(), l_out.data_ptr()}]
    assert len(acts) == 1 and tuple(acts[0].shape) == (14, 16)
    (y1.sum() + y2.sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,KN_ff", [(torch.bfloat16, c) for c in [((4096, 1024), False), ((4096, 4096), False),
                                                                    ((14336, 4096), True), ((4096, 14336), False)]]
                         + [(torch.float16, ((4096, 4096), True))])
def test_gpu_llama_shapes(dtype, KN_ff):
    (K, N), ff = KN_ff
    torch.manual_seed(K + N)
    _run_and_check(dtype, 2, 2048, K, N, "contig", False, False, ff, False, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_odd_shapes(dtype):
    for (B, T, K, N, layout, w_t, bias, ff) in [
        (1, 16, 4096, 1024, "contig", False, True, False),
        (3, 333, 1000, 777, "transposed_bt", True, True, True),
        (2, 129, 515, 2049, "strided_k", False, False, False),
    ]:
        _run_and_check(dtype, B, T, K, N, layout, w_t, bias, ff, True, device="cuda",
                       tol=TOL[dtype] if dtype != torch.float32 else 1e-4)

"""fastpeft/ops/kernels/lora.py: fused LoRA kernels vs the pure-PyTorch reference (CPU: Triton interpreter,
fp32/fp16; GPU: bf16/fp16)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpeft.ops.dropout import lora_dropout_mask
from fastpeft.ops.kernels.lora import (
    lora_da_dx,
    lora_ds_db,
    lora_expand,
    lora_fwd_rows,
    lora_linear,
    lora_s_partials,
)
from fastpeft.ops.reference import lora_linear_reference
from helpers import DEVICE, make_weight, make_x, rel_err

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _run_and_check(dtype, B, T, K, N, r, layout, w_t, has_bias, p, seed, scaling=1.7, device=DEVICE, tol=None):
    x = make_x((B, T), K, dtype, layout, device).requires_grad_()
    w = make_weight(N, K, dtype, w_t, device)
    bias = (torch.randn(N, dtype=dtype, device=device) * 0.5).requires_grad_() if has_bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).requires_grad_()  # fp32 adapter params
    Bw = (torch.randn(N, r, device=device) / r**0.5).requires_grad_()

    y = lora_linear(x, w, bias, A, Bw, scaling, p, seed)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    # reference in float64 with the very mask the kernels regenerate. The dropped-out input is what x.dtype
    # holds (as PEFT's dropout in the model dtype): D⊙x rounded to x.dtype. Folding that rounding into the
    # fp64 mask keeps the reference honest when S is a cancelling sum (r=1, small K), where the rounding
    # alone moves S by several % (a hypothesis-found case: fp16, K=32, r=1, p=0.1).
    mask = None
    if p > 0:
        mask = lora_dropout_mask(x.shape, p, seed, device, torch.float64)
        xd = x.detach().double()
        h = (x.detach() * lora_dropout_mask(x.shape, p, seed, device, dtype)).double()
        mask = torch.where(xd != 0, h / torch.where(xd != 0, xd, torch.ones_like(xd)), mask)
    xr = x.detach().double().requires_grad_()
    Ar = A.detach().double().requires_grad_()
    Br = Bw.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if has_bias else None
    yr = lora_linear_reference(xr, w.double(), br, Ar, Br, scaling, mask)
    yr.backward(g.double())

    tol = tol or TOL[dtype]
    assert rel_err(y, yr) < tol
    assert rel_err(x.grad, xr.grad) < tol
    assert A.grad.dtype == torch.float32 and Bw.grad.dtype == torch.float32
    assert rel_err(A.grad, Ar.grad) < tol
    assert rel_err(Bw.grad, Br.grad) < tol
    if has_bias:
        assert bias.grad.dtype == dtype and rel_err(bias.grad, br.grad) < tol


@settings(max_examples=60 if DEVICE == "cpu" else 20, deadline=None)  # GPU: each new shape compiles kernels
@given(
    dtype=st.sampled_from([torch.float32, torch.float16]),
    B=st.integers(1, 3), T=st.integers(1, 13),
    K=st.integers(3, 72), N=st.integers(3, 72), r=st.integers(1, 20),
    layout=st.sampled_from(["contig", "strided_k", "transposed_bt", "2d"]),
    w_t=st.booleans(), has_bias=st.booleans(),
    p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    seed=st.integers(0, 2**62),
)
def test_lora_linear_matches_reference(dtype, B, T, K, N, r, layout, w_t, has_bias, p, seed):
    _run_and_check(dtype, B, T, K, N, r, layout, w_t, has_bias, p, seed)


@pytest.mark.parametrize("K", [64, 67, 68])  # K % 8 == 0 takes the one-Philox-per-8-columns path; 67, 68 the per-element one
def test_kernel_mask_is_lora_dropout_mask(K):
    """S = (D⊙X)·Aᵀ with one-hot rows of A reads D⊙X back exactly: the in-kernel mask is lora_dropout_mask."""
    M, p, seed = 37, 0.3, 987654321123
    x = torch.randn(M, K, device=DEVICE) + 3.0  # nonzero everywhere, so a dropped element shows as 0
    cols = torch.randperm(K, device=DEVICE)[:16]
    A = torch.zeros(16, K, device=DEVICE)
    A[torch.arange(16), cols] = 1.0
    P = lora_s_partials(x, A, p, seed)
    S = P.sum(0)  # one nonzero term per element: the sum over K-splits is exact
    D = lora_dropout_mask((M, K), p, seed, DEVICE)
    torch.testing.assert_close(S, (D * x)[:, cols], rtol=0, atol=0)
    assert (S == 0).any() and (S != 0).any()


def test_dropout_mask_statistics_and_seeds():
    M, K, p = 300, 257, 0.2
    D = lora_dropout_mask((M, K), p, 1234, DEVICE)
    vals = torch.unique(D)
    assert torch.allclose(vals, torch.tensor([0.0, 1.0 / (1 - p)], device=DEVICE))
    n = M * K
    keep = (D != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep - (1 - p)) < 4 * sigma
    assert torch.equal(D, lora_dropout_mask((M, K), p, 1234, DEVICE))
    other = lora_dropout_mask((M, K), p, 1235, DEVICE)
    assert not torch.equal(D, other)
    # agreement of two independent masks ≈ p² + (1-p)², far from 1
    agree = ((D != 0) == (other != 0)).double().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02
    # 3-D shape: the flat row-major index over the [M, K] view
    D3 = lora_dropout_mask((3, 100, K), p, 1234, DEVICE)
    assert torch.equal(D3.reshape(300, K), D)


def test_dropout_changes_output_and_is_reproducible():
    x = torch.randn(2, 9, 40, device=DEVICE)
    w = make_weight(24, 40, torch.float32, False)
    A = torch.randn(8, 40, device=DEVICE)
    Bw = torch.randn(24, 8, device=DEVICE)
    y0 = lora_linear(x, w, None, A, Bw, 2.0, 0.0)
    y1 = lora_linear(x, w, None, A, Bw, 2.0, 0.5, 77)
    y1b = lora_linear(x, w, None, A, Bw, 2.0, 0.5, 77)
    y2 = lora_linear(x, w, None, A, Bw, 2.0, 0.5, 78)
    assert torch.equal(y1, y1b)
    assert not torch.allclose(y0, y1) and not torch.allclose(y1, y2)
    with pytest.raises(ValueError):
        lora_linear(x, w, None, A, Bw, 2.0, 0.5, None)


def _assert_fp32_product_close(got, a, b, scale=1.0):
    """got ≈ scale·(a @ b), computed in fp32 from fp32 operands: the float64 product, with the classical bound
    on an n-term fp32 dot product, |err| <= n·u·scale·(|a| @ |b|) (u = 2**-24), plus 1e-5 relative.

    A fixed absolute tolerance is wrong here: with unit-scale random operands an entry can cancel to ~0.5 out of
    n = 70 terms summing ~400 in magnitude, and fp32 accumulation in any order then legitimately moves it by
    ~2e-5. A kernel bug (a row or column missed, a wrong mask) moves it by a whole term, ~1, far above the bound."""
    a64, b64 = a.double(), b.double()
    ref = scale * a64.mm(b64)
    bound = a64.shape[1] * 2.0**-24 * abs(scale) * a64.abs().mm(b64.abs()) + 1e-5 * ref.abs()
    err = (got.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the fp32 summation bound (ratio {worst:.2f})"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_small_kernels_directly(p):
    """S partials + expand, dS/dB, dA/Z2 launchers against float64 torch (split and atomic paths)."""
    M, N, K, r, s, seed = 70, 90, 52, 6, 0.75, 31337
    x = torch.randn(M, K, device=DEVICE)
    A = torch.randn(r, K, device=DEVICE)
    Bw = torch.randn(N, r, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    D = lora_dropout_mask((M, K), p, seed, DEVICE, torch.float64) if p > 0 else torch.ones(M, K, dtype=torch.float64, device=DEVICE)
    xd = x.double() * D
    S_ref = s * xd.mm(A.double().t())
    P = lora_s_partials(x, A, p, seed)
    Z, S = lora_expand(P, Bw, bias, s, torch.float32)
    _assert_fp32_product_close(S, xd, A.t(), s)
    torch.testing.assert_close(Z.double(), S_ref.mm(Bw.double().t()) + bias.double(), rtol=1e-5, atol=1e-5)
    Z1, S1 = lora_fwd_rows(x, A, Bw, bias, s, p, seed)  # the one-launch forward: same numbers
    torch.testing.assert_close(S1, S, rtol=1e-5, atol=1e-5)  # other summation order over K
    torch.testing.assert_close(Z1, Z, rtol=1e-5, atol=1e-5)
    dy = torch.randn(M, N, device=DEVICE)
    dS, dB = lora_ds_db(dy, Bw, S, s)
    _assert_fp32_product_close(dS, dy, Bw, s)
    _assert_fp32_product_close(dB, dy.t(), S)
    dA, Z2 = lora_da_dx(x, dS, A, p, seed)
    _assert_fp32_product_close(dA, dS.t(), xd)
    torch.testing.assert_close(Z2.double(), dS.double().mm(A.double()) * D, rtol=1e-5, atol=1e-5)
    dA_only, none = lora_da_dx(x, dS, A, p, seed, need_dx=False)
    assert none is None
    torch.testing.assert_close(dA_only, dA, rtol=1e-5, atol=1e-5)  # atomics: summation order may differ
    none, Z2_only = lora_da_dx(x, dS, A, p, seed, need_dA=False)
    assert none is None and torch.equal(Z2_only, Z2)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_deterministic_mode_matches_kernels_and_repeats(p):
    """torch.use_deterministic_algorithms(True): the atomic-free backward gives the same grads, bitwise twice."""
    x = torch.randn(3, 17, 40, device=DEVICE, requires_grad=True)
    w = make_weight(24, 40, torch.float32, False)
    A = torch.randn(8, 40, device=DEVICE, requires_grad=True)
    Bw = torch.randn(24, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 17, 24, device=DEVICE)

    def grads():
        for t in (x, A, Bw):
            t.grad = None
        lora_linear(x, w, None, A, Bw, 1.5, p, 99).backward(g)
        return [t.grad.clone() for t in (x, A, Bw)]

    fast = grads()
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det1, det2 = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b, c in zip(fast, det1, det2):
        assert torch.equal(b, c)
        assert rel_err(b, a) < 1e-5


def test_saved_tensors_share_x_and_stay_small():
    """What the Function saves: x itself (one storage for q/k/v), S [M, r] per call, and the parameters."""
    B, T, K, r = 2, 11, 40, 4
    x = torch.randn(B, T, K, device=DEVICE, requires_grad=True)
    h = x * 1.0  # a non-leaf activation, like the output of a norm layer
    params = []
    layers = []
    for N in (40, 16, 16):  # q, k, v
        w = make_weight(N, K, torch.float32, False)
        A = torch.randn(r, K, device=DEVICE, requires_grad=True)
        Bw = torch.randn(N, r, device=DEVICE, requires_grad=True)
        layers.append((w, A, Bw))
        params += [w, A, Bw]
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [lora_linear(h, w, None, A, Bw, 2.0, 0.1, 5 + i) for i, (w, A, Bw) in enumerate(layers)]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    acts = [t for t in packed if t.untyped_storage().data_ptr() not in param_ptrs]
    big = [t for t in acts if t.numel() >= B * T * K]
    assert len(big) == 3 and all(t is h for t in big)  # x saved by reference, no copies
    assert len({t.untyped_storage().data_ptr() for t in big}) == 1
    small = [t for t in acts if t.numel() < B * T * K]
    assert len(small) == 3 and all(tuple(t.shape) == (B * T, r) for t in small)  # S per call
    total_act_bytes = h.untyped_storage().nbytes() + sum(t.untyped_storage().nbytes() for t in small)
    assert total_act_bytes <= (B * T * K + 3 * B * T * r) * 4
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_low_precision_adapters(adapter_dtype, p):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16) hands the layer 16-bit lora_A / lora_B (the fp32 masters
    stay sharded): the kernels upcast them on load, and the gradients come back in the adapters' dtype."""
    M, K, N, r = 37, 72, 53, 8
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = make_weight(N, K, torch.float16, False)
    A = (torch.randn(r, K, device=DEVICE) * 0.1).to(adapter_dtype).requires_grad_()
    Bw = (torch.randn(N, r, device=DEVICE) * 0.1).to(adapter_dtype).requires_grad_()
    y = lora_linear(x, w, None, A, Bw, 2.0, p, 11 if p else None)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().clone().requires_grad_()
    Ar = A.detach().float().requires_grad_()
    Br = Bw.detach().float().requires_grad_()
    mask = lora_dropout_mask(x.shape, p, 11, x.device, x.dtype) if p else None
    lora_linear_reference(xr, w, None, Ar, Br, 2.0, mask).backward(dy)
    assert A.grad.dtype == adapter_dtype and Bw.grad.dtype == adapter_dtype
    assert rel_err(x.grad, xr.grad) < 2e-3
    assert rel_err(A.grad, Ar.grad) < 1e-2 and rel_err(Bw.grad, Br.grad) < 1e-2


# ------------------------------------------------------------------------------------------ GPU
LLAMA8B = [  # (K, N) of q, k/v, o, gate/up, down
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096),
]


GPU_CASES = [(torch.bfloat16, kn) for kn in LLAMA8B] + [(torch.float16, (4096, 4096))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,KN", GPU_CASES)
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_llama_shapes(dtype, KN, p):
    K, N = KN
    torch.manual_seed(K + N)
    # M = 4096 as 2 x 2048; bf16/fp16 kernel vs float64 reference on the same rounded inputs
    _run_and_check(dtype, 2, 2048, K, N, 16, "contig", False, False, p, 1234567, scaling=2.0, device="cuda",
                   tol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_odd_shapes(dtype):
    for (B, T, K, N, r, layout, w_t, bias, p) in [
        (1, 16, 4096, 1024, 16, "contig", False, True, 0.05),
        (3, 333, 1000, 777, 8, "transposed_bt", True, True, 0.1),
        (2, 129, 515, 2049, 64, "strided_k", False, False, 0.0),
    ]:
        _run_and_check(dtype, B, T, K, N, r, layout, w_t, bias, p, 42, device="cuda",
                       tol=TOL[dtype] if dtype != torch.float32 else 1e-4)

"""fastpeft/ops/cpp_ops.py + csrc/adapter_ops.cpp: the C++ LoRA / IA3 operators against the pure-PyTorch
reference (CPU here: the build CI makes; the CUDA kernels run in the gpu-marked tests), the dropout mask, the
autograd wiring, schemas / fake kernels (opcheck) and torch.compile without graph breaks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpeft.nn import _rng
from fastpeft.ops import cpp_ops
from fastpeft.ops.dropout import lora_dropout_mask
from fastpeft.ops.reference import (dora_linear_reference, dora_weight_norm_reference, ia3_linear_reference,
                                    lora_linear_reference)
from helpers import DEVICE, make_weight, make_x, rel_err

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _masked_reference_inputs(x, p, seed, rank, dtype):
    """The reference's dropout mask for the op's (seed, rank), folded into a float64 mask that reproduces D⊙x as
    x.dtype holds it (see tests/ops/test_lora_kernels.py for why the rounding is folded in)."""
    if p == 0:
        return None
    folded = _rng.fold_rank(int(seed), rank)
    xd = x.detach().double()
    h = (x.detach() * lora_dropout_mask(x.shape, p, folded, x.device, dtype)).double()
    base = lora_dropout_mask(x.shape, p, folded, x.device, torch.float64)
    return torch.where(xd != 0, h / torch.where(xd != 0, xd, torch.ones_like(xd)), base)


def _layer_inputs(dtype, B, T, K, N, r, layout, w_t, has_bias, device):
    """(x, weight, bias | None, lora_A, lora_B) for one adapted layer; x, bias and the adapters require grad."""
    x = make_x((B, T), K, dtype, layout, device).requires_grad_()
    w = make_weight(N, K, dtype, w_t, device)
    bias = (torch.randn(N, dtype=dtype, device=device) * 0.5).requires_grad_() if has_bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).requires_grad_()
    Bw = (torch.randn(N, r, device=device) / r**0.5).requires_grad_()
    return x, w, bias, A, Bw


def _check_lora(dtype, B, T, K, N, r, layout, w_t, has_bias, p, draw, rank=0, scaling=1.7, device=DEVICE, tol=None):
    x, w, bias, A, Bw = _layer_inputs(dtype, B, T, K, N, r, layout, w_t, has_bias, device)
    seed = torch.tensor(draw, dtype=torch.int64) if p > 0 else None
    y = cpp_ops.lora_linear(x, w, bias, A, Bw, scaling, p, seed, rank)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    mask = _masked_reference_inputs(x, p, draw, rank, dtype)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, Bw))
    br = bias.detach().double().requires_grad_() if has_bias else None
    lora_linear_reference(xr, w.double(), br, Ar, Br, scaling, mask).backward(g.double())
    tol = tol or TOL[dtype]
    assert rel_err(y, lora_linear_reference(xr, w.double(), br, Ar, Br, scaling, mask)) < tol
    assert rel_err(x.grad, xr.grad) < tol
    assert A.grad.dtype == torch.float32 and rel_err(A.grad, Ar.grad) < tol
    assert Bw.grad.dtype == torch.float32 and rel_err(Bw.grad, Br.grad) < tol
    if has_bias:
        assert bias.grad.dtype == dtype and rel_err(bias.grad, br.grad) < tol


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    B=st.integers(1, 3), T=st.integers(1, 13), K=st.integers(3, 72), N=st.integers(3, 72), r=st.integers(1, 20),
    layout=st.sampled_from(["contig", "strided_k", "transposed_bt", "2d"]),
    w_t=st.booleans(), has_bias=st.booleans(), p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    draw=st.integers(0, 2**31 - 2), rank=st.sampled_from([0, 0, 3]),
)
def test_lora_linear_matches_reference(dtype, B, T, K, N, r, layout, w_t, has_bias, p, draw, rank):
    _check_lora(dtype, B, T, K, N, r, layout, w_t, has_bias, p, draw, rank)


@pytest.mark.parametrize("K", [64, 67])
def test_mask_is_lora_dropout_mask(K):
    """One-hot rows of A read D⊙X back through S = s·(D⊙X)·Aᵀ: the op's mask is ops/dropout.py's for the folded
    seed (the rank folded as nn/_rng.py folds it)."""
    M, p, draw, rank = 37, 0.3, 123456789, 2
    x = (torch.randn(M, K, device=DEVICE) + 3.0).requires_grad_()  # nonzero everywhere
    cols = torch.randperm(K)[:16]
    A = torch.zeros(16, K, device=DEVICE)
    A[torch.arange(16), cols] = 1.0
    A.requires_grad_()
    Bw = torch.eye(16, device=DEVICE).repeat(2, 1)  # y - x·Wᵀ = [S, S]
    w = torch.zeros(32, K, device=DEVICE)
    y = cpp_ops.lora_linear(x, w, None, A, Bw, 1.0, p, torch.tensor(draw), rank)
    D = lora_dropout_mask((M, K), p, _rng.fold_rank(draw, rank), DEVICE)
    torch.testing.assert_close(y[:, :16], (D * x.detach())[:, cols], rtol=0, atol=1e-6)
    assert (y[:, :16] == 0).any() and (y[:, :16] != 0).any()
    other = cpp_ops.lora_linear(x, w, None, A, Bw, 1.0, p, torch.tensor(draw), rank + 1)
    assert not torch.equal(other, y)  # another rank, another mask


def test_dropout_needs_a_seed():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="needs a seed"):
        cpp_ops.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0, 0.2, None)
    with pytest.raises(RuntimeError, match="lora_B"):
        cpp_ops.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0)


def test_saved_tensors_share_x():
    """The autograd node saves the caller's x itself (one storage for q/k/v), S [M, r] and the parameters."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    h = x * 1.0
    w, A, Bw = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = cpp_ops.lora_linear(h, w, None, A, Bw, 2.0, 0.1, torch.tensor(5))
    acts = [t for t in packed if t.numel() >= h.numel()]
    assert len(acts) == 1 and acts[0] is h
    assert any(tuple(t.shape) == (10, 4) and t.dtype == torch.float32 for t in packed)
    y.sum().backward()
    assert x.grad is not None


def test_frozen_weights_and_derived_vectors_skip_the_saved_tensor_hooks():
    """A frozen base weight (and DoRA's g, 1/n; a 4-bit base's bytes and state) rides in the node's saved_data, not
    through save_for_backward: under non-reentrant checkpointing each saved tensor costs a Python pack / unpack hook
    per layer call. What must still be saved is: x, S (and DoRA's Z0) and the adapters; a base weight that requires
    grad stays saved, and its gradient is dYᵀ·X."""
    from fastpeft.ops.nf4_format import kernel_state  # noqa: PLC0415
    from fastpeft.ops.nf4_quantize import quantize_nf4  # noqa: PLC0415

    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    w, A, Bw = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    m = torch.rand(8, requires_grad=True) + 1.0
    packed, qs = quantize_nf4(torch.randn(8, 16), blocksize=64, compress_statistics=True)
    ks = kernel_state(qs, "cpu")
    calls = {
        "lora": lambda: cpp_ops.lora_linear(x, w, None, A, Bw, 2.0),
        "dora": lambda: cpp_ops.dora_linear(x, w, None, A, Bw, m, 2.0),
        "ia3": lambda: cpp_ops.ia3_linear(x, w, None, torch.rand(1, 16, requires_grad=True), True),
        "nf4_lora": lambda: cpp_ops.nf4_lora_linear(x, packed, ks, None, A, Bw, 2.0),
        "nf4_dora": lambda: cpp_ops.nf4_dora_linear(x, packed, ks, None, A, Bw, m, 2.0),
    }
    want = {"lora": 4, "dora": 5, "ia3": 2, "nf4_lora": 4, "nf4_dora": 5}  # x, S, (Z0), A, B; ia3: x, l
    for name, call in calls.items():
        packed_tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed_tensors.append(t) or t, lambda t: t):
            y = call()
        assert len(packed_tensors) == want[name], (name, [tuple(t.shape) for t in packed_tensors])
        assert not any(t is w or t is packed or t is ks.absmax for t in packed_tensors), name
        x.grad = A.grad = Bw.grad = None
        y.backward(torch.ones_like(y))
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
    trainable = w.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cpp_ops.lora_linear(x, trainable, None, A, Bw, 2.0)
    assert any(t is trainable for t in saved)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(trainable.grad, g.t() @ x.detach(), rtol=1e-5, atol=1e-5)


def test_calls_without_gradients_record_no_autograd_node_and_give_the_same_numbers():
    """lora_linear / ia3_linear / dora_linear skip their autograd node when nothing needs a gradient (no_grad, or
    no input requiring one): the same output, no grad_fn, and a result that later in-place ops on grad-requiring
    tensors still differentiate through. With a gradient needed, the node is there."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 16, generator=gen)
    weight, bias = torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    A, B = torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen)
    l, m = torch.rand(8, generator=gen) + 0.5, torch.rand(8, generator=gen) + 0.5
    calls = {
        "lora": lambda a, b, ll, mm: cpp_ops.lora_linear(x, weight, bias, a, b, 2.0),
        "ia3": lambda a, b, ll, mm: cpp_ops.ia3_linear(x, weight, bias, ll, False),
        "dora": lambda a, b, ll, mm: cpp_ops.dora_linear(x, weight, bias, a, b, mm, 2.0),
    }
    for name, call in calls.items():
        trainable = [t.clone().requires_grad_() for t in (A, B, l, m)]
        with_node = call(*trainable)
        assert with_node.grad_fn is not None, name
        with torch.no_grad():
            plain = call(*trainable)
        frozen = call(A, B, l, m)  # grad mode on, nothing requires a gradient
        for y in (plain, frozen):
            assert y.grad_fn is None and not y.requires_grad and y.shape == (2, 3, 8), name
            assert torch.equal(y, with_node.detach()), name
        scale = torch.ones(8, requires_grad=True)
        frozen.mul_(scale)  # an in-place op on the (view) output with a grad-requiring operand
        frozen.sum().backward()
        assert torch.allclose(scale.grad, with_node.detach().sum((0, 1))), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_ia3_linear_matches_reference(dtype, feedforward, has_bias):
    torch.manual_seed(0)
    K, N = 37, 29
    x = make_x((2, 7), K, dtype, "strided_k").requires_grad_()
    w = make_weight(N, K, dtype, False)
    bias = (torch.randn(N, dtype=dtype) * 0.5).requires_grad_() if has_bias else None
    l = (torch.rand((1, K) if feedforward else (N, 1)) + 0.5).requires_grad_()
    y = cpp_ops.ia3_linear(x, w, bias, l, feedforward)
    g = torch.randn_like(y)
    y.backward(g)
    xr, lr = x.detach().double().requires_grad_(), l.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if has_bias else None
    yr = ia3_linear_reference(xr, w.double(), br, lr, feedforward)
    yr.backward(g.double())
    tol = TOL[dtype]
    assert rel_err(y, yr) < tol and rel_err(x.grad, xr.grad) < tol
    assert l.grad.dtype == torch.float32 and l.grad.shape == l.shape and rel_err(l.grad, lr.grad) < tol
    if has_bias:
        assert rel_err(bias.grad, br.grad) < tol


def _check_dora(dtype, B, T, K, N, r, layout, w_t, has_bias, give_sq, give_norm, scaling=1.7, device=DEVICE,
                tol=None, grad_layout="contig"):
    """dora_linear against the float64 oracle: output and the gradients of x, bias, lora_A, lora_B, magnitude."""
    x, w, bias, A, Bw = _layer_inputs(dtype, B, T, K, N, r, layout, w_t, has_bias, device)
    norm = dora_weight_norm_reference(w, A.detach(), Bw.detach(), scaling)
    m = (norm * (1 + 0.2 * torch.randn(N, device=device))).requires_grad_()  # trained away from the norm
    wsq = w.double().square().sum(1).float() if give_sq else None
    y = cpp_ops.dora_linear(x, w, bias, A, Bw, m, scaling, wsq, norm if give_norm else None)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    if grad_layout == "strided":  # every other element of a wider tensor
        g = torch.randn(*y.shape[:-1], 2 * N, device=device, dtype=dtype)[..., ::2]
    elif grad_layout == "offset":  # unit stride, rows starting one element off any vector alignment
        g = torch.randn(*y.shape[:-1], N + 1, device=device, dtype=dtype)[..., 1:]
    else:
        g = torch.randn_like(y)
    y.backward(g)
    xr, Ar, Br, mr = (t.detach().double().requires_grad_() for t in (x, A, Bw, m))
    br = bias.detach().double().requires_grad_() if has_bias else None
    want = dora_linear_reference(xr, w.double(), br, Ar, Br, mr, scaling)
    want.backward(g.double())
    tol = tol or TOL[dtype]
    assert rel_err(y, want) < tol
    assert rel_err(x.grad, xr.grad) < tol
    for got, ref in ((A.grad, Ar.grad), (Bw.grad, Br.grad), (m.grad, mr.grad)):
        assert got.dtype == torch.float32 and rel_err(got, ref) < tol
    if has_bias:
        assert bias.grad.dtype == dtype and rel_err(bias.grad, br.grad) < tol


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    B=st.integers(1, 3), T=st.integers(1, 13), K=st.integers(3, 72), N=st.integers(3, 72), r=st.integers(1, 20),
    layout=st.sampled_from(["contig", "strided_k", "transposed_bt", "2d"]),
    w_t=st.booleans(), has_bias=st.booleans(), give_sq=st.booleans(), give_norm=st.sampled_from([False, False, True]),
)
def test_dora_linear_matches_reference(dtype, B, T, K, N, r, layout, w_t, has_bias, give_sq, give_norm):
    _check_dora(dtype, B, T, K, N, r, layout, w_t, has_bias, give_sq, give_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [3, 40])
def test_dora_inference_with_a_given_norm_matches_the_autograd_call(dtype, T):
    """With a given norm and no autograd recorded, dora_linear runs dora_infer (nothing kept for a backward): the
    same output as the call that records autograd, within the dtype's bar against the float64 oracle. CPU: the same
    computation bit for bit; CUDA: see test_gpu_dora_inference_with_a_given_norm."""
    torch.manual_seed(T)
    x, w, bias, A, Bw = _layer_inputs(dtype, 2, T, 37, 29, 5, "strided_k", False, True, DEVICE)
    norm = dora_weight_norm_reference(w, A.detach(), Bw.detach(), 1.3)
    m = norm * (1 + 0.2 * torch.randn_like(norm))
    y = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.3, None, norm)
    assert y.requires_grad
    with torch.no_grad():
        y_infer = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.3, None, norm)
    assert not y_infer.requires_grad and y_infer.shape == y.shape and y_infer.dtype == dtype
    want = dora_linear_reference(x.detach().double(), w.double(), bias.detach().double(), A.detach().double(),
                                 Bw.detach().double(), m.double(), 1.3)
    assert rel_err(y_infer, want) < TOL[dtype]
    if DEVICE == "cpu":
        assert torch.equal(y.detach(), y_infer)


def test_dora_linear_refuses_a_trainable_base_weight_and_bad_shapes():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    A, Bw, m = torch.randn(2, 8), torch.randn(6, 2), torch.ones(6)
    with pytest.raises(RuntimeError, match="base weight must be frozen"):
        cpp_ops.dora_linear(x, w, None, A, Bw, m, 1.0).sum().backward()
    with pytest.raises(RuntimeError, match="magnitude must have out_features"):
        cpp_ops.dora_linear(x, w.detach(), None, A, Bw, torch.ones(5), 1.0)
    with pytest.raises(RuntimeError, match="weight_sq_norm must have out_features"):
        cpp_ops.dora_linear(x, w.detach(), None, A, Bw, m, 1.0, torch.ones(3))


def test_ops_pass_opcheck():
    """Schemas, fake (Meta) kernels, the autograd registration and AOT dispatch (what torch.compile relies on)."""
    torch.manual_seed(0)
    x = torch.randn(6, 24, requires_grad=True)
    w, b = torch.randn(20, 24), torch.randn(20, requires_grad=True)
    a, bb = torch.randn(4, 24, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    ops = torch.ops.fastpeft_ops
    torch.library.opcheck(ops.lora_linear, (x, w, b, a, bb, 2.0, 0.25, torch.tensor(11), 1))
    torch.library.opcheck(ops.lora_linear, (x, w, None, a, bb, 2.0, 0.0, None, 0))
    S = torch.randn(6, 4)
    torch.library.opcheck(ops.lora_fwd, (x.detach(), w, b.detach(), a.detach(), bb.detach(), 2.0, 0.25,
                                         torch.tensor(11), 0))
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(ops.lora_bwd, (torch.randn(6, 20), x.detach(), S, w, a.detach(), bb.detach(), 2.0, 0.25,
                                             torch.tensor(11), 0) + need)
    for ff, vec in ((False, torch.randn(20, 1, requires_grad=True)), (True, torch.randn(1, 24, requires_grad=True))):
        torch.library.opcheck(ops.ia3_linear, (x, w, b, vec, ff))
    m = torch.rand(20, requires_grad=True)
    wsq, norm = w.square().sum(1), torch.rand(20) + 1
    torch.library.opcheck(ops.dora_linear, (x, w, b, a, bb, m, 2.0, wsq, None))
    torch.library.opcheck(ops.dora_linear, (x, w, None, a, bb, m, 2.0, None, norm))
    torch.library.opcheck(ops.dora_fwd, (x.detach(), w, b.detach(), a.detach(), bb.detach(), m.detach(), 2.0, None, None))
    torch.library.opcheck(ops.dora_infer, (x.detach(), w, b.detach(), a.detach(), bb.detach(), m.detach(), 2.0, norm))
    torch.library.opcheck(ops.dora_infer, (x.detach(), w, None, a.detach(), bb.detach(), m.detach(), 2.0, norm))
    Z, g, inv_n = torch.randn(6, 20), torch.rand(20), torch.rand(20)
    for need in ((True, True, True, True), (False, True, False, True), (True, False, True, False)):
        torch.library.opcheck(ops.dora_bwd, (torch.randn(6, 20), x.detach(), S, Z, g, inv_n, w, a.detach(), bb.detach(),
                                             2.0) + need)


def test_compiles_without_graph_breaks_and_matches_eager():
    import torch._dynamo as dynamo

    torch.manual_seed(1)
    x = torch.randn(3, 5, 24)
    w, b = torch.randn(20, 24), torch.randn(20)
    A = torch.randn(4, 24, requires_grad=True)
    Bw = torch.randn(20, 4, requires_grad=True)
    l = torch.rand(1, 20, requires_grad=True)

    def f(x, seed):
        h = cpp_ops.lora_linear(x, w, b, A, Bw, 2.0, 0.2, seed)
        return cpp_ops.ia3_linear(torch.relu(h), torch.randn(0, 0).new_ones(20, 20), None, l.t(), False)

    dynamo.reset()
    explained = dynamo.explain(f)(x, torch.tensor(9))
    assert explained.graph_break_count == 0
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(x, torch.tensor(9))
    out_c.sum().backward()
    grads_c = [A.grad.clone(), Bw.grad.clone(), l.grad.clone()]
    for t in (A, Bw, l):
        t.grad = None
    out_e = f(x, torch.tensor(9))
    out_e.sum().backward()
    assert rel_err(out_c, out_e) < 1e-6
    for gc, t in zip(grads_c, (A, Bw, l)):
        assert rel_err(gc, t.grad) < 1e-6
    assert compiled(x, torch.tensor(10)).shape == out_e.shape  # a new draw: no recompile needed (a tensor arg)
    dynamo.reset()


@pytest.mark.parametrize("hook,modes,bad", [
    ("set_lora_cuda_path", (-1, 0, 1, 2), (3, -2)),
    ("set_decode_fork", (-1, 0, 1), (2, -2)),
    ("set_decode_pdl", (-1, 0), (1, -2)),
    ("set_decode_gemv", (-1, 0), (1, -2)),
    ("set_dora_pass_form", (-1, 0, 1, 16, 4096), (4097, -2)),
    ("set_dora_norm_form", (-1, 0, 32, 512, 2048), (16, 33, 2080, -2)),
    ("set_lora_sum_order", (-1, 0, 1), (2, -2)),
])
def test_testing_hooks_take_their_modes_and_refuse_others(hook, modes, bad):
    """The CUDA compositions' testing hooks (fastpeft_ops::set_*): each allowed mode is stored and the previous one
    returned; anything else raises and leaves the mode as it was."""
    set_mode = getattr(torch.ops.fastpeft_ops, hook)
    before = set_mode(-1)
    try:
        previous = -1
        for mode in modes:
            assert set_mode(mode) == previous
            previous = mode
        for value in bad:
            with pytest.raises(RuntimeError, match="mode must be"):
                set_mode(value)
        assert set_mode(-1) == previous
    finally:
        set_mode(before)


# ------------------------------------------------------------------------------------------ GPU
LLAMA8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


@pytest.fixture(params=[1, 0], ids=["fused", "split-gemm"])
def cuda_path(request):
    """Both CUDA compositions of the LoRA op (csrc/adapter_cuda.cu): the fused kernels and the split-GEMM one."""
    before = torch.ops.fastpeft_ops.set_lora_cuda_path(request.param)
    yield request.param
    torch.ops.fastpeft_ops.set_lora_cuda_path(before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,KN", [(torch.bfloat16, kn) for kn in LLAMA8B] + [(torch.float16, (4096, 4096))])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_llama_shapes(dtype, KN, p, cuda_path, lora_sum_order):
    K, N = KN
    torch.manual_seed(K + N)
    _check_lora(dtype, 2, 2048, K, N, 16, "contig", False, False, p, 1234567, scaling=2.0, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_odd_shapes(dtype, cuda_path, lora_sum_order):
    for (B, T, K, N, r, layout, w_t, bias, p) in [
        (1, 16, 4096, 1024, 16, "contig", False, True, 0.05),
        (3, 333, 1000, 777, 8, "transposed_bt", True, True, 0.1),
        (2, 129, 515, 2049, 64, "strided_k", False, False, 0.0),
        (2, 129, 515, 2049, 33, "strided_k", False, True, 0.3),
        (1, 1, 37, 4231, 3, "2d", False, True, 0.0),
        (1, 5, 1031, 96, 100, "contig", False, False, 0.1),  # rank > 64: the split-GEMM path either way
    ]:
        _check_lora(dtype, B, T, K, N, r, layout, w_t, bias, p, 42, rank=1, device="cuda",
                    tol=TOL[dtype] if dtype != torch.float32 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "lora_dropout", "dora"])
@pytest.mark.parametrize("wanted", ["x", "A", "B", "xA", "xB", "AB", "xAB", "bias"])
def test_gpu_split_backward_gives_each_subset_of_gradients(method, wanted, lora_sum_order):
    """The split-GEMM backward packs only the splits the wanted gradients read, in one launch, and sums dB's and
    dA's halves in one more (csrc/adapter_cuda.cu: lora_bwd_split): every subset of x / lora_A / lora_B (a frozen
    A, an input without grad) gets exactly its gradients, each equal to the oracle's. bf16, training size."""
    torch.manual_seed(11)
    dtype, K, N, r, s = torch.bfloat16, 1000, 777, 16, 2.0
    x = torch.randn(3, 100, K, device="cuda", dtype=dtype).requires_grad_("x" in wanted)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    bias = (torch.randn(N, device="cuda", dtype=dtype) * 0.5).requires_grad_(wanted == "bias")
    A = (torch.randn(r, K, device="cuda") / K**0.5).requires_grad_("A" in wanted)
    Bw = (torch.randn(N, r, device="cuda") / r**0.5).requires_grad_("B" in wanted)
    p = 0.1 if method == "lora_dropout" else 0.0
    if method == "dora":
        norm = dora_weight_norm_reference(w, A.detach(), Bw.detach(), s)
        m = norm * (1 + 0.2 * torch.randn(N, device="cuda"))
        y = cpp_ops.dora_linear(x, w, bias, A, Bw, m, s, None, None)
    else:
        y = cpp_ops.lora_linear(x, w, bias, A, Bw, s, p, torch.tensor(77) if p else None, 0)
    g = torch.randn_like(y)
    y.backward(g)
    xr, br, Ar, Br = (t.detach().double().requires_grad_() for t in (x, bias, A, Bw))
    mask = _masked_reference_inputs(x, p, 77, 0, dtype)
    if method == "dora":
        want = dora_linear_reference(xr, w.double(), br, Ar, Br, m.double(), s)
    else:
        want = lora_linear_reference(xr, w.double(), br, Ar, Br, s, mask)
    want.backward(g.double())
    assert rel_err(y, want) < TOL[dtype]
    for name, got, ref in (("x", x.grad, xr.grad), ("A", A.grad, Ar.grad), ("B", Bw.grad, Br.grad),
                           ("bias", bias.grad, br.grad)):
        if name in wanted:
            assert got is not None and rel_err(got, ref) < TOL[dtype], name
        else:
            assert got is None, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_paths_agree_and_fused_is_deterministic_forward(dtype):
    """The two CUDA compositions give the same numbers (within the split's 16-bit rounding); the fused forward is
    deterministic (ordered partial sums), its backward within fp32-atomics noise."""
    torch.manual_seed(3)
    x = torch.randn(3, 100, 1000, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(700, 1000, device="cuda", dtype=dtype) / 30
    A = (torch.randn(16, 1000, device="cuda") / 30).requires_grad_()
    Bw = (torch.randn(700, 16, device="cuda") / 4).requires_grad_()
    outs = {}
    ops = torch.ops.fastpeft_ops
    for mode in (1, 1, 0):
        before = ops.set_lora_cuda_path(mode)
        try:
            for t in (x, A, Bw):
                t.grad = None
            y = cpp_ops.lora_linear(x, w, None, A, Bw, 2.0, 0.1, torch.tensor(5))
            y.float().square().sum().backward()
            outs.setdefault(mode, []).append([t.detach().clone() for t in (y, x.grad, A.grad, Bw.grad)])
        finally:
            ops.set_lora_cuda_path(before)
    fused_a, fused_b = outs[1]
    assert torch.equal(fused_a[0], fused_b[0])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b, c in zip(fused_a, fused_b, outs[0][0]):
        assert rel_err(a, b) < 1e-6
        assert rel_err(a, c) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decode_path_matches_reference(dtype):
    """The decode forward (no dropout, few rows: csrc decode_shrink / decode_expand around the base GEMV) over its
    edges: row tiles of 1, 2, 4 and 8 rows and partial ones, K not a multiple of 4 or of the 128-column step, ranks
    1-64 and ranks not a multiple of 4 (scalar B loads), strided X, a transposed weight, bias; the backward (the
    fused kernels) runs from the S it saved. Forced (mode 2) up to 32 rows, beyond what auto gives it."""
    ops = torch.ops.fastpeft_ops
    before = ops.set_lora_cuda_path(2)
    try:
        for (B, T, K, N, r, layout, w_t, bias) in [
            (1, 1, 4096, 4096, 16, "contig", False, False),
            (8, 1, 4096, 14336, 16, "contig", False, True),
            (1, 3, 14336, 4096, 64, "strided_k", False, False),
            (1, 32, 4096, 1024, 33, "transposed_bt", True, True),
            (5, 1, 37, 4231, 3, "2d", False, True),
            (1, 13, 1000, 777, 8, "contig", True, False),
            (2, 1, 515, 96, 1, "strided_k", False, True),
            (3, 9, 130, 70, 32, "contig", False, True),
        ]:
            torch.manual_seed(B * T + K + r)
            _check_lora(dtype, B, T, K, N, r, layout, w_t, bias, 0.0, 0, device="cuda",
                        tol=TOL[dtype] if dtype != torch.float32 else 1e-4)
    finally:
        ops.set_lora_cuda_path(before)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 16, 17, 32])
def test_gpu_auto_takes_the_decode_path_up_to_16_rows(M):
    """Under auto a dropout-free forward of <= 16 rows is the decode path's, bit for bit (and deterministic); from
    17 rows on the fused kernels' (the decode path forced up to 32 rows stays deterministic)."""
    torch.manual_seed(M)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) / 64
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 4096, device="cuda") / 64
    Bw = torch.randn(1024, 16, device="cuda")
    ops = torch.ops.fastpeft_ops
    outs = {}
    for mode in (-1, 2, 1):
        before = ops.set_lora_cuda_path(mode)
        try:
            outs[mode] = [cpp_ops.lora_linear(x, w, b, A, Bw, 2.0) for _ in range(2)]
        finally:
            ops.set_lora_cuda_path(before)
    assert torch.equal(outs[2][0], outs[2][1])
    assert torch.equal(outs[-1][0], outs[2 if M <= 16 else 1][0])
    if M <= 32:  # PEFT's rounding: the base output rounded to bf16, the LoRA term added in fp32, rounded once more
        lora = (x.float() @ A.t()) @ Bw.t() * 2.0
        peft_like = (torch.nn.functional.linear(x, w, b).float() + lora).to(torch.bfloat16)
        mismatch = (outs[2][0] != peft_like).float().mean().item()
        assert mismatch < 0.01, mismatch  # only the fp32 sums' order differs: the odd last-bit tie


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_gemv_matches_the_reference_and_cublas_composition(dtype):
    """The decode forward's own GEMV (decode_gemv: the base product on mma.sync with the expand in its epilogue)
    over its edges: 1-16 rows (one m16 tile, rows past M padded), N not a multiple of the 16-column block, K a
    multiple of 8 but not of the 128-weight segment nor of 32 (16-byte pieces past K), ranks 1..64 and ranks not
    a multiple of 4 (4-byte B copies), bias or not, row-strided x, 1-8 rows (9-16 keep cuBLAS + expand), blocks
    walking several 16-column tiles (N = 14336 and 40000: more tiles than resident blocks), odd and even segment
    counts per warp (the register buffers' parity across tiles). Against the float64
    oracle within the dtype's bar, and against the cuBLAS composition (set_decode_gemv(0)) where only the fp32
    sums' order differs: a few last-bit flips of the rounded base output at most. DoRA with a given norm too."""
    ops = torch.ops.fastpeft_ops
    before, before_path = ops.set_decode_gemv(-1), ops.set_lora_cuda_path(-1)
    try:
        for M, K, N, r, bias, row_pad in [(1, 4096, 4096, 16, False, 0), (8, 4096, 1024, 16, True, 0),
                                          (16, 14336, 4096, 64, True, 0), (3, 1000, 777, 3, True, 8),
                                          (5, 520, 4231, 33, False, 24), (2, 8, 17, 1, True, 0),
                                          (11, 136, 16, 7, False, 0), (1, 4096, 14336, 16, True, 0),
                                          (7, 1152, 14336, 12, False, 0), (4, 3200, 40000, 5, True, 0)]:
            torch.manual_seed(M * K + N + r)
            xs = torch.randn(M, K + row_pad, device="cuda", dtype=dtype)
            x = xs[:, :K]  # row stride K + row_pad (a multiple of 8: still the GEMV's)
            w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
            b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
            A = torch.randn(r, K, device="cuda") / K**0.5
            Bw = torch.randn(N, r, device="cuda") / r**0.5
            with torch.no_grad():
                y = cpp_ops.lora_linear(x, w, b, A, Bw, 1.7)
                truth = lora_linear_reference(x.double(), w.double(), None if b is None else b.double(),
                                              A.double(), Bw.double(), 1.7)
                assert rel_err(y, truth) < TOL[dtype], (M, K, N, r)
                ops.set_decode_gemv(0)
                y_cublas = cpp_ops.lora_linear(x, w, b, A, Bw, 1.7)
                ops.set_decode_gemv(-1)
                # no less accurate than the cuBLAS composition (in fp16 cuBLAS may reduce split-K sums in fp16:
                # torch's allow_fp16_reduced_precision_reduction; 17 % of outputs differed there by a last bit)
                assert rel_err(y, truth) <= 1.1 * rel_err(y_cublas, truth) + 1e-6, (M, K, N, r)
                if dtype == torch.bfloat16:  # bf16's ulp is 8x fp16's: only the sums' order flips the odd bit
                    flips = (y != y_cublas).float().mean().item()
                    assert flips < 0.02, (M, K, N, r, flips)
                assert torch.equal(y, cpp_ops.lora_linear(x, w, b, A, Bw, 1.7))  # deterministic
                norm = dora_weight_norm_reference(w, A, Bw, 1.7)
                mag = norm * (1.0 + 0.1 * torch.rand_like(norm))
                yd = cpp_ops.dora_linear(x, w, b, A, Bw, mag, 1.7, None, norm)
                truth_d = dora_linear_reference(x.double(), w.double(), None if b is None else b.double(),
                                                A.double(), Bw.double(), mag.double(), 1.7)
                assert rel_err(yd, truth_d) < TOL[dtype], (M, K, N, r)
    finally:
        ops.set_decode_gemv(before)
        ops.set_lora_cuda_path(before_path)


@pytest.mark.gpu
def test_gpu_decode_capture_keeps_cublas_for_weights_wider_than_the_resident_blocks():
    """Inside a CUDA-graph capture decode_gemv takes only weights whose 16-column tiles fit its resident blocks; a
    wider one (N = 40000: 2,500 tiles) keeps cuBLAS + expand there while eager calls take decode_gemv. The replay
    then equals the eager call of set_decode_gemv(0) bit for bit, and the default eager call within the last-bit
    flips of the base product's fp32 sum order; a narrow weight (N = 4096) is the same kernel both ways."""
    ops = torch.ops.fastpeft_ops
    torch.manual_seed(3)
    for N, same_kernel in ((40000, False), (4096, True)):
        x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, 4096, device="cuda", dtype=torch.bfloat16) / 64
        A = torch.randn(16, 4096, device="cuda") / 64
        Bw = torch.randn(N, 16, device="cuda")
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
            graph.replay()
            torch.cuda.synchronize()
            eager = cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
            before = ops.set_decode_gemv(0)
            try:
                eager_cublas = cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
            finally:
                ops.set_decode_gemv(before)
        assert torch.equal(y, eager if same_kernel else eager_cublas), N
        assert (y != eager).float().mean().item() < 0.02
        assert rel_err(y, eager) < TOL[torch.bfloat16] / 4


@pytest.mark.gpu
@pytest.mark.parametrize("gemv", [-1, 0], ids=["decode-gemv", "cublas-expand"])
@pytest.mark.parametrize("fork", [-1, 0], ids=["fork-in-capture", "no-fork"])
def test_gpu_decode_path_replays_in_a_cuda_graph(fork, gemv):
    """The decode forward captured in a CUDA graph (compiled static-cache decode) replays with new inputs and new
    adapter values and matches eager calls: nothing of the first call is baked in. Both compositions: decode_gemv
    (the shrink, then the GEMV with the expand, set_decode_gemv -1) and cuBLAS + expand (0), whose capture under
    auto forks the shrink onto a side stream beside the base GEMV; the result is the same bits (eager calls do not
    fork)."""
    torch.manual_seed(11)
    x = torch.randn(4, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3000, 1000, device="cuda", dtype=torch.bfloat16) / 32
    A = torch.randn(16, 1000, device="cuda") / 32
    Bw = torch.randn(3000, 16, device="cuda")
    ops = torch.ops.fastpeft_ops
    before = ops.set_lora_cuda_path(2)
    before_fork, before_gemv = ops.set_decode_fork(fork), ops.set_decode_gemv(gemv)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = cpp_ops.lora_linear(x, w, None, A, Bw, 2.0)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            A.add_(torch.randn_like(A) / 32)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, cpp_ops.lora_linear(x, w, None, A, Bw, 2.0))
    finally:
        ops.set_lora_cuda_path(before)
        ops.set_decode_fork(before_fork)
        ops.set_decode_gemv(before_gemv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_fork_and_pdl_change_no_bit(dtype):
    """The shrink on a side stream (forced on in eager calls here: fork mode 1) and the expand launched as a
    programmatic dependent of the GEMV (pdl -1, sm_90+) give the bits of the one-stream, plainly launched decode
    forward, for LoRA and for DoRA with a given norm, with back-to-back calls that reuse the caching allocator's
    blocks (a missing join would let the next call's shrink overwrite partials the expand still reads; an expand
    reading Y before its wait would see the GEMV's output unfinished). The first two cases (<= 8 rows, aligned)
    take decode_gemv, where pdl makes the GEMV a programmatic dependent of the shrink (a GEMV epilogue reading the
    partials before its wait would see them unfinished); the other two cuBLAS + expand."""
    ops = torch.ops.fastpeft_ops
    torch.manual_seed(5)
    cases = [(1, 4096, 4096, 16), (8, 4096, 1024, 16), (16, 14336, 4096, 64), (3, 515, 2049, 7)]
    layers = []
    for M, K, N, r in cases:
        layers.append((torch.randn(M, K, device="cuda", dtype=dtype),
                       torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5,
                       torch.randn(N, device="cuda", dtype=dtype),
                       torch.randn(r, K, device="cuda") / K**0.5, torch.randn(N, r, device="cuda"),
                       torch.rand(N, device="cuda") + 0.5))
    outs = {}
    before, before_pdl = ops.set_decode_fork(0), ops.set_decode_pdl(0)
    try:
        for fork, pdl in ((0, 0), (1, 0), (0, -1), (1, -1)):
            ops.set_decode_fork(fork)
            ops.set_decode_pdl(pdl)
            with torch.no_grad():
                outs[fork, pdl] = [[cpp_ops.lora_linear(x, w, b, A, Bw, 2.0) for x, w, b, A, Bw, _ in layers * 3],
                                   [cpp_ops.dora_linear(x, w, b, A, Bw, m, 2.0, None, m * 0.9)
                                    for x, w, b, A, Bw, m in layers]]
            torch.cuda.synchronize()
    finally:
        ops.set_decode_fork(before)
        ops.set_decode_pdl(before_pdl)
    for key in ((1, 0), (0, -1), (1, -1)):
        for kind in range(2):
            for a, b in zip(outs[0, 0][kind], outs[key][kind]):
                assert torch.equal(a, b), key


@pytest.mark.gpu
def test_gpu_matches_cpu_build_bitwise_mask():
    """The CUDA dropout kernel regenerates exactly the CPU / reference mask (same Philox words)."""
    M, K, p = 33, 72, 0.4
    x = torch.randn(M, K) + 3.0
    A = torch.eye(K)[:16].contiguous()
    Bw = torch.eye(16)
    w = torch.zeros(16, K)
    cpu = cpp_ops.lora_linear(x, w, None, A, Bw, 1.0, p, torch.tensor(77), 1)
    gpu = cpp_ops.lora_linear(x.cuda(), w.cuda(), None, A.cuda(), Bw.cuda(), 1.0, p, torch.tensor(77), 1)
    assert torch.equal((cpu == 0), (gpu.cpu() == 0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,KN", [(torch.bfloat16, kn) for kn in LLAMA8B] + [(torch.float16, (4096, 4096))])
def test_gpu_dora_llama_shapes(dtype, KN):
    K, N = KN
    torch.manual_seed(K + N + 1)
    _check_dora(dtype, 2, 2048, K, N, 16, "contig", False, False, True, False, scaling=2.0, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dora_odd_shapes(dtype):
    for (B, T, K, N, r, layout, w_t, bias, give_sq, give_norm) in [
        (1, 16, 4096, 1024, 16, "contig", False, True, True, False),
        (3, 333, 1000, 777, 8, "transposed_bt", True, True, False, False),
        (2, 129, 515, 2049, 64, "strided_k", False, False, True, True),
        (1, 1, 37, 4231, 3, "2d", False, True, False, True),
        (1, 5, 1031, 96, 100, "contig", False, False, True, False),
    ]:
        _check_dora(dtype, B, T, K, N, r, layout, w_t, bias, give_sq, give_norm, device="cuda",
                    tol=TOL[dtype] if dtype != torch.float32 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dora_decode_with_a_given_norm(dtype):
    """A given norm at <= 16 rows takes LoRA's decode kernels with g and the bias in the expand (dora_fwd_cuda):
    output and every gradient (Z0, g and 1/n come back from that path for the backward) against the float64 oracle,
    M = 1..16, odd N, strided x, bias or not, ranks 1..64; a rank above 64 and 17 rows keep the other path. The
    no-grad call (inference) returns the same tensor bit for bit."""
    for (B, T, K, N, r, layout, w_t, bias) in [
        (1, 1, 4096, 1024, 16, "contig", False, True),
        (1, 5, 4096, 14336, 16, "strided_k", False, False),
        (2, 8, 1000, 777, 64, "transposed_bt", True, True),
        (1, 1, 37, 4231, 3, "2d", False, True),
        (1, 16, 515, 2049, 1, "contig", False, True),
        (1, 17, 512, 256, 8, "contig", False, True),   # 17 rows: not decode
        (1, 4, 1031, 96, 100, "contig", False, False),  # rank 100: not decode
    ]:
        torch.manual_seed(B * T + K + N + r)
        _check_dora(dtype, B, T, K, N, r, layout, w_t, bias, False, True, device="cuda",
                    tol=TOL[dtype] if dtype != torch.float32 else 1e-4)
    x, w, bias, A, Bw = _layer_inputs(dtype, 1, 3, 256, 300, 8, "contig", False, True, "cuda")
    norm = dora_weight_norm_reference(w, A.detach(), Bw.detach(), 1.5)
    m = norm * 1.1
    y = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.5, None, norm)  # records autograd
    assert y.requires_grad
    with torch.no_grad():
        y_infer = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.5, None, norm)
    assert torch.equal(y, y_infer)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dora_inference_with_a_given_norm(dtype):
    """Inference with a given norm (dora_infer: no autograd recorded, nothing kept for a backward) against the float64
    oracle within the dtype's bar and against the call that records autograd: decode sizes (Y written in place),
    above them dora_fwd's output pass with its grid from the wave model (dora_pass_splits: one to thousands of row
    tiles, 8-112 column blocks), odd shapes, ranks 1-64 and 100, bias on / off / misaligned, 2-D, 3-D and strided x."""
    for (B, T, K, N, r, layout, bias_kind) in [
        (1, 1, 4096, 14336, 16, "contig", "plain"),
        (2, 8, 1000, 777, 64, "strided_k", "misaligned"),
        (2, 2048, 4096, 1024, 16, "contig", "none"),
        (1, 4096, 4096, 14336, 16, "2d", "plain"),
        (3, 333, 1000, 777, 8, "contig", "plain"),
        (1, 17, 512, 256, 1, "2d", "plain"),
        (2, 129, 515, 2049, 64, "strided_k", "plain"),
        (1, 37, 4232, 4231, 3, "contig", "misaligned"),
        (1, 65, 1031, 96, 100, "transposed_bt", "none"),
    ]:
        torch.manual_seed(B * T + K + N + r)
        x, w, _, A, Bw = _layer_inputs(dtype, B, T, K, N, r, layout, False, False, "cuda")
        bias = None
        if bias_kind == "plain":
            bias = torch.randn(N, dtype=dtype, device="cuda") * 0.5
        elif bias_kind == "misaligned":  # starts one element past a 16-byte boundary
            bias = (torch.randn(N + 1, dtype=dtype, device="cuda") * 0.5)[1:]
        norm = dora_weight_norm_reference(w, A.detach(), Bw.detach(), 1.5)
        m = norm * (1 + 0.2 * torch.randn_like(norm))
        with torch.no_grad():
            y_infer = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.5, None, norm)
        y_grad = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.5, None, norm)
        assert y_grad.requires_grad and not y_infer.requires_grad
        assert y_infer.shape == (*x.shape[:-1], N) and y_infer.dtype == dtype
        want = dora_linear_reference(x.detach().double(), w.double(), None if bias is None else bias.double(),
                                     A.detach().double(), Bw.detach().double(), m.double(), 1.5)
        tol = TOL[dtype] if dtype != torch.float32 else 1e-4
        assert rel_err(y_infer, want) < tol, (B, T, K, N, r)
        assert torch.equal(y_infer, y_grad.detach()), (B, T, K, N, r)  # the same kernels, whatever is kept


@pytest.mark.gpu
def test_gpu_dora_pass_tiles_and_misaligned_gradients():
    """dora_pass's tiles (64 or 32 rows × 128 columns, 32 × 64 above rank 32; L on the tensor cores) with 16-byte
    copies only where rows are aligned (S's too: rank % 4 == 0): partial row and column tiles, every rank bucket,
    odd N, blocks walking several row tiles (the next tile's copies in flight) whose last tile is partial; and the
    backward's stream over output gradients that are strided or start off alignment (its element-wise path)."""
    for dtype, (B, T, K, N, r), grad_layout in [
        (torch.bfloat16, (2, 70, 256, 130, 32), "strided"),  # rank 17-32; N % 8 != 0: element-wise accesses
        (torch.float16, (1, 97, 512, 4098, 16), "contig"),  # rows not 16-byte aligned
        (torch.bfloat16, (3, 41, 384, 4104, 12), "offset"),  # a partial last column tile; dY rows one element off
        (torch.bfloat16, (1, 300, 256, 1024, 5), "contig"),  # everything aligned, a rank well under the 8-wide steps
        (torch.float32, (1, 200, 128, 1024, 16), "contig"),  # fp32: 4 elements a 16-byte access
        (torch.bfloat16, (1, 33, 256, 515, 40), "contig"),  # rank 33-64: 32 × 64 tiles
        (torch.bfloat16, (1, 1000, 256, 16392, 16), "contig"),  # 4 row tiles a block, the last one partial
        (torch.float16, (1, 777, 128, 8200, 64), "offset"),  # the same at rank 64 (S by 16-byte copies)
    ]:
        torch.manual_seed(N + r)
        _check_dora(dtype, B, T, K, N, r, "contig", False, True, True, False, device="cuda",
                    tol=TOL[dtype] if dtype != torch.float32 else 1e-4, grad_layout=grad_layout)


@pytest.mark.gpu
def test_gpu_dora_pass_register_form_equals_the_tiled_kernel():
    """The forward pass's register form (dora_out_kernel: ranks <= 16, B's fragments in registers, a warp per 32-column
    strip walking 16-row tiles through a cp.async ring) computes the tiled kernel's arithmetic in the same order, so
    its output equals dora_pass_kernel's bit for bit (set_dora_pass_form 0): bf16, fp16, fp32; ranks 1-16 (S by
    16-byte copies only at rank % 4 == 0); N off the 32-column strips and off 16-byte rows; partial row tiles; blocks
    of 1, 3 and the wave model's tiles (the ring longer or shorter than a block's walk); bias on, off and one element
    off alignment; the training call (g) and inference with a given norm (g = m / n in the pass). The profiler, where
    it records (not under compute-sanitizer), shows which kernel ran: the register form by default up to rank 16,
    the tiled kernel at 17."""
    ops = torch.ops.fastpeft_ops
    cases = [(torch.bfloat16, 300, 256, 1024, 16, "plain"), (torch.float16, 97, 512, 4098, 16, "misaligned"),
             (torch.bfloat16, 41, 384, 4104, 12, "none"), (torch.bfloat16, 1000, 256, 16392, 16, "plain"),
             (torch.float32, 200, 128, 1024, 16, "plain"), (torch.bfloat16, 37, 128, 4231, 3, "misaligned"),
             (torch.float16, 513, 64, 300, 1, "plain"), (torch.float32, 77, 96, 70, 7, "none"),
             (torch.bfloat16, 4096, 64, 4096, 16, "none")]
    before = ops.set_dora_pass_form(-1)
    try:
        for dtype, M, K, N, r, bias_kind in cases:
            torch.manual_seed(M + N + r)
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
            A = torch.randn(r, K, device="cuda") / K**0.5
            Bw = torch.randn(N, r, device="cuda") / r**0.5
            bias = None
            if bias_kind == "plain":
                bias = torch.randn(N, device="cuda", dtype=dtype) * 0.5
            elif bias_kind == "misaligned":
                bias = (torch.randn(N + 1, device="cuda", dtype=dtype) * 0.5)[1:]
            norm = dora_weight_norm_reference(w, A, Bw, 1.5)
            m = norm * (1 + 0.2 * torch.randn_like(norm))
            outs = {}
            for form in (0, -1, 1, 3):
                ops.set_dora_pass_form(form)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    y = ops.dora_fwd(x, w, bias, A, Bw, m, 1.5, None, None)[0]
                    with torch.no_grad():
                        y_infer = cpp_ops.dora_linear(x, w, bias, A, Bw, m, 1.5, None, norm)
                    torch.cuda.synchronize()
                names = " ".join(e.name for e in prof.events())
                ran, other = ("dora_pass_kernel", "dora_out_kernel")[::1 if form == 0 else -1]
                assert not names or (ran in names and other not in names), (form, dtype, M, N, r)
                outs[form] = (y, y_infer)
            want = dora_linear_reference(x.double(), w.double(), None if bias is None else bias.double(),
                                         A.double(), Bw.double(), m.double(), 1.5)
            tol = TOL[dtype] if dtype != torch.float32 else 1e-4
            for form, (y, y_infer) in outs.items():
                assert torch.equal(y, outs[0][0]) and torch.equal(y_infer, outs[0][1]), (form, dtype, M, N, r)
                assert rel_err(y, want) < tol and rel_err(y_infer, want) < tol, (form, dtype, M, N, r)
        ops.set_dora_pass_form(-1)  # rank 17: the tiled kernel by default
        x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.dora_fwd(x, w, None, torch.randn(17, 128, device="cuda"), torch.randn(256, 17, device="cuda"),
                         torch.rand(256, device="cuda") + 0.5, 1.0, None, None)
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events())
        assert not names or ("dora_pass_kernel" in names and "dora_out_kernel" not in names)
    finally:
        ops.set_dora_pass_form(before)


@pytest.mark.gpu
def test_gpu_dora_norm_fused_pass_matches_the_split_gemm_and_float64():
    """The training norm's fused form (dora_norm_parts_kernel: W·Aᵀ, A·Aᵀ and ‖W‖² in one pass over W on the tensor
    cores, A as hi + lo 16-bit parts; dora_norm_finish_kernel: the K ranges summed in order into n, g and 1/n) against
    the split GEMM (set_dora_norm_form 0) and a float64 norm: bf16 and fp16; ranks 1-16; N off the 16-row tiles and
    the 128-row blocks; K off the 32-column chunks (K % 8 == 0); ranges forced to 32, 64 and 2048 columns and the
    automatic ones; ‖W‖² given by the caller or summed in the pass; a weight that is a row slice of a wider one (its
    rows 16-byte aligned). Where it does not apply (fp32, rank 17, K % 8 != 0, rows off 16 bytes) the split GEMM runs:
    the profiler, where it records (not under compute-sanitizer), shows which. Run twice: the same bits (no atomics)."""
    ops = torch.ops.fastpeft_ops
    s = 1.5
    cases = [  # dtype, N, K, r, ‖W‖² given, forms, fused
        (torch.bfloat16, 4096, 4096, 16, False, (-1, 64), True),
        (torch.bfloat16, 1000, 1000, 5, False, (-1, 32, 2048), True),
        (torch.float16, 4231, 200, 16, True, (-1, 96), True),
        (torch.bfloat16, 37, 4232, 1, True, (-1, 128), True),
        (torch.float16, 300, 96, 12, False, (-1, 32, 64), True),
        (torch.bfloat16, 1024, 14336, 16, True, (-1,), True),
        (torch.float32, 256, 128, 16, False, (-1,), False),
        (torch.bfloat16, 256, 128, 17, False, (-1,), False),
        (torch.bfloat16, 256, 1028, 8, False, (-1,), False),
    ]
    before = ops.set_dora_norm_form(-1)
    try:
        for dtype, N, K, r, given, forms, fused in cases:
            torch.manual_seed(N + K + r)
            w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
            A = torch.randn(r, K, device="cuda") / K**0.5
            Bw = torch.randn(N, r, device="cuda") / r**0.5
            m = torch.rand(N, device="cuda") + 0.5
            x = torch.randn(3, K, device="cuda", dtype=dtype)
            w_sq = w.float().square().sum(1) if given else None
            want = torch.linalg.norm(w.double() + s * (Bw.double() @ A.double()), dim=1)
            split = None
            for form in (0,) + tuple(forms):
                ops.set_dora_norm_form(form)
                runs = []
                for _ in range(2):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        out = ops.dora_fwd(x, w, None, A, Bw, m, s, w_sq, None)
                        torch.cuda.synchronize()
                    runs.append((out[3].clone(), out[4].clone()))
                names = " ".join(e.name for e in prof.events())
                ran = "dora_norm_parts_kernel" in names
                assert not names or ran == (fused and form != 0), (form, dtype, N, K, r)
                assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (form, N, K)
                g, inv_n = runs[0]
                assert rel_err(inv_n.double(), 1 / want) < 1e-5, (form, dtype, N, K, r)
                assert rel_err(g.double(), m.double() / want) < 1e-5, (form, dtype, N, K, r)
                if form == 0:
                    split = inv_n
                else:
                    assert rel_err(inv_n, split) < 1e-5, (form, dtype, N, K, r)
        # a row slice of a wider weight: rows 16-byte aligned, the fused pass reads them with their stride
        ops.set_dora_norm_form(-1)
        wide = (torch.randn(512, 1024, device="cuda") / 32).to(torch.bfloat16)
        w = wide[:, 256:768]
        A = torch.randn(16, 512, device="cuda") / 512**0.5
        Bw = torch.randn(512, 16, device="cuda") / 4
        out = ops.dora_fwd(torch.randn(5, 512, device="cuda", dtype=torch.bfloat16), w, None, A, Bw,
                           torch.ones(512, device="cuda"), s, None, None)
        want = torch.linalg.norm(w.double() + s * (Bw.double() @ A.double()), dim=1)
        assert rel_err(out[4].double(), 1 / want) < 1e-5
        # rows off 16 bytes (a slice one column in): the split GEMM
        w = wide[:, 1:513]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = ops.dora_fwd(torch.randn(5, 512, device="cuda", dtype=torch.bfloat16), w, None, A, Bw,
                               torch.ones(512, device="cuda"), s, None, None)
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events())
        assert not names or "dora_norm_parts_kernel" not in names
        want = torch.linalg.norm(w.double() + s * (Bw.double() @ A.double()), dim=1)
        assert rel_err(out[4].double(), 1 / want) < 1e-5
    finally:
        ops.set_dora_norm_form(before)


@pytest.mark.gpu
def test_gpu_dora_deterministic_mode_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms the backward's dm / g⊙dY come from ATen (no atomics)."""
    torch.manual_seed(5)
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16) / 512**0.5
    A = torch.randn(8, 512, device="cuda", requires_grad=True)
    Bw = torch.randn(768, 8, device="cuda", requires_grad=True)
    m = (torch.rand(768, device="cuda") + 0.5).requires_grad_()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            for t in (x, A, Bw, m):
                t.grad = None
            cpp_ops.dora_linear(x, w, None, A, Bw, m, 2.0).float().square().sum().backward()
            runs.append([t.grad.clone() for t in (x, A, Bw, m)])
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_dora_stream_backward():
    """The backward's stream pass (Σ dY⊙Z0 and g⊙dY over [M, N]; dm's adapter part Σ_j B⊙(dYᵀ·S') added where dB's
    GEMM halves are combined) against the float64 truth from the saved Z0 and S: dm within 1e-4 (a wrong or missing
    adapter part is off by far more: B·A is as large as W here), every gradient subset (dm with B frozen still needs
    dYᵀ·S'), ranks 5-100 (no rank limit on this path), N off the 256-column blocks, row counts that split the rows
    over blocks or not, strided dY, bf16 and fp16; the profiler, where it records (not under compute-sanitizer),
    shows the stream kernel ran."""
    ops = torch.ops.fastpeft_ops
    cases = [(torch.bfloat16, 300, 4104, 130, 16, "contig"), (torch.float16, 64, 1000, 777, 5, "strided"),
             (torch.bfloat16, 129, 512, 4099, 64, "contig"), (torch.bfloat16, 17, 1408, 300, 40, "offset"),
             (torch.float16, 4000, 512, 1024, 12, "contig"), (torch.bfloat16, 33, 264, 96, 100, "contig")]
    for dtype, M, K, N, r, dy_layout in cases:
        torch.manual_seed(M + K + N + r)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
        A = torch.randn(r, K, device="cuda") / K**0.5
        Bw = torch.randn(N, r, device="cuda") / r**0.5
        m = torch.rand(N, device="cuda") + 0.5
        s = 2.0
        if dy_layout == "strided":
            dy = torch.randn(M, 2 * N, device="cuda", dtype=dtype)[:, ::2]
        elif dy_layout == "offset":
            dy = torch.randn(M, N + 1, device="cuda", dtype=dtype)[:, 1:]
        else:
            dy = torch.randn(M, N, device="cuda", dtype=dtype)
        y, S, Z0, g, inv_n = ops.dora_fwd(x, w, None, A, Bw, m, s, None, None)
        n64 = (w.double() + s * Bw.double() @ A.double()).norm(dim=1)
        dm64 = (dy.double() * (Z0.double() + S.double() @ Bw.double().t())).sum(0) * inv_n.double()
        dz64 = dy.double() * g.double()[None]
        assert rel_err(inv_n, 1 / n64) < 2e-6, (dtype, M, K, N, r)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            dx, dA, dB, dm = ops.dora_bwd(dy, x, S, Z0, g, inv_n, w, A, Bw, s, True, True, True, True)
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events())
        assert not names or "dora_bwd_stream_kernel" in names, (dtype, M, K, N, r)
        assert rel_err(dm, dm64) < 1e-4, (dtype, M, K, N, r)
        dx64 = dz64 @ w.double() + (s * dy.double() @ (Bw.double() * g.double()[:, None])) @ A.double()
        assert rel_err(dx, dx64) < TOL[dtype] / 3, (dtype, M, K, N, r)
        for need in ((False, False, False, True), (True, False, False, True), (False, True, True, False)):
            sub = ops.dora_bwd(dy, x, S, Z0, g, inv_n, w, A, Bw, s, *need)
            for got, full, wanted in zip(sub, (dx, dA, dB, dm), need):
                if wanted:
                    assert rel_err(got, full) < 1e-6, (need, dtype, M, K, N, r)


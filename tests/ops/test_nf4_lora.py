"""fastpeft/ops/kernels/nf4_lora.py, nf4_matmul.py, nf4_gemv.py: QLoRA kernels against the pure-PyTorch reference.

CPU: Triton under TRITON_INTERPRET=1 in fp32 / fp16 (both paths: dequant-into-buffer + dense composition, and
the fused in-kernel-dequant GEMM), the decode path's Triton fallback, clear toolchain errors.
GPU (marker ``gpu``): bf16 at Llama shapes, the CUDA decode GEMV, dequant bit-exact with bnb's CUDA kernel.
"""
import dataclasses
import os

import pytest
import torch

from fastpeft.ops import reference
from fastpeft.ops.dropout import lora_dropout_mask
from fastpeft.ops.kernels import nf4_dequant, nf4_gemv, nf4_lora, nf4_matmul
from fastpeft.ops.nf4_format import kernel_state, nf4_dequantize_reference
from fastpeft.ops.nf4_quantize import quantize_nf4
from helpers import set_settings

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
CAPABILITY = torch.cuda.get_device_capability() if CUDA else (0, 0)
needs_triton = pytest.mark.skipif(not (INTERP or CUDA), reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if CUDA else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _weight(N, K, bs=64, dq=True, qt="nf4", seed=0, device=DEV, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype).to(device)
    return quantize_nf4(w, blocksize=bs, compress_statistics=dq, quant_type=qt)


def _ks(quant_state):
    """The kernels take the typed KernelState of a QuantState (ops/nf4_format.py)."""
    return kernel_state(quant_state, quant_state.absmax.device)


def _tol(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def _run(fn, x, params, dy):
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + params, dy)
    return y.detach(), grads


CASES = [  # M, N, K, blocksize, double quant, quant type, dropout
    (5, 24, 70, 64, True, "nf4", 0.0),
    (33, 40, 128, 32, False, "nf4", 0.3),
    (7, 17, 256, 128, True, "fp4", 0.1),
    (1, 48, 96, 256, True, "nf4", 0.0),
]


@needs_triton
@pytest.mark.parametrize("path", ["buffer", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-bs{c[3]}-{c[5]}-p{c[6]}")
def test_lora_matches_reference(case, dtype, path, monkeypatch):
    M, N, K, bs, dq, qt, p = case
    set_settings(monkeypatch, nf4_gemm=path)
    packed, qs = _weight(N, K, bs, dq, qt, seed=M + N)
    g = torch.Generator().manual_seed(K)
    # 3-D, non-contiguous input (a column slice)
    x_full = torch.randn(2, M, K + 3, generator=g).to(dtype).to(DEV)
    x = x_full[..., 1:K + 1].requires_grad_()
    A = (torch.randn(4, K, generator=g) * 0.1).to(DEV).requires_grad_()
    B = (torch.randn(N, 4, generator=g) * 0.1).to(DEV).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype).to(DEV).requires_grad_()
    seed = 1234 if p > 0 else None
    dy = torch.randn(2, M, N, generator=g).to(dtype).to(DEV)
    y, grads = _run(lambda x_: nf4_lora.nf4_lora_linear(x_, packed, qs, bias, A, B, 2.0, p, seed), x, [A, B, bias], dy)
    mask = lora_dropout_mask(x.shape, p, seed, DEV, dtype) if p > 0 else None
    want, wgrads = _run(lambda x_: reference.nf4_lora_linear_reference(x_, packed, qs, bias, A, B, 2.0, mask),
                        x, [A, B, bias], dy)
    expect_path = "buffer" if (path == "buffer" or K % 2) else "fused"
    assert nf4_lora.nf4_path(2 * M, _ks(qs), dtype) == expect_path
    tol = _tol(dtype)
    assert rel(y, want) <= tol
    for name, a, b in zip(["dx", "dA", "dB", "dbias"], grads, wgrads):
        assert a.abs().sum() > 0, name
        assert rel(a, b) <= tol, name


@needs_triton
@pytest.mark.parametrize("nn_layout", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_nf4_matmul_layouts_and_split(nn_layout, split):
    N, K = 40, 192
    packed, qs = _weight(N, K, 64, True, seed=3)
    w = nf4_dequantize_reference(packed, qs, torch.float32)
    g = torch.Generator().manual_seed(5)
    M = 9
    p2 = torch.randn(M, N if nn_layout else K, generator=g).to(DEV)
    c_in = torch.randn(M, K if nn_layout else N, generator=g).to(DEV)
    got = nf4_matmul.nf4_matmul(p2, packed, _ks(qs), nn_layout=nn_layout, c_in=c_in, split=split)
    want = c_in + (p2 @ w if nn_layout else p2 @ w.t())
    assert rel(got, want) <= 1e-5
    with pytest.raises(ValueError, match="columns"):
        nf4_matmul.nf4_matmul(p2[:, :-1], packed, _ks(qs), nn_layout=nn_layout)


@needs_triton
@pytest.mark.parametrize("bs,tiles", [(32, (16, 32, 128, 1)), (64, (16, 64, 128, 2)), (64, (16, 32, 32, 1)),
                                      (128, (16, 64, 64, 1))])
@pytest.mark.parametrize("nn_layout", [False, True])
@pytest.mark.parametrize("dq", [True, False])
def test_nf4_matmul_absmax_groups(bs, tiles, nn_layout, dq, monkeypatch):
    """Tiles spanning several 4-bit blocks (one absmax per row and block, broadcast), inside one block, and
    K not a multiple of the blocksize (per-element lookup), with masked row / column tails."""
    monkeypatch.setattr(nf4_matmul, "_fused_blocks", lambda M, I, J, device: tiles)
    for N, K in ((40, 4 * bs + 2 * bs), (37, 3 * bs + 16)):
        packed, qs = _weight(N, K, bs, dq, seed=K)
        w = nf4_dequantize_reference(packed, qs, torch.float32)
        g = torch.Generator().manual_seed(N)
        p2 = torch.randn(5, N if nn_layout else K, generator=g).to(DEV)
        got = nf4_matmul.nf4_matmul(p2, packed, _ks(qs), nn_layout=nn_layout)
        assert rel(got, p2 @ w if nn_layout else p2 @ w.t()) <= 1e-5, (N, K)
    BM, BJ, BI, _ = tiles
    extent = BJ if nn_layout else BI
    assert nf4_matmul._absmax_groups(6 * bs, bs, extent) == (1 if bs % extent == 0 else extent // bs)
    assert nf4_matmul._absmax_groups(3 * bs + 16, bs, extent) == 0


@needs_triton
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ia3_matches_reference(feedforward, dtype):
    N, K, M = 36, 130, 11
    packed, qs = _weight(N, K, 64, True, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, M, K, generator=g).to(dtype).to(DEV).requires_grad_()
    l = (1 + 0.3 * torch.randn((1, K) if feedforward else (N, 1), generator=g)).to(DEV).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype).to(DEV).requires_grad_()
    dy = torch.randn(2, M, N, generator=g).to(dtype).to(DEV)
    y, grads = _run(lambda x_: nf4_lora.nf4_ia3_linear(x_, packed, qs, bias, l, feedforward), x, [l, bias], dy)
    want, wgrads = _run(lambda x_: reference.nf4_ia3_linear_reference(x_, packed, qs, bias, l, feedforward),
                        x, [l, bias], dy)
    assert rel(y, want) <= _tol(dtype)
    for a, b in zip(grads, wgrads):
        assert a.abs().sum() > 0 and rel(a, b) <= _tol(dtype)


@needs_triton
def test_dequant_lut_variants_and_buffer_reuse():
    packed, qs = _weight(24, 200, 128, True, seed=9)
    want = nf4_dequantize_reference(packed, qs, torch.float16)
    assert torch.equal(nf4_dequant.nf4_dequantize_triton(packed, qs, torch.float16, lut="load"), want)
    assert torch.equal(nf4_dequant.nf4_dequantize_triton(packed, qs, torch.float16, lut="select"), want)
    w1 = nf4_lora.dequantize_to(packed, _ks(qs), torch.float16)
    packed2, qs2 = _weight(8, 64, 64, False, seed=10)
    w2 = nf4_lora.dequantize_to(packed2, _ks(qs2), torch.float16)
    assert w1.data_ptr() == w2.data_ptr()  # one shared buffer: the second weight overwrote the first
    assert torch.equal(w2, nf4_dequantize_reference(packed2, qs2, torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequant.nf4_dequantize_triton(packed, qs, torch.float16, out=torch.empty(10, dtype=torch.float16, device=DEV))
    # state dtype bf16, compute fp32: two roundings (bf16 first), as bnb
    pb, qb = _weight(8, 64, 64, True, seed=11, dtype=torch.bfloat16)
    assert torch.equal(nf4_lora.dequantize_to(pb, _ks(qb), torch.float32),
                       nf4_dequantize_reference(pb, qb, torch.bfloat16).float())


def test_dispatch_rules(monkeypatch):
    _, qs = _weight(16, 64, device="cpu")
    _, qs_odd = _weight(16, 65, device="cpu")
    set_settings(monkeypatch, nf4_gemm="auto")
    assert nf4_lora.nf4_path(1, _ks(qs), torch.float32) == "fused"
    assert nf4_lora.nf4_path(4096, _ks(qs), torch.float32) == "buffer"
    assert nf4_lora.nf4_path(1, _ks(qs_odd), torch.float32) == "buffer"  # odd K: rows do not start on a byte
    # the measured crossover grows with the weight: 16 for small, 32 for q/o-sized, 64 for MLP-sized weights
    assert nf4_lora.nf4_path(16, _ks(qs), torch.float32) == "fused"
    assert nf4_lora.nf4_path(17, _ks(qs), torch.float32) == "buffer"
    qo = dataclasses.replace(_ks(qs), shape=(4096, 4096))  # the dispatch reads only the shape and dtypes
    mlp = dataclasses.replace(_ks(qs), shape=(14336, 4096))
    assert [nf4_lora.nf4_path(m, qo, torch.bfloat16) for m in (32, 33)] == ["fused", "buffer"]
    assert [nf4_lora.nf4_path(m, mlp, torch.bfloat16) for m in (64, 65)] == ["fused", "buffer"]
    set_settings(monkeypatch, nf4_fused_max_m=64)
    assert nf4_lora.nf4_path(64, _ks(qs), torch.float32) == "fused"
    torch.use_deterministic_algorithms(True)
    try:
        assert nf4_lora.nf4_path(1, _ks(qs), torch.float32) == "buffer"
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="FASTPEFT_NF4_GEMM"):  # validated where settings change
        set_settings(monkeypatch, nf4_gemm="cublas")


def test_reference_on_plain_cpu_and_seed_required():
    packed, qs = _weight(8, 32, device="cpu")
    x = torch.randn(3, 32)
    A, B = torch.randn(2, 32), torch.randn(8, 2)
    with pytest.raises(ValueError, match="seed"):
        nf4_lora.nf4_lora_linear(x, packed, qs, None, A, B, 1.0, 0.1, None)
    w = nf4_dequantize_reference(packed, qs, torch.float32)
    assert rel(reference.nf4_lora_linear_reference(x, packed, qs, None, A, B, 1.0), x @ w.t() + (x @ A.t()) @ B.t()) < 1e-6


# -- decode path ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv_triton_fallback_matches_reference(M):
    N, K = 48, 128
    packed, qs = _weight(N, K, 64, True, seed=M)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(DEV)
    A, B = torch.randn(4, K, generator=g).to(DEV) * 0.1, torch.randn(N, 4, generator=g).to(DEV) * 0.1
    bias = torch.randn(N, generator=g).to(DEV)
    want = reference.nf4_lora_linear_reference(x, packed, qs, bias, A, B, 1.5)
    got = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="triton")
    assert rel(got, want) <= 1e-5
    no_lora = nf4_gemv.nf4_lora_gemv_triton(x, packed, _ks(qs), bias, None, None, 0.0)
    assert rel(no_lora, x @ nf4_dequantize_reference(packed, qs).t() + bias) <= 1e-5


@pytest.mark.skipif(CUDA, reason="checks the error on machines without a CUDA toolchain / device")
def test_csrc_missing_toolchain_error_is_clear():
    problem = nf4_gemv.toolchain_problem()
    assert problem is not None and ("CUDA" in problem or "nvcc" in problem or "ninja" in problem)
    with pytest.raises(RuntimeError, match="cannot be built") as info:
        nf4_gemv.load_extension()
    assert problem in str(info.value) and "Triton" in str(info.value)
    with pytest.raises(RuntimeError, match="cannot be built"):  # the kernel-form hook needs the extension too
        nf4_gemv.set_kernel_variant(1)
    for bad in (4, -1, True):  # before any build
        with pytest.raises(ValueError, match="0 .original., 1 .lean., 2 .* or 3"):
            nf4_gemv.set_kernel_variant(bad)
    with pytest.raises(RuntimeError, match="cannot be built"):
        nf4_gemv.set_k_split(2)
    for bad in (9, -1, True, 2.0):  # before any build
        with pytest.raises(ValueError, match="0 .chosen per call. or 1..8"):
            nf4_gemv.set_k_split(bad)
    with pytest.raises(ValueError, match="N >= 1 and K >= 32"):
        nf4_gemv.k_split_for(0, 4096)
    with pytest.raises(ValueError, match="backend"):
        nf4_gemv.nf4_lora_gemv(torch.randn(1, 32), *_weight(8, 32, device="cpu"), None, None, None, 1.0, backend="x")


# -- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 1000])
@pytest.mark.parametrize("path", ["buffer", "fused"])
def test_gpu_bf16_lora_paths(M, path, monkeypatch):
    set_settings(monkeypatch, nf4_gemm=path)
    N, K = 1024, 4096
    packed, qs = _weight(N, K, 64, True, seed=1, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda().requires_grad_()
    A = (torch.randn(16, K, generator=g) * 0.02).cuda().requires_grad_()
    B = (torch.randn(N, 16, generator=g) * 0.02).cuda().requires_grad_()
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16).cuda()
    y, grads = _run(lambda x_: nf4_lora.nf4_lora_linear(x_, packed, qs, None, A, B, 2.0, 0.05, 77), x, [A, B], dy)
    mask = lora_dropout_mask(x.shape, 0.05, 77, "cuda", torch.bfloat16)
    xs = x.detach().float().requires_grad_()
    want, wgrads = _run(lambda x_: reference.nf4_lora_linear_reference(x_, packed, qs, None, A, B, 2.0, mask.float()),
                        xs, [A, B], dy.float())
    assert rel(y, want) <= 2e-2
    for a, b in zip(grads, wgrads):
        assert rel(a, b) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_cuda_and_triton(M, dtype):
    N, K = 4096, 4096
    packed, qs = _weight(N, K, 64, True, seed=M, dtype=dtype)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    A, B = (torch.randn(16, K, generator=g) * 0.02).cuda(), (torch.randn(N, 16, generator=g) * 0.02).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda()
    want = reference.nf4_lora_linear_reference(x.float(), packed, qs, bias.float(), A, B, 2.0)
    tri = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 2.0, backend="triton")
    assert rel(tri, want) <= 1e-2
    problem = nf4_gemv.toolchain_problem()
    if problem is not None:
        pytest.skip(f"CUDA extension not buildable here: {problem}")
    cu = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 2.0, backend="cuda")
    assert cu.dtype == dtype and rel(cu, want) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 9, 16])
@pytest.mark.parametrize("N,K,bs,dq", [(1000 + 3, 4096 + 128, 64, True), (77, 1152, 32, False), (256, 2048, 256, True),
                                       (33, 4096, 4096, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_mma_gemv_exact_layout(M, N, K, bs, dq, dtype):
    """The tensor-core decode kernel against fp32 math on the weight rounded to x's dtype (what the kernel and
    the dense path compute with): N not a multiple of 16, odd numbers of 128-weight segments, every blocksize
    class, plain and nested absmax, a strided x, bias and LoRA. Tight bar: only fp32 summation order differs.
    (K % 128 == 0 only: other K are not dispatched to this kernel, see nf4_gemv._cuda_ok.)"""
    problem = nf4_gemv.toolchain_problem()
    if problem is not None:
        pytest.skip(f"CUDA extension not buildable here: {problem}")
    packed, qs = _weight(N, K, bs, dq, seed=N + M, dtype=dtype)
    g = torch.Generator().manual_seed(K + M)
    xbig = torch.randn(M, K + 24, generator=g).to(dtype).cuda()
    x = xbig[:, 8:8 + K]  # row stride K + 24 (% 8 == 0), start 16-byte aligned
    A, B = (torch.randn(8, K, generator=g) * 0.05).cuda(), (torch.randn(N, 8, generator=g) * 0.05).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda()
    w = reference.nf4_weight_reference(packed, qs, dtype).float()
    want = x.float() @ w.t() + bias.float() + 1.5 * ((x.float() @ A.t()) @ B.t())
    got = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda")
    assert got.dtype == dtype and got.shape == (M, N)
    # the GEMV launched after the shrink instead of beside it (programmatic dependent launch): the same bits
    assert torch.equal(got, nf4_gemv.nf4_lora_gemv_cuda(x, packed, _ks(qs), bias, A, B, 1.5, overlap=False))
    assert rel(got, want) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
    err = (got.float() - want).abs() / want.abs().clamp_min(1.0)
    assert err.max() <= (2e-2 if dtype == torch.bfloat16 else 3e-3)  # every element, not only on average
    plain = nf4_gemv.nf4_lora_gemv(x[:, :K].contiguous(), packed, _ks(qs), None, None, None, 0.0, backend="cuda")
    assert rel(plain, x.float() @ w.t()) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
    # the other forms (the default is 2: the mma operands swapped, the weights as its 16-row side): the original
    # form computes the same products, the tensor core summing each 16 of them in the other arrangement, so it is
    # held to the same bounds; its lean addressing (1) gives the original's bits, with and without LoRA
    previous = nf4_gemv.set_kernel_variant(0)
    try:
        assert previous == 2  # the default form is the one checked above
        original = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda")
        assert original.dtype == dtype and original.shape == (M, N)
        assert rel(original, want) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
        err = (original.float() - want).abs() / want.abs().clamp_min(1.0)
        assert err.max() <= (2e-2 if dtype == torch.bfloat16 else 3e-3)
        original_plain = nf4_gemv.nf4_lora_gemv(x[:, :K].contiguous(), packed, _ks(qs), None, None, None, 0.0,
                                                backend="cuda")
        assert rel(original_plain, x.float() @ w.t()) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
        nf4_gemv.set_kernel_variant(1)
        assert torch.equal(nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda"), original)
        lean_plain = nf4_gemv.nf4_lora_gemv(x[:, :K].contiguous(), packed, _ks(qs), None, None, None, 0.0,
                                            backend="cuda")
        assert torch.equal(lean_plain, original_plain)
        # the code-pair table (3): the default form's reads, products and mma arrangement, so its bits, with and
        # without LoRA, unsplit and over a cluster of 2 (its table's space reused for the partial sums)
        nf4_gemv.set_kernel_variant(3)
        assert torch.equal(nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda"), got)
        assert torch.equal(nf4_gemv.nf4_lora_gemv_cuda(x, packed, _ks(qs), bias, A, B, 1.5, overlap=False), got)
        assert torch.equal(nf4_gemv.nf4_lora_gemv(x[:, :K].contiguous(), packed, _ks(qs), None, None, None, 0.0,
                                                  backend="cuda"), plain)
        split_previous = nf4_gemv.set_k_split(2)
        try:
            pair_split = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda")
            nf4_gemv.set_kernel_variant(2)
            assert torch.equal(nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda"), pair_split)
        finally:
            nf4_gemv.set_k_split(split_previous)
    finally:
        nf4_gemv.set_kernel_variant(previous)
    # K split over a cluster of blocks (sm_90+; 1 elsewhere): every split within the same bounds, deterministic
    previous = nf4_gemv.set_k_split(1)
    try:
        assert previous == 0  # the default: chosen per call
        nf4_gemv.set_k_split(0)  # chosen per call: 2 where N / 16 tiles leave more than half the SMs idle
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        auto = 2 if 2 * ((N + 15) // 16) <= sms and CAPABILITY >= (9, 0) else 1
        assert nf4_gemv.k_split_for(N, K) == auto
        for k_split in (1, 2, 3, 8):
            nf4_gemv.set_k_split(k_split)
            assert nf4_gemv.k_split_for(N, K) == (min(k_split, K // 128) if CAPABILITY >= (9, 0) else 1)
            split = nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda")
            assert rel(split, want) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
            err = (split.float() - want).abs() / want.abs().clamp_min(1.0)
            assert err.max() <= (2e-2 if dtype == torch.bfloat16 else 3e-3)
            assert torch.equal(nf4_gemv.nf4_lora_gemv(x, packed, _ks(qs), bias, A, B, 1.5, backend="cuda"), split)
            assert torch.equal(nf4_gemv.nf4_lora_gemv_cuda(x, packed, _ks(qs), bias, A, B, 1.5, overlap=False), split)
            split_plain = nf4_gemv.nf4_lora_gemv(x[:, :K].contiguous(), packed, _ks(qs), None, None, None, 0.0,
                                                 backend="cuda")
            assert rel(split_plain, x.float() @ w.t()) <= (4e-3 if dtype == torch.bfloat16 else 1e-3)
    finally:
        nf4_gemv.set_k_split(previous)


@pytest.mark.gpu
def test_gpu_cuda_gemv_overlapping_the_shrink_replays_in_a_cuda_graph():
    """The GEMV launched as a programmatic dependent of the LoRA shrink, captured in a CUDA graph with other work
    around it (a kernel writing x just before, as a decode step's norm does), replays with new x and adapter values
    and gives the bits of eager calls launched one after the other: its epilogue never reads the shrink's partials
    early, and its weight loads never read an x still being written."""
    problem = nf4_gemv.toolchain_problem()
    if problem is not None:
        pytest.skip(f"CUDA extension not buildable here: {problem}")
    torch.manual_seed(3)
    N, K = 4096, 4096
    packed, qs = _weight(N, K, 64, True, seed=7, dtype=torch.bfloat16)
    packed, ks = packed.cuda(), _ks(qs)
    src = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    x = torch.empty_like(src)
    A, B = torch.randn(16, K, device="cuda") * 0.02, torch.randn(N, 16, device="cuda") * 0.02

    def step():
        torch.mul(src, 2.0, out=x)  # the kernel right before the shrink writes x
        return nf4_gemv.nf4_lora_gemv_cuda(x, packed, ks, None, A, B, 2.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(3):
        src.copy_(torch.randn_like(src))
        A.add_(torch.randn_like(A) * 0.01)
        graph.replay()
        torch.cuda.synchronize()
        want = nf4_gemv.nf4_lora_gemv_cuda(src * 2.0, packed, ks, None, A, B, 2.0, overlap=False)
        assert torch.equal(y, want)


@pytest.mark.gpu
def test_gpu_model_decode_uses_gemv_and_matches():
    """no-grad M <= 16 forward through nf4_lora_linear = the decode path; equals the training path's forward."""
    N, K = 512, 1024
    packed, qs = _weight(N, K, 64, True, seed=4, dtype=torch.bfloat16)
    x = torch.randn(1, 3, K, device="cuda", dtype=torch.bfloat16)
    A, B = torch.randn(8, K, device="cuda") * 0.02, torch.randn(N, 8, device="cuda") * 0.02
    with torch.no_grad():
        dec = nf4_lora.nf4_lora_linear(x, packed, qs, None, A, B, 2.0)
    train = nf4_lora.nf4_lora_linear(x, packed, qs, None, A.requires_grad_(), B, 2.0)
    assert dec.shape == train.shape and rel(dec, train.detach()) <= 1e-2

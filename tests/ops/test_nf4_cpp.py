"""The C++ operators for 4-bit bases (csrc/nf4_dequant.cu, csrc/adapter_ops.cpp; fastpeft/ops/cpp_ops.py):
``nf4_dequantize`` against the PyTorch reference (and on the GPU the Triton kernel), bit for bit; ``nf4_lora_linear``
and ``nf4_dora_linear`` against the dense operators on the dequantized weight (the same kernels, so bit for bit),
values and gradients; bad QuantStates; schemas (opcheck). CPU here (the build CI makes); GPU in the gpu-marked tests.
"""
import pytest
import torch

from fastpeft.ops import cpp_ops
from fastpeft.ops.nf4_format import kernel_state, nf4_dequantize_reference
from fastpeft.ops.nf4_quantize import quantize_nf4
from helpers import DEVICE

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantized(N, K, device=DEVICE, seed=0, **kw):
    """(packed, QuantState, KernelState) of a random [N, K] weight."""
    gen = torch.Generator().manual_seed(seed)
    packed, qs = quantize_nf4(torch.randn(N, K, generator=gen), **kw)
    if device != "cpu":
        packed = packed.to(device)
        qs.to(device)  # in place (bnb's QuantState.to returns nothing)
    return packed, qs, kernel_state(qs, packed.device)


@pytest.mark.parametrize("shape", [(8, 64), (37, 130), (5, 7), (3, 1), (1, 33)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested,blocksize", [(True, 64), (False, 128), (False, 32)])
def test_dequantize_matches_reference_bitwise(shape, quant_type, nested, blocksize):
    packed, qs, ks = _quantized(*shape, device="cpu", quant_type=quant_type, compress_statistics=nested,
                                blocksize=blocksize)
    assert ks.nested == nested
    for dt in DTYPES:
        got = cpp_ops.nf4_dequantize(packed, ks, dt)
        assert got.shape == shape and got.dtype == dt
        assert torch.equal(got, nf4_dequantize_reference(packed, qs, dt)), dt


def test_dequantize_reads_a_quant_storage_dtype_and_rounds_through_the_state_dtype():
    """bnb's quant_storage (the bytes held in a bf16 tensor, as FSDP needs) reads as the same bytes; a bf16 state
    dequantized to fp16 rounds to bf16 first, then to fp16 (bnb's two roundings)."""
    packed, qs, ks = _quantized(16, 96, device="cpu", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(cpp_ops.nf4_dequantize(packed, ks, torch.float32),
                       nf4_dequantize_reference(packed, qs, torch.float32))
    ks = type(ks)(**{**ks.__dict__, "state_dtype": torch.bfloat16})  # as a bf16 layer's QuantState records it
    got = cpp_ops.nf4_dequantize(packed, ks, torch.float16)
    want = nf4_dequantize_reference(packed, qs, torch.float32).to(torch.bfloat16).to(torch.float16)
    assert torch.equal(got, want)
    assert not torch.equal(got, nf4_dequantize_reference(packed, qs, torch.float16))  # the two roundings matter


def _grads(fn, tensors, probe):
    for t in tensors:
        t.grad = None
    y = fn()
    y.backward(probe)
    return [y.detach()] + [None if t.grad is None else t.grad.clone() for t in tensors]


def _layer(N, K, r, dtype, device, bias=True, seed=1, adapter_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, K, generator=gen).to(device, dtype).requires_grad_()
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(device, adapter_dtype).requires_grad_()
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(device, adapter_dtype).requires_grad_()
    b = (torch.randn(N, generator=gen) * 0.1).to(device, dtype).requires_grad_() if bias else None
    m = (torch.rand(N, generator=gen) + 0.5).to(device).requires_grad_()
    return x, A, B, b, m


def _check_ops_equal_dense(N, K, r, dtype, device, adapter_dtype=torch.float32):
    """The 4-bit operators = the dense operators on dequant(W) in x's dtype: same kernels, so bitwise; with a
    bias and without, with dropout (LoRA), without gradients; adapters in fp32, or in x's dtype (FSDP2's bf16
    policy: LoRA's 16-bit composition without dropout)."""
    packed, qs, ks = _quantized(N, K, device=device)
    W = nf4_dequantize_reference(packed, qs, dtype)
    for bias in (True, False):
        x, A, B, b, m = _layer(N, K, r, dtype, device, bias, adapter_dtype=adapter_dtype)
        tensors = [t for t in (x, A, B, b, m) if t is not None]
        probe = torch.randn(2, 3, N, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        cases = [
            (lambda: cpp_ops.nf4_lora_linear(x, packed, ks, b, A, B, 0.7),
             lambda: cpp_ops.lora_linear(x, W, b, A, B, 0.7)),
            (lambda: cpp_ops.nf4_lora_linear(x, packed, ks, b, A, B, 0.7, 0.25, torch.tensor(99), 1),
             lambda: cpp_ops.lora_linear(x, W, b, A, B, 0.7, 0.25, torch.tensor(99), 1)),
            (lambda: cpp_ops.nf4_dora_linear(x, packed, ks, b, A, B, m, 0.7),
             lambda: cpp_ops.dora_linear(x, W, b, A, B, m, 0.7)),
            (lambda: cpp_ops.nf4_dora_linear(x, packed, ks, b, A, B, m, 0.7, W.float().square().sum(1)),
             lambda: cpp_ops.dora_linear(x, W, b, A, B, m, 0.7, W.float().square().sum(1))),
        ]
        for ours, dense in cases:
            got, want = _grads(ours, tensors, probe), _grads(dense, tensors, probe)
            for g, w in zip(got, want):
                assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
            with torch.no_grad():
                assert torch.equal(ours(), want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_and_dora_ops_equal_the_dense_ops(dtype):
    _check_ops_equal_dense(37, 130, 4, dtype, "cpu")
    if dtype != torch.float32:
        _check_ops_equal_dense(37, 130, 4, dtype, "cpu", adapter_dtype=dtype)


def test_backward_without_input_grad_skips_dx():
    packed, qs, ks = _quantized(12, 64, device="cpu")
    x, A, B, _, m = _layer(12, 64, 2, torch.float32, "cpu", bias=False)
    x = x.detach()
    cpp_ops.nf4_lora_linear(x, packed, ks, None, A, B, 1.0).sum().backward()
    cpp_ops.nf4_dora_linear(x, packed, ks, None, A, B, m, 1.0).sum().backward()
    assert A.grad is not None and B.grad is not None and m.grad is not None and x.grad is None


def test_bad_quant_states_raise_clear_errors():
    packed, qs, ks = _quantized(8, 64, device="cpu")
    rep = lambda **kw: type(ks)(**{**ks.__dict__, **kw})  # noqa: E731
    cases = [
        (rep(absmax=ks.absmax[:3]), "absmax has 3 entries"),
        (rep(code=ks.code[:8]), "code must be the 16 float32"),
        (rep(blocksize=63), "blocksize must be a positive even number"),
        (rep(absmax=ks.absmax.float()), "must hold uint8 codes"),
        (rep(absmax2=ks.absmax2[:0]), "absmax2 must hold"),
        (rep(shape=(9, 64)), "packed holds 256 bytes"),
    ]
    for bad, match in cases:
        with pytest.raises(RuntimeError, match=match):
            cpp_ops.nf4_dequantize(packed, bad, torch.float32)
    x, A, B, _, _ = _layer(8, 64, 2, torch.float32, "cpu", bias=False)
    with pytest.raises(RuntimeError, match="a \\[8, 32\\] weight needs 128"):  # x of another in_features
        cpp_ops.nf4_lora_linear(x[..., :32], packed, ks, None, A[:, :32], B, 1.0)
    with pytest.raises(RuntimeError, match="absmax has 3 entries"):
        cpp_ops.nf4_lora_linear(x, packed, rep(absmax=ks.absmax[:3]), None, A, B, 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        cpp_ops.nf4_dequantize(torch.zeros(512, dtype=torch.uint8)[::2], ks, torch.float32)
    with pytest.raises(RuntimeError, match="cannot require grad"):
        cpp_ops.nf4_lora_linear(x, packed.float().requires_grad_(), ks, None, A, B, 1.0)


def test_ops_pass_opcheck():
    """Schemas, the Meta kernel of nf4_dequantize, the autograd registration of the two layer operators."""
    packed, qs, ks = _quantized(20, 64, device="cpu")
    x, A, B, b, m = _layer(20, 64, 4, torch.float32, "cpu")
    ops = torch.ops.fastpeft_ops
    weight_args = (packed, ks.absmax, ks.code, ks.code2, ks.absmax2, ks.offset, ks.blocksize, ks.blocksize2, ks.nested,
                   20, ks.state_dtype)
    torch.library.opcheck(ops.nf4_dequantize, weight_args + (64, torch.bfloat16))
    torch.library.opcheck(ops.nf4_lora_linear, (x,) + weight_args + (b, A, B, 2.0, 0.25, torch.tensor(3), 0))
    torch.library.opcheck(ops.nf4_dora_linear, (x,) + weight_args + (None, A, B, m, 2.0, None, None))


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (37, 4231), (5, 7)])
@pytest.mark.parametrize("quant_type,nested,blocksize", [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 32)])
def test_gpu_dequantize_matches_triton_and_reference_bitwise(shape, quant_type, nested, blocksize):
    from fastpeft.ops.kernels.nf4_dequant import nf4_dequantize_triton  # noqa: PLC0415

    packed, qs, ks = _quantized(*shape, device="cuda", quant_type=quant_type, compress_statistics=nested,
                                blocksize=blocksize)
    for dt in DTYPES:
        got = cpp_ops.nf4_dequantize(packed, ks, dt)
        assert torch.equal(got, nf4_dequantize_triton(packed, qs, dt)), dt
        if shape[0] < 1000:
            assert torch.equal(got, nf4_dequantize_reference(packed, qs, dt)), dt


@pytest.mark.gpu
def test_gpu_dequantize_misaligned_bytes_take_the_element_path():
    """Packed bytes at an odd address (a view into a larger buffer) and an odd element count: the kernel's
    vector path needs 8-byte alignment and whole 16-element chunks; the rest must give the same bits."""
    packed, qs, ks = _quantized(33, 65, device="cuda")
    want = cpp_ops.nf4_dequantize(packed, ks, torch.bfloat16)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    shifted.copy_(packed.reshape(-1))
    assert shifted.data_ptr() % 8 != 0
    assert torch.equal(cpp_ops.nf4_dequantize(shifted, ks, torch.bfloat16), want)
    assert torch.equal(want, nf4_dequantize_reference(packed, qs, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_lora_and_dora_ops_equal_the_dense_ops(dtype):
    _check_ops_equal_dense(37, 4231, 16, dtype, "cuda")
    _check_ops_equal_dense(1024, 512, 8, dtype, "cuda")
    if dtype != torch.float32:
        _check_ops_equal_dense(1024, 512, 8, dtype, "cuda", adapter_dtype=dtype)

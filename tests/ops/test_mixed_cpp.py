"""fastpeft_ops::lora_mixed_delta_ (csrc/: mixed-adapter LoRA from a MixedAdapters set of live adapter weights)
against the float64 oracle: ranks that differ per adapter, base-model segments, one token per segment (decode) and many
(prefill), non-contiguous inputs, adapters of another dtype or layout, more adapters than one launch holds, and
clear errors. CPU here (the build CI makes); the CUDA kernels in the gpu-marked tests."""
import pytest
import torch

from fastpeft.ops import cpp_ops
from fastpeft.ops.reference import lora_mixed_delta_reference
from helpers import DEVICE, rel_err

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")


def _adapters(ranks, K, N, gen, device, dtype=torch.float32):
    a = [(torch.randn(r, K, generator=gen) / K**0.5).to(device, dtype) for r in ranks]
    b = [torch.randn(N, r, generator=gen).to(device, dtype) for r in ranks]
    scales = [0.5 + 0.25 * i for i in range(len(ranks))]
    return a, b, scales


def _oracle(y, x, seg, tokens, a, b, scales):
    """ops/reference.py's lora_mixed_delta_reference (fp32 sums, y rounded once) on the adapters zero-padded into
    stacks, as the Triton kernels take them."""
    R = max(t.shape[0] for t in a)
    a_stack = torch.zeros(len(a), R, x.shape[1], device=x.device)
    b_stack = torch.zeros(len(a), y.shape[1], R, device=x.device)
    for i, (ai, bi) in enumerate(zip(a, b)):
        a_stack[i, :ai.shape[0]] = ai.float()
        b_stack[i, :, :ai.shape[0]] = bi.float()
    return lora_mixed_delta_reference(y, x, seg, tokens, a_stack, b_stack, torch.tensor(scales, device=x.device))


def _delta(y, x, seg, tokens, a, b, scales):
    """lora_mixed_delta_ on a MixedAdapters set built from the lists."""
    return cpp_ops.lora_mixed_delta_(y, x, seg, tokens, cpp_ops.mixed_adapters(a, b, scales))


def _mixed_linear(x, weight, bias, seg, tokens, a, b, scales):
    return cpp_ops.lora_mixed_linear(x, weight, bias, seg, tokens, cpp_ops.mixed_adapters(a, b, scales))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check(tokens, dtype, ranks, K, N, segments, device=DEVICE, seed=0, adapter_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a, b, scales = _adapters(ranks, K, N, gen, device, adapter_dtype)
    x = torch.randn(segments * tokens, K + 3, generator=gen).to(device, dtype)[:, 2:2 + K]  # non-contiguous rows
    y = torch.randn(segments * tokens, N, generator=gen).to(device, dtype)
    seg = torch.randint(-1, len(ranks), (segments,), generator=gen, dtype=torch.int32)
    seg[0], seg[-1] = -1, len(ranks) - 1  # a base-model segment and the last adapter, always
    seg = seg.to(device)
    got = _delta(y.clone(), x, seg, tokens, a, b, scales)
    want = _oracle(y, x, seg, tokens, a, b, scales)
    assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype]
    base = seg.long().repeat_interleave(tokens) < 0
    assert torch.equal(got[base], y[base])  # "__base__" rows untouched
    return got


@pytest.mark.parametrize("tokens", [1, 7, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_oracle(tokens, dtype):
    _check(tokens, dtype, [5, 16, 3], K=37, N=45, segments=6, seed=tokens)


def test_adapters_in_another_dtype_or_layout_give_the_same_numbers():
    gen = torch.Generator().manual_seed(3)
    a, b, scales = _adapters([4, 8], 24, 20, gen, DEVICE)
    x = torch.randn(6, 24, generator=gen).to(DEVICE)
    y = torch.randn(6, 20, generator=gen).to(DEVICE)
    seg = torch.tensor([1, 0, -1], dtype=torch.int32, device=DEVICE)
    want = _delta(y.clone(), x, seg, 2, a, b, scales)
    b_t = [t.t().contiguous().t() for t in b]  # column-major B: a non-unit column stride
    assert not b_t[0].is_contiguous()
    assert rel_err(_delta(y.clone(), x, seg, 2, a, b_t, scales), want) <= 1e-6
    a64 = [t.double() for t in a]  # float64 adapters: read as float32 copies (the math is fp32 either way)
    assert rel_err(_delta(y.clone(), x, seg, 2, a64, b, scales), want) <= 1e-6


def test_more_adapters_than_one_launch_holds():
    # 70 adapters: two launches of the CUDA kernels (64 per launch); every adapter used once
    gen = torch.Generator().manual_seed(5)
    ranks = [1 + i % 8 for i in range(70)]
    a, b, scales = _adapters(ranks, 16, 12, gen, DEVICE)
    x = torch.randn(71, 16, generator=gen).to(DEVICE)
    y = torch.randn(71, 12, generator=gen).to(DEVICE)
    seg = torch.tensor(list(range(69, -1, -1)) + [-1], dtype=torch.int32, device=DEVICE)
    got = _delta(y.clone(), x, seg, 1, a, b, scales)
    assert rel_err(got, _oracle(y, x, seg, 1, a, b, scales)) <= 1e-5
    assert torch.equal(got[-1], y[-1])


def test_no_adapters_and_no_rows_change_nothing():
    y = torch.randn(4, 6, device=DEVICE)
    seg = torch.full((4,), -1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(_delta(y.clone(), torch.randn(4, 5, device=DEVICE), seg, 1, [], [], []), y)
    empty = torch.empty(0, 6, device=DEVICE)
    _delta(empty, torch.empty(0, 5, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE), 1,
           [torch.randn(2, 5, device=DEVICE)], [torch.randn(6, 2, device=DEVICE)], [1.0])


def test_bad_arguments_are_clear_errors():
    y, x = torch.zeros(4, 6), torch.randn(4, 5)
    a, b = [torch.randn(2, 5)], [torch.randn(6, 2)]
    seg = torch.zeros(2, dtype=torch.int32)
    op = _delta
    with pytest.raises(RuntimeError, match="one of each per adapter"):
        op(y, x, seg, 2, a, b, [1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"expected \[r, 5\] and \[6, r\]"):
        op(y, x, seg, 2, a, [torch.randn(6, 3)], [1.0])
    with pytest.raises(RuntimeError, match="int32 adapter_of_segment of 2 entries"):
        op(y, x, seg.long(), 2, a, b, [1.0])
    with pytest.raises(RuntimeError, match="4 rows do not split into segments of 3 tokens"):
        op(y, x, seg, 3, a, b, [1.0])
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(y.half(), x, seg, 2, a, b, [1.0])
    with pytest.raises(RuntimeError, match="only 1 adapters were given"):
        op(y, x, torch.tensor([0, 1], dtype=torch.int32), 2, a, b, [1.0])


def test_op_passes_opcheck_and_writes_only_y():
    gen = torch.Generator().manual_seed(1)
    a, b, scales = _adapters([3, 5], 10, 7, gen, "cpu")
    seg = torch.tensor([1, -1, 0], dtype=torch.int32)
    y, x = torch.randn(6, 7), torch.randn(6, 10)
    adapters = cpp_ops.mixed_adapters(a, b, scales)
    # the adapter set is an int handle: every opcheck test runs (schema: only y is written; fake tensors; AOT)
    torch.library.opcheck(torch.ops.fastpeft_ops.lora_mixed_delta_.default, (y, x, seg, 2, adapters.handle))
    inputs = [t.clone() for t in [x, seg] + a + b]
    y_before, y_ptr = y.clone(), y.data_ptr()
    out = _delta(y, x, seg, 2, a, b, scales)
    assert out.data_ptr() == y_ptr and not torch.equal(y, y_before)  # y is written in place
    assert all(torch.equal(t, u) for t, u in zip([x, seg] + a + b, inputs))  # nothing else is


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 512])
def test_gpu_llama_shapes(dtype, tokens):
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    segments = 32 if tokens < 512 else 4
    for K, N in ((4096, 1024), (4096, 14336), (14336, 4096)):
        _check(tokens, dtype, [16] * 4 + [8, 32, 64, 1], K, N, segments, seed=K + N + tokens)


@pytest.mark.gpu
def test_gpu_odd_shapes_many_adapters_and_16bit_adapters():
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    _check(1, torch.bfloat16, [1 + i % 64 for i in range(70)], K=4231, N=37, segments=90, seed=7)
    _check(5, torch.float16, [7, 13, 33], K=37, N=4231, segments=9, seed=8)
    _check(37, torch.bfloat16, [7, 13, 33], K=4231, N=45, segments=5, seed=10)  # prefill tiles: partial rows / k
    _check(100, torch.float32, [64, 3], K=100, N=33, segments=3, seed=11)
    _check(2, torch.bfloat16, [16, 8], K=4096, N=1000, segments=8, seed=9, adapter_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_matches_the_cpu_build():
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    gen = torch.Generator().manual_seed(2)
    a, b, scales = _adapters([16, 4, 64], 512, 300, gen, "cpu")
    x = torch.randn(40, 512, generator=gen)
    y = torch.randn(40, 300, generator=gen)
    seg = torch.tensor([2, 0, -1, 1, 0, 2, 2, 1], dtype=torch.int32)
    cpu = _delta(y.clone(), x, seg, 5, a, b, scales)
    gpu = _delta(y.cuda(), x.cuda(), seg.cuda(), 5, [t.cuda() for t in a], [t.cuda() for t in b], scales)
    assert rel_err(gpu.cpu(), cpu) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.02), (torch.float16, 0.06)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "x"])
def test_gpu_prefill_products_keep_fp32_precision(dtype, bound, adapter_dtype):
    """Prefill segments of 16-bit activations run on tensor cores with fp32 operands split into hi + lo 16-bit parts:
    an output may differ from the oracle's once-rounded fp32 value only where the split's ~2^-17 error crosses a
    rounding boundary (simulated: 0.4% of bf16 / 2.1% of fp16 elements at these shapes). Products of plain 16-bit
    parts would miss 52% / 89% of them, which the second assertion shows the bound catches."""
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    adapter_dtype = dtype if adapter_dtype == "x" else adapter_dtype
    gen = torch.Generator().manual_seed(5)
    tokens, K, N = 512, 4096, 1024
    a, b, scales = _adapters([16, 16, 7, 40], K, N, gen, "cuda", adapter_dtype)
    x = torch.randn(4 * tokens, K, generator=gen).to("cuda", dtype)
    y = torch.randn(4 * tokens, N, generator=gen).to("cuda", dtype)
    seg = torch.tensor([0, 2, 3, 1], dtype=torch.int32, device="cuda")
    got = _delta(y.clone(), x, seg, tokens, a, b, scales)
    want = _oracle(y, x, seg, tokens, a, b, scales)
    assert (got != want).float().mean().item() <= bound
    rows = torch.arange(4 * tokens, device="cuda") // tokens
    naive = y.float().clone()
    for s, adapter in enumerate(seg.tolist()):
        part = rows == s
        shrunk = (x[part].float() @ a[adapter].to(dtype).float().T).to(dtype).float()
        naive[part] += scales[adapter] * (shrunk @ b[adapter].to(dtype).float().T)
    assert (naive.to(dtype) != want).float().mean().item() > bound


@pytest.mark.gpu
def test_gpu_prefill_tiles_with_16bit_adapters_and_strided_output():
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    _check(70, torch.float16, [7, 16, 64], K=4231, N=131, segments=4, seed=12, adapter_dtype=torch.float16)
    _check(33, torch.bfloat16, [33, 1, 16], K=200, N=4099, segments=3, seed=13, adapter_dtype=torch.bfloat16)
    # more adapters than one launch holds (64): the prefill kernels' per-launch chunks share the partial-sum buffers
    _check(40, torch.bfloat16, [1 + i % 48 for i in range(70)], K=300, N=70, segments=72, seed=15)
    gen = torch.Generator().manual_seed(14)
    a, b, scales = _adapters([16, 5], 300, 70, gen, "cuda")
    x = torch.randn(2 * 64, 300, generator=gen).to("cuda", torch.bfloat16)
    y_wide = torch.randn(2 * 64, 140, generator=gen).to("cuda", torch.bfloat16)
    y = y_wide[:, ::2]  # column stride 2
    seg = torch.tensor([1, 0], dtype=torch.int32, device="cuda")
    want = _oracle(y.clone(), x, seg, 64, a, b, scales)
    between = y_wide[:, 1::2].clone()
    got = _delta(y, x, seg, 64, a, b, scales)
    assert got.data_ptr() == y_wide.data_ptr() and rel_err(got, want) <= TOL[torch.bfloat16]
    assert torch.equal(y_wide[:, 1::2], between)  # the columns between y's are not written


def _mixed_linear_case(device, dtype, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b, scales = _adapters([4, 16, 7], 37, 45, gen, device)
    x = torch.randn(3, tokens, 40, generator=gen).to(device, dtype)[..., 1:38]  # 3-D, non-contiguous
    weight = torch.randn(45, 37, generator=gen).to(device, dtype)
    bias = torch.randn(45, generator=gen).to(device, dtype)
    seg = torch.tensor([2, -1, 0], dtype=torch.int32, device=device)
    return x, weight, bias, seg, a, b, scales


@pytest.mark.parametrize("tokens", [1, 40])
def test_mixed_linear_is_the_base_product_then_the_deltas(tokens):
    """lora_mixed_linear (one dispatcher entry for a dense layer's mixed batch) gives exactly F.linear followed by
    lora_mixed_delta_ on its flattened rows, with and without a bias."""
    x, weight, bias, seg, a, b, scales = _mixed_linear_case(DEVICE, torch.float32, tokens, seed=20 + tokens)
    for bias_or_none in (bias, None):
        want = torch.nn.functional.linear(x, weight, bias_or_none)
        _delta(want.view(-1, 45), x.reshape(-1, 37), seg, tokens, a, b, scales)
        got = _mixed_linear(x, weight, bias_or_none, seg, tokens, a, b, scales)
        assert got.shape == (3, tokens, 45) and torch.equal(got, want)
        assert not torch.equal(got[0], torch.nn.functional.linear(x[0], weight, bias_or_none))  # deltas applied


def test_mixed_linear_bad_input_and_opcheck():
    x, weight, bias, seg, a, b, scales = _mixed_linear_case("cpu", torch.float32, 2, seed=3)
    with pytest.raises(RuntimeError, match=r"x must be \[batch, \.\.\., in_features\]"):
        _mixed_linear(x[0, 0], weight, bias, seg, 2, a, b, scales)
    with pytest.raises(RuntimeError, match="one of each per adapter"):
        _mixed_linear(x, weight, bias, seg, 2, a, b, scales[:1])
    adapters = cpp_ops.mixed_adapters(a, b, scales)
    torch.library.opcheck(torch.ops.fastpeft_ops.lora_mixed_linear.default,
                          (x.contiguous(), weight, bias, seg, 2, adapters.handle))
    inputs = [t.clone() for t in [x, weight, bias, seg] + a + b]
    _mixed_linear(x, weight, bias, seg, 2, a, b, scales)
    assert all(torch.equal(t, u) for t, u in zip([x, weight, bias, seg] + a + b, inputs))  # no input is written


@pytest.mark.gpu
def test_gpu_mixed_linear_is_the_base_product_then_the_deltas():
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    for tokens in (1, 64):
        x, weight, bias, seg, a, b, scales = _mixed_linear_case("cuda", torch.bfloat16, tokens, seed=tokens)
        want = torch.nn.functional.linear(x, weight, bias)
        _delta(want.view(-1, 45), x.reshape(-1, 37), seg, tokens, a, b, scales)
        assert torch.equal(_mixed_linear(x, weight, bias, seg, tokens, a, b, scales), want)


def _gpu_kernel_names(fn):
    """The CUDA kernels fn launches (torch.profiler), to show which composition a call took; None where the
    profiler records no kernel at all (CUPTI unavailable: under compute-sanitizer it cannot subscribe), and the
    callers then check the numbers only."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return " ".join(names) if names else None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,tokens", [(1, 1), (5, 1), (8, 1), (8, 2)])
def test_gpu_mixed_decode_gemv_rows_equal_their_own_adapter(dtype, rows, tokens):
    """lora_mixed_linear at decode sizes (<= 8 rows of 16-bit x, fp32 adapters of rank <= 32) runs the decode shrink
    and decode_gemv's mixed variant (each row's expand in the base GEMV's epilogue): two kernels, no cuBLAS. With one
    rank for every adapter each row is bit for bit what the one-adapter decode call (lora_linear over the same rows)
    gives that row, and a base-model row what it gives with B = 0; and the whole is the oracle within bf16 / fp16
    error. Shapes: Llama-8B q (several 16-column tiles a block at N = 14336), odd N, K a multiple of 8 only."""
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    for K, N, with_bias in ((4096, 4096, False), (4096, 14336, True), (14336, 4096, False), (1032, 37, True)):
        gen = torch.Generator().manual_seed(K + N + rows)
        a, b, scales = _adapters([16] * 5, K, N, gen, "cuda")
        x = torch.randn(rows // tokens, tokens, K, generator=gen).to("cuda", dtype)
        weight = (torch.randn(N, K, generator=gen) / K**0.5).to("cuda", dtype)
        bias = torch.randn(N, generator=gen).to("cuda", dtype) if with_bias else None
        seg_list = [(s + 5) % 6 - 1 for s in range(rows // tokens)]  # adapters 4, base (-1), 0, 1, 2, ...
        seg = torch.tensor(seg_list, dtype=torch.int32, device="cuda")
        with torch.no_grad():
            got = _mixed_linear(x, weight, bias, seg, tokens, a, b, scales)
            names = _gpu_kernel_names(lambda: _mixed_linear(x, weight, bias, seg, tokens, a, b, scales))
            assert names is None or ("decode_gemv_kernel" in names and "mixed_decode_shrink_kernel" in names
                                     and "gemm" not in names)
            assert got.shape == (rows // tokens, tokens, N) and got.dtype == dtype
            for s, adapter in enumerate(seg_list):
                if adapter >= 0:
                    alone = cpp_ops.lora_linear(x, weight, bias, a[adapter], b[adapter], scales[adapter])
                else:
                    alone = cpp_ops.lora_linear(x, weight, bias, a[0], torch.zeros_like(b[0]), 1.0)
                assert torch.equal(got[s], alone[s]), (K, N, s, adapter)
            want = torch.nn.functional.linear(x, weight, bias)
            _delta(want.view(-1, N), x.reshape(-1, K), seg, tokens, a, b, scales)
            assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.gpu
def test_gpu_mixed_decode_gemv_ranks_layouts_and_what_it_leaves_to_the_composition():
    """Ranks that differ (7: scalar B copies; 32: the variant's largest) against the oracle; a rank above 32, more
    than 64 adapters, fp32 x, more than 8 rows or unaligned rows take the composition (cuBLAS + the mixed kernels),
    with the oracle's numbers either way."""
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    gen = torch.Generator().manual_seed(40)
    K, N = 2048, 1000

    def case(ranks, rows, dtype=torch.bfloat16, offset=0):
        a, b, scales = _adapters(ranks, K, N, gen, "cuda")
        x = torch.randn(rows, K + offset, generator=gen).to("cuda", dtype)[:, offset:]
        weight = (torch.randn(N, K, generator=gen) / K**0.5).to("cuda", dtype)
        bias = torch.randn(N, generator=gen).to("cuda", dtype)
        seg = torch.tensor([(i * 7) % (len(ranks) + 1) - 1 for i in range(rows)], dtype=torch.int32, device="cuda")
        with torch.no_grad():
            got = _mixed_linear(x, weight, bias, seg, 1, a, b, scales)
            names = _gpu_kernel_names(lambda: _mixed_linear(x, weight, bias, seg, 1, a, b, scales))
        want = torch.nn.functional.linear(x, weight, bias)
        _delta(want, x, seg, 1, a, b, scales)
        assert rel_err(got, want) <= TOL[dtype]
        return None if names is None else "decode_gemv_kernel" in names

    assert case([7, 32, 16, 1], 8) in (True, None)
    assert case([7, 33, 16], 8) in (False, None)
    assert case([4 + i % 8 for i in range(65)], 8) in (False, None)
    assert case([16, 8], 8, dtype=torch.float32) in (False, None)
    assert case([16, 8], 9) in (False, None)
    assert case([16, 8], 4, offset=1) in (False, None)  # rows not on 16-byte boundaries


def test_adapter_set_is_a_handle_freed_with_its_object():
    """mixed_adapters registers the set under an int handle (one cheap argument per call); the set is freed with its
    MixedAdapterSet (or by free()), after which the operators refuse the handle by name, and it cannot be pickled
    (a handle means nothing in another process)."""
    import gc
    import pickle

    gen = torch.Generator().manual_seed(6)
    a, b, scales = _adapters([2, 3], 8, 5, gen, "cpu")
    x, y = torch.randn(4, 8), torch.zeros(4, 5)
    seg = torch.tensor([1, 0], dtype=torch.int32)
    adapters = cpp_ops.mixed_adapters(a, b, scales)
    handle = adapters.handle
    assert isinstance(handle, int) and len(adapters) == 2
    assert cpp_ops.mixed_adapters(a, b, scales).handle != handle  # every set its own
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(adapters)
    del adapters
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no adapter set has handle {handle}"):
        torch.ops.fastpeft_ops.lora_mixed_delta_(y, x, seg, 2, handle)
    again = cpp_ops.mixed_adapters(a, b, scales)
    again.free()
    again.free()  # idempotent
    with pytest.raises(RuntimeError, match="no adapter set has handle"):
        cpp_ops.lora_mixed_linear(x.view(2, 2, 8), torch.randn(5, 8), None, seg, 2, again)

"""ops/kernels/sgmv.py (mixed-adapter LoRA in one pass) against its oracle: odd shapes, several ranks padded
to one stack, base-model segments, one token per segment (decode) and many (prefill), non-contiguous input;
fp32 / fp16 in Triton's interpreter on CPU, bf16 on a GPU."""
import pytest
import torch

from fastpeft.ops import HAS_TRITON
from helpers import DEVICE, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
if HAS_TRITON:
    from fastpeft.ops.kernels import sgmv


def _stacks(n, ranks, K, N, gen, dtype=torch.float32):
    R = max(ranks)
    a = torch.zeros(n, R, K, dtype=dtype)
    b = torch.zeros(n, N, R, dtype=dtype)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, K, generator=gen) / K**0.5
        b[i, :, :r] = torch.randn(N, r, generator=gen)
    scales = torch.tensor([0.5 + i for i in range(n)], dtype=torch.float32)
    return a.to(DEVICE), b.to(DEVICE), scales.to(DEVICE)


@pytest.mark.parametrize("tokens", [1, 7, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_oracle(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    K, N, segments = 37, 45, 5
    a, b, scales = _stacks(3, [5, 16, 3], K, N, gen)
    x = torch.randn(segments * tokens, K + 3, generator=gen).to(DEVICE, dtype)[:, 2:2 + K]  # non-contiguous rows
    y = torch.randn(segments * tokens, N, generator=gen).to(DEVICE, dtype)
    seg = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32, device=DEVICE)
    want = sgmv.lora_mixed_delta_reference(y, x, seg, tokens, a, b, scales)
    got = sgmv.lora_mixed_delta_(y.clone(), x, seg, tokens, a, b, scales)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(got, want) <= tol
    base_rows = slice(tokens, 2 * tokens)
    assert torch.equal(got[base_rows], y[base_rows])  # "__base__" segment untouched


@pytest.mark.gpu
def test_bf16_on_gpu():
    if DEVICE != "cuda":
        pytest.skip("bf16 kernels: GPU only")
    gen = torch.Generator().manual_seed(0)
    K, N, tokens = 4096, 1024, 3
    a, b, scales = _stacks(8, [16] * 4 + [8] * 4, K, N, gen)
    x = torch.randn(32 * tokens, K, generator=gen).to(DEVICE, torch.bfloat16)
    y = torch.randn(32 * tokens, N, generator=gen).to(DEVICE, torch.bfloat16)
    seg = torch.randint(-1, 8, (32,), generator=gen).to(DEVICE, torch.int32)
    want = sgmv.lora_mixed_delta_reference(y, x, seg, tokens, a, b, scales)
    got = sgmv.lora_mixed_delta_(y.clone(), x, seg, tokens, a, b, scales)
    # one rounding to bf16 each, in a different order: at most a couple of bf16 ulps (2^-7 relative) apart
    diff = (got.float() - want.float()).abs()
    assert rel_err(got, want) <= 1e-3 and bool((diff <= want.float().abs() / 64 + 1e-2).all())


def test_shape_disagreement_is_refused():
    gen = torch.Generator().manual_seed(0)
    a, b, scales = _stacks(2, [4, 4], 8, 6, gen)
    x = torch.randn(6, 8).to(DEVICE)
    with pytest.raises(ValueError, match="segments"):
        sgmv.lora_mixed_delta_(torch.zeros(6, 6, device=DEVICE), x, torch.zeros(4, dtype=torch.int32, device=DEVICE),
                               2, a, b, scales)

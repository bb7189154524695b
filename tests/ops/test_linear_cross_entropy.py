"""ops/linear_cross_entropy.py against the oracle (full logits + F.cross_entropy): loss and every gradient,
odd shapes, bias, ignored rows, chunk sizes from 1 row to all rows, a trainable weight, any head module."""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.ops import linear_cross_entropy as lce
from helpers import rel_err


def _case(rows=37, hidden=45, vocab=4231, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=gen)
    keep = torch.rand(rows, generator=gen) > 0.3
    return h, w, b, t, keep.float()


def _oracle(h, w, b, t, rw):
    return lce.cross_entropy_sum_reference(F.linear(h, w, b), t, rw)


@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_path_matches_full_logits(chunk_rows, bias):
    h, w, b, t, rw = _case(bias=bias)
    leaves = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    ref = _oracle(h, w, b, t, rw)
    ref_grads = torch.autograd.grad(ref * 0.37, leaves)  # a non-unit upstream gradient reaches the scaling
    got = lce.linear_cross_entropy_sum(h, w, b, t, rw, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(got * 0.37, leaves)
    assert rel_err(got, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


def test_ignored_rows_get_exactly_zero_gradient_and_no_loss():
    h, w, b, t, rw = _case(rows=9, hidden=8, vocab=31)
    rw = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0, 0])
    h.requires_grad_()
    loss = lce.linear_cross_entropy_sum(h, w, b, t, rw, chunk_rows=4)
    (gh,) = torch.autograd.grad(loss, [h])
    assert torch.all(gh[rw == 0] == 0) and torch.all(gh[rw == 1].abs().sum(1) > 0)
    kept = rw.bool()
    assert rel_err(loss, F.cross_entropy(F.linear(h[kept], w, b), t[kept], reduction="sum")) <= 1e-6


def test_frozen_weight_gets_no_gradient_buffer_and_no_grad_mode_skips_the_backward_work():
    h, w, b, t, rw = _case(rows=5, hidden=8, vocab=31)
    h.requires_grad_()
    loss = lce.linear_cross_entropy_sum(h, w, b, t, rw)
    assert loss.requires_grad and not w.requires_grad
    with torch.no_grad():
        nograd = lce.linear_cross_entropy_sum(h, w, b, t, rw)
    assert not nograd.requires_grad and torch.equal(nograd, loss.detach())


def test_fp16_matches_the_fp16_oracle():
    """Half precision: the logits in fp16 as the unfused head computes them, the loss in fp32 as transformers'
    ForCausalLMLoss computes it; the gradient goes through fp16 GEMMs in both."""
    h, w, b, t, rw = _case(rows=19, hidden=32, vocab=257, dtype=torch.float16, bias=False)
    h.requires_grad_()
    ref = _oracle(h, w, b, t, rw)
    (rg,) = torch.autograd.grad(ref, [h])
    got = lce.linear_cross_entropy_sum(h, w, b, t, rw, chunk_rows=6)
    (gg,) = torch.autograd.grad(got, [h])
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(gg, rg) <= 2e-3  # fp16 rounding of the logits' gradient, in different order


@pytest.mark.parametrize("chunk_rows", [1, 8, 100])
def test_module_path_any_head(chunk_rows):
    """A head that is not a plain weight: every trainable parameter gets its gradient through the loss."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 53))
    head[0].weight.requires_grad_(False)  # a frozen part
    h = torch.randn(21, 12, requires_grad=True)
    t = torch.randint(0, 53, (21,))
    rw = (torch.rand(21) > 0.2).float()
    params = [p for p in head.parameters() if p.requires_grad]
    ref = lce.cross_entropy_sum_reference(head(h), t, rw)
    ref_grads = torch.autograd.grad(ref * 2.5, [h] + params)
    got = lce.module_cross_entropy_sum(h, head, t, rw, params, vocab=53, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(got * 2.5, [h] + params)
    assert rel_err(got, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


def test_bad_shapes_are_refused():
    h, w, b, t, rw = _case(rows=5, hidden=8, vocab=31)
    with pytest.raises(ValueError, match="rows"):
        lce.linear_cross_entropy_sum(h[None], w, b, t, rw)
    with pytest.raises(ValueError, match="rows"):
        lce.linear_cross_entropy_sum(h, w, b, t[:3], rw)


def test_default_chunk_is_bounded_by_the_vocabulary():
    assert lce.default_chunk_rows(128256) == lce.CHUNK_ELEMENTS // 128256
    assert lce.default_chunk_rows(1) == lce.CHUNK_ELEMENTS

"""LoRA dropout RNG: reproducible under torch.manual_seed, new masks every step, the same mask on an
activation-checkpoint recompute, and a different mask on every rank (the rank is folded into the seed)."""
import copy

import pytest
import torch

import fastpeft
from fastpeft.nn import _rng
from fastpeft.ops.dropout import lora_dropout_mask
from helpers import random_ids, rel_err, set_settings, tiny_model

BACKENDS = ["triton", "reference"]  # triton: the Philox-mask kernels (interpreted on CPU); reference: nn.Dropout


def _patched(backend, monkeypatch, p=0.25, seed=3):
    set_settings(monkeypatch, backend=backend)  # read by each layer when it is built
    torch.manual_seed(seed)
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)
    return fastpeft.patch(tiny_model("llama", seed=2), cfg)


def _grads(model, ids, seed):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fold_rank_is_a_bijection_per_rank_and_separates_ranks():
    draws = torch.randint(0, _rng.SEED_MODULUS, (64,)).tolist()
    for rank in range(4):
        seeds = [_rng.fold_rank(d, rank) for d in draws]
        assert len(set(seeds)) == len(set(draws))
        assert all(0 <= s < _rng.SEED_MODULUS for s in seeds)
    assert _rng.fold_rank(draws[0], 0) == draws[0]  # single process: the plain draw
    assert len({_rng.fold_rank(draws[0], r) for r in range(64)}) == 64
    # the tensor variant (torch.compile) gives the same seed as the int one for the same generator state
    torch.manual_seed(5)
    a = _rng.dropout_seed()
    torch.manual_seed(5)
    assert int(_rng.dropout_seed_tensor()) == a


def test_rank_changes_the_seed(monkeypatch):
    torch.manual_seed(9)
    s0 = _rng.dropout_seed()
    monkeypatch.setattr(_rng, "current_rank", lambda: 1)
    torch.manual_seed(9)
    s1 = _rng.dropout_seed()
    assert s0 != s1
    # and so the mask the kernels regenerate differs
    m0 = lora_dropout_mask((7, 33), 0.3, s0, "cpu")
    m1 = lora_dropout_mask((7, 33), 0.3, s1, "cpu")
    assert not torch.equal(m0, m1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_grads_new_step_new_mask(backend, monkeypatch):
    model = _patched(backend, monkeypatch)
    ids = random_ids(seed=4)
    loss1, g1 = _grads(model, ids, seed=123)
    loss2, g2 = _grads(model, ids, seed=123)
    assert torch.equal(loss1, loss2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    # no reseed: the generator moved on, so the next step draws other masks
    model.zero_grad(set_to_none=True)
    loss3 = model(input_ids=ids, labels=ids).loss
    assert not torch.equal(loss3.detach(), loss1)
    # dropout really is on: eval mode (no dropout) gives yet another loss
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, labels=ids).loss, loss1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recompute_sees_the_same_mask(backend, reentrant, monkeypatch):
    """p > 0, same seed: gradients with activation checkpointing on equal those with it off."""
    plain = _patched(backend, monkeypatch)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = random_ids(seed=6)
    loss_a, expected = _grads(plain, ids, seed=77)
    loss_b, got = _grads(ckpt, ids, seed=77)
    assert ckpt.model.layers[0].gradient_checkpointing and ckpt.is_gradient_checkpointing
    assert torch.equal(loss_a, loss_b)
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        assert rel_err(grad, expected[name]) <= 1e-6, name
    # and the comparison can fail: another seed gives other gradients
    _, other = _grads(plain, ids, seed=78)
    name = next(n for n in other if "lora_A" in n)
    assert rel_err(other[name], expected[name]) > 1e-3


def test_checkpoint_recompute_draws_the_seed_again(monkeypatch):
    """The kernel path really does draw a seed in the recompute (so the test above exercises the restore)."""
    model = _patched("triton", monkeypatch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    drawn = []
    real = _rng.dropout_seed

    def spy():
        drawn.append(real())
        return drawn[-1]

    import fastpeft.nn.layer as nn_layer  # where the dense LoRA-pair path (AdapterLayer._forward_lora_pair) draws it

    monkeypatch.setattr(nn_layer, "dropout_seed", spy)
    _grads(model, random_ids(seed=6), seed=77)
    n_layers = 3 * 2  # q, v, down in 2 decoder layers
    assert len(drawn) == 2 * n_layers  # first forward + recompute
    first, recompute = drawn[:n_layers], drawn[n_layers:]
    assert recompute == first[3:] + first[:3]  # backward recomputes decoder layer 1, then layer 0
    assert len(set(drawn[:n_layers])) == n_layers


def test_dropout_seed_is_refused_inside_a_cuda_graph_capture(monkeypatch):
    """A seed drawn while a CUDA graph is captured would be replayed forever: a clear error instead (also from the
    compiled custom ops, which read the seed at run time)."""
    from fastpeft import ops
    from fastpeft.nn import _rng

    assert ops.graph_capturing() is False or torch.cuda.is_available()
    # graph_capturing() asks torch's own capture query once CUDA is initialised (ops/__init__.py): fake both
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(ops, "_STREAM_CAPTURING", lambda: True)
    assert ops.graph_capturing()
    for draw in (_rng.dropout_seed, _rng.dropout_draw):
        with pytest.raises(RuntimeError, match=r"LoRA dropout \(lora_dropout > 0\) cannot run inside a CUDA graph"):
            draw()
    if ops.HAS_TRITON:
        from fastpeft.ops.kernels import custom_ops

        with pytest.raises(RuntimeError, match="cannot run inside a CUDA graph"):
            custom_ops._seed_value(torch.tensor(5))
        assert custom_ops._seed_value(None) is None  # no dropout: nothing to refuse

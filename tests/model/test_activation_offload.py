"""enable_activation_offload: gradients identical to the plain model's with reentrant and non-reentrant
checkpointing and without, what gets offloaded is what checkpointing stores, hooks removed cleanly, errors.
On CPU the offloader is told to copy CPU tensors too, which runs the same pack / unpack / prefetch
bookkeeping; the GPU suite checks the streams and the memory saving."""
import copy

import pytest
import torch

import fastpeft
from fastpeft import activation_offload as ao
from helpers import random_ids, rel_err, tiny_model


def _model(checkpointing, dropout=0.1):
    model = tiny_model("llama", seed=3).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    cfg = fastpeft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return fastpeft.patch(model, cfg)


def _grads(model, seed=0):
    torch.manual_seed(seed)  # same dropout masks in both runs
    ids = random_ids(batch=2, seq=9)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant", None])
def test_same_gradients_and_checkpoint_inputs_are_what_moves(checkpointing):
    plain = _model(checkpointing)
    offloaded = fastpeft.enable_activation_offload(copy.deepcopy(plain), min_bytes=0)
    offloaded.__dict__[ao.STATE_ATTR].host_copies_of_cpu_tensors = True
    ref_loss, ref = _grads(plain)
    loss, got = _grads(offloaded)
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and got
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    offloader = offloaded.__dict__[ao.STATE_ATTR].last
    assert offloader.next_key > 0 and not offloader.entries  # every offloaded tensor came back exactly once
    if checkpointing is not None:
        # the checkpointed layers' inputs (batch × seq × hidden) are among what moved
        assert offloader.offloaded_bytes >= 2 * 2 * 9 * 48 * 4


def test_no_grad_and_eval_forwards_offload_nothing():
    model = fastpeft.enable_activation_offload(_model("non-reentrant"), min_bytes=0)
    model.__dict__[ao.STATE_ATTR].host_copies_of_cpu_tensors = True
    with torch.no_grad():
        model(input_ids=random_ids())
    assert model.__dict__[ao.STATE_ATTR].last is None


def test_hooks_are_removed_even_when_the_forward_raises():
    model = _model(None)
    hooks_before = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    fastpeft.enable_activation_offload(model, min_bytes=0)
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), 10**6))  # out-of-range token id
    # the saved-tensor hooks of the failed forward are gone (the top of autograd's hook stack is empty)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    fastpeft.disable_activation_offload(model)
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks_before
    assert not fastpeft.activation_offload_enabled(model)


def test_bad_input():
    model = _model("reentrant")
    with pytest.raises(ValueError, match="min_bytes"):
        fastpeft.enable_activation_offload(model, min_bytes=-1)
    with pytest.raises(ValueError, match="not enabled"):
        fastpeft.disable_activation_offload(model)
    fastpeft.enable_activation_offload(model)
    with pytest.raises(ValueError, match="already enabled"):
        fastpeft.enable_activation_offload(model)
    with pytest.raises(TypeError, match="nn.Module"):
        fastpeft.enable_activation_offload(lambda x: x)


def test_warns_without_checkpointing():
    with pytest.warns(UserWarning, match="without gradient checkpointing"):
        fastpeft.enable_activation_offload(tiny_model("llama").train())


def test_torch_compile_of_an_offloaded_model():
    """No dropout here: compiled dropout draws other masks than eager (docs/compile-and-rng.md), and the point is
    that the offloaded tensors come back."""
    plain = _model("non-reentrant", dropout=0.0)
    offloaded = fastpeft.enable_activation_offload(copy.deepcopy(plain), min_bytes=0)
    offloaded.__dict__[ao.STATE_ATTR].host_copies_of_cpu_tensors = True
    compiled = torch.compile(offloaded)
    ids = random_ids(batch=2, seq=9)
    torch.manual_seed(0)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss, ref = _grads(plain)
    assert rel_err(loss.detach(), ref_loss) <= 1e-5
    got = {n: p.grad for n, p in offloaded.named_parameters() if p.grad is not None}
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-5, name
    assert offloaded.__dict__[ao.STATE_ATTR].last.next_key > 0

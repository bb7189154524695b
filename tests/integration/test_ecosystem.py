"""fastpeft inside the Hugging Face ecosystem: gradient checkpointing and transformers' Trainer."""
import copy

import pytest
import torch
import transformers

import fastpeft
from helpers import VOCAB, random_ids, rel_err, tiny_model


def _cfg(kind):
    if kind == "lora":
        return fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                   init_lora_weights=False)
    return fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False)


def _adapter_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_grads_match(kind, reentrant, when):
    base = tiny_model("llama", seed=2)
    ids = random_ids(seed=4)
    torch.manual_seed(11)
    plain = fastpeft.patch(copy.deepcopy(base), _cfg(kind))
    expected = _adapter_grads(plain, ids)

    model = copy.deepcopy(base)
    gc_kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if when == "before":
        model.gradient_checkpointing_enable(**gc_kwargs)
    torch.manual_seed(11)
    fastpeft.patch(model, _cfg(kind))
    if when == "after":
        model.gradient_checkpointing_enable(**gc_kwargs)
    assert model.is_gradient_checkpointing
    # the same adapter weights as the plain model (both drawn from seed 11, but make sure)
    with torch.no_grad():
        for (n, p), (n2, q) in zip(model.named_parameters(), plain.named_parameters()):
            assert n == n2
            p.copy_(q)
    got = _adapter_grads(model, ids)
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        assert grad is not None, name
        assert rel_err(grad, expected[name]) <= 1e-5, name
    # checkpointing really ran: the decoder layers went through the checkpoint wrapper
    assert model.model.layers[0].gradient_checkpointing


@pytest.mark.parametrize("when", ["before", "after"])
def test_reentrant_checkpointing_without_hf_input_grads(when):
    """transformers 5 makes the embeddings' output require grad itself; fastpeft must not rely on that."""
    base = tiny_model("llama", seed=2)
    ids = random_ids(seed=4)
    torch.manual_seed(11)
    plain = fastpeft.patch(copy.deepcopy(base), _cfg("lora"))
    expected = _adapter_grads(plain, ids)
    model = copy.deepcopy(base)
    if when == "before":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.disable_input_require_grads()
    fastpeft.patch(model, _cfg("lora"))
    if when == "after":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.disable_input_require_grads()
    model.load_state_dict(plain.state_dict())
    got = _adapter_grads(model, ids)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad is not None, name
        assert rel_err(grad, expected[name]) <= 1e-5, name


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_reduces_loss_and_trains_only_adapters(tmp_path, gradient_checkpointing):
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable and all("lora_" in n for n in trainable)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=20,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if gradient_checkpointing else None,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_RandomTokens())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) >= 15
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first and min(losses[-3:]) < min(losses[:3]), losses  # ~4.56 -> ~4.0 in 20 steps
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name].detach(), value), name
        assert not params[name].requires_grad, name
    changed = [n for n, v in trainable.items() if not torch.equal(params[n].detach(), v)]
    assert len(changed) == len(trainable)
    assert isinstance(model.model.layers[0].self_attn.q_proj, fastpeft.LoraLinear)

"""fastpeft with TRL's SFTTrainer and transformers' Trainer (gradient accumulation) on tiny in-memory data.

The tokenizer is built in memory (a character-level ``tokenizers`` WordLevel model): nothing is downloaded.
"""
import copy

import pytest
import torch
import transformers

import fastpeft
from helpers import VOCAB, rel_err, tiny_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = ["the cat sat on the mat", "a dog ran in the fog", "we fine tune tiny models", "low rank adapters train fast",
         "quiet rivers bend slowly", "green hills roll on", "stars fade at dawn", "bread and tea at noon"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz "))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _lora_model():
    torch.manual_seed(0)
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return fastpeft.patch(tiny_model("llama", seed=1), cfg)


def _sft_trainer(model, out_dir, steps):
    """SFTTrainer on the in-memory WORDS, CPU, fp32, constant LR, a loss logged every step."""
    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, max_length=32, packing=False, seed=0, bf16=False, fp16=False,
    )
    return trl.SFTTrainer(model=model, args=args, processing_class=_tokenizer(),
                          train_dataset=datasets.Dataset.from_dict({"text": WORDS}))


def test_sft_trainer_trains_only_the_adapter(tmp_path):
    model = _lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    trainer = _sft_trainer(model, tmp_path, steps=4)
    assert trainer.model is model  # no PEFT wrapping: our layers are trained as they are
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name].detach(), value), name
    assert all(not torch.equal(params[n].detach(), v) for n, v in trainable.items())
    assert isinstance(model.model.layers[0].mlp.down_proj, fastpeft.LoraLinear)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=10):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, tmp_path, batch, accumulation):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Batch 2 x 2 accumulation steps = batch 4 (dropout 0, SGD so the update is linear in the gradient)."""
    big = _lora_model()
    acc = copy.deepcopy(big)
    start = {n: p.detach().clone() for n, p in big.named_parameters() if p.requires_grad}
    loss_big = _train(big, tmp_path / "big", batch=4, accumulation=1)
    loss_acc = _train(acc, tmp_path / "acc", batch=2, accumulation=2)
    assert len(loss_big) == len(loss_acc) == 2
    for a, b in zip(loss_acc, loss_big):
        assert abs(a - b) <= 1e-4 * abs(b), (loss_acc, loss_big)
    params = dict(acc.named_parameters())
    moved = 0
    for name, value in big.named_parameters():
        if name in start:
            assert rel_err(params[name].detach(), value.detach()) <= 1e-5, name
            moved += not torch.equal(value.detach(), start[name])
    assert moved == len(start)  # every adapter tensor was updated (the comparison is not vacuous)


def test_sft_trainer_with_fused_loss_enabled_trains_like_without(tmp_path):
    """TRL's SFTTrainer installs its own fused LM head over the model's forward: with fastpeft's fused loss
    enabled underneath, training runs and logs the same losses as the plain patched model."""
    def run(model, out):
        trainer = _sft_trainer(model, out, steps=3)
        trainer.train()
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]

    plain = _lora_model()
    fused = fastpeft.enable_fused_loss(copy.deepcopy(plain), backend="fastpeft", chunk_rows=5)
    a, b = run(plain, tmp_path / "plain"), run(fused, tmp_path / "fused")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(y), (a, b)

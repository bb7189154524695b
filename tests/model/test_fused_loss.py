"""enable_fused_loss: the training loss and every gradient equal the unfused model's (fp32 <= 1e-5) on each
architecture, with ignored labels, padding, num_items_in_batch, shift_labels, several head types (plain,
tied, LoRA-adapted, modules_to_save, 4-bit base below it); logits kept where they are needed; clear errors."""
import copy

import pytest
import torch
import transformers

import fastpeft
from helpers import ARCHS, VOCAB, random_ids, rel_err, tiny_model


def _batch(seed=1):
    ids = random_ids(batch=3, seq=11, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    labels = ids.clone()
    labels[1, :3] = -100
    labels[0, :5] = -100  # a masked prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    loss = out.loss if not isinstance(out, tuple) else out[0]
    (loss * 3.0).backward()  # a non-unit upstream gradient (e.g. gradient accumulation) must reach the head
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def _compare(model, batch, chunk_rows=5, **extra):
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft", chunk_rows=chunk_rows)
    _, ref_loss, ref_grads = _loss_and_grads(model, batch, **extra)
    out, loss, grads = _loss_and_grads(fused, batch, **extra)
    assert rel_err(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name
    return out


def _lora(arch, **kw):
    model = tiny_model(arch, seed=2).train()
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)
    return fastpeft.patch(model, cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_model_same_loss_and_gradients(arch):
    out = _compare(_lora(arch), _batch())
    assert out.logits is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_fine_tuning_trains_the_head_tied_or_not(arch):
    """Every parameter trains: the head's weight (tied to the embeddings on GPT-2) gets its gradient too."""
    model = tiny_model(arch, seed=3).train()
    _compare(model, _batch())


def test_num_items_in_batch_and_shift_labels_and_ignore_index():
    model = _lora("llama")
    batch = _batch()
    _compare(model, batch, num_items_in_batch=torch.tensor(40))
    shifted = dict(batch)
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    shifted["shift_labels"] = shift.clone()
    _compare(model, shifted)
    b2 = dict(batch)
    b2["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 7)
    _compare(model, b2, ignore_index=7)


def test_lora_on_the_head_runs_the_head_module():
    model = tiny_model("qwen2", seed=4).train()
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = fastpeft.patch(model, cfg)
    assert isinstance(model.lm_head, fastpeft.LoraLinear)
    _compare(model, _batch(), chunk_rows=4)


def test_modules_to_save_head_gets_its_gradient():
    model = tiny_model("mistral", seed=5).train()
    cfg = fastpeft.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = fastpeft.patch(model, cfg)
    _compare(model, _batch(), chunk_rows=7)


def test_patching_after_enabling_is_picked_up():
    model = fastpeft.enable_fused_loss(tiny_model("llama", seed=6).train(), backend="fastpeft", chunk_rows=4)
    reference = fastpeft.patch(copy.deepcopy(fastpeft.disable_fused_loss(copy.deepcopy(model))),
                               fastpeft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    fastpeft.patch(model, fastpeft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    # same adapter weights in both (patched from the same seed state is not guaranteed: copy them)
    reference.load_state_dict(model.state_dict())
    _, ref_loss, ref_grads = _loss_and_grads(reference, _batch())
    out, loss, grads = _loss_and_grads(model, _batch())
    assert out.logits is None and rel_err(loss, ref_loss) <= 1e-5
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name


def test_eval_mode_no_labels_and_logits_to_keep_run_the_models_own_forward():
    model = _lora("llama")
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft")
    batch = _batch()
    with torch.no_grad():
        model.eval(), fused.eval()
        a, b = model(**batch), fused(**batch)
        assert b.logits is not None and torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        model.train(), fused.train()
        ids = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(model(**ids).logits, fused(**ids).logits)
        assert fused(**ids, logits_to_keep=1).logits.shape[1] == 1


def test_return_dict_false_gives_the_loss_first():
    model = _lora("gpt2")
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft")
    out = fused(**_batch(), return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    assert rel_err(out[0].detach(), model(**_batch()).loss.detach()) <= 1e-5


def test_no_grad_training_mode_gives_the_same_loss():
    model = _lora("phi3")
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft", chunk_rows=3)
    with torch.no_grad():
        assert rel_err(fused(**_batch()).loss, model(**_batch()).loss) <= 1e-5


def test_all_ignored_labels_give_nan_like_transformers():
    model = _lora("llama")
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft")
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert torch.isnan(model(**batch).loss) and torch.isnan(fused(**batch).loss)


def test_disable_restores_the_forward():
    model = tiny_model("llama").train()
    fastpeft.enable_fused_loss(model)
    assert fastpeft.fused_loss_enabled(model) and model(**_batch()).logits is None
    fastpeft.disable_fused_loss(model)
    assert not fastpeft.fused_loss_enabled(model) and "forward" not in model.__dict__
    assert model(**_batch()).logits is not None


def test_bad_input_is_refused_clearly():
    model = tiny_model("llama").train()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.enable_fused_loss(model, backend="triton")
    with pytest.raises(ValueError, match="chunk_rows"):
        fastpeft.enable_fused_loss(model, chunk_rows=0)
    with pytest.raises(ValueError, match="not enabled"):
        fastpeft.disable_fused_loss(model)
    fastpeft.enable_fused_loss(model)
    with pytest.raises(ValueError, match="already enabled"):
        fastpeft.enable_fused_loss(model)
    wrapped = tiny_model("llama")
    original = wrapped.forward
    wrapped.forward = lambda *a, **k: original(*a, **k)
    with pytest.raises(ValueError, match="already replaced"):
        fastpeft.enable_fused_loss(wrapped)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                             ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="model_type 'opt'"):
        fastpeft.enable_fused_loss(opt)
    with pytest.raises(ValueError, match="ForCausalLM"):
        fastpeft.enable_fused_loss(transformers.LlamaModel(tiny_model("llama").config))


def test_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="get_base_model"):
        fastpeft.enable_fused_loss(pm)


@pytest.mark.skipif(fastpeft.fused_loss.HAS_LIGER, reason="liger_kernel is installed here")
def test_liger_backend_without_liger_is_refused():
    with pytest.raises(ValueError, match="liger_kernel"):
        fastpeft.enable_fused_loss(tiny_model("llama"), backend="liger")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=10):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: 1 + i % 4] = -100  # prompts of different lengths: num_items_in_batch differs per micro-batch
        return {"input_ids": self.ids[i], "labels": labels}


def train_with_trainer(model, out_dir):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_with_gradient_accumulation_trains_the_same_weights(tmp_path):
    """HF Trainer passes num_items_in_batch through the forward's **kwargs; 2 x 2 accumulation steps."""
    base = _lora("llama")
    fused = fastpeft.enable_fused_loss(copy.deepcopy(base), backend="fastpeft", chunk_rows=6)
    loss_ref = train_with_trainer(base, tmp_path / "ref")
    loss_fused = train_with_trainer(fused, tmp_path / "fused")
    assert len(loss_ref) == len(loss_fused) == 2
    for a, b in zip(loss_fused, loss_ref):
        assert abs(a - b) <= 1e-5 * abs(b)
    params = dict(fused.named_parameters())
    for name, p in base.named_parameters():
        if p.requires_grad:
            assert rel_err(params[name].detach(), p.detach()) <= 1e-5, name


def test_torch_compile_of_a_model_with_the_fused_loss():
    """torch.compile(model) runs the fused forward (graph breaks around the chunk loop are allowed) with the same
    loss and gradients."""
    model = _lora("llama")
    reference = copy.deepcopy(model)
    fastpeft.enable_fused_loss(model, backend="fastpeft", chunk_rows=5)
    compiled = torch.compile(model)
    batch = _batch()
    out = compiled(**batch)
    out.loss.backward()
    ref = reference(**batch).loss
    ref.backward()
    assert out.logits is None and rel_err(out.loss.detach(), ref.detach()) <= 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, p in reference.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[name], p.grad) <= 1e-5, name

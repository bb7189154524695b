"""Prompt tuning, prefix tuning and P-tuning on causal LMs against PEFT's PeftModelForCausalLM (encoder-decoder
models: test_prompt_learning_seq2seq.py): loss, logits and
prompt-encoder gradients (fp32 <= 1e-5), greedy generate(), initial values, PEFT's file format both ways,
trainable-parameter counts, unpatch / disable, and the errors for what is not supported."""
import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastpeft
import fastpeft.config as C
from helpers import assert_same_snapshot, random_ids, rel_err, state_snapshot, tiny_model

TOL = 1e-5
ARCHS = ["llama", "gpt2"]
VIRTUAL = 4
# (config class name, extra fields): every encoder PEFT has for causal LMs
CASES = {
    "prompt-tuning": ("PromptTuningConfig", {}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-projection": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=16)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
}


def _configs(case, **more):
    cls, extra = CASES[case]
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, **extra, **more)
    return getattr(peft, cls)(**kw), getattr(fastpeft, cls)(**kw)


def _peft_params(model):
    # PeftModel names them base_model.<...> only for the base; the encoder is prompt_encoder.<adapter>.<...>
    return {n: p for n, p in model.named_parameters() if n.startswith("prompt_encoder.")}


def _pair(arch, case, **more):
    """PEFT and fastpeft models on the same base with the same prompt-encoder values (PEFT's copied into ours)."""
    base = tiny_model(arch, seed=1)
    pcfg, fcfg = _configs(case, **more)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = fastpeft.patch(copy.deepcopy(base), fcfg)
    theirs_params = _peft_params(theirs)
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_params.keys() == theirs_params.keys()  # PEFT's parameter names
    with torch.no_grad():
        for name, p in ours_params.items():
            p.copy_(theirs_params[name] + 0.01 * torch.randn_like(p))  # away from the init, the same on both
            theirs_params[name].copy_(p)
    return theirs, ours


def _batch(arch, seed=1):
    ids = random_ids(batch=3, seq=9, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# -- numbers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_logits_and_gradients_as_peft(arch, case):
    theirs, ours = _pair(arch, case)
    ids, mask, labels = _batch(arch)
    out_t = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    extra = 0 if case.startswith("prefix") else VIRTUAL  # prompt tuning / P-tuning: logits of the virtual tokens too
    assert out_o.logits.shape == out_t.logits.shape == (3, 9 + extra, 97)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    assert rel_err(out_o.loss, out_t.loss) <= TOL
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads = {n: p.grad for n, p in _peft_params(theirs).items()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys() and all(g is not None for g in ours_grads.values())
    for name, grad in ours_grads.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, theirs_grads[name]) <= TOL, name
    # the base model is frozen, as PEFT freezes it
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("prompt_encoder."))


@pytest.mark.parametrize("case", ["prompt-tuning", "prefix", "p-tuning-lstm"])
def test_bf16_model_gives_pefts_numbers(case):
    # the prompt / prefix is cast to the model's dtype as PEFT casts it; the encoder itself stays fp32
    theirs, ours = _pair("llama", case)
    theirs.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    for model in (theirs, ours):
        for p in model.prompt_encoder.parameters():
            p.data = p.data.float()
    ids, mask, labels = _batch("llama")
    out_t = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out_o.logits.dtype == torch.bfloat16
    assert torch.equal(out_o.logits, out_t.logits)
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads = {n: p.grad for n, p in _peft_params(theirs).items()}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p.grad, theirs_grads[name]), name


@pytest.mark.parametrize("case", ["prompt-tuning", "prefix", "p-tuning-mlp"])
def test_positional_ids_no_mask_and_inputs_embeds(case):
    theirs, ours = _pair("llama", case)
    ids, _, _ = _batch("llama")
    assert rel_err(ours(ids).logits, theirs(input_ids=ids).logits) <= TOL
    embeds = ours.get_input_embeddings()(ids).detach()
    assert rel_err(ours(inputs_embeds=embeds).logits, theirs(inputs_embeds=embeds).logits) <= TOL


@pytest.mark.parametrize("case", ["prompt-tuning", "prefix"])
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma", "phi3"])
def test_other_architectures(arch, case):
    test_same_loss_logits_and_gradients_as_peft(arch, case)
    _check_generate(arch, case, prompt_matters=False)  # tiny random Gemma repeats one token with or without prompt


def _greedy_through_forward(model, ids, mask, steps, prefix):
    """Greedy decoding by full forward passes (no cache), with the position ids generate() passes: the reference
    generate() must reproduce."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) if prefix else None  # others drop them
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def _assert_pefts_generate_where_it_is_right(theirs, case, ids, mask, want):
    """PEFT 0.21.2's own generate() is wrong with transformers 5.x, which calls the KV cache "cache": PEFT's
    prepare_inputs_for_generation looks for "past_key_values", so with the cache it adds the prompt again at every
    step (prompt tuning / P-tuning) and its prefix is overridden by generate's cache (prefix tuning, also with
    use_cache=False, where the cache of the previous step comes back). Its generate without a cache is right for
    prompt tuning / P-tuning (no cache at all), so there fastpeft must give its tokens."""
    if not case.startswith("prefix"):
        with torch.no_grad():
            assert torch.equal(theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=want.shape[1] -
                                               ids.shape[1], do_sample=False, use_cache=False), want)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_gives_pefts_tokens(arch, case):
    """generate() gives the tokens of greedy decoding through PEFT's forward (full passes, no cache)."""
    _check_generate(arch, case, prompt_matters=True)


def _check_generate(arch, case, prompt_matters):
    theirs, ours = _pair(arch, case)
    for model in (theirs, ours):
        model.generation_config.eos_token_id = None  # 6 tokens on every row (no early stop / padding)
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.mul_(30)  # a prompt strong enough to change the generated tokens
    ids, mask, _ = _batch(arch, seed=4)
    want = _greedy_through_forward(theirs, ids, mask, 6, case.startswith("prefix"))
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        uncached = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 use_cache=False)
    assert got.shape == (3, 9 + 6)
    assert torch.equal(got, want) and torch.equal(uncached, want)
    _assert_pefts_generate_where_it_is_right(theirs, case, ids, mask, want)
    if prompt_matters:  # the prompt changes what is generated (the comparison would pass vacuously otherwise)
        with torch.no_grad(), fastpeft.disable_adapter(ours):
            plain = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert not torch.equal(plain, got)


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_initial_values_and_counts_as_peft(case, capsys):
    base = tiny_model("gpt2", seed=1)
    pcfg, fcfg = _configs(case, **({"init_weights": "zero"} if case == "prefix-projection" else {}))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    torch.manual_seed(7)
    ours = fastpeft.patch(copy.deepcopy(base), fcfg)
    theirs_params = _peft_params(theirs)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, theirs_params[name]), name
    assert fastpeft.get_nb_trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    theirs.print_trainable_parameters()
    want = capsys.readouterr().out
    fastpeft.print_trainable_parameters(ours)
    assert capsys.readouterr().out == want and "trainable params" in want


def _tiny_tokenizer(folder):
    """A word-level tokenizer saved locally (nothing is downloaded); ids inside the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "classify the sentiment of this review please".split()
    vocab = {"[UNK]": 0, **{w: 10 + 7 * i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    return str(folder), vocab


@pytest.mark.parametrize("text,virtual", [("classify the sentiment", 7), ("classify the sentiment of this review", 4)],
                         ids=["repeated", "cut"])
def test_text_init_from_a_local_tokenizer(tmp_path, text, virtual):
    path, vocab = _tiny_tokenizer(tmp_path / "tok")
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=virtual, prompt_tuning_init="TEXT",
              prompt_tuning_init_text=text, tokenizer_name_or_path=path)
    base = tiny_model("llama", seed=1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**kw))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.PromptTuningConfig(**kw))
    weight = ours.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight, theirs.prompt_encoder["default"].embedding.weight)
    ids = [vocab[w] for w in text.split()]
    ids = (ids * virtual)[:virtual]
    assert torch.equal(weight, base.get_input_embeddings().weight[ids])
    assert weight.requires_grad and weight.dtype == torch.float32


def test_sample_vocab_init_matches_peft_for_the_same_seed():
    base = tiny_model("llama", seed=1)
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**kw))
    torch.manual_seed(11)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.PromptTuningConfig(**kw))
    weight = ours.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight, theirs.prompt_encoder["default"].embedding.weight)
    rows = base.get_input_embeddings().weight
    assert all(any(torch.equal(w, r) for r in rows) for w in weight)  # every row is a word embedding


# -- files ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_our_save_is_pefts_and_loads_in_peft(tmp_path, arch, case):
    theirs, ours = _pair(arch, case)
    theirs.save_pretrained(str(tmp_path / "peft"))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert our_json == peft_json  # num_layers / token_dim / heads / encoder_hidden_size filled in as PEFT does
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert list(ours_file) == list(peft_file) == ["prompt_embeddings"]
    assert rel_err(ours_file["prompt_embeddings"], peft_file["prompt_embeddings"]) <= TOL
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch, seed=1), str(tmp_path / "ours"))
    ids, mask, _ = _batch(arch)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids, attention_mask=mask).logits,
                       ours(input_ids=ids, attention_mask=mask).logits) <= TOL


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_load_pefts_save(tmp_path, arch, case):
    theirs, _ = _pair(arch, case)
    theirs.save_pretrained(str(tmp_path))
    fresh = tiny_model(arch, seed=1)
    ours = fastpeft.load_adapter(fresh, str(tmp_path))
    assert ours is fresh
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False: frozen, as PEFT loads it
    ours.generation_config.eos_token_id = theirs.generation_config.eos_token_id = None  # 4 tokens on every row
    ids, mask, _ = _batch(arch)
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids, attention_mask=mask).logits,
                       theirs(input_ids=ids, attention_mask=mask).logits) <= TOL
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    want = _greedy_through_forward(theirs, ids, mask, 4, case.startswith("prefix"))
    assert torch.equal(got, want)
    _assert_pefts_generate_where_it_is_right(theirs, case, ids, mask, want)
    # saving the loaded adapter again writes the same files
    fastpeft.save_adapter(ours, str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "adapter_config.json").read_text())
    assert torch.equal(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))["prompt_embeddings"],
                       load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"])


@pytest.mark.parametrize("case", ["prompt-tuning", "prefix"])
def test_load_trainable_where_the_file_holds_the_trained_table(tmp_path, case):
    # prompt tuning / prefix tuning without projection: the saved prompt_embeddings is the trained table itself
    theirs, _ = _pair("llama", case)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.load_adapter(tiny_model("llama", seed=1), str(tmp_path), is_trainable=True)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    ids, mask, labels = _batch("llama")
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, theirs(input_ids=ids, attention_mask=mask).logits) <= TOL
    out.loss.backward()
    assert ours.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot be reloaded with is_trainable=False in place"):
        fastpeft.load_adapter(ours, str(tmp_path))


@pytest.mark.parametrize("case", ["prefix-projection", "p-tuning-mlp"])
def test_load_trainable_is_refused_where_the_encoder_is_not_saved(tmp_path, case):
    theirs, _ = _pair("llama", case)
    theirs.save_pretrained(str(tmp_path))
    fresh = tiny_model("llama", seed=1)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="is_trainable=True.*only the encoder's output"):
        fastpeft.load_adapter(fresh, str(tmp_path), is_trainable=True)
    assert_same_snapshot(before, state_snapshot(fresh))


def test_load_again_into_the_loaded_adapter(tmp_path):
    theirs, _ = _pair("llama", "p-tuning-mlp")
    theirs.save_pretrained(str(tmp_path / "a"))
    with torch.no_grad():
        for p in _peft_params(theirs).values():
            p.mul_(2)
    theirs.save_pretrained(str(tmp_path / "b"))
    ours = fastpeft.load_adapter(tiny_model("llama", seed=1), str(tmp_path / "a"))
    table = ours.prompt_encoder["default"].embedding.weight
    fastpeft.load_adapter(ours, str(tmp_path / "b"))  # same name, same config: the values are replaced in place
    assert ours.prompt_encoder["default"].embedding.weight is table
    assert torch.equal(table, load_file(str(tmp_path / "b" / "adapter_model.safetensors"))["prompt_embeddings"])
    ids, mask, _ = _batch("llama")
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids, attention_mask=mask).logits,
                       theirs(input_ids=ids, attention_mask=mask).logits) <= TOL
    with pytest.raises(ValueError, match="cannot load a P-tuning adapter with is_trainable=True"):
        fastpeft.load_adapter(ours, str(tmp_path / "b"), is_trainable=True)


def test_load_a_file_of_the_wrong_shape_leaves_the_model_unchanged(tmp_path):
    theirs, _ = _pair("llama", "prompt-tuning")
    theirs.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["num_virtual_tokens"] = VIRTUAL + 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    fresh = tiny_model("llama", seed=1)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(4, 48\).*needs \(5, 48\)"):
        fastpeft.load_adapter(fresh, str(tmp_path))
    assert_same_snapshot(before, state_snapshot(fresh))
    assert "forward" not in fresh.__dict__ and "generate" not in fresh.__dict__


# -- the model's life cycle -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["prompt-tuning", "prefix"])
def test_unpatch_and_disable_give_the_base_model_back(case):
    base = tiny_model("llama", seed=1)
    ids, mask, labels = _batch("llama")
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    before = state_snapshot(base)
    model = fastpeft.patch(base, _configs(case)[1])
    assert "forward" in model.__dict__ and "prompt_encoder" in dict(model.named_children())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("prompt_encoder."))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[:, -9:], want)
        with fastpeft.disable_adapter(model):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    fastpeft.unpatch(model)
    assert_same_snapshot(before, state_snapshot(model))
    assert not {"forward", "generate", "prepare_inputs_for_generation"} & set(model.__dict__)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


def test_an_instance_forward_installed_before_patch_is_called_and_restored():
    import functools
    import inspect

    base = tiny_model("gpt2", seed=1)
    original = base.forward
    calls = []

    @functools.wraps(original)
    def hooked_forward(*args, **kwargs):  # what accelerate's device hooks put on the instance
        calls.append(1)
        return original(*args, **kwargs)

    base.forward = hooked_forward
    model = fastpeft.patch(base, _configs("prefix")[1])
    assert inspect.signature(model.forward) == inspect.signature(original)  # what transformers' generate reads
    ids, mask, _ = _batch("gpt2")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == [1]
    fastpeft.unpatch(model)
    assert model.__dict__["forward"] is hooked_forward and "generate" not in model.__dict__


def test_a_patched_model_deep_copies_and_pickles(tmp_path):
    model = fastpeft.patch(tiny_model("gpt2", seed=1), _configs("p-tuning-lstm")[1])
    ids, mask, _ = _batch("gpt2")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    copied = copy.deepcopy(model)
    torch.save(model, str(tmp_path / "model.pt"))
    unpickled = torch.load(str(tmp_path / "model.pt"), weights_only=False)
    with torch.no_grad():
        for other in (copied, unpickled):
            assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, want)
    fastpeft.unpatch(copied)  # the copy's own routing, undone on the copy only
    assert not {"forward", "generate"} & set(copied.__dict__) and not hasattr(copied, "prompt_encoder")
    assert hasattr(model, "prompt_encoder") and "forward" in model.__dict__


def test_unpatch_refuses_when_forward_was_replaced_after_patch():
    model = fastpeft.patch(tiny_model("llama", seed=1), _configs("prompt-tuning")[1])
    routed = model.forward
    model.forward = lambda *a, **k: routed(*a, **k)
    with pytest.raises(ValueError, match="replaced after fastpeft.patch"):
        fastpeft.unpatch(model)
    assert fastpeft.model_state.get_state(model) is not None and hasattr(model, "prompt_encoder")
    model.forward = routed
    fastpeft.unpatch(model)
    assert not hasattr(model, "prompt_encoder") and "forward" not in model.__dict__


def test_a_training_step_changes_only_the_prompt():
    model = fastpeft.patch(tiny_model("gpt2", seed=1), _configs("p-tuning-mlp")[1])
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask, labels = _batch("gpt2")
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]) != name.startswith("prompt_encoder."), name


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = torch.randint(1, 97, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.mark.parametrize("case,checkpointing", [("prompt-tuning", True), ("prefix", False)])
def test_trainer_trains_the_prompt_only(tmp_path, case, checkpointing):
    model = fastpeft.patch(tiny_model("llama", seed=1), _configs(case)[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if checkpointing else None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_RandomTokens())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0], losses
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != name.startswith("prompt_encoder."), name


def test_position_ids_as_peft_treats_them():
    # prefix tuning shifts them past the prefix; prompt tuning drops them (with a warning), as PEFT does
    ids, mask, _ = _batch("llama")
    pos = torch.arange(9).expand(3, -1)
    for case in ("prefix", "prompt-tuning"):
        theirs, ours = _pair("llama", case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert rel_err(got, want) <= TOL
        assert any("position_ids" in str(w.message) for w in caught) == (case == "prompt-tuning")


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture
def model():
    return tiny_model("llama", seed=1)


@pytest.mark.parametrize("layer_config", [fastpeft.LoraConfig(r=2, target_modules=["q_proj"]),
                                          fastpeft.VeraConfig(r=4, target_modules=["q_proj"]),
                                          fastpeft.LoHaConfig(r=2, target_modules=["q_proj"]),
                                          fastpeft.OFTConfig(oft_block_size=4, target_modules=["q_proj"])],
                         ids=["lora", "vera", "loha", "oft"])
def test_prompt_adapter_on_a_lora_or_vera_model_is_refused(model, layer_config):
    fastpeft.patch(model, layer_config)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="does not combine a prompt-learning adapter.*LoRA / IA3 / VeRA / LoHa"):
        fastpeft.patch(model, _configs("prompt-tuning")[1], adapter_name="prompt")
    assert_same_snapshot(before, state_snapshot(model))


def test_lora_on_a_prompt_model_and_a_second_prompt_adapter_are_refused(model):
    fastpeft.patch(model, _configs("prompt-tuning")[1])
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="does not combine a prompt-learning adapter"):
        fastpeft.add_adapter(model, "lora", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="one prompt-learning adapter per model"):
        fastpeft.add_adapter(model, "second", _configs("prefix")[1])
    with pytest.raises(NotImplementedError, match="one prompt-learning adapter per model"):
        fastpeft.patch(model, _configs("p-tuning-mlp")[0], adapter_name="third")  # a PEFT config object
    assert_same_snapshot(before, state_snapshot(model))


def test_merge_hotswap_and_peft_only_arguments_are_refused(model, tmp_path):
    fastpeft.patch(model, _configs("prompt-tuning")[1])
    fastpeft.save_adapter(model, str(tmp_path))
    for fn in (fastpeft.merge, fastpeft.unmerge, fastpeft.merge_and_unload):
        with pytest.raises(ValueError, match="nothing to merge"):
            fn(model)
    with pytest.raises(NotImplementedError, match="hot-swap of prompt-learning adapters"):
        fastpeft.hotswap_adapter(model, str(tmp_path))
    ids = random_ids()
    with pytest.raises(ValueError, match="adapter_names="):
        model(input_ids=ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="task_ids is for multitask prompt tuning"):
        model(input_ids=ids, task_ids=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_virtual_tokens=4), ValueError, "decoder-only model: set task_type='CAUSAL_LM'"),
    (dict(num_virtual_tokens=4, task_type="SEQ_CLS"), ValueError, "set task_type='CAUSAL_LM'.*got 'SEQ_CLS'"),
    (dict(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"), ValueError, "decoder-only model: set task_type='CAUSAL_LM'"),
    (dict(task_type="CAUSAL_LM"), ValueError, "num_virtual_tokens must be set"),
    (dict(task_type="CAUSAL_LM", num_virtual_tokens=4, num_transformer_submodules=2), ValueError,
     "num_transformer_submodules=2 is for encoder-decoder models"),
])
def test_bad_configs_leave_the_model_unchanged(model, kwargs, error, match):
    before = state_snapshot(model)
    with pytest.raises(error, match=match):
        fastpeft.patch(model, fastpeft.PromptTuningConfig(**kwargs))
    assert_same_snapshot(before, state_snapshot(model))
    assert not {"forward", "generate"} & set(model.__dict__)


def test_prefix_tuning_with_gradient_checkpointing_is_refused(model):
    model.gradient_checkpointing_enable()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastpeft.patch(model, _configs("prefix")[1])
    assert_same_snapshot(before, state_snapshot(model))
    # enabled after patch (as Trainer does): the training forward refuses
    model.gradient_checkpointing_disable()
    fastpeft.patch(model, _configs("prefix")[1])
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=random_ids())


def test_converting_a_prompt_learning_peft_model_is_refused():
    theirs, _ = _pair("llama", "prompt-tuning")
    with pytest.raises(NotImplementedError, match="prompt-learning adapter in place is not supported"):
        fastpeft.patch(theirs)
    assert fastpeft.model_state.get_state(theirs, required=False) is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "needs tokenizer_name_or_path"),
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "needs prompt_tuning_init_text"),
    (dict(tokenizer_kwargs={"use_fast": True}), "only used with prompt_tuning_init='TEXT'"),
    (dict(prompt_tuning_init="FROM_FILE"), "prompt_tuning_init must be one of"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be None or a positive integer"),
    (dict(modules_to_save=["lm_head"]), "does not support modules_to_save"),
])
def test_prompt_tuning_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.PromptTuningConfig(**kwargs)


def test_other_config_validation():
    with pytest.raises(ValueError, match="init_weights must be None or 'zero'"):
        fastpeft.PrefixTuningConfig(init_weights="ones")
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be one of"):
        fastpeft.PromptEncoderConfig(encoder_reparameterization_type="GRU")
    with pytest.raises(TypeError, match="did you mean 'num_virtual_tokens'"):
        fastpeft.PromptEncoderConfig(num_virtual_token=4)


# -- configs ------------------------------------------------------------------------------------------------------------
PAIRS = [(fastpeft.PromptTuningConfig, peft.PromptTuningConfig), (fastpeft.PrefixTuningConfig, peft.PrefixTuningConfig),
         (fastpeft.PromptEncoderConfig, peft.PromptEncoderConfig),
         (fastpeft.MultitaskPromptTuningConfig, peft.MultitaskPromptTuningConfig)]


@pytest.mark.skipif(peft.__version__ != C.PEFT_FORMAT_VERSION, reason="field lists follow PEFT_FORMAT_VERSION")
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["prompt-tuning", "prefix-tuning", "p-tuning", "multitask"])
def test_field_names_and_defaults_are_pefts(ours, theirs):
    peft_fields = {f.name: f for f in dataclasses.fields(theirs)}
    assert set(ours.peft_field_names()) == set(peft_fields)
    plain = ours()
    for name, f in peft_fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        want = ours.PEFT_TYPE if name == "peft_type" else C._plain(default)
        assert getattr(plain, name) == want, name
    assert [n for n in ours.peft_field_names() if n not in ours.field_names()] == ["modules_to_save"]


@pytest.mark.parametrize("case", list(CASES))
def test_to_fastpeft_config_dispatches_every_prompt_type(case):
    theirs, _ = _configs(case)
    ours = C.to_fastpeft_config(theirs)
    assert type(ours).__name__ == type(theirs).__name__ and ours.peft_type == theirs.peft_type.value
    again = C.to_fastpeft_config(ours.to_adapter_config())
    assert again == dataclasses.replace(ours, inference_mode=True)

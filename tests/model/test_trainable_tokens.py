"""Trainable tokens (``LoraConfig(trainable_token_indices=...)``, fastpeft.TrainableTokens) against PEFT 0.21.2:
loss, logits and gradients (fp32 <= 1e-5) on an untied model (Llama) and tied ones (GPT-2, Qwen2 with
tie_word_embeddings), together with LoRA targets; PEFT's file format both ways; merge / merge_and_unload /
disable / several adapters / delete; conversion of a PeftModel; errors that leave the model as it was."""
import copy
import dataclasses
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from helpers import assert_same_snapshot, random_ids, rel_err, state_snapshot, tiny_config, tiny_model

TOL = 1e-5
LORA_TARGET = {"llama": "q_proj", "qwen2": "v_proj", "gpt2": "c_attn"}
EMBED = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "gpt2": "transformer.wte"}
TOKENS = [1, 5, 3, 40]
PREFIX = "base_model.model."


def _base(arch, seed=1):
    if arch == "qwen2-tied":
        cfg = tiny_config("qwen2")
        cfg.tie_word_embeddings = True
        torch.manual_seed(seed)
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model
    return tiny_model(arch, seed=seed)


def _kw(arch, tokens=TOKENS, **extra):
    return dict(r=4, lora_alpha=8, target_modules=[LORA_TARGET[arch.split("-")[0]]], init_lora_weights=False,
                trainable_token_indices=tokens, **extra)


def _ids(batch=2, seq=9):
    ids = random_ids(batch=batch, seq=seq)
    ids[0, :4] = torch.tensor(TOKENS)  # the trained rows take part
    return ids


def _pair(arch, tokens=TOKENS, **extra):
    """PEFT and fastpeft models: same base, same adapter values (the token rows moved off their init)."""
    base = _base(arch)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kw(arch, tokens, **extra)))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**_kw(arch, tokens, **extra)))
    _copy_adapter(theirs, ours)
    return theirs, ours


def _copy_adapter(theirs, ours):
    theirs_params = {n[len(PREFIX):]: p for n, p in theirs.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                if "trainable_tokens_delta" in name:
                    theirs_params[name].add_(torch.randn(p.shape, generator=gen))
                p.copy_(theirs_params[name])
                copied += 1
    assert copied >= 3


def _grads(model, strip=""):
    return {n[len(strip):]: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-tied"])
def test_same_loss_logits_and_gradients_as_peft(arch):
    theirs, ours = _pair(arch)
    layer = ours.get_input_embeddings()
    assert isinstance(layer, fastpeft.TrainableTokens) and not layer.tied
    head = ours.get_output_embeddings()
    assert isinstance(head, fastpeft.TrainableTokens) == (arch != "llama")  # a tied head follows the embedding
    if arch != "llama":
        assert head.tied and head.token_adapter.trainable_tokens_delta is layer.token_adapter.trainable_tokens_delta
    ids = _ids()
    out_t = theirs(input_ids=ids, labels=ids)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    assert abs(out_o.loss.item() - out_t.loss.item()) <= TOL * abs(out_t.loss.item())
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads, ours_grads = _grads(theirs, PREFIX), _grads(ours)
    assert ours_grads.keys() == theirs_grads.keys()
    delta = f"{EMBED[arch.split('-')[0]]}.token_adapter.trainable_tokens_delta.default"
    assert delta in ours_grads and ours_grads[delta].abs().sum() > 0
    for name, g in ours_grads.items():
        assert rel_err(g, theirs_grads[name]) <= TOL, name
    # only the delta and LoRA train; the embedding itself gets no gradient
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(ours_grads)


def test_training_steps_stay_with_peft_and_touch_only_the_selected_rows():
    theirs, ours = _pair("gpt2")
    weight_before = ours.transformer.wte.base_layer.weight.detach().clone()
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ids = _ids()
    for _ in range(3):
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL
        assert torch.equal(ours.transformer.wte.base_layer.weight, weight_before)  # base never written
        effective = ours.transformer.wte.weight  # the weight the layer computes with now
        changed = (effective != weight_before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(TOKENS)


def test_default_init_is_a_no_op():
    model = tiny_model("llama", seed=2)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 7]))
    delta = model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert torch.equal(delta, model.model.embed_tokens.base_layer.weight[[2, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_bf16_base_keeps_fp32_rows_as_peft():
    base = tiny_model("llama", seed=2, dtype=torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kw("llama")))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**_kw("llama")))
    name = "model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    assert dict(ours.named_parameters())[name].dtype == dict(theirs.named_parameters())[PREFIX + name].dtype
    assert dict(ours.named_parameters())[name].dtype == torch.float32
    _copy_adapter(theirs, ours)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_dict_form_on_an_untied_model():
    tokens = {"embed_tokens": [1, 2], "lm_head": [3, 4, 5]}
    theirs, ours = _pair("llama", tokens=tokens)
    assert isinstance(ours.lm_head, fastpeft.TrainableTokens) and not ours.lm_head.tied
    assert ours.lm_head.token_indices == {"default": [3, 4, 5]}
    ids = _ids()
    out_t, out_o = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    out_t.loss.backward()
    out_o.loss.backward()
    g = _grads(theirs, PREFIX)
    for name, grad in _grads(ours).items():
        assert rel_err(grad, g[name]) <= TOL, name
    assert set(fastpeft.adapter_io.adapter_state_dict(ours, "default")) == set(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("head_ids,tied", [([1, 2], True), ([1, 3], False)])
def test_dict_form_on_a_tied_model_follows_peft(head_ids, tied):
    tokens = {"wte": [1, 2], "lm_head": head_ids}
    theirs, ours = _pair("gpt2", tokens=tokens)
    assert (theirs.base_model.model.lm_head.token_adapter.tied_adapter is not None) == tied
    assert ours.lm_head.tied == tied
    ids = _ids()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL
    assert set(fastpeft.adapter_io.adapter_state_dict(ours, "default")) == set(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_files_load_both_ways(arch, tmp_path):
    theirs, ours = _pair(arch)
    ids = _ids()
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_file = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert ours_file.keys() == theirs_file.keys()
    key = f"{PREFIX}{EMBED[arch]}.token_adapter.trainable_tokens_delta"
    assert key in ours_file and torch.equal(ours_file[key], theirs_file[key])
    ours_cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    theirs_cfg = json.load(open(tmp_path / "theirs" / "adapter_config.json"))
    assert ours_cfg["trainable_token_indices"] == theirs_cfg["trainable_token_indices"] == TOKENS
    assert set(ours_cfg) == set(theirs_cfg)

    loaded = peft.PeftModel.from_pretrained(_base(arch), str(tmp_path / "ours"))
    back = fastpeft.load_adapter(_base(arch), str(tmp_path / "theirs"))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert rel_err(loaded(input_ids=ids).logits, want) <= TOL
        assert rel_err(back(input_ids=ids).logits, want) <= TOL
    assert isinstance(back.get_input_embeddings(), fastpeft.TrainableTokens)


def test_loading_a_file_without_the_rows_fails_and_leaves_the_model(tmp_path):
    _, ours = _pair("llama")
    fastpeft.save_adapter(ours, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors[f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta"]
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_model("llama", seed=1)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="trainable_tokens_delta"):
        fastpeft.load_adapter(model, str(tmp_path))
    assert_same_snapshot(before, state_snapshot(model))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload_match_peft(arch):
    theirs, ours = _pair(arch)
    ids = _ids()
    base_weight = ours.get_input_embeddings().base_layer.weight.detach().clone()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        fastpeft.merge(ours)
        assert not torch.equal(ours.get_input_embeddings().base_layer.weight, base_weight)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        assert torch.equal(ours.get_input_embeddings().base_layer.weight, base_weight)  # rows put back exactly
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        plain = fastpeft.merge_and_unload(ours)
        merged_theirs = theirs.merge_and_unload()
        assert type(plain.get_input_embeddings()) is torch.nn.Embedding
        assert type(plain.get_output_embeddings()) is torch.nn.Linear
        if arch == "gpt2":
            assert plain.lm_head.weight is plain.transformer.wte.weight  # still tied
        assert torch.equal(plain.get_input_embeddings().weight, merged_theirs.get_input_embeddings().weight)
        assert rel_err(plain(input_ids=ids).logits, want) <= TOL


def test_disable_adapter_gives_the_base_model():
    base = _base("gpt2")
    _, ours = _pair("gpt2")
    ids = _ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with fastpeft.disable_adapter(ours):
            assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        assert rel_err(ours(input_ids=ids).logits, want) > 1e-3


def test_several_adapters_switch_and_delete_as_peft():
    base = _base("gpt2")
    kw_b = dict(r=2, lora_alpha=3, target_modules=["c_attn"], init_lora_weights=False, trainable_token_indices=[7, 8])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kw("gpt2")))
    theirs.add_adapter("b", peft.LoraConfig(**kw_b))
    theirs.add_adapter("c", peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))  # no tokens
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**_kw("gpt2")))
    fastpeft.add_adapter(ours, "b", fastpeft.LoraConfig(**kw_b))
    fastpeft.add_adapter(ours, "c", fastpeft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    ours.load_state_dict({k[len(PREFIX):]: v for k, v in theirs.state_dict().items()})
    assert ours.lm_head.adapter_names == ["default", "b"]
    ids = _ids()
    ids[:, 4:6] = torch.tensor([7, 8])  # adapter b's rows, in both rows of the batch
    for name in ("b", "c", "default"):
        theirs.set_adapter(name)
        fastpeft.set_adapter(ours, name)
        with torch.no_grad():
            assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL, name
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {PREFIX + n for n in trainable}, name
    # mixed batch: each row with its own adapter's rows, as PEFT's
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=["b", "__base__"]).logits
        assert rel_err(mixed, theirs.eval()(input_ids=ids, adapter_names=["b", "__base__"]).logits) <= TOL
        fastpeft.set_adapter(ours, "b")
        assert rel_err(mixed[:1], ours(input_ids=ids[:1]).logits) <= TOL
        assert rel_err(mixed[1:], base(input_ids=ids[1:]).logits) <= TOL
    theirs.delete_adapter("default")
    theirs.set_adapter("b")
    fastpeft.delete_adapter(ours, "default")
    assert ours.lm_head.adapter_names == ["b"] and ours.transformer.wte.token_indices == {"b": [7, 8]}
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL
    fastpeft.delete_adapter(ours, "b")  # the tokens' last adapter: the plain modules come back
    assert type(ours.transformer.wte) is torch.nn.Embedding and type(ours.lm_head) is torch.nn.Linear
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_loading_for_inference_freezes_the_rows(tmp_path):
    _, ours = _pair("llama")
    fastpeft.save_adapter(ours, str(tmp_path))
    frozen = fastpeft.load_adapter(tiny_model("llama", seed=1), str(tmp_path))
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = fastpeft.load_adapter(tiny_model("llama", seed=1), str(tmp_path), is_trainable=True)
    assert trainable.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].requires_grad


def test_unpatch_restores_the_original_modules():
    model = _base("gpt2")
    wte, head = model.transformer.wte, model.lm_head
    before = state_snapshot(model)
    fastpeft.patch(model, fastpeft.LoraConfig(**_kw("gpt2")))
    fastpeft.unpatch(model)
    assert model.transformer.wte is wte and model.lm_head is head
    assert_same_snapshot(before, state_snapshot(model))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_print_trainable_parameters_counts_as_peft(arch, capsys):
    theirs, ours = _pair(arch)
    theirs.print_trainable_parameters()
    want = capsys.readouterr().out
    fastpeft.print_trainable_parameters(ours)
    assert capsys.readouterr().out == want
    trainable, _ = fastpeft.get_nb_trainable_parameters(ours)
    assert trainable == theirs.get_nb_trainable_parameters()[0]


def test_converting_a_peft_model_keeps_the_parameters(tmp_path):
    theirs, _ = _pair("gpt2")
    ids = _ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    delta = theirs.base_model.model.transformer.wte.token_adapter.trainable_tokens_delta["default"]
    fastpeft.patch(theirs)
    wte, head = theirs.base_model.model.transformer.wte, theirs.base_model.model.lm_head
    assert isinstance(wte, fastpeft.TrainableTokens) and wte.token_adapter.trainable_tokens_delta["default"] is delta
    assert isinstance(head, fastpeft.TrainableTokens) and head.tied
    with torch.no_grad():
        assert rel_err(theirs(input_ids=ids).logits, want) <= TOL
    theirs(input_ids=ids, labels=ids).loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    fastpeft.save_adapter(theirs, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "peft"))  # PEFT's own save of the converted model
    for folder in ("ours", "peft"):
        loaded = peft.PeftModel.from_pretrained(_base("gpt2"), str(tmp_path / folder))
        with torch.no_grad():
            assert rel_err(loaded(input_ids=ids).logits, want) <= TOL, folder


@pytest.mark.parametrize("tokens,match", [
    ([1, 500], "out of range"),
    ({"lm_head": [96, 97]}, "out of range"),
    ({"no_such_layer": [1]}, "matches no module"),
])
def test_bad_indices_for_the_model_leave_it_unchanged(tokens, match):
    model = tiny_model("llama")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens))
    assert_same_snapshot(before, state_snapshot(model))


def test_bad_indices_in_a_later_adapter_leave_the_model_unchanged():
    model = _base("gpt2")
    fastpeft.patch(model, fastpeft.LoraConfig(**_kw("gpt2")))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        fastpeft.add_adapter(model, "b", fastpeft.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[99]))
    assert_same_snapshot(before, state_snapshot(model))
    assert model.lm_head.adapter_names == ["default"] and model.transformer.wte.adapter_names == ["default"]


@pytest.mark.parametrize("tokens,match", [
    ("5", "list of token ids"),
    ([1.0, 2], "ints >= 0"),
    ([True], "ints >= 0"),
    ([-1], "ints >= 0"),
    ([], "non-empty"),
    ([3, 3], "more than once"),
    ({"embed_tokens": 4}, "list of token ids"),
    ({3: [1]}, "module names"),
])
def test_bad_index_values_are_refused_by_the_config(tokens, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens)


def test_conflicts_with_lora_and_modules_to_save_are_refused_and_leave_the_model():
    model = tiny_model("llama")
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="adapted by LoRA"):
        fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                  trainable_token_indices=[1]))
    assert_same_snapshot(before, state_snapshot(model))
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                  trainable_token_indices=[1]))
    assert_same_snapshot(before, state_snapshot(model))
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.LoraConfig(modules_to_save=["lm_head"], trainable_token_indices={"lm_head": [1]})


def test_hotswap_is_refused_clearly(tmp_path):
    _, ours = _pair("llama")
    fastpeft.save_adapter(ours, str(tmp_path))
    with pytest.raises(ValueError, match="trainable tokens is not supported"):
        fastpeft.hotswap_adapter(ours, str(tmp_path))


def test_padding_token_among_the_trained_rows_gets_no_gradient_as_in_peft():
    # Phi-3's tiny config has pad_token_id=0: the embedding's padding row; PEFT's F.embedding(padding_idx=0) gives it
    # no gradient, and fastpeft takes PEFT's computation for it (TokenAdapter._rows_path_applies)
    base = tiny_model("phi3", seed=1)
    assert base.get_input_embeddings().padding_idx == 0
    kw = dict(r=4, target_modules=["qkv_proj"], init_lora_weights=False, trainable_token_indices=[0, 5])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    _copy_adapter(theirs, ours)
    ids = _ids()
    ids[:, -2:] = torch.tensor([0, 5])
    out_t, out_o = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads = _grads(theirs, PREFIX)
    for name, g in _grads(ours).items():
        assert rel_err(g, theirs_grads[name]) <= TOL, name
    delta_grad = ours.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad
    assert delta_grad[0].abs().sum() == 0 and delta_grad[1].abs().sum() > 0


@pytest.mark.parametrize("layer", ["embedding", "embedding-padding", "linear-bias"])
def test_rows_path_gives_the_numbers_of_pefts_replaced_weight(layer):
    # the forward fastpeft takes (base output, trained rows written over it) against PEFT's (the layer's function
    # on the weight with the rows replaced), outputs and gradients, on layers the model tests do not have
    torch.manual_seed(0)
    if layer.startswith("embedding"):
        base = torch.nn.Embedding(50, 12, padding_idx=3 if layer == "embedding-padding" else None)
        x = torch.randint(0, 50, (4, 9))
        x[0, :4] = torch.tensor([2, 7, 3, 11])
    else:
        base = torch.nn.Linear(12, 50, bias=True)
        x = torch.randn(4, 9, 12, requires_grad=True)
    base.requires_grad_(False)
    wrapped = fastpeft.TrainableTokens(base, "default", [2, 7, 11, 40])
    adapter = wrapped.token_adapter
    with torch.no_grad():
        adapter.trainable_tokens_delta["default"].add_(torch.randn(4, 12))
    assert adapter._rows_path_applies("default")
    results = []
    for forward in (lambda: adapter._forward_rows(x, "default"), lambda: adapter._forward_replaced_weight(x, ["default"])):
        out = forward()
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        inputs = [adapter.trainable_tokens_delta["default"]] + ([x] if x.requires_grad else [])
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    (out_rows, grads_rows), (out_ref, grads_ref) = results
    assert torch.equal(out_rows, out_ref)  # the same rows are read / the same W' multiplied: the very same numbers
    for g_rows, g_ref in zip(grads_rows, grads_ref):
        assert rel_err(g_rows, g_ref) <= 1e-6


def test_docstring_example_runs():
    import doctest

    from fastpeft.nn import trainable_tokens

    result = doctest.testmod(trainable_tokens)
    assert result.attempted >= 3 and result.failed == 0


def test_bf16_autocast_matches_peft():
    theirs, ours = _pair("gpt2")
    ids = _ids()
    for model in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    theirs_grads = _grads(theirs, PREFIX)
    ours_grads = _grads(ours)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, g in ours_grads.items():
        assert g.dtype == torch.float32 and rel_err(g, theirs_grads[name]) <= TOL, name


# -- PEFT's standalone TrainableTokensConfig (peft_type TRAINABLE_TOKENS): fastpeft.TrainableTokensLayer -----------
def _standalone_pair(arch, **kw):
    kw = dict(token_indices=TOKENS, **kw)
    base = _base(arch)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(**kw))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.TrainableTokensConfig(**kw))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    ours.load_state_dict({k[len(PREFIX):]: v for k, v in theirs.state_dict().items()})
    return theirs, ours


def test_standalone_config_fields_are_pefts():
    theirs = {f.name: f for f in dataclasses.fields(peft.TrainableTokensConfig)}
    assert set(fastpeft.TrainableTokensConfig.peft_field_names()) == set(theirs)
    assert fastpeft.TrainableTokensConfig.field_names() == fastpeft.TrainableTokensConfig.peft_field_names()
    defaults = fastpeft.TrainableTokensConfig()
    for name, f in theirs.items():
        want = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name != "peft_type":
            assert getattr(defaults, name) == want, name
    converted = fastpeft.config.to_fastpeft_config(peft.TrainableTokensConfig(token_indices=[4], target_modules=["wte"]))
    assert (converted.token_indices, converted.target_modules) == ([4], ["wte"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-tied"])
def test_standalone_same_numbers_and_names_as_peft(arch):
    theirs, ours = _standalone_pair(arch)
    assert sorted(ours.state_dict()) == sorted(k[len(PREFIX):] for k in theirs.state_dict())
    embedding, head = ours.get_input_embeddings(), ours.get_output_embeddings()
    assert isinstance(embedding, fastpeft.TrainableTokensLayer) and not embedding.tied
    assert isinstance(head, fastpeft.TrainableTokensLayer) == (arch != "llama")
    ids = _ids()
    out_t, out_o = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads, ours_grads = _grads(theirs, PREFIX), _grads(ours)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) == 1
    for name, g in ours_grads.items():
        assert rel_err(g, theirs_grads[name]) <= TOL, name
    assert ours.__dict__["_fastpeft_state"].configs["default"].target_modules == EMBED[arch.split("-")[0]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_standalone_files_both_ways(arch, tmp_path):
    theirs, ours = _standalone_pair(arch)
    ids = _ids()
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_file = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert ours_file.keys() == theirs_file.keys()  # GPT-2: PEFT writes the tied head's rows as well
    assert (f"{PREFIX}lm_head.trainable_tokens_delta" in ours_file) == (arch == "gpt2")
    for key in ours_file:
        assert torch.equal(ours_file[key], theirs_file[key]), key
    assert json.load(open(tmp_path / "ours" / "adapter_config.json")) == json.load(
        open(tmp_path / "theirs" / "adapter_config.json"))
    loaded = peft.PeftModel.from_pretrained(_base(arch), str(tmp_path / "ours"))
    back = fastpeft.load_adapter(_base(arch), str(tmp_path / "theirs"))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert rel_err(loaded(input_ids=ids).logits, want) <= TOL
        assert rel_err(back(input_ids=ids).logits, want) <= TOL


@pytest.mark.parametrize("targets", ["transformer.wte", ["wte"]])
def test_standalone_target_modules_as_peft(targets):
    theirs, ours = _standalone_pair("gpt2", target_modules=targets)
    # the head follows the embedding (naming the head as well gives nested layers in PEFT 0.21.2: not compared)
    assert theirs.base_model.model.lm_head.tied_adapter is not None
    assert ours.lm_head.tied
    ids = _ids()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


def test_standalone_merge_disable_adapters_and_conversion():
    base = _base("gpt2")
    theirs, ours = _standalone_pair("gpt2")
    ids = _ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        with fastpeft.disable_adapter(ours):
            assert rel_err(ours(input_ids=ids).logits, base(input_ids=ids).logits) <= TOL
        fastpeft.add_adapter(ours, "b", fastpeft.TrainableTokensConfig(token_indices=[7], init_weights=False))
        fastpeft.set_adapter(ours, "b")
        assert ours.lm_head.adapter_names == ["default", "b"]
        assert rel_err(ours(input_ids=ids).logits, want) > 1e-3
        fastpeft.set_adapter(ours, "default")
        fastpeft.delete_adapter(ours, "b")
        fastpeft.merge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        plain = fastpeft.merge_and_unload(ours)
        assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight is plain.transformer.wte.weight
        assert rel_err(plain(input_ids=ids).logits, want) <= TOL
    delta = theirs.base_model.model.transformer.wte.trainable_tokens_delta["default"]
    fastpeft.patch(theirs)
    layer = theirs.base_model.model.transformer.wte
    assert isinstance(layer, fastpeft.TrainableTokensLayer) and layer.trainable_tokens_delta["default"] is delta
    assert isinstance(theirs.base_model.model.lm_head, fastpeft.TrainableTokensLayer)
    with torch.no_grad():
        assert rel_err(theirs(input_ids=ids).logits, want) <= TOL


def test_standalone_bad_input_is_refused_and_leaves_the_model():
    model = tiny_model("llama")
    before = state_snapshot(model)
    for cfg, error, match in (
        (fastpeft.TrainableTokensConfig(), ValueError, "empty"),  # PEFT's default []
        (fastpeft.TrainableTokensConfig(token_indices=[97]), ValueError, "out of range"),
        (fastpeft.TrainableTokensConfig(token_indices=[1], target_modules=["nothing"]), ValueError, "matched no"),
        (fastpeft.TrainableTokensConfig(token_indices=[1], target_modules=["input_layernorm"]), TypeError,
         "Embedding"),
    ):
        with pytest.raises(error, match=match):
            fastpeft.patch(model, cfg)
        assert_same_snapshot(before, state_snapshot(model))
    for bad, match in (([1, 1], "more than once"), ("1", "token ids"), ([-2], "ints >= 0")):
        with pytest.raises(ValueError, match=match):
            fastpeft.TrainableTokensConfig(token_indices=bad)
    with pytest.raises(ValueError, match="init_weights"):
        fastpeft.TrainableTokensConfig(token_indices=[1], init_weights="yes")
    fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot add a TRAINABLE_TOKENS adapter"):
        fastpeft.add_adapter(model, "t", fastpeft.TrainableTokensConfig(token_indices=[1]))

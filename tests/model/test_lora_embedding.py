"""LoRA on nn.Embedding (LoraEmbedding) against PEFT's lora.Embedding: logits and gradients (fp32 <= 1e-5), PEFT's
file format both ways, merge / unmerge / merge_and_unload, conversion of a PeftModel, mixed batches, errors."""
import copy

import peft
import pytest
import torch

import fastpeft
from helpers import rel_err, random_ids, tiny_model

TOL = 1e-5
EMBED = {"llama": "embed_tokens", "qwen2": "embed_tokens", "gpt2": "wte"}


def _cfgs(arch, **extra):
    targets = [EMBED[arch], "c_attn" if arch == "gpt2" else "q_proj"]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


def _pair(arch, seed=0, **extra):
    """PEFT and fastpeft models with the same base and the same adapter values."""
    base = tiny_model(arch, seed=1)
    pcfg, fcfg = _cfgs(arch, **extra)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = fastpeft.patch(copy.deepcopy(base), fcfg)
    theirs_params = {n[len("base_model.model."):]: p for n, p in theirs.named_parameters()}
    copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(theirs_params[name])
                copied += 1
    assert copied >= 4
    return theirs, ours


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_same_logits_and_gradients_as_peft(arch):
    theirs, ours = _pair(arch)
    assert isinstance(ours.get_input_embeddings(), fastpeft.LoraEmbedding)
    ids = random_ids(batch=2, seq=9)
    ids[0, 0] = 0  # whatever padding_idx the config has
    out_t = theirs(input_ids=ids, labels=ids)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= TOL
    out_t.loss.backward()
    out_o.loss.backward()
    theirs_grads = {n[len("base_model.model."):]: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == theirs_grads.keys()
    assert any("lora_embedding_A" in n for n in ours_grads)
    for name, g in ours_grads.items():
        assert rel_err(g, theirs_grads[name]) <= TOL, name


def test_default_init_is_a_no_op_and_only_b_is_random():
    model = tiny_model("llama", seed=2)
    ids = random_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    layer = model.get_input_embeddings()
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["default"]) > 0
    assert layer.lora_embedding_A["default"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_files_load_both_ways(tmp_path):
    theirs, ours = _pair("llama")
    ids = random_ids()
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", seed=1), str(tmp_path / "ours"))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, ours(input_ids=ids).logits) <= TOL
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = fastpeft.load_adapter(tiny_model("llama", seed=1), str(tmp_path / "theirs"))
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


def test_merge_unmerge_and_merge_and_unload():
    _, ours = _pair("qwen2")
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        fastpeft.merge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        plain = fastpeft.merge_and_unload(ours)
        assert type(plain.get_input_embeddings()) is torch.nn.Embedding
        assert rel_err(plain(input_ids=ids).logits, want) <= TOL


def test_converting_a_peft_model_keeps_the_parameters():
    theirs, _ = _pair("gpt2")
    ids = random_ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    a_before = theirs.base_model.model.transformer.wte.lora_embedding_A["default"]
    fastpeft.patch(theirs)
    layer = theirs.base_model.model.transformer.wte
    assert isinstance(layer, fastpeft.LoraEmbedding) and layer.lora_embedding_A["default"] is a_before
    with torch.no_grad():
        assert rel_err(theirs(input_ids=ids).logits, want) <= TOL


def test_mixed_batch_matches_peft():
    base = tiny_model("llama", seed=3)
    pa, fa = _cfgs("llama")
    pb = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    fb = fastpeft.LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), pa, adapter_name="a")
    theirs.add_adapter("b", pb)
    ours = fastpeft.patch(copy.deepcopy(base), fa, adapter_name="a")
    fastpeft.add_adapter(ours, "b", fb)
    ours.load_state_dict({k[len("base_model.model."):]: v for k, v in theirs.state_dict().items()})
    ids = random_ids(batch=3, seq=5)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        got = ours.eval()(input_ids=ids, adapter_names=names).logits
        want = theirs.eval()(input_ids=ids, adapter_names=names).logits
    assert rel_err(got, want) <= TOL


def test_unsupported_combinations_are_refused_clearly():
    with pytest.raises(ValueError, match="use_dora=True on an embedding"):
        fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(TypeError, match="LoRA only"):
        fastpeft.patch(tiny_model("llama"), fastpeft.IA3Config(target_modules=["embed_tokens"],
                                                              feedforward_modules=[]))
    model = tiny_model("llama")
    fastpeft.patch(model, fastpeft.LoraConfig(target_modules="all-linear"))
    assert not isinstance(model.get_input_embeddings(), fastpeft.LoraEmbedding)  # all-linear leaves embeddings
    with pytest.raises(TypeError, match="cannot wrap Linear"):
        fastpeft.LoraEmbedding(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="cannot wrap Embedding"):
        fastpeft.LoraLinear(torch.nn.Embedding(5, 3), "default", r=2, lora_alpha=2)

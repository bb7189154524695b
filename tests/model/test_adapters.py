"""Adapter management on tiny Llama (nn.Linear) and GPT-2 (Conv1D), LoRA and IA3: add / switch / delete /
disable / merge / unmerge / merge_and_unload / unpatch, trainable flags and counts (PEFT as the oracle)."""
import copy
import gc
import importlib
import weakref

import peft
import pytest
import torch
import torch.nn as nn

import fastpeft
from helpers import random_ids, rel_err, tiny_model

fp_patch = importlib.import_module("fastpeft.patch")  # the attribute fastpeft.patch is the function
FASTPEFT_TYPES = (fastpeft.LoraLinear, fastpeft.IA3Linear, fastpeft.ModulesToSave)

# per arch: (targets of adapter "default", targets of adapter "b", feedforward (IA3) modules)
TARGETS = {
    "llama": (["q_proj", "v_proj", "down_proj"], ["q_proj", "k_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["c_attn", "c_fc", "mlp.c_proj"], ["mlp.c_proj"]),
}
CASES = [(a, k) for a in ("llama", "gpt2") for k in ("lora", "ia3")]


def make_cfg(kind, targets, ff=(), seed_random=True, **kw):
    if kind == "lora":
        kw.setdefault("r", 4)
        kw.setdefault("lora_alpha", 8)
        return fastpeft.LoraConfig(target_modules=list(targets), init_lora_weights=not seed_random, **kw)
    ff = [f for f in ff if f in targets]
    return fastpeft.IA3Config(target_modules=list(targets), feedforward_modules=ff, init_ia3_weights=not seed_random, **kw)


def cfg_for(arch, kind, which=0, **kw):
    targets = TARGETS[arch][which]
    return make_cfg(kind, targets, TARGETS[arch][2], **kw)


@torch.no_grad()
def logits(model, ids=None):
    model.eval()
    return model(input_ids=random_ids() if ids is None else ids).logits


def patched(arch, kind, seed=0, **kw):
    base = tiny_model(arch)
    torch.manual_seed(100 + seed)
    return base, fastpeft.patch(copy.deepcopy(base), cfg_for(arch, kind, **kw))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def peft_names(peft_model):
    prefix = "base_model.model."
    return {n[len(prefix):] for n, p in peft_model.named_parameters() if p.requires_grad}


def leaf_types(model):
    return {n: type(m).__name__ for n, m in model.named_modules()}


# -- add / set ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kind", CASES)
def test_add_and_switch_adapters(arch, kind):
    _, model = patched(arch, kind)
    first = logits(model)
    assert all(".default" in n for n in trainable_names(model))
    torch.manual_seed(7)
    fastpeft.add_adapter(model, "b", cfg_for(arch, kind, which=1))
    assert fastpeft.active_adapter(model) == "default"  # adding does not switch
    assert torch.equal(logits(model), first)
    fastpeft.set_adapter(model, "b")
    assert fastpeft.active_adapter(model) == "b"
    second = logits(model)
    assert rel_err(second, first) > 1e-3
    names = trainable_names(model)
    assert names and all(".b" in n for n in names)
    assert len(names) == (2 if kind == "lora" else 1) * (sum(
        isinstance(m, (fastpeft.LoraLinear, fastpeft.IA3Linear)) and "b" in m.adapter_names
        for m in model.modules()))
    fastpeft.set_adapter(model, "default")
    assert torch.equal(logits(model), first)
    assert all(".default" in n for n in trainable_names(model))
    with pytest.raises(ValueError, match=r"unknown adapter 'zzz'; this model has \['b', 'default'\]"):
        fastpeft.set_adapter(model, "zzz")


# -- delete ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kind", CASES)
def test_delete_adapter(arch, kind):
    base, model = patched(arch, kind)
    first = logits(model)
    before_b = {n: m for n, m in model.named_modules()}
    torch.manual_seed(7)
    fastpeft.add_adapter(model, "b", cfg_for(arch, kind, which=1))
    only_b = [n for n, m in model.named_modules()
              if isinstance(m, FASTPEFT_TYPES) and m.adapter_names == ["b"]]
    assert only_b  # layers wrapped just for "b"
    fastpeft.set_adapter(model, "b")
    fastpeft.delete_adapter(model, "b")
    assert fastpeft.active_adapter(model) == "default"
    for name in only_b:
        module = model.get_submodule(name)
        assert module is before_b[name]  # the very original module object
        assert type(module) is type(base.get_submodule(name))  # nn.Linear / Conv1D
        assert not isinstance(module, FASTPEFT_TYPES)
    assert all(m.adapter_names == ["default"] for m in model.modules() if isinstance(m, FASTPEFT_TYPES))
    assert torch.equal(logits(model), first)
    assert trainable_names(model) and all(".default" in n for n in trainable_names(model))
    with pytest.raises(ValueError, match="'default' is the only adapter; use fastpeft.unpatch"):
        fastpeft.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        fastpeft.delete_adapter(model, "b")


@pytest.mark.parametrize("arch,kind", CASES)
def test_delete_first_adapter_activates_the_other(arch, kind):
    base, model = patched(arch, kind)
    torch.manual_seed(7)
    fastpeft.add_adapter(model, "b", cfg_for(arch, kind, which=1))
    fastpeft.set_adapter(model, "b")
    b_logits = logits(model)
    fastpeft.set_adapter(model, "default")
    only_default = [n for n, m in model.named_modules() if isinstance(m, FASTPEFT_TYPES) and m.adapter_names == ["default"]]
    fastpeft.delete_adapter(model, "default")
    assert fastpeft.active_adapter(model) == "b"
    assert torch.equal(logits(model), b_logits)
    assert trainable_names(model) and all(".b" in n for n in trainable_names(model))
    for name in only_default:
        assert type(model.get_submodule(name)) is type(base.get_submodule(name))
    fastpeft.unpatch(model)
    assert leaf_types(model) == leaf_types(base)


# -- disable -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kind", CASES)
def test_disable_adapter(arch, kind):
    base, model = patched(arch, kind, modules_to_save=["lm_head"])
    with torch.no_grad():  # make the trained lm_head copy differ from the original
        for p in model.lm_head.modules_to_save["default"].parameters():
            p.add_(0.5)
    adapted, base_logits = logits(model), logits(base)
    assert rel_err(adapted, base_logits) > 1e-3
    with fastpeft.disable_adapter(model):
        assert torch.equal(logits(model), base_logits)
    assert torch.equal(logits(model), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with fastpeft.disable_adapter(model):
            assert torch.equal(logits(model), base_logits)
            raise RuntimeError("boom")
    assert torch.equal(logits(model), adapted)


# -- merge / unmerge / merge_and_unload ---------------------------------------------------------------
def base_weights(model):
    return {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (fastpeft.LoraLinear, fastpeft.IA3Linear))}


@pytest.mark.parametrize("arch,kind", CASES)
def test_merge_unmerge(arch, kind):
    _, model = patched(arch, kind)
    unmerged = logits(model)
    weights = base_weights(model)
    fastpeft.merge(model)
    merged = logits(model)
    assert rel_err(merged, unmerged) <= 1e-5
    assert any((w - weights[n]).abs().max() > 1e-3 for n, w in base_weights(model).items())  # really merged
    fastpeft.merge(model)  # merging again is a no-op, never a double add
    assert rel_err(logits(model), unmerged) <= 1e-5
    with pytest.raises(ValueError, match="unmerge"):
        fastpeft.set_adapter(model, "default")
    fastpeft.unmerge(model)
    for name, w in base_weights(model).items():
        assert (w - weights[name]).abs().max().item() <= 1e-6, name
    assert rel_err(logits(model), unmerged) <= 1e-5


@pytest.mark.parametrize("arch,kind", CASES)
def test_merge_and_unload(arch, kind):
    base, model = patched(arch, kind)
    expected = logits(model)
    out = fastpeft.merge_and_unload(model)
    assert not any(isinstance(m, FASTPEFT_TYPES) for m in out.modules())
    assert fp_patch.get_state(out, required=False) is None
    assert leaf_types(out) == leaf_types(base)  # GPT-2 keeps its Conv1D modules
    if arch == "gpt2":
        assert type(out.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert [n for n, _ in out.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert rel_err(logits(out), expected) <= 1e-5


def test_merge_and_unload_keeps_trained_modules_to_save():
    base, model = patched("llama", "lora", modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model)
    out = fastpeft.merge_and_unload(model)
    assert type(out.lm_head) is nn.Linear
    assert rel_err(logits(out), expected) <= 1e-5


# -- unpatch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kind", CASES)
def test_unpatch_restores_everything(arch, kind):
    base = tiny_model(arch)
    base.get_input_embeddings().weight.requires_grad_(False)  # a mix of flags to restore
    untouched = copy.deepcopy(base)
    model = fastpeft.patch(base, cfg_for(arch, kind, modules_to_save=["lm_head"]))
    torch.manual_seed(7)
    fastpeft.add_adapter(model, "b", cfg_for(arch, kind, which=1))
    model.train()
    loss = model(input_ids=random_ids(), labels=random_ids()).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.1 * p.grad)
    assert fastpeft.unpatch(model) is model
    assert leaf_types(model) == leaf_types(untouched)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in untouched.named_parameters()]
    assert list(model.state_dict()) == list(untouched.state_dict())
    for (name, p), (_, q) in zip(model.named_parameters(), untouched.named_parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
    assert fp_patch.get_state(model, required=False) is None
    assert not model.get_input_embeddings()._forward_hooks
    assert torch.equal(logits(model), logits(untouched))


def test_patch_does_not_keep_replaced_or_deleted_parameters_alive():
    # FSDP2's fully_shard replaces every parameter by a sharded copy, delete_adapter drops adapter parameters: the
    # patch's record of the original requires_grad flags must not keep the old tensors (on an 8B NF4 base under
    # FSDP2: its whole packed weight a second time). Fails with strong references in the record.
    base = tiny_model("llama")
    base.get_input_embeddings().weight.requires_grad_(False)
    model = fastpeft.patch(base, cfg_for("llama", "lora"))
    fastpeft.add_adapter(model, "b", cfg_for("llama", "lora", which=1))
    q_proj = model.model.layers[0].self_attn.q_proj
    old_weight, old_b = weakref.ref(q_proj.base_layer.weight), weakref.ref(q_proj.lora_A["b"].weight)
    q_proj.base_layer.weight = nn.Parameter(q_proj.base_layer.weight.detach().clone(), requires_grad=False)
    fastpeft.delete_adapter(model, "b")
    gc.collect()
    assert old_weight() is None and old_b() is None
    # unpatch restores each slot's flag, on the parameter that fills it now (also in a copy); under swap_tensors
    # conversions (which refuse tensors that something holds a weak reference to) as well
    copied = copy.deepcopy(model)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        copied.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for m in (model, copied):
        fastpeft.unpatch(m)
        assert not m.get_input_embeddings().weight.requires_grad
        assert m.model.layers[1].self_attn.q_proj.weight.requires_grad
        assert m.model.layers[0].self_attn.q_proj.weight.requires_grad  # replaced (frozen) after patch
    assert copied.model.layers[1].self_attn.q_proj.weight is not model.model.layers[1].self_attn.q_proj.weight


@pytest.mark.parametrize("arch,kind", CASES)
def test_unpatch_when_merged_is_an_error(arch, kind):
    _, model = patched(arch, kind)
    fastpeft.merge(model)
    with pytest.raises(ValueError, match=r"merged adapters .*fastpeft.unmerge\(model\) first"):
        fastpeft.unpatch(model)
    fastpeft.unmerge(model)
    fastpeft.unpatch(model)


# -- counting and trainable sets vs PEFT --------------------------------------------------------------
def _peft_cfg(kind, **kw):
    if kind == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, **kw)
    return peft.IA3Config(**kw)


@pytest.mark.parametrize("arch,kind", CASES)
@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"]}])
def test_print_trainable_parameters_matches_peft(arch, kind, extra, capsys):
    targets, _, ff = TARGETS[arch]
    kw = dict(target_modules=targets, **extra)
    if kind == "ia3":
        kw["feedforward_modules"] = ff
    cfg = _peft_cfg(kind, **kw)
    base = tiny_model(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg))
    assert fastpeft.get_nb_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    fastpeft.print_trainable_parameters(ours)
    mine = capsys.readouterr().out
    assert mine == theirs
    assert mine.startswith("trainable params: ") and " || all params: " in mine and " || trainable%: " in mine
    assert trainable_names(ours) == peft_names(peft_model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("to_save", [None, "ffn"])
def test_bias_trainable_sets_match_peft(arch, bias, to_save):
    base = tiny_model(arch)
    if arch == "llama":  # give llama some biases
        import transformers

        from helpers import tiny_config

        cfg = tiny_config("llama")
        cfg.attention_bias = True
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    # a modules_to_save module with a bias: its frozen original must stay frozen even with bias="all"
    save = None if to_save is None else (["o_proj"] if arch == "llama" else ["mlp.c_fc"])
    cfg = peft.LoraConfig(r=4, target_modules=targets, bias=bias, modules_to_save=save)
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg))
    names = trainable_names(ours)
    assert names == peft_names(peft_model)
    biases = {n for n in names if n.endswith("bias")}
    if bias == "all":
        every = {n for n, _ in ours.named_parameters() if n.endswith("bias") and ".original_module." not in n}
        assert biases == every and any(".base_layer." not in n for n in biases)
    else:
        assert biases and all(".base_layer.bias" in n or ".modules_to_save.default." in n for n in biases)
    assert fastpeft.get_nb_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modules_to_save_trains_a_copy(arch):
    targets = TARGETS[arch][0]
    model = fastpeft.patch(tiny_model(arch), fastpeft.LoraConfig(r=4, target_modules=targets, modules_to_save=["lm_head"]))
    wrapper = model.lm_head
    assert isinstance(wrapper, fastpeft.ModulesToSave)
    copy_w, orig_w = wrapper.modules_to_save["default"].weight, wrapper.original_module.weight
    assert copy_w is not orig_w and copy_w.requires_grad and not orig_w.requires_grad
    orig_before = orig_w.detach().clone()
    copy_before = copy_w.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=random_ids(), labels=random_ids(seed=2)).loss.backward()
    assert copy_w.grad is not None and copy_w.grad.abs().sum() > 0 and orig_w.grad is None
    opt.step()
    assert not torch.equal(copy_w, copy_before)
    assert torch.equal(orig_w, orig_before)


# -- which layers get adapted --------------------------------------------------------------------------
def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (fastpeft.LoraLinear, fastpeft.IA3Linear)))


def test_layers_to_transform():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    layers_to_transform=[1]))
    assert adapted(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = fastpeft.patch(tiny_model("gpt2"), fastpeft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                   layers_to_transform=0, layers_pattern="h"))
    assert adapted(model) == ["transformer.h.0.attn.c_attn"]


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_all_linear_excludes_lm_head(kind):
    cfg = fastpeft.LoraConfig(r=4, target_modules="all-linear") if kind == "lora" else fastpeft.IA3Config(
        target_modules="all-linear", feedforward_modules=[])
    model = fastpeft.patch(tiny_model("llama"), cfg)
    leaves = {n.rsplit(".", 1)[-1] for n in adapted(model)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapted(model)) == 14 and type(model.lm_head) is nn.Linear
    model = fastpeft.patch(tiny_model("gpt2"), fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    assert {n.split(".", 3)[-1] for n in adapted(model)} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert type(model.lm_head) is nn.Linear


def test_exclude_modules_list_and_regex():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=4, target_modules="all-linear",
                                                                    exclude_modules=["v_proj", "down_proj"]))
    leaves = {n.rsplit(".", 1)[-1] for n in adapted(model)}
    assert leaves == {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"}
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    exclude_modules=r".*layers\.0\..*"))
    assert adapted(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    base = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, target_modules="all-linear", exclude_modules=r".*mlp.*")
    ours = fastpeft.patch(copy.deepcopy(base), cfg)
    assert trainable_names(ours) == peft_names(peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg)))


def test_default_targets():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=4))
    assert {n.rsplit(".", 1)[-1] for n in adapted(model)} == {"q_proj", "v_proj"}
    model = fastpeft.patch(tiny_model("llama"), fastpeft.IA3Config())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fastpeft.IA3Linear)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    assert all(m.is_feedforward == n.endswith("down_proj") for n, m in layers.items())
    base = tiny_model("phi3")
    before = {n: type(m) for n, m in base.named_modules()}
    for cfg in (fastpeft.LoraConfig(r=4), peft.LoraConfig(r=4), fastpeft.IA3Config()):
        with pytest.raises(ValueError) as err:
            fastpeft.patch(base, cfg)
        msg = str(err.value)
        assert "model_type='phi3'" in msg and "pass target_modules" in msg and "qkv_proj" in msg
    assert {n: type(m) for n, m in base.named_modules()} == before

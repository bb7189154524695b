"""Bad input gets a clear error (what is wrong + what is allowed), and a failure leaves the model untouched."""
import json
import os
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import model_state
from helpers import assert_same_snapshot, state_snapshot, tiny_config, tiny_model

import transformers


def _lora(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return fastpeft.LoraConfig(**kw)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def model(llama):
    import copy

    return copy.deepcopy(llama)


def _saved_adapter(tmp_path, model, name="saved", **kw):
    fastpeft.patch(model, _lora(init_lora_weights=False, **kw))
    folder = tmp_path / name
    fastpeft.save_adapter(model, str(folder))
    return folder


# -- target matching ---------------------------------------------------------------------------------
def test_unknown_target_lists_close_names(model):
    before = state_snapshot(model)
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, _lora(target_modules=["q_prj"]))
    msg = str(err.value)
    assert "'q_prj'" in msg and "q_proj" in msg and "matched no module" in msg
    assert_same_snapshot(before, state_snapshot(model))


def test_regex_matching_nothing(model):
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, _lora(target_modules=r"model.*nothing_here"))
    msg = str(err.value)
    assert "regex 'model.*nothing_here' matched no module" in msg
    assert "fullmatch" in msg and "model.layers.0.self_attn.q_proj" in msg  # what a match looks like


def test_targets_matching_nothing(model):
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, _lora(target_modules=["foo", "bar_baz"]))
    msg = str(err.value)
    assert "'foo'" in msg and "'bar_baz'" in msg and "matched no module" in msg


def test_empty_target_list(model):
    with pytest.raises(ValueError, match=r"target_modules is empty; give module names .*'all-linear'"):
        fastpeft.patch(model, _lora(target_modules=[]))


def test_targets_filtered_away_by_layers_to_transform(model):
    before = state_snapshot(model)
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, _lora(target_modules=["q_proj"], layers_to_transform=[5]))
    msg = str(err.value)
    assert "['q_proj'] name modules of the model" in msg and "layers_to_transform=[5]" in msg and "leave none" in msg
    assert_same_snapshot(before, state_snapshot(model))


# -- config values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1, 2.5, "8", True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=rf"r must be a positive integer, got {r!r}"):
        fastpeft.LoraConfig(r=r)


@pytest.mark.parametrize("rank", [0, -3, 1.5, True])
def test_bad_rank_pattern(rank):
    with pytest.raises(ValueError) as err:
        fastpeft.LoraConfig(r=4, rank_pattern={"down_proj": rank})
    assert "rank_pattern['down_proj']" in str(err.value) and "positive integer" in str(err.value)
    assert repr(rank) in str(err.value)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1", None])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got " + re.escape(repr(p))):
        fastpeft.LoraConfig(lora_dropout=p)


def test_bad_bias():
    with pytest.raises(ValueError) as err:
        fastpeft.LoraConfig(bias="some")
    assert "'some'" in str(err.value)
    for allowed in ("'none'", "'all'", "'lora_only'"):
        assert allowed in str(err.value)


def test_ia3_feedforward_not_subset():
    with pytest.raises(ValueError) as err:
        fastpeft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    assert "subset of target_modules" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(ValueError, match="subset of target_modules"):
        fastpeft.config.to_fastpeft_config(
            {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}
        )


# -- unsupported modules -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["embed_tokens"]])
def test_unsupported_module_type(model, extra):
    """A module fastpeft cannot adapt is refused with the supported types named, and nothing changes -- also when
    the same call adapts an embedding (LoRA on nn.Embedding is supported) before reaching it."""
    before = state_snapshot(model)
    with pytest.raises(TypeError) as err:
        fastpeft.patch(model, _lora(target_modules=["q_proj", *extra, "mlp"]))
    msg = str(err.value)
    assert "LlamaMLP" in msg and "mlp" in msg and "torch.nn.Linear" in msg and "Conv1D" in msg
    assert "torch.nn.Embedding with LoRA" in msg
    assert_same_snapshot(before, state_snapshot(model))


def test_unsupported_module_ia3(model):
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="Embedding"):
        fastpeft.patch(model, fastpeft.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    assert_same_snapshot(before, state_snapshot(model))


# -- unsupported PEFT fields ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(use_qalora=True), "use_qalora=True"),
        (dict(lora_bias=True), "lora_bias=True"),
        (dict(layer_replication=[(0, 1), (0, 2)]), "layer_replication="),
    ],
)
def test_unsupported_peft_fields(model, kwargs, field):
    before = state_snapshot(model)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], **kwargs)
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, cfg)
    msg = str(err.value)
    assert "does not support" in msg and field in msg and "Supported fields:" in msg and "rank_pattern" in msg
    assert_same_snapshot(before, state_snapshot(model))


def test_unknown_field_in_adapter_config_dict():
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "frobnicate": 3}
    with pytest.raises(ValueError) as err:
        fastpeft.config.to_fastpeft_config(data)
    assert "frobnicate=3" in str(err.value) and "Supported fields:" in str(err.value)
    with pytest.raises(ValueError,
                       match="unsupported peft_type 'BOFT'.*'LORA', 'IA3', 'VERA', 'LOHA', 'LOKR', 'OFT', 'TRAINABLE_TOKENS', "
                             "'PROMPT_TUNING'.*'ADALORA'"):
        fastpeft.config.to_fastpeft_config({"peft_type": "BOFT"})


def test_unknown_field_in_adapter_config_json(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["use_qalora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(data))
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="does not support use_qalora=True"):
        fastpeft.load_adapter(fresh, str(folder))
    assert_same_snapshot(before, state_snapshot(fresh))


# -- API misuse ----------------------------------------------------------------------------------------
def test_patch_twice_same_name(model):
    fastpeft.patch(model, _lora())
    before = state_snapshot(model)
    with pytest.raises(ValueError) as err:
        fastpeft.patch(model, _lora(target_modules=["k_proj"]))
    assert "'default' is already patched" in str(err.value) and "delete_adapter" in str(err.value)
    assert_same_snapshot(before, state_snapshot(model))


def test_patch_without_config(model):
    with pytest.raises(ValueError, match="needs a config.*LoraConfig or IA3Config.*PeftModel"):
        fastpeft.patch(model)


def test_bad_backend_env():
    """A typo in a FASTPEFT_* variable fails at import (settings are read once), naming the allowed values."""
    import subprocess
    import sys

    for var, value, allowed in (("FASTPEFT_BACKEND", "cuda-magic", "auto, cpp, triton, reference"),
                                ("FASTPEFT_NF4_GEMM", "cublas", "auto, fused, buffer"),
                                ("FASTPEFT_CSRC", "yes", "1 or 0"),
                                ("FASTPEFT_NF4_FUSED_MAX_M", "lots", "integer")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPEFT_")}
        env[var] = value
        run = subprocess.run([sys.executable, "-c", "import fastpeft"], env=env, capture_output=True, text=True)
        assert run.returncode != 0, var
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("ValueError") and f"{var}={value!r}" in last and allowed in last, last


def test_mixing_ia3_into_lora(model):
    fastpeft.patch(model, _lora())
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="holds LORA adapters; cannot add a IA3 adapter"):
        fastpeft.add_adapter(model, "b", fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert_same_snapshot(before, state_snapshot(model))


# -- load_adapter --------------------------------------------------------------------------------------
def test_load_missing_folder(tmp_path, model):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.load_adapter(model, str(missing))


def test_load_missing_config(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    os.remove(folder / "adapter_config.json")
    fresh = tiny_model("llama")
    with pytest.raises(FileNotFoundError) as err:
        fastpeft.load_adapter(fresh, str(folder))
    assert "no adapter_config.json" in str(err.value) and str(folder) in str(err.value)


def test_load_corrupt_json(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        fastpeft.load_adapter(fresh, str(folder))
    assert_same_snapshot(before, state_snapshot(fresh))


def test_load_missing_weights(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    os.remove(folder / "adapter_model.safetensors")
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        fastpeft.load_adapter(fresh, str(folder))
    assert_same_snapshot(before, state_snapshot(fresh))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_load_corrupt_weights(tmp_path, model, damage):
    folder = _saved_adapter(tmp_path, model)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x8a" * 16 + os.urandom(200))
    else:
        path.write_bytes(b"")
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        fastpeft.load_adapter(fresh, str(folder))
    assert_same_snapshot(before, state_snapshot(fresh))


def test_load_other_hidden_size_names_key_and_shapes(tmp_path):
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 64, 96
    torch.manual_seed(0)
    other = transformers.AutoModelForCausalLM.from_config(cfg)
    folder = _saved_adapter(tmp_path, other)
    model = tiny_model("llama")
    before = state_snapshot(model)
    with pytest.raises(ValueError) as err:
        fastpeft.load_adapter(model, str(folder))
    msg = str(err.value)
    first = sorted(load_file(folder / "adapter_model.safetensors"))[0]
    assert first == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert repr(first) in msg and "(4, 64)" in msg and "(4, 48)" in msg
    assert_same_snapshot(before, state_snapshot(model))


def test_load_other_rank_names_key_and_shapes(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)  # r=4 weights
    data = json.loads((folder / "adapter_config.json").read_text())
    data["r"] = 8  # a config that disagrees with its weights
    (folder / "adapter_config.json").write_text(json.dumps(data))
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError) as err:
        fastpeft.load_adapter(fresh, str(folder))
    msg = str(err.value)
    assert "layers.0.self_attn.q_proj.lora_A.weight" in msg and "(4, 48)" in msg and "(8, 48)" in msg
    assert_same_snapshot(before, state_snapshot(fresh))


def test_load_key_with_no_place(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 48)
    save_file(tensors, path, metadata={"format": "pt"})
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError) as err:
        fastpeft.load_adapter(fresh, str(folder))
    assert "layers.7.self_attn.q_proj.lora_A.weight" in str(err.value) and "no matching parameter" in str(err.value)
    assert_same_snapshot(before, state_snapshot(fresh))


def test_load_missing_tensor(tmp_path, model):
    folder = _saved_adapter(tmp_path, model)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, path, metadata={"format": "pt"})
    fresh = tiny_model("llama")
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.v_proj\.lora_B"):
        fastpeft.load_adapter(fresh, str(folder))
    assert_same_snapshot(before, state_snapshot(fresh))


# -- atomicity -----------------------------------------------------------------------------------------
def test_failure_midway_through_patch_rolls_back(model, monkeypatch):
    real = model_state.set_submodule
    calls = {"n": 0}

    def flaky(root, name, module):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(root, name, module)

    monkeypatch.setattr(model_state, "set_submodule", flaky)
    before = state_snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        fastpeft.patch(model, _lora(target_modules="all-linear", modules_to_save=["lm_head"]))
    assert calls["n"] > 3  # the rollback ran through the same helper
    assert_same_snapshot(before, state_snapshot(model))
    assert not model.get_input_embeddings()._forward_hooks  # the input-grad hook is gone too
    assert not model._forward_pre_hooks and not model._forward_hooks  # and the adapter_names hooks
    assert "generate" not in model.__dict__  # and the generate route
    monkeypatch.setattr(model_state, "set_submodule", real)
    fastpeft.patch(model, _lora())  # the model is still usable
    assert fastpeft.active_adapter(model) == "default"


def test_failure_midway_through_add_adapter_rolls_back(model, monkeypatch):
    fastpeft.patch(model, _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    real = model_state.Transaction.swap
    calls = {"n": 0}

    def flaky(self, name, new):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(self, name, new)

    monkeypatch.setattr(model_state.Transaction, "swap", flaky)
    before = state_snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        fastpeft.add_adapter(model, "b", _lora(target_modules=["q_proj", "k_proj", "o_proj"], modules_to_save=["lm_head"]))
    assert_same_snapshot(before, state_snapshot(model))
    assert "b" not in model_state.get_state(model).configs
    assert all("b" not in m.adapter_names for _, m in model_state.adapter_layers(model))


def _other_size_adapter(tmp_path):
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 64, 96
    torch.manual_seed(0)
    other = transformers.AutoModelForCausalLM.from_config(cfg)
    return _saved_adapter(tmp_path, other, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def test_failed_load_on_unpatched_model_is_atomic(tmp_path, model):
    folder = _other_size_adapter(tmp_path)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="has shape"):
        fastpeft.load_adapter(model, str(folder), is_trainable=True)
    assert_same_snapshot(before, state_snapshot(model))
    assert model_state.get_state(model, required=False) is None
    assert not model.get_input_embeddings()._forward_hooks


def test_failed_load_on_patched_model_is_atomic(tmp_path, model):
    folder = _other_size_adapter(tmp_path)
    fastpeft.patch(model, _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="has shape"):
        fastpeft.load_adapter(model, str(folder), adapter_name="b", is_trainable=True)
    assert_same_snapshot(before, state_snapshot(model))
    state = model_state.get_state(model)
    assert list(state.configs) == ["default"] and state.active == "default"


def test_ia3_feedforward_disagreement_on_add_adapter_is_atomic(model):
    fastpeft.patch(model, fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    before = state_snapshot(model)
    with pytest.raises(ValueError) as err:
        fastpeft.add_adapter(model, "b", fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=[]))
    assert "down_proj" in str(err.value) and "feedforward" in str(err.value)
    assert_same_snapshot(before, state_snapshot(model))
    assert all("b" not in m.adapter_names for _, m in model_state.adapter_layers(model))


# -- what a new user hit ---------------------------------------------------------------------------------
def test_patch_peft_model_with_a_config_says_what_to_do(model):
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = state_snapshot(peft_model)
    with pytest.raises(ValueError) as err:
        fastpeft.patch(peft_model, _lora())
    msg = str(err.value)
    assert "PeftModel" in msg and "fastpeft.patch(peft_model)" in msg and "add_adapter" in msg
    assert "pass a PeftModel" not in msg  # the old message asked for what the user had passed
    assert_same_snapshot(before, state_snapshot(peft_model))


@pytest.mark.parametrize("how", ["forward", "generate", "converted-forward", "converted-generate"])
def test_adapter_names_is_checked_not_ignored(model, how):
    """transformers swallows unknown keyword arguments, so model(ids, adapter_names=[...]) once returned the active
    adapter's output for every row without a word. Now it runs a mixed batch (tests/model/test_mixed_batch.py);
    a name the model does not have is a clear error on every entry point, and the model is unchanged after it."""
    ids = torch.randint(1, 90, (2, 5))
    if how.startswith("converted"):
        target = fastpeft.patch(peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"])))
    else:
        target = fastpeft.patch(model, _lora())
    target.eval()
    with torch.no_grad():
        expected = target(input_ids=ids).logits
        with pytest.raises(ValueError, match=r"adapter_names holds \['other'\].*allowed: \['default', '__base__'\]"):
            if how.endswith("generate"):
                target.generate(input_ids=ids, adapter_names=["default", "other"], max_new_tokens=2, do_sample=False)
            else:
                target(input_ids=ids, adapter_names=["default", "other"])
        assert torch.equal(target(input_ids=ids).logits, expected)  # without it nothing changed
        assert torch.equal(target(input_ids=ids, adapter_names=None).logits, expected)
        assert torch.equal(target(input_ids=ids, adapter_names=["default", "default"]).logits, expected)
    if not how.startswith("converted"):
        fastpeft.unpatch(target)
        assert not target._forward_pre_hooks  # unpatch removes the guard

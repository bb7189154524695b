"""Adapters on disk: PEFT's layout exactly, loadable both ways (PEFT <-> fastpeft), atomic writes, QLoRA.

Every adapter here holds fresh random weights (init_lora_weights=False / init_ia3_weights=False, then every
trainable tensor perturbed), so an adapter that is dropped or mis-mapped changes the logits.
"""
import copy
import json
import os
import stat

import peft
import pytest
import safetensors
import safetensors.torch
import torch

import fastpeft
import fastpeft.adapter_io as adapter_io
from helpers import nf4_tiny_model, random_ids, rel_err, tiny_model

FP32_TOL = 1e-5
PREFIX = "base_model.model."


# -- helpers -------------------------------------------------------------------------------------------
def _perturb_trainable(model, seed, scale=0.3):
    """Add fresh noise to every trainable tensor (adapter weights, modules_to_save copies, trained biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def _strip(name):
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _copy_trainable(src, dst):
    """Copy src's trainable tensors into dst's parameters of the same (prefix-free) name."""
    theirs = {_strip(n): p for n, p in src.named_parameters() if p.requires_grad}
    copied = 0
    with torch.no_grad():
        for name, param in dst.named_parameters():
            if _strip(name) in theirs:
                param.copy_(theirs[_strip(name)])
                copied += 1
    assert copied == len(theirs) > 0
    return copied


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pair(arch, cfg, seed=0, noise_seed=100, base=None):
    """(peft_model, ours) holding the same random adapter weights on copies of one base."""
    base = tiny_model(arch, seed) if base is None else base
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg))
    _perturb_trainable(ours, noise_seed)
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    _copy_trainable(ours, peft_model)
    return peft_model, ours


def _assert_adapter_matters(adapted, base_logits):
    assert rel_err(adapted, base_logits) > 1e-3  # the adapter really changes the outputs


LORA_LLAMA = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # noqa: E731
LORA_GPT2 = lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_fc"], init_lora_weights=False)  # noqa: E731
LORA_GPT2_BIAS_MTS = lambda: peft.LoraConfig(  # noqa: E731
    r=3, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"], bias="all", modules_to_save=["ln_f"],
    init_lora_weights=False,
)
LORA_GPT2_LORA_ONLY = lambda: peft.LoraConfig(  # noqa: E731
    r=3, lora_alpha=5, target_modules=["c_attn"], bias="lora_only", init_lora_weights=False
)
LORA_LLAMA_SET_MTS = lambda: peft.LoraConfig(  # noqa: E731
    r=4, lora_alpha=8, target_modules={"v_proj", "q_proj", "up_proj"}, modules_to_save=["lm_head"],
    init_lora_weights=False,
)
IA3_LLAMA = lambda: peft.IA3Config(init_ia3_weights=False)  # noqa: E731  k, v, down (down = feedforward)
IA3_GPT2 = lambda: peft.IA3Config(init_ia3_weights=False)  # noqa: E731  c_attn, mlp.c_proj (feedforward)

CASES = {
    "lora-llama": ("llama", LORA_LLAMA),
    "lora-llama-set-mts": ("llama", LORA_LLAMA_SET_MTS),
    "lora-gpt2": ("gpt2", LORA_GPT2),
    "lora-gpt2-bias-all-mts": ("gpt2", LORA_GPT2_BIAS_MTS),
    "lora-gpt2-lora-only": ("gpt2", LORA_GPT2_LORA_ONLY),
    "ia3-llama": ("llama", IA3_LLAMA),
    "ia3-gpt2": ("gpt2", IA3_GPT2),
}


# -- 1. the files fastpeft writes are PEFT's ------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_writes_peft_layout_and_tensors(case, tmp_path):
    arch, make_cfg = CASES[case]
    cfg = make_cfg()
    peft_model, ours = _pair(arch, cfg)
    fastpeft.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert data["peft_type"] == ("LORA" if isinstance(cfg, peft.LoraConfig) else "IA3")
    assert data["inference_mode"] is True
    if isinstance(cfg.target_modules, set):
        assert data["target_modules"] == sorted(cfg.target_modules)
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).peft_type.value == data["peft_type"]

    weights = tmp_path / "adapter_model.safetensors"
    with safetensors.safe_open(str(weights), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    saved = safetensors.torch.load_file(str(weights))
    expected = peft.get_peft_model_state_dict(peft_model)
    assert sorted(saved) == sorted(expected)
    for key, tensor in expected.items():
        assert saved[key].dtype == torch.float32, key
        assert torch.equal(saved[key], tensor), key
    # No adapter name in any key, and PEFT's shapes.
    assert not any(".default" in k for k in saved)
    for path, module in ours.named_modules():
        if isinstance(module, fastpeft.LoraLinear):
            assert saved[f"{PREFIX}{path}.lora_A.weight"].shape == (module.r["default"], module.in_features)
            assert saved[f"{PREFIX}{path}.lora_B.weight"].shape == (module.out_features, module.r["default"])
        elif isinstance(module, fastpeft.IA3Linear):
            want = (1, module.in_features) if module.is_feedforward else (module.out_features, 1)
            assert saved[f"{PREFIX}{path}.ia3_l"].shape == want
    if case == "ia3-llama":
        assert saved[f"{PREFIX}model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 88)
        assert saved[f"{PREFIX}model.layers.0.self_attn.k_proj.ia3_l"].shape == (24, 1)
    if case == "lora-gpt2-bias-all-mts":
        assert f"{PREFIX}transformer.h.0.attn.c_attn.base_layer.bias" in saved
        assert f"{PREFIX}transformer.h.1.ln_2.bias" in saved
        assert f"{PREFIX}transformer.ln_f.weight" in saved
    if case == "lora-gpt2-lora-only":
        assert {k for k in saved if k.endswith("bias")} == {
            f"{PREFIX}transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)
        }
    if case == "lora-llama-set-mts":
        assert torch.equal(saved[f"{PREFIX}lm_head.weight"], ours.lm_head.modules_to_save["default"].weight)


# -- 2. PEFT loads what fastpeft saves -----------------------------------------------------------------
@pytest.mark.parametrize("case", ["lora-llama", "lora-gpt2", "ia3-llama", "ia3-gpt2", "lora-gpt2-bias-all-mts",
                                  "lora-llama-set-mts"])
def test_peft_loads_fastpeft_save(case, tmp_path):
    arch, make_cfg = CASES[case]
    base = tiny_model(arch, seed=1)
    ours = fastpeft.patch(copy.deepcopy(base), make_cfg())
    _perturb_trainable(ours, 7)
    ids = random_ids(seed=2)
    want = _logits(ours, ids)
    _assert_adapter_matters(want, _logits(base, ids))
    fastpeft.save_adapter(ours, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch, seed=1), str(tmp_path))
    assert rel_err(_logits(loaded, ids), want) <= FP32_TOL


def test_extra_adapter_goes_to_subfolder_and_peft_loads_it(tmp_path):
    base = tiny_model("llama", seed=2)
    ours = fastpeft.patch(copy.deepcopy(base), LORA_LLAMA())
    fastpeft.add_adapter(ours, "b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "down_proj"],
                                                    init_lora_weights=False))
    _perturb_trainable(ours, 8)  # only "default" trains; give "b" fresh values too
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        for name, param in ours.named_parameters():
            if ".b." in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    ids = random_ids(seed=3)
    want_default = _logits(ours, ids)
    fastpeft.set_adapter(ours, "b")
    want_b = _logits(ours, ids)
    assert rel_err(want_b, want_default) > 1e-3
    fastpeft.save_adapter(ours, str(tmp_path))
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    b_keys = safetensors.torch.load_file(str(tmp_path / "b" / "adapter_model.safetensors")).keys()
    assert all(("k_proj" in k or "down_proj" in k) and ".b." not in k for k in b_keys)

    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", seed=2), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert rel_err(_logits(loaded, ids), want_default) <= FP32_TOL
    loaded.set_adapter("b")
    assert rel_err(_logits(loaded, ids), want_b) <= FP32_TOL


# -- 3. fastpeft loads what PEFT saves ------------------------------------------------------------------
def _peft_saved(arch, cfg, path, seed=3, noise_seed=11):
    base = tiny_model(arch, seed=seed)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _perturb_trainable(peft_model, noise_seed)
    peft_model.save_pretrained(str(path))
    return base, peft_model


@pytest.mark.parametrize("case", ["lora-llama", "lora-gpt2-bias-all-mts", "ia3-llama", "ia3-gpt2",
                                  "lora-llama-set-mts"])
def test_fastpeft_loads_peft_save(case, tmp_path):
    arch, make_cfg = CASES[case]
    base, peft_model = _peft_saved(arch, make_cfg(), tmp_path)
    ids = random_ids(seed=4)
    want = _logits(peft_model, ids)
    _assert_adapter_matters(want, _logits(base, ids))
    fresh = tiny_model(arch, seed=3)
    model = fastpeft.load_adapter(fresh, str(tmp_path))
    assert model is fresh and fastpeft.active_adapter(model) == "default"
    assert rel_err(_logits(model, ids), want) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fastpeft_loads_half_precision_adapter_file(dtype, tmp_path):
    base, peft_model = _peft_saved("llama", LORA_LLAMA(), tmp_path)
    weights = str(tmp_path / "adapter_model.safetensors")
    tensors = safetensors.torch.load_file(weights)
    half = {k: v.to(dtype) for k, v in tensors.items()}
    safetensors.torch.save_file(half, weights, metadata={"format": "pt"})
    # The oracle: PEFT's model with its adapter rounded to the file's precision (kept in fp32).
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(param.to(dtype).float())
    ids = random_ids(seed=5)
    model = fastpeft.load_adapter(tiny_model("llama", seed=3), str(tmp_path))
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    for key, value in half.items():
        path = _strip(key).replace(".weight", "")
        assert torch.equal(adapter[f"{path}.default.weight"], value.float()), key
    assert rel_err(_logits(model, ids), _logits(peft_model, ids)) <= FP32_TOL


def test_fastpeft_loads_adapter_from_subfolder(tmp_path):
    base = tiny_model("llama", seed=3)
    peft_model = peft.get_peft_model(copy.deepcopy(base), LORA_LLAMA())
    peft_model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    ids = random_ids(seed=6)
    want_default = _logits(peft_model, ids)
    peft_model.set_adapter("b")
    want_b = _logits(peft_model, ids)
    assert rel_err(want_b, want_default) > 1e-3

    only_b = fastpeft.load_adapter(tiny_model("llama", seed=3), str(tmp_path), adapter_name="b")
    fastpeft.set_adapter(only_b, "b")
    assert sorted(n for n, _ in only_b.named_parameters() if "lora_" in n)[0].endswith(".b.weight")
    assert rel_err(_logits(only_b, ids), want_b) <= FP32_TOL

    both = fastpeft.load_adapter(tiny_model("llama", seed=3), str(tmp_path))
    fastpeft.load_adapter(both, str(tmp_path), adapter_name="b")
    assert rel_err(_logits(both, ids), want_default) <= FP32_TOL
    fastpeft.set_adapter(both, "b")
    assert rel_err(_logits(both, ids), want_b) <= FP32_TOL


@pytest.mark.parametrize("case", ["lora-gpt2-bias-all-mts", "ia3-llama"])
def test_load_is_trainable_flag(case, tmp_path):
    arch, make_cfg = CASES[case]
    _peft_saved(arch, make_cfg(), tmp_path)
    frozen = fastpeft.load_adapter(tiny_model(arch, seed=3), str(tmp_path), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = fastpeft.load_adapter(tiny_model(arch, seed=3), str(tmp_path), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    adapter_names = {n for n, _ in trainable.named_parameters() if ".default" in n}
    assert adapter_names and adapter_names <= names
    assert all(".default" in n or n.endswith("bias") for n in names)
    ids = random_ids(seed=7)
    trainable.train()
    trainable(input_ids=ids, labels=ids).loss.backward()
    assert all(trainable.get_parameter(n).grad is not None for n in adapter_names)


# -- 4. pickle files need an explicit opt-in ------------------------------------------------------------
def test_pickle_only_adapter_needs_allow_pickle(tmp_path):
    base, peft_model = _peft_saved("llama", LORA_LLAMA(), tmp_path / "st")
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    files = os.listdir(tmp_path / "bin")
    assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files
    model = tiny_model("llama", seed=3)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        fastpeft.load_adapter(model, str(tmp_path / "bin"))
    assert not any(isinstance(m, fastpeft.LoraLinear) for m in model.modules())  # untouched on refusal
    assert "_fastpeft_state" not in model.__dict__
    fastpeft.load_adapter(model, str(tmp_path / "bin"), allow_pickle=True)
    ids = random_ids(seed=8)
    assert rel_err(_logits(model, ids), _logits(peft_model, ids)) <= FP32_TOL


# -- 5. saving is atomic ---------------------------------------------------------------------------------
def _folder_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def _two_adapter_model(seed):
    model = fastpeft.patch(tiny_model("llama", seed=seed), LORA_LLAMA())
    fastpeft.add_adapter(model, "b", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    _perturb_trainable(model, seed)
    return model


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_save_leaves_existing_adapter_folder_intact(fail_at, tmp_path, monkeypatch):
    old = _two_adapter_model(seed=4)
    fastpeft.save_adapter(old, str(tmp_path))
    before = _folder_bytes(tmp_path)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors", "b/adapter_config.json",
                           "b/adapter_model.safetensors"}

    new = _two_adapter_model(seed=5)
    real_save_file = safetensors.torch.save_file
    calls = []

    def flaky_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_at:  # write part of the file, then die
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as fh:
                fh.truncate(100)
            raise OSError("disk full (injected)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(adapter_io, "save_file", flaky_save_file)
    with pytest.raises(OSError, match="injected"):
        fastpeft.save_adapter(new, str(tmp_path))
    assert len(calls) == fail_at
    assert _folder_bytes(tmp_path) == before  # every old file intact, nothing half-new, no temp files

    monkeypatch.setattr(adapter_io, "save_file", real_save_file)
    fastpeft.save_adapter(new, str(tmp_path))  # and a later save still works
    assert _folder_bytes(tmp_path) != before
    assert set(_folder_bytes(tmp_path)) == set(before)


def test_failed_config_write_leaves_folder_intact(tmp_path, monkeypatch):
    old = _two_adapter_model(seed=4)
    fastpeft.save_adapter(old, str(tmp_path))
    before = _folder_bytes(tmp_path)
    new = _two_adapter_model(seed=5)  # built first: transformers calls json.dumps while making a model
    real_dumps = json.dumps
    state = {"n": 0}

    def flaky_dumps(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("config write failed (injected)")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(adapter_io.json, "dumps", flaky_dumps)
    with pytest.raises(RuntimeError, match="injected"):
        fastpeft.save_adapter(new, str(tmp_path))
    assert state["n"] == 2  # failed on adapter "b"'s config, after "default"'s files were complete
    assert _folder_bytes(tmp_path) == before


def test_failed_first_save_leaves_no_files(tmp_path, monkeypatch):
    target = tmp_path / "new_adapter"

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("injected")

    monkeypatch.setattr(adapter_io, "save_file", broken)
    with pytest.raises(OSError, match="injected"):
        fastpeft.save_adapter(_two_adapter_model(seed=6), str(target))
    leftovers = _folder_bytes(tmp_path)
    assert leftovers == {}


def test_saved_files_have_ordinary_permissions(tmp_path):
    fastpeft.save_adapter(_two_adapter_model(seed=7), str(tmp_path))
    probe = tmp_path / "probe"
    probe.write_text("x")  # what a plain open() creates under this process's umask
    want = stat.S_IMODE(os.stat(probe).st_mode)
    for rel in ("adapter_config.json", "adapter_model.safetensors", "b/adapter_model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / rel).st_mode) == want, rel


# -- 6. converting an existing PeftModel ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["lora-llama-set-mts", "ia3-gpt2", "lora-gpt2-bias-all-mts"])
def test_patch_peft_model_in_place(case, tmp_path):
    arch, make_cfg = CASES[case]
    base = tiny_model(arch, seed=5)
    peft_model = peft.get_peft_model(copy.deepcopy(base), make_cfg())
    _perturb_trainable(peft_model, 13)
    ids = random_ids(seed=9)
    want = _logits(peft_model, ids)
    _assert_adapter_matters(want, _logits(base, ids))
    names_before = [n for n, _ in peft_model.named_parameters()]
    params_before = {n: p for n, p in peft_model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_types = {n: type(m) for n, m in peft_model.named_modules()}
    peft_model.save_pretrained(str(tmp_path / "peft"))

    out = fastpeft.patch(peft_model)
    assert out is peft_model
    kinds = (fastpeft.LoraLinear, fastpeft.IA3Linear)
    assert any(isinstance(m, kinds) for m in peft_model.modules())
    assert [n for n, _ in peft_model.named_parameters()] == names_before
    for name, param in peft_model.named_parameters():
        assert param is params_before[name], name  # the very same Parameter objects
        assert param.requires_grad == flags_before[name], name
    assert rel_err(_logits(peft_model, ids), want) <= FP32_TOL

    fastpeft.save_adapter(peft_model, str(tmp_path / "ours"))
    theirs = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = safetensors.torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    peft_model.save_pretrained(str(tmp_path / "after"))  # PEFT's own save still works on the converted model
    after = safetensors.torch.load_file(str(tmp_path / "after" / "adapter_model.safetensors"))
    assert sorted(after) == sorted(theirs) and all(torch.equal(after[k], theirs[k]) for k in theirs)
    reloaded = peft.PeftModel.from_pretrained(tiny_model(arch, seed=5), str(tmp_path / "after"))
    assert rel_err(_logits(reloaded, ids), want) <= FP32_TOL

    fastpeft.unpatch(peft_model)
    assert "save_pretrained" not in peft_model.__dict__  # PEFT's own method again
    assert {n: type(m) for n, m in peft_model.named_modules()} == peft_types
    assert not any(isinstance(m, kinds) for m in peft_model.modules())
    assert rel_err(_logits(peft_model, ids), want) <= FP32_TOL


# -- 7. fastpeft -> fastpeft round trip -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora-patterns", "ia3"])
def test_fastpeft_round_trip(kind, tmp_path):
    if kind == "ia3":
        cfg = fastpeft.IA3Config(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                                 feedforward_modules=["down_proj", "up_proj"], init_ia3_weights=False)
    else:
        cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                  rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6},
                                  alpha_pattern={"k_proj": 3}, init_lora_weights=False)
    ours = fastpeft.patch(tiny_model("llama", seed=6), cfg)
    _perturb_trainable(ours, 14)
    ids = random_ids(seed=10)
    want = _logits(ours, ids)
    fastpeft.save_adapter(ours, str(tmp_path))
    loaded = fastpeft.load_adapter(tiny_model("llama", seed=6), str(tmp_path))
    assert rel_err(_logits(loaded, ids), want) <= FP32_TOL
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(loaded) == shapes(ours)
    if kind != "ia3":
        layer1 = loaded.model.layers[1]
        assert layer1.self_attn.q_proj.r["default"] == 6 and layer1.mlp.down_proj.r["default"] == 2
        assert layer1.self_attn.k_proj.scaling["default"] == 3 / 4
    # The peft model loads it the same.
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", seed=6), str(tmp_path))
    assert rel_err(_logits(theirs, ids), want) <= FP32_TOL


# -- 8. QLoRA (bitsandbytes NF4 on CPU) ----------------------------------------------------------------
QLORA_CFG = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # noqa: E731


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_matches_peft(double_quant):
    import bitsandbytes as bnb

    base = nf4_tiny_model("llama", double_quant=double_quant)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.nested == double_quant
    peft_model, ours = _pair("llama", QLORA_CFG(), base=base, noise_seed=15)
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = random_ids(seed=11)
    peft_model.train()
    ours.train()
    out_p = peft_model(input_ids=ids, labels=ids)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_p.logits) <= FP32_TOL
    out_p.loss.backward()
    out_o.loss.backward()
    theirs = {_strip(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 7 * 2
    for name, param in mine.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert rel_err(param.grad, theirs[name].grad) <= FP32_TOL, name


def test_qlora_save_load_with_peft(tmp_path):
    peft_model, ours = _pair("llama", QLORA_CFG(), base=nf4_tiny_model("llama"), noise_seed=16)
    ids = random_ids(seed=12)
    want = _logits(ours, ids)
    _assert_adapter_matters(want, _logits(nf4_tiny_model("llama"), ids))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(nf4_tiny_model("llama"), str(tmp_path / "ours"))
    assert rel_err(_logits(theirs, ids), want) <= FP32_TOL
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = fastpeft.load_adapter(nf4_tiny_model("llama"), str(tmp_path / "peft"))
    assert rel_err(_logits(loaded, ids), want) <= FP32_TOL
    a = safetensors.torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_merge_and_unload():
    import bitsandbytes as bnb

    ours = fastpeft.patch(nf4_tiny_model("llama", double_quant=True), QLORA_CFG())
    # Noise 0.05, not 0.3: with 0.3 the random adapters make this tiny model so ill-conditioned that *each* fp32
    # path (merged or not) is already ~2.5e-5 off the fp64 result (measured), so the two differ by ~5e-5 from
    # rounding alone. At 0.05 both are ~5e-7 off fp64 and the adapter still moves the logits by >100%.
    _perturb_trainable(ours, 17, scale=0.05)
    ids = random_ids(seed=13)
    want = _logits(ours, ids)
    _assert_adapter_matters(want, _logits(nf4_tiny_model("llama", double_quant=True), ids))
    merged = fastpeft.merge_and_unload(ours)
    kinds = (bnb.nn.Linear4bit, fastpeft.LoraLinear, fastpeft.IA3Linear, fastpeft.ModulesToSave)
    assert not any(isinstance(m, kinds) for m in merged.modules())
    assert "_fastpeft_state" not in merged.__dict__
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert rel_err(_logits(merged, ids), want) <= FP32_TOL


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_reads_weight_repacked_by_bnb_cpu_inference(double_quant):
    """bnb's CPU eval forward repacks a Linear4bit weight in place (bf16 absmax, tiled nibbles); fastpeft
    must still see the weight bnb now computes with — not garbage."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from fastpeft.nn import bases as B

    torch.manual_seed(21)
    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(0.05 * torch.randn(64, 128), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    layer = layer.to("cpu").eval()
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bnb never repacks here")
    qs = layer.weight.quant_state
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    rounded = bnbf.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=qs.shape, code=qs.code,
                              blocksize=qs.blocksize, quant_type="nf4", dtype=torch.float32)
    expected = bnbf.dequantize_4bit(layer.weight.data.clone(), rounded)  # what bnb computes with after repacking
    before = B.dequantize_linear4bit(layer)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_bnb = layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = B.dequantize_linear4bit(layer)
    assert torch.equal(after, expected)
    assert rel_err(after, before) < 4e-3  # only the bf16 rounding of absmax changed
    lora = fastpeft.LoraLinear(layer, "default", r=2, lora_alpha=2)
    with torch.no_grad():
        y_ours = lora(x)  # lora_B is zero: the base output
    # bnb's packed kernel computes in bf16, so it is only close; ours is fp32 on the same (repacked) weight.
    assert rel_err(y_ours, torch.nn.functional.linear(x, expected, layer.bias)) <= FP32_TOL
    assert rel_err(y_ours, y_bnb) < 1e-2

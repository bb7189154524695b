"""VeRA (fastpeft.VeraConfig / VeraLinear) against PEFT's VeRA: the same projections and vectors from the same seed,
logits and vector gradients (fp32 <= 1e-5) on every path (reference, Triton kernels, C++ operators), dropout,
PEFT's file format both ways (with and without the projections), merge, several adapters, bias, errors."""
import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from helpers import PEFT_PREFIX as PREFIX, peft_and_fastpeft, peft_parameters, random_ids, rel_err, tiny_model

TOL = 1e-5
BACKENDS = ["reference", "triton", "cpp"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "o_proj", "up_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _pair(arch="llama", backend="reference", monkeypatch=None, seed=0, **extra):
    base = tiny_model(arch, seed=1)
    kw = {**dict(r=8, target_modules=TARGETS[arch], init_weights=False), **extra}
    return (base, *peft_and_fastpeft(base, "VeraConfig", seed, monkeypatch, backend, **kw))


# The kernel paths form λ_d's gradient as rowsum(dA' ⊙ A_s) (dA' from the LoRA operator), PEFT as a sum over tokens
# of (A_s·x) ⊙ (B_sᵀ·(λ_b ⊙ dy)): the same fp32 sum with cancellation in another order. Against an fp64 twin PEFT's
# error on it is ~5e-6 and ours ~7e-6 (test_lambda_gradients_are_as_accurate_as_pefts), so the two fp32 results
# can differ by 1.1e-5; this is their bound against each other on those paths.
KERNEL_LAMBDA_D_TOL = 2e-5


def _compare(theirs, ours, train=False, seed=None, tol=TOL):
    theirs.train(train)
    ours.train(train)
    ids = random_ids(batch=2, seq=9)
    if seed is not None:
        torch.manual_seed(seed)
    out_t = theirs(input_ids=ids, labels=ids)
    if seed is not None:
        torch.manual_seed(seed)
    out_o = ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= tol
    out_t.loss.backward()
    out_o.loss.backward()
    grads_t = {n: p.grad for n, p in peft_parameters(theirs).items() if p.grad is not None}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_o.keys() == grads_t.keys() and any("vera_lambda_d" in n for n in grads_o)
    kernels = any(isinstance(m, fastpeft.VeraLinear) and m.backend != "reference" for m in ours.modules())
    for name, grad in grads_o.items():
        bound = KERNEL_LAMBDA_D_TOL if kernels and "vera_lambda_d" in name else tol
        assert rel_err(grad, grads_t[name]) <= bound, name


def _fp64_twin(base, cfg):
    torch.manual_seed(0)
    twin = peft.get_peft_model(copy.deepcopy(base).double(), cfg)
    for module in twin.modules():
        if hasattr(module, "vera_A"):
            module.to(torch.float64)  # the shared projection tables too
    for param in twin.parameters():
        param.data = param.data.double()
    return twin


def _grads(model):
    ids = random_ids(batch=2, seq=9)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n.replace(PREFIX, "", 1): p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_lambda_gradients_are_as_accurate_as_pefts(backend, monkeypatch):
    base, theirs, ours = _pair("gpt2", backend, monkeypatch)
    exact = _grads(_fp64_twin(base, peft.VeraConfig(r=8, target_modules=TARGETS["gpt2"], init_weights=False)))
    grads_t, grads_o = _grads(theirs), _grads(ours)
    for name, grad in grads_o.items():
        peft_error = rel_err(grads_t[name], exact[name])
        assert rel_err(grad, exact[name]) <= max(2 * peft_error, TOL), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_vectors_projections_and_numbers_as_peft(arch, backend, monkeypatch):
    _, theirs, ours = _pair(arch, backend, monkeypatch)
    assert isinstance(ours.get_submodule(f"{'transformer.h' if arch == 'gpt2' else 'model.layers'}.0."
                                         f"{'attn.c_attn' if arch == 'gpt2' else 'self_attn.q_proj'}"), fastpeft.VeraLinear)
    params_t = peft_parameters(theirs)
    for name, param in ours.named_parameters():
        assert torch.equal(param, params_t[name]), name  # the same draws from the same seed
    layer = next(m for m in ours.modules() if isinstance(m, fastpeft.VeraLinear))
    layer_t = next(m for m in theirs.modules() if type(m).__name__ == "Linear" and hasattr(m, "vera_A"))
    assert torch.equal(layer.vera_A["default"], layer_t.vera_A["default"])
    assert torch.equal(layer.vera_B["default"], layer_t.vera_B["default"])
    _compare(theirs, ours)


def test_default_init_keeps_the_base_and_trains_lambda_b():
    base, theirs, ours = _pair(init_weights=True)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    _compare(theirs, ours)


def test_dropout_matches_peft_on_the_reference_path(monkeypatch):
    _, theirs, ours = _pair(backend="reference", monkeypatch=monkeypatch, vera_dropout=0.3)
    _compare(theirs, ours, train=True, seed=7)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_dropout_on_the_kernel_paths_is_a_mask_on_the_input(backend, monkeypatch):
    """The kernels draw their own mask (not torch's stream): check the result is the delta of *some* input mask
    of the right rate, by comparing against the reference with that mask recovered from p=1-drop-everything."""
    _, _, ours = _pair(backend=backend, monkeypatch=monkeypatch, vera_dropout=0.5)
    ours.train()
    ids = random_ids(batch=2, seq=9)
    torch.manual_seed(0)
    a = ours(input_ids=ids).logits
    torch.manual_seed(0)
    b = ours(input_ids=ids).logits
    assert torch.equal(a, b)  # reproducible from torch's seed
    torch.manual_seed(1)
    assert not torch.equal(a, ours(input_ids=ids).logits)  # and it does drop something
    ours.eval()
    assert not torch.equal(a, ours(input_ids=ids).logits)


@pytest.mark.parametrize("save_projection", [True, False])
def test_pefts_file_format_both_ways(tmp_path, save_projection):
    base, theirs, ours = _pair(save_projection=save_projection)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in tensors) == save_projection
    assert all(k.startswith("base_model.") for k in tensors)
    ids = random_ids()
    ctx = pytest.warns(UserWarning) if not save_projection else _nothing()
    with ctx:
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert rel_err(reloaded(input_ids=ids).logits, want) <= TOL
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    with open(tmp_path / "ours" / "adapter_config.json") as fh, open(tmp_path / "theirs" / "adapter_config.json") as fh2:
        cfg_o, cfg_t = json.load(fh), json.load(fh2)
    cfg_t["target_modules"] = sorted(cfg_t["target_modules"])  # PEFT writes a set in hash order
    assert cfg_o == cfg_t
    with (pytest.warns(UserWarning, match="drawn again") if not save_projection else _nothing()):
        loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "theirs"))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_merge_unmerge_and_merge_and_unload():
    _, _, ours = _pair()
    ids = random_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        fastpeft.merge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        fastpeft.unmerge(ours)
        assert rel_err(ours(input_ids=ids).logits, want) <= TOL
        merged = fastpeft.merge_and_unload(ours)
        assert not any(isinstance(m, fastpeft.VeraLinear) for m in merged.modules())
        assert rel_err(merged(input_ids=ids).logits, want) <= TOL


def test_several_adapters_share_the_tables_and_switch():
    _, theirs, ours = _pair()
    fastpeft.add_adapter(ours, "second", fastpeft.VeraConfig(r=8, target_modules=["q_proj"], init_weights=False))
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    other = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.vera_A is other.vera_A and set(layer.vera_A.keys()) == {"default", "second"}
    assert layer.vera_A["second"].shape == (8, 48)  # sized by the second adapter's own targets
    ids = random_ids()
    with torch.no_grad():
        first = ours(input_ids=ids).logits
        fastpeft.set_adapter(ours, "second")
        assert not torch.equal(ours(input_ids=ids).logits, first)
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
            f"model.layers.{i}.self_attn.q_proj.vera_lambda_{v}.second" for i in (0, 1) for v in "bd"}
        fastpeft.set_adapter(ours, "default")
        assert torch.equal(ours(input_ids=ids).logits, first)
    fastpeft.delete_adapter(ours, "second")
    assert set(layer.vera_A.keys()) == {"default"}
    with pytest.raises(ValueError, match="projection_prng_key"):
        fastpeft.add_adapter(ours, "third", fastpeft.VeraConfig(r=8, target_modules=["q_proj"], projection_prng_key=3))
    with pytest.raises(ValueError, match="one adapter method per model|cannot add a LORA adapter"):
        fastpeft.add_adapter(ours, "lora", fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert set(layer.vera_A.keys()) == {"default"}  # the failed adds left nothing behind


def test_bias_vera_only_trains_what_peft_trains():
    _, theirs, ours = _pair("qwen2", bias="vera_only")
    want = {n for n, p in peft_parameters(theirs).items() if p.requires_grad}
    got = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert got == want and any(n.endswith("k_proj.base_layer.bias") for n in got)


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_trained_biases_are_saved_as_peft_saves_them(tmp_path, bias):
    """bias="vera_only" / "all": the trained biases go into the file under PEFT's keys and load in PEFT."""
    base, theirs, ours = _pair("qwen2", bias=bias)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
                dict(theirs.named_parameters())[PREFIX + n].copy_(p)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any(k.endswith(".bias") for k in got)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits) <= TOL


def test_bad_files_are_refused_and_leave_the_model_unchanged(tmp_path):
    base, theirs, _ = _pair()
    theirs.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    model = copy.deepcopy(base)
    names = [n for n, _ in model.named_modules()]
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, path)
    with pytest.raises(ValueError, match="has base_model.vera_A but not its pair"):
        fastpeft.load_adapter(model, str(tmp_path))
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k and "vera_B" not in k}, path)
    with pytest.raises(ValueError, match="save_projection=true but its file lacks"):
        fastpeft.load_adapter(model, str(tmp_path))
    save_file({**tensors, "base_model.vera_A": tensors["base_model.vera_A"][:, :10].contiguous()}, path)
    with pytest.raises(ValueError, match="VeRA projection has shape"):
        fastpeft.load_adapter(model, str(tmp_path))
    assert [n for n, _ in model.named_modules()] == names and "_fastpeft_state" not in model.__dict__


def test_config_rules_and_errors():
    with pytest.raises(ValueError, match="bias must be one of"):
        fastpeft.VeraConfig(bias="lora_only")
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fastpeft.VeraConfig(r=0)
    with pytest.raises(TypeError, match="did you mean 'vera_dropout'"):
        fastpeft.VeraConfig(vera_droput=0.1)
    cfg = fastpeft.config.to_fastpeft_config(peft.VeraConfig(r=16, target_modules=["q_proj"], d_initial=0.2))
    assert isinstance(cfg, fastpeft.VeraConfig) and (cfg.r, cfg.d_initial) == (16, 0.2)
    model = fastpeft.patch(tiny_model("llama", seed=1), fastpeft.VeraConfig(r=4))  # PEFT's default targets
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, fastpeft.VeraLinear)}) == \
        ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="hot-swap of VERA adapters is not supported"):
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            fastpeft.save_adapter(model, folder)
            fastpeft.hotswap_adapter(model, folder)
    with pytest.raises(TypeError, match="nn.Embedding"):
        fastpeft.patch(tiny_model("llama", seed=1), fastpeft.VeraConfig(r=4, target_modules=["embed_tokens"]))


def test_nf4_base_equals_the_dequantized_dense_base():
    from helpers import nf4_tiny_model
    from fastpeft.nn import bases
    model = nf4_tiny_model("llama")
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if bases.is_linear4bit(module):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = bases.dequantize_linear4bit(module).float()
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    cfg = fastpeft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], init_weights=False)
    torch.manual_seed(0)
    ours = fastpeft.patch(model, cfg)
    torch.manual_seed(0)
    twin = fastpeft.patch(dense, cfg)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, twin(input_ids=ids).logits) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_gpu_bf16_vera_kernels_against_an_fp32_twin(four_bit, monkeypatch):
    """bf16 VeRA through the GPU operators (C++ / Triton on a dense base, the QLoRA kernels on an NF4 base) against
    the same model in fp32 on the reference path: logits and vector gradients within max(1e-2, 2x the error of the
    same bf16 model on the reference path, i.e. PEFT's order of operations)."""
    from helpers import check_bf16_against_fp32_twin
    check_bf16_against_fp32_twin(fastpeft.VeraConfig(r=64, target_modules="all-linear", init_weights=False),
                                 four_bit, monkeypatch)

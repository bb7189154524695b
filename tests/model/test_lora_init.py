"""LoRA initialisations that rewrite the base weight (PiSSA, PiSSA with the randomized SVD, OLoRA, LoftQ) against
PEFT: the same adapter and base weights from the same model and seed, the same logits / gradients (fp32 <= 1e-5),
PEFT's save-time conversion to plain LoRA, PEFT-saved adapters loading, atomic failures, errors."""
import copy
import json
import os

import peft
import pytest
import torch

import fastpeft
from fastpeft.ops import lora_init
from helpers import HAS_CUDA, random_ids, rel_err, tiny_model

TOL = 1e-5
PREFIX = "base_model.model."


def _build(arch, init, seed=0, **extra):
    """A PEFT model and a fastpeft model built from the same base with the same config and RNG state."""
    base = tiny_model(arch, seed=1)
    targets = ["c_attn", "mlp.c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **extra)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(seed)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    return base, theirs, ours


def _first_target(arch):
    return "transformer.h.0.attn.c_attn" if arch == "gpt2" else "model.layers.0.self_attn.q_proj"


def _same_weights(theirs, ours, tol=TOL):
    """Every parameter (adapters and the rewritten base weights) equal under PEFT's names."""
    theirs_params = {n[len(PREFIX):]: p for n, p in theirs.named_parameters()}
    ours_params = dict(ours.named_parameters())
    assert theirs_params.keys() == ours_params.keys()
    for name, p in ours_params.items():
        assert rel_err(p.detach(), theirs_params[name].detach()) <= tol, name


def _same_outputs_and_gradients(theirs, ours, tol=TOL):
    ids = random_ids(batch=2, seq=9)
    out_t, out_o = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert rel_err(out_o.logits, out_t.logits) <= tol
    out_t.loss.backward()
    out_o.loss.backward()
    grads_t = {n[len(PREFIX):]: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_o.keys() == grads_t.keys() and any("lora_A" in n for n in grads_o)
    for name, g in grads_o.items():
        assert rel_err(g, grads_t[name]) <= tol, name


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("qwen2", "pissa"), ("gpt2", "pissa"),
                                       ("llama", "pissa_niter_2"), ("gpt2", "pissa_niter_3"),
                                       ("llama", "olora"), ("qwen2", "olora")])
def test_same_adapter_base_and_numbers_as_peft(arch, init):
    base, theirs, ours = _build(arch, init)
    _same_weights(theirs, ours)
    # the principal part moved into the adapter: the model still computes what the untouched base computes
    ids = random_ids(batch=2, seq=9)
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, base(input_ids=ids).logits) <= 1e-4
        layer = ours.get_submodule(_first_target(arch))
        original = base.get_submodule(_first_target(arch)).weight
        assert not torch.equal(layer.base_layer.weight, original)
    _same_outputs_and_gradients(theirs, ours)


def test_rsLoRA_and_dora_on_top_of_pissa_match_peft():
    _, theirs, ours = _build("llama", "pissa", use_rslora=True, use_dora=True)
    _same_weights(theirs, ours)
    _same_outputs_and_gradients(theirs, ours)


def test_pissa_factors_reconstruct_the_weight_and_are_the_top_singular_directions():
    torch.manual_seed(0)
    weight = torch.randn(37, 23)
    a, b, residual = lora_init.pissa_factors(weight, r=5, scaling=2.0)
    assert a.shape == (5, 23) and b.shape == (37, 5)
    assert torch.allclose(residual + 2.0 * b @ a, weight, atol=1e-5)
    s = torch.linalg.svdvals(weight)
    assert torch.allclose(torch.linalg.svdvals(residual)[:5], s[5:10], atol=1e-4)  # top 5 directions removed
    with pytest.raises(ValueError, match="needs r <= min"):
        lora_init.pissa_factors(weight, r=24, scaling=1.0)


def test_olora_factors_are_orthonormal_q_and_upper_r():
    torch.manual_seed(0)
    weight = torch.randn(31, 17)
    a, b, residual = lora_init.olora_factors(weight, r=6, scaling=0.5)
    assert torch.allclose(b.t() @ b, torch.eye(6), atol=1e-5)
    assert torch.equal(torch.tril(a[:, :6], diagonal=-1), torch.zeros(6, 6))
    assert torch.allclose(residual + 0.5 * b @ a, weight, atol=1e-5)


def _loftq_with_bitsandbytes_cpu(weight, r, num_iter):
    """LoftQ as PEFT's loftq_init computes it, with bitsandbytes' own (CPU) NF4 quantize / dequantize."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    res = weight.clone()
    for i in range(num_iter):
        packed, state = bnb_f.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = bnb_f.dequantize_4bit(packed, state)
        u, s, vh = torch.linalg.svd(weight - deq, full_matrices=False)
        lora_b = u @ torch.sqrt(torch.diag(s))[:, :r]
        lora_a = torch.sqrt(torch.diag(s))[:r, :] @ vh
        if i + 1 < num_iter:
            res = weight - lora_b @ lora_a
    return lora_a, lora_b, deq


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_factors_match_bitsandbytes_nf4(num_iter):
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.05
    try:
        want = _loftq_with_bitsandbytes_cpu(weight, 4, num_iter)
    except (RuntimeError, NotImplementedError) as err:  # a bnb build without its CPU 4-bit kernels
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {err}")
    got = lora_init.loftq_factors(weight, r=4, num_iter=num_iter)
    assert torch.equal(got[2], want[2])  # bit-exact NF4 round trip
    assert rel_err(got[1] @ got[0], want[1] @ want[0]) <= 1e-5
    # the adapter closes part of the quantization gap
    assert (weight - got[2] - got[1] @ got[0]).norm() < (weight - got[2]).norm()


def test_loftq_on_a_model_and_quantizing_afterwards_keeps_the_base():
    base = tiny_model("llama", seed=1)
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights="loftq",
                              loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    model = fastpeft.patch(copy.deepcopy(base), cfg)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    original = base.get_submodule("model.layers.0.self_attn.q_proj").weight
    want = lora_init.loftq_factors(original.detach(), 4, num_iter=2)
    assert torch.equal(layer.base_layer.weight, want[2])
    assert torch.equal(layer.lora_A["default"].weight, want[0])
    saved = cfg.to_adapter_config()
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2} and saved["init_lora_weights"] == "loftq"
    # the rewritten base is exactly representable in NF4: quantizing it again changes nothing
    assert torch.equal(lora_init.nf4_round_trip(layer.base_layer.weight.detach()), layer.base_layer.weight)


@pytest.mark.skipif(not HAS_CUDA, reason="PEFT's LoftQ runs bitsandbytes on CUDA")
@pytest.mark.gpu
def test_loftq_matches_peft_on_cuda():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("scipy")  # PEFT's LoraConfig asks for it with init_lora_weights="loftq"
    base = tiny_model("llama", seed=1).cuda()
    kw = dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
              loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**kw, "loftq_config": peft.LoftQConfig(
        loftq_bits=4, loftq_iter=2)}))
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    _same_weights(theirs, ours, tol=1e-5)


def test_loftq_config_rules_as_peft():
    with pytest.raises(ValueError, match="loftq_config must be given"):
        fastpeft.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits=4"):
        fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ValueError, match="keys 'loftq_bits' and 'loftq_iter'"):
        fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.raises(ValueError, match="positive integer"):
        fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        cfg = fastpeft.LoraConfig(loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {}
    # PEFT's LoftQConfig object is accepted (peft.LoraConfig(init_lora_weights="loftq") itself needs scipy installed,
    # which CI does not have, so the PEFT config is given as the dict its adapter_config.json holds)
    from_peft = fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_iter=3))
    assert from_peft.loftq_config == {"loftq_bits": 4, "loftq_iter": 3}
    from_file = fastpeft.config.to_fastpeft_config(
        {"peft_type": "LORA", "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}})
    assert from_file.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    for name in ("eva", "corda", "orthogonal", "mica", "pissa_niter_x"):
        with pytest.raises(ValueError, match="init_lora_weights must be"):
            fastpeft.LoraConfig(init_lora_weights=name)


def test_conversion_to_plain_lora_matches_peft_and_loads_on_the_original_base(tmp_path):
    base, theirs, ours = _build("llama", "pissa")
    fastpeft.save_adapter(ours, str(tmp_path / "init"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe for the initial save
    theirs.save_pretrained(str(tmp_path / "peft_init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(3)
    with torch.no_grad():  # "training": the same change on both
        for (_, p_t), (_, p_o) in zip(sorted((n[len(PREFIX):], p) for n, p in theirs.named_parameters() if "lora_" in n),
                                      sorted((n, p) for n, p in ours.named_parameters() if "lora_" in n)):
            step = torch.randn_like(p_o) * 0.05
            p_t.add_(step)
            p_o.add_(step)
    fastpeft.save_adapter(ours, str(tmp_path / "ours"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs.save_pretrained(str(tmp_path / "theirs"), path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    with open(tmp_path / "ours" / "adapter_config.json") as fh:
        cfg_o = json.load(fh)
    with open(tmp_path / "theirs" / "adapter_config.json") as fh:
        cfg_t = json.load(fh)
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert cfg_o[key] == cfg_t[key], key
    assert (cfg_o["r"], cfg_o["init_lora_weights"]) == (8, True)
    from safetensors.torch import load_file
    t_o = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    t_t = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert t_o.keys() == t_t.keys()
    for key in t_o:
        assert rel_err(t_o[key], t_t[key]) <= TOL, key
    # the converted adapter on the untouched base computes what the trained PiSSA model computes
    ids = random_ids(batch=2, seq=9)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    ours_loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert rel_err(reloaded(input_ids=ids).logits, want) <= 1e-4
        assert rel_err(ours_loaded(input_ids=ids).logits, want) <= 1e-4
    assert ours.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight.shape[0] == 4  # unchanged


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    _, _, ours = _build("llama", "pissa", use_dora=True)
    fastpeft.save_adapter(ours, str(tmp_path / "init"))
    with pytest.raises(ValueError, match="this adapter is DoRA"):
        fastpeft.save_adapter(ours, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not os.path.exists(tmp_path / "out")
    other = fastpeft.patch(tiny_model("llama", seed=1), fastpeft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="does not match this adapter"):
        fastpeft.save_adapter(other, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_saved_adapter_loads_with_the_same_base_rewrite(tmp_path, init):
    base, theirs, _ = _build("llama", init)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ours = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path))
    ids = random_ids(batch=2, seq=9)
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, reloaded(input_ids=ids).logits) <= TOL
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= TOL


def _weights(model):
    """name -> (parameter, address of its data): ``p.data`` is a new alias object on every access."""
    return {n: (p, p.data_ptr()) for n, p in model.named_parameters()}


def test_a_failed_patch_gives_back_the_very_same_base_tensors():
    model = tiny_model("llama", seed=1)
    before = _weights(model)
    values = {n: p.detach().clone() for n, (p, _) in before.items()}
    # q_proj is 32 x 32 in the tiny model: rank 40 fails on the last matched layer, after others were rewritten
    cfg = fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa",
                              rank_pattern={"model.layers.1.self_attn.v_proj": 1000})
    with pytest.raises(ValueError, match="needs r <= min"):
        fastpeft.patch(model, cfg)
    after = _weights(model)
    assert after.keys() == before.keys()
    for n, (p, d) in after.items():
        assert p is before[n][0] and d == before[n][1] and torch.equal(p, values[n]), n
    assert not hasattr(model, "peft_config") and "_fastpeft_state" not in model.__dict__


def test_a_bad_file_leaves_the_model_and_its_base_weights_as_they_were(tmp_path):
    base, theirs, _ = _build("llama", "pissa")
    theirs.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.pop(next(k for k in tensors if k.endswith("lora_B.weight")))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    before = _weights(model)
    with pytest.raises(ValueError, match="lacks"):
        fastpeft.load_adapter(model, str(tmp_path))
    for n, (p, d) in _weights(model).items():
        assert d == before[n][1], n
    assert "_fastpeft_state" not in model.__dict__


def test_4bit_base_and_conv1d_olora_are_refused_and_leave_the_model_unchanged():
    from helpers import nf4_tiny_model
    model = nf4_tiny_model("llama")
    before = _weights(model)
    with pytest.raises(ValueError, match="needs a full-precision base weight"):
        fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert all(d == before[n][1] for n, (_, d) in _weights(model).items())
    gpt2 = tiny_model("gpt2", seed=1)
    with pytest.raises(ValueError, match="not supported on transformers' Conv1D"):
        fastpeft.patch(gpt2, fastpeft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"))
    assert "_fastpeft_state" not in gpt2.__dict__


def test_embeddings_get_pefts_default_init_with_a_warning():
    base = tiny_model("llama", seed=1)
    kw = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="applies to Linear layers only"):
        ours = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    _same_weights(theirs, ours)
    with pytest.raises(ValueError, match="not supported on embedding layers"):
        fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(
            r=4, target_modules=["embed_tokens"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4}))


def test_unpatch_and_delete_say_the_base_stays_rewritten():
    model = fastpeft.patch(tiny_model("llama", seed=1), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    fastpeft.add_adapter(model, "pissa", fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    with pytest.warns(UserWarning, match=r"init_lora_weights='olora', which rewrote 2 base weights"):
        fastpeft.delete_adapter(model, "pissa")
    fastpeft.add_adapter(model, "p2", fastpeft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="stay rewritten"):
        fastpeft.unpatch(model)

"""Mixed-adapter batches (adapter_names=[...]): PEFT's numbers and tokens, row by row, and clear errors."""
import copy

import peft
import pytest
import torch

import fastpeft
from fastpeft.nn import mixed_batch
from fastpeft.ops import cpp_ops
from helpers import DEVICE, random_ids, rel_err, set_settings, tiny_model

FP32_TOL = 1e-5
NAMES = ["a", "__base__", "b", "a"]


def _copy_adapters(peft_model, ours):
    theirs = {n[len("base_model.model."):]: p for n, p in peft_model.named_parameters()}
    copied = 0
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name in theirs and not name.endswith(("base_layer.weight", "base_layer.bias", "original_module.weight")):
                if any(k in name for k in ("lora_", "ia3_", "modules_to_save")):
                    param.copy_(theirs[name])
                    copied += 1
    assert copied > 0


def _two_adapters(base, cfg_a, cfg_b, backend, monkeypatch):
    """PEFT and fastpeft models holding adapters "a" and "b" with the same weights, in eval mode."""
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg_a), adapter_name="a")
    theirs.add_adapter("b", copy.deepcopy(cfg_b))
    set_settings(monkeypatch, backend=backend)
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg_a), adapter_name="a")
    fastpeft.add_adapter(ours, "b", copy.deepcopy(cfg_b))
    _copy_adapters(theirs, ours)
    return theirs.eval(), ours.eval()


def _lora_cfgs(**extra):
    a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        **extra)
    b = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "v_proj", "up_proj"], init_lora_weights=False,
                        **extra)
    return a, b


NEEDS_CPP = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cpp", marks=NEEDS_CPP)])
def test_lora_mixed_batch_matches_peft_forward_and_generate(backend, monkeypatch):
    theirs, ours = _two_adapters(tiny_model("llama", seed=3), *_lora_cfgs(), backend, monkeypatch)
    ids = random_ids(batch=4, seq=7, seed=2)
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=NAMES).logits
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        assert rel_err(got, want) <= FP32_TOL
        # each row is what its adapter alone computes (and the rows really differ)
        fastpeft.set_adapter(ours, "b")
        assert rel_err(got[2], ours(input_ids=ids[2:3]).logits[0]) <= FP32_TOL
        with fastpeft.disable_adapter(ours):  # the adapter rows really differ from the base model's
            plain = ours(input_ids=ids).logits
        assert all(rel_err(got[i], plain[i]) > 1e-4 for i in (0, 2, 3)) and rel_err(got[1], plain[1]) <= FP32_TOL
        fastpeft.set_adapter(ours, "a")
        mask = torch.ones_like(ids)
        for extra in ({}, {"num_beams": 2}, {"num_return_sequences": 2, "num_beams": 2}):
            kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **extra)
            assert torch.equal(ours.generate(input_ids=ids, adapter_names=NAMES, **kw),
                               theirs.generate(input_ids=ids, adapter_names=NAMES, **kw)), extra
    # afterwards the active adapter runs every row again
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= FP32_TOL


@NEEDS_CPP
def _count_mixed_operator_calls(monkeypatch) -> list:
    """Wrap the two C++ mixed-batch entries the layers call (lora_mixed_linear: dense bases, base product included;
    lora_mixed_delta_: other bases, after their own base product); each call appends its number of adapters."""
    from fastpeft.nn import lora as lora_module

    calls = []
    for name, set_at in (("lora_mixed_delta_", 4), ("lora_mixed_linear", 5)):
        real = getattr(lora_module.cpp_ops, name)
        monkeypatch.setattr(lora_module.cpp_ops, name,
                            lambda *a, real=real, at=set_at, **k: calls.append(len(a[at])) or real(*a, **k))
    return calls


def test_cpp_operator_runs_the_mixed_batch_from_the_live_adapter_weights(monkeypatch):
    """backend cpp (auto on CUDA): one operator call per layer whatever the number of adapters (base product
    included on a dense base), PEFT's numbers, no stacked copy of the adapters (an extra adapter costs its weights
    only), and a weight changed in place or replaced, or a scaling changed, is read at the next call."""
    theirs, ours = _two_adapters(tiny_model("llama", seed=3), *_lora_cfgs(), "cpp", monkeypatch)
    calls = _count_mixed_operator_calls(monkeypatch)
    ids = random_ids(batch=4, seq=6, seed=4)
    layers = [m for m in ours.modules() if isinstance(m, fastpeft.LoraLinear)]
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        assert rel_err(got, theirs(input_ids=ids, adapter_names=NAMES).logits) <= FP32_TOL
    assert len(calls) == len(layers) and max(calls) == 2  # one call per layer; v_proj holds both adapters
    assert not any("stacks" in m._mixed_cache for m in layers)
    b_weight = next(p for n, p in ours.named_parameters() if "lora_B.b" in n)
    with torch.no_grad():
        b_weight.mul_(3.0)  # in place
        changed = ours(input_ids=ids, adapter_names=NAMES).logits
        assert rel_err(changed[2], got[2]) > 1e-3 and rel_err(changed[0], got[0]) <= 1e-6
        owner = next(m for m in layers if "b" in m.lora_B and m.lora_B["b"].weight is b_weight)
        owner.lora_B["b"].weight = torch.nn.Parameter(b_weight / 3.0)  # replaced: back to the first numbers
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, got) <= 1e-6
        owner.scaling["b"] *= 3.0  # a scaling changed in the dict: the same numbers as the in-place change above
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, changed) <= 1e-5
        owner.scaling["b"] /= 3.0
        owner.lora_B["b"].weight.data = b_weight.clone()  # .data (3x the first weight): new storage, same tensor
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, changed) <= 1e-5
        new_b = torch.nn.Linear(owner.lora_B["b"].in_features, owner.lora_B["b"].out_features, bias=False)
        new_b.weight.data.copy_(b_weight / 3.0)
        owner.lora_B["b"] = new_b  # a module replaced
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, got) <= 1e-6


@NEEDS_CPP
def test_mixed_plan_is_rebuilt_when_the_layer_changes(monkeypatch):
    """The layer's cached plan for mixed batches (kernel, C++ adapter set, adapter order) follows its backend, x's
    dtype, an added adapter and a variant change, and refuses what it must on every call (autograd)."""
    _, ours = _two_adapters(tiny_model("llama", seed=3), *_lora_cfgs(), "cpp", monkeypatch)
    layers = [m for m in ours.modules() if isinstance(m, fastpeft.LoraLinear)]
    ids = random_ids(batch=4, seq=6, seed=4)
    with torch.no_grad():  # model forwards register modules elsewhere (transformers slices its ModuleList of layers)
        ours(input_ids=ids, adapter_names=NAMES)
        plans = [m._mixed_cache["plan"] for m in layers]
        ours(input_ids=ids, adapter_names=NAMES)
        assert all(m._mixed_cache["plan"] is plan for m, plan in zip(layers, plans))  # kept: nothing was rebuilt
    layer = next(m for m in layers if len(m.lora_A) == 2)
    x = torch.randn(3, 2, layer.in_features)
    with torch.no_grad():
        kernel, adapters, order = layer._mixed_plan(x)
        assert kernel == "cpp" and len(adapters) == 2 and order == ["a", "b"]
        assert layer._mixed_plan(x)[1] is adapters  # kept while nothing changed
        layer.backend = "reference"
        assert layer._mixed_plan(x) is None  # the per-adapter path
        layer.backend = "cpp"
        assert layer._mixed_plan(x.double()) is None  # float64: the per-adapter path
        assert layer._mixed_plan(x)[1] is not adapters  # rebuilt: the plan kept last was the reference backend's
        layer.lora_B["b"].weight = torch.nn.Parameter(layer.lora_B["b"].weight.detach().clone())  # replaced
        assert layer._mixed_plan(x)[1] is not adapters
        adapters = layer._mixed_plan(x)[1]
        del layer.lora_A["b"], layer.lora_B["b"]  # not a registration: the number of adapters changed
        assert layer._mixed_plan(x)[2] == ["a"]
        layer.update_layer("c", r=4, lora_alpha=8, init_lora_weights=False)
        kernel, adapters, order = layer._mixed_plan(x)
        assert order == ["a", "c"] and len(adapters) == 2
        layer.lora_variant["c"] = fastpeft.nn.variants.DORA  # not plain LoRA: no one-pass kernel
        assert layer._mixed_plan(x) is None
    assert layer._mixed_plan(x) is None  # autograd on: never the in-place kernels


@NEEDS_CPP
def test_cpp_adapter_set_survives_copies_and_conversions(monkeypatch):
    """The layers' cached C++ adapter set (handles to their weights) never leaks into a copy (a deepcopy or a pickle
    rebuilds its own from its own weights) and never blocks a conversion that swaps parameters
    (torch.utils.swap_tensors refuses a tensor held elsewhere): numbers follow the copy's / converted weights."""
    import pickle

    theirs, ours = _two_adapters(tiny_model("llama", seed=3), *_lora_cfgs(), "cpp", monkeypatch)
    ids = random_ids(batch=4, seq=6, seed=4)
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        layers = [m for m in ours.modules() if isinstance(m, fastpeft.LoraLinear)]
        assert all(m._mixed_cache["plan"][-1][0] == "cpp" for m in layers)
        twin = copy.deepcopy(ours)
        assert not any(m._mixed_cache for m in twin.modules() if isinstance(m, fastpeft.LoraLinear))
        for name, p in twin.named_parameters():
            if "lora_B.b" in name:
                p.mul_(3.0)
        assert rel_err(twin(input_ids=ids, adapter_names=NAMES).logits[2], got[2]) > 1e-3  # the copy's own weights
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, got) <= 1e-6  # the original's unchanged
        layer = layers[0]
        x = torch.randn(4, 3, layer.in_features)
        want = layer(x)
        restored = pickle.loads(pickle.dumps(layer))  # a layer (the patched model holds unpicklable hooks)
        assert not restored._mixed_cache and torch.equal(restored(x), want)
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            ours.bfloat16()  # swaps every parameter, adapters included
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
        got16 = ours(input_ids=ids, adapter_names=NAMES).logits
        assert got16.dtype == torch.bfloat16 and rel_err(got16.float(), got) <= 0.05
        for m in layers:
            m.backend = "reference"  # the converted weights, per adapter in PyTorch
        assert rel_err(got16.float(), ours(input_ids=ids, adapter_names=NAMES).logits.float()) <= 0.02


@pytest.mark.gpu
@NEEDS_CPP
@pytest.mark.parametrize("four_bit", [False, True])
def test_cuda_mixed_batch_runs_the_cpp_operator_and_matches_peft(four_bit, monkeypatch):
    """The default backend on CUDA: the mixed batch's LoRA deltas through lora_mixed_delta_'s CUDA kernels, on a
    dense and on a bitsandbytes NF4 base, against PEFT's adapter_names on the same GPU (fp32)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA kernels: GPU only")
    if four_bit:
        pytest.importorskip("bitsandbytes")
        from helpers import nf4_tiny_model

        base = nf4_tiny_model("llama", double_quant=True)
    else:
        base = tiny_model("qwen2", seed=5)
    theirs, ours = _two_adapters(base, *_lora_cfgs(), "auto", monkeypatch)
    theirs.to("cuda")
    ours.to("cuda")
    calls = _count_mixed_operator_calls(monkeypatch)
    ids = random_ids(batch=4, seq=6, seed=9).cuda()
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        want = theirs(input_ids=ids, adapter_names=NAMES).logits
    assert calls and rel_err(got, want) <= FP32_TOL


def _assert_rows_match_single_runs(ours, ids):
    """Each row of the mixed batch equals that row run with its adapter alone (the base for "__base__")."""
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with fastpeft.disable_adapter(ours):
                    want = ours(input_ids=ids[row:row + 1]).logits[0]
            else:
                fastpeft.set_adapter(ours, name)
                want = ours(input_ids=ids[row:row + 1]).logits[0]
            assert rel_err(got[row], want) <= FP32_TOL, row
        assert rel_err(got[0], got[1]) > 1e-4  # adapters really change the rows


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cpp", marks=NEEDS_CPP)])
def test_ia3_mixed_batch_rows_match_single_adapter_runs(backend, monkeypatch):
    """PEFT's IA3 layers have no mixed-batch path (adapter_names is not applied there); fastpeft's run it: in one
    pass per layer where the C++ operators serve the layer (backend cpp; auto on CUDA), else one per adapter."""
    set_settings(monkeypatch, backend=backend)
    cfg = fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False)
    ours = fastpeft.patch(tiny_model("qwen2", seed=4), cfg, adapter_name="a")
    # "b" on other layers too: k_proj holds only "a", q_proj only "b" (their rows of the other run the base)
    fastpeft.add_adapter(ours, "b", fastpeft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"], init_ia3_weights=False))
    loops = []
    real = mixed_batch.forward_mixed
    monkeypatch.setattr(mixed_batch, "forward_mixed", lambda *a, **k: loops.append(1) or real(*a, **k))
    ids = random_ids(batch=4, seq=6, seed=5)
    _assert_rows_match_single_runs(ours.eval(), ids)
    assert bool(loops) == (backend != "cpp")  # cpp: no per-adapter loop at any IA3 layer
    if backend == "cpp":
        with torch.no_grad():  # a vector changed in place is read at the next call (nothing cached but the rows)
            before = ours(input_ids=ids, adapter_names=NAMES).logits
            next(p for n, p in ours.named_parameters() if "ia3_l.b" in n).mul_(2.0)
            after = ours(input_ids=ids, adapter_names=NAMES).logits
        assert rel_err(after[2], before[2]) > 1e-4 and rel_err(after[0], before[0]) <= 1e-6


def test_modules_to_save_mixed_batch_matches_peft(monkeypatch):
    ids = random_ids(batch=4, seq=6, seed=5)
    base = tiny_model("llama", seed=6)
    cfg_a, cfg_b = _lora_cfgs(modules_to_save=["lm_head"])
    theirs, ours = _two_adapters(base, cfg_a, cfg_b, "reference", monkeypatch)
    with torch.no_grad():
        for p in ours.lm_head.modules_to_save.parameters():
            p.add_(0.1)  # the copies differ from the original and from each other
        for p in ours.lm_head.modules_to_save["b"].parameters():
            p.mul_(1.5)
        src = {n: p for n, p in ours.named_parameters()}
        for n, p in theirs.named_parameters():
            key = n[len("base_model.model."):]
            if "modules_to_save" in key:
                p.copy_(src[key])
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits,
                       theirs(input_ids=ids, adapter_names=NAMES).logits) <= FP32_TOL


def test_dora_and_4bit_mixed_batch_rows_match_single_adapter_runs(monkeypatch):
    """PEFT refuses adapter_names with DoRA; fastpeft runs it. Each row equals that adapter run alone; on a 4-bit
    base (bnb) the LoRA mixed batch equals PEFT's."""
    set_settings(monkeypatch, backend="triton")
    cfg_a, cfg_b = _lora_cfgs(use_dora=True)
    ours = fastpeft.patch(tiny_model("mistral", seed=7), cfg_a, adapter_name="a")
    fastpeft.add_adapter(ours, "b", cfg_b)
    ids = random_ids(batch=4, seq=5, seed=8)
    _assert_rows_match_single_runs(ours.eval(), ids)
    pytest.importorskip("bitsandbytes")
    from helpers import nf4_tiny_model

    theirs, ours = _two_adapters(nf4_tiny_model("llama", double_quant=True), *_lora_cfgs(), "triton", monkeypatch)
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits,
                       theirs(input_ids=ids, adapter_names=NAMES).logits) <= FP32_TOL


def test_converted_peft_model_runs_mixed_batches(monkeypatch):
    cfg_a, cfg_b = _lora_cfgs()
    peft_model = peft.get_peft_model(tiny_model("llama", seed=9), cfg_a, adapter_name="a")
    peft_model.add_adapter("b", cfg_b)
    peft_model.eval()
    ids = random_ids(batch=4, seq=6, seed=10)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=NAMES).logits
        want_tokens = peft_model.generate(input_ids=ids, adapter_names=NAMES, **kw)
    set_settings(monkeypatch, backend="reference")
    converted = fastpeft.patch(peft_model)
    with torch.no_grad():
        assert rel_err(converted(input_ids=ids, adapter_names=NAMES).logits, want) <= FP32_TOL
        assert torch.equal(converted.generate(input_ids=ids, adapter_names=NAMES, **kw), want_tokens)


def test_bad_adapter_names_are_clear_errors_and_leave_nothing_behind(monkeypatch):
    set_settings(monkeypatch, backend="reference")
    ours = fastpeft.patch(tiny_model("llama", seed=11), _lora_cfgs()[0], adapter_name="a").eval()
    ids = random_ids(batch=2, seq=5, seed=12)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        cases = [(["a", "nope"], r"\['nope'\].*allowed: \['a', '__base__'\]"),
                 (["a", "a", "a"], "3 entries but the input has 2 rows"),
                 ("a", "non-empty list"), ([], "non-empty list")]
        for names, match in cases:
            with pytest.raises(ValueError, match=match):
                ours(input_ids=ids, adapter_names=names)
            with pytest.raises(ValueError, match=match):
                ours.generate(input_ids=ids, adapter_names=names, max_new_tokens=1, do_sample=False, pad_token_id=0)
            assert mixed_batch.current() is None and not fastpeft.model_state.get_state(ours).mixed_tokens
        assert torch.equal(ours(input_ids=ids).logits, expected)
    ours.train()
    with pytest.raises(ValueError, match="inference only.*model.eval"):
        ours(input_ids=ids, adapter_names=["a", "__base__"])
    ours.eval()
    fastpeft.merge(ours)
    with torch.no_grad(), pytest.raises(ValueError, match="merged.*unmerge"):
        ours(input_ids=ids, adapter_names=["a", "__base__"])
    fastpeft.unmerge(ours)
    with torch.no_grad(), fastpeft.disable_adapter(ours):  # disabled adapters win, as in PEFT
        plain = ours(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids, adapter_names=["a", "a"]).logits, plain)
    fastpeft.unpatch(ours)
    assert "generate" not in ours.__dict__ and not ours._forward_pre_hooks and not ours._forward_hooks


def test_deepcopy_of_a_patched_model_generates_with_its_own_weights(monkeypatch):
    set_settings(monkeypatch, backend="reference")
    ours = fastpeft.patch(tiny_model("llama", seed=13), _lora_cfgs()[0], adapter_name="a").eval()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ids = random_ids(batch=2, seq=5, seed=14)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ours.generate(input_ids=ids, adapter_names=["a", "a"], **kw).scores[0]
        b = twin.generate(input_ids=ids, adapter_names=["a", "a"], **kw).scores[0]
        assert rel_err(a, b) > 1e-3  # the copy's generate runs the copy, not the original


def test_mixed_batch_under_torch_compile(monkeypatch):
    """A compiled model runs mixed batches with eager's numbers (it recompiles for a new set of names) and, without
    names, the active adapter again."""
    import torch._dynamo as dynamo

    set_settings(monkeypatch, backend="triton")
    cfg_a, cfg_b = _lora_cfgs()
    ours = fastpeft.patch(tiny_model("llama", seed=15), cfg_a, adapter_name="a")
    fastpeft.add_adapter(ours, "b", cfg_b)
    ours.eval()
    ids = random_ids(batch=4, seq=5, seed=16)
    with torch.no_grad():
        mixed, plain = ours(input_ids=ids, adapter_names=NAMES).logits, ours(input_ids=ids).logits
        dynamo.reset()
        try:
            ours.forward = torch.compile(ours.forward, backend="aot_eager")
            assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, mixed) <= 1e-6
            assert rel_err(ours(input_ids=ids).logits, plain) <= 1e-6
            assert rel_err(ours(input_ids=ids, adapter_names=NAMES).logits, mixed) <= 1e-6
        finally:
            dynamo.reset()


def test_registration_count_stays_out_of_torch_compile_traces(monkeypatch):
    """The registration hook does nothing while torch.compile traces: a traced lookup in the WeakSet of watched
    modules made Dynamo guard on the set's size, which a garbage collection during the compile changed (CI:
    "Guard failed on the same frame it was created"). Outside a trace it counts watched modules only."""
    import torch.nn as nn

    layer = nn.Linear(2, 2)
    mixed_batch.watch_registrations([layer])

    class Untouchable:
        def __contains__(self, item):
            raise AssertionError("the watched set was read while compiling")

    watched = mixed_batch._WATCHED
    before = mixed_batch.registrations()
    monkeypatch.setattr(mixed_batch, "_WATCHED", Untouchable())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer.weight = nn.Parameter(layer.weight.detach().clone())  # the hook runs, as inside a trace
    assert mixed_batch.registrations() == before
    monkeypatch.setattr(mixed_batch, "_WATCHED", watched)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    layer.weight = nn.Parameter(layer.weight.detach().clone())
    assert mixed_batch.registrations() == before + 1


@pytest.mark.skipif(not fastpeft.settings.get().triton_interpret and not torch.cuda.is_available(),
                    reason="the one-pass kernels need CUDA or Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_pass_kernels_run_the_mixed_batch_and_match_the_per_adapter_loop(dtype, monkeypatch):
    """Plain LoRA adapters of different ranks, without autograd: one base pass + the SGMV kernels per layer (no
    loop over adapters), the same numbers as the per-adapter loop; with autograd on, the loop runs instead."""
    from fastpeft.nn import lora as lora_module

    # CUDA: the model on the GPU (compiled kernels); CPU: Triton's interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs, ours = _two_adapters(tiny_model("qwen2", seed=11), *_lora_cfgs(), "triton", monkeypatch)
    ours.to(device, dtype)
    calls = []
    real = lora_module.sgmv.lora_mixed_delta_
    monkeypatch.setattr(lora_module.sgmv, "lora_mixed_delta_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_ids(batch=4, seq=6, seed=12).to(device)
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=NAMES).logits
    assert calls, "the one-pass kernels did not run"
    n_layers_with_adapters = sum(isinstance(m, fastpeft.LoraLinear) for m in ours.modules())
    assert len(calls) == n_layers_with_adapters  # one call per layer, whatever the number of adapters
    calls.clear()
    set_settings(monkeypatch, backend="reference")
    loop = fastpeft.patch(tiny_model("qwen2", seed=11).to(device, dtype), copy.deepcopy(_lora_cfgs()[0]),
                          adapter_name="a")
    fastpeft.add_adapter(loop, "b", copy.deepcopy(_lora_cfgs()[1]))
    loop.load_state_dict(ours.state_dict())
    with torch.no_grad():
        want = loop.eval()(input_ids=ids, adapter_names=NAMES).logits
    assert rel_err(got, want) <= (FP32_TOL if dtype == torch.float32 else 2e-3)
    set_settings(monkeypatch, backend="triton")
    with torch.enable_grad():
        again = ours(input_ids=ids, adapter_names=NAMES).logits
    assert not calls and rel_err(again.detach(), got) <= (FP32_TOL if dtype == torch.float32 else 2e-3)
    # a changed adapter weight is seen (the stacked copy is rebuilt)
    with torch.no_grad():
        next(p for n, p in ours.named_parameters() if "lora_B.b" in n).mul_(3.0)
        changed = ours(input_ids=ids, adapter_names=NAMES).logits
    assert rel_err(changed[2], got[2]) > 1e-3 and rel_err(changed[0], got[0]) <= 1e-6


@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "oft", "adalora"])
def test_mixed_batches_of_the_other_methods_match_one_adapter_at_a_time(method):
    """adapter_names= with VeRA / LoHa / LoKr / OFT / AdaLoRA adapters: each row equals that adapter alone ("__base__": no
    adapter); these layers run one pass per distinct adapter (AdapterLayer._forward_mixed)."""
    make = {"vera": lambda: fastpeft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
            "loha": lambda: fastpeft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
            "lokr": lambda: fastpeft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
            "oft": lambda: fastpeft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"],
                                              init_weights=False),
            # AdaLoRA: one trainable adapter per model (PEFT's rule), so the second one is added frozen
            "adalora": lambda inference_mode=False: fastpeft.AdaLoraConfig(
                init_r=4, lora_alpha=0.5, target_modules=["q_proj", "v_proj"], total_step=10, init_lora_weights=False,
                inference_mode=inference_mode)}[method]
    model = fastpeft.patch(tiny_model("llama", seed=1), make())
    fastpeft.add_adapter(model, "b", make(inference_mode=True) if method == "adalora" else make())
    ids = random_ids(batch=3)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "b", "__base__"]).logits
        alone = {"default": model(input_ids=ids).logits}
        fastpeft.set_adapter(model, "b")
        alone["b"] = model(input_ids=ids).logits
        with fastpeft.disable_adapter(model):
            alone["__base__"] = model(input_ids=ids).logits
    assert not torch.equal(alone["default"], alone["b"])
    for row, name in enumerate(["default", "b", "__base__"]):
        assert rel_err(mixed[row], alone[name][row]) <= 1e-5, name


@pytest.mark.gpu
@NEEDS_CPP
@pytest.mark.parametrize("feedforward", [False, True])
def test_cuda_ia3_mixed_batch_rows_equal_the_operator_bit_for_bit(feedforward, monkeypatch):
    """bf16 on CUDA (backend auto): each row of the one-pass IA3 mixed batch equals the C++ operator's output for
    the same full batch under that row's adapter, bit for bit (same GEMM, same fp32 scale, one rounding)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA: GPU only")
    set_settings(monkeypatch, backend="auto")
    torch.manual_seed(0)
    layer = fastpeft.IA3Linear(torch.nn.Linear(96, 80), "a", is_feedforward=feedforward, init_ia3_weights=False)
    layer.update_layer("b", init_ia3_weights=False)
    layer = layer.to("cuda", torch.bfloat16).eval()
    for v in layer.ia3_l.values():
        v.data = v.data.float()  # fp32 vectors on a bf16 layer, as patch keeps them
    x = torch.randn(4, 5, 96, device="cuda", dtype=torch.bfloat16)
    names = ["b", "__base__", "a", "b"]
    token = mixed_batch.set_names(names)
    try:
        with torch.no_grad():
            got = layer(x)
    finally:
        mixed_batch.reset(token)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                want = torch.nn.functional.linear(x, weight, bias)
            else:
                want = cpp_ops.ia3_linear(x, weight, bias, layer.ia3_l[name], feedforward)
            assert torch.equal(got[row], want[row]), (row, name)


@NEEDS_CPP
def test_mixed_batch_follows_a_hotswap_of_one_of_its_adapters(tmp_path, monkeypatch):
    """hotswap_adapter writes the new values in place (a smaller rank zero-padded, its scaling folded into B): the
    layers' kept mixed-batch plans read them at the next call, so a mixed batch's rows of the swapped adapter give
    PEFT's numbers for the new adapter, the other rows stay, and no plan is rebuilt."""
    base = tiny_model("llama", seed=3)
    targets = ["q_proj", "v_proj", "down_proj"]
    cfgs = {"a": peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
            "b": peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
            "new": peft.LoraConfig(r=4, lora_alpha=5, use_rslora=True, target_modules=targets, init_lora_weights=False)}
    folders, peft_models = {}, {}
    for seed, (name, cfg) in enumerate(cfgs.items()):
        torch.manual_seed(seed + 10)
        peft_models[name] = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg)).eval()
        folders[name] = str(tmp_path / name)
        peft_models[name].save_pretrained(folders[name])
    set_settings(monkeypatch, backend="cpp")
    ours = fastpeft.load_adapter(copy.deepcopy(base), folders["a"], adapter_name="a")
    fastpeft.load_adapter(ours, folders["b"], adapter_name="b")
    ours.eval()
    names = ["a", "b", "__base__", "b"]
    ids = random_ids(batch=4, seq=5, seed=6)
    layers = [m for m in ours.modules() if isinstance(m, fastpeft.LoraLinear)]
    with torch.no_grad():
        before = ours(input_ids=ids, adapter_names=names).logits
        plans = [m._mixed_cache["plan"] for m in layers]
        assert all(plan[-1][0] == "cpp" for plan in plans)
        fastpeft.hotswap_adapter(ours, folders["new"], adapter_name="b")
        after = ours(input_ids=ids, adapter_names=names).logits
        assert all(m._mixed_cache["plan"] is plan for m, plan in zip(layers, plans))  # kept: values read in place
        want_new = peft_models["new"](input_ids=ids).logits
        want_a = peft_models["a"](input_ids=ids).logits
        with peft_models["a"].disable_adapter():
            want_base = peft_models["a"](input_ids=ids).logits
    assert rel_err(after[[1, 3]], want_new[[1, 3]]) <= FP32_TOL
    assert rel_err(after[0], want_a[0]) <= FP32_TOL and rel_err(after[0], before[0]) <= 1e-6
    assert rel_err(after[2], want_base[2]) <= FP32_TOL
    assert rel_err(after[1], before[1]) > 1e-3  # the swap did change b's rows

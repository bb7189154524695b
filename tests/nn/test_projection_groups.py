"""nn/projection_groups.py + the C++ lora_group_linear operator: sibling LoRA layers that read one input (q/k/v,
gate/up) run as one call once a forward has shown them called on one tensor -- with the numbers of the layers run
one by one, under gradient checkpointing too, and never where a member's state, a hook or the input says no.

CPU: the operators' CPU build (backend cpp), which runs the members one by one inside the call; the CUDA shared
composition is checked against the single-layer operator in the gpu-marked test."""
import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.nn import projection_groups
from fastpeft.ops import cpp_ops
from fastpeft.ops.nf4_format import kernel_state
from fastpeft.ops.nf4_quantize import quantize_nf4
from helpers import nf4_tiny_model, random_ids, rel_err, set_settings, tiny_model, tiny_model_for_nf4

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason="the C++ extension cannot be built here")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _count_members(monkeypatch, op: str) -> list:
    """Wrap ``cpp_ops.<op>`` (a grouped operator, which the groups call) to record each run's member count."""
    calls = []
    real = getattr(cpp_ops, op)

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(cpp_ops, op, counting)
    return calls


@pytest.fixture
def count_group_calls(monkeypatch):
    """Members per run of the grouped LoRA operator (cpp_ops.lora_group_linear)."""
    return _count_members(monkeypatch, "lora_group_linear")


def _patched(arch, monkeypatch, group: bool, dropout=0.0, seed=0):
    set_settings(monkeypatch, backend="cpp", group_projections=group)
    torch.manual_seed(seed)
    model = fastpeft.patch(tiny_model(arch), fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                 target_modules=TARGETS, init_lora_weights=False))
    return model.train()


def _step(model, ids, checkpoint=False):
    """One training step; ``checkpoint``: False, True (non-reentrant, transformers' default) or "reentrant" (the
    forward under no_grad, the recompute inside the backward)."""
    if checkpoint:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpoint == "reentrant"})
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_grouped_steps_match_layers_run_one_by_one(arch, checkpoint, monkeypatch, count_group_calls):
    """Three training steps (the first confirms the groups, the next run them; with checkpointing the recompute
    must save what the forward saved): logits, loss and every adapter gradient equal to the ungrouped model's."""
    ids = random_ids(batch=2, seq=40)  # 80 rows: above MIN_ROWS
    plain = _patched(arch, monkeypatch, group=False)
    grouped = _patched(arch, monkeypatch, group=True)
    grouped.load_state_dict(plain.state_dict())
    assert all(not hasattr(m, "_projection_group") for m in plain.modules())
    n_groups = sum(1 for m in grouped.modules() if type(m).__name__ == "LoraLinear"
                   and getattr(m, "_projection_group", None) is not None)
    assert n_groups == 5 * 2  # q/k/v and gate/up in each of the 2 layers
    _assert_grouped_steps_match(plain, grouped, ids, checkpoint, count_group_calls)


def _assert_grouped_steps_match(plain, grouped, ids, checkpoint, calls, n_grads=None):
    """Three training steps of each model: the first only watches (no grouped call), the next two run q/k/v and
    gate/up of both layers grouped (forward, plus the recompute under checkpointing), and logits, loss and every
    gradient equal the ungrouped model's. ``calls``: a fixture's list of member counts per grouped run."""
    for step in range(3):
        want = _step(plain, ids, checkpoint)
        calls_before = len(calls)
        got = _step(grouped, ids, checkpoint)
        ran = calls[calls_before:]
        if step == 0:
            assert ran == []  # watching: every layer on its own
        else:
            assert sorted(ran) == sorted([3, 2] * 2 * (2 if checkpoint else 1))
        assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6
        assert got[2].keys() == want[2].keys() and (n_grads is None or len(want[2]) == n_grads)
        for name in want[2]:
            assert rel_err(got[2][name], want[2][name]) < 1e-5, name


def test_converted_peft_models_and_added_adapters_are_linked(monkeypatch):
    """patch(peft_model) links the converted layers; a second adapter keeps the groups (they follow the active
    adapter at run time)."""
    import peft

    set_settings(monkeypatch, backend="cpp")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=TARGETS))
    fastpeft.patch(model)
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj._projection_group is attn.v_proj._projection_group is not None
    fastpeft.add_adapter(model, "second", fastpeft.LoraConfig(r=4, target_modules=TARGETS))
    assert attn.q_proj._projection_group.members == [attn.q_proj, attn.k_proj, attn.v_proj]


def test_members_on_different_inputs_never_group(monkeypatch, count_group_calls):
    """Cross-attention style: k / v called on another tensor than q; the group is never confirmed."""
    set_settings(monkeypatch, backend="cpp")

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x, memory):
            return self.q_proj(x).sum() + self.k_proj(memory).sum() + self.v_proj(memory).sum()

    attn = fastpeft.patch(Attn(), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    x, memory = torch.randn(80, 16), torch.randn(80, 16)
    for _ in range(3):
        attn(x, memory).backward()
    assert count_group_calls == []
    assert not attn.q_proj._projection_group.confirmed


class Mlp(nn.Module):
    """A gated MLP's two siblings (module level: the pickling test needs the class importable)."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24), nn.Linear(16, 24)

    def forward(self, x):
        return (self.gate_proj(x) * self.up_proj(x)).sum()


def _mlp(monkeypatch, **lora):
    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(0)
    return fastpeft.patch(Mlp(), fastpeft.LoraConfig(target_modules=["gate_proj", "up_proj"], init_lora_weights=False,
                                                     **lora)).train()


@pytest.mark.parametrize("case", ["dropout", "pre_hook", "few_rows", "rank_pattern", "disabled", "trainable_base"])
def test_groups_stand_aside(case, monkeypatch, count_group_calls):
    """Where one member would not run the plain operator with its siblings' settings, or the call is
    decode-sized, every member runs on its own (and the outputs stay those of the ungrouped layers)."""
    lora = {"r": 4}
    if case == "dropout":
        lora["lora_dropout"] = 0.1
    if case == "rank_pattern":
        lora["rank_pattern"] = {"up_proj": 2}
    mlp = _mlp(monkeypatch, **lora)
    if case == "pre_hook":
        mlp.up_proj.register_forward_pre_hook(lambda module, args: None)
    if case == "trainable_base":
        mlp.up_proj.base_layer.weight.requires_grad_(True)
    x = torch.randn(8 if case == "few_rows" else 80, 16)
    for _ in range(3):
        if case == "disabled":
            with fastpeft.disable_adapter(mlp):
                mlp(x)  # the frozen bases alone: nothing to differentiate
        else:
            mlp(x).backward()
    assert count_group_calls == []


def test_setting_off_and_unconfirm_on_a_repeated_member(monkeypatch, count_group_calls):
    set_settings(monkeypatch, group_projections=False)
    mlp = _mlp(monkeypatch, r=4)
    assert not hasattr(mlp.gate_proj, "_projection_group")
    set_settings(monkeypatch, group_projections=True)
    mlp = _mlp(monkeypatch, r=4)
    x = torch.randn(80, 16)
    mlp(x)
    mlp(x)  # confirmed from here
    assert count_group_calls == [2]
    group = mlp.gate_proj._projection_group
    y_gate = mlp.gate_proj(x)  # leader: computes both, keeps up's
    y_gate_again = mlp.gate_proj(x)  # out of turn: drops what was kept, runs alone, unconfirms
    assert torch.equal(y_gate, y_gate_again) and not group.confirmed and not group._kept
    assert count_group_calls == [2, 2]


def test_in_place_change_of_the_input_is_not_served_a_kept_output(monkeypatch, count_group_calls):
    mlp = _mlp(monkeypatch, r=4)
    x = torch.randn(80, 16)
    mlp(x)
    mlp(x)
    with torch.no_grad():
        mlp.gate_proj(x)
        x.mul_(2)  # x changed in place between the members' calls
        y_up = mlp.up_proj(x)  # not the output kept for the old x: computed on its own
        assert not mlp.up_proj._projection_group.confirmed
        assert torch.equal(y_up, mlp.up_proj(x))
    assert count_group_calls == [2, 2]


def test_inference_mode_runs_the_members_on_their_own(monkeypatch, count_group_calls):
    mlp = _mlp(monkeypatch, r=4).eval()
    x = torch.randn(80, 16)
    with torch.inference_mode():  # inside a model the members' input is made in inference mode, as here
        outs = [mlp(x * 1) for _ in range(3)]
    assert count_group_calls == [] and all(torch.equal(o, outs[0]) for o in outs)
    with torch.no_grad():
        assert torch.equal(mlp(x), outs[0]) and torch.equal(mlp(x), outs[0])
        assert torch.equal(mlp(x), outs[0])
    assert count_group_calls == [2, 2]  # no_grad: watched once, then grouped


def test_a_grouped_model_copies_and_pickles(monkeypatch, count_group_calls, tmp_path):
    """After grouped calls (a weak reference to the last input is held), deepcopy and torch.save still work; the
    copies start unconfirmed, group their own layers and give the same outputs."""
    import copy
    import pickle

    mlp = _mlp(monkeypatch, r=4)
    x = torch.randn(80, 16)
    mlp(x)
    want = mlp(x)
    assert count_group_calls == [2]
    for twin in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        group = twin.gate_proj._projection_group
        assert group is twin.up_proj._projection_group and group.members == [twin.gate_proj, twin.up_proj]
        assert not group.confirmed
        twin(x)
        assert torch.equal(twin(x), want)
    assert count_group_calls == [2, 2, 2]
    torch.save(mlp, tmp_path / "mlp.pt")


@pytest.mark.parametrize("use_dora", [False, True])
def test_copies_keep_the_variant_instances_the_hot_path_compares(use_dora, monkeypatch):
    """LoraLinear's hot path and the groups compare a layer's variant with PLAIN_LORA / DORA by identity: a deepcopy
    or pickle of a layer must keep those instances (it once made new ones, and every copied layer took the general
    path)."""
    import copy
    import pickle

    from fastpeft.nn.variants import DORA, PLAIN_LORA

    mlp = _mlp(monkeypatch, r=4, use_dora=use_dora)
    want = DORA if use_dora else PLAIN_LORA
    for twin in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        assert twin.gate_proj.lora_variant["default"] is want and twin.up_proj.lora_variant["default"] is want


def test_a_shallow_copy_sharing_the_group_runs_alone(monkeypatch, count_group_calls):
    """nn.DataParallel's replicas are shallow copies whose __dict__ (the group included) is shared: a replica must
    neither use the group (its members are the originals, on another device) nor change its state."""
    import copy

    mlp = _mlp(monkeypatch, r=4)
    x = torch.randn(80, 16)
    mlp(x)
    replica = copy.copy(mlp.gate_proj)
    assert replica._projection_group is mlp.gate_proj._projection_group
    group = replica._projection_group
    before = (group.confirmed, group._pending, list(group._seen))
    layer = mlp.gate_proj
    alone = cpp_ops.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                                layer.lora_B["default"].weight, layer.scaling["default"])
    assert torch.equal(replica(x), alone)
    assert (group.confirmed, group._pending, list(group._seen)) == before and count_group_calls == []


def test_lora_group_linear_op_validates_its_lists():
    x = torch.randn(4, 8)
    w = [torch.randn(6, 8), torch.randn(6, 8)]
    a = [torch.randn(2, 8), torch.randn(2, 8)]
    b = [torch.randn(6, 2), torch.randn(6, 2)]
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.lora_group_linear(x, w, [], a[:1], b, 1.0)
    with pytest.raises(RuntimeError, match="does not take x"):
        cpp_ops.lora_group_linear(x, [torch.randn(6, 7), w[1]], [], a, b, 1.0)
    with pytest.raises(RuntimeError, match="bias has"):
        cpp_ops.lora_group_linear(x, w, [torch.randn(6), torch.randn(5)], a, b, 1.0)
    ys = cpp_ops.lora_group_linear(x, w, [], a, b, 1.5)
    for y, wi, ai, bi in zip(ys, w, a, b):
        assert torch.allclose(y, cpp_ops.lora_linear(x, wi, None, ai, bi, 1.5))


# -- 4-bit bases (QLoRA): fastpeft_ops::nf4_lora_group_linear ---------------------------------------------------

@pytest.fixture
def count_nf4_group_calls(monkeypatch):
    """Members per run of the grouped 4-bit operator (cpp_ops.nf4_lora_group_linear)."""
    return _count_members(monkeypatch, "nf4_lora_group_linear")


def _patched_nf4(arch, monkeypatch, group: bool, seed=0, module_type="fastpeft"):
    """A tiny model whose linear layers (not the head) are 4-bit -- fastpeft's NF4Linear (no bitsandbytes) or
    bitsandbytes' Linear4bit -- with LoRA on all of them."""
    set_settings(monkeypatch, backend="cpp", group_projections=group)
    if module_type == "bnb":
        pytest.importorskip("bitsandbytes")
        base = nf4_tiny_model(arch, seed=3)
    else:
        base = fastpeft.quantize_nf4(tiny_model_for_nf4(arch, seed=3), module_type="fastpeft",
                                     compute_dtype=torch.float32)
    torch.manual_seed(seed)
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     init_lora_weights=False))
    return model.train()


def _copy_trainable(src, dst):
    """The adapters of ``src`` into ``dst`` (the 4-bit bases are built the same way; bnb's Linear4bit state dicts
    do not load into a model quantized already)."""
    theirs = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[name])


@pytest.mark.parametrize("arch,checkpoint,module_type", [("llama", False, "fastpeft"), ("llama", True, "fastpeft"),
                                                         ("qwen2", False, "fastpeft"), ("qwen2", True, "fastpeft"),
                                                         ("llama", "reentrant", "fastpeft"), ("llama", True, "bnb")])
def test_qlora_grouped_steps_match_layers_run_one_by_one(arch, checkpoint, module_type, monkeypatch,
                                                          count_nf4_group_calls):
    """QLoRA: the 4-bit members run as one operator from the second step on (q/k/v with Qwen2's biases, gate/up),
    and logits, loss and every adapter gradient equal the ungrouped model's, with checkpointing too; on fastpeft's
    NF4Linear and on bitsandbytes' Linear4bit (double-quantized state)."""
    ids = random_ids(batch=2, seq=40)  # 80 rows: above the 4-bit hot path's and the groups' minimum
    plain = _patched_nf4(arch, monkeypatch, group=False, module_type=module_type)
    grouped = _patched_nf4(arch, monkeypatch, group=True, module_type=module_type)
    _copy_trainable(plain, grouped)
    _assert_grouped_steps_match(plain, grouped, ids, checkpoint, count_nf4_group_calls,
                                n_grads=2 * 7 * 2)  # A and B of 7 layers x 2 blocks


def test_qlora_groups_stand_aside_for_a_dense_member(monkeypatch, count_nf4_group_calls, count_group_calls):
    """A group whose members' bases differ in kind (one dense, the others 4-bit) never runs grouped, by either
    operator, and still computes what the layers compute one by one."""
    ids = random_ids(batch=2, seq=40)
    plain = _patched_nf4("llama", monkeypatch, group=False)
    grouped = _patched_nf4("llama", monkeypatch, group=True)
    _copy_trainable(plain, grouped)
    for model in (plain, grouped):
        for layer in model.model.layers:
            q = layer.self_attn.q_proj
            dense = nn.Linear(q.in_features, q.out_features, bias=False)
            with torch.no_grad():
                dense.weight.copy_(q.base_layer.dequantize() if hasattr(q.base_layer, "dequantize") else
                                   fastpeft.nn.bases.dequantize_linear4bit(q.base_layer))
            dense.weight.requires_grad_(False)
            q.base_layer = dense
    for _ in range(3):
        want = _step(plain, ids)
        got = _step(grouped, ids)
        assert rel_err(got[1], want[1]) < 1e-6
    assert count_group_calls == [] and sorted(set(count_nf4_group_calls)) == [2]  # gate/up only


def _nf4_members(Ns, K, dtype=torch.float32, device="cpu", nested=True):
    weights = []
    for i, n in enumerate(Ns):
        packed, qs = quantize_nf4(torch.randn(n, K, generator=torch.Generator().manual_seed(i)), blocksize=64,
                                  compress_statistics=nested)
        weights.append((packed.to(device), kernel_state(qs, device)))
    return weights


@pytest.mark.parametrize("has_bias", [False, True])
def test_nf4_lora_group_linear_op_matches_the_single_layer_operator(has_bias):
    """Outputs and the gradients of x, biases, lora_A and lora_B (every subset) equal the single-layer operator's
    on each member, with one member's output unused (no gradient from it)."""
    torch.manual_seed(0)
    K, Ns, r = 128, [96, 32, 32], 3
    weights = _nf4_members(Ns, K)
    x = torch.randn(2, 37, K)
    bs = [torch.randn(n) for n in Ns] if has_bias else []
    As = [torch.randn(r, K) / K**0.5 for _ in Ns]
    Bs = [torch.randn(n, r) for n in Ns]
    gs = [torch.randn(2, 37, n) for n in Ns[:2]]  # the last member's output goes unused
    for wanted in ("xbAB", "x", "A", "B", "b"):
        def leaves():
            return (x.clone().requires_grad_("x" in wanted), [b.clone().requires_grad_("b" in wanted) for b in bs],
                    [a.clone().requires_grad_("A" in wanted) for a in As],
                    [b.clone().requires_grad_("B" in wanted) for b in Bs])
        if wanted == "b" and not has_bias:
            continue
        xg, bg, Ag, Bg = leaves()
        ys = cpp_ops.nf4_lora_group_linear(xg, weights, bg, Ag, Bg, 1.5)
        torch.autograd.backward(ys[:2], gs)
        xr, br, Ar, Br = leaves()
        refs = [cpp_ops.nf4_lora_linear(xr, p, ks, br[i] if br else None, Ar[i], Br[i], 1.5)
                for i, (p, ks) in enumerate(weights)]
        torch.autograd.backward(refs[:2], gs)
        for y, ref in zip(ys, refs):
            assert y.shape == ref.shape and rel_err(y, ref) < 1e-6
        pairs = [(xg.grad, xr.grad)] if "x" in wanted else []
        for key, got_list, ref_list in (("b", bg, br), ("A", Ag, Ar), ("B", Bg, Br)):
            if key in wanted:
                pairs += [(g.grad, t.grad) for g, t in zip(got_list, ref_list)]
        assert pairs
        for got, ref in pairs:
            if ref is None:  # the unused member's A / B / bias: zeros from the group (one node for all members)
                assert got is None or not got.any()
            else:
                assert got is not None and rel_err(got, ref) < 1e-5
        assert ("x" in wanted) == (xg.grad is not None)


def test_nf4_lora_group_linear_op_validates_its_lists():
    K = 64
    weights = _nf4_members([16, 8], K)
    x = torch.randn(4, K)
    a = [torch.randn(2, K), torch.randn(2, K)]
    b = [torch.randn(16, 2), torch.randn(8, 2)]
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.nf4_lora_group_linear(x, weights, [], a[:1], b, 1.0)
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.nf4_lora_group_linear(x, weights, [torch.randn(16)], a, b, 1.0)
    with pytest.raises(RuntimeError, match="in_features"):
        cpp_ops.nf4_lora_group_linear(torch.randn(4, 32), weights, [], a, b, 1.0)
    p1, ks1 = weights[1]
    odd = kernel_state(quantize_nf4(torch.randn(8, K).half())[1], "cpu")
    if odd.state_dtype != ks1.state_dtype:
        with pytest.raises(ValueError, match="share one dtype"):
            cpp_ops.nf4_lora_group_linear(x, [weights[0], (p1, odd)], [], a, b, 1.0)
    with torch.no_grad():  # no autograd recorded: the plain composition, same numbers
        ys = cpp_ops.nf4_lora_group_linear(x, weights, [], a, b, 0.5)
    for y, (p, ks), ai, bi in zip(ys, weights, a, b):
        assert rel_err(y, cpp_ops.nf4_lora_linear(x, p, ks, None, ai, bi, 0.5)) < 1e-6


# -- DoRA / QDoRA: fastpeft_ops::dora_group_linear, nf4_dora_group_linear -------------------------------------

@pytest.fixture
def count_dora_group_calls(monkeypatch):
    """Members per run of the grouped DoRA operators: {"dense": [...], "nf4": [...]}."""
    return {"dense": _count_members(monkeypatch, "dora_group_linear"),
            "nf4": _count_members(monkeypatch, "nf4_dora_group_linear")}


def _patched_dora(arch, monkeypatch, group: bool, quantized: bool, seed=0):
    set_settings(monkeypatch, backend="cpp", group_projections=group)
    if quantized:
        base = fastpeft.quantize_nf4(tiny_model_for_nf4(arch, seed=3), module_type="fastpeft",
                                     compute_dtype=torch.float32)
    else:
        base = tiny_model(arch)
    torch.manual_seed(seed)
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                     init_lora_weights=False))
    with torch.no_grad():  # magnitudes away from the initial ‖W + s·B·A‖, so g != 1 and dm carries signal
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model.train()


@pytest.mark.parametrize("arch,checkpoint,quantized", [("llama", False, False), ("llama", True, False),
                                                       ("qwen2", True, False), ("llama", "reentrant", False),
                                                       ("llama", False, True), ("qwen2", True, True),
                                                       ("llama", "reentrant", True)])
def test_dora_grouped_steps_match_layers_run_one_by_one(arch, checkpoint, quantized, monkeypatch,
                                                         count_dora_group_calls):
    """DoRA on dense and 4-bit bases: q/k/v and gate/up run as one grouped operator from the second step on, and
    logits, loss and every adapter gradient (lora_A, lora_B, magnitudes) equal the ungrouped model's."""
    ids = random_ids(batch=2, seq=40)
    plain = _patched_dora(arch, monkeypatch, group=False, quantized=quantized)
    grouped = _patched_dora(arch, monkeypatch, group=True, quantized=quantized)
    _copy_trainable(plain, grouped)
    kind, other = ("nf4", "dense") if quantized else ("dense", "nf4")
    _assert_grouped_steps_match(plain, grouped, ids, checkpoint, count_dora_group_calls[kind],
                                n_grads=3 * 7 * 2)  # A, B, m of 7 layers x 2 blocks
    assert count_dora_group_calls[other] == []  # the other kind's operator never ran


def test_dora_groups_stand_aside_out_of_training(monkeypatch, count_dora_group_calls):
    """Out of training (eval, no autograd) DoRA members keep their cached-norm paths: no grouped call, the same
    logits as the ungrouped model's."""
    ids = random_ids(batch=2, seq=40)
    plain = _patched_dora("llama", monkeypatch, group=False, quantized=False)
    grouped = _patched_dora("llama", monkeypatch, group=True, quantized=False)
    _copy_trainable(plain, grouped)
    _step(grouped, ids)
    _step(grouped, ids)
    assert count_dora_group_calls["dense"]  # confirmed and running in training
    runs = len(count_dora_group_calls["dense"])
    for model in (plain, grouped):
        model.eval()
    with torch.no_grad():
        for _ in range(3):
            want, got = plain(input_ids=ids).logits, grouped(input_ids=ids).logits
            assert rel_err(got, want) < 1e-6
    assert len(count_dora_group_calls["dense"]) == runs


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_dora_group_ops_match_the_single_layer_operators(quantized, has_bias):
    """dora_group_linear / nf4_dora_group_linear against dora_linear / nf4_dora_linear on each member: outputs and
    the gradients of x, biases, lora_A, lora_B and magnitudes (every subset), with and without a given ‖W‖²; a
    member whose output goes unused gets no gradient."""
    torch.manual_seed(1)
    K, Ns, r = 128, [96, 32, 32], 3
    if quantized:
        weights = _nf4_members(Ns, K)
        dense = [cpp_ops.nf4_dequantize(p, ks, torch.float32) for p, ks in weights]
    else:
        dense = weights = [torch.randn(n, K) / K**0.5 for n in Ns]
    x = torch.randn(2, 37, K)
    bs = [torch.randn(n) for n in Ns] if has_bias else []
    As = [torch.randn(r, K) / K**0.5 for _ in Ns]
    Bs = [torch.randn(n, r) for n in Ns]
    ms = [torch.rand(n) + 0.5 for n in Ns]
    sq = [torch.linalg.vector_norm(w, dim=1).square() for w in dense]
    gs = [torch.randn(2, 37, n) for n in Ns[:2]]  # the last member's output goes unused
    for wanted, given_sq in (("xbABm", True), ("xbABm", False), ("x", True), ("A", True), ("B", True),
                             ("m", True), ("b", True)):
        if "b" in wanted and not has_bias and wanted == "b":
            continue

        def leaves():
            return tuple([t.clone().requires_grad_(k in wanted) for t in ts]
                         for k, ts in (("x", [x]), ("b", bs), ("A", As), ("B", Bs), ("m", ms)))
        (xg,), bg, Ag, Bg, mg = leaves()
        group = cpp_ops.nf4_dora_group_linear if quantized else cpp_ops.dora_group_linear
        ys = group(xg, weights, bg, Ag, Bg, mg, 0.7, sq if given_sq else [])
        torch.autograd.backward(ys[:2], gs)
        (xr,), br, Ar, Br, mr = leaves()
        if quantized:
            refs = [cpp_ops.nf4_dora_linear(xr, p, ks, br[i] if br else None, Ar[i], Br[i], mr[i], 0.7)
                    for i, (p, ks) in enumerate(weights)]
        else:
            refs = [cpp_ops.dora_linear(xr, w, br[i] if br else None, Ar[i], Br[i], mr[i], 0.7)
                    for i, w in enumerate(weights)]
        torch.autograd.backward(refs[:2], gs)
        for y, ref in zip(ys, refs):
            assert y.shape == ref.shape and rel_err(y, ref) < 1e-6
        pairs = [(xg.grad, xr.grad)] if "x" in wanted else []
        for key, got_list, ref_list in (("b", bg, br), ("A", Ag, Ar), ("B", Bg, Br), ("m", mg, mr)):
            if key in wanted:
                pairs += [(g.grad, t.grad) for g, t in zip(got_list, ref_list)]
        assert pairs
        for got, ref in pairs:
            if ref is None:
                assert got is None
            else:
                assert got is not None and got.shape == ref.shape and rel_err(got, ref) < 1e-5
        assert ("x" in wanted) == (xg.grad is not None)


def test_dora_group_ops_validate_their_lists():
    K = 64
    x = torch.randn(4, K)
    ws = [torch.randn(16, K), torch.randn(8, K)]
    a = [torch.randn(2, K), torch.randn(2, K)]
    b = [torch.randn(16, 2), torch.randn(8, 2)]
    m = [torch.rand(16), torch.rand(8)]
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.dora_group_linear(x, ws, [], a, b, m[:1], 1.0)
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.dora_group_linear(x, ws, [], a, b, m, 1.0, [torch.rand(16)])
    with pytest.raises(RuntimeError, match="magnitude must be a vector of its 8"):
        cpp_ops.dora_group_linear(x, ws, [], a, b, [m[0], torch.rand(8, 1)], 1.0)
    with pytest.raises(RuntimeError, match="does not take x"):
        cpp_ops.dora_group_linear(torch.randn(4, 32), ws, [], a, b, m, 1.0)
    with pytest.raises(RuntimeError, match="frozen"):
        cpp_ops.dora_group_linear(x, [ws[0].requires_grad_(), ws[1]], [], a, b, m, 1.0)
    weights = _nf4_members([16, 8], K)
    with pytest.raises(RuntimeError, match="one entry per member"):
        cpp_ops.nf4_dora_group_linear(x, weights, [], a, b[:1], m, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((2, 300), 1000, [1000, 256, 256], 16, True),
                                   ((3, 129), 515, [2049, 2049], 8, False),
                                   ((1, 4096), 2048, [2048, 512, 512], 16, False)])
def test_gpu_shared_composition_matches_the_single_layer_operator(dtype, shape, lora_sum_order):
    """The CUDA shared composition (one shrink, stacked dS, dX by cuBLAS beta = 1) against the single-layer
    operator on each member: outputs and every gradient within 16-bit rounding, every subset of gradients."""
    (B, T), K, Ns, r, has_bias = shape
    torch.manual_seed(K)
    x = torch.randn(B, T, K, device="cuda", dtype=dtype)
    ws = [torch.randn(n, K, device="cuda", dtype=dtype) / K**0.5 for n in Ns]
    bs = [torch.randn(n, device="cuda", dtype=dtype) for n in Ns] if has_bias else []
    As = [torch.randn(r, K, device="cuda") / K**0.5 for _ in Ns]
    Bs = [torch.randn(n, r, device="cuda") / r**0.5 for n in Ns]
    gs = [torch.randn(B, T, n, device="cuda", dtype=dtype) for n in Ns]
    for wanted in ("xAB", "x", "A", "B"):
        def leaves():
            return (x.clone().requires_grad_("x" in wanted), [a.clone().requires_grad_("A" in wanted) for a in As],
                    [b.clone().requires_grad_("B" in wanted) for b in Bs])
        xg, Ag, Bg = leaves()
        ys = cpp_ops.lora_group_linear(xg, ws, bs, Ag, Bg, 2.0)
        torch.autograd.backward(ys, gs)
        xr, Ar, Br = leaves()
        refs = [cpp_ops.lora_linear(xr, w, bs[i] if bs else None, Ar[i], Br[i], 2.0) for i, w in enumerate(ws)]
        torch.autograd.backward(refs, gs)
        for y, ref in zip(ys, refs):
            assert rel_err(y, ref) < 1e-2
        pairs = [(xg.grad, xr.grad)] if "x" in wanted else []
        pairs += list(zip([a.grad for a in Ag], [a.grad for a in Ar])) if "A" in wanted else []
        pairs += list(zip([b.grad for b in Bg], [b.grad for b in Br])) if "B" in wanted else []
        for got, ref in pairs:
            assert got is not None and rel_err(got, ref) < 1e-2
        assert ("x" in wanted) == (xg.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((2, 300), 1024, [1024, 256, 256], 16, True),
                                   ((3, 129), 512, [2048, 2048], 8, False)])
def test_gpu_nf4_group_matches_the_single_layer_operator(dtype, shape, lora_sum_order):
    """The grouped 4-bit operator on CUDA (dequantize every member, then the shared composition) against
    nf4_lora_linear on each member: outputs and every gradient within 16-bit rounding."""
    (B, T), K, Ns, r, has_bias = shape
    torch.manual_seed(K)
    weights = _nf4_members(Ns, K, device="cuda")
    x = torch.randn(B, T, K, device="cuda", dtype=dtype)
    bs = [torch.randn(n, device="cuda", dtype=dtype) for n in Ns] if has_bias else []
    As = [torch.randn(r, K, device="cuda") / K**0.5 for _ in Ns]
    Bs = [torch.randn(n, r, device="cuda") / r**0.5 for n in Ns]
    gs = [torch.randn(B, T, n, device="cuda", dtype=dtype) for n in Ns]

    def leaves():
        return (x.clone().requires_grad_(), [b.clone().requires_grad_() for b in bs],
                [a.clone().requires_grad_() for a in As], [b.clone().requires_grad_() for b in Bs])
    xg, bg, Ag, Bg = leaves()
    ys = cpp_ops.nf4_lora_group_linear(xg, weights, bg, Ag, Bg, 2.0)
    torch.autograd.backward(ys, gs)
    xr, br, Ar, Br = leaves()
    refs = [cpp_ops.nf4_lora_linear(xr, p, ks, br[i] if br else None, Ar[i], Br[i], 2.0)
            for i, (p, ks) in enumerate(weights)]
    torch.autograd.backward(refs, gs)
    for y, ref in zip(ys, refs):
        assert y.dtype == dtype and rel_err(y, ref) < 1e-2
    pairs = [(xg.grad, xr.grad)] + [(g.grad, t.grad) for g, t in zip(bg + Ag + Bg, br + Ar + Br)]
    for got, ref in pairs:
        assert got is not None and torch.isfinite(got).all() and rel_err(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_dora_groups_match_the_single_layer_operators(quantized, lora_sum_order):
    """The grouped DoRA operators on CUDA in bf16 (each member's own DoRA kernels, one node) against
    dora_linear / nf4_dora_linear per member: outputs and every gradient no further from the single-layer operators
    than those are from themselves run again (the DoRA kernels' reductions need not repeat bit for bit), dX within
    bf16 rounding (the group sums the members' dX in another order than autograd)."""
    torch.manual_seed(3)
    K, Ns, r, dtype = 1024, [1024, 256, 256], 16, torch.bfloat16
    if quantized:
        weights = _nf4_members(Ns, K, device="cuda")
    else:
        weights = [(torch.randn(n, K, device="cuda") / K**0.5).to(dtype) for n in Ns]
    x = torch.randn(3, 257, K, device="cuda", dtype=dtype)
    bs = [torch.randn(n, device="cuda", dtype=dtype) for n in Ns]
    As = [torch.randn(r, K, device="cuda") / K**0.5 for _ in Ns]
    Bs = [torch.randn(n, r, device="cuda") / r**0.5 for n in Ns]
    ms = [torch.rand(n, device="cuda") + 0.5 for n in Ns]
    gs = [torch.randn(3, 257, n, device="cuda", dtype=dtype) for n in Ns]

    def run(grouped):
        (xl,), bl, Al, Bl, ml = tuple([t.clone().requires_grad_() for t in ts] for ts in ([x], bs, As, Bs, ms))
        if grouped:
            group = cpp_ops.nf4_dora_group_linear if quantized else cpp_ops.dora_group_linear
            ys = group(xl, weights, bl, Al, Bl, ml, 2.0)
        elif quantized:
            ys = [cpp_ops.nf4_dora_linear(xl, p, ks, bl[i], Al[i], Bl[i], ml[i], 2.0)
                  for i, (p, ks) in enumerate(weights)]
        else:
            ys = [cpp_ops.dora_linear(xl, w, bl[i], Al[i], Bl[i], ml[i], 2.0) for i, w in enumerate(weights)]
        torch.autograd.backward(ys, gs)
        return [y.detach() for y in ys] + [t.grad for t in bl + Al + Bl + ml], xl.grad
    got, got_dx = run(True)
    ref, ref_dx = run(False)
    again, _ = run(False)
    for g, r1, r2 in zip(got, ref, again):
        assert g is not None and torch.isfinite(g).all()
        assert rel_err(g, r1) <= max(4 * rel_err(r2, r1), 1e-6), (g.shape, rel_err(g, r1), rel_err(r2, r1))
    assert torch.isfinite(got_dx).all() and rel_err(got_dx, ref_dx) < 1e-2

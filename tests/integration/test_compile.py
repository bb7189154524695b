"""torch.compile: the kernels are torch.library custom ops, so a patched model compiles with no graph break at
the adapted layers and trains with the same losses as eager.

CPU: the Triton kernels run under TRITON_INTERPRET=1 inside the ops (FASTPEFT_BACKEND=triton), and the
compile backend is "aot_eager" (dynamo + AOTAutograd, no C++ toolchain needed; inductor is measured on the GPU
by benchmarks/scripts/compile_check.py).
"""
import copy

import pytest
import torch
import torch._dynamo as dynamo

import fastpeft
from fastpeft.ops.kernels import custom_ops
from fastpeft.ops.nf4_format import cached_kernel_state, kernel_state
from fastpeft.ops.nf4_quantize import quantize_nf4
from helpers import random_ids, rel_err, set_settings, tiny_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _model(kind, monkeypatch, dropout=0.0):
    set_settings(monkeypatch, backend="triton")
    torch.manual_seed(5)
    if kind in ("lora", "dora"):
        cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False, use_dora=kind == "dora")
    else:
        cfg = fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 init_ia3_weights=False)
    model = fastpeft.patch(tiny_model("llama", seed=2), cfg)
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]  # one decoder layer: the interpreter is slow
    return model.train()


class _Counting:
    """A compile backend that records the FX graphs it is given (then runs them through aot_eager)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def targets(self):
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


def _train(model, ids, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _check_compiled_trains_like_eager(eager, op, n_adapted, seed):
    """Two training steps compiled (one graph, ``n_adapted`` custom ops ``op``) give eager's losses and trained
    parameters within 1e-6."""
    compiled = copy.deepcopy(eager)
    ids = random_ids(batch=2, seq=7, seed=seed)
    expected = _train(eager, ids)
    backend = _Counting()
    compiled.forward = torch.compile(compiled.forward, backend=backend)
    got = _train(compiled, ids)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-6
    assert not torch.equal(expected[0], expected[1])  # the first step changed the adapters
    trainable = 0
    for (n, p), (n2, q) in zip(compiled.named_parameters(), eager.named_parameters()):
        assert n == n2 and rel_err(p.detach().float(), q.detach().float()) <= 1e-6, n  # trained the same
        trainable += p.requires_grad
    assert trainable > 0
    targets = backend.targets()
    assert targets.count(op) == n_adapted, targets  # one opaque op per adapted layer ...
    assert len(backend.graphs) == 1  # ... in one graph: no graph break anywhere in the forward


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_compiled_model_trains_like_eager_without_graph_breaks(kind, monkeypatch):
    op = "fastpeft.lora_fwd.default" if kind == "lora" else "fastpeft.ia3_fwd.default"
    _check_compiled_trains_like_eager(_model(kind, monkeypatch), op, 3 if kind == "lora" else 2, seed=3)


def _check_compiled_dropout(model, check_eval=True):
    """No graph break with dropout on; under torch.compile the masks are reproducible under torch.manual_seed
    and depend on the seed."""
    ids = random_ids(batch=2, seq=7, seed=3)
    explanation = dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager")

    def loss_at(seed):
        torch.manual_seed(seed)
        return model(input_ids=ids, labels=ids).loss.detach()

    a, b, c = loss_at(1), loss_at(1), loss_at(2)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    assert not torch.equal(a, c)  # and the masks really depend on the seed
    if check_eval:
        model.eval()
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids, labels=ids).loss, a)  # dropout was on


def test_dropout_under_compile_has_no_graph_break_and_is_seeded(monkeypatch):
    _check_compiled_dropout(_model("lora", monkeypatch, dropout=0.3))


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    x = torch.randn(6, 24)
    w, b = torch.randn(20, 24), torch.randn(20)
    a, bb = torch.randn(4, 24), torch.randn(20, 4)
    torch.library.opcheck(custom_ops.lora_fwd, (x, w, b, a, bb, 2.0, 0.25, torch.tensor(11)))
    torch.library.opcheck(custom_ops.lora_fwd, (x, w, None, a, bb, 2.0, 0.0, None))
    for ff, vec in ((False, torch.randn(20, 1)), (True, torch.randn(1, 24))):
        torch.library.opcheck(custom_ops.ia3_fwd, (x, w, b, vec, ff))


def test_eager_uses_the_autograd_function(monkeypatch):
    """Outside torch.compile the wrapper must not pay the custom op's host overhead."""
    called = []
    monkeypatch.setattr(custom_ops, "lora_fwd", lambda *a: called.append(a))
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = custom_ops.lora_linear(x, torch.randn(8, 16), None, torch.randn(4, 16), torch.randn(8, 4), 2.0)
    y.sum().backward()
    assert not called and x.grad is not None


def _nf4_model(kind, monkeypatch, double_quant=True, dropout=0.0):
    from helpers import nf4_tiny_model

    set_settings(monkeypatch, backend="triton")
    torch.manual_seed(3)
    base = nf4_tiny_model("llama", double_quant=double_quant)
    base.config.num_hidden_layers = 1
    base.model.layers = base.model.layers[:1]  # one decoder layer: the interpreter is slow
    if kind in ("lora", "dora"):
        cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=kind == "dora",
                                  target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    elif kind == "oft":
        cfg = fastpeft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_weights=False)
    else:
        cfg = fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 init_ia3_weights=False)
    return fastpeft.patch(base, cfg).train()


# M = 14 rows: "fused" is the in-kernel-dequant GEMM (auto picks it for M <= 16), "buffer" dequantize + GEMM
@pytest.mark.parametrize("kind,double_quant,gemm", [("lora", True, "fused"), ("lora", False, "buffer"),
                                                    ("ia3", False, "auto"), ("ia3", True, "auto")])
def test_compiled_nf4_model_trains_like_eager_without_graph_breaks(kind, double_quant, gemm, monkeypatch):
    """4-bit (QLoRA) bases: the NF4 layers are the fastpeft::nf4_*_fwd custom ops under torch.compile: one graph,
    one op per adapted layer (the old path broke once per layer), and two training steps give eager's losses
    and adapter weights."""
    set_settings(monkeypatch, nf4_gemm=gemm)
    op = "fastpeft.nf4_lora_fwd.default" if kind == "lora" else "fastpeft.nf4_ia3_fwd.default"
    _check_compiled_trains_like_eager(_nf4_model(kind, monkeypatch, double_quant), op, 3 if kind == "lora" else 2,
                                      seed=4)


def test_compiled_nf4_without_warm_constants_still_matches(monkeypatch):
    """A QuantState whose kernel constants were never filled (e.g. replaced after patch, bypassing .to()): that
    call runs outside the graph (one break, which fills them), no endless recursion into bnb's Params4bit, and
    eager's numbers; the layers fill them themselves when built (nn/bases.py warm_nf4_state)."""
    eager = _nf4_model("lora", monkeypatch)
    states = [m.base_layer.weight.quant_state for m in eager.modules() if isinstance(m, fastpeft.LoraLinear)]
    assert states and all(cached_kernel_state(qs) is not None for qs in states)  # warmed at build
    compiled = copy.deepcopy(eager)
    for m in compiled.modules():
        if isinstance(m, fastpeft.LoraLinear):
            del m.base_layer.weight.quant_state._fastpeft_kstate
    ids = random_ids(batch=2, seq=7, seed=4)
    expected = _train(eager, ids)
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager")
    got = _train(compiled, ids)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-6
    assert all(cached_kernel_state(m.base_layer.weight.quant_state) is not None
               for m in compiled.modules() if isinstance(m, fastpeft.LoraLinear))


def test_nf4_custom_ops_fakes_match_real():
    """The NF4 ops' fake impls give the real outputs' shapes / dtypes and their autograd formulas run under
    AOTAutograd (opcheck), on a non-nested and a nested state, with bias / dropout / each IA3 mode / each
    subset of needed gradients."""
    torch.manual_seed(0)
    M, K, N, R = 5, 64, 24, 4

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()

    x, a, bb, bias = leaf(M, K), leaf(R, K), leaf(N, R), leaf(N)
    for nested, storage in ((False, torch.uint8), (True, torch.bfloat16)):  # bf16: FSDP's quant_storage
        packed, qs = quantize_nf4(torch.randn(N, K), blocksize=64, compress_statistics=nested,
                                  quant_storage=storage)
        kernel_state(qs, x.device)  # what the layers do when built: the cache the compiled path reads
        _, quant = custom_ops._nf4_args(packed, qs, x.device)
        assert len(quant) == custom_ops._NF4_TENSORS + 9
        for fused in (False, True):
            torch.library.opcheck(custom_ops.nf4_lora_fwd, (x, bias, a, bb, 2.0, 0.25, torch.tensor(11), fused) + quant)
            torch.library.opcheck(custom_ops.nf4_lora_fwd, (x.detach(), None, a, bb, 2.0, 0.0, None, fused) + quant)
        dy, S = torch.randn(M, N), torch.randn(M, R)
        for need in ((True, True, True, True), (False, False, True, False), (True, False, False, True)):
            for fused in (False, True):
                args = (dy, x.detach(), S, a.detach(), bb.detach(), 2.0, 0.25, torch.tensor(11), fused) + need + quant
                torch.library.opcheck(custom_ops.nf4_lora_bwd, args)
        for ff, vec in ((False, leaf(N, 1)), (True, leaf(1, K))):
            torch.library.opcheck(custom_ops.nf4_ia3_fwd, (x, bias, vec, ff) + quant)
            saved = x.detach() if ff else torch.randn(M, N)
            for need_x, need_b in ((True, True), (False, False)):
                args = (dy, saved, vec.detach(), ff, need_x, need_b) + quant
                torch.library.opcheck(custom_ops.nf4_ia3_bwd, args)


def test_nf4_dropout_under_compile_has_no_graph_break_and_is_seeded(monkeypatch):
    _check_compiled_dropout(_nf4_model("lora", monkeypatch, dropout=0.3))

# -- DoRA ------------------------------------------------------------------------------------------------------
def test_compiled_dora_trains_like_eager_without_graph_breaks(monkeypatch):
    _check_compiled_trains_like_eager(_model("dora", monkeypatch), "fastpeft.dora_fwd.default", 3, seed=3)


def test_compiled_nf4_dora_trains_like_eager_without_graph_breaks(monkeypatch):
    _check_compiled_trains_like_eager(_nf4_model("dora", monkeypatch), "fastpeft.nf4_dora_fwd.default", 3, seed=4)


def test_dora_dropout_under_compile_has_no_graph_break_and_is_seeded(monkeypatch):
    _check_compiled_dropout(_model("dora", monkeypatch, dropout=0.3))


def test_dora_custom_ops_pass_opcheck():
    """The DoRA ops' fakes, schemas and autograd formulas (dense and 4-bit; bias, dropout, subsets of grads)."""
    torch.manual_seed(0)
    M, K, N, R = 5, 64, 24, 4

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()

    x, w, bias, a, bb, m = leaf(M, K), torch.randn(N, K), leaf(N), leaf(R, K), leaf(N, R), (torch.rand(N) + 1).requires_grad_()
    torch.library.opcheck(custom_ops.dora_fwd, (x, w, bias, a, bb, m, 2.0, 0.25, torch.tensor(11)))
    torch.library.opcheck(custom_ops.dora_fwd, (x.detach(), w, None, a, bb, m, 2.0, 0.0, None))
    dy, S, Z0, g, inv_n = torch.randn(M, N), torch.randn(M, R), torch.randn(M, N), torch.rand(N) + 1, torch.rand(N) + 1
    for need in ((True, True, True, True, True), (False, False, True, False, True), (True, False, False, True, False)):
        torch.library.opcheck(custom_ops.dora_bwd, (dy, x.detach(), S, Z0, g, inv_n, w, a.detach(), bb.detach(), 2.0,
                                                    0.25, torch.tensor(11)) + need)
    packed, qs = quantize_nf4(torch.randn(N, K), blocksize=64, compress_statistics=True)
    kernel_state(qs, x.device)
    _, quant = custom_ops._nf4_args(packed, qs, x.device)
    torch.library.opcheck(custom_ops.nf4_dora_fwd, (x, bias, a, bb, m, 2.0, 0.25, torch.tensor(11)) + quant)
    torch.library.opcheck(custom_ops.nf4_dora_fwd, (x.detach(), None, a, bb, m, 2.0, 0.0, None) + quant)
    torch.library.opcheck(custom_ops.nf4_dora_bwd, (dy, x.detach(), S, Z0, g, inv_n, a.detach(), bb.detach(), 2.0,
                                                    0.0, None, True, True, True, True, True) + quant)


@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "adalora"])
def test_compiled_vera_loha_lokr_train_like_eager_without_graph_breaks(method, monkeypatch):
    """VeRA, LoHa and AdaLoRA reach LoRA's custom op (their pair is formed in the graph); LoKr's blocked product is
    plain PyTorch. Training (PEFT's module-dropout draw included; AdaLoRA's regulariser, added by a forward hook
    around the compiled forward) compiles to one graph and matches eager."""
    set_settings(monkeypatch, backend="triton")
    torch.manual_seed(5)
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = {"vera": fastpeft.VeraConfig(r=8, target_modules=targets, init_weights=False),
           "loha": fastpeft.LoHaConfig(r=4, target_modules=targets, init_weights=False),
           "lokr": fastpeft.LoKrConfig(r=4, target_modules=targets, init_weights=False),
           "adalora": fastpeft.AdaLoraConfig(init_r=4, lora_alpha=0.5, target_modules=targets, total_step=10,
                                             init_lora_weights=False, task_type="CAUSAL_LM")}[method]
    model = fastpeft.patch(tiny_model("llama", seed=2), cfg)
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    if method == "lokr":
        _check_compiled_trains_like_eager(model.train(), "aten.kron.default", 0, seed=3)  # ΔW is never formed
    else:
        # LoHa: only layers where the rank-r² product is cheaper take it (v_proj 48 -> 24 at r=4 does not)
        fast = sum(1 for m in model.modules()
                   if isinstance(m, (fastpeft.VeraLinear, fastpeft.LohaLinear, fastpeft.AdaLoraLinear))
                   and (not isinstance(m, fastpeft.LohaLinear) or m.factored("default")))
        assert fast >= 2
        _check_compiled_trains_like_eager(model.train(), "fastpeft.lora_fwd.default", fast, seed=3)


@pytest.mark.parametrize("extra", [{}, dict(coft=True, eps=0.05, block_share=True, use_cayley_neumann=False)],
                         ids=["neumann", "coft-shared-exact"])
def test_compiled_oft_trains_like_eager_without_graph_breaks(extra, monkeypatch):
    """OFT's fast path (x + x·(R - I) over the blocks, plain PyTorch) traces into one graph, COFT's in-place
    projection of the generators and the exact Cayley solve included, and trains as eager does; the dense
    block-diagonal matrix is never formed."""
    set_settings(monkeypatch, backend="cpp")
    torch.manual_seed(5)
    cfg = fastpeft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                             **extra)
    model = fastpeft.patch(tiny_model("llama", seed=2), cfg)
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    assert model.model.layers[0].self_attn.q_proj._dense_path(torch.randn(1, 48)) == "cpp"
    # Cayley-Neumann with 5 terms: 3 bmm for Q², Q³, Q⁴ and 1 for the rotation, per layer; shared blocks rotate
    # with one plain matmul and the exact transform solves: no bmm
    _check_compiled_trains_like_eager(model.train(), str(torch.bmm), 0 if extra else 3 * 4, seed=3)


def test_compiled_nf4_oft_trains_like_eager_without_graph_breaks(monkeypatch):
    """OFT on a 4-bit base: the rotated input reaches the fastpeft::nf4_ia3_fwd custom op (unit scale), one per
    adapted layer, in one graph; two training steps give eager's losses and generators."""
    _check_compiled_trains_like_eager(_nf4_model("oft", monkeypatch), "fastpeft.nf4_ia3_fwd.default", 3, seed=4)


def test_auto_layers_on_cpu_never_ask_for_the_cpp_operators(monkeypatch):
    # Under auto a CPU model runs the reference path: building or moving it must not try to build the extension
    # (a compiler run on a machine that may have none). On CUDA the layers load it when built or moved
    # (test_compiled_cuda_model_traces_the_cpp_operator_before_any_eager_call).
    from fastpeft.ops import cpp_ops

    set_settings(monkeypatch, backend="auto")
    monkeypatch.setattr(cpp_ops, "_OPS", {})

    def refuse():
        raise AssertionError("cpp_ops.available() called for a CPU model under auto")

    monkeypatch.setattr(cpp_ops, "available", refuse)
    model = fastpeft.patch(tiny_model("llama", seed=2), fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    model.to(torch.float64).to(torch.float32)
    model(input_ids=random_ids(batch=1, seq=5, seed=1))
    assert not cpp_ops.loaded()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("moved", [False, True], ids=["built-on-cuda", "moved-to-cuda"])
def test_compiled_cuda_model_traces_the_cpp_operator_before_any_eager_call(moved, monkeypatch):
    # Before session 18 a model patched and compiled before any eager call traced the Triton custom ops under auto
    # (dynamo never loads the extension): a host-bound compiled step. The layers now load the operators when their
    # base weight is on CUDA (built there, or moved there with .to / .cuda).
    from fastpeft.ops import cpp_ops

    set_settings(monkeypatch, backend="auto")
    monkeypatch.setattr(cpp_ops, "_OPS", {})  # as in a fresh process: nothing loaded yet
    base = tiny_model("llama", seed=2, dtype=torch.bfloat16)
    if not moved:
        base = base.cuda()
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False))
    assert cpp_ops.loaded() != moved
    if moved:
        model = model.cuda()
        assert cpp_ops.loaded()
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    backend = _Counting()
    model.forward = torch.compile(model.forward, backend=backend)
    ids = random_ids(batch=2, seq=7, seed=3).cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    targets = backend.targets()
    assert targets.count("fastpeft_ops.lora_linear.default") == 3, targets
    assert not any(t.startswith("fastpeft.") for t in targets), targets  # no Triton custom op

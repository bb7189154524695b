"""CUDA graphs: a patched model's training step under ``torch.compile(model, mode="reduce-overhead")``.

The supported way to take the host out of a training step (docs/performance.md, "CUDA graphs"): Inductor compiles
the forward and backward, the adapted layers are single graph nodes (C++ operators or Triton custom ops), and
CUDA-graph trees capture and replay each graph. These tests check that the graphs are really captured (no
"skipping cudagraphs" counter), that a graphed run trains with eager's losses and parameters (dense and 4-bit
bases, gradient checkpointing, AdamW), and that dropout, whose per-call seed lives on the CPU, raises instead of
replaying one mask forever.
"""
import copy

import pytest
import torch

import fastpeft
from helpers import HAS_CUDA, rel_err, tiny_model, tiny_model_for_nf4

pytestmark = pytest.mark.gpu

if HAS_CUDA:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    if HAS_CUDA:
        dynamo.reset()
        counters.clear()
    yield
    if HAS_CUDA:
        dynamo.reset()


def _patched(four_bit: bool, dropout: float = 0.0, method: str = "lora"):
    torch.manual_seed(0)
    base = (tiny_model_for_nf4("llama", seed=3) if four_bit else tiny_model("llama", seed=3)).cuda()
    if four_bit:
        fastpeft.quantize_nf4(base, module_type="fastpeft")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "ia3":
        cfg = fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 init_ia3_weights=False)
    else:
        cfg = fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=False)
    return fastpeft.patch(base, cfg).train()


def _train(model, step_model, ids, steps, graphs):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))  # a copy: the graph's output buffer is reused by the next replay
    return losses


@pytest.mark.parametrize("four_bit,method", [(False, "lora"), (True, "lora"), (False, "ia3")],
                         ids=["lora-dense", "lora-nf4", "ia3-dense"])
def test_reduce_overhead_step_is_graphed_and_trains_like_eager(four_bit, method):
    eager = _patched(four_bit, method=method)
    graphed = copy.deepcopy(eager)
    ids = torch.randint(1, 97, (2, 24), device="cuda")
    want = _train(eager, eager, ids, 6, graphs=False)
    got = _train(graphed, torch.compile(graphed, mode="reduce-overhead"), ids, 6, graphs=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # Inductor reorders the fp32 arithmetic of the non-adapter ops (norms, RoPE, softmax): compiled vs eager,
    # not bitwise; 6 AdamW steps at lr 1e-3 move the loss by ~1e-2, far more than this tolerance
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 2e-5, (got, want)
    assert abs(want[-1] - want[0]) > 1e-4  # the steps did train (untrained: equal losses, the same batch)
    for (name, p), (_, q) in zip(graphed.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            assert rel_err(p, q) < 1e-4, name


def test_dropout_under_reduce_overhead_raises_never_a_frozen_mask():
    """LoRA dropout's seed is drawn on the CPU per call (nn/_rng.py); a CUDA graph would replay one mask forever. Under
    torch.compile(mode="reduce-overhead") the CPU seed tensors that the graph saves for backward stop CUDA-graph
    trees already at their warm-up, with Inductor's "not allocated in pool" error (H200, torch 2.11:
    benchmarks/results/h200/gpu_tests_2026-11-30.txt); fastpeft's own check (a capture with dropout on) would
    raise at the recording after it. Either way a RuntimeError, never a silently repeated mask."""
    model = _patched(False, dropout=0.3)
    step = torch.compile(model, mode="reduce-overhead")
    ids = torch.randint(1, 97, (2, 24), device="cuda")
    with pytest.raises(RuntimeError, match="not allocated in pool|LoRA dropout .* cannot run inside a CUDA graph"):
        for _ in range(4):  # the first call warms up, a later one records
            torch.compiler.cudagraph_mark_step_begin()
            step(input_ids=ids).logits.sum().backward()


def test_eval_graphs_with_dropout_configured_and_hand_captured_dropout_is_refused():
    """In eval mode (no dropout) a model with lora_dropout > 0 is graphed; eager code captured by hand with dropout on
    is refused by fastpeft's check (nn/_rng.py)."""
    model = _patched(False, dropout=0.3).eval()
    step = torch.compile(model, mode="reduce-overhead")
    ids = torch.randint(1, 97, (2, 24), device="cuda")
    evals = []
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            evals.append(step(input_ids=ids).logits.clone())
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert torch.equal(evals[1], evals[2]) and rel_err(evals[2], want) < 1e-5
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    model.train()
    model.set_attn_implementation("sdpa")  # transformers' eager attention mask copies a CPU scalar: not capturable
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot run inside a CUDA graph"):
        with torch.cuda.graph(graph):
            model(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_manual_cuda_graph_of_dora_and_qlora_inference_keeps_nothing_from_the_capture(four_bit):
    """torch.cuda.graph around an eval forward: the DoRA norm cache and the 4-bit dequantization scratch buffer are
    not filled from inside the capture (ops.graph_capturing), and the replay gives eager's logits, also after the
    adapter changed and the graph was captured again."""
    torch.manual_seed(0)
    base = (tiny_model_for_nf4("llama", seed=3) if four_bit else tiny_model("llama", seed=3)).cuda()
    base.set_attn_implementation("sdpa")  # transformers' eager attention mask copies a CPU scalar: not capturable
    if four_bit:
        fastpeft.quantize_nf4(base, module_type="fastpeft")
    cfg = fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                              use_dora=not four_bit)
    model = fastpeft.patch(base, cfg).eval()
    ids = torch.randint(1, 97, (2, 24), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(input_ids=ids, use_cache=False)  # warm-up on the capture stream, as torch.cuda.graph's docs ask
        torch.cuda.current_stream().wait_stream(side)
        for layer in model.modules():
            if isinstance(layer, fastpeft.LoraLinear):
                layer._dora_norms.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(input_ids=ids, use_cache=False).logits
        assert all(not layer._dora_norms for layer in model.modules() if isinstance(layer, fastpeft.LoraLinear))
        graph.replay()
        # fp32; cuBLAS may choose other kernels inside a capture than eagerly (another summation order): ~1e-6
        assert rel_err(out, want) < 1e-5
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # the graph reads the parameters in place: a replay sees the new values
        now = model(input_ids=ids, use_cache=False).logits.clone()
        graph.replay()
        assert rel_err(out, now) < 1e-5 and rel_err(now, want) > 1e-3

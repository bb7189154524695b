"""GPU checks of the memory options (issue 16): the fused loss in bf16 within the unfused loss's own error
against an fp32 twin (fastpeft's path and Liger's where installed), the memory it saves, and activation offload
through real streams and pinned memory (same gradients, lower peak) with reentrant and non-reentrant
checkpointing, on a dense and a 4-bit base."""
import copy

import pytest
import torch
import transformers

import fastpeft
from fastpeft.ops import linear_cross_entropy as lce
from helpers import rel_err

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _llama(vocab=32000, hidden=256, layers=2, inter=512, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   attn_implementation="eager", use_cache=False)
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).train()


def _lora(model):
    cfg = fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return fastpeft.patch(model, cfg)


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _batch(vocab, batch=2, seq=300, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).cuda()
    labels = ids.clone()
    labels[0, :40] = -100
    return ids, labels


@pytest.mark.parametrize("backend", ["fastpeft", "liger"])
def test_bf16_fused_loss_within_the_unfused_error_against_fp32(backend):
    if backend == "liger" and not lce.HAS_LIGER:
        pytest.skip("liger_kernel not installed")
    fp32 = _lora(_llama())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # the fp32 model is the bf16 one's twin (same values, rounded)
    fused = fastpeft.enable_fused_loss(copy.deepcopy(bf16), backend=backend)
    ids, labels = _batch(32000)
    ref_loss, ref = _run(fp32, ids, labels)
    base_loss, base = _run(bf16, ids, labels)
    got_loss, got = _run(fused, ids, labels)
    own = rel_err(base_loss, ref_loss)
    assert rel_err(got_loss, ref_loss) <= max(2 * own, 1e-3), (got_loss, base_loss, ref_loss)
    for name in ref:
        own = rel_err(base[name], ref[name])
        err = rel_err(got[name], ref[name])
        assert err <= max(2 * own, 1e-3), (name, err, own)


def test_fused_loss_saves_the_logits_memory():
    model = _lora(_llama(dtype=torch.bfloat16))
    fused = fastpeft.enable_fused_loss(copy.deepcopy(model), backend="fastpeft")
    ids, labels = _batch(32000, batch=4, seq=1024)

    def peak(m):
        _run(m, ids, labels)  # warm-up (cuBLAS workspaces)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(m, ids, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    unfused, fused_peak = peak(model), peak(fused)
    logits_bytes = 4 * 1024 * 32000 * 2  # one bf16 copy of the logits
    print(f"peak above steady state: unfused {unfused / 2**20:.0f} MiB, fused {fused_peak / 2**20:.0f} MiB")
    assert unfused - fused_peak >= 3 * logits_bytes  # bf16 logits + fp32 copy + fp32 gradient at least


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_activation_offload_same_gradients_lower_peak(reentrant, base):
    model = _llama(vocab=1000, hidden=512, layers=6, inter=1024, dtype=torch.bfloat16)
    if base == "nf4":
        fastpeft.quantize_nf4(model, compute_dtype=torch.bfloat16, module_type="fastpeft")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = _lora(model)
    offloaded = fastpeft.enable_activation_offload(copy.deepcopy(model), min_bytes=1 << 16)
    ids, labels = _batch(1000, batch=4, seq=2048)
    # The Triton LoRA backward (used on 4-bit bases) reduces with fp32 atomics, which differ run to run; under
    # deterministic mode it composes cuBLAS calls, so both runs must agree bit for bit (warn_only: cuBLAS
    # without CUBLAS_WORKSPACE_CONFIG only warns).
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_offload(model, offloaded, ids, labels, base, reentrant)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _check_offload(model, offloaded, ids, labels, base, reentrant):
    def measured(m):
        _run(m, ids, labels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
        loss, grads = _run(m, ids, labels)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated() - base_bytes

    ref_loss, ref, ref_peak = measured(model)
    _, again, _ = measured(model)  # run-to-run noise of the kernels themselves (atomics in split-K reductions)
    loss, got, peak = measured(offloaded)
    assert rel_err(loss, ref_loss) <= 1e-6
    for name in ref:
        noise = rel_err(again[name], ref[name])
        assert rel_err(got[name], ref[name]) <= max(4 * noise, 1e-6), name  # the same numbers came back
    state = offloaded.__dict__[fastpeft.activation_offload.STATE_ATTR]
    layer_input = 4 * 2048 * 512 * 2
    assert state.last.offloaded_bytes >= 6 * layer_input
    print(f"offload ({base}, reentrant={reentrant}): peak above steady state {ref_peak / 2**20:.0f} -> "
          f"{peak / 2**20:.0f} MiB, offloaded {state.last.offloaded_bytes / 2**20:.0f} MiB")
    # 6 checkpointed inputs; at the peak (a layer's recompute in backward) up to two are back on the GPU (the one
    # in use and the prefetched one), and the step's peak also holds one layer's recomputed internals
    assert ref_peak - peak >= 2 * layer_input

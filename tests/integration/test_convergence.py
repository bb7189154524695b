"""50 training steps, PEFT vs fastpeft from the same weights and data: per-step losses agree (GPU, bf16).

The kernels change the rounding (bf16 LoRA term, fused sums), not the math, so the two loss curves must stay
together step by step; a wrong gradient (a missing scale, a stale mask) makes them drift apart within a few
steps of AdamW.
"""
import copy

import peft
import pytest
import torch
import transformers

import fastpeft
from helpers import set_settings

STEPS = 50


def _llama_small():
    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


def _train(model, batches, params):
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    model.train()
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gpu_50_steps_track_peft(method, monkeypatch):
    set_settings(monkeypatch, backend="triton")
    base = _llama_small()
    if method == "lora":
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    else:
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    ours = fastpeft.patch(copy.deepcopy(base), copy.deepcopy(cfg))
    # same adapter init (PEFT's draw), names match once PEFT's wrapper prefix is dropped
    src = {n[len("base_model.model."):]: p for n, p in theirs.named_parameters() if p.requires_grad}
    mine = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert {n for n, _ in mine} == set(src)
    with torch.no_grad():
        for n, p in mine:
            p.copy_(src[n])
    gen = torch.Generator(device="cuda").manual_seed(1234)
    data = [torch.randint(0, 2048, (4, 128), device="cuda", generator=gen) for _ in range(4)]
    batches = [data[i % len(data)] for i in range(STEPS)]  # a small set seen repeatedly: the loss must fall
    loss_p = _train(theirs, batches, [p for p in theirs.parameters() if p.requires_grad])
    loss_o = _train(ours, batches, [p for _, p in mine])
    rel = [abs(a - b) / abs(b) for a, b in zip(loss_o, loss_p)]
    # the run learns something, so agreement is not trivial
    assert loss_p[-1] < loss_p[0] - (0.5 if method == "lora" else 1e-3)
    assert max(rel) <= 1e-2, f"max per-step relative loss difference {max(rel):.2e} at step {rel.index(max(rel))}"

"""Shared test helpers: tiny random HF models built from configs (nothing is downloaded)."""
import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; triton reads this at decoration
# time, so it must be set before fastpeft.ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2"]
VOCAB = 97


def tiny_config(arch: str):
    """A 2-layer model of ``arch`` with odd-ish sizes; fp32, eager attention (deterministic on CPU)."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, attn_implementation="eager")
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=88, num_attention_heads=4,
                                       num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=48, intermediate_size=88, num_attention_heads=4,
                                       num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(hidden_size=48, intermediate_size=88, num_attention_heads=4,
                                         num_key_value_heads=2, **common)
    elif arch == "gemma":
        cfg = transformers.GemmaConfig(hidden_size=48, intermediate_size=88, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=12, **common)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(hidden_size=48, intermediate_size=88, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0, **common)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="eager")
    else:
        raise ValueError(arch)
    return cfg


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.to(dtype).eval()


def random_ids(batch: int = 2, seq: int = 11, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state_snapshot(model: torch.nn.Module):
    """Everything a failed patch must leave untouched: module types/identity, tensors, requires_grad."""
    return {
        "modules": [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
        "params": {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
        "state_keys": sorted(model.state_dict().keys()),
        "attrs": sorted(k for k in model.__dict__ if k.startswith("_fastpeft")),
    }


def assert_same_snapshot(before, after):
    assert before["modules"] == after["modules"]
    assert before["state_keys"] == after["state_keys"]
    assert before["attrs"] == after["attrs"]
    assert before["params"].keys() == after["params"].keys()
    for name, (pid, rg, value) in before["params"].items():
        pid2, rg2, value2 = after["params"][name]
        assert pid == pid2 and rg == rg2, name
        assert torch.equal(value, value2), name


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def clone_model():
    return copy.deepcopy

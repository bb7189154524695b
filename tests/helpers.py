"""Shared test helpers (import them: ``from helpers import tiny_model, rel_err``; tests/ is on sys.path through
tests/conftest.py). Tiny random HF models built from configs (nothing is downloaded), tensors in several
layouts, error measures, model snapshots."""
import copy

import peft
import torch
import transformers

import fastpeft
from fastpeft.nn import bases

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

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


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64; a non-finite value in a never passes (inf)."""
    a = a.double()
    ref = ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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


def tiny_model_for_nf4(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    """``tiny_model`` with hidden 128 / intermediate 256: every in_features a multiple of the 4-bit blocksizes
    64 and 128. bitsandbytes 0.50's CPU ``dequantize_4bit`` mis-scales 2-D weights whose in_features is a
    multiple of 16 but not of the blocksize (e.g. 48 with blocksize 64; see tests/ops/test_nf4_format.py), so PEFT +
    bnb on CPU would compute with other weights than the format (and bnb's CUDA kernel) says."""
    cfg = tiny_config(arch)
    if arch == "gpt2":
        cfg.n_embd = 128
    else:
        cfg.hidden_size, cfg.intermediate_size = 128, 256
        if getattr(cfg, "head_dim", None) is not None:
            cfg.head_dim = 32
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def nf4_tiny_model(arch: str = "llama", double_quant: bool = True, seed: int = 0, blocksize: int = 64):
    """``tiny_model_for_nf4(arch, seed)`` with every nn.Linear but the output head swapped for a bitsandbytes NF4
    ``Linear4bit`` (fp32 compute), quantized from the fp32 weights on CPU — a tiny QLoRA base.

    ``model.is_loaded_in_4bit`` is set, as transformers does for bnb-quantized models, so PEFT dispatches
    its own 4-bit LoRA layer. The dense weight each layer stands for is ``dequantize_4bit(weight, quant_state)``.
    """
    import bitsandbytes as bnb

    model = tiny_model_for_nf4(arch, seed)
    head = model.get_output_embeddings()
    targets = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=blocksize)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
        q = q.to("cpu")  # bnb 0.50 quantizes a Params4bit when it is moved to a device (CPU included)
        # On CPUs with AVX512-BF16, bnb's Linear4bit.forward in eval/no-grad mode repacks the weight *in place*
        # into a CPU-only layout (bf16 absmax, no double quant, needs out_features % 32 == 0, bf16 compute:
        # ~3e-3 relative off dequantize+F.linear). Keep bnb on its portable dequantize+matmul path so results
        # don't depend on the test machine's CPU and stay exact in fp32.
        q.support_avx512bf16_for_cpu = False
        assert q.weight.bnb_quantized and q.weight.quant_state is not None, name
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    model.is_loaded_in_4bit = True
    return model.eval()




def make_x(shape3d, K, dtype, layout, device=DEVICE):
    """x of logical shape [B, T, K] (or [B*T, K] for layout "2d"), in one of several layouts."""
    B, T = shape3d
    if layout == "contig":
        x = torch.randn(B, T, K, dtype=dtype, device=device)
    elif layout == "strided_k":  # last-dim stride 2: viewable as 2-D, not contiguous
        x = torch.randn(B, T, 2 * K, dtype=dtype, device=device)[..., ::2]
    elif layout == "transposed_bt":  # [T, B, K] transposed: not viewable as 2-D
        x = torch.randn(T, B, K, dtype=dtype, device=device).transpose(0, 1)
    elif layout == "2d":
        x = torch.randn(B * T, K, dtype=dtype, device=device)
    else:
        raise ValueError(layout)
    return x


def make_weight(N, K, dtype, transposed, device=DEVICE):
    if transposed:  # GPT-2 Conv1D: weight = conv1d.weight.t(), strides (1, N)
        return (torch.randn(K, N, dtype=dtype, device=device) / K**0.5).t()
    return torch.randn(N, K, dtype=dtype, device=device) / K**0.5


def set_settings(monkeypatch, **changes):
    """Change fastpeft.settings for the rest of the test (validated like the environment; monkeypatch restores
    them). Settings are read from the environment once at import, so tests cannot use setenv."""
    import dataclasses

    from fastpeft import settings

    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.get(), **changes))


PEFT_PREFIX = "base_model.model."  # what PEFT's PeftModel puts in front of the wrapped model's parameter names


def peft_and_fastpeft(base, config_name: str, seed: int, monkeypatch=None, backend: str = "reference", **fields):
    """(PEFT model, fastpeft model) from copies of ``base`` and one config built in each library from the same
    ``fields`` (``config_name``: the class name both share, e.g. "VeraConfig"). Each is built right after
    ``torch.manual_seed(seed)``, so random initialisations draw the same numbers; with ``monkeypatch`` the
    fastpeft layers take ``backend``."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_name)(**fields))
    if monkeypatch is not None:
        set_settings(monkeypatch, backend=backend)
    torch.manual_seed(seed)
    ours = fastpeft.patch(copy.deepcopy(base), getattr(fastpeft, config_name)(**fields))
    return theirs, ours


def peft_parameters(model) -> dict:
    """A PEFT model's parameters by the wrapped model's names (fastpeft's names for the same tensors)."""
    return {n[len(PEFT_PREFIX):]: p for n, p in model.named_parameters()}


def check_bf16_against_fp32_twin(adapter_config, four_bit, monkeypatch):
    """A bf16 tiny Llama (hidden 256; NF4 linear layers when ``four_bit``) patched with ``adapter_config`` on the
    GPU paths, against the same model in fp32 on the reference path: logits and adapter gradients within
    max(1e-2, 2x the error of the same bf16 model on the reference path, i.e. PEFT's order of operations)."""
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 256, 512, 4, 2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).cuda().to(torch.bfloat16).eval()
    if four_bit:
        fastpeft.quantize_nf4(model, compute_dtype=torch.bfloat16)
        twin = copy.deepcopy(model)
        for name, module in list(twin.named_modules()):
            if bases.is_linear4bit(module):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="cuda")
                linear.weight.data = bases.dequantize_linear4bit(module).float()
                parent, _, child = name.rpartition(".")
                setattr(twin.get_submodule(parent), child, linear)
    else:
        twin = copy.deepcopy(model)
    twin = twin.float()
    # the same bf16 model on the reference path (PEFT's order of operations) sets the bf16 error to stay within
    built = {}
    for name, source, backend in (("fp32", twin, "reference"), ("bf16_reference", copy.deepcopy(model), "reference"),
                                  ("ours", model, "auto")):
        set_settings(monkeypatch, backend=backend)
        torch.manual_seed(1)
        built[name] = fastpeft.patch(source, copy.deepcopy(adapter_config))
    ids = random_ids(seed=3).cuda()
    outputs = {name: m(input_ids=ids, labels=ids) for name, m in built.items()}
    for out in outputs.values():
        out.loss.backward()
    grads = {name: {n: p.grad for n, p in m.named_parameters() if p.grad is not None} for name, m in built.items()}
    exact = outputs["fp32"].logits
    assert torch.isfinite(outputs["ours"].logits).all()
    own = rel_err(outputs["bf16_reference"].logits.float(), exact)
    assert rel_err(outputs["ours"].logits.float(), exact) <= max(2 * own, 1e-2), own
    assert grads["ours"].keys() == grads["fp32"].keys() and len(grads["ours"]) > 0
    for name, grad in grads["ours"].items():
        own = rel_err(grads["bf16_reference"][name], grads["fp32"][name])
        assert rel_err(grad, grads["fp32"][name]) <= max(2 * own, 1e-2), (name, own)


def seq2seq_model(arch: str, seed: int = 1):
    """A tiny T5 or BART (2 + 2 layers, fp32, eval) whose greedy decoding varies by input (no early end)."""
    torch.manual_seed(seed)
    if arch == "t5":
        cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = transformers.T5ForConditionalGeneration(cfg)
        with torch.no_grad():  # T5's tiny random init decodes the pad token everywhere: a livelier model
            for p in model.parameters():
                p.normal_(0.0, 0.3)
    else:
        cfg = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                      eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                                      init_std=0.3)  # the default init decodes one special token everywhere
        model = transformers.BartForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = None  # every row generates all its tokens
    model.generation_config.forced_eos_token_id = None
    return model.eval()

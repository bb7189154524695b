"""What the whole-step benchmark runs and what it should cost: model shapes, methods and their labels, the
speed / memory targets, one configuration (``Spec``), the run plan, and the FLOP / memory model behind MFU and
the Full-FT out-of-memory estimate. No torch work happens here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

GiB = 2**30
RANK = 16
ALPHA = 32
DROPOUT = 0.05
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]
LOHA_RANK = 8  # PEFT's default LoHa / LoKr r (alpha = 2r here, like the LoRA rows)
PROMPT_TOKENS = 20  # prompt tuning: virtual tokens in front of every sequence
TRAINED_TOKEN_ROWS = 100  # trainable tokens: embedding rows that train (the head follows when tied)
VERA_RANK = 256  # PEFT's default VeRA r; VeRA on every linear layer but the head, like LoRA
OFT_BLOCK_SIZE = 32  # PEFT's default oft_block_size (Cayley-Neumann, 5 terms: PEFT's defaults too)
# AdaLoRA: PEFT's default init_r / target_r; a schedule long enough that every timed step is in the budgeting phase
# (sensitivity update + re-masking after each optimizer step, the method's most expensive phase)
ADALORA_INIT_R, ADALORA_TARGET_R, ADALORA_TOTAL_STEP = 12, 8, 10_000
SCHEMA = "fastpeft.bench.step/1"

# Model shapes: Llama by default; "arch": "qwen2" builds a Qwen2 model (q / k / v with bias). rope settings do not
# change the step's cost and are left at their defaults. The "tiny*" shapes are the CPU smoke tests.
MODELS: Dict[str, Dict[str, Any]] = {
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(name="tiny Llama (2 layers)", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    # another Llama-like family: bias on q / k / v, 2 KV heads, tied embeddings (issue 13's "not only two shapes")
    "qwen1.5b": dict(name="Qwen2.5-1.5B", arch="qwen2", hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                     tie_word_embeddings=True),
    "tiny-qwen": dict(name="tiny Qwen2 (2 layers)", arch="qwen2", hidden_size=64, intermediate_size=176,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      tie_word_embeddings=True),
}
ARCHS = ("llama", "qwen2")
CPU_MODELS = ("tiny", "tiny-qwen")  # the shapes a machine without a GPU runs
SEQ = {"8b": (2, 2048), "1b": (2, 2048), "tiny": (2, 64), "qwen1.5b": (2, 2048), "tiny-qwen": (2, 64)}  # (batch, tokens per sequence)


def arch_of(model: str) -> str:
    """The transformers architecture of a MODELS shape: "llama" or "qwen2"."""
    return MODELS[model].get("arch", "llama")


def batch_shape_of(model: str, batch_shape=None):
    """(batch, tokens per sequence) of a run: ``batch_shape`` when given (``--batch``), else ``SEQ[model]``."""
    return tuple(batch_shape) if batch_shape else SEQ[model]

# Run order = priority (a --budget-s cut drops the tail): the targets first, then variants, Liger last.
METHODS = ["full_ft", "lora", "qlora", "ia3", "dora", "qdora", "lora_dropout", "qlora_dropout", "dora_dropout", "vera",
           "loha", "lokr", "oft", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning", "trainable_tokens", "lora_fused", "qlora_fused", "lora_offload", "qlora_offload", "lora_liger"]
TABLE_ORDER = ["lora", "lora_fused", "lora_offload", "lora_dropout", "qlora", "qlora_fused", "qlora_offload",
               "qlora_dropout", "dora", "dora_dropout", "qdora", "ia3", "vera", "loha", "lokr", "oft", "adalora",
               "prompt_tuning", "p_tuning", "prefix_tuning", "trainable_tokens", "lora_liger"]  # adapter rows in tables
# fastpeft-only rows (memory options PEFT does not have): compared with PEFT's row of the plain method
FASTPEFT_ONLY = {"lora_fused": "lora", "qlora_fused": "qlora", "lora_offload": "lora", "qlora_offload": "qlora"}
QUICK_METHODS = ["full_ft", "lora", "ia3", "qlora", "lora_liger"]
METHOD_LABEL = {
    "full_ft": "Full FT", "lora": "LoRA r=16", "lora_dropout": "LoRA r=16, dropout 0.05",
    "qlora": "QLoRA r=16", "qlora_dropout": "QLoRA r=16, dropout 0.05", "ia3": "IA3",
    "lora_liger": "LoRA r=16 + Liger", "dora": "DoRA r=16", "qdora": "QDoRA r=16 (4-bit base)",
    "dora_dropout": "DoRA r=16, dropout 0.05", "vera": "VeRA r=256", "loha": "LoHa r=8", "lokr": "LoKr r=8", "oft": "OFT block 32",
    "adalora": "AdaLoRA r=12 to 8",
    "prompt_tuning": "prompt tuning, 20 tokens", "p_tuning": "P-tuning (MLP), 20 tokens",
    "prefix_tuning": "prefix tuning, 20 tokens (no checkpointing)", "trainable_tokens": "trainable tokens, 100 rows",
    "lora_fused": "LoRA r=16 + fused loss", "qlora_fused": "QLoRA r=16 + fused loss",
    "lora_offload": "LoRA r=16 + fused loss + offload", "qlora_offload": "QLoRA r=16 + fused loss + offload",
}
IMPL_LABEL = {"torch": "plain", "peft": "PEFT", "fastpeft": "fastpeft"}
# Targets from DESIGN.md §5 (whole step, vs PEFT): tokens/s × and peak-memory ×.
SPEED_TARGET = {"lora": 2.0, "lora_dropout": 2.0, "qlora": 3.0, "qlora_dropout": 3.0,
                "vera": 1.5, "loha": 1.0, "lokr": 1.0, "oft": 1.0, "adalora": 1.5,
                "prompt_tuning": 1.0, "p_tuning": 1.0, "prefix_tuning": 1.0, "trainable_tokens": 1.0}  # issue 17: VeRA runs on the LoRA kernels; LoHa at least PEFT's speed
MEMORY_TARGET = 0.75
# issue 16: peak memory × PEFT's plain method, for the rows with the fused loss (and activation offload)
LEAN_MEMORY_TARGET = {"lora_fused": 0.7, "lora_offload": 0.7, "qlora_fused": 0.55, "qlora_offload": 0.55}

# Rough H100 seconds per step (DESIGN.md §5 baselines) and per build, only for the running estimate;
# the estimate is rescaled by measured/predicted as configurations finish.
PRIOR_STEP_S = {
    "8b": {"full_ft": 0.9, "lora": 0.71, "lora_dropout": 0.76, "qlora": 1.6, "qlora_dropout": 1.7, "ia3": 0.46,
           "lora_liger": 0.63, "dora": 1.2, "qdora": 2.0, "dora_dropout": 1.6, "vera": 0.8, "loha": 1.0, "lokr": 1.0, "oft": 0.9, "adalora": 0.9, "prompt_tuning": 0.4, "p_tuning": 0.4, "prefix_tuning": 0.4, "trainable_tokens": 0.4, "lora_fused": 0.5,
           "qlora_fused": 0.5, "lora_offload": 0.5, "qlora_offload": 0.5},
    "1b": {"full_ft": 0.14, "lora": 0.19, "lora_dropout": 0.21, "qlora": 0.54, "qlora_dropout": 0.56, "ia3": 0.12,
           "lora_liger": 0.17, "dora": 0.3, "qdora": 0.6, "dora_dropout": 0.4, "vera": 0.2, "loha": 0.3, "lokr": 0.3, "oft": 0.25, "adalora": 0.25, "prompt_tuning": 0.1, "p_tuning": 0.1, "prefix_tuning": 0.1, "trainable_tokens": 0.1, "lora_fused": 0.19,
           "qlora_fused": 0.54, "lora_offload": 0.19, "qlora_offload": 0.54},
    "tiny": {m: 0.05 for m in METHODS},
}
PRIOR_STEP_S["qwen1.5b"] = {m: 1.3 * v for m, v in PRIOR_STEP_S["1b"].items()}  # ~1.3x the 1B's FLOPs per token
PRIOR_STEP_S["tiny-qwen"] = PRIOR_STEP_S["tiny"]
PRIOR_BUILD_S = {"8b": 6.0, "1b": 3.0, "tiny": 0.5, "qwen1.5b": 4.0, "tiny-qwen": 0.5}
PRIOR_PROFILE_S = {"8b": 25.0, "1b": 12.0, "tiny": 1.0, "qwen1.5b": 15.0, "tiny-qwen": 1.0}  # one profiled step + parsing ~10^5 profiler events


# -- one configuration -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """One row of the benchmark: a model shape, a method and the implementation that runs it."""

    model: str  # one of MODELS
    method: str  # one of METHODS
    impl: str  # torch (full_ft) | peft | fastpeft

    @property
    def label(self) -> str:
        return f"{self.model} {METHOD_LABEL[self.method]} [{IMPL_LABEL[self.impl]}]"


def uses_checkpointing(method: str) -> bool:
    """Every row trains with gradient checkpointing but prefix tuning, which cannot (the prefix lives in the KV
    cache, which checkpointed layers do not use: PEFT and fastpeft both refuse the combination)."""
    return method != "prefix_tuning"


def lora_dropout_of(method: str) -> float:
    return DROPOUT if method.endswith("dropout") else 0.0


def is_4bit(method: str) -> bool:
    """Whether the method runs on an NF4 base (QLoRA, QDoRA)."""
    return method.startswith("qlora") or method.startswith("qdora")


def is_dora(method: str) -> bool:
    return method.startswith("dora") or method.startswith("qdora")


def uses_fused_loss(method: str) -> bool:
    """fastpeft.enable_fused_loss on this row (the *_fused and *_offload rows)."""
    return method.endswith("_fused") or method.endswith("_offload")


def uses_offload(method: str) -> bool:
    """fastpeft.enable_activation_offload on this row."""
    return method.endswith("_offload")


def peft_baseline(method: str) -> str:
    """The method whose PEFT row this method is compared with (itself, or the plain method of a fastpeft-only row)."""
    return FASTPEFT_ONLY.get(method, method)


# -- the run plan ----------------------------------------------------------------------------------------
def make_plan(models: List[str], methods: List[str]) -> List[Spec]:
    """Every (model, method, impl) in run order: Full FT on plain transformers, the adapters on PEFT then fastpeft."""
    plan = []
    for model in models:
        for method in methods:
            impls = ["torch"] if method == "full_ft" else ["fastpeft"] if method in FASTPEFT_ONLY else ["peft", "fastpeft"]
            plan.extend(Spec(model, method, impl) for impl in impls)
    return plan


def predict_s(spec: Spec, steps: int, warmup: int, profile: bool, batch_shape=None) -> float:
    """Seconds one configuration should take by the H100 priors (for the running estimate and --budget-s); the
    step prior scales with the tokens per step."""
    b, t = batch_shape_of(spec.model, batch_shape)
    step = PRIOR_STEP_S[spec.model][spec.method] * (b * t) / (SEQ[spec.model][0] * SEQ[spec.model][1])
    build = PRIOR_BUILD_S[spec.model] * (1.5 if is_4bit(spec.method) else 1.0)
    return build + (steps + warmup) * step + (PRIOR_PROFILE_S[spec.model] if profile else 0.0)


# -- FLOPs / memory estimates ----------------------------------------------------------------------------
def linear_params(model: str) -> Dict[str, int]:
    """Weights that take part in matmuls: the decoder's linear layers and the output head."""
    s = MODELS[model]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    return {"decoder": per_layer * L, "head": V * h}


def total_params(model: str) -> int:
    s = MODELS[model]
    h, L, V = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]
    lp = linear_params(model)
    emb = 0 if s["tie_word_embeddings"] else V * h
    # Qwen2: q / k / v carry a bias (h + 2·kv values per layer)
    bias = L * (h + 2 * s["num_key_value_heads"] * (h // s["num_attention_heads"])) if arch_of(model) == "qwen2" else 0
    return lp["decoder"] + lp["head"] + emb + (2 * L + 1) * h + bias


def step_flops(model: str, method: str, batch_shape=None) -> float:
    """FLOPs one step must do, with activation checkpointing (each decoder layer's forward runs twice; prefix
    tuning trains without it: no recompute).

    Decoder linears: forward 2·N·T, recompute 2·N·T, input gradient 2·N·T, weight gradient 2·N·T (full FT
    only). Output head (not recomputed): 2·N·T + 2·N·T, + 2·N·T for full FT. Causal attention counted at
    half the square: forward 2·B·S²·d per layer, ×4 in all (forward, recompute, backward = 2×). Adapter
    FLOPs (2·T·r·(K+N) per LoRA layer, < 1%) are left out. ``batch_shape``: as ``batch_shape_of``.
    """
    batch, seq = batch_shape_of(model, batch_shape)
    T = batch * seq
    lp = linear_params(model)
    s = MODELS[model]
    full = method == "full_ft"
    recompute = 1 if uses_checkpointing(method) else 0
    dec = lp["decoder"] * T * 2 * ((4 if full else 3) - 1 + recompute)
    head = lp["head"] * T * 2 * (3 if full else 2)
    attn = (3 + recompute) * 2 * batch * seq * seq * s["hidden_size"] * s["num_hidden_layers"]
    return float(dec + head + attn)


def full_ft_estimate_bytes(model: str, batch_shape=None) -> int:
    """bf16 weights + grads + AdamW's two bf16 states (8 B/param), plus activations under checkpointing:
    one hidden state per layer, one layer's recomputed internals, and the logits (bf16, fp32 upcast, grad)."""
    s = MODELS[model]
    batch, seq = batch_shape_of(model, batch_shape)
    T = batch * seq
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    states = total_params(model) * 8
    act = L * T * h * 2 + T * (8 * h + 4 * i) * 2 + T * V * (2 + 4 + 4)
    return states + act


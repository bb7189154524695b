"""Thin drop-in modules: they hold adapter parameters and choose a path; the math lives in fastpeft.ops.

    bases.py            the frozen base layers (Linear, Conv1D, bnb Linear4bit) and how to read them
    layer.py            AdapterLayer: bookkeeping, the forward decision and the merge tail, shared by
    lora.py, ia3.py     LoraLinear and IA3Linear
    lora_embedding.py   LoraEmbedding (LoRA on nn.Embedding)
    loha.py             LohaLinear (LoHa: a Hadamard product of two low-rank products, run at rank r² on LoRA's paths)
    lycoris.py, lokr.py LycorisLinear (what LoHa / LoKr share) and LokrLinear (LoKr: W1 ⊗ W2 applied as two small GEMMs)
    oft.py              OftLinear (OFT: a block-diagonal orthogonal rotation of the input, one batched GEMM)
    vera.py             VeraLinear (VeRA: trained vectors over shared frozen projections, on LoRA's paths)
    adalora.py          AdaLoraLinear (AdaLoRA: an SVD-shaped update B·(A ⊙ E), on LoRA's paths)
    variants.py         LoraVariant (plain LoRA: how one adapter computes / merges) and DoraVariant (DoRA)
    projection_groups.py ProjectionGroup: sibling LoRA layers reading one input (q/k/v, gate/up) run as one operator
    modules_to_save.py  ModulesToSave (PEFT's modules_to_save)
    prompt_encoders.py  PromptEmbedding / MultitaskPromptEmbedding / PrefixEncoder / PromptEncoder (prompt tuning,
                        multitask prompt tuning, prefix tuning, P-tuning)
    trainable_tokens.py TrainableTokens (PEFT's trainable_token_indices: selected embedding rows train) and
                        TrainableTokensLayer (the same, PEFT's standalone TrainableTokensConfig)
    _rng.py             the LoRA dropout seed
"""
from .adalora import AdaLoraLinear
from .ia3 import IA3Linear
from .layer import AdapterLayer
from .lora import LoraLinear, LoraVariant
from .lora_embedding import LoraEmbedding
from .loha import LohaLinear
from .lokr import LokrLinear
from .modules_to_save import ModulesToSave
from .oft import OftLinear
from .prompt_encoders import MultitaskPromptEmbedding, PrefixEncoder, PromptEmbedding, PromptEncoder
from .trainable_tokens import TrainableTokens, TrainableTokensLayer
from .vera import VeraLinear, VeraProjections

__all__ = ["AdapterLayer", "LoraLinear", "LoraEmbedding", "LoraVariant", "IA3Linear", "VeraLinear", "LohaLinear", "LokrLinear", "OftLinear",
           "VeraProjections", "ModulesToSave", "PromptEmbedding", "MultitaskPromptEmbedding", "PrefixEncoder", "PromptEncoder", "TrainableTokens",
           "TrainableTokensLayer", "AdaLoraLinear"]

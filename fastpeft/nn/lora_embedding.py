"""LoraEmbedding: LoRA on a frozen ``nn.Embedding`` (PEFT's ``lora.Embedding``: same attribute names, numbers and
file keys).

    y = embedding(x) + s · (Aᵀ[x]) · Bᵀ          A: ``lora_embedding_A[name]`` [r, num_embeddings],
                                                 B: ``lora_embedding_B[name]`` [embedding_dim, r]

The lookup of Aᵀ uses the base layer's padding_idx / max_norm / norm_type / scale_grad_by_freq / sparse, as
PEFT's ``_embed`` does; a base with an ``embed_scale`` (scaled word embeddings) scales the adapter's output too.
As in PEFT, ``lora_dropout`` is kept per adapter but not applied (PEFT's embedding forward does not use it), and
the adapter is fp32 whatever the base dtype (the sum is computed in fp32 and cast back to the base's dtype).
Init: ``init_lora_weights`` True / "gaussian": A = 0, B ~ N(0, 1); False: both ~ N(0, 1). DoRA on embeddings
is not implemented (a clear error). One small lookup and one r-wide matmul: the PyTorch path on every device.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import changes_base_weights
from .layer import AdapterLayer


class LoraEmbedding(AdapterLayer):
    """LoRA on an ``nn.Embedding`` (see the module docstring)."""

    adapter_kind = "lora"
    wraps_embeddings = True

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                 loftq_config=None, keep_base=None):
        super().__init__(base_layer, adapter_name)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          loftq_config, keep_base)

    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                     use_dora: bool = False, loftq_config=None, keep_base=None):
        """Add one adapter. ``loftq_config`` / ``keep_base`` are LoraLinear's (base-rewriting inits), accepted so one
        call serves both; an embedding's base is never rewritten (see the init rules below)."""
        if use_dora:
            raise ValueError("use_dora=True on an embedding layer is not supported by fastpeft (LoRA on embeddings "
                             "is); leave embeddings out of target_modules for DoRA")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if adapter_name in self.lora_embedding_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        device = self._param_device()
        weight_a = torch.randn(r, self.in_features, device=device, dtype=torch.float32)
        weight_b = torch.randn(self.out_features, r, device=device, dtype=torch.float32)
        if init_lora_weights == "loftq":
            raise ValueError("init_lora_weights='loftq' is not supported on embedding layers (PEFT fails on them as "
                             "well); leave embeddings out of target_modules, or use True / 'gaussian' / False")
        if changes_base_weights(init_lora_weights):
            # PEFT's lora.Embedding gives every other truthy init its default init (A = 0, B ~ N(0, 1)), without a
            # word; fastpeft does the same numbers and says so
            warnings.warn(f"init_lora_weights={init_lora_weights!r} applies to Linear layers only; embedding layers "
                          "get the default LoRA embedding init (A = 0, B ~ N(0, 1)) and keep their weights, as in PEFT",
                          stacklevel=3)
        if init_lora_weights is not False:
            nn.init.zeros_(weight_a)
            nn.init.normal_(weight_b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(weight_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(weight_b)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_embedding_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def _has_adapter(self, name: str) -> bool:
        return name in self.lora_embedding_A

    # transformers reads these off the input embeddings (weight tying, resize checks, generate)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self):
        return self.base_layer.padding_idx

    # -- forward ---------------------------------------------------------------------------------------------
    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _forward_adapter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        result = self.base_layer(x)
        delta = (self._lookup(x, self.lora_embedding_A[name].t()) @ self.lora_embedding_B[name].t()) * self.scaling[name]
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is not None:
            delta = delta * (scale.to(delta.dtype) if torch.is_tensor(scale) else scale)
        return (result + delta).to(result.dtype)

    # -- merge -----------------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change of the [num_embeddings, embedding_dim] weight, in fp32."""
        a = self.lora_embedding_A[adapter_name].float()
        b = self.lora_embedding_B[adapter_name].float()
        return (b @ a).t() * self.scaling[adapter_name]

    def _merge_into_base(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data += self.delta_weight(name).to(weight.dtype)

    def _unmerge_from_base(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data -= self.delta_weight(name).to(weight.dtype)

    def _merged_weight(self, name, weight, bias):
        return weight + self.delta_weight(name).to(weight.dtype), bias

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, r={self.r}"

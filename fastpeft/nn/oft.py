"""OftLinear: a drop-in for a frozen nn.Linear with OFT adapters (PEFT's ``oft.Linear``).

OFT rotates the input with a trained block-diagonal orthogonal matrix R and runs the frozen layer on it:
y = base(x·R) (the math is in ``fastpeft/ops/oft.py``). Parameter names are PEFT's: ``oft_R.<adapter>.weight``
[stored blocks, b(b-1)/2] holds each block's skew-symmetric generator.

Paths: the reference path is PEFT's computation (x cast to the adapter's fp32, rotated block by block, cast back,
then the base layer). The fast path (the GPU backends, or FASTPEFT_BACKEND=cpp / triton on any device) rotates x
in its own dtype as x + x·(R - I), one batched GEMM over the blocks (one plain GEMM with ``block_share``), so a
bf16 model's activations are never copied to fp32 and back; in fp32 both paths give the same numbers. On a 4-bit
base (bitsandbytes ``Linear4bit``, fastpeft's ``NF4Linear``) the rotated input goes through the NF4 GEMM of IA3's
kernels with a unit scale; ``merge()`` there raises (as for LoRA), ``merge_and_unload()`` dequantizes.
Merging multiplies each column block of W by its R_iᵀ (W' = W·Rᵀ), unmerging by the blocks' inverses: the dense
in × in matrix PEFT builds for both never exists.

``module_dropout``: PEFT 0.21 builds its multiplicative-dropout layer but never calls it in ``forward``; fastpeft
keeps the value (it is written to adapter_config.json) and, like PEFT, it changes nothing and draws no random
numbers.
"""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn as nn

from ..ops import HAS_TRITON
from ..ops.oft import adjusted_divisor, cayley_rotation, coft_project, rotate_blocks
from . import bases
from .layer import AdapterLayer

if HAS_TRITON:
    from ..ops.kernels import custom_ops

__all__ = ["OftLinear", "OftRotation"]


class OftRotation(nn.Module):
    """One adapter's rotation on one layer (PEFT's ``OFTRotationModule``): the trained ``weight`` [stored blocks,
    b(b-1)/2] and how it becomes the rotation blocks (Cayley or Cayley-Neumann, optional COFT projection)."""

    def __init__(self, stored_blocks: int, block_size: int, n_blocks: int, coft: bool = False, eps: float = 6e-5,
                 block_share: bool = False, use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(stored_blocks, block_size * (block_size - 1) // 2))
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        # the upper triangle's indices, made once (PEFT keeps the same two non-persistent buffers)
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def blocks(self, minus_identity: bool = False) -> torch.Tensor:
        """R's blocks [stored blocks, b, b] (R - I with ``minus_identity``) in the weight's dtype. With COFT the
        weight is first projected in place, outside autograd, on every call (PEFT does the same in forward and when
        merging)."""
        indices = (self.rows, self.cols)
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(coft_project(self.weight, self.block_size, self.eps, indices))
        return cayley_rotation(self.weight, self.block_size, self.use_cayley_neumann, self.num_cayley_neumann_terms,
                               indices, minus_identity)

    def extra_repr(self) -> str:
        return (f"blocks={self.n_blocks}, block_size={self.block_size}, block_share={self.block_share}, "
                f"coft={self.coft}, cayley_neumann={self.num_cayley_neumann_terms if self.use_cayley_neumann else 0}")


class OftLinear(AdapterLayer):
    """Frozen nn.Linear + OFT adapters.

    >>> layer = OftLinear(nn.Linear(16, 8), "default", oft_block_size=4, init_weights=False)
    >>> layer.oft_R["default"].weight.shape, layer.r["default"]
    (torch.Size([4, 6]), 4)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "oft"

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, oft_block_size: int = 32,
                 module_dropout: float = 0.0, coft: bool = False, eps: float = 6e-5, block_share: bool = False,
                 init_weights: bool = True, use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5) -> None:
        if not (isinstance(base_layer, nn.Linear) or bases.is_linear4bit(base_layer)):
            # PEFT's OFT adapts nn.Linear, 4-bit linear layers, Conv2d and Embedding; it refuses transformers'
            # Conv1D. fastpeft adapts the first two.
            raise TypeError(f"OFT adapts torch.nn.Linear layers (dense or bitsandbytes 4-bit); this one is a "
                            f"{type(base_layer).__name__} (transformers Conv1D is not adapted by PEFT's OFT either; "
                            "Conv2d and Embedding bases are not supported by fastpeft's OFT)")
        super().__init__(base_layer, adapter_name)
        self.oft_R = nn.ModuleDict()
        self.r: dict = {}
        self.oft_block_size: dict = {}
        self.module_dropout: dict = {}
        self.update_layer(adapter_name, r, oft_block_size, module_dropout, coft, eps, block_share, init_weights,
                          use_cayley_neumann, num_cayley_neumann_terms)

    def update_layer(self, adapter_name: str, r: int = 0, oft_block_size: int = 32, module_dropout: float = 0.0,
                     coft: bool = False, eps: float = 6e-5, block_share: bool = False, init_weights: bool = True,
                     use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5) -> None:
        if adapter_name in self.oft_R:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if (r == 0) == (oft_block_size == 0):
            raise ValueError(f"OFT needs exactly one of r ({r}) and oft_block_size ({oft_block_size}) non-zero")
        features = self.in_features
        if oft_block_size:
            if features % oft_block_size or oft_block_size > features:
                adjusted = adjusted_divisor(features, oft_block_size)
                warnings.warn(f"Invalid `oft_block_size` ({oft_block_size})! Adjusted `oft_block_size` to "
                              f"({adjusted}).")  # PEFT's warning, word for word
                oft_block_size = adjusted
            r = features // oft_block_size
        else:
            if features % r or r > features:
                adjusted = adjusted_divisor(features, r)
                warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({adjusted}).")
                r = adjusted
            oft_block_size = features // r
        rotation = OftRotation(1 if block_share else r, oft_block_size, r, coft=coft, eps=eps, block_share=block_share,
                               use_cayley_neumann=use_cayley_neumann, num_cayley_neumann_terms=num_cayley_neumann_terms)
        with torch.no_grad():
            if init_weights:
                rotation.weight.zero_()  # R = I: the adapted layer starts as the base layer
            else:
                nn.init.normal_(rotation.weight, mean=0.0, std=0.1)  # PEFT's draw, from torch's global RNG
        self.oft_R[adapter_name] = rotation.to(self._param_device())
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = oft_block_size
        self.module_dropout[adapter_name] = float(module_dropout)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.oft_R[adapter_name]
        for table in (self.r, self.oft_block_size, self.module_dropout):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.oft_R.keys())

    def adapter_parameters(self, adapter_name: str):
        return [self.oft_R[adapter_name].weight]

    def _has_adapter(self, name: str) -> bool:
        return name in self.oft_R._modules

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _forward_reference(self, x, name):
        """PEFT's computation: x cast to the adapter's dtype, rotated, cast back, then the base layer."""
        rotation = self.oft_R[name]
        rotated = rotate_blocks(x.to(rotation.weight.dtype), rotation.blocks())
        return bases.base_forward(self.base_layer, rotated.to(x.dtype)).to(x.dtype)

    def _forward_dense(self, x, name, cpp):
        """x + x·(R - I) in x's dtype (fp32 accumulation in the GEMM), then the base layer."""
        offset = self.oft_R[name].blocks(minus_identity=True)
        rotated = rotate_blocks(x, offset.to(x.dtype), plus_input=True)
        return bases.base_forward(self.base_layer, rotated)

    def _forward_nf4(self, x, name, compiled):
        """A 4-bit base: x + x·(R - I) in the layer's compute dtype, then the frozen 4-bit GEMM of IA3's NF4 kernels
        with a unit input scale (x·1 is exact; its custom op keeps torch.compile in one graph)."""
        base = self.base_layer
        packed, quant_state = bases.nf4_parts(base)
        cd = bases.compute_dtype(base, x)
        offset = self.oft_R[name].blocks(minus_identity=True)
        rotated = rotate_blocks(x.to(cd), offset.to(cd), plus_input=True)
        unit = torch.ones(self.in_features, device=x.device, dtype=offset.dtype)
        y = custom_ops.nf4_ia3_linear(rotated, packed, quant_state, bases.base_bias(base), unit, True)
        return y.to(x.dtype)

    # -- merge ----------------------------------------------------------------------------------------
    def rotation_blocks(self, name: str) -> torch.Tensor:
        """R's blocks [stored blocks, b, b] in fp32, detached (COFT projects the weight first, as PEFT's merge)."""
        return self.oft_R[name].blocks().detach().float()

    def _merge_into_base(self, name: str) -> None:
        weight = self._base_weight_for_merge()
        blocks = self.rotation_blocks(name).to(weight.device)
        weight.copy_(rotate_blocks(weight.float(), blocks.transpose(-1, -2)).to(weight.dtype))

    def _unmerge_from_base(self, name: str) -> None:
        weight = self._base_weight_for_merge()
        inverse = torch.linalg.inv(self.rotation_blocks(name).to(weight.device))
        weight.copy_(rotate_blocks(weight.float(), inverse.transpose(-1, -2)).to(weight.dtype))

    def _merged_weight(self, name, weight, bias):
        blocks = self.rotation_blocks(name).to(weight.device)
        return rotate_blocks(weight, blocks.transpose(-1, -2)), bias

    def extra_repr(self) -> str:
        return f"backend={self.backend}, adapters={self.adapter_names}, active={self.active_adapter!r}"

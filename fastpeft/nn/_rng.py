"""The LoRA dropout seed: one draw from torch's CPU generator per adapted layer and forward, rank folded in.

The Triton kernels never store the dropout mask: they regenerate it from (seed, element index) with Philox
(see ``fastpeft/ops/dropout.py``). What this module guarantees about the seed, hence about the masks:

* Reproducible: the seed is drawn from torch's default CPU generator, so ``torch.manual_seed(s)`` fixes every
  mask of a run (nothing else -- no counters, no clock -- enters the seed).
* Activation checkpointing: ``torch.utils.checkpoint`` (reentrant or not, ``preserve_rng_state=True``, the
  default and what transformers uses) restores the CPU generator before the recompute, so the recomputed
  forward draws the same seed, hence the same mask, as the first one.
* Every step and every layer draws a new seed (the generator advances on each draw).
* Every rank of a ``torch.distributed`` job draws a different mask even when all ranks were seeded alike
  (``transformers.Trainer`` and ``accelerate.utils.set_seed`` seed every rank with the same number): the
  rank is folded into the seed. Different ranks of one step therefore see independent masks, as
  ``p`` different dropout draws on the global batch would.

The reference path (PyTorch backend: CPU tensors without ``TRITON_INTERPRET=1``, or ``FASTPEFT_BACKEND=reference``)
does not use this module: it applies ``nn.Dropout`` with torch's own generator exactly as PEFT does, so
there the masks of different ranks differ only if the user seeds ranks differently (e.g.
``accelerate.utils.set_seed(seed, device_specific=True)``); reproducibility and checkpoint recompute behave as
in PEFT (torch restores the generators of the checkpointed inputs' devices).
"""
from __future__ import annotations

import torch

from ..ops import refuse_dropout_in_graph

# Seeds stay below 2**31 - 1 so a kernel argument is always a non-negative int32.
SEED_MODULUS = 2**31 - 1
# Odd multiplier spreading consecutive ranks over the seed range (any value coprime to the modulus works: the
# modulus is prime, so distinct ranks below it always give distinct seeds for the same draw).
_RANK_STRIDE = 0x5BD1E995


def current_rank() -> int:
    """The global rank in an initialized default process group, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def fold_rank(draw: int, rank: int) -> int:
    """Mix ``rank`` into a raw draw in [0, SEED_MODULUS): a bijection of the draw for each rank."""
    return (int(draw) + int(rank) * _RANK_STRIDE) % SEED_MODULUS


def dropout_seed() -> int:
    """A fresh dropout seed for one LoRA layer forward (see the module docstring for the guarantees): an int,
    or under torch.compile the 0-dim tensor of ``dropout_seed_tensor``.

    >>> _ = torch.manual_seed(0); a = dropout_seed(); _ = torch.manual_seed(0); a == dropout_seed()
    True
    """
    if torch.compiler.is_compiling():
        return dropout_seed_tensor()  # .item() would break the graph; the custom op reads the tensor
    refuse_dropout_in_graph()  # eager code inside torch.cuda.graph: the seed would be frozen into the graph
    draw = int(torch.randint(0, SEED_MODULUS, (), dtype=torch.int64).item())
    return fold_rank(draw, current_rank())


def dropout_draw() -> torch.Tensor:
    """The raw draw of ``dropout_seed`` as a 0-dim int64 CPU tensor, for the C++ operators (ops/cpp_ops.py), which
    fold the rank in themselves: the same generator call, so the same masks as the Triton path. A tensor (no
    ``.item()``), so torch.compile neither breaks nor specializes a graph on it."""
    if not torch.compiler.is_compiling():
        refuse_dropout_in_graph()  # eager code inside torch.cuda.graph (the C++ operators check compiled graphs)
    return torch.randint(0, SEED_MODULUS, (), dtype=torch.int64)


def dropout_seed_tensor() -> torch.Tensor:
    """The same draw as ``dropout_seed`` as a 0-dim int64 CPU tensor, for torch.compile: no ``.item()`` (which
    would break the graph); the custom op reads the value. Under a compiled graph the draw comes from the
    compiler's RNG (reproducible under ``torch.manual_seed``, but not the same numbers as eager mode)."""
    draw = torch.randint(0, SEED_MODULUS, (), dtype=torch.int64)
    return (draw + current_rank() * _RANK_STRIDE) % SEED_MODULUS

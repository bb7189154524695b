"""Sibling LoRA layers that read the same input, run as one C++ operator (issue 13: host time per layer).

A decoder layer calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` on one tensor, and ``gate_proj(h)``,
``up_proj(h)`` on another. Run one by one, each pays its own module call, autograd node and launches, its shrink
reads x again, and autograd adds the members' input gradients pairwise. ``fastpeft_ops::lora_group_linear``
(csrc/adapter_ops.cpp, adapter_cuda.cu) does the members in one call: one shrink over x, one dA GEMM, their dX
summed by cuBLAS, about half the launches.

How a group runs, without changing the model's code: ``link_projection_groups`` (called by ``patch``) gives the
sibling layers of one parent whose names form a known set (``GROUP_NAMES``) a shared ``ProjectionGroup``. The
group watches the members' eager calls; once one forward has shown every member called, one after the other, with
the very same tensor, it is *confirmed* from the next forward on. From then on the first member called with a tensor
computes every member's output in one operator call and keeps the others' outputs for them; each of them, called next with that same tensor
(same object, not modified in place since), takes its output. Anything else -- another tensor, a member called
twice, a member that never comes -- drops what was kept, unconfirms the group, and every call runs on its own
again (the same numbers: the members' results do not depend on how they are called, up to the order in which
their input gradients are added).

Why "from the next forward on": a checkpointed layer is run again inside the backward, and torch's checkpoint
requires the recompute to save exactly what the forward saved. A group that became confirmed during a forward must
not run grouped in that forward's recompute, so a confirmation takes effect only at a call made outside any
backward pass; every other decision depends only on the calls themselves, which the recompute repeats.

A group runs only where its members' own hot path would run a C++ operator with the same settings for all of
them: one active adapter of one rank and scaling, no dropout in effect, an ``nn.Linear`` base that is frozen on
every member or a 4-bit base on every member (where every member's own call would take the C++ 4-bit operator, in
one compute dtype), biases on all members or none, no forward-pre or backward hooks on any member (accelerate's
offload hooks load weights in a pre-hook), more than ``MIN_ROWS`` rows (decode runs the single-layer kernels), not
under torch.compile, not on inference tensors (``torch.inference_mode``: they have no version counter to show an
in-place change). ``FASTPEFT_GROUP_PROJECTIONS=0`` (``settings.group_projections``) turns grouping off at patch time.
The operators, by method and base:

    plain LoRA, dense   lora_group_linear: one shrink over x, one dA GEMM, dX accumulated by cuBLAS (CUDA, 16 bits)
    QLoRA (4-bit)       nf4_lora_group_linear: every W dequantized in the call, then lora_group_linear's composition
                        (the members' dense weights alive together for its GEMMs: gate + up at 8B, 2 x 117 MB)
    DoRA / QDoRA        dora_group_linear / nf4_dora_group_linear, in training only (out of training the members
                        keep their cached-norm paths): each member's own kernels, in one call and one autograd node

>>> import torch, torch.nn as nn, fastpeft
>>> class Attn(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
...     def forward(self, x):
...         return self.q_proj(x).sum() + self.k_proj(x).sum() + self.v_proj(x).sum()
>>> attn = fastpeft.patch(Attn(), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
>>> attn.q_proj._projection_group is attn.k_proj._projection_group
True
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from .. import settings
from ..ops import cpp_ops, graph_capturing
from . import bases
from .lora import LoraLinear
from .variants import DORA, PLAIN_LORA, nf4_cpp_plan

__all__ = ["ProjectionGroup", "link_projection_groups", "GROUP_NAMES", "MIN_ROWS"]

# Child-name sets whose members read one input in the families fastpeft supports: attention's q / k / v (Llama,
# Mistral, Qwen2, Gemma, ...) and the gated MLP's gate / up. A subset of two or more of a set that is present and
# adapted forms a group; whether the model really calls them on one tensor is watched at run time, not assumed.
GROUP_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

# Rows (tokens) from which a group runs as one operator: at or below, the single-layer operator takes its fused
# and decode kernels (csrc/adapter_cuda.cu: kFusedMaxM), which the grouped composition does not have.
MIN_ROWS = 65

_ATTR = "_projection_group"


class ProjectionGroup:
    """Sibling ``LoraLinear`` layers that may run as one grouped operator call (module docstring)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members: List[nn.Module] = list(members)
        self.confirmed = False
        self._pending = False  # watched a full round; confirmed at the next call outside a backward pass
        self._seen: List[nn.Module] = []  # members called with the tensor being watched, in call order
        self._seen_x: Optional[weakref.ref] = None
        self._kept: Dict[nn.Module, torch.Tensor] = {}  # outputs computed for members still to be called
        self._kept_x: Optional[weakref.ref] = None
        self._kept_version = -1

    # Copies and pickles (copy.deepcopy(model), torch.save(model)) keep the members and start unconfirmed: what is
    # watched or kept refers to this process's tensors (weak references cannot be pickled).
    def __getstate__(self) -> dict:
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def reset(self) -> None:
        """Forget what was watched or kept; unconfirmed."""
        self.confirmed = self._pending = False
        self._seen, self._seen_x = [], None
        self._kept, self._kept_x = {}, None

    def forward_member(self, layer: nn.Module, x: torch.Tensor, name: str) -> Optional[torch.Tensor]:
        """``layer``'s output for ``x`` from the group (kept from the call that computed the group, or computed
        now for every member), or None: the caller runs ``layer`` on its own. Called from ``LoraLinear``'s hot path
        (which checked backend, device, adapters on and unmerged, no mixed batch, not compiling)."""
        if x.is_inference():  # no version counter: an in-place change between the members' calls would go unseen
            return None
        if not any(m is layer for m in self.members):
            return None  # a shallow copy sharing the group (nn.DataParallel's replicas): never touch its state

        if self._kept:
            y = self._kept.pop(layer, None)
            if y is not None and self._kept_x is not None and self._kept_x() is x and x._version == self._kept_version:
                return y
            self.reset()  # a member called out of turn, on another tensor, or x changed in place: watch again
            return None
        if not self.confirmed:
            if not (self._pending and torch._C._current_graph_task_id() == -1):
                self._watch(layer, x)
                return None
            self.confirmed, self._pending = True, False
        if x.dim() < 2 or x.numel() < MIN_ROWS * x.shape[-1]:
            self.reset()
            return None
        ready = self._ready(name, x)
        if ready is None:
            self.reset()
            return None
        ys = self._run(ready, x, name, layer.scaling[name])
        members = self.members
        self._kept = {m: y for m, y in zip(members, ys) if m is not layer}
        self._kept_x, self._kept_version = weakref.ref(x), x._version
        return ys[members.index(layer)]

    def _run(self, ready, x: torch.Tensor, name: str, scaling: float) -> List[torch.Tensor]:
        """Every member's output for ``x`` from one grouped operator (``ready``: ``_ready``'s answer)."""
        variant, plans = ready
        members = self.members
        modules = [m._modules for m in members]
        biases = [bases.base_bias(d["base_layer"]) for d in modules]
        if any(b is None for b in biases):
            biases = []
        lora_A = [d["lora_A"]._modules[name]._parameters["weight"] for d in modules]
        lora_B = [d["lora_B"]._modules[name]._parameters["weight"] for d in modules]
        magnitudes = None
        if variant is DORA:
            magnitudes = [d["lora_magnitude_vector"]._modules[name]._parameters["weight"] for d in modules]
            for m in members:  # as the members' own training calls do (DoraVariant._cached_scale): no cached norm
                m._dora_norms.pop(name, None)
        if plans is None:  # frozen nn.Linear bases
            weights = [d["base_layer"]._parameters["weight"] for d in modules]
            if magnitudes is None:
                return cpp_ops.lora_group_linear(x, weights, biases, lora_A, lora_B, scaling)
            w_sqs = [DORA._weight_sq_norm(m, w, lambda w=w: w) for m, w in zip(members, weights)]
            return cpp_ops.dora_group_linear(x, weights, biases, lora_A, lora_B, magnitudes, scaling,
                                             _all_or_none(w_sqs))
        # 4-bit bases: each member's (packed, KernelState, compute dtype) from its layer's plan cache, x in that dtype
        cd = plans[0][2]
        xc = x if x.dtype == cd else x.to(cd)
        weights = [(p[0], p[1]) for p in plans]
        if magnitudes is None:
            ys = cpp_ops.nf4_lora_group_linear(xc, weights, biases, lora_A, lora_B, scaling)
        else:
            w_sqs = [DORA._weight_sq_norm(m, d["base_layer"].weight,
                                          lambda p=p: cpp_ops.nf4_dequantize(p[0], p[1], cd), (cd, id(p[1])))
                     for m, d, p in zip(members, modules, plans)]
            ys = cpp_ops.nf4_dora_group_linear(xc, weights, biases, lora_A, lora_B, magnitudes, scaling,
                                               _all_or_none(w_sqs))
        return ys if cd == x.dtype else [y.to(x.dtype) for y in ys]

    def _watch(self, layer: nn.Module, x: torch.Tensor) -> None:
        same = self._seen_x is not None and self._seen_x() is x and layer not in self._seen
        if not same:
            self._seen, self._seen_x = [], weakref.ref(x)
        self._seen.append(layer)
        if len(self._seen) == len(self.members):
            self._pending = True
            self._seen, self._seen_x = [], None

    def _ready(self, name: str, x: torch.Tensor):
        """How the group runs adapter ``name`` on ``x``: (variant, plans), or None where some member would not run
        the C++ operator of the group's kind with the same settings as the others. The variant is plain LoRA, or
        DoRA in training (out of training its members keep their cached-norm paths); the bases are frozen
        ``nn.Linear`` on every member (plans None) or 4-bit on every member, with the members' C++ plans
        (``variants.nf4_cpp_plan``: none refused, one compute dtype, one quantization-state dtype)."""
        first = self.members[0]
        if _module._global_forward_pre_hooks or _module._global_backward_hooks:
            return None
        variant = first.lora_variant.get(name)
        if variant is DORA:
            if not (first.training or torch.is_grad_enabled()) or graph_capturing():
                return None
        elif variant is not PLAIN_LORA:
            return None
        rank, scaling, has_bias = first.r.get(name), first.scaling.get(name), None
        quantized = bases.is_linear4bit(first._modules["base_layer"])
        for m in self.members:
            state = m.__dict__
            if (state.get(_ATTR) is not self or state["active_adapter"] != name or m.disable_adapters
                    or m.merged_adapters or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                    or m.lora_variant.get(name) is not variant or m.r.get(name) != rank
                    or m.scaling.get(name) != scaling or state["backend"] != first.__dict__["backend"]
                    or m.training != first.training or m.fan_in_fan_out):
                return None
            if m.training and type(m._modules["lora_dropout"]._modules[name]) is not nn.Identity:
                return None
            base = m._modules["base_layer"]
            if quantized:
                if not bases.is_linear4bit(base):
                    return None
            elif type(base) is not nn.Linear or base._parameters["weight"].requires_grad:
                return None
            bias_here = bases.base_bias(base) is not None
            if has_bias is None:
                has_bias = bias_here
            elif has_bias != bias_here:
                return None
        if not quantized:
            return variant, None
        plans = [nf4_cpp_plan(m, x) for m in self.members]
        if any(p is None for p in plans) or len({(p[2], p[1].state_dtype) for p in plans}) != 1:
            return None
        return variant, plans


def _all_or_none(values: list) -> list:
    """The members' kept ‖W‖² for the grouped DoRA operators: all of them, or none (each then computed in the
    call), never some (the schema takes one per member or an empty list)."""
    return [] if any(v is None for v in values) else values


def link_projection_groups(model: nn.Module) -> int:
    """Give each set of sibling ``LoraLinear`` layers named as in ``GROUP_NAMES`` (two or more adapted, same input
    size) a shared ``ProjectionGroup``; with ``settings.group_projections`` off, remove every group. Returns the
    number of groups. ``patch`` calls this after every change of the model's layers."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
    if not settings.get().group_projections:
        return 0
    count = 0
    for parent in model.modules():
        children = parent._modules
        for names in GROUP_NAMES:
            members = [children[n] for n in names if type(children.get(n)) is LoraLinear]
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = ProjectionGroup(members)
            for m in members:
                m.__dict__[_ATTR] = group
            count += 1
    return count

"""Keep the activations autograd saves in pinned CPU memory between forward and backward:
``enable_activation_offload(model)``.

With gradient checkpointing on, what autograd keeps from a forward pass is the input of every checkpointed
decoder layer (tokens × hidden each: 32 × 4,096 × 4,096 × 2 bytes = 1 GiB for Llama-8B at 4,096 tokens, and
it grows with the sequence) plus a few tensors saved outside the layers. Checkpointing's own recomputation
keeps its internals away from these hooks (its inner saved-tensor hooks take precedence, and reentrant
checkpointing runs its forward without grad), so with checkpointing on, what gets offloaded is what
checkpointing stores. Works with reentrant and non-reentrant checkpointing; random numbers (dropout masks)
are untouched.

How: a ``torch.autograd.graph.saved_tensors_hooks`` pair is active during the model's forward. Pack copies
each CUDA tensor of at least ``min_bytes`` (not a parameter or buffer) into pinned host memory on a side
stream, overlapped with compute; the GPU copy is freed as soon as the forward drops it. In backward, unpack
waits for the tensor it needs and starts bringing back the one saved just before it (the next one backward
will need) on the side stream, so the copy overlaps the current layer's backward.

Cost: host↔device traffic of 2 × the offloaded bytes per step (PCIe / C2C), hidden behind compute when a
layer's backward takes longer than its input's copy; pinned host memory equal to the offloaded bytes.

>>> import torch, fastpeft
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> net = fastpeft.enable_activation_offload(net)
>>> net(torch.randn(4, 8)).sum().backward()  # CPU tensors stay where they are
>>> fastpeft.activation_offload_enabled(net)
True
>>> net = fastpeft.disable_activation_offload(net)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn as nn

__all__ = ["enable_activation_offload", "disable_activation_offload", "activation_offload_enabled"]

STATE_ATTR = "_fastpeft_activation_offload"
_TAG = "fastpeft-offloaded"


class _Offloader:
    """The saved tensors of one forward pass: packed to host memory, brought back in reverse order."""

    def __init__(self, min_bytes: int, skip_ptrs: Set[int], host_copies_of_cpu_tensors: bool = False):
        self.min_bytes = min_bytes
        self.skip_ptrs = skip_ptrs
        self.cpu_too = host_copies_of_cpu_tensors  # tests: exercise the bookkeeping on CPU tensors
        self.entries: Dict[int, Dict[str, Any]] = {}
        self.next_key = 0
        self.stream: Optional[torch.cuda.Stream] = None
        self.offloaded_bytes = 0

    def _wanted(self, t: torch.Tensor) -> bool:
        if not (t.is_cuda or self.cpu_too) or isinstance(t, nn.Parameter) or t.layout != torch.strided:
            return False
        if t.numel() * t.element_size() < self.min_bytes or not t.is_contiguous():
            return False
        return t.data_ptr() not in self.skip_ptrs

    def pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        key = self.next_key
        self.next_key += 1
        entry: Dict[str, Any] = {"device": t.device, "requires_grad": t.requires_grad}
        if t.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the allocator keeps t's memory until the copy has read it
        else:
            host = t.detach().clone()
        entry["host"] = host
        self.entries[key] = entry
        self.offloaded_bytes += t.numel() * t.element_size()
        return (_TAG, key)

    def _fetch(self, key: int) -> None:
        entry = self.entries[key]
        if "device_copy" in entry:
            return
        host = entry["host"]
        if entry["device"].type == "cuda":
            with torch.cuda.stream(self.stream):
                dev = host.to(entry["device"], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            entry["device_copy"], entry["event"] = dev, event
        else:
            entry["device_copy"], entry["event"] = host, None

    def unpack(self, packed):
        if not (isinstance(packed, tuple) and len(packed) == 2 and packed[0] == _TAG):
            return packed
        key = packed[1]
        self._fetch(key)
        entry = self.entries.pop(key)
        dev = entry["device_copy"]
        if entry["event"] is not None:
            current = torch.cuda.current_stream(dev.device)
            current.wait_event(entry["event"])
            dev.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        earlier = [k for k in self.entries if k < key]
        if earlier:  # backward visits the saved tensors in about the reverse order: bring the next one now
            self._fetch(max(earlier))
        return dev


@dataclasses.dataclass
class _OffloadState:
    min_bytes: int
    handles: List[Any]
    active: List[Any]  # the saved_tensors_hooks context of the forward in progress (a stack: reentrant calls)
    host_copies_of_cpu_tensors: bool = False
    last: Optional[_Offloader] = None


def activation_offload_enabled(model: nn.Module) -> bool:
    """Whether ``enable_activation_offload`` is in effect on ``model``."""
    return STATE_ATTR in model.__dict__


def enable_activation_offload(model: nn.Module, *, min_bytes: int = 1 << 20) -> nn.Module:
    """Offload the tensors autograd saves during ``model``'s forward to pinned CPU memory; returns ``model``.

    Opt-in, for long sequences: combine it with gradient checkpointing (then the checkpointed layer inputs
    are what moves; without checkpointing every saved activation moves, which is correct but slow — a
    warning says so). ``min_bytes``: smaller tensors stay on the GPU. Parameters and buffers never move.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable_activation_offload needs an nn.Module, got {type(model).__name__}")
    if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0:
        raise ValueError(f"min_bytes must be an integer >= 0; got {min_bytes!r}")
    if activation_offload_enabled(model):
        raise ValueError("activation offload is already enabled on this model (disable_activation_offload first)")
    if getattr(model, "is_gradient_checkpointing", True) is False:
        warnings.warn("activation offload without gradient checkpointing moves every saved activation to the CPU "
                      "and back (correct, but PCIe-bound); enable gradient checkpointing first to move only the "
                      "checkpointed layer inputs", stacklevel=2)
    state = _OffloadState(min_bytes=min_bytes, handles=[], active=[])

    def before(module, args, kwargs):
        if not torch.is_grad_enabled():
            state.active.append(None)
            return None
        skip = {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}
        offloader = _Offloader(state.min_bytes, skip, state.host_copies_of_cpu_tensors)
        hooks = torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack)
        hooks.__enter__()
        state.active.append(hooks)
        state.last = offloader
        return None

    def after(module, args, kwargs, output):
        hooks = state.active.pop() if state.active else None
        if hooks is not None:
            hooks.__exit__(None, None, None)
        return None

    state.handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                     model.register_forward_hook(after, with_kwargs=True, always_call=True)]
    model.__dict__[STATE_ATTR] = state
    return model


def disable_activation_offload(model: nn.Module) -> nn.Module:
    """Undo ``enable_activation_offload`` (a backward still pending brings its tensors back as usual)."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        raise ValueError("activation offload is not enabled on this model")
    for handle in state.handles:
        handle.remove()
    return model

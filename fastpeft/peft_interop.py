"""PeftModel methods that must behave on a PeftModel that ``fastpeft.patch(peft_model)`` converted.

* ``save_pretrained``: PEFT finds what to save by visiting its own tuner layers, so on a converted model it
  would write an adapter file without any LoRA / IA3 tensors. It is routed to swap PEFT's layers back in for the
  call; they hold the very same Parameter objects as ours (conversion shares them), so the current values are
  written.
* ``generate(..., adapter_names=...)``: PEFT would hook its own layers for a mixed-adapter batch, find none,
  and generate with the active adapter for every row without a word; it raises instead (as ``forward`` does,
  see patch.py) until fastpeft runs mixed batches.
"""
from __future__ import annotations

import functools

import torch.nn as nn

from .model_state import get_state, set_submodule

__all__ = ["route_peft_methods", "unroute_peft_methods", "refuse_adapter_names"]

_SAVE_HOOK = "save_pretrained"
_GENERATE_HOOK = "generate"


def refuse_adapter_names(kwargs) -> None:
    """Raise when a call asks for a mixed-adapter batch, which fastpeft does not run yet."""
    if kwargs.get("adapter_names") is not None:
        raise NotImplementedError(
            "fastpeft does not run mixed-adapter batches (adapter_names=...) yet: every row would silently get "
            "the active adapter. Run one adapter at a time: fastpeft.set_adapter(model, name), or "
            "`with fastpeft.disable_adapter(model):` for the base model")


def _peft_save_pretrained(model: nn.Module, *args, **kwargs):
    """PeftModel.save_pretrained with PEFT's layers swapped back in for the call (see the module docstring)."""
    method = type(model).save_pretrained
    state = get_state(model, required=False)
    if state is None or not state.from_peft:
        model.__dict__.pop(_SAVE_HOOK, None)
        return method(model, *args, **kwargs)
    ours = {name: model.get_submodule(name) for name in state.originals}
    try:
        for name, original in state.originals.items():
            set_submodule(model, name, original)
        return method(model, *args, **kwargs)
    finally:
        for name, layer in ours.items():
            set_submodule(model, name, layer)


def _peft_generate(model: nn.Module, *args, **kwargs):
    refuse_adapter_names(kwargs)
    return type(model).generate(model, *args, **kwargs)


def route_peft_methods(model: nn.Module) -> None:
    """Route ``save_pretrained`` and ``generate`` of a converted PeftModel (see the module docstring)."""
    for attr, fn in ((_SAVE_HOOK, _peft_save_pretrained), (_GENERATE_HOOK, _peft_generate)):
        if not hasattr(type(model), attr):
            continue
        hook = functools.partial(fn, model)
        hook.fastpeft_hook = True
        model.__dict__[attr] = hook


def unroute_peft_methods(model: nn.Module) -> None:
    for attr in (_SAVE_HOOK, _GENERATE_HOOK):
        if getattr(model.__dict__.get(attr), "fastpeft_hook", False):
            del model.__dict__[attr]

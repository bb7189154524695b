"""Model methods fastpeft routes: those of a PeftModel that ``fastpeft.patch(peft_model)`` converted, and
``generate`` on every patched model (``route_generate``).

* ``save_pretrained``: PEFT finds what to save by visiting its own tuner layers, so on a converted model it
  would write an adapter file without any LoRA / IA3 tensors. It is routed to swap PEFT's layers back in for the
  call; they hold the very same Parameter objects as ours (conversion shares them), so the current values are
  written.
* ``generate(..., adapter_names=...)``: PEFT would hook its own layers for a mixed-adapter batch, find none,
  and generate with the active adapter for every row without a word; the names are taken out of the call and
  set for all of it instead (``mixed_batches.py``), so fastpeft's layers run the mixed batch.
"""
from __future__ import annotations

import torch.nn as nn

from .mixed_batches import mixed_batch_scope
from .model_state import ModelRef, get_state, set_submodule

__all__ = ["route_peft_methods", "route_generate", "unroute_peft_methods"]

_SAVE_HOOK = "save_pretrained"
_GENERATE_HOOK = "generate"


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
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return type(model).generate(model, *args, **kwargs)
    with mixed_batch_scope(get_state(model), names, model.training):
        return type(model).generate(model, *args, **kwargs)


class _RoutedMethod:
    """``model.<attr>`` routed to ``fn(model, ...)``, kept in the model's ``__dict__``; the model held as a
    ``ModelRef`` (no reference cycle; ``torch.save`` of a whole model keeps the routing, bound to the loaded copy)."""

    fastpeft_hook = True

    def __init__(self, fn, model: nn.Module):
        self._fn = fn
        self._model = ModelRef(model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:
            raise ReferenceError(f"fastpeft: {self._fn.__name__} was called on a model that no longer exists")
        return self._fn(model, *args, **kwargs)


def route_generate(model: nn.Module) -> None:
    """Route a patched model's ``generate`` so that ``adapter_names=`` runs a mixed batch (transformers' own generate
    refuses a keyword its forward does not name)."""
    if hasattr(type(model), _GENERATE_HOOK):
        model.__dict__[_GENERATE_HOOK] = _RoutedMethod(_peft_generate, model)


def route_peft_methods(model: nn.Module) -> None:
    """Route ``save_pretrained`` and ``generate`` of a converted PeftModel (see the module docstring)."""
    for attr, fn in ((_SAVE_HOOK, _peft_save_pretrained), (_GENERATE_HOOK, _peft_generate)):
        if hasattr(type(model), attr):
            model.__dict__[attr] = _RoutedMethod(fn, model)


def unroute_peft_methods(model: nn.Module) -> None:
    for attr in (_SAVE_HOOK, _GENERATE_HOOK):
        if getattr(model.__dict__.get(attr), "fastpeft_hook", False):
            del model.__dict__[attr]

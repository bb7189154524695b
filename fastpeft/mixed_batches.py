"""``adapter_names=[...]`` on a patched model: the model-level entry of mixed-adapter batches.

``model(..., adapter_names=names)`` and ``model.generate(..., adapter_names=names)`` (PEFT's API) run row i with
adapter ``names[i]`` (``"__base__"``: the base model). Inference only: a model in training mode raises, as does a
name that is not loaded. The names are checked here, once per call, and set for the call's duration; the
drop-in layers split their inputs by them (``fastpeft/nn/mixed_batch.py``, which also says what it costs).

>>> # model.eval(); out = model(input_ids=ids, adapter_names=["sql", "__base__", "chat"])
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch.nn as nn

from .model_state import PatchState
from .nn import mixed_batch

__all__ = ["check_adapter_names", "mixed_batch_scope", "pre_hook", "post_hook"]


def check_adapter_names(state: PatchState, names: Any, training: bool) -> Sequence[str]:
    """``names`` validated against the model's adapters (a list of str); raises ValueError naming what is wrong."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name per row, got {names!r}")
    allowed = sorted(state.configs) + [mixed_batch.BASE]
    unknown = sorted({n for n in names if not isinstance(n, str) or n not in allowed}, key=str)
    if unknown:
        raise ValueError(f"adapter_names holds {unknown}, which this model does not have; allowed: {allowed}")
    if training:
        raise ValueError("adapter_names= runs inference only (as a mixed batch of adapters): call model.eval() "
                         "first, or train one adapter at a time with fastpeft.set_adapter")
    return list(names)


@contextlib.contextmanager
def mixed_batch_scope(state: PatchState, names: Any, training: bool) -> Iterator[None]:
    """Run the body with ``names`` as the batch's adapters (validated)."""
    token = mixed_batch.set_names(check_adapter_names(state, names, training))
    try:
        yield
    finally:
        mixed_batch.reset(token)


def pre_hook(state: PatchState, module: nn.Module, args, kwargs):
    """Forward pre-hook (with_kwargs): takes ``adapter_names`` out of the call and sets it for its duration.
    Always pushes one entry on state.mixed_tokens (None when the call names no adapters), which ``post_hook``
    (always called, also after an error) pops: nested model calls and failures stay balanced."""
    state.mixed_tokens.append(None)
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    state.mixed_tokens[-1] = mixed_batch.set_names(check_adapter_names(state, names, module.training))
    return args, kwargs


def post_hook(state: PatchState, module: nn.Module, args, kwargs, output):
    token = state.mixed_tokens.pop() if state.mixed_tokens else None
    if token is not None:
        mixed_batch.reset(token)
    return None

"""Mixed-adapter batches: each row of a batch runs its own adapter (PEFT's ``adapter_names=[...]``).

``model(..., adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])`` name one adapter per row, or
``"__base__"`` for the base model. The model-level entry (patch.py) validates the names and sets them for the
duration of the call (a ``ContextVar``: thread- and task-local); every drop-in then splits its input along dim 0
(the batch, as PEFT) into one group per adapter, runs each group through its normal single-adapter path (the
kernels where they apply), and puts the rows back. When the batch has k times as many rows as names (generate's
beams / num_return_sequences expand each row k times in place), name i covers rows i·k … i·k+k-1.

Numbers: each row gets what the model computes with that adapter alone (PEFT's semantics). Cost: LoRA layers
whose adapters are all plain LoRA run one base pass for the whole batch and every row's delta in one pass
(``LoraLinear._forward_mixed``: the C++ operator ``lora_mixed_delta_`` of csrc/, or ``ops/kernels/sgmv.py``; no
loop over adapters) when there is no autograd, no torch.compile trace and a kernel can run on the input's device;
IA3 layers served by the C++ operators likewise (``IA3Linear._forward_mixed``: the rows' vectors scale one base
product); otherwise (and for DoRA layers) one pass per distinct adapter, through ``forward_mixed`` below.
"""
from __future__ import annotations

import contextvars
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["BASE", "current", "eager_current", "set_names", "reset", "row_groups", "adapter_of_rows", "forward_mixed",
           "TransientCache", "registrations", "watch_registrations"]

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names

_NAMES: contextvars.ContextVar[Optional[Tuple[str, ...]]] = contextvars.ContextVar("fastpeft_adapter_names",
                                                                                   default=None)
# The same names as a plain stack for torch.compile: dynamo cannot trace ContextVar.get (a graph break at every
# layer), but it reads a module global and guards on it, so a compiled model recompiles for a new set of names
# and runs the same numbers. (Under compile the names are per process, not per thread.)
_COMPILED_VIEW: list = []


class TransientCache(dict):
    """A layer's per-call caches (mixed batches: device tensors, the C++ adapter set; the 4-bit C++ operators' plan,
    nn/variants.py): a plain dict to read (the hot path's ``.get`` runs at C speed), but copies and pickles of the
    layer start empty, since what it holds points at the original layer's tensors (and the C++ set cannot be
    pickled); a copy rebuilds its own on first use.

    >>> import copy, pickle
    >>> cache = TransientCache(segments=(1, 2))
    >>> copy.deepcopy(cache), pickle.loads(pickle.dumps(cache)), copy.copy(cache)
    ({}, {}, {})
    """

    def __reduce__(self):
        return type(self), ()

    def __deepcopy__(self, memo):
        return type(self)()


# How many modules and Parameters have been registered on the watched modules (a layer, its lora_A / lora_B dicts
# and their adapter modules: a module put in a ModuleDict, a Parameter assigned as a module attribute). The layers'
# mixed-batch plans hold handles to their adapters' weights and rebuild when this moved, instead of checking every
# adapter's module and Parameter objects on each call, a check that grows with the number of adapters (decode runs
# it per layer and token). Only watched modules count: transformers slices its ModuleList of decoder layers in every
# forward, a registration each.
_REGISTRATIONS = [0]
_WATCHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_HOOKS: list = []


def _count_registration(module, _name, _value) -> None:
    # Not while torch.compile traces (transformers' ModuleList slice inside a compiled forward): nothing is
    # registered at run time there, and a traced WeakSet lookup makes Dynamo guard on the set's size, which the
    # garbage collector can change mid-compile (Dynamo then fails with "Guard failed on the same frame it was
    # created": seen once in CI's test_mixed_batch_under_torch_compile).
    if torch.compiler.is_compiling():
        return
    if module in _WATCHED:
        _REGISTRATIONS[0] += 1


def watch_registrations(modules: Iterable[torch.nn.Module]) -> None:
    """Count module and Parameter registrations on ``modules`` from now on (torch's global registration hooks,
    installed once; the modules are held weakly)."""
    if not _HOOKS:
        _HOOKS.append(torch.nn.modules.module.register_module_module_registration_hook(_count_registration))
        _HOOKS.append(torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration))
    _WATCHED.update(modules)


def registrations() -> int:
    """The registration count (see ``watch_registrations``): equal values mean no module or Parameter was put on a
    watched module in between.

    >>> import torch.nn as nn
    >>> layer = nn.Linear(2, 2)
    >>> watch_registrations([layer]); before = registrations()
    >>> layer.weight = nn.Parameter(layer.weight.detach().clone())  # a Parameter replaced
    >>> registrations() > before
    True
    >>> _ = nn.ModuleList([nn.Linear(2, 2)]); registrations() == before + 1  # unwatched modules do not count
    True
    """
    return _REGISTRATIONS[0]


def current() -> Optional[Tuple[str, ...]]:
    """The adapter names of the mixed batch being run, or None."""
    if torch.compiler.is_compiling():
        return _COMPILED_VIEW[-1] if _COMPILED_VIEW else None
    return _NAMES.get()


def eager_current() -> Optional[Tuple[str, ...]]:
    """``current()`` outside a torch.compile trace (the caller has checked): the layers' hot path."""
    return _NAMES.get()


def set_names(names: Sequence[str]) -> contextvars.Token:
    names = tuple(names)
    _COMPILED_VIEW.append(names)
    return _NAMES.set(names)


def reset(token: contextvars.Token) -> None:
    _NAMES.reset(token)
    if _COMPILED_VIEW:
        _COMPILED_VIEW.pop()


def row_groups(names: Sequence[str], n_rows: int) -> Dict[str, List[int]]:
    """{adapter name: its row indices} for a batch of ``n_rows`` rows (a multiple of len(names), see above).

    >>> row_groups(["a", "__base__", "a"], 6)
    {'a': [0, 1, 4, 5], '__base__': [2, 3]}
    """
    k, rest = divmod(n_rows, len(names))
    if rest or k == 0:
        raise ValueError(f"adapter_names has {len(names)} entries but the input has {n_rows} rows (dim 0); give one "
                         "name per row (generate: one per prompt)")
    groups: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).extend(range(i * k, (i + 1) * k))
    return groups


def adapter_of_rows(names: Sequence[str], n_rows: int, order: Sequence[str]) -> List[int]:
    """Each of ``n_rows`` rows' adapter as its index in ``order`` (a layer's adapters), -1 where the row's name is
    "__base__" or not among them: the one-pass kernels' segment index.

    >>> adapter_of_rows(["b", "__base__"], 4, ["a", "b"])
    [1, 1, -1, -1]
    """
    per_name, rest = divmod(n_rows, len(names))
    if rest or per_name == 0:
        row_groups(names, n_rows)  # raises its clear error for this shape
    index = {name: i for i, name in enumerate(order)}
    return [index.get(names[i // per_name], -1) for i in range(n_rows)]


def forward_mixed(x: torch.Tensor, names: Sequence[str], run: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """``run(sub_batch, name)`` for each adapter's rows of ``x`` (dim 0), the results put back in row order."""
    groups = row_groups(names, x.shape[0])
    if len(groups) == 1:
        return run(x, next(iter(groups)))
    out = None
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        y = run(x.index_select(0, index), name)
        if out is None:
            out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
        out.index_copy_(0, index, y)
    return out

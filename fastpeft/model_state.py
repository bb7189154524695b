"""What fastpeft keeps on a patched model, and the small operations every model-level module shares.

``PatchState`` lives in ``model.__dict__`` (never in the state dict). ``Transaction`` is the undo log that makes
``patch`` / ``load_adapter`` atomic. Nothing here swaps modules by itself except through a Transaction or
``set_submodule``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import AdapterConfig, LoraConfig, OFTConfig, VeraConfig, is_prompt_learning
from .nn import (AdaLoraLinear, IA3Linear, LohaLinear, LokrLinear, LoraEmbedding, LoraLinear, ModulesToSave, OftLinear,
                 TrainableTokens, VeraLinear)
from .nn import bases

ADAPTER_TYPES = (LoraLinear, LoraEmbedding, IA3Linear, VeraLinear, LohaLinear, LokrLinear, OftLinear, ModulesToSave,
                 TrainableTokens, AdaLoraLinear)
# the drop-ins that wrap one base layer (everything but ModulesToSave; TrainableTokens, whose base sits one level
# down, stays out: targets.py must not look through it)
WRAPPER_TYPES = (LoraLinear, LoraEmbedding, IA3Linear, VeraLinear, LohaLinear, LokrLinear, OftLinear, AdaLoraLinear)
# configs whose ``bias`` field trains biases: "all", or "<method>_only" (the biases of the layers this method adapts)
BIAS_CONFIG_LAYERS = {LoraConfig: LoraLinear, VeraConfig: VeraLinear, OFTConfig: OftLinear}
STATE_ATTR = "_fastpeft_state"
# Prompt learning (prompt_learning.py): the nn.ModuleDict {adapter name: prompt encoder} patch() registers on the
# model under PEFT's name, so parameter names are PEFT's ("prompt_encoder.default.embedding.weight").
PROMPT_ENCODER_ATTR = "prompt_encoder"


class ParamFlags:
    """Every parameter's ``requires_grad`` as it was before ``patch`` (restored on unpatch), recorded per module and
    parameter name, the module held by weak reference.

    Holding the parameters themselves kept them alive after the model let them go: FSDP2's ``fully_shard`` replaces
    every parameter by a sharded copy, ``delete_adapter`` drops adapter parameters; the originals then stayed in
    memory as long as the model was patched (a 4-bit base under FSDP2: its packed weight a second time). A weak
    reference to a tensor is no way out: ``torch.utils.swap_tensors`` (``.to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion``) refuses tensors that have one. So the record names
    the slot (module, name) and restore sets the flag on whatever parameter fills it then; a module that is gone
    needs no flag restored. Pickles and deep-copies with the model (the live modules travel as themselves and are
    held weakly again on load).

    >>> import pickle, torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> flags = ParamFlags()
    >>> flags.record(layer)
    >>> layer.weight.requires_grad_(False) is not None
    True
    >>> copy = pickle.loads(pickle.dumps({"layer": layer, "flags": flags}))
    >>> copy["flags"].restore(); copy["layer"].weight.requires_grad
    True
    """

    __slots__ = ("_flags",)

    def __init__(self, entries=()) -> None:
        # (id(module), name) -> (weak reference to the module, name, flag)
        self._flags: Dict[Tuple[int, str], Tuple[weakref.ref, str, bool]] = {}
        for module, name, value in entries:
            self._flags[(id(module), name)] = (weakref.ref(module), name, value)

    def record(self, module: nn.Module) -> None:
        """Keep the current flag of each of ``module``'s own parameters that is not recorded yet (an entry of a dead
        module under a reused id is replaced)."""
        for name, param in module._parameters.items():
            if param is None:
                continue
            hit = self._flags.get((id(module), name))
            if hit is None or hit[0]() is not module:
                self._flags[(id(module), name)] = (weakref.ref(module), name, param.requires_grad)

    def live(self) -> List[Tuple[nn.Module, str, bool]]:
        """(module, parameter name, recorded flag) of the recorded modules still alive."""
        entries = [(ref(), name, value) for ref, name, value in self._flags.values()]
        return [(module, name, value) for module, name, value in entries if module is not None]

    def restore(self) -> None:
        for module, name, value in self.live():
            param = module._parameters.get(name)
            if param is not None:
                param.requires_grad_(value)

    def __reduce__(self):
        return (ParamFlags, (self.live(),))


@dataclass
class PatchState:
    """Per-model bookkeeping, kept as a plain attribute (never in the state dict)."""

    peft_type: str
    configs: Dict[str, AdapterConfig] = field(default_factory=dict)
    trainable: Dict[str, bool] = field(default_factory=dict)
    active: str = "default"
    requires_grad: ParamFlags = field(default_factory=ParamFlags)
    originals: Dict[str, nn.Module] = field(default_factory=dict)  # path -> module to put back on unpatch
    # what patch() installed, each undone by its .remove() on unpatch: forward hooks, prompt learning's routing
    hooks: List[Any] = field(default_factory=list)
    mixed_tokens: List[Any] = field(default_factory=list)  # adapter_names= calls in flight (mixed_batches.py)
    # adapter name -> (init_lora_weights, number of base weights it rewrote): PiSSA / OLoRA / LoftQ change the base
    base_rewritten: Dict[str, Tuple[Any, int]] = field(default_factory=dict)
    from_peft: bool = False
    rank_allocator: Any = None  # AdaLoRA: the trainable adapter's RankAllocator (fastpeft/adalora.py)


class ModelRef:
    """A weak reference to a patched model for what ``patch`` installs on it (hooks, routed methods): a strong one
    would be a cycle (model -> its dicts -> hook -> model), so a deleted model (and its GPU memory) would wait for
    Python's cycle collector. ``ref()`` is the model or None. Pickles and deep-copies as the model itself, made
    weak again on load, so ``torch.save`` of a whole model rebinds what holds it to the loaded copy.

    >>> import pickle, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> holder = {"model": model, "ref": ModelRef(model)}  # the ref travels with the model
    >>> loaded = pickle.loads(pickle.dumps(holder))
    >>> loaded["ref"]() is loaded["model"]
    True
    """

    __slots__ = ("_ref",)

    def __init__(self, model: Optional[nn.Module]):
        self._ref = weakref.ref(model) if model is not None else _no_model

    def __call__(self) -> Optional[nn.Module]:
        return self._ref()

    def __reduce__(self):
        return (ModelRef, (self._ref(),))


def _no_model() -> None:
    return None


def get_state(model: nn.Module, required: bool = True) -> Optional[PatchState]:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise ValueError("this model is not patched by fastpeft; call fastpeft.patch(model, config) first")
    return state


def is_peft_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def is_peft_tuner_layer(module: nn.Module) -> bool:
    return any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__) or type(module).__name__ == (
        "ModulesToSaveWrapper"
    )


def root_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def adapter_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def underlying(module: nn.Module) -> nn.Module:
    """The base layer inside one of our drop-ins, or the module itself."""
    return module.base_layer if isinstance(module, WRAPPER_TYPES) else module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Transaction:
    """Undo log for a patch / load: swapped modules, added adapters and changed requires_grad flags."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swaps: List[Tuple[str, nn.Module]] = []
        self.added: List[Tuple[nn.Module, str]] = []
        self.flags: List[Tuple[torch.nn.Parameter, bool]] = []
        self.data: List[Tuple[torch.nn.Parameter, torch.Tensor]] = []  # base weights an init (PiSSA, ...) replaced
        self.undo: List[Any] = []  # other undo steps (callables), run last-in first-out

    def keep_data(self, param: torch.nn.Parameter) -> None:
        """Remember ``param``'s tensor before its ``.data`` is replaced by a new one (never written in place), so a
        rollback gives back the very same tensor. Until the transaction ends both tensors are alive."""
        self.data.append((param, param.data))

    def swap(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        if old is new:
            return
        set_submodule(self.model, name, new)
        self.swaps.append((name, old))

    def set_requires_grad(self, param: torch.nn.Parameter, value: bool) -> None:
        self.flags.append((param, param.requires_grad))
        param.requires_grad_(value)

    def rollback(self) -> None:
        for param, value in reversed(self.flags):
            param.requires_grad_(value)
        for layer, adapter_name in reversed(self.added):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        for name, old in reversed(self.swaps):
            set_submodule(self.model, name, old)
        for param, data in reversed(self.data):
            param.data = data
        for step in reversed(self.undo):
            step()


def record_requires_grad(state: PatchState, model: nn.Module) -> None:
    for module in model.modules():
        state.requires_grad.record(module)


def apply_trainable(model: nn.Module, state: PatchState, txn: Optional[Transaction] = None) -> None:
    """Only the active adapter (and the biases its config asks for) trains; everything else is frozen."""
    set_flag = txn.set_requires_grad if txn is not None else (lambda p, v: p.requires_grad_(v))
    cfg = state.configs[state.active]
    train = state.trainable[state.active]
    keep = set()
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names:
            for param in layer.adapter_parameters(name):
                if name == state.active and train:
                    keep.add(id(param))
    if train and is_prompt_learning(cfg):
        keep.update(id(p) for p in getattr(model, PROMPT_ENCODER_ATTR)[state.active].parameters())
    if train and isinstance(cfg, tuple(BIAS_CONFIG_LAYERS)) and cfg.bias != "none":
        own_type = BIAS_CONFIG_LAYERS[type(cfg)]  # bias="lora_only" / "vera_only" / "oft_only"
        if cfg.bias == "all":
            # modules_to_save wrappers decide for themselves: original frozen, only the active copy trains
            wrapped = {id(p) for _, m in adapter_layers(model) if isinstance(m, ModulesToSave) for p in m.parameters()}
            keep.update(id(p) for n, p in model.named_parameters() if n.endswith("bias") and id(p) not in wrapped)
        else:
            for _, layer in adapter_layers(model):
                if isinstance(layer, own_type) and state.active in layer.adapter_names:
                    bias = bases.base_bias(layer.base_layer)
                    if bias is not None:
                        keep.add(id(bias))
    for param in model.parameters():
        want = id(param) in keep
        if param.requires_grad != want:
            set_flag(param, want)


def set_active(model: nn.Module, adapter_name: str) -> None:
    for _, layer in adapter_layers(model):
        layer.active_adapter = adapter_name

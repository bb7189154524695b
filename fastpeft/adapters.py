"""Managing the adapters of a patched model: add, switch, delete, disable, merge, count."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Tuple

import torch
import torch.nn as nn

from .config import is_prompt_learning
from .model_state import adapter_layers, apply_trainable, get_state, root_model, set_active, set_submodule
from .nn import AdapterLayer, ModulesToSave, TrainableTokens
from .nn import bases
from .patch import finish, patch, warn_base_rewritten
from . import prompt_learning


def add_adapter(model: nn.Module, adapter_name: str, config: Any) -> nn.Module:
    """Add another adapter (inactive; switch with set_adapter). Same method as the model's other adapters.

    >>> # fastpeft.add_adapter(model, "b", fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    """
    get_state(model)
    return patch(model, config, adapter_name=adapter_name)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter; only it trains (unless loaded with is_trainable=False)."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}")
    if any(m.merged_adapters for _, m in adapter_layers(model)):
        raise ValueError("unmerge the merged adapter before switching adapters (fastpeft.unmerge(model))")
    state.active = adapter_name
    set_active(model, adapter_name)
    apply_trainable(model, state)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter. Layers left with no adapter go back to their original module.

    Deleting the active adapter activates the first remaining one; the last adapter cannot be deleted
    (use fastpeft.unpatch).
    """
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}")
    if len(state.configs) == 1:
        raise ValueError(f"{adapter_name!r} is the only adapter; use fastpeft.unpatch(model) to remove it")
    if any(adapter_name in m.merged_adapters for _, m in adapter_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it first")
    if adapter_name in state.base_rewritten:
        warn_base_rewritten(state, [adapter_name])
        del state.base_rewritten[adapter_name]
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                original = state.originals.pop(name)
                set_submodule(model, name, original)
    del state.configs[adapter_name]
    del state.trainable[adapter_name]
    if state.rank_allocator is not None and state.rank_allocator.adapter_name == adapter_name:
        state.rank_allocator = None  # AdaLoRA: the deleted adapter was the one being allocated
    if state.active == adapter_name:
        state.active = next(iter(state.configs))
    set_active(model, state.active)
    apply_trainable(model, state)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes its base outputs.

    >>> # with fastpeft.disable_adapter(model): base_logits = model(ids).logits
    """
    if is_prompt_learning(get_state(model).peft_type):
        with prompt_learning.disabled(model):  # forward / generate are the base model's
            yield
        return
    layers = [m for _, m in adapter_layers(model)]
    if any(m.merged_adapters for m in layers):
        raise ValueError("adapters are merged into the weights; fastpeft.unmerge(model) before disable_adapter")
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m.disable_adapters = flag


def _refuse_prompt_learning(model: nn.Module, what: str) -> None:
    state = get_state(model)
    if is_prompt_learning(state.peft_type):
        raise ValueError(f"{what}: a {state.peft_type} adapter changes the model's inputs, not its weights, so there "
                         "is nothing to merge (use fastpeft.unpatch(model) to remove it)")


def merge(model: nn.Module) -> None:
    """Add the active adapter into the base weights (dense bases; 4-bit: use merge_and_unload)."""
    _refuse_prompt_learning(model, "merge")
    layers = [m for _, m in adapter_layers(model) if isinstance(m, (AdapterLayer, TrainableTokens))]
    bad = [m for m in layers if isinstance(m, AdapterLayer) and bases.is_linear4bit(m.base_layer)]
    if bad:
        bad[0].merge()  # raises the explanatory NotImplementedError before anything changes
    for m in layers:
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Subtract merged adapters again (restores the base weights up to floating-point rounding)."""
    _refuse_prompt_learning(model, "unmerge")
    for _, m in adapter_layers(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return the plain transformers model (no fastpeft modules left).

    Dense bases are merged in place (same module types); 4-bit bases are dequantized (fastpeft's kernel, on the
    weight's device) and merged into an nn.Linear of the weight's original dtype (the QuantState's dtype).
    modules_to_save keep the trained copy.
    """
    _refuse_prompt_learning(model, "merge_and_unload")
    state = get_state(model)
    for name, layer in adapter_layers(model):
        if isinstance(layer, ModulesToSave):
            active = layer.modules_to_save[layer.active_adapter] if layer.active_adapter in layer.adapter_names else None
            replacement = active if active is not None else layer.original_module
        elif bases.is_linear4bit(layer.base_layer):
            # fastpeft's dequant (Triton on the weight's GPU, bit-exact with bnb), merged in fp32, stored in the
            # dtype the weight had before quantization (bf16 for a bf16 model, whatever the compute dtype)
            quant_state = bases.quant_state_of(layer.base_layer)
            dtype = quant_state.dtype or getattr(layer.base_layer, "compute_dtype", None) or torch.float32
            replacement = layer.merged_dense(dtype)
        else:
            layer.merge()
            replacement = layer.base_layer
            layer.merged_adapters = []
        set_submodule(model, name, replacement)
    finish(model, state)
    return root_model(model)


def get_nb_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, all) parameter counts, counting packed 4-bit weights as PEFT does (2 values per byte)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's format)."""
    trainable, total = get_nb_trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")


def active_adapter(model: nn.Module) -> str:
    return get_state(model).active

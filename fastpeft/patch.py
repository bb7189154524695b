"""Swap fastpeft's drop-ins into a model — atomically — and swap them back; convert a PeftModel in place.

``patch`` builds every new module before touching the model, then swaps; any failure midway puts back
every module it swapped and every ``requires_grad`` flag it changed, so the model is exactly as before.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .config import (AdaLoraConfig, AdapterConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, TrainableTokensConfig, VeraConfig,
                     is_prompt_learning,
                     to_fastpeft_config)
from .model_state import (
    ADAPTER_TYPES,
    STATE_ATTR,
    WRAPPER_TYPES,
    ModelRef,
    PatchState,
    Transaction,
    adapter_layers,
    apply_trainable,
    get_state,
    is_peft_model,
    is_peft_tuner_layer,
    record_requires_grad,
    root_model,
    set_submodule,
    underlying,
)
from .nn import (AdaLoraLinear, IA3Linear, LohaLinear, LokrLinear, LoraEmbedding, LoraLinear, ModulesToSave, OftLinear, VeraLinear,
                 VeraProjections)
from .nn.projection_groups import link_projection_groups
from .nn.vera import vera_projections
from .nn import bases
from .nn.variants import DORA, PLAIN_LORA
from . import adalora, mixed_batches, prompt_learning
from .peft_interop import route_generate, route_peft_methods, unroute_peft_methods
from .targets import find_modules_to_save, find_targets
from .token_targets import add_trainable_tokens, convert_peft_token_wrappers

__all__ = ["patch", "patch_checked", "unpatch", "finish", "warn_base_rewritten"]


# -- building the drop-ins -------------------------------------------------------------------------------
def _new_layer(name: str, module: nn.Module, cfg: AdapterConfig, adapter_name: str, txn: Transaction,
               tables=None) -> nn.Module:
    if isinstance(cfg, LoraConfig):
        if bases.is_conv1d(underlying(module)) and not cfg.fan_in_fan_out:
            cfg.fan_in_fan_out = True  # PEFT does the same for Conv1D (GPT-2 stores weights as [in, out])
        args = (cfg.rank_for(name), cfg.alpha_for(name), float(cfg.lora_dropout), cfg.init_lora_weights, cfg.use_rslora,
                cfg.use_dora)
        # PiSSA / OLoRA / LoftQ replace the base weight's tensor; the transaction keeps the old one for a rollback
        extra = dict(loftq_config=cfg.loftq_config, keep_base=txn.keep_data)
        if isinstance(module, (LoraLinear, LoraEmbedding)):
            module.update_layer(adapter_name, *args, **extra)
            return module
        if bases.is_embedding(module):
            return LoraEmbedding(module, adapter_name, *args, **extra)
        return LoraLinear(module, adapter_name, *args, **extra)
    if isinstance(cfg, LoKrConfig):
        args = (cfg.rank_for(name), cfg.alpha_for(name), float(cfg.rank_dropout), float(cfg.module_dropout),
                cfg.init_weights, cfg.decompose_both, cfg.decompose_factor, cfg.rank_dropout_scale)
        if isinstance(module, LokrLinear):
            module.update_layer(adapter_name, *args)
            return module
        return LokrLinear(module, adapter_name, *args)
    if isinstance(cfg, LoHaConfig):
        args = (cfg.rank_for(name), cfg.alpha_for(name), float(cfg.rank_dropout), float(cfg.module_dropout),
                cfg.init_weights)
        if isinstance(module, LohaLinear):
            module.update_layer(adapter_name, *args)
            return module
        return LohaLinear(module, adapter_name, *args)
    if isinstance(cfg, OFTConfig):
        args = (cfg.r, cfg.oft_block_size, float(cfg.module_dropout), cfg.coft, float(cfg.eps), cfg.block_share,
                cfg.init_weights, cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms)
        if isinstance(module, OftLinear):
            module.update_layer(adapter_name, *args)
            return module
        return OftLinear(module, adapter_name, *args)
    if isinstance(cfg, AdaLoraConfig):
        cfg.fan_in_fan_out = bases.is_conv1d(underlying(module))  # PEFT sets it per target type, with a warning
        args = (cfg.init_r, cfg.lora_alpha, float(cfg.lora_dropout), cfg.init_lora_weights)
        if isinstance(module, AdaLoraLinear):
            module.update_layer(adapter_name, *args)
            return module
        return AdaLoraLinear(module, adapter_name, *args)
    if isinstance(cfg, VeraConfig):
        vera_A, vera_B = tables
        cfg.fan_in_fan_out = bases.is_conv1d(underlying(module))  # PEFT sets it per target type, with a warning
        args = (cfg.r, float(cfg.vera_dropout), float(cfg.d_initial), cfg.init_weights)
        if isinstance(module, VeraLinear):
            module.update_layer(adapter_name, *args)
            return module
        return VeraLinear(module, adapter_name, vera_A, vera_B, *args)
    ff = cfg.feedforward_modules or []
    is_ff = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(name.endswith(t) for t in ff)
    if isinstance(module, IA3Linear):
        if module.is_feedforward != is_ff:
            raise ValueError(f"{name}: adapters on one layer must agree on feedforward scaling")
        module.update_layer(adapter_name, cfg.init_ia3_weights)
        return module
    return IA3Linear(module, adapter_name, is_ff, cfg.init_ia3_weights)


def _add_adapter(model: nn.Module, cfg: AdapterConfig, adapter_name: str, state: PatchState, txn: Transaction):
    if isinstance(cfg, TrainableTokensConfig):  # PEFT's standalone trainable tokens: no LoRA / IA3 layers
        add_trainable_tokens(model, cfg, adapter_name, state, txn)
        return
    targets = find_targets(model, cfg)
    to_save = find_modules_to_save(model, cfg)
    if isinstance(cfg, LoraConfig):
        has_linear = any(isinstance(underlying(m), nn.Linear) for _, m in targets)
        if cfg.fan_in_fan_out and has_linear and not any(bases.is_conv1d(underlying(m)) for _, m in targets):
            cfg.fan_in_fan_out = False  # PEFT resets it for nn.Linear targets as well
    if isinstance(cfg, OFTConfig) and cfg.fan_in_fan_out and targets:
        # PEFT: OFT adapts nn.Linear only, so it resets the flag with this warning (Conv1D targets are refused)
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                      "fan_in_fan_out to False.")
        cfg.fan_in_fan_out = False
    if isinstance(cfg, OFTConfig) and cfg.module_dropout:
        warnings.warn(f"OFTConfig.module_dropout={cfg.module_dropout} has no effect: PEFT (0.21) builds OFT's "
                      "multiplicative dropout but never applies it, and fastpeft computes PEFT's numbers; the value is "
                      "kept and saved", stacklevel=3)
    tables = _vera_tables(model, cfg, adapter_name, targets, state, txn) if isinstance(cfg, VeraConfig) else None
    own_types = {LoraConfig: (LoraLinear, LoraEmbedding), IA3Config: IA3Linear, VeraConfig: VeraLinear,
                 LoHaConfig: LohaLinear, LoKrConfig: LokrLinear, OFTConfig: OftLinear,
                 AdaLoraConfig: AdaLoraLinear}[type(cfg)]
    built = []
    for name, module in targets:
        existing = isinstance(module, WRAPPER_TYPES)
        if existing and not isinstance(module, own_types):
            raise ValueError(f"{name} already holds a {type(module).__name__}; one adapter method per model")
        new = _new_layer(name, module, cfg, adapter_name, txn, tables)
        if existing:
            txn.added.append((new, adapter_name))
        built.append((name, new))
    for name, module in to_save:
        if isinstance(module, ModulesToSave):
            module.update_layer(adapter_name)
            txn.added.append((module, adapter_name))
            built.append((name, module))
        else:
            built.append((name, ModulesToSave(module, adapter_name)))
    for name, new in built:
        txn.swap(name, new)
        if name not in state.originals:
            state.originals[name] = underlying(new) if not isinstance(new, ModulesToSave) else new.original_module
    for _, layer in built:
        layer.active_adapter = state.active if state.configs else adapter_name
    add_trainable_tokens(model, cfg, adapter_name, state, txn)  # after LoRA's: it refuses LoRA-adapted layers


def _vera_tables(model: nn.Module, cfg: VeraConfig, adapter_name: str, targets, state: PatchState, txn: Transaction):
    """The model's shared VeRA projection tables (made on first use), with this adapter's projections drawn as
    PEFT draws them: sized by the largest in / out features among its targets, from projection_prng_key."""
    for other in state.configs.values():
        if isinstance(other, VeraConfig) and other.projection_prng_key != cfg.projection_prng_key:
            raise ValueError(f"VeRA adapters of one model must share projection_prng_key (PEFT's rule): this model's "
                             f"adapters use {other.projection_prng_key}, got {cfg.projection_prng_key}")
        if isinstance(other, VeraConfig) and other.save_projection != cfg.save_projection:
            raise ValueError("VeRA adapters of one model must agree on save_projection (PEFT's rule)")
    existing = next((m for _, m in model.named_modules() if isinstance(m, VeraLinear)), None)
    vera_A, vera_B = (existing.vera_A, existing.vera_B) if existing is not None else (VeraProjections(), VeraProjections())
    features = [bases.base_features(underlying(m)) for _, m in targets]
    max_in, max_out = max(f[0] for f in features), max(f[1] for f in features)
    proj_A, proj_B = vera_projections(cfg.r, max_in, max_out, cfg.projection_prng_key)
    device = next((underlying(m).weight.device for _, m in targets), None)
    vera_A.set(adapter_name, proj_A.to(device))
    vera_B.set(adapter_name, proj_B.to(device))
    txn.undo.append(lambda: (vera_A.remove(adapter_name), vera_B.remove(adapter_name)))
    return vera_A, vera_B


# -- hooks patch() installs ---------------------------------------------------------------------------------
def _checkpointing(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _install_input_grad_hook(model: nn.Module, state: PatchState) -> None:
    """Reentrant activation checkpointing needs inputs that require grad, or adapter grads vanish silently.

    The hook turns that on only while the model checkpoints and autograd records, so a later
    ``gradient_checkpointing_enable()`` works too and plain training pays nothing.
    """
    root = root_model(model)
    get_in = getattr(root, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    if embeddings is None:
        return
    state.hooks.append(embeddings.register_forward_hook(_InputGradHook(root)))


class _InputGradHook:
    """The forward hook of ``_install_input_grad_hook``: a module-level class holding the model as a ``ModelRef``, so
    ``torch.save`` of a whole patched model can pickle it and a deleted model is freed at once."""

    def __init__(self, root: nn.Module):
        self._root = ModelRef(root)

    def __call__(self, _module, _inputs, output):
        owner = self._root()
        if owner is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        if _checkpointing(owner) and not output.requires_grad:
            return output.requires_grad_(True)
        return None


def _install_adapter_names(model: nn.Module, state: PatchState) -> None:
    """``model(..., adapter_names=[...])``: a mixed-adapter batch (mixed_batches.py). transformers would pass the
    keyword down without a word, so it is taken out of the call before the model's forward sees it."""
    for module in {id(m): m for m in (model, root_model(model))}.values():
        state.hooks.append(module.register_forward_pre_hook(functools.partial(mixed_batches.pre_hook, state),
                                                            with_kwargs=True))
        state.hooks.append(module.register_forward_hook(functools.partial(mixed_batches.post_hook, state),
                                                        with_kwargs=True, always_call=True))


def _remove_hooks(state: PatchState) -> None:
    for handle in state.hooks:
        handle.remove()
    state.hooks.clear()


# -- patch / unpatch -----------------------------------------------------------------------------------------
def patch(model: nn.Module, config: Any = None, adapter_name: str = "default") -> nn.Module:
    """Swap fastpeft LoRA / IA3 drop-ins into ``model`` in place and return it.

    ``config``: a fastpeft or PEFT LoraConfig / IA3Config / VeraConfig / LoHaConfig / LoKrConfig / OFTConfig /
    AdaLoraConfig; or a prompt-learning config (PromptTuningConfig / PrefixTuningConfig / PromptEncoderConfig /
    MultitaskPromptTuningConfig, fastpeft's or PEFT's, task_type="CAUSAL_LM" or "SEQ_2_SEQ_LM"), which routes the
    model's forward / generate as PEFT's PeftModelForCausalLM / PeftModelForSeq2SeqLM does (prompt_learning.py; one
    such adapter per model, not combined with the layer methods); or TrainableTokensConfig (PEFT's standalone
    trainable tokens). With no config and a
    ``peft.PeftModel``, converts its LoRA / IA3 layers in place, keeping PEFT's parameter names.
    Patching an already patched model with a new ``adapter_name`` adds that adapter (inactive).

    >>> import torch.nn as nn, fastpeft
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> net = fastpeft.patch(net, fastpeft.LoraConfig(r=4, target_modules=["0", "2"]))
    >>> type(net[0]).__name__
    'LoraLinear'
    """
    return patch_checked(model, config, adapter_name)


def patch_checked(model: nn.Module, config: Any = None, adapter_name: str = "default",
                  check: Optional[Callable[[], None]] = None) -> nn.Module:
    """``patch``, with ``check()`` run once the adapter is in place but before the patch is final: if it raises,
    everything is undone as for a failed patch (load_adapter checks the file against the new layers this way, so
    a bad file also gives back base weights that PiSSA / OLoRA / LoftQ rewrote)."""
    if config is None:
        if is_peft_model(model):
            return _convert_peft_model(model)
        raise ValueError("patch() needs a config (fastpeft / peft LoraConfig or IA3Config) unless given a PeftModel")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    cfg = to_fastpeft_config(config)
    state = get_state(model, required=False)
    if is_prompt_learning(cfg) or (state is not None and is_prompt_learning(state.peft_type)):
        # prompt tuning / prefix tuning / P-tuning change the inputs, not the layers (prompt_learning.py); it also
        # refuses to mix them with layer adapters (LoRA / IA3 / VeRA / LoHa)
        return prompt_learning.add_prompt_adapter(model, cfg, adapter_name, check=check)
    if state is not None:
        if adapter_name in state.configs:
            raise ValueError(
                f"adapter {adapter_name!r} is already patched into this model; "
                f"use another adapter_name or fastpeft.delete_adapter(model, {adapter_name!r}) first"
            )
        if cfg.peft_type != state.peft_type:
            raise ValueError(f"this model holds {state.peft_type} adapters; cannot add a {cfg.peft_type} adapter")
    elif is_peft_model(model):
        raise ValueError(
            "this is a peft.PeftModel: fastpeft.patch(peft_model) (no config) converts its PEFT adapters in place; "
            "to add another adapter, convert first and then fastpeft.add_adapter(peft_model, name, config); to "
            "start from the plain model, patch peft_model.get_base_model() (after PEFT's unload()) instead")
    elif any(isinstance(m, ADAPTER_TYPES) or is_peft_tuner_layer(m) for _, m in model.named_modules()):
        raise ValueError(
            "this model holds adapter layers that fastpeft does not manage (e.g. PEFT's, with the PeftModel wrapper "
            "gone, or fastpeft's from a model that was copied): pass the PeftModel to fastpeft.patch(peft_model), "
            "or remove them (PEFT's unload() / merge_and_unload())")
    fresh = state is None
    if fresh:
        state = PatchState(peft_type=cfg.peft_type, active=adapter_name)
        record_requires_grad(state, model)
    txn = Transaction(model)
    try:
        _add_adapter(model, cfg, adapter_name, state, txn)
        if txn.data:
            state.base_rewritten[adapter_name] = (cfg.init_lora_weights, len(txn.data))
        state.configs[adapter_name] = cfg
        state.trainable[adapter_name] = not cfg.inference_mode
        record_requires_grad(state, model)  # new adapter parameters: their "original" flag is their own
        if isinstance(cfg, AdaLoraConfig):  # rank allocator, loss regulariser, model.update_and_allocate
            adalora.on_patch(model, cfg, adapter_name, state, txn, fresh)
        if fresh:
            model.__dict__[STATE_ATTR] = state
            apply_trainable(model, state, txn)
            _install_input_grad_hook(model, state)
            _install_adapter_names(model, state)
            route_generate(model)  # generate(..., adapter_names=...): transformers would refuse the keyword
        else:
            apply_trainable(model, state, txn)
        if check is not None:
            check()
    except BaseException:
        txn.rollback()
        state.base_rewritten.pop(adapter_name, None)
        state.configs.pop(adapter_name, None)
        state.trainable.pop(adapter_name, None)
        if fresh:
            model.__dict__.pop(STATE_ATTR, None)
            _remove_hooks(state)
            unroute_peft_methods(model)
        raise
    link_projection_groups(model)  # sibling layers reading one input run as one operator (nn/projection_groups.py)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original modules back (base weights bit-identical) and restore requires_grad flags.

    Raises if adapters are merged: unmerge() first (it restores the weights only up to rounding).

    >>> import torch.nn as nn, fastpeft
    >>> net = fastpeft.patch(nn.Sequential(nn.Linear(4, 4)), fastpeft.LoraConfig(target_modules=["0"]))
    >>> type(fastpeft.unpatch(net)[0]).__name__
    'Linear'
    """
    state = get_state(model)
    if is_prompt_learning(state.peft_type):
        prompt_learning.check_removable(model)  # finish() then removes the encoder and the routed methods
    layers = adapter_layers(model)
    merged = [n for n, m in layers if m.merged_adapters]
    if merged:
        raise ValueError(
            f"{len(merged)} layers have merged adapters (e.g. {merged[0]}); call fastpeft.unmerge(model) first, "
            "or fastpeft.merge_and_unload(model) to keep the merged weights"
        )
    warn_base_rewritten(state, state.base_rewritten)
    for name, original in state.originals.items():
        set_submodule(model, name, original)
    finish(model, state)
    return model


def warn_base_rewritten(state: PatchState, names) -> None:
    """Say that removing these adapters leaves base weights their init rewrote (PEFT's unload does the same)."""
    for name in names:
        init, count = state.base_rewritten[name]
        warnings.warn(
            f"adapter {name!r} was created with init_lora_weights={init!r}, which rewrote {count} base weights; "
            "they stay rewritten without the adapter (as with PEFT's unload / delete_adapter). To keep the original "
            "model, patch a copy, or save the trained adapter with save_adapter(..., "
            "path_initial_model_for_weight_conversion=...) and load it into the untouched base", stacklevel=3)


def finish(model: nn.Module, state: PatchState) -> None:
    """Drop fastpeft's state from a model whose modules are already back in place (unpatch, merge_and_unload)."""
    unroute_peft_methods(model)  # only what fastpeft routed (generate; a converted PeftModel's save_pretrained)
    state.requires_grad.restore()
    _remove_hooks(state)
    model.__dict__.pop(STATE_ATTR, None)


# -- PeftModel conversion ------------------------------------------------------------------------------
def _convert_peft_layer(name: str, layer: nn.Module) -> nn.Module:
    cls = type(layer).__name__
    base = layer.base_layer
    if bases.is_embedding(base) and getattr(layer, "lora_embedding_A", None):
        names = list(layer.lora_embedding_A.keys())
        if any(layer.use_dora.get(n, False) for n in names):
            raise TypeError(f"{name}: PEFT's DoRA on an embedding layer is not supported by fastpeft")
        new = LoraEmbedding(base, names[0], r=1, lora_alpha=1.0)
        new.delete_adapter(names[0])
        for adapter in names:
            new.lora_embedding_A[adapter] = layer.lora_embedding_A[adapter]  # the same parameters
            new.lora_embedding_B[adapter] = layer.lora_embedding_B[adapter]
            new.lora_dropout[adapter] = layer.lora_dropout[adapter]
            new.r[adapter] = layer.r[adapter]
            new.lora_alpha[adapter] = layer.lora_alpha[adapter]
            new.scaling[adapter] = layer.scaling[adapter]
        active = layer.active_adapters
        new.active_adapter = active[0] if active else names[0]
        new.merged_adapters = list(layer.merged_adapters)
        new.disable_adapters = bool(layer.disable_adapters)
        return new
    if not bases.supported_base(base):
        raise TypeError(f"{name}: PEFT layer {cls} wraps {type(base).__name__}; fastpeft adapts {bases.SUPPORTED_BASE_TYPES}")
    if hasattr(layer, "lora_A"):
        names = list(layer.lora_A.keys())
        first = names[0]
        new = LoraLinear(base, first, r=1, lora_alpha=1.0)
        new.delete_adapter(first)
        for adapter in names:
            new.lora_A[adapter] = layer.lora_A[adapter]  # the very same parameters: optimizers stay valid
            new.lora_B[adapter] = layer.lora_B[adapter]
            new.lora_dropout[adapter] = layer.lora_dropout[adapter]
            new.r[adapter] = layer.r[adapter]
            new.lora_alpha[adapter] = layer.lora_alpha[adapter]
            new.scaling[adapter] = layer.scaling[adapter]
            if adapter in layer.lora_magnitude_vector:  # DoRA: PEFT's magnitude module holds it as .weight
                new.lora_magnitude_vector[adapter] = layer.lora_magnitude_vector[adapter]
                new.lora_variant[adapter] = DORA
            else:
                new.lora_variant[adapter] = PLAIN_LORA
    elif hasattr(layer, "ia3_l"):
        names = list(layer.ia3_l.keys())
        new = IA3Linear(base, names[0], is_feedforward=bool(layer.is_feedforward))
        new.delete_adapter(names[0])
        for adapter in names:
            new.ia3_l[adapter] = layer.ia3_l[adapter]
    else:
        raise TypeError(f"{name}: PEFT layer {cls} is not a LoRA or IA3 layer; fastpeft converts only those")
    active = layer.active_adapters
    new.active_adapter = active[0] if active else names[0]
    new.merged_adapters = list(layer.merged_adapters)
    new.disable_adapters = bool(layer.disable_adapters)
    return new


def _convert_peft_model(model: nn.Module) -> nn.Module:
    state = get_state(model, required=False)
    if state is not None:
        raise ValueError("this PeftModel was already converted by fastpeft.patch")
    configs = {name: to_fastpeft_config(cfg) for name, cfg in model.peft_config.items()}
    if any(is_prompt_learning(cfg) for cfg in configs.values()):
        raise NotImplementedError(
            "converting a PeftModel with a prompt-learning adapter in place is not supported; save it "
            "(peft_model.save_pretrained(dir)) and load it into the plain model: fastpeft.load_adapter(model, dir)")
    kinds = {c.peft_type for c in configs.values()}
    if "ADALORA" in kinds:
        raise NotImplementedError(
            "converting a PeftModel with AdaLoRA adapters in place is not supported; save it "
            "(peft_model.save_pretrained(dir)) and load it into the plain model: fastpeft.load_adapter(model, dir)")
    if len(kinds) != 1:
        raise ValueError(f"fastpeft converts PeftModels of one adapter method; found {sorted(kinds)}")
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if is_peft_tuner_layer(m) and type(m).__name__ not in ("ModulesToSaveWrapper", "TrainableTokensLayer")
        and hasattr(m, "base_layer")
    ]
    built = [(n, _convert_peft_layer(n, m)) for n, m in layers]
    for name, wrapper, new in convert_peft_token_wrappers(model, model.active_adapter):  # trainable tokens
        layers.append((name, wrapper))
        built.append((name, new))
    state = PatchState(peft_type=kinds.pop(), configs=configs, active=model.active_adapter, from_peft=True)
    state.trainable = {name: not cfg.inference_mode for name, cfg in configs.items()}
    txn = Transaction(model)
    try:
        for (name, old), (_, new) in zip(layers, built):
            txn.swap(name, new)
            state.originals[name] = old
    except BaseException:
        txn.rollback()
        raise
    record_requires_grad(state, model)
    model.__dict__[STATE_ATTR] = state
    _install_adapter_names(model, state)
    route_peft_methods(model)  # PEFT's save_pretrained only sees PEFT's layers; generate's adapter_names
    link_projection_groups(model)
    return model

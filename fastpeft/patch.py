"""Find target modules and swap in fastpeft's drop-ins — atomically — and swap them back.

``patch`` builds every new module before touching the model, then swaps; any failure midway puts back
every module it swapped and every ``requires_grad`` flag it changed, so the model is exactly as before.
"""
from __future__ import annotations

import difflib
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import (
    IA3_DEFAULT_FEEDFORWARD,
    IA3_DEFAULT_TARGETS,
    LORA_DEFAULT_TARGETS,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    to_fastpeft_config,
)
from .nn import IA3Linear, LoraLinear, ModulesToSave
from .nn import base as B

ADAPTER_TYPES = (LoraLinear, IA3Linear, ModulesToSave)
STATE_ATTR = "_fastpeft_state"


@dataclass
class PatchState:
    """Per-model bookkeeping, kept as a plain attribute (never in the state dict)."""

    peft_type: str
    configs: Dict[str, AdapterConfig] = field(default_factory=dict)
    trainable: Dict[str, bool] = field(default_factory=dict)
    active: str = "default"
    requires_grad: Dict[int, Tuple[torch.nn.Parameter, bool]] = field(default_factory=dict)
    originals: Dict[str, nn.Module] = field(default_factory=dict)  # path -> module to put back on unpatch
    hook: Any = None
    from_peft: bool = False


def get_state(model: nn.Module, required: bool = True) -> Optional[PatchState]:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise ValueError("this model is not patched by fastpeft; call fastpeft.patch(model, config) first")
    return state


def is_peft_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def root_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def adapter_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


# -- target matching (PEFT's rules) ---------------------------------------------------------------------
def _candidate_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Named modules, with our adapter layers as leaves (their insides are never targets)."""
    out, skip = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip):
            continue
        out.append((name, module))
        if isinstance(module, ADAPTER_TYPES) or _is_peft_tuner_layer(module):
            skip.append(name)
    return out


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    return any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__) or type(module).__name__ == (
        "ModulesToSaveWrapper"
    )


def _underlying(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, (LoraLinear, IA3Linear)) else module


def _matches_list(key: str, names) -> bool:
    return any(key == t or key.endswith("." + t) for t in names)


def _layer_index_ok(cfg: AdapterConfig, key: str) -> bool:
    indexes = getattr(cfg, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and len(indexes) == 0):
        return True
    patterns = getattr(cfg, "layers_pattern", None)
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _is_target(cfg: AdapterConfig, key: str, targets) -> bool:
    excl = cfg.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif _matches_list(key, excl):
            return False
    if cfg.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return _matches_list(key, targets) and _layer_index_ok(cfg, key)


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(root_model(model), "config", None), "model_type", None)


def _resolve_targets(model: nn.Module, cfg: AdapterConfig, candidates) -> Any:
    targets = cfg.target_modules
    if targets is None:
        model_type = _model_type(model)
        table = LORA_DEFAULT_TARGETS if isinstance(cfg, LoraConfig) else IA3_DEFAULT_TARGETS
        if model_type not in table:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if B.supported_base(_underlying(m))})
            raise ValueError(
                f"target_modules=None and fastpeft has no default targets for model_type={model_type!r}; "
                f"pass target_modules, e.g. a list from: {names}"
            )
        targets = list(table[model_type])
        cfg.target_modules = list(targets)
        if isinstance(cfg, IA3Config) and cfg.feedforward_modules is None:
            cfg.feedforward_modules = list(IA3_DEFAULT_FEEDFORWARD.get(model_type, []))
    if isinstance(targets, str) and targets.lower() == "all-linear":
        excluded = set()
        root = root_model(model)
        get_out = getattr(root, "get_output_embeddings", None)
        out_emb = get_out() if callable(get_out) else None
        linear = []
        for name, module in candidates:
            if B.supported_base(_underlying(module)):
                inner = _underlying(module)
                if out_emb is not None and (inner is out_emb or module is out_emb):
                    excluded.add(name)
                else:
                    linear.append(name)
        targets = linear
    return targets


def _close_names(wanted: str, candidates) -> List[str]:
    pool = set()
    for name, module in candidates:
        parts = name.split(".")
        pool.add(parts[-1])
        if len(parts) > 1:
            pool.add(".".join(parts[-2:]))
    return difflib.get_close_matches(wanted, sorted(pool), n=5, cutoff=0.5)


def find_targets(model: nn.Module, cfg: AdapterConfig) -> List[Tuple[str, nn.Module]]:
    """(name, module) pairs the config adapts, validated: each is a supported layer type."""
    candidates = _candidate_modules(model)
    targets = _resolve_targets(model, cfg, candidates)
    found = [(n, m) for n, m in candidates if _is_target(cfg, n, targets)]
    if not found:
        if isinstance(targets, str):
            examples = [n for n, m in candidates if B.supported_base(_underlying(m))][:3]
            raise ValueError(
                f"target_modules regex {targets!r} matched no module of the model; a str is re.fullmatch-ed "
                f"against full module names, e.g. {examples}"
            )
        if not targets:
            raise ValueError("target_modules is empty; give module names (e.g. ['q_proj', 'v_proj']), a regex or 'all-linear'")
        if any(_matches_list(n, targets) for n, _ in candidates):
            raise ValueError(
                f"target_modules {targets} name modules of the model, but layers_to_transform="
                f"{getattr(cfg, 'layers_to_transform', None)!r} / layers_pattern={getattr(cfg, 'layers_pattern', None)!r}"
                f" / exclude_modules={cfg.exclude_modules!r} / modules_to_save={cfg.modules_to_save!r} leave none of them"
            )
        hints = []
        for t in targets:
            close = _close_names(t, candidates)
            hints.append(f"{t!r} (close names: {', '.join(close) if close else 'none'})")
        raise ValueError("target_modules matched no module of the model: " + "; ".join(hints))
    if isinstance(targets, list) and cfg.target_modules != "all-linear":
        unmatched = [t for t in targets if not any(_matches_list(n, [t]) for n, _ in found)]
        if unmatched:
            warnings.warn(
                "fastpeft: target_modules entries matched nothing: "
                + "; ".join(f"{t!r} (close names: {', '.join(_close_names(t, candidates)) or 'none'})" for t in unmatched),
                stacklevel=3,
            )
    for name, module in found:
        if not B.supported_base(_underlying(module)):
            raise TypeError(
                f"module {name!r} matches target_modules but is a {type(_underlying(module)).__name__}; "
                f"fastpeft adapts: {B.SUPPORTED_BASE_TYPES}"
            )
    return found


def _find_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> List[Tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
        return []
    found = [
        (n, m)
        for n, m in _candidate_modules(model)
        if any(n == t or n.endswith(t) for t in cfg.modules_to_save) and not isinstance(m, (LoraLinear, IA3Linear))
    ]
    missing = [t for t in cfg.modules_to_save if not any(n == t or n.endswith(t) for n, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save entries matched no module: {missing}")
    return found


# -- swapping ------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _new_layer(name: str, module: nn.Module, cfg: AdapterConfig, adapter_name: str) -> nn.Module:
    if isinstance(cfg, LoraConfig):
        if B.is_conv1d(_underlying(module)) and not cfg.fan_in_fan_out:
            cfg.fan_in_fan_out = True  # PEFT does the same for Conv1D (GPT-2 stores weights as [in, out])
        args = (cfg.rank_for(name), cfg.alpha_for(name), float(cfg.lora_dropout), cfg.init_lora_weights, cfg.use_rslora)
        if isinstance(module, LoraLinear):
            module.update_layer(adapter_name, *args)
            return module
        return LoraLinear(module, adapter_name, *args)
    ff = cfg.feedforward_modules or []
    is_ff = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(name.endswith(t) for t in ff)
    if isinstance(module, IA3Linear):
        if module.is_feedforward != is_ff:
            raise ValueError(f"{name}: adapters on one layer must agree on feedforward scaling")
        module.update_layer(adapter_name, cfg.init_ia3_weights)
        return module
    return IA3Linear(module, adapter_name, is_ff, cfg.init_ia3_weights)


class _Transaction:
    """Undo log for a patch / load: swapped modules, added adapters and changed requires_grad flags."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swaps: List[Tuple[str, nn.Module]] = []
        self.added: List[Tuple[nn.Module, str]] = []
        self.flags: List[Tuple[torch.nn.Parameter, bool]] = []

    def swap(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        if old is new:
            return
        _set_submodule(self.model, name, new)
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
            _set_submodule(self.model, name, old)


def _record_requires_grad(state: PatchState, model: nn.Module) -> None:
    for param in model.parameters():
        state.requires_grad.setdefault(id(param), (param, param.requires_grad))


def _apply_trainable(model: nn.Module, state: PatchState, txn: Optional[_Transaction] = None) -> None:
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
    if train and isinstance(cfg, LoraConfig) and cfg.bias != "none":
        if cfg.bias == "all":
            # modules_to_save wrappers decide for themselves: original frozen, only the active copy trains
            wrapped = {id(p) for _, m in adapter_layers(model) if isinstance(m, ModulesToSave) for p in m.parameters()}
            keep.update(id(p) for n, p in model.named_parameters() if n.endswith("bias") and id(p) not in wrapped)
        else:
            for _, layer in adapter_layers(model):
                if isinstance(layer, LoraLinear) and state.active in layer.adapter_names:
                    bias = B.base_bias(layer.base_layer)
                    if bias is not None:
                        keep.add(id(bias))
    for param in model.parameters():
        want = id(param) in keep
        if param.requires_grad != want:
            set_flag(param, want)


def _set_active(model: nn.Module, adapter_name: str) -> None:
    for _, layer in adapter_layers(model):
        layer.active_adapter = adapter_name


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
    root_ref = weakref.ref(root)

    def hook(_module, _inputs, output):
        owner = root_ref()
        if owner is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        if _checkpointing(owner) and not output.requires_grad:
            return output.requires_grad_(True)
        return None

    state.hook = embeddings.register_forward_hook(hook)


def _checkpointing(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _add_adapter(model: nn.Module, cfg: AdapterConfig, adapter_name: str, state: PatchState, txn: _Transaction):
    targets = find_targets(model, cfg)
    to_save = _find_modules_to_save(model, cfg)
    if isinstance(cfg, LoraConfig):
        has_linear = any(isinstance(_underlying(m), nn.Linear) for _, m in targets)
        if cfg.fan_in_fan_out and has_linear and not any(B.is_conv1d(_underlying(m)) for _, m in targets):
            cfg.fan_in_fan_out = False  # PEFT resets it for nn.Linear targets as well
    built = []
    for name, module in targets:
        existing = isinstance(module, (LoraLinear, IA3Linear))
        if existing and not isinstance(module, LoraLinear if isinstance(cfg, LoraConfig) else IA3Linear):
            raise ValueError(f"{name} already holds a {type(module).__name__}; one adapter method per model")
        new = _new_layer(name, module, cfg, adapter_name)
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
            state.originals[name] = _underlying(new) if not isinstance(new, ModulesToSave) else new.original_module
    for _, layer in built:
        layer.active_adapter = state.active if state.configs else adapter_name


def patch(model: nn.Module, config: Any = None, adapter_name: str = "default") -> nn.Module:
    """Swap fastpeft LoRA / IA3 drop-ins into ``model`` in place and return it.

    ``config``: fastpeft.LoraConfig / IA3Config or peft.LoraConfig / IA3Config. With no config and a
    ``peft.PeftModel``, converts its LoRA / IA3 layers in place, keeping PEFT's parameter names.
    Patching an already patched model with a new ``adapter_name`` adds that adapter (inactive).

    >>> import torch.nn as nn, fastpeft
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> net = fastpeft.patch(net, fastpeft.LoraConfig(r=4, target_modules=["0", "2"]))
    >>> type(net[0]).__name__
    'LoraLinear'
    """
    if config is None:
        if is_peft_model(model):
            return _convert_peft_model(model)
        raise ValueError("patch() needs a config (fastpeft / peft LoraConfig or IA3Config) unless given a PeftModel")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    cfg = to_fastpeft_config(config)
    state = get_state(model, required=False)
    if state is not None:
        if adapter_name in state.configs:
            raise ValueError(
                f"adapter {adapter_name!r} is already patched into this model; "
                f"use another adapter_name or fastpeft.delete_adapter(model, {adapter_name!r}) first"
            )
        if cfg.peft_type != state.peft_type:
            raise ValueError(f"this model holds {state.peft_type} adapters; cannot add a {cfg.peft_type} adapter")
    elif any(isinstance(m, ADAPTER_TYPES) or _is_peft_tuner_layer(m) for _, m in model.named_modules()):
        raise ValueError("this model already holds adapter layers but no fastpeft state; pass a PeftModel or unpatch it")
    fresh = state is None
    if fresh:
        state = PatchState(peft_type=cfg.peft_type, active=adapter_name)
        _record_requires_grad(state, model)
    txn = _Transaction(model)
    try:
        _add_adapter(model, cfg, adapter_name, state, txn)
        state.configs[adapter_name] = cfg
        state.trainable[adapter_name] = not cfg.inference_mode
        _record_requires_grad(state, model)  # new adapter parameters: their "original" flag is their own
        if fresh:
            model.__dict__[STATE_ATTR] = state
            _apply_trainable(model, state, txn)
            _install_input_grad_hook(model, state)
        else:
            _apply_trainable(model, state, txn)
    except BaseException:
        txn.rollback()
        state.configs.pop(adapter_name, None)
        state.trainable.pop(adapter_name, None)
        if fresh:
            model.__dict__.pop(STATE_ATTR, None)
            if state.hook is not None:
                state.hook.remove()
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original modules back (base weights bit-identical) and restore requires_grad flags.

    Raises if adapters are merged: unmerge() first (it restores the weights only up to rounding).
    """
    state = get_state(model)
    layers = adapter_layers(model)
    merged = [n for n, m in layers if m.merged_adapters]
    if merged:
        raise ValueError(
            f"{len(merged)} layers have merged adapters (e.g. {merged[0]}); call fastpeft.unmerge(model) first, "
            "or fastpeft.merge_and_unload(model) to keep the merged weights"
        )
    for name, original in state.originals.items():
        _set_submodule(model, name, original)
    _finish(model, state)
    return model


def _finish(model: nn.Module, state: PatchState) -> None:
    if state.from_peft:
        from .adapter_io import unroute_peft_save_pretrained

        unroute_peft_save_pretrained(model)
    for param, value in state.requires_grad.values():
        param.requires_grad_(value)
    if state.hook is not None:
        state.hook.remove()
    model.__dict__.pop(STATE_ATTR, None)


# -- PeftModel conversion ------------------------------------------------------------------------------
def _convert_peft_layer(name: str, layer: nn.Module) -> nn.Module:
    cls = type(layer).__name__
    base = layer.base_layer
    if not B.supported_base(base):
        raise TypeError(f"{name}: PEFT layer {cls} wraps {type(base).__name__}; fastpeft adapts {B.SUPPORTED_BASE_TYPES}")
    if hasattr(layer, "lora_A"):
        if any(getattr(layer, "use_dora", {}).values()):
            raise ValueError(f"{name}: DoRA adapters are not supported by fastpeft yet")
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
    kinds = {c.peft_type for c in configs.values()}
    if len(kinds) != 1:
        raise ValueError(f"fastpeft converts PeftModels of one adapter method; found {sorted(kinds)}")
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if _is_peft_tuner_layer(m) and type(m).__name__ != "ModulesToSaveWrapper" and hasattr(m, "base_layer")
    ]
    built = [(n, _convert_peft_layer(n, m)) for n, m in layers]
    state = PatchState(peft_type=kinds.pop(), configs=configs, active=model.active_adapter, from_peft=True)
    state.trainable = {name: not cfg.inference_mode for name, cfg in configs.items()}
    txn = _Transaction(model)
    try:
        for (name, old), (_, new) in zip(layers, built):
            txn.swap(name, new)
            state.originals[name] = old
    except BaseException:
        txn.rollback()
        raise
    _record_requires_grad(state, model)
    model.__dict__[STATE_ATTR] = state
    from .adapter_io import route_peft_save_pretrained

    route_peft_save_pretrained(model)  # PEFT's save_pretrained only sees PEFT's layers
    return model

"""Where ``LoraConfig.trainable_token_indices`` puts ``TrainableTokens`` wrappers and ``TrainableTokensConfig`` puts
``TrainableTokensLayer`` layers (PEFT's rules), and the conversion of a PeftModel's trainable-token modules.

PEFT's rules: a list of ids means the input embedding (``get_input_embeddings()``); a dict names modules by
suffix (``name.endswith(key)``, as for modules_to_save). When the model ties its output head to the input
embedding (``config.tie_word_embeddings`` and transformers' ``_tied_weights_keys``) and the embedding got trainable
tokens, every tied module is wrapped too, *tied*: it computes with the embedding's adapter rows and saves nothing.
In the dict form, a tied module listed with the same ids as the embedding is left to that tying; listed with
other ids it gets its own, untied rows (and no tying happens).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .config import AdapterConfig, LoraConfig, TrainableTokensConfig
from .model_state import ADAPTER_TYPES, PatchState, Transaction, is_peft_tuner_layer, root_model
from .nn import IA3Linear, LoraEmbedding, LoraLinear, ModulesToSave, TrainableTokens
from .nn.trainable_tokens import TokenAdapter, TrainableTokensLayer, check_token_indices

__all__ = ["add_trainable_tokens", "tied_module_names", "convert_peft_token_wrappers"]


def _input_embedding_name(model: nn.Module) -> Optional[str]:
    root = root_model(model)
    get_in = getattr(root, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if embedding is None:
        return None
    return next((n for n, m in model.named_modules() if m is embedding), None)


def tied_module_names(model: nn.Module) -> List[str]:
    """Names (relative to the transformers model) of the modules whose weight is tied to the input embedding's."""
    root = root_model(model)
    config = getattr(root, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return []
    keys = getattr(root, "_tied_weights_keys", None)
    if not keys:
        return []
    if isinstance(keys, dict):  # transformers 5: {tied parameter: the parameter it follows}
        get_in = getattr(root, "get_input_embeddings", None)
        embedding = get_in() if callable(get_in) else None
        if embedding is None:
            return []
        sources = {id(p) for p in embedding.parameters()}
        owned = {n for n, p in root.named_parameters(remove_duplicate=False) if id(p) in sources}
        # a parameter already inside a wrapper has another name now: compare the names without the wrapper's part
        aliases = {n.replace("token_adapter.base_layer.", "").replace("base_layer.", ""): n for n in owned}
        params = [k for k, v in keys.items() if v in owned or v in aliases]
    else:  # older transformers: a list of tied parameter names
        params = list(keys)
    return sorted({p.rpartition(".")[0] for p in params})


def _find(model: nn.Module, suffix: str) -> List[Tuple[str, nn.Module]]:
    """Modules whose name ends with ``suffix`` (PEFT's plain endswith), our wrappers as leaves."""
    found, skip = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, ADAPTER_TYPES) or is_peft_tuner_layer(module):
            skip.append(name)
        if name.endswith(suffix):
            found.append((name, module))
    return found


def _plan(model: nn.Module, cfg: LoraConfig) -> List[Tuple[str, nn.Module, Optional[List[int]], bool]]:
    """(module name, module, token ids or None when tied, tied) for every module to wrap; raises on bad input."""
    spec = cfg.trainable_token_indices
    embedding_name = _input_embedding_name(model)
    if isinstance(spec, dict):
        wanted = dict(spec)
    else:
        if embedding_name is None:
            raise ValueError("trainable_token_indices is a list but the model has no input embedding "
                             "(get_input_embeddings()); give {module name: [token ids]} instead")
        wanted = {embedding_name: spec}
    tied_names = tied_module_names(model)
    prefix = "" if root_model(model) is model else "base_model.model."

    def is_tied(key: str) -> bool:
        return any((prefix + t).endswith(key) or key in t.split(".") for t in tied_names)

    embedding_keys = [k for k in wanted if embedding_name is not None and embedding_name.endswith(k)]
    tied_keys = [k for k in wanted if k not in embedding_keys and is_tied(k)]
    same_ids = bool(embedding_keys) and all(wanted[k] == wanted[embedding_keys[0]] for k in tied_keys)
    if len(wanted) > 1 and tied_names and same_ids:
        for k in tied_keys:  # left to the tying below, as PEFT does
            del wanted[k]
    plan = []
    for key, ids in wanted.items():
        matches = _find(model, key)
        if not matches:
            raise ValueError(f"trainable_token_indices: {key!r} matches no module of the model (a key must be the end "
                             "of a module name, e.g. 'embed_tokens' or 'lm_head')")
        for name, module in matches:
            plan.append((name, module, ids, False))
    wrapped_embedding = any(embedding_name is not None and n == embedding_name for n, _, _, _ in plan)
    if tied_names and wrapped_embedding and (same_ids or not tied_keys):
        planned = {n for n, _, _, _ in plan}
        for t in tied_names:
            for name, module in _find(model, t):
                if name not in planned:
                    plan.append((name, module, None, True))
    return plan


def _check_target(name: str, module: nn.Module, tied: bool) -> None:
    if isinstance(module, (LoraLinear, LoraEmbedding, IA3Linear)):
        raise TypeError(f"trainable tokens cannot apply to {name!r}: it is adapted by LoRA (target_modules) "
                        "already; leave it out of target_modules or out of trainable_token_indices")
    if isinstance(module, ModulesToSave):
        raise ValueError(f"trainable tokens cannot apply to {name!r}: it is in modules_to_save (trained in "
                         "full); give it to one of the two")
    if isinstance(module, TrainableTokens) and module.tied != tied:
        raise ValueError(f"{name!r} already holds trainable tokens {'tied to' if module.tied else 'of its own, not'} "
                         "the input embedding; an adapter cannot change that (PEFT cannot either)")
    if not isinstance(module, (TrainableTokens, nn.Embedding, nn.Linear)):
        raise TypeError(f"trainable tokens cannot apply to {name!r}, a {type(module).__name__}: they "
                        "tokens work on torch.nn.Embedding layers and linear output heads")


def add_trainable_tokens(model: nn.Module, cfg: AdapterConfig, adapter_name: str, state: PatchState,
                         txn: Transaction) -> None:
    """Wrap (or extend) the modules ``cfg.trainable_token_indices`` names (LoRA) or the standalone config's targets
    (``TrainableTokensConfig``); every change goes through ``txn``."""
    if isinstance(cfg, TrainableTokensConfig):
        _apply(model, _standalone_plan(model, cfg), adapter_name, state, txn, TrainableTokensLayer, cfg.init_weights,
               "token_indices")
    elif isinstance(cfg, LoraConfig) and cfg.trainable_token_indices is not None:
        _apply(model, _plan(model, cfg), adapter_name, state, txn, TrainableTokens, True, "trainable_token_indices")


def _standalone_plan(model: nn.Module, cfg: TrainableTokensConfig):
    """PEFT's TrainableTokensModel: target_modules None means the input embedding (PEFT stores its name in the
    config); a str is a regex (re.fullmatch), a list names modules by dotted suffix."""
    root = root_model(model)
    prefix = "" if root is model else "base_model.model."
    embedding_name = _input_embedding_name(model)
    if cfg.target_modules is None:
        if embedding_name is None:
            raise ValueError("TrainableTokensConfig.target_modules=None means the input embedding, but the model has "
                             "none (get_input_embeddings()); give target_modules")
        cfg.target_modules = embedding_name[len(prefix):]
    targets = cfg.target_modules

    def selected(relative: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, relative) is not None
        return any(relative == t or relative.endswith("." + t) for t in targets)

    found, skip = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name.startswith(prefix) or name == prefix.rstrip(".") or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, ADAPTER_TYPES) or is_peft_tuner_layer(module):
            skip.append(name)
        if selected(name[len(prefix):]):
            found.append((name, module))
    if not found:
        raise ValueError(f"TrainableTokensConfig.target_modules={targets!r} matched no module of the model")
    tied_names = tied_module_names(model)
    tying = bool(tied_names) and any(n == embedding_name for n, _ in found)
    # a tied module the targets name as well becomes tied to the embedding, as PEFT replaces it
    plan = [(n, m, cfg.token_indices, False) for n, m in found
            if not (tying and any(n.endswith(t) for t in tied_names))]
    if tying:
        planned = {n for n, _, _, _ in plan}
        for t in tied_names:
            plan += [(n, m, None, True) for n, m in _find(model, t) if n not in planned]
    return plan


def _apply(model: nn.Module, plan, adapter_name: str, state: PatchState, txn: Transaction, cls, init_weights: bool,
           field_name: str) -> None:
    for name, module, ids, tied in plan:
        _check_target(name, module, tied)
        if ids is not None:
            rows = (module.base_layer if isinstance(module, TrainableTokens) else module).weight.shape[0]
            check_token_indices(ids, rows, f"{field_name} for {name!r}")
    built: Dict[str, nn.Module] = {}
    for name, module, ids, tied in plan:  # untied ones first: tied layers follow the embedding's
        if tied:
            continue
        if isinstance(module, TrainableTokens):
            module.update_layer(adapter_name, ids, init_weights)
            txn.added.append((module, adapter_name))
            built[name] = module
        else:
            built[name] = cls(module, adapter_name, ids, init_weights)
    embedding_name = _input_embedding_name(model)
    for name, module, _, tied in plan:
        if not tied:
            continue
        source = built.get(embedding_name) or model.get_submodule(embedding_name)
        if isinstance(module, TrainableTokens):
            module.update_layer(adapter_name)
            txn.added.append((module, adapter_name))
            built[name] = module
        else:
            built[name] = cls(module, adapter_name, tied_to=source)
    for name, new in built.items():
        if not isinstance(model.get_submodule(name), TrainableTokens):
            state.originals.setdefault(name, new.base_layer)
        txn.swap(name, new)
        new.active_adapter = state.active if state.configs else adapter_name


# -- PeftModel conversion ------------------------------------------------------------------------------------
def _is_peft_token_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "TrainableTokensWrapper"


def convert_peft_token_wrappers(model: nn.Module, active: str) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, PEFT's module, ours holding the very same Parameters) for a PeftModel's ``TrainableTokensWrapper``
    modules (LoRA's trainable_token_indices) and standalone ``TrainableTokensLayer`` modules (TrainableTokensConfig);
    ``active``: the PeftModel's active adapter. The model is not changed."""
    wrappers = [(n, m) for n, m in model.named_modules() if _is_peft_token_wrapper(m)]
    ours: Dict[int, TrainableTokens] = {}
    out = []
    # untied first: a tied wrapper follows the one its layer is tied to
    for name, wrapper in sorted(wrappers, key=lambda nm: nm[1].token_adapter.tied_adapter is not None):
        layer = wrapper.token_adapter
        names = sorted(wrapper._adapters)
        if not names:
            continue
        tied_to = None
        if layer.tied_adapter is not None:
            tied_to = ours.get(id(layer.tied_adapter))
            if tied_to is None:
                raise TypeError(f"{name}: PEFT's trainable tokens are tied to a layer fastpeft cannot find")
        # active: the PeftModel's adapter; a wrapper without it passes through, as PEFT's does
        new = TrainableTokens.adopt(_adopt_token_layer(layer, tied_to), names, active,
                                    disable_adapters=bool(wrapper.disable_adapters),
                                    merged_adapters=layer.merged_adapters)
        ours[id(layer)] = new
        out.append((name, wrapper, new))
    out += _convert_standalone_layers(model, active)
    return out


def _is_peft_standalone_layer(name: str, module: nn.Module) -> bool:
    # PEFT's TrainableTokensLayer outside a TrainableTokensWrapper (its "token_adapter"): TrainableTokensConfig's
    return (type(module).__name__ == "TrainableTokensLayer" and not isinstance(module, TrainableTokens)
            and not name.endswith(".token_adapter"))


def _convert_standalone_layers(model: nn.Module, active: str) -> List[Tuple[str, nn.Module, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if _is_peft_standalone_layer(n, m)]
    ours: Dict[int, TrainableTokensLayer] = {}
    out = []
    for name, layer in sorted(layers, key=lambda nm: nm[1].tied_adapter is not None):  # untied first
        tied_to = None
        if layer.tied_adapter is not None:
            tied_to = ours.get(id(layer.tied_adapter))
            if tied_to is None:
                raise TypeError(f"{name}: PEFT's trainable tokens are tied to a layer fastpeft cannot find")
        names = sorted(layer.trainable_tokens_delta.keys())
        new = TrainableTokensLayer.adopt_peft_layer(layer, names, active, tied_to)
        ours[id(layer)] = new
        out.append((name, layer, new))
    return out


def _adopt_token_layer(layer: nn.Module, tied_to: Optional[TrainableTokens]):
    from_tied = tied_to.token_adapter if tied_to is not None else None
    adapter = TokenAdapter(layer.base_layer, from_tied)
    if from_tied is None:
        adapter.trainable_tokens_delta = layer.trainable_tokens_delta  # the same Parameters: optimizers stay valid
        for key, rows in layer.trainable_tokens_original.items():
            adapter.trainable_tokens_original.register_buffer(key, rows, persistent=False)
        adapter.token_indices.update({k: list(v) for k, v in layer.token_indices.items()})
    return adapter

"""Which modules a config adapts: PEFT's target-matching rules (target_modules as a list of names / dotted
suffixes, a regex, "all-linear" or None for per-architecture defaults; exclude_modules; layers_to_transform /
layers_pattern; modules_to_save), with errors that name close matches when nothing matches.

``find_targets`` also writes the resolved target list back on the config as PEFT stores it
(``config.peft_stored_targets``), so the adapter_config.json we save names modules the way PEFT's does (serving
stacks read that list).
"""
from __future__ import annotations

import difflib
import re
import warnings
from typing import Any, List, Optional, Tuple

import torch.nn as nn

from .config import (
    IA3_DEFAULT_FEEDFORWARD,
    IA3_DEFAULT_TARGETS,
    ADALORA_DEFAULT_TARGETS,
    AdaLoraConfig,
    LORA_DEFAULT_TARGETS,
    VERA_DEFAULT_TARGETS,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    VeraConfig,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    peft_stored_targets,
)
from .model_state import ADAPTER_TYPES, WRAPPER_TYPES, is_peft_tuner_layer, root_model, underlying
from .nn import bases

__all__ = ["find_targets", "find_modules_to_save"]


def _candidate_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Named modules, with our adapter layers as leaves (their insides are never targets)."""
    out, skip = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip):
            continue
        out.append((name, module))
        if isinstance(module, ADAPTER_TYPES) or is_peft_tuner_layer(module):
            skip.append(name)
    return out




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
    excl = getattr(cfg, "exclude_modules", None)  # PEFT's VeraConfig has no such field
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
        table = {LoraConfig: LORA_DEFAULT_TARGETS, IA3Config: IA3_DEFAULT_TARGETS,
                 VeraConfig: VERA_DEFAULT_TARGETS, LoHaConfig: LORA_DEFAULT_TARGETS,
                 LoKrConfig: LORA_DEFAULT_TARGETS, OFTConfig: LORA_DEFAULT_TARGETS,
                 AdaLoraConfig: ADALORA_DEFAULT_TARGETS}[type(cfg)]  # LoHa, LoKr, OFT: LoRA's
        if model_type not in table:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if bases.supported_base(underlying(m))})
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
            if bases.supported_base(underlying(module)):
                inner = underlying(module)
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
            examples = [n for n, m in candidates if bases.supported_base(underlying(m))][:3]
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
                f" / exclude_modules={getattr(cfg, 'exclude_modules', None)!r} / modules_to_save={cfg.modules_to_save!r} leave none of them"
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
        inner = underlying(module)
        if bases.is_embedding(inner) and not isinstance(cfg, LoraConfig):
            raise TypeError(f"module {name!r} is an nn.Embedding: fastpeft adapts embeddings with LoRA only (PEFT's "
                            f"{cfg.peft_type} does not adapt them either)")
        if not (bases.supported_base(inner) or bases.is_embedding(inner)):
            raise TypeError(
                f"module {name!r} matches target_modules but is a {type(inner).__name__}; "
                f"fastpeft adapts: {bases.SUPPORTED_BASE_TYPES}, and torch.nn.Embedding with LoRA"
            )
    if isinstance(targets, list):
        # What PEFT stores (and writes to adapter_config.json, which serving stacks read): for "all-linear" the
        # full names of the linear layers it found (head excluded), for a list the list -- for LoRA with 20+
        # entries condensed to the shortest unambiguous suffixes. The stored list selects the same modules.
        cfg.target_modules = peft_stored_targets(cfg.peft_type, targets, [n for n, _ in model.named_modules()])
    return found


def find_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> List[Tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
        return []
    found = [
        (n, m)
        for n, m in _candidate_modules(model)
        if any(n == t or n.endswith(t) for t in cfg.modules_to_save)
        and not isinstance(m, WRAPPER_TYPES)
    ]
    missing = [t for t in cfg.modules_to_save if not any(n == t or n.endswith(t) for n, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save entries matched no module: {missing}")
    return found



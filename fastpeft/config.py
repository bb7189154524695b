"""Adapter configurations with PEFT's field names and defaults.

fastpeft accepts its own configs and PEFT's (``peft.LoraConfig`` / ``peft.IA3Config``): a PEFT config is
converted field by field, and any field fastpeft does not implement must still hold PEFT's default —
otherwise a ``ValueError`` names it. Nothing is ignored silently.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

# PEFT's per-architecture defaults for target_modules=None (facts from PEFT's constants).
LORA_DEFAULT_TARGETS: Dict[str, List[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "stablelm": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
IA3_DEFAULT_TARGETS: Dict[str, List[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
}
IA3_DEFAULT_FEEDFORWARD: Dict[str, List[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "phi": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "gptj": ["fc_out"],
    "falcon": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "bloom": ["mlp.dense_4h_to_h"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
}

# Fields of a PEFT config that only describe the run, never the numerics: carried as metadata.
_METADATA_FIELDS = {
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
}

TargetSpec = Optional[Union[str, List[str]]]


def _listify(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return value


class _ConfigBase:
    peft_type: str = ""

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules"):
            if hasattr(self, name):
                setattr(self, name, _listify(getattr(self, name)))
        if getattr(self, "layers_to_transform", None) is not None and isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> Dict[str, Any]:
        """The dict written to adapter_config.json (PEFT's field names, sets as lists)."""
        out = {f.name: _listify(copy.deepcopy(getattr(self, f.name))) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        """Build from an adapter_config.json dict; unknown fields must hold PEFT's default (see module doc)."""
        data = dict(data)
        data.pop("peft_type", None)
        known = set(cls.field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        _reject_non_default(cls, extra)
        return cls(**kwargs)


def _peft_field_defaults(cls) -> Dict[str, Any]:
    """PEFT's defaults for fields fastpeft does not implement: such a field is accepted only at its default."""
    return _UNSUPPORTED_DEFAULTS_LORA if cls is LoraConfig else _UNSUPPORTED_DEFAULTS_IA3


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value is False:
        return default in (None, False)
    if isinstance(value, (list, dict, tuple, set, str)) and len(value) == 0:
        return default in (None, False, (), "", [], {}) or (hasattr(default, "__len__") and len(default) == 0)
    return value == default


def _reject_non_default(cls, extra: Dict[str, Any]) -> None:
    defaults = _peft_field_defaults(cls)
    bad = []
    for key, value in extra.items():
        if key in _METADATA_FIELDS:
            continue
        if key in defaults and _is_default(_normalize(value), defaults[key]):
            continue
        if key not in defaults and _is_default(_normalize(value), None):
            continue  # an unknown field left empty/None changes nothing
        bad.append(f"{key}={value!r}")
    if bad:
        raise ValueError(
            f"fastpeft {cls.__name__} does not support {', '.join(bad)}. "
            f"Supported fields: {', '.join(cls.field_names())}."
        )


def _normalize(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        # PEFT nests small config dataclasses (e.g. LoftQ / runtime configs) whose own fields may all be defaults.
        if all(_is_default(v, None) for v in value.values()):
            return None
    return value


# PEFT LoraConfig fields fastpeft does not implement, with the value that means "off".
_UNSUPPORTED_DEFAULTS_LORA: Dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "qalora_group_size": 16,
    "target_parameters": None,
    "layer_replication": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": None,
    "eva_config": None,
    "corda_config": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "ensure_weight_tying": False,
    "use_bdlora": None,
    "lora_ga_config": None,
    "runtime_config": None,
    "modules_to_tie": None,
}
_UNSUPPORTED_DEFAULTS_IA3: Dict[str, Any] = {}


@dataclass
class LoraConfig(_ConfigBase):
    """LoRA configuration; field names and defaults follow ``peft.LoraConfig``.

    >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    peft_type = "LORA"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        dropout_ok = isinstance(self.lora_dropout, (int, float)) and not isinstance(self.lora_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be one of 'none', 'all', 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("LoraConfig.layers_to_transform cannot be used when target_modules is a str (regex)")

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern or {}, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern or {}, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / (r**0.5) if self.use_rslora else alpha / r


@dataclass
class IA3Config(_ConfigBase):
    """IA3 configuration; field names and defaults follow ``peft.IA3Config``.

    >>> IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
    'IA3'
    """

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    feedforward_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[List[str]] = None
    init_ia3_weights: bool = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    peft_type = "IA3"

    def validate(self) -> None:
        if self.init_ia3_weights not in (True, False):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            missing = [m for m in self.feedforward_modules if m not in self.target_modules]
            if missing:
                raise ValueError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; not in target_modules: {missing}"
                )


AdapterConfig = Union[LoraConfig, IA3Config]


def match_pattern_key(patterns: Dict[str, Any], module_name: str) -> Optional[str]:
    """The first key of rank_pattern / alpha_pattern that matches module_name (PEFT's rule: a suffix regex)."""
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def to_fastpeft_config(config: Any) -> AdapterConfig:
    """Accept a fastpeft config, a PEFT LoraConfig / IA3Config, or a dict from adapter_config.json."""
    if isinstance(config, (LoraConfig, IA3Config)):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type == "LORA":
            return LoraConfig.from_dict(config)
        if peft_type == "IA3":
            return IA3Config.from_dict(config)
        raise ValueError(f"unsupported peft_type {config.get('peft_type')!r}; fastpeft supports 'LORA' and 'IA3'")
    peft_type = getattr(config, "peft_type", None)
    if peft_type is not None:
        name = getattr(peft_type, "value", peft_type)
        data = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            data[f.name] = getattr(value, "value", value) if f.name == "task_type" else value
        data["peft_type"] = str(name)
        return to_fastpeft_config(data)
    raise TypeError(
        f"expected fastpeft.LoraConfig, fastpeft.IA3Config, peft.LoraConfig or peft.IA3Config, got {type(config).__name__}"
    )

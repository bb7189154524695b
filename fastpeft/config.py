"""Adapter configurations with PEFT's field names and defaults, and the adapter_config.json PEFT writes.

``LoraConfig`` / ``IA3Config`` take every field name of ``peft.LoraConfig`` / ``peft.IA3Config`` (as of PEFT
``PEFT_FORMAT_VERSION``), so code written for PEFT runs unchanged. The fields fastpeft implements work as in
PEFT. The others (DoRA, LoftQ, layer replication, ...) are accepted only at PEFT's default, which is their "off"
value; any other value raises a ``ValueError`` naming the field. A name that is not a PEFT field at all (a typo)
is a ``TypeError``. PEFT config objects and adapter_config.json dicts are converted by the same rules: nothing
is ignored silently.

``cfg.to_adapter_config(...)`` gives the adapter_config.json PEFT writes for the same config: PEFT's full key
set, PEFT's defaults for what fastpeft does not implement, ``inference_mode`` true and a ``peft_version``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Tuple, Union

# The PEFT release whose adapter_config.json format fastpeft follows: the field lists below were read from its
# dataclasses.fields(peft.LoraConfig / peft.IA3Config), and adapter_config.json gets this as "peft_version".
# PEFT itself writes its own __version__ there ("0.21.2"; a dev build adds "@<git commit>"). fastpeft never
# imports peft at runtime, so it names the version whose format it writes instead. Update this together with
# the fields when following a newer PEFT (tests/model/test_config_fields.py compares both with the installed PEFT).
PEFT_FORMAT_VERSION = "0.21.2"

# The values of PEFT's TaskType: PEFT refuses to build (and so to load) a config with any other task_type.
PEFT_TASK_TYPES: Tuple[str, ...] = (
    "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION",
)

# Fields PEFT keeps as sets and writes as list(set), i.e. in an order that follows string hashing and so differs
# between Python processes. fastpeft writes the same set sorted, so that saving twice gives the same file.
_SET_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")

# Every method but IA3 (PEFT skips IA3, whose feedforward_modules must stay a subset): once a target list has at least
# this many entries, PEFT replaces it by the shortest name suffixes that select the same modules (see
# peft_stored_targets). The value is PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION.
PEFT_CONDENSE_MIN_TARGETS = 20

# dataclass field metadata: how fastpeft treats a PEFT field that is not one of its settings.
_KIND = "fastpeft"
_UNSUPPORTED = "unsupported"  # not implemented: accepted only at PEFT's default
_SAVE_METADATA = "save-metadata"  # describes a saved file (who wrote it, how to rebuild the model), not the adapter

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
# PEFT's VeRA defaults: LoRA's, except phi (attention only)
VERA_DEFAULT_TARGETS: Dict[str, List[str]] = {**LORA_DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]}
# PEFT's AdaLoRA defaults, for the model types fastpeft knows (PEFT has none for mistral, phi, falcon, ...)
ADALORA_DEFAULT_TARGETS: Dict[str, List[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gptj")},
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "bert": ["query", "value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "roberta": ["query", "key", "value", "dense"],
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

TargetSpec = Optional[Union[str, List[str]]]


# -- field declarations ----------------------------------------------------------------------------------
def _peft_only(default: Any = None, factory: Any = None) -> Any:
    """A PEFT field fastpeft does not implement: keyword-only, kept out of repr, accepted only at ``default``."""
    meta = {_KIND: _UNSUPPORTED}
    if factory is not None:
        return field(default_factory=factory, repr=False, kw_only=True, metadata=meta)
    return field(default=default, repr=False, kw_only=True, metadata=meta)


def _save_metadata() -> Any:
    """peft_version / auto_mapping: kept and written back like PEFT does, but no part of the adapter's settings
    (not in to_dict, not compared)."""
    return field(default=None, repr=False, compare=False, kw_only=True, metadata={_KIND: _SAVE_METADATA})


def _peft_type_field(value: str) -> Any:
    # PEFT's peft_type defaults to None and is filled in by the config class; None and the class's own type are
    # both accepted here.
    return field(default=value, repr=False, kw_only=True)


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else copy.deepcopy(f.default)


# -- value helpers -----------------------------------------------------------------------------------------
def _listify(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    return value


def _enum_value(value: Any) -> Any:
    # PEFT's TaskType / PeftType are str enums; store the plain string, which is also what json writes.
    return getattr(value, "value", value)


def _plain(value: Any) -> Any:
    """A value as JSON would hold it: PEFT's nested config dataclasses as dicts, sets / tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return _enum_value(value)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (dict, list)) and len(value) == 0)


def _same_as_default(value: Any, default: Any) -> bool:
    """Whether ``value`` means what PEFT's ``default`` means. None and an empty dict / list are the same "nothing
    set" (PEFT's loftq_config defaults to {}, its other sub-configs to None; each treats both as off)."""
    value = _plain(value)
    if type(value) is bool or type(default) is bool:
        # 0 == False in Python, but use_dora=0 is no spelling PEFT writes; compare booleans exactly
        return type(value) is type(default) and value == default
    return value == default or (_is_empty(value) and _is_empty(default))


def _is_unset(value: Any) -> bool:
    """For a key no PEFT version fastpeft knows: it changes nothing only when None / False / empty, or a dict of
    such values (PEFT's small sub-configs written with everything off)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return all(_is_unset(v) for v in value.values())
    return value is None or value is False or (isinstance(value, (list, tuple, set, str)) and len(value) == 0)


def _unsupported_error(cls: type, bad: List[str], defaults: Dict[str, Any]) -> ValueError:
    off = ", ".join(f"{name}={value!r}" for name, value in defaults.items())
    hint = f" fastpeft accepts these PEFT fields only at PEFT's default ({off})." if off else ""
    return ValueError(
        f"fastpeft {cls.__name__} does not support {', '.join(bad)}.{hint} "
        f"Supported fields: {', '.join(cls.field_names())}."
    )


def _check_keywords(cls):
    """Wrap the dataclass __init__ so that a misspelt keyword names the close field names (a bare dataclass only
    says 'unexpected keyword argument'). The accepted names are exactly the dataclass fields, i.e. PEFT's."""
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            raise TypeError(
                f"{cls.__name__} got unexpected keyword argument(s) {', '.join(hints)}: not a field of "
                f"peft.{cls.__name__} (PEFT {PEFT_FORMAT_VERSION}). Fields: {', '.join(names)}."
            )
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# -- shared behaviour ------------------------------------------------------------------------------------------
class _ConfigBase:
    PEFT_TYPE: ClassVar[str] = ""
    # PEFT fields that PEFT's save_pretrained leaves out of adapter_config.json
    _NOT_SAVED: ClassVar[Tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules"):
            if hasattr(self, name):
                setattr(self, name, _listify(getattr(self, name)))
        if getattr(self, "layers_to_transform", None) is not None and isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self._check_metadata()
        self.validate()
        self._check_unsupported()

    def _check_metadata(self) -> None:
        name = type(self).__name__
        peft_type = _enum_value(self.peft_type)
        if peft_type is None:
            peft_type = self.PEFT_TYPE
        if peft_type != self.PEFT_TYPE:
            raise ValueError(
                f"{name}.peft_type must be {self.PEFT_TYPE!r} (or None), got {self.peft_type!r}; "
                "fastpeft.LoraConfig is for 'LORA' and fastpeft.IA3Config for 'IA3'"
            )
        self.peft_type = peft_type
        self.task_type = _enum_value(self.task_type)
        if self.task_type is not None and self.task_type not in PEFT_TASK_TYPES:
            raise ValueError(f"{name}.task_type must be None or one of {PEFT_TASK_TYPES}, got {self.task_type!r}")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ValueError(f"{name}.auto_mapping must be None or a dict, got {self.auto_mapping!r}")
        if self.peft_version is not None and not isinstance(self.peft_version, str):
            raise ValueError(f"{name}.peft_version must be None or a str, got {self.peft_version!r}")

    def _check_unsupported(self) -> None:
        bad, defaults = [], {}
        for f in dataclasses.fields(self):
            if f.metadata.get(_KIND) != _UNSUPPORTED:
                continue
            value, default = getattr(self, f.name), _default_of(f)
            if _same_as_default(value, default):
                setattr(self, f.name, default)  # PEFT's spelling of "off": loftq_config=None -> {}, an object -> its dict
            else:
                bad.append(f"{f.name}={value!r}")
                defaults[f.name] = default
        if bad:
            raise _unsupported_error(type(self), bad, defaults)

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> Dict[str, Any]:
        """The adapter's settings under PEFT's field names, sets as sorted lists; the save-time metadata
        (peft_version, auto_mapping) is left out, see ``to_adapter_config`` for the file."""
        return {
            f.name: _listify(copy.deepcopy(getattr(self, f.name)))
            for f in dataclasses.fields(self)
            if f.metadata.get(_KIND) != _SAVE_METADATA
        }

    def to_adapter_config(
        self, base_model_name_or_path: Optional[str] = None, base_model_class: Optional[type] = None
    ) -> Dict[str, Any]:
        """The adapter_config.json PEFT (``PEFT_FORMAT_VERSION``) writes for this config.

        Every PEFT field is a key (those fastpeft does not implement at PEFT's default), ``inference_mode`` is
        true and ``peft_version`` is the config's own (PEFT keeps the one a loaded config came with) or
        ``PEFT_FORMAT_VERSION``. ``base_model_name_or_path`` fills the field when the config has none.
        ``base_model_class`` (the transformers model class, e.g. ``LlamaForCausalLM``) gives ``auto_mapping`` when
        ``task_type`` is None, as PEFT records it then.

        target_modules is written as the config holds it; PEFT writes the list it resolved while adapting the
        model ("all-linear" and None become names, see peft_stored_targets), so the config must hold that list.
        Sets are written sorted where PEFT's order is arbitrary (see _SET_FIELDS).

        >>> cfg = LoraConfig(r=4, target_modules=["v_proj", "q_proj"])
        >>> data = cfg.to_adapter_config("my/base-model")
        >>> data["target_modules"], data["inference_mode"], data["use_dora"], data["loftq_config"]
        (['q_proj', 'v_proj'], True, False, {})
        >>> data["peft_type"], data["peft_version"] == PEFT_FORMAT_VERSION, data["base_model_name_or_path"]
        ('LORA', True, 'my/base-model')
        """
        data = self.to_dict()
        for name in self._NOT_SAVED:
            del data[name]
        for name in _SET_FIELDS:
            if isinstance(data.get(name), list):
                data[name] = sorted(data[name])
        data["inference_mode"] = True
        data["peft_version"] = self.peft_version or PEFT_FORMAT_VERSION
        data["auto_mapping"] = copy.deepcopy(self.auto_mapping)
        if self.task_type is None and base_model_class is not None:
            # PEFT records how to rebuild the base model when no task type says so
            data["auto_mapping"] = {
                "base_model_class": base_model_class.__name__,
                "parent_library": base_model_class.__module__,
            }
        if data.get("base_model_name_or_path") is None:
            data["base_model_name_or_path"] = base_model_name_or_path or None
        return data

    @classmethod
    def field_names(cls) -> List[str]:
        """The fields fastpeft implements (the others are PEFT's, accepted only at their default)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get(_KIND) != _UNSUPPORTED]

    @classmethod
    def peft_field_names(cls) -> List[str]:
        """Every field name of the PEFT config class of the same name (all accepted as keywords)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        """Build from an adapter_config.json dict (see module doc). A key that is no field of PEFT
        ``PEFT_FORMAT_VERSION`` (another PEFT release's) is accepted only when None / False / empty."""
        data = dict(data)
        if isinstance(data.get("peft_type"), str):
            data["peft_type"] = data["peft_type"].upper()  # to_fastpeft_config dispatches on it case-blind too
        known = set(cls.peft_field_names())
        extra = {k: v for k, v in data.items() if k not in known}
        bad = [f"{k}={v!r}" for k, v in extra.items() if not _is_unset(v)]
        if bad:
            raise _unsupported_error(cls, bad, {})
        return cls(**{k: v for k, v in data.items() if k in known})


def _token_id_list(value: Any, where: str) -> List[int]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of token ids (ints), got {value!r}")
    bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise ValueError(f"{where} must hold token ids (ints >= 0), got {bad[:5]!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where} lists token ids more than once: {sorted({v for v in value if value.count(v) > 1})}")
    return list(value)


def _check_token_spec(spec: Any, modules_to_save: Optional[List[str]]) -> Any:
    """LoraConfig.trainable_token_indices: None, a list of token ids (the input embedding) or {module name suffix:
    [ids]}. Range checks need the model (fastpeft.token_targets)."""
    if spec is None:
        return None
    where = "LoraConfig.trainable_token_indices"
    if isinstance(spec, dict):
        if not spec:
            raise ValueError(f"{where} is an empty dict; give {{module name: [token ids]}} or a list of token ids")
        out = {}
        for key, ids in spec.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where} keys must be module names (non-empty str), got {key!r}")
            out[key] = _token_id_list(ids, f"{where}[{key!r}]")
            if modules_to_save and key in modules_to_save:
                raise ValueError(f"{key!r} is both in modules_to_save (trained in full) and in {where}; give it to "
                                 "one of them")
        return out
    return _token_id_list(spec, where)


# -- the configs -------------------------------------------------------------------------------------------
# Field order: fastpeft's own fields first, in the order positional calls rely on; then PEFT's bookkeeping and
# the PEFT fields fastpeft does not implement, keyword-only. The names and defaults are those of the PEFT release
# PEFT_FORMAT_VERSION (runtime_config's default is PEFT's LoraRuntimeConfig() as a dict).
@_check_keywords
@dataclass
class LoraConfig(_ConfigBase):
    """LoRA configuration; field names and defaults follow ``peft.LoraConfig``.

    >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_dora=True)
    >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    >>> LoraConfig(lora_bias=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fastpeft LoraConfig does not support lora_bias=True. fastpeft accepts these PEFT fields only at PEFT's default (lora_bias=False). Supported fields: ...
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
    use_dora: bool = field(default=False, kw_only=True)  # keyword-only: positional order stays as before
    loftq_config: Dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)  # used with init_lora_weights="loftq"
    # PEFT's trainable tokens (fastpeft.nn.TrainableTokens): a list of token ids (rows of the input embedding) or
    # {module name suffix: [ids]}; keyword-only like use_dora
    trainable_token_indices: Optional[Union[List[int], Dict[str, List[int]]]] = field(default=None, kw_only=True)
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("LORA")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()
    # PEFT fields fastpeft does not implement, at PEFT's defaults
    megatron_config: Any = _peft_only(None)
    megatron_core: Any = _peft_only("megatron.core")
    eva_config: Any = _peft_only(None)
    corda_config: Any = _peft_only(None)
    lora_ga_config: Any = _peft_only(None)
    velora_config: Any = _peft_only(None)
    alora_invocation_tokens: Any = _peft_only(None)
    use_qalora: Any = _peft_only(False)
    qalora_group_size: Any = _peft_only(16)
    monteclora_config: Any = _peft_only(None)
    layer_replication: Any = _peft_only(None)
    runtime_config: Any = _peft_only(factory=lambda: {"ephemeral_gpu_offload": False})
    lora_bias: Any = _peft_only(False)
    target_parameters: Any = _peft_only(None)
    use_bdlora: Any = _peft_only(None)
    arrow_config: Any = _peft_only(None)
    kasa_config: Any = _peft_only(None)
    ensure_weight_tying: Any = _peft_only(False)

    PEFT_TYPE: ClassVar[str] = "LORA"
    # PEFT drops runtime_config from the saved file: it describes how to load, not the adapter
    _NOT_SAVED: ClassVar[Tuple[str, ...]] = ("runtime_config",)

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        dropout_ok = isinstance(self.lora_dropout, (int, float)) and not isinstance(self.lora_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if type(self.use_dora) is not bool:
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be one of 'none', 'all', 'lora_only', got {self.bias!r}")
        self._validate_init()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("LoraConfig.layers_to_transform cannot be used when target_modules is a str (regex)")
        self.trainable_token_indices = _check_token_spec(self.trainable_token_indices, self.modules_to_save)

    def _validate_init(self) -> None:
        init = self.init_lora_weights
        if not (init is True or init is False or init in ("gaussian", "pissa", "olora", "loftq")
                or pissa_niter(init) is not None):
            refused = " (PEFT's eva, corda, orthogonal, mica and lora_ga are not implemented in fastpeft)" \
                if init in ("eva", "corda", "orthogonal", "mica", "lora_ga") else ""
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora' "
                f"or 'loftq', got {init!r}{refused}"
            )
        loftq = _plain(self.loftq_config)
        if init == "loftq":
            if not loftq:
                raise ValueError("LoraConfig.loftq_config must be given when init_lora_weights='loftq' (e.g. "
                                 "{'loftq_bits': 4, 'loftq_iter': 1}, or peft.LoftQConfig())")
            if not isinstance(loftq, dict) or set(loftq) - {"loftq_bits", "loftq_iter"}:
                raise ValueError("LoraConfig.loftq_config must be a dict / peft.LoftQConfig with the keys "
                                 f"'loftq_bits' and 'loftq_iter', got {self.loftq_config!r}")
            loftq = {"loftq_bits": 4, "loftq_iter": 1, **loftq}  # PEFT's LoftQConfig defaults
            if loftq["loftq_bits"] != 4:
                raise ValueError(f"LoraConfig.loftq_config: fastpeft implements loftq_bits=4 (NF4) only, got "
                                 f"{loftq['loftq_bits']!r}")
            it = loftq["loftq_iter"]
            if not isinstance(it, int) or isinstance(it, bool) or it <= 0:
                raise ValueError(f"LoraConfig.loftq_config['loftq_iter'] must be a positive integer, got {it!r}")
        elif not _is_empty(loftq):
            # PEFT drops it with a warning as well; kept as a warning so that PEFT configs load the same way
            warnings.warn("LoraConfig.loftq_config is ignored because init_lora_weights is not 'loftq'; "
                          "it is reset to {} as PEFT does", stacklevel=4)
            loftq = {}
        self.loftq_config = loftq if loftq else {}

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern or {}, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern or {}, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / (r**0.5) if self.use_rslora else alpha / r


@_check_keywords
@dataclass
class IA3Config(_ConfigBase):
    """IA3 configuration; field names and defaults follow ``peft.IA3Config`` (fastpeft implements all of them).

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
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("IA3")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "IA3"

    def validate(self) -> None:
        if self.init_ia3_weights not in (True, False):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            missing = [m for m in self.feedforward_modules if m not in self.target_modules]
            if missing:
                raise ValueError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; not in target_modules: {missing}"
                )


@_check_keywords
@dataclass
class VeraConfig(_ConfigBase):
    """VeRA configuration; field names and defaults follow ``peft.VeraConfig`` (fastpeft implements all of them).

    One pair of frozen random projections (A [r, max in], B [max out, r], Kaiming-uniform from a CPU generator
    seeded with ``projection_prng_key``) is shared by every adapted layer; each layer trains two vectors,
    ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out]:  y = base(x) + λ_b ⊙ (B·(λ_d ⊙ (A·dropout(x)))).

    >>> VeraConfig(r=64, target_modules=["q_proj", "v_proj"]).peft_type
    'VERA'
    """

    r: int = 256
    target_modules: TargetSpec = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("VERA")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "VERA"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"VeraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ValueError(f"VeraConfig.projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        for name in ("save_projection", "init_weights", "fan_in_fan_out", "inference_mode"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"VeraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        dropout_ok = isinstance(self.vera_dropout, (int, float)) and not isinstance(self.vera_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.vera_dropout) < 1.0):
            raise ValueError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ValueError(f"VeraConfig.d_initial must be a number, got {self.d_initial!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"VeraConfig.bias must be one of 'none', 'all', 'vera_only', got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("VeraConfig.layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("VeraConfig.layers_to_transform cannot be used when target_modules is a str (regex)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@_check_keywords
@dataclass
class AdaLoraConfig(_ConfigBase):
    """AdaLoRA configuration; field names and defaults follow ``peft.AdaLoraConfig`` (PEFT's LoraConfig fields plus
    the rank-allocation schedule).

    Each adapted layer holds an SVD-shaped update of rank ``init_r``: ``lora_A`` [r, in], ``lora_E`` [r, 1] (the
    singular values), ``lora_B`` [out, r], ΔW = B·(A ⊙ E) · lora_alpha / (init_r + 1e-5). During training
    ``model.update_and_allocate(step)`` (after ``loss.backward()``) prunes singular values by importance until
    ``target_r`` per layer remain on average (``tinit`` warm-up steps, cubic budget decrease until
    ``total_step - tfinal``, re-allocation every ``deltaT`` steps); the pruned pattern ends up in ``rank_pattern``.
    With a task_type set, the loss of the model's forward gains ``orth_reg_weight`` x the orthogonality penalty of
    A and B, as PEFT's ``PeftModelFor<Task>`` adds it. ``r`` is not used (PEFT warns too), nor is ``use_rslora``.

    >>> cfg = AdaLoraConfig(init_r=12, target_r=4, total_step=1000, target_modules=["q_proj", "v_proj"])
    >>> cfg.peft_type, cfg.init_r, cfg.tinit, cfg.deltaT
    ('ADALORA', 12, 0, 1)
    >>> AdaLoraConfig(target_modules=["q_proj"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: AdaLoraConfig.total_step must be a positive integer ...
    """

    r: int = 8
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    modules_to_save: Optional[List[str]] = None
    init_lora_weights: bool = True
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    rank_pattern: Optional[Dict[str, List[bool]]] = None  # written by the rank allocator: {"<path>.lora_E": [kept?]}
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("ADALORA")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()
    # PEFT fields fastpeft does not implement for AdaLoRA, at PEFT's defaults (PEFT itself refuses use_dora and
    # loftq_config for AdaLoRA, and ignores alpha_pattern)
    bias: Any = _peft_only("none")
    alpha_pattern: Any = _peft_only(factory=dict)
    use_dora: Any = _peft_only(False)
    loftq_config: Any = _peft_only(factory=dict)
    trainable_token_indices: Any = _peft_only(None)
    megatron_config: Any = _peft_only(None)
    megatron_core: Any = _peft_only("megatron.core")
    eva_config: Any = _peft_only(None)
    corda_config: Any = _peft_only(None)
    lora_ga_config: Any = _peft_only(None)
    velora_config: Any = _peft_only(None)
    alora_invocation_tokens: Any = _peft_only(None)
    use_qalora: Any = _peft_only(False)
    qalora_group_size: Any = _peft_only(16)
    monteclora_config: Any = _peft_only(None)
    layer_replication: Any = _peft_only(None)
    runtime_config: Any = _peft_only(factory=lambda: {"ephemeral_gpu_offload": False})
    lora_bias: Any = _peft_only(False)
    target_parameters: Any = _peft_only(None)
    use_bdlora: Any = _peft_only(None)
    arrow_config: Any = _peft_only(None)
    kasa_config: Any = _peft_only(None)
    ensure_weight_tying: Any = _peft_only(False)

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    _NOT_SAVED: ClassVar[Tuple[str, ...]] = ("runtime_config",)

    def validate(self) -> None:
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0 or (name == "deltaT" and value == 0):
                kind = "a positive integer" if name == "deltaT" else "an integer >= 0"
                raise ValueError(f"AdaLoraConfig.{name} must be {kind}, got {value!r}")
        dropout_ok = isinstance(self.lora_dropout, (int, float)) and not isinstance(self.lora_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("init_lora_weights", "fan_in_fan_out", "use_rslora", "inference_mode"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"AdaLoraConfig.{name} must be True or False, got {getattr(self, name)!r} (PEFT's "
                                 "LoRA init strings have no meaning for AdaLoRA)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("AdaLoraConfig.layers_to_transform cannot be used when target_modules is a str (regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("AdaLoraConfig.layers_pattern only works together with layers_to_transform")
        for key, kept in (self.rank_pattern or {}).items():
            if not isinstance(kept, list) or not all(type(k) is bool for k in kept):
                raise ValueError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of booleans (which of the "
                                 f"init_r singular values are kept), got {kept!r}")
        # PEFT's checks, in its order (a warning for r, errors for the rest)
        if self.r != 8:
            warnings.warn(f"AdaLoraConfig.r={self.r!r} has no effect (PEFT ignores r for AdaLoRA too); the rank "
                          "every layer starts with is init_r", stacklevel=4)
        if self.total_step is None or not _is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(f"AdaLoraConfig.total_step must be a positive integer (the number of training steps, "
                             f"which the rank budget schedule needs), got {self.total_step!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.tinit >= (self.total_step - self.tfinal):
            raise ValueError(f"AdaLoraConfig: tinit={self.tinit} leaves no rank-budgeting phase before the final "
                             f"tfinal={self.tfinal} steps of total_step={self.total_step}; it must be below "
                             "total_step - tfinal (lower tinit / tfinal or raise total_step)")

    def to_adapter_config(self, base_model_name_or_path: Optional[str] = None,
                          base_model_class: Optional[type] = None) -> Dict[str, Any]:
        """As ``_ConfigBase.to_adapter_config``; rank_pattern keys are written without the adapter name
        ("<path>.lora_E"), as PEFT's save does."""
        data = super().to_adapter_config(base_model_name_or_path, base_model_class)
        if data.get("rank_pattern"):
            data["rank_pattern"] = {re.sub(r"\.lora_E\.[^.]+$", ".lora_E", k): v for k, v in data["rank_pattern"].items()}
        return data


class _LycorisConfig(_ConfigBase):
    """What LoHa and LoKr configs share: r / alpha with per-module patterns (scaling = alpha / r, no rsLoRA), rank and
    module dropout, the layer filters."""

    def validate(self) -> None:
        name = type(self).__name__
        for label, value in [("r", self.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in (self.rank_pattern or {}).items()]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}.{label} must be a positive integer, got {value!r}")
        for field_name in ("rank_dropout", "module_dropout"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= float(value) < 1.0):
                raise ValueError(f"{name}.{field_name} must be in [0, 1), got {value!r}")
        for field_name in self._BOOLEANS:
            if type(getattr(self, field_name)) is not bool:
                raise ValueError(f"{name}.{field_name} must be True or False, got {getattr(self, field_name)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}.layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{name}.layers_to_transform cannot be used when target_modules is a str (regex)")

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern or {}, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern or {}, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling_for(self, module_name: str) -> float:
        return self.alpha_for(module_name) / self.rank_for(module_name)


@_check_keywords
@dataclass
class LoHaConfig(_LycorisConfig):
    """LoHa configuration; field names and defaults follow ``peft.LoHaConfig`` (fastpeft implements all of them for
    linear layers; ``use_effective_conv2d`` only concerns convolutions, which fastpeft does not adapt).

    ΔW = (alpha / r) · (w1_a·w1_b) ⊙ (w2_a·w2_b): a Hadamard product of two rank-r products.

    >>> LoHaConfig(r=8, alpha=16, target_modules=["q_proj"]).scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    """

    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("LOHA")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "LOHA"

    _BOOLEANS: ClassVar[Tuple[str, ...]] = ("init_weights", "use_effective_conv2d", "inference_mode")


@_check_keywords
@dataclass
class LoKrConfig(_LycorisConfig):
    """LoKr configuration; field names and defaults follow ``peft.LoKrConfig`` (fastpeft implements all of them for
    linear layers; ``use_effective_conv2d`` only concerns convolutions, which fastpeft does not adapt).

    ΔW = (alpha / r) · (w1 ⊗ w2): a Kronecker product, w1 / w2 optionally rank-r products (decompose_both, r).

    >>> LoKrConfig(r=8, alpha=16, target_modules=["q_proj"]).scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    """

    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: Union[bool, str] = True  # True, False or "lycoris"
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("LOKR")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "LOKR"

    _BOOLEANS: ClassVar[Tuple[str, ...]] = ("use_effective_conv2d", "decompose_both", "rank_dropout_scale",
                                            "inference_mode")

    def validate(self) -> None:
        super().validate()
        if not (self.init_weights is True or self.init_weights is False or self.init_weights == "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        df = self.decompose_factor
        if not isinstance(df, int) or isinstance(df, bool) or (df != -1 and df <= 0):
            raise ValueError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, got {df!r}")


@_check_keywords
@dataclass
class OFTConfig(_ConfigBase):
    """OFT configuration; field names and defaults follow ``peft.OFTConfig`` (fastpeft implements all of them for
    nn.Linear and 4-bit linear layers).

    Each adapted layer computes base(x·R): R block-diagonal and orthogonal, n blocks of ``oft_block_size`` (give
    exactly one of ``r`` = n and ``oft_block_size``; one that does not divide the layer's in_features is moved to
    the nearest divisor with a warning, as PEFT does), each the Cayley transform of a trained skew-symmetric
    block (``use_cayley_neumann``: its ``num_cayley_neumann_terms``-term Neumann series). ``block_share``: one
    block for all; ``coft`` / ``eps``: COFT's projection of the generators. ``module_dropout`` is kept and written
    but, as in PEFT 0.21, has no effect (PEFT never applies its dropout layer; ``patch`` warns).

    >>> OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"]).peft_type
    'OFT'
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: TargetSpec = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("OFT")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "OFT"

    def validate(self) -> None:
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"OFTConfig.{name} must be a non-negative integer, got {value!r}")
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError("OFTConfig needs r or oft_block_size non-zero; both are 0")
        if self.r != 0 and self.oft_block_size != 0:
            raise ValueError(f"OFTConfig takes either r ({self.r}) or oft_block_size ({self.oft_block_size}), not "
                             "both (r x oft_block_size = in_features): set the other one to 0")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann", "inference_mode"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"OFTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        dropout_ok = isinstance(self.module_dropout, (int, float)) and not isinstance(self.module_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.module_dropout) < 1.0):
            raise ValueError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or self.eps < 0:
            raise ValueError(f"OFTConfig.eps must be a non-negative number, got {self.eps!r}")
        if self.bias not in ("none", "all", "oft_only"):
            raise ValueError(f"OFTConfig.bias must be one of 'none', 'all', 'oft_only', got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("OFTConfig.layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("OFTConfig.layers_to_transform cannot be used when target_modules is a str (regex)")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        """As PEFT loads an OFT adapter_config.json: files from before PEFT 0.14 (no ``oft_block_size``; another
        parametrisation) are refused, and Cayley-Neumann files from before 0.18 (a changed series) warn."""
        if "oft_block_size" not in data:
            raise ValueError("this OFT adapter_config.json has no oft_block_size: it was written by PEFT < 0.14, whose "
                             "OFT weights are not compatible with PEFT >= 0.14 (nor with fastpeft); retrain the "
                             "adapter with a newer PEFT or fastpeft")
        if data.get("use_cayley_neumann", False):
            version = str(data.get("peft_version") or "0.0.0").partition("@")[0]
            if _version_tuple(version) < (0, 18, 0):
                warnings.warn("this OFT adapter uses the Cayley-Neumann parametrisation and was saved by PEFT "
                              f"{version if data.get('peft_version') else '< 0.18'}; PEFT 0.18 changed that series, "
                              "so its numbers differ from the ones it was trained with (PEFT warns the same)",
                              stacklevel=2)
        return super().from_dict(data)


def _version_tuple(version: str) -> Tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        numbers.append(int(digits.group(0)) if digits else 0)
    return tuple(numbers)


@_check_keywords
@dataclass
class TrainableTokensConfig(_ConfigBase):
    """PEFT's standalone trainable tokens (``peft.TrainableTokensConfig``, peft_type TRAINABLE_TOKENS): only the rows
    ``token_indices`` of the layers ``target_modules`` train (default: the input embedding; a head tied to it follows
    it). fastpeft implements all of its fields; next to LoRA, use ``LoraConfig(trainable_token_indices=...)``.

    >>> TrainableTokensConfig(token_indices=[3, 5]).peft_type
    'TRAINABLE_TOKENS'
    """

    token_indices: List[int] = field(default_factory=list)
    target_modules: TargetSpec = None
    init_weights: bool = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("TRAINABLE_TOKENS")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()

    PEFT_TYPE: ClassVar[str] = "TRAINABLE_TOKENS"

    def validate(self) -> None:
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        if self.token_indices != []:  # PEFT's default []: refused when the model is patched, not here
            self.token_indices = _token_id_list(self.token_indices, "TrainableTokensConfig.token_indices")
        if type(self.init_weights) is not bool:
            raise ValueError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")
        targets = self.target_modules
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets))):
            raise ValueError("TrainableTokensConfig.target_modules must be None (the input embedding), a regex or a "
                             f"list of module names, got {targets!r}")


# -- prompt learning (prompt tuning, prefix tuning, P-tuning) -------------------------------------------------------
# These change the model's inputs, not its layers (fastpeft/prompt_learning.py). The fields shared by the three are
# those of PEFT's PromptLearningConfig; num_layers / token_dim / num_attention_heads / encoder_hidden_size left at
# None are filled in from the model when it is patched, as PEFT does, and written to adapter_config.json.
PROMPT_LEARNING_TYPES: Tuple[str, ...] = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
PROMPT_TUNING_INITS: Tuple[str, ...] = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
# multitask prompt tuning: its own init values (PEFT's MultitaskPromptTuningInit); the last three read a trained
# source prompt from prompt_tuning_init_state_dict_path
MULTITASK_PROMPT_TUNING_INITS: Tuple[str, ...] = ("RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK",
                                                  "ONLY_SOURCE_SHARED")
PROMPT_ENCODER_TYPES: Tuple[str, ...] = ("MLP", "LSTM")


def _optional_positive_int(cls_name: str, name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{cls_name}.{name} must be None or a positive integer, got {value!r}")


class _PromptLearningBase(_ConfigBase):
    def validate(self) -> None:
        name = type(self).__name__
        for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            _optional_positive_int(name, key, getattr(self, key))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"{name}.num_transformer_submodules must be None, 1 or 2, got "
                             f"{self.num_transformer_submodules!r}")
        if type(self.inference_mode) is not bool:
            raise ValueError(f"{name}.inference_mode must be True or False, got {self.inference_mode!r}")


@_check_keywords
@dataclass
class PromptTuningConfig(_PromptLearningBase):
    """Prompt tuning (``num_virtual_tokens`` trained embeddings put in front of the input); field names and
    defaults follow ``peft.PromptTuningConfig``. fastpeft implements it for causal LMs
    (``task_type="CAUSAL_LM"``) and encoder-decoder models (``"SEQ_2_SEQ_LM"``).

    ``prompt_tuning_init``: "RANDOM" (PEFT's default), "TEXT" (the embeddings of ``prompt_tuning_init_text``,
    tokenized by ``AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs)``, cut or repeated to
    ``num_virtual_tokens``) or "SAMPLE_VOCAB" (the embeddings of random vocabulary tokens).

    >>> PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8).peft_type
    'PROMPT_TUNING'
    >>> PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path ...
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[Dict[str, Any]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("PROMPT_TUNING")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()
    # PEFT fields fastpeft does not implement, at PEFT's defaults
    modules_to_save: Any = _peft_only(None)

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    def validate(self) -> None:
        super().validate()
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init)
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, got "
                             f"{self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT":
            # PEFT refuses these at construction too
            if not self.tokenizer_name_or_path:
                raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the "
                                 "tokenizer that turns prompt_tuning_init_text into token ids)")
            if self.prompt_tuning_init_text is None:
                raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ValueError("PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@_check_keywords
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning (PEFT's ``MultitaskPromptTuningConfig``): prompt tuning whose prompt is, per task,
    the shared trained vectors times a rank-``num_ranks`` task matrix (``prefix_task_cols[t] @
    prefix_task_rows[t]``); ``model(..., task_ids=...)`` / ``generate(..., task_ids=...)`` choose each row's task.

    ``prompt_tuning_init``: "RANDOM", "TEXT" (as prompt tuning), or from a trained source prompt saved by fastpeft or
    PEFT (``prompt_tuning_init_state_dict_path``, a ``.safetensors`` file): "AVERAGE_SOURCE_TASKS" (the source's
    shared vectors and its task matrices averaged over tasks), "EXACT_SOURCE_TASK" (those of task
    ``prompt_tuning_init_task``) or "ONLY_SOURCE_SHARED" (the shared vectors only).

    >>> MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, num_tasks=3, num_ranks=2).peft_type
    'MULTITASK_PROMPT_TUNING'
    """

    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: Optional[int] = 0
    num_ranks: Optional[int] = 1
    num_tasks: Optional[int] = 1
    peft_type: Optional[str] = _peft_type_field("MULTITASK_PROMPT_TUNING")

    PEFT_TYPE: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    def validate(self) -> None:
        _PromptLearningBase.validate(self)
        name = type(self).__name__
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init)
        if self.prompt_tuning_init not in MULTITASK_PROMPT_TUNING_INITS:
            raise ValueError(f"{name}.prompt_tuning_init must be one of {MULTITASK_PROMPT_TUNING_INITS}, got "
                             f"{self.prompt_tuning_init!r}")
        for key in ("num_ranks", "num_tasks"):
            _optional_positive_int(name, key, getattr(self, key))
            if getattr(self, key) is None:
                raise ValueError(f"{name}.{key} must be a positive integer, got None")
        task = self.prompt_tuning_init_task
        if not isinstance(task, int) or isinstance(task, bool) or task < 0:
            raise ValueError(f"{name}.prompt_tuning_init_task must be a task index >= 0, got {task!r}")
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None:
                raise ValueError(f"{name}: prompt_tuning_init='TEXT' needs tokenizer_name_or_path and "
                                 "prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ValueError(f"{name}.tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@_check_keywords
@dataclass
class PrefixTuningConfig(_PromptLearningBase):
    """Prefix tuning (trained keys and values in front of every attention layer's cache); field names and
    defaults follow ``peft.PrefixTuningConfig``. fastpeft implements it for causal LMs
    (``task_type="CAUSAL_LM"``) and encoder-decoder models (``"SEQ_2_SEQ_LM"``).

    ``prefix_projection=True`` computes the prefix with a two-layer MLP (hidden size ``encoder_hidden_size``) from
    ``num_virtual_tokens`` embeddings; ``init_weights="zero"`` starts from an all-zero prefix.

    >>> PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True).peft_type
    'PREFIX_TUNING'
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("PREFIX_TUNING")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()
    # PEFT fields fastpeft does not implement, at PEFT's defaults
    modules_to_save: Any = _peft_only(None)

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if type(self.prefix_projection) is not bool:
            raise ValueError(f"PrefixTuningConfig.prefix_projection must be True or False, got "
                             f"{self.prefix_projection!r}")
        _optional_positive_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)


@_check_keywords
@dataclass
class PromptEncoderConfig(_PromptLearningBase):
    """P-tuning (virtual-token embeddings passed through a trained MLP or LSTM + MLP encoder, put in front of the
    input); field names and defaults follow ``peft.PromptEncoderConfig``. fastpeft implements it for causal LMs
    (``task_type="CAUSAL_LM"``) and encoder-decoder models (``"SEQ_2_SEQ_LM"``).

    >>> PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_reparameterization_type="LSTM").peft_type
    'P_TUNING'
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # PEFT's bookkeeping
    peft_type: Optional[str] = _peft_type_field("P_TUNING")
    peft_version: Optional[str] = _save_metadata()
    auto_mapping: Optional[Dict[str, Any]] = _save_metadata()
    # PEFT fields fastpeft does not implement, at PEFT's defaults
    modules_to_save: Any = _peft_only(None)

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    def validate(self) -> None:
        super().validate()
        self.encoder_reparameterization_type = _enum_value(self.encoder_reparameterization_type)
        if self.encoder_reparameterization_type not in PROMPT_ENCODER_TYPES:
            raise ValueError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of "
                             f"{PROMPT_ENCODER_TYPES}, got {self.encoder_reparameterization_type!r}")
        _optional_positive_int("PromptEncoderConfig", "encoder_hidden_size", self.encoder_hidden_size)
        _optional_positive_int("PromptEncoderConfig", "encoder_num_layers", self.encoder_num_layers)
        dropout_ok = isinstance(self.encoder_dropout, (int, float)) and not isinstance(self.encoder_dropout, bool)
        if not dropout_ok or not (0.0 <= float(self.encoder_dropout) < 1.0):
            raise ValueError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


PromptLearningConfig = Union[PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, MultitaskPromptTuningConfig]
AdapterConfig = Union[LoraConfig, IA3Config, VeraConfig, LoHaConfig, LoKrConfig, OFTConfig, TrainableTokensConfig,
                      PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, AdaLoraConfig,
                      MultitaskPromptTuningConfig]
_CONFIG_CLASSES = {cls.PEFT_TYPE: cls for cls in (LoraConfig, IA3Config, VeraConfig, LoHaConfig, LoKrConfig, OFTConfig,
                                                  TrainableTokensConfig, PromptTuningConfig,
                                                  PrefixTuningConfig, PromptEncoderConfig, AdaLoraConfig,
                                                  MultitaskPromptTuningConfig)}


def is_prompt_learning(config: Any) -> bool:
    """Whether ``config`` (a fastpeft config or a peft_type string) is prompt tuning, prefix tuning, P-tuning or
    multitask prompt tuning."""
    return _enum_value(getattr(config, "peft_type", config)) in PROMPT_LEARNING_TYPES


def pissa_niter(init: Any) -> Optional[int]:
    """N for init_lora_weights="pissa_niter_N" (randomized SVD with N subspace iterations), else None.

    >>> pissa_niter("pissa_niter_4"), pissa_niter("pissa"), pissa_niter(True)
    (4, None, None)
    """
    if isinstance(init, str):
        found = re.fullmatch(r"pissa_niter_(\d+)", init)
        if found:
            return int(found.group(1))
    return None


BASE_MUTATING_INITS = ("pissa", "olora", "loftq")  # and every "pissa_niter_N"


def changes_base_weights(init: Any) -> bool:
    """Whether init_lora_weights rewrites the frozen base weights (PiSSA, OLoRA, LoftQ) as PEFT does."""
    return init in BASE_MUTATING_INITS or pissa_niter(init) is not None


def match_pattern_key(patterns: Dict[str, Any], module_name: str) -> Optional[str]:
    """The first key of rank_pattern / alpha_pattern that matches module_name (PEFT's rule: a suffix regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _suffixes(name: str) -> List[str]:
    # "a.b.c" -> ["c", "b.c", "a.b.c"]: the ways a target_modules entry can name this module, shortest first
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def peft_stored_targets(peft_type: str, targets: Iterable[str], module_names: Iterable[str]) -> List[str]:
    """The target_modules list PEFT stores (and writes) for a resolved target list, sorted.

    ``targets``: the list PEFT matches with. For ``"all-linear"`` that is the full name of every ``nn.Linear`` /
    ``Conv1D`` module except the output embedding (``get_output_embeddings()``; for a SEQ_CLS model without one,
    its classifier head), before exclude_modules / layers_to_transform are applied. For None it is the
    architecture's default list; for a list, the list given. ``module_names``: every name of
    ``model.named_modules()`` of the model being adapted (the root "" included).

    For every method but IA3, with at least ``PEFT_CONDENSE_MIN_TARGETS`` entries PEFT stores a shorter list when one exists: for
    each target, in the order of their suffix lists, the shortest suffix that no other module ends with, unless
    a suffix chosen earlier already covers it. IA3 and shorter lists are stored as given.

    >>> names = [f"model.layers.{i}.self_attn.{p}" for i in range(5) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    >>> peft_stored_targets("LORA", names, ["", "model", "lm_head"] + names)
    ['k_proj', 'o_proj', 'q_proj', 'v_proj']
    >>> peft_stored_targets("IA3", names, ["", "model", "lm_head"] + names) == sorted(names)
    True
    """
    targets = set(targets)
    if _enum_value(peft_type) == "IA3" or len(targets) < PEFT_CONDENSE_MIN_TARGETS:
        return sorted(targets)
    if "" in targets:
        raise ValueError("target_modules must not contain an empty name")
    endings = tuple("." + t for t in targets)
    others = [n for n in module_names if n not in targets and not n.endswith(endings)]
    taken_by_others = {s for name in others for s in _suffixes(name)}
    chosen: set = set()
    for name in sorted(targets, key=_suffixes):
        if name in chosen or any(name.endswith("." + c) for c in chosen):
            continue  # already selected by a suffix chosen for an earlier target
        pick = next((s for s in _suffixes(name) if s not in taken_by_others), None)
        if pick is not None:
            chosen.add(pick)
    if not chosen or len(chosen) >= len(targets):
        return sorted(targets)
    return sorted(chosen)


def to_fastpeft_config(config: Any) -> AdapterConfig:
    """Accept a fastpeft config, the PEFT config of the same name (LoraConfig, IA3Config, VeraConfig, LoHaConfig,
    LoKrConfig, OFTConfig, TrainableTokensConfig, PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig), or a dict from adapter_config.json.

    >>> to_fastpeft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": False}).r
    4
    """
    if isinstance(config, tuple(_CONFIG_CLASSES.values())):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        peft_type = str(_enum_value(config.get("peft_type", ""))).upper()
        if peft_type in _CONFIG_CLASSES:
            return _CONFIG_CLASSES[peft_type].from_dict(config)
        raise ValueError(f"unsupported peft_type {config.get('peft_type')!r}; fastpeft supports "
                         f"{', '.join(map(repr, _CONFIG_CLASSES))}")
    peft_type = getattr(config, "peft_type", None)
    if peft_type is not None and dataclasses.is_dataclass(config):
        # a PEFT config object: its dataclass fields are exactly what its adapter_config.json would hold
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        data["peft_type"] = str(_enum_value(peft_type))
        return to_fastpeft_config(data)
    raise TypeError(
        f"expected a fastpeft / peft config ({', '.join(c.__name__ for c in _CONFIG_CLASSES.values())}) or an "
        f"adapter_config.json dict, got {type(config).__name__}"
    )

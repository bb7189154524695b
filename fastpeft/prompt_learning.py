"""Prompt learning in place: prompt tuning, prefix tuning and P-tuning (PEFT's ``PeftModelForCausalLM`` behaviour on a
decoder-only causal LM, ``PeftModelForSeq2SeqLM``'s on an encoder-decoder model, on the transformers model itself).

These methods change the model's inputs, not its layers. ``fastpeft.patch(model, PromptTuningConfig(...))``

* registers ``model.prompt_encoder`` (an ``nn.ModuleDict`` {adapter name: encoder from nn/prompt_encoders.py}, so
  parameter names are PEFT's ``prompt_encoder.default.embedding.weight`` and ``model.parameters()`` / ``.to()`` /
  optimizers see it) and freezes every other parameter;
* routes ``model.forward``, ``model.generate`` and, for the duration of a generate call,
  ``model.prepare_inputs_for_generation`` through this module (instance attributes; the class is untouched).

``forward`` does what PEFT's ``PeftModelForCausalLM.forward`` does. Prompt tuning / P-tuning: the prompt vectors
go in front of the input embeddings, the attention mask gets ``num_virtual_tokens`` ones in front, labels get as
many -100s, and the logits cover the virtual tokens too ([batch, virtual + seq, vocab]). Prefix tuning: the
prefix is passed as a ``DynamicCache`` of ``num_virtual_tokens`` keys / values per layer, the attention mask is
extended the same way, and the logits cover the real tokens only. ``generate`` runs the model's own generate with
PEFT's ``prepare_inputs_for_generation`` (the prompt is added at the prefill step only).

Everything installed here is undone by ``fastpeft.unpatch`` (``_Routing.remove``, kept in ``PatchState.hooks``).
Encoder-decoder models (``task_type="SEQ_2_SEQ_LM"``): ``_forward_seq2seq`` / ``_generate_seq2seq_prompt`` /
``_prepare_seq2seq_prefix`` (the prompt in front of the encoder's inputs, or the prefix in the decoder's cache).
One prompt-learning adapter per model; the rest is refused with an error that says so.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from packaging.version import parse as parse_version

from .config import (MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig,
                     PromptTuningConfig, is_prompt_learning)
from .model_state import (
    ADAPTER_TYPES,
    PROMPT_ENCODER_ATTR,
    STATE_ATTR,
    ModelRef,
    PatchState,
    Transaction,
    apply_trainable,
    get_state,
    is_peft_model,
    is_peft_tuner_layer,
    record_requires_grad,
)
from .nn import MultitaskPromptEmbedding, PrefixEncoder, PromptEmbedding, PromptEncoder

__all__ = ["add_prompt_adapter", "disabled", "prompt_state_dict", "plan_load", "check_loadable", "check_removable"]

_ROUTED = ("forward", "generate")
_PREPARE = "prepare_inputs_for_generation"
_CACHE_KEYS = ("cache", "past_key_values")
# Models whose cache PEFT builds layer by layer from the config (sliding-window / shared-KV layers); not implemented.
_PREFIX_UNSUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma4", "gemma3", "gemma3n")


# -- checks and config resolution --------------------------------------------------------------------------------
def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"prompt learning needs a transformers causal LM (a model with .config); got "
                         f"{type(model).__name__}")
    return config


def is_seq2seq(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder model (T5, BART, mt0, ...): PEFT's ``PeftModelForSeq2SeqLM``."""
    return bool(getattr(_model_config(model), "is_encoder_decoder", False))


def _check_model(model: nn.Module, cfg: PromptLearningConfig) -> None:
    config = _model_config(model)
    seq2seq = is_seq2seq(model)
    wanted = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    if cfg.task_type != wanted:
        kind = "an encoder-decoder model" if seq2seq else "a decoder-only model"
        raise ValueError(
            f"{type(model).__name__} is {kind}: set task_type={wanted!r} for {cfg.peft_type} (got {cfg.task_type!r}; "
            "PEFT too needs a task type for prompt learning; fastpeft implements CAUSAL_LM on decoder-only models and "
            "SEQ_2_SEQ_LM on encoder-decoder models, not sequence classification, token classification, ...)")
    if not seq2seq and cfg.num_transformer_submodules == 2:
        raise ValueError(f"{type(cfg).__name__}.num_transformer_submodules=2 is for encoder-decoder models; "
                         f"{type(model).__name__} is decoder-only (leave it None or set 1)")
    if seq2seq and isinstance(cfg, PrefixTuningConfig):
        if cfg.num_transformer_submodules == 1:
            raise NotImplementedError(
                "prefix tuning on an encoder-decoder model with num_transformer_submodules=1 is not implemented "
                "(PEFT then hands the model a decoder-only cache); leave it None (2: a prefix for the encoder and one "
                "for the decoder's self- and cross-attention)")
        layers = getattr(config, "num_layers", None), getattr(config, "num_decoder_layers", None)
        if None not in layers and layers[0] != layers[1]:
            raise NotImplementedError(
                f"prefix tuning on an encoder-decoder model with {layers[0]} encoder and {layers[1]} decoder layers: "
                "PEFT builds one prefix per encoder layer and uses it for the decoder too; fastpeft supports equal "
                "counts only")
    if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); prompt learning "
                         "needs them")
    if not hasattr(type(model), "generate"):
        raise ValueError(f"{type(model).__name__} is not a generation model; prompt learning in fastpeft is for "
                         "causal LMs (e.g. AutoModelForCausalLM)")
    if cfg.num_virtual_tokens is None:
        raise ValueError(f"{type(cfg).__name__}.num_virtual_tokens must be set (a positive integer)")
    if hasattr(model, PROMPT_ENCODER_ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute {PROMPT_ENCODER_ATTR!r}; fastpeft "
                         "registers the prompt encoder under that name (PEFT's)")
    if isinstance(cfg, PrefixTuningConfig):
        if getattr(_text_config(model), "model_type", "") in _PREFIX_UNSUPPORTED_MODEL_TYPES or \
                getattr(config, "model_type", "") in _PREFIX_UNSUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"prefix tuning on {config.model_type} (whose KV cache PEFT builds layer by layer from the config) "
                "is not implemented in fastpeft; prompt tuning and P-tuning work there")
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ValueError("prefix tuning does not work with gradient checkpointing (PEFT refuses it too): the "
                             "prefix lives in the KV cache, which checkpointed layers do not use")


def _text_config(model: nn.Module):
    config = _model_config(model)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def resolve_config(model: nn.Module, cfg: PromptLearningConfig) -> PromptLearningConfig:
    """Fill num_layers / token_dim / num_attention_heads / encoder_hidden_size / num_transformer_submodules left at
    None from the model's config, by PEFT's rules (``_prepare_prompt_learning_config``); ``cfg`` is changed in place
    and returned. Prefix tuning on a grouped-query-attention model stores the key / value size: token_dim =
    head_dim * num_key_value_heads, num_attention_heads = num_key_value_heads."""
    original = _model_config(model)
    data = original.to_dict()
    if "text_config" in data and isinstance(data["text_config"], dict):
        data = data["text_config"]

    def first(keys, what):
        for key in keys:
            if key in data and data[key] is not None:
                return data[key]
        raise ValueError(f"cannot read {what} from the model config; set {type(cfg).__name__}.{what}")

    if cfg.num_layers is None:
        layers = getattr(original, "num_hidden_layers", None)
        cfg.num_layers = layers if layers is not None else first(("num_hidden_layers", "num_layers", "n_layer"),
                                                                 "num_layers")
    if cfg.token_dim is None:
        cfg.token_dim = first(("hidden_size", "n_embd", "d_model"), "token_dim")
    if cfg.num_attention_heads is None:
        cfg.num_attention_heads = first(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
                                        "num_attention_heads")
    if isinstance(cfg, PrefixTuningConfig) and "num_key_value_heads" in data:
        if data.get("global_head_dim") is not None or data.get("per_layer_config") is not None:
            raise NotImplementedError("prefix tuning on models with per-layer key / value shapes is not implemented "
                                      "in fastpeft")
        head_dim = data.get("head_dim") or cfg.token_dim // cfg.num_attention_heads
        cfg.token_dim = head_dim * data["num_key_value_heads"]
        cfg.num_attention_heads = data["num_key_value_heads"]
    if getattr(cfg, "encoder_hidden_size", 0) is None:
        cfg.encoder_hidden_size = cfg.token_dim
    if cfg.num_transformer_submodules is None:  # PEFT's PeftModel: two for SEQ_2_SEQ_LM (encoder and decoder)
        cfg.num_transformer_submodules = 2 if cfg.task_type == "SEQ_2_SEQ_LM" else 1
    if cfg.token_dim % cfg.num_attention_heads and isinstance(cfg, PrefixTuningConfig):
        raise ValueError(f"PrefixTuningConfig.token_dim ({cfg.token_dim}) must be a multiple of num_attention_heads "
                         f"({cfg.num_attention_heads})")
    return cfg


def check_loadable(cfg: PromptLearningConfig, is_trainable: bool) -> None:
    """A saved prompt-learning adapter holds only ``prompt_embeddings``, the encoder's output per virtual token.
    Training can resume from it only where that output is the trained table itself."""
    if not is_trainable:
        return
    if isinstance(cfg, PromptEncoderConfig) or (isinstance(cfg, PrefixTuningConfig) and cfg.prefix_projection):
        what = "P-tuning" if isinstance(cfg, PromptEncoderConfig) else "prefix tuning with prefix_projection=True"
        raise ValueError(
            f"cannot load a {what} adapter with is_trainable=True: PEFT saves only the encoder's output "
            "(prompt_embeddings), not the encoder's weights, so training cannot resume from the file (PEFT refuses "
            "is_trainable=True for every prompt-learning adapter). Load it with is_trainable=False for inference.")


# -- the encoder ---------------------------------------------------------------------------------------------------
def _transformers():
    # transformers is imported on first use, not at the top: `import fastpeft` stays light (it costs ~1 s)
    import transformers

    return transformers


def _text_init_ids(cfg: PromptTuningConfig, total: int) -> List[int]:
    kwargs = dict(cfg.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as PEFT: a saved config must not run code when the adapter is built
    tokenizer = _transformers().AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(cfg.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {cfg.prompt_tuning_init_text!r} gives no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]  # cut, or repeated until num_virtual_tokens are filled


def _build_encoder(cfg: PromptLearningConfig, word_embeddings: nn.Module, initialize: bool) -> nn.Module:
    total = cfg.num_virtual_tokens * cfg.num_transformer_submodules
    if isinstance(cfg, MultitaskPromptTuningConfig):
        source = _source_prompt(cfg) if initialize and cfg.prompt_tuning_init not in ("RANDOM", "TEXT") else None
        encoder = MultitaskPromptEmbedding(total, cfg.token_dim, cfg.num_tasks, cfg.num_ranks)
        if initialize and not cfg.inference_mode and cfg.prompt_tuning_init == "TEXT":
            ids = torch.tensor(_text_init_ids(cfg, total), dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                encoder.init_from(word_embeddings(ids))
        if source is not None:
            _init_from_source(cfg, encoder, source)
    elif isinstance(cfg, PromptTuningConfig):
        encoder = PromptEmbedding(total, cfg.token_dim)
        if initialize and not cfg.inference_mode and cfg.prompt_tuning_init != "RANDOM":
            device = word_embeddings.weight.device
            if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
                ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long).to(device)
            else:
                ids = torch.tensor(_text_init_ids(cfg, total), dtype=torch.long, device=device)
            with torch.no_grad():
                encoder.init_from(word_embeddings(ids))
    elif isinstance(cfg, PrefixTuningConfig):
        encoder = PrefixEncoder(cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers, cfg.encoder_hidden_size,
                                cfg.prefix_projection, cfg.init_weights, cfg.inference_mode)
    else:
        if cfg.encoder_reparameterization_type == "MLP" and cfg.encoder_num_layers != 2:
            warnings.warn(f"PromptEncoderConfig.encoder_num_layers={cfg.encoder_num_layers} is ignored for the MLP "
                          "encoder: it has exactly 2 hidden layers (as in PEFT)")
        encoder = PromptEncoder(total, cfg.token_dim, cfg.encoder_hidden_size, cfg.encoder_reparameterization_type,
                                cfg.encoder_num_layers, float(cfg.encoder_dropout), cfg.inference_mode)
    return encoder.to(word_embeddings.weight.device)


def _source_prompt(cfg: MultitaskPromptTuningConfig) -> Dict[str, torch.Tensor]:
    """The trained source prompt of AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK / ONLY_SOURCE_SHARED (a multitask
    prompt-tuning adapter_model.safetensors, fastpeft's or PEFT's)."""
    path = cfg.prompt_tuning_init_state_dict_path
    if path is None:
        raise ValueError(f"MultitaskPromptTuningConfig: prompt_tuning_init={cfg.prompt_tuning_init!r} needs "
                         "prompt_tuning_init_state_dict_path (the source prompt's adapter_model.safetensors)")
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"prompt_tuning_init_state_dict_path={path!r}: fastpeft reads source prompts from "
                         ".safetensors files only (PEFT also accepts pickled torch files; fastpeft never unpickles)")
    from safetensors.torch import load_file

    source = load_file(str(path))
    needed = {"prompt_embeddings"} | ({"prefix_task_cols", "prefix_task_rows"}
                                      if cfg.prompt_tuning_init != "ONLY_SOURCE_SHARED" else set())
    if not needed <= set(source):
        raise ValueError(f"{path} holds {sorted(source)}; a {cfg.prompt_tuning_init} init needs {sorted(needed)}")
    return source


def _init_from_source(cfg: MultitaskPromptTuningConfig, encoder: MultitaskPromptEmbedding,
                      source: Dict[str, torch.Tensor]) -> None:
    values = {"embedding.weight": source["prompt_embeddings"]}
    if cfg.prompt_tuning_init != "ONLY_SOURCE_SHARED":
        cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
        if cfg.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            task = cfg.prompt_tuning_init_task
            if task >= cols.shape[0]:
                raise ValueError(f"prompt_tuning_init_task={task} but the source prompt has {cols.shape[0]} tasks")
            cols, rows = cols[task].unsqueeze(0), rows[task].unsqueeze(0)
        values.update(prefix_task_cols=cols, prefix_task_rows=rows)
    params = dict(encoder.named_parameters())
    for key, value in values.items():  # PEFT's load_state_dict: shapes must match (one task for the averaged init)
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"the source prompt's {key} has shape {tuple(value.shape)}; this adapter needs "
                             f"{tuple(params[key].shape)} (num_virtual_tokens / token_dim / num_ranks; num_tasks=1 for "
                             f"{cfg.prompt_tuning_init})")
        with torch.no_grad():
            params[key].copy_(value)


# -- what is installed on the model ----------------------------------------------------------------------------------
class _Routed:
    """A method routed through this module: ``fn(routing, ...)``. It shows the replaced method's signature
    (transformers' generate and Trainer read ``inspect.signature(model.forward)``) and holds no bound method, so a
    patched model still deep-copies and pickles."""

    # no fastpeft_hook mark: peft_interop.unroute_peft_methods must leave these to _Routing.remove, which puts back
    # what they replaced

    def __init__(self, fn, routing: "_Routing", attr: str):
        self.fn, self.routing, self.attr = fn, routing, attr

    def __call__(self, *args, **kwargs):
        return self.fn(self.routing, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.routing.base(self.attr))


class _Routing:
    """The instance attributes prompt learning installs on the model (and the encoder it registers); ``remove``
    puts back exactly what was there before. Kept in ``PatchState.hooks``, so ``unpatch`` calls ``remove``."""

    def __init__(self, model: nn.Module):
        self._model_ref = ModelRef(model)  # the model holds this routing: no cycle back
        self.previous: Dict[str, Any] = {}  # instance attributes replaced (accelerate's forward hook, ...)
        self.installed: Dict[str, _Routed] = {}
        self.generating = False
        self.disabled = False
        self.task_ids: Optional[torch.Tensor] = None  # multitask prompt tuning: the rows' tasks during generate()
        signature = inspect.signature(model.forward)
        # positional parameters of the model's forward, to read positional calls by
        self.positional = [p.name for p in signature.parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # the forward keyword of the KV cache: "cache" from transformers 5.x on, "past_key_values" before
        self.cache_key = "cache" if "cache" in signature.parameters else "past_key_values"

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise ReferenceError("fastpeft: prompt learning's routing outlived its model")
        return model

    def base(self, attr: str):
        """The method that was in effect before patch: an instance attribute it replaced, or the class's."""
        if attr in self.previous:
            return self.previous[attr]
        return getattr(type(self.model), attr).__get__(self.model)

    def install(self) -> None:
        for attr, fn in (("forward", _forward), ("generate", _generate)):
            if attr in self.model.__dict__:
                self.previous[attr] = self.model.__dict__[attr]
            routed = _Routed(fn, self, attr)
            self.model.__dict__[attr] = routed
            self.installed[attr] = routed

    def is_intact(self) -> bool:
        return all(self.model.__dict__.get(attr) is fn for attr, fn in self.installed.items())

    def remove(self) -> None:
        for attr, fn in self.installed.items():
            if self.model.__dict__.get(attr) is fn:
                if attr in self.previous:
                    self.model.__dict__[attr] = self.previous[attr]
                else:
                    del self.model.__dict__[attr]
        self.installed.clear()
        if PROMPT_ENCODER_ATTR in self.model._modules:
            del self.model._modules[PROMPT_ENCODER_ATTR]


def _routing(model: nn.Module) -> _Routing:
    state = get_state(model)
    for hook in state.hooks:
        if isinstance(hook, _Routing):
            return hook
    raise ValueError("this model holds no fastpeft prompt-learning adapter")


def add_prompt_adapter(model: nn.Module, cfg: PromptLearningConfig, adapter_name: str = "default",
                       initialize: bool = True, check: Optional[Callable[[], None]] = None) -> nn.Module:
    """Patch a prompt-learning adapter into ``model`` (``fastpeft.patch`` calls this); atomic: on any error the model
    is left as it was. ``initialize=False`` skips TEXT / SAMPLE_VOCAB initialisation (the values are about to be
    loaded from a file); ``check()`` runs once the adapter is in place, and if it raises everything is undone
    (load_adapter checks the file against the new encoder this way)."""
    state = get_state(model, required=False)
    if state is not None:
        if is_prompt_learning(state.peft_type) and is_prompt_learning(cfg):
            raise NotImplementedError(
                f"this model already holds the {state.peft_type} adapter {next(iter(state.configs))!r}; fastpeft "
                f"supports one prompt-learning adapter per model (cannot add {adapter_name!r}): unpatch first, or use "
                "a second copy of the model")
        prompt_type = state.peft_type if is_prompt_learning(state.peft_type) else cfg.peft_type
        raise ValueError(
            f"this model holds {state.peft_type} adapters; fastpeft does not combine a prompt-learning adapter "
            f"({prompt_type}) with LoRA / IA3 / VeRA / LoHa / LoKr / OFT / AdaLoRA adapters on one model (cannot add the {cfg.peft_type} "
            f"adapter {adapter_name!r}): fastpeft.unpatch(model) first")
    if not is_prompt_learning(cfg):
        raise TypeError(f"expected a prompt-learning config, got {type(cfg).__name__}")
    if is_peft_model(model):
        raise ValueError("this is a peft.PeftModel; fastpeft patches prompt-learning adapters into the plain "
                         "transformers model (peft_model.get_base_model() without PEFT's adapter)")
    if any(isinstance(m, ADAPTER_TYPES) or is_peft_tuner_layer(m) for m in model.modules()):
        raise ValueError("this model holds adapter layers (fastpeft's or PEFT's) that are not managed by fastpeft "
                         "here; a prompt-learning adapter is not combined with them")
    _check_model(model, cfg)
    cfg = resolve_config(model, cfg)
    encoder = _build_encoder(cfg, model.get_input_embeddings(), initialize)  # nothing on the model changed yet
    state = PatchState(peft_type=cfg.peft_type, active=adapter_name)
    record_requires_grad(state, model)
    txn = Transaction(model)
    routing = _Routing(model)
    try:
        model.add_module(PROMPT_ENCODER_ATTR, nn.ModuleDict({adapter_name: encoder}))
        state.configs[adapter_name] = cfg
        state.trainable[adapter_name] = not cfg.inference_mode
        record_requires_grad(state, model)
        routing.install()
        state.hooks.append(routing)
        model.__dict__[STATE_ATTR] = state
        apply_trainable(model, state, txn)  # PEFT freezes the whole base model; only the encoder trains
        if check is not None:
            check()
    except BaseException:
        txn.rollback()
        routing.remove()
        model.__dict__.pop(STATE_ATTR, None)
        raise
    return model


def check_removable(model: nn.Module) -> None:
    """unpatch refuses (before changing anything) when someone replaced ``model.forward`` / ``generate`` after
    patch: removing ours would drop theirs too."""
    routing = _routing(model)
    if not routing.is_intact():
        raise ValueError("model.forward / model.generate were replaced after fastpeft.patch (e.g. by accelerate or a "
                         "trainer); undo that first, then fastpeft.unpatch(model)")


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block forward and generate are the base model's (PEFT's disable_adapter for prompt learning)."""
    routing = _routing(model)
    before = routing.disabled
    routing.disabled = True
    try:
        yield
    finally:
        routing.disabled = before


# -- the prompt --------------------------------------------------------------------------------------------------------
def _active(model: nn.Module) -> Tuple[PromptLearningConfig, nn.Module]:
    state = get_state(model)
    return state.configs[state.active], getattr(model, PROMPT_ENCODER_ATTR)[state.active]


def _prompt_tokens(cfg: PromptLearningConfig, encoder: nn.Module, batch_size: int) -> torch.Tensor:
    tokens = torch.arange(cfg.num_virtual_tokens * cfg.num_transformer_submodules, device=encoder.embedding.weight.device)
    return tokens.unsqueeze(0).expand(batch_size, -1)


def _prefix_cache(model: nn.Module, cfg: PrefixTuningConfig, encoder: nn.Module, batch_size: int):
    """The prefix as PEFT builds it: [batch, virtual, layers * 2 * token_dim] -> per layer (key, value) of shape
    [batch, heads, virtual, head_dim], in a DynamicCache."""
    if cfg.inference_mode:
        flat = encoder.embedding.weight.repeat(batch_size, 1, 1)
    else:
        flat = encoder(_prompt_tokens(cfg, encoder, batch_size)[:, : cfg.num_virtual_tokens])
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        flat = flat.to(dtype)
    heads = cfg.num_attention_heads
    flat = flat.view(batch_size, cfg.num_virtual_tokens, cfg.num_layers * 2, heads, cfg.token_dim // heads)
    submodules = cfg.num_transformer_submodules
    if submodules == 2:  # encoder-decoder: the same prefix for the decoder's self- and cross-attention (as PEFT)
        flat = torch.cat([flat, flat], dim=2)
    # num_layers x [2 * submodules, batch, heads, virtual, head_dim]
    per_layer = flat.permute([2, 0, 3, 1, 4]).split(2 * submodules)
    transformers = _transformers()
    legacy = parse_version(transformers.__version__) < parse_version("4.56.0.dev0")
    if submodules == 1:
        cache_class = transformers.DynamicCache
        return cache_class.from_legacy_cache(per_layer) if legacy else cache_class(per_layer)
    cache_class = transformers.EncoderDecoderCache
    cache = cache_class.from_legacy_cache(per_layer) if legacy else cache_class(per_layer)
    # PEFT's: the cross-attention cache starts empty (the encoder's states have the virtual tokens in front, so the
    # decoder computes its cross-attention keys / values itself)
    cache.cross_attention_cache = transformers.DynamicCache()
    for key in cache.is_updated.keys():
        cache.is_updated[key] = False
    return cache


def _input_prompt(cfg: PromptLearningConfig, encoder: nn.Module, batch_size: int,
                  task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, virtual, token_dim]: computed once and repeated over the batch (as PEFT does); multitask prompt tuning:
    per row, for its task."""
    if isinstance(cfg, MultitaskPromptTuningConfig):
        return encoder(_prompt_tokens(cfg, encoder, batch_size), task_ids)
    if cfg.inference_mode:
        prompts = encoder.embedding.weight
    else:
        prompts = encoder(_prompt_tokens(cfg, encoder, 1))
    return prompts.repeat(batch_size, 1, 1)


def _adjust_ids(cfg: PromptLearningConfig, kwargs: Dict[str, Any], warn: bool = True) -> None:
    # PEFT's rules: prefix tuning shifts position ids past the prefix; the others drop them (with a warning when the
    # caller passed them; generate() passes its own at every step), and token_type_ids are dropped for all
    if kwargs.get("position_ids") is not None:
        if isinstance(cfg, PrefixTuningConfig):
            kwargs["position_ids"] = kwargs["position_ids"] + cfg.num_virtual_tokens
        else:
            if warn:
                warnings.warn("position_ids are not supported with prompt tuning / P-tuning (as in PEFT); ignored")
            kwargs["position_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        if warn:
            warnings.warn("token_type_ids are not supported with prompt learning (as in PEFT); ignored")
        kwargs["token_type_ids"] = None


def _take_task_ids(cfg: PromptLearningConfig, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """Pops ``task_ids`` (multitask prompt tuning's per-row task indices) and ``adapter_names`` (refused)."""
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names= (mixed-adapter batches) is not supported with prompt learning")
    kwargs.pop("adapter_names", None)
    task_ids = kwargs.pop("task_ids", None)
    if task_ids is not None and not isinstance(cfg, MultitaskPromptTuningConfig):
        raise ValueError(f"task_ids is for multitask prompt tuning; this model's adapter is {cfg.peft_type}")
    return task_ids


# -- forward / generate ------------------------------------------------------------------------------------------------
def _forward(routing: _Routing, *args, **kwargs):
    base_forward = routing.base("forward")
    if routing.generating or routing.disabled:
        return base_forward(*args, **kwargs)
    names = routing.positional
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments ({len(args)} given)")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        kwargs[name] = value
    model = routing.model
    cfg, encoder = _active(model)
    task_ids = _take_task_ids(cfg, kwargs)
    if is_seq2seq(model):
        return _forward_seq2seq(routing, base_forward, cfg, encoder, kwargs, task_ids)
    input_ids = kwargs.pop("input_ids", None)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    attention_mask = kwargs.pop("attention_mask", None)
    labels = kwargs.pop("labels", None)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    virtual = cfg.num_virtual_tokens
    if attention_mask is not None:
        # PEFT's mask: float ones in front (the concatenation is then float too)
        attention_mask = torch.cat((torch.ones(batch_size, virtual).to(attention_mask.device), attention_mask), dim=1)
    _adjust_ids(cfg, kwargs)
    # as PEFT passes them (None unless given)
    for key in ("output_attentions", "output_hidden_states", "return_dict"):
        kwargs.setdefault(key, None)
    kwargs.update(attention_mask=attention_mask, labels=labels)
    if isinstance(cfg, PrefixTuningConfig):
        _put_prefix_cache(routing, cfg, encoder, batch_size, kwargs)
        return base_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if labels is not None:
        kwargs["labels"] = torch.cat((torch.full((batch_size, virtual), -100).to(labels.device), labels), dim=1)
    prompts = _input_prompt(cfg, encoder, batch_size, task_ids).to(inputs_embeds.dtype)
    return base_forward(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), **kwargs)


def _put_prefix_cache(routing: _Routing, cfg: PrefixTuningConfig, encoder: nn.Module, batch_size: int,
                      kwargs: Dict[str, Any]) -> None:
    """A forward call's prefix: the KV cache argument (refused with gradient checkpointing or a cache of the caller's)."""
    model = routing.model
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("prefix tuning does not work with gradient checkpointing (PEFT refuses it too): the "
                         "prefix lives in the KV cache, which checkpointed layers do not use; "
                         "model.gradient_checkpointing_disable() first")
    if any(kwargs.get(key) is not None for key in _CACHE_KEYS):
        raise ValueError("prefix tuning puts its prefix in the KV cache; a forward call cannot take another "
                         "cache (use generate(), which handles the cache)")
    kwargs[routing.cache_key] = _prefix_cache(model, cfg, encoder, batch_size)


def _forward_seq2seq(routing: _Routing, base_forward, cfg: PromptLearningConfig, encoder: nn.Module,
                     kwargs: Dict[str, Any], task_ids: Optional[torch.Tensor] = None):
    """PEFT's PeftModelForSeq2SeqLM.forward for prompt learning. Prompt tuning / P-tuning: the first
    ``num_virtual_tokens`` prompt vectors go in front of the encoder's input embeddings and the encoder's attention
    mask gets as many ones; the decoder side (labels, decoder inputs, logits) is unchanged. Prefix tuning: the
    prefix is the decoder's self-attention cache (an EncoderDecoderCache whose cross-attention part starts empty;
    the encoder runs without it, as in PEFT), and the decoder attention mask gets ones in front."""
    model = routing.model
    input_ids = kwargs.pop("input_ids", None)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    virtual = cfg.num_virtual_tokens
    is_prefix = isinstance(cfg, PrefixTuningConfig)
    decoder_mask = kwargs.get("decoder_attention_mask")
    if decoder_mask is not None and is_prefix:
        kwargs["decoder_attention_mask"] = torch.cat(
            (torch.ones(batch_size, virtual).to(decoder_mask.device), decoder_mask), dim=1)
    _adjust_ids(cfg, kwargs)
    for key in ("output_attentions", "output_hidden_states", "return_dict"):
        kwargs.setdefault(key, None)
    if is_prefix:
        _put_prefix_cache(routing, cfg, encoder, batch_size, kwargs)
        return base_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.cat(
            (torch.ones(batch_size, virtual).to(attention_mask.device), attention_mask), dim=1)
    prompts = _input_prompt(cfg, encoder, batch_size, task_ids).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((prompts[:, :virtual], inputs_embeds), dim=1)
    if isinstance(cfg, MultitaskPromptTuningConfig):
        return _forward_seq2seq_multitask(model, base_forward, cfg, prompts, inputs_embeds, kwargs)
    return base_forward(inputs_embeds=inputs_embeds, **kwargs)


def _shift_right(labels: torch.Tensor, config) -> torch.Tensor:
    """Decoder inputs from labels, as the seq2seq models (and PEFT) derive them: start token first, -100 -> pad."""
    if config.pad_token_id is None:
        raise ValueError("the model config has no pad_token_id, needed to derive decoder inputs from labels")
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = config.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, config.pad_token_id)


def _forward_seq2seq_multitask(model: nn.Module, base_forward, cfg: MultitaskPromptTuningConfig,
                               prompts: torch.Tensor, inputs_embeds: torch.Tensor, kwargs: Dict[str, Any]):
    """PEFT's seq2seq forward for multitask prompt tuning (its branch for every type but prompt tuning / P-tuning):
    with two submodules the second half of the prompt also goes in front of the decoder's inputs, whose attention
    mask and labels get ones / -100s in front; with one, only the encoder gets it."""
    virtual, batch_size = cfg.num_virtual_tokens, inputs_embeds.shape[0]
    decoder_ids = kwargs.pop("decoder_input_ids", None)
    decoder_embeds = kwargs.pop("decoder_inputs_embeds", None)
    labels = kwargs.get("labels")
    if cfg.num_transformer_submodules == 1:
        return base_forward(inputs_embeds=inputs_embeds, **kwargs)  # PEFT passes no decoder inputs here
    decoder_mask = kwargs.get("decoder_attention_mask")
    if decoder_mask is not None:
        kwargs["decoder_attention_mask"] = torch.cat(
            (torch.ones(batch_size, virtual).to(decoder_mask.device), decoder_mask), dim=1)
    if decoder_embeds is None:
        if decoder_ids is None:
            if labels is None:
                raise ValueError("multitask prompt tuning on an encoder-decoder model needs labels or decoder inputs")
            decoder_ids = _shift_right(labels, _model_config(model))
        decoder_embeds = model.get_input_embeddings()(decoder_ids)
    if labels is not None:
        kwargs["labels"] = torch.cat((torch.full((batch_size, virtual), -100).to(labels.device), labels), dim=1)
    decoder_embeds = torch.cat((prompts[:, virtual:].to(decoder_embeds.dtype), decoder_embeds), dim=1)
    return base_forward(inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_embeds, **kwargs)


def _generate_seq2seq_prompt(routing: _Routing, base_generate, args, kwargs):
    """PEFT's PeftModelForSeq2SeqLM.generate for prompt tuning / P-tuning: the encoder's inputs become the prompt
    followed by the embedded input_ids (and the mask gets ones in front); the model's own generate does the rest."""
    if args:
        raise TypeError("generate() of a prompt-tuned encoder-decoder model takes keyword arguments only "
                        "(input_ids=..., as PEFT's)")
    if "input_ids" not in kwargs:
        raise ValueError("input_ids must be provided for generation with a prompt-learning adapter (as PEFT)")
    model = routing.model
    cfg, encoder = _active(model)
    task_ids = _take_task_ids(cfg, kwargs)
    _adjust_ids(cfg, kwargs)
    if kwargs.pop("encoder_outputs", None) is not None:
        warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
    embeds = model.get_input_embeddings()(kwargs.pop("input_ids"))
    batch_size = embeds.shape[0]
    prompts = _input_prompt(cfg, encoder, batch_size, task_ids).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat((prompts[:, : cfg.num_virtual_tokens], embeds), dim=1)
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat((torch.ones(batch_size, cfg.num_virtual_tokens).to(mask.device), mask),
                                             dim=1)
    routing.generating = True
    try:
        return base_generate(**kwargs)
    finally:
        routing.generating = False


def _generate(routing: _Routing, *args, **kwargs):
    base_generate = routing.base("generate")
    model = routing.model
    if routing.disabled:
        _take_task_ids(_active(model)[0], kwargs)
        return base_generate(*args, **kwargs)
    if is_seq2seq(model) and not isinstance(_active(model)[0], PrefixTuningConfig):
        return _generate_seq2seq_prompt(routing, base_generate, args, kwargs)
    routing.task_ids = _take_task_ids(_active(model)[0], kwargs)  # read at the prefill step (_prepare_inputs)
    base_prepare = model.prepare_inputs_for_generation
    replaced = model.__dict__.get(_PREPARE) if _PREPARE in model.__dict__ else None
    # for the call only (as PEFT does); functools.wraps: generate reads its signature
    model.__dict__[_PREPARE] = functools.wraps(base_prepare)(functools.partial(_prepare_inputs, routing, base_prepare))
    routing.generating = True  # the model's own generate calls forward with the prompt already in the inputs
    try:
        return base_generate(*args, **kwargs)
    finally:
        routing.generating = False
        routing.task_ids = None
        if replaced is None:
            del model.__dict__[_PREPARE]
        else:
            model.__dict__[_PREPARE] = replaced


def _prepare_inputs(routing: _Routing, base_prepare, *args, **kwargs):
    """PEFT's PeftModelForCausalLM.prepare_inputs_for_generation for prompt learning: at the prefill step (empty
    cache) the prompt goes into the inputs (prompt tuning / P-tuning) or the cache (prefix tuning); at every step the
    attention mask gets the virtual tokens in front."""
    kwargs.pop("task_ids", None)
    model = routing.model
    cfg, encoder = _active(model)
    is_prefix = isinstance(cfg, PrefixTuningConfig)
    inputs = base_prepare(*args, **kwargs)
    if is_seq2seq(model):
        return _prepare_seq2seq_prefix(routing, cfg, encoder, inputs, kwargs)
    # the prefill step: the cache is still empty
    is_prefill = inputs.get("cache_position") is not None and inputs["cache_position"][0] == 0
    # transformers 5.x names the cache "cache" (formerly "past_key_values"). PEFT 0.21.2 reads and writes only
    # "past_key_values", so with such a transformers it misses the cache: it adds the prompt again at every decoding
    # step (prompt tuning / P-tuning) and its prefix is overridden by generate's own empty cache (prefix tuning).
    # fastpeft uses the name the model's inputs carry.
    cache_key = next((key for key in _CACHE_KEYS if key in inputs), routing.cache_key)
    if inputs.get("use_cache") is False:
        # without caching every step sees the whole sequence; a cache the last step returned (the prefix cache the
        # model filled) is stale, and the prompt is added again
        inputs.pop(cache_key, None)
    cache = inputs.get(cache_key)
    if cache is not None:
        # the cache is longer than the real tokens by the prompt: past the prefill only the last token is new
        seq_len = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
        if seq_len >= inputs["input_ids"].shape[1]:
            inputs["input_ids"] = inputs["input_ids"][:, -1:]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None:
        if isinstance(attention_mask, dict):
            if len(attention_mask) != 1:
                raise ValueError(f"expected a single attention mask, got {len(attention_mask)}")
            attention_mask = next(iter(attention_mask.values()))
        if attention_mask.dim() == 4:
            raise NotImplementedError("generate() with a 4-D attention mask (e.g. a static cache) is not implemented "
                                      "for prompt learning in fastpeft; use the default dynamic cache")
        ones = torch.ones(inputs["input_ids"].shape[0], cfg.num_virtual_tokens).to(inputs["input_ids"].device)
        inputs["attention_mask"] = torch.cat((ones, attention_mask), dim=1)
    _adjust_ids(cfg, inputs, warn=False)
    needs_prompt = cache is None or (isinstance(cache, _transformers().Cache) and not cache.get_seq_length())
    batch_size = inputs["input_ids"].shape[0]
    if needs_prompt and is_prefix:
        inputs[cache_key] = _prefix_cache(model, cfg, encoder, batch_size)  # generate continues with this cache
    elif needs_prompt:
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        prompts = _input_prompt(cfg, encoder, batch_size, routing.task_ids).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        inputs["input_ids"] = None
    if is_prefill and is_prefix:
        inputs["cache_position"] = inputs["cache_position"] + cfg.num_virtual_tokens  # the prefix is in the cache
    elif not is_prefix:
        inputs.pop("cache_position", None)  # the model derives it from inputs_embeds / the cache
    return inputs


def _prepare_seq2seq_prefix(routing: _Routing, cfg: PrefixTuningConfig, encoder: nn.Module, inputs: Dict[str, Any],
                            kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """PEFT's PeftModelForSeq2SeqLM.prepare_inputs_for_generation for prefix tuning: at the prefill step the cache
    becomes the prefix (generate continues with it); the encoder, which generate runs first, never sees it."""
    cache_key = next((key for key in _CACHE_KEYS if key in inputs), routing.cache_key)
    cache = inputs.get(cache_key)
    prefill = kwargs.get("is_first_iteration")
    if prefill is None:
        prefill = cache is None or (isinstance(cache, _transformers().Cache) and cache.get_seq_length() == 0)
    if prefill or inputs.get("use_cache") is False:  # without caching every step runs all decoder tokens again
        inputs[cache_key] = _prefix_cache(routing.model, cfg, encoder, inputs["decoder_input_ids"].shape[0])
    return inputs


# -- saving and loading ------------------------------------------------------------------------------------------------
def prompt_state_dict(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """What PEFT writes to adapter_model.safetensors for a prompt-learning adapter: ``prompt_embeddings``, the
    encoder's output for every virtual token (the trained table itself for a frozen / loaded adapter)."""
    state = get_state(model)
    cfg = state.configs[adapter_name]
    encoder = getattr(model, PROMPT_ENCODER_ATTR)[adapter_name]
    if isinstance(cfg, MultitaskPromptTuningConfig):  # PEFT's three tensors: the shared table and the task factors
        return {"prompt_embeddings": encoder.embedding.weight.detach(),
                "prefix_task_cols": encoder.prefix_task_cols.detach(),
                "prefix_task_rows": encoder.prefix_task_rows.detach()}
    if cfg.inference_mode:
        value = encoder.embedding.weight
    else:
        tokens = _prompt_tokens(cfg, encoder, 1)
        if isinstance(cfg, PrefixTuningConfig):
            tokens = tokens[:, : cfg.num_virtual_tokens]
        with torch.no_grad():
            value = encoder(tokens)[0]
    return {"prompt_embeddings": value.detach()}


def plan_load(model: nn.Module, adapter_name: str, tensors: Dict[str, torch.Tensor]):
    """[(parameter, tensor)] to copy a saved prompt-learning adapter into the model's encoder; raises before anything
    is written."""
    state = get_state(model)
    cfg = state.configs[adapter_name]
    check_loadable(cfg, state.trainable[adapter_name])
    if isinstance(cfg, MultitaskPromptTuningConfig):
        encoder = getattr(model, PROMPT_ENCODER_ATTR)[adapter_name]
        params = {"prompt_embeddings": encoder.embedding.weight, "prefix_task_cols": encoder.prefix_task_cols,
                  "prefix_task_rows": encoder.prefix_task_rows}
        if set(tensors) != set(params):
            raise ValueError(f"a MULTITASK_PROMPT_TUNING adapter file holds {sorted(params)}; found {sorted(tensors)}")
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape) or not tensors[key].is_floating_point():
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)} / dtype {tensors[key].dtype}; this "
                                 f"adapter needs a floating-point {tuple(param.shape)} (num_virtual_tokens / token_dim "
                                 "/ num_tasks / num_ranks)")
        return [(param, tensors[key]) for key, param in params.items()]
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if "prompt_embeddings" not in tensors or extra:
        raise ValueError(f"a {cfg.peft_type} adapter file holds exactly one tensor, 'prompt_embeddings'; found "
                         f"{sorted(tensors)}")
    value = tensors["prompt_embeddings"]
    param = getattr(model, PROMPT_ENCODER_ATTR)[adapter_name].embedding.weight
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"prompt_embeddings has shape {tuple(value.shape)} but the {cfg.peft_type} adapter built for "
                         f"this model needs {tuple(param.shape)} (num_virtual_tokens / token_dim / num_layers)")
    if not value.is_floating_point():
        raise ValueError(f"prompt_embeddings has dtype {value.dtype}; expected a floating-point tensor")
    return [(param, value)]

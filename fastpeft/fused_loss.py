"""The training loss of a causal LM without its [tokens, vocab] logits: ``enable_fused_loss(model)``.

In training mode, ``model(..., labels=labels)`` then runs the decoder (``model.base_model``), and the output
head and transformers' causal-LM cross-entropy together, chunk by chunk (``ops/linear_cross_entropy.py``):
the loss equals the unfused one (same label shift, ``ignore_index``, ``num_items_in_batch`` / ``shift_labels``
semantics), and ``outputs.logits`` is None. In eval mode, without labels, or with ``logits_to_keep`` set, the
model's own forward runs unchanged (logits for metrics and generate()).

At a 128k vocabulary the unfused loss holds bf16 logits, their fp32 copy and the fp32 gradient: ~10 bytes ×
tokens × vocab, 5 GiB for 4,096 tokens. The fused loss holds one chunk of them (~384 MiB).

The head is looked up on every call (``model.get_output_embeddings()``), so patching the head later (LoRA
on ``lm_head``, modules_to_save) is picked up. A plain ``nn.Linear`` head (tied or not) runs the weight path
(or Liger-Kernel's kernel, see ``backend``); any other head module runs chunk by chunk through its own
forward and backward.

>>> import torch, transformers, fastpeft
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).train()
>>> ids = torch.randint(0, 64, (2, 9))
>>> reference = model(input_ids=ids, labels=ids).loss
>>> model = fastpeft.enable_fused_loss(model)
>>> out = model(input_ids=ids, labels=ids)
>>> out.logits is None, bool(torch.allclose(out.loss, reference, rtol=1e-5))
(True, True)
>>> model = fastpeft.disable_fused_loss(model)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_state import is_peft_model
from .ops.linear_cross_entropy import (
    HAS_LIGER,
    liger_linear_cross_entropy_sum,
    linear_cross_entropy_sum,
    module_cross_entropy_sum,
)

__all__ = ["enable_fused_loss", "disable_fused_loss", "fused_loss_enabled", "SUPPORTED_MODEL_TYPES", "BACKENDS"]

STATE_ATTR = "_fastpeft_fused_loss"
BACKENDS = ("auto", "fastpeft", "liger")
# Causal LMs whose forward is exactly: decoder -> lm_head(hidden) -> self.loss_function (ForCausalLMLoss), with
# nothing applied to the logits in between (no soft-capping, logit scale or MoE auxiliary loss), checked
# against transformers' modeling files and by tests/model/test_fused_loss.py.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


@dataclasses.dataclass
class _FusedLossState:
    backend: str
    chunk_rows: Optional[int]
    signature: inspect.Signature
    forward: Any  # what we installed (to tell whether someone wrapped it since)


def fused_loss_enabled(model: nn.Module) -> bool:
    """Whether ``enable_fused_loss`` is in effect on ``model``."""
    return STATE_ATTR in model.__dict__


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def enable_fused_loss(model: nn.Module, *, backend: str = "auto", chunk_rows: Optional[int] = None) -> nn.Module:
    """Compute ``model(..., labels=...)``'s training loss without materializing the logits; returns ``model``.

    ``model``: a transformers causal LM of a type in ``SUPPORTED_MODEL_TYPES`` (plain or patched by fastpeft;
    not a ``peft.PeftModel``: enable it on ``peft_model.get_base_model()``). Call it before anything wraps
    ``model.forward`` (accelerate / Trainer do so when they prepare the model; TRL's SFTTrainer installs its
    own fused head, which then takes over). ``backend``: ``"auto"`` (Liger-Kernel's fused kernel for a plain
    ``nn.Linear`` head on CUDA when ``liger_kernel`` is importable, else fastpeft's chunked PyTorch path),
    ``"fastpeft"`` or ``"liger"``. ``chunk_rows``: tokens per chunk (default: ~64 Mi logits per chunk).

    >>> import transformers, fastpeft
    >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    >>> m = fastpeft.enable_fused_loss(transformers.GPT2LMHeadModel(cfg), backend="fastpeft")
    >>> fastpeft.fused_loss_enabled(m)
    True
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "liger" and not HAS_LIGER:
        raise ValueError("backend='liger' needs liger_kernel, which is not importable (pip install liger-kernel); "
                         "backend='auto' or 'fastpeft' use fastpeft's chunked loss")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None; got {chunk_rows!r}")
    if is_peft_model(model):
        raise ValueError("enable_fused_loss needs the transformers model, not a peft.PeftModel: pass "
                         "peft_model.get_base_model() (or patch the model with fastpeft first)")
    if fused_loss_enabled(model):
        raise ValueError("the fused loss is already enabled on this model (disable_fused_loss first to change it)")
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"enable_fused_loss supports the causal LMs {', '.join(SUPPORTED_MODEL_TYPES)}; this model "
                         f"is {type(model).__name__} (model_type {model_type!r}), whose forward is not verified to "
                         "leave the logits untouched between the head and the loss")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() is None): "
                         "enable_fused_loss needs a ...ForCausalLM model")
    if not isinstance(getattr(model, "base_model", None), nn.Module) or model.base_model is model:
        raise ValueError(f"{type(model).__name__} has no separate decoder (model.base_model): "
                         "enable_fused_loss needs a ...ForCausalLM model")
    if "forward" in model.__dict__:
        raise ValueError("model.forward is already replaced on this instance (by "
                         f"{getattr(model.__dict__['forward'], '__qualname__', model.__dict__['forward'])!r}, e.g. "
                         "accelerate / Trainer / TRL): call enable_fused_loss on the model before it is wrapped")
    _check_loss_function(model)
    original = type(model).forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _forward(self, original, *args, **kwargs)

    bound = types.MethodType(forward, model)
    model.__dict__[STATE_ATTR] = _FusedLossState(backend=backend, chunk_rows=chunk_rows, signature=signature,
                                                 forward=bound)
    model.forward = bound
    return model


def disable_fused_loss(model: nn.Module) -> nn.Module:
    """Undo ``enable_fused_loss``: the model's own forward (with logits) again; returns ``model``."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError("the fused loss is not enabled on this model")
    if model.__dict__.get("forward") is not state.forward:
        raise ValueError("model.forward was wrapped again after enable_fused_loss (e.g. by accelerate / Trainer): "
                         "unwrap that first")
    del model.__dict__["forward"]
    del model.__dict__[STATE_ATTR]
    return model


def _check_loss_function(model: nn.Module) -> None:
    fn = getattr(model, "loss_function", None)
    name = getattr(fn, "__name__", type(fn).__name__)
    if name != "ForCausalLMLoss":
        raise ValueError(f"the fused loss reproduces transformers' ForCausalLMLoss; this model's loss_function is "
                         f"{name!r} (loss_type {getattr(model, 'loss_type', None)!r})")


def _forward(model: nn.Module, original, *args, **kwargs):
    state: _FusedLossState = model.__dict__[STATE_ATTR]
    bound = state.signature.bind(model, *args, **kwargs)
    named: Dict[str, Any] = dict(bound.arguments)
    named.pop("self", None)
    for p in state.signature.parameters.values():  # flatten **kwargs
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}) or {})
    labels = named.get("labels")
    keep = named.get("logits_to_keep", 0)
    keep_all = keep is None or (isinstance(keep, int) and keep == 0)
    if not (model.training and labels is not None and keep_all):
        return original(model, *args, **kwargs)
    _check_loss_function(model)
    named.pop("labels")
    named.pop("logits_to_keep", None)
    loss_kwargs = {k: named.pop(k) for k in _LOSS_ONLY_KWARGS if k in named}
    return_dict = named.pop("return_dict", None)
    decoder_out = model.base_model(**named)
    hidden = decoder_out[0] if isinstance(decoder_out, tuple) else decoder_out.last_hidden_state
    loss = causal_lm_loss(model, hidden, labels, state.backend, state.chunk_rows, **loss_kwargs)
    rest = {} if isinstance(decoder_out, tuple) else {k: v for k, v in decoder_out.items() if k != "last_hidden_state"}
    out = _output_class(decoder_out)(loss=loss, logits=None, **rest)
    if return_dict is False or (return_dict is None and getattr(model.config, "return_dict", True) is False):
        return out.to_tuple()
    return out


def _output_class(decoder_out):
    # transformers is imported here, not at the top: by now the caller's model has imported it, while
    # ``import fastpeft`` would pay ~0.9 s for it.
    outputs = importlib.import_module("transformers.modeling_outputs")
    fields = {f.name for f in dataclasses.fields(decoder_out)} if dataclasses.is_dataclass(decoder_out) else set()
    if "cross_attentions" in fields:
        return outputs.CausalLMOutputWithCrossAttentions
    return outputs.CausalLMOutputWithPast


def _plain_linear(head: nn.Module) -> bool:
    """A bare nn.Linear whose call is exactly F.linear(x, weight, bias) (no hooks, no replaced forward)."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and "forward" not in head.__dict__ and type(head.weight) is nn.Parameter)


def causal_lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, backend: str = "auto",
                   chunk_rows: Optional[int] = None, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss(head(hidden), labels, ...) without the full logits (see the module doc)."""
    head = model.get_output_embeddings()
    if shift_labels is None:
        padded = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(rows.device)
    if targets.shape[0] != rows.shape[0]:
        raise ValueError(f"labels / shift_labels give {targets.shape[0]} targets for {rows.shape[0]} positions")
    plain = _plain_linear(head)
    use_liger = backend == "liger" or (backend == "auto" and HAS_LIGER and plain and rows.is_cuda)
    if use_liger:
        if not plain:
            raise ValueError(f"backend='liger' needs a plain nn.Linear output head; this head is "
                             f"{type(head).__name__}: use backend='auto' or 'fastpeft'")
        total = liger_linear_cross_entropy_sum(rows.contiguous(), head.weight, head.bias, targets, ignore_index)
        count = (targets != ignore_index).sum()
    else:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        weight = valid.to(torch.float32)
        count = valid.sum()
        if plain:
            total = linear_cross_entropy_sum(rows, head.weight, head.bias, safe, weight, chunk_rows)
        else:
            params = [p for p in head.parameters() if p.requires_grad]
            vocab = getattr(_text_config(model), "vocab_size", None) or 1 << 15
            total = module_cross_entropy_sum(rows, head, safe, weight, params, vocab, chunk_rows)
    if num_items_in_batch is None:
        return total / count  # mean over the counted tokens; 0 / 0 = nan as in transformers
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch

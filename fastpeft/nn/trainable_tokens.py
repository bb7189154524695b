"""TrainableTokens: a few rows of a frozen embedding (or output head) trained on their own -- PEFT's
``trainable_token_indices`` (its ``TrainableTokensWrapper`` around a ``TrainableTokensLayer``).

Per adapter, ``trainable_tokens_delta[name]`` [len(indices), dim] holds the *new values* of the selected rows (not
a difference: it starts as a copy of them). The forward uses the base weight with those rows replaced,

    W' = W.index_copy(0, indices, delta)        y = embedding(x, W')  or, on a linear head,  y = x · W'ᵀ (+ bias)

so gradients reach only the selected rows, and the base weight is never written except by ``merge``.

PEFT computes exactly that, and its backward forms the gradient of all of W' (for a head: a full weight-gradient
GEMM) to keep len(indices) rows of it; fastpeft gives the same outputs without it (``fastpeft/ops/token_rows.py``):
an embedding's outputs are PEFT's very numbers, and so are a head's logits and input gradient; the rows' gradients
are the same sums, formed from the trained positions / columns only (rounding-level differences for a head).
Embedding options that act on whole rows (max_norm, scale_grad_by_freq, sparse), a trained padding row and a head
whose weight trains take PEFT's computation as it is.

``trainable_tokens_original[name]`` (a non-persistent buffer) keeps the rows as they were, for ``unmerge``.

Attribute names follow PEFT's, so the state-dict keys are PEFT's: ``<path>.token_adapter.base_layer.weight``,
``<path>.token_adapter.trainable_tokens_delta.<name>``. A wrapper *tied* to another (an output head sharing the
input embedding's weight) holds the very same ``trainable_tokens_delta`` / ``trainable_tokens_original`` modules as
the one it follows, as PEFT does; it registers adapter names but owns no values (nothing of it is saved).

Values are fp32 when the base weight is fp16 / bf16 (PEFT's autocast of adapter weights), the base dtype
otherwise; the rows are cast to the base dtype when they are written into W'.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import token_rows
from . import mixed_batch

__all__ = ["TrainableTokens", "TrainableTokensLayer", "TokenAdapter", "check_token_indices"]

_HALF = (torch.float16, torch.bfloat16)


def check_token_indices(indices, num_rows: int, where: str) -> List[int]:
    """``indices`` as a list of ints, each in [0, num_rows), no repeats; else a ValueError naming ``where``."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)):
        raise ValueError(f"{where}: token indices must be a list of ints, got {type(indices).__name__} {indices!r}")
    if len(indices) == 0:
        raise ValueError(f"{where}: the list of token indices is empty; give at least one token id")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"{where}: token indices must be ints, got {bad[:5]!r}")
    out_of_range = [i for i in indices if not 0 <= i < num_rows]
    if out_of_range:
        raise ValueError(f"{where}: token indices {out_of_range[:5]} are out of range; the layer has {num_rows} rows "
                         f"(valid ids: 0 .. {num_rows - 1})")
    if len(set(indices)) != len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"{where}: token indices {repeated[:5]} are given more than once (which value a repeated "
                         "row would take is undefined); list each token once")
    return list(indices)


class TokenAdapter(nn.Module):
    """The values: PEFT's ``TrainableTokensLayer`` state (``base_layer``, ``trainable_tokens_delta``,
    ``trainable_tokens_original``, ``token_indices``). ``tied_to``: share another TokenAdapter's values."""

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TokenAdapter"] = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable tokens work on torch.nn.Embedding and torch.nn.Linear (a tied output head) "
                            f"layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        # a plain list keeps the tied-to module out of named_modules() / the state dict (as PEFT)
        self._tied = [tied_to] if tied_to is not None else []
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = nn.Module()  # non-persistent buffers, one per adapter
            self.token_indices: Dict[str, List[int]] = {}
            # index tensors made from token_indices, per (adapter, kind, device); shared with tied adapters like
            # token_indices, so that removing an adapter drops them for every layer that reads them
            self._index_cache: Dict[tuple, torch.Tensor] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices
            self._index_cache = tied_to._index_cache

    @property
    def tied_to(self) -> Optional["TokenAdapter"]:
        return self._tied[0] if self._tied else None

    def add(self, adapter_name: str, indices: Sequence[int], init_weights: bool = True) -> None:
        weight = self.base_layer.weight
        indices = check_token_indices(indices, weight.shape[0], "trainable_token_indices")
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        rows = weight.detach()[torch.tensor(indices, device=weight.device)].to(dtype)
        values = rows.clone() if init_weights else torch.randn(rows.shape, dtype=dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original.register_buffer(adapter_name, rows.clone(), persistent=False)

    def remove(self, adapter_name: str) -> None:
        del self.trainable_tokens_delta[adapter_name]
        delattr(self.trainable_tokens_original, adapter_name)
        del self.token_indices[adapter_name]
        for key in [k for k in self._index_cache if k[0] == adapter_name]:
            del self._index_cache[key]

    def original_rows(self, adapter_name: str) -> torch.Tensor:
        return getattr(self.trainable_tokens_original, adapter_name)

    def _index(self, adapter_name: str, device) -> torch.Tensor:
        """The adapter's token ids as a tensor on ``device`` (made once, not at every forward)."""
        key = (adapter_name, "index", str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(self.token_indices[adapter_name], device=device)
        return self._index_cache[key]

    def _slots(self, adapter_name: str, device) -> torch.Tensor:
        """[num_rows]: for each token id its row in the adapter's delta, -1 for ids the adapter does not train."""
        key = (adapter_name, "slots", str(device))
        if key not in self._index_cache:
            slots = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            slots[self._index(adapter_name, device)] = torch.arange(len(self.token_indices[adapter_name]),
                                                                    device=device)
            self._index_cache[key] = slots
        return self._index_cache[key]

    def weight_with(self, names: Sequence[str]) -> torch.Tensor:
        """The base weight with the rows of ``names`` replaced (a new tensor; autograd reaches the deltas)."""
        weight = self.base_layer.weight
        for name in names:
            weight = weight.index_copy(0, self._index(name, weight.device),
                                       self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def write_rows(self, adapter_name: str, original: bool) -> None:
        """Write the adapter's rows (or, ``original=True``, the rows it replaced) into the base weight in place."""
        weight = self.base_layer.weight
        source = self.original_rows(adapter_name) if original else self.trainable_tokens_delta[adapter_name]
        with torch.no_grad():
            weight.data.index_copy_(0, self._index(adapter_name, weight.device), source.detach().to(weight.dtype))

    def compute(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The layer's output with the rows of ``names`` (none: the base layer's)."""
        base = self.base_layer
        if not names:
            return base(x)
        if len(names) == 1 and self._rows_path_applies(names[0]):
            out = self._forward_rows(x, names[0])
        else:
            out = self._forward_replaced_weight(x, names)
        if isinstance(base, nn.Embedding):
            scale = getattr(base, "embed_scale", None)  # scaled word embeddings (Gemma 3) scale in their forward
            if scale is not None:
                out = out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)
        return out

    def _rows_path_applies(self, name: str) -> bool:
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return not base.weight.requires_grad  # the fast head path forms no gradient for the weight
        # the embedding options that read or write whole rows of the weight (max_norm renormalises looked-up rows in
        # place, scale_grad_by_freq / sparse shape the weight's gradient) and a trained padding row (no gradient)
        # take PEFT's computation as it is
        return (base.max_norm is None and not base.scale_grad_by_freq and not base.sparse
                and (base.padding_idx is None or base.padding_idx not in self.token_indices[name]))

    def _forward_rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """PEFT's outputs without PEFT's cost (fastpeft/ops/token_rows.py): no gradient of the whole weight."""
        base = self.base_layer
        weight = base.weight
        rows = self.trainable_tokens_delta[name].to(weight.dtype)
        if isinstance(base, nn.Linear):
            return token_rows.linear_with_rows(x, weight, base.bias, self._index(name, weight.device), rows)
        return token_rows.embedding_with_rows(x, weight, self._slots(name, weight.device), rows, base.padding_idx)

    def _forward_replaced_weight(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """PEFT's computation: the layer's function on the base weight with the rows replaced."""
        base = self.base_layer
        weight = self.weight_with(names)
        if isinstance(base, nn.Embedding):
            return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                               norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                               sparse=base.sparse)
        return F.linear(x, weight, base.bias)


class TrainableTokens(nn.Module):
    """PEFT's ``TrainableTokensWrapper``: a frozen embedding / head whose selected rows train per adapter.

    >>> emb = nn.Embedding(10, 4)
    >>> wrapped = TrainableTokens(emb, "default", [2, 7])
    >>> sorted(n for n, _ in wrapped.named_parameters())
    ['token_adapter.base_layer.weight', 'token_adapter.trainable_tokens_delta.default']
    >>> torch.equal(wrapped(torch.tensor([2, 3])), emb(torch.tensor([2, 3])))  # starts as a no-op
    True
    """

    adapter_kind = "trainable_tokens"

    def __init__(self, base_layer: nn.Module, adapter_name: str, token_indices: Optional[Sequence[int]] = None,
                 init_weights: bool = True, tied_to: Optional["TrainableTokens"] = None):
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer, tied_to._values if tied_to is not None else None)
        self._names: List[str] = []
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.update_layer(adapter_name, token_indices, init_weights)

    @classmethod
    def adopt(cls, token_adapter: TokenAdapter, adapter_names: Sequence[str], active_adapter: str,
              disable_adapters: bool = False, merged_adapters: Sequence[str] = ()) -> "TrainableTokens":
        """A wrapper around values that exist already (converting a PeftModel: its Parameters stay the same
        objects, so optimizers holding them stay valid)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.token_adapter = token_adapter
        self._names = list(adapter_names)
        self.active_adapter = active_adapter
        self.disable_adapters = disable_adapters
        self.merged_adapters = list(merged_adapters)
        return self

    # file key of an adapter's rows (PEFT's, without the adapter name), and whether a tied layer writes them too
    delta_key = "token_adapter.trainable_tokens_delta"
    saves_tied = False

    @property
    def _values(self) -> TokenAdapter:
        return self._modules["token_adapter"]

    # -- bookkeeping (the interface fastpeft's model-level code uses for every drop-in) --------------------------
    @property
    def tied(self) -> bool:
        return self._values.tied_to is not None

    @property
    def base_layer(self) -> nn.Module:
        return self._values.base_layer

    def update_layer(self, adapter_name: str, token_indices: Optional[Sequence[int]] = None,
                     init_weights: bool = True) -> None:
        """Add an adapter. A tied wrapper only registers the name: the values are those of the wrapper it follows."""
        if adapter_name in self._names:
            raise ValueError(f"adapter {adapter_name!r} already exists on this module")
        if self.tied:
            if adapter_name not in self._values.trainable_tokens_delta:
                raise ValueError(f"adapter {adapter_name!r} has no trainable tokens on the layer this one is tied to")
        else:
            self._values.add(adapter_name, token_indices, init_weights)
        self._names.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it first")
        self._names.remove(adapter_name)
        if not self.tied:
            self._values.remove(adapter_name)

    @property
    def adapter_names(self) -> List[str]:
        return list(self._names)

    def adapter_parameters(self, adapter_name: str):
        return [self._values.trainable_tokens_delta[adapter_name]]

    @property
    def token_indices(self) -> Dict[str, List[int]]:
        return {n: self._values.token_indices[n] for n in self._names}

    def _active_names(self) -> List[str]:
        if self.disable_adapters or self.merged_adapters or self.active_adapter not in self._names:
            return []
        return [self.active_adapter]

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} takes the input tensor only (like nn.Embedding / the head it "
                            f"wraps), got {len(args)} more positional and {sorted(kwargs)} keyword arguments")
        names = mixed_batch.current()
        if names is not None and not self.disable_adapters and not self.merged_adapters:
            # one adapter per row: each row group uses its adapter's rows ("__base__" / others: the base weight)
            return mixed_batch.forward_mixed(
                x, names, lambda sub, name: self._values.compute(sub, [name] if name in self._names else []))
        return self._values.compute(x, self._active_names())

    # transformers reads these off the input embeddings / output head (weight tying checks, resize, generate)
    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer computes with now (PEFT's wrapper answers the same): the base weight with the
        active adapter's rows in (a tensor, not a Parameter), or the base Parameter when no adapter applies."""
        names = self._active_names()
        return self._values.weight_with(names) if names else self.base_layer.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            holder = modules.get("token_adapter")
            base = holder._modules.get("base_layer") if holder is not None else modules.get("base_layer")
            if name.startswith("_") or base is None:
                raise
            return getattr(base, name)

    # -- merge -----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Write the active adapter's rows into the base weight (in place: tied layers see it too)."""
        if self.merged_adapters or self.active_adapter not in self._names:
            return
        values = self._values.trainable_tokens_delta[self.active_adapter]
        if not torch.isfinite(values).all():
            raise ValueError(f"trainable tokens of adapter {self.active_adapter!r} hold NaN / inf; not merged")
        self._values.write_rows(self.active_adapter, original=False)
        self.merged_adapters.append(self.active_adapter)

    def unmerge(self) -> None:
        """Put the rows the merged adapter replaced back (exactly: they were kept, not subtracted)."""
        while self.merged_adapters:
            self._values.write_rows(self.merged_adapters.pop(), original=True)

    def extra_repr(self) -> str:
        return f"adapters={self._names}, tied={self.tied}"


class TrainableTokensLayer(TrainableTokens, TokenAdapter):
    """PEFT's standalone ``TrainableTokensLayer`` (``TrainableTokensConfig``, peft_type TRAINABLE_TOKENS): the same
    layer with the values on the module itself, so its keys are PEFT's ``<path>.base_layer.weight`` and
    ``<path>.trainable_tokens_delta.<name>``; PEFT writes a tied layer's rows to the file too.

    >>> layer = TrainableTokensLayer(nn.Embedding(10, 4), "default", [2, 7])
    >>> sorted(n for n, _ in layer.named_parameters()), layer.token_indices
    (['base_layer.weight', 'trainable_tokens_delta.default'], {'default': [2, 7]})
    """

    delta_key = "trainable_tokens_delta"
    saves_tied = True
    token_indices = None  # TokenAdapter's dict {adapter: ids}, as PEFT's layer holds it (shadows the wrapper's view)

    def __init__(self, base_layer: nn.Module, adapter_name: str, token_indices: Optional[Sequence[int]] = None,
                 init_weights: bool = True, tied_to: Optional["TrainableTokensLayer"] = None):
        TokenAdapter.__init__(self, base_layer, tied_to._values if tied_to is not None else None)
        self._names: List[str] = []
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.update_layer(adapter_name, token_indices, init_weights)

    @property
    def _values(self) -> TokenAdapter:
        return self

    @property
    def base_layer(self) -> nn.Module:
        return self._modules["base_layer"]

    @classmethod
    def adopt_peft_layer(cls, peft_layer: nn.Module, adapter_names: Sequence[str], active_adapter: str,
                         tied_to: Optional["TrainableTokensLayer"] = None) -> "TrainableTokensLayer":
        """PEFT's layer as ours, holding the very same Parameters (converting a PeftModel)."""
        self = cls.__new__(cls)
        TokenAdapter.__init__(self, peft_layer.base_layer, tied_to._values if tied_to is not None else None)
        if tied_to is None:
            self.trainable_tokens_delta = peft_layer.trainable_tokens_delta
            for key, rows in peft_layer.trainable_tokens_original.items():
                self.trainable_tokens_original.register_buffer(key, rows, persistent=False)
            self.token_indices.update({k: list(v) for k, v in peft_layer.token_indices.items()})
        self._names = list(adapter_names)
        self.active_adapter = active_adapter
        self.disable_adapters = bool(peft_layer.disable_adapters)
        self.merged_adapters = list(peft_layer.merged_adapters)
        return self

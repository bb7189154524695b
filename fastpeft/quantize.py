"""Quantize a model's linear layers to bitsandbytes' NF4 / FP4 format without bitsandbytes' CUDA library.

``quantize_nf4(model)`` writes exactly the bytes bnb's ``quantize_4bit`` writes (``fastpeft/ops/nf4_quantize.py``: packed
nibbles, absmax, double-quant nested absmax / offset), on the weight's own device with PyTorch ops, and puts
them in one of two module types:

* ``module_type="bnb"`` (default when bitsandbytes imports): a real ``bitsandbytes.nn.Linear4bit`` holding a
  ``Params4bit`` marked as already quantized. The model is then what ``from_pretrained(...,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` gives: PEFT dispatches its 4-bit LoRA
  layer on it, bnb can run / save it, and fastpeft's kernels read it. bnb's Python package is imported,
  its CUDA library is never called by fastpeft.
* ``module_type="fastpeft"`` (default when bitsandbytes does not import): ``NF4Linear``, a plain module with
  the same attributes fastpeft reads (``weight`` = packed bytes, ``quant_state``, ``compute_dtype``); its
  forward dequantizes with fastpeft's kernel. PEFT does not know this type (use fastpeft.patch).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import bases
from .ops.nf4_format import _CODES, BLOCKSIZES, NF4QuantState, code_for, dynamic_code
from .ops.nf4_quantize import quantize_nf4 as _quantize

__all__ = ["quantize_nf4", "NF4Linear"]


class NF4Linear(nn.Module):
    """A frozen linear layer stored in bnb's 4-bit format, without bitsandbytes.

    ``weight``: packed bytes (uint8 [ceil(out*in/2), 1], or viewed as ``quant_storage``), ``quant_state``:
    an ``NF4QuantState`` whose tensors are this module's buffers (``absmax``, ``nested_absmax``, ``offset``),
    so ``state_dict`` / ``to(device)`` carry them.

    >>> lin = nn.Linear(64, 8)
    >>> q = NF4Linear.from_linear(lin)
    >>> q(torch.randn(2, 64)).shape
    torch.Size([2, 8])
    """

    is_fastpeft_nf4 = True

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, quant_state,
                 bias: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.blocksize = int(quant_state.blocksize)
        self.quant_type = quant_state.quant_type
        self.weight_dtype = quant_state.dtype
        self.nested = getattr(quant_state, "state2", None) is not None
        self.register_buffer("absmax", quant_state.absmax)
        if self.nested:
            self.register_buffer("nested_absmax", quant_state.state2.absmax)
            self.register_buffer("offset", quant_state.offset.reshape(()).to(torch.float32))
        self._rebuild_state()

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                    quant_storage: torch.dtype = torch.uint8, compute_dtype: Optional[torch.dtype] = None):
        packed, qs = _quantize(linear.weight.detach(), blocksize=blocksize, compress_statistics=double_quant,
                               quant_type=quant_type, quant_storage=quant_storage)
        return cls(linear.in_features, linear.out_features, packed, _as_plain_state(qs), linear.bias,
                   compute_dtype or linear.weight.dtype)

    def _rebuild_state(self) -> None:
        device = self.absmax.device
        fields = dict(shape=torch.Size([self.out_features, self.in_features]), code=code_for(self.quant_type, device),
                      blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype)
        if self.nested:
            state2 = NF4QuantState(absmax=self.nested_absmax, code=dynamic_code(device), blocksize=256,
                                   dtype=torch.float32)
            self.quant_state = NF4QuantState(absmax=self.absmax, offset=self.offset, state2=state2, **fields)
        else:
            self.quant_state = NF4QuantState(absmax=self.absmax, **fields)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._rebuild_state()  # buffers may be new tensors (to / cuda); a fresh state drops cached kernel args
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype or x.dtype
        w = bases.dequantize_linear4bit(self)
        b = None if self.bias is None else self.bias.to(cd)
        return F.linear(x.to(cd), w.to(cd), b).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.nested}, compute_dtype={self.compute_dtype}")


def _as_plain_state(qs) -> NF4QuantState:
    st2 = getattr(qs, "state2", None)
    plain2 = None if st2 is None else NF4QuantState(absmax=st2.absmax, code=st2.code, blocksize=st2.blocksize,
                                                    dtype=torch.float32)
    return NF4QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                         quant_type=qs.quant_type, dtype=qs.dtype, offset=getattr(qs, "offset", None), state2=plain2)


def _bnb_layer(linear: nn.Module, packed, qs, double_quant, quant_type, quant_storage, compute_dtype):
    import bitsandbytes as bnb  # noqa: PLC0415

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=quant_storage, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=quant_storage, module=layer, bnb_quantized=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bnb's CPU inference path would repack the weight in place into a CPU-only layout; keep the standard one.
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return layer


def _bnb_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except Exception:
        return False
    return True


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or re.fullmatch(s, name) for s in skip)


@torch.no_grad()
def quantize_nf4(model: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                 compute_dtype: Optional[torch.dtype] = None, quant_storage: torch.dtype = torch.uint8,
                 skip_modules: Optional[Iterable[str]] = None, module_type: str = "auto") -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` (in place; the output head and ``skip_modules`` stay dense)
    to bitsandbytes' 4-bit format, the same bytes as ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)`` gives, computed on each
    weight's device with PyTorch ops (no bitsandbytes CUDA library). Returns the model.

    compute_dtype: the layers' compute dtype (default: each weight's dtype). module_type: "bnb"
    (bitsandbytes Linear4bit), "fastpeft" (``NF4Linear``) or "auto" (bnb when it imports).

    >>> import transformers, fastpeft
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                                num_attention_heads=4, vocab_size=100)
    >>> model = fastpeft.quantize_nf4(transformers.AutoModelForCausalLM.from_config(cfg))
    >>> model = fastpeft.patch(model, fastpeft.LoraConfig(r=8, target_modules="all-linear"))
    """
    if quant_type not in _CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if module_type == "auto":
        module_type = "bnb" if _bnb_importable() else "fastpeft"
    if module_type not in ("bnb", "fastpeft"):
        raise ValueError(f"module_type must be 'auto', 'bnb' or 'fastpeft', got {module_type!r}")
    if module_type == "bnb" and not _bnb_importable():
        raise ImportError("quantize_nf4(module_type='bnb') needs bitsandbytes (pip install bitsandbytes); "
                          "module_type='fastpeft' works without it")
    if any(bases.is_linear4bit(m) for m in model.modules()):
        raise ValueError("this model already holds 4-bit layers; quantize_nf4 expects a dense model")
    skip = list(skip_modules or [])
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and m is not head and not _skipped(n, skip)]
    if not targets:
        raise ValueError("quantize_nf4 found no nn.Linear to quantize (after the output head and skip_modules)")
    for name, lin in targets:
        if lin.weight.device.type == "meta":
            raise ValueError(f"{name}: weight is on the meta device; materialize the model first")
        cd = compute_dtype or lin.weight.dtype
        if module_type == "bnb":
            packed, qs = _quantize(lin.weight.detach(), blocksize=blocksize, compress_statistics=double_quant,
                                   quant_type=quant_type, quant_storage=quant_storage)
            new = _bnb_layer(lin, packed, qs, double_quant, quant_type, quant_storage, cd)
        else:
            new = NF4Linear.from_linear(lin, blocksize, double_quant, quant_type, quant_storage, cd)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.is_loaded_in_4bit = True  # what transformers sets for bnb 4-bit models (PEFT dispatches on it)
    return model

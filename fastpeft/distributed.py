"""fastpeft on PyTorch's own distributed engines: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

Nothing here replaces them: a patched model is an ordinary ``nn.Module`` whose adapter parameters are ordinary
parameters, so ``DistributedDataParallel(model)`` and ``fully_shard(layer)`` / ``fully_shard(model)`` work as
they do for any model. This module holds the few pieces they need from us:

* ``prepare_fsdp2(model)``: call before ``fully_shard`` on a model with bitsandbytes 4-bit layers. FSDP2 turns
  every parameter into a DTensor, which drops the ``quant_state`` that a bnb ``Params4bit`` carries; this
  records it on the layer (``Linear4bit.quant_state``, bnb's own recovery slot, which transformers' 4-bit
  loader also fills). The packed NF4 bytes then shard along dim 0 like any parameter and are all-gathered
  only while their FSDP unit (e.g. one decoder layer) runs. The small quantization statistics (absmax, ~1/8
  of the packed bytes without double quant) stay replicated.
  Storage dtype of the bytes (``quant_storage``): FSDP2 never casts integer parameters, so uint8 bytes are
  safe under any ``MixedPrecisionPolicy`` -- but FSDP2 before torch 2.13 cannot hold an integer parameter at
  all (it wraps each shard in ``nn.Parameter`` with requires_grad=True, which integer tensors refuse). There
  the bytes are re-viewed as bf16 (bitsandbytes' ``quant_storage`` recipe for FSDP; the kernels read them
  back as bytes). A float view IS cast by a mixed-precision policy whose ``param_dtype`` differs from it, so
  the policy's param_dtype must be that storage dtype (bf16) or None.
* ``full_tensor`` / ``is_sharded``: used by ``fastpeft.save_adapter`` to gather a sharded adapter
  (a collective: every rank must call ``save_adapter``; rank 0 writes).
* ``shard_like``: used by ``fastpeft.load_adapter`` to copy a full tensor read from disk into a sharded
  parameter without communication (every rank reads the file and keeps its own shard).

Example (run with ``torchrun --nproc-per-node 2``; see examples/train_fsdp.py)::

    model = fastpeft.patch(model, fastpeft.LoraConfig(r=16, target_modules="all-linear"))
    fastpeft.distributed.prepare_fsdp2(model)           # only needed for 4-bit bases; harmless otherwise
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ...train...
    fastpeft.save_adapter(model, "out/")                 # on every rank: gathers, rank 0 writes
"""
from __future__ import annotations

import torch
import torch.nn as nn



def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter or gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor: ``DTensor.full_tensor()`` -- a collective, every rank of
    the mesh must call it -- or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` (the whole value, present on every rank) laid out like ``param``: for a DTensor, the local shard
    this rank owns, cut without communication; otherwise ``full`` itself."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


_FLOAT_STORAGE = (torch.bfloat16, torch.float16, torch.float32)


def fsdp2_keeps_integer_params() -> bool:
    """Whether this torch's FSDP2 can shard an integer (uint8) parameter: it must create the sharded
    ``nn.Parameter`` with the original ``requires_grad`` (torch >= 2.13 does; 2.11 used the default True,
    which an integer tensor refuses)."""
    import inspect

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError:  # no FSDP2 in this build: nothing to shard
        return True
    try:
        return "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)
    except (OSError, TypeError, AttributeError):
        return False  # cannot tell: the float view works on every version


def _storage_dtype(quant_storage) -> torch.dtype:
    if quant_storage == "auto":
        return torch.uint8 if fsdp2_keeps_integer_params() else torch.bfloat16
    if quant_storage != torch.uint8 and quant_storage not in _FLOAT_STORAGE:
        raise ValueError(f"prepare_fsdp2: quant_storage must be 'auto', torch.uint8 or one of "
                         f"{[str(d) for d in _FLOAT_STORAGE]}, got {quant_storage!r}")
    return quant_storage


def _set_storage(module: nn.Module, dtype: torch.dtype, name: str) -> None:
    """Re-view a 4-bit layer's packed weight as ``dtype`` (same bytes; [numel, 1] as bnb lays it out)."""
    weight = module.weight
    if weight.dtype == dtype:
        return
    flat = weight.data.reshape(-1).view(torch.uint8)
    size = torch.empty((), dtype=dtype).element_size()
    if flat.numel() % size:
        raise ValueError(f"{name}: {flat.numel()} packed bytes cannot be viewed as {dtype} (need a multiple of "
                         f"{size}); pass quant_storage=torch.uint8 on torch >= 2.13")
    new = flat.view(dtype).unsqueeze(1)
    if type(weight).__name__ == "Params4bit":  # keep bnb's parameter type (its forward reads .quant_state etc.)
        weight.data = new
        if hasattr(weight, "quant_storage"):
            weight.quant_storage = dtype
    else:
        module.weight = nn.Parameter(new, requires_grad=False)


def prepare_fsdp2(model: nn.Module, quant_storage="auto") -> nn.Module:
    """Make a model with 4-bit layers (bitsandbytes ``Linear4bit``, fastpeft ``NF4Linear``) shardable by FSDP2
    (call before ``fully_shard``); returns it.

    Records each ``Linear4bit``'s QuantState on the layer, where fastpeft (and bnb itself) look for it once
    FSDP2 has replaced the ``Params4bit`` by a DTensor, and stores the packed bytes as ``quant_storage``:
    "auto" keeps uint8 where this torch's FSDP2 can shard integer parameters and views them as bf16 where it
    cannot (see the module docstring: with a float storage, a MixedPrecisionPolicy's param_dtype must equal
    it or be None). Idempotent; a no-op for dense models.

    >>> import torch.nn as nn
    >>> prepare_fsdp2(nn.Sequential(nn.Linear(4, 4))) is not None
    True
    """
    dtype = _storage_dtype(quant_storage)
    for name, module in model.named_modules():
        if getattr(module, "is_fastpeft_nf4", False):
            _set_storage(module, dtype, name)
            continue
        if type(module).__name__ != "Linear4bit":
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None and getattr(module, "quant_state", None) is None:
            raise ValueError(
                f"{name}: this Linear4bit's weight is not quantized yet (no quant_state); move the model to its "
                "device (bitsandbytes quantizes on .to()) or load it with BitsAndBytesConfig before sharding"
            )
        if state is not None:
            module.quant_state = state
        if getattr(module.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{name}: bitsandbytes repacked this weight for its CPU inference kernel; that layout cannot be "
                "sharded -- set layer.support_avx512bf16_for_cpu = False before the first eval forward"
            )
        _set_storage(module, dtype, name)
    return model

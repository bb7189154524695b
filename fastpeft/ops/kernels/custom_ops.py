"""The LoRA / IA3 kernels as ``torch.library`` custom ops, so torch.compile sees one opaque op per adapted layer.

Ops (all on 2-D tensors; the wrappers below reshape):
    fastpeft::lora_fwd(x2, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (Y, S)
    fastpeft::lora_bwd(dy2, x2, S, weight, lora_A, lora_B, scaling, dropout_p, seed?,
                       need_x, need_w, need_b, need_A, need_B) -> (dX, dW, db, dA, dB)
    fastpeft::ia3_fwd(x2, weight, bias?, ia3_l, feedforward) -> (Y, Yb)
    fastpeft::ia3_bwd(dy2, saved, weight, ia3_l, feedforward, need_x, need_w, need_b) -> (dX, dW, db, dl)
  4-bit (NF4 / FP4) bases: the KernelState passed as its tensors + numbers (Q = packed, absmax, code, code2,
  absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype; ``KernelState.op_tensors``
  / ``op_scalars``), and the forward's GEMM path (``fused``) handed to the backward:
    fastpeft::nf4_lora_fwd(x2, bias?, lora_A, lora_B, scaling, dropout_p, seed?, fused, *Q) -> (Y, S)
    fastpeft::nf4_lora_bwd(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed?, fused, need_x, need_b, need_A,
                           need_B, *Q) -> (dX, db, dA, dB)
    fastpeft::nf4_ia3_fwd(x2, bias?, ia3_l, feedforward, *Q) -> (Y, Yb)
    fastpeft::nf4_ia3_bwd(dy2, saved, ia3_l, feedforward, need_x, need_b, *Q) -> (dX, db, dl)
  DoRA (kernels/dora.py; G = (g, 1/n), the per-row scale and inverse norm, fp32 [N]):
    fastpeft::dora_fwd(x2, weight, bias?, lora_A, lora_B, magnitude, scaling, dropout_p, seed?) -> (Y, S, Z0, g, inv_n)
    fastpeft::dora_bwd(dy2, x2, S, Z0, g, inv_n, weight, lora_A, lora_B, scaling, dropout_p, seed?,
                       need_x, need_b, need_A, need_B, need_m) -> (dX, db, dA, dB, dm)
    fastpeft::nf4_dora_fwd(x2, bias?, lora_A, lora_B, magnitude, scaling, dropout_p, seed?, *Q) -> (Y, S, Z0, g, inv_n)
    fastpeft::nf4_dora_bwd(dy2, x2, S, Z0, g, inv_n, lora_A, lora_B, scaling, dropout_p, seed?, need_x, need_b,
                           need_A, need_B, need_m, *Q) -> (dX, db, dA, dB, dm)
Each has a fake (meta) implementation for tracing and an autograd formula (``register_autograd``) built on the
``*_forward_2d / *_backward_2d`` functions of kernels/lora.py, ia3.py and nf4_lora.py: the numbers are exactly
those of the eager autograd Functions.

Conventions forced by the custom-op schema: outputs never alias inputs and are never None, so a gradient that
is not needed comes back as an empty tensor (numel 0) and IA3's feedforward ``Yb`` is empty (backward reads x2,
an input, instead). The dropout seed is a 0-dim int64 *tensor* (or None): under torch.compile it is drawn by
``fastpeft.nn._rng.dropout_seed`` from tensor ops, so no ``.item()`` breaks the graph; the op reads its value.

Why the eager path does not use these ops: a ``torch.library.custom_op`` call costs more host time than an
``autograd.Function.apply`` (schema parsing, dispatcher round trips, the autograd wrapper; measured in
benchmarks' compile check ``--host-overhead``), and small layers are host-bound. So ``lora_linear`` /
``ia3_linear`` / ``nf4_lora_linear`` / ``nf4_ia3_linear`` here dispatch: the ops while
``torch.compiler.is_compiling()``, the autograd Functions otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import refuse_dropout_in_graph
from ..nf4_format import KernelState, traced_kernel_state
from . import dora as _dora
from . import ia3 as _ia3
from . import lora as _lora
from . import nf4_lora as _nf4_lora
from .common import check_kernel_dtype, triton_ok

__all__ = ["lora_linear", "ia3_linear", "nf4_lora_linear", "nf4_ia3_linear", "dora_linear", "nf4_dora_linear",
           "dora_weight_norm", "nf4_weight_norm"]

_EMPTY = (0,)


def _seed_value(seed: Optional[Tensor]):
    if seed is None:
        return None
    refuse_dropout_in_graph()  # a graph would replay this call's mask forever (ops.refuse_dropout_in_graph)
    return int(seed)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _none_if_empty(t: Tensor, need: bool) -> Optional[Tensor]:
    return t if need else None


# ------------------------------------------------------------------------------------------------ LoRA
@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd(x2: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _lora.lora_forward_2d(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_value(seed))


@lora_fwd.register_fake
def _(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, N, R = x2.shape[0], weight.shape[0], lora_A.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, R), dtype=torch.float32)  # S' is fp32 whatever x's dtype


@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: Optional[Tensor], need_x: bool, need_w: bool, need_b: bool,
             need_A: bool, need_B: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dA, dB = _lora.lora_backward_2d(dy2.to(x2.dtype), x2, S, weight, lora_A, lora_B, scaling, dropout_p,
                                                _seed_value(seed), need_x, need_w, need_b, need_A,
                                                need_B, separate_outputs=True)  # custom-op returns may not alias
    f32 = torch.float32
    return (_or_empty(dx, x2), _or_empty(dw, x2), _or_empty(db, x2.new_empty(_EMPTY, dtype=f32)),
            _or_empty(dA, x2.new_empty(_EMPTY, dtype=f32)), _or_empty(dB, x2.new_empty(_EMPTY, dtype=f32)))


@lora_bwd.register_fake
def _(dy2, x2, S, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_w, need_b, need_A, need_B):
    f32 = torch.float32
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    return (x2.new_empty((M, K) if need_x else _EMPTY), x2.new_empty((N, K) if need_w else _EMPTY),
            x2.new_empty((N,) if need_b else _EMPTY, dtype=f32), x2.new_empty((R, K) if need_A else _EMPTY, dtype=f32),
            x2.new_empty((N, R) if need_B else _EMPTY, dtype=f32))


def _lora_setup(ctx, inputs, output):
    x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, S = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, weight, lora_A, lora_B, *((seed,) if seed is not None else ()))
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lora_backward(ctx, dy2, _dS):
    x2, S, weight, lora_A, lora_B, *rest = ctx.saved_tensors
    seed = rest[0] if ctx.has_seed else None
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx, dw, db, dA, dB = lora_bwd(dy2, x2, S, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
                                  need_x, need_w, need_b, need_A, need_B)
    return (
        _none_if_empty(dx, need_x),
        dw.to(ctx.weight_dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        dA.to(lora_A.dtype) if need_A else None,
        dB.to(lora_B.dtype) if need_B else None,
        None, None, None,
    )


lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup)


# ------------------------------------------------------------------------------------------------ IA3
@torch.library.custom_op("fastpeft::ia3_fwd", mutates_args=())
def ia3_fwd(x2: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_l: Tensor,
            feedforward: bool) -> Tuple[Tensor, Tensor]:
    y2, saved = _ia3.ia3_forward_2d(x2, weight, bias, ia3_l, feedforward)
    # feedforward saves x2 itself, an input: not returned (an output may not alias an input)
    return y2, (x2.new_empty(_EMPTY) if feedforward else saved)


@ia3_fwd.register_fake
def _(x2, weight, bias, ia3_l, feedforward):
    M, N = x2.shape[0], weight.shape[0]
    return x2.new_empty((M, N)), x2.new_empty(_EMPTY if feedforward else (M, N))


@torch.library.custom_op("fastpeft::ia3_bwd", mutates_args=())
def ia3_bwd(dy2: Tensor, saved: Tensor, weight: Tensor, ia3_l: Tensor, feedforward: bool,
            need_x: bool, need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dl = _ia3.ia3_backward_2d(dy2, saved, weight, ia3_l, feedforward, need_x, need_w, need_b)
    f32 = torch.float32
    return _or_empty(dx, dy2), _or_empty(dw, dy2), _or_empty(db, dy2.new_empty(_EMPTY, dtype=f32)), dl


@ia3_bwd.register_fake
def _(dy2, saved, weight, ia3_l, feedforward, need_x, need_w, need_b):
    M, N = dy2.shape
    K = weight.shape[1]
    f32 = torch.float32
    return (dy2.new_empty((M, K) if need_x else _EMPTY), dy2.new_empty((N, K) if need_w else _EMPTY),
            dy2.new_empty((N,) if need_b else _EMPTY, dtype=f32), dy2.new_empty((ia3_l.numel(),), dtype=f32))


def _ia3_setup(ctx, inputs, output):
    x2, weight, bias, ia3_l, feedforward = inputs
    _, yb = output
    ctx.save_for_backward(x2 if feedforward else yb, weight, ia3_l)
    ctx.feedforward = feedforward
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ia3_backward(ctx, dy2, _dyb):
    saved, weight, ia3_l = ctx.saved_tensors
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    dx, dw, db, dl = ia3_bwd(dy2, saved, weight, ia3_l, ctx.feedforward, need_x, need_w, need_b)
    return (
        _none_if_empty(dx, need_x),
        dw.to(ctx.weight_dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
        None,
    )


ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup)


# ------------------------------------------------------------------------------------------------ 4-bit bases
# The KernelState cannot cross a custom-op schema, so the NF4 ops take it as its tensors (absmax, code, code2,
# absmax2) and numbers (offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype), after the
# packed bytes; inside, KernelState.from_op_args rebuilds it and the 2-D functions of kernels/nf4_lora.py run
# the same kernels as the eager autograd Functions.
_NF4_TENSORS = 5  # packed + the 4 KernelState tensors: the quant arguments before the 9 numbers


@torch.library.custom_op("fastpeft::nf4_lora_fwd", mutates_args=())
def nf4_lora_fwd(x2: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: Optional[Tensor], fused: bool, packed: Tensor, absmax: Tensor, code: Tensor,
                 code2: Tensor, absmax2: Tensor, offset: float, blocksize: int, blocksize2: int, nested: bool,
                 qt: int, quant_type: str, N: int, K: int, state_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    return _nf4_lora.nf4_lora_forward_2d(x2, packed, ks, bias, lora_A, lora_B, scaling, dropout_p,
                                         _seed_value(seed), "fused" if fused else "buffer", reuse_buffer=False)


@nf4_lora_fwd.register_fake
def _(x2, bias, lora_A, lora_B, scaling, dropout_p, seed, fused, packed, absmax, code, code2, absmax2, offset,
      blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype):
    M, R = x2.shape[0], lora_A.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, R), dtype=torch.float32)


@torch.library.custom_op("fastpeft::nf4_lora_bwd", mutates_args=())
def nf4_lora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: Optional[Tensor], fused: bool, need_x: bool, need_b: bool, need_A: bool,
                 need_B: bool, packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor,
                 offset: float, blocksize: int, blocksize2: int, nested: bool, qt: int, quant_type: str, N: int,
                 K: int, state_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    dx, db, dA, dB = _nf4_lora.nf4_lora_backward_2d(dy2.to(x2.dtype), x2, S, packed, ks, lora_A, lora_B, scaling,
                                                   dropout_p, _seed_value(seed), "fused" if fused else "buffer",
                                                   need_x, need_b, need_A, need_B,
                                                   separate_outputs=True,  # returns may not alias
                                                   reuse_buffer=False)  # see nf4_lora_forward_2d
    f32 = x2.new_empty(_EMPTY, dtype=torch.float32)
    return _or_empty(dx, x2), _or_empty(db, f32), _or_empty(dA, f32), _or_empty(dB, f32)


@nf4_lora_bwd.register_fake
def _(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed, fused, need_x, need_b, need_A, need_B, packed, absmax,
      code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype):
    f32 = torch.float32
    M = x2.shape[0]
    R = lora_A.shape[0]
    return (x2.new_empty((M, K) if need_x else _EMPTY), x2.new_empty((N,) if need_b else _EMPTY, dtype=f32),
            x2.new_empty((R, K) if need_A else _EMPTY, dtype=f32),
            x2.new_empty((N, R) if need_B else _EMPTY, dtype=f32))


def _nf4_lora_setup(ctx, inputs, output):
    x2, bias, lora_A, lora_B, scaling, dropout_p, seed, fused = inputs[:8]
    quant = inputs[8:]
    _, S = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, lora_A, lora_B, *quant[:_NF4_TENSORS], *((seed,) if seed is not None else ()))
    ctx.quant_scalars = quant[_NF4_TENSORS:]
    ctx.scaling, ctx.dropout_p, ctx.fused = scaling, dropout_p, fused
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_lora_backward(ctx, dy2, _dS):
    x2, S, lora_A, lora_B, *rest = ctx.saved_tensors
    quant_tensors = rest[:_NF4_TENSORS]
    seed = rest[_NF4_TENSORS] if ctx.has_seed else None
    need_x, need_b, need_A, need_B = ctx.needs_input_grad[:4]
    dx, db, dA, dB = nf4_lora_bwd(dy2, x2, S, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, ctx.fused, need_x,
                                  need_b, need_A, need_B, *quant_tensors, *ctx.quant_scalars)
    return (
        _none_if_empty(dx, need_x),
        db.to(ctx.bias_dtype) if need_b else None,
        dA.to(lora_A.dtype) if need_A else None,
        dB.to(lora_B.dtype) if need_B else None,
    ) + (None,) * (4 + _NF4_TENSORS + len(ctx.quant_scalars))


nf4_lora_fwd.register_autograd(_nf4_lora_backward, setup_context=_nf4_lora_setup)


@torch.library.custom_op("fastpeft::nf4_ia3_fwd", mutates_args=())
def nf4_ia3_fwd(x2: Tensor, bias: Optional[Tensor], ia3_l: Tensor, feedforward: bool, packed: Tensor,
                absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: float, blocksize: int,
                blocksize2: int, nested: bool, qt: int, quant_type: str, N: int, K: int,
                state_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    y2, saved = _nf4_lora.nf4_ia3_forward_2d(x2, packed, ks, bias, ia3_l, feedforward, reuse_buffer=False)
    return y2, (x2.new_empty(_EMPTY) if feedforward else saved)  # feedforward saves x2, an input: not returned


@nf4_ia3_fwd.register_fake
def _(x2, bias, ia3_l, feedforward, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested,
      qt, quant_type, N, K, state_dtype):
    M = x2.shape[0]
    return x2.new_empty((M, N)), x2.new_empty(_EMPTY if feedforward else (M, N))


@torch.library.custom_op("fastpeft::nf4_ia3_bwd", mutates_args=())
def nf4_ia3_bwd(dy2: Tensor, saved: Tensor, ia3_l: Tensor, feedforward: bool, need_x: bool, need_b: bool,
                packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: float,
                blocksize: int, blocksize2: int, nested: bool, qt: int, quant_type: str, N: int, K: int,
                state_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    dx, db, dl = _nf4_lora.nf4_ia3_backward_2d(dy2, saved, packed, ks, ia3_l, feedforward, need_x, need_b,
                                               reuse_buffer=False)
    return _or_empty(dx, saved), _or_empty(db, dy2.new_empty(_EMPTY, dtype=torch.float32)), dl


@nf4_ia3_bwd.register_fake
def _(dy2, saved, ia3_l, feedforward, need_x, need_b, packed, absmax, code, code2, absmax2, offset, blocksize,
      blocksize2, nested, qt, quant_type, N, K, state_dtype):
    M = dy2.shape[0]
    dt = saved.dtype if feedforward else dy2.dtype  # feedforward computes in x's dtype (saved = x2)
    f32 = torch.float32
    return (dy2.new_empty((M, K) if need_x else _EMPTY, dtype=dt),
            dy2.new_empty((N,) if need_b else _EMPTY, dtype=f32), dy2.new_empty((ia3_l.numel(),), dtype=f32))


def _nf4_ia3_setup(ctx, inputs, output):
    x2, bias, ia3_l, feedforward = inputs[:4]
    quant = inputs[4:]
    _, yb = output
    ctx.save_for_backward(x2 if feedforward else yb, ia3_l, *quant[:_NF4_TENSORS])
    ctx.quant_scalars = quant[_NF4_TENSORS:]
    ctx.feedforward = feedforward
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_ia3_backward(ctx, dy2, _dyb):
    saved, ia3_l, *quant_tensors = ctx.saved_tensors
    need_x, need_b, need_l = ctx.needs_input_grad[:3]
    dx, db, dl = nf4_ia3_bwd(dy2, saved, ia3_l, ctx.feedforward, need_x, need_b, *quant_tensors,
                             *ctx.quant_scalars)
    return (
        _none_if_empty(dx, need_x),
        db.to(ctx.bias_dtype) if need_b else None,
        dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
    ) + (None,) * (1 + _NF4_TENSORS + len(ctx.quant_scalars))


nf4_ia3_fwd.register_autograd(_nf4_ia3_backward, setup_context=_nf4_ia3_setup)


# ------------------------------------------------------------------------------------------------ DoRA
def _dora_fake_fwd(x2, N, R):
    f32 = torch.float32
    M = x2.shape[0]
    return (x2.new_empty((M, N)), x2.new_empty((M, R), dtype=f32), x2.new_empty((M, N)),
            x2.new_empty((N,), dtype=f32), x2.new_empty((N,), dtype=f32))


def _dora_fake_bwd(x2, N, R, need_x, need_b, need_A, need_B, need_m):
    f32 = torch.float32
    M, K = x2.shape
    return (x2.new_empty((M, K) if need_x else _EMPTY), x2.new_empty((N,) if need_b else _EMPTY, dtype=f32),
            x2.new_empty((R, K) if need_A else _EMPTY, dtype=f32),
            x2.new_empty((N, R) if need_B else _EMPTY, dtype=f32), x2.new_empty((N,) if need_m else _EMPTY, dtype=f32))


def _dora_bwd_outputs(x2, dx, db, dA, dB, dm):
    f32 = x2.new_empty(_EMPTY, dtype=torch.float32)
    return _or_empty(dx, x2), _or_empty(db, f32), _or_empty(dA, f32), _or_empty(dB, f32), _or_empty(dm, f32)


def _dora_grads_out(ctx, dx, db, dA, dB, dm, lora_A, lora_B, magnitude, need):
    need_x, need_b, need_A, need_B, need_m = need
    return (
        _none_if_empty(dx, need_x),
        db.to(ctx.bias_dtype) if need_b else None,
        dA.to(lora_A.dtype) if need_A else None,
        dB.to(lora_B.dtype) if need_B else None,
        dm.to(magnitude.dtype) if need_m else None,
    )


@torch.library.custom_op("fastpeft::dora_fwd", mutates_args=())
def dora_fwd(x2: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             scaling: float, dropout_p: float, seed: Optional[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _dora.dora_forward_2d(x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, _seed_value(seed))


@dora_fwd.register_fake
def _(x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
    return _dora_fake_fwd(x2, weight.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastpeft::dora_bwd", mutates_args=())
def dora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, Z0: Tensor, g: Tensor, inv_n: Tensor, weight: Tensor,
             lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool,
             need_b: bool, need_A: bool, need_B: bool, need_m: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _dora.dora_backward_2d(dy2.to(x2.dtype), x2, S, Z0, g, inv_n, weight, lora_A, lora_B, scaling, dropout_p,
                                 _seed_value(seed), need_x, need_b, need_A, need_B, need_m, separate_outputs=True)
    return _dora_bwd_outputs(x2, *out)


@dora_bwd.register_fake
def _(dy2, x2, S, Z0, g, inv_n, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_b, need_A, need_B,
      need_m):
    return _dora_fake_bwd(x2, weight.shape[0], lora_A.shape[0], need_x, need_b, need_A, need_B, need_m)


def _dora_setup(ctx, inputs, output):
    x2, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed = inputs
    _, S, Z0, g, inv_n = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, Z0, g, inv_n, weight, lora_A, lora_B, magnitude,
                          *((seed,) if seed is not None else ()))
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dora_backward(ctx, dy2, *_unused):
    x2, S, Z0, g, inv_n, weight, lora_A, lora_B, magnitude, *rest = ctx.saved_tensors
    seed = rest[0] if ctx.has_seed else None
    need_x, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    out = dora_bwd(dy2, x2, S, Z0, g, inv_n, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need_x,
                   need_b, need_A, need_B, need_m)
    dx, db, dA, dB, dm = _dora_grads_out(ctx, *out, lora_A, lora_B, magnitude, (need_x, need_b, need_A, need_B, need_m))
    return dx, None, db, dA, dB, dm, None, None, None


dora_fwd.register_autograd(_dora_backward, setup_context=_dora_setup)


@torch.library.custom_op("fastpeft::nf4_dora_fwd", mutates_args=())
def nf4_dora_fwd(x2: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 scaling: float, dropout_p: float, seed: Optional[Tensor], packed: Tensor, absmax: Tensor,
                 code: Tensor, code2: Tensor, absmax2: Tensor, offset: float, blocksize: int, blocksize2: int,
                 nested: bool, qt: int, quant_type: str, N: int, K: int, state_dtype: torch.dtype
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    w = _nf4_lora.dequantize_to(packed, ks, x2.dtype, reuse=False)  # no shared buffer in graphs (nf4_lora.py)
    return _dora.dora_forward_2d(x2, w, bias, lora_A, lora_B, magnitude, scaling, dropout_p, _seed_value(seed))


@nf4_dora_fwd.register_fake
def _(x2, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, packed, absmax, code, code2, absmax2, offset,
      blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype):
    return _dora_fake_fwd(x2, N, lora_A.shape[0])


@torch.library.custom_op("fastpeft::nf4_dora_bwd", mutates_args=())
def nf4_dora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, Z0: Tensor, g: Tensor, inv_n: Tensor, lora_A: Tensor,
                 lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool, need_b: bool,
                 need_A: bool, need_B: bool, need_m: bool, packed: Tensor, absmax: Tensor, code: Tensor,
                 code2: Tensor, absmax2: Tensor, offset: float, blocksize: int, blocksize2: int, nested: bool,
                 qt: int, quant_type: str, N: int, K: int, state_dtype: torch.dtype
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ks = KernelState.from_op_args(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type,
                                  N, K, state_dtype)
    w = _nf4_lora.dequantize_to(packed, ks, x2.dtype, reuse=False) if need_x else None
    out = _dora.dora_backward_2d(dy2.to(x2.dtype), x2, S, Z0, g, inv_n, w, lora_A, lora_B, scaling, dropout_p,
                                 _seed_value(seed), need_x, need_b, need_A, need_B, need_m, separate_outputs=True)
    return _dora_bwd_outputs(x2, *out)


@nf4_dora_bwd.register_fake
def _(dy2, x2, S, Z0, g, inv_n, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_b, need_A, need_B, need_m,
      packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype):
    return _dora_fake_bwd(x2, N, lora_A.shape[0], need_x, need_b, need_A, need_B, need_m)


_NF4_DORA_LEAD = 8  # x2, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed: then the quant arguments


def _nf4_dora_setup(ctx, inputs, output):
    x2, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed = inputs[:_NF4_DORA_LEAD]
    quant = inputs[_NF4_DORA_LEAD:]
    _, S, Z0, g, inv_n = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, Z0, g, inv_n, lora_A, lora_B, magnitude, *quant[:_NF4_TENSORS],
                          *((seed,) if seed is not None else ()))
    ctx.quant_scalars = quant[_NF4_TENSORS:]
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_dora_backward(ctx, dy2, *_unused):
    x2, S, Z0, g, inv_n, lora_A, lora_B, magnitude, *rest = ctx.saved_tensors
    quant_tensors = rest[:_NF4_TENSORS]
    seed = rest[_NF4_TENSORS] if ctx.has_seed else None
    need_x, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:5]
    out = nf4_dora_bwd(dy2, x2, S, Z0, g, inv_n, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need_x, need_b,
                       need_A, need_B, need_m, *quant_tensors, *ctx.quant_scalars)
    grads = _dora_grads_out(ctx, *out, lora_A, lora_B, magnitude, (need_x, need_b, need_A, need_B, need_m))
    return grads + (None,) * (3 + _NF4_TENSORS + len(ctx.quant_scalars))


nf4_dora_fwd.register_autograd(_nf4_dora_backward, setup_context=_nf4_dora_setup)


# ------------------------------------------------------------------------------------------------ wrappers
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _seed_tensor(seed, dropout_p: float, what: str):
    if dropout_p > 0.0 and seed is None:
        raise ValueError(f"{what}: dropout_p > 0 needs a seed")
    if dropout_p <= 0.0:
        return None
    return seed if isinstance(seed, Tensor) else torch.tensor(int(seed), dtype=torch.int64)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None) -> Tensor:
    """``kernels/lora.py: lora_linear`` (eager: its autograd Function) or, under torch.compile, the custom op.

    ``seed``: an int in eager mode; under torch.compile a 0-dim int64 tensor (``nn._rng.dropout_seed`` gives one).

    >>> x = torch.randn(2, 3, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)
    >>> lora_linear(x, w, None, a, b, 2.0).shape
    torch.Size([2, 3, 8])
    """
    if not _compiling() or not triton_ok(x):
        if isinstance(seed, Tensor):  # reference fallback under compile (CPU without the interpreter)
            seed = int(seed)
        return _lora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    check_kernel_dtype(x.dtype, "lora_linear")
    K, N = x.shape[-1], weight.shape[0]
    y2, _ = lora_fwd(x.reshape(-1, K), weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                     _seed_tensor(seed, dropout_p, "lora_linear"))
    return y2.view(*x.shape[:-1], N)


def ia3_linear(x, weight, bias, ia3_l, feedforward: bool) -> Tensor:
    """``kernels/ia3.py: ia3_linear`` (eager: its autograd Function) or, under torch.compile, the custom op."""
    if not _compiling() or not triton_ok(x):
        return _ia3.ia3_linear(x, weight, bias, ia3_l, feedforward)
    check_kernel_dtype(x.dtype, "ia3_linear")
    K, N = x.shape[-1], weight.shape[0]
    y2, _ = ia3_fwd(x.reshape(-1, K), weight, bias, ia3_l, bool(feedforward))
    return y2.view(*x.shape[:-1], N)


# Under torch.compile the NF4 wrappers read the QuantState while dynamo traces them (``traced_kernel_state``):
# its tensors are traced from the state's attributes (graph inputs, guarded by dynamo), its numbers come from the
# KernelState cached on the state (constants: ``offset`` would need a ``.item()``, which breaks the graph). The
# drop-ins fill that cache eagerly when they are built and after every ``.to()`` (nn/bases.py warm_nf4_state)
# and, if it is missing anyway, run that one call outside the graph instead of coming here.


def _nf4_args(packed: Tensor, quant_state, device) -> tuple:
    ks = traced_kernel_state(quant_state, device)
    return ks, (packed, *ks.op_tensors(), *ks.op_scalars())


def nf4_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                    seed=None) -> Tensor:
    """``kernels/nf4_lora.py: nf4_lora_linear`` (eager: its autograd Function) or, under torch.compile, the
    ``fastpeft::nf4_lora_fwd`` custom op (one graph node per layer, no graph break).

    ``seed``: an int in eager mode; under torch.compile a 0-dim int64 tensor (``nn._rng.dropout_seed``).

    >>> from fastpeft.ops.nf4_quantize import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 64))
    >>> nf4_lora_linear(torch.randn(2, 3, 64), packed, qs, None, torch.randn(4, 64), torch.randn(8, 4), 2.0).shape
    torch.Size([2, 3, 8])
    """
    if not _compiling() or not triton_ok(x):
        if isinstance(seed, Tensor):  # reference fallback under compile (CPU without the interpreter)
            seed = int(seed)
        return _nf4_lora.nf4_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, seed)
    check_kernel_dtype(x.dtype, "nf4_lora_linear")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ks, quant = _nf4_args(packed, quant_state, x.device)
    fused = _nf4_lora.nf4_path(x2.shape[0], ks, x.dtype) == "fused"
    y2, _ = nf4_lora_fwd(x2, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                         _seed_tensor(seed, dropout_p, "nf4_lora_linear"), fused, *quant)
    return y2.view(*x.shape[:-1], y2.shape[-1])


def nf4_ia3_linear(x, packed, quant_state, bias, ia3_l, feedforward: bool) -> Tensor:
    """``kernels/nf4_lora.py: nf4_ia3_linear`` (eager: its autograd Function) or, under torch.compile, the
    ``fastpeft::nf4_ia3_fwd`` custom op."""
    if not _compiling() or not triton_ok(x):
        return _nf4_lora.nf4_ia3_linear(x, packed, quant_state, bias, ia3_l, feedforward)
    check_kernel_dtype(x.dtype, "nf4_ia3_linear")
    _, quant = _nf4_args(packed, quant_state, x.device)
    y2, _ = nf4_ia3_fwd(x.reshape(-1, x.shape[-1]), bias, ia3_l, bool(feedforward), *quant)
    return y2.view(*x.shape[:-1], y2.shape[-1])


def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per output row (``kernels/dora.py``); called only out of torch.compile (the norm cache)."""
    return _dora.dora_weight_norm(weight, lora_A, lora_B, scaling)


def nf4_weight_norm(packed, quant_state, lora_A, lora_B, scaling: float, dtype: torch.dtype) -> Tensor:
    """The DoRA norm over a 4-bit base (``kernels/dora.py``); called only out of torch.compile."""
    return _dora.nf4_weight_norm(packed, quant_state, lora_A, lora_B, scaling, dtype)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0, seed=None,
                weight_norm: Optional[Tensor] = None) -> Tensor:
    """``kernels/dora.py: dora_linear`` (eager: its autograd Function) or, under torch.compile, the
    ``fastpeft::dora_fwd`` custom op (one graph node per layer; the norm is recomputed there, never cached).

    >>> x = torch.randn(2, 3, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)  # doctest: +SKIP
    >>> dora_linear(x.cuda(), w.cuda(), None, a.cuda(), b.cuda(), torch.ones(8).cuda(), 2.0).shape  # doctest: +SKIP
    torch.Size([2, 3, 8])
    """
    if not _compiling():
        if isinstance(seed, Tensor):
            seed = int(seed)
        return _dora.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_norm)
    check_kernel_dtype(x.dtype, "dora_linear")
    K, N = x.shape[-1], weight.shape[0]
    y2 = dora_fwd(x.reshape(-1, K), weight, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p),
                  _seed_tensor(seed, dropout_p, "dora_linear"))[0]
    return y2.view(*x.shape[:-1], N)


def nf4_dora_linear(x, packed, quant_state, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0,
                    seed=None, weight_norm: Optional[Tensor] = None) -> Tensor:
    """``kernels/dora.py: nf4_dora_linear`` (eager) or, under torch.compile, the ``fastpeft::nf4_dora_fwd`` op."""
    if not _compiling():
        if isinstance(seed, Tensor):
            seed = int(seed)
        return _dora.nf4_dora_linear(x, packed, quant_state, bias, lora_A, lora_B, magnitude, scaling, dropout_p,
                                     seed, weight_norm)
    check_kernel_dtype(x.dtype, "nf4_dora_linear")
    K = x.shape[-1]
    _, quant = _nf4_args(packed, quant_state, x.device)
    y2 = nf4_dora_fwd(x.reshape(-1, K), bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p),
                      _seed_tensor(seed, dropout_p, "nf4_dora_linear"), *quant)[0]
    return y2.view(*x.shape[:-1], y2.shape[-1])

"""The LoRA / IA3 kernels as ``torch.library`` custom ops, so torch.compile sees one opaque op per adapted layer.

Ops (all on 2-D tensors; the wrappers below reshape):
    fastpeft::lora_fwd(x2, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?, triton_gemm) -> (Y, S)
    fastpeft::lora_bwd(dy2, x2, S, weight, lora_A, lora_B, scaling, dropout_p, seed?, triton_gemm,
                       need_x, need_w, need_b, need_A, need_B) -> (dX, dW, db, dA, dB)
    fastpeft::ia3_fwd(x2, weight, bias?, ia3_l, feedforward, triton_gemm) -> (Y, Yb)
    fastpeft::ia3_bwd(dy2, saved, weight, ia3_l, feedforward, triton_gemm, need_x, need_w, need_b)
                       -> (dX, dW, db, dl)
  4-bit (NF4 / FP4) bases, the QuantState passed as tensors + scalars (Q = packed, absmax, code, code2, absmax2,
  offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype; see the "4-bit bases" section):
    fastpeft::nf4_lora_fwd(x2, bias?, lora_A, lora_B, scaling, dropout_p, seed?, *Q) -> (Y, S)
    fastpeft::nf4_lora_bwd(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed?, need_x, need_b, need_A, need_B,
                           *Q) -> (dX, db, dA, dB)
    fastpeft::nf4_ia3_fwd(x2, bias?, ia3_l, feedforward, *Q) -> (Y, Yb)
    fastpeft::nf4_ia3_bwd(dy2, saved, ia3_l, feedforward, need_x, need_b, *Q) -> (dX, db, dl)
Each has a fake (meta) implementation for tracing and an autograd formula (``register_autograd``) built on
``fastpeft.ops.lora.lora_forward_2d / lora_backward_2d``, ``fastpeft.ops.ia3.ia3_forward_2d / ia3_backward_2d``
and ``fastpeft.ops.nf4_lora.nf4_{lora,ia3}_{forward,backward}_2d``: the numbers are exactly those of the eager
autograd Functions.

Conventions forced by the custom-op schema: outputs never alias inputs and are never None, so a gradient that
is not needed comes back as an empty tensor (numel 0) and IA3's feedforward ``Yb`` is empty (backward reads x2,
an input, instead). The dropout seed is a 0-dim int64 *tensor* (or None): under torch.compile it is drawn by
``fastpeft.nn._rng.dropout_seed`` from tensor ops, so no ``.item()`` breaks the graph; the op reads its value.

Why the eager path does not use these ops: a ``torch.library.custom_op`` call costs more host time than an
``autograd.Function.apply`` (schema parsing, dispatcher round trips, the autograd wrapper; measured in
benchmarks/compile_check.py ``--host-overhead`` and recorded in the README), and small layers are host-bound on
an H100. So ``lora_linear`` / ``ia3_linear`` / ``nf4_lora_linear`` / ``nf4_ia3_linear`` here dispatch: the ops while
``torch.compiler.is_compiling()``, the autograd Functions of fastpeft.ops.lora / ia3 / nf4_lora otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ia3 as _ia3
from . import lora as _lora
from . import nf4 as _nf4
from . import nf4_lora as _nf4_lora
from ._common import triton_ok

_EMPTY = (0,)


def _seed_value(seed: Optional[Tensor]):
    return None if seed is None else int(seed)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _none_if_empty(t: Tensor, need: bool) -> Optional[Tensor]:
    return t if need else None


# ------------------------------------------------------------------------------------------------ LoRA
@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd(x2: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: Optional[Tensor], triton_gemm: bool) -> Tuple[Tensor, Tensor]:
    y2, S = _lora.lora_forward_2d(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_value(seed),
                                  triton_gemm)
    return y2, S


@lora_fwd.register_fake
def _(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, triton_gemm):
    M, N, R = x2.shape[0], weight.shape[0], lora_A.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, R), dtype=torch.float32)  # S' is fp32 whatever x's dtype


@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: Optional[Tensor], triton_gemm: bool, need_x: bool, need_w: bool, need_b: bool,
             need_A: bool, need_B: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dA, dB = _lora.lora_backward_2d(dy2.to(x2.dtype), x2, S, weight, lora_A, lora_B, scaling, dropout_p,
                                                _seed_value(seed), triton_gemm, need_x, need_w, need_b, need_A,
                                                need_B, separate_outputs=True)  # custom-op returns may not alias
    f32 = torch.float32
    return (_or_empty(dx, x2), _or_empty(dw, x2), _or_empty(db, x2.new_empty(_EMPTY, dtype=f32)),
            _or_empty(dA, x2.new_empty(_EMPTY, dtype=f32)), _or_empty(dB, x2.new_empty(_EMPTY, dtype=f32)))


@lora_bwd.register_fake
def _(dy2, x2, S, weight, lora_A, lora_B, scaling, dropout_p, seed, triton_gemm, need_x, need_w, need_b, need_A,
      need_B):
    f32 = torch.float32
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    return (x2.new_empty((M, K) if need_x else _EMPTY), x2.new_empty((N, K) if need_w else _EMPTY),
            x2.new_empty((N,) if need_b else _EMPTY, dtype=f32), x2.new_empty((R, K) if need_A else _EMPTY, dtype=f32),
            x2.new_empty((N, R) if need_B else _EMPTY, dtype=f32))


def _lora_setup(ctx, inputs, output):
    x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, triton_gemm = inputs
    _, S = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, weight, lora_A, lora_B, *((seed,) if seed is not None else ()))
    ctx.scaling, ctx.dropout_p, ctx.triton_gemm = scaling, dropout_p, triton_gemm
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lora_backward(ctx, dy2, _dS):
    x2, S, weight, lora_A, lora_B, *rest = ctx.saved_tensors
    seed = rest[0] if ctx.has_seed else None
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx, dw, db, dA, dB = lora_bwd(dy2, x2, S, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
                                  ctx.triton_gemm, need_x, need_w, need_b, need_A, need_B)
    return (
        _none_if_empty(dx, need_x),
        dw.to(ctx.weight_dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        dA.to(lora_A.dtype) if need_A else None,
        dB.to(lora_B.dtype) if need_B else None,
        None, None, None, None,
    )


lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup)


# ------------------------------------------------------------------------------------------------ IA3
@torch.library.custom_op("fastpeft::ia3_fwd", mutates_args=())
def ia3_fwd(x2: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_l: Tensor, feedforward: bool,
            triton_gemm: bool) -> Tuple[Tensor, Tensor]:
    y2, saved = _ia3.ia3_forward_2d(x2, weight, bias, ia3_l, feedforward, triton_gemm)
    # feedforward saves x2 itself, an input: not returned (an output may not alias an input)
    return y2, (x2.new_empty(_EMPTY) if feedforward else saved)


@ia3_fwd.register_fake
def _(x2, weight, bias, ia3_l, feedforward, triton_gemm):
    M, N = x2.shape[0], weight.shape[0]
    return x2.new_empty((M, N)), x2.new_empty(_EMPTY if feedforward else (M, N))


@torch.library.custom_op("fastpeft::ia3_bwd", mutates_args=())
def ia3_bwd(dy2: Tensor, saved: Tensor, weight: Tensor, ia3_l: Tensor, feedforward: bool, triton_gemm: bool,
            need_x: bool, need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dl = _ia3.ia3_backward_2d(dy2, saved, weight, ia3_l, feedforward, triton_gemm, need_x, need_w,
                                          need_b)
    f32 = torch.float32
    return _or_empty(dx, dy2), _or_empty(dw, dy2), _or_empty(db, dy2.new_empty(_EMPTY, dtype=f32)), dl


@ia3_bwd.register_fake
def _(dy2, saved, weight, ia3_l, feedforward, triton_gemm, need_x, need_w, need_b):
    M, N = dy2.shape
    K = weight.shape[1]
    f32 = torch.float32
    return (dy2.new_empty((M, K) if need_x else _EMPTY), dy2.new_empty((N, K) if need_w else _EMPTY),
            dy2.new_empty((N,) if need_b else _EMPTY, dtype=f32), dy2.new_empty((ia3_l.numel(),), dtype=f32))


def _ia3_setup(ctx, inputs, output):
    x2, weight, bias, ia3_l, feedforward, triton_gemm = inputs
    _, yb = output
    ctx.save_for_backward(x2 if feedforward else yb, weight, ia3_l)
    ctx.feedforward, ctx.triton_gemm = feedforward, triton_gemm
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ia3_backward(ctx, dy2, _dyb):
    saved, weight, ia3_l = ctx.saved_tensors
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    dx, dw, db, dl = ia3_bwd(dy2, saved, weight, ia3_l, ctx.feedforward, ctx.triton_gemm, need_x, need_w, need_b)
    return (
        _none_if_empty(dx, need_x),
        dw.to(ctx.weight_dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        dl.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None,
        None, None,
    )


ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup)


# ------------------------------------------------------------------------------------------------ 4-bit bases
# The QuantState cannot cross a custom-op schema, so the NF4 ops take it as kernel_state's pieces:
#   tensors  packed (bnb's bytes, any quant_storage dtype), absmax, code, code2, absmax2
#   scalars  offset, blocksize, blocksize2, nested, qt (select-tree id), quant_type, N, K, state_dtype
# (non-nested: code2 = code, absmax2 = absmax, blocksize2 = 1, offset 0). Inside, nf4.kernel_quant_state
# rebuilds a light state whose kernel_state cache is pre-filled, and the 2-D functions of ops.nf4_lora run
# the same kernels as the eager autograd Functions.
_NF4_TENSORS = 5  # packed, absmax, code, code2, absmax2: the last quant arguments but the 9 scalars


def _light_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K,
                 state_dtype):
    return _nf4.kernel_quant_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt,
                                   quant_type, (N, K), state_dtype)


@torch.library.custom_op("fastpeft::nf4_lora_fwd", mutates_args=())
def nf4_lora_fwd(x2: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: Optional[Tensor], packed: Tensor, absmax: Tensor, code: Tensor,
                 code2: Tensor, absmax2: Tensor, offset: float, blocksize: int, blocksize2: int, nested: bool,
                 qt: int, quant_type: str, N: int, K: int, state_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    qs = _light_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K,
                      state_dtype)
    return _nf4_lora.nf4_lora_forward_2d(x2, packed, qs, bias, lora_A, lora_B, scaling, dropout_p,
                                         _seed_value(seed))


@nf4_lora_fwd.register_fake
def _(x2, bias, lora_A, lora_B, scaling, dropout_p, seed, packed, absmax, code, code2, absmax2, offset, blocksize,
      blocksize2, nested, qt, quant_type, N, K, state_dtype):
    M, R = x2.shape[0], lora_A.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, R), dtype=torch.float32)


@torch.library.custom_op("fastpeft::nf4_lora_bwd", mutates_args=())
def nf4_lora_bwd(dy2: Tensor, x2: Tensor, S: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: Optional[Tensor], need_x: bool, need_b: bool, need_A: bool, need_B: bool,
                 packed: Tensor, absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: float,
                 blocksize: int, blocksize2: int, nested: bool, qt: int, quant_type: str, N: int, K: int,
                 state_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    qs = _light_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K,
                      state_dtype)
    # The forward op cannot hand its (path, triton_gemm) choice to the backward (op outputs are tensors):
    # recompute it from the same inputs (M, weight, dtype, device, env), so it is the forward's choice.
    plan = _nf4_lora.nf4_lora_plan(x2.shape[0], qs, x2.dtype, x2.device)
    dx, db, dA, dB = _nf4_lora.nf4_lora_backward_2d(dy2.to(x2.dtype), x2, S, packed, qs, lora_A, lora_B, scaling,
                                                   dropout_p, _seed_value(seed), plan, need_x, need_b, need_A,
                                                   need_B, separate_outputs=True)  # returns may not alias
    f32 = x2.new_empty(_EMPTY, dtype=torch.float32)
    return _or_empty(dx, x2), _or_empty(db, f32), _or_empty(dA, f32), _or_empty(dB, f32)


@nf4_lora_bwd.register_fake
def _(dy2, x2, S, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_b, need_A, need_B, packed, absmax, code,
      code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K, state_dtype):
    f32 = torch.float32
    M = x2.shape[0]
    R = lora_A.shape[0]
    return (x2.new_empty((M, K) if need_x else _EMPTY), x2.new_empty((N,) if need_b else _EMPTY, dtype=f32),
            x2.new_empty((R, K) if need_A else _EMPTY, dtype=f32),
            x2.new_empty((N, R) if need_B else _EMPTY, dtype=f32))


def _nf4_lora_setup(ctx, inputs, output):
    x2, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs[:7]
    quant = inputs[7:]
    _, S = output
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x2, S, lora_A, lora_B, *quant[:_NF4_TENSORS], *((seed,) if seed is not None else ()))
    ctx.quant_scalars = quant[_NF4_TENSORS:]
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_lora_backward(ctx, dy2, _dS):
    x2, S, lora_A, lora_B, *rest = ctx.saved_tensors
    quant_tensors = rest[:_NF4_TENSORS]
    seed = rest[_NF4_TENSORS] if ctx.has_seed else None
    need_x, need_b, need_A, need_B = ctx.needs_input_grad[:4]
    dx, db, dA, dB = nf4_lora_bwd(dy2, x2, S, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need_x, need_b,
                                  need_A, need_B, *quant_tensors, *ctx.quant_scalars)
    return (
        _none_if_empty(dx, need_x),
        db.to(ctx.bias_dtype) if need_b else None,
        dA.to(lora_A.dtype) if need_A else None,
        dB.to(lora_B.dtype) if need_B else None,
    ) + (None,) * (3 + _NF4_TENSORS + len(ctx.quant_scalars))


nf4_lora_fwd.register_autograd(_nf4_lora_backward, setup_context=_nf4_lora_setup)


@torch.library.custom_op("fastpeft::nf4_ia3_fwd", mutates_args=())
def nf4_ia3_fwd(x2: Tensor, bias: Optional[Tensor], ia3_l: Tensor, feedforward: bool, packed: Tensor,
                absmax: Tensor, code: Tensor, code2: Tensor, absmax2: Tensor, offset: float, blocksize: int,
                blocksize2: int, nested: bool, qt: int, quant_type: str, N: int, K: int,
                state_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    qs = _light_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K,
                      state_dtype)
    y2, saved = _nf4_lora.nf4_ia3_forward_2d(x2, packed, qs, bias, ia3_l, feedforward)
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
    qs = _light_state(absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, qt, quant_type, N, K,
                      state_dtype)
    dx, db, dl = _nf4_lora.nf4_ia3_backward_2d(dy2, saved, packed, qs, ia3_l, feedforward, need_x, need_b)
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


# ------------------------------------------------------------------------------------------------ wrappers
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None) -> Tensor:
    """``fastpeft.ops.lora.lora_linear`` (eager: its autograd Function) or, under torch.compile, the custom op.

    ``seed``: an int in eager mode; under torch.compile a 0-dim int64 tensor (``nn._rng.dropout_seed`` gives one).

    >>> x = torch.randn(2, 3, 16); w = torch.randn(8, 16); a = torch.randn(4, 16); b = torch.randn(8, 4)
    >>> lora_linear(x, w, None, a, b, 2.0).shape
    torch.Size([2, 3, 8])
    """
    if not _compiling() or not triton_ok(x):
        if isinstance(seed, Tensor):  # reference fallback under compile (CPU without the interpreter)
            seed = int(seed)
        return _lora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear: dropout_p > 0 needs a seed")
    if seed is not None and not isinstance(seed, Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    triton_gemm = _lora._use_triton_gemm(x2.shape[0], N, K)
    y2, _ = lora_fwd(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                     seed if dropout_p > 0.0 else None, bool(triton_gemm))
    return y2.view(*x.shape[:-1], N)


def ia3_linear(x, weight, bias, ia3_l, feedforward: bool) -> Tensor:
    """``fastpeft.ops.ia3.ia3_linear`` (eager: its autograd Function) or, under torch.compile, the custom op."""
    if not _compiling() or not triton_ok(x):
        return _ia3.ia3_linear(x, weight, bias, ia3_l, feedforward)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    y2, _ = ia3_fwd(x2, weight, bias, ia3_l, bool(feedforward), bool(_ia3._use_triton_gemm(x2.shape[0])))
    return y2.view(*x.shape[:-1], N)


# Under torch.compile the NF4 wrappers below read the QuantState while dynamo traces them, split in two:
#   * its tensors (absmax, code, state2's absmax / code) are plain attributes: dynamo lifts them as graph
#     inputs (guarded on their metadata), and the .to(device) / fp32 / flatten of kernel_state are traced ops
#     (no-ops on an already-prepared state), so the graph always reads the state's current tensors;
#   * its scalars need data (offset is a 0-dim tensor, the select-tree id compares the code with bnb's)
#     -- a .item() / .cpu() while tracing would break the graph. They come from kernel_state's cache on the
#     state (``_fastpeft_kstate``: plain Python numbers that dynamo reads as constants and guards on). The
#     drop-ins fill that cache eagerly when they are built and after every ``.to()`` (nn.base.warm_nf4_state)
#     and, if it is missing anyway, run that one call outside the graph (which fills it) instead of coming here.
#     (torch 2.13's assume_constant_result accepted the QuantState as an argument; 2.11 refuses it.)


def _nf4_constants(quant_state, device) -> tuple:
    ks = getattr(quant_state, "_fastpeft_kstate", None)
    if ks is None and not _compiling():
        ks = _nf4.kernel_state(quant_state, device)  # eager caller: fill it here
    if ks is None:
        raise RuntimeError("fastpeft: this 4-bit layer's kernel constants are not prepared (its QuantState was "
                           "replaced after the layer was built); run one eager forward or model.to(device) first")
    N, K = (int(d) for d in quant_state.shape)
    sd = getattr(quant_state, "dtype", None) or torch.float32
    return (ks["offset"], ks["bs"], ks["bs2"], ks["nested"], ks["qt"], str(quant_state.quant_type), N, K, sd)


def _nf4_kernel_args(packed: Tensor, quant_state, device) -> tuple:
    """kernel_state's tensors, traced from the state's attributes (see above), + _nf4_constants' scalars."""
    consts = _nf4_constants(quant_state, device)
    nested = consts[3]
    code = quant_state.code
    if code is None or code.numel() != 16:
        code = _nf4.code_for(quant_state.quant_type)
    code = code.to(device=device, dtype=torch.float32).contiguous()
    if nested:
        st2 = quant_state.state2
        absmax = quant_state.absmax.reshape(-1).to(device).contiguous()
        code2 = st2.code.to(device=device, dtype=torch.float32).contiguous()
        absmax2 = st2.absmax.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    else:
        absmax = quant_state.absmax.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        code2, absmax2 = code, absmax
    return (packed, absmax, code, code2, absmax2) + consts


def nf4_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                    seed=None) -> Tensor:
    """``fastpeft.ops.nf4_lora.nf4_lora_linear`` (eager: its autograd Function) or, under torch.compile, the
    ``fastpeft::nf4_lora_fwd`` custom op (one graph node per layer, no graph break).

    ``seed``: an int in eager mode; under torch.compile a 0-dim int64 tensor (``nn._rng.dropout_seed``).

    >>> from fastpeft.ops.nf4 import quantize_nf4
    >>> packed, qs = quantize_nf4(torch.randn(8, 64))
    >>> nf4_lora_linear(torch.randn(2, 3, 64), packed, qs, None, torch.randn(4, 64), torch.randn(8, 4), 2.0).shape
    torch.Size([2, 3, 8])
    """
    if not _compiling() or not triton_ok(x):
        if isinstance(seed, Tensor):  # reference fallback under compile (CPU without the interpreter)
            seed = int(seed)
        return _nf4_lora.nf4_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("nf4_lora_linear: dropout_p > 0 needs a seed")
    if seed is not None and not isinstance(seed, Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    K = x.shape[-1]
    quant = _nf4_kernel_args(packed, quant_state, x.device)
    y2, _ = nf4_lora_fwd(x.reshape(-1, K), bias, lora_A, lora_B, float(scaling), float(dropout_p),
                         seed if dropout_p > 0.0 else None, *quant)
    return y2.view(*x.shape[:-1], y2.shape[-1])


def nf4_ia3_linear(x, packed, quant_state, bias, ia3_l, feedforward: bool) -> Tensor:
    """``fastpeft.ops.nf4_lora.nf4_ia3_linear`` (eager: its autograd Function) or, under torch.compile, the
    ``fastpeft::nf4_ia3_fwd`` custom op."""
    if not _compiling() or not triton_ok(x):
        return _nf4_lora.nf4_ia3_linear(x, packed, quant_state, bias, ia3_l, feedforward)
    K = x.shape[-1]
    quant = _nf4_kernel_args(packed, quant_state, x.device)
    y2, _ = nf4_ia3_fwd(x.reshape(-1, K), bias, ia3_l, bool(feedforward), *quant)
    return y2.view(*x.shape[:-1], y2.shape[-1])

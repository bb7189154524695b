"""Cross-entropy over an output head without the [tokens, vocab] logits: chunk the rows, and in each chunk
form the logits, the loss and the gradients at once (PyTorch only; Liger-Kernel's fused kernel when asked).

The loss is a scalar, so everything backward needs can be computed in the forward pass: per chunk of rows,

    z = h·Wᵀ + b            (the head's own dtype, as the unfused head computes it)
    z32 = float32(z)        (transformers' ForCausalLMLoss upcasts the logits the same way)
    loss_i = logsumexp(z32_i) − z32_i[t_i]
    dloss_i/dz_i = softmax(z32_i) − onehot(t_i)          (cast to the head's dtype, as autograd would)
    dh = (dz)·W,  dW = (dz)ᵀ·h,  db = Σ_i dz_i

and only dh (tokens × hidden), dW / db (when the head trains, fp32 accumulators) stay alive. Backward
multiplies them by the incoming scalar gradient. Each chunk holds about 6 bytes × rows × vocab (the logits
in the head's dtype, then fp32); ``chunk_rows`` bounds it. Rows are weighted by ``row_weight`` (0 for ignored
positions, 1 otherwise): the loss and the gradients of an ignored row are exactly zero, with no host sync
to drop those rows first.

What bounds it: the two GEMMs per chunk (2·rows·hidden·vocab FLOPs each, plus a third for a trainable
head) and ~5 elementwise passes over the fp32 chunk; the head's weight is read once per chunk.

``module_cross_entropy_sum`` is the same loop for a head that is not a plain weight (a LoRA-adapted,
4-bit or modules_to_save head): it calls the module on each chunk and asks autograd for the chunk's
gradients right away, so the head's own (fused) kernels run and its trainable parameters get their
gradients.

>>> import torch
>>> h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8); t = torch.tensor([1, 2, 3, 4, 5])
>>> loss = linear_cross_entropy_sum(h, w, None, t, torch.ones(5), chunk_rows=2)
>>> ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
>>> bool(torch.allclose(loss, ref, rtol=1e-5))
True
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Optional: Liger-Kernel's fused linear cross-entropy (Triton, CUDA). Looked up here, imported on first use:
# importing it pulls in its Triton kernels, which ``import fastpeft`` should not pay for.
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None

__all__ = ["HAS_LIGER", "default_chunk_rows", "linear_cross_entropy_sum", "module_cross_entropy_sum",
           "liger_linear_cross_entropy_sum", "cross_entropy_sum_reference"]

# Elements of one chunk's logits: 2^26 = 64 Mi, i.e. 512 rows of a 128k vocabulary, ~384 MiB transient.
CHUNK_ELEMENTS = 1 << 26


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk's logits hold about ``CHUNK_ELEMENTS`` elements."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def cross_entropy_sum_reference(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """The oracle: Σ_i row_weight_i · CE(float32(logits_i), targets_i), from the full logits."""
    per_row = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_row * row_weight).sum()


def _chunk_loss_and_dlogits(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor, need_grad: bool):
    """(Σ weighted loss of the chunk in fp32, d(loss)/d(logits) in fp32 or None). Consumes ``logits``."""
    z = logits.float()  # a new tensor unless the head already computes in fp32 (then ``logits`` is ours too)
    lse = torch.logsumexp(z, dim=-1)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    loss = ((lse - target_logit) * row_weight).sum()
    if not need_grad:
        return loss, None
    dz = z.sub_(lse[:, None]).exp_()  # softmax, in place
    dz.scatter_add_(1, targets[:, None], -torch.ones_like(target_logit)[:, None])
    dz.mul_(row_weight[:, None])
    return loss, dz


class _LinearCrossEntropySum(torch.autograd.Function):
    """loss = Σ_i w_i · CE(h_i·Wᵀ + b, t_i); gradients formed chunk by chunk in forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weight, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = hidden.shape[0]
        weight_h = weight.to(hidden.dtype) if need_h else None  # no copy when the dtypes already agree
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            h = hidden[start:end]
            loss, dz = _chunk_loss_and_dlogits(F.linear(h, weight, bias), targets[start:end],
                                               row_weight[start:end], need_grad)
            total += loss
            if dz is None:
                continue
            if need_b:
                grad_b += dz.sum(0)
            dz = dz.to(hidden.dtype)  # the dtype autograd hands the head's GEMMs in the unfused path
            if need_h:
                grad_h[start:end] = dz @ weight_h
            if need_w:
                grad_w += (dz.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h.float() * grad_total).to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_total).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, row_weight: torch.Tensor,
                             chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Σ_i row_weight_i · CE(hidden_i·weightᵀ + bias, targets_i) in fp32, never holding all the logits.

    hidden: [rows, in_features]; weight: [vocab, in_features]; targets: [rows] int64 in [0, vocab) (give ignored
    rows any valid index and weight 0); row_weight: [rows] float. Differentiable in hidden, weight and bias.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or row_weight.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [rows, features] with targets / row_weight [rows]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(row_weight.shape)}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, row_weight.float(), rows)


class _ModuleCrossEntropySum(torch.autograd.Function):
    """loss = Σ_i w_i · CE(head(h_i), t_i) for any head module; each chunk's gradients come from autograd in
    forward (the head's own backward runs there), backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden, targets, row_weight, chunk_rows, head, *params):
        need_h = ctx.needs_input_grad[0]
        need_p = [bool(n) for n in ctx.needs_input_grad[5:]]
        wrt_params = [p for p, n in zip(params, need_p) if n]
        need_grad = need_h or bool(wrt_params)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_p = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in wrt_params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = hidden.shape[0]
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(need_h)
                logits = head(h).float()
                per_row = F.cross_entropy(logits, targets[start:end], reduction="none")
                loss = (per_row * row_weight[start:end]).sum()
            total += loss.detach()
            if not need_grad:
                continue
            inputs: List[torch.Tensor] = ([h] if need_h else []) + wrt_params
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            if need_h:
                grad_h[start:end] = torch.zeros_like(h) if grads[0] is None else grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_p, grads):
                if g is not None:
                    acc += g.float()
        ctx.save_for_backward(grad_h, *grad_p)
        ctx.need_p = need_p
        ctx.param_dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_h, *grad_p = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h.float() * grad_total).to(grad_h.dtype)
        it = iter(grad_p)
        out_p = [(next(it) * grad_total).to(dt) if n else None for n, dt in zip(ctx.need_p, ctx.param_dtypes)]
        return (grad_h, None, None, None, None, *out_p)


def module_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                             row_weight: torch.Tensor, params: Sequence[torch.nn.Parameter],
                             vocab: int, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Σ_i row_weight_i · CE(head(hidden_i), targets_i) in fp32, chunk by chunk, for any head module.

    ``params``: the head's parameters that train (their gradients are delivered through this call; pass every
    one, or they get none). Dropout inside the head draws one mask per chunk instead of one per call.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or row_weight.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [rows, features] with targets / row_weight [rows]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(row_weight.shape)}")
    rows = chunk_rows or default_chunk_rows(vocab)
    return _ModuleCrossEntropySum.apply(hidden, targets, row_weight.float(), rows, head, *params)


def liger_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy, summed (its Triton kernels; CUDA only). ``targets`` keep
    ``ignore_index`` on ignored rows. Gradient accumulators in fp32."""
    if not HAS_LIGER:
        raise RuntimeError("liger_kernel is not importable (pip install liger-kernel)")
    liger = importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
    # positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction, softcap, return_z_loss, accum_dtype)
    out = liger.LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, bias, None, ignore_index, 0.0,
                                                           0.0, "sum", None, False, torch.float32)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float()

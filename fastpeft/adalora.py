"""AdaLoRA at model level: the rank allocator, the orthogonality regulariser added to the loss, and the rank
patterns of saved adapters. The layers are ``fastpeft.nn.AdaLoraLinear``; ``patch`` calls ``on_patch`` here.

What PEFT's ``AdaLoraModel`` does, and fastpeft in the same way:

* ``update_and_allocate(model, global_step)``, called by the training loop after ``loss.backward()`` (and
  ``optimizer.step()``) and before the gradients are zeroed. Until ``total_step - tfinal`` it updates each
  parameter's sensitivity |p·∂L/∂p| (EMA ``beta1``) and its uncertainty (EMA ``beta2`` of the deviation), and every
  ``deltaT`` steps after ``tinit`` zeroes the singular values (entries of ``lora_E``) whose triplet score is among
  the lowest ``init budget - budget`` of the model; the budget falls from the sum of the initial ranks to
  ``target_r`` per layer on a cubic schedule. At ``total_step - tfinal`` the final mask is stored on the config as
  ``rank_pattern``; after that, each call re-applies it. The allocator lives in ``PatchState.rank_allocator``.
* The orthogonality regulariser: when the forward's output has a ``loss``, the mean over A's and B's of
  ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F, times ``orth_reg_weight``, is added to it. PEFT adds it in
  ``AdaLoraModel.forward``, which its ``PeftModelFor<Task>`` classes call, i.e. when the config has a ``task_type``;
  a PEFT model without one (plain ``PeftModel``) calls the transformers model directly and adds nothing. fastpeft
  follows that rule. It is a forward hook on the patched model (in ``PatchState.hooks``; ``unpatch`` removes it).
* Saving writes the rank pattern's keys without the adapter name and cuts A / E / B to the kept triplets; loading
  an adapter saved with a rank pattern first cuts the new layers to it (``resize_by_rank_pattern``), keeping
  ``ranknum`` (hence the scaling) at the rank the adapter was trained with.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import AdaLoraConfig
from .distributed import full_tensor
from .model_state import PatchState, Transaction, get_state
from .nn import AdaLoraLinear

__all__ = ["RankAllocator", "update_and_allocate", "orthogonal_regularizer", "resize_by_rank_pattern",
           "rank_pattern_entry", "on_patch"]

_METHOD = "update_and_allocate"
ONE_TRAINABLE = ("an AdaLoRA model trains one adapter at a time (PEFT's rule: one rank allocator); this model already has "
                 "the trainable adapter {other!r}: add {name!r} with inference_mode=True (or load it with "
                 "is_trainable=False)")


def _layers(model: nn.Module, adapter_name: str) -> List[Tuple[str, AdaLoraLinear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, AdaLoraLinear) and adapter_name in m.adapter_names]


def _name(path: str, table: str, adapter_name: str) -> str:
    # PEFT keys everything by the parameter's name in the transformers model
    return f"{path}.{table}.{adapter_name}"


def rank_pattern_entry(pattern: Optional[Dict[str, List[bool]]], path: str, adapter_name: str):
    """The kept-triplet list for layer ``path`` in a rank pattern, under either of PEFT's key forms
    ("<path>.lora_E.<adapter>" as allocated, "<path>.lora_E" as saved), or None."""
    if not pattern:
        return None
    full = _name(path, "lora_E", adapter_name)
    return pattern[full] if full in pattern else pattern.get(f"{path}.lora_E")


class RankAllocator:
    """AdaLoRA's budget schedule, sensitivity EMAs and masking for one adapter (PEFT's ``RankAllocator``).

    Sensitivities are keyed by parameter name ("<path>.lora_A.<adapter>"), as PEFT keys them.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(config, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1) to train an AdaLoRA adapter, got {value!r}")
        self.config = config
        self.adapter_name = adapter_name
        self.reset_ipt()
        self._final_masks = None  # (rank pattern, {layer path: pruned mask}) of mask_using_rank_pattern
        layers = _layers(model, adapter_name)
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in layers)  # the initial rank budget, all layers
        self.target_bgt = config.target_r * len(layers)

    def reset_ipt(self) -> None:
        self.ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_unc: Dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """(rank budget, whether to mask at this step): the initial budget through ``tinit``, then a cubic decrease
        to the target at ``total_step - tfinal`` (masking every ``deltaT`` steps), then the target (masking)."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (remaining ** 3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def _params(self, model: nn.Module):
        for path, layer in _layers(model, self.adapter_name):
            for table in AdaLoraLinear.TABLES:
                yield path, table, getattr(layer, table)[self.adapter_name]

    # The EMAs run as multi-tensor (_foreach) ops over all of the adapter's tensors at once: a few kernel launches per
    # step instead of ~8 per tensor (an 8B model has ~670 of them), each op in PEFT's order, so the values are PEFT's.
    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        names, params, grads = [], [], []
        for path, table, param in self._params(model):
            name = _name(path, table, self.adapter_name)
            if param.grad is None:
                raise ValueError(f"update_and_allocate needs the gradients of the AdaLoRA parameters, and {name} has "
                                 "none: call it after loss.backward() (and optimizer.step()) and before the "
                                 "gradients are zeroed")
            if name not in self.exp_avg_ipt:
                self.exp_avg_ipt[name] = torch.zeros_like(param)
                self.exp_avg_unc[name] = torch.zeros_like(param)
            names.append(name)
            params.append(param.detach())
            grads.append(param.grad)
        if not names:
            return
        sensitivity = torch._foreach_abs(torch._foreach_mul(params, grads))  # |p · ∂L/∂p|
        avg_ipt = torch._foreach_add(torch._foreach_mul([self.exp_avg_ipt[n] for n in names], beta1),
                                     torch._foreach_mul(sensitivity, 1 - beta1))
        deviation = torch._foreach_abs(torch._foreach_sub(sensitivity, avg_ipt))
        avg_unc = torch._foreach_add(torch._foreach_mul([self.exp_avg_unc[n] for n in names], beta2),
                                     torch._foreach_mul(deviation, 1 - beta2))
        for name, ipt, avg, unc in zip(names, sensitivity, avg_ipt, avg_unc):
            self.ipt[name], self.exp_avg_ipt[name], self.exp_avg_unc[name] = ipt, avg, unc

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> Dict[str, List[bool]]:
        """Zero the singular values whose triplet score (E's score + A's row mean + B's column mean) is at or below
        the (init budget - budget)-th smallest of the model; the kept pattern per layer."""
        layers = _layers(model, self.adapter_name)
        names = [_name(path, table, self.adapter_name) for path, _ in layers for table in AdaLoraLinear.TABLES]
        scores = dict(zip(names, torch._foreach_mul([self.exp_avg_ipt[n] for n in names],
                                                    [self.exp_avg_unc[n] for n in names])))
        triplets = []
        for path, _ in layers:
            def score(table):
                return scores[_name(path, table, self.adapter_name)]
            triplets.append(score("lora_E").view(-1) + (score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)))
        every = torch.cat(triplets)
        threshold = torch.kthvalue(every, k=self.init_bgt - budget).values  # stays on the device
        kept = ~(every <= threshold)  # PEFT's test, written so (a NaN score is kept, as there)
        kept_host = kept.tolist()  # the one device-to-host copy of the call
        pattern: Dict[str, List[bool]] = {}
        start = 0
        for (path, layer), layer_kept in zip(layers, kept.split([t.numel() for t in triplets])):
            values = layer.lora_E[self.adapter_name]
            values.masked_fill_(~layer_kept.view(-1, 1), 0.0)
            pattern[_name(path, "lora_E", self.adapter_name)] = kept_host[start:start + values.shape[0]]
            start += values.shape[0]
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, pattern: Dict[str, List[bool]]) -> None:
        layers = _layers(model, self.adapter_name)
        if self._final_masks is None or self._final_masks[0] is not pattern:
            # built once per pattern (every step of the final phase re-applies the same one): no host-to-device copy
            # per layer and step
            masks = {}
            for path, layer in layers:
                kept = rank_pattern_entry(pattern, path, self.adapter_name)
                if kept is None:
                    raise ValueError(f"the rank pattern has no entry for {path} (keys like "
                                     f"{next(iter(pattern), None)!r})")
                device = layer.lora_E[self.adapter_name].device
                masks[path] = ~torch.tensor(kept, dtype=torch.bool).view(-1, 1).to(device)
            self._final_masks = (pattern, masks)
        masks = self._final_masks[1]
        for path, layer in layers:
            values = layer.lora_E[self.adapter_name]
            values.masked_fill_(masks[path].to(values.device), 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int,
                            force_mask: bool = False) -> Tuple[int, Optional[Dict[str, List[bool]]]]:
        if global_step < self.config.total_step - self.config.tfinal:
            self.update_ipt(model)
        budget, mask_now = self.budget_schedule(global_step)
        pattern = self.mask_to_budget(model, budget) if (mask_now or force_mask) else None
        return budget, pattern


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """AdaLoRA's rank allocation step (PEFT's ``AdaLoraModel.update_and_allocate``); also ``model.update_and_allocate``.

    Call it every training step after ``loss.backward()`` and ``optimizer.step()``, before the gradients are zeroed,
    with the step's index. ``tinit``, ``tfinal``, ``deltaT`` and ``total_step`` of the trainable adapter's config
    decide what a step does; once the schedule ends, the final pattern is the config's ``rank_pattern`` (what
    ``save_adapter`` writes).

    >>> import torch, torch.nn as nn, fastpeft
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> net = fastpeft.patch(net, fastpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=3, target_modules=["0", "1"]))
    >>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    >>> for step in range(4):
    ...     net(torch.randn(3, 8)).pow(2).mean().backward()
    ...     opt.step()
    ...     net.update_and_allocate(step)  # or fastpeft.update_and_allocate(net, step)
    ...     opt.zero_grad()
    >>> sum(int((m.lora_E["default"] == 0).sum()) for m in net.modules() if isinstance(m, fastpeft.AdaLoraLinear))
    4
    """
    state = get_state(model)
    allocator = state.rank_allocator
    if allocator is None:
        raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter; this model has none (patch it with "
                         "a fastpeft.AdaLoraConfig, or load_adapter(..., is_trainable=True))")
    cfg = state.configs[allocator.adapter_name]
    final = cfg.total_step - cfg.tfinal
    if global_step < final:
        _, pattern = allocator.update_and_allocate(model, global_step)
        if pattern:
            cfg.rank_pattern = pattern
    elif global_step == final:
        _, pattern = allocator.update_and_allocate(model, global_step, force_mask=True)
        cfg.rank_pattern = pattern
        allocator.reset_ipt()
    else:
        allocator.mask_using_rank_pattern(model, cfg.rank_pattern)


def orthogonal_regularizer(model: nn.Module, adapter_name: str):
    """Mean over the adapter's A and B matrices of ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F (0 when it has none).

    PEFT forms it matrix by matrix (~8 kernels per matrix, twice per layer, in forward and again in backward); here
    the matrices of one shape are stacked and go through one batched product and one norm, so a model's hundreds of
    layers cost a few dozen kernels. The sum runs in another order than PEFT's (a difference of rounding only)."""
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for _, layer in _layers(model, adapter_name):
        for kind, matrix in (("A", layer.lora_A[adapter_name]), ("B", layer.lora_B[adapter_name])):
            # FSDP2 keeps parameters sharded outside the layers' forward: the whole matrix (differentiable gather;
            # every rank computes the same term, and its gradient lands on this rank's shard)
            matrix = full_tensor(matrix)
            groups.setdefault((kind, tuple(matrix.shape), matrix.device, matrix.dtype), []).append(matrix)
    count = sum(len(matrices) for matrices in groups.values())
    if not count:
        return 0
    total = 0
    for (kind, _, device, dtype), matrices in groups.items():
        stacked = torch.stack(matrices)
        cov = stacked @ stacked.transpose(1, 2) if kind == "A" else stacked.transpose(1, 2) @ stacked  # [n, r, r]
        eye = torch.eye(cov.shape[-1], device=device, dtype=dtype)
        total = total + torch.linalg.vector_norm(cov - eye, dim=(1, 2)).sum()
    return total / count


def _trainable_adalora(state: PatchState) -> Optional[str]:
    return next((n for n, cfg in state.configs.items() if isinstance(cfg, AdaLoraConfig) and state.trainable.get(n)),
                None)


def _add_orthogonal_regularizer(module: nn.Module, _args, output):
    state = get_state(module, required=False)
    if state is None:
        return None
    name = _trainable_adalora(state)
    loss = getattr(output, "loss", None)
    if name is None or state.configs[name].task_type is None or not isinstance(loss, torch.Tensor):
        return None
    output.loss = loss + state.configs[name].orth_reg_weight * orthogonal_regularizer(module, name)
    return output


class _InstalledMethod:
    """``model.update_and_allocate``: an instance attribute, kept in ``PatchState.hooks`` so ``unpatch`` removes it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.method = functools.partial(update_and_allocate, model)
        model.__dict__[_METHOD] = self.method

    def remove(self) -> None:
        if self.model.__dict__.get(_METHOD) is self.method:
            del self.model.__dict__[_METHOD]


def on_patch(model: nn.Module, cfg: AdaLoraConfig, adapter_name: str, state: PatchState, txn: Transaction,
             fresh: bool) -> None:
    """After ``patch`` built an AdaLoRA adapter's layers: PEFT's one-trainable-adapter rule, the rank allocator of a
    trainable adapter, and (first adapter) the regulariser hook and ``model.update_and_allocate``."""
    if not cfg.inference_mode:
        others = [n for n, c in state.configs.items() if n != adapter_name and state.trainable.get(n)]
        if others:
            raise ValueError(ONE_TRAINABLE.format(other=others[0], name=adapter_name))
        previous = state.rank_allocator
        state.rank_allocator = RankAllocator(model, cfg, adapter_name)
        txn.undo.append(lambda: setattr(state, "rank_allocator", previous))
    if fresh:
        state.hooks.append(model.register_forward_hook(_add_orthogonal_regularizer))
        state.hooks.append(_InstalledMethod(model))


def resize_by_rank_pattern(model: nn.Module, cfg: AdaLoraConfig, adapter_name: str) -> None:
    """Cut the adapter's layers to the triplets its config's ``rank_pattern`` keeps (loading a saved adapter, as
    PEFT's ``resize_modules_by_rank_pattern``)."""
    pattern = cfg.rank_pattern or {}
    layers = dict(_layers(model, adapter_name))
    for key, kept in pattern.items():
        path = key[: -len(f".lora_E.{adapter_name}")] if key.endswith(f".lora_E.{adapter_name}") else \
            key[: -len(".lora_E")] if key.endswith(".lora_E") else None
        if path not in layers:
            raise ValueError(f"rank_pattern key {key!r} names no AdaLoRA layer of adapter {adapter_name!r}")
        layers[path].resize(adapter_name, kept)


def saved_tensors(layer: AdaLoraLinear, path: str, cfg: AdaLoraConfig, adapter_name: str) -> Dict[str, torch.Tensor]:
    """{"lora_A" / "lora_E" / "lora_B": tensor} as PEFT saves them: cut to the kept triplets when the rank pattern
    keeps fewer than the layer holds."""
    tensors = {table: getattr(layer, table)[adapter_name] for table in AdaLoraLinear.TABLES}
    kept: Optional[Sequence[bool]] = rank_pattern_entry(cfg.rank_pattern, path, adapter_name)
    if kept is not None and sum(kept) != layer.r[adapter_name]:
        index = torch.tensor(list(kept), dtype=torch.bool, device=tensors["lora_A"].device)
        tensors = {"lora_A": tensors["lora_A"][index], "lora_E": tensors["lora_E"][index],
                   "lora_B": tensors["lora_B"][:, index]}
    return tensors

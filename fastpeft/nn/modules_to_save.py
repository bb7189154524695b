"""ModulesToSave: a fully trainable copy of a module per adapter (PEFT's ``modules_to_save``).

Names mirror PEFT's wrapper (``original_module``, ``modules_to_save[name]``).
"""
from __future__ import annotations

import copy
from typing import List

import torch.nn as nn

from . import mixed_batch


class ModulesToSave(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter.

    >>> wrapped = ModulesToSave(nn.Linear(4, 2), "default")
    >>> sorted(n for n, _ in wrapped.named_parameters())[:2]
    ['modules_to_save.default.bias', 'modules_to_save.default.weight']
    """

    adapter_kind = "modules_to_save"

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: List[str] = []
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already exists on this module")
        clone = copy.deepcopy(self.original_module)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, adapter_name: str):
        return list(self.modules_to_save[adapter_name].parameters())

    def forward(self, *args, **kwargs):
        names = mixed_batch.current()
        if names is not None and not self.disable_adapters and args:
            # one adapter per row: each adapter's copy (or the original, for "__base__") on its rows of dim 0
            def run(sub, name):
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                return module(sub, *args[1:], **kwargs)

            return mixed_batch.forward_mixed(args[0], names, run)
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def merge(self) -> None:  # a trained copy has nothing to merge: it replaces the original
        pass

    def unmerge(self) -> None:
        pass

    def __getattr__(self, name: str):
        # Code that reaches into the wrapped module (e.g. lm_head.weight for weight tying checks) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_modules" not in self.__dict__:
                raise
            modules = self._modules
            target = modules["modules_to_save"][self.active_adapter] if (
                "modules_to_save" in modules and self.active_adapter in modules["modules_to_save"]
            ) else modules["original_module"]
            return getattr(target, name)

"""Thin drop-in modules: they hold adapter parameters and choose a path; the math lives in fastpeft.ops."""
from .ia3 import IA3Linear
from .lora import LoraLinear
from .modules_to_save import ModulesToSave

ADAPTER_LAYERS = (LoraLinear, IA3Linear)

__all__ = ["LoraLinear", "IA3Linear", "ModulesToSave", "ADAPTER_LAYERS"]

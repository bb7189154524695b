"""fastpeft: fast, PEFT-compatible LoRA / IA3 / VeRA / LoHa / LoKr / OFT / AdaLoRA fine-tuning (and PEFT's prompt tuning, prefix tuning,
P-tuning on causal LMs) for Hugging Face models.

>>> import torch.nn as nn, fastpeft
>>> net = nn.Sequential(nn.Linear(8, 8))
>>> net = fastpeft.patch(net, fastpeft.LoraConfig(r=2, target_modules=["0"]))
>>> fastpeft.get_nb_trainable_parameters(net)
(32, 104)
"""
from . import settings
from .adalora import update_and_allocate
from .adapter_io import hotswap_adapter, load_adapter, save_adapter
from .adapters import (
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapter,
    get_nb_trainable_parameters,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unmerge,
)
from .activation_offload import activation_offload_enabled, disable_activation_offload, enable_activation_offload
from .config import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, MultitaskPromptTuningConfig, OFTConfig,
                     PrefixTuningConfig,
                     PromptEncoderConfig, PromptTuningConfig, TrainableTokensConfig, VeraConfig)
from .fused_loss import disable_fused_loss, enable_fused_loss, fused_loss_enabled
from .nn import (AdaLoraLinear, IA3Linear, LohaLinear, LokrLinear, LoraEmbedding, LoraLinear, LoraVariant, ModulesToSave,
                 OftLinear, TrainableTokens, TrainableTokensLayer, VeraLinear)
from .patch import patch, unpatch
from .quantize import NF4Linear, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "settings",
    "LoraConfig",
    "IA3Config",
    "VeraConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "PromptTuningConfig",
    "MultitaskPromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "TrainableTokensConfig",
    "AdaLoraConfig",
    "update_and_allocate",
    "patch",
    "unpatch",
    "save_adapter",
    "load_adapter",
    "hotswap_adapter",
    "enable_fused_loss",
    "disable_fused_loss",
    "fused_loss_enabled",
    "enable_activation_offload",
    "disable_activation_offload",
    "activation_offload_enabled",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "merge",
    "unmerge",
    "merge_and_unload",
    "print_trainable_parameters",
    "get_nb_trainable_parameters",
    "active_adapter",
    "LoraLinear",
    "LoraEmbedding",
    "LoraVariant",
    "IA3Linear",
    "VeraLinear",
    "LohaLinear",
    "LokrLinear",
    "OftLinear",
    "ModulesToSave",
    "TrainableTokens",
    "TrainableTokensLayer",
    "AdaLoraLinear",
    "quantize_nf4",
    "NF4Linear",
]

"""Silence warnings the examples would print that are not fastpeft's and that a user of an example cannot act on.

* transformers 5 renamed gradient checkpointing to activation checkpointing; PEFT and the examples (which keep
  the old names so they also run on transformers 4.x) trigger its FutureWarnings.
* bitsandbytes logs, at import on CPUs with AVX512-BF16, that its optional ``kernels`` package is missing.
fastpeft's own warnings are left alone.
"""
import logging
import warnings


class _DropKernelsCommunity(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def silence_third_party_noise() -> None:
    for old in ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing",
                "gradient_checkpointing_kwargs"):
        warnings.filterwarnings("ignore", message=f"`{old}` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsCommunity())

"""pytest setup: the Triton interpreter on machines without a GPU, hypothesis profiles, shared fixtures.

Helpers (tiny models, rel_err, ...) live in tests/helpers.py: ``from helpers import ...``.
"""
import copy
import logging
import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; triton reads this at decoration
# time (and fastpeft.settings reads it at import), so it must be set before fastpeft is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402
from hypothesis import settings as _hyp_settings  # noqa: E402

transformers.logging.set_verbosity_error()


class _DropKernelsCommunity(logging.Filter):
    """bitsandbytes logs at import, on CPUs with AVX512-BF16, that its optional `kernels` package is missing."""

    def filter(self, record):
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsCommunity())

from helpers import ARCHS  # noqa: E402  (imports peft / fastpeft / bitsandbytes: after the filter above)

# Locally every run draws fresh random examples and tensors; under CI (CI=true) the draws are derandomized
# and torch is seeded per test, so a CI verdict can be reproduced exactly (`CI=true pytest ...`).
_hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_torch_in_ci(request):
    if os.environ.get("CI"):
        import zlib

        torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU-only check: bf16 kernels, large shapes, bitsandbytes CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[0, 1], ids=["base-first", "adapter-first"])
def lora_sum_order(request):
    """Both orders of a 16-bit split-GEMM LoRA sum (fastpeft_ops::set_lora_sum_order; csrc/adapter_cuda.cu,
    sum_adapter_first): the base product written first and the adapter's term added by cuBLAS with beta = 1, or the
    other way round. GPU tests that take it run both, whichever the automatic choice picks at their shapes."""
    ops = torch.ops.fastpeft_ops
    before = ops.set_lora_sum_order(request.param)
    yield request.param
    ops.set_lora_sum_order(before)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def clone_model():
    return copy.deepcopy


@pytest.fixture(scope="module")
def eager_bnb():
    """bitsandbytes torch.compiles parts of its CPU 4-bit path; eager gives the same bits and saves minutes of CPU
    compiles. Modules that use bnb on CPU opt in with ``pytestmark = pytest.mark.usefixtures("eager_bnb")``."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old

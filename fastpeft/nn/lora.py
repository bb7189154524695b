"""LoraLinear: a drop-in for a frozen linear layer with one or more LoRA adapters.

Its attribute names mirror PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``lora_dropout[name]``), so state-dict keys are PEFT's and PEFT tooling that reads them keeps working.
The module holds parameters and chooses a path (``AdapterLayer``); the math lives in ``fastpeft.ops``.
How one adapter computes is its ``LoraVariant`` (``lora_variant[name]``): plain LoRA is ``LoraVariant`` itself,
and a variant such as DoRA subclasses it and overrides what it changes (PEFT's LoraLayer / LoraVariant split).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import settings
from ..config import changes_base_weights, pissa_niter
from ..ops import HAS_TRITON, KERNEL_DTYPES, cpp_ops, graph_capturing, lora_init
from . import bases, mixed_batch
from .layer import AdapterLayer
from .variants import DORA, PLAIN_LORA, DoraVariant, LoraVariant

if HAS_TRITON:
    from ..ops.kernels import sgmv


# Rows above which a 4-bit layer's eager call tries its C++ operator from the hot path (AdapterLayer.forward): the
# largest FUSED_MAX_M entry (ops/kernels/nf4_lora.py), so the small-M calls the Triton path serves (in-kernel-dequant
# GEMM, decode GEMV) never pay the operator's checks twice.
_NF4_HOT_MIN_ROWS = 64


class LoraLinear(AdapterLayer):
    """Frozen base layer + LoRA adapters.

    >>> layer = LoraLinear(nn.Linear(16, 8), "default", r=4, lora_alpha=8)
    >>> layer(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3, 8])
    """

    adapter_kind = "lora"
    has_nf4_cpp = True  # nf4_lora_linear / nf4_dora_linear (variants.py: forward_nf4_cpp)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        loftq_config: Optional[dict] = None,
        keep_base: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> None:
        super().__init__(base_layer, adapter_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_variant: Dict[str, LoraVariant] = {}
        # mixed-adapter batches: the C++ adapter set, stacked copies, segment indices (not copied with the module)
        self._mixed_cache: Dict[str, tuple] = mixed_batch.TransientCache()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (PEFT's attribute name)
        self._dora_norms: Dict[str, tuple] = {}  # DoRA: cached weight norm out of training (variants.py)
        self._dora_merge_norms: Dict[str, torch.Tensor] = {}  # DoRA: the unmerged norm of a merged adapter
        # DoRA's C++ operator: ‖W‖² per row of the frozen base weight, (key, fp32 [out]); the key is the weight's
        # identity and version counter, so any change to W recomputes it (variants.py: DoraVariant._weight_sq_norm)
        self._dora_weight_sq: Optional[tuple] = None
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          loftq_config, keep_base)

    # -- adapters -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                     use_dora: bool = False, loftq_config: Optional[dict] = None,
                     keep_base: Optional[Callable[[torch.Tensor], None]] = None):
        """Add one adapter. ``init_lora_weights`` as PEFT: True (A Kaiming-uniform, B = 0), "gaussian"
        (A ~ N(0, 1/r), B = 0), False (both random: a non-zero delta), or an init that also rewrites the frozen
        base weight -- "pissa", "pissa_niter_<N>", "olora", "loftq" (with ``loftq_config``), see
        ``fastpeft/ops/lora_init.py``. ``keep_base(param)`` is called before a base parameter's data is replaced
        (patch's undo log); the replacement is a new tensor, never an in-place write."""
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        device = self._param_device()
        # Adapter parameters live in fp32 whatever the base dtype (as PEFT); compute casts to the input dtype.
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1.0 / r)
            nn.init.zeros_(lora_B.weight)
        # init_lora_weights=False keeps nn.Linear's random init for both (non-zero delta, useful for tests).
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if changes_base_weights(init_lora_weights):
            # computed before anything is stored, so that a refused base (4-bit, Conv1D) leaves the layer as it was
            factors = self._factors_from_base(init_lora_weights, r, scaling, loftq_config or {})
            lora_A.weight.data, lora_B.weight.data = factors[0].to(device), factors[1].to(device)
            self._replace_base_weight(factors[2], keep_base)
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        variant = DORA if use_dora else PLAIN_LORA
        self.lora_variant[adapter_name] = variant
        variant.init(self, adapter_name)

    def _factors_from_base(self, init, r: int, scaling: float, loftq_config: dict):
        """(A, B, new base [out, in]) in fp32 for an init that reads the base weight (ops/lora_init.py)."""
        base = self.base_layer
        if bases.is_linear4bit(base):
            raise ValueError(
                f"init_lora_weights={init!r} needs a full-precision base weight; this layer's base is 4-bit. "
                "Initialise on the bf16 / fp32 model and quantize afterwards (fastpeft.quantize_nf4 keeps the residual "
                "as the 4-bit base), as PEFT's documentation advises for PiSSA and LoftQ")
        if self.fan_in_fan_out and init in ("olora", "loftq"):
            # PEFT runs these on Conv1D's stored [in, out] weight and produces adapters of the wrong shape
            raise ValueError(f"init_lora_weights={init!r} is not supported on transformers' Conv1D layers "
                             "(fan_in_fan_out); PiSSA, True, False and 'gaussian' are")
        weight = base.weight.detach().to(torch.float32)
        weight = weight.t() if self.fan_in_fan_out else weight
        if init == "olora":
            return lora_init.olora_factors(weight, r, scaling)
        if init == "loftq":
            return lora_init.loftq_factors(weight, r, int(loftq_config.get("loftq_bits", 4)),
                                           loftq_config.get("loftq_iter", 1))
        return lora_init.pissa_factors(weight, r, scaling, niter=pissa_niter(init))

    def _replace_base_weight(self, new_weight: torch.Tensor, keep_base) -> None:
        param = self.base_layer.weight
        if keep_base is not None:
            keep_base(param)
        new_weight = new_weight.t() if self.fan_in_fan_out else new_weight
        param.data = new_weight.to(dtype=param.dtype, device=param.device).contiguous()

    def delete_adapter(self, adapter_name: str) -> None:
        self._mixed_cache.clear()  # holds the adapters' modules / stacked copies: let the deleted one go
        self.lora_variant[adapter_name].forget(self, adapter_name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_variant):
            del table[adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, adapter_name: str):
        return self.lora_variant[adapter_name].parameters_of(self, adapter_name)

    def _has_adapter(self, name: str) -> bool:
        return name in self.lora_A._modules

    # -- forward paths (chosen by AdapterLayer.forward) ----------------------------------------------------
    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout._modules[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    def _forward_reference(self, x, name):
        return self.lora_variant[name].forward_reference(self, name, x)

    def _forward_hot(self, x, name):
        # plain LoRA or DoRA, no dropout in effect, on an nn.Linear base (exactly: Conv1D transposes): the general
        # path's _forward_lora_pair(..., dropout_p=0, cpp=True) / DoRA's forward_cpp, read from the dicts; or on a
        # 4-bit base with more rows than the Triton path's small-M kernels take (FUSED_MAX_M): the variant's
        # forward_nf4_cpp, which the general path would call (None where it does not apply: the general path then
        # decides, the same way)
        base = self._modules["base_layer"]
        variant = self.lora_variant.get(name)
        if variant is not PLAIN_LORA and variant is not DORA:
            return None
        if self.training and type(self._modules["lora_dropout"]._modules[name]) is not nn.Identity:
            return None
        group = self.__dict__.get("_projection_group")  # siblings reading the same x (nn/projection_groups.py)
        if group is not None:
            y = group.forward_member(self, x, name)
            if y is not None:
                return y
        if type(base) is not nn.Linear:
            if x.numel() > _NF4_HOT_MIN_ROWS * x.shape[-1] and bases.is_linear4bit(base):
                return variant.forward_nf4_cpp(self, name, x, 0.0)
            return None
        params = base._parameters
        if variant is DORA:
            if params["weight"].requires_grad:  # DoRA's operator takes a frozen base; the general path decides
                return None
            return DORA.forward_cpp(self, name, x)
        return cpp_ops.lora_linear(x, params["weight"], params["bias"],
                                   self._modules["lora_A"]._modules[name]._parameters["weight"],
                                   self._modules["lora_B"]._modules[name]._parameters["weight"], self.scaling[name])

    def _forward_dense(self, x, name, cpp):
        return self.lora_variant[name].forward_dense(self, name, x, self._dropout_p(name), cpp)

    def _forward_nf4(self, x, name, compiled):
        return self.lora_variant[name].forward_nf4(self, name, x, self._dropout_p(name), compiled)

    def _forward_nf4_cpp(self, x, name):
        return self.lora_variant[name].forward_nf4_cpp(self, name, x, self._dropout_p(name))

    # -- mixed-adapter batches ----------------------------------------------------------------------------
    def _forward_mixed(self, x: torch.Tensor, names) -> torch.Tensor:
        """One adapter per row: one base pass for the whole batch, then every row's LoRA delta in one pass where
        that applies (``_mixed_plan``): the C++ operator (``cpp_ops.lora_mixed_delta_``: handles to the live
        adapter weights, no copy) or the Triton kernels (``ops/kernels/sgmv.py``: stacked copies); else one pass per
        adapter."""
        plan = self._mixed_plan(x)
        if plan is None:
            return super()._forward_mixed(x, names)
        kernel, adapters, order = plan
        segment_index = self._segment_adapters(names, x.shape[0], x.device, order)
        base = self._modules["base_layer"]
        tokens = max(1, x.numel() // (x.shape[0] * x.shape[-1])) if x.shape[0] * x.shape[-1] else 1  # rows per batch row
        if type(base) is nn.Linear:
            params = base._parameters
            if kernel == "cpp":  # base product and deltas in one call (decode runs this per layer and token)
                return cpp_ops.lora_mixed_linear(x, params["weight"], params["bias"], segment_index, tokens, adapters)
            y = F.linear(x, params["weight"], params["bias"])  # as the hot path: not the module call's hooks
        else:
            y = bases.base_forward(base, x)
        y2d, x2d = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        if kernel == "cpp":
            cpp_ops.lora_mixed_delta_(y2d, x2d, segment_index, tokens, adapters)
        else:
            a_stack, b_stack, scales = self._mixed_stacks(x.device)
            sgmv.lora_mixed_delta_(y2d, x2d, segment_index, tokens, a_stack, b_stack, scales)
        return y

    def _mixed_plan(self, x: torch.Tensor) -> Optional[Tuple[str, Optional["cpp_ops.MixedAdapterSet"], List[str]]]:
        """How a mixed batch runs in one pass: (kernel, adapter set, adapter names in the kernels' order), or None
        (one pass per adapter). kernel "cpp": the C++ operators with ``adapter set`` (``cpp_ops.mixed_adapters``);
        "triton": the Triton kernels (adapter set None).

        Both need inference without autograd (they write the base output in place), eager mode (under torch.compile
        the per-adapter loop traces), no CUDA-graph capture (cached segment indices), no active dropout, a batch
        dimension and x in fp32 / fp16 / bf16 (float64: the per-adapter path): checked on every call. The rest
        depends on the layer alone and is decided when the plan is built: plain LoRA adapters only; "cpp" with the
        C++ operators (backend cpp, or auto on CUDA) and ranks up to ``cpp_ops.MIXED_MAX_RANK``; "triton" where the
        Triton kernels can run on x's device (CUDA; on CPU only the triton backend in Triton's interpreter, not
        bf16). The plan is kept while the backend, x's device kind and dtype, the variants, the scalings and the
        adapters' modules and Parameter objects stay (the last checked as the count of module / Parameter
        registrations on this layer, its lora_A / lora_B dicts and their modules, ``mixed_batch.registrations``, and
        the number of adapters: a check that does not grow with the adapters; decode calls this per layer and token
        and is host-bound). The C++ set holds handles to the live
        parameter tensors, so in-place updates and ``.data =`` (the same TensorImpl) are seen at once.
        (``torch.utils.swap_tensors`` refuses a tensor the set holds, and ``_apply`` -- ``.to()``, ``.half()``,
        which may swap -- drops the plan first.)"""
        state = self.__dict__
        if torch.is_grad_enabled() or state["merged_adapters"] or torch.compiler.is_compiling() or \
                (x.is_cuda and graph_capturing()) or x.dim() < 2 or x.dtype not in KERNEL_DTYPES:
            return None
        if state["training"] and any(isinstance(d, nn.Dropout) and d.p > 0 for d in self.lora_dropout.values()):
            return None
        a_mods, b_mods = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        hit = self._mixed_cache.get("plan")
        if hit is not None:
            registered, backend, is_cuda, dtype, n_a, n_b, variants, scales, plan = hit
            if registered == mixed_batch.registrations() and backend == state["backend"] and is_cuda == x.is_cuda \
                    and dtype is x.dtype and len(a_mods) == n_a and len(b_mods) == n_b and \
                    tuple(state["lora_variant"].values()) == variants and list(self.scaling.values()) == scales:
                return plan
        # watched before the count is read: every later registration on them moves it
        mixed_batch.watch_registrations([self, self._modules["lora_A"], self._modules["lora_B"], *a_mods.values(),
                                         *b_mods.values()])
        registered = mixed_batch.registrations()
        names = list(a_mods)
        weights_a = [a_mods[n]._parameters["weight"] for n in names]
        weights_b = [b_mods[n]._parameters["weight"] for n in names]
        kernel = self._mixed_kernel(x) if names else None
        adapters = cpp_ops.mixed_adapters(weights_a, weights_b, [self.scaling[n] for n in names]) \
            if kernel == "cpp" else None
        plan = None if kernel is None else (kernel, adapters, names)
        self._mixed_cache["plan"] = (registered, state["backend"], x.is_cuda, x.dtype, len(a_mods), len(b_mods),
                                     tuple(state["lora_variant"].values()), list(self.scaling.values()), plan)
        return plan

    def _mixed_kernel(self, x: torch.Tensor) -> Optional[str]:
        """The layer's half of ``_mixed_plan``'s decision (its docstring): "cpp", "triton" or None."""
        backend = self.backend
        if backend == "reference" or not all(v is PLAIN_LORA for v in self.lora_variant.values()):
            return None
        if (backend == "cpp" or (backend == "auto" and x.is_cuda)) and cpp_ops.available() and \
                max(self.r.values()) <= cpp_ops.MIXED_MAX_RANK:
            return "cpp"
        if not HAS_TRITON or backend == "cpp":
            return None
        if x.is_cuda or (backend == "triton" and settings.get().triton_interpret and x.dtype != torch.bfloat16):
            return "triton"
        return None

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() may replace the parameters by torch.utils.swap_tensors, which refuses tensors
        # that something else holds: drop the mixed-batch caches (the C++ adapter set's handles, device copies)
        # first; they are rebuilt on the next mixed batch.
        self._mixed_cache.clear()
        return super()._apply(fn, recurse)

    def _segment_adapters(self, names, rows: int, device, order: List[str]) -> torch.Tensor:
        """int32 [rows]: each batch row's adapter index in ``order`` (the adapters' order in the kernels' operands;
        -1: the base model), cached per names, rows, device and order."""
        hit = self._mixed_cache.get("segments")
        if hit is not None and hit[0] == names and hit[1] == rows and hit[2] == device and hit[3] == order:
            return hit[4]
        tensor = torch.tensor(mixed_batch.adapter_of_rows(names, rows, order), dtype=torch.int32, device=device)
        self._mixed_cache["segments"] = (tuple(names), rows, device, list(order), tensor)
        return tensor

    def _mixed_stacks(self, device):
        """Every adapter of this layer stacked for the Triton one-pass kernels: A [n, R, K], B [n, N, R]
        (zero-padded to the largest rank R), scalings [n]; rebuilt when an adapter is added, deleted or changed
        (tensor identity and version counters), kept otherwise. Costs one more copy of the adapters' weights (the
        C++ operator, the default on CUDA, reads the weights themselves)."""
        key = tuple((name, id(a.weight), a.weight.data_ptr(), a.weight._version, id(self.lora_B[name].weight),
                     self.lora_B[name].weight.data_ptr(), self.lora_B[name].weight._version, self.scaling[name],
                     self.r[name]) for name, a in self.lora_A.items())
        hit = self._mixed_cache.get("stacks")
        if hit is not None and hit[0] == key:
            return hit[1]
        names = list(self.lora_A.keys())
        rank = max(self.r[n] for n in names)
        dtype = self.lora_A[names[0]].weight.dtype
        a_stack = torch.zeros(len(names), rank, self.in_features, dtype=dtype, device=device)
        b_stack = torch.zeros(len(names), self.out_features, rank, dtype=dtype, device=device)
        for i, name in enumerate(names):
            r = self.r[name]
            a_stack[i, :r] = self.lora_A[name].weight.detach()
            b_stack[i, :, :r] = self.lora_B[name].weight.detach()
        scales = torch.tensor([float(self.scaling[n]) for n in names], dtype=torch.float32, device=device)
        self._mixed_cache["stacks"] = (key, (a_stack, b_stack, scales))
        return a_stack, b_stack, scales

    # -- merge ----------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change of the [out, in] weight, in fp32."""
        return self.lora_variant[adapter_name].delta_weight(self, adapter_name)

    def _merge_into_base(self, name: str) -> None:
        self.lora_variant[name].merge(self, name, self._base_weight_for_merge())

    def _unmerge_from_base(self, name: str) -> None:
        self.lora_variant[name].unmerge(self, name, self._base_weight_for_merge())

    def _merged_weight(self, name, weight, bias):
        return self.lora_variant[name].merged_weight(self, name, weight), bias

    def train(self, mode: bool = True):
        self._dora_norms.clear()  # the DoRA norm cache serves eval-mode inference only
        return super().train(mode)

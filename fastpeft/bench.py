"""Whole-training-step benchmark: PEFT vs fastpeft, side by side in one run.

    python -m fastpeft.bench                       # CUDA: Llama-3.2-1B and Llama-3.1-8B shapes, all methods
    python -m fastpeft.bench --model 1b --quick    # one model, fewer steps, no dropout variants
    python -m fastpeft.bench --report a.json b.json --out-dir benchmarks/results/h100   # merge split runs

Needs the ``bench`` extra for the PNG plots (``pip install -e ".[bench]"``: matplotlib, tqdm) or
``--no-plots``. On a machine without a GPU it runs a tiny 2-layer Llama on the CPU (said so on the first
line), so the command always works; those numbers are a smoke test, not a measurement.

One configuration = a Llama-shaped ``LlamaForCausalLM`` built from a config with random weights (nothing
is downloaded), bf16, sdpa attention, batch 2 × 2048 tokens, HF gradient checkpointing (non-reentrant),
``torch.optim.AdamW`` (fused on CUDA) over the trainable parameters, loss = ``model(ids, labels=ids).loss``.
Methods (r=16, alpha=32, all linear layers but the output head; IA3 on k, v, down with down feed-forward):

    full_ft        plain transformers, every parameter trains (one row, no adapter library)
    lora           LoRA                               PEFT get_peft_model  | fastpeft.patch
    lora_dropout   LoRA, lora_dropout=0.05
    qlora          LoRA on an NF4 + double-quant base (bitsandbytes Linear4bit, bf16 compute);
                   PEFT side: prepare_model_for_kbit_training first (PEFT's QLoRA recipe: it also upcasts
                   embeddings, norms and the head to fp32); fastpeft side: fastpeft.patch on the same base
    qlora_dropout  QLoRA, lora_dropout=0.05
    ia3            IA3 (k_proj, v_proj, down_proj; down_proj feed-forward)
    lora_liger     LoRA + Liger-Kernel's non-adapter kernels (RoPE, RMSNorm, SwiGLU, fused linear cross
                   entropy) on both sides, when liger_kernel is importable and CUDA is there

Each row: tokens/s (batch tokens / median step time over the timed steps, after the warm-up steps),
peak allocated GiB (``torch.cuda.max_memory_allocated`` after a reset that follows building the model
and the optimizer, so it holds weights, adapter grads, optimizer states and activations), MFU against
the bf16 GEMM rate measured in the same run (8192³), the loss of the first and last step. Out-of-memory
is recorded as "oom", anything that cannot run as "skipped" with the reason, failures as "error".

Writes into --out-dir (default ``benchmarks/results/<gpu>/``): ``step_<date>[_<models>].json`` (after
every configuration, so a killed run keeps what it measured), ``.md`` (tables), ``_tokens.png`` and
``_memory.png``. Reusable pieces (``prepare``, ``run_config``, ``profile_step``) serve
``benchmarks/test_step.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

GiB = 2**30
RANK = 16
ALPHA = 32
DROPOUT = 0.05
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]
SCHEMA = "fastpeft.bench.step/1"

# Llama shapes. rope settings do not change the step's cost and are left at their defaults.
MODELS: Dict[str, Dict[str, Any]] = {
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(name="tiny Llama (2 layers)", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
SEQ = {"8b": (2, 2048), "1b": (2, 2048), "tiny": (2, 64)}  # (batch, tokens per sequence)

# Run order = priority (a --budget-s cut drops the tail): the targets first, then variants, Liger last.
METHODS = ["full_ft", "lora", "qlora", "ia3", "lora_dropout", "qlora_dropout", "lora_liger"]
TABLE_ORDER = ["lora", "lora_dropout", "qlora", "qlora_dropout", "ia3", "lora_liger"]  # adapter rows in tables
QUICK_METHODS = ["full_ft", "lora", "ia3", "qlora", "lora_liger"]
METHOD_LABEL = {
    "full_ft": "Full FT", "lora": "LoRA r=16", "lora_dropout": "LoRA r=16, dropout 0.05",
    "qlora": "QLoRA r=16", "qlora_dropout": "QLoRA r=16, dropout 0.05", "ia3": "IA3",
    "lora_liger": "LoRA r=16 + Liger",
}
IMPL_LABEL = {"torch": "plain", "peft": "PEFT", "fastpeft": "fastpeft"}
# Targets from DESIGN.md §5 (whole step, vs PEFT): tokens/s × and peak-memory ×.
SPEED_TARGET = {"lora": 2.0, "lora_dropout": 2.0, "qlora": 3.0, "qlora_dropout": 3.0}
MEMORY_TARGET = 0.75

# Rough H100 seconds per step (DESIGN.md §5 baselines) and per build, only for the running estimate;
# the estimate is rescaled by measured/predicted as configurations finish.
PRIOR_STEP_S = {
    "8b": {"full_ft": 0.9, "lora": 0.71, "lora_dropout": 0.76, "qlora": 1.6, "qlora_dropout": 1.7, "ia3": 0.46,
           "lora_liger": 0.63},
    "1b": {"full_ft": 0.14, "lora": 0.19, "lora_dropout": 0.21, "qlora": 0.54, "qlora_dropout": 0.56, "ia3": 0.12,
           "lora_liger": 0.17},
    "tiny": {m: 0.05 for m in METHODS},
}
PRIOR_BUILD_S = {"8b": 6.0, "1b": 3.0, "tiny": 0.5}
PRIOR_PROFILE_S = {"8b": 25.0, "1b": 12.0, "tiny": 1.0}  # one profiled step + parsing ~10^5 profiler events


# -- environment -----------------------------------------------------------------------------------------
def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "fastpeft"):
        out[dist] = _version(dist)
    if out["fastpeft"] is None:
        from . import __version__

        out["fastpeft"] = __version__
    out["fastpeft_git"] = _git_commit()
    return out


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import subprocess

        res = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return res.stdout.strip() or None
    except Exception:
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; other GPUs: lower-case alphanumerics; 'cpu' without a GPU."""
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def gpu_memory_bytes(device: str) -> Optional[int]:
    return torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None


def gemm_tflops(device: str) -> Optional[float]:
    """Measured bf16 GEMM rate (8192³, median of triton.testing.do_bench): the MFU denominator."""
    if device != "cuda":
        return None
    import triton

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / ms / 1e9


# -- models ----------------------------------------------------------------------------------------------
def llama_config(model: str):
    import transformers

    shape = {k: v for k, v in MODELS[model].items() if k != "name"}
    batch, seq = SEQ[model]
    return transformers.LlamaConfig(max_position_embeddings=max(seq, 2048), use_cache=False, **shape)


def build_base(model: str, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-init LlamaForCausalLM, built directly on ``device`` in ``dtype`` (same seed => same weights)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        m = transformers.LlamaForCausalLM._from_config(llama_config(model), dtype=dtype, attn_implementation="sdpa")
    m.config.use_cache = False
    return m.train()


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Swap every nn.Linear but the output head for a bitsandbytes NF4 ``Linear4bit`` with double quant.

    Direct module replacement (what transformers' bnb loader ends up with, without a round trip through a
    saved checkpoint): the dense weight is quantized on its device by ``Params4bit.to`` and then dropped.
    Sets ``model.is_loaded_in_4bit`` like transformers, so PEFT dispatches its bnb LoRA / IA3 layers.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:  # names only: each dense weight is freed as soon as its layer is swapped
        lin = model.get_submodule(name)
        dev = lin.weight.device
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q).to(dev)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        if dev.type == "cpu":
            q.support_avx512bf16_for_cpu = False  # keep bnb on its portable path (see tests/conftest.py)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        del lin, q
    model.is_loaded_in_4bit = True
    return model


@contextlib.contextmanager
def liger_patched(model: nn.Module):
    """Liger-Kernel's Llama kernels on this model instance; module-level patches undone on exit.

    ``apply_liger_kernel_to_llama(model=...)`` also rebinds ``modeling_llama.apply_rotary_pos_emb`` (and
    the RMSNorm / MLP classes) module-wide, which would leak into the later configurations of the run.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    names = ["apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"]
    saved = {n: getattr(modeling_llama, n) for n in names if hasattr(modeling_llama, n)}
    saved_forward = modeling_llama.LlamaForCausalLM.forward
    try:
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
        yield model
    finally:
        for n, v in saved.items():
            setattr(modeling_llama, n, v)
        modeling_llama.LlamaForCausalLM.forward = saved_forward


# -- one configuration -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    model: str  # 8b | 1b | tiny
    method: str  # one of METHODS
    impl: str  # torch (full_ft) | peft | fastpeft

    @property
    def label(self) -> str:
        return f"{self.model} {METHOD_LABEL[self.method]} [{IMPL_LABEL[self.impl]}]"


def unavailable(spec: Spec, device: str) -> Optional[str]:
    """Why this configuration cannot run here (None if it can)."""
    if spec.impl == "peft" and not have("peft"):
        return "peft not installed"
    if spec.method.startswith("qlora") and not have("bitsandbytes"):
        return "bitsandbytes not installed"
    if spec.method == "lora_liger":
        if not have("liger_kernel"):
            return "liger not installed: skipped (pip install liger-kernel)"
        if device != "cuda":
            return "Liger-Kernel's kernels need CUDA"
    return None


def lora_dropout_of(method: str) -> float:
    return DROPOUT if method.endswith("dropout") else 0.0


class Prepared:
    """A model + optimizer ready to train; ``step()`` runs one full training step and returns the loss."""

    def __init__(self, spec: Spec, model: nn.Module, params: List[nn.Parameter], optimizer, batches, exit_stack):
        self.spec = spec
        self.model = model
        self.params = params
        self.optimizer = optimizer
        self.batches = batches
        self._stack = exit_stack
        self._i = 0
        self.trainable = sum(p.numel() for p in params)

    def step(self) -> torch.Tensor:
        ids = self.batches[self._i % len(self.batches)]
        self._i += 1
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        self._stack.close()
        self.model = self.optimizer = self.params = self.batches = None


def prepare(spec: Spec, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
            backend: Optional[str] = None) -> Prepared:
    """Build the model of ``spec`` (random weights), apply the method, make the optimizer and the batches."""
    import fastpeft

    stack = contextlib.ExitStack()
    try:
        model = build_base(spec.model, device, dtype, seed)
        if spec.method.startswith("qlora"):
            quantize_nf4(model, compute_dtype=dtype)
        if spec.method == "lora_liger":
            stack.enter_context(liger_patched(model))
        ckpt = {"use_reentrant": False}
        p = lora_dropout_of(spec.method)
        if spec.impl == "torch":
            if spec.method != "full_ft":
                raise ValueError(f"impl 'torch' is only for full_ft, not {spec.method}")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        elif spec.impl == "peft":
            import peft

            if spec.method.startswith("qlora"):
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                             gradient_checkpointing_kwargs=ckpt)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
            if spec.method == "ia3":
                cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=IA3_TARGETS,
                                     feedforward_modules=IA3_FEEDFORWARD)
            else:
                cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=p,
                                      target_modules="all-linear")
            model = peft.get_peft_model(model, cfg)
        elif spec.impl == "fastpeft":
            if spec.method == "full_ft":
                raise ValueError("full_ft has no fastpeft variant")
            if backend:
                os.environ["FASTPEFT_BACKEND"] = backend  # read by each layer when it is built
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
            if spec.method == "ia3":
                cfg = fastpeft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)
            else:
                cfg = fastpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules="all-linear")
            model = fastpeft.patch(model, cfg)
        else:
            raise ValueError(f"unknown impl {spec.impl!r}: torch, peft or fastpeft")
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise RuntimeError(f"{spec.label}: no trainable parameters")
        opt_kwargs = {"fused": True} if device == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=1e-4, **opt_kwargs)
        batch, seq = SEQ[spec.model]
        vocab = MODELS[spec.model]["vocab_size"]
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        batches = [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(2)]
        return Prepared(spec, model, params, optimizer, batches, stack)
    except BaseException:
        stack.close()
        raise


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory since ``reset()``: CUDA allocated bytes; on CPU the process's peak RSS (Linux VmHWM,
    reset through /proc/self/clear_refs), which also counts the Python heap — a rough smoke-test number."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "allocated" if device == "cuda" else "rss"

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_bytes(self) -> Optional[int]:
        if self.device == "cuda":
            return int(torch.cuda.max_memory_allocated())
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


# -- FLOPs / memory estimates ----------------------------------------------------------------------------
def linear_params(model: str) -> Dict[str, int]:
    """Weights that take part in matmuls: the decoder's linear layers and the output head."""
    s = MODELS[model]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    return {"decoder": per_layer * L, "head": V * h}


def total_params(model: str) -> int:
    s = MODELS[model]
    h, L, V = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]
    lp = linear_params(model)
    emb = 0 if s["tie_word_embeddings"] else V * h
    return lp["decoder"] + lp["head"] + emb + (2 * L + 1) * h


def step_flops(model: str, method: str) -> float:
    """FLOPs one step must do, with activation checkpointing (each decoder layer's forward runs twice).

    Decoder linears: forward 2·N·T, recompute 2·N·T, input gradient 2·N·T, weight gradient 2·N·T (full FT
    only). Output head (not recomputed): 2·N·T + 2·N·T, + 2·N·T for full FT. Causal attention counted at
    half the square: forward 2·B·S²·d per layer, ×4 in all (forward, recompute, backward = 2×). Adapter
    FLOPs (2·T·r·(K+N) per LoRA layer, < 1%) are left out.
    """
    batch, seq = SEQ[model]
    T = batch * seq
    lp = linear_params(model)
    s = MODELS[model]
    full = method == "full_ft"
    dec = lp["decoder"] * T * 2 * (4 if full else 3)
    head = lp["head"] * T * 2 * (3 if full else 2)
    attn = 4 * 2 * batch * seq * seq * s["hidden_size"] * s["num_hidden_layers"]
    return float(dec + head + attn)


def full_ft_estimate_bytes(model: str) -> int:
    """bf16 weights + grads + AdamW's two bf16 states (8 B/param), plus activations under checkpointing:
    one hidden state per layer, one layer's recomputed internals, and the logits (bf16, fp32 upcast, grad)."""
    s = MODELS[model]
    batch, seq = SEQ[model]
    T = batch * seq
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    states = total_params(model) * 8
    act = L * T * h * 2 + T * (8 * h + 4 * i) * 2 + T * V * (2 + 4 + 4)
    return states + act


# -- timing ----------------------------------------------------------------------------------------------
def new_row(spec: Spec) -> Dict[str, Any]:
    return {"model": spec.model, "model_name": MODELS[spec.model]["name"], "method": spec.method,
            "impl": spec.impl, "label": spec.label, "status": None, "reason": None}


def run_config(spec: Spec, device: str, dtype: torch.dtype, steps: int, warmup: int, gemm: Optional[float],
               profile: bool = False, backend: Optional[str] = None, log: Callable[[str], None] = print
               ) -> Dict[str, Any]:
    """Build, warm up, time ``steps`` steps, optionally profile one more; never raises (status says why)."""
    row = new_row(spec)
    why = unavailable(spec, device)
    if why:
        row.update(status="skipped", reason=why)
        return row
    if spec.method == "full_ft" and device == "cuda":
        est, cap = full_ft_estimate_bytes(spec.model), gpu_memory_bytes(device)
        row["estimate_gib"] = est / GiB
        if est > cap:
            row.update(status="oom", reason=f"OOM (estimated {est / GiB:.1f} GiB > {cap / GiB:.1f} GiB): not tried")
            return row
    t0 = time.perf_counter()
    free_memory(device)
    if device == "cuda":
        row["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB
    try:
        _measure(spec, row, device, dtype, steps, warmup, gemm, profile, backend, log)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=f"OOM: {str(e).splitlines()[0][:300]}")
    except Exception as e:  # recorded, the run goes on with the next configuration
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
        log(f"{spec.label}: error\n{traceback.format_exc(limit=12)}")
    free_memory(device)
    row["wall_s"] = time.perf_counter() - t0
    return row


def _measure(spec, row, device, dtype, steps, warmup, gemm, profile, backend, log) -> None:
    peak = PeakMemory(device)
    t_build = time.perf_counter()
    prep = prepare(spec, device, dtype, backend=backend)
    try:
        _sync(device)
        row["build_s"] = time.perf_counter() - t_build
        row["trainable_params"] = prep.trainable
        batch, seq = SEQ[spec.model]
        tokens = batch * seq
        peak.reset()
        losses, times = [], []
        for i in range(warmup + steps):
            _sync(device)
            t = time.perf_counter()
            loss = prep.step()
            _sync(device)
            dt = time.perf_counter() - t
            losses.append(loss)
            if i >= warmup:
                times.append(dt)
        pk = peak.peak_bytes()
        losses = [float(x) for x in losses]
        if not all(math.isfinite(x) for x in losses):
            raise FloatingPointError(f"non-finite loss: {losses}")
        med = statistics.median(times)
        flops = step_flops(spec.model, spec.method)
        row.update(
            status="ok", tokens=tokens, step_s=med, step_s_all=times, tokens_per_s=tokens / med,
            peak_gib=None if pk is None else pk / GiB, peak_kind=peak.kind,
            loss_first=losses[0], loss_last=losses[-1], flops_per_step=flops,
            mfu=(flops / med / (gemm * 1e12)) if gemm else None,
        )
        if profile:
            try:
                row["profile"] = profile_step(prep, device)
            except Exception as e:  # a profiler problem must not lose the measurement
                row["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        prep.close()
        del prep


# -- profiler breakdown ----------------------------------------------------------------------------------
BUCKETS = ["linear", "nf4 dequant", "attention", "norm+elementwise", "loss", "optimizer"]
_RULES = [  # first match on the innermost op that matches wins
    ("optimizer", ("optimizer.step", "adamw", "_fused_adam", "zero_grad", "_foreach_")),
    ("loss", ("cross_entropy", "crossentropy", "nll_loss", "nllloss", "log_softmax", "logsoftmax",
              "bench::loss")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "sdpa", "fmha")),
    ("nf4 dequant", ("dequant",)),
    ("linear", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mmbackward",
                "addmmbackward", "bmmbackward", "lora", "ia3", "matmul4bit", "gemm", "_scaled_mm")),
]


def classify(names: List[str]) -> str:
    """Bucket of a kernel from the op names around its launch, innermost first (default: norm+elementwise:
    RMSNorm, SwiGLU, RoPE, residual adds, dtype casts, embedding...)."""
    for name in names:
        low = name.lower()
        for bucket, keys in _RULES:
            if any(k in low for k in keys):
                return bucket
    return "norm+elementwise"


def profile_step(prep: Prepared, device: str) -> Dict[str, Any]:
    """One more training step under torch.profiler: device time per bucket (CPU time on a CPU-only run).

    Kernels are attributed to the innermost profiled op that launched them (aten ops, autograd Functions
    such as fastpeft's _LoraLinearFn / bnb's MatMul4Bit, and their backward nodes; recomputed layers count
    as themselves). The loss bucket is HF's loss function (logits upcast, log-softmax, NLL) in forward and
    the log-softmax / NLL backward nodes; the output head's matmul is linear.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    model = prep.model
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    had_loss_fn = "_loss_function" in root.__dict__
    orig = root.loss_function

    def loss_fn(*a, **k):
        with record_function("bench::loss"):
            return orig(*a, **k)

    root.loss_function = loss_fn
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        _sync(device)
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            prep.step()
            _sync(device)
            wall = time.perf_counter() - t
    finally:
        if had_loss_fn:
            root.loss_function = orig
        else:
            root.__dict__.pop("_loss_function", None)
    t_parse = time.perf_counter()
    events = prof.events()
    buckets = {b: 0.0 for b in BUCKETS}
    attributed = 0.0
    kernels_total = 0.0
    top: Dict[str, List[float]] = {}
    for evt in events:
        if device == "cuda" and evt.device_type == DeviceType.CUDA:
            dur = evt.time_range.elapsed_us()
            kernels_total += dur
            acc = top.setdefault(evt.name, [0.0, 0])
            acc[0] += dur
            acc[1] += 1
            continue
        if evt.device_type != DeviceType.CPU or getattr(evt, "is_async", False):
            continue
        if device == "cuda":  # the kernels this op launched itself (children's kernels sit on the children)
            parts = [(k.name, k.duration) for k in evt.kernels if k.duration > 0]
        else:
            parts = [(evt.name, evt.self_cpu_time_total)] if evt.self_cpu_time_total > 0 else []
        if not parts:
            continue
        names, e = [], evt
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        bucket = classify(names)
        for kname, t_us in parts:
            # a dequant kernel launched inside an adapter's autograd Function still counts as dequant
            buckets["nf4 dequant" if "dequant" in kname.lower() else bucket] += t_us
            attributed += t_us
            if device != "cuda":
                acc = top.setdefault(kname, [0.0, 0])
                acc[0] += t_us
                acc[1] += 1
    total = max(kernels_total, attributed)
    out = {b: v / 1e3 for b, v in buckets.items()}
    out["other (unattributed)"] = max(total - attributed, 0.0) / 1e3
    top_rows = sorted(top.items(), key=lambda kv: -kv[1][0])[:15]
    return {"ms": out, "busy_ms": total / 1e3, "wall_ms": wall * 1e3, "time": "device" if device == "cuda" else "cpu",
            "top": [{"name": n[:160], "ms": v[0] / 1e3, "calls": v[1]} for n, v in top_rows],
            "parse_s": time.perf_counter() - t_parse}


# -- the run ---------------------------------------------------------------------------------------------
def make_plan(models: List[str], methods: List[str]) -> List[Spec]:
    plan = []
    for model in models:
        for method in methods:
            impls = ["torch"] if method == "full_ft" else ["peft", "fastpeft"]
            plan.extend(Spec(model, method, impl) for impl in impls)
    return plan


def predict_s(spec: Spec, steps: int, warmup: int, profile: bool) -> float:
    step = PRIOR_STEP_S[spec.model][spec.method]
    build = PRIOR_BUILD_S[spec.model] * (1.5 if spec.method.startswith("qlora") else 1.0)
    return build + (steps + warmup) * step + (PRIOR_PROFILE_S[spec.model] if profile else 0.0)


def output_stem(models: List[str], date: str) -> str:
    tag = "" if set(models) >= {"1b", "8b"} or models == ["tiny"] else "_" + "-".join(models)
    return f"step_{date}{tag}"


def run(models: List[str], methods: List[str], device: str, steps: int, warmup: int, out_dir: Optional[str],
        profile_methods: List[str], dtype: torch.dtype = torch.bfloat16, budget_s: Optional[float] = None,
        plots: bool = True, backend: Optional[str] = None, progress: bool = True,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the plan; write JSON after each configuration and markdown + plots at the end."""
    t_start = time.perf_counter()
    date = datetime.date.today().isoformat()
    info: Dict[str, Any] = {
        "schema": SCHEMA, "date": date, "device": device_name(device), "device_slug": device_slug(device),
        "gpu_memory_gib": (gpu_memory_bytes(device) or 0) / GiB or None, "versions": versions(),
        "settings": {"dtype": str(dtype).replace("torch.", ""), "rank": RANK, "lora_alpha": ALPHA,
                     "lora_dropout": DROPOUT, "ia3_targets": IA3_TARGETS, "steps": steps, "warmup": warmup,
                     "gradient_checkpointing": "non-reentrant", "optimizer": "torch AdamW" + (
                         " (fused)" if device == "cuda" else ""), "attention": "sdpa",
                     "fastpeft_backend": backend or os.environ.get("FASTPEFT_BACKEND", "auto"),
                     "shapes": {m: {**MODELS[m], "batch": SEQ[m][0], "seq": SEQ[m][1]} for m in models}},
        "gemm_tflops": None, "rows": [], "notes": [],
    }
    if device != "cuda":
        info["notes"].append("No CUDA device: tiny shapes on the CPU; numbers are a smoke test, not a measurement; "
                             "peak memory is the process's peak RSS.")
    if plots:
        require_plotting()
    out_dir = out_dir or os.path.join("benchmarks", "results", info["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, output_stem(models, date))
    info["gemm_tflops"] = gemm_tflops(device)
    if info["gemm_tflops"]:
        log(f"bf16 GEMM 8192^3: {info['gemm_tflops']:.0f} TFLOP/s (the MFU denominator)")
    plan = make_plan(models, methods)
    profile_model = models[-1]  # the largest model of the run (models are ordered small to large)
    profiled = [s.method in profile_methods and s.model == profile_model for s in plan]
    predicted = [predict_s(s, steps, warmup, prof) for s, prof in zip(plan, profiled)]
    log(f"plan: {len(plan)} configurations, about {sum(predicted):.0f} s by the H100 priors"
        + (f" (budget {budget_s:.0f} s)" if budget_s else ""))
    bar = _progress(len(plan), progress)
    done_pred = done_real = 0.0
    for k, spec in enumerate(plan):
        scale = (done_real / done_pred) if done_pred > 0 else 1.0
        remaining = scale * sum(predicted[k:])
        elapsed = time.perf_counter() - t_start
        bar.set_postfix_str(f"{spec.label} | {elapsed:.0f} s, ~{remaining:.0f} s left")
        if budget_s is not None and elapsed + scale * predicted[k] > budget_s:
            row = new_row(spec)
            row.update(status="skipped", reason=f"time budget: {elapsed:.0f} s elapsed + ~{scale * predicted[k]:.0f} s "
                                                f"predicted > --budget-s {budget_s:.0f}")
        else:
            row = run_config(spec, device, dtype, steps, warmup, info["gemm_tflops"], profile=profiled[k],
                             backend=backend, log=bar.write)
            if row.get("wall_s") and row["status"] != "skipped":
                done_pred += predicted[k]
                done_real += row["wall_s"]
        info["rows"].append(row)
        bar.write(describe(row))
        bar.update(1)
        write_json(info, stem + ".json")
    bar.close()
    info["wall_s"] = time.perf_counter() - t_start
    write_json(info, stem + ".json")
    md = markdown(info)
    with open(stem + ".md", "w") as f:
        f.write(md)
    files = [stem + ".json", stem + ".md"]
    if plots:
        files += write_plots(info, stem)
    info["files"] = files
    log(md)
    log(f"wrote {', '.join(files)} in {info['wall_s']:.0f} s")
    return info


class _NoBar:
    def __init__(self, log=print):
        self.write = log

    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        raise SystemExit("fastpeft.bench: tqdm is needed for the progress bar: pip install -e '.[bench]' "
                         "(or pass --no-progress)")
    return tqdm(total=total, desc="bench", unit="cfg", file=sys.stderr, mininterval=0, dynamic_ncols=False,
                ncols=110)


def describe(row: Dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['label']:<48} {row['status'].upper()}: {row['reason']}"
    mem = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f} GiB"
    mfu = "" if row.get("mfu") is None else f"  MFU {100 * row['mfu']:.1f}%"
    prof = ""
    if isinstance(row.get("profile"), dict) and "ms" in row["profile"]:
        p = row["profile"]
        prof = "\n    profile (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p["ms"].items() if v > 0) + \
            f" | busy {p['busy_ms']:.1f} of wall {p['wall_ms']:.1f}"
    leak = row.get("allocated_before_gib") or 0.0
    if leak > 0.25:
        prof += f"\n    warning: {leak:.2f} GiB still allocated before this configuration was built (counted in its peak)"
    return (f"{row['label']:<48} {row['tokens_per_s']:>10,.0f} tok/s  step {1e3 * row['step_s']:.1f} ms  peak {mem}"
            f"{mfu}  loss {row['loss_first']:.3f}->{row['loss_last']:.3f}  (build {row['build_s']:.1f} s){prof}")


def write_json(info: Dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, path)


# -- reporting -------------------------------------------------------------------------------------------
def _find(rows, model, method, impl):
    for r in rows:
        if r["model"] == model and r["method"] == method and r["impl"] == impl:
            return r
    return None


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _status(r) -> str:
    if r["status"] == "oom":
        est = r.get("estimate_gib")
        tried = "not tried" not in (r.get("reason") or "")
        return "OOM" + (f" (est. {est:.0f} GiB{'' if tried else ', not tried'})" if est else "")
    return r["status"]


def _gib(r) -> str:
    if r is None:
        return "not run"
    if r["status"] == "ok":
        return "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f} GiB"
    return _status(r)


def _models_in(rows) -> List[str]:
    order = ["1b", "8b", "tiny"]
    present = {r["model"] for r in rows}
    return [m for m in order if m in present]


def memory_table(info) -> List[str]:
    rows = info["rows"]
    out = ["| model | Full FT | LoRA r=16 | QLoRA r=16 | IA3 |", "| --- | --- | --- | --- | --- |"]
    for model in _models_in(rows):
        cells = []
        cells.append(_gib(_find(rows, model, "full_ft", "torch")))
        for method in ("lora", "qlora", "ia3"):
            p, f = _find(rows, model, method, "peft"), _find(rows, model, method, "fastpeft")
            if p is None and f is None:
                cells.append("not run")
                continue
            ratio = ""
            if _ok(p) and _ok(f) and p.get("peak_gib") and f.get("peak_gib") is not None:
                ratio = f" ({f['peak_gib'] / p['peak_gib']:.2f}×)"
            cells.append(f"PEFT {_gib(p)} → fastpeft {_gib(f)}{ratio}")
        out.append(f"| {MODELS[model]['name']} | " + " | ".join(cells) + " |")
    return out


def _tps(r) -> str:
    if r is None:
        return "not run"
    if r["status"] == "ok":
        return f"{r['tokens_per_s']:,.0f}"
    return _status(r)


def _mfu(r) -> str:
    return f"{100 * r['mfu']:.1f}%" if _ok(r) and r.get("mfu") is not None else "-"


def speed_table(info) -> List[str]:
    rows = info["rows"]
    judge = info.get("device_slug") != "cpu"  # no target verdicts on a CPU smoke run
    out = ["| model | method | PEFT tok/s | fastpeft tok/s | × vs PEFT | MFU PEFT | MFU fastpeft | "
           "peak PEFT | peak fastpeft | memory × | targets |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in _models_in(rows):
        name = MODELS[model]["name"]
        full = _find(rows, model, "full_ft", "torch")
        if full is not None:
            out.append(f"| {name} | Full FT (plain transformers) | {_tps(full)} | | | {_mfu(full)} | | {_gib(full)} "
                       f"| | | |")
        for method in TABLE_ORDER:
            p, f = _find(rows, model, method, "peft"), _find(rows, model, method, "fastpeft")
            if p is None and f is None:
                continue
            speed = mem = "-"
            verdict = []
            if _ok(p) and _ok(f):
                s = f["tokens_per_s"] / p["tokens_per_s"]
                speed = f"{s:.2f}×"
                if judge and method in SPEED_TARGET:
                    verdict.append(f"speed ≥{SPEED_TARGET[method]:g}× {'met' if s >= SPEED_TARGET[method] else 'missed'}")
                if p.get("peak_gib") and f.get("peak_gib") is not None:
                    m = f["peak_gib"] / p["peak_gib"]
                    mem = f"{m:.2f}×"
                    if judge and method in SPEED_TARGET:
                        verdict.append(f"memory ≤{MEMORY_TARGET:g}× {'met' if m <= MEMORY_TARGET else 'missed'}")
            if judge and _ok(f) and _ok(full) and method.startswith("lora"):
                verdict.append(f"{f['tokens_per_s'] / full['tokens_per_s']:.2f}× Full FT")
            out.append(f"| {name} | {METHOD_LABEL[method]} | {_tps(p)} | {_tps(f)} | {speed} | {_mfu(p)} | {_mfu(f)} | "
                       f"{_gib(p)} | {_gib(f)} | {mem} | {'; '.join(verdict)} |")
    return out


def profile_table(info) -> List[str]:
    prof_rows = [r for r in info["rows"] if isinstance(r.get("profile"), dict) and "ms" in r["profile"]]
    if not prof_rows:
        return []
    keys = BUCKETS + ["other (unattributed)"]
    unit = "device ms" if prof_rows[0]["profile"].get("time") == "device" else "CPU ms"
    out = [f"| model | method | impl | " + " | ".join(keys) + f" | busy ({unit}) | step wall ms |",
           "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    for r in prof_rows:
        p = r["profile"]
        busy = p["busy_ms"] or 1.0
        cells = [f"{p['ms'].get(k, 0.0):.1f} ({100 * p['ms'].get(k, 0.0) / busy:.0f}%)" for k in keys]
        out.append(f"| {r['model_name']} | {METHOD_LABEL[r['method']]} | {IMPL_LABEL[r['impl']]} | " + " | ".join(cells)
                   + f" | {p['busy_ms']:.1f} | {p['wall_ms']:.1f} |")
    return out


def markdown(info) -> str:
    v = info["versions"]
    st = info["settings"]
    gemm = info.get("gemm_tflops")
    head = [
        f"# Whole training step: PEFT vs fastpeft ({info['device']}, {info['date']})",
        "",
        f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, liger-kernel {v.get('liger-kernel') or 'not installed'}, "
        f"fastpeft {v.get('fastpeft')} ({v.get('fastpeft_git') or 'no git'}); backend {st.get('fastpeft_backend')}.",
        f"Random-init Llama shapes built from configs, {st['dtype']}, sdpa attention, "
        + ", ".join(f"{MODELS[m]['name']}: batch {SEQ[m][0]} × {SEQ[m][1]} tokens" for m in _models_in(info["rows"]))
        + f"; gradient checkpointing ({st['gradient_checkpointing']}), {st['optimizer']}; r={st['rank']}, "
        f"alpha={st['lora_alpha']} on all linear layers but the head; IA3 on k, v, down. Tokens/s = median of "
        f"{st['steps']} timed steps after {st['warmup']} warm-up steps; peak = "
        + ("`torch.cuda.max_memory_allocated` (weights, grads, optimizer states, activations)." if gemm else
           "peak RSS of the process (CPU smoke test)."),
    ]
    if gemm:
        head.append(f"MFU = model FLOPs per step / step time / measured bf16 GEMM rate ({gemm:.0f} TFLOP/s, 8192³). "
                    "Model FLOPs count what the step must do with checkpointing: decoder linears 2·N·T forward + "
                    "2·N·T recompute + 2·N·T input grad (+ 2·N·T weight grad for Full FT), head without recompute, "
                    "causal attention at half the square (×4 for forward, recompute, backward); adapter FLOPs "
                    "(< 1%) left out.")
    head += ["Full FT = plain transformers, bf16 weights, grads and AdamW states (8 B/param, no fp32 master "
             "weights); where its estimate exceeds the GPU's memory it is recorded as OOM without trying.",
             "PEFT QLoRA = PEFT's recipe: `prepare_model_for_kbit_training` (upcasts embeddings, norms and head to "
             "fp32) + `get_peft_model`; fastpeft QLoRA = `fastpeft.patch` on the same NF4 base (bf16 elsewhere). "
             "The 4-bit base is built by swapping each linear layer for a bitsandbytes `Linear4bit` (nf4, double "
             "quant, bf16 compute) quantized from the random bf16 weights."]
    for n in info.get("notes", []):
        head.append(f"Note: {n}")
    lines = head + ["", "## Peak memory", ""] + memory_table(info) + ["", "## Speed", ""] + speed_table(info)
    prof = profile_table(info)
    if prof:
        lines += ["", "## Where one step's time goes (torch profiler, one step)", "",
                  "Kernels attributed to the innermost op that launched them; linear = base and adapter "
                  "matmuls (incl. fastpeft's fused LoRA / IA3 kernels), nf4 dequant = kernels named dequant* "
                  "(bnb's and fastpeft's separate dequantize passes; a dequant fused into a GEMM counts as linear), "
                  "loss = HF loss (upcast, log-softmax, NLL), "
                  "norm+elementwise = everything else (RMSNorm, SwiGLU, RoPE, residuals, casts, embedding). "
                  "busy = summed kernel time; wall − busy ≈ launch / host gaps.", ""] + prof
    problems = [r for r in info["rows"] if r["status"] in ("skipped", "error")]
    if problems:
        lines += ["", "## Not measured", ""] + [f"- {r['label']}: {r['status']}: {r['reason']}" for r in problems]
    return "\n".join(lines) + "\n"


def require_plotting():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fastpeft.bench: matplotlib is needed for the PNG plots: pip install -e '.[bench]' "
                         "(or pass --no-plots)")


def write_plots(info, stem: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = info["rows"]
    files = []
    for key, fname, ylabel in (("tokens_per_s", "_tokens.png", "tokens / s (higher is better)"),
                               ("peak_gib", "_memory.png", "peak allocated GiB (lower is better)")):
        models = _models_in(rows)
        fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], models):
            labels, peft_v, fast_v = [], [], []
            full = _find(rows, model, "full_ft", "torch")
            for method in TABLE_ORDER:
                p, f = _find(rows, model, method, "peft"), _find(rows, model, method, "fastpeft")
                if p is None and f is None:
                    continue
                labels.append(METHOD_LABEL[method].replace(", ", "\n").replace(" + ", "\n+ "))
                peft_v.append(p.get(key) if _ok(p) and p.get(key) is not None else 0.0)
                fast_v.append(f.get(key) if _ok(f) and f.get(key) is not None else 0.0)
            x = list(range(len(labels)))
            w = 0.38
            ax.bar([i - w / 2 for i in x], peft_v, w, label="PEFT", color="#9e9e9e")
            ax.bar([i + w / 2 for i in x], fast_v, w, label="fastpeft", color="#1f77b4")
            for i, (a, b) in enumerate(zip(peft_v, fast_v)):
                for xv, val in ((i - w / 2, a), (i + w / 2, b)):
                    ax.text(xv, val, "n/a" if val == 0 else (f"{val:,.0f}" if key == "tokens_per_s" else f"{val:.1f}"),
                            ha="center", va="bottom", fontsize=7)
            if _ok(full) and full.get(key) is not None:
                ax.axhline(full[key], color="#d62728", linestyle="--", linewidth=1, label="Full FT")
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
            title = f"{MODELS[model]['name']}, batch {SEQ[model][0]}×{SEQ[model][1]}"
            if full is not None and full["status"] != "ok":
                title += f" (Full FT: {_status(full)})"
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle(f"{info['device']} — {info['date']}", fontsize=10)
        fig.tight_layout()
        path = stem + fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def report(json_paths: List[str], out_dir: Optional[str], plots: bool, log=print) -> Dict[str, Any]:
    """Merge the rows of several step JSONs (e.g. a 1b and an 8b run) and write markdown + plots."""
    infos = []
    for p in json_paths:
        with open(p) as f:
            infos.append(json.load(f))
    info = dict(infos[0])
    merged: Dict[tuple, Dict[str, Any]] = {}
    for row in (r for i in infos for r in i["rows"]):  # a later run's row replaces an earlier one, unless it
        key = (row["model"], row["method"], row["impl"])  # did not run and the earlier one did
        if key not in merged or row["status"] == "ok" or merged[key]["status"] != "ok":
            merged[key] = row
    info["rows"] = list(merged.values())
    for i in infos[1:]:
        if i["device"] != info["device"]:
            info.setdefault("notes", []).append(f"rows from another device too: {i['device']} ({i['date']})")
    info["settings"] = dict(info["settings"])
    info["settings"]["shapes"] = {k: v for i in infos for k, v in i["settings"].get("shapes", {}).items()}
    models = _models_in(info["rows"])
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_paths[0]))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, output_stem(models, info["date"]))
    if plots:
        require_plotting()
    write_json(info, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(info))
    files = [stem + ".json", stem + ".md"] + (write_plots(info, stem) if plots else [])
    log(markdown(info))
    log("wrote " + ", ".join(files))
    info["files"] = files
    return info


# -- command line ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastpeft.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["1b", "8b", "tiny", "all"], default=None,
                    help="model shape (default: all = 1b and 8b on CUDA; tiny on a CPU-only machine)")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated, from {','.join(METHODS)} (default: all; --quick: {','.join(QUICK_METHODS)})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; CPU 3; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; CPU 1; quick 1)")
    ap.add_argument("--out-dir", default=None, help="where the files go (default benchmarks/results/<gpu>/)")
    ap.add_argument("--liger", dest="liger", action="store_true", default=None,
                    help="add the Liger rows (default: when liger_kernel is installed)")
    ap.add_argument("--no-liger", dest="liger", action="store_false")
    ap.add_argument("--profile", nargs="?", const="lora,qlora", default="",
                    help="profile one extra step of these methods on the run's largest model, both sides "
                         "(default when given: lora,qlora)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, no dropout variants")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip (and say so) configurations that would end past this many seconds")
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib needed)")
    ap.add_argument("--no-progress", action="store_true", help="plain log lines instead of a tqdm bar")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--backend", choices=["auto", "triton", "reference"], default=None,
                    help="FASTPEFT_BACKEND for the fastpeft rows (default: the environment's, else auto)")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="no run: merge these step JSONs and write markdown + plots")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        report(a.report, a.out_dir, plots=not a.no_plots)
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model is None or a.model == "all":
        models = ["1b", "8b"] if device == "cuda" else ["tiny"]
    else:
        models = [a.model]
    if device != "cuda" and models != ["tiny"]:
        raise SystemExit(f"fastpeft.bench: --model {a.model} needs a CUDA GPU; on this machine use --model tiny "
                         "(the default without a GPU)")
    if device != "cuda":
        s = MODELS["tiny"]
        print(f"fastpeft.bench: no CUDA device -> tiny shapes on the CPU ({s['num_hidden_layers']}-layer Llama, "
              f"hidden {s['hidden_size']}, batch {SEQ['tiny'][0]} x {SEQ['tiny'][1]} tokens): a smoke test, "
              "not a measurement", flush=True)
    if a.backend == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("fastpeft.bench: --backend triton without a GPU needs TRITON_INTERPRET=1 in the "
                         "environment (set before Python starts) and --dtype fp32")
    methods = a.methods.split(",") if a.methods else (QUICK_METHODS if a.quick else METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"fastpeft.bench: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if a.liger is False:
        methods = [m for m in methods if m != "lora_liger"]
    elif a.liger is True and not have("liger_kernel"):
        raise SystemExit("fastpeft.bench: --liger given but liger_kernel is not importable (pip install liger-kernel)")
    profile_methods = [m for m in a.profile.split(",") if m] if a.profile else []
    bad = [m for m in profile_methods if m not in METHODS]
    if bad:
        raise SystemExit(f"fastpeft.bench: unknown --profile method(s) {bad}; choose from {', '.join(METHODS)}")
    cpu = device != "cuda"
    steps = a.steps if a.steps is not None else (3 if (a.quick or cpu) else 5)
    warmup = a.warmup if a.warmup is not None else (1 if (a.quick or cpu) else 2)
    if steps < 1 or warmup < 0:
        raise SystemExit("fastpeft.bench: --steps must be >= 1 and --warmup >= 0")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    import transformers
    import warnings

    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    if cpu:
        # Tiny shapes: one thread is faster and far steadier than an OpenMP team on a busy machine.
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(gradient|activation)_checkpointing.*", category=FutureWarning)
            info = run(models, methods, device, steps, warmup, a.out_dir, profile_methods, dtype=dtype,
                       budget_s=a.budget_s, plots=not a.no_plots, backend=a.backend, progress=not a.no_progress)
    finally:
        torch.set_num_threads(threads)
    bad_rows = [r for r in info["rows"] if r["status"] == "error"]
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())

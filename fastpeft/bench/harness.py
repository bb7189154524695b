"""The harness of the whole-step benchmark: build one configuration (a random-init Llama, optionally with an
NF4 base and Liger's kernels, with PEFT's or fastpeft's adapters, an AdamW optimizer and fixed batches), then
warm it up, time its steps, measure its peak memory and optionally profile one more step
(``profiling.profile_step``). ``run_config`` never raises: a row's status says what happened.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import transformers

import fastpeft

from .. import settings
from ..ops.linear_cross_entropy import HAS_LIGER
from .environment import free_memory, gpu_memory_bytes, have, sync
from .plan import (
    ALPHA,
    GiB,
    IA3_FEEDFORWARD,
    IA3_TARGETS,
    LOHA_RANK,
    OFT_BLOCK_SIZE,
    PROMPT_TOKENS,
    TRAINED_TOKEN_ROWS,
    VERA_RANK,
    ADALORA_INIT_R,
    ADALORA_TARGET_R,
    ADALORA_TOTAL_STEP,
    MODELS,
    RANK,
    SEQ,
    Spec,
    arch_of,
    batch_shape_of,
    full_ft_estimate_bytes,
    is_4bit,
    is_dora,
    lora_dropout_of,
    step_flops,
    uses_checkpointing,
    uses_fused_loss,
    uses_offload,
)
from .profiling import profile_step


# -- models ----------------------------------------------------------------------------------------------
def model_config(model: str, seq: Optional[int] = None):
    """The transformers config of one of the MODELS shapes (``LlamaConfig``, or ``Qwen2Config`` for the qwen2
    shapes), with positions for ``seq`` tokens at least."""
    shape = {k: v for k, v in MODELS[model].items() if k not in ("name", "arch")}
    seq = seq or SEQ[model][1]
    kind = transformers.Qwen2Config if arch_of(model) == "qwen2" else transformers.LlamaConfig
    return kind(max_position_embeddings=max(seq, 2048), use_cache=False, **shape)


def llama_config(model: str, seq: Optional[int] = None):
    """The ``transformers.LlamaConfig`` of one of the Llama shapes of MODELS (``model_config`` for any shape)."""
    if arch_of(model) != "llama":
        raise ValueError(f"{model} is a {arch_of(model)} shape, not a Llama one: use model_config")
    return model_config(model, seq)


def enable_kv_cache(model: nn.Module) -> nn.Module:
    """Turn a ``llama_config`` model's KV cache on for generate(): the config is a training one (use_cache=False)
    and generate() follows ``generation_config.use_cache``, copied from it, so without this every decode step
    re-runs the whole sequence (how the mixed-batch decode rows of sessions 6 and 10 were measured)."""
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model


def assert_kv_cache(model: nn.Module, run: Callable[[], Any]) -> Any:
    """``run()`` (one generate) on ``model``, asserting that every step after the prompt fed one token to the decoder
    (a KV cache in use); returns run()'s result.

    >>> # out = assert_kv_cache(model, lambda: model.generate(input_ids=ids, max_new_tokens=8))
    """
    seen = []
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda mod, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    assert len(seen) > 1 and set(seen[1:]) == {1}, f"decode steps saw {seen} tokens: no KV cache in use"
    return out


def build_base(model: str, device: str, dtype: torch.dtype, seed: int = 0, seq: Optional[int] = None) -> nn.Module:
    """A random-init LlamaForCausalLM (Qwen2ForCausalLM for the qwen2 shapes), built directly on ``device`` in
    ``dtype`` (same seed => same weights)."""
    torch.manual_seed(seed)
    kind = transformers.Qwen2ForCausalLM if arch_of(model) == "qwen2" else transformers.LlamaForCausalLM
    with torch.device(device):
        m = kind._from_config(model_config(model, seq), dtype=dtype, attn_implementation="sdpa")
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
def adapter_config(lib, method: str, dropout: float):
    """The adapter config of a benchmark row, from ``lib`` (the ``peft`` or the ``fastpeft`` module: both name their
    configs and fields the same way, so both rows get the same settings)."""
    if method == "ia3":
        return lib.IA3Config(task_type="CAUSAL_LM", target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)
    if method in ("loha", "lokr"):
        kind = lib.LoHaConfig if method == "loha" else lib.LoKrConfig
        return kind(task_type="CAUSAL_LM", r=LOHA_RANK, alpha=2 * LOHA_RANK, target_modules="all-linear")
    if method == "oft":
        return lib.OFTConfig(task_type="CAUSAL_LM", oft_block_size=OFT_BLOCK_SIZE, target_modules="all-linear")
    if method == "vera":
        return lib.VeraConfig(task_type="CAUSAL_LM", r=VERA_RANK, target_modules="all-linear")
    if method == "adalora":
        return lib.AdaLoraConfig(task_type="CAUSAL_LM", init_r=ADALORA_INIT_R, target_r=ADALORA_TARGET_R,
                                 lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear",
                                 total_step=ADALORA_TOTAL_STEP)
    if method == "prompt_tuning":
        return lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS)
    if method == "p_tuning":
        return lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS)
    if method == "prefix_tuning":
        return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS)
    if method == "trainable_tokens":
        return lib.TrainableTokensConfig(task_type="CAUSAL_LM", token_indices=list(range(TRAINED_TOKEN_ROWS)))
    return lib.LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                          target_modules="all-linear", use_dora=is_dora(method))


def unavailable(spec: Spec, device: str) -> Optional[str]:
    """Why this configuration cannot run here (None if it can)."""
    if spec.impl == "peft" and not have("peft"):
        return "peft not installed"
    if is_4bit(spec.method) and not have("bitsandbytes"):
        return "bitsandbytes not installed"
    if spec.method == "lora_liger":
        if not have("liger_kernel"):
            return "liger_kernel not installed (pip install liger-kernel)"
        if device != "cuda":
            return "Liger-Kernel's kernels need CUDA"
        if arch_of(spec.model) != "llama":
            return f"the Liger rows patch Llama modules only ({MODELS[spec.model]['name']} is {arch_of(spec.model)})"
    return None


class Prepared:
    """A model + optimizer ready to train; ``step()`` runs one full training step and returns the loss."""

    def __init__(self, spec: Spec, model: nn.Module, params: List[nn.Parameter], optimizer, batches, exit_stack,
                 compile_mode: Optional[str] = None, allocate: Optional[Callable[[int], None]] = None):
        self.spec = spec
        self.allocate = allocate  # AdaLoRA: update_and_allocate(step), after the optimizer step as a training loop does
        self.model = model
        self.compile_mode = compile_mode
        # torch.compile(model): the module the step calls; ``model`` stays the eager module (save, profile, ...)
        self.step_model = model if compile_mode is None else torch.compile(model, mode=compile_mode)
        self.params = params
        self.optimizer = optimizer
        self.batches = batches
        self._stack = exit_stack
        self._i = 0
        self.trainable = sum(p.numel() for p in params)

    def step(self) -> torch.Tensor:
        ids = self.batches[self._i % len(self.batches)]
        self._i += 1
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs: a new iteration starts here, so the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss = self.step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        if self.allocate is not None:
            self.allocate(self._i - 1)
        self.optimizer.zero_grad(set_to_none=True)
        # a copy: under CUDA graphs the loss lives in the graph's memory pool, reused by the next replay
        return loss.detach().clone()

    def close(self) -> None:
        self._stack.close()
        self.model = self.step_model = self.optimizer = self.params = self.batches = None
        if self.compile_mode is not None:
            torch._dynamo.reset()  # drop the compiled graphs (and CUDA-graph pools) before the next configuration


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def prepare(spec: Spec, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
            backend: Optional[str] = None, batch_shape: Optional[tuple] = None,
            compile_mode: Optional[str] = None) -> Prepared:
    """Build the model of ``spec`` (random weights), apply the method, make the optimizer and the batches
    (``batch_shape`` = (batch, tokens per sequence), default ``SEQ[spec.model]``). ``compile_mode`` (one of
    ``COMPILE_MODES``): the step runs ``torch.compile(model, mode=compile_mode)`` -- the same call for every
    library's row (Full FT, PEFT's PeftModel, the patched model)."""
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {COMPILE_MODES}, got {compile_mode!r}")
    stack = contextlib.ExitStack()
    batch, seq = batch_shape_of(spec.model, batch_shape)
    try:
        model = build_base(spec.model, device, dtype, seed, seq=seq)
        if is_4bit(spec.method):
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

            if is_4bit(spec.method):
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                             gradient_checkpointing_kwargs=ckpt)
            elif uses_checkpointing(spec.method):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
            model = peft.get_peft_model(model, adapter_config(peft, spec.method, p))
        elif spec.impl == "fastpeft":
            if spec.method == "full_ft":
                raise ValueError("full_ft has no fastpeft variant")
            if uses_checkpointing(spec.method):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
            cfg = adapter_config(fastpeft, spec.method, p)
            # each layer takes the backend when it is built; restored afterwards (no leak into later rows)
            with settings.override(**({"backend": backend} if backend else {})):
                model = fastpeft.patch(model, cfg)
            if uses_fused_loss(spec.method):
                fastpeft.enable_fused_loss(model)
            if uses_offload(spec.method):
                fastpeft.enable_activation_offload(model)
        else:
            raise ValueError(f"unknown impl {spec.impl!r}: torch, peft or fastpeft")
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise RuntimeError(f"{spec.label}: no trainable parameters")
        opt_kwargs = {"fused": True} if device == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=1e-4, **opt_kwargs)
        vocab = MODELS[spec.model]["vocab_size"]
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        batches = [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(2)]
        allocate = None
        if spec.method == "adalora":
            allocate = model.base_model.update_and_allocate if spec.impl == "peft" else model.update_and_allocate
        return Prepared(spec, model, params, optimizer, batches, stack, compile_mode, allocate)
    except BaseException:
        stack.close()
        raise


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


# -- timing ----------------------------------------------------------------------------------------------
def new_row(spec: Spec) -> Dict[str, Any]:
    return {"model": spec.model, "model_name": MODELS[spec.model]["name"], "method": spec.method,
            "impl": spec.impl, "label": spec.label, "status": None, "reason": None}


def run_config(spec: Spec, device: str, dtype: torch.dtype, steps: int, warmup: int, gemm: Optional[float],
               profile: bool = False, backend: Optional[str] = None, log: Callable[[str], None] = print,
               compile_mode: Optional[str] = None, batch_shape: Optional[tuple] = None) -> Dict[str, Any]:
    """Build, warm up, time ``steps`` steps, optionally profile one more; never raises (status says why).
    With ``compile_mode`` the row also records ``first_step_s`` (the step that compiles); ``batch_shape``
    (batch, tokens per sequence) replaces the model's default ``SEQ`` shape."""
    row = new_row(spec)
    row["compile"] = compile_mode
    why = unavailable(spec, device)
    if why:
        row.update(status="skipped", reason=why)
        return row
    if spec.method == "full_ft" and device == "cuda":
        est, cap = full_ft_estimate_bytes(spec.model, batch_shape), gpu_memory_bytes(device)
        row["estimate_gib"] = est / GiB
        if est > cap:
            row.update(status="oom", reason=f"OOM (estimated {est / GiB:.1f} GiB > {cap / GiB:.1f} GiB): not tried")
            return row
    t0 = time.perf_counter()
    free_memory(device)
    if device == "cuda":
        row["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB
    try:
        _measure(spec, row, device, dtype, steps, warmup, gemm, profile, backend, log, compile_mode, batch_shape)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=f"OOM: {str(e).splitlines()[0][:300]}")
    except Exception as e:  # recorded, the run goes on with the next configuration
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
        log(f"{spec.label}: error\n{traceback.format_exc(limit=12)}")
    free_memory(device)
    row["wall_s"] = time.perf_counter() - t0
    return row


def _measure(spec, row, device, dtype, steps, warmup, gemm, profile, backend, log, compile_mode=None,
             batch_shape=None) -> None:
    peak = PeakMemory(device)
    t_build = time.perf_counter()
    batch, seq = batch_shape_of(spec.model, batch_shape)
    prep = prepare(spec, device, dtype, backend=backend, compile_mode=compile_mode, batch_shape=(batch, seq))
    try:
        sync(device)
        row["build_s"] = time.perf_counter() - t_build
        row["trainable_params"] = prep.trainable
        if uses_fused_loss(spec.method):  # enable_fused_loss(backend="auto") picks Liger's kernel when it can
            row["fused_loss_backend"] = "liger" if (HAS_LIGER and device == "cuda") else "fastpeft"
        tokens = batch * seq
        peak.reset()
        losses, times = [], []
        for i in range(warmup + steps):
            sync(device)
            t = time.perf_counter()
            loss = prep.step()
            sync(device)
            dt = time.perf_counter() - t
            losses.append(loss)
            if i == 0:
                first_step_s = dt
            if i >= warmup:
                times.append(dt)
        pk = peak.peak_bytes()
        losses = [float(x) for x in losses]
        if not all(math.isfinite(x) for x in losses):
            raise FloatingPointError(f"non-finite loss: {losses}")
        med = statistics.median(times)
        if compile_mode is not None:
            row["first_step_s"] = first_step_s
        flops = step_flops(spec.model, spec.method, (batch, seq))
        row.update(
            status="ok", batch=batch, seq=seq, tokens=tokens, step_s=med, step_s_all=times, tokens_per_s=tokens / med,
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


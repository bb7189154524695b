"""Whole-training-step benchmark: PEFT vs fastpeft, side by side in one run.

    python -m fastpeft.bench                       # CUDA: Llama-3.2-1B and Llama-3.1-8B shapes, all methods
    python -m fastpeft.bench --model 1b --quick    # one model, fewer steps, no dropout variants
    python -m fastpeft.bench --model qwen1.5b --batch 8x2048 --methods lora   # another family, another batch shape
    python -m fastpeft.bench --report a.json b.json --out-dir benchmarks/results/h100   # merge split runs

Needs the ``bench`` extra for the PNG plots (``pip install -e ".[bench]"``: matplotlib, tqdm) or
``--no-plots``. On a machine without a GPU it runs a tiny 2-layer Llama on the CPU (said so on the first
line), so the command always works; those numbers are a smoke test, not a measurement.

One configuration = a Llama-shaped ``LlamaForCausalLM`` (``--model qwen1.5b``: a ``Qwen2ForCausalLM`` of
Qwen2.5-1.5B's shape, bias on q / k / v, 2 KV heads, tied embeddings) built from a config with random weights
(nothing is downloaded), bf16, sdpa attention, batch 2 × 2048 tokens (``--batch BxT`` for another shape; the
files then end in ``_b<B>x<T>``), HF gradient checkpointing (non-reentrant),
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
    dora, qdora    DoRA (use_dora=True) on the bf16 base / on the NF4 base (QLoRA's recipe on the PEFT side)
    dora_dropout   DoRA, lora_dropout=0.05 (PEFT's dropout formula: a second base product)
    loha           LoHa r=8, alpha 16 on all linear layers but the head (rank-64 Khatri-Rao product on LoRA's paths)
    lokr           LoKr r=8, alpha 16 on all linear layers but the head (W1 ⊗ W2 applied as two small GEMMs)
    oft            OFT, blocks of 32 (Cayley-Neumann) on all linear layers but the head (x·R as one batched GEMM
                   over the blocks, in the activations' dtype)
    prompt_tuning  prompt tuning, 20 virtual tokens (PEFT's PeftModelForCausalLM forward)
    p_tuning       P-tuning, 20 virtual tokens through PEFT's default MLP prompt encoder
    prefix_tuning  prefix tuning, 20 virtual tokens (no projection), both sides WITHOUT gradient checkpointing
                   (the prefix lives in the KV cache, which checkpointed layers do not use)
    trainable_tokens  PEFT's standalone trainable tokens, 100 embedding rows (a tied head follows)
    vera           VeRA r=256 on all linear layers but the head (shared projections, trained vectors)
    adalora        AdaLoRA init_r=12, target_r=8, alpha 32 on all linear layers but the head; every step calls
                   update_and_allocate after the optimizer step (both libraries), inside the budgeting phase
    lora_fused, qlora_fused      fastpeft only: + fastpeft.enable_fused_loss (loss without the logits)
    lora_offload, qlora_offload  fastpeft only: + fused loss + fastpeft.enable_activation_offload
                   (compared with PEFT's plain LoRA / QLoRA row; ``--longest``: fastpeft/bench/longest.py)
    lora_liger     LoRA + Liger-Kernel's non-adapter kernels (RoPE, RMSNorm, SwiGLU, fused linear cross
                   entropy) on both sides, when liger_kernel is importable and CUDA is there

Each row: tokens/s (batch tokens / median step time over the timed steps, after the warm-up steps),
peak allocated GiB (``torch.cuda.max_memory_allocated`` after a reset that follows building the model
and the optimizer, so it holds weights, adapter grads, optimizer states and activations), MFU against
the bf16 GEMM rate measured in the same run (8192³), the loss of the first and last step. Out-of-memory
is recorded as "oom", anything that cannot run as "skipped" with the reason, failures as "error".

Writes into --out-dir (default ``benchmarks/results/<gpu>/``): ``step_<date>[_<models>].json`` (after
every configuration, so a killed run keeps what it measured), ``.md`` (tables), ``_tokens.png`` and
``_memory.png``. An earlier run's files are never replaced: a second run on the same day writes
``step_<date>_run2.*`` (then ``_run3``...), unless ``--overwrite``. On a CPU run the peak is the process's
peak RSS, and the report labels it as host RSS (no PEFT-vs-fastpeft memory ratio).

Modules: ``plan`` (shapes, methods, targets, ``Spec``, the FLOP / memory model), ``environment`` (versions,
device, GEMM rate), ``harness`` (build and time one configuration: ``prepare``, ``run_config``),
``profiling`` (``profile_step``: where one step's time goes), ``runner`` (``run``: the whole plan, progress,
JSON after every configuration), ``reporting`` (markdown tables, JSON, PNG plots, ``report`` to merge runs),
``cli`` (the options; ``__main__`` runs it). The names below are re-exported here; the reusable pieces serve
the pytest-benchmark tier under ``benchmarks/`` and ``tests/integration/test_bench.py``.
"""
from .cli import main, parse_args
from .environment import (
    device_name,
    device_slug,
    free_memory,
    gemm_tflops,
    gpu_memory_bytes,
    have,
    sync,
    versions,
)
from .harness import (
    PeakMemory,
    Prepared,
    build_base,
    liger_patched,
    llama_config,
    model_config,
    new_row,
    prepare,
    quantize_nf4,
    run_config,
    unavailable,
)
from .plan import (
    ALPHA,
    CPU_MODELS,
    DROPOUT,
    FASTPEFT_ONLY,
    IA3_FEEDFORWARD,
    IA3_TARGETS,
    IMPL_LABEL,
    MEMORY_TARGET,
    METHOD_LABEL,
    METHODS,
    MODELS,
    PRIOR_BUILD_S,
    PRIOR_PROFILE_S,
    PRIOR_STEP_S,
    QUICK_METHODS,
    RANK,
    SCHEMA,
    SEQ,
    SPEED_TARGET,
    TABLE_ORDER,
    GiB,
    Spec,
    arch_of,
    batch_shape_of,
    full_ft_estimate_bytes,
    linear_params,
    lora_dropout_of,
    make_plan,
    predict_s,
    step_flops,
    total_params,
)
from .profiling import BUCKETS, classify, profile_step
from .reporting import (
    free_stem,
    host_rss,
    markdown,
    memory_table,
    output_stem,
    profile_table,
    report,
    require_plotting,
    speed_table,
    write_json,
    write_plots,
)
from .runner import describe, run

__all__ = [
    # plan
    "FASTPEFT_ONLY", "GiB", "RANK", "ALPHA", "DROPOUT", "IA3_TARGETS", "IA3_FEEDFORWARD", "SCHEMA", "MODELS", "SEQ", "METHODS",
    "TABLE_ORDER", "QUICK_METHODS", "METHOD_LABEL", "IMPL_LABEL", "SPEED_TARGET", "MEMORY_TARGET",
    "PRIOR_STEP_S", "PRIOR_BUILD_S", "PRIOR_PROFILE_S", "Spec", "lora_dropout_of", "make_plan", "predict_s",
    "linear_params", "total_params", "step_flops", "full_ft_estimate_bytes", "CPU_MODELS", "arch_of", "batch_shape_of",
    # environment
    "have", "versions", "device_name", "device_slug", "gpu_memory_bytes", "gemm_tflops", "free_memory", "sync",
    # harness
    "llama_config", "model_config", "build_base", "quantize_nf4", "liger_patched", "unavailable", "Prepared", "prepare",
    "PeakMemory", "new_row", "run_config",
    # profiling
    "BUCKETS", "classify", "profile_step",
    # runner
    "run", "describe",
    # reporting
    "output_stem", "free_stem", "host_rss", "write_json", "memory_table", "speed_table", "profile_table", "markdown", "require_plotting",
    "write_plots", "report",
    # cli
    "parse_args", "main",
]

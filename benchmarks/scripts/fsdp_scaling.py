"""FSDP2 scaling benchmark: fastpeft vs PEFT, LoRA / QLoRA, Llama shapes, in one torchrun launch.

    # 1 GPU first: its JSON is the baseline (scaling efficiency 1.0 by definition; it still runs FSDP2, on a
    # 1-rank mesh, so the two runs differ only in the number of GPUs)
    torchrun --standalone --nproc-per-node 1 benchmarks/scripts/fsdp_scaling.py --model 8b --out 8b_x1.json
    # N GPUs: efficiency = (mean tokens/s per GPU at N) / (tokens/s per GPU at 1), per (method, impl)
    torchrun --standalone --nproc-per-node 2 benchmarks/scripts/fsdp_scaling.py --model 8b --baseline 8b_x1.json \
        --out 8b_x2.json
    # 70B QLoRA (fewer steps: a step is ~10x an 8B step)
    torchrun --standalone --nproc-per-node 1 benchmarks/scripts/fsdp_scaling.py --model 70b --methods qlora \
        --steps 3 --warmup 1 --out 70b_x1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/scripts/fsdp_scaling.py --model 70b --methods qlora \
        --steps 3 --warmup 1 --baseline 70b_x1.json --out 70b_x2.json
    # CPU smoke test (gloo, tiny 2-layer Llama, fp32, fastpeft reference backend): tests/integration/test_fsdp_scaling.py
    FASTPEFT_BACKEND=reference torchrun --standalone --nproc-per-node 2 benchmarks/scripts/fsdp_scaling.py --model tiny \
        --steps 2

Each rank trains on its own random ``--batch-per-gpu`` x ``--seq`` batches (seeded by rank: weak scaling, the
per-GPU work stays fixed as GPUs are added; rank 0 sees the same tokens at any world size). One
configuration = (method, impl): the model is built,
patched (``fastpeft.patch`` | ``peft.get_peft_model``; r=16, alpha=32, all linear layers but the head,
dropout 0), sharded with FSDP2 (``fully_shard`` per decoder layer, then the root; on CUDA
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the fp32 adapters are all-gathered as bf16,
gradients reduced in fp32; the uint8 NF4 bytes are never cast), then trained with HF gradient checkpointing
(non-reentrant) and AdamW (foreach) over the adapter parameters. QLoRA on PEFT's side follows PEFT's recipe
(``prepare_model_for_kbit_training``), as ``fastpeft.bench`` does; fastpeft patches the same NF4 base as it is.

Weights: random, and the SAME for both impls: every floating parameter is filled from a generator seeded by
its name (PEFT's ``base_model.model.`` prefix and ``.base_layer`` removed), so fastpeft and PEFT start from
identical base weights and identical (non-zero) adapters; the loss of step 0 must agree (reported, and
checked by the CPU test within 1e-4 in fp32).

How the model is built without ever holding the full bf16 model on one device:

* LoRA (bf16 base): the model is created on the meta device, patched there, sharded there with
  ``fully_shard``, then ``to_empty(device)`` allocates only this rank's shards; each parameter is then
  generated whole on the device (one tensor at a time: at most 128256 x 8192 fp32 = 4.2 GB for the 70B
  embedding) and only this rank's shard kept (``fastpeft.distributed.shard_like``). Build peak per GPU
  ~ bf16 params / world + one full fp32 parameter (+ its shard copy). 70B LoRA: 70.6e9 params = 131 GiB of
  bf16 weights -> OOM expected on one 139 GiB H200 (recorded as "oom"); ~66 GiB of weights per GPU on 2.
* QLoRA (NF4 base): the model is created on the meta device; decoder layers are materialized one at a time
  on the device in bf16, filled, and quantized at once to NF4 + double quant (``fastpeft.quantize_nf4``,
  bitsandbytes ``Linear4bit`` modules holding the bytes bnb writes) -- that layer's bf16 weights are freed
  before the next layer is built. The whole NF4 model then sits on every GPU until ``fully_shard`` cuts it,
  after ``patch`` / ``get_peft_model``. 70B: 68.5e9 decoder-linear params -> 31.9 GiB packed + 1.0 GiB
  absmax (uint8, double quant), embeddings + head bf16 3.9 GiB, one bf16 layer 1.6 GiB + quantization
  temporaries: build peak ~ 38-40 GiB per GPU whatever the world size (PEFT side +3.9 GiB:
  ``prepare_model_for_kbit_training`` upcasts embeddings and head to fp32). So 70B QLoRA also fits one
  80 GB H100 or one H200 at --nproc-per-node 1. Sharding the NF4 bytes *before* materializing them (each
  rank quantizing only its rows) would cut the build peak to ~1/world; not done: bnb's packed weight is one
  flat [N*K/2, 1] tensor, and its FSDP dim-0 shards need not line up with the 64-value quantization blocks.

Reported per (method, impl), per rank: tokens/s (local tokens / median step time over --steps after
--warmup), step times, peak memory (CUDA ``max_memory_allocated`` since the reset after building and
sharding -> weights shards, grads, optimizer states, activations, FSDP buffers; on CPU the process's peak
RSS, a rough number), the build peak (CUDA: ``max_memory_allocated`` during the build; CPU: none) and what stays resident
before the first step (CUDA ``memory_allocated``: weight shards and adapters).
Then the mean tokens/s per GPU, the total, the max peak, the global loss of step 0 and the last step, and
``scaling_efficiency`` = mean tokens/s per GPU / the same row's tokens/s per GPU in --baseline (1.0 for a
1-process run; None when the baseline has no such row). A configuration that fails on every rank alike
(e.g. OOM while building) is recorded with its status and the run goes on; a failure on only some ranks
can leave the others waiting in a collective until --timeout-min (NCCL's watchdog then ends the job).

Run on one GPU (H100 2026-11-24, H200 session 20: NCCL on a 1-rank mesh, the bf16 MixedPrecisionPolicy, the
meta-device build, fastpeft's and bnb's CUDA kernels under FSDP2; docs/distributed.md) and on CPU with gloo (1 and
2 processes, the tiny model, tests/integration/test_fsdp_scaling.py). Not run: 2+ GPUs (scaling efficiency), 70B
(the build estimates above are from shapes, not measurements; keep one command inside the device's 10 minutes).
"""
from __future__ import annotations

import os

# Required on the lent multi-GPU machines (NVLink multicast off); set before torch.distributed initializes.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo's fastpeft
import fastpeft  # noqa: E402
from fastpeft import bench, settings  # noqa: E402
from fastpeft.bench import GiB, PeakMemory, free_memory, versions  # noqa: E402
from fastpeft.bench import sync as _sync  # noqa: E402
from fastpeft.distributed import is_sharded, prepare_fsdp2, shard_like  # noqa: E402

SCHEMA = "fastpeft.bench.fsdp_scaling/1"
MODELS: Dict[str, Dict[str, Any]] = dict(bench.MODELS)
# tiny: intermediate 192 (bench's 176) -- a multiple of the NF4 blocksize, because bitsandbytes 0.50's CPU
# dequantize mis-scales in_features that are multiples of 16 but not of 64 (README, QLoRA), which would make
# PEFT + bnb differ from fastpeft on the CPU smoke test for a reason that is not ours.
MODELS["tiny"] = dict(bench.MODELS["tiny"], intermediate_size=192)
MODELS["70b"] = dict(name="Llama-3.1-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
METHODS = ["lora", "qlora", "dora"]  # dora: LoRA with use_dora=True on the bf16 base (built as lora)
IMPLS = ["fastpeft", "peft"]
INIT_STD = 0.02


# -- model -----------------------------------------------------------------------------------------------
def llama_config(model: str, seq: int):
    import transformers

    shape = {k: v for k, v in MODELS[model].items() if k != "name"}
    return transformers.LlamaConfig(max_position_embeddings=max(seq, 2048), use_cache=False, **shape)


def _key(name: str) -> str:
    """A parameter's name as the unpatched model calls it: the same key (and values) for fastpeft and PEFT."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def init_by_name(module: nn.Module, device: torch.device, seed: int, prefix: str = "") -> None:
    """Fill every floating parameter from a generator seeded by (seed, its name): norms ~ 1 + noise, the rest
    N(0, INIT_STD) (lora_B too, so the adapter changes the loss). Sharded parameters: the whole tensor is
    generated on ``device`` and this rank keeps its shard (same values on any world size)."""
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue  # packed NF4 bytes
        key = _key(prefix + name)
        g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**62)
        full = torch.randn(tuple(p.shape), generator=g, device=device, dtype=torch.float32) * INIT_STD
        if "norm" in key.rsplit(".", 2)[-2]:
            full += 1.0
        if is_sharded(p):
            p.to_local().copy_(shard_like(p, full).to_local())
        else:
            p.copy_(full)
        del full


@torch.no_grad()
def _reset_rotary(model: nn.Module, cfg, device) -> None:
    """Rotary buffers (inv_freq) are computed, not learned: rebuild them after ``to_empty``."""
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and not isinstance(getattr(mod, "inv_freq"), nn.Parameter):
            with torch.device(device):  # the constructor's signature differs across transformers versions
                fresh = type(mod)(config=cfg)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(mod, bname, buf)
            for attr in ("attention_scaling",):
                if hasattr(fresh, attr):
                    setattr(mod, attr, getattr(fresh, attr))


def _meta_model(model: str, seq: int, dtype: torch.dtype):
    import transformers

    cfg = llama_config(model, seq)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    m.config.use_cache = False
    return m, cfg


def _apply_method(model: nn.Module, method: str, impl: str) -> nn.Module:
    ckpt = {"use_reentrant": False}
    if impl == "peft":
        import peft

        if method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                         gradient_checkpointing_kwargs=ckpt)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=bench.RANK, lora_alpha=bench.ALPHA, lora_dropout=0.0,
                              target_modules="all-linear", use_dora=method == "dora")
        return peft.get_peft_model(model, cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    return fastpeft.patch(model, fastpeft.LoraConfig(r=bench.RANK, lora_alpha=bench.ALPHA, lora_dropout=0.0,
                                                     target_modules="all-linear", use_dora=method == "dora"))


def _decoder_layers(model: nn.Module):
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return root.model.layers


def _shard(model: nn.Module, mesh, mp) -> None:
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in _decoder_layers(model):  # one FSDP unit per decoder layer: one gathered at a time
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def build(model_name: str, method: str, impl: str, seq: int, dtype: torch.dtype, device: torch.device, mesh, mp,
          seed: int) -> nn.Module:
    """Random-init Llama of ``model_name``, adapted by ``impl`` and sharded by FSDP2 (see the module docstring)."""
    model, cfg = _meta_model(model_name, seq, dtype)
    if method in ("lora", "dora"):
        model = _apply_method(model, method, impl).to("meta")  # fastpeft makes its adapters on CPU: meta too
        _shard(model, mesh, mp)
        model.to_empty(device=device)  # only this rank's shards are allocated
        init_by_name(model, device, seed)
        _reset_rotary(model, cfg, device)
        return model
    # qlora: decoder layers one at a time, bf16 -> NF4, then the rest; sharded after patching
    for i, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)
        init_by_name(layer, device, seed, prefix=f"model.layers.{i}.")
        fastpeft.quantize_nf4(layer, blocksize=64, double_quant=True, compute_dtype=dtype, module_type="bnb")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for mod in model.modules():
        if any(t.is_meta for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))):
            mod.to_empty(device=device, recurse=False)
    model.is_loaded_in_4bit = True  # as transformers' 4-bit loader: PEFT dispatches its bnb layers on it
    _reset_rotary(model, cfg, device)
    model = _apply_method(model, method, impl)
    init_by_name(model, device, seed)  # adapters, embeddings, norms, head (decoder norms: the same values again)
    prepare_fsdp2(model)
    _shard(model, mesh, mp)
    return model


# -- one configuration -----------------------------------------------------------------------------------
def run_config(a, method: str, impl: str, device: torch.device, dtype, mesh, mp, rank: int, world: int
               ) -> Dict[str, Any]:
    """Build, warm up, time; returns this rank's measurements (status ok | oom | error)."""
    out: Dict[str, Any] = {"rank": rank, "status": "ok"}
    peak = PeakMemory(device.type)
    model = opt = None
    try:
        free_memory(device.type)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build(a.model, method, impl, a.seq, dtype, device, mesh, mp, a.seed)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        _sync(device.type)
        out["build_s"] = time.perf_counter() - t0
        out["build_peak_gib"] = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None
        # what stays allocated between steps before the first one (weight shards, adapters; no optimizer state
        # yet): separates a difference in what the model holds from one in activations / step transients
        out["resident_gib"] = torch.cuda.memory_allocated() / GiB if device.type == "cuda" else None
        out["trainable_params_local"] = sum((p.to_local() if is_sharded(p) else p).numel() for p in params)
        vocab = MODELS[a.model]["vocab_size"]
        # two batches per rank, alternated; seeded by rank, so rank 0 sees the same tokens at any world size
        gen = torch.Generator().manual_seed((a.seed + 1) * 10_007 + rank)
        b = a.batch_per_gpu
        batches = [torch.randint(0, vocab, (b, a.seq), generator=gen).to(device) for _ in range(2)]
        peak.reset()
        times, losses = [], []
        for i in range(a.warmup + a.steps):
            ids = batches[i % 2]
            _sync(device.type)
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device.type)
            dt = time.perf_counter() - t
            losses.append(loss.detach().float())
            if i >= a.warmup:
                times.append(dt)
        pk = peak.peak_bytes()
        if a.profile:  # every rank steps (FSDP2's collectives), rank 0 writes
            _profile_step(model, opt, batches[0], device, f"{a.profile}_{method}_{impl}.txt" if rank == 0 else None)
        local = torch.stack(losses)
        out["local_loss_step0"] = float(local[0])
        dist.all_reduce(local)  # global mean loss per step (equal local batch sizes)
        losses = [float(x) / world for x in local.cpu()]
        if not all(math.isfinite(x) for x in losses):
            raise FloatingPointError(f"non-finite loss: {losses}")
        med = statistics.median(times)
        out.update(tokens=b * a.seq, step_s=med, step_s_all=times, tokens_per_s=b * a.seq / med,
                   peak_gib=None if pk is None else pk / GiB, peak_kind=peak.kind,
                   loss_step0=losses[0], loss_last=losses[-1], losses=losses)
    except torch.cuda.OutOfMemoryError as e:
        out.update(status="oom", reason=f"OOM: {str(e).splitlines()[0][:300]}")
    except Exception as e:
        out.update(status="error", reason=f"{type(e).__name__}: {e}"[:400])
        print(f"[rank {rank}] {a.model} {method} {impl}: error\n{traceback.format_exc(limit=12)}", flush=True)
    finally:
        del model, opt
        free_memory(device.type)
    return out


def _profile_step(model: nn.Module, opt, ids: torch.Tensor, device: torch.device, path: Optional[str]) -> None:
    """One more step under torch.profiler (after the timed ones): the ops by device time and by host time, to
    ``path`` (--profile; None: profile, write nothing -- the other ranks, which must step too)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device.type)
    if path is None:
        return
    events = prof.key_averages()
    with open(path, "w") as f:
        if device.type == "cuda":
            f.write(events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) + "\n")


def summarize(per_rank: List[Dict[str, Any]], baseline: Optional[Dict[str, Any]], world: int) -> Dict[str, Any]:
    bad = [r for r in per_rank if r["status"] != "ok"]
    row: Dict[str, Any] = {"per_rank": per_rank}
    if bad:
        row.update(status=bad[0]["status"], reason=f"rank {bad[0]['rank']}: {bad[0].get('reason')}")
        return row
    tps = [r["tokens_per_s"] for r in per_rank]
    peaks = [r["peak_gib"] for r in per_rank if r["peak_gib"] is not None]
    row.update(status="ok", tokens_per_s_per_gpu=statistics.mean(tps), tokens_per_s_min_rank=min(tps),
               tokens_per_s_total=sum(tps), peak_gib_max=max(peaks) if peaks else None,
               build_peak_gib_max=max((r["build_peak_gib"] or 0.0) for r in per_rank) or None,
               resident_gib_max=max((r["resident_gib"] or 0.0) for r in per_rank) or None,
               loss_step0=per_rank[0]["loss_step0"], loss_last=per_rank[0]["loss_last"])
    if world == 1:
        row.update(baseline_tokens_per_s_per_gpu=row["tokens_per_s_per_gpu"], scaling_efficiency=1.0)
    elif baseline is not None and baseline.get("status") == "ok":
        base = baseline["tokens_per_s_per_gpu"]
        row.update(baseline_tokens_per_s_per_gpu=base, scaling_efficiency=row["tokens_per_s_per_gpu"] / base)
    else:
        row.update(baseline_tokens_per_s_per_gpu=None, scaling_efficiency=None)
    return row


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="tiny")
    ap.add_argument("--methods", default="lora,qlora", help=f"comma-separated from {','.join(METHODS)}")
    ap.add_argument("--impl", default="fastpeft,peft", help=f"comma-separated from {','.join(IMPLS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--batch-per-gpu", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--mp", choices=["bf16", "none"], default=None,
                    help="FSDP2 MixedPrecisionPolicy (default bf16 on CUDA, none on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fsdp_scaling.json")
    ap.add_argument("--baseline", default=None, help="JSON of an earlier --nproc-per-node 1 run of this script")
    ap.add_argument("--profile", default=None, metavar="PREFIX",
                    help="after the timed steps, profile one more step per configuration (rank 0) into "
                         "PREFIX_<method>_<impl>.txt")
    ap.add_argument("--timeout-min", type=float, default=20.0, help="process-group timeout")
    a = ap.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    a.impl = [m for m in a.impl.split(",") if m]
    for what, got, allowed in (("--methods", a.methods, METHODS), ("--impl", a.impl, IMPLS)):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            ap.error(f"{what}: {bad or 'empty'} not allowed; choose from {','.join(allowed)}")
    if a.seq is None:
        a.seq = 64 if a.model == "tiny" else 2048
    if a.steps < 1 or a.warmup < 0 or a.seq < 2 or a.batch_per_gpu < 1:
        ap.error("--steps >= 1, --warmup >= 0, --seq >= 2, --batch-per-gpu >= 1")
    return a


def _init_process_group(cuda: bool, timeout_min: float):
    if "RANK" not in os.environ:  # plain `python fsdp_scaling.py`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))


def main(argv=None) -> int:
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and a.model != "tiny":
        raise SystemExit(f"fsdp_scaling: --model {a.model} needs CUDA GPUs; on CPU use --model tiny")
    _init_process_group(cuda, a.timeout_min)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # 2 processes on a small CPU: no oversubscription
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh(device.type, (world,))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if cuda else "fp32")]
    use_mp = (a.mp or ("bf16" if cuda else "none")) == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_mp else None
    import transformers

    transformers.logging.set_verbosity_error()
    baseline_rows: Dict[tuple, Dict[str, Any]] = {}
    if a.baseline:
        with open(a.baseline) as f:
            base = json.load(f)
        if base.get("world_size") != 1 or base["settings"]["model"] != a.model:
            raise SystemExit(f"fsdp_scaling: --baseline {a.baseline} is world_size {base.get('world_size')}, model "
                             f"{base['settings']['model']}; need a 1-process run of --model {a.model}")
        for key in ("seq", "batch_per_gpu", "dtype", "mp"):
            if base["settings"].get(key) != {"seq": a.seq, "batch_per_gpu": a.batch_per_gpu,
                                             "dtype": str(dtype), "mp": use_mp}[key]:
                print(f"fsdp_scaling: warning: baseline {key} = {base['settings'].get(key)} differs from this run",
                      flush=True)
        baseline_rows = {(r["method"], r["impl"]): r for r in base["rows"]}
    info: Dict[str, Any] = {
        "schema": SCHEMA, "date": datetime.date.today().isoformat(), "world_size": world,
        "device": torch.cuda.get_device_name() if cuda else bench.device_name("cpu"),
        "backend": dist.get_backend(), "versions": versions(),
        "settings": dict(model=a.model, model_name=MODELS[a.model]["name"], seq=a.seq, batch_per_gpu=a.batch_per_gpu,
                         steps=a.steps, warmup=a.warmup, dtype=str(dtype), mp=use_mp, rank=bench.RANK,
                         lora_alpha=bench.ALPHA, lora_dropout=0.0, target_modules="all-linear", seed=a.seed,
                         fastpeft_backend=settings.get().backend,
                         gradient_checkpointing="non-reentrant", optimizer="AdamW(foreach)",
                         baseline=a.baseline),
        "rows": [],
    }
    for method in a.methods:
        for impl in a.impl:
            mine = run_config(a, method, impl, device, dtype, mesh, mp, rank, world)
            gathered: List[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            row = {"model": a.model, "method": method, "impl": impl}
            row.update(summarize(gathered, baseline_rows.get((method, impl)), world))
            info["rows"].append(row)
            if rank == 0:
                eff = row.get("scaling_efficiency")
                print(f"{a.model} {method} {impl} x{world}: {row['status']}"
                      + (f", {row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, peak {row['peak_gib_max']:.2f} GiB "
                         f"(resident {row['resident_gib_max'] or 0.0:.2f}), "
                         f"loss0 {row['loss_step0']:.6f}, efficiency {eff if eff is None else round(eff, 3)}"
                         if row["status"] == "ok" else f" ({row.get('reason')})"), flush=True)
                with open(a.out, "w") as f:  # after every configuration: a killed run keeps what it measured
                    json.dump(info, f, indent=1)
    if rank == 0:
        print(f"wrote {a.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if any(r["status"] == "error" for r in info["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())

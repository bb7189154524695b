"""transformers.Trainer on a fastpeft-patched model, launched by accelerate (FSDP2 or DDP, from the config file).

GPUs (one process per GPU, nccl; set num_processes in the yaml to your GPU count):

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_accelerate.py

CPU (2 processes, gloo; how tests/integration/test_accelerate_fsdp.py runs it). Do NOT pass ``--cpu`` to accelerate launch:
that flag selects accelerate's single-process launcher and drops FSDP altogether.

    accelerate launch --config_file examples/accelerate_fsdp.yaml --num_processes 2 \\
        examples/train_accelerate.py --report out/report.json

A tiny random Llama is built from a config (nothing is downloaded) and trained on a learnable toy task (each
sequence counts around a short cycle of tokens), so the loss visibly falls within a few steps. The adapter is written
in PEFT's format by fastpeft.save_adapter, called on every rank: under FSDP2 the adapter parameters are DTensor
shards, which it gathers before rank 0 writes. ``--report`` writes what rank 0 saw as JSON: the accelerate
distributed type, the classes FSDP2 wrapped, how many parameters are DTensors, and the per-step losses; and,
next to it (``<report>.tensors.pt``), the trained adapter parameters gathered from their shards, by name.

On CPU, accelerate (1.15) never enables FSDP: AcceleratorState promotes a run to FSDP only when its device type
is a GPU-like one (MULTI_GPU, MULTI_XPU, ...; see the ``elif self.distributed_type in [...]`` branch of
``AcceleratorState.__init__`` in accelerate/state.py), and a CPU run is MULTI_CPU, so Trainer silently falls back
to DDP. ``enable_fsdp_on_cpu`` below flips that one decision (only when accelerate launch asked for FSDP and
there is no GPU); everything after it is accelerate's own FSDP2 path (``fsdp2_prepare_model`` -> ``fully_shard``
per decoder layer, embedding, tail and root). PyTorch's FSDP2 itself runs on CPU over gloo.
"""
import argparse
import json
import os

import torch
import transformers

import fastpeft
import fastpeft.distributed
from _quiet import silence_third_party_noise

silence_third_party_noise()  # third-party FutureWarnings / log lines, not fastpeft's (examples/_quiet.py)


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count around a cycle of ``period`` tokens from a random start (``5, 6, 7, 1, 2, ...``): the
    adapter first learns which few tokens occur, then the successor rule, so the loss falls within a few steps."""

    def __init__(self, n=64, seq=32, period=16):
        start = torch.randint(0, period, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(seq)) % period + 1  # token 0 never occurs

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def enable_fsdp_on_cpu(trainer):
    """Give a CPU run the FSDP that ``accelerate launch`` asked for (accelerate leaves a CPU run MULTI_CPU: DDP).

    Call right after building the Trainer, before ``train()``. A no-op on GPUs and without a launcher asking for
    FSDP (ACCELERATE_USE_FSDP). Returns whether it switched the run to FSDP.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set from the yaml
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # what AcceleratorState.__init__ does for a GPU run, on both shared states
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True  # Trainer reads this once, when it builds its Accelerator
    return True


class LossLog(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def fsdp_summary(model):
    """Which module classes FSDP2 wrapped (fully_shard swaps in an ``FSDP<Class>`` subclass) and the parameter
    counts, total and DTensor (sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()
    wrapped = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})
    params = list(model.named_parameters())
    sharded = [n for n, p in params if fastpeft.distributed.is_sharded(p)]
    trainable = [n for n, p in params if p.requires_grad]
    return {
        "fsdp_wrapped_classes": wrapped,
        "n_params": len(params),
        "n_dtensor_params": len(sharded),
        "n_trainable_params": len(trainable),
        "n_trainable_dtensor_params": len(set(trainable) & set(sharded)),
    }


def tiny_llama(layers=2, seed=0):
    """The random base model (same seed, same weights: tests rebuild it to load the saved adapter with PEFT)."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=136,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="out/accelerate_adapter")
    ap.add_argument("--report", default=None, help="write a JSON summary (rank 0) to this path")
    args = ap.parse_args()
    model = tiny_llama(args.layers)
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    targs = transformers.TrainingArguments(
        output_dir=args.out + "_trainer", per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    log = LossLog()
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=CountingTokens(), callbacks=[log])
    switched = enable_fsdp_on_cpu(trainer)
    trainer.train()
    summary = fsdp_summary(trainer.model)  # after train(): the model accelerate prepared
    fastpeft.save_adapter(trainer.model, args.out)  # every rank: gathers DTensor shards, rank 0 writes
    if args.report:  # the trained adapter as the model holds it, gathered here independently of save_adapter
        trained = {n: fastpeft.distributed.full_tensor(p.detach()).cpu()  # a collective: every rank calls it
                   for n, p in trainer.model.named_parameters() if p.requires_grad}
    if trainer.is_world_process_zero():
        report = {
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
            "cpu_fsdp_enabled_by_script": switched,
            "wrapper": type(trainer.model_wrapped).__name__,
            **summary,
            "losses": log.losses,
            "adapter_dir": os.path.abspath(args.out),
            "tensors": os.path.abspath(args.report) + ".tensors.pt" if args.report else None,
        }
        print("train_accelerate:", json.dumps(report), flush=True)
        if args.report:
            torch.save(trained, args.report + ".tensors.pt")
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Train a LoRA adapter with DistributedDataParallel and save it in PEFT's format.

    torchrun --nproc-per-node 2 examples/train_ddp.py        # GPUs (nccl), or CPU (gloo) when there is no CUDA

A tiny random Llama is built from a config (nothing is downloaded). DDP all-reduces the adapter gradients
only (the frozen base has none); rank 0 saves the adapter.
"""
import argparse
import os

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP

import fastpeft
from _quiet import silence_third_party_noise

silence_third_party_noise()  # third-party FutureWarnings / log lines, not fastpeft's (examples/_quiet.py)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="out/ddp_adapter")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # same base and adapter init on every rank (DDP also broadcasts rank 0's at wrap time)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                      target_modules="all-linear"))
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.randint(1, 512, (args.steps, 2 * world, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1234)  # the same on every rank: fastpeft folds the rank into the dropout seed
    ddp.train()
    for step in range(args.steps):
        ids = data[step, 2 * rank: 2 * rank + 2].to(device)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f} (rank 0's slice)", flush=True)
    if rank == 0:  # unsharded model: one writer is enough
        fastpeft.save_adapter(model, args.out)
        print("saved", sorted(os.listdir(args.out)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

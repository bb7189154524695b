"""Train a LoRA adapter with FSDP2 (torch.distributed.fsdp.fully_shard) and save it in PEFT's format.

    torchrun --nproc-per-node 2 examples/train_fsdp.py                 # GPUs (nccl) or CPU (gloo) if no CUDA
    torchrun --nproc-per-node 2 examples/train_fsdp.py --qlora         # NF4 base (bitsandbytes) sharded too

A tiny random Llama is built from a config (nothing is downloaded); pass --hidden/--layers for bigger shapes.
Each rank trains on its own slice of every global batch; the adapter is gathered and written by rank 0.
"""
import argparse
import os

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastpeft
from fastpeft.distributed import prepare_fsdp2
from _quiet import silence_third_party_noise

silence_third_party_noise()  # third-party FutureWarnings / log lines, not fastpeft's (examples/_quiet.py)


def tiny_llama(hidden, layers, qlora, device):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 2 + 8,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # the same base weights on every rank
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if qlora:
        import bitsandbytes as bnb

        head = model.get_output_embeddings()
        for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         module=q)
            q.support_avx512bf16_for_cpu = False  # keep bnb's standard layout on CPU
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model.to(device)  # bnb quantizes when a Params4bit is moved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--out", default="out/fsdp_adapter")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = tiny_llama(args.hidden, args.layers, args.qlora, device)
    cfg = fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    model = fastpeft.patch(model, cfg)
    prepare_fsdp2(model)  # keeps bitsandbytes quant states where fastpeft finds them once FSDP2 shards the weights
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers:  # one FSDP unit per decoder layer: only one is gathered at a time
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(1, 512, (args.steps, 2 * world, 32), generator=gen)  # global batches
    torch.manual_seed(1234)  # the same on every rank: fastpeft folds the rank into the dropout seed
    model.train()
    for step in range(args.steps):
        ids = data[step, 2 * rank: 2 * rank + 2].to(device)  # this rank's slice
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        if rank == 0:
            print(f"step {step} loss {avg.item() / world:.4f}", flush=True)
    fastpeft.save_adapter(model, args.out)  # every rank calls it: gathers the shards, rank 0 writes
    if rank == 0:
        print("saved", sorted(os.listdir(args.out)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

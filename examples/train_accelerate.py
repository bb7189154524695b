"""transformers.Trainer on a fastpeft-patched model, launched by accelerate (DDP or FSDP2 from the config file).

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_accelerate.py
    accelerate launch --config_file examples/accelerate_fsdp.yaml --cpu examples/train_accelerate.py  # CPU, gloo

A tiny random Llama is built from a config (nothing is downloaded). The adapter is written in PEFT's format by
fastpeft.save_adapter (called on every rank: with FSDP the shards are gathered and rank 0 writes).
"""
import argparse

import torch
import transformers

import fastpeft
import fastpeft.distributed


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32, vocab=512):
        self.ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="out/accelerate_adapter")
    args = ap.parse_args()
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    targs = transformers.TrainingArguments(
        output_dir=args.out + "_trainer", per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=args.steps, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=RandomTokens())
    trainer.train()
    fastpeft.save_adapter(trainer.model, args.out)
    if trainer.is_world_process_zero():
        sharded = any(fastpeft.distributed.is_sharded(p) for p in trainer.model.parameters())
        print(f"saved adapter to {args.out} (world size {trainer.args.world_size}, FSDP2-sharded: {sharded}, "
              f"wrapper: {type(trainer.model_wrapped).__name__})",
              flush=True)


if __name__ == "__main__":
    main()

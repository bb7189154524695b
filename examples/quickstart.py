"""Patch a tiny Llama with fastpeft LoRA, train 20 steps, save, reload the adapter in PEFT, compare.

    python examples/quickstart.py [--steps 20] [--out /tmp/fastpeft-quickstart]

Runs on CPU in a few seconds (a random 2-layer model built from a config: nothing is downloaded); on a
GPU it uses the Triton kernels where they exist. Exits non-zero if PEFT's outputs differ from ours.
"""
import argparse
import copy
import sys

import torch
import transformers

import fastpeft
from _quiet import silence_third_party_noise

silence_third_party_noise()  # third-party FutureWarnings / log lines, not fastpeft's (examples/_quiet.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="/tmp/fastpeft-quickstart")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config).to(device)
    pristine = copy.deepcopy(base)  # PEFT will load the adapter onto an untouched copy

    model = fastpeft.patch(base, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    fastpeft.print_trainable_parameters(model)

    data = torch.randint(0, 128, (8, 32), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    fastpeft.save_adapter(model, args.out)
    print(f"saved adapter to {args.out}")

    try:
        import peft
    except ImportError:
        print("peft is not installed: skipping the PEFT reload check")
        return 0
    reloaded = peft.PeftModel.from_pretrained(pristine, args.out).eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=data).logits
        theirs = reloaded(input_ids=data).logits
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"PEFT reload: relative difference of logits = {rel:.2e}")
    return 0 if rel <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())

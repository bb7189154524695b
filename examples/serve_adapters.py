"""Serve several LoRA adapters from one base: a mixed batch (one adapter per prompt), then a hot-swap.

    python examples/serve_adapters.py [--adapters 3] [--dir /tmp/fastpeft-serve] [--new-tokens 8]

Builds a tiny random Llama (nothing is downloaded), saves N adapters in PEFT's format into --dir (stand-ins for
adapters trained elsewhere), loads them all onto one base, answers one batch whose rows each name their adapter
(or "__base__") with ``generate(..., adapter_names=...)``, checks every row against running its adapter alone,
then hot-swaps new values into one adapter in place (``fastpeft.hotswap_adapter``). Exits non-zero on a mismatch.
Runs on CPU in seconds; on a GPU the adapted layers use fastpeft's kernels.
"""
import argparse
import os
import sys

import torch
import transformers

import fastpeft
from _quiet import silence_third_party_noise

silence_third_party_noise()


def make_adapters(base_config, folder, n):
    """N adapters with different ranks and random weights, saved as PEFT would save them."""
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = transformers.LlamaForCausalLM(base_config)
        cfg = fastpeft.LoraConfig(r=4 * (i + 1), lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False)
        model = fastpeft.patch(model, cfg)
        path = os.path.join(folder, f"task{i}")
        fastpeft.save_adapter(model, path)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/fastpeft-serve")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    paths = make_adapters(config, args.dir, args.adapters)

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    names = [f"task{i}" for i in range(args.adapters)]
    for name, path in zip(names, paths):
        fastpeft.load_adapter(model, path, adapter_name=name)  # the first call patches the model
    batch_names = names + ["__base__"]
    prompts = torch.randint(1, 128, (len(batch_names), 6), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=batch_names, **kw)
        ok = True
        for row, name in enumerate(batch_names):  # the same tokens as each adapter alone
            one = {**kw, "attention_mask": kw["attention_mask"][row:row + 1]}
            if name == "__base__":
                with fastpeft.disable_adapter(model):
                    alone = model.generate(input_ids=prompts[row:row + 1], **one)
            else:
                fastpeft.set_adapter(model, name)
                alone = model.generate(input_ids=prompts[row:row + 1], **one)
            same = torch.equal(alone[0], mixed[row])
            ok &= same
            print(f"row {row} ({name:8s}): {mixed[row, prompts.shape[1]:].tolist()}  alone: "
                  f"{'same' if same else 'DIFFERENT'}")
        # hot-swap: the values of task0 (rank 4) into the largest-rank adapter, in place (zero-padded rank,
        # scaling folded into B): afterwards it computes what task0 computes
        fastpeft.hotswap_adapter(model, paths[0], adapter_name=names[-1])
        fastpeft.set_adapter(model, names[0])
        want = model(input_ids=prompts).logits
        fastpeft.set_adapter(model, names[-1])
        got = model(input_ids=prompts).logits
        swap_ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        print(f"hot-swapped {paths[0]} into {names[-1]!r}: outputs {'match' if swap_ok else 'DIFFER'}")
    return 0 if (ok and swap_ok) else 1


if __name__ == "__main__":
    sys.exit(main())

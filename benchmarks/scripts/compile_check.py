"""torch.compile check: a patched Llama-shaped model trains compiled with the same losses as eager; step times.

    python benchmarks/scripts/compile_check.py                       # GPU: bf16, Llama-3.2-1B-like shape (4 layers)
    python benchmarks/scripts/compile_check.py --tiny --backend aot_eager   # CPU smoke run (fastpeft backend triton
                                                                    # unless FASTPEFT_BACKEND says otherwise,
                                                                    # TRITON_INTERPRET=1 set automatically)
    python benchmarks/scripts/compile_check.py --qlora               # the same on an NF4 (bnb Linear4bit) base
    python benchmarks/scripts/compile_check.py --host-overhead       # host time per call: custom op vs autograd.Function

Prints one JSON object (and writes it with --out): per-step losses eager / compiled, their max relative
difference, median step time eager / compiled (steps after the first two, which include compilation), the
number of graph breaks and which fastpeft path ran. Dropout is 0 so eager and compiled losses are comparable
(under torch.compile the dropout seeds come from the compiler's RNG, so masks differ from eager ones).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's fastpeft
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device, dtype):
    import transformers

    import fastpeft

    if args.tiny:
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    else:  # Llama-3.2-1B widths, fewer layers (random init; nothing downloaded)
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                                       attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    if args.qlora:  # NF4 + double quant base (bitsandbytes Linear4bit modules), as a QLoRA user loads it
        fastpeft.quantize_nf4(model, blocksize=64, double_quant=True, compute_dtype=dtype, module_type="bnb")
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                      target_modules="all-linear", init_lora_weights=False))
    return model, cfg


def train(model, ids, steps, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, times = [], []
    model.train()
    for step in range(steps):
        torch.manual_seed(1000 + step)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, times


def count_graph_breaks(model, ids, backend):
    import torch._dynamo as dynamo

    dynamo.reset()
    explanation = dynamo.explain(model)(input_ids=ids, labels=ids)
    return explanation.graph_break_count, [str(b.reason)[:200] for b in explanation.break_reasons][:10]


def compile_check(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Triton's own switch, read when fastpeft defines its kernels: set before the first import of fastpeft
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastpeft import settings

    backend = settings.get().backend
    if device.type == "cpu" and backend == "auto":
        backend = "triton"  # the kernels (interpreted), not the reference path; FASTPEFT_BACKEND=reference stays
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with settings.override(backend=backend):  # each layer takes the backend when it is built
        model, cfg = build(args, device, dtype)
    compiled_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    eager_losses, eager_times = train(model, ids, args.steps, device)
    breaks, reasons = count_graph_breaks(compiled_model, ids, args.backend)
    torch._dynamo.reset()
    compiled_model.forward = torch.compile(compiled_model.forward, backend=args.backend)
    comp_losses, comp_times = train(compiled_model, ids, args.steps, device)
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, comp_losses))
    layer = compiled_model.model.layers[0].self_attn.q_proj
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": str(dtype),
        "shape": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
                  "batch": args.batch, "seq": args.seq},
        "backend": args.backend,
        "qlora": bool(args.qlora),
        "fastpeft_backend": layer.backend,
        "dropout": args.dropout,
        "eager_losses": eager_losses,
        "compiled_losses": comp_losses,
        "max_rel_loss_diff": rel,
        "graph_breaks": breaks,
        "graph_break_reasons": reasons,
        "eager_step_ms_median": 1e3 * statistics.median(eager_times[2:] or eager_times),
        "compiled_step_ms_median": 1e3 * statistics.median(comp_times[2:] or comp_times),
        "compiled_first_step_s": comp_times[0],
    }
    return out


def host_overhead(args):
    """Per-call host time (forward + backward) of the custom-op path vs the autograd.Function path, eager.

    The kernels are replaced by stubs returning preallocated tensors, so only Python / dispatcher work is
    timed (tiny CPU tensors; no GPU needed)."""
    os.environ["TRITON_INTERPRET"] = "1"  # triton_ok(cpu tensor) -> the kernel paths are taken (stubbed)
    from fastpeft.ops.kernels import custom_ops as C
    from fastpeft.ops.kernels import lora as L

    M, K, N, R = 8, 16, 16, 4
    x = torch.randn(M, K, requires_grad=True)
    w, A, B = torch.randn(N, K), torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    y_, s_ = torch.randn(M, N), torch.randn(M, R)
    grads = (torch.randn(M, K), None, None, torch.randn(R, K), torch.randn(N, R))

    def fwd_stub(*a, **k):
        return y_.clone(), s_.clone()

    def bwd_stub(*a, **k):
        return grads

    L.lora_forward_2d, real_f = fwd_stub, L.lora_forward_2d
    L.lora_backward_2d, real_b = bwd_stub, L.lora_backward_2d
    try:
        def via_function():
            L.lora_linear(x, w, None, A, B, 2.0, 0.0, None).sum().backward()

        def via_op():
            y2, _ = C.lora_fwd(x, w, None, A, B, 2.0, 0.0, None)
            y2.sum().backward()

        def via_plain():  # what any Python op costs: a sum + backward with no fastpeft code
            (x * 1.0).sum().backward()

        out = {}
        for name, fn in (("autograd_function", via_function), ("custom_op", via_op), ("baseline_mul_sum", via_plain)):
            for _ in range(200):
                fn()
            runs = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                runs.append((time.perf_counter() - t0) / args.iters * 1e6)
            out[name + "_us_per_fwd_bwd"] = statistics.median(runs)
    finally:
        L.lora_forward_2d, L.lora_backward_2d = real_f, real_b
    out["custom_op_minus_function_us"] = out["custom_op_us_per_fwd_bwd"] - out["autograd_function_us_per_fwd_bwd"]
    out["torch"] = torch.__version__
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="2-layer 48-wide Llama (CPU smoke run)")
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base (QLoRA custom ops)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--host-overhead", action="store_true")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 16)
    result = host_overhead(args) if args.host_overhead else compile_check(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

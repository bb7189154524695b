"""ncu target for DoRA's two passes over [M, N] and its training norm (csrc/adapter_cuda.cu): the forward's output
pass (``dora_out_kernel`` up to rank 16, else ``dora_pass_kernel``: Y = g⊙(Z0 + S'·Bᵀ) + b, S'·Bᵀ on mma.sync TF32),
the backward's stream (``dora_bwd_stream_kernel``: Σ dY⊙Z0 and g⊙dY) and the norm's two kernels
(``dora_norm_parts_kernel``, ``dora_norm_finish_kernel``), one Llama-3.1-8B projection, bf16, through the operators
``fastpeft_ops.dora_fwd`` / ``dora_bwd`` called ``--launches`` times; profile a later launch (the first ones warm up
the build, the shared-memory opt-in and the caches):

    ncu -k regex:"dora_pass_kernel|dora_out_kernel" --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/scripts/ncu_dora_pass.py --shape q/o --M 4096 [--form 0]
    ncu -k regex:dora_bwd_stream --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/scripts/ncu_dora_pass.py --shape q/o --M 4096
    ncu -k regex:"dora_norm_parts|dora_norm_finish" --launch-skip 4 --launch-count 2 --set full \\
        python benchmarks/scripts/ncu_dora_pass.py --shape k/v --M 4096 --given-sq [--norm-form 128]

Session 35 measured the forward pass at 26.9 µs (q/o, 4096 rows, r = 16, the register form; the tiled kernel 35.1:
~2.5 / 1.9 TB/s over 67 MB) and the stream at 28 µs (3.6 TB/s over 101 MB) from the profiler's kernel list
(``benchmarks/results/h200/INDEX.md``); ncu finds the register form bound by instruction issue, not bytes. Session 36
measured the training norm's two kernels at 15.9 + 4.3 µs (q/o) and 8.1 + 5.4 µs (k/v). Needs a CUDA GPU and the
extension's toolchain.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's fastpeft
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from fastpeft.ops import cpp_ops  # noqa: E402

# (in_features K, out_features N) of Llama-3.1-8B's projections
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="q/o")
    parser.add_argument("--M", type=int, default=4096, help="rows of x")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--form", type=int, default=-1,
                        help="the forward pass's kernel (fastpeft_ops.set_dora_pass_form): -1 automatic (the register "
                        "form, dora_out_kernel, up to rank 16), 0 the tiled dora_pass_kernel, n > 0 the register form "
                        "with n 16-row tiles a block")
    parser.add_argument("--norm-form", type=int, default=-1,
                        help="the training norm's kernels (fastpeft_ops.set_dora_norm_form): -1 automatic (the fused "
                        "pass over W, dora_norm_parts_kernel + dora_norm_finish_kernel, where it applies), 0 the split "
                        "GEMM, n the fused pass with ranges of n columns")
    parser.add_argument("--given-sq", action="store_true",
                        help="pass ‖W‖² as the layer does (its cache), so the norm's pass does not sum it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_dora_pass.py needs a CUDA GPU")
    cpp_ops.EXTENSION.load()
    ops = torch.ops.fastpeft_ops
    ops.set_dora_pass_form(args.form)
    ops.set_dora_norm_form(args.norm_form)
    K, N = SHAPES[args.shape]
    x = torch.randn(args.M, K, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    lora_A = torch.randn(args.rank, K, device="cuda") / K**0.5
    lora_B = torch.randn(N, args.rank, device="cuda") / args.rank**0.5
    magnitude = torch.rand(N, device="cuda") + 0.5
    dy = torch.randn(args.M, N, device="cuda", dtype=torch.bfloat16)
    w_sq = weight.float().square().sum(1) if args.given_sq else None
    for _ in range(args.launches):
        _, S, Z0, g, inv_n = ops.dora_fwd(x, weight, None, lora_A, lora_B, magnitude, 2.0, w_sq, None)
        ops.dora_bwd(dy, x, S, Z0, g, inv_n, weight, lora_A, lora_B, 2.0, True, True, True, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

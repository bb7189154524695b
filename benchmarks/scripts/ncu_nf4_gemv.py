"""ncu target for the NF4 decode GEMV (csrc/nf4_gemv.cu): one Llama-3.1-8B projection, bf16, blocksize 64 with nested
absmax, no LoRA, launched four times through ``nf4_lora_gemv_cuda``; profile the third launch (the first two warm up
the build, the code tables and the caches):

    ncu -k regex:nf4_mma_gemv --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/scripts/ncu_nf4_gemv.py --shape gate/up --M 1 --variant 2

``--variant`` is ``nf4_gemv.set_kernel_variant``'s form (2, the default; 0 the original; 1 its lean addressing; 3
the code-pair table) and ``--k-split`` ``set_k_split``'s value (0, the default: chosen per call). Sessions 30, 32 and
33 profiled gate/up at M = 1 this way (``benchmarks/results/h200/INDEX.md``). Needs a CUDA GPU and the extension's
toolchain.
"""
from __future__ import annotations

import argparse

import torch

from fastpeft.ops.kernels import nf4_gemv
from fastpeft.ops.nf4_format import kernel_state
from fastpeft.ops.nf4_quantize import quantize_nf4

# (in_features K, out_features N) of Llama-3.1-8B's projections
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gate/up")
    parser.add_argument("--M", type=int, default=1, help="rows of x, 1..16")
    parser.add_argument("--variant", type=int, default=2, help="set_kernel_variant's form")
    parser.add_argument("--k-split", type=int, default=0, help="set_k_split's value")
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_nf4_gemv.py needs a CUDA GPU")
    K, N = SHAPES[args.shape]
    weight = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    packed, quant_state = quantize_nf4(weight, blocksize=64, compress_statistics=True)
    state = kernel_state(quant_state, weight.device)
    x = torch.randn(args.M, K, device="cuda", dtype=torch.bfloat16)
    nf4_gemv.set_kernel_variant(args.variant)
    nf4_gemv.set_k_split(args.k_split)
    for _ in range(args.launches):
        nf4_gemv.nf4_lora_gemv_cuda(x, packed, state, None, None, None, 0.0)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

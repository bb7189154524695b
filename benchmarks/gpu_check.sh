#!/usr/bin/env bash
# One device call: GPU test suite + NF4 benchmark + compile check. Usage (repo root, on the GPU machine):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Each stage has its own time limit so one slow stage cannot eat the others; logs and JSON land in $OUT.
set -u
export PYTHONUNBUFFERED=1
(nvidia-smi -L; which nvcc; python3 -c "import torch, triton, torch.utils.cpp_extension as c; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA_HOME', c.CUDA_HOME, 'ninja', c.is_ninja_available())") > "$OUT/toolchain.txt" 2>&1
# Build the C++ / CUDA extensions once before the tests (both at once, ~90 s): xdist workers would otherwise queue
# on their build locks, and a build killed by a time limit leaves torch's lock file behind in ~/.cache/fastpeft/csrc
# (later builds then wait on it), hence the clean start.
rm -rf "${FASTPEFT_CSRC_CACHE:-$HOME/.cache/fastpeft/csrc}"
(timeout "${T_BUILD:-240}" python3 -c "from fastpeft.ops import cpp_ops; cpp_ops.EXTENSION.load()" > "$OUT/csrc_build_ops.txt" 2>&1; echo "ops build rc=$?" >> "$OUT/csrc_build_ops.txt") &
(timeout "${T_BUILD:-240}" python3 -c "from fastpeft.ops.kernels import nf4_gemv; nf4_gemv.load_extension()" > "$OUT/csrc_build.txt" 2>&1; echo "csrc build rc=$?" >> "$OUT/csrc_build.txt") &
wait
timeout "${T_TESTS:-600}" python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs -n 8 --timeout 240 --durations=15 > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -25 "$OUT/gpu_tests.txt"
timeout "${T_NF4:-400}" python3 benchmarks/scripts/bench_nf4.py --sections dequant,decode_graph,crossover_graph --out "$OUT/nf4_h100.json" > "$OUT/nf4_bench.log" 2>&1
echo "nf4 bench rc=$?"; tail -30 "$OUT/nf4_bench.log"
timeout "${T_COMPILE:-100}" python3 benchmarks/scripts/compile_check.py --out "$OUT/compile_check.json" > "$OUT/compile.log" 2>&1
echo "compile rc=$?"; tail -8 "$OUT/compile.log"

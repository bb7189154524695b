#!/usr/bin/env bash
# One device call: GPU test suite + NF4 benchmark + compile check. Usage (repo root, on the GPU machine):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Each stage has its own time limit so one slow stage cannot eat the others; logs and JSON land in $OUT.
set -u
export PYTHONUNBUFFERED=1
(nvidia-smi -L; which nvcc; python3 -c "import torch, triton, torch.utils.cpp_extension as c; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA_HOME', c.CUDA_HOME, 'ninja', c.is_ninja_available())") > "$OUT/toolchain.txt" 2>&1
timeout "${T_TESTS:-300}" python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs -n 8 --timeout 240 --durations=15 > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -25 "$OUT/gpu_tests.txt"
timeout "${T_NF4:-150}" python3 benchmarks/nf4.py --out "$OUT/nf4_h100.json" > "$OUT/nf4_bench.log" 2>&1
echo "nf4 bench rc=$?"; tail -30 "$OUT/nf4_bench.log"
timeout "${T_COMPILE:-100}" python3 benchmarks/compile_check.py --out "$OUT/compile_check.json" > "$OUT/compile.log" 2>&1
echo "compile rc=$?"; tail -8 "$OUT/compile.log"

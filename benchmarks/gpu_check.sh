#!/usr/bin/env bash
# One device call: build the extensions, then the stages named in STAGES (comma-separated, in this order):
#   smoke     the C++ operators' GPU tests (tests/ops/test_cpp_ops.py -m gpu)
#   host      benchmarks/scripts/host_overhead.py (host time per layer call, ratios to F.linear)
#   layers    benchmarks/scripts/profile_layer.py (GPU time per Llama-8B projection, fwd+bwd)
#   tests     the GPU test suite (pytest -m gpu -n 8)
#   sanitizer the C++ operators' and kernels' GPU tests under compute-sanitizer (memcheck, racecheck)
#   nf4       benchmarks/scripts/bench_nf4.py (dequant / decode / crossover, CUDA-graph timed)
#   decode    benchmarks/scripts/bench_decode_layer.py (one projection at decode sizes, CUDA-graph timed) and
#             bench_decode_compiled.py (HF generate, static cache + torch.compile vs eager; DECODE_ARGS)
#   compile   benchmarks/scripts/compile_check.py (compiled vs eager, graph breaks)
#   doratests DoRA's GPU tests (tests/model/test_dora.py, the QDoRA case of test_qlora.py) and its kernels under
#             compute-sanitizer memcheck
#   dora      DoRA layer timings (profile_layer.py: fwd+bwd at M=4096 with and without dropout; no-grad M=16/4096)
#   memtests  the memory options' GPU tests (tests/model/test_memory_gpu.py: fused loss bf16 / Liger, offload)
#   memstep   python -m fastpeft.bench --model 8b, LoRA / QLoRA plain, + fused loss, + offload (MEMSTEP_ARGS)
#   longest   python -m fastpeft.bench --longest (LONGEST_ARGS, e.g. "--caps 24 --max-seq 65536")
#   step1b    python -m fastpeft.bench --model 1b (STEP_ARGS adds options)
#   step8b    python -m fastpeft.bench --model 8b (STEP_ARGS adds options)
# Usage (repo root, on the GPU machine):  OUT=/some/dir STAGES=smoke,host,tests bash benchmarks/gpu_check.sh
# Each stage has its own time limit (T_<STAGE> seconds) so one slow stage cannot eat the others; logs and JSON
# land in $OUT, one file per stage.
set -u
export PYTHONUNBUFFERED=1
STAGES="${STAGES:-smoke,host,tests,nf4,compile}"
has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
(nvidia-smi -L; which nvcc; python3 -c "import torch, triton, transformers, peft, torch.utils.cpp_extension as c; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'CUDA_HOME', c.CUDA_HOME, 'ninja', c.is_ninja_available())"; python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)") > "$OUT/toolchain.txt" 2>&1
# Build the C++ / CUDA extensions once, both at once, before anything uses them: xdist workers would otherwise queue
# on their build locks, and a build killed by a time limit leaves torch's lock file behind (later builds then wait
# on it), hence the clean start.
rm -rf "${FASTPEFT_CSRC_CACHE:-$HOME/.cache/fastpeft/csrc}"
t0=$(date +%s)
(timeout "${T_BUILD:-300}" python3 -c "from fastpeft.ops import cpp_ops; cpp_ops.EXTENSION.load()" > "$OUT/csrc_build_ops.txt" 2>&1; echo "ops build rc=$?" >> "$OUT/csrc_build_ops.txt") &
(timeout "${T_BUILD:-300}" python3 -c "from fastpeft.ops.kernels import nf4_gemv; nf4_gemv.load_extension()" > "$OUT/csrc_build_gemv.txt" 2>&1; echo "gemv build rc=$?" >> "$OUT/csrc_build_gemv.txt") &
wait
echo "builds took $(( $(date +%s) - t0 )) s"; tail -n 3 "$OUT/csrc_build_ops.txt" "$OUT/csrc_build_gemv.txt"
if has smoke; then
  timeout "${T_SMOKE:-240}" python3 -m pytest tests/ops/test_cpp_ops.py -m gpu -q -p no:cacheprovider -x > "$OUT/smoke.txt" 2>&1
  echo "smoke rc=$?"; tail -15 "$OUT/smoke.txt"
fi
if has host; then
  timeout "${T_HOST:-180}" python3 benchmarks/scripts/host_overhead.py ${HOST_ARGS:-} --out "$OUT/host_overhead.json" > "$OUT/host_overhead.log" 2>&1
  echo "host rc=$?"; tail -40 "$OUT/host_overhead.log"
fi
if has layers; then
  timeout "${T_LAYERS:-300}" python3 benchmarks/scripts/profile_layer.py ${LAYER_ARGS:-} --out "$OUT/layers_profile.json" > "$OUT/layers_profile.log" 2>&1
  echo "layers rc=$?"; tail -40 "$OUT/layers_profile.log"
fi
if has tests; then
  timeout "${T_TESTS:-600}" python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs -n 8 --timeout 240 --durations=15 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
  tail -25 "$OUT/gpu_tests.txt"
fi
if has decode; then
  timeout "${T_DECODE:-420}" python3 benchmarks/scripts/bench_decode_layer.py --M 1 8 16 32 --out "$OUT/decode_layer.json" > "$OUT/decode_layer.log" 2>&1
  echo "decode layer rc=$?"; tail -20 "$OUT/decode_layer.log"
  timeout "${T_DECODE:-420}" python3 benchmarks/scripts/bench_decode_compiled.py ${DECODE_ARGS:---batch 1 8 --layers 8 --new-tokens 32 --repeats 5} --out "$OUT/decode_compiled.json" > "$OUT/decode_compiled.log" 2>&1
  echo "decode compiled rc=$?"; tail -12 "$OUT/decode_compiled.log"
fi
if has sanitizer; then
  # SANITIZER_TOOLS (default memcheck racecheck); cuBLAS's own kernels are excluded from racecheck (kns=nvjet: they
  # report hazards of their own, and they are not ours to fix)
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    extra=""; [ "$tool" = racecheck ] && extra="--kernel-name-exclude kns=nvjet"
    timeout "${T_SANITIZER:-300}" compute-sanitizer --tool "$tool" $extra --error-exitcode 3 python3 -m pytest \
      tests/ops/test_cpp_ops.py -k "(odd_shapes and dtype0) or bitwise_mask or (decode_path_matches_reference and dtype0) or dora_pass_tiles" \
      -q -p no:cacheprovider > "$OUT/sanitizer_$tool.txt" 2>&1
    echo "sanitizer $tool rc=$?" | tee -a "$OUT/sanitizer_$tool.txt"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.txt" | tail -3
  done
fi
if has nf4; then
  timeout "${T_NF4:-400}" python3 benchmarks/scripts/bench_nf4.py --sections dequant,decode_graph,crossover_graph --out "$OUT/nf4.json" > "$OUT/nf4_bench.log" 2>&1
  echo "nf4 bench rc=$?"; tail -30 "$OUT/nf4_bench.log"
fi
if has compile; then
  timeout "${T_COMPILE:-200}" python3 benchmarks/scripts/compile_check.py --out "$OUT/compile_check.json" > "$OUT/compile.log" 2>&1
  echo "compile rc=$?"; tail -8 "$OUT/compile.log"
fi
if has doratests; then
  timeout "${T_DORATESTS:-300}" python3 -m pytest tests/model/test_dora.py tests/model/test_qlora.py -m gpu -q \
    -p no:cacheprovider -rs -n 4 --timeout 240 -s > "$OUT/dora_gpu_tests.txt" 2>&1
  echo "dora gpu tests rc=$?" | tee -a "$OUT/dora_gpu_tests.txt"; grep -E "rel err vs fp32|passed|failed|Error" "$OUT/dora_gpu_tests.txt" | tail -40
  timeout "${T_SANITIZER:-300}" compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest \
    tests/model/test_dora.py -k "gpu_dora_kernels_odd_shapes" -q -p no:cacheprovider > "$OUT/sanitizer_dora.txt" 2>&1
  echo "sanitizer dora rc=$?" | tee -a "$OUT/sanitizer_dora.txt"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_dora.txt" | tail -3
fi
if has dora; then
  timeout "${T_DORA:-300}" python3 benchmarks/scripts/profile_layer.py --M 4096 --methods dense fastpeft_lora \
    fastpeft_lora_triton fastpeft_dora fastpeft_lora_layer fastpeft_dora_layer peft_lora peft_dora \
    fastpeft_lora_p05 fastpeft_dora_p05 peft_dora_p05 \
    --out "$OUT/dora_layers.json" > "$OUT/dora_layers.log" 2>&1
  echo "dora layers rc=$?"; grep -E "^M=" "$OUT/dora_layers.log"
  timeout "${T_DORA:-300}" python3 benchmarks/scripts/profile_layer.py --no-grad --M 16 4096 --methods dense \
    fastpeft_lora_layer fastpeft_dora_layer peft_lora peft_dora --out "$OUT/dora_infer.json" > "$OUT/dora_infer.log" 2>&1
  echo "dora infer rc=$?"; grep -E "^M=" "$OUT/dora_infer.log"
fi
if has memtests; then
  timeout "${T_MEMTESTS:-300}" python3 -m pytest tests/model/test_memory_gpu.py \
    -q -p no:cacheprovider -rs -s \
    --timeout 240 > "$OUT/memory_gpu_tests.txt" 2>&1
  echo "memory gpu tests rc=$?" | tee -a "$OUT/memory_gpu_tests.txt"; grep -E "peak|passed|failed|Error|SKIP" "$OUT/memory_gpu_tests.txt" | tail -30
fi
if has memstep; then
  timeout "${T_MEMSTEP:-400}" python3 -m fastpeft.bench --model 8b --out-dir "$OUT" --no-plots \
    --methods lora,qlora,lora_fused,qlora_fused,lora_offload,qlora_offload ${MEMSTEP_ARGS:-} > "$OUT/memstep.log" 2>&1
  echo "memstep rc=$?"; tail -32 "$OUT/memstep.log"
fi
if has longest; then
  timeout "${T_LONGEST:-500}" python3 -m fastpeft.bench --longest --model 8b --out-dir "$OUT" ${LONGEST_ARGS:-} \
    > "$OUT/longest.log" 2>&1
  echo "longest rc=$?"; tail -30 "$OUT/longest.log"
fi
if has step1b; then
  timeout "${T_STEP1B:-400}" python3 -m fastpeft.bench --model 1b --out-dir "$OUT" --no-plots ${STEP_ARGS:-} > "$OUT/step1b.log" 2>&1
  echo "step1b rc=$?"; tail -30 "$OUT/step1b.log"
fi
if has step8b; then
  timeout "${T_STEP8B:-500}" python3 -m fastpeft.bench --model 8b --out-dir "$OUT" --no-plots ${STEP_ARGS:-} > "$OUT/step8b.log" 2>&1
  echo "step8b rc=$?"; tail -30 "$OUT/step8b.log"
fi

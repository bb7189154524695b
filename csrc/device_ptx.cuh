// Device helpers in inline PTX shared by csrc/'s CUDA kernels (adapter_cuda.cu, nf4_gemv.cu): programmatic
// dependent launch (its device side, and the host's launch configuration), the 16-bit tensor-core MMA both decode
// GEMVs use, and a streaming load. Header-only, __forceinline__: each kernel compiles them in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastpeft {
namespace device {

// Programmatic dependent launch (sm_90+): a kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may start before the kernel ahead of it in the stream has finished; this waits until that kernel (every
// prerequisite grid) has completed and its memory is visible. A no-op for a kernel launched without the attribute.
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Programmatic dependent launch (sm_90+): lets the kernel launched next in the stream with the programmatic
// serialization attribute start now. A no-op when the next kernel was launched without it.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// c += A·B on the tensor cores, mma.sync m16n8k16 with fp32 accumulators: A row-major 16x16 (a0..a3: two 16-bit
// values each), B column-major 16x8 (b0, b1), T the 16-bit type (__nv_bfloat16 or __half; sm_80+).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A 16-byte read-only load that does not allocate in L1 (a streamed operand read once, such as a GEMV's weight:
// L1 is left to what is reused).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The host side of programmatic dependent launch: a cudaLaunchKernelEx configuration whose kernel may start before
// the kernel ahead of it in the stream has finished (when `pdl`; plain stream order otherwise). The kernel must then
// call wait_for_prerequisite_grids() before it reads what that kernel writes. Not copyable: cfg points at attr.
struct PdlLaunchConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  PdlLaunchConfig(dim3 grid, dim3 block, cudaStream_t stream, bool pdl) {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
  }
  // Launch the grid as thread-block clusters of `dims` blocks (sm_90+; each grid dimension a multiple of dims')
  void set_cluster(dim3 dims) {
    cudaLaunchAttribute& a = attr[cfg.numAttrs++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = dims.x;
    a.val.clusterDim.y = dims.y;
    a.val.clusterDim.z = dims.z;
  }
  PdlLaunchConfig(const PdlLaunchConfig&) = delete;
  PdlLaunchConfig& operator=(const PdlLaunchConfig&) = delete;
};

}  // namespace device
}  // namespace fastpeft

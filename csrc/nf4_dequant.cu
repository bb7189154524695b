// fastpeft_ops::nf4_dequantize on CUDA (schema, argument checks and the CPU kernel: adapter_ops.cpp).
//
// bitsandbytes 4-bit bytes (NF4 / FP4, with or without double quant) -> the dense [N, K] weight in fp32 / fp16 /
// bf16, bit for bit the PyTorch reference (fastpeft/ops/nf4_format.py: nf4_dequantize_reference) and the Triton
// kernel (ops/kernels/nf4_dequant.py):
//   element e = byte e/2's high nibble (e even) or low nibble (e odd), q;  w[e] = round(code[q] · absmax[e / bs])
//   double quant: absmax[b] = code2[qa[b]] · absmax2[b / bs2] + offset, two fp32 roundings (no FMA), as bnb.
// The 4-bit layers' C++ operators (nf4_lora_linear, nf4_dora_linear) call it once per GEMM that reads W (forward,
// and again in the backward), then run the dense composition on the result, which nothing keeps.
// Bound: bytes. n/2 packed bytes + the absmax read, n·sizeof(out) written: 2.5 bytes per weight for 16-bit outputs,
// 147 MB for the 14336 × 4096 gate / up weight (~35 µs at the H200's ~4.2 TB/s copy rate). Each thread takes 8
// packed bytes (one 8-byte load) and writes 16 outputs (two 16-byte stores for 16-bit outputs, four for fp32); the
// 16 code values sit in shared memory, the absmax (one per thread: bs >= 16) comes through L1.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

namespace fastpeft {

// adapter_ops.cpp: the argument checks shared with the CPU kernel
void check_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                    const at::Tensor& code2, const at::Tensor& absmax2, int64_t blocksize, int64_t blocksize2,
                    bool nested, int64_t N, at::ScalarType state_dtype, int64_t K, at::ScalarType dtype);

namespace {

using at::Tensor;

constexpr int kDequantThreads = 256;

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 contiguous outputs from fp32 values, as 16-byte stores (out 16-byte aligned)
template <typename T> __device__ __forceinline__ void store16(T* out, const float (&v)[16]) {
  uint4* dst = reinterpret_cast<uint4*>(out);
  dst[0] = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  dst[1] = make_uint4(pack2<T>(v[8], v[9]), pack2<T>(v[10], v[11]), pack2<T>(v[12], v[13]), pack2<T>(v[14], v[15]));
}
template <> __device__ __forceinline__ void store16<float>(float* out, const float (&v)[16]) {
  float4* dst = reinterpret_cast<float4*>(out);
#pragma unroll
  for (int j = 0; j < 4; ++j) dst[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
}

struct Nf4Args {
  const uint8_t* packed;
  const float* absmax;     // non-nested: fp32 per block
  const uint8_t* absmax_q; // nested: uint8 codes per block
  const float* code;
  const float* code2;
  const float* absmax2;
  float offset;
  int64_t blocksize, blocksize2, n, n_bytes;
  bool nested;
};

__device__ __forceinline__ float block_absmax(const Nf4Args& a, int64_t blk) {
  if (!a.nested) return __ldg(a.absmax + blk);
  return __fadd_rn(__fmul_rn(__ldg(a.code2 + a.absmax_q[blk]), __ldg(a.absmax2 + blk / a.blocksize2)), a.offset);
}

// One thread: packed bytes [8t, 8t + 8) -> elements [16t, 16t + 16). `vector`: the launcher checked that
// blocksize % 16 == 0 and that the packed / out pointers allow 8- / 16-byte accesses; the last thread's partial chunk
// (and every chunk otherwise) takes the element loop.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads) nf4_dequant_kernel(Nf4Args a, bool vector, T* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = a.code[threadIdx.x];
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b0 = t * 8, e0 = t * 16;
  if (b0 >= a.n_bytes) return;
  if (vector && e0 + 16 <= a.n) {
    const uint2 word = __ldg(reinterpret_cast<const uint2*>(a.packed + b0));
    const float am = block_absmax(a, e0 / a.blocksize);
    float v[16];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t byte = ((j < 4 ? word.x : word.y) >> (8 * (j & 3))) & 0xFFu;
      v[2 * j] = __fmul_rn(lut[byte >> 4], am);
      v[2 * j + 1] = __fmul_rn(lut[byte & 15u], am);
    }
    store16<T>(out + e0, v);
    return;
  }
  for (int64_t e = e0; e < e0 + 16 && e < a.n; ++e) {
    const uint32_t byte = a.packed[e >> 1];
    const uint32_t q = (e & 1) ? (byte & 15u) : (byte >> 4);
    out[e] = from_float<T>(__fmul_rn(lut[q], block_absmax(a, e / a.blocksize)));
  }
}

void dequantize_into(const Tensor& packed, const Tensor& absmax, const Tensor& code, const Tensor& code2,
                     const Tensor& absmax2, double offset, int64_t blocksize, int64_t blocksize2, bool nested,
                     const Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  Nf4Args a{};
  a.packed = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  a.absmax = nested ? nullptr : absmax.data_ptr<float>();
  a.absmax_q = nested ? absmax.data_ptr<uint8_t>() : nullptr;
  a.code = code.data_ptr<float>();
  a.code2 = nested ? code2.data_ptr<float>() : nullptr;
  a.absmax2 = nested ? absmax2.data_ptr<float>() : nullptr;
  a.offset = static_cast<float>(offset);
  a.blocksize = blocksize;
  a.blocksize2 = nested ? blocksize2 : 1;
  a.nested = nested;
  a.n = n;
  a.n_bytes = (n + 1) / 2;
  const bool vector = blocksize % 16 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int64_t threads_needed = (a.n_bytes + 7) / 8;
  const int64_t blocks = (threads_needed + kDequantThreads - 1) / kDequantThreads;
  TORCH_CHECK(blocks <= 0x7FFFFFFF, "fastpeft nf4_dequantize: the weight is too large for one launch");
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (out.scalar_type()) {
    case at::kFloat:
      nf4_dequant_kernel<float><<<blocks, kDequantThreads, 0, stream>>>(a, vector, out.data_ptr<float>());
      break;
    case at::kHalf:
      nf4_dequant_kernel<__half><<<blocks, kDequantThreads, 0, stream>>>(
          a, vector, reinterpret_cast<__half*>(out.data_ptr()));
      break;
    default:
      nf4_dequant_kernel<__nv_bfloat16><<<blocks, kDequantThreads, 0, stream>>>(
          a, vector, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// W [N, K] in `dtype`: dequantized to the state's dtype and then cast (two roundings, as bnb) when the two differ
// and the state's is not fp32; else straight to `dtype` (one rounding of the fp32 product, the same bits).
Tensor nf4_dequantize_cuda(const Tensor& packed, const Tensor& absmax, const Tensor& code, const Tensor& code2,
                           const Tensor& absmax2, double offset, int64_t blocksize, int64_t blocksize2, bool nested,
                           int64_t N, at::ScalarType state_dtype, int64_t K, at::ScalarType dtype) {
  check_nf4_args(packed, absmax, code, code2, absmax2, blocksize, blocksize2, nested, N, state_dtype, K, dtype);
  c10::cuda::CUDAGuard guard(packed.device());
  const bool direct = state_dtype == dtype || state_dtype == at::kFloat;
  Tensor out = at::empty({N, K}, packed.options().dtype(direct ? dtype : state_dtype));
  dequantize_into(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, out);
  return direct ? out : out.to(dtype);
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft_ops, CUDA, m) { m.impl("nf4_dequantize", &fastpeft::nf4_dequantize_cuda); }

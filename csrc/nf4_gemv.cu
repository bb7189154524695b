// NF4 / FP4 GEMV with the LoRA shrink / expand, for decode (M <= 16 tokens), bitsandbytes' 4-bit format.
//
//   S[m, j] = sum_k x[m, k] * A[j, k]                                  (nf4_lora_shrink: fp32 [M, r])
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] + scaling * sum_j S[m, j] * B[n, j]   (nf4_gemv_lora)
//   w[n, k] = round_to_x_dtype(code[q] * absmax[(n*K + k) / blocksize])  (the value the dequantized weight holds)
//
// Bound: bytes. The weight stream is N*K/2 packed bytes + absmax; x (M*K elements) stays in L1/L2, S, A, B
// are tiny. One warp per output row n: each lane reads 16 packed bytes (32 weights, one 4-bit block since
// blocksize >= 32 and K % 32 == 0) per step with one 128-bit load, so a warp streams 512 contiguous bytes.
// The 16 code values live in shared memory (16 distinct banks: no conflicts), fp32 accumulation, warp-shuffle
// reduction, the LoRA expand in the epilogue (lanes over r).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kMaxM = 16;
constexpr int kWarps = 8;

// Primary template: a compile error (not an undefined symbol) for any other type.
template <typename T> __device__ __forceinline__ float to_f(T v) {
  static_assert(sizeof(T) == 0, "nf4_gemv: only float, at::Half and at::BFloat16 are supported");
  return 0.f;
}
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<at::Half>(at::Half v) { return __half2float(*reinterpret_cast<__half*>(&v)); }
template <> __device__ __forceinline__ float to_f<at::BFloat16>(at::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<__nv_bfloat16*>(&v));
}
// Round an fp32 weight to the compute dtype (the dense path dequantizes to that dtype before the GEMM).
// Primary template: a compile error (not an undefined symbol) for any other type.
template <typename T> __device__ __forceinline__ float round_w(float v) {
  static_assert(sizeof(T) == 0, "nf4_gemv: only float, at::Half and at::BFloat16 are supported");
  return 0.f;
}
template <> __device__ __forceinline__ float round_w<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_w<at::Half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float round_w<at::BFloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
// Primary template: a compile error (not an undefined symbol) for any other type.
template <typename T> __device__ __forceinline__ T from_f(float v) {
  static_assert(sizeof(T) == 0, "nf4_gemv: only float, at::Half and at::BFloat16 are supported");
  return {};
}
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ at::Half from_f<at::Half>(float v) { return at::Half(v); }
template <> __device__ __forceinline__ at::BFloat16 from_f<at::BFloat16>(float v) { return at::BFloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_absmax(const void* absmax, const float* code2, const float* absmax2,
                                              float offset, int64_t blk, bool nested, int bs2) {
  if (nested) {
    const uint8_t q = reinterpret_cast<const uint8_t*>(absmax)[blk];
    return __fadd_rn(__fmul_rn(code2[q], absmax2[blk / bs2]), offset);  // two roundings, like bnb
  }
  return reinterpret_cast<const float*>(absmax)[blk];
}

template <typename T>
__global__ void gemv_lora_kernel(const T* __restrict__ x, int64_t sxm, const uint8_t* __restrict__ packed,
                                 const void* __restrict__ absmax, const float* __restrict__ code,
                                 const float* __restrict__ code2, const float* __restrict__ absmax2, float offset,
                                 bool nested, int bs, int bs2, const T* __restrict__ bias,
                                 const float* __restrict__ S, const float* __restrict__ B, float scaling, int R,
                                 T* __restrict__ y, int M, int N, int K) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (n >= N) return;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.f;
  const int64_t row_bytes = K / 2;
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + n * row_bytes);
  const int chunks = K / 32;  // 16 bytes = 32 weights per chunk
  for (int c = lane; c < chunks; c += 32) {
    const uint4 v = wrow[c];
    const int64_t k0 = static_cast<int64_t>(c) * 32;
    const float a = block_absmax(absmax, code2, absmax2, offset, (n * K + k0) / bs, nested, bs2);
    float w[32];
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[i] >> (8 * b)) & 0xffu;  // little endian: byte b of the word
        w[i * 8 + b * 2] = round_w<T>(__fmul_rn(lut[byte >> 4], a));
        w[i * 8 + b * 2 + 1] = round_w<T>(__fmul_rn(lut[byte & 15u], a));
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        const T* xr = x + m * sxm + k0;
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j) s = fmaf(to_f<T>(xr[j]), w[j], s);
        acc[m] += s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      float total = warp_sum(acc[m]);
      float lora = 0.f;
      if (S != nullptr) {
        for (int j = lane; j < R; j += 32) lora += S[m * R + j] * B[n * R + j];
        lora = warp_sum(lora);
      }
      if (lane == 0) {
        float out = total + scaling * lora;
        if (bias != nullptr) out += to_f<T>(bias[n]);
        y[m * static_cast<int64_t>(N) + n] = from_f<T>(out);
      }
    }
  }
}

template <typename T>
__global__ void lora_shrink_kernel(const T* __restrict__ x, int64_t sxm, const float* __restrict__ A,
                                   float* __restrict__ S, int M, int K, int R) {
  // one block per rank row j: S[:, j] = x · A[j, :]
  const int j = blockIdx.x;
  __shared__ float part[kMaxM][32];
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const float a = A[static_cast<int64_t>(j) * K + k];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) acc[m] = fmaf(to_f<T>(x[m * sxm + k]), a, acc[m]);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) part[m][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float s = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) s += part[threadIdx.x][w];
    S[threadIdx.x * R + j] = s;
  }
}

template <typename scalar_t>
void launch_gemv(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& absmax,
                 const torch::Tensor& code, const torch::Tensor& code2, const torch::Tensor& absmax2, double offset,
                 bool nested, int64_t bs, int64_t bs2, int64_t N, const std::optional<torch::Tensor>& bias,
                 const std::optional<torch::Tensor>& A, const std::optional<torch::Tensor>& B, torch::Tensor& S,
                 int R, double scaling, torch::Tensor& y, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  if (R > 0) {
    lora_shrink_kernel<scalar_t><<<R, 256, 0, stream>>>(x.data_ptr<scalar_t>(), x.stride(0), A->data_ptr<float>(),
                                                        S.data_ptr<float>(), M, K, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const scalar_t* bptr = (bias.has_value() && bias->defined()) ? bias->data_ptr<scalar_t>() : nullptr;
  const int blocks = static_cast<int>((N + kWarps - 1) / kWarps);
  gemv_lora_kernel<scalar_t><<<blocks, kWarps * 32, 0, stream>>>(
      x.data_ptr<scalar_t>(), x.stride(0), packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(),
      code2.data_ptr<float>(), absmax2.data_ptr<float>(), static_cast<float>(offset), nested, static_cast<int>(bs),
      static_cast<int>(bs2), bptr, R > 0 ? S.data_ptr<float>() : nullptr, R > 0 ? B->data_ptr<float>() : nullptr,
      static_cast<float>(scaling), R, y.data_ptr<scalar_t>(), M, static_cast<int>(N), K);
}

}  // namespace

// y = x·dequant(W)ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ;  A, B fp32 contiguous (or undefined for no LoRA).
torch::Tensor nf4_gemv_lora(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, torch::Tensor code,
                            torch::Tensor code2, torch::Tensor absmax2, double offset, bool nested, int64_t bs,
                            int64_t bs2, int64_t N, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> A,
                            std::optional<torch::Tensor> B, double scaling) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "nf4_gemv: x must be a CUDA [M, K] tensor, rows contiguous");
  const int M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "nf4_gemv: M must be in 1..16, got ", M);
  TORCH_CHECK(K % 32 == 0, "nf4_gemv: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(bs % 32 == 0, "nf4_gemv: blocksize must be a multiple of 32, got ", bs);
  TORCH_CHECK(packed.scalar_type() == at::ScalarType::Byte && packed.is_contiguous(), "nf4_gemv: packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() >= N * K / 2, "nf4_gemv: packed too short");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0, "nf4_gemv: packed must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor S;
  int R = 0;
  if (A.has_value() && A->defined()) {
    R = A->size(0);
    TORCH_CHECK(A->scalar_type() == at::ScalarType::Float && A->is_contiguous() && A->size(1) == K, "nf4_gemv: A must be fp32 [r, K]");
    TORCH_CHECK(B.has_value() && B->scalar_type() == at::ScalarType::Float && B->is_contiguous() && B->size(0) == N && B->size(1) == R,
                "nf4_gemv: B must be fp32 [N, r]");
    S = torch::empty({M, R}, x.options().dtype(torch::kFloat32));
  }
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::ScalarType::Float || st == at::ScalarType::Half || st == at::ScalarType::BFloat16,
              "nf4_gemv: x must be float32, float16 or bfloat16, got ", st);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == st && bias->numel() == N && bias->is_contiguous(),
                "nf4_gemv: bias must be a contiguous CUDA [N] tensor in x's dtype");
  }
  // Only the three compute dtypes are instantiated (AT_DISPATCH_FLOATING_TYPES would also instantiate double,
  // for which to_f / round_w / from_f have no definition).
  switch (st) {
    case at::ScalarType::Float:
      launch_gemv<float>(x, packed, absmax, code, code2, absmax2, offset, nested, bs, bs2, N, bias, A, B, S, R,
                         scaling, y, stream);
      break;
    case at::ScalarType::Half:
      launch_gemv<at::Half>(x, packed, absmax, code, code2, absmax2, offset, nested, bs, bs2, N, bias, A, B, S, R,
                            scaling, y, stream);
      break;
    default:
      launch_gemv<at::BFloat16>(x, packed, absmax, code, code2, absmax2, offset, nested, bs, bs2, N, bias, A, B, S,
                                R, scaling, y, stream);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_gemv_lora", &nf4_gemv_lora, "NF4/FP4 GEMV + LoRA shrink/expand (decode, M <= 16)");
}

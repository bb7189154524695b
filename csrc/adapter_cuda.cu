// CUDA kernels of fastpeft_ops (schemas and the math: adapter_ops.cpp).
//
// LoRA composes cuBLAS GEMMs (through ATen) with small elementwise kernels:
//   * the big products (X·Wᵀ, dY·W) are ATen's mm / addmm in the activation dtype;
//   * the LoRA products have one fp32 operand (the adapter, S or dS) and one 16-bit operand (X or dY, exact in
//     its dtype). The fp32 side is split into a hi and a lo 16-bit part (hi = fp16/bf16(v), lo = fp16/bf16(v - hi),
//     ~16 mantissa bits together) and both ride in ONE 16-bit cuBLAS GEMM with fp32 accumulation and fp32 output
//     (aten::mm.dtype): X·[A_hi | A_lo]ᵀ -> [M, 2r], whose halves sum to X·Aᵀ. Products of two fp32-side
//     operands (S·Bᵀ, dS·A) take three parts: [S_hi, S_hi, S_lo]·[B_hi, B_lo, B_hi]ᵀ (lo·lo, ~2^-32, dropped).
//     PEFT computes these terms in fp32; this keeps ~16 bits where TF32 would keep 10.
//   * S·Bᵀ is added into Y and D⊙(dS·A) into dX by cuBLAS itself (addmm_ with beta = 1: one read + write of Y).
//   fp32 activations skip the splits (plain fp32 GEMMs: the tests' 1e-5 bar).
// Bound: the base GEMMs (2·M·N·K FLOPs each) dominate; the extra bytes are the passes over X / dY of the skinny
// GEMMs (M·K + M·N reads) and the beta = 1 read-modify-write of Y and dX. The elementwise kernels below are
// memory-bound and touch r-wide or X-sized data once.
// IA3: cuBLAS for the GEMM, scale_cols (x⊙l or Yb⊙l) and colreduce (dl = Σ_rows a⊙b, Σ_rows a, a⊙l in one pass).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "adapter_common.h"

namespace fastpeft {

int64_t lora_seed_value(const c10::optional<at::Tensor>& seed, double p, int64_t rank);
uint32_t lora_dropout_threshold(double p);
float lora_keep_scale(double p, at::ScalarType dt);

namespace {

using at::Tensor;

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A "pattern" lists the parts of a split row: bit b of lo_mask set = part b is the lo part, else hi.
struct Pattern {
  int parts;
  uint32_t lo_mask;
};
constexpr Pattern kHL{2, 0b010u};   // [hi, lo]
constexpr Pattern kHLH{3, 0b010u};  // [hi, lo, hi]
constexpr Pattern kHHL{3, 0b100u};  // [hi, hi, lo]

template <typename T>
__device__ __forceinline__ void write_parts(T* row, int64_t cols, int64_t c, float v, Pattern pat) {
  const T hi = from_f<T>(v);
  const T lo = from_f<T>(v - to_f<T>(hi));
  for (int b = 0; b < pat.parts; ++b) row[b * cols + c] = ((pat.lo_mask >> b) & 1u) ? lo : hi;
}

// dst [rows, parts*cols] (contiguous) = the parts of src [rows, cols] (fp32, any strides). Bound: bytes (tiny).
template <typename T>
__global__ void pack_split_kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                                  T* __restrict__ dst, Pattern pat) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  write_parts(dst + r * pat.parts * cols, cols, c, src[r * s0 + c * s1], pat);
}

// v = scale·(P[r, c] + P[r, C + c]) for P [R, 2C] (the two halves of a split GEMM's fp32 output); writes v to out32
// [R, C] (if given) and its parts to out_a / out_b (if given). Bound: bytes (r-wide data).
template <typename T>
__global__ void finalize_split_kernel(const float* __restrict__ P, int64_t R, int64_t C, float scale,
                                      float* __restrict__ out32, T* __restrict__ out_a, Pattern pa,
                                      T* __restrict__ out_b, Pattern pb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * C) return;
  const int64_t r = i / C, c = i - r * C;
  const float v = scale * (P[r * 2 * C + c] + P[r * 2 * C + C + c]);
  if (out32 != nullptr) out32[i] = v;
  if (out_a != nullptr) write_parts(out_a + r * pa.parts * C, C, c, v, pa);
  if (out_b != nullptr) write_parts(out_b + r * pb.parts * C, C, c, v, pb);
}

// out[o·inner + j] = P[o·stride + j] + P[o·stride + half + j]: the two halves of a split GEMM's fp32 output.
__global__ void combine_halves_kernel(const float* __restrict__ P, int64_t outer, int64_t inner, int64_t stride,
                                      int64_t half, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outer * inner) return;
  const int64_t o = i / inner, j = i - o * inner;
  out[i] = P[o * stride + j] + P[o * stride + half + j];
}

// dst [M, K] (contiguous) = D⊙src (src any strides; may be dst itself). Each thread: 8 consecutive flat elements,
// one Philox call (adapter_common.h). Kept values: dtype(float(x)·keep_scale), as the reference's x * mask.to(dtype).
// Bound: bytes, one read + one write of X.
template <typename T>
__global__ void dropout_apply_kernel(const T* src, int64_t sm, int64_t sk, T* dst, int64_t M, int64_t K,
                                     uint64_t seed, uint32_t thr, float keep_scale) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = M * K;
  const int64_t i0 = chunk * 8;
  if (i0 >= n) return;
  const uint32_t bits = keep_bits8(static_cast<uint64_t>(chunk), seed, thr);
  int64_t m = i0 / K, k = i0 - m * K;
  for (int e = 0; e < 8 && i0 + e < n; ++e) {
    const float v = to_f<T>(src[m * sm + k * sk]);
    dst[i0 + e] = ((bits >> e) & 1u) ? from_f<T>(v * keep_scale) : from_f<T>(0.0f);
    if (++k == K) {
      k = 0;
      ++m;
    }
  }
}

// out [M, N] (contiguous) = a ⊙ dtype(l) per column. Bound: bytes.
template <typename T>
__global__ void scale_cols_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1, const float* __restrict__ l,
                                  T* __restrict__ out, int64_t M, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, c = i - m * N;
  out[i] = from_f<T>(to_f<T>(a[m * sa0 + c * sa1]) * to_f<T>(from_f<T>(l[c])));
}

// Column reductions over a row range: red[n] += Σ a⊙b, sum[n] += Σ a (fp32; atomics when the rows are split over
// blocks), out = a ⊙ dtype(l) (out may be a itself: each element is read before it is written, by one thread).
// Threads of a warp take consecutive columns: coalesced. Bound: bytes, 2 reads (+1 write) of [M, N].
template <typename T>
__global__ void colreduce_kernel(const T* a, int64_t sa0, int64_t sa1, const T* __restrict__ b, int64_t sb0,
                                 int64_t sb1, const float* __restrict__ l, T* out, float* __restrict__ red,
                                 float* __restrict__ sum, int64_t M, int64_t N, int64_t rows_per_split, bool atomic) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m1 = m0 + rows_per_split < M ? m0 + rows_per_split : M;
  const float lv = to_f<T>(from_f<T>(l[c]));
  float acc = 0.0f, tot = 0.0f;
  for (int64_t m = m0; m < m1; ++m) {
    const float av = to_f<T>(a[m * sa0 + c * sa1]);
    acc += av * to_f<T>(b[m * sb0 + c * sb1]);
    tot += av;
    if (out != nullptr) out[m * N + c] = from_f<T>(av * lv);
  }
  if (atomic) {
    atomicAdd(red + c, acc);
    if (sum != nullptr) atomicAdd(sum + c, tot);
  } else {
    red[c] = acc;
    if (sum != nullptr) sum[c] = tot;
  }
}

// ------------------------------------------------------------------------------------------------ launchers
int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename F>
void dispatch_16(at::ScalarType dt, F&& f) {
  if (dt == at::kBFloat16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else if (dt == at::kHalf) {
    f(static_cast<__half*>(nullptr));
  } else {
    TORCH_CHECK(false, "fastpeft_ops: expected a float16 / bfloat16 tensor, got ", dt);
  }
}

template <typename F>
void dispatch_all(at::ScalarType dt, F&& f) {
  if (dt == at::kFloat) {
    f(static_cast<float*>(nullptr));
  } else {
    dispatch_16(dt, f);
  }
}

// [rows, parts*cols] in dt: the parts of the fp32 matrix src (any strides)
Tensor pack_split(const Tensor& src32, Pattern pat, at::ScalarType dt) {
  const int64_t rows = src32.size(0), cols = src32.size(1);
  Tensor dst = at::empty({rows, pat.parts * cols}, src32.options().dtype(dt));
  if (rows * cols == 0) return dst;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pack_split_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
        src32.data_ptr<float>(), rows, cols, src32.stride(0), src32.stride(1), reinterpret_cast<T*>(dst.data_ptr()),
        pat);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

// P [R, 2C] fp32 -> scale·(left + right) as fp32 [R, C] (if want32) and as parts pa / pb (if given)
std::tuple<Tensor, Tensor, Tensor> finalize_split(const Tensor& P, float scale, bool want32, const Pattern* pa,
                                                  const Pattern* pb, at::ScalarType dt) {
  const int64_t R = P.size(0), C = P.size(1) / 2;
  Tensor out32 = want32 ? at::empty({R, C}, P.options()) : Tensor();
  Tensor a = pa ? at::empty({R, pa->parts * C}, P.options().dtype(dt)) : Tensor();
  Tensor b = pb ? at::empty({R, pb->parts * C}, P.options().dtype(dt)) : Tensor();
  if (R * C == 0) return {out32, a, b};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    finalize_split_kernel<T><<<blocks_for(R * C), kThreads, 0, stream>>>(
        P.data_ptr<float>(), R, C, scale, want32 ? out32.data_ptr<float>() : nullptr,
        pa ? reinterpret_cast<T*>(a.data_ptr()) : nullptr, pa ? *pa : kHL,
        pb ? reinterpret_cast<T*>(b.data_ptr()) : nullptr, pb ? *pb : kHL);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out32, a, b};
}

Tensor combine_halves(const Tensor& P, bool row_halves) {
  // row_halves: P [2R, C] -> [R, C]; else P [R, 2C] -> [R, C]
  const int64_t R = row_halves ? P.size(0) / 2 : P.size(0), C = row_halves ? P.size(1) : P.size(1) / 2;
  Tensor out = at::empty({R, C}, P.options());
  if (R * C == 0) return out;
  const int64_t outer = row_halves ? 1 : R, inner = row_halves ? R * C : C;
  const int64_t stride = row_halves ? 0 : 2 * C, half = row_halves ? R * C : C;
  combine_halves_kernel<<<blocks_for(R * C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      P.data_ptr<float>(), outer, inner, stride, half, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// D⊙src into dst (a new contiguous tensor, or src itself when it is contiguous and in_place)
Tensor dropout_apply(const Tensor& src, double p, int64_t seed, bool in_place) {
  const int64_t M = src.size(0), K = src.size(1);
  TORCH_CHECK(!in_place || src.is_contiguous(), "fastpeft_ops: in-place dropout needs a contiguous tensor");
  Tensor dst = in_place ? src : at::empty({M, K}, src.options());
  if (M * K == 0) return dst;
  const uint32_t thr = lora_dropout_threshold(p);
  const float ks = lora_keep_scale(p, src.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(src.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_apply_kernel<T><<<blocks_for((M * K + 7) / 8), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(src.data_ptr()), src.stride(0), src.stride(1), reinterpret_cast<T*>(dst.data_ptr()),
        M, K, static_cast<uint64_t>(seed), thr, ks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

Tensor scale_cols(const Tensor& a, const Tensor& l32) {
  const int64_t M = a.size(0), N = a.size(1);
  Tensor out = at::empty({M, N}, a.options());
  if (M * N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(a.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    scale_cols_kernel<T><<<blocks_for(M * N), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(a.data_ptr()), a.stride(0), a.stride(1), l32.data_ptr<float>(),
        reinterpret_cast<T*>(out.data_ptr()), M, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (red, sum): red = Σ_rows a⊙b, sum = Σ_rows a (fp32 [N]); writes out = a ⊙ l (out contiguous, may be a)
std::tuple<Tensor, Tensor> colreduce(const Tensor& a, const Tensor& b, const Tensor& l32, const Tensor& out,
                                     bool need_sum) {
  const int64_t M = a.size(0), N = a.size(1);
  const int64_t col_blocks = blocks_for(N);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((M + 15) / 16, (4 * sms + col_blocks - 1) / col_blocks));
  const int64_t rows_per_split = (M + splits - 1) / std::max<int64_t>(splits, 1);
  splits = M == 0 ? 1 : (M + rows_per_split - 1) / rows_per_split;
  auto f32 = a.options().dtype(at::kFloat);
  Tensor red = splits > 1 ? at::zeros({N}, f32) : at::empty({N}, f32);
  Tensor sum = need_sum ? (splits > 1 ? at::zeros({N}, f32) : at::empty({N}, f32)) : Tensor();
  if (N == 0) return {red, sum};
  if (M == 0) {
    red.zero_();
    if (need_sum) sum.zero_();
    return {red, sum};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(a.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    colreduce_kernel<T><<<dim3(col_blocks, splits), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(a.data_ptr()), a.stride(0), a.stride(1), reinterpret_cast<const T*>(b.data_ptr()),
        b.stride(0), b.stride(1), l32.data_ptr<float>(), out.defined() ? reinterpret_cast<T*>(out.data_ptr()) : nullptr,
        red.data_ptr<float>(), need_sum ? sum.data_ptr<float>() : nullptr, M, N, rows_per_split, splits > 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {red, sum};
}

Tensor in_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// ------------------------------------------------------------------------------------------------ LoRA
std::tuple<Tensor, Tensor> lora_fwd_cuda(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                         const Tensor& A, const Tensor& B, double scaling, double p,
                                         const c10::optional<Tensor>& seed, int64_t rank) {
  TORCH_CHECK(x2.dim() == 2 && weight.dim() == 2 && weight.size(1) == x2.size(1) && A.size(1) == x2.size(1) &&
                  B.size(0) == weight.size(0) && B.size(1) == A.size(0),
              "fastpeft lora: shapes do not fit: x ", x2.sizes(), ", weight ", weight.sizes(), ", lora_A ", A.sizes(),
              ", lora_B ", B.sizes());
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastpeft lora: x must be float32, float16 or bfloat16, got ", dt);
  const Tensor w = in_dtype(weight, dt);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor xs = p > 0.0 ? dropout_apply(x2, p, lora_seed_value(seed, p, rank), false) : x2;
  const Tensor A32 = in_dtype(A, at::kFloat), B32 = in_dtype(B, at::kFloat);
  Tensor y = has_bias ? at::addmm(in_dtype(*bias, dt), x2, w.t()) : at::mm(x2, w.t());
  if (dt == at::kFloat) {
    Tensor S = at::mm(xs, A32.t()).mul_(scaling);
    y.addmm_(S, B32.t());
    return {y, S};
  }
  const Tensor A2 = pack_split(A32.t(), kHL, dt);           // [K, 2r] = [A_hiᵀ | A_loᵀ]
  const Tensor P = at::mm(xs, A2, at::kFloat);              // [M, 2r] fp32
  auto [S, S3, unused] = finalize_split(P, static_cast<float>(scaling), true, &kHHL, nullptr, dt);
  const Tensor B3 = pack_split(B32, kHLH, dt);              // [N, 3r]
  y.addmm_(S3, B3.t());                                     // + S·Bᵀ, read by cuBLAS as C (beta = 1)
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor> lora_bwd_cuda(const Tensor& dy2_in, const Tensor& x2, const Tensor& S,
                                                 const Tensor& weight, const Tensor& A, const Tensor& B,
                                                 double scaling, double p, const c10::optional<Tensor>& seed,
                                                 int64_t rank, bool need_x, bool need_A, bool need_B) {
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const Tensor dy2 = in_dtype(dy2_in, dt);
  const Tensor A32 = in_dtype(A, at::kFloat), B32 = in_dtype(B, at::kFloat);
  const int64_t seed_v = p > 0.0 ? lora_seed_value(seed, p, rank) : 0;
  auto f32 = S.options().dtype(at::kFloat);
  Tensor dx = at::empty({0}, x2.options()), dA = at::empty({0}, f32), dB = at::empty({0}, f32);
  if (!(need_x || need_A || need_B)) return {dx, dA, dB};
  if (dt == at::kFloat) {
    if (need_B) dB = at::mm(dy2.t(), S);
    Tensor dS = at::mm(dy2, B32).mul_(scaling);
    if (need_A) dA = at::mm(dS.t(), p > 0.0 ? dropout_apply(x2, p, seed_v, false) : x2);
    if (need_x) {
      Tensor z2 = at::mm(dS, A32);
      if (p > 0.0) dropout_apply(z2, p, seed_v, true);
      dx = z2.addmm_(dy2, in_dtype(weight, dt));
    }
    return {dx, dA, dB};
  }
  if (need_B) {
    const Tensor S2 = pack_split(S, kHL, dt);                                  // [M, 2r]
    dB = combine_halves(at::mm(dy2.t(), S2, at::kFloat), /*row_halves=*/false);  // [N, r]
  }
  if (need_A || need_x) {
    const Tensor B2 = pack_split(B32, kHL, dt);                                // [N, 2r]
    const Tensor P = at::mm(dy2, B2, at::kFloat);                              // [M, 2r]: s·dS = halves summed
    auto [unused, dS2, dS3] = finalize_split(P, static_cast<float>(scaling), false, need_A ? &kHL : nullptr,
                                             need_x ? &kHHL : nullptr, dt);
    if (need_A) {
      const Tensor xs = p > 0.0 ? dropout_apply(x2, p, seed_v, false) : x2;
      dA = combine_halves(at::mm(dS2.t(), xs, at::kFloat), /*row_halves=*/true);  // [r, K]
    }
    if (need_x) {
      const Tensor A3 = pack_split(A32.t(), kHLH, dt);                        // [K, 3r]
      const Tensor w = in_dtype(weight, dt);
      if (p > 0.0) {
        Tensor z2 = at::mm(dS3, A3.t());                                     // dS·A in x.dtype
        dropout_apply(z2, p, seed_v, true);
        dx = z2.addmm_(dy2, w);                                              // + dY·W (beta = 1)
      } else {
        dx = at::mm(dy2, w);
        dx.addmm_(dS3, A3.t());
      }
    }
  }
  return {dx, dA, dB};
}

// ------------------------------------------------------------------------------------------------ IA3
std::tuple<Tensor, Tensor> ia3_fwd_cuda(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                        const Tensor& l, bool feedforward) {
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const Tensor w = in_dtype(weight, dt);
  const Tensor l32 = in_dtype(l.reshape({-1}), at::kFloat).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  if (feedforward) {
    TORCH_CHECK(l32.numel() == x2.size(1), "fastpeft ia3: feedforward ia3_l must have in_features elements");
    const Tensor xl = scale_cols(x2, l32);
    Tensor y = has_bias ? at::addmm(in_dtype(*bias, dt), xl, w.t()) : at::mm(xl, w.t());
    return {y, at::empty({0}, x2.options())};
  }
  TORCH_CHECK(l32.numel() == w.size(0), "fastpeft ia3: ia3_l must have out_features elements");
  Tensor yb = has_bias ? at::addmm(in_dtype(*bias, dt), x2, w.t()) : at::mm(x2, w.t());
  return {scale_cols(yb, l32), yb};
}

std::tuple<Tensor, Tensor, Tensor> ia3_bwd_cuda(const Tensor& dy2_in, const Tensor& saved, const Tensor& weight,
                                                const Tensor& l, bool feedforward, bool need_x, bool need_b) {
  c10::cuda::CUDAGuard guard(dy2_in.device());
  const auto dt = feedforward ? saved.scalar_type() : dy2_in.scalar_type();
  const Tensor dy2 = in_dtype(dy2_in, dt);
  const Tensor w = in_dtype(weight, dt);
  const Tensor l32 = in_dtype(l.reshape({-1}), at::kFloat).contiguous();
  auto f32 = dy2.options().dtype(at::kFloat);
  Tensor dx = at::empty({0}, dy2.options()), db = at::empty({0}, f32);
  if (feedforward) {
    Tensor g = at::mm(dy2, w);                                     // dY·W
    auto [dl, unused] = colreduce(g, saved, l32, g, false);        // dl = Σ X⊙G, then G <- G⊙l in place
    if (need_x) dx = g;
    if (need_b) db = dy2.sum(0, false, at::kFloat);
    return {dx, db, dl};
  }
  Tensor dyl = need_x ? at::empty({dy2.size(0), dy2.size(1)}, dy2.options()) : Tensor();
  auto [dl, tot] = colreduce(dy2, saved, l32, dyl, need_b);
  if (need_x) dx = at::mm(dyl, w);
  if (need_b) db = tot.mul_(l32);
  return {dx, db, dl};
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft_ops, CUDA, m) {
  m.impl("lora_fwd", &fastpeft::lora_fwd_cuda);
  m.impl("lora_bwd", &fastpeft::lora_bwd_cuda);
  m.impl("ia3_fwd", &fastpeft::ia3_fwd_cuda);
  m.impl("ia3_bwd", &fastpeft::ia3_bwd_cuda);
}

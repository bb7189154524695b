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
//   * S·Bᵀ and X·Wᵀ are summed into Y, D⊙(dS·A) and dY·W into dX, by cuBLAS itself (beta = 1): where Y / dX is
//     large the adapter's term is written first and the base GEMM adds itself, reading it in its epilogue; else the
//     base product first and the adapter's skinny GEMM adds (sum_adapter_first).
//   fp32 activations skip the splits (plain fp32 GEMMs: the tests' 1e-5 bar).
// Bound: the base GEMMs (2·M·N·K FLOPs each) dominate; the extra bytes are the passes over X / dY of the skinny
// GEMMs (M·K + M·N reads) and the sums' extra passes over Y and dX (sum_adapter_first). The elementwise kernels
// below are memory-bound and touch r-wide or X-sized data once.
// IA3: cuBLAS for the GEMM, scale_cols (x⊙l or Yb⊙l) and colreduce (dl = Σ_rows a⊙b, Σ_rows a, a⊙l in one pass).
// DoRA (p = 0): cuBLAS for X·Wᵀ, LoRA's split GEMM for S', the norm from small products, dora_pass (g⊙(Z0 + S'·Bᵀ) + b)
// forward; backward a stream over dY and Z0 (Σ dY⊙Z0, g⊙dY) and LoRA's backward with g folded into B, dm's adapter
// part from its dB GEMM (see dora_fwd_cuda, dora_bwd_cuda).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>

#include "adapter_common.h"
#include "device_ptx.cuh"

namespace fastpeft {

int64_t lora_seed_value(const c10::optional<at::Tensor>& seed, double p, int64_t rank);
uint32_t lora_dropout_threshold(double p);
float lora_keep_scale(double p, at::ScalarType dt);
int64_t lora_cuda_path();
int64_t decode_fork_mode();
int64_t decode_pdl_mode();
int64_t decode_gemv_mode();
int64_t dora_pass_form();
int64_t dora_norm_form();
int64_t lora_sum_order();
void check_mixed_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& adapter_of_segment, int64_t tokens,
                      at::TensorList lora_A, at::TensorList lora_B, c10::ArrayRef<double> scales);
// LoRA with 16-bit adapters of x's dtype, no dropout (adapter_ops.cpp: ATen GEMMs, the same on every device)
bool lora_native16(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B, double p);
std::tuple<at::Tensor, at::Tensor> lora_fwd_native16(const at::Tensor& x2, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                     const at::Tensor& B, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd_native16(const at::Tensor& dy2, const at::Tensor& x2,
                                                                 const at::Tensor& S, const at::Tensor& weight,
                                                                 const at::Tensor& A, const at::Tensor& B,
                                                                 double scaling, bool need_x, bool need_A,
                                                                 bool need_B);
// grouped projections, member by member through lora_fwd / lora_bwd (adapter_ops.cpp): the CPU kernels, and the
// CUDA calls the shared composition below does not take
std::tuple<std::vector<at::Tensor>, at::Tensor> lora_group_fwd_composed(const at::Tensor& x2, at::TensorList weights,
                                                                        at::TensorList biases, at::TensorList lora_A,
                                                                        at::TensorList lora_B, double scaling);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_group_bwd_composed(
    at::TensorList dy2, const at::Tensor& x2, const at::Tensor& S, at::TensorList weights, at::TensorList lora_A,
    at::TensorList lora_B, double scaling, bool need_x, bool need_A, bool need_B);

namespace {

using at::Tensor;
using device::allow_dependents;
using device::load_stream16;
using device::mma_16816;
using device::wait_for_prerequisite_grids;

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

// v's 16-bit hi and lo parts: hi = T(v), lo = T(v - hi) (~16 mantissa bits together; every split of an fp32 operand
// into 16-bit parts here, so the products agree whichever kernel formed them)
template <typename T>
__device__ __forceinline__ void split_hi_lo(float v, T& hi, T& lo) {
  hi = from_f<T>(v);
  lo = from_f<T>(v - to_f<T>(hi));
}

template <typename T>
__device__ __forceinline__ void write_parts(T* row, int64_t cols, int64_t c, float v, Pattern pat) {
  T hi, lo;
  split_hi_lo(v, hi, lo);
  for (int b = 0; b < pat.parts; ++b) row[b * cols + c] = ((pat.lo_mask >> b) & 1u) ? lo : hi;
}

// dst [rows, parts*cols] (contiguous) = the parts of src [rows, cols] (fp32, any strides), each row times
// row_scale[r] first when given (DoRA's g⊙B, one fp32 product). Bound: bytes (tiny).
template <typename T>
__global__ void pack_split_kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                                  const float* __restrict__ row_scale, T* __restrict__ dst, Pattern pat) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  const float v = src[r * s0 + c * s1];
  write_parts(dst + r * pat.parts * cols, cols, c, row_scale != nullptr ? v * row_scale[r] : v, pat);
}

// Several pack_split_kernel jobs in one launch (PackBatch below): the split composition's packs are a few hundred
// KB each, so their cost is the launch (~25 µs of host per launch and allocation on the lent H200 host, issue 13),
// not the bytes. Job j covers global indices [end[j-1], end[j]) and writes row r of its source at
// dst + dst_off + r·dst_ld (dst_ld > parts·cols when several jobs share a region side by side: grouped projections).
constexpr int kMaxPackJobs = 12;
struct PackJob {
  const float* src;
  int64_t rows, cols, s0, s1;
  const float* row_scale;
  int64_t dst_off, dst_ld;
  Pattern pat;
};
struct PackJobs {
  PackJob job[kMaxPackJobs];
  int64_t end[kMaxPackJobs];
  int n;
};

template <typename T>
__global__ void pack_splits_kernel(const PackJobs jobs, T* __restrict__ dst) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int j = 0;
  while (j < jobs.n && i >= jobs.end[j]) ++j;
  if (j >= jobs.n) return;
  if (j > 0) i -= jobs.end[j - 1];
  const PackJob& p = jobs.job[j];
  const int64_t r = i / p.cols, c = i - r * p.cols;
  const float v = p.src[r * p.s0 + c * p.s1];
  write_parts(dst + p.dst_off + r * p.dst_ld, p.cols, c, p.row_scale != nullptr ? v * p.row_scale[r] : v, p.pat);
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

// out[o·inner + j] = P[o·stride + j] + P[o·stride + half + j]: the two halves of a split GEMM's fp32 output, times
// scale[o] after the sum when given (DoRA's g⊙(dYᵀ·S)). Several such jobs per launch (a backward's dB and dA, or
// every member's of a projection group: one launch); job j covers global indices [end[j-1], end[j]).
// dot_out (DoRA's dm): dot_out[o] += dot_scale[o]·Σ_k dot_b[o·inner + k]·(the sum before scale), by atomics (dm's
// adapter part Σ_j B[n, j]·(dYᵀ·S')[n, j] / n, over what the pass already put there).
constexpr int kMaxCombineJobs = 8;
struct CombineJob {
  const float* P;
  int64_t outer, inner, stride, half;
  const float* scale;
  float* out;
  const float* dot_b;
  const float* dot_scale;
  float* dot_out;
};
struct CombineJobs {
  CombineJob job[kMaxCombineJobs];
  int64_t end[kMaxCombineJobs];
  int n;
};

__global__ void combine_halves_kernel(const CombineJobs jobs) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int j = 0;
  while (j < jobs.n && i >= jobs.end[j]) ++j;
  if (j >= jobs.n) return;
  if (j > 0) i -= jobs.end[j - 1];
  const CombineJob& c = jobs.job[j];
  const int64_t o = i / c.inner, k = i - o * c.inner;
  const float v = c.P[o * c.stride + k] + c.P[o * c.stride + c.half + k];
  c.out[i] = c.scale != nullptr ? v * c.scale[o] : v;
  if (c.dot_out != nullptr) atomicAdd(c.dot_out + o, v * c.dot_b[i] * c.dot_scale[o]);
}

// Eight consecutive elements of row-major data as floats: one 16-byte load when `vec` (16-bit T, unit stride,
// 16-byte aligned, all 8 in range), else element by element with the stride, zeros past `valid`.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t stride, int valid, bool vec, float v[8]) {
  if (sizeof(T) == 2 && vec && valid >= 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_f<T>(h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = e < valid ? to_f<T>(p[e * stride]) : 0.0f;
  }
}

// the bits of one element, widened to 32 bits
__device__ __forceinline__ unsigned elem_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned elem_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned elem_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// (The 16-byte store is spelled out as st.global.v4: a uint4 assembled from 16-bit elements through a T pointer was
// compiled to four 4-byte stores in some callers, dora_bwd_stream_kernel's among them.)
template <typename T>
__device__ __forceinline__ void store8(T* p, int valid, bool vec, const float v[8]) {
  if (sizeof(T) == 2 && vec && valid >= 8) {
    unsigned u[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) u[k] = elem_bits(from_f<T>(v[2 * k])) | (elem_bits(from_f<T>(v[2 * k + 1])) << 16);
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u[0]), "r"(u[1]), "r"(u[2]), "r"(u[3])
                 : "memory");
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < valid) p[e] = from_f<T>(v[e]);
  }
}

// keep bits of the 8 elements flat .. flat+7 (bit e = element flat+e kept): one Philox call when flat % 8 == 0,
// else element by element (rows whose length is not a multiple of 8)
__device__ __forceinline__ uint32_t keep_bits_at(uint64_t flat, uint64_t seed, uint32_t thr, int valid) {
  if ((flat & 7u) == 0) return keep_bits8(flat >> 3, seed, thr);
  uint32_t bits = 0;
  for (int e = 0; e < valid; ++e) {
    const uint64_t i = flat + e;
    const uint32_t w = philox_word(i >> 3, seed, static_cast<int>((i & 7u) >> 1));
    const uint32_t half = (i & 1u) ? (w >> 16) : (w & 0xFFFFu);
    bits |= static_cast<uint32_t>(half >= thr) << e;
  }
  return bits;
}

// dst [M, K] (contiguous) = D⊙src (src any strides; may be dst itself). Thread: 8 consecutive columns of one row
// (one Philox call, 16-byte loads / stores where possible); blockIdx.y strides over rows. Kept values are
// dtype(float(x)·keep_scale), as the reference's x * mask.to(dtype). Bound: bytes, one read + one write of X.
template <typename T>
__global__ void dropout_apply_kernel(const T* src, int64_t sm, int64_t sk, T* dst, int64_t M, int64_t K,
                                     uint64_t seed, uint32_t thr, float keep_scale, bool vec_src, bool vec_dst) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (k >= K) return;
  const int valid = static_cast<int>(K - k < 8 ? K - k : 8);
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    float v[8];
    load8<T>(src + m * sm + k * sk, sk, valid, vec_src, v);
    const uint32_t bits = keep_bits_at(static_cast<uint64_t>(m * K + k), seed, thr, valid);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = ((bits >> e) & 1u) ? v[e] * keep_scale : 0.0f;
    store8<T>(dst + m * K + k, valid, vec_dst, v);
  }
}

// out [M, N] (contiguous) = a ⊙ dtype(l) per column. Thread: 8 consecutive columns, rows strided by gridDim.y.
// Bound: bytes.
template <typename T>
__global__ void scale_cols_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1, const float* __restrict__ l,
                                  T* __restrict__ out, int64_t M, int64_t N, bool vec_a, bool vec_out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (c >= N) return;
  const int valid = static_cast<int>(N - c < 8 ? N - c : 8);
  float lv[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) lv[e] = e < valid ? to_f<T>(from_f<T>(l[c + e])) : 0.0f;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    float v[8];
    load8<T>(a + m * sa0 + c * sa1, sa1, valid, vec_a, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] *= lv[e];
    store8<T>(out + m * N + c, valid, vec_out, v);
  }
}

// The unsigned integer type of `Bytes` bytes: vector accesses go through it, because a struct of 16-bit floats
// (__half / __nv_bfloat16 have user-provided copy operations) is copied element by element: one 2-byte load or
// store per element, not one vector access.
template <int Bytes> struct VecBits;
template <> struct VecBits<2> { using type = unsigned short; };
template <> struct VecBits<4> { using type = unsigned int; };
template <> struct VecBits<8> { using type = uint2; };
template <> struct VecBits<16> { using type = uint4; };

// V consecutive elements of row-major data as floats: one V-wide load when `vec` (unit stride, the address aligned to
// V elements, all V in range), else element by element with the stride, zeros past `valid`.
template <typename T, int V>
__device__ __forceinline__ void load_cols(const T* p, int64_t stride, int valid, bool vec, float v[V]) {
  using Bits = typename VecBits<sizeof(T) * V>::type;
  if (vec && valid >= V) {
    const Bits raw = *reinterpret_cast<const Bits*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = to_f<T>(h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = e < valid ? to_f<T>(p[e * stride]) : 0.0f;
  }
}

// DoRA's forward pass over [M, N], with L = S·Bᵀ (S [M, R] and B [N, R] fp32, R <= RMAX) formed on the tensor cores:
//   out = dtype(g·(Z0 + L) + bias)      Z0 = X·Wᵀ as cuBLAS rounded it, L never rounded
// One rounding of the fp32 sum, as PEFT's fp32 DoRA term added to its base output. (The backward's pass over dY and
// Z0 needs no L: dora_bwd_stream_kernel.) Ranks up to 16 on sm_80+ take its register form, dora_out_kernel (below:
// the same arithmetic in the same order, so the same bits); this kernel serves ranks 17-64 and GPUs before sm_80.
// Block: 8 warps over BM rows × BN columns at a time (BM = 64, 32 at RMAX = 64; BN = 128, 64 at RMAX = 64), walking
// its rows_per_block rows tile by tile; B's tile (split into TF32 hi / lo parts), g and
// the bias are staged once. Each warp owns a 16-row × WC-column part of a tile and does all of it alone, so a tile
// needs no block barrier, only __syncwarp, and warps drift apart: one's loads overlap another's arithmetic.
//   - Z0 (double-buffered) and S reach the warp's shared memory by cp.async: the next tile's Z0 is issued
//     before this tile's product, its S right after it, so every tile's loads have a tile's work to hide behind.
//   - L comes out of mma.sync m16n8k8 TF32 in three products (hi·hi + hi·lo + lo·hi of TF32 splits, ~fp32: 3xTF32),
//     one 8-column slice at a time, and is finished in the accumulator registers: each lane reads the Z0 of its
//     own accumulator positions from shared memory, and writes the result over them in place; the warp then copies
//     its part out in 16-byte rows (coalesced). L never goes through shared memory.
// Floor: bytes (Z0 and Y once each: 4 bytes an element in 16 bits; gate/up at M = 4096: 49 µs at 4.8 TB/s); L's
// FLOPs are tiny on the tensor cores. Measured (H200, that shape, ncu): 110 µs, 41-44 % of DRAM bandwidth, 78-80 registers and 3 blocks per SM up to rank 32; shared memory /
// L1 is now the busiest unit (71-74 %: B's fragments are re-read from shared memory per 16 rows). History: S·Bᵀ on
// the FMA units, one column a thread, 0.69 ms for the two passes; wmma with block barriers and loads issued a tile
// at a time, 213 / 298 µs (latency-bound); warps on their own with cp.async, L through shared memory, 159 / 205 µs
// (instruction-bound: the wmma fragments re-split per 16 columns, L stored and re-read).
constexpr int kDoraWarps = 8;
constexpr int kDoraThreads = kDoraWarps * 32;

template <typename T, int RMAX> struct DoraTile {
  static constexpr int BM = RMAX > 32 ? 32 : 64;
  static constexpr int BN = RMAX <= 32 ? 128 : 64;
  static constexpr int WARPS_M = BM / 16, WARPS_N = kDoraWarps / WARPS_M;
  static constexpr int WC = BN / WARPS_N;  // columns a warp owns
  static constexpr int NT = WC / 8;        // its 8-column slices (one mma accumulator each)
  static constexpr int KS = RMAX / 8;      // the mma's k-steps
  static constexpr int LDB = RMAX + 4;     // floats a row of S's tile (rows 4 banks apart: no conflicts)
  // B's tile as one float4 per (row n, k-step, k-column q < 4): TF32 hi parts at k + q and k + q + 4, then their
  // lo parts, so a lane's mma operands for one k-step are one 16-byte load. Odd rows swap their two halves of 4
  // float4s (bq_slot): a quarter-warp reads rows n and n + 1, which then fall on different banks.
  static constexpr int BQ = KS * 4;        // float4s a row of B's tile
  static __device__ __forceinline__ int bq_slot(int n, int ks, int q) {
    return n * BQ + ((ks * 4 + q) ^ ((n & 1) << 2));
  }
  static constexpr int ZLD = WC * static_cast<int>(sizeof(T)) + 16;  // bytes a row of a warp's Z0 buffer
  static constexpr int B_FLOATS = 4 * BN * BQ + 2 * BN;             // B's tile, g, bias
  static constexpr int S_FLOATS = 16 * LDB;
  static constexpr int Z_FLOATS = 16 * ZLD / 4;  // one buffer
  static constexpr int WARP_FLOATS = S_FLOATS + 2 * Z_FLOATS;
  static constexpr int SMEM_BYTES = (B_FLOATS + kDoraWarps * WARP_FLOATS) * 4;
  static_assert(WARPS_M * WARPS_N == kDoraWarps && NT >= 1 && WC % 16 == 0, "warps tile the block");
  static_assert(B_FLOATS % 4 == 0 && S_FLOATS % 4 == 0 && Z_FLOATS % 4 == 0, "16-byte copies want aligned parts");
  static_assert(SMEM_BYTES <= 227 * 1024, "a block's shared memory");
};

// v rounded to TF32 (round to nearest, ties away: cvt.rna), kept in an fp32 register; v itself before sm_80
__device__ __forceinline__ float tf32_round(float v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(v));
  return __uint_as_float(u);
#else
  return v;
#endif
}

// tf32_round's value for finite v in two integer instructions (add half a TF32 unit to the magnitude's bits, clear
// the 13 bits TF32 drops: round to nearest, ties away, carries into the exponent as they should), where cvt.rna
// compiles to five with its inf / NaN select (SASS). Infinities stay; a NaN may become an infinity, and its lo part
// v - hi is then NaN, so a product that sees it is NaN either way. For the per-tile splits of dora_out_kernel.
__device__ __forceinline__ float tf32_round_finite(float v) {
  return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xFFFFE000u);
}

// d += a·b for one m16n8k8 TF32 tile (a: 4 registers of the 16×8 row-major A fragment, b: 2 of the 8×8 col-major B).
// sm_80+ only: the callers take their FMA path before (the body is empty there).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const float (&a)[4], float b0, float b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
                 "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
#endif
}

// Asynchronous global -> shared copies (cp.async, sm_80+; a plain copy before): `Bytes` of 4 or 16 from src, or
// zeros when !ok (src is then not read). 16-byte copies bypass L1 (.cg: streamed data, read once) unless `CacheL1`
// (data that other warps of the block read next); commit / wait group them as PTX does.
template <int Bytes, bool CacheL1 = false>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool ok) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16 && CacheL1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
  } else if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(Bytes), "r"(ok ? Bytes : 0)
                 : "memory");
  }
#else
  if constexpr (Bytes == 16) {
    *reinterpret_cast<uint4*>(dst) = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
  } else {
    *reinterpret_cast<unsigned*>(dst) = ok ? *reinterpret_cast<const unsigned*>(src) : 0u;
  }
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int Pending>
__device__ __forceinline__ void copy_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

// 16 bytes of consecutive elements (16 / sizeof(T) of them) into shared memory: one cp.async when `vec` (unit
// stride, 16-byte aligned, all in range), else element by element with the stride and synchronously, zeros past
// `valid` (partial column groups and strided or misaligned tensors: the slow path).
template <typename T>
__device__ __forceinline__ void stage16(void* dst, const T* p, int64_t stride, int valid, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec && valid >= V) {
    copy_async<16>(dst, p, true);
    return;
  }
  if (valid <= 0) {
    copy_async<16>(dst, p, false);
    return;
  }
  unsigned w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (e >= valid) continue;
    if constexpr (sizeof(T) == 4) {
      w[e] = elem_bits(p[e * stride]);
    } else {
      w[e / 2] |= elem_bits(p[e * stride]) << (16 * (e % 2));
    }
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// 16 bytes from shared memory to p (unit stride): one st.global.v4 when `vec` and all valid, else the first `valid`
// elements one by one
template <typename T>
__device__ __forceinline__ void unstage16(T* p, const void* src, int valid, bool vec) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  if (vec && valid >= static_cast<int>(16 / sizeof(T))) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y), "r"(raw.z), "r"(raw.w)
                 : "memory");
    return;
  }
  const T* h = reinterpret_cast<const T*>(src);
  for (int e = 0; e < valid; ++e) p[e] = h[e];
}

// Two consecutive elements of T at a 4-byte (16-bit T) or 8-byte (fp32) aligned shared address, as floats, and back
template <typename T>
__device__ __forceinline__ float2 load_pair(const char* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float2*>(p);
  } else {
    const T* h = reinterpret_cast<const T*>(p);
    return make_float2(to_f<T>(h[0]), to_f<T>(h[1]));
  }
}
template <typename T>
__device__ __forceinline__ void store_pair(char* p, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else {
    *reinterpret_cast<unsigned*>(p) = elem_bits(from_f<T>(a)) | (elem_bits(from_f<T>(b)) << 16);
  }
}

template <typename T, int RMAX>
__global__ void __launch_bounds__(kDoraThreads, RMAX <= 32 ? 3 : 2) dora_pass_kernel(
    const T* __restrict__ z0, int64_t sz0, int64_t sz1, const float* __restrict__ S, int64_t ss0, int64_t ss1,
    const float* __restrict__ B, int64_t sb0, int64_t sb1, const float* __restrict__ g,
    const float* __restrict__ g_div, const T* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int R,
    int64_t rows_per_block, bool vec_z, bool vec_o, bool vec_s) {
  using Tile = DoraTile<T, RMAX>;
  constexpr int BM = Tile::BM, BN = Tile::BN, WC = Tile::WC, LDB = Tile::LDB, ZLD = Tile::ZLD;
  constexpr int VEC = 16 / sizeof(T);  // elements in a 16-byte copy
  constexpr int GW = WC / VEC;          // 16-byte groups across a warp's row
  static_assert(GW >= 1 && 32 % GW == 0, "a warp's lanes cover whole rows of its part");
  constexpr int RPP = 32 / GW;          // rows a warp copies per pass
  constexpr int PASSES = 16 / RPP;
  extern __shared__ __align__(128) float dora_smem[];
  float4* const Bq = reinterpret_cast<float4*>(dora_smem);  // [BN][BQ] (DoraTile: layout)
  float* const gs = dora_smem + 4 * BN * Tile::BQ;          // [BN]: g
  float* const bs = gs + BN;                 // [BN]: the bias (0 without)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / Tile::WARPS_N, wn = warp % Tile::WARPS_N;
  float* const Ss = dora_smem + Tile::B_FLOATS + warp * Tile::WARP_FLOATS;  // [16][LDB]: the warp's rows of S
  char* const Zs = reinterpret_cast<char*>(Ss + Tile::S_FLOATS);            // [2][16][ZLD bytes]
  constexpr int ZBUF = Tile::Z_FLOATS * 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  // copies: a lane's 16-byte slots are rows rl + p·RPP, group gl (columns gl·VEC..) of the warp's part
  const int gl = lane % GW, rl = lane / GW;
  const int64_t c = n0 + wn * WC + gl * VEC;
  const int valid = c < N ? static_cast<int>(N - c < VEC ? N - c : VEC) : 0;
  auto stage_rows = [&](int64_t m0, int buf) {
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int64_t m = m0 + wm * 16 + rl + p * RPP;
      const int ok = m < m_end ? valid : 0;
      char* slot = Zs + buf * ZBUF + (rl + p * RPP) * ZLD + gl * 16;
      stage16<T>(slot, z0 + m * sz0 + c * sz1, sz1, ok, vec_z);
    }
  };
  // the warp's 16 rows of S (zeros past m_end and R): 16-byte copies when S's rows allow (vec_s: R % 4 == 0, unit
  // column stride, 16-byte aligned rows), else 4-byte ones
  auto stage_s = [&](int64_t m0) {
    if (vec_s) {
#pragma unroll
      for (int u = 0; u < 16 * RMAX / 4 / 32; ++u) {
        const int idx = lane + u * 32, rr = idx / (RMAX / 4), j = (idx - rr * (RMAX / 4)) * 4;
        const int64_t m = m0 + wm * 16 + rr;
        const bool ok = m < m_end && j < R;
        copy_async<16>(Ss + rr * LDB + j, ok ? S + m * ss0 + j : S, ok);
      }
    } else {
#pragma unroll
      for (int u = 0; u < 16 * RMAX / 32; ++u) {
        const int idx = lane + u * 32, rr = idx / RMAX, j = idx - rr * RMAX;
        const int64_t m = m0 + wm * 16 + rr;
        const bool ok = m < m_end && j < R;
        copy_async<4>(Ss + rr * LDB + j, ok ? S + m * ss0 + j * ss1 : S, ok);
      }
    }
  };
  stage_rows(m_begin, 0);
  copy_async_commit();
  stage_s(m_begin);
  copy_async_commit();
  {  // B's tile, g and the bias, once: loads into registers first so they are all in flight together
    constexpr int B_PER = BN * RMAX / kDoraThreads;
    static_assert(B_PER * kDoraThreads == BN * RMAX, "B's tile splits evenly");
    float bv[B_PER];
#pragma unroll
    for (int u = 0; u < B_PER; ++u) {
      const int idx = threadIdx.x + u * kDoraThreads, nn = idx / RMAX, j = idx - nn * RMAX;
      bv[u] = (n0 + nn < N && j < R) ? B[(n0 + nn) * sb0 + j * sb1] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < B_PER; ++u) {  // element (n, j): float4 (n, j / 8, j % 4), component (j % 8) / 4 (+ 2: lo)
      const int idx = threadIdx.x + u * kDoraThreads, nn = idx / RMAX, j = idx - nn * RMAX;
      float* q = reinterpret_cast<float*>(Bq + Tile::bq_slot(nn, j / 8, j % 4)) + (j % 8) / 4;
      const float hi = tf32_round(bv[u]);  // B itself before sm_80, where the FMA path reads the hi parts
      q[0] = hi;
      q[2] = tf32_round(bv[u] - hi);
    }
    for (int col = threadIdx.x; col < BN; col += kDoraThreads) {
      const bool in = n0 + col < N;
      // g_div: g = m / n here (inference: an IEEE division, as ATen's m / n, so the same bits as the autograd call)
      gs[col] = in ? (g_div != nullptr ? g[n0 + col] / g_div[n0 + col] : g[n0 + col]) : 0.0f;
      bs[col] = (in && bias != nullptr) ? to_f<T>(bias[n0 + col]) : 0.0f;
    }
  }
  // mma fragments: lane = 4·qr + qc; A (S) rows qr, qr + 8, k-columns qc, qc + 4; B (n, k) at n = qr, k = qc, qc + 4;
  // accumulator rows qr, qr + 8, columns 2·qc, 2·qc + 1 of each 8-column slice
  const int qr = lane / 4, qc = lane % 4;
  __syncthreads();  // B's tile, g and the bias are written
  int buf = 0;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BM, buf ^= 1) {
    stage_rows(m0 + BM, buf ^ 1);  // the next tile's Z0 (nothing past m_end)
    copy_async_commit();
    copy_async_wait<1>();  // all but that group: this tile's Z0 and S have landed
    __syncwarp();          // ... for every lane of the warp
    // S's fragments, split once per tile (ranks up to 32: 2·KS·4 registers); above, per slice and k-step
    constexpr bool kResident = RMAX <= 32;
    float a_hi[kResident ? Tile::KS : 1][4], a_lo[kResident ? Tile::KS : 1][4];
    auto load_a = [&](int k, float (&hi)[4], float (&lo)[4]) {
      const float v[4] = {Ss[qr * LDB + k + qc], Ss[(qr + 8) * LDB + k + qc], Ss[qr * LDB + k + qc + 4],
                          Ss[(qr + 8) * LDB + k + qc + 4]};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        hi[i] = tf32_round(v[i]);
        lo[i] = tf32_round(v[i] - hi[i]);
      }
    };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    if constexpr (kResident) {
#pragma unroll
      for (int ks = 0; ks < Tile::KS; ++ks) load_a(ks * 8, a_hi[ks], a_lo[ks]);
    }
#endif
    char* const zb = Zs + buf * ZBUF;
#pragma unroll
    for (int t = 0; t < Tile::NT; ++t) {
      const int n = wn * WC + t * 8;  // the slice's first column in the block's tile
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
      for (int ks = 0; ks < Tile::KS; ++ks) {
        const int k = ks * 8;
        const float4 b = Bq[Tile::bq_slot(n + qr, ks, qc)];  // hi at k + qc, k + qc + 4; then lo
        if constexpr (kResident) {
          mma_tf32(acc, a_lo[ks], b.x, b.y);  // the small terms first
          mma_tf32(acc, a_hi[ks], b.z, b.w);
          mma_tf32(acc, a_hi[ks], b.x, b.y);
        } else {
          load_a(k, a_hi[0], a_lo[0]);
          mma_tf32(acc, a_lo[0], b.x, b.y);
          mma_tf32(acc, a_hi[0], b.z, b.w);
          mma_tf32(acc, a_hi[0], b.x, b.y);
        }
      }
#else  // no TF32 tensor cores before sm_80: the same fp32 products on the FMA units, at the same positions
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int rr = qr + (i / 2) * 8, cc = n + 2 * qc + (i % 2);
        for (int j = 0; j < RMAX; ++j)
          acc[i] = fmaf(Ss[rr * LDB + j],
                        reinterpret_cast<const float*>(Bq + Tile::bq_slot(cc, j / 8, j % 4))[(j % 8) / 4],
                        acc[i]);
      }
#endif
      const float2 gp = *reinterpret_cast<const float2*>(gs + n + 2 * qc);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows qr and qr + 8
        char* zp = zb + (qr + 8 * h) * ZLD + (t * 8 + 2 * qc) * static_cast<int>(sizeof(T));
        const float2 z = load_pair<T>(zp);
        const float z_a = z.x + acc[2 * h], z_b = z.y + acc[2 * h + 1];
        const float2 bp = *reinterpret_cast<const float2*>(bs + n + 2 * qc);
        store_pair<T>(zp, fmaf(gp.x, z_a, bp.x), fmaf(gp.y, z_b, bp.y));  // Y over Z0, in place
      }
    }
    __syncwarp();  // the warp's results are in its buffer and S is read
    stage_s(m0 + BM);  // the next tile's S, behind this tile's copy-out
    copy_async_commit();
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int64_t m = m0 + wm * 16 + rl + p * RPP;
      if (m >= m_end || valid == 0) continue;
      unstage16<T>(out + m * N + c, zb + (rl + p * RPP) * ZLD + gl * 16, valid, vec_o);
    }
    __syncwarp();  // this buffer is read before the next tiles' copies write it
  }
  copy_async_wait<0>();  // nothing in flight into shared memory past the loop (the last, empty, groups)
}

// DoRA's forward output pass for ranks up to 16 with B's fragments in registers (dora_pass_kernel's register form;
// the same arithmetic, so the same bits: out = dtype(g·(Z0 + L) + bias), L = S·Bᵀ in 3xTF32 in the same order).
// Why a second form: dora_pass_kernel ran at ~1.8 TB/s (35 µs at q/o, 4096 rows; ncu: latency-bound at 30 %
// occupancy with L1 / shared memory its busiest unit, B's fragments re-read from shared memory every 16 rows and Z0 /
// Y going through shared memory in 4-byte pieces), where LoRA's cuBLAS add over the same bytes takes 19 µs.
// Layout: a warp owns a 32-column strip and walks the block's rows 16 at a time. The mma's 8 n-positions of slice t
// (t < 4) are mapped to columns so that a lane's accumulators are 8 consecutive columns: lane (qr, qc) = (lane / 4,
// lane % 4) holds, for slice t, columns qc·8 + 2t, qc·8 + 2t + 1 of the strip, and the B fragment it provides is
// column (qr / 2)·8 + 2t + qr % 2. So B's fragments (hi / lo TF32 parts: 32 registers), g and the bias of the lane's 8
// columns stay in registers for the whole walk, and a lane's Z0 and Y are one 16-byte word per row (two for fp32).
//   - Z0 and S reach shared memory by cp.async STAGES - 1 tiles ahead (no registers held by data in flight: ~80 KB a
//     SM of Z0 in flight at 2 blocks); a lane's Z0 words sit at [row half][lane] (conflict-free 16-byte accesses) and
//     only that lane reads them, so only S, read by the whole warp, needs a __syncwarp. S is copied with .ca: the 8
//     warps of a block walk the same rows, so 7 of them find it in L1.
//   - Y goes straight from registers to global memory (16-byte stores, 64 contiguous bytes a quad).
// No block barriers: warps drift apart and one's copies overlap another's arithmetic. sm_80+ (mma.sync TF32); the
// host takes dora_pass_kernel before that.
// Floor: bytes, Z0 read and Y written once (4 bytes an element in 16 bits: 67 MB at q/o, 4096 rows: ~16 µs at
// 4.3 TB/s); L's 3xTF32 mma (6·M·N·16 FLOPs, 1.6 GFLOP at q/o) is a few µs spread over the SMs.
// Measured (H200, session 35): 26.9 µs at q/o (2.5 TB/s; the tiled kernel 35.1), 86.9 at gate/up (2.7 TB/s; tiled
// 101.4). Bound: instruction issue, not bytes: ncu puts a warp's issues 6 cycles apart at ~15 warps an SM (every
// scheduler issuing about two cycles in three) and DRAM at 33-48 %. ~330 instructions a warp per 16 × 32 tile (10.8 M
// at q/o): S's TF32 split per warp (8 values, 5 instructions each), the 24 mma, the unpack / FMA / pack of 2 × 8
// elements, the copies' addresses. Fewer instructions per byte is the lever left (S split once per block, taller
// tiles per warp).
constexpr int kOutWarps = 8;
constexpr int kOutThreads = kOutWarps * 32;
constexpr int kOutRank = 16;          // ranks the register form takes (B's fragments: 2 k-steps × 4 slices × 4 floats)
constexpr int kOutCols = 32;          // columns a warp owns: 4 mma slices of 8
constexpr int kOutLds = kOutRank + 4;  // floats a row of S's stage (rows 4 banks apart: conflict-free fragment loads)

template <typename T> struct DoraOutTile {
  static constexpr int STAGES = sizeof(T) == 2 ? 6 : 4;        // tiles in a warp's ring (STAGES - 1 in flight)
  static constexpr int CPR = static_cast<int>(sizeof(T)) / 2;  // 16-byte words a lane's 8 columns take in a row
  static constexpr int Z_BYTES = 2 * CPR * 32 * 16;            // a warp's 16 × 32 tile of Z0: [2 halves][CPR][32 lanes]
  static constexpr int S_BYTES = 16 * kOutLds * 4;             // its 16 rows of S
  static constexpr int STAGE_BYTES = Z_BYTES + S_BYTES;
  static constexpr int WARP_BYTES = STAGES * STAGE_BYTES;
  static constexpr int SMEM_BYTES = kOutWarps * WARP_BYTES;    // 108 KB (16-bit T), 104 KB (fp32): 2 blocks a SM
  static_assert(SMEM_BYTES <= 113 * 1024, "two blocks a SM");
};

template <typename T>
__global__ void __launch_bounds__(kOutThreads, 2) dora_out_kernel(
    const T* __restrict__ z0, int64_t sz0, int64_t sz1, const float* __restrict__ S, int64_t ss0, int64_t ss1,
    const float* __restrict__ B, int64_t sb0, int64_t sb1, const float* __restrict__ g,
    const float* __restrict__ g_div, const T* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int R,
    int64_t rows_per_block, bool vec_z, bool vec_o, bool vec_s) {
  using Tile = DoraOutTile<T>;
  constexpr int STAGES = Tile::STAGES, CPR = Tile::CPR, VEC = 16 / static_cast<int>(sizeof(T));
  extern __shared__ __align__(128) unsigned char dora_out_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, qr = lane / 4, qc = lane % 4;
  const int64_t strip = (static_cast<int64_t>(blockIdx.x) * kOutWarps + warp) * kOutCols;
  if (strip >= N) return;  // no block barrier below: a warp past N leaves alone
  unsigned char* const ring = dora_out_smem + warp * Tile::WARP_BYTES;
  const int64_t c = strip + qc * 8;  // the lane's first column
  const int valid = c < N ? static_cast<int>(N - c < 8 ? N - c : 8) : 0;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  if (m_begin >= m_end) return;
  // B's fragments: slice t, k-step ks, k-columns qc and qc + 4 of column (qr / 2)·8 + 2t + qr % 2; TF32 hi and lo
  float b_hi[4][2][2], b_lo[4][2][2];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int64_t n = strip + (qr / 2) * 8 + 2 * t + (qr % 2);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = ks * 8 + qc + 4 * h;
        const float v = (n < N && j < R) ? B[n * sb0 + j * sb1] : 0.0f;
        b_hi[t][ks][h] = tf32_round(v);
        b_lo[t][ks][h] = tf32_round(v - b_hi[t][ks][h]);
      }
    }
  }
  float gv[8], bv[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool in = e < valid;
    // g_div: g = m / n here (inference: an IEEE division, as ATen's m / n, so the same bits as the autograd call)
    gv[e] = in ? (g_div != nullptr ? g[c + e] / g_div[c + e] : g[c + e]) : 0.0f;
    bv[e] = (in && bias != nullptr) ? to_f<T>(bias[c + e]) : 0.0f;
  }
  // a tile's copies into stage st: the lane's Z0 words (rows qr, qr + 8; zeros past m_end and N) and a share of S's
  // 16 rows (zeros past m_end and R). Rows are counted from the block's first (int: a block's rows fit) and the
  // sources kept as running pointers: the per-tile address arithmetic is a few instructions, not 64-bit products.
  const int rows = static_cast<int>(m_end - m_begin);
  const T* const z_lane = z0 + (m_begin + qr) * sz0 + c * sz1;  // row qr of the block, the lane's first column
  const int s_row = vec_s ? lane / 4 : lane / 16;                 // the lane's first row of S's tile and column
  const int s_col = vec_s ? (lane % 4) * 4 : lane % 16;
  const float* const s_lane = S + (m_begin + s_row) * ss0 + s_col * ss1;
  auto stage = [&](int r0, int st) {  // r0: the tile's first row, from m_begin
    unsigned char* const zs = ring + st * Tile::STAGE_BYTES;
    const T* const zp = z_lane + static_cast<int64_t>(r0) * sz0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ok = r0 + qr + 8 * h < rows ? valid : 0;
#pragma unroll
      for (int w = 0; w < CPR; ++w) {
        const T* src = zp + static_cast<int64_t>(8 * h) * sz0 + w * VEC * sz1;
        void* dst = zs + ((h * CPR + w) * 32 + lane) * 16;
        if (vec_z && ok - w * VEC >= VEC) {
          copy_async<16>(dst, src, true);
        } else {
          stage16<T>(dst, src, sz1, ok - w * VEC, vec_z);
        }
      }
    }
    float* const ss = reinterpret_cast<float*>(zs + Tile::Z_BYTES) + s_row * kOutLds + s_col;
    const float* const sp = s_lane + static_cast<int64_t>(r0) * ss0;
    if (vec_s) {  // 64 words of 4 floats: rows s_row and s_row + 8
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const bool ok = r0 + s_row + 8 * u < rows && s_col < R;
        copy_async<16, true>(ss + 8 * u * kOutLds, ok ? sp + static_cast<int64_t>(8 * u) * ss0 : S, ok);
      }
    } else {  // 256 floats: rows s_row + 2u
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const bool ok = r0 + s_row + 2 * u < rows && s_col < R;
        copy_async<4>(ss + 2 * u * kOutLds, ok ? sp + static_cast<int64_t>(2 * u) * ss0 : S, ok);
      }
    }
  };
  const int tiles = (rows + 15) / 16;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < tiles) stage(16 * st, st);
    copy_async_commit();  // one group per stage, empty or not: the wait below counts groups
  }
  int st_read = 0, st_fill = STAGES - 1;  // this tile's stage; the stage the tile STAGES - 1 ahead goes to
  for (int i = 0; i < tiles; ++i) {
    __syncwarp();  // every lane has read S from the stage refilled next (the previous tile's)
    if (i + STAGES - 1 < tiles) stage(16 * (i + STAGES - 1), st_fill);
    copy_async_commit();
    copy_async_wait<STAGES - 1>();  // this tile's group has landed (the lane's own copies) ...
    __syncwarp();                   // ... and every lane's: S is whole
    const unsigned char* const zs = ring + st_read * Tile::STAGE_BYTES;
    st_read = st_read + 1 == STAGES ? 0 : st_read + 1;
    st_fill = st_fill + 1 == STAGES ? 0 : st_fill + 1;
    const float* const ss = reinterpret_cast<const float*>(zs + Tile::Z_BYTES);
    float a_hi[2][4], a_lo[2][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int k = ks * 8;
      const float v[4] = {ss[qr * kOutLds + k + qc], ss[(qr + 8) * kOutLds + k + qc], ss[qr * kOutLds + k + qc + 4],
                          ss[(qr + 8) * kOutLds + k + qc + 4]};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        a_hi[ks][e] = tf32_round_finite(v[e]);
        a_lo[ks][e] = tf32_round_finite(v[e] - a_hi[ks][e]);
      }
    }
    float acc[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {  // dora_pass_kernel's order: the small terms first
        mma_tf32(acc[t], a_lo[ks], b_hi[t][ks][0], b_hi[t][ks][1]);
        mma_tf32(acc[t], a_hi[ks], b_lo[t][ks][0], b_lo[t][ks][1]);
        mma_tf32(acc[t], a_hi[ks], b_hi[t][ks][0], b_hi[t][ks][1]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows qr and qr + 8: accumulators 2h, 2h + 1 of each slice
      const int r = 16 * i + qr + 8 * h;  // from m_begin
      if (r >= rows || valid == 0) continue;
      float z[8];
#pragma unroll
      for (int w = 0; w < CPR; ++w) {
        const uint4 raw = *reinterpret_cast<const uint4*>(zs + ((h * CPR + w) * 32 + lane) * 16);
        const T* el = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < VEC; ++e) z[w * VEC + e] = to_f<T>(el[e]);
      }
      float o[8];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        o[2 * t] = fmaf(gv[2 * t], z[2 * t] + acc[t][2 * h], bv[2 * t]);
        o[2 * t + 1] = fmaf(gv[2 * t + 1], z[2 * t + 1] + acc[t][2 * h + 1], bv[2 * t + 1]);
      }
      T* const op = out + (m_begin + r) * N + c;
      if constexpr (sizeof(T) == 4) {  // fp32: two 16-byte words (store8 writes fp32 element by element)
        if (vec_o && valid == 8) {
#pragma unroll
          for (int w = 0; w < 2; ++w)
            asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(op + 4 * w), "f"(o[4 * w]),
                         "f"(o[4 * w + 1]), "f"(o[4 * w + 2]), "f"(o[4 * w + 3])
                         : "memory");
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (e < valid) op[e] = o[e];
        }
      } else {
        store8<T>(op, valid, vec_o, o);
      }
    }
  }
  copy_async_wait<0>();  // nothing in flight into shared memory past the loop (the last, empty, groups)
}

// DoRA's per-row scale from the norm's small pieces: n² = w_sq + Σ_j B[i, j]·(2s·WA[i, j] + s²·(B·AA)[i, j]) with
// WA = W·Aᵀ, AA = A·Aᵀ (= ‖W + s·B·A‖², never forming B·A); g = m / n and 1 / n, fp32 [N]. WA is read from the
// split GEMM's two halves (P [N, 2R], summed here) or whole (P [N, R], fp32 inputs). One warp per output row: lane j
// takes columns j, j + 32, ... of (B·AA)[i, :], reading B[i, l] (one address for the warp: a broadcast) and AA[l, j]
// (consecutive across lanes) from L1; then a warp sum. (One thread per row, the first design, walked R² dependent
// loads in a chain: 32 µs at every Llama-8B shape, session 23's profile; this is latency of ~R loads a warp.)
// P, B contiguous, AA [R, R] contiguous; one launch for what was a combine, an addmm and this scale.
// Bound: latency, not bytes or FLOPs (N·R² FMAs, P and B read once, AA from L1): each warp walks a chain of R
// dependent FMAs over L1 loads; 9.3 µs at N = 4096, R = 16 on the H200 (ncu, sessions 25-26: 34 cycles a warp
// between issues, 48 % occupancy).
constexpr int kNormWarps = 8;  // rows per block
__global__ void __launch_bounds__(kNormWarps * 32) dora_norm_scale_kernel(
    const float* __restrict__ P, bool halves, const float* __restrict__ B, const float* __restrict__ AA, int64_t N,
    int R, float s, const float* __restrict__ w_sq, const float* __restrict__ m, float* __restrict__ g,
    float* __restrict__ inv_n) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (i >= N) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const float* b = B + i * R;
  const float* p = P + i * (halves ? 2 * R : R);
  float acc = 0.0f;
  for (int j = lane; j < R; j += 32) {
    float bab = 0.0f;  // (B·AA)[i, j]
#pragma unroll 8
    for (int l = 0; l < R; ++l) bab = fmaf(__ldg(b + l), __ldg(AA + static_cast<int64_t>(l) * R + j), bab);
    const float wa = halves ? p[j] + p[R + j] : p[j];
    acc = fmaf(b[j], fmaf(s * s, bab, 2.0f * s * wa), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float n = sqrtf(fmaxf(w_sq[i] + acc, 0.0f));
    g[i] = m[i] / n;
    inv_n[i] = 1.0f / n;
  }
}

// DoRA's norm in two launches where W is 16-bit with 16-byte rows and the rank <= 16 on sm_80+ (dora_norm_fused
// below), in place of the split GEMM W·[A_hi | A_lo]ᵀ (cuBLAS split-K and its reduce), A·Aᵀ and the kernel above:
//   dora_norm_parts_kernel reads W once and sums, over each block's range of K, W·Aᵀ (and ‖W‖² where the layer keeps
//   none) on the tensor cores, and A·Aᵀ over the same ranges from the fragments it splits;
//   dora_norm_finish_kernel adds the ranges in order and forms n, g = m / n and 1 / n.
// Deterministic: no atomics, fixed orders.
// W·Aᵀ on mma.sync m16n8k16 with fp32 accumulators, A (fp32) as hi + lo 16-bit parts: the split GEMM's A2, so the
// same ~16-bit-mantissa product. A sum does not care about K's order, so a lane's mma positions are mapped to 8
// consecutive k: lane (g, t) = (lane / 4, lane % 4) takes one 16-byte word of W row g and one of row g + 8 at k =
// 8t..8t+7 of a 32-wide chunk, and those words are the A fragments of two k16 steps as they stand (virtual k 2t, 2t+1
// are elements 0, 1; 2t+8, 2t+9 elements 2, 3; the second step elements 4..7). The B fragment of n-slice q (q = 0, 1:
// the hi parts of A's rows 0-7, 8-15; q = 2, 3: their lo parts) is then the split of A[(q & 1)·8 + g, 8t..8t+7]: one
// 16-byte word too. A block: 8 warps, each a 16-row tile of W over the block's range (KB columns, a multiple of 32);
// W arrives through a per-warp cp.async ring (a lane reads back only its own words: no barrier); A's fragments for the
// range are split once into shared memory (KB·64 bytes) and read by all 8 warps (512 contiguous bytes a warp and
// slice: conflict-free). A·Aᵀ: rows [A_hi; A_lo] times (A_hi + A_lo)ᵀ in one more block per range (row block 0,
// scheduled first), whose warps 0 and 1 take their A side from the same shared words.
// Bound: W's bytes, read once (32 MB at q/o: ~8 µs at 4 TB/s); the ranges' partial sums add 64 bytes a row each
// (KB is picked so that the grid fills the GPU with ranges of at least 128 columns: 1/4 of W's bytes at most, 1/16 at
// the Llama-8B shapes but k/v). The mma work is 4 n-slices × 2 steps a 1 KB chunk of W: far from the tensor cores'.
// Measured (H200, session 36, profiler lists): 15.9 µs at q/o, 8.1 at k/v, 44.3 at gate/up, 43.0 at down, against
// ~30 µs at q/o and ~34 at k/v for the split GEMM, A·Aᵀ and the scale kernel. Not at its floor: ncu (an earlier
// version) put it at 23-51 % of DRAM bandwidth, ~24 % achieved occupancy (2-3 blocks an SM by shared memory), k/v's
// short blocks the least.
constexpr int kNormPartWarps = 8;
constexpr int kNormPartRows = kNormPartWarps * 16;  // W's rows a block
constexpr int kNormPartStages = 6;                  // chunks in a warp's ring (5 in flight: 5 KB a warp)
constexpr int kNormPartRank = 16;                   // ranks the fused norm takes (two n-slices of 8 per part)
constexpr int kNormPartMaxRange = 2048;             // K's columns a block at most (its fragments' shared memory)
constexpr int kNormPartSmem = kNormPartWarps * kNormPartStages * 1024;  // the rings; + KB·64 for the fragments

// split_hi_lo of 8 fp32 values, the parts two to a word (element 2i in the low half)
template <typename T>
__device__ __forceinline__ void split8(const float4& v0, const float4& v1, uint4& hi, uint4& lo) {
  const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
  unsigned h[4], l[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    T h0, h1, l0, l1;
    split_hi_lo(v[2 * p], h0, l0);
    split_hi_lo(v[2 * p + 1], h1, l1);
    h[p] = elem_bits(h0) | (elem_bits(h1) << 16);
    l[p] = elem_bits(l0) | (elem_bits(l1) << 16);
  }
  hi = make_uint4(h[0], h[1], h[2], h[3]);
  lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// A[j, k..k+7] as two float4 (zeros when !ok); A's rows 16-byte aligned
__device__ __forceinline__ void load_a8(const float* A, int64_t lda, int j, int k, bool ok, float4& v0, float4& v1) {
  v0 = v1 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (ok) {
    v0 = *reinterpret_cast<const float4*>(A + j * lda + k);
    v1 = *reinterpret_cast<const float4*>(A + j * lda + k + 4);
  }
}

// Σ v² over the 8 16-bit elements of a word, in fp32
template <typename T>
__device__ __forceinline__ float sum_sq8(const uint4& raw) {
  const T* h = reinterpret_cast<const T*>(&raw);
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s = fmaf(to_f<T>(h[e]), to_f<T>(h[e]), s);
  return s;
}

// acc[q] += (16 rows × 32 k of the A side: words a (row g), b (row g + 8)) · (slice q's fragment f[q]), two k16 steps
template <typename T>
__device__ __forceinline__ void norm_chunk_mma(float (&acc)[4][4], const uint4& a, const uint4& b, const uint4 (&f)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    mma_16816<T>(acc[q], a.x, b.x, a.y, b.y, f[q].x, f[q].y);
    mma_16816<T>(acc[q], a.z, b.z, a.w, b.w, f[q].z, f[q].w);
  }
}

// a 16-row tile's sums (acc: slices 0, 1 the hi parts, 2, 3 the lo parts) as rows of 16 fp32 at out (row g, and g + 8
// at out + 8·16 when row8_ok): column j = (q & 1)·8 + 2t + e
__device__ __forceinline__ void norm_store_tile(float* out, const float (&acc)[4][4], int g, int t, bool row_ok,
                                                bool row8_ok) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!(h == 0 ? row_ok : row8_ok)) continue;
    float* const row = out + (g + 8 * h) * 16;
    *reinterpret_cast<float2*>(row + 2 * t) =
        make_float2(acc[0][2 * h] + acc[2][2 * h], acc[0][2 * h + 1] + acc[2][2 * h + 1]);
    *reinterpret_cast<float2*>(row + 8 + 2 * t) =
        make_float2(acc[1][2 * h] + acc[3][2 * h], acc[1][2 * h + 1] + acc[3][2 * h + 1]);
  }
}

// Grid (ranges, row blocks + 1). Block (x, y > 0) sums W·Aᵀ over columns [x·KB, min(K, (x+1)·KB)) for W's rows
// [(y-1)·128, (y-1)·128 + 128) into part_wa[x] ([N, 16] fp32, columns past R zero) and, when part_sq, ‖W‖²'s share
// into part_sq[x] ([N]); block (x, 0) sums A·Aᵀ over the range into part_aa[x] ([16, 16]). W [N, K] with unit column
// stride, 16-byte aligned rows (ldw % 8 == 0) and K % 8 == 0 (a lane's 8 columns are all in range or all out); A fp32
// [R, K] likewise (lda % 4 == 0), R <= 16. Dynamic shared memory: KB·64 bytes of fragments + the warps' rings
// (kNormPartSmem).
template <typename T>
__global__ void __launch_bounds__(kNormPartWarps * 32) dora_norm_parts_kernel(
    const T* __restrict__ w, int64_t ldw, int N, int K, const float* __restrict__ A, int64_t lda, int R, int KB,
    float* __restrict__ part_wa, float* __restrict__ part_sq, float* __restrict__ part_aa) {
  extern __shared__ __align__(16) unsigned char norm_parts_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int k0 = static_cast<int>(blockIdx.x) * KB;
  const int k_end = K - k0 < KB ? K : k0 + KB;
  const int chunks = (k_end - k0 + 31) / 32;
  uint4* const frag = reinterpret_cast<uint4*>(norm_parts_smem);  // [chunk][slice q][lane]
  uint4* const ring = frag + (KB / 32) * 128 + warp * (kNormPartStages * 64);  // [stage][row half][lane]
  const bool aa_block = blockIdx.y == 0;
  const int row0 = (static_cast<int>(blockIdx.y) - 1) * kNormPartRows + warp * 16;
  const bool w_warp = !aa_block && row0 < N;
  const bool row_ok = row0 + g < N, row8_ok = row0 + g + 8 < N;
  const T* const w_lane = w + static_cast<int64_t>(row_ok ? row0 + g : 0) * ldw + k0 + 8 * t;
  const int64_t w_half = row8_ok ? 8 * ldw : 0;  // row g + 8 from row g (row g itself when past N: not read)
  auto copy_chunk = [&](int c, int st) {  // chunk c of the lane's two rows into stage st (zeros past N or K)
    const bool k_ok = k0 + 32 * c + 8 * t < k_end;
    const T* src = w_lane + 32 * c;
    copy_async<16>(ring + (st * 2) * 32 + lane, k_ok && row_ok ? src : w, k_ok && row_ok);
    copy_async<16>(ring + (st * 2 + 1) * 32 + lane, k_ok && row8_ok ? src + w_half : w, k_ok && row8_ok);
  };
  if (w_warp) {  // the ring's first chunks go out before A is split, so the two overlap
#pragma unroll
    for (int s = 0; s < kNormPartStages - 1; ++s) {
      if (s < chunks) copy_chunk(s, s);
      copy_async_commit();
    }
  }
  // A's fragments for the range: item i -> chunk i / 64, row half (i / 32) % 2, lane position i % 32; a thread's
  // items four at a time with their loads issued together
  const int items = chunks * 64;
  for (int base = threadIdx.x; base < items; base += 4 * kNormPartWarps * 32) {
    float4 v[4][2];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = base + u * kNormPartWarps * 32, ln = i % 32;
      const int j = ((i / 32) % 2) * 8 + ln / 4, k = k0 + 32 * (i / 64) + 8 * (ln % 4);
      load_a8(A, lda, j, k, i < items && j < R && k < k_end, v[u][0], v[u][1]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = base + u * kNormPartWarps * 32;
      if (i >= items) break;
      const int c = i / 64, h = (i / 32) % 2, ln = i % 32;
      split8<T>(v[u][0], v[u][1], frag[(c * 4 + h) * 32 + ln], frag[(c * 4 + 2 + h) * 32 + ln]);
    }
  }
  __syncthreads();
  float acc[4][4] = {};
  if (aa_block) {  // A·Aᵀ's share: warp 0 takes A_hi's rows as the A side, warp 1 A_lo's; summed in the rings' space
    float* const tiles = reinterpret_cast<float*>(ring - warp * (kNormPartStages * 64));  // the block's rings
    if (warp < 2) {
      for (int c = 0; c < chunks; ++c) {
        const uint4* fc = frag + c * 128 + lane;
        const uint4 f[4] = {fc[0], fc[32], fc[64], fc[96]};
        // (the A side read again from shared memory: f[2 * warp], indexed by the warp, went to local memory)
        norm_chunk_mma<T>(acc, fc[(2 * warp) * 32], fc[(2 * warp + 1) * 32], f);
      }
      norm_store_tile(tiles + warp * 256, acc, g, t, true, true);
    }
    __syncthreads();
    part_aa[static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x] = tiles[threadIdx.x] + tiles[256 + threadIdx.x];
    return;
  }
  if (!w_warp) return;
  float sq = 0.0f, sq8 = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const int next = c + kNormPartStages - 1;
    if (next < chunks) copy_chunk(next, next % kNormPartStages);
    copy_async_commit();  // (empty past the last chunk: the wait below counts groups)
    copy_async_wait<kNormPartStages - 1>();
    const uint4* st = ring + (c % kNormPartStages) * 64 + lane;
    const uint4 a = st[0], b = st[32];
    if (part_sq != nullptr) {
      sq += sum_sq8<T>(a);
      sq8 += sum_sq8<T>(b);
    }
    const uint4* fc = frag + c * 128 + lane;
    const uint4 f[4] = {fc[0], fc[32], fc[64], fc[96]};
    norm_chunk_mma<T>(acc, a, b, f);
  }
  copy_async_wait<0>();
  norm_store_tile(part_wa + (static_cast<int64_t>(blockIdx.x) * N + row0) * 16, acc, g, t, row_ok, row8_ok);
  if (part_sq != nullptr) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      sq += __shfl_xor_sync(0xffffffffu, sq, off);
      sq8 += __shfl_xor_sync(0xffffffffu, sq8, off);
    }
    float* const ps = part_sq + static_cast<int64_t>(blockIdx.x) * N + row0 + g;
    if (t == 0 && row_ok) ps[0] = sq;
    if (t == 0 && row8_ok) ps[8] = sq8;
  }
}

// n² = ‖W‖² + Σ_j B[i, j]·(2s·WA[i, j] + s²·(B·AA)[i, j]) from dora_norm_parts_kernel's ranges, each sum in range
// order; ‖W‖² from w_sq (the layer's) or from part_sq. g = m / n, inv_n = 1 / n. A block: 16 rows × 16 lanes (lane
// j the column j of row i; thread (l, j) also sums AA[l, j]). Bound: latency. A thread's loads of the ranges go out
// 16 + 16 at a time, unconditionally (clamped indices, masked after): a load guarded by a condition was compiled as
// load-then-add, one latency each (SASS, session 36: 10 µs at k/v's 32 ranges).
constexpr int kNormFinishRows = 16;
constexpr int kNormFinishBatch = 16;  // ranges a batch
__global__ void __launch_bounds__(kNormFinishRows * 16) dora_norm_finish_kernel(
    const float* __restrict__ part_wa, const float* __restrict__ part_sq, const float* __restrict__ part_aa,
    int ranges, const float* __restrict__ B, int N, int R, float s, const float* __restrict__ w_sq,
    const float* __restrict__ m, float* __restrict__ g, float* __restrict__ inv_n) {
  __shared__ float aa[16][17];
  const int l = threadIdx.x / 16, j = threadIdx.x % 16;
  const int i = static_cast<int>(blockIdx.x) * kNormFinishRows + l;
  const bool ok = i < N;  // no early exit: the barrier and the 16-lane shuffles below want every thread
  const int64_t i_read = ok ? i : N - 1;
  float aa_sum = 0.0f, wa = 0.0f;
  for (int r0 = 0; r0 < ranges; r0 += kNormFinishBatch) {
    float va[kNormFinishBatch], vw[kNormFinishBatch];
#pragma unroll
    for (int u = 0; u < kNormFinishBatch; ++u) {
      const int64_t r = r0 + u < ranges ? r0 + u : ranges - 1;
      va[u] = part_aa[r * 256 + threadIdx.x];
      vw[u] = part_wa[(r * N + i_read) * 16 + j];
    }
#pragma unroll
    for (int u = 0; u < kNormFinishBatch; ++u) {
      if (r0 + u < ranges) {
        aa_sum += va[u];
        wa += vw[u];
      }
    }
  }
  aa[l][j] = aa_sum;
  __syncthreads();
  const float bj = ok && j < R ? B[static_cast<int64_t>(i) * R + j] : 0.0f;
  float bab = 0.0f;  // (B·AA)[i, j]
#pragma unroll
  for (int q = 0; q < 16; ++q) bab = fmaf(__shfl_sync(0xffffffffu, bj, q, 16), aa[q][j], bab);
  float sq = 0.0f;
  if (part_sq != nullptr && ok)
    for (int r = j; r < ranges; r += 16) sq += part_sq[static_cast<int64_t>(r) * N + i];
  float acc = fmaf(bj, fmaf(s * s, bab, 2.0f * s * (ok ? wa : 0.0f)), sq);
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off, 16);
  if (ok && j == 0) {
    const float n = sqrtf(fmaxf((w_sq != nullptr ? w_sq[i] : 0.0f) + acc, 0.0f));
    g[i] = m[i] / n;
    inv_n[i] = 1.0f / n;
  }
}

// Column reductions over a row range: red[n] += Σ a⊙b, sum[n] += Σ a (fp32; atomics when the rows are split over
// blocks), out = a ⊙ dtype(l) (out may be a itself: each element is read before it is written, by one thread).
// Threads of a warp take consecutive columns (coalesced); eight rows are loaded before any is used, so each
// thread keeps eight loads in flight. Bound: bytes, 2 reads (+1 write) of [M, N].
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
  for (int64_t m = m0; m < m1; m += 8) {
    float av[8], bv[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const bool ok = m + u < m1;
      av[u] = ok ? to_f<T>(a[(m + u) * sa0 + c * sa1]) : 0.0f;
      bv[u] = ok ? to_f<T>(b[(m + u) * sb0 + c * sb1]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      acc += av[u] * bv[u];
      tot += av[u];
      if (out != nullptr && m + u < m1) out[(m + u) * N + c] = from_f<T>(av[u] * lv);
    }
  }
  if (atomic) {
    atomicAdd(red + c, acc);
    if (sum != nullptr) atomicAdd(sum + c, tot);
  } else {
    red[c] = acc;
    if (sum != nullptr) sum[c] = tot;
  }
}

// DoRA's backward pass over dY and Z0 (p = 0, no S, no B): red[n] = (Σ_m dY[m, n]·Z0[m, n])·red_scale[n] (fp32;
// atomics when the rows are split over blocks) and dZ = g⊙dY (fp32 g, one rounding) when dz is given. dm's adapter
// part, Σ_m dY⊙(S'·Bᵀ) = Σ_j B[n, j]·(dYᵀ·S')[n, j], is added from dB's GEMM by combine_halves (its dot job), so
// this pass is a pure stream (dora_pass_kernel's backward, which recomputed S'·Bᵀ on the tensor cores per element,
// ran at ~2 TB/s: latency-bound at 30 % occupancy on its S and B fragments; sessions 23-27).
// Block: kStreamGroups groups of 8 columns (16 bytes of 16-bit T) × kStreamLanes row lanes; a thread walks every
// kStreamLanes-th row of the block's range with kStreamUnroll rows' loads (dY and Z0, kept as raw 16-byte words:
// 32 registers; 3 blocks an SM, 96 KB in flight) issued before any is used; the row lanes' sums meet in shared memory in a fixed order. Blocks are
// short (a few steps) and many (several waves): the block scheduler balances the SMs, and the column sums cost one
// atomic per block and column. Z0 is read with an evict-first hint (nothing reads it again); dY stays cacheable
// (dB's and dS's GEMMs read it next).
// Bound: bytes: dY and Z0 read once, dZ written once (3·M·N·elem: 101 MB at q/o, 4096 rows; ~23 µs at 4.3 TB/s).
constexpr int kStreamGroups = 32;
constexpr int kStreamLanes = 8;
constexpr int kStreamUnroll = 4;
constexpr int kStreamThreads = kStreamGroups * kStreamLanes;

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float v[8]) {
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = to_f<T>(h[e]);
}

template <typename T>
__global__ void __launch_bounds__(kStreamThreads, 3) dora_bwd_stream_kernel(
    const T* __restrict__ dy, int64_t sd0, int64_t sd1, const T* __restrict__ z0, int64_t sz0, int64_t sz1,
    const float* __restrict__ g, T* __restrict__ dz, float* __restrict__ red, const float* __restrict__ red_scale,
    int64_t M, int64_t N, int64_t rows_per_block, bool atomic, bool vec_d, bool vec_z, bool vec_o) {
  __shared__ __align__(16) float sums[kStreamLanes][kStreamGroups * 8];
  const int grp = threadIdx.x % kStreamGroups, lane_row = threadIdx.x / kStreamGroups;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kStreamGroups + grp) * 8;
  const int valid = c < N ? static_cast<int>(N - c < 8 ? N - c : 8) : 0;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  const bool want_red = red != nullptr, want_dz = dz != nullptr;
  // 16-byte words straight from global memory: 16-bit T, both rows' layouts aligned, all 8 columns in range
  const bool raw_path = sizeof(T) == 2 && vec_d && (vec_z || !want_red) && valid == 8;
  float gv[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) gv[e] = e < valid && want_dz ? g[c + e] : 0.0f;
  float acc[8] = {};
  // one row's 8 columns: dm's partial sums and dZ (zeros past m_end and N add nothing)
  auto take = [&](int64_t m, const float (&d)[8], const float (&z)[8]) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = fmaf(d[e], z[e], acc[e]);
    if (want_dz && m < m_end) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = gv[e] * d[e];
      store8<T>(dz + m * N + c, valid, vec_o, o);
    }
  };
  for (int64_t m0 = m_begin + lane_row; m0 < m_end; m0 += kStreamUnroll * kStreamLanes) {
    bool done = false;
    if constexpr (sizeof(T) == 2) {
      if (raw_path) {
        uint4 dr[kStreamUnroll], zr[kStreamUnroll];
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) {  // every load of the step issued before any is used
          const int64_t m = m0 + u * kStreamLanes;
          const bool ok = m < m_end;
          dr[u] = ok ? *reinterpret_cast<const uint4*>(dy + m * sd0 + c) : make_uint4(0u, 0u, 0u, 0u);
          zr[u] = ok && want_red ? __ldcs(reinterpret_cast<const uint4*>(z0 + m * sz0 + c))
                                  : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) {
          float d[8], z[8];
          unpack8<T>(dr[u], d);
          unpack8<T>(zr[u], z);
          take(m0 + u * kStreamLanes, d, z);
        }
        done = true;
      }
    }
    if (!done) {  // strided, misaligned, fp32 or a partial column group: element loads, one row at a time
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int64_t m = m0 + u * kStreamLanes;
        const int ok = m < m_end ? valid : 0;
        float d[8], z[8];
        load8<T>(dy + m * sd0 + c * sd1, sd1, ok, vec_d, d);
        load8<T>(z0 + m * sz0 + c * sz1, sz1, want_red ? ok : 0, vec_z, z);
        take(m, d, z);
      }
    }
  }
  if (!want_red) return;  // the whole block alike: no thread waits at the barrier below
  float4* const mine = reinterpret_cast<float4*>(&sums[lane_row][grp * 8]);
  mine[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  mine[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  __syncthreads();
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kStreamGroups * 8 + threadIdx.x;
  if (col < N) {
    float sum = 0.0f;
#pragma unroll
    for (int l = 0; l < kStreamLanes; ++l) sum += sums[l][threadIdx.x];  // fixed order
    if (red_scale != nullptr) sum *= red_scale[col];
    if (atomic) {
      atomicAdd(red + col, sum);
    } else {
      red[col] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------------ fused LoRA
// Two kernels carry every small LoRA product (SIMT fp32 FMAs on fp32-widened activations: full fp32 precision):
//
// shrink:   part[split, m, j] = Σ_{l in split} (D⊙P)[m, l] · Q(l, j)         (S = X·Aᵀ, dS = dY·B; reduce over L)
//   Block: 16 rows; 4 groups of 4 rows x 64 lanes; lane ll reads 8 consecutive l per step (16-byte loads) and
//   keeps acc[4 rows][16 j] in registers; Q (the adapter, L2-resident) is read once per 4 rows. A warp-shuffle
//   plus shared-memory reduction over the lanes ends it. Splitting L over blocks fills the GPU at small M; the
//   partials are summed, in a fixed order, by the consumer (deterministic).
//   Bound: X / dY bytes once (M·L·elem); FLOPs 2·M·L·r.
// colexp:   for columns c of P [M, C] (one thread each) and its rows:
//   REDUCE  red(c, j) += Σ_m (D⊙P)[m, c] · Sm[m, j]                           (dB = dYᵀ·S, dA = dSᵀ·(D⊙X); atomics)
//   EXPAND  Z[m, c] = D⊙(Σ_j Sm[m, j] · Q2(c, j)) + bias[c]                   (Z = S·Bᵀ + b, Z2 = D⊙(dS·A))
//   Sm (32-row tiles) and the tile's keep bits sit in shared memory; Sm is the sum of the shrink's partials times
//   its scale (blocks of the first column block also write it out: the forward's saved S).
//   Bound: P bytes once (REDUCE), Z bytes once (EXPAND); FLOPs 2·M·C·r each.
// Then cuBLAS adds the big GEMM with beta = 1 into Z (Y = Z + X·Wᵀ; dX = Z2 + dY·W): one launch per product, no
// separate elementwise passes. Rank up to 64 (registers); larger ranks take the split-GEMM path.
constexpr int kShrinkRows = 16;
constexpr int kShrinkLanes = 64;
constexpr int kShrinkRC = 16;
constexpr int kColTile = 32;

template <typename T>
__global__ void __launch_bounds__(256) shrink_kernel(const T* __restrict__ P, int64_t sp0, int64_t sp1, int64_t M,
                                                     int64_t L, const float* __restrict__ Q, int64_t sql, int64_t sqj,
                                                     int R, float* __restrict__ part, int64_t l_per_split, bool vec,
                                                     bool dropout, uint64_t seed, uint32_t thr, float keep_scale) {
  __shared__ float red[4][2][4][kShrinkRC];
  const int tid = threadIdx.x;
  const int rg = tid / kShrinkLanes, ll = tid % kShrinkLanes, half = ll / 32;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kShrinkRows + rg * 4;
  const int64_t l_begin = static_cast<int64_t>(blockIdx.y) * l_per_split;
  const int64_t l_end = l_begin + l_per_split < L ? l_begin + l_per_split : L;
  float* out = part + static_cast<int64_t>(blockIdx.y) * M * R;
  for (int j0 = 0; j0 < R; j0 += kShrinkRC) {
    float acc[4][kShrinkRC];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < kShrinkRC; ++jj) acc[i][jj] = 0.0f;
    for (int64_t l = l_begin + ll * 8; l < l_end; l += kShrinkLanes * 8) {
      const int valid = static_cast<int>(l_end - l < 8 ? l_end - l : 8);
      float x[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m_base + i;
        if (m < M) {
          load8<T>(P + m * sp0 + l * sp1, sp1, valid, vec, x[i]);
          if (dropout) {
            const uint32_t bits = keep_bits_at(static_cast<uint64_t>(m * L + l), seed, thr, valid);
#pragma unroll
            for (int e = 0; e < 8; ++e) x[i][e] = ((bits >> e) & 1u) ? to_f<T>(from_f<T>(x[i][e] * keep_scale)) : 0.0f;
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) x[i][e] = 0.0f;
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (e < valid) {
          const float* qrow = Q + (l + e) * sql;
#pragma unroll
          for (int jj = 0; jj < kShrinkRC; ++jj) {
            const float q = (j0 + jj < R) ? __ldg(qrow + (j0 + jj) * sqj) : 0.0f;
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i][jj] = fmaf(x[i][e], q, acc[i][jj]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < kShrinkRC; ++jj)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[i][jj] += __shfl_xor_sync(0xffffffffu, acc[i][jj], off);
    if ((ll & 31) == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < kShrinkRC; ++jj) red[rg][half][i][jj] = acc[i][jj];
    }
    __syncthreads();
    {  // 4 groups x 4 rows x 16 j = 256 outputs: one per thread
      const int g = tid / 64, i = (tid / kShrinkRC) % 4, jj = tid % kShrinkRC;
      const int64_t m = static_cast<int64_t>(blockIdx.x) * kShrinkRows + g * 4 + i;
      const int j = j0 + jj;
      if (m < M && j < R) out[m * R + j] = red[g][0][i][jj] + red[g][1][i][jj];
    }
    __syncthreads();
  }
}

template <typename T, int RMAX, bool REDUCE, bool EXPAND>
__global__ void __launch_bounds__(256) colexp_kernel(
    const T* __restrict__ P, int64_t sp0, int64_t sp1, int64_t M, int64_t C, const float* __restrict__ Sm,
    int s_splits, int R, float s_scale, float* __restrict__ S_out, float* __restrict__ red, int64_t src,
    int64_t srj, const float* __restrict__ Q2, int64_t sq2c, int64_t sq2j, const T* __restrict__ bias,
    T* __restrict__ Z, int64_t rows_per_split, bool dropout, uint64_t seed, uint32_t thr, float keep_scale) {
  __shared__ __align__(16) float sS[kColTile][RMAX];
  __shared__ uint8_t sKeep[kColTile][32];
  const int tid = threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 256;
  const int64_t c = c0 + tid;
  const bool col_ok = c < C;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  float q2[RMAX];
  float acc[RMAX];
#pragma unroll
  for (int jj = 0; jj < RMAX; ++jj) {
    acc[jj] = 0.0f;
    q2[jj] = (EXPAND && col_ok && jj < R) ? __ldg(Q2 + c * sq2c + jj * sq2j) : 0.0f;
  }
  const float bv = (EXPAND && bias != nullptr && col_ok) ? to_f<T>(bias[c]) : 0.0f;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kColTile) {
    const int rows = static_cast<int>(m_end - m0 < kColTile ? m_end - m0 : kColTile);
    for (int idx = tid; idx < kColTile * RMAX; idx += 256) {
      const int i = idx / RMAX, j = idx % RMAX;
      float v = 0.0f;
      if (i < rows && j < R) {
        const int64_t off = (m0 + i) * R + j;
        for (int sp = 0; sp < s_splits; ++sp) v += Sm[sp * M * R + off];
        v *= s_scale;
        if (S_out != nullptr && blockIdx.x == 0) S_out[off] = v;
      }
      sS[i][j] = v;
    }
    if (dropout) {
      for (int idx = tid; idx < kColTile * 32; idx += 256) {
        const int i = idx / 32, g = idx % 32;
        const int64_t cg = c0 + g * 8;
        uint32_t bits = 0;
        if (i < rows && cg < C) {
          const int valid = static_cast<int>(C - cg < 8 ? C - cg : 8);
          bits = keep_bits_at(static_cast<uint64_t>((m0 + i) * C + cg), seed, thr, valid);
        }
        sKeep[i][g] = static_cast<uint8_t>(bits);
      }
    }
    __syncthreads();
    if (col_ok) {
      for (int i0 = 0; i0 < rows; i0 += 8) {
        float p[8];
        if (REDUCE) {
#pragma unroll
          for (int u = 0; u < 8; ++u) p[u] = (i0 + u < rows) ? to_f<T>(P[(m0 + i0 + u) * sp0 + c * sp1]) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (i0 + u >= rows) break;
          const bool keep = !dropout || ((sKeep[i0 + u][tid >> 3] >> (tid & 7)) & 1u);
          const float4* srow = reinterpret_cast<const float4*>(&sS[i0 + u][0]);
          float z = 0.0f;
          float pv = 0.0f;
          if (REDUCE) pv = keep ? (dropout ? to_f<T>(from_f<T>(p[u] * keep_scale)) : p[u]) : 0.0f;
#pragma unroll
          for (int j4 = 0; j4 < RMAX / 4; ++j4) {
            const float4 sv = srow[j4];
            if (REDUCE) {
              acc[4 * j4 + 0] = fmaf(pv, sv.x, acc[4 * j4 + 0]);
              acc[4 * j4 + 1] = fmaf(pv, sv.y, acc[4 * j4 + 1]);
              acc[4 * j4 + 2] = fmaf(pv, sv.z, acc[4 * j4 + 2]);
              acc[4 * j4 + 3] = fmaf(pv, sv.w, acc[4 * j4 + 3]);
            }
            if (EXPAND) {
              z = fmaf(sv.x, q2[4 * j4 + 0], z);
              z = fmaf(sv.y, q2[4 * j4 + 1], z);
              z = fmaf(sv.z, q2[4 * j4 + 2], z);
              z = fmaf(sv.w, q2[4 * j4 + 3], z);
            }
          }
          if (EXPAND) {
            z = dropout ? (keep ? z * keep_scale : 0.0f) : z + bv;
            Z[(m0 + i0 + u) * C + c] = from_f<T>(z);
          }
        }
      }
    }
    __syncthreads();
  }
  if (REDUCE && col_ok) {
#pragma unroll
    for (int jj = 0; jj < RMAX; ++jj)
      if (jj < R) atomicAdd(red + c * src + jj * srj, acc[jj]);
  }
}

// A mixed batch's adapters, as the mixed-batch kernels (decode_gemv's mixed variant, and the mixed section below)
// take them in their parameters: pointers, row strides, ranks and scalings of up to kMixedChunk adapters.
constexpr int kMixedChunk = 64;      // adapters per launch: 64 × 24 B of parameters (CUDA allows 4 KB)
constexpr int kMixedMaxRank = 64;    // ranks held in registers; larger ranks take the Triton kernels (Python side)

struct MixedChunk {
  const void* a[kMixedChunk];
  const void* b[kMixedChunk];
  int64_t a_row[kMixedChunk];  // row strides in elements (column strides are 1)
  int64_t b_row[kMixedChunk];
  int rank[kMixedChunk];
  float scale[kMixedChunk];
  int first;  // adapters first .. first + count - 1 of the op's lists
  int count;
};


// ------------------------------------------------------------------------------------------------ decode LoRA
// The forward at decode sizes (M <= kDecodeAutoMaxM rows under auto, no dropout): Y = X·Wᵀ + b by cuBLAS (the
// base layer's own product, rounded to the dtype as PEFT's base layer rounds it), then Y = dtype(Y + s·(X·Aᵀ)·Bᵀ)
// with the LoRA term in fp32 and one rounding (PEFT: `result + lora_B(lora_A(x)) * scaling` in fp32, cast back).
// Two small kernels beside the GEMV, both spread over the GPU (at these sizes every kernel here is latency-bound:
// the adapter's bytes, r·(K + N)·4, take 0.1-0.3 µs of HBM time), so their latency is hidden where it can be: while a
// CUDA graph is captured the shrink runs on a side stream beside the GEMV, and the expand is launched as a
// programmatic dependent of the GEMV (sm_90+), its adapter loads and launch overlapping the GEMV's tail (H200,
// M = 1, CUDA-graph replay: the pair's extra time over the GEMV 6.1-8.1 -> 2.6-5.0 µs per projection).
// Where it applies (16-bit x of <= 8 rows, aligned rows; see use_decode_gemv) the base product and the expand are
// instead one kernel of ours, decode_gemv below, launched as a programmatic dependent of the shrink: two launches.
// decode_shrink: part[split, m, j] = Σ_{k in split} X[m, k]·A[j, k]. Block: a K-slice of k_per_split columns
//   (a multiple of 128) of ONE row (blocks of 8 rows sharing X measured 2.2x slower on the down projection at 8
//   rows, H200); warp w owns the rank rows j = w, w + 8, ...; a lane reads 4 consecutive k per 128-column step
//   (16-byte A loads, 8-byte X loads, coalesced across the warp), keeps acc[JPW] in registers and the warp ends
//   with one butterfly reduction. Bound: latency; A is read once per row (r·K·4 bytes each,
//   L2 serves the rows after the first) plus X once per warp; FLOPs 2·M·K·r.
// decode_expand: Y[m, n] = dtype(Y[m, n] + Σ_j S[m, j]·B[n, j]), S = s·Σ_split part summed in a fixed order by
//   every block into shared memory (deterministic: no atomics, no zero-fill, no third launch), all 256 threads
//   sharing the partials' loads. Thread: one column n, B's row and the first 8 rows of Y loaded before the
//   re-sum (they do not depend on it), all M rows. Bound: B once (N·r·4 bytes) + Y read and written
//   (2·M·N·elem); the re-sum reads splits·M·r floats per block from L2 (the launcher keeps splits·M <= 256).
constexpr int kDecodeMaxM = 32;      // rows the kernels take (forced: set_lora_cuda_path(2))
constexpr int kDecodeAutoMaxM = 16;  // rows auto gives them: faster than the fused kernels on every Llama-8B
                                     // projection up to 16 rows (H200, bench_decode_layer.py), not at 32
constexpr int kDecodeWarps = 8;
constexpr int kDecodeStep = 128;  // K columns one warp covers per step: 32 lanes x 4
constexpr int kDecodeExpandThreads = 256;


// One block of the decode shrink: row xrow of X over columns [k_begin, k_end) against the first `rank` rows of A,
// into out[0 .. R): out[j] = 0 for rank <= j < R (a mixed batch's smaller ranks, and its base-model rows with
// rank 0, then read as zeros by whatever sums the partials).
template <typename T, typename TA, int JPW>
__device__ __forceinline__ void decode_shrink_block(const T* __restrict__ xrow, int64_t sx1, int64_t k_begin,
                                                    int64_t k_end, const TA* __restrict__ A, int64_t sa0, int64_t sa1,
                                                    int rank, int R, float* __restrict__ out, bool x_vec, bool a_vec) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[JPW];
#pragma unroll
  for (int jj = 0; jj < JPW; ++jj) acc[jj] = 0.0f;
  if (rank > 0) {  // block-uniform
#pragma unroll 2
    for (int64_t k = k_begin + lane * 4; k < k_end; k += kDecodeStep) {
      const int valid = static_cast<int>(k_end - k < 4 ? k_end - k : 4);
      float x[4];
      load_cols<T, 4>(xrow + k * sx1, sx1, valid, x_vec, x);
#pragma unroll
      for (int jj = 0; jj < JPW; ++jj) {
        const int j = warp + jj * kDecodeWarps;
        if (j < rank) {
          float a[4];
          load_cols<TA, 4>(A + j * sa0 + k * sa1, sa1, valid, a_vec, a);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[jj] = fmaf(x[e], a[e], acc[jj]);
        }
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < JPW; ++jj) {
    const int j = warp + jj * kDecodeWarps;
    if (j >= R) break;  // warp-uniform
    float v = acc[jj];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) out[j] = v;
  }
}

template <typename T, int JPW>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_shrink_kernel(
    const T* __restrict__ X, int64_t sx0, int64_t sx1, int64_t M, int64_t K, const float* __restrict__ A,
    int64_t sa0, int64_t sa1, int R, float* __restrict__ part, int64_t k_per_split, bool x_vec, bool a_vec,
    bool trigger) {
  // trigger: decode_gemv follows as a programmatic dependent and waits for this kernel before its epilogue; only
  // then (a cuBLAS GEMV next could start early and the expand's wait would not cover this kernel).
  if (trigger) allow_dependents();
  const int64_t m = blockIdx.y;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.x) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  decode_shrink_block<T, float, JPW>(X + m * sx0, sx1, k_begin, k_end, A, sa0, sa1, R, R,
                                     part + static_cast<int64_t>(blockIdx.x) * M * R + m * R, x_vec, a_vec);
}

// The decode shrink of a mixed batch: row m (segment m / tokens) against its own adapter's A, TW its dtype (fp32,
// or x's), into part[split, m, 0 .. R) with zeros past the adapter's rank and for base-model rows (adapter index
// -1, or one outside this chunk). The same blocks and bounds as decode_shrink_kernel; the adapter comes from the
// chunk in the kernel's parameters (__grid_constant__: indexed in place, not copied). part has the layout
// mixed_expand_kernel and decode_gemv's mixed variant read.
template <typename T, typename TW, int JPW>
__global__ void __launch_bounds__(kDecodeWarps * 32) mixed_decode_shrink_kernel(
    const T* __restrict__ X, int64_t sx0, int64_t sx1, int64_t M, int64_t K, const int* __restrict__ seg_of,
    int64_t tokens, const __grid_constant__ MixedChunk c, int R, float* __restrict__ part, int64_t k_per_split,
    bool x_vec, bool a_vec, bool trigger) {
  if (trigger) allow_dependents();
  const int64_t m = blockIdx.y;
  const int a = seg_of[m / tokens] - c.first;
  const bool own = a >= 0 && a < c.count;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.x) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  decode_shrink_block<T, TW, JPW>(X + m * sx0, sx1, k_begin, k_end,
                                  own ? static_cast<const TW*>(c.a[a]) : static_cast<const TW*>(nullptr),
                                  own ? c.a_row[a] : 0, 1, own ? c.rank[a] : 0, R,
                                  part + static_cast<int64_t>(blockIdx.x) * M * R + m * R, x_vec, a_vec);
}


// S[e] = scale·Σ_split part[split, e] for the MR = M·R entries of the decode shrink's partials, into sS [.][LD]
// (row e / R, column e % R) and, from block 0, S_out when given; with row_scale (a mixed batch: each row's own
// adapter scaling, in shared memory) row_scale[e / R] in place of scale. Entries in chunks of C <= THREADS:
// G = THREADS / C thread groups take every G-th split, then the chunk's C threads add the G group sums in order -- every thread
// shares the loads, and the order is fixed (deterministic: no atomics). red: THREADS floats of shared memory.
// Called by the whole block; returns with it synchronised.
template <int THREADS, int LD>
__device__ __forceinline__ void sum_split_partials(const float* __restrict__ part, int splits, int MR, int R,
                                                   float scale, float (*sS)[LD], float* red, float* __restrict__ S_out,
                                                   const float* row_scale = nullptr) {
  const int tid = threadIdx.x;
  for (int e0 = 0; e0 < MR; e0 += THREADS) {
    const int C = MR - e0 < THREADS ? MR - e0 : THREADS;
    const int G = THREADS / C;
    const int g = tid / C;
    if (g < G) {
      const float* p = part + e0 + tid % C;
      float v = 0.0f;
#pragma unroll 8
      for (int sp = g; sp < splits; sp += G) v += p[static_cast<int64_t>(sp) * MR];
      red[tid] = v;
    }
    __syncthreads();
    if (tid < C) {
      float v = 0.0f;
      for (int gg = 0; gg < G; ++gg) v += red[gg * C + tid];
      const int e = e0 + tid;
      v *= row_scale != nullptr ? row_scale[e / R] : scale;
      sS[e / R][e % R] = v;
      if (S_out != nullptr && blockIdx.x == 0) S_out[e] = v;
    }
    __syncthreads();
  }
}

// DoRA (mag != nullptr): Yout = dtype(g⊙(Y + Σ_j S·B) + bias) with g = mag / nrm per column (fp32, as DoRA's
// output pass: one rounding), and g, 1/nrm written to g_out / inv_out for the caller; Y (= X·Wᵀ, no bias) is then
// kept, Yout is another buffer. LoRA: Yout == Y, in place.
template <typename T, int RMAX>
__global__ void __launch_bounds__(kDecodeExpandThreads) decode_expand_kernel(
    const T* Y, int64_t sy0, int64_t M, int64_t N, const float* __restrict__ part, int splits, int R,
    float scale, float* __restrict__ S_out, const float* __restrict__ B, int64_t sb0, int64_t sb1, bool b_vec,
    T* Yout, int64_t syo0, const float* __restrict__ mag, const float* __restrict__ nrm, const T* __restrict__ bias,
    float* __restrict__ g_out, float* __restrict__ inv_out) {
  constexpr int kPre = 8;  // rows of Y read before the re-sum
  __shared__ __align__(16) float sS[kDecodeMaxM][RMAX];
  __shared__ float red[kDecodeExpandThreads];
  const int tid = threadIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kDecodeExpandThreads + tid;
  const bool col_ok = n < N;
  // B's row and the first rows of Y do not depend on S: their loads are in flight during the re-sum.
  float b[RMAX];
  if (b_vec && col_ok) {
    const float4* row = reinterpret_cast<const float4*>(B + n * sb0);
#pragma unroll
    for (int j4 = 0; j4 < RMAX / 4; ++j4) {
      const float4 v = 4 * j4 < R ? __ldg(row + j4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      b[4 * j4 + 0] = v.x;
      b[4 * j4 + 1] = v.y;
      b[4 * j4 + 2] = v.z;
      b[4 * j4 + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < RMAX; ++j) b[j] = col_ok && j < R ? __ldg(B + n * sb0 + j * sb1) : 0.0f;
  }
  for (int e = tid; e < M * RMAX; e += kDecodeExpandThreads)
    if (e % RMAX >= R) sS[e / RMAX][e % RMAX] = 0.0f;
  // Launched as a programmatic dependent of the base GEMV (decode_forward): everything above reads only what was
  // written before the GEMV started (the adapter), so it may run while the GEMV drains; Y and the shrink's
  // partials are read only after this wait, which returns once the GEMV (and any other prerequisite grid) has
  // completed and its writes are visible. Without the launch attribute the wait returns at once.
  wait_for_prerequisite_grids();
  float yv[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) yv[i] = col_ok && i < M ? to_f<T>(Y[i * sy0 + n]) : 0.0f;
  sum_split_partials<kDecodeExpandThreads, RMAX>(part, splits, static_cast<int>(M) * R, R, scale, sS, red, S_out);
  if (!col_ok) return;
  float gcol = 1.0f, bcol = 0.0f;
  if (mag != nullptr) {
    const float nv = nrm[n];
    gcol = __fdiv_rn(mag[n], nv);
    bcol = bias != nullptr ? to_f<T>(bias[n]) : 0.0f;
    if (g_out != nullptr) g_out[n] = gcol;
    if (inv_out != nullptr) inv_out[n] = __frcp_rn(nv);
  }
  const auto add_row = [&](int64_t m, float y) {
    const float4* srow = reinterpret_cast<const float4*>(&sS[m][0]);
    float z = 0.0f;
#pragma unroll
    for (int j4 = 0; j4 < RMAX / 4; ++j4) {
      const float4 sv = srow[j4];
      z = fmaf(sv.x, b[4 * j4 + 0], z);
      z = fmaf(sv.y, b[4 * j4 + 1], z);
      z = fmaf(sv.z, b[4 * j4 + 2], z);
      z = fmaf(sv.w, b[4 * j4 + 3], z);
    }
    Yout[m * syo0 + n] = from_f<T>(mag != nullptr ? fmaf(gcol, y + z, bcol) : y + z);
  };
  for (int64_t m0 = 0; m0 < M; m0 += kPre) {
    if (m0 > 0) {  // the next 8 rows' loads issued together, not one round trip per row
#pragma unroll
      for (int i = 0; i < kPre; ++i) yv[i] = m0 + i < M ? to_f<T>(Y[(m0 + i) * sy0 + n]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kPre; ++i)
      if (m0 + i < M) add_row(m0 + i, yv[i]);
  }
}

// decode_gemv: the base GEMV of the decode forward as our own kernel, with the LoRA expand (or DoRA's output
// scaling) in its epilogue -- two launches per projection instead of three, and no dependent kernel after the GEMV:
//   LoRA:  Y[m, n] = dtype(dtype(Σ_k X[m, k]·W[n, k] + bias[n]) + Σ_j S[m, j]·B[n, j])   (PEFT's two roundings)
//   DoRA:  Z0[m, n] = dtype(Σ_k X·W);  Yout = dtype(g⊙(Z0 + Σ_j S·B) + bias), g = mag / nrm   (as decode_expand)
// with S = s·Σ_split part, the decode shrink's partials re-summed by every block in a fixed order.
// Bound: bytes -- W (2·N·K) streamed once; x (M·K·2) is re-read by every block, from L2. At M <= 8 the FLOPs go
// to the tensor cores at no cost: x rows are rows 0..7 of the m16 side of an mma.sync m16n8k16 and a block's 16
// weight rows its two n8 tiles (the NF4 GEMV's layout, csrc/nf4_gemv.cu, without the dequantization).
// Work split: a block owns 16 output columns at a time; its 8 warps split K in 128-weight segments (warp w takes
// segments w, w + 8, ...; partial sums meet in shared memory). In a segment lane (g = lane/4, t = lane%4) loads the
// 8 weights k0 + 32i + 8t .. +7 of rows g and g+8 for i = 0..3 (16-byte loads: in each, a row's 4 lanes read 64
// contiguous bytes, whole sectors; the loads bypass L1), and x's values at the same k. The k order inside an mma
// is free as long as both operands agree: k-step u (0..7) takes the lane's 32-bit words 2u, 2u+1 of both. (Lanes
// reading 64 contiguous bytes each instead, as the NF4 kernel's lanes read their 16 packed bytes, left each load
// using half of every sector it touched: gate/up at M = 1 took 46.8 µs, 43.0 without, cuBLAS + expand 35.3.)
// Latency: each warp keeps its next segment's weights and x in flight while it computes one (two register
// buffers); blocks are persistent (as many as fit, each walking several 16-column tiles where N is large), so the
// next tile's first loads are in flight during a tile's epilogue, and B's rows and the column's bias / magnitude /
// norm are fetched a tile ahead (cp.async / registers): the epilogue waits on nothing from global memory but the
// shrink's partials, once a block. (One 16-column tile a block, its epilogue fetching B and x as it went:
// 49-64 % of DRAM bandwidth on gate/up and down at M = 1, ncu, H200.)
// Launched as a programmatic dependent of the shrink (sm_90+), which allows it at once: the weight stream runs
// beside the shrink, and only the epilogue waits for the partials.
constexpr int kGemvRows = 16;
constexpr int kGemvSeg = 128;
constexpr int kGemvWarps = 8;
constexpr int kGemvMaxM = 8;  // x rows: the first half of the mma's m16 tile

// x's rows are rows 0..7 of the mma's m16 tile (M <= 8: rows 8..15 are zeros, never loaded); 128 registers, two
// blocks an SM. (Rows 9..16 as the tile's other half took 195 registers and one block an SM, and measured slower
// than cuBLAS + expand on gate/up and down under graph replay at 16 rows, 55.8 / 54.7 against 40.2 / 45.1 µs:
// those calls keep the cuBLAS composition.)
// Mix: OneAdapter (the expand of one adapter: B, sb0, sb1, scale, R), or MixedDecode (a mixed batch, LoRA only:
// each row m its own adapter, seg_of[m / tokens] in the chunk, fp32 weights of rank <= kMixedGemvRank; the shrink's
// partials are mixed_decode_shrink_kernel's, zero past each row's rank and for base-model rows, and B, sb0, sb1,
// scale are unused). The mixed variant stages every row's B rows (32 KB of shared memory: still two blocks an SM).
struct OneAdapter {};
struct MixedDecode {
  const int* seg_of;
  int64_t tokens;
  MixedChunk c;
};
constexpr int kMixedGemvRank = 32;

template <typename T, typename Mix>
__global__ void __launch_bounds__(kGemvWarps * 32, 2) decode_gemv_kernel(
    const T* __restrict__ X, int64_t sx0, int M, int K, const T* __restrict__ W, int64_t sw0, int64_t N,
    const T* __restrict__ bias, const float* __restrict__ part, int splits, int R, float scale,
    float* __restrict__ S_out, const float* __restrict__ B, int64_t sb0, int64_t sb1, bool b_vec,
    T* __restrict__ Y, T* __restrict__ Yout, const float* __restrict__ mag, const float* __restrict__ nrm,
    float* __restrict__ g_out, float* __restrict__ inv_out, const __grid_constant__ Mix mix) {
  constexpr bool kMixed = std::is_same<Mix, MixedDecode>::value;
  constexpr int kBRows = kMixed ? kGemvMaxM : 1;        // B staged per row (mixed) or once
  constexpr int kBRank = kMixed ? kMixedGemvRank : 64;
  __shared__ float partial[kGemvWarps][kGemvMaxM][kGemvRows];
  __shared__ __align__(16) float sS[kGemvMaxM][64];
  __shared__ __align__(16) float sB[2][kBRows][kGemvRows][kBRank];  // B's rows of this tile and the next (cp.async)
  __shared__ float red[kGemvWarps * 32];
  __shared__ int row_adapter[kGemvMaxM], row_rank[kGemvMaxM];  // mixed: each row's adapter in the chunk (-1: none)
  __shared__ float row_scale[kGemvMaxM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if constexpr (kMixed) {
    if (tid < kGemvMaxM) {
      int a = -1;
      if (tid < M) {
        a = mix.seg_of[tid / mix.tokens] - mix.c.first;
        if (a < 0 || a >= mix.c.count) a = -1;
      }
      row_adapter[tid] = a;
      row_rank[tid] = a >= 0 ? mix.c.rank[a] : 0;
      row_scale[tid] = a >= 0 ? mix.c.scale[a] : 0.f;
    }
    __syncthreads();
  }
  const int g = lane >> 2, t = lane & 3;
  const int nseg = (K + kGemvSeg - 1) / kGemvSeg;
  const int64_t ntiles = (N + kGemvRows - 1) / kGemvRows;
  // Persistent blocks: block b takes tiles b, b + gridDim.x, ... Each warp's stream of (tile, segment) items runs
  // across tile boundaries, so the next tile's first weights are in flight during a tile's epilogue.
  const int my_tiles = static_cast<int>((ntiles - blockIdx.x + gridDim.x - 1) / gridDim.x);
  const int segs = warp < nseg ? (nseg - warp + kGemvWarps - 1) / kGemvWarps : 0;  // this warp's, per tile
  const int items = segs * my_tiles;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  const auto tile_n0 = [&](int ti) { return (blockIdx.x + static_cast<int64_t>(ti) * gridDim.x) * kGemvRows; };

  // One item's operands: W rows g and g+8 of the tile, and x row g, 16-byte pieces at
  // k + 32i (K % 8 == 0, the launcher's condition: a piece is wholly inside K or wholly outside). x is loaded here,
  // an item ahead, too: each x value is used by one warp of a block, so it comes from L2, not L1.
  struct Item {
    uint4 w[2][4];
    uint4 x[4];
  };
  const auto load = [&](int q, Item& it) {
    const bool ok = q < items;
    const int ti = ok ? q / segs : 0;
    const int k = (warp + kGemvWarps * (ok ? q - ti * segs : 0)) * kGemvSeg + 8 * t;
    const int64_t n0 = tile_n0(ti);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t n = n0 + 8 * j + g;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        it.w[j][i] = ok && n < N && k + 32 * i < K ? load_stream16(W + n * sw0 + k + 32 * i) : zero;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
      it.x[i] = ok && g < M && k + 32 * i < K ? __ldg(reinterpret_cast<const uint4*>(X + g * sx0 + k + 32 * i)) : zero;
  };
  // Every lane reaches the mma.sync (.aligned): lanes past K or past the rows compute on zeros.
  const auto compute = [&](const Item& it, float (&c)[2][4]) {
    const uint32_t* xl = reinterpret_cast<const uint32_t*>(it.x);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t* ww = reinterpret_cast<const uint32_t*>(it.w[j]);
#pragma unroll
      for (int u = 0; u < 8; ++u) mma_16816<T>(c[j], xl[2 * u], 0u, xl[2 * u + 1], 0u, ww[2 * u], ww[2 * u + 1]);
    }
  };
  // This tile's B rows into sB[buf] by cp.async (they do not depend on the shrink), waited for before the epilogue.
  // One adapter's rows into sB[buf][row]: rank columns of rows n0 .. n0 + 15 of Bp (row stride sbr, column stride
  // sbc; vec: rank % 4 == 0 and rows 16-byte aligned).
  const auto stage_rows = [&](int64_t n0, int buf, int row, const float* Bp, int64_t sbr, int64_t sbc, int rank,
                              bool vec) {
    if (vec) {
      for (int e = tid; e < kGemvRows * (rank / 4); e += kGemvWarps * 32) {
        const int r = e / (rank / 4), c4 = e % (rank / 4);
        const bool ok = n0 + r < N;
        copy_async<16>(&sB[buf][row][r][4 * c4], Bp + (ok ? (n0 + r) * sbr : 0) + 4 * c4, ok);
      }
    } else {
      for (int e = tid; e < kGemvRows * rank; e += kGemvWarps * 32) {
        const int r = e / rank, j = e % rank;
        const bool ok = n0 + r < N;
        copy_async<4>(&sB[buf][row][r][j], Bp + (ok ? (n0 + r) * sbr + j * sbc : 0), ok);
      }
    }
  };
  const auto stage_B = [&](int ti, int buf) {
    const int64_t n0 = tile_n0(ti);
    if constexpr (kMixed) {  // each row's own adapter (rows sharing one copy it twice: M <= 8)
      for (int m = 0; m < M; ++m) {
        const int a = row_adapter[m];
        if (a >= 0)
          stage_rows(n0, buf, m, static_cast<const float*>(mix.c.b[a]), mix.c.b_row[a], 1, row_rank[m], b_vec);
      }
    } else {
      stage_rows(n0, buf, 0, B, sb0, sb1, R, b_vec);
    }
    copy_async_commit();
  };

  // The output this thread writes in each tile's epilogue (M·16 <= 256 = the block), and its column's values
  // loaded a tile ahead: the epilogue then waits on nothing from global memory.
  const int om = tid / kGemvRows, onl = tid % kGemvRows;
  const bool writes = om < M;
  float bias_v = 0.f, mag_v = 1.f, nrm_v = 1.f;
  const auto load_col = [&](int ti) {
    const int64_t n = tile_n0(ti) + onl;
    if (writes && n < N) {
      bias_v = bias != nullptr ? to_f<T>(bias[n]) : 0.f;
      if (mag != nullptr) {
        mag_v = mag[n];
        nrm_v = nrm[n];
      }
    }
  };

  Item bufs[2];
  load(0, bufs[0]);
  if (my_tiles > 0) stage_B(0, 0);
  int q = 0;
  for (int ti = 0; ti < my_tiles; ++ti) {
    load_col(ti);
    float c[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[j][i] = 0.f;
    // Two register buffers in turn (item q in bufs[q & 1], the branch warp-uniform): the next item's loads are
    // issued before this one is computed, with no register copies, across tile boundaries too.
    for (int i = 0; i < segs; ++i, ++q) {
      if ((q & 1) == 0) {
        load(q + 1, bufs[1]);
        compute(bufs[0], c);
      } else {
        load(q + 1, bufs[0]);
        compute(bufs[1], c);
      }
    }
    __syncthreads();  // the previous tile's epilogue has read partial and sB[(ti + 1) & 1]
    if (ti + 1 < my_tiles) stage_B(ti + 1, (ti + 1) & 1);
    // C fragment: c[j][0..1] = (m = g, n = 8j + 2t + 0..1); c[j][2..3] are rows 8..15 (zero)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      partial[warp][g][8 * j + 2 * t] = c[j][0];
      partial[warp][g][8 * j + 2 * t + 1] = c[j][1];
    }
    if (ti == 0) {
      // Everything so far read only x (written before the shrink started), W and B; the shrink's partials only
      // after this wait, which returns once the shrink has completed and its writes are visible.
      wait_for_prerequisite_grids();
      sum_split_partials<kGemvWarps * 32, 64>(part, splits, M * R, R, scale, sS, red, S_out,
                                              kMixed ? row_scale : nullptr);
    }
    // this tile's B rows have landed (the next tile's copies, committed after them, may still be in flight)
    if (ti + 1 < my_tiles) {
      copy_async_wait<1>();
    } else {
      copy_async_wait<0>();
    }
    __syncthreads();
    const int64_t n = tile_n0(ti) + onl;
    if (!writes || n >= N) continue;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) acc += partial[w][om][onl];
    const float* brow = &sB[ti & 1][kMixed ? om : 0][onl][0];
    const int rank = kMixed ? row_rank[om] : R;
    float z = 0.f;
    for (int j = 0; j < rank; ++j) z = fmaf(sS[om][j], brow[j], z);
    const int64_t at_mn = static_cast<int64_t>(om) * N + n;
    if (Yout == nullptr) {  // LoRA: the base output rounded as the base layer rounds it, then the term, rounded
      const T base = from_f<T>(bias != nullptr ? acc + bias_v : acc);
      Y[at_mn] = from_f<T>(to_f<T>(base) + z);
    } else {  // DoRA: Z0 kept for the backward; g = m / n, 1/n for the caller
      const T z0 = from_f<T>(acc);
      Y[at_mn] = z0;
      const float gcol = __fdiv_rn(mag_v, nrm_v);
      Yout[at_mn] = from_f<T>(fmaf(gcol, to_f<T>(z0) + z, bias_v));
      if (om == 0) {
        if (g_out != nullptr) g_out[n] = gcol;
        if (inv_out != nullptr) inv_out[n] = __frcp_rn(nrm_v);
      }
    }
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
Tensor pack_split(const Tensor& src32, Pattern pat, at::ScalarType dt, const Tensor& row_scale = Tensor()) {
  const int64_t rows = src32.size(0), cols = src32.size(1);
  Tensor dst = at::empty({rows, pat.parts * cols}, src32.options().dtype(dt));
  if (rows * cols == 0) return dst;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pack_split_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
        src32.data_ptr<float>(), rows, cols, src32.stride(0), src32.stride(1),
        row_scale.defined() ? row_scale.data_ptr<float>() : nullptr, reinterpret_cast<T*>(dst.data_ptr()), pat);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

// pack_split of several fp32 matrices in one launch, into one allocation. Each region is a [rows, width] matrix
// starting on a 128-byte boundary (cuBLAS reads them as GEMM operands); a job writes its source's parts into a
// region from column col_off on (one job filling a region: width = parts·cols; grouped projections put one job per
// member side by side). Temporaries only: never hand a region out as a gradient (it would keep the whole buffer
// alive, and a view as .grad surprises code that expects its own storage).
class PackBatch {
 public:
  int region(int64_t rows, int64_t width) {
    constexpr int64_t kAlign = 64;  // elements of a 16-bit dtype: 128 bytes
    regions_.push_back({total_, rows, width});
    total_ += (rows * width + kAlign - 1) / kAlign * kAlign;
    return static_cast<int>(regions_.size()) - 1;
  }
  // src: fp32 [rows, cols], any strides; row_scale: fp32 [rows] contiguous or undefined
  void add(int reg, const Tensor& src, Pattern pat, int64_t col_off = 0, const Tensor& row_scale = Tensor()) {
    TORCH_INTERNAL_ASSERT(jobs_.n < kMaxPackJobs, "PackBatch: at most ", kMaxPackJobs, " jobs");
    TORCH_INTERNAL_ASSERT(src.scalar_type() == at::kFloat && src.dim() == 2, "PackBatch: fp32 matrices");
    const Region& g = regions_[reg];
    TORCH_INTERNAL_ASSERT(src.size(0) == g.rows && col_off + pat.parts * src.size(1) <= g.width, "PackBatch: fit");
    const int64_t n = src.size(0) * src.size(1);
    jobs_.job[jobs_.n] = PackJob{src.data_ptr<float>(), src.size(0), src.size(1), src.stride(0), src.stride(1),
                                 row_scale.defined() ? row_scale.data_ptr<float>() : nullptr, g.offset + col_off,
                                 g.width, pat};
    done_ += n;
    jobs_.end[jobs_.n++] = done_;
  }
  // one allocation, one launch; one [rows, width] view per region, in the order they were declared
  std::vector<Tensor> run(const at::TensorOptions& options, at::ScalarType dt) {
    Tensor buf = at::empty({std::max<int64_t>(total_, 1)}, options.dtype(dt));
    std::vector<Tensor> out;
    for (const Region& g : regions_) out.push_back(buf.as_strided({g.rows, g.width}, {g.width, 1}, g.offset));
    if (done_ > 0) {
      dispatch_16(dt, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        pack_splits_kernel<T><<<blocks_for(done_), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            jobs_, reinterpret_cast<T*>(buf.data_ptr()));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return out;
  }

 private:
  struct Region {
    int64_t offset, rows, width;
  };
  std::vector<Region> regions_;
  PackJobs jobs_{};
  int64_t total_ = 0, done_ = 0;
};

struct PackSpec {
  Tensor src;  // fp32 [rows, cols], any strides
  Pattern pat;
  Tensor row_scale;  // fp32 [rows] contiguous, or undefined
};

// one region per spec, each filled by its own job
std::vector<Tensor> pack_splits(const std::vector<PackSpec>& specs, at::ScalarType dt) {
  TORCH_INTERNAL_ASSERT(!specs.empty(), "pack_splits: no jobs");
  PackBatch batch;
  for (const PackSpec& sp : specs)
    batch.add(batch.region(sp.src.size(0), sp.pat.parts * sp.src.size(1)), sp.src, sp.pat, 0, sp.row_scale);
  return batch.run(specs[0].src.options(), dt);
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

// DoRA's backward: dm (fp32 [N], holding the pass's (Σ_rows dY⊙Z0)/n) gets Σ_j B[n, j]·(dYᵀ·S')[n, j] / n added
// where dB's GEMM is combined (B32 [N, r] and inv_n [N] fp32 contiguous)
struct DoraDmTerm {
  Tensor B32, inv_n, dm;
};

// The halves of several split GEMMs summed in one launch. Each spec: P (contiguous fp32) [2R, C] summed over row
// halves (row_halves) or [R, 2C] over column halves, times scale [R] per row when given (column halves only).
struct CombineSpec {
  Tensor P;
  bool row_halves;
  Tensor scale;
  Tensor dot_b, dot_scale, dot_out;  // DoRA's dm term (column halves only; all three or none)
};

std::vector<Tensor> combine_halves_many(const std::vector<CombineSpec>& specs) {
  TORCH_INTERNAL_ASSERT(specs.size() <= kMaxCombineJobs, "combine_halves: at most ", kMaxCombineJobs, " jobs");
  CombineJobs jobs{};
  std::vector<Tensor> outs;
  int64_t done = 0;
  for (const CombineSpec& sp : specs) {
    const Tensor& P = sp.P;
    TORCH_INTERNAL_ASSERT(!sp.scale.defined() || (!sp.row_halves && sp.scale.numel() == P.size(0)),
                          "combine_halves: row scale");
    TORCH_INTERNAL_ASSERT(P.is_contiguous() && P.scalar_type() == at::kFloat, "combine_halves: contiguous fp32 P");
    const int64_t R = sp.row_halves ? P.size(0) / 2 : P.size(0), C = sp.row_halves ? P.size(1) : P.size(1) / 2;
    outs.push_back(at::empty({R, C}, P.options()));
    const int64_t outer = sp.row_halves ? 1 : R, inner = sp.row_halves ? R * C : C;
    const int64_t stride = sp.row_halves ? 0 : 2 * C, half = sp.row_halves ? R * C : C;
    const bool dot = sp.dot_out.defined();
    TORCH_INTERNAL_ASSERT(!dot || (!sp.row_halves && sp.dot_b.is_contiguous() && sp.dot_b.numel() == R * C &&
                                   sp.dot_scale.numel() == R && sp.dot_out.numel() == R),
                          "combine_halves: dot term");
    jobs.job[jobs.n] = CombineJob{P.data_ptr<float>(), outer, inner, stride, half,
                                  sp.scale.defined() ? sp.scale.data_ptr<float>() : nullptr, outs.back().data_ptr<float>(),
                                  dot ? sp.dot_b.data_ptr<float>() : nullptr,
                                  dot ? sp.dot_scale.data_ptr<float>() : nullptr,
                                  dot ? sp.dot_out.data_ptr<float>() : nullptr};
    done += R * C;
    jobs.end[jobs.n++] = done;
  }
  if (done > 0) {
    combine_halves_kernel<<<blocks_for(done), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(jobs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return outs;
}

// dB's and dA's halves (either undefined: not wanted) in one launch, with DoRA's dm term on dB's when dm is given.
// Returns (dB, dA).
std::tuple<Tensor, Tensor> combine_halves2(const Tensor& PdB, const Tensor& g, const Tensor& PdA,
                                           const DoraDmTerm* dm = nullptr) {
  std::vector<CombineSpec> specs;
  if (PdB.defined()) {
    specs.push_back({PdB, false, g});
    if (dm != nullptr) {
      specs.back().dot_b = dm->B32;
      specs.back().dot_scale = dm->inv_n;
      specs.back().dot_out = dm->dm;
    }
  }
  if (PdA.defined()) specs.push_back({PdA, true, Tensor()});
  auto outs = combine_halves_many(specs);
  Tensor dB = PdB.defined() ? outs[0] : Tensor();
  Tensor dA = PdA.defined() ? outs.back() : Tensor();
  return {dB, dA};
}

// Whether 8 consecutive elements of every row of t (2-D) can move as one 16-byte access.
bool vec16(const Tensor& t) {
  return t.element_size() == 2 && (t.size(1) == 1 || t.stride(1) == 1) && t.stride(0) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// grid for the row-strided elementwise kernels: x over 8-column chunks, y over rows (each block strides on)
dim3 rows_grid(int64_t M, int64_t cols) {
  const int64_t xb = (cols + kThreads * 8 - 1) / (kThreads * 8);
  const int64_t yb = std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(1, 8 * sm_count() / xb)));
  return dim3(static_cast<unsigned>(xb), static_cast<unsigned>(std::min<int64_t>(yb, 65535)));
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
  const bool vs = vec16(src), vd = vec16(dst);
  dispatch_all(src.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_apply_kernel<T><<<rows_grid(M, K), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(src.data_ptr()), src.stride(0), src.stride(1), reinterpret_cast<T*>(dst.data_ptr()),
        M, K, static_cast<uint64_t>(seed), thr, ks, vs, vd);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

Tensor scale_cols(const Tensor& a, const Tensor& l32) {
  const int64_t M = a.size(0), N = a.size(1);
  Tensor out = at::empty({M, N}, a.options());
  if (M * N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool va = vec16(a), vo = vec16(out);
  dispatch_all(a.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    scale_cols_kernel<T><<<rows_grid(M, N), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(a.data_ptr()), a.stride(0), a.stride(1), l32.data_ptr<float>(),
        reinterpret_cast<T*>(out.data_ptr()), M, N, va, vo);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The largest rank dora_pass_kernel holds in registers; larger ranks take ATen (an fp32 [M, N] temporary).
constexpr int kDoraMaxRank = 64;

// Lets `kernel` take `bytes` of dynamic shared memory where that is over the 48 KB default: once per device, recorded
// in the caller's flags (each kernel instantiation keeps its own)
template <typename Kernel>
void smem_opt_in(bool (&done)[64], Kernel kernel, int bytes) {
  const int dev = at::cuda::current_device();
  if (bytes > 48 * 1024 && !done[dev % 64]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done[dev % 64] = true;
  }
}

// dora_pass_kernel over Z0 [M, N]: returns Y. g_div (fp32 [N] contiguous): g32 holds m and the kernel takes
// g = m / g_div. Launches dora_pass_kernel with its tile's dynamic shared memory (64-113 KB, over the 48 KB default
// at every tile: the opt-in is set once per instantiation and device)
template <typename T, int RMAX>
void dora_pass_opt_in() {
  static bool opted_in[64] = {};
  smem_opt_in(opted_in, dora_pass_kernel<T, RMAX>, DoraTile<T, RMAX>::SMEM_BYTES);
}

template <typename T, int RMAX, typename... Args>
void launch_dora_pass(dim3 grid, cudaStream_t stream, Args... args) {
  dora_pass_opt_in<T, RMAX>();
  dora_pass_kernel<T, RMAX><<<grid, kDoraThreads, DoraTile<T, RMAX>::SMEM_BYTES, stream>>>(args...);
}

// Blocks of `kernel` resident on one SM at once (its registers and shared memory decide), at least 1, queried once
// per device into the caller's cache (each kernel instantiation keeps its own)
template <typename Kernel>
int64_t resident_blocks(int (&per_sm)[64], Kernel kernel, int threads, int smem) {
  const int dev = at::cuda::current_device();
  if (per_sm[dev % 64] == 0) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
    per_sm[dev % 64] = std::max(blocks, 1);
  }
  return per_sm[dev % 64];
}

// dora_pass_kernel<T, RMAX>'s resident blocks (3 for the rank-16 tile on an H200)
template <typename T, int RMAX>
int64_t dora_pass_per_sm() {
  static int per_sm[64] = {};
  dora_pass_opt_in<T, RMAX>();  // its shared memory is allowed before the query
  return resident_blocks(per_sm, dora_pass_kernel<T, RMAX>, kDoraThreads, DoraTile<T, RMAX>::SMEM_BYTES);
}

// dora_bwd_stream_kernel<T>'s resident blocks (3 on an H200: its launch bounds)
template <typename T>
int64_t dora_bwd_stream_per_sm() {
  static int per_sm[64] = {};
  return resident_blocks(per_sm, dora_bwd_stream_kernel<T>, kStreamThreads, 0);
}

// How many blocks share a column block's row tiles: the fewest waves × (tiles per block + 1), a wave being as many
// blocks as are resident at once, each block walking its tiles one after another behind a prologue worth about one
// tile (B's tile, g and the bias loaded, the first tile's copy not hidden), so that no last wave keeps a fraction of
// the GPU busy for a whole block's time; among equals the fewest blocks. Llama-8B q/o at 4096 rows, rank 16 (396
// slots): 11 splits of 6 tiles (352 blocks, one wave) where "about 4 blocks an SM" gave 16 of 4 (512 blocks: 1.3
// waves; ncu: 41.6 µs, DRAM 22 %, session 23); gate/up 7 of 10 (784 blocks, 2 waves) for 8 of 8 (896, 2.3).
// dora_out_kernel (the register form) passes prologue = 4: its blocks hold B's fragments and fill STAGES - 1 tiles
// of 16 rows before the first is used.
int64_t dora_pass_splits(int64_t tiles, int64_t col_blocks, int64_t per_sm, int64_t prologue = 1) {
  if (tiles <= 1) return 1;
  const int64_t slots = std::max<int64_t>(1, per_sm * sm_count());
  int64_t best = tiles, best_cost = -1;
  for (int64_t per_block = 1; per_block <= tiles;) {  // each distinct split count once: O(√tiles) steps
    const int64_t splits = (tiles + per_block - 1) / per_block;
    const int64_t cost = (col_blocks * splits + slots - 1) / slots * (per_block + prologue);
    if (best_cost < 0 || cost < best_cost || (cost == best_cost && splits < best)) {
      best = splits;
      best_cost = cost;
    }
    if (splits == 1) break;
    per_block = (tiles + splits - 2) / (splits - 1);  // the smallest per_block giving fewer splits
  }
  return best;
}

// dora_out_kernel<T>'s shared-memory opt-in (over the 48 KB default), once per device, and its resident blocks
template <typename T>
int64_t dora_out_per_sm() {
  static bool opted_in[64] = {};
  static int per_sm[64] = {};
  smem_opt_in(opted_in, dora_out_kernel<T>, DoraOutTile<T>::SMEM_BYTES);
  return resident_blocks(per_sm, dora_out_kernel<T>, kOutThreads, DoraOutTile<T>::SMEM_BYTES);
}

// dora_pass's register form (dora_out_kernel, ranks <= kOutRank, sm_80+) into out (M, N > 0; the 16-byte access
// flags as dora_pass found them). tiles_per_block > 0 fixes a block's 16-row tiles (the set_dora_pass_form hook);
// 0 takes the wave model.
void dora_out(const Tensor& Z0, const Tensor& S, const Tensor& B32, const Tensor& g32, const Tensor& bias,
              const Tensor& g_div, Tensor& out, int64_t tiles_per_block, bool vec_z, bool vec_o, bool vec_s) {
  const int64_t M = Z0.size(0), N = Z0.size(1);
  const int R = static_cast<int>(S.size(1));
  const int64_t col_blocks = (N + kOutWarps * kOutCols - 1) / (kOutWarps * kOutCols);
  const int64_t tiles = (M + 15) / 16;
  int64_t per_sm = 1;
  dispatch_all(Z0.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    per_sm = dora_out_per_sm<T>();
  });
  int64_t per_block = tiles_per_block;
  if (per_block <= 0) {
    const int64_t splits = dora_pass_splits(tiles, col_blocks, per_sm, 4);
    per_block = std::max<int64_t>(1, (tiles + splits - 1) / splits);
  }
  per_block = std::min<int64_t>(per_block, int64_t{1} << 26);  // a block's rows fit the kernel's int row counts
  per_block = std::max<int64_t>(per_block, (tiles + 65534) / 65535);  // the grid's y extent stays within 65535
  const int64_t rows_per_block = per_block * 16;
  const int64_t splits = (M + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(Z0.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dora_out_kernel<T><<<grid, kOutThreads, DoraOutTile<T>::SMEM_BYTES, stream>>>(
        reinterpret_cast<const T*>(Z0.data_ptr()), Z0.stride(0), Z0.stride(1), S.data_ptr<float>(), S.stride(0),
        S.stride(1), B32.data_ptr<float>(), B32.stride(0), B32.stride(1), g32.data_ptr<float>(),
        g_div.defined() ? g_div.data_ptr<float>() : nullptr,
        bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr, reinterpret_cast<T*>(out.data_ptr()),
        M, N, R, rows_per_block, vec_z, vec_o, vec_s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor dora_pass(const Tensor& Z0, const Tensor& S, const Tensor& B32, const Tensor& g32, const Tensor& bias,
                 const Tensor& g_div = Tensor()) {
  const int64_t M = Z0.size(0), N = Z0.size(1);
  const int R = static_cast<int>(S.size(1));
  TORCH_CHECK(R <= kDoraMaxRank, "fastpeft dora: dora_pass takes ranks up to ", kDoraMaxRank);
  Tensor out = at::empty({M, N}, Z0.options());
  if (M == 0 || N == 0) return out;
  // 16-byte accesses need unit column strides and rows aligned to 16 bytes
  const int64_t vec = 16 / Z0.element_size();
  const bool vec_z = Z0.stride(1) == 1 && Z0.stride(0) % vec == 0 && reinterpret_cast<uintptr_t>(Z0.data_ptr()) % 16 == 0;
  const bool vec_o = N % vec == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  // S's rows by 16-byte copies: unit column stride, rows of a multiple of 4 floats, 16-byte aligned
  const bool vec_s = S.stride(1) == 1 && R % 4 == 0 && S.stride(0) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(S.data_ptr()) % 16 == 0;
  // dora_pass_form(): -1 automatic (the register form at ranks <= 16 on sm_80+), 0 the tiled kernel, n > 0 the
  // register form with n row tiles a block (adapter_ops.cpp: set_dora_pass_form)
  const int64_t form = dora_pass_form();
  if (form != 0 && R <= kOutRank && at::cuda::getCurrentDeviceProperties()->major >= 8) {
    dora_out(Z0, S, B32, g32, bias, g_div, out, form > 0 ? form : 0, vec_z, vec_o, vec_s);
    return out;
  }
  const int rmax = R <= 16 ? 16 : (R <= 32 ? 32 : 64);
  const int64_t bn = rmax <= 32 ? DoraTile<float, 16>::BN : DoraTile<float, 64>::BN;
  const int64_t bm = rmax > 32 ? DoraTile<float, 64>::BM : DoraTile<float, 16>::BM;
  const int64_t col_blocks = (N + bn - 1) / bn;
  const int64_t tiles = (M + bm - 1) / bm;
  int64_t per_sm = 1;
  dispatch_all(Z0.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    per_sm = rmax == 16 ? dora_pass_per_sm<T, 16>() : (rmax == 32 ? dora_pass_per_sm<T, 32>() : dora_pass_per_sm<T, 64>());
  });
  int64_t splits = dora_pass_splits(tiles, col_blocks, per_sm);
  const int64_t rows_per_block = std::max<int64_t>(1, (tiles + splits - 1) / splits) * bm;
  splits = (M + rows_per_block - 1) / rows_per_block;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits));
  dispatch_all(Z0.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* z0p = reinterpret_cast<const T*>(Z0.data_ptr());
    const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
    T* op = reinterpret_cast<T*>(out.data_ptr());
    const float* gdp = g_div.defined() ? g_div.data_ptr<float>() : nullptr;
#define FP_DORA_PASS(RM)                                                                                          \
  launch_dora_pass<T, RM>(grid, stream, z0p, Z0.stride(0), Z0.stride(1), S.data_ptr<float>(), S.stride(0),        \
                          S.stride(1), B32.data_ptr<float>(), B32.stride(0), B32.stride(1), g32.data_ptr<float>(), \
                          gdp, bp, op, M, N, R, rows_per_block, vec_z, vec_o, vec_s)
    if (rmax == 16) FP_DORA_PASS(16); else if (rmax == 32) FP_DORA_PASS(32); else FP_DORA_PASS(64);
#undef FP_DORA_PASS
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (g, 1/n) from T = 2s·W·Aᵀ + s²·B·(A·Aᵀ) [N, R], B [N, R], w_sq = ‖W‖² per row and m (all fp32)
// (g, 1/n) from P = W·Aᵀ [N, R] (or the split GEMM's halves [N, 2R]), B [N, R], AA = A·Aᵀ [R, R], w_sq = ‖W‖² per
// row and m (all fp32, contiguous)
std::tuple<Tensor, Tensor> dora_norm_scale(const Tensor& P, const Tensor& B32, const Tensor& AA, double scaling,
                                           const Tensor& w_sq, const Tensor& m32) {
  const int64_t N = B32.size(0), R = B32.size(1);
  const bool halves = P.size(1) == 2 * R;
  TORCH_INTERNAL_ASSERT(P.is_contiguous() && B32.is_contiguous() && AA.is_contiguous() && P.size(0) == N &&
                            (halves || P.size(1) == R) && AA.size(0) == R && AA.size(1) == R,
                        "dora_norm_scale: shapes");
  Tensor g = at::empty({N}, B32.options()), inv_n = at::empty({N}, B32.options());
  if (N == 0) return {g, inv_n};
  dora_norm_scale_kernel<<<(N + kNormWarps - 1) / kNormWarps, kNormWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      P.data_ptr<float>(), halves, B32.data_ptr<float>(), AA.data_ptr<float>(), N, static_cast<int>(R),
      static_cast<float>(scaling), w_sq.data_ptr<float>(), m32.data_ptr<float>(), g.data_ptr<float>(),
      inv_n.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g, inv_n};
}

// Whether dora_norm_fused takes this norm (set_dora_norm_form not 0): 16-bit w [N, K] with unit column stride and
// 16-byte aligned rows, K % 8 == 0, rank 1-16, sm_80+ (mma.sync), K within int and N within the parts kernel's grid
// (row blocks + 1 <= 65535: ~8.4 M rows). Otherwise the split GEMM, A·Aᵀ and dora_norm_scale.
bool dora_norm_fused_applies(const Tensor& w, const Tensor& A32) {
  const int64_t N = w.size(0), K = w.size(1), R = A32.size(0);
  return dora_norm_form() != 0 && (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16) &&
         at::cuda::getCurrentDeviceProperties()->major >= 8 && R >= 1 && R <= kNormPartRank && N > 0 && K > 0 &&
         N <= int64_t{65534} * kNormPartRows && K < (int64_t{1} << 31) - 2048 && K % 8 == 0 && w.stride(1) == 1 &&
         w.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
}

// (g, 1/n) for W [N, K] (16-bit; dora_norm_fused_applies), A32 fp32 [R, K], B32 fp32 [N, R] contiguous, m32 fp32 [N]:
// dora_norm_parts_kernel over ranges of K, then dora_norm_finish_kernel. w_sq: the layer's ‖W‖² (fp32 [N],
// contiguous) or undefined (summed from W in the same pass). A range is the hook's columns (set_dora_norm_form > 0)
// or the widest of 512, 256, 128 whose grid has 1.5 blocks an SM (q/o and gate/up 512, k/v 128 at Llama-8B sizes).
std::tuple<Tensor, Tensor> dora_norm_fused(const Tensor& w, const Tensor& A32_in, const Tensor& B32, double scaling,
                                           const Tensor& w_sq, const Tensor& m32) {
  const int64_t N = w.size(0), K = w.size(1), R = A32_in.size(0);
  Tensor A32 = A32_in.contiguous();
  if (reinterpret_cast<uintptr_t>(A32.data_ptr()) % 16 != 0) A32 = A32.clone();  // float4 loads of A's rows
  const int64_t row_blocks = (N + kNormPartRows - 1) / kNormPartRows;
  int64_t range = dora_norm_form();
  if (range <= 0) {
    range = 512;
    while (range > 128 && (K + range - 1) / range * row_blocks < 3 * sm_count() / 2) range /= 2;
  }
  range = std::min<int64_t>(range, (K + 31) / 32 * 32);  // no wider than K: the fragments' shared memory
  const int64_t ranges = (K + range - 1) / range;
  const bool want_sq = !w_sq.defined();
  const int smem = static_cast<int>(range * 64 + kNormPartSmem);
  Tensor parts = at::empty({ranges * (N * (want_sq ? 17 : 16) + 256)}, B32.options());
  float* const part_aa = parts.data_ptr<float>();
  float* const part_wa = part_aa + ranges * 256;
  float* const part_sq = want_sq ? part_wa + ranges * N * 16 : nullptr;
  Tensor gn = at::empty({2, N}, B32.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16(w.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    static bool opted_in[64] = {};
    smem_opt_in(opted_in, dora_norm_parts_kernel<T>, kNormPartMaxRange * 64 + kNormPartSmem);
    dora_norm_parts_kernel<T><<<dim3(static_cast<unsigned>(ranges), static_cast<unsigned>(row_blocks + 1)),
                                kNormPartWarps * 32, smem, stream>>>(
        reinterpret_cast<const T*>(w.data_ptr()), w.stride(0), static_cast<int>(N), static_cast<int>(K),
        A32.data_ptr<float>(), A32.stride(0), static_cast<int>(R), static_cast<int>(range), part_wa, part_sq,
        part_aa);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dora_norm_finish_kernel<<<(N + kNormFinishRows - 1) / kNormFinishRows, kNormFinishRows * 16, 0, stream>>>(
      part_wa, part_sq, part_aa, static_cast<int>(ranges), B32.data_ptr<float>(), static_cast<int>(N),
      static_cast<int>(R), static_cast<float>(scaling), want_sq ? nullptr : w_sq.data_ptr<float>(),
      m32.data_ptr<float>(), gn.data_ptr<float>(), gn.data_ptr<float>() + N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gn.select(0, 0), gn.select(0, 1)};
}

// (red, sum): red = Σ_rows a⊙b, sum = Σ_rows a (fp32 [N]); writes out = a ⊙ l (out contiguous, may be a)
std::tuple<Tensor, Tensor> colreduce(const Tensor& a, const Tensor& b, const Tensor& l32, const Tensor& out,
                                     bool need_sum) {
  const int64_t M = a.size(0), N = a.size(1);
  const int64_t col_blocks = blocks_for(N);
  const int sms = sm_count();
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

// dora_bwd_stream_kernel over dY and Z0 ([M, N], any strides): returns red = (Σ_rows dY⊙Z0)·red_scale (fp32 [N])
// when need_red (else undefined) and writes dZ = g⊙dY into dz when it is defined (contiguous [M, N]). The grid: about
// four waves of blocks (resident blocks from the occupancy query, once per device). One wave of long-lived blocks
// ran at ~2 TB/s (session 34: q/o 48.7 µs; gate/up's 56 column blocks left SMs with one block).
Tensor dora_bwd_stream(const Tensor& dy, const Tensor& Z0, const Tensor& g32, const Tensor& dz,
                       const Tensor& red_scale, bool need_red) {
  const int64_t M = dy.size(0), N = dy.size(1);
  const int64_t col_blocks = (N + kStreamGroups * 8 - 1) / (kStreamGroups * 8);
  int64_t per_sm = 1;
  dispatch_all(dy.scalar_type(), [&](auto* tag) {
    per_sm = dora_bwd_stream_per_sm<std::remove_pointer_t<decltype(tag)>>();
  });
  const int64_t slots = per_sm * sm_count();
  // rows a block: a whole number of unrolled steps of its row lanes (at least one), for about kStreamWaves waves of
  // blocks (short blocks: the scheduler balances the SMs; the atomics per column grow with the splits)
  constexpr int64_t kStep = kStreamUnroll * kStreamLanes, kStreamWaves = 4;
  const int64_t want = std::max<int64_t>(1, kStreamWaves * slots / std::max<int64_t>(col_blocks, 1));
  const int64_t rows_per_block = std::max<int64_t>(kStep, ((M + want - 1) / want + kStep - 1) / kStep * kStep);
  const int64_t splits = M == 0 ? 1 : (M + rows_per_block - 1) / rows_per_block;
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor red = need_red ? (splits > 1 ? at::zeros({N}, f32) : at::empty({N}, f32)) : Tensor();
  if (N == 0) return red;
  if (M == 0) {
    if (need_red) red.zero_();
    return red;
  }
  const bool vec_o = dz.defined() && vec16(dz);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(dy.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dora_bwd_stream_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits)),
                                kStreamThreads, 0, stream>>>(
        reinterpret_cast<const T*>(dy.data_ptr()), dy.stride(0), dy.stride(1),
        reinterpret_cast<const T*>(Z0.data_ptr()), Z0.stride(0), Z0.stride(1), g32.data_ptr<float>(),
        dz.defined() ? reinterpret_cast<T*>(dz.data_ptr()) : nullptr, need_red ? red.data_ptr<float>() : nullptr,
        red_scale.defined() ? red_scale.data_ptr<float>() : nullptr, M, N, rows_per_block, splits > 1, vec16(dy),
        vec16(Z0), vec_o);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return red;
}

Tensor in_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// Whether a 16-bit split-GEMM sum Y = base + adapter term ([rows, cols]) writes the adapter's skinny product first and
// lets the base GEMM add itself with beta = 1, instead of the base product first and the skinny GEMM reading and
// writing Y again (lora_sum_order: -1 automatic, 0 base first, 1 adapter first). Bytes: base first moves Y three
// times (written, read, written), adapter first twice plus the read of C in the base GEMM's epilogue, which costs
// the GEMM little where Y is large and something where it is small. Measured (H200, session 37, profile_layer.py,
// fwd+bwd per layer, adapter first against base first): at M = 4096 LoRA q/o -2.6 %, k/v -0.3 %, gate/up -3.8 %,
// down -3.9 % (QLoRA and DoRA -0.2 to -3.1 %); at M = 1024 q/o and k/v +1.1 % (Y and dX of 4 M elements at most),
// gate/up and down -1.2 / -1.3 % (15 M); at M = 256 +0.7 to +1.5 % (4 M at most). Automatic: adapter first from 8 M
// elements (16 MB of Y or dX), between the sizes that lost and won.
bool sum_adapter_first(int64_t rows, int64_t cols) {
  const int64_t mode = lora_sum_order();
  if (mode >= 0) return mode == 1;
  return rows * cols >= (int64_t{1} << 23);
}

// ------------------------------------------------------------------------------------------------ LoRA
std::tuple<Tensor, Tensor> lora_fwd_split(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
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
  if (dt == at::kFloat) {
    Tensor y = has_bias ? at::addmm(in_dtype(*bias, dt), x2, w.t()) : at::mm(x2, w.t());
    Tensor S = at::mm(xs, A32.t()).mul_(scaling);
    y.addmm_(S, B32.t());
    return {y, S};
  }
  // A's and B's splits in one launch: A2 [K, 2r] = [A_hiᵀ | A_loᵀ], B3 [N, 3r] = [B_hi | B_lo | B_hi]
  const auto packs = pack_splits({{A32.t(), kHL, Tensor()}, {B32, kHLH, Tensor()}}, dt);
  const Tensor P = at::mm(xs, packs[0], at::kFloat);        // [M, 2r] fp32
  auto [S, S3, unused] = finalize_split(P, static_cast<float>(scaling), true, &kHHL, nullptr, dt);
  if (sum_adapter_first(x2.size(0), w.size(0))) {
    Tensor y = has_bias ? at::addmm(in_dtype(*bias, dt), S3, packs[1].t()) : at::mm(S3, packs[1].t());
    y.addmm_(x2, w.t());                                    // + X·Wᵀ, read by cuBLAS as C (beta = 1)
    return {y, S};
  }
  Tensor y = has_bias ? at::addmm(in_dtype(*bias, dt), x2, w.t()) : at::mm(x2, w.t());
  y.addmm_(S3, packs[1].t());                               // + S·Bᵀ, read by cuBLAS as C (beta = 1)
  return {y, S};
}

// DoRA's two extras, undefined for LoRA: dy_base, the output gradient of the base product in dX (dX = D⊙(dS·A) +
// dy_base·W) when it is not dY itself; g (fp32 [N], contiguous), the per-row scale of the adapter's output: the
// gradients are then those of B' = g⊙B (dS = s·dY·B', dB = g⊙(dYᵀ·S)), with g folded into B's split and dB's
// combine (one fp32 product each, the values of scaling B and dB by g in separate passes).
std::tuple<Tensor, Tensor, Tensor> lora_bwd_split(const Tensor& dy2_in, const Tensor& x2, const Tensor& S,
                                                 const Tensor& weight, const Tensor& A, const Tensor& B,
                                                 double scaling, double p, const c10::optional<Tensor>& seed,
                                                 int64_t rank, bool need_x, bool need_A, bool need_B,
                                                 const Tensor& dy_base = Tensor(), const Tensor& g = Tensor(),
                                                 const DoraDmTerm* dm = nullptr) {
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const Tensor dy2 = in_dtype(dy2_in, dt);
  const Tensor dyb = dy_base.defined() ? in_dtype(dy_base, dt) : dy2;
  const Tensor A32 = in_dtype(A, at::kFloat), B32 = in_dtype(B, at::kFloat);
  const int64_t seed_v = p > 0.0 ? lora_seed_value(seed, p, rank) : 0;
  auto f32 = S.options().dtype(at::kFloat);
  Tensor dx = at::empty({0}, x2.options()), dA = at::empty({0}, f32), dB = at::empty({0}, f32);
  // dYᵀ·S' is also DoRA's dm term: computed when dm is given, even if dB is not wanted
  const bool want_dyS = need_B || dm != nullptr;
  if (!(need_x || need_A || want_dyS)) return {dx, dA, dB};
  if (dt == at::kFloat) {
    const Tensor g_col = g.defined() ? g.view({-1, 1}) : Tensor();
    if (want_dyS) {
      Tensor dyS = at::mm(dy2.t(), S);
      if (dm != nullptr) dm->dm.add_(at::mul(dyS, dm->B32).sum(1).mul_(dm->inv_n));
      if (need_B) dB = g.defined() ? dyS.mul_(g_col) : dyS;
    }
    Tensor dS = at::mm(dy2, g.defined() ? B32 * g_col : B32).mul_(scaling);
    if (need_A) dA = at::mm(dS.t(), p > 0.0 ? dropout_apply(x2, p, seed_v, false) : x2);
    if (need_x) {
      Tensor z2 = at::mm(dS, A32);
      if (p > 0.0) dropout_apply(z2, p, seed_v, true);
      dx = z2.addmm_(dyb, in_dtype(weight, dt));
    }
    return {dx, dA, dB};
  }
  // the three splits the backward reads, in one launch: S2 [M, 2r] (dB), B2 [N, 2r] (dS; g⊙B for DoRA),
  // A3 [K, 3r] (dX); dB's and dA's halves summed in one launch at the end: 8 launches, not 11
  std::vector<PackSpec> specs;
  if (want_dyS) specs.push_back({S, kHL, Tensor()});
  if (need_A || need_x) specs.push_back({B32, kHL, g});
  if (need_x) specs.push_back({A32.t(), kHLH, Tensor()});
  const auto packs = pack_splits(specs, dt);
  Tensor PdB, PdA;
  if (want_dyS) PdB = at::mm(dy2.t(), packs[0], at::kFloat);                 // [N, 2r]
  if (need_A || need_x) {
    const Tensor& B2 = packs[want_dyS ? 1 : 0];
    const Tensor P = at::mm(dy2, B2, at::kFloat);                              // [M, 2r]: s·dS = halves summed
    auto [unused, dS2, dS3] = finalize_split(P, static_cast<float>(scaling), false, need_A ? &kHL : nullptr,
                                             need_x ? &kHHL : nullptr, dt);
    if (need_A) {
      const Tensor xs = p > 0.0 ? dropout_apply(x2, p, seed_v, false) : x2;
      PdA = at::mm(dS2.t(), xs, at::kFloat);                                   // [2r, K]
    }
    if (need_x) {
      const Tensor& A3 = packs.back();                                         // [K, 3r]
      const Tensor w = in_dtype(weight, dt);
      if (p > 0.0) {
        Tensor z2 = at::mm(dS3, A3.t());                                     // dS·A in x.dtype
        dropout_apply(z2, p, seed_v, true);
        dx = z2.addmm_(dyb, w);                                              // + dY·W (beta = 1)
      } else if (sum_adapter_first(x2.size(0), x2.size(1))) {
        dx = at::mm(dS3, A3.t());                                            // dS·A
        dx.addmm_(dyb, w);                                                   // + dY·W (beta = 1)
      } else {
        dx = at::mm(dyb, w);
        dx.addmm_(dS3, A3.t());
      }
    }
  }
  auto [dB_sum, dA_sum] = combine_halves2(PdB, g, PdA, dm);
  if (need_B) dB = dB_sum;                                                     // [N, r]
  if (need_A) dA = dA_sum;                                                     // [r, K]
  return {dx, dA, dB};
}

// ------------------------------------------------------------------------------------------------ fused LoRA launchers
template <typename F>
void dispatch_rank(int R, F&& f) {
  if (R <= 16) {
    f(std::integral_constant<int, 16>());
  } else if (R <= 32) {
    f(std::integral_constant<int, 32>());
  } else {
    f(std::integral_constant<int, 64>());
  }
}

// [splits, M, R] fp32 partial sums over L-slices of Σ_l (D⊙P)[m, l]·Q(l, j); Q(l, j) = Q32[l·sql + j·sqj]
Tensor shrink(const Tensor& P, const Tensor& Q32, int64_t sql, int64_t sqj, int R, double p, int64_t seed) {
  const int64_t M = P.size(0), L = P.size(1);
  const int64_t row_blocks = (M + kShrinkRows - 1) / kShrinkRows;
  const int64_t chunk = kShrinkLanes * 8;  // the columns one lane sweep covers
  int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((L + chunk - 1) / chunk, (2 * sm_count() + row_blocks - 1) / std::max<int64_t>(row_blocks, 1)));
  const int64_t l_per = std::max<int64_t>(chunk, ((L + splits - 1) / splits + chunk - 1) / chunk * chunk);
  splits = std::max<int64_t>(1, (L + l_per - 1) / l_per);
  Tensor part = at::empty({splits, M, R}, P.options().dtype(at::kFloat));
  if (M == 0 || R == 0) return part;
  const uint32_t thr = p > 0.0 ? lora_dropout_threshold(p) : 0;
  const float ks = p > 0.0 ? lora_keep_scale(p, P.scalar_type()) : 1.0f;
  const bool vec = vec16(P);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(P.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    shrink_kernel<T><<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits)), 256, 0, stream>>>(
        reinterpret_cast<const T*>(P.data_ptr()), P.stride(0), P.stride(1), M, L, Q32.data_ptr<float>(), sql, sqj, R,
        part.data_ptr<float>(), l_per, vec, p > 0.0, static_cast<uint64_t>(seed), thr, ks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

struct ColexpArgs {
  const Tensor* P = nullptr;  // [M, C] (REDUCE), dropout applies to it and to Z
  int64_t M = 0, C = 0;
  const Tensor* Sm = nullptr;  // [splits, M, R] fp32
  float s_scale = 1.0f;
  Tensor* S_out = nullptr;      // [M, R] fp32, written once (optional)
  Tensor* red = nullptr;        // REDUCE target (zeroed), red(c, j) = red[c·src + j·srj]
  int64_t src = 0, srj = 0;
  const Tensor* Q2 = nullptr;   // EXPAND: Q2(c, j) = Q2[c·sq2c + j·sq2j]
  int64_t sq2c = 0, sq2j = 0;
  const Tensor* bias = nullptr;
  Tensor* Z = nullptr;          // EXPAND output [M, C] contiguous
  double p = 0.0;
  int64_t seed = 0;
};

void colexp(const ColexpArgs& a, at::ScalarType dt) {
  const bool reduce = a.red != nullptr, expand = a.Z != nullptr;
  if (a.M == 0 || a.C == 0 || !(reduce || expand)) return;
  const int R = static_cast<int>(a.Sm->size(2));
  const int64_t xb = (a.C + 255) / 256;
  int64_t ysplit = std::max<int64_t>(1, std::min<int64_t>((a.M + kColTile - 1) / kColTile,
                                                          (4 * sm_count() + xb - 1) / xb));
  const int64_t rows_per = ((a.M + ysplit - 1) / ysplit + kColTile - 1) / kColTile * kColTile;
  ysplit = (a.M + rows_per - 1) / rows_per;
  const uint32_t thr = a.p > 0.0 ? lora_dropout_threshold(a.p) : 0;
  const float ks = a.p > 0.0 ? lora_keep_scale(a.p, dt) : 1.0f;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_rank(R, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const dim3 grid(static_cast<unsigned>(xb), static_cast<unsigned>(ysplit));
      const T* P = reduce ? reinterpret_cast<const T*>(a.P->data_ptr()) : nullptr;
      const int64_t sp0 = reduce ? a.P->stride(0) : 0, sp1 = reduce ? a.P->stride(1) : 0;
      const float* Q2 = expand ? a.Q2->data_ptr<float>() : nullptr;
      const T* bias = a.bias != nullptr ? reinterpret_cast<const T*>(a.bias->data_ptr()) : nullptr;
      T* Z = expand ? reinterpret_cast<T*>(a.Z->data_ptr()) : nullptr;
      float* red = reduce ? a.red->data_ptr<float>() : nullptr;
      float* S_out = a.S_out != nullptr ? a.S_out->data_ptr<float>() : nullptr;
      const int splits = static_cast<int>(a.Sm->size(0));
#define FASTPEFT_COLEXP(RED, EXP)                                                                                   \
  colexp_kernel<T, RMAX, RED, EXP><<<grid, 256, 0, stream>>>(P, sp0, sp1, a.M, a.C, a.Sm->data_ptr<float>(), splits, \
                                                             R, a.s_scale, S_out, red, a.src, a.srj, Q2, a.sq2c,     \
                                                             a.sq2j, bias, Z, rows_per, a.p > 0.0,                   \
                                                             static_cast<uint64_t>(a.seed), thr, ks)
      if (reduce && expand) {
        FASTPEFT_COLEXP(true, true);
      } else if (reduce) {
        FASTPEFT_COLEXP(true, false);
      } else {
        FASTPEFT_COLEXP(false, true);
      }
#undef FASTPEFT_COLEXP
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward: S = s·(D⊙X)·Aᵀ (shrink, then summed and saved by the expand), Z = S·Bᵀ + b (expand), Y = Z + X·Wᵀ
// (cuBLAS, beta = 1): 3 launches.
std::tuple<Tensor, Tensor> lora_fwd_fused(const Tensor& x2, const Tensor& w, const c10::optional<Tensor>& bias,
                                          const Tensor& A32, const Tensor& B32, double scaling, double p,
                                          int64_t seed) {
  const auto dt = x2.scalar_type();
  const int64_t M = x2.size(0), N = w.size(0);
  const int R = static_cast<int>(A32.size(0));
  const Tensor part = shrink(x2, A32, A32.stride(1), A32.stride(0), R, p, seed);  // Q(k, j) = A[j, k]
  Tensor S = at::empty({M, R}, x2.options().dtype(at::kFloat));
  Tensor Z = at::empty({M, N}, x2.options());
  Tensor b = bias.has_value() && bias->defined() ? in_dtype(*bias, dt).contiguous() : Tensor();
  ColexpArgs a;
  a.M = M;
  a.C = N;
  a.Sm = &part;
  a.s_scale = static_cast<float>(scaling);
  a.S_out = &S;
  a.Q2 = &B32;
  a.sq2c = B32.stride(0);  // Q2(n, j) = B[n, j]
  a.sq2j = B32.stride(1);
  a.bias = b.defined() ? &b : nullptr;
  a.Z = &Z;
  colexp(a, dt);
  Z.addmm_(x2, w.t());
  return {Z, S};
}

// Backward: dB = dYᵀ·S (colexp reduce over dY), dS/s = dY·B (shrink over dY), dA = dSᵀ·(D⊙X) and
// Z2 = D⊙(dS·A) (one colexp pass over X), dX = Z2 + dY·W (cuBLAS, beta = 1): 4 launches + the zero-fills.
std::tuple<Tensor, Tensor, Tensor> lora_bwd_fused(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                  const Tensor& w, const Tensor& A32, const Tensor& B32,
                                                  double scaling, double p, int64_t seed, bool need_x, bool need_A,
                                                  bool need_B) {
  const auto dt = x2.scalar_type();
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const int R = static_cast<int>(A32.size(0));
  auto f32 = x2.options().dtype(at::kFloat);
  Tensor dx = at::empty({0}, x2.options()), dA = at::empty({0}, f32), dB = at::empty({0}, f32);
  if (need_B) {
    dB = at::zeros({N, R}, f32);
    const Tensor S3 = S.contiguous().view({1, M, R});
    ColexpArgs a;
    a.P = &dy2;
    a.M = M;
    a.C = N;
    a.Sm = &S3;
    a.red = &dB;
    a.src = R;  // red(n, j) = dB[n, j]
    a.srj = 1;
    colexp(a, dt);
  }
  if (need_A || need_x) {
    const Tensor part = shrink(dy2, B32, B32.stride(0), B32.stride(1), R, 0.0, 0);  // Q(n, j) = B[n, j]
    if (need_A) dA = at::zeros({R, K}, f32);
    Tensor z2 = need_x ? at::empty({M, K}, x2.options()) : Tensor();
    ColexpArgs a;
    a.P = &x2;
    a.M = M;
    a.C = K;
    a.Sm = &part;
    a.s_scale = static_cast<float>(scaling);
    a.red = need_A ? &dA : nullptr;
    a.src = 1;  // red(k, j) = dA[j, k]
    a.srj = K;
    a.Q2 = &A32;
    a.sq2c = A32.stride(1);  // Q2(k, j) = A[j, k]
    a.sq2j = A32.stride(0);
    a.Z = need_x ? &z2 : nullptr;
    a.p = p;
    a.seed = seed;
    if (!need_A) a.P = nullptr;
    colexp(a, dt);
    if (need_x) dx = z2.addmm_(dy2, w);
  }
  return {dx, dA, dB};
}

// Forward at decode sizes (decode_shrink / decode_expand above): the shrink, the base product (ATen's linear, the
// kernel the base layer itself runs), the expand into its output in place. 3 launches, none of them a zero-fill.
// Where use_decode_gemv says so: the shrink, then decode_gemv (the base product and the expand), 2 launches.
// DoRA with a given norm (dora: magnitude and norm fp32 [N], bias): the base product has no bias and is kept as
// Z0; the expand writes Y = g⊙(Z0 + s·S·Bᵀ) + b into a new tensor, and g = m / n and 1/n (what DoRA's backward
// needs). Returns (Y, S, Z0 or undefined, g or undefined, 1/n or undefined).
struct DecodeDora {
  Tensor magnitude, norm;  // fp32 [N], contiguous
  Tensor bias;             // in x's dtype, or undefined
  bool keep = true;        // false (inference): no Z0, g or 1/n kept; the expand writes Y in place
};

// decode_shrink over x2 [M, K] into part [splits, M, R] (k_per columns a split) on `stream`; trigger: the kernel
// launched next is decode_gemv, a programmatic dependent of this one (decode_shrink_kernel's comment).
void launch_decode_shrink(const Tensor& x2, const Tensor& A32, const Tensor& part, int64_t splits, int64_t k_per,
                          bool x_vec, bool a_vec, cudaStream_t stream, bool trigger) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int R = static_cast<int>(A32.size(0));
  dispatch_all(x2.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_rank(R, [&](auto rmax) {
      constexpr int JPW = decltype(rmax)::value / kDecodeWarps;
      const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(M));
      decode_shrink_kernel<T, JPW><<<grid, kDecodeWarps * 32, 0, stream>>>(
          reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), x2.stride(1), M, K, A32.data_ptr<float>(),
          A32.stride(0), A32.stride(1), R, part.data_ptr<float>(), k_per, x_vec, a_vec, trigger);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// decode_gemv's resident blocks on this GPU (the kernel's resources fix how many fit an SM; bf16 and fp16 alike)
template <typename Mix = OneAdapter>
int64_t decode_gemv_slots() {
  static int per_sm = 0;
  if (per_sm == 0) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_gemv_kernel<__nv_bfloat16, Mix>,
                                                                 kGemvWarps * 32, 0));
    per_sm = std::max(blocks, 1);
  }
  return static_cast<int64_t>(per_sm) * sm_count();
}

// Whether decode_forward runs the base product in decode_gemv (its own GEMV with the expand in the epilogue) rather
// than cuBLAS + decode_expand: 16-bit x of <= 8 rows, rows of x and W starting on 16-byte boundaries, a GPU with
// bf16 mma.sync (sm_80+); decode_gemv_mode() (adapter_ops.cpp: set_decode_gemv) -1 auto, 0 never.
// Eager calls take it wherever it applies: eager decode is host-bound, and it halves the call's host time (one
// launch and the ATen linear fewer: 16-26 against 28-49 µs a call, H200, bench_decode_layer.py). While a CUDA graph
// is captured only GPU time counts, and there it takes only weights whose 16-column tiles fit the resident blocks
// at once (one tile a block: q/o, k/v and down of Llama-8B, 0.1-2.2 µs a call faster than cuBLAS + expand at 1 and
// 8 rows); with more tiles than blocks (gate/up: 896 tiles) it streamed at 61 % of DRAM bandwidth against
// cuBLAS's 74 % (ncu) and lost 2.4-4.1 µs a call.
bool use_decode_gemv(const Tensor& x2, const Tensor& w, int64_t M, int64_t K, int major, bool capturing) {
  const auto dt = x2.scalar_type();
  const auto rows16 = [](const Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  if (!(decode_gemv_mode() != 0 && major >= 8 && (dt == at::kBFloat16 || dt == at::kHalf) && M <= kGemvMaxM &&
        K % 8 == 0 && w.scalar_type() == dt && rows16(x2) && rows16(w))) {
    return false;
  }
  return !capturing || (w.size(0) + kGemvRows - 1) / kGemvRows <= decode_gemv_slots();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> decode_forward_gemv(
    const Tensor& x2, const Tensor& w, const Tensor& b, const Tensor& A32, const Tensor& B32, double scaling,
    const DecodeDora* dora, const Tensor& part, const Tensor& S, int64_t splits, int64_t k_per, bool x_vec,
    bool a_vec, bool b_vec, cudaStream_t stream, bool pdl) {
  const auto dt = x2.scalar_type();
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const int R = static_cast<int>(A32.size(0));
  const auto f32 = x2.options().dtype(at::kFloat);
  Tensor y = at::empty({M, N}, x2.options()), out, g, inv_n;
  if (dora != nullptr) {
    out = at::empty({M, N}, x2.options());  // Y and Yout are __restrict__ in the kernel: never the same tensor
    if (dora->keep) {
      g = at::empty({N}, f32);
      inv_n = at::empty({N}, f32);
    }
  }
  // LoRA: the layer's bias in the first rounding; DoRA: its bias after g (dora->bias), none in Z0
  const Tensor bias = dora != nullptr ? dora->bias : b;
  const Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  launch_decode_shrink(x2, A32, part, splits, k_per, x_vec, a_vec, stream, /*trigger=*/pdl);
  dispatch_16(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // persistent blocks, as many as fit at once, the tiles spread evenly (ceil(tiles / blocks) each)
    const int64_t tiles = (N + kGemvRows - 1) / kGemvRows;
    const int64_t slots = decode_gemv_slots();
    const int64_t per_block = (tiles + slots - 1) / slots;
    const device::PdlLaunchConfig config(dim3(static_cast<unsigned>((tiles + per_block - 1) / per_block)),
                                         dim3(kGemvWarps * 32), stream, pdl);
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &config.cfg, decode_gemv_kernel<T, OneAdapter>, reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0),
        static_cast<int>(M), static_cast<int>(K), reinterpret_cast<const T*>(w.data_ptr()), w.stride(0), N,
        bias_c.defined() ? reinterpret_cast<const T*>(bias_c.data_ptr()) : static_cast<const T*>(nullptr),
        static_cast<const float*>(part.data_ptr<float>()), static_cast<int>(splits), R,
        static_cast<float>(scaling), S.data_ptr<float>(), static_cast<const float*>(B32.data_ptr<float>()),
        B32.stride(0), B32.stride(1), b_vec, reinterpret_cast<T*>(y.data_ptr()),
        dora != nullptr ? reinterpret_cast<T*>(out.data_ptr()) : static_cast<T*>(nullptr),
        static_cast<const float*>(dora != nullptr ? dora->magnitude.data_ptr<float>() : nullptr),
        static_cast<const float*>(dora != nullptr ? dora->norm.data_ptr<float>() : nullptr),
        g.defined() ? g.data_ptr<float>() : static_cast<float*>(nullptr),
        inv_n.defined() ? inv_n.data_ptr<float>() : static_cast<float*>(nullptr), OneAdapter{}));
  });
  if (dora == nullptr) return {y, S, Tensor(), Tensor(), Tensor()};
  return {out, S, dora->keep ? y : Tensor(), g, inv_n};
}

// The decode shrink's K split for M rows: (splits, columns a split, a multiple of kDecodeStep). Enough K-slices to
// fill the GPU twice over (blocks: splits x M rows), but splits·M <= 256: every expand / GEMV block re-sums
// splits·M·r floats (at most r loads per thread, issued together).
std::pair<int64_t, int64_t> decode_splits(int64_t M, int64_t K) {
  const int64_t steps = (K + kDecodeStep - 1) / kDecodeStep;
  int64_t splits = std::min<int64_t>(steps, std::max<int64_t>(1, (2 * sm_count() + M - 1) / M));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 256 / M));
  const int64_t k_per = (steps + splits - 1) / splits * kDecodeStep;
  return {(K + k_per - 1) / k_per, k_per};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> decode_forward(const Tensor& x2, const Tensor& w,
                                                                  const c10::optional<Tensor>& bias, const Tensor& A32,
                                                                  const Tensor& B32, double scaling,
                                                                  const DecodeDora* dora) {
  const auto dt = x2.scalar_type();
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const int R = static_cast<int>(A32.size(0));
  // decode_expand keeps S in shared memory as [kDecodeMaxM][64] at most (use_decode admits nothing larger)
  TORCH_INTERNAL_ASSERT(M >= 1 && M <= kDecodeMaxM && R >= 1 && R <= 64, "fastpeft lora decode: rows / rank");
  int64_t splits, k_per;  // not a structured binding: the lambdas below capture them (C++17)
  std::tie(splits, k_per) = decode_splits(M, K);
  auto f32 = x2.options().dtype(at::kFloat);
  Tensor part = at::empty({splits, M, R}, f32);
  Tensor S = at::empty({M, R}, f32);
  const auto aligned = [](const Tensor& t, int64_t bytes) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(bytes) == 0;
  };
  const bool x_vec = x2.stride(1) == 1 && x2.stride(0) % 4 == 0 && aligned(x2, 4 * x2.element_size());
  const bool a_vec = A32.stride(1) == 1 && A32.stride(0) % 4 == 0 && aligned(A32, 16);
  const bool b_vec = R % 4 == 0 && B32.stride(1) == 1 && B32.stride(0) % 4 == 0 && aligned(B32, 16);
  Tensor b = bias.has_value() && bias->defined() ? in_dtype(*bias, dt) : Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  // The shrink reads only x and A, so it can run beside the base GEMV; the expand needs both. While a CUDA graph is
  // captured (compiled static-cache decode: mode="reduce-overhead"), the shrink goes to a high-priority side stream
  // forked from this one and joined back before the expand: in a replay its latency hides behind the GEMV's. An
  // eager call does not fork: two event records and two waits cost more host time than the GPU time they would
  // hide, and eager decode is host-bound. decode_fork_mode(): -1 auto (fork while capturing), 0 never, 1 always.
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  const int64_t fork_mode = decode_fork_mode();
  const bool fork = fork_mode == 1 || (fork_mode < 0 && capturing);
  at::cuda::CUDAEvent forked, joined;  // cudaEventDisableTiming
  // Taken on every call (an atomic increment once the pool exists) so that the pool's streams are created by an
  // eager call, such as a capture's warm-up, rather than inside the capture.
  const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(/*isHighPriority=*/true, x2.device().index());
  // decode_pdl_mode(): -1 auto (on where the GPU has it: sm_90+), 0 never
  const int64_t pdl_mode = decode_pdl_mode();
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const bool pdl = pdl_mode != 0 && props->major >= 9;
  // Our own GEMV with the expand in its epilogue, a programmatic dependent of the shrink: no fork needed.
  if (use_decode_gemv(x2, w, M, K, props->major, capturing)) {
    return decode_forward_gemv(x2, w, b, A32, B32, scaling, dora, part, S, splits, k_per, x_vec, a_vec, b_vec,
                               stream.stream(), pdl);
  }
  if (fork) {
    forked.record(stream);
    forked.block(side);  // the side stream sees x and A as this stream has them
  }
  launch_decode_shrink(x2, A32, part, splits, k_per, x_vec, a_vec, fork ? side.stream() : stream.stream(),
                       /*trigger=*/false);
  if (fork) joined.record(side);
  Tensor y = at::linear(x2, w, b.defined() && dora == nullptr ? c10::optional<Tensor>(b) : c10::nullopt);
  TORCH_INTERNAL_ASSERT(y.dim() == 2 && y.stride(1) == 1, "fastpeft lora decode: expected a row-major output");
  // Joined before anything else is queued here: every later use of part's, x's or A's memory on this stream
  // (the expand, a reuse by the caching allocator once part is freed) is ordered after the shrink.
  if (fork) joined.block(stream);
  Tensor out = y, g, inv_n;
  if (dora != nullptr && dora->keep) {  // Z0 kept for the backward: Y goes to a new tensor (else in place)
    out = at::empty({M, N}, x2.options());
    g = at::empty({N}, f32);
    inv_n = at::empty({N}, f32);
  }
  dispatch_all(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_rank(R, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const unsigned blocks = static_cast<unsigned>((N + kDecodeExpandThreads - 1) / kDecodeExpandThreads);
      const bool dora_bias = dora != nullptr && dora->bias.defined();
      // The expand may start while the base GEMV drains (programmatic dependent launch, sm_90+: its adapter
      // loads overlap the GEMV's tail and its launch latency is hidden; it waits in-kernel before reading Y).
      const device::PdlLaunchConfig config(dim3(blocks), dim3(kDecodeExpandThreads), stream.stream(), pdl);
      C10_CUDA_CHECK(cudaLaunchKernelEx(
          &config.cfg, decode_expand_kernel<T, RMAX>, reinterpret_cast<const T*>(y.data_ptr()), y.stride(0), M, N,
          static_cast<const float*>(part.data_ptr<float>()), static_cast<int>(splits), R,
          static_cast<float>(scaling), S.data_ptr<float>(), static_cast<const float*>(B32.data_ptr<float>()),
          B32.stride(0), B32.stride(1), b_vec, reinterpret_cast<T*>(out.data_ptr()), out.stride(0),
          static_cast<const float*>(dora != nullptr ? dora->magnitude.data_ptr<float>() : nullptr),
          static_cast<const float*>(dora != nullptr ? dora->norm.data_ptr<float>() : nullptr),
          dora_bias ? reinterpret_cast<const T*>(dora->bias.data_ptr()) : static_cast<const T*>(nullptr),
          g.defined() ? g.data_ptr<float>() : static_cast<float*>(nullptr),
          inv_n.defined() ? inv_n.data_ptr<float>() : static_cast<float*>(nullptr)));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, S, dora != nullptr && dora->keep ? y : Tensor(), g, inv_n};
}

std::tuple<Tensor, Tensor> lora_fwd_decode(const Tensor& x2, const Tensor& w, const c10::optional<Tensor>& bias,
                                           const Tensor& A32, const Tensor& B32, double scaling) {
  auto r = decode_forward(x2, w, bias, A32, B32, scaling, nullptr);
  return {std::get<0>(r), std::get<1>(r)};
}

// Which LoRA composition a CUDA call takes. The split-GEMM one runs the small products on tensor cores (cuBLAS):
// at M = 4096 it measured 1.3-1.4x the dense layer's GPU time where the SIMT fused kernels took 2.3-3.7x (H200,
// docs/performance-log.md, 2026-11-29). The fused kernels take half the launches, so they serve small M
// (<= kFusedMaxM rows: decode, tiny batches), where the FLOPs are negligible and launches are the cost -- unless
// the rank is above what they hold in registers (64) or determinism is asked for (their backward uses fp32
// atomics). A forward without dropout at <= kDecodeAutoMaxM rows takes the decode kernels instead (the base
// layer's own GEMV, and two small kernels spread over the GPU; deterministic): the fused shrink splits K over too
// few blocks at these sizes. lora_cuda_path() lets tests and benchmarks force one (set_lora_cuda_path in
// adapter_ops.cpp: 0 split GEMM, 1 fused, 2 decode where it applies, else as auto).
constexpr int64_t kFusedMaxM = 64;

// LoRA dropout's seed is a host value read per call: a CUDA graph would replay the captured mask forever, so a
// capture with dropout on is refused (a clear error instead of a frozen mask; see fastpeft/ops/__init__.py).
void refuse_dropout_in_capture(double p) {
  TORCH_CHECK(p <= 0.0 || at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None,
              "fastpeft: LoRA dropout (lora_dropout > 0) cannot run inside a CUDA graph (torch.cuda.graph, or "
              "torch.compile(mode=\"reduce-overhead\")): its per-call seed comes from torch's CPU generator, so the "
              "graph would replay one dropout mask forever. Use lora_dropout=0 (or model.eval()) with CUDA graphs, "
              "or torch.compile without them (mode=\"default\")");
}

bool use_fused(int64_t M, int64_t N, int64_t K, int64_t R) {
  if (R > 64 || M == 0 || N == 0 || K == 0 || at::globalContext().deterministicAlgorithms()) return false;
  const int64_t forced = lora_cuda_path();
  return forced < 0 || forced == 2 ? M <= kFusedMaxM : forced == 1;
}

bool use_decode(int64_t M, int64_t N, int64_t K, int64_t R, double p) {
  if (p > 0.0 || R > 64 || R == 0 || M == 0 || N == 0 || K == 0) return false;
  const int64_t forced = lora_cuda_path();
  return (forced < 0 && M <= kDecodeAutoMaxM) || (forced == 2 && M <= kDecodeMaxM);
}

std::tuple<Tensor, Tensor> lora_fwd_cuda(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                         const Tensor& A, const Tensor& B, double scaling, double p,
                                         const c10::optional<Tensor>& seed, int64_t rank) {
  refuse_dropout_in_capture(p);
  if (lora_native16(x2, A, B, p)) {  // 16-bit adapters: their own dtype's GEMMs, any M (S in x's dtype)
    c10::cuda::CUDAGuard guard(x2.device());
    return lora_fwd_native16(x2, weight, bias, A, B, scaling);
  }
  if (!use_fused(x2.size(0), weight.size(0), x2.size(1), A.size(0)) || x2.dim() != 2 || weight.dim() != 2 ||
      weight.size(1) != x2.size(1) || A.size(1) != x2.size(1) || B.size(0) != weight.size(0) || B.size(1) != A.size(0)) {
    return lora_fwd_split(x2, weight, bias, A, B, scaling, p, seed, rank);
  }
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastpeft lora: x must be float32, float16 or bfloat16, got ", dt);
  if (use_decode(x2.size(0), weight.size(0), x2.size(1), A.size(0), p)) {
    return lora_fwd_decode(x2, in_dtype(weight, dt), bias, in_dtype(A, at::kFloat), in_dtype(B, at::kFloat), scaling);
  }
  return lora_fwd_fused(x2, in_dtype(weight, dt), bias, in_dtype(A, at::kFloat), in_dtype(B, at::kFloat), scaling,
                        p, p > 0.0 ? lora_seed_value(seed, p, rank) : 0);
}

std::tuple<Tensor, Tensor, Tensor> lora_bwd_cuda(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                 const Tensor& weight, const Tensor& A, const Tensor& B,
                                                 double scaling, double p, const c10::optional<Tensor>& seed,
                                                 int64_t rank, bool need_x, bool need_A, bool need_B) {
  refuse_dropout_in_capture(p);
  if (lora_native16(x2, A, B, p)) {
    c10::cuda::CUDAGuard guard(x2.device());
    return lora_bwd_native16(dy2, x2, S, weight, A, B, scaling, need_x, need_A, need_B);
  }
  if (!use_fused(x2.size(0), weight.size(0), x2.size(1), A.size(0))) {
    return lora_bwd_split(dy2, x2, S, weight, A, B, scaling, p, seed, rank, need_x, need_A, need_B);
  }
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  return lora_bwd_fused(in_dtype(dy2, dt), x2, S, in_dtype(weight, dt), in_dtype(A, at::kFloat),
                        in_dtype(B, at::kFloat), scaling, p, p > 0.0 ? lora_seed_value(seed, p, rank) : 0, need_x,
                        need_A, need_B);
}

// ------------------------------------------------------------------------------------------------ grouped LoRA
// Sibling projections that read the same x (q/k/v, gate/up: G <= kMaxGroup members, one rank r, one scaling s, no
// dropout) as one operator: the split-GEMM composition of lora_fwd_split / lora_bwd_split with every piece that
// reads x, or that each member would launch alone, shared.
//   forward:  A's splits side by side, one shrink P = x·[A2_0 | A2_1 | ...] (x read once), one finalize over
//             P viewed [M·G, 2r] (rows member-major: each member's S and S3 are a column block), then per member
//             its base GEMM and its beta = 1 expand: 3 + 2G launches instead of 5G.
//   backward: one pack launch (S's, every B's and every A's splits), per member dB = dY_iᵀ·S2_i and
//             P_i = dY_i·B2_i (side by side in one P), one finalize, one dA GEMM over the stacked
//             dS (x read once), dX = Σ dY_i·W_i + [dS3_0 | ...]·[A3_0 | ...]ᵀ accumulated by cuBLAS (beta = 1: no
//             separate sums of the members' dX, which autograd adds pairwise otherwise), one combine launch:
//             6 + 3G launches instead of 8G (+ G - 1 adds).
// S (returned, saved for the backward) is [M, G·r] fp32, member blocks side by side: the composed path's layout too.
constexpr int kMaxGroup = 4;

// fp32 adapters only: 16-bit ones run member by member (lora_native16's composition, S in their dtype)
bool group_shares(const Tensor& x2, at::TensorList weights, at::TensorList As, at::TensorList Bs) {
  const int64_t G = static_cast<int64_t>(weights.size());
  const auto dt = x2.scalar_type();
  if (G < 2 || G > kMaxGroup || x2.dim() != 2 || (dt != at::kHalf && dt != at::kBFloat16)) return false;
  const int64_t r = As[0].size(0);
  for (int64_t i = 0; i < G; ++i) {
    if (As[i].size(0) != r || As[i].scalar_type() != at::kFloat || Bs[i].scalar_type() != at::kFloat ||
        use_fused(x2.size(0), weights[i].size(0), x2.size(1), r))
      return false;
  }
  return true;
}

void check_group_shapes(const Tensor& x2, at::TensorList weights, at::TensorList biases, at::TensorList As,
                        at::TensorList Bs) {
  const size_t G = weights.size();
  TORCH_CHECK(G >= 1 && As.size() == G && Bs.size() == G && (biases.empty() || biases.size() == G),
              "fastpeft lora_group: weight, lora_A, lora_B (and bias, if any) need one entry per member");
  for (size_t i = 0; i < G; ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == x2.size(1) && As[i].dim() == 2 &&
                    As[i].size(1) == x2.size(1) && Bs[i].dim() == 2 && Bs[i].size(0) == weights[i].size(0) &&
                    Bs[i].size(1) == As[i].size(0) && (biases.empty() || biases[i].numel() == weights[i].size(0)),
                "fastpeft lora_group: member ", i, "'s shapes do not fit: x ", x2.sizes(), ", weight ",
                weights[i].sizes(), ", lora_A ", As[i].sizes(), ", lora_B ", Bs[i].sizes());
  }
}

std::tuple<std::vector<Tensor>, Tensor> lora_group_fwd_cuda(const Tensor& x2, at::TensorList weights,
                                                            at::TensorList biases, at::TensorList As,
                                                            at::TensorList Bs, double scaling) {
  check_group_shapes(x2, weights, biases, As, Bs);
  if (!group_shares(x2, weights, As, Bs)) return lora_group_fwd_composed(x2, weights, biases, As, Bs, scaling);
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const int64_t G = static_cast<int64_t>(weights.size()), M = x2.size(0), K = x2.size(1), r = As[0].size(0);
  PackBatch batch;
  const int regA = batch.region(K, 2 * r * G);  // [K, 2rG]: member i's [A_hiᵀ | A_loᵀ] at column 2r·i
  std::vector<int> regB;
  std::vector<Tensor> keep;  // fp32 copies in_dtype made, alive until the pack launch has read them
  for (int64_t i = 0; i < G; ++i) {
    keep.push_back(in_dtype(As[i], at::kFloat));
    batch.add(regA, keep.back().t(), kHL, 2 * r * i);
  }
  for (int64_t i = 0; i < G; ++i) {
    keep.push_back(in_dtype(Bs[i], at::kFloat));
    regB.push_back(batch.region(Bs[i].size(0), 3 * r));  // [N_i, 3r] = [B_hi | B_lo | B_hi]
    batch.add(regB.back(), keep.back(), kHLH);
  }
  const auto packs = batch.run(x2.options(), dt);
  const Tensor P = at::mm(x2, packs[regA], at::kFloat);  // [M, 2rG] fp32, member blocks
  auto [S, S3, unused] = finalize_split(P.view({M * G, 2 * r}), static_cast<float>(scaling), true, &kHHL, nullptr, dt);
  const Tensor S3m = S3.view({M, 3 * r * G});  // member i's [S_hi | S_hi | S_lo] at column 3r·i
  std::vector<Tensor> ys;
  for (int64_t i = 0; i < G; ++i) {
    const Tensor w = in_dtype(weights[i], dt);
    const Tensor S3i = S3m.narrow(1, 3 * r * i, 3 * r), B3i = packs[regB[i]].t();
    if (sum_adapter_first(M, w.size(0))) {
      Tensor y = biases.empty() ? at::mm(S3i, B3i) : at::addmm(in_dtype(biases[i], dt), S3i, B3i);
      y.addmm_(x2, w.t());  // + X·W_iᵀ (beta = 1)
      ys.push_back(y);
      continue;
    }
    Tensor y = biases.empty() ? at::mm(x2, w.t()) : at::addmm(in_dtype(biases[i], dt), x2, w.t());
    y.addmm_(S3i, B3i);  // + S_i·B_iᵀ (beta = 1)
    ys.push_back(y);
  }
  return {ys, S.view({M, G * r})};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_group_bwd_cuda(
    at::TensorList dys, const Tensor& x2, const Tensor& S, at::TensorList weights, at::TensorList As,
    at::TensorList Bs, double scaling, bool need_x, bool need_A, bool need_B) {
  check_group_shapes(x2, weights, at::TensorList(), As, Bs);
  TORCH_CHECK(dys.size() == weights.size(), "fastpeft lora_group: one output gradient per member");
  if (!group_shares(x2, weights, As, Bs) || !(need_x || need_A || need_B)) {
    return lora_group_bwd_composed(dys, x2, S, weights, As, Bs, scaling, need_x, need_A, need_B);
  }
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const int64_t G = static_cast<int64_t>(weights.size()), M = x2.size(0), K = x2.size(1), r = As[0].size(0);
  auto f32 = x2.options().dtype(at::kFloat);
  std::vector<Tensor> dy, keep;
  for (int64_t i = 0; i < G; ++i) dy.push_back(in_dtype(dys[i], dt));
  const Tensor S32 = in_dtype(S, at::kFloat).contiguous();
  PackBatch batch;
  int regS = -1, regA3 = -1;
  std::vector<int> regB2;
  if (need_B) {
    regS = batch.region(M * G, 2 * r);  // = [M, 2rG]: member i's [S_hi | S_lo] at column 2r·i
    batch.add(regS, S32.view({M * G, r}), kHL);
  }
  if (need_A || need_x) {
    for (int64_t i = 0; i < G; ++i) {
      keep.push_back(in_dtype(Bs[i], at::kFloat));
      regB2.push_back(batch.region(Bs[i].size(0), 2 * r));  // [N_i, 2r] = [B_hi | B_lo]
      batch.add(regB2.back(), keep.back(), kHL);
    }
  }
  if (need_x) {
    regA3 = batch.region(K, 3 * r * G);  // [K, 3rG]: member i's [A_hi | A_lo | A_hi]ᵀ at column 3r·i
    for (int64_t i = 0; i < G; ++i) {
      keep.push_back(in_dtype(As[i], at::kFloat));
      batch.add(regA3, keep.back().t(), kHLH, 3 * r * i);
    }
  }
  const auto packs = batch.run(x2.options(), dt);
  std::vector<CombineSpec> combine;
  if (need_B) {
    const Tensor S2 = packs[regS].view({M, 2 * r * G});
    for (int64_t i = 0; i < G; ++i)
      combine.push_back({at::mm(dy[i].t(), S2.narrow(1, 2 * r * i, 2 * r), at::kFloat), false, Tensor()});  // [N_i, 2r]
  }
  Tensor dx = at::empty({0}, x2.options());
  if (need_A || need_x) {
    std::vector<Tensor> parts;  // member i's s·dS_i halves [M, 2r], side by side at column 2r·i (one cat launch)
    for (int64_t i = 0; i < G; ++i) parts.push_back(at::mm(dy[i], packs[regB2[i]], at::kFloat));
    const Tensor P = at::cat(parts, 1);
    auto [unused, dS2, dS3] = finalize_split(P.view({M * G, 2 * r}), static_cast<float>(scaling), false,
                                             need_A ? &kHL : nullptr, need_x ? &kHHL : nullptr, dt);
    if (need_A) {
      const Tensor PdA = at::mm(dS2.view({M, 2 * r * G}).t(), x2, at::kFloat);  // [2rG, K]: member i at row 2r·i
      for (int64_t i = 0; i < G; ++i) combine.push_back({PdA.narrow(0, 2 * r * i, 2 * r), true, Tensor()});
    }
    if (need_x) {
      if (sum_adapter_first(M, K)) {
        dx = at::mm(dS3.view({M, 3 * r * G}), packs[regA3].t());                      // Σ dS_i·A_i
        for (int64_t i = 0; i < G; ++i) dx.addmm_(dy[i], in_dtype(weights[i], dt));  // + dY_i·W_i (beta = 1)
      } else {
        dx = at::mm(dy[0], in_dtype(weights[0], dt));
        for (int64_t i = 1; i < G; ++i) dx.addmm_(dy[i], in_dtype(weights[i], dt));  // beta = 1
        dx.addmm_(dS3.view({M, 3 * r * G}), packs[regA3].t());                         // + Σ dS_i·A_i
      }
    }
  }
  const auto sums = combine_halves_many(combine);
  std::vector<Tensor> dAs, dBs;
  for (int64_t i = 0; i < G; ++i) {
    dBs.push_back(need_B ? sums[i] : at::empty({0}, f32));
    dAs.push_back(need_A ? sums[(need_B ? G : 0) + i] : at::empty({0}, f32));
  }
  return {dx, dAs, dBs};
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

// ------------------------------------------------------------------------------------------------ DoRA (p = 0)
// S' = s·X·Aᵀ (fp32 [M, r]: LoRA's split GEMM on 16-bit x, one fp32 GEMM on fp32 x) and, with `need_wa`, W·Aᵀ from
// the same packed A (fp32 [N, r], or the split GEMM's two halves [N, 2r]); w in x2's dtype, A32 fp32
std::tuple<Tensor, Tensor> dora_shrink(const Tensor& x2, const Tensor& w, const Tensor& A32, double scaling,
                                       bool need_wa) {
  Tensor S, WA;
  if (x2.scalar_type() == at::kFloat) {
    S = at::mm(x2, A32.t()).mul_(scaling);
    if (need_wa) WA = at::mm(w, A32.t());
  } else {
    const Tensor A2 = pack_split(A32.t(), kHL, x2.scalar_type());  // [K, 2r] = [A_hiᵀ | A_loᵀ]
    S = std::get<0>(finalize_split(at::mm(x2, A2, at::kFloat), static_cast<float>(scaling), true, nullptr, nullptr,
                                   x2.scalar_type()));
    if (need_wa) WA = at::mm(w, A2, at::kFloat);
  }
  return {S, WA};
}

// DoRA's output step, shared by training and inference: Y = g⊙(Z0 + S'·Bᵀ) + b in x's dtype, rounded once. g32 is
// g itself, or with n_div given the magnitude m, divided by n inside the pass (an IEEE division: the bits of ATen's
// m / n). dora_pass up to kDoraMaxRank; larger ranks fp32 [M, N] ATen temporaries.
Tensor dora_output(const Tensor& Z0, const Tensor& S, const Tensor& B32, const Tensor& g32, const Tensor& b,
                   const Tensor& n_div = Tensor()) {
  if (S.size(1) <= kDoraMaxRank) return dora_pass(Z0, S, B32, g32, b, n_div);
  Tensor yf = at::addmm(Z0.to(at::kFloat), S, B32.t()).mul_(n_div.defined() ? g32 / n_div : g32);
  if (b.defined()) yf.add_(b.to(at::kFloat));
  return yf.to(Z0.scalar_type());
}

// Y = g⊙(Z0 + S'·Bᵀ) + b, Z0 = X·Wᵀ (cuBLAS, saved), S' = s·X·Aᵀ (the split GEMM of LoRA's path), g = m/n,
// n² = ‖W‖² + Σ_j B⊙(2s·W·Aᵀ + s²·B·A·Aᵀ) (w_sq = ‖W‖² kept by the layer; the W·Aᵀ GEMM reuses the packed A).
// Launches: X·Wᵀ, pack A, X·A2 + finalize, the norm's two kernels (dora_norm_fused: W·Aᵀ, A·Aᵀ and ‖W‖² in one pass
// over W, then n, g and 1/n; elsewhere W·A2, A·Aᵀ and the norm-and-scale kernel), the output pass.
// Bound: the GEMMs over W (X·Wᵀ: FLOPs; the norm's pass: W's bytes once) and the output pass (Z0 read, Y written
// once, as LoRA's beta = 1 epilogue).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dora_fwd_cuda(
    const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
    const Tensor& magnitude, double scaling, const c10::optional<Tensor>& w_sq,
    const c10::optional<Tensor>& weight_norm) {
  TORCH_CHECK(x2.dim() == 2 && weight.dim() == 2 && weight.size(1) == x2.size(1) && A.dim() == 2 && B.dim() == 2 &&
                  A.size(1) == x2.size(1) && B.size(0) == weight.size(0) && B.size(1) == A.size(0) &&
                  magnitude.numel() == weight.size(0),
              "fastpeft dora: shapes do not fit: x ", x2.sizes(), ", weight ", weight.sizes(), ", lora_A ", A.sizes(),
              ", lora_B ", B.sizes(), ", magnitude ", magnitude.sizes());
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastpeft dora: x must be float32, float16 or bfloat16, got ", dt);
  const Tensor w = in_dtype(weight, dt);
  const Tensor A32 = in_dtype(A, at::kFloat), B32 = in_dtype(B, at::kFloat).contiguous();
  const Tensor m32 = in_dtype(magnitude.reshape({-1}), at::kFloat).contiguous();
  const bool need_norm = !(weight_norm.has_value() && weight_norm->defined());
  if (!need_norm && use_decode(x2.size(0), w.size(0), x2.size(1), A.size(0), 0.0)) {
    // inference with the norm given, at decode sizes: LoRA's decode kernels with g and the bias in the expand
    const Tensor n = in_dtype(weight_norm->reshape({-1}), at::kFloat).contiguous();
    TORCH_CHECK(n.numel() == w.size(0), "fastpeft dora: weight_norm must have out_features elements");
    const bool has_bias = bias.has_value() && bias->defined();
    const DecodeDora dora{m32, n, has_bias ? in_dtype(*bias, dt).contiguous() : Tensor()};
    return decode_forward(x2, w, c10::nullopt, A32, B32, scaling, &dora);
  }
  const Tensor Z0 = at::mm(x2, w.t());
  const bool fused_norm = need_norm && dora_norm_fused_applies(w, A32);
  Tensor S, WA;  // WA: W·Aᵀ [N, r], or its split GEMM's two halves [N, 2r] (summed by dora_norm_scale)
  std::tie(S, WA) = dora_shrink(x2, w, A32, scaling, need_norm && !fused_norm);
  Tensor g, inv_n;
  if (need_norm) {
    const bool given = w_sq.has_value() && w_sq->defined();
    const Tensor wsq = given ? in_dtype(w_sq->reshape({-1}), at::kFloat).contiguous()
                       : fused_norm ? Tensor()  // summed from W by the fused norm's own pass
                                    : at::linalg_vector_norm(w, 2, at::IntArrayRef{1}, false, at::kFloat).square_();
    TORCH_CHECK(!wsq.defined() || wsq.numel() == w.size(0),
                "fastpeft dora: weight_sq_norm must have out_features elements");
    std::tie(g, inv_n) = fused_norm ? dora_norm_fused(w, A32, B32, scaling, wsq, m32)
                                    : dora_norm_scale(WA.contiguous(), B32, at::mm(A32, A32.t()), scaling, wsq, m32);
  } else {
    const Tensor n = in_dtype(weight_norm->reshape({-1}), at::kFloat);
    TORCH_CHECK(n.numel() == w.size(0), "fastpeft dora: weight_norm must have out_features elements");
    g = (m32 / n).contiguous();
    inv_n = n.reciprocal();
  }
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor y = dora_output(Z0, S, B32, g, has_bias ? in_dtype(*bias, dt).contiguous() : Tensor());
  return {y, S, Z0, g, inv_n};
}

// dm = (Σ_rows dY⊙(Z0 + S'·Bᵀ))/n = ((Σ_rows dY⊙Z0) + Σ_j B⊙(dYᵀ·S'))/n: the first sum and dZ = g⊙dY (fp32 g, one
// rounding) in one stream over dY and Z0 (dora_bwd_stream: bytes only, no S'·Bᵀ per element), the second from dB's
// GEMM where its halves are combined (dYᵀ·S' is computed even when dB is not wanted); then LoRA's split-GEMM backward
// on dY with g folded into B's split and dB's combine (dS = s·dY·(g⊙B), dB = g⊙(dYᵀ·S')): the adapter gradients
// never see g⊙dY rounded to 16 bits; dX = dS·A + dZ·W. Any rank. Deterministic mode: dm and dZ from ATen, no atomics
// (the stream's column sums and dm's adapter part arrive by atomics).
std::tuple<Tensor, Tensor, Tensor, Tensor> dora_bwd_cuda(const Tensor& dy2_in, const Tensor& x2, const Tensor& S,
                                                        const Tensor& Z0, const Tensor& g, const Tensor& inv_n,
                                                        const Tensor& weight, const Tensor& A, const Tensor& B,
                                                        double scaling, bool need_x, bool need_A, bool need_B,
                                                        bool need_m) {
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  const Tensor dy2 = in_dtype(dy2_in, dt);
  auto f32 = S.options().dtype(at::kFloat);
  const Tensor g32 = in_dtype(g, at::kFloat).contiguous();
  const Tensor B32 = in_dtype(B, at::kFloat).contiguous();
  Tensor dm = at::empty({0}, f32), dZ;
  // dm's adapter part from dB's GEMM: dm_term.dm is defined when the stream left only (Σ dY⊙Z0)/n in dm
  DoraDmTerm dm_term;
  if (need_m || need_x) {
    if (at::globalContext().deterministicAlgorithms()) {
      const Tensor dyf = dy2.to(at::kFloat);
      if (need_m) dm = (dyf * at::addmm(Z0.to(at::kFloat), S, B32.t())).sum(0).mul_(inv_n);
      if (need_x) dZ = (dyf * g32).to(dt);
    } else {
      if (need_x) dZ = at::empty({dy2.size(0), dy2.size(1)}, dy2.options());
      const Tensor inv_n32 = in_dtype(inv_n, at::kFloat).contiguous();
      Tensor red = dora_bwd_stream(dy2, Z0, g32, dZ, inv_n32, need_m);  // (Σ dY⊙Z0)/n; dm's rest from dB's GEMM
      if (need_m) {
        dm = red;
        dm_term = DoraDmTerm{B32, inv_n32, dm};
      }
    }
  }
  Tensor dx = at::empty({0}, x2.options()), dA = at::empty({0}, f32), dB = at::empty({0}, f32);
  const bool dm_from_dB = dm_term.dm.defined();
  if (need_x || need_A || need_B || dm_from_dB) {
    std::tie(dx, dA, dB) = lora_bwd_split(dy2, x2, S, weight, A, B32, scaling, 0.0, c10::nullopt, 0, need_x, need_A,
                                          need_B, dZ, g32, dm_from_dB ? &dm_term : nullptr);
  }
  return {dx, dA, dB, dm};
}


// DoRA inference with a given norm (the layer's cached one; no autograd recorded, so nothing is kept for a
// backward): Y = g⊙(X·Wᵀ + s·S·Bᵀ) + b, g = m / n. Up to 16 rows (use_decode): LoRA's decode kernels with g and the
// bias in the last one, Y written in place where cuBLAS computed it, no g or 1/n (two or three allocations a
// call fewer than dora_fwd's decode branch); above: dora_fwd_cuda's GEMMs and output pass, g = m / n inside the
// pass (two launches and three tensors fewer than dora_fwd). (A GEMM with g in its epilogue would remove the output
// pass over Z0 there; cuBLASLt's alpha-vector pointer modes, the one epilogue that scales each output feature,
// answer CUBLAS_STATUS_NOT_SUPPORTED for bf16 on the H200 with cuBLAS 13.1: benchmarks/results/h200/INDEX.md,
// session 23.)
Tensor dora_infer_cuda(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                       const Tensor& B, const Tensor& magnitude, double scaling, const Tensor& weight_norm) {
  TORCH_CHECK(x2.dim() == 2 && weight.dim() == 2 && weight.size(1) == x2.size(1) && A.dim() == 2 && B.dim() == 2 &&
                  A.size(1) == x2.size(1) && B.size(0) == weight.size(0) && B.size(1) == A.size(0) &&
                  magnitude.numel() == weight.size(0) && weight_norm.numel() == weight.size(0),
              "fastpeft dora: shapes do not fit: x ", x2.sizes(), ", weight ", weight.sizes(), ", lora_A ", A.sizes(),
              ", lora_B ", B.sizes(), ", magnitude ", magnitude.sizes(), ", weight_norm ", weight_norm.sizes());
  c10::cuda::CUDAGuard guard(x2.device());
  const auto dt = x2.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastpeft dora: x must be float32, float16 or bfloat16, got ", dt);
  const bool has_bias = bias.has_value() && bias->defined();
  if (!use_decode(x2.size(0), weight.size(0), x2.size(1), A.size(0), 0.0)) {
    // dora_fwd's GEMMs and output pass with g = m / n taken inside the pass (no g, 1/n launches or tensors)
    const Tensor w = in_dtype(weight, dt), A32 = in_dtype(A, at::kFloat), B32 = in_dtype(B, at::kFloat).contiguous();
    const Tensor m32 = in_dtype(magnitude.reshape({-1}), at::kFloat).contiguous();
    const Tensor n32 = in_dtype(weight_norm.reshape({-1}), at::kFloat).contiguous();
    const Tensor b = has_bias ? in_dtype(*bias, dt).contiguous() : Tensor();
    const Tensor Z0 = at::mm(x2, w.t());
    return dora_output(Z0, std::get<0>(dora_shrink(x2, w, A32, scaling, false)), B32, m32, b, n32);
  }
  DecodeDora dora{in_dtype(magnitude.reshape({-1}), at::kFloat).contiguous(),
                  in_dtype(weight_norm.reshape({-1}), at::kFloat).contiguous(),
                  has_bias ? in_dtype(*bias, dt).contiguous() : Tensor()};
  dora.keep = false;
  return std::get<0>(decode_forward(x2, in_dtype(weight, dt), c10::nullopt, in_dtype(A, at::kFloat),
                                    in_dtype(B, at::kFloat).contiguous(), scaling, &dora));
}

// ------------------------------------------------------------------------------------------------ mixed batches
// lora_mixed_delta_ (adapter_ops.cpp has the math): every segment of `tokens` rows adds its own adapter's
// s_a·(x·A_aᵀ)·B_aᵀ to y, for any mix of adapters, in two launches per 64 adapters (three on the tensor-core prefill
// path below; no Python loop, no stacked copy: the adapters' pointers, row strides, ranks and scalings ride in the
// kernels' parameters, read from the live tensors on every call).
//   shrink: part[split, m, j] = Σ_{k in split} x[m, k]·A_a[j, k]   (a tile of 1-4 rows of one segment per block, or
//           64 rows through shared memory for prefill-sized segments of fp32 activations (16-bit ones: the
//           tensor-core kernels below); the K range split across blocks so that decode's few rows still fill the
//           GPU; fp32 FMAs)
//   expand: y[m, n] = y[m, n] + s_a·Σ_j (Σ_split part)[m, j]·B_a[n, j]   (one column per thread, B_a[n, :] in
//           registers reused over a tile of rows; fp32, y rounded once)
// Bound: decode (1 row per segment) reads each used adapter's A and B once (4·r·(K + N) bytes in fp32) plus tiny
// x / y rows: bytes and launch latency. Prefill adds 2·M·r·(K + N) fp32 FMAs (SIMT) and A re-reads from L2 per row
// tile; both small next to the base GEMM (2·M·N·K on tensor cores).
constexpr int kMixedThreads = 128;
constexpr int kMixedExpandRows = 16; // rows per expand block (B_a[n, :] reused across them)

// rows of a tile: [row0, row0 + rows), all in segment `seg`; adapter index within the chunk, or -1
struct MixedTile {
  int64_t row0;
  int rows;
  int adapter;
};

__device__ __forceinline__ MixedTile mixed_tile(const int* seg_of, int64_t tile, int64_t tiles_per_seg, int64_t tokens,
                                                int tile_rows, const MixedChunk& c) {
  MixedTile t;
  const int64_t seg = tile / tiles_per_seg;
  t.row0 = seg * tokens + (tile % tiles_per_seg) * tile_rows;
  const int64_t left = seg * tokens + tokens - t.row0;
  t.rows = static_cast<int>(left < tile_rows ? left : tile_rows);
  const int a = seg_of[seg] - c.first;
  t.adapter = (a >= 0 && a < c.count) ? a : -1;
  return t;
}

template <typename T, typename TW, int RMAX, int TM>
__global__ void __launch_bounds__(kMixedThreads) mixed_shrink_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxk, const int* __restrict__ seg_of, int64_t tokens,
    int64_t tiles_per_seg, int64_t K, int splits, const MixedChunk c, float* __restrict__ part, int64_t M, int64_t R) {
  const MixedTile t = mixed_tile(seg_of, blockIdx.x, tiles_per_seg, tokens, TM, c);
  if (t.adapter < 0) return;  // uniform across the block
  const TW* A = static_cast<const TW*>(c.a[t.adapter]);
  const int64_t sa = c.a_row[t.adapter];
  const int rank = c.rank[t.adapter];
  float acc[TM][RMAX];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < RMAX; ++j) acc[i][j] = 0.0f;
  const int64_t step = static_cast<int64_t>(splits) * kMixedThreads * 4;
  for (int64_t k0 = (static_cast<int64_t>(blockIdx.y) * kMixedThreads + threadIdx.x) * 4; k0 < K; k0 += step) {
    float xv[TM][4];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int u = 0; u < 4; ++u)
        xv[i][u] = (i < t.rows && k0 + u < K) ? to_f<T>(x[(t.row0 + i) * sxm + (k0 + u) * sxk]) : 0.0f;
#pragma unroll
    for (int j = 0; j < RMAX; ++j) {
      if (j < rank) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float av = k0 + u < K ? to_f<TW>(A[j * sa + k0 + u]) : 0.0f;
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[i][j] += xv[i][u] * av;
        }
      }
    }
  }
  __shared__ float red[kMixedThreads / 32][TM * RMAX];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < RMAX; ++j) {
      float v = acc[i][j];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][i * RMAX + j] = v;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < TM * RMAX; e += kMixedThreads) {
    const int i = e / RMAX, j = e % RMAX;
    if (i < t.rows && j < rank) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kMixedThreads / 32; ++w) v += red[w][e];
      part[(static_cast<int64_t>(blockIdx.y) * M + t.row0 + i) * R + j] = v;
    }
  }
}

// Prefill-sized segments (tokens >= kMixedTiledTokens): a tile of 64 rows of one segment and all ranks per block,
// x and A staged through shared memory in chunks of 32 k (A read once per 64 rows, not per 1-4 rows as above).
// 4·RMAX threads; thread (row group g = t % 16, rank group h = t / 16) owns rows 4g..4g+3 × ranks 4h..4h+3: per 4 k,
// 8 16-byte shared loads feed 64 FMAs.
constexpr int kMixedTiledTokens = 32;
constexpr int kTiledRows = 64, kTiledK = 32, kTiledPad = kTiledK + 4;

template <typename T, typename TW, int RMAX>
__global__ void __launch_bounds__(4 * RMAX) mixed_shrink_tiled_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxk, const int* __restrict__ seg_of, int64_t tokens,
    int64_t tiles_per_seg, int64_t K, int splits, const MixedChunk c, float* __restrict__ part, int64_t M, int64_t R) {
  constexpr int kThreadsT = 4 * RMAX;
  const MixedTile t = mixed_tile(seg_of, blockIdx.x, tiles_per_seg, tokens, kTiledRows, c);
  if (t.adapter < 0) return;
  const TW* A = static_cast<const TW*>(c.a[t.adapter]);
  const int64_t sa = c.a_row[t.adapter];
  const int rank = c.rank[t.adapter];
  __shared__ __align__(16) float xs[kTiledRows][kTiledPad];
  __shared__ __align__(16) float as[RMAX][kTiledPad];
  const int g = threadIdx.x % 16, h = threadIdx.x / 16;
  float acc[4][4] = {};
  const int64_t chunks = (K + kTiledK - 1) / kTiledK;
  for (int64_t ch = blockIdx.y; ch < chunks; ch += splits) {
    const int64_t k0 = ch * kTiledK;
    for (int e = threadIdx.x; e < kTiledRows * kTiledK; e += kThreadsT) {
      const int i = e / kTiledK, kk = e % kTiledK;
      xs[i][kk] = (i < t.rows && k0 + kk < K) ? to_f<T>(x[(t.row0 + i) * sxm + (k0 + kk) * sxk]) : 0.0f;
    }
    for (int e = threadIdx.x; e < RMAX * kTiledK; e += kThreadsT) {
      const int j = e / kTiledK, kk = e % kTiledK;
      as[j][kk] = (j < rank && k0 + kk < K) ? to_f<TW>(A[j * sa + k0 + kk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTiledK; kk += 4) {
      float4 xv[4], av[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) xv[u] = *reinterpret_cast<const float4*>(&xs[4 * g + u][kk]);
#pragma unroll
      for (int v = 0; v < 4; ++v) av[v] = *reinterpret_cast<const float4*>(&as[4 * h + v][kk]);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v)
          acc[u][v] += xv[u].x * av[v].x + xv[u].y * av[v].y + xv[u].z * av[v].z + xv[u].w * av[v].w;
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = 4 * g + u, j = 4 * h + v;
      if (i < t.rows && j < rank) part[(static_cast<int64_t>(blockIdx.y) * M + t.row0 + i) * R + j] = acc[u][v];
    }
}

template <typename T, typename TW, int RMAX>
__global__ void __launch_bounds__(kMixedThreads) mixed_expand_kernel(
    T* __restrict__ y, int64_t sym, int64_t syn, const int* __restrict__ seg_of, int64_t tokens, int64_t tiles_per_seg,
    int64_t N, int splits, const MixedChunk c, const float* __restrict__ part, int64_t M, int64_t R) {
  const MixedTile t = mixed_tile(seg_of, blockIdx.x, tiles_per_seg, tokens, kMixedExpandRows, c);
  if (t.adapter < 0) return;
  const int rank = c.rank[t.adapter];
  __shared__ float S[kMixedExpandRows][RMAX];
  for (int e = threadIdx.x; e < kMixedExpandRows * RMAX; e += kMixedThreads) {
    const int i = e / RMAX, j = e % RMAX;
    float v = 0.0f;
    if (i < t.rows && j < rank)
      for (int sp = 0; sp < splits; ++sp) v += part[(static_cast<int64_t>(sp) * M + t.row0 + i) * R + j];
    S[i][j] = v;
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kMixedThreads + threadIdx.x;
  if (n >= N) return;
  const TW* B = static_cast<const TW*>(c.b[t.adapter]) + n * c.b_row[t.adapter];
  float b[RMAX];
#pragma unroll
  for (int j = 0; j < RMAX; ++j) b[j] = j < rank ? to_f<TW>(B[j]) : 0.0f;
  const float scale = c.scale[t.adapter];
  for (int i = 0; i < t.rows; ++i) {
    float d = 0.0f;
#pragma unroll
    for (int j = 0; j < RMAX; ++j) d += S[i][j] * b[j];
    T* p = y + (t.row0 + i) * sym + n * syn;
    *p = from_f<T>(to_f<T>(*p) + d * scale);
  }
}

// Tensor-core prefill kernels (16-bit activations, segments of >= kMixedTiledTokens rows, sm_80+). The same sums as
// the SIMT kernels above, on WMMA 16x16x16 tiles with fp32 accumulators; fp32 operands enter as hi + lo 16-bit
// parts (hi = 16-bit(v), lo = 16-bit(v - hi)), as the one-adapter split GEMMs do (lo·lo, ~2^-17 of the product,
// dropped), so the products keep ~fp32 precision (the 16-bit output then rounds once).
//   shrink: part[split] = x·[A_hi | A_lo]ᵀ over a K slice, a 64-row tile of one segment × all ranks per block; x in
//           its own dtype, A's parts in x's dtype (A_lo absent when A is x's dtype); 4 warps × 16 rows; K in chunks
//           of 64 through shared memory, the next chunk's loads in flight (registers) during this chunk's MMAs.
//   split:  S = Σ_split part, written once as bf16 hi + lo parts [2, M, R] (so the expand's many column tiles read
//           4 bytes per S entry instead of 4·splits).
//   expand: a 64-row × 64-column tile: y = 16-bit(y + s·(S_hi·B_hiᵀ + S_lo·B_hiᵀ + S_hi·B_loᵀ)) with B's parts in
//           bf16 for fp16 activations too (fp32's range: no part can overflow); y's tile is loaded before the MMAs.
// Every loop that loads from global memory has a compile-time trip count and is unrolled into registers, so a
// thread's loads are all in flight at once (a loop of load-then-store would wait out one latency per element).
// Bound: memory. shrink reads x once (M·K·2 bytes; A from L2 per tile); expand reads and writes y once (2·M·N·2
// bytes; B and S from L2 per tile); the tensor-core FLOPs (2-3 × 2·M·r·(K + N)) are < 5% of the base GEMM's.
// So ~2·M·(K + 2N) bytes per projection: at M = 4096, K = N = 4096, ~100 MB, ~25 µs against ~200 µs of base GEMM.
constexpr int kMmaRows = 64, kMmaK = 64, kMmaCols = 64, kMmaThreads = 128;
constexpr int kMmaLd = kMmaK + 8;  // 72 halves: 144-byte rows keep every 16-row fragment start 32-byte aligned
static_assert(kMmaCols == kMmaRows, "the expand stages S's and B's tiles in one (row, rank) walk");

template <typename T, typename TW, int RMAX>
__global__ void __launch_bounds__(kMmaThreads) mixed_shrink_mma_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxk, const int* __restrict__ seg_of, int64_t tokens,
    int64_t tiles_per_seg, int64_t K, int splits, const MixedChunk c, float* __restrict__ part, int64_t M, int64_t R) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr bool kLo = !std::is_same<TW, T>::value;  // fp32 adapters: a lo part carries A's low bits
  constexpr int kXPer = kMmaRows * kMmaK / kMmaThreads, kAPer = RMAX * kMmaK / kMmaThreads;
  const MixedTile t = mixed_tile(seg_of, blockIdx.x, tiles_per_seg, tokens, kMmaRows, c);
  if (t.adapter < 0) return;  // uniform across the block
  const TW* A = static_cast<const TW*>(c.a[t.adapter]);
  const int64_t sa = c.a_row[t.adapter];
  const int rank = c.rank[t.adapter];
  const int rank_tiles = (rank + 15) / 16;
  __shared__ __align__(32) T xs[kMmaRows][kMmaLd];
  __shared__ __align__(32) T ah[RMAX][kMmaLd];
  __shared__ __align__(32) T al[kLo ? RMAX : 1][kMmaLd];
  __shared__ __align__(32) float stage[kMmaThreads / 32][16][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T zero = from_f<T>(0.0f);
  T xr[kXPer];
  float ar[kAPer];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kXPer; ++u) {
      const int e = threadIdx.x + u * kMmaThreads, i = e / kMmaK, kk = e % kMmaK;
      xr[u] = (i < t.rows && k0 + kk < K) ? x[(t.row0 + i) * sxm + (k0 + kk) * sxk] : zero;
    }
#pragma unroll
    for (int u = 0; u < kAPer; ++u) {
      const int e = threadIdx.x + u * kMmaThreads, j = e / kMmaK, kk = e % kMmaK;
      ar[u] = (j < rank && k0 + kk < K) ? to_f<TW>(A[j * sa + k0 + kk]) : 0.0f;
    }
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RMAX / 16];
#pragma unroll
  for (int jt = 0; jt < RMAX / 16; ++jt) wmma::fill_fragment(acc[jt], 0.0f);
  const int64_t chunks = (K + kMmaK - 1) / kMmaK;
  if (static_cast<int64_t>(blockIdx.y) < chunks) load(static_cast<int64_t>(blockIdx.y) * kMmaK);
  for (int64_t ch = blockIdx.y; ch < chunks; ch += splits) {
#pragma unroll
    for (int u = 0; u < kXPer; ++u) {
      const int e = threadIdx.x + u * kMmaThreads;
      xs[e / kMmaK][e % kMmaK] = xr[u];
    }
#pragma unroll
    for (int u = 0; u < kAPer; ++u) {
      const int e = threadIdx.x + u * kMmaThreads;
      const T hi = from_f<T>(ar[u]);
      ah[e / kMmaK][e % kMmaK] = hi;
      if constexpr (kLo) al[e / kMmaK][e % kMmaK] = from_f<T>(ar[u] - to_f<T>(hi));
    }
    __syncthreads();
    if (ch + splits < chunks) load((ch + splits) * kMmaK);  // in flight during the MMAs below
#pragma unroll
    for (int ks = 0; ks < kMmaK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> xf;
      wmma::load_matrix_sync(xf, &xs[warp * 16][ks], kMmaLd);
#pragma unroll
      for (int jt = 0; jt < RMAX / 16; ++jt) {
        if (jt < rank_tiles) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> af;  // Aᵀ: column j = A's row j
          wmma::load_matrix_sync(af, &ah[jt * 16][ks], kMmaLd);
          wmma::mma_sync(acc[jt], xf, af, acc[jt]);
          if constexpr (kLo) {
            wmma::load_matrix_sync(af, &al[jt * 16][ks], kMmaLd);
            wmma::mma_sync(acc[jt], xf, af, acc[jt]);
          }
        }
      }
    }
    __syncthreads();
  }
  float* out = part + (static_cast<int64_t>(blockIdx.y) * M + t.row0) * R;
#pragma unroll
  for (int jt = 0; jt < RMAX / 16; ++jt) {
    if (jt < rank_tiles) {
      wmma::store_matrix_sync(&stage[warp][0][0], acc[jt], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int it = 0; it < 8; ++it) {
        const int e = lane + 32 * it, i = warp * 16 + e / 16, j = jt * 16 + e % 16;
        if (i < t.rows && j < rank) out[static_cast<int64_t>(i) * R + j] = stage[warp][e / 16][e % 16];
      }
      __syncwarp();
    }
  }
#endif
}

// S = Σ_split part for the rows of this chunk's adapters (j < their rank), as bf16 hi + lo parts: s16[0] / s16[1]
__global__ void mixed_split_kernel(const int* __restrict__ seg_of, int64_t tokens, const MixedChunk c,
                                   const float* __restrict__ part, int splits, int64_t M, int64_t R,
                                   __nv_bfloat16* __restrict__ s16) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * R) return;
  const int64_t m = idx / R;
  const int j = static_cast<int>(idx % R);
  const int a = seg_of[m / tokens] - c.first;
  if (a < 0 || a >= c.count || j >= c.rank[a]) return;
  float v = 0.0f;
  for (int sp = 0; sp < splits; ++sp) v += part[static_cast<int64_t>(sp) * M * R + idx];
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  s16[idx] = hi;
  s16[M * R + idx] = __float2bfloat16_rn(v - __bfloat162float(hi));
}

template <typename T, typename TW, int RMAX>
__global__ void __launch_bounds__(kMmaThreads) mixed_expand_mma_kernel(
    T* __restrict__ y, int64_t sym, int64_t syn, const int* __restrict__ seg_of, int64_t tokens, int64_t tiles_per_seg,
    int64_t N, const MixedChunk c, const __nv_bfloat16* __restrict__ s16, int64_t M, int64_t R) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using B16 = __nv_bfloat16;
  constexpr bool kBLo = !std::is_same<TW, B16>::value;  // B wider than bf16 (fp32, or fp16's 11 bits): a lo part
  constexpr int LD = RMAX + 8;                          // halves; 16-row fragment starts stay 32-byte aligned
  constexpr int kCt = kMmaCols / 16, kPer = kMmaRows * RMAX / kMmaThreads;
  const MixedTile t = mixed_tile(seg_of, blockIdx.x, tiles_per_seg, tokens, kMmaRows, c);
  if (t.adapter < 0) return;
  const int rank = c.rank[t.adapter];
  const int rank_tiles = (rank + 15) / 16;
  const TW* B = static_cast<const TW*>(c.b[t.adapter]);
  const int64_t sb = c.b_row[t.adapter];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMmaCols;
  __shared__ __align__(32) B16 sh[kMmaRows][LD];
  __shared__ __align__(32) B16 sl[kMmaRows][LD];
  __shared__ __align__(32) B16 bh[kMmaCols][LD];
  __shared__ __align__(32) B16 bl[kBLo ? kMmaCols : 1][LD];
  __shared__ __align__(32) float stage[kMmaThreads / 32][16][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // this warp's 16 × 64 tile of y, loaded first: in flight while S and B are staged and multiplied
  T yv[kCt][8];
#pragma unroll
  for (int ct = 0; ct < kCt; ++ct)
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const int e = lane + 32 * it, i = warp * 16 + e / 16;
      const int64_t n = n0 + ct * 16 + e % 16;
      yv[ct][it] = (i < t.rows && n < N) ? y[(t.row0 + i) * sym + n * syn] : from_f<T>(0.0f);
    }
  const B16 bzero = __float2bfloat16_rn(0.0f);
  B16 s_hi[kPer], s_lo[kPer];
  float bv[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int e = threadIdx.x + u * kMmaThreads, i = e / RMAX, j = e % RMAX;
    const bool ok = i < t.rows && j < rank;
    const int64_t off = (t.row0 + i) * R + j;
    s_hi[u] = ok ? s16[off] : bzero;
    s_lo[u] = ok ? s16[M * R + off] : bzero;
    const int64_t n = n0 + i;  // kMmaCols == kMmaRows: the same (row, rank) walk covers B's tile
    bv[u] = (n < N && j < rank) ? to_f<TW>(B[n * sb + j]) : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int e = threadIdx.x + u * kMmaThreads, i = e / RMAX, j = e % RMAX;
    sh[i][j] = s_hi[u];
    sl[i][j] = s_lo[u];
    const B16 hi = __float2bfloat16_rn(bv[u]);
    bh[i][j] = hi;
    if constexpr (kBLo) bl[i][j] = __float2bfloat16_rn(bv[u] - __bfloat162float(hi));
  }
  __syncthreads();
  if (warp * 16 >= t.rows) return;  // no row of this warp's 16 (no block-wide sync follows)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kCt];
#pragma unroll
  for (int ct = 0; ct < kCt; ++ct) wmma::fill_fragment(acc[ct], 0.0f);
#pragma unroll
  for (int kt = 0; kt < RMAX / 16; ++kt) {
    if (kt < rank_tiles) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, B16, wmma::row_major> f_hi, f_lo;
      wmma::load_matrix_sync(f_hi, &sh[warp * 16][kt * 16], LD);
      wmma::load_matrix_sync(f_lo, &sl[warp * 16][kt * 16], LD);
#pragma unroll
      for (int ct = 0; ct < kCt; ++ct) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, B16, wmma::col_major> bf;  // Bᵀ: column n = B's row n
        wmma::load_matrix_sync(bf, &bh[ct * 16][kt * 16], LD);
        wmma::mma_sync(acc[ct], f_hi, bf, acc[ct]);
        wmma::mma_sync(acc[ct], f_lo, bf, acc[ct]);
        if constexpr (kBLo) {
          wmma::load_matrix_sync(bf, &bl[ct * 16][kt * 16], LD);
          wmma::mma_sync(acc[ct], f_hi, bf, acc[ct]);
        }
      }
    }
  }
  const float scale = c.scale[t.adapter];
#pragma unroll
  for (int ct = 0; ct < kCt; ++ct) {
    wmma::store_matrix_sync(&stage[warp][0][0], acc[ct], 16, wmma::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const int e = lane + 32 * it, i = warp * 16 + e / 16;
      const int64_t n = n0 + ct * 16 + e % 16;
      if (i < t.rows && n < N)
        y[(t.row0 + i) * sym + n * syn] = from_f<T>(to_f<T>(yv[ct][it]) + stage[warp][e / 16][e % 16] * scale);
    }
    __syncwarp();
  }
#endif
}

// A mixed batch's adapter operands: every adapter's A and B in dtype wt (the adapters' own dtype when they share
// fp32 or x's dtype, else fp32 copies: the math is fp32 either way), columns contiguous (copies where not), and
// the largest rank. The copies (rare) live in `keep` until the launches are queued.
struct MixedOperands {
  at::ScalarType wt;
  int64_t R = 1;
  std::vector<Tensor> A, B, keep;
};

MixedOperands mixed_operands(at::TensorList lora_A, at::TensorList lora_B, at::ScalarType dt) {
  MixedOperands o;
  const at::ScalarType first = lora_A[0].scalar_type();
  bool one_dtype = true;
  for (size_t i = 0; i < lora_A.size(); ++i) {
    one_dtype = one_dtype && lora_A[i].scalar_type() == first && lora_B[i].scalar_type() == first;
    o.R = std::max<int64_t>(o.R, lora_A[i].size(0));
  }
  TORCH_CHECK(o.R <= kMixedMaxRank, "fastpeft lora_mixed_delta_: ranks up to ", kMixedMaxRank, " (got ", o.R, ")");
  o.wt = one_dtype && (first == at::kFloat || first == dt) ? first : at::kFloat;
  const auto operand = [&](const Tensor& w) -> Tensor {
    Tensor v = w.scalar_type() == o.wt ? w : w.to(o.wt);
    if (v.size(1) > 1 && v.stride(1) != 1) v = v.contiguous();
    if (!v.is_same(w)) o.keep.push_back(v);
    return v;
  };
  for (size_t i = 0; i < lora_A.size(); ++i) {
    o.A.push_back(operand(lora_A[i]));
    o.B.push_back(operand(lora_B[i]));
  }
  return o;
}

// Adapters first .. first + count - 1 as the kernels' parameter block; a_vec / b_vec: every A row (B row) starts on
// a 4-element boundary at unit column stride (the decode shrink's and the mixed GEMV's vector loads), B's ranks too.
MixedChunk mixed_chunk(const MixedOperands& o, c10::ArrayRef<double> scales, int64_t first, int64_t count,
                       bool* a_vec = nullptr, bool* b_vec = nullptr) {
  MixedChunk c{};
  c.first = static_cast<int>(first);
  c.count = static_cast<int>(count);
  bool av = true, bv = true;
  const auto aligned = [](const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0 && t.stride(0) % 4 == 0 &&
           (t.size(1) == 1 || t.stride(1) == 1);
  };
  for (int i = 0; i < c.count; ++i) {
    const Tensor &A = o.A[first + i], &B = o.B[first + i];
    c.a[i] = A.data_ptr();
    c.b[i] = B.data_ptr();
    c.a_row[i] = A.stride(0);
    c.b_row[i] = B.stride(0);
    c.rank[i] = static_cast<int>(A.size(0));
    c.scale[i] = static_cast<float>(scales[first + i]);
    av = av && aligned(A);
    bv = bv && aligned(B) && A.size(0) % 4 == 0;
  }
  if (a_vec != nullptr) *a_vec = av;
  if (b_vec != nullptr) *b_vec = bv;
  return c;
}

// mixed_decode_shrink_kernel over x2 [M, K] (segments of `tokens` rows) into part [splits, M, R] on `stream`.
void launch_mixed_decode_shrink(const Tensor& x2, const Tensor& seg, int64_t tokens, const MixedChunk& c,
                                at::ScalarType wt, int64_t R, const Tensor& part, int64_t splits, int64_t k_per,
                                bool a_vec, cudaStream_t stream, bool trigger) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const bool x_vec = x2.stride(1) == 1 && x2.stride(0) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(x2.data_ptr()) % (4 * x2.element_size()) == 0;
  dispatch_all(x2.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto launch = [&](auto* wtag) {
      using TW = std::remove_pointer_t<decltype(wtag)>;
      dispatch_rank(static_cast<int>(R), [&](auto rmax) {
        constexpr int JPW = decltype(rmax)::value / kDecodeWarps;
        const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(M));
        mixed_decode_shrink_kernel<T, TW, JPW><<<grid, kDecodeWarps * 32, 0, stream>>>(
            reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), x2.stride(1), M, K, seg.data_ptr<int>(), tokens,
            c, static_cast<int>(R), part.data_ptr<float>(), k_per, x_vec, a_vec, trigger);
      });
    };
    if (wt == at::kFloat) {
      launch(static_cast<float*>(nullptr));
    } else {
      launch(static_cast<T*>(nullptr));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// lora_mixed_linear at decode sizes (registered for CUDA in adapter_ops.cpp): y = x·Wᵀ + b with every row's own
// adapter's s·(x·Aᵀ)·Bᵀ, as the one-adapter decode forward does -- the mixed decode shrink, then decode_gemv's
// mixed variant (the base GEMV with each row's expand in its epilogue) as a programmatic dependent of it: two
// launches and one dispatcher entry instead of the composition's ATen linear + shrink + expand. Numbers: the same
// two roundings as the composition (dtype(dtype(x·Wᵀ + b) + s·S·Bᵀ)); the base product's sums are decode_gemv's,
// the one-adapter decode path's (in bf16 under 2 % of outputs differ from cuBLAS's in the last bit). Applies to what
// use_decode_gemv admits (16-bit x of <= 8 rows, aligned rows) with at most kMixedChunk adapters, all fp32, of rank
// <= kMixedGemvRank; returns an undefined tensor otherwise (the caller runs the composition). The arguments are
// checked as lora_mixed_delta_ checks them.
Tensor lora_mixed_decode_cuda(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const Tensor& adapter_of_segment, int64_t tokens, at::TensorList lora_A,
                              at::TensorList lora_B, c10::ArrayRef<double> scales) {
  const int64_t n = static_cast<int64_t>(lora_A.size());
  if (x.dim() < 2 || weight.dim() != 2 || n == 0 || n > kMixedChunk || lora_B.size() != lora_A.size() ||
      x.numel() == 0 || weight.size(1) != x.size(-1) || weight.scalar_type() != x.scalar_type() ||
      !weight.is_cuda() || x.device() != weight.device() || x.numel() / x.size(-1) > kGemvMaxM) {
    return Tensor();  // (rows counted before any reshape: batch-32 decode comes here per layer and leaves at once)
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lora_A[i].scalar_type() != at::kFloat || lora_B[i].scalar_type() != at::kFloat || lora_A[i].dim() != 2 ||
        lora_A[i].size(0) > kMixedGemvRank) {
      return Tensor();
    }
  }
  const int64_t K = x.size(-1), N = weight.size(0);
  const Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (!use_decode_gemv(x2, weight, M, K, props->major, capturing) ||
      (capturing && (N + kGemvRows - 1) / kGemvRows > decode_gemv_slots<MixedDecode>())) {
    return Tensor();
  }
  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty({M, N}, x2.options());
  check_mixed_args(y, x2, adapter_of_segment, tokens, lora_A, lora_B, scales);
  const Tensor seg = adapter_of_segment.is_contiguous() ? adapter_of_segment : adapter_of_segment.contiguous();
  const MixedOperands o = mixed_operands(lora_A, lora_B, x.scalar_type());
  bool a_vec = false, b_vec = false;
  const MixedDecode mix{seg.data_ptr<int>(), tokens, mixed_chunk(o, scales, 0, n, &a_vec, &b_vec)};
  int64_t splits, k_per;
  std::tie(splits, k_per) = decode_splits(M, K);
  const Tensor part = at::empty({splits, M, o.R}, x2.options().dtype(at::kFloat));
  const Tensor b = bias.has_value() && bias->defined() ? in_dtype(*bias, x.scalar_type()).contiguous() : Tensor();
  const bool pdl = decode_pdl_mode() != 0 && props->major >= 9;
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_mixed_decode_shrink(x2, seg, tokens, mix.c, o.wt, o.R, part, splits, k_per, a_vec, stream.stream(), pdl);
  dispatch_16(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t tiles = (N + kGemvRows - 1) / kGemvRows;
    const int64_t slots = decode_gemv_slots<MixedDecode>();
    const int64_t per_block = (tiles + slots - 1) / slots;
    const device::PdlLaunchConfig config(dim3(static_cast<unsigned>((tiles + per_block - 1) / per_block)),
                                         dim3(kGemvWarps * 32), stream.stream(), pdl);
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &config.cfg, decode_gemv_kernel<T, MixedDecode>, reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0),
        static_cast<int>(M), static_cast<int>(K), reinterpret_cast<const T*>(weight.data_ptr()), weight.stride(0), N,
        b.defined() ? reinterpret_cast<const T*>(b.data_ptr()) : static_cast<const T*>(nullptr),
        static_cast<const float*>(part.data_ptr<float>()), static_cast<int>(splits), static_cast<int>(o.R), 1.0f,
        static_cast<float*>(nullptr), static_cast<const float*>(nullptr), int64_t{0}, int64_t{0}, b_vec,
        reinterpret_cast<T*>(y.data_ptr()), static_cast<T*>(nullptr), static_cast<const float*>(nullptr),
        static_cast<const float*>(nullptr), static_cast<float*>(nullptr), static_cast<float*>(nullptr), mix));
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

// The CUDA kernel of lora_mixed_delta_ (registered in adapter_ops.cpp, which unpacks the MixedAdapters set).
void lora_mixed_delta_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& adapter_of_segment, int64_t tokens,
                           at::TensorList lora_A, at::TensorList lora_B, c10::ArrayRef<double> scales) {
  check_mixed_args(y, x, adapter_of_segment, tokens, lora_A, lora_B, scales);
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t n = static_cast<int64_t>(lora_A.size());
  if (M == 0 || N == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const auto dt = x.scalar_type();
  const MixedOperands o = mixed_operands(lora_A, lora_B, dt);
  const at::ScalarType wt = o.wt;
  const int64_t R = o.R;
  const Tensor seg = adapter_of_segment.is_contiguous() ? adapter_of_segment : adapter_of_segment.contiguous();
  const int64_t segments = M / tokens;
  const bool tiled = tokens >= kMixedTiledTokens;
  // decode-sized batches (few rows): the decode shrink (a block per row and K slice, 16-byte loads; the row-tile
  // kernel below took 10.9 µs a call at 8 rows of Llama-8B, H200)
  const bool decode_rows = !tiled && M <= kDecodeMaxM;
  // prefill-sized segments of 16-bit activations: the tensor-core kernels (WMMA needs sm_80)
  const bool mma = tiled && dt != at::kFloat && at::cuda::getCurrentDeviceProperties()->major >= 8;
  const int tm = tiled ? kTiledRows : (R <= 16 ? 4 : (R <= 32 ? 2 : 1));
  const int64_t shrink_tiles_per_seg = (tokens + tm - 1) / tm;
  const int expand_rows = mma ? kMmaRows : kMixedExpandRows, expand_cols = mma ? kMmaCols : kMixedThreads;
  const int64_t expand_tiles_per_seg = (tokens + expand_rows - 1) / expand_rows;
  const int64_t shrink_tiles = segments * shrink_tiles_per_seg;
  // K split across blocks until the grid has ~2 (row-tile kernel) / ~4 (tiled kernels) blocks per SM
  const int64_t k_groups = mma     ? (K + kMmaK - 1) / kMmaK
                           : tiled ? (K + kTiledK - 1) / kTiledK
                                   : std::max<int64_t>(1, (K + kMixedThreads * 4 - 1) / (kMixedThreads * 4));
  const int64_t want = (tiled ? 4 : 2) * sm_count();
  int64_t splits = std::min<int64_t>(
      {std::max<int64_t>(1, k_groups), 32, std::max<int64_t>(1, (want + shrink_tiles - 1) / shrink_tiles)});
  int64_t k_per = 0;
  if (decode_rows) std::tie(splits, k_per) = decode_splits(M, K);
  const Tensor part = at::empty({splits, M, R}, x.options().dtype(at::kFloat));
  const Tensor s16 = mma ? at::empty({2, M, R}, x.options().dtype(at::kBFloat16)) : Tensor();  // S's hi / lo parts
  auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(shrink_tiles <= INT32_MAX && segments * expand_tiles_per_seg <= INT32_MAX,
              "fastpeft lora_mixed_delta_: too many rows");
  const dim3 shrink_grid(static_cast<unsigned>(shrink_tiles), static_cast<unsigned>(splits));
  const dim3 expand_grid(static_cast<unsigned>(segments * expand_tiles_per_seg),
                         static_cast<unsigned>((N + expand_cols - 1) / expand_cols));
  TORCH_CHECK(expand_grid.y <= 65535, "fastpeft lora_mixed_delta_: out_features too large");
  for (int64_t first = 0; first < n; first += kMixedChunk) {
    bool a_vec = false;
    const MixedChunk c = mixed_chunk(o, scales, first, std::min<int64_t>(kMixedChunk, n - first), &a_vec);
    if (decode_rows) {
      launch_mixed_decode_shrink(x, seg, tokens, c, wt, R, part, splits, k_per, a_vec, stream.stream(), false);
    }
    dispatch_all(dt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      auto launch = [&](auto* wtag) {
        using TW = std::remove_pointer_t<decltype(wtag)>;
        const T* xp = reinterpret_cast<const T*>(x.data_ptr());
        T* yp = reinterpret_cast<T*>(y.data_ptr());
        const int* sp = seg.data_ptr<int>();
        float* pp = part.data_ptr<float>();
        __nv_bfloat16* s16p = mma ? reinterpret_cast<__nv_bfloat16*>(s16.data_ptr()) : nullptr;
#define FP_MIXED(RM, TMV)                                                                                          \
  if constexpr (!std::is_same<T, float>::value) {                                                                  \
    if (mma) {                                                                                                     \
      mixed_shrink_mma_kernel<T, TW, RM><<<shrink_grid, kMmaThreads, 0, stream>>>(                                 \
          xp, x.stride(0), x.stride(1), sp, tokens, shrink_tiles_per_seg, K, splits, c, pp, M, R);                 \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                              \
      mixed_split_kernel<<<static_cast<unsigned>((M * R + kThreads - 1) / kThreads), kThreads, 0, stream>>>(         \
          sp, tokens, c, pp, splits, M, R, s16p);                                                                  \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                              \
      mixed_expand_mma_kernel<T, TW, RM><<<expand_grid, kMmaThreads, 0, stream>>>(                                 \
          yp, y.stride(0), y.stride(1), sp, tokens, expand_tiles_per_seg, N, c, s16p, M, R);                       \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                              \
      return;                                                                                                      \
    }                                                                                                              \
  }                                                                                                                \
  if (tiled) {                                                                                                     \
    mixed_shrink_tiled_kernel<T, TW, RM><<<shrink_grid, 4 * RM, 0, stream>>>(                                      \
        xp, x.stride(0), x.stride(1), sp, tokens, shrink_tiles_per_seg, K, splits, c, pp, M, R);                   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                                \
  } else if (!decode_rows) {                                                                                       \
    mixed_shrink_kernel<T, TW, RM, TMV><<<shrink_grid, kMixedThreads, 0, stream>>>(                                \
        xp, x.stride(0), x.stride(1), sp, tokens, shrink_tiles_per_seg, K, splits, c, pp, M, R);                   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                                \
  }                                                                                                                \
  mixed_expand_kernel<T, TW, RM><<<expand_grid, kMixedThreads, 0, stream>>>(                                       \
      yp, y.stride(0), y.stride(1), sp, tokens, expand_tiles_per_seg, N, splits, c, pp, M, R);                     \
  C10_CUDA_KERNEL_LAUNCH_CHECK()
        if (R <= 16) { FP_MIXED(16, 4); } else if (R <= 32) { FP_MIXED(32, 2); } else { FP_MIXED(64, 1); }
#undef FP_MIXED
      };
      if (wt == at::kFloat) {
        launch(static_cast<float*>(nullptr));
      } else {
        launch(static_cast<T*>(nullptr));
      }
    });
  }
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft_ops, CUDA, m) {
  m.impl("lora_fwd", &fastpeft::lora_fwd_cuda);
  m.impl("lora_bwd", &fastpeft::lora_bwd_cuda);
  m.impl("lora_group_fwd", &fastpeft::lora_group_fwd_cuda);
  m.impl("lora_group_bwd", &fastpeft::lora_group_bwd_cuda);
  m.impl("ia3_fwd", &fastpeft::ia3_fwd_cuda);
  m.impl("ia3_bwd", &fastpeft::ia3_bwd_cuda);
  m.impl("dora_fwd", &fastpeft::dora_fwd_cuda);
  m.impl("dora_bwd", &fastpeft::dora_bwd_cuda);
  m.impl("dora_infer", &fastpeft::dora_infer_cuda);
}

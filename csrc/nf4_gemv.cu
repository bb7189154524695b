// NF4 / FP4 GEMV with the LoRA shrink / expand, for decode (M <= 16 tokens), bitsandbytes' 4-bit format.
//
//   S[m, j] = sum_k x[m, k] * A[j, k]                                           (lora_shrink_kernel: fp32 [M, r])
//   y[m, n] = sum_b absmax[n, b] * sum_{k in b} x[m, k] * c16(code[q[n, k]])
//             + bias[n] + scaling * sum_j S[m, j] * B[n, j]                      (nf4_gemv_kernel)
//
// c16 = the 16-entry code rounded once to x's dtype; b = the weight's quantization block (blocksize weights).
// The absmax is applied in fp32 to each block's partial sum, not to every weight: the per-weight work is one
// table lookup, where dequantize-then-multiply needs a lookup, a multiply and a rounding per weight (the v2
// kernel: 33 us on gate/up at M = 1, issue-bound on those, ~3x the byte floor). Numerics: every weight carries
// one 16-bit rounding of its code (relative 2^-9 in bf16, 2^-12 in fp16), as the dequantized weight carries one
// rounding of code * absmax; products and sums are fp32; y is rounded once. So the result differs from
// x @ dequantize(W)^T by fp32 summation order and by which 16-bit rounding each weight had, not by more
// (GPU tests: tests/ops/test_nf4_lora.py, against this formula exactly and against the dequantized weight).
//
// Bound: bytes. The weight stream is N*K/2 packed bytes + absmax (x, S, A, B are small). Counted per packed
// byte: one shared-memory load (the byte -> pair-of-codes table), two integer ops to address it, a quarter of a
// tensor-core MMA (m16n8k16, 4 bytes per lane), and per 64 weights four fp32 FMAs for the block's absmax.
//
// Layout. The MMA's A operand is the weight tile (16 output rows x 16 k), its B operand x (16 k x 8 tokens;
// tokens 8..15 in a second MMA that reuses the same A registers), so the dequantization cost does not grow
// with M. Lane (g = lane/4, t = lane%4) owns rows g and g+8 of a warp's 16-row tile; a chunk is CH (64 or 32)
// weights of every row, lane t holding weights [t*CH/4, (t+1)*CH/4) of it: CH/8 packed bytes per row, one 8-
// (or 4-) byte load. All 16 k values of one MMA lie in one chunk, and a chunk lies in one quantization block
// (blocksize is a power of two >= CH and K % CH == 0), so each chunk's 4 (2) MMAs accumulate from zero and the
// block's absmax scales their sum. MMA k step u takes packed bytes 2u (k slots 2t, 2t+1) and 2u+1 (slots 2t+8,
// 2t+9) of the lane's bytes; byte i holds weight 2i in its high nibble (bnb's packing), so the table maps a byte
// v to the 32-bit pair (c16(code[v >> 4]) low half, c16(code[v & 15]) high half), which is the A register, and
// the matching B register is the lane's 32-bit word of x[token g] at the same two k.
// The table is 256 entries x 32 copies (32 KB of shared memory): lane l reads copy l, which lives in bank l, so
// 32 lanes reading 32 arbitrary bytes never conflict.
//
// Work split: a block is W warps on one 16-row tile; chunk c of the row goes to cluster rank c % C, and within
// it to warp (c / C) % W. C (1..8, thread-block clusters on sm_90+) splits K across blocks when there are too
// few tiles to fill the GPU (k/v: N = 1024 is 64 tiles); the cluster's partial sums meet in rank 0's epilogue
// through distributed shared memory, in rank order (deterministic, no atomics, no zero-fill). Each warp keeps
// DEPTH chunks' loads (weights, absmax, x) in flight in a register ring; the first DEPTH are issued before the
// block builds its table, so that latency overlaps.
// LoRA: the shrink S = x·Aᵀ runs first as a split-K kernel writing fp32 partials [splits, M, r] (no atomics,
// no memset); rank 0 of each tile sums them into shared memory for its epilogue y += s·S·Bᵀ.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kMaxM = 16;
constexpr int kRows = 16;         // output rows per tile: the MMA's m16
constexpr int kTable = 256 * 32;  // byte -> code pair, one copy per bank

// Per compute dtype: to / from fp32, pack two fp32 into one 32-bit register (round to nearest even; low half =
// first element), and the tensor-core MMA. Only bf16 and fp16 are instantiated (fp32 x takes the Triton path).
template <typename T> struct Dt;
template <> struct Dt<at::BFloat16> {
  static __device__ __forceinline__ float to_f(const at::BFloat16 v) { return static_cast<float>(v); }
  static __device__ __forceinline__ at::BFloat16 from_f(float v) { return at::BFloat16(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct Dt<at::Half> {
  static __device__ __forceinline__ float to_f(const at::Half v) { return static_cast<float>(v); }
  static __device__ __forceinline__ at::Half from_f(float v) { return at::Half(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kShrinkThreads = 128;
constexpr int kShrinkChunk = kShrinkThreads * 8;  // K values per shrink block (8 per thread: one 16-byte x load)

// The table entry of byte b of w for this lane: shared address lane_base + byte * 128 (entry byte * 32 + lane,
// 4 bytes each). PRMT extracts the byte, IMAD scales and adds: two integer ops and the load.
template <int b>
__device__ __forceinline__ uint32_t table_lookup(uint32_t w, uint32_t lane_base) {
  const uint32_t addr = __byte_perm(w, 0u, 0x4440u | b) * 128u + lane_base;
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n)); }

// One warp's ring slot: a chunk's packed bytes of the tile's 16 rows, and per row the 32-bit word holding its
// absmax (the uint8 code's aligned word when nested, else the fp32) and, nested, its second-level absmax.
template <int CH>
struct Slot {
  uint8_t w[kRows][CH / 2];
  uint32_t amax[kRows];
  float amax2[kRows];
};

template <typename T, int W, int DEPTH, int CH, int NT, bool NESTED>
__global__ void __launch_bounds__(W * 32)
nf4_gemv_kernel(const T* __restrict__ x, int64_t sxm, const uint8_t* __restrict__ packed,
                const void* __restrict__ absmax, const float* __restrict__ code, const float* __restrict__ code2,
                const float* __restrict__ absmax2, float offset, int log2_bs, int log2_bs2,
                const T* __restrict__ bias, const float* __restrict__ P, int splits, const float* __restrict__ B,
                float scaling, int R, T* __restrict__ y, int M, int N, int K, int ranks) {
  constexpr int kBytes = CH / 8;   // packed bytes per lane and row in a chunk (compute layout)
  constexpr int kRowB = CH / 2;    // packed bytes per row in a chunk
  constexpr int kPer = kRowB / 16; // 16-byte copies per row (2 or 1)
  constexpr int kX = CH / 8;       // 32-bit words of x per lane and token tile
  using S_ = Slot<CH>;
  __shared__ __align__(16) uint32_t table[kTable];
  __shared__ float lut2[NESTED ? 256 : 1];
  __shared__ float part[W][NT * 8][kRows];
  __shared__ float red[kMaxM][kRows];
  __shared__ float s_lora[kMaxM * 32];  // S [M, R] (R <= 32 here; larger ranks read P directly)
  extern __shared__ __align__(16) uint8_t ring_raw[];  // [W][DEPTH] slots

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rank = static_cast<int>(blockIdx.x);  // the cluster spans grid x (ranks blocks), tiles along y
  const int n0 = static_cast<int>(blockIdx.y) * kRows;
  const int nc = K / CH;
  // this block's chunks: a contiguous range [c_begin, c_end) (its cluster rank); warp w takes c_begin + w + W*i
  const int c_begin = static_cast<int>(static_cast<int64_t>(rank) * nc / ranks);
  const int c_end = static_cast<int>(static_cast<int64_t>(rank + 1) * nc / ranks);
  const int first = c_begin + warp;
  const int count = first < c_end ? (c_end - first + W - 1) / W : 0;
  S_* ring = reinterpret_cast<S_*>(ring_raw) + warp * DEPTH;

  // Copy roles: lane l copies 16 bytes of row l / kPer (part l % kPer) of each chunk; lanes 0..15 also copy
  // row l's absmax word, lanes 16..31 row l - 16's second-level absmax (nested). Rows past N (last tile)
  // read row N - 1: their outputs are separate MMA rows, never written. Flattened weight indices fit 32 bits
  // (the host checks N * K < 2^32).
  const int crow = lane / kPer, cpart = lane % kPer;
  const bool copies_w = lane < kRows * kPer;
  const uint32_t crowk = static_cast<uint32_t>(min(n0 + (copies_w ? crow : 0), N - 1)) * static_cast<uint32_t>(K);
  const uint32_t arowk = static_cast<uint32_t>(min(n0 + (lane & 15), N - 1)) * static_cast<uint32_t>(K);
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  auto issue = [&](int i) {  // chunk i of this warp into slot i % DEPTH (nothing past the last chunk)
    if (i < count) {
      const int c = first + W * i;
      const uint32_t slot = ring_s + static_cast<uint32_t>((i % DEPTH) * sizeof(S_));
      if (copies_w)
        cp_async16(slot + crow * kRowB + cpart * 16, packed + ((crowk + c * CH) >> 1) + cpart * 16);
      const uint32_t blk = (arowk + c * CH) >> log2_bs;
      if (lane < 16) {
        if constexpr (NESTED) {
          cp_async4(slot + offsetof(S_, amax) + lane * 4, reinterpret_cast<const uint8_t*>(absmax) + (blk & ~3u));
        } else {
          cp_async4(slot + offsetof(S_, amax) + lane * 4, reinterpret_cast<const float*>(absmax) + blk);
        }
      } else if (NESTED) {
        cp_async4(slot + offsetof(S_, amax2) + (lane - 16) * 4, absmax2 + (blk >> log2_bs2));
      }
    }
    cp_async_commit();  // an empty group past the last chunk keeps the wait count uniform
  };

  // Put the first DEPTH - 1 chunks in flight, then build the tables while they are.
#pragma unroll
  for (int d = 0; d < DEPTH - 1; ++d) issue(d);
  for (int e = threadIdx.x; e < 256 * 8; e += W * 32) {  // 8 x 16-byte stores per byte value (32 copies)
    const int v = e >> 3;
    const uint32_t pr = Dt<T>::pack(__ldg(code + (v >> 4)), __ldg(code + (v & 15)));
    reinterpret_cast<uint4*>(table)[e] = make_uint4(pr, pr, pr, pr);
  }
  if constexpr (NESTED)
    for (int i = threadIdx.x; i < 256; i += W * 32) lut2[i] = code2[i];
  __syncthreads();

  const uint32_t lane_base = static_cast<uint32_t>(__cvta_generic_to_shared(table)) + (static_cast<uint32_t>(lane) << 2);
  const uint32_t rowk0 = static_cast<uint32_t>(min(n0 + g, N - 1)) * static_cast<uint32_t>(K);
  const uint32_t rowk1 = static_cast<uint32_t>(min(n0 + 8 + g, N - 1)) * static_cast<uint32_t>(K);
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[nt][q] = 0.f;

  for (int i = 0; i < count; ++i) {
    issue(i + DEPTH - 1);
    const int c = first + W * i;
    // x [token g (+8)] at this lane's k: L1 / L2 hits (x is tiny and every warp of the SM reads it)
    uint32_t xl[NT][kX];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = g + 8 * nt;
      if (m < M) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + m * sxm + c * CH + t * (CH / 4));
#pragma unroll
        for (int q = 0; q < kX / 4; ++q) {
          const uint4 v = __ldg(xp + q);
          xl[nt][4 * q] = v.x; xl[nt][4 * q + 1] = v.y; xl[nt][4 * q + 2] = v.z; xl[nt][4 * q + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int q = 0; q < kX; ++q) xl[nt][q] = 0u;
      }
    }
    cp_async_wait<DEPTH - 1>();  // this lane's copies of chunk i have landed ...
    __syncwarp();                // ... and every lane's
    const S_& cur = ring[i % DEPTH];
    uint32_t w0[kBytes / 4], w1[kBytes / 4];
    if constexpr (kBytes == 8) {
      const uint2 v0 = *reinterpret_cast<const uint2*>(&cur.w[g][t * kBytes]);
      const uint2 v1 = *reinterpret_cast<const uint2*>(&cur.w[g + 8][t * kBytes]);
      w0[0] = v0.x; w0[1] = v0.y; w1[0] = v1.x; w1[1] = v1.y;
    } else {
      w0[0] = *reinterpret_cast<const uint32_t*>(&cur.w[g][t * kBytes]);
      w1[0] = *reinterpret_cast<const uint32_t*>(&cur.w[g + 8][t * kBytes]);
    }
    float a0, a1;
    if constexpr (NESTED) {
      const uint32_t b0 = (rowk0 + c * CH) >> log2_bs, b1 = (rowk1 + c * CH) >> log2_bs;
      const uint32_t q0 = (cur.amax[g] >> (8 * (b0 & 3))) & 0xffu, q1 = (cur.amax[g + 8] >> (8 * (b1 & 3))) & 0xffu;
      a0 = __fadd_rn(__fmul_rn(lut2[q0], cur.amax2[g]), offset);  // as bnb: 2 roundings
      a1 = __fadd_rn(__fmul_rn(lut2[q1], cur.amax2[g + 8]), offset);
    } else {
      a0 = __uint_as_float(cur.amax[g]);
      a1 = __uint_as_float(cur.amax[g + 8]);
    }
    float cc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) cc[nt][q] = 0.f;
#pragma unroll
    for (int u = 0; u < kBytes / 2; ++u) {
      // A registers: (row g, byte 2u), (row g+8, byte 2u), (row g, byte 2u+1), (row g+8, byte 2u+1)
      uint32_t A[4];
      const uint32_t x0 = w0[u >> 1], x1 = w1[u >> 1];
      if ((u & 1) == 0) {
        A[0] = table_lookup<0>(x0, lane_base);
        A[1] = table_lookup<0>(x1, lane_base);
        A[2] = table_lookup<1>(x0, lane_base);
        A[3] = table_lookup<1>(x1, lane_base);
      } else {
        A[0] = table_lookup<2>(x0, lane_base);
        A[1] = table_lookup<2>(x1, lane_base);
        A[2] = table_lookup<3>(x0, lane_base);
        A[3] = table_lookup<3>(x1, lane_base);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Dt<T>::mma(cc[nt], A[0], A[1], A[2], A[3], xl[nt][2 * u], xl[nt][2 * u + 1]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[nt][0] = fmaf(a0, cc[nt][0], acc[nt][0]);
      acc[nt][1] = fmaf(a0, cc[nt][1], acc[nt][1]);
      acc[nt][2] = fmaf(a1, cc[nt][2], acc[nt][2]);
      acc[nt][3] = fmaf(a1, cc[nt][3], acc[nt][3]);
    }
    __syncwarp();  // every lane has read slot i % DEPTH before the next iteration's copies refill it
  }
  cp_async_wait<0>();  // no copy outlives the block (the tail's groups are empty)

  // C fragment: acc[nt][0..1] = (row g, tokens 8nt + 2t + 0..1), acc[nt][2..3] = (row g + 8, same tokens)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = 8 * nt + 2 * t;
    part[warp][m][g] = acc[nt][0];
    part[warp][m + 1][g] = acc[nt][1];
    part[warp][m][g + 8] = acc[nt][2];
    part[warp][m + 1][g + 8] = acc[nt][3];
  }
  const bool lora_smem = P != nullptr && R <= 32;
  if (lora_smem && rank == 0) {  // S[m, j] = sum of the shrink's split-K partials
    for (int i = threadIdx.x; i < M * R; i += W * 32) {
      float s = 0.f;
      for (int sp = 0; sp < splits; ++sp) s += P[static_cast<int64_t>(sp) * M * R + i];
      s_lora[i] = s;
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < M * kRows; o += W * 32) {
    const int m = o / kRows, r = o % kRows;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) s += part[w][m][r];
    red[m][r] = s;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (ranks > 1) cluster.sync(); else __syncthreads();
#else
  __syncthreads();  // ranks == 1 below sm_90 (the host never asks for a cluster there)
#endif
  if (rank == 0) {
    for (int o = threadIdx.x; o < M * kRows; o += W * 32) {
      const int m = o / kRows, r = o % kRows;
      const int64_t n = n0 + r;
      if (n >= N) continue;
      float out = red[m][r];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      for (int q = 1; q < ranks; ++q) out += cluster.map_shared_rank(&red[0][0], q)[o];
#endif
      if (P != nullptr) {
        float lora = 0.f;
        for (int j = 0; j < R; ++j) {
          float sj;
          if (lora_smem) {
            sj = s_lora[m * R + j];
          } else {
            sj = 0.f;
            for (int sp = 0; sp < splits; ++sp) sj += P[(static_cast<int64_t>(sp) * M + m) * R + j];
          }
          lora = fmaf(sj, B[n * R + j], lora);
        }
        out = fmaf(scaling, lora, out);
      }
      if (bias != nullptr) out += Dt<T>::to_f(bias[n]);
      y[m * static_cast<int64_t>(N) + n] = Dt<T>::from_f(out);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (ranks > 1) cluster.sync();  // no block exits while rank 0 still reads its red
#endif
}

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
lora_shrink_kernel(const T* __restrict__ x, int64_t sxm, const float* __restrict__ A, float* __restrict__ P,
                   int M, int K, int R) {
  // block (j, sp): P[sp, m, j] = sum over this block's K chunk of x[m, k] * A[j, k]. One round of 16-byte
  // loads per thread (8 values of A and of each x row), so the shrink costs one memory latency, not K / 256
  // dependent rounds. Bytes: A (r*K fp32) + x from L2.
  const int j = blockIdx.x, sp = blockIdx.y;
  const int k = sp * kShrinkChunk + threadIdx.x * 8;
  __shared__ float part[kMaxM][kShrinkThreads / 32];
  float a[8];
  const bool ok = k < K;  // K % 8 == 0
  if (ok) {
    const float4* ap = reinterpret_cast<const float4*>(A + static_cast<int64_t>(j) * K + k);
    const float4 a0 = __ldg(ap), a1 = __ldg(ap + 1);
    a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w; a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {  // M is uniform across the block: no divergence
      float acc = 0.f;
      if (ok) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + m * sxm + k));
        const T* xv = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(Dt<T>::to_f(xv[i]), a[i], acc);
      }
      acc = warp_sum(acc);
      if (lane == 0) part[m][warp] = acc;
    }
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kShrinkThreads / 32; ++w) s += part[threadIdx.x][w];
    P[(static_cast<int64_t>(sp) * M + threadIdx.x) * R + j] = s;
  }
}

int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, "nf4_gemv: ", what, " must be a power of two, got ", v);
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

struct GemvArgs {
  const void* x;
  int64_t sxm;
  const uint8_t* packed;
  const void* absmax;
  const float* code;
  const float* code2;
  const float* absmax2;
  float offset;
  bool nested;
  int l2bs, l2bs2;
  const void* bias;
  const float* P;
  int splits;
  const float* B;
  float scaling;
  int R;
  void* y;
  int M, N, K;
};

// One launch of nf4_gemv_kernel: grid (ranks, tiles), a cluster of `ranks` blocks along x when ranks > 1. The
// dynamic shared memory is the warps' copy rings (W x DEPTH slots).
template <typename T, int W, int DEPTH, int CH, int NT>
void launch_gemv(const GemvArgs& a, int ranks, cudaStream_t stream) {
  const auto kernel = a.nested ? nf4_gemv_kernel<T, W, DEPTH, CH, NT, true>
                               : nf4_gemv_kernel<T, W, DEPTH, CH, NT, false>;
  constexpr int smem = W * DEPTH * static_cast<int>(sizeof(Slot<CH>));
  // above 48 KB (static + dynamic) a kernel must opt in, per device: done once per instantiation and device
  static bool opted[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (!opted[dev & 63]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(nf4_gemv_kernel<T, W, DEPTH, CH, NT, true>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaFuncSetAttribute(nf4_gemv_kernel<T, W, DEPTH, CH, NT, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    opted[dev & 63] = true;
  }
  const unsigned tiles = static_cast<unsigned>((a.N + kRows - 1) / kRows);
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  if (ranks == 1) {
    kernel<<<dim3(1, tiles), W * 32, smem, stream>>>(x, a.sxm, a.packed, a.absmax, a.code, a.code2, a.absmax2,
                                                    a.offset, a.l2bs, a.l2bs2, bias, a.P, a.splits, a.B, a.scaling,
                                                    a.R, y, a.M, a.N, a.K, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ranks), tiles);
  cfg.blockDim = dim3(W * 32);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(ranks);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, x, a.sxm, a.packed, a.absmax, a.code, a.code2, a.absmax2, a.offset,
                                    a.l2bs, a.l2bs2, bias, a.P, a.splits, a.B, a.scaling, a.R, y, a.M, a.N, a.K,
                                    ranks));
}

// Blocks per tile (cluster ranks): split K across up to 8 blocks while the tiles alone give fewer than
// `per_sm` blocks per SM and every warp still gets >= 2 chunks. Thread-block clusters need sm_90.
int cluster_ranks(int tiles, int nc, int warps, int per_sm, int max_ranks) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 9) return 1;
  int ranks = 1;
  while (ranks < max_ranks && static_cast<int64_t>(tiles) * ranks < static_cast<int64_t>(per_sm) * prop->multiProcessorCount &&
         nc >= ranks * 2 * warps * 2)
    ranks *= 2;
  return ranks;
}

// variant: 0 = the shipped configuration; 1..3 other (warps, depth, x in the ring) choices and 10 + v the same
// without clusters -- for benchmarks/scripts/bench_nf4.py only (measurements, not a user setting).
template <typename T>
void launch(const torch::Tensor& x, const GemvArgs& base, const std::optional<torch::Tensor>& A, torch::Tensor& S,
            int bs, int variant, cudaStream_t stream) {
  GemvArgs a = base;
  const int M = a.M, K = a.K;
  if (a.R > 0) {
    lora_shrink_kernel<T><<<dim3(a.R, a.splits), kShrinkThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), A->data_ptr<float>(), S.data_ptr<float>(), M, K, a.R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int tiles = (a.N + kRows - 1) / kRows;
  const bool ch64 = bs >= 64 && K % 64 == 0;
  const int nc = K / (ch64 ? 64 : 32);
  const int max_ranks = variant >= 10 ? 1 : 8;
  const int v = variant % 10;
  if (M > 8) {  // two 8-token tiles on the same weight registers
    const int ranks = cluster_ranks(tiles, nc, 4, 4, max_ranks);
    if (ch64) launch_gemv<T, 4, 4, 64, 2>(a, ranks, stream);
    else launch_gemv<T, 4, 4, 32, 2>(a, ranks, stream);
    return;
  }
  if (!ch64) {
    launch_gemv<T, 4, 6, 32, 1>(a, cluster_ranks(tiles, nc, 4, 4, max_ranks), stream);
    return;
  }
  switch (v) {
    case 1: launch_gemv<T, 8, 4, 64, 1>(a, cluster_ranks(tiles, nc, 8, 2, max_ranks), stream); break;
    case 2: launch_gemv<T, 4, 4, 64, 1>(a, cluster_ranks(tiles, nc, 4, 4, max_ranks), stream); break;
    case 3: launch_gemv<T, 8, 6, 64, 1>(a, cluster_ranks(tiles, nc, 8, 2, max_ranks), stream); break;
    default: launch_gemv<T, 4, 6, 64, 1>(a, cluster_ranks(tiles, nc, 4, 4, max_ranks), stream); break;
  }
}

}  // namespace

// y = x·dequant(W)ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ;  A, B fp32 contiguous (or undefined for no LoRA).
torch::Tensor nf4_gemv_lora(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, torch::Tensor code,
                            torch::Tensor code2, torch::Tensor absmax2, double offset, bool nested, int64_t bs,
                            int64_t bs2, int64_t N, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> A,
                            std::optional<torch::Tensor> B, double scaling, int64_t variant) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "nf4_gemv: x must be a CUDA [M, K] tensor, rows contiguous");
  const int M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "nf4_gemv: M must be in 1..16, got ", M);
  TORCH_CHECK(K % 32 == 0, "nf4_gemv: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(N >= 1 && N <= int64_t{65535} * kRows, "nf4_gemv: out_features must be in 1..1048560, got ", N);
  TORCH_CHECK(N * K < (int64_t{1} << 32), "nf4_gemv: out_features * in_features must be < 2^32 (32-bit weight indices)");
  TORCH_CHECK(x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "nf4_gemv: x rows must start on 16-byte boundaries (row stride % 8 == 0, aligned data)");
  TORCH_CHECK(bs >= 32, "nf4_gemv: blocksize must be >= 32, got ", bs);
  const int l2bs = log2_exact(bs, "blocksize");
  TORCH_CHECK(!nested || (code2.numel() == 256 && absmax.scalar_type() == at::ScalarType::Byte),
              "nf4_gemv: nested absmax needs uint8 codes and a 256-entry code2");
  TORCH_CHECK(code.numel() >= 16 && code.scalar_type() == at::ScalarType::Float && code.is_cuda(),
              "nf4_gemv: code must be a CUDA fp32 tensor of 16 values");
  TORCH_CHECK(packed.scalar_type() == at::ScalarType::Byte && packed.is_contiguous(), "nf4_gemv: packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() >= N * K / 2, "nf4_gemv: packed too short");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0, "nf4_gemv: packed must be 16-byte aligned");
  TORCH_CHECK(absmax.scalar_type() == (nested ? at::ScalarType::Byte : at::ScalarType::Float),
              "nf4_gemv: absmax must be uint8 codes (nested) or fp32");
  TORCH_CHECK(absmax.numel() >= (N * K + bs - 1) / bs, "nf4_gemv: absmax too short for N * K / blocksize blocks");
  const int l2bs2 = nested ? log2_exact(bs2, "nested blocksize") : 0;
  if (nested) {
    TORCH_CHECK(absmax2.numel() >= (absmax.numel() + bs2 - 1) / bs2, "nf4_gemv: nested absmax2 too short");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor S;
  int R = 0;
  const int splits = (K + kShrinkChunk - 1) / kShrinkChunk;
  if (A.has_value() && A->defined()) {
    R = A->size(0);
    TORCH_CHECK(A->scalar_type() == at::ScalarType::Float && A->is_contiguous() && A->size(1) == K, "nf4_gemv: A must be fp32 [r, K]");
    TORCH_CHECK(B.has_value() && B->scalar_type() == at::ScalarType::Float && B->is_contiguous() && B->size(0) == N && B->size(1) == R,
                "nf4_gemv: B must be fp32 [N, r]");
    S = torch::empty({splits, M, R}, x.options().dtype(torch::kFloat32));  // partials
  }
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::ScalarType::Half || st == at::ScalarType::BFloat16,
              "nf4_gemv: x must be float16 or bfloat16 (fp32 takes the Triton path), got ", st);
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == st && bias->numel() == N && bias->is_contiguous(),
                "nf4_gemv: bias must be a contiguous CUDA [N] tensor in x's dtype");
    bptr = bias->data_ptr();
  }
  GemvArgs a{x.data_ptr(), x.stride(0), packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(),
             nested ? code2.data_ptr<float>() : nullptr, nested ? absmax2.data_ptr<float>() : nullptr,
             static_cast<float>(offset), nested, l2bs, l2bs2, bptr, R > 0 ? S.data_ptr<float>() : nullptr, splits,
             R > 0 ? B->data_ptr<float>() : nullptr, static_cast<float>(scaling), R, y.data_ptr(), M,
             static_cast<int>(N), K};
  const int v = static_cast<int>(variant);
  if (st == at::ScalarType::Half) {
    launch<at::Half>(x, a, A, S, static_cast<int>(bs), v, stream);
  } else {
    launch<at::BFloat16>(x, a, A, S, static_cast<int>(bs), v, stream);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_gemv_lora", &nf4_gemv_lora, "NF4/FP4 GEMV + LoRA shrink/expand (decode, M <= 16; tensor-core MMA)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("code2"), py::arg("absmax2"),
        py::arg("offset"), py::arg("nested"), py::arg("bs"), py::arg("bs2"), py::arg("N"), py::arg("bias"),
        py::arg("A"), py::arg("B"), py::arg("scaling"), py::arg("variant") = 0);
}

// NF4 / FP4 GEMV with the LoRA shrink / expand, for decode (M <= 16 tokens), bitsandbytes' 4-bit format.
//
//   S[m, j] = sum_k x[m, k] * A[j, k]                                  (lora_shrink_kernel: fp32 [M, r])
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] + scaling * sum_j S[m, j] * B[n, j]     (nf4_mma_gemv_kernel)
//   w[n, k] = round_to_x_dtype(code[q] * absmax[(n*K + k) / blocksize])  (the value the dequantized weight holds)
//
// Bound: bytes. The weight stream is N*K/2 packed bytes + absmax (x, S, A, B are small), so the kernel is built
// to keep HBM busy: M <= 16 rows of x fit one m16n8k16 tensor-core tile, so the FLOPs cost nothing and the
// per-weight work is the dequantization alone (a 16-entry LUT read from shared memory -- 16 distinct banks,
// never a conflict --, one multiply by the block's absmax, one paired rounding to bf16/fp16).
//
// Work split: a block owns 16 output rows (two n8 tiles) and its 8 warps split K in 128-weight segments
// (warp w takes segments w, w+8, ...; partial sums meet in shared memory at the end). In a segment, lane
// (g = lane/4, t = lane%4) loads 16 packed bytes = weights k0+32t .. k0+32t+31 of rows g and 8+g (one uint4
// each: the 4 lanes of a row read 64 contiguous bytes). The k order inside an mma is free as long as A and B
// agree: mma k-slots (2t, 2t+1 | 2t+8, 2t+9) of k-step u (0..7) hold weights 32t+4u+(0,1 | 2,3), i.e. packed
// byte 2u | 2u+1 of the lane's 16 bytes (element 2i = the high nibble of byte i, as bnb packs), and the A
// fragment takes x[m, k0+32t+4u .. +3] (two 32-bit words of the lane's 32 contiguous x values, read from
// L1/L2 when the segment is computed: x is tiny and shared by every block).
// K split (sm_90+): a tile's K may be shared by a cluster of gridDim.y blocks (k_split_of below), block y taking
// the y-th of gridDim.y contiguous ranges of segments (its warps split the range as above); each block sums its
// warps' partials, and block 0 of the cluster adds the others' sums from their shared memory (in block order:
// deterministic) before the epilogue. It was built for the grid's tail (gate/up at M = 1: 896 blocks on 396 slots
// of an H200, a part-filled third wave; q/o and down: 256 blocks), but measured slower there; it helps only grids
// that leave most SMs idle (k_split_auto).
// Latency: HBM needs ~3 TB/s x ~1.5 us ~ 4.5 MB in flight, ~34 KB per SM. Each warp keeps the next TWO
// segments' weight bytes in flight (3-stage register pipeline, 2 x 1 KB per warp, 16+ warps per SM), and the
// nested-absmax lookup (code2[q], a dependent read) comes from shared memory, not L2.
// LoRA: the shrink S = x·Aᵀ runs first as a split-K kernel writing fp32 partials [splits, M, r] (no atomics,
// no memset); each block of the main kernel sums them into shared memory for its epilogue y += s·S·Bᵀ. On sm_90+
// the main kernel is launched as a programmatic dependent of the shrink, which lets it start at once: the weight
// stream runs beside the shrink and only the epilogue waits for the partials (H200, M = 1, CUDA-graph replay:
// LoRA's extra over the GEMV alone 3.1-5.2 -> 1.4-4.3 µs per projection).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "device_ptx.cuh"

namespace {

using fastpeft::device::allow_dependents;
using fastpeft::device::wait_for_prerequisite_grids;

constexpr int kMaxM = 16;
constexpr int kRows = 16;   // output rows per block: two m16n8k16 n-tiles
constexpr int kSeg = 128;   // weights per row per warp step (4 lanes x 32)

// Per compute dtype: to fp32, pack two fp32 into one 32-bit register (round to nearest even; low half =
// first element), and the tensor-core MMA. Only bf16 and fp16 are instantiated (fp32 x takes the Triton path).
template <typename T> struct Dt;
template <> struct Dt<at::BFloat16> {
  using raw = __nv_bfloat16;
  static __device__ __forceinline__ float to_f(const at::BFloat16 v) { return static_cast<float>(v); }
  static __device__ __forceinline__ at::BFloat16 from_f(float v) { return at::BFloat16(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    fastpeft::device::mma_16816<raw>(c, a0, a1, a2, a3, b0, b1);
  }
};
template <> struct Dt<at::Half> {
  using raw = __half;
  static __device__ __forceinline__ float to_f(const at::Half v) { return static_cast<float>(v); }
  static __device__ __forceinline__ at::Half from_f(float v) { return at::Half(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    fastpeft::device::mma_16816<raw>(c, a0, a1, a2, a3, b0, b1);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kShrinkThreads = 128;
constexpr int kShrinkChunk = kShrinkThreads * 8;  // K values per shrink block (8 per thread: one 16-byte x load)

// One segment's weight-side loads for one lane: 16 packed bytes of each of its two rows, their raw absmax
// entries (uint8 code when nested, else fp32 bits) and, when nested, the second-level absmax.
struct Stage {
  uint4 w[2];
  uint32_t amax[2];
  float amax2[2];
};

// LEAN's table read: the fp32 code whose byte offset (4 x nibble) is byte `i` of `offsets4`, from the table at
// shared address `base` (low byte 0): PRMT puts that byte under base's upper three bytes, and the load takes the
// result as its address. volatile keeps the read after the __syncthreads that publishes the table.
__device__ __forceinline__ float code_at(uint32_t offsets4, uint32_t base, int i) {
  const uint32_t addr = __byte_perm(offsets4, base, 0x7650u | static_cast<uint32_t>(i));
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// LEAN's two weights of packed byte `b` of a word (hi4 / lo4: 4 x its high / low nibbles, per byte), each its code
// times the block scale `a` in fp32, packed to x's dtype (high nibble first: bnb's element order)
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t hi4, uint32_t lo4, uint32_t base, int b, float a) {
  return Dt<T>::pack(__fmul_rn(code_at(hi4, base, b), a), __fmul_rn(code_at(lo4, base, b), a));
}

// LEAN (set_kernel_variant(1); the original form's bits, checked on an H200): the same numbers with a fifth fewer
// instructions per weight (main loop, SASS of nvcc 13.0 for sm_90: 7.6 -> 6.1; SWAP below: 4.9). ncu on the
// original form (gate/up, M = 1, H200; session 30) found the kernel bound by instruction issue, not by loads in
// flight: 9.8 thread instructions per weight, 61 % of issue slots busy, 10 % of stalls on global loads. Each
// code-table read cost a shift, a mask and an add of the table's base (SHF, LOP3, IADD) before its LDS. LEAN places
// the table on a 256-byte boundary, forms 4 x nibble for a whole 32-bit word of packed bytes in one shift-and-mask
// per nibble half (0x3c3c3c3c), and builds each read's shared address with one PRMT that puts the nibble's byte
// under the table base's upper bytes: 1.5 instructions per nibble instead of 3, then the LDS, the FMUL by absmax
// and half a pack as before. Same reads, same products, same rounding, same mma k-slots: bit for bit the original
// kernel.
//
// SWAP (FORM 2 and 3; the default since session 32, set_kernel_variant(2)): LEAN with the mma operands exchanged,
// the weights as its 16-row side (a lane's rows g and g+8 are the rows it loads) and x as its 8-token side. The x
// fragment is then two consecutive words of the lane's own 16-byte x loads, so the ~4 register moves per mma that
// assemble x rows g and g+8 into one fragment go, and at M <= 8 (FORM 2) one mma per 16 k covers the tile's 16
// rows where two did; M 9..16 (FORM 3) adds a second mma on tokens 8..15 with the same weight fragment. Every
// weight and product is the same; only the tensor core's arrangement of each 16-product sum may differ (the GPU
// test holds it to the original form's bounds against fp32 math).
//
// PAIR (FORM 4 and 5; set_kernel_variant(3)): SWAP with one shared-memory read per packed byte instead of one per
// nibble. SWAP's main loop still spent 3.5 of its 4.8 SASS instructions per weight on the code table: per nibble a
// shift-and-mask share, a PRMT for the address, an LDS, and an FMUL by absmax, plus half an F2FP pack. PAIR's table
// has a row per byte value v holding the fp32 pair (code[v >> 4], code[v & 15]) -- bnb's element order, the high
// nibble first --, 256-byte rows, and each row repeats that pair 32 times, lane l's copy at byte 8l. One PRMT then
// makes a byte's whole address (the byte as bits 8..15, the lane's 8l as bits 0..7; the table's base folds into
// the LDS's immediate) straight from the packed word, one LDS.64 reads the pair, and the lanes of a warp always
// hit distinct banks (8l: lanes 0..15 and 16..31 cover the 32 banks in the two wavefronts any 64-bit warp load
// takes). Static count: ~3.3 instructions per weight against 4.8. Same codes, the same FMUL by the same absmax and
// the same rounding: SWAP's bits. Cost: a 64 KB table per block in dynamic shared memory (a 256-row fill of 16
// STS.128 a thread; the warps' partial sums reuse it after the main loop), so 3 blocks an SM still fit (3 x ~67 KB
// of 228 KB). Measured (H200, session 33): 14 % fewer instructions executed, issue slots 61 -> 48 % busy, and no
// faster -- gate/up at M = 1 24.8 -> 26.7 µs (4 segments a warp per table fill), down 23.7 -> 21.9 (14): the kernel
// waits on memory latency at its occupancy more than on issue. Not the default.
// FORM: 0 the original form (sessions 21-31's default), 1 LEAN, 2 SWAP for M <= 8, 3 SWAP for M <= 16, 4 PAIR for
// M <= 8, 5 PAIR for M <= 16.
constexpr int kPairRowBytes = 256;                        // a row per byte value: 32 lanes x one 8-byte pair
constexpr int kPairTableBytes = 256 * kPairRowBytes;      // 64 KB
constexpr int kPairDynamicBytes = kPairTableBytes + 256 * 4;  // the table, then lut2: all of a PAIR block's smem
constexpr int kPairPartialBytes = 8 * kMaxM * kRows * 4;  // after the main loop: partial [8 warps][m][n], then
                                                          // block_sum and s_lora, in the table's space
constexpr uint32_t kPairImm = 1024;  // the shared address of a block's first byte where the driver reserves 1 KB

template <typename T, int WARPS, int DEPTH, int FORM>
__global__ void __launch_bounds__(WARPS * 32, (FORM == 2 || FORM == 4) ? 3 : 2)  // 3 blocks an SM (<= 80 registers)
nf4_mma_gemv_kernel(const T* __restrict__ x, int64_t sxm, const uint8_t* __restrict__ packed,
                    const void* __restrict__ absmax, const float* __restrict__ code, const float* __restrict__ code2,
                    const float* __restrict__ absmax2, float offset, bool nested, int log2_bs, int log2_bs2,
                    const T* __restrict__ bias, const float* __restrict__ P, int splits,
                    const float* __restrict__ B, float scaling, int R, T* __restrict__ y, int M, int N, int K) {
  // WARPS warps split K; each keeps DEPTH segments' weight bytes in flight (DEPTH + 1 register stages).
  constexpr bool LEAN = FORM >= 1, SWAP = FORM >= 2, PAIR = FORM >= 4;
  constexpr bool HI = FORM != 2 && FORM != 4;  // HI: x rows 8..15 are loaded
  static_assert(!PAIR || WARPS * 32 == 256, "PAIR's table fill takes a thread per row");
  // Shared memory. PAIR forms hold it all in dynamic shared memory, so their table is its first byte and its shared
  // address is known (see pair_imm): [0, 64 KB) the table, then lut2; after the main loop the warps' partial sums,
  // block_sum and s_lora reuse the table's space. The other forms use static arrays.
  extern __shared__ __align__(16) unsigned char pair_table[];  // PAIR: kPairDynamicBytes, launched as dynamic smem
  float* lut2;       // nested absmax: the 256 second-level codes
  float* s_lora;     // S [M, R] (R <= 32 here; larger ranks read P directly)
  float* block_sum;  // its warps' sum [m][n]; in a K split's block 0 then the tile's
  float* lut = nullptr;    // the 16 codes (forms 0..3)
  uint32_t lut_base = 0;  // LEAN: lut's shared address, low byte 0
  if constexpr (PAIR) {
    lut2 = reinterpret_cast<float*>(pair_table + kPairTableBytes);
    block_sum = reinterpret_cast<float*>(pair_table + kPairPartialBytes);
    s_lora = block_sum + kMaxM * kRows;
  } else {
    __shared__ __align__(256) float lut_own[64];  // 16 entries used; aligned so its address's low byte is 0 (LEAN)
    __shared__ float lut2_own[256], s_lora_own[kMaxM * 32], block_sum_own[kMaxM * kRows];
    lut = lut_own;
    lut2 = lut2_own;
    s_lora = s_lora_own;
    block_sum = block_sum_own;
    lut_base = static_cast<uint32_t>(__cvta_generic_to_shared(lut_own));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // PAIR: a byte's address. The table's shared address is pair_base; when pair_base - kPairImm has its low 16
  // bits zero (the block's shared memory starts right after the 1 KB the driver reserves, as on sm_80 / sm_90), one
  // PRMT makes the whole address but kPairImm from the packed word and pair_hi (the byte as bits 8..15, the lane's
  // copy as bits 0..7, the window's upper bytes: the cluster rank on sm_90), and kPairImm is the LDS's immediate:
  // two instructions a byte's address needs otherwise (PRMT, IADD of the base) become one. Else (another reserved
  // size) the IADD form: the same reads.
  const uint32_t pair_base = static_cast<uint32_t>(__cvta_generic_to_shared(pair_table));
  const uint32_t pair_lane = 8u * static_cast<uint32_t>(lane);  // this lane's copy in every table row
  const bool pair_imm = ((pair_base - kPairImm) & 0xffffu) == 0u;
  const uint32_t pair_hi = ((pair_base - kPairImm) & 0xffff0000u) | pair_lane;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t row[2] = {n0 + g, n0 + 8 + g};
  const bool row_ok[2] = {row[0] < N, row[1] < N};
  const bool m_lo = g < M, m_hi = g + 8 < M;
  const int64_t row_bytes = K >> 1;
  const uint8_t* absmax_u8 = reinterpret_cast<const uint8_t*>(absmax);
  const uint32_t* absmax_u32 = reinterpret_cast<const uint32_t*>(absmax);
  const int nseg = (K + kSeg - 1) / kSeg;
  // K split: this block's share of the segments, [seg_begin, seg_end) (all of them when gridDim.y == 1)
  const int seg_begin = static_cast<int>(static_cast<int64_t>(nseg) * blockIdx.y / gridDim.y);
  const int seg_end = static_cast<int>(static_cast<int64_t>(nseg) * (blockIdx.y + 1) / gridDim.y);
  // a stage's block scale for row j: the fp32 absmax, or with nested absmax code2[q] * absmax2 + offset (as bnb: two
  // roundings)
  auto scale_of = [&](const Stage& st, int j) {
    return nested ? __fadd_rn(__fmul_rn(lut2[st.amax[j]], st.amax2[j]), offset) : __uint_as_float(st.amax[j]);
  };

  auto load = [&](int s, Stage& st) {
    const int k = s * kSeg + 32 * t;  // K % 32 == 0: the lane's 32 weights are all in or all out
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (s < seg_end && k < K && row_ok[j]) {
        st.w[j] = __ldg(reinterpret_cast<const uint4*>(packed + row[j] * row_bytes + (k >> 1)));
        const int64_t blk = (row[j] * K + k) >> log2_bs;
        if (nested) {
          st.amax[j] = __ldg(absmax_u8 + blk);
          st.amax2[j] = __ldg(absmax2 + (blk >> log2_bs2));
        } else {
          st.amax[j] = __ldg(absmax_u32 + blk);
          st.amax2[j] = 0.f;
        }
      } else {  // zero bytes and a zero scale: this lane adds nothing
        st.w[j] = make_uint4(0u, 0u, 0u, 0u);
        st.amax[j] = 0u;
        st.amax2[j] = 0.f;
      }
    }
  };

  float c[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) c[j][i] = 0.f;

  auto compute = [&](int s, const Stage& cur) {
    // Every lane of the warp must reach the mma.sync below (.aligned: a lane that skips it hangs the warp), so
    // lanes past K (the last, partial segment) run it on zeros: their bytes and scale were loaded as 0 and
    // their x stays 0.
    const int k = s * kSeg + 32 * t;
    const bool k_ok = k < K;
    // x rows g and g+8, this lane's 32 values (zeros for rows >= M); L1 / L2 hits
    uint4 xl[4], xh[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xl[i] = xh[i] = make_uint4(0u, 0u, 0u, 0u);
    if (m_lo && k_ok) {
      const uint4* p = reinterpret_cast<const uint4*>(x + g * sxm + k);
#pragma unroll
      for (int i = 0; i < 4; ++i) xl[i] = __ldg(p + i);
    }
    if (HI && m_hi && k_ok) {
      const uint4* p = reinterpret_cast<const uint4*>(x + (g + 8) * sxm + k);
#pragma unroll
      for (int i = 0; i < 4; ++i) xh[i] = __ldg(p + i);
    }
    const uint32_t* xlw = reinterpret_cast<const uint32_t*>(xl);
    const uint32_t* xhw = reinterpret_cast<const uint32_t*>(xh);
    if constexpr (PAIR) {
      // SWAP's fragments (below); each packed byte's two weights from one table read. The PRMT's selector, IMM
      // (pair_imm): result bytes 0, 2, 3 from pair_hi (4, 6, 7), byte 1 the word's byte i; else result byte 0 =
      // pair_lane's byte 0 (4), byte 1 = the word's byte i, bytes 2, 3 = pair_lane's byte 1, which is 0 (5), and the
      // base added
      auto pair_at = [&](auto imm, uint32_t word, int i, float a) {
        float hi, lo;
        if constexpr (decltype(imm)::value) {
          const uint32_t addr = __byte_perm(word, pair_hi, 0x7604u | (static_cast<uint32_t>(i) << 4));
          asm volatile("ld.shared.v2.f32 {%0, %1}, [%2+1024];" : "=f"(hi), "=f"(lo) : "r"(addr));
          static_assert(kPairImm == 1024, "the immediate above is kPairImm");
        } else {
          const uint32_t offset = __byte_perm(word, pair_lane, 0x5504u | (static_cast<uint32_t>(i) << 4));
          asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(hi), "=f"(lo) : "r"(pair_base + offset));
        }
        return Dt<T>::pack(__fmul_rn(hi, a), __fmul_rn(lo, a));
      };
      float a[2];
      uint32_t words[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        a[j] = scale_of(cur, j);
        words[j][0] = cur.w[j].x; words[j][1] = cur.w[j].y; words[j][2] = cur.w[j].z; words[j][3] = cur.w[j].w;
      }
      auto steps = [&](auto imm) {
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int wi = u >> 1, be = 2 * (u & 1), bo = be + 1;
          uint32_t ev[2], od[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            ev[j] = pair_at(imm, words[j][wi], be, a[j]);
            od[j] = pair_at(imm, words[j][wi], bo, a[j]);
          }
          Dt<T>::mma(c[0], ev[0], ev[1], od[0], od[1], xlw[2 * u], xlw[2 * u + 1]);
          if constexpr (HI) Dt<T>::mma(c[1], ev[0], ev[1], od[0], od[1], xhw[2 * u], xhw[2 * u + 1]);
        }
      };
      if (pair_imm)  // uniform across the grid
        steps(std::true_type{});
      else
        steps(std::false_type{});
      return;
    }
    if constexpr (SWAP) {
      // A fragment (weights): a0 / a2 = row g's bytes 2u / 2u+1 (k-slots 2t, 2t+1 | 2t+8, 2t+9, as above), a1 / a3
      // = row g+8's; B fragment (x): token g's words 2u, 2u+1. c[0]: tokens 0..7, c[1]: tokens 8..15 (FORM 3).
      float a[2];
      uint32_t hi4[2][4], lo4[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        a[j] = scale_of(cur, j);
        const uint32_t words[4] = {cur.w[j].x, cur.w[j].y, cur.w[j].z, cur.w[j].w};
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          hi4[j][wi] = (words[wi] >> 2) & 0x3c3c3c3cu;
          lo4[j][wi] = (words[wi] << 2) & 0x3c3c3c3cu;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int wi = u >> 1, be = 2 * (u & 1), bo = be + 1;  // the even / odd byte of k-step u in word wi
        uint32_t ev[2], od[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          ev[j] = dequant_pair<T>(hi4[j][wi], lo4[j][wi], lut_base, be, a[j]);
          od[j] = dequant_pair<T>(hi4[j][wi], lo4[j][wi], lut_base, bo, a[j]);
        }
        Dt<T>::mma(c[0], ev[0], ev[1], od[0], od[1], xlw[2 * u], xlw[2 * u + 1]);
        if constexpr (HI) Dt<T>::mma(c[1], ev[0], ev[1], od[0], od[1], xhw[2 * u], xhw[2 * u + 1]);
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float a = scale_of(cur, j);
      const uint32_t words[4] = {cur.w[j].x, cur.w[j].y, cur.w[j].z, cur.w[j].w};
      if constexpr (LEAN) {
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {  // word wi: bytes 4wi .. 4wi+3 = k-steps u = 2wi (bytes 0, 1), 2wi+1 (2, 3)
          const uint32_t hi4 = (words[wi] >> 2) & 0x3c3c3c3cu;  // byte i: 4 x (high nibble of byte i)
          const uint32_t lo4 = (words[wi] << 2) & 0x3c3c3c3cu;  // byte i: 4 x (low nibble of byte i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int u = 2 * wi + h;
            const uint32_t b0 = dequant_pair<T>(hi4, lo4, lut_base, 2 * h, a);
            const uint32_t b1 = dequant_pair<T>(hi4, lo4, lut_base, 2 * h + 1, a);
            Dt<T>::mma(c[j], xlw[2 * u], xhw[2 * u], xlw[2 * u + 1], xhw[2 * u + 1], b0, b1);
          }
        }
        continue;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint32_t word = words[u >> 1];
        const uint32_t b_even = (word >> (16 * (u & 1))) & 0xffu;     // byte 2u
        const uint32_t b_odd = (word >> (16 * (u & 1) + 8)) & 0xffu;  // byte 2u + 1
        const uint32_t b0 = Dt<T>::pack(__fmul_rn(lut[b_even >> 4], a), __fmul_rn(lut[b_even & 15u], a));
        const uint32_t b1 = Dt<T>::pack(__fmul_rn(lut[b_odd >> 4], a), __fmul_rn(lut[b_odd & 15u], a));
        Dt<T>::mma(c[j], xlw[2 * u], xhw[2 * u], xlw[2 * u + 1], xhw[2 * u + 1], b0, b1);
      }
    }
  };

  // Register ring: stage d holds segment s0 + d*WARPS. Before computing it, its slot is refilled with the
  // segment DEPTH*WARPS further on, so DEPTH segments stay in flight (the unrolled d keeps indices static).
  Stage st[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) load(seg_begin + warp + d * WARPS, st[d]);
  // The code tables are filled while those first weight bytes are on their way (nothing above reads them): a block's
  // start costs one memory latency, not the fill and its barrier then the latency.
  if constexpr (PAIR) {
    // row v = this thread's byte value; its 16-byte chunks written in a rotated order so the 8 lanes of each
    // STS.128 wavefront hit 8 different chunk columns
    const int v = threadIdx.x;
    const float hi = __ldg(code + (v >> 4)), lo = __ldg(code + (v & 15));
    const float4 pair2 = make_float4(hi, lo, hi, lo);
    float4* table_row = reinterpret_cast<float4*>(pair_table + v * kPairRowBytes);
#pragma unroll
    for (int i = 0; i < kPairRowBytes / 16; ++i) table_row[(i + v) & (kPairRowBytes / 16 - 1)] = pair2;
  } else if (threadIdx.x < 16) {
    lut[threadIdx.x] = code[threadIdx.x];
  }
  if (nested)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lut2[i] = code2[i];
  __syncthreads();
  for (int s0 = seg_begin + warp; s0 < seg_end; s0 += DEPTH * WARPS) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int s = s0 + d * WARPS;
      const Stage cur = st[d];
      load(s + DEPTH * WARPS, st[d]);
      if (s < seg_end) compute(s, cur);
    }
  }

  // the warps' partial sums [warp][m][n]: PAIR's table is done with once every warp has left the main loop
  float(*partial)[kMaxM][kRows];
  if constexpr (PAIR) {
    static_assert(WARPS * kMaxM * kRows * sizeof(float) == kPairPartialBytes, "partial's space (kPairPartialBytes)");
    static_assert(kPairPartialBytes + (kMaxM * kRows + kMaxM * 32) * sizeof(float) <= kPairTableBytes,
                  "partial, block_sum and s_lora fit the table's space");
    __syncthreads();
    partial = reinterpret_cast<float(*)[kMaxM][kRows]>(pair_table);
  } else {
    __shared__ float partial_own[WARPS][kMaxM][kRows];
    partial = partial_own;
  }
  if constexpr (SWAP) {
    // C fragment: c[h][0..1] = (weight row g, tokens 8h + 2t + 0..1), c[h][2..3] = (row g + 8, same tokens)
#pragma unroll
    for (int h = 0; h < (HI ? 2 : 1); ++h) {
      partial[warp][8 * h + 2 * t][g] = c[h][0];
      partial[warp][8 * h + 2 * t + 1][g] = c[h][1];
      partial[warp][8 * h + 2 * t][g + 8] = c[h][2];
      partial[warp][8 * h + 2 * t + 1][g + 8] = c[h][3];
    }
  } else {
    // C fragment: c[j][0..1] = (m = g, n = 8j + 2t + 0..1), c[j][2..3] = (m = g + 8, same n)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      partial[warp][g][8 * j + 2 * t] = c[j][0];
      partial[warp][g][8 * j + 2 * t + 1] = c[j][1];
      partial[warp][g + 8][8 * j + 2 * t] = c[j][2];
      partial[warp][g + 8][8 * j + 2 * t + 1] = c[j][3];
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < M * kRows; o += blockDim.x) {  // rows >= M hold nothing (FORM 2: never written)
    const int m = o / kRows, nl = o % kRows;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][m][nl];
    block_sum[o] = sum;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.y > 1) {  // K split: block 0 of the cluster (blockIdx.y == its rank) adds the others' sums
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();  // every block's block_sum written and visible to the cluster
    if (blockIdx.y == 0) {
      for (int o = threadIdx.x; o < M * kRows; o += blockDim.x) {
        float sum = block_sum[o];
        for (unsigned r = 1; r < gridDim.y; ++r) sum += cluster.map_shared_rank(block_sum, r)[o];
        block_sum[o] = sum;
      }
    }
    cluster.sync();  // the other blocks' shared memory stays until block 0 has read it
    if (blockIdx.y != 0) return;
  }
#endif
  // With LoRA this kernel is launched as a programmatic dependent of the shrink (launch() below), so everything above
  // (x, written before the shrink started; the weights) ran beside it; its partials P are read only after this wait.
  wait_for_prerequisite_grids();
  const bool lora_smem = P != nullptr && R <= 32;
  if (lora_smem) {  // S[m, j] = sum of the shrink's split-K partials
    for (int i = threadIdx.x; i < M * R; i += blockDim.x) {
      float acc = 0.f;
      for (int sp = 0; sp < splits; ++sp) acc += P[static_cast<int64_t>(sp) * M * R + i];
      s_lora[i] = acc;
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < kMaxM * kRows; o += blockDim.x) {
    const int m = o / kRows, nl = o % kRows;
    const int64_t n = n0 + nl;
    if (m >= M || n >= N) continue;
    float out = block_sum[o];
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

// MAX_SHARED: nothing but a second function, which the PAIR form's launches take and configure with PAIR's
// shared-memory carveout (max_shared_carveout): an SM runs blocks of two kernels side by side only under one carveout,
// so a shrink at the default one would keep its dependent GEMV's blocks off its SMs until it drained.
template <typename T, bool MAX_SHARED = false>
__global__ void __launch_bounds__(kShrinkThreads)
lora_shrink_kernel(const T* __restrict__ x, int64_t sxm, const float* __restrict__ A, float* __restrict__ P,
                   int M, int K, int R) {
  // block (j, sp): P[sp, m, j] = sum over this block's K chunk of x[m, k] * A[j, k]. One round of 16-byte
  // loads per thread (8 values of A and of each x row), so the shrink costs one memory latency, not K / 256
  // dependent rounds. Bytes: A (r*K fp32) + x from L2.
  // The GEMV launched next reads P only after its wait: let it start now, beside this kernel (sm_90+).
  allow_dependents();
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

// Which form of nf4_mma_gemv_kernel the launches take: 0 the original one, 1 LEAN (same bits), 2 SWAP (FORM 2 or 3
// by M; the default: on an H200 faster than the original form at every M measured, within its error bounds:
// benchmarks/results/h200/INDEX.md, session 32); set_kernel_variant.
int g_kernel_variant = 2;

// 8 warps splitting K, 2 segments in flight per warp: (4, 3), (4, 4) and (8, 3) measured no faster on an H100
// (benchmarks/results/h100/nf4_decode_graph_variants_2026-11-24.json), so only this shape is compiled.
constexpr int kWarps = 8, kDepth = 2;
constexpr int kMaxKSplit = 8;  // the portable cluster size

// How many blocks a tile's K is split over: 0 chosen per call (k_split_auto), 1..8 that many on every launch
// (clamped to the segments; sm_90+ only, 1 elsewhere); set_k_split. Per call by default since session 33 timed
// k_split_auto's rule on an H200 in two calls: k/v (the one Llama-8B projection it splits) 6.9 -> 5.8-5.9 µs base
// only and 9.2 -> 8.1-8.2 with LoRA at M = 1, 8.8 -> 7.2 / 11.7 -> 10.2 at M = 16; every other shape unsplit as before.
int g_k_split = 0;

// The per-call choice, from session 32's sweep of fixed splits on an H200 (benchmarks/results/h200/INDEX.md):
// splitting was slower wherever the grid has at least a block per SM (q/o, gate/up, down at every M: 1.1-3.6x the
// unsplit time for splits 2..8 -- each extra block repeats the code-table fill and adds a cluster barrier, and the
// unsplit kernel is not bound by its blocks' latency alone), and faster only where the grid leaves more than half
// the SMs idle (k/v, 64 tiles: 7.0 -> 5.9 us at M = 1 and 8.8 -> 7.3 at M = 16 with 2 blocks a tile; 3 or more
// were slower again). A wave model that predicted gains for down and gate/up was wrong.
int k_split_auto(int64_t tiles, int sms) { return 2 * tiles <= sms ? 2 : 1; }

// The kernel a call with M rows of x launches (g_kernel_variant's form)
template <typename scalar_t>
auto gemv_kernel_for(int M) {
  return g_kernel_variant == 0   ? nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 0>
         : g_kernel_variant == 1 ? nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 1>
         : g_kernel_variant == 3 ? (M <= 8 ? nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 4>
                                           : nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 5>)
         : M <= 8                ? nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 2>
                                 : nf4_mma_gemv_kernel<scalar_t, kWarps, kDepth, 3>;
}

// The dynamic shared memory a launch of g_kernel_variant's form needs: PAIR's table, 0 for the other forms
int dynamic_smem_bytes() { return g_kernel_variant == 3 ? kPairDynamicBytes : 0; }

// PAIR's launches (the GEMV and the shrink it depends on) ask for the shared-memory carveout at its maximum, once per
// kernel and device, so that 3 GEMV blocks of ~67 KB fit an SM beside a small L1 (x and the absmax are its only
// traffic); above 48 KB of dynamic shared memory a kernel must also be allowed it. Neither is a stream operation:
// legal while a CUDA graph captures.
void max_shared_carveout(const void* kernel, int dynamic_bytes) {
  static std::mutex mutex;
  static std::vector<std::pair<const void*, int>> done;  // (kernel, device)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : done)
    if (entry.first == kernel && entry.second == device) return;
  if (dynamic_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
  done.emplace_back(kernel, device);
}

// The K split a launch over N rows and K columns takes on the current device
int k_split_of(int64_t N, int K) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (props->major < 9) return 1;  // thread-block clusters: sm_90+
  const int nseg = (K + kSeg - 1) / kSeg;
  const int k_split = g_k_split > 0 ? g_k_split : k_split_auto((N + kRows - 1) / kRows, props->multiProcessorCount);
  return std::max(1, std::min(k_split, nseg));
}

int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, "nf4_gemv: ", what, " must be a power of two, got ", v);
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <typename scalar_t>
void launch(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& absmax,
            const torch::Tensor& code, const torch::Tensor& code2, const torch::Tensor& absmax2, double offset,
            bool nested, int64_t bs, int64_t bs2, int64_t N, const std::optional<torch::Tensor>& bias,
            const std::optional<torch::Tensor>& A, const std::optional<torch::Tensor>& B, torch::Tensor& S, int R,
            double scaling, torch::Tensor& y, cudaStream_t stream, bool pdl) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const int splits = (K + kShrinkChunk - 1) / kShrinkChunk;
  const int smem = dynamic_smem_bytes();
  if (R > 0) {
    const auto shrink = smem > 0 ? lora_shrink_kernel<scalar_t, true> : lora_shrink_kernel<scalar_t, false>;
    if (smem > 0) max_shared_carveout(reinterpret_cast<const void*>(shrink), 0);
    shrink<<<dim3(R, splits), kShrinkThreads, 0, stream>>>(x.data_ptr<scalar_t>(), x.stride(0), A->data_ptr<float>(),
                                                           S.data_ptr<float>(), M, K, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const scalar_t* bptr = (bias.has_value() && bias->defined()) ? bias->data_ptr<scalar_t>() : nullptr;
  const int blocks = static_cast<int>((N + kRows - 1) / kRows);
  const int l2bs = log2_exact(bs, "blocksize"), l2bs2 = nested ? log2_exact(bs2, "nested blocksize") : 0;
  const float* P = R > 0 ? S.data_ptr<float>() : nullptr;
  const float* Bp = R > 0 ? B->data_ptr<float>() : nullptr;
  // With LoRA the GEMV is a programmatic dependent of the shrink just launched (sm_90+): its weight streaming runs
  // beside the shrink, and only its epilogue waits for the partials. Not without LoRA: the kernel ahead could then
  // be whatever wrote x, which the GEMV reads before its wait.
  const auto kernel = gemv_kernel_for<scalar_t>(M);
  if (smem > 0) max_shared_carveout(reinterpret_cast<const void*>(kernel), smem);
  const int k_split = k_split_of(N, K);
  fastpeft::device::PdlLaunchConfig config(dim3(blocks, k_split), dim3(kWarps * 32), stream, R > 0 && pdl);
  config.cfg.dynamicSmemBytes = smem;
  if (k_split > 1) config.set_cluster(dim3(1, k_split, 1));  // the blocks sharing a tile, one cluster
  C10_CUDA_CHECK(cudaLaunchKernelEx(
      &config.cfg, kernel, static_cast<const scalar_t*>(x.data_ptr<scalar_t>()),
      static_cast<int64_t>(x.stride(0)), static_cast<const uint8_t*>(packed.data_ptr<uint8_t>()),
      static_cast<const void*>(absmax.data_ptr()), static_cast<const float*>(code.data_ptr<float>()),
      static_cast<const float*>(code2.data_ptr<float>()), static_cast<const float*>(absmax2.data_ptr<float>()),
      static_cast<float>(offset), nested, l2bs, l2bs2, bptr, P, splits, Bp, static_cast<float>(scaling), R,
      y.data_ptr<scalar_t>(), M, static_cast<int>(N), K));
}

}  // namespace

// y = x·dequant(W)ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ;  A, B fp32 contiguous (or undefined for no LoRA). pdl: launch the
// GEMV as a programmatic dependent of the LoRA shrink where the GPU has it (sm_90+); False: one after the other.
torch::Tensor nf4_gemv_lora(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, torch::Tensor code,
                            torch::Tensor code2, torch::Tensor absmax2, double offset, bool nested, int64_t bs,
                            int64_t bs2, int64_t N, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> A,
                            std::optional<torch::Tensor> B, double scaling, bool pdl) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "nf4_gemv: x must be a CUDA [M, K] tensor, rows contiguous");
  const int M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "nf4_gemv: M must be in 1..16, got ", M);
  TORCH_CHECK(K % 32 == 0, "nf4_gemv: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "nf4_gemv: x rows must start on 16-byte boundaries (row stride % 8 == 0, aligned data)");
  TORCH_CHECK(bs % 32 == 0, "nf4_gemv: blocksize must be a multiple of 32, got ", bs);
  TORCH_CHECK(!nested || (code2.numel() == 256 && absmax.scalar_type() == at::ScalarType::Byte),
              "nf4_gemv: nested absmax needs uint8 codes and a 256-entry code2");
  TORCH_CHECK(packed.scalar_type() == at::ScalarType::Byte && packed.is_contiguous(), "nf4_gemv: packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() >= N * K / 2, "nf4_gemv: packed too short");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0, "nf4_gemv: packed must be 16-byte aligned");
  TORCH_CHECK(absmax.scalar_type() == (nested ? at::ScalarType::Byte : at::ScalarType::Float),
              "nf4_gemv: absmax must be uint8 codes (nested) or fp32");
  const c10::cuda::CUDAGuard guard(x.device());
  pdl = pdl && at::cuda::getCurrentDeviceProperties()->major >= 9;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor S;
  int R = 0;
  if (A.has_value() && A->defined()) {
    R = A->size(0);
    TORCH_CHECK(A->scalar_type() == at::ScalarType::Float && A->is_contiguous() && A->size(1) == K, "nf4_gemv: A must be fp32 [r, K]");
    TORCH_CHECK(B.has_value() && B->scalar_type() == at::ScalarType::Float && B->is_contiguous() && B->size(0) == N && B->size(1) == R,
                "nf4_gemv: B must be fp32 [N, r]");
    S = torch::empty({(K + kShrinkChunk - 1) / kShrinkChunk, M, R}, x.options().dtype(torch::kFloat32));  // partials
  }
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::ScalarType::Half || st == at::ScalarType::BFloat16,
              "nf4_gemv: x must be float16 or bfloat16 (fp32 takes the Triton path), got ", st);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == st && bias->numel() == N && bias->is_contiguous(),
                "nf4_gemv: bias must be a contiguous CUDA [N] tensor in x's dtype");
  }
  if (st == at::ScalarType::Half) {
    launch<at::Half>(x, packed, absmax, code, code2, absmax2, offset, nested, bs, bs2, N, bias, A, B, S, R, scaling, y,
                     stream, pdl);
  } else {
    launch<at::BFloat16>(x, packed, absmax, code, code2, absmax2, offset, nested, bs, bs2, N, bias, A, B, S, R,
                         scaling, y, stream, pdl);
  }
  return y;
}

// The A/B hook of the kernel's forms (0 the original; 1 LEAN: the same bits, fewer instructions; 2 SWAP: LEAN with the
// mma operands exchanged; 3 PAIR: SWAP reading a byte's two codes at once, SWAP's bits); returns the previous.
int64_t set_kernel_variant(int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant <= 3, "nf4_gemv: set_kernel_variant takes 0 (original), 1 (lean), 2 (lean, "
              "operands swapped; the default) or 3 (2 with a code-pair table)");
  const int64_t previous = g_kernel_variant;
  g_kernel_variant = static_cast<int>(variant);
  return previous;
}

// The K split's hook: 0 chosen per call (the default), 1..8 that many blocks a tile (1: no split); returns the previous
int64_t set_k_split(int64_t k_split) {
  TORCH_CHECK(k_split >= 0 && k_split <= kMaxKSplit, "nf4_gemv: set_k_split takes 0 (auto) to 8");
  const int64_t previous = g_k_split;
  g_k_split = static_cast<int>(k_split);
  return previous;
}

// The K split a call with N output features and K input features would take now on the current device (the
// hook and the device decide it)
int64_t k_split_for(int64_t N, int64_t K) {
  TORCH_CHECK(N >= 1 && K >= 32, "nf4_gemv: k_split_for takes N >= 1 and K >= 32");
  return k_split_of(N, static_cast<int>(K));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_gemv_lora", &nf4_gemv_lora, "NF4/FP4 GEMV + LoRA shrink/expand (decode, M <= 16; tensor-core MMA)");
  m.def("set_kernel_variant", &set_kernel_variant,
        "0: the original GEMV kernel, 1: its lean index math (same bits), 2: lean with the mma operands swapped "
        "(the default), 3: 2 with a table of code pairs (2's bits); returns the previous");
  m.def("set_k_split", &set_k_split, "0: K split chosen per call (the default), 1..8: that many blocks a tile; returns "
        "the previous");
  m.def("k_split_for", &k_split_for, "the K split a call (N, K) takes now on the current device");
}

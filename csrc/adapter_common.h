// Shared by adapter_ops.cpp (CPU, Meta, autograd, registration) and adapter_cuda.cu (CUDA kernels).
//
// The LoRA dropout mask, defined in fastpeft/ops/dropout.py and regenerated here bit for bit:
//   element i = flat row-major index over the [M, K] view of x; words = Philox4x32-7(key = seed, counter = i / 8)
//   (Triton's tl.randint4x: counter low 32 bits in c0, high in c1, c2 = c3 = 0; key low 32 bits in k0, high in k1)
//   bits(i) = 16-bit half (i % 2: 0 low, 1 high) of word (i % 8) / 2;  keep(i) = bits(i) >= thr, thr = ceil(p * 2^16)
// The seed is the raw draw from torch's CPU generator folded with the process's rank as fastpeft/nn/_rng.py
// does (so the kernels and the Triton path see the same masks for the same draw).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FP_HD __host__ __device__ __forceinline__
#else
#define FP_HD inline
#endif

namespace fastpeft {

constexpr int64_t kSeedModulus = 2147483647;  // 2^31 - 1 (nn/_rng.py SEED_MODULUS)
constexpr int64_t kRankStride = 0x5BD1E995;    // nn/_rng.py _RANK_STRIDE

// Philox4x32-7 (ops/dropout.py: the mask spec, = tl.randint4x(seed, counter, n_rounds=7)): the four words of
// `counter` under `seed`, written to out[0..3].
FP_HD void philox4x32_7(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 7; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t p1 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p0);
    c3 = static_cast<uint32_t>(p1);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

FP_HD uint32_t philox_word(uint64_t counter, uint64_t seed, int word) {
  uint32_t words[4];
  philox4x32_7(counter, seed, words);
  return words[word];
}

// keep bits of the 8 elements 8*chunk .. 8*chunk+7 (bit e set = element kept), one Philox call
FP_HD uint32_t keep_bits8(uint64_t chunk, uint64_t seed, uint32_t thr) {
  uint32_t words[4];
  philox4x32_7(chunk, seed, words);
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const uint32_t w = words[e >> 1];
    const uint32_t half = (e & 1) ? (w >> 16) : (w & 0xFFFFu);
    bits |= static_cast<uint32_t>(half >= thr) << e;
  }
  return bits;
}

inline int64_t fold_rank(int64_t draw, int64_t rank) {
  const int64_t v = (draw + rank * kRankStride) % kSeedModulus;
  return v < 0 ? v + kSeedModulus : v;
}

}  // namespace fastpeft

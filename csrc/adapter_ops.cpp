// fastpeft's adapted layers as C++ operators: one dispatcher call per layer and direction, the backward run by
// autograd without Python. Schemas (namespace fastpeft_ops; Python: fastpeft/ops/cpp_ops.py):
//
//   lora_linear(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?, rank) -> y        (autograd)
//   lora_fwd(x2, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?, rank) -> (y2, S)
//   lora_bwd(dy2, x2, S, weight, lora_A, lora_B, scaling, dropout_p, seed?, rank, need_x, need_A, need_B)
//            -> (dx2, dA, dB)
//   dora_linear(x, weight, bias?, lora_A, lora_B, magnitude, scaling, weight_sq_norm?, weight_norm?) -> y (autograd)
//   dora_fwd(x2, weight, bias?, lora_A, lora_B, magnitude, scaling, weight_sq_norm?, weight_norm?)
//            -> (y2, S, Z, g, inv_n)
//   dora_bwd(dy2, x2, S, Z, g, inv_n, weight, lora_A, lora_B, scaling, need_x, need_A, need_B, need_m)
//            -> (dx2, dA, dB, dm)
//   dora_infer(x2, weight, bias?, lora_A, lora_B, magnitude, scaling, weight_norm) -> y2
//            (inference with a given norm: dora_linear's path when no autograd is recorded; nothing kept)
//   nf4_dequantize(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype, K,
//                  dtype) -> W [N, K]                 (bnb 4-bit bytes + the QuantState's parts; CUDA: nf4_dequant.cu)
//   nf4_lora_linear(x, <the 11 weight arguments above, up to state_dtype>, bias?, lora_A, lora_B, scaling,
//                   dropout_p, seed?, rank) -> y                                               (autograd)
//   nf4_dora_linear(x, <the same>, bias?, lora_A, lora_B, magnitude, scaling, weight_sq_norm?, weight_norm?) -> y
//                                                                                              (autograd)
//   nf4_lora_group_linear(x, <the 10 weight arguments above as per-member lists>, state_dtype, bias[], lora_A[],
//                         lora_B[], scaling) -> y[]       (autograd; lora_group_linear on the dequantized weights)
//   dora_group_linear(x, weight[], bias[], lora_A[], lora_B[], magnitude[], scaling, weight_sq_norm[]) -> y[]
//   nf4_dora_group_linear(x, <the 4-bit lists>, state_dtype, bias[], lora_A[], lora_B[], magnitude[], scaling,
//                         weight_sq_norm[]) -> y[]
//            (autograd; sibling DoRA projections in training: each member's dora_fwd / dora_bwd in one node)
//   ia3_linear(x, weight, bias?, ia3_l, feedforward) -> y                                        (autograd)
//   ia3_fwd(x2, weight, bias?, ia3_l, feedforward) -> (y2, saved)
//   ia3_bwd(dy2, saved, weight, ia3_l, feedforward, need_x, need_b) -> (dx2, db, dl)
//   lora_group_linear(x, weight[], bias[], lora_A[], lora_B[], scaling) -> y[]                     (autograd)
//   lora_group_fwd(x2, weight[], bias[], lora_A[], lora_B[], scaling) -> (y2[], S)
//   lora_group_bwd(dy2[], x2, S, weight[], lora_A[], lora_B[], scaling, need_x, need_A, need_B) -> (dx2, dA[], dB[])
//            (sibling projections reading one x -- q/k/v, gate/up -- as one call: one rank, one scaling, no dropout,
//             frozen bases; bias[] empty or one per member; S [M, Σ r] holds the members' S side by side)
//   lora_mixed_delta_(y!, x, adapter_of_segment, tokens, adapters) -> ()                          (no autograd)
//   lora_mixed_linear(x, weight, bias?, adapter_of_segment, tokens, adapters) -> y                   (no autograd)
//   mixed_adapters_new(lora_A[], lora_B[], scales[]) -> adapters;  mixed_adapters_free(adapters)
//            (adapters: an int handle of a registered adapter set, see MixedAdapters below)
//
// Mixed-adapter batches (inference): y [M, N] += scales[a]·(x·A_aᵀ)·B_aᵀ row by row, a = adapter_of_segment[b] for
// the b-th segment of `tokens` rows (int32 on y's device; a < 0: no adapter, y unchanged), in fp32, y rounded once.
// The adapters come as one registered MixedAdapters set (A_a [r_a, K], B_a [N, r_a]; ranks may differ), passed as
// its int handle: handles to the caller's tensors, no stacked copy, so an extra adapter costs its own weights only.
// One cheap argument, because decode calls these per layer and token and is host-bound (MixedAdapters says more).
//
// LoRA math (fastpeft/ops/reference.py is the oracle; D = the dropout mask of adapter_common.h, s = scaling):
//   forward   S = s·(D⊙X)·Aᵀ (fp32 [M, r], saved);  Y = X·Wᵀ + b + S·Bᵀ
//   backward  dS = s·dY·B;  dB = dYᵀ·S;  dA = dSᵀ·(D⊙X);  dX = dY·W + D⊙(dS·A)
// S, dA and dB are fp32 (the adapters' usual dtype), except with 16-bit adapters of x's dtype and no dropout
// (lora_native16 below: FSDP2's bf16 policy, DeepSpeed bf16), where they are in that dtype, as PEFT computes then.
// DoRA math (p = 0 only: PEFT's dropout formula needs a second base product, kept on the Triton path; the base weight
// is frozen), n = ‖W + s·B·A‖ per output row (detached, as PEFT), g = m / n:
//   forward   S = s·X·Aᵀ;  Z0 = X·Wᵀ (x.dtype, saved);  Y = g⊙(Z0 + S·Bᵀ) + b (fp32 sum, rounded once)
//             n² = ‖W‖² + Σ_j B⊙(2s·W·Aᵀ + s²·B·(A·Aᵀ)): small products only (‖W‖² given by the caller, who caches
//             it for the frozen W; or computed), never B·A. weight_norm given (a cached n): no norm work.
//   backward  dm = (Σ_rows dY⊙(Z0 + S·Bᵀ))/n;  dZ = g⊙dY;  dS = s·dY·(g⊙B);  dB = g⊙(dYᵀ·S);  dA = dSᵀ·X;  dX = dS·A + dZ·W
// lora_linear's autograd saves x (the caller's tensor: one storage for q/k/v), S and the seed; the parameters
// by reference. The dropout mask is never stored: the kernels regenerate it.
// The seed: a 0-dim int64 CPU tensor holding the raw draw from torch's CPU generator (None when p == 0), folded
// with `rank` here exactly as fastpeft/nn/_rng.py folds it. A tensor, not an int, so torch.compile does not
// specialize a graph on every new draw.
//
// Kernels: CPU here (ATen in fp32: the path CI tests), CUDA in adapter_cuda.cu, Meta (shapes) here for
// torch.compile. lora_linear / ia3_linear are Autograd kernels calling the *_fwd / *_bwd ops through the
// dispatcher, so torch.compile traces them into two graph nodes per layer and direction.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "adapter_common.h"

namespace fastpeft {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// LoRA with 16-bit adapters (defined below; adapter_cuda.cu calls them too)
bool lora_native16(const Tensor& x2, const Tensor& A, const Tensor& B, double p);
std::tuple<Tensor, Tensor> lora_fwd_native16(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                             const Tensor& A, const Tensor& B, double scaling);
std::tuple<Tensor, Tensor, Tensor> lora_bwd_native16(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                     const Tensor& weight, const Tensor& A, const Tensor& B,
                                                     double scaling, bool need_x, bool need_A, bool need_B);
at::ScalarType group_s_dtype(const Tensor& x2, at::TensorList As, at::TensorList Bs);

// A layer's adapters for the mixed-batch operators, built by the caller (fastpeft/nn/lora.py: once, then again only
// when a module, parameter or scaling changed) and registered under an integer handle (mixed_adapters_new), which
// the operators take as one argument. It holds handles to the given tensors, not copies: in-place updates (and
// `.data =`, which keeps the TensorImpl) are seen by the next call; shapes, dtypes and devices are checked at every
// call (check_mixed_args), so a tensor resized in place gives a clear error. Why a handle: decode calls these
// operators per layer and token and is host-bound; 2n tensors and n floats through the dispatcher cost ~15 µs a
// call, and a torch.classes object as the argument ~10 µs more than an int (Python probes every argument for
// __torch_function__, and on a ScriptObject that probe raises and catches an AttributeError: 13 µs on a 2-core host).
struct MixedAdapters {
  std::vector<Tensor> lora_A, lora_B;
  std::vector<double> scales;
  MixedAdapters(std::vector<Tensor> A, std::vector<Tensor> B, std::vector<double> s)
      : lora_A(std::move(A)), lora_B(std::move(B)), scales(std::move(s)) {
    TORCH_CHECK(lora_A.size() == lora_B.size() && lora_A.size() == scales.size(), "fastpeft mixed_adapters: ",
                lora_A.size(), " lora_A, ", lora_B.size(), " lora_B and ", scales.size(),
                " scales: one of each per adapter");
    for (size_t i = 0; i < lora_A.size(); ++i)
      TORCH_CHECK(lora_A[i].defined() && lora_B[i].defined(), "fastpeft mixed_adapters: adapter ", i,
                  " has an undefined lora_A or lora_B");
  }
};
using MixedAdaptersPtr = std::shared_ptr<const MixedAdapters>;

// The registry of adapter sets: handle -> set, under one mutex (sets are made and freed by Python objects on any
// thread; a lookup per operator call).
std::mutex& mixed_registry_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::unordered_map<int64_t, MixedAdaptersPtr>& mixed_registry() {
  static std::unordered_map<int64_t, MixedAdaptersPtr> registry;
  return registry;
}

int64_t mixed_adapters_new(at::TensorList lora_A, at::TensorList lora_B, c10::ArrayRef<double> scales) {
  auto set = std::make_shared<const MixedAdapters>(lora_A.vec(), lora_B.vec(), scales.vec());
  static int64_t next = 0;
  std::lock_guard<std::mutex> lock(mixed_registry_mutex());
  const int64_t handle = ++next;
  mixed_registry().emplace(handle, std::move(set));
  return handle;
}

// Forgets the set (its tensors are released with it); a handle not (or no longer) registered is left alone.
void mixed_adapters_free(int64_t handle) {
  std::lock_guard<std::mutex> lock(mixed_registry_mutex());
  mixed_registry().erase(handle);
}

MixedAdaptersPtr mixed_adapters_get(int64_t handle) {
  std::lock_guard<std::mutex> lock(mixed_registry_mutex());
  const auto it = mixed_registry().find(handle);
  TORCH_CHECK(it != mixed_registry().end(), "fastpeft mixed-batch operators: no adapter set has handle ", handle,
              " (it was freed, or did not come from fastpeft.ops.cpp_ops.mixed_adapters)");
  return it->second;
}

#ifdef WITH_CUDA
void lora_mixed_delta_cuda(const Tensor& y, const Tensor& x, const Tensor& adapter_of_segment, int64_t tokens,
                           at::TensorList lora_A, at::TensorList lora_B, c10::ArrayRef<double> scales);  // .cu
// lora_mixed_linear at decode sizes in two launches, or an undefined tensor where it does not apply (.cu)
Tensor lora_mixed_decode_cuda(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const Tensor& adapter_of_segment, int64_t tokens, at::TensorList lora_A,
                              at::TensorList lora_B, c10::ArrayRef<double> scales);
#endif

// Argument checks of lora_mixed_delta_ (shared with adapter_cuda.cu).
void check_mixed_args(const Tensor& y, const Tensor& x, const Tensor& adapter_of_segment, int64_t tokens,
                      at::TensorList lora_A, at::TensorList lora_B, c10::ArrayRef<double> scales) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0), "fastpeft lora_mixed_delta_: x must be [M, K] and y [M, N], got x ",
              x.sizes(), ", y ", y.sizes());
  TORCH_CHECK(y.device() == x.device() && adapter_of_segment.device() == x.device(),
              "fastpeft lora_mixed_delta_: y, x and adapter_of_segment must be on one device");
  const auto dt = x.scalar_type();
  TORCH_CHECK(y.scalar_type() == dt && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16),
              "fastpeft lora_mixed_delta_: x and y must share one dtype of float32 / float16 / bfloat16, got ", dt, " and ",
              y.scalar_type());
  TORCH_CHECK(tokens >= 1 && x.size(0) % tokens == 0, "fastpeft lora_mixed_delta_: ", x.size(0),
              " rows do not split into segments of ", tokens, " tokens");
  TORCH_CHECK(adapter_of_segment.dim() == 1 && adapter_of_segment.numel() == x.size(0) / tokens &&
                  adapter_of_segment.scalar_type() == at::kInt,
              "fastpeft lora_mixed_delta_: ", x.size(0), " rows in segments of ", tokens,
              " tokens need an int32 adapter_of_segment of ", x.size(0) / tokens, " entries, got ",
              adapter_of_segment.sizes(), " ", adapter_of_segment.scalar_type());
  TORCH_CHECK(lora_A.size() == lora_B.size() && lora_A.size() == scales.size(),
              "fastpeft lora_mixed_delta_: ", lora_A.size(), " lora_A, ", lora_B.size(), " lora_B and ", scales.size(),
              " scales: one of each per adapter");
  for (size_t i = 0; i < lora_A.size(); ++i) {
    const Tensor& A = lora_A[i];
    const Tensor& B = lora_B[i];
    TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1) && B.dim() == 2 && B.size(0) == y.size(1) && B.size(1) == A.size(0),
                "fastpeft lora_mixed_delta_: adapter ", i, " has lora_A ", A.sizes(), " and lora_B ", B.sizes(),
                "; expected [r, ", x.size(1), "] and [", y.size(1), ", r]");
    TORCH_CHECK(A.device() == x.device() && B.device() == x.device() && at::isFloatingType(A.scalar_type()) &&
                    at::isFloatingType(B.scalar_type()),
                "fastpeft lora_mixed_delta_: adapter ", i, "'s weights must be floating tensors on x's device");
  }
}

// Argument checks of nf4_dequantize (shared with nf4_dequant.cu): everything the kernels read must be there, so a
// wrong QuantState gives an error, never an out-of-bounds read. Non-nested states pass absmax / code again as
// absmax2 / code2 (fastpeft/ops/nf4_format.py: KernelState).
void check_nf4_args(const Tensor& packed, const Tensor& absmax, const Tensor& code, const Tensor& code2,
                    const Tensor& absmax2, int64_t blocksize, int64_t blocksize2, bool nested, int64_t N,
                    at::ScalarType state_dtype, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(N >= 0 && K >= 0, "fastpeft nf4_dequantize: the weight shape must not be negative");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastpeft nf4_dequantize: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kHalf || state_dtype == at::kBFloat16,
              "fastpeft nf4_dequantize: the state's dtype must be float32, float16 or bfloat16, got ", state_dtype);
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0,
              "fastpeft nf4_dequantize: blocksize must be a positive even number, got ", blocksize);
  TORCH_CHECK(packed.is_contiguous(), "fastpeft nf4_dequantize: the packed bytes must be contiguous");
  const int64_t n = N * K, blocks = (n + blocksize - 1) / blocksize;
  // at least the weight's bytes, and no whole storage element more (a quant_storage dtype pads to its element
  // size): a wrong K (another in_features than the bytes were quantized with) cannot pass
  const int64_t nbytes = static_cast<int64_t>(packed.nbytes()), need = (n + 1) / 2;
  TORCH_CHECK(nbytes >= need && nbytes < need + static_cast<int64_t>(packed.element_size()),
              "fastpeft nf4_dequantize: packed holds ", nbytes, " bytes, a [", N, ", ", K, "] weight needs ", need,
              " (is x's last dimension the layer's in_features?)");
  const auto device = packed.device();
  for (const Tensor* t : {&absmax, &code, &code2, &absmax2})
    TORCH_CHECK(t->device() == device && t->is_contiguous(),
                "fastpeft nf4_dequantize: the QuantState's tensors must be contiguous and on the packed bytes' device");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16,
              "fastpeft nf4_dequantize: code must be the 16 float32 values of the 4-bit code, got ", code.sizes(), " ",
              code.scalar_type());
  TORCH_CHECK(absmax.numel() >= blocks, "fastpeft nf4_dequantize: absmax has ", absmax.numel(), " entries, ", blocks,
              " blocks of ", blocksize, " need more");
  if (nested) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte,
                "fastpeft nf4_dequantize: a double-quantized absmax must hold uint8 codes, got ", absmax.scalar_type());
    TORCH_CHECK(code2.scalar_type() == at::kFloat && code2.numel() == 256,
                "fastpeft nf4_dequantize: code2 must be the 256 float32 values of the nested code");
    TORCH_CHECK(blocksize2 > 0, "fastpeft nf4_dequantize: blocksize2 must be positive, got ", blocksize2);
    TORCH_CHECK(absmax2.scalar_type() == at::kFloat && absmax2.numel() >= (blocks + blocksize2 - 1) / blocksize2,
                "fastpeft nf4_dequantize: absmax2 must hold one float32 per ", blocksize2, " blocks (",
                (blocks + blocksize2 - 1) / blocksize2, "), got ", absmax2.numel(), " ", absmax2.scalar_type());
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat,
                "fastpeft nf4_dequantize: absmax must be float32 without double quant, got ", absmax.scalar_type());
  }
}

namespace {

int64_t seed_value(const c10::optional<Tensor>& seed, double p, int64_t rank) {
  if (p <= 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), "fastpeft lora: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1 && !seed->is_cuda(), "fastpeft lora: the seed must be a 0-dim CPU integer tensor");
  return fold_rank(seed->item<int64_t>(), rank);
}

uint32_t dropout_threshold(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft lora: dropout p must be in [0, 1), got ", p);
  return static_cast<uint32_t>(std::ceil(p * 65536.0));
}

// 1/(1-p) rounded to fp32, then to the activation dtype: the value the reference's mask.to(x.dtype) holds
float keep_scale(double p, at::ScalarType dt) {
  const float k32 = static_cast<float>(1.0 / (1.0 - p));
  if (dt == at::kBFloat16) return static_cast<float>(c10::BFloat16(k32));
  if (dt == at::kHalf) return static_cast<float>(c10::Half(k32));
  return k32;
}

// The dropout mask as a dense [M, K] float tensor (0 or keep_scale) on the CPU.
Tensor dropout_mask_cpu(int64_t M, int64_t K, double p, int64_t seed, at::ScalarType dt) {
  Tensor mask = at::empty({M, K}, at::TensorOptions().dtype(at::kFloat));
  float* out = mask.data_ptr<float>();
  const uint32_t thr = dropout_threshold(p);
  const float ks = keep_scale(p, dt);
  const int64_t n = M * K;
  for (int64_t chunk = 0; chunk * 8 < n; ++chunk) {
    const uint32_t bits = keep_bits8(static_cast<uint64_t>(chunk), static_cast<uint64_t>(seed), thr);
    for (int e = 0; e < 8 && chunk * 8 + e < n; ++e) out[chunk * 8 + e] = ((bits >> e) & 1u) ? ks : 0.0f;
  }
  return mask;
}

Tensor as_2d(const Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

// The [..., last] shape of `like` with its last dimension replaced: views a 2-D result back to 3-D input shape.
std::vector<int64_t> with_last_dim(const Tensor& like, int64_t last) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

// Autograd bookkeeping for an optional bias: whether one was given and its dtype (its gradient is cast back).
void save_bias_info(AutogradContext* ctx, const c10::optional<Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["has_bias"] = has_bias;
  if (has_bias) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
}

void check_lora_args(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                     const Tensor& B) {
  TORCH_CHECK(x2.dim() == 2, "fastpeft lora: x must be 2-D here, got ", x2.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x2.size(1), "fastpeft lora: weight ", weight.sizes(),
              " does not take inputs of size ", x2.size(1));
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x2.size(1), "fastpeft lora: lora_A ", A.sizes(), " does not match in_features ",
              x2.size(1));
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0), "fastpeft lora: lora_B ",
              B.sizes(), " does not match out_features ", weight.size(0), " and rank ", A.size(0));
  TORCH_CHECK(!bias.has_value() || !bias->defined() || bias->numel() == weight.size(0),
              "fastpeft lora: bias must have out_features elements");
  const auto dt = x2.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastpeft lora: x must be float32, float16 or bfloat16, got ", dt);
}

// ------------------------------------------------------------------------------------------------ CPU
// fp32 math on the CPU (the path CI tests): the same formulas as the CUDA kernels, in a different summation order.
std::tuple<Tensor, Tensor> lora_fwd_cpu(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                        const Tensor& A, const Tensor& B, double scaling, double p,
                                        const c10::optional<Tensor>& seed, int64_t rank) {
  check_lora_args(x2, weight, bias, A, B);
  if (lora_native16(x2, A, B, p)) return lora_fwd_native16(x2, weight, bias, A, B, scaling);
  const auto dt = x2.scalar_type();
  Tensor xd = x2;
  if (p > 0.0) xd = (x2.to(at::kFloat) * dropout_mask_cpu(x2.size(0), x2.size(1), p, seed_value(seed, p, rank), dt)).to(dt);
  Tensor S = at::mm(xd.to(at::kFloat), A.to(at::kFloat).t()).mul_(scaling);
  Tensor base = bias.has_value() && bias->defined() ? at::addmm(bias->to(dt), x2, weight.to(dt).t())
                                                    : at::mm(x2, weight.to(dt).t());
  Tensor y = base.to(at::kFloat).addmm_(S, B.to(at::kFloat).t()).to(dt);
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor> lora_bwd_cpu(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                const Tensor& weight, const Tensor& A, const Tensor& B, double scaling,
                                                double p, const c10::optional<Tensor>& seed, int64_t rank, bool need_x,
                                                bool need_A, bool need_B) {
  if (lora_native16(x2, A, B, p)) return lora_bwd_native16(dy2, x2, S, weight, A, B, scaling, need_x, need_A, need_B);
  const auto dt = x2.scalar_type();
  Tensor dyf = dy2.to(at::kFloat);
  Tensor dS = at::mm(dyf, B.to(at::kFloat)).mul_(scaling);
  Tensor mask;
  if (p > 0.0 && (need_A || need_x)) mask = dropout_mask_cpu(x2.size(0), x2.size(1), p, seed_value(seed, p, rank), dt);
  Tensor dx, dA, dB;
  if (need_B) dB = at::mm(dyf.t(), S);
  if (need_A) {
    Tensor xd = mask.defined() ? (x2.to(at::kFloat) * mask).to(dt) : x2;
    dA = at::mm(dS.t(), xd.to(at::kFloat));
  }
  if (need_x) {
    Tensor z2 = at::mm(dS, A.to(at::kFloat)).to(dt).to(at::kFloat);  // rounded to x.dtype, as the CUDA path
    if (mask.defined()) z2 = z2.mul_(mask).to(dt).to(at::kFloat);
    dx = z2.addmm_(dy2.to(dt).to(at::kFloat), weight.to(dt).to(at::kFloat)).to(dt);
  }
  return {dx.defined() ? dx : at::empty({0}, x2.options()), dA.defined() ? dA : at::empty({0}, S.options()),
          dB.defined() ? dB : at::empty({0}, S.options())};
}

// Mixed-adapter LoRA (lora_mixed_delta_): the CPU kernel, one fp32 pass per adapter present in the batch.
void lora_mixed_delta_cpu(const Tensor& y, const Tensor& x, const Tensor& adapter_of_segment, int64_t tokens,
                          int64_t handle) {
  const MixedAdaptersPtr adapters = mixed_adapters_get(handle);
  const std::vector<Tensor>&lora_A = adapters->lora_A, &lora_B = adapters->lora_B;
  const std::vector<double>& scales = adapters->scales;
  check_mixed_args(y, x, adapter_of_segment, tokens, lora_A, lora_B, scales);
  const int64_t M = x.size(0);
  if (M == 0 || lora_A.empty()) return;
  const Tensor seg = adapter_of_segment.to(at::kLong).contiguous();
  const int64_t* a_of = seg.data_ptr<int64_t>();
  const int64_t n = static_cast<int64_t>(lora_A.size());
  std::vector<std::vector<int64_t>> rows(n);
  for (int64_t b = 0; b < seg.numel(); ++b) {
    TORCH_CHECK(a_of[b] < n, "fastpeft lora_mixed_delta_: adapter_of_segment[", b, "] = ", a_of[b], " but only ", n,
                " adapters were given");
    if (a_of[b] < 0) continue;
    for (int64_t t = 0; t < tokens; ++t) rows[a_of[b]].push_back(b * tokens + t);
  }
  for (int64_t a = 0; a < n; ++a) {
    if (rows[a].empty()) continue;
    const Tensor index = at::tensor(rows[a], at::kLong);
    const Tensor shrunk = at::mm(x.index_select(0, index).to(at::kFloat), lora_A[a].to(at::kFloat).t());
    const Tensor delta = at::mm(shrunk, lora_B[a].to(at::kFloat).t()).mul_(scales[a]);
    y.index_copy_(0, index, y.index_select(0, index).to(at::kFloat).add_(delta).to(y.scalar_type()));
  }
}

Tensor scale_cols_cpu(const Tensor& a, const Tensor& l) {
  const auto dt = a.scalar_type();
  return (a.to(at::kFloat) * l.reshape({1, -1}).to(dt).to(at::kFloat)).to(dt);
}

std::tuple<Tensor, Tensor> ia3_fwd_cpu(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                       const Tensor& l, bool feedforward) {
  const auto dt = x2.scalar_type();
  Tensor w = weight.to(dt);
  const bool has_bias = bias.has_value() && bias->defined();
  if (feedforward) {
    Tensor xl = scale_cols_cpu(x2, l);
    Tensor y = has_bias ? at::addmm(bias->to(dt), xl, w.t()) : at::mm(xl, w.t());
    return {y, at::empty({0}, x2.options())};
  }
  Tensor yb = has_bias ? at::addmm(bias->to(dt), x2, w.t()) : at::mm(x2, w.t());
  return {scale_cols_cpu(yb, l), yb};
}

std::tuple<Tensor, Tensor, Tensor> ia3_bwd_cpu(const Tensor& dy2, const Tensor& saved, const Tensor& weight,
                                               const Tensor& l, bool feedforward, bool need_x, bool need_b) {
  const auto dt = feedforward ? saved.scalar_type() : dy2.scalar_type();
  Tensor dy = dy2.to(dt);
  Tensor w = weight.to(dt);
  Tensor lf = l.reshape({-1}).to(dt).to(at::kFloat);
  Tensor dx, db, dl;
  if (feedforward) {
    Tensor g = at::mm(dy, w);  // dY·W in x's dtype
    dl = (g.to(at::kFloat) * saved.to(at::kFloat)).sum(0);
    if (need_x) dx = (g.to(at::kFloat) * lf).to(dt);
    if (need_b) db = dy.to(at::kFloat).sum(0);
  } else {
    dl = (dy.to(at::kFloat) * saved.to(at::kFloat)).sum(0);
    if (need_x) dx = at::mm((dy.to(at::kFloat) * lf).to(dt), w);
    if (need_b) db = dy.to(at::kFloat).sum(0) * lf;
  }
  return {dx.defined() ? dx : at::empty({0}, dy.options()),
          db.defined() ? db : at::empty({0}, dy.options().dtype(at::kFloat)), dl};
}

void check_dora_args(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                     const Tensor& B, const Tensor& magnitude) {
  check_lora_args(x2, weight, bias, A, B);
  TORCH_CHECK(magnitude.numel() == weight.size(0), "fastpeft dora: magnitude must have out_features (",
              weight.size(0), ") elements, got ", magnitude.sizes());
}

// n = ‖W + s·B·A‖ per row from the small products (the CUDA formula), fp32 [N]
Tensor dora_norm_cpu(const Tensor& w32, const Tensor& A32, const Tensor& B32, double s,
                     const c10::optional<Tensor>& w_sq) {
  Tensor wsq = (w_sq.has_value() && w_sq->defined()) ? w_sq->reshape({-1}).to(at::kFloat) : w32.square().sum(1);
  TORCH_CHECK(wsq.numel() == w32.size(0), "fastpeft dora: weight_sq_norm must have out_features elements");
  Tensor T = at::addmm(at::mm(w32, A32.t()), B32, at::mm(A32, A32.t()), 2.0 * s, s * s);
  return (wsq + (B32 * T).sum(1)).clamp_min_(0.0).sqrt_();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dora_fwd_cpu(
    const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
    const Tensor& magnitude, double scaling, const c10::optional<Tensor>& w_sq,
    const c10::optional<Tensor>& weight_norm) {
  check_dora_args(x2, weight, bias, A, B, magnitude);
  const auto dt = x2.scalar_type();
  const Tensor A32 = A.to(at::kFloat), B32 = B.to(at::kFloat);
  const Tensor w = weight.to(dt);
  Tensor S = at::mm(x2.to(at::kFloat), A32.t()).mul_(scaling);
  Tensor Z0 = at::mm(x2, w.t());  // the base product in x.dtype (PEFT's base output), saved
  const Tensor n = (weight_norm.has_value() && weight_norm->defined())
                       ? weight_norm->reshape({-1}).to(at::kFloat)
                       : dora_norm_cpu(w.to(at::kFloat), A32, B32, scaling, w_sq);
  TORCH_CHECK(n.numel() == weight.size(0), "fastpeft dora: weight_norm must have out_features elements");
  Tensor g = magnitude.reshape({-1}).to(at::kFloat) / n;
  Tensor yf = at::addmm(Z0.to(at::kFloat), S, B32.t()).mul_(g);  // g⊙(Z0 + S·Bᵀ) in fp32, rounded once
  if (bias.has_value() && bias->defined()) yf.add_(bias->to(dt).to(at::kFloat));
  return {yf.to(dt), S, Z0, g, n.reciprocal()};
}

Tensor dora_infer_cpu(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                      const Tensor& B, const Tensor& magnitude, double scaling, const Tensor& weight_norm) {
  return std::get<0>(dora_fwd_cpu(x2, weight, bias, A, B, magnitude, scaling, c10::nullopt, weight_norm));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_bwd_cpu(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                       const Tensor& Z0, const Tensor& g, const Tensor& inv_n,
                                                       const Tensor& weight, const Tensor& A, const Tensor& B,
                                                       double scaling, bool need_x, bool need_A, bool need_B,
                                                       bool need_m) {
  const auto dt = x2.scalar_type();
  auto f32 = S.options().dtype(at::kFloat);
  const Tensor dyf = dy2.to(dt).to(at::kFloat);
  const Tensor g_col = g.to(at::kFloat).view({-1, 1});
  Tensor dx, dA, dB, dm;
  if (need_m) dm = (dyf * at::addmm(Z0.to(at::kFloat), S, B.to(at::kFloat).t())).sum(0).mul_(inv_n.to(at::kFloat));
  const Tensor dS = at::mm(dyf, B.to(at::kFloat) * g_col).mul_(scaling);  // s·dY·(g⊙B)
  if (need_B) dB = at::mm(dyf.t(), S).mul_(g_col);
  if (need_A) dA = at::mm(dS.t(), x2.to(at::kFloat));
  if (need_x) {
    const Tensor dZ = (dyf * g.to(at::kFloat)).to(dt).to(at::kFloat);  // g⊙dY rounded to x.dtype, as the CUDA path
    Tensor z2 = at::mm(dS, A.to(at::kFloat)).to(dt).to(at::kFloat);
    dx = z2.addmm_(dZ, weight.to(dt).to(at::kFloat)).to(dt);
  }
  return {dx.defined() ? dx : at::empty({0}, x2.options()), dA.defined() ? dA : at::empty({0}, f32),
          dB.defined() ? dB : at::empty({0}, f32), dm.defined() ? dm : at::empty({0}, f32)};
}

// nf4_dequantize: the reference's formulas (fastpeft/ops/nf4_format.py: nf4_dequantize_reference) in ATen, fp32
// products rounded once to the output dtype.
Tensor nf4_dequantize_cpu(const Tensor& packed, const Tensor& absmax, const Tensor& code, const Tensor& code2,
                          const Tensor& absmax2, double offset, int64_t blocksize, int64_t blocksize2, bool nested,
                          int64_t N, at::ScalarType state_dtype, int64_t K, at::ScalarType dtype) {
  check_nf4_args(packed, absmax, code, code2, absmax2, blocksize, blocksize2, nested, N, state_dtype, K, dtype);
  const int64_t n = N * K, blocks = (n + blocksize - 1) / blocksize;
  const Tensor flat = packed.reshape({-1});
  const Tensor bytes = (flat.scalar_type() == at::kByte ? flat : flat.view(at::kByte)).slice(0, 0, (n + 1) / 2)
                           .to(at::kLong);
  const Tensor q = at::stack({bytes.bitwise_right_shift(4), bytes.bitwise_and(15)}, 1).reshape({-1}).slice(0, 0, n);
  Tensor am = absmax.reshape({-1}).slice(0, 0, blocks);
  if (nested) {  // code2[qa] · absmax2 rounded to fp32, then + offset: bnb's two roundings
    const Tensor a2 = absmax2.reshape({-1}).repeat_interleave(blocksize2).slice(0, 0, blocks);
    am = code2.index_select(0, am.to(at::kLong)).mul(a2).add_(offset);
  }
  Tensor w = code.index_select(0, q).mul_(am.repeat_interleave(blocksize).slice(0, 0, n)).view({N, K});
  const bool direct = state_dtype == dtype || state_dtype == at::kFloat;
  return direct ? w.to(dtype) : w.to(state_dtype).to(dtype);
}

// ------------------------------------------------------------------------------------------------ Meta
// S, dA and dB are fp32, except with 16-bit adapters of x's dtype and no dropout (lora_native16): x's dtype
std::tuple<Tensor, Tensor> lora_fwd_meta(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>&,
                                         const Tensor& A, const Tensor& B, double, double p,
                                         const c10::optional<Tensor>&, int64_t) {
  const auto sdt = lora_native16(x2, A, B, p) ? x2.scalar_type() : at::kFloat;
  return {at::empty({x2.size(0), weight.size(0)}, x2.options()),
          at::empty({x2.size(0), A.size(0)}, x2.options().dtype(sdt))};
}

std::tuple<Tensor, Tensor, Tensor> lora_bwd_meta(const Tensor&, const Tensor& x2, const Tensor& S, const Tensor& weight,
                                                 const Tensor& A, const Tensor& B, double, double p,
                                                 const c10::optional<Tensor>&, int64_t, bool need_x, bool need_A,
                                                 bool need_B) {
  auto gdt = S.options().dtype(lora_native16(x2, A, B, p) ? x2.scalar_type() : at::kFloat);
  return {need_x ? at::empty_like(x2, at::MemoryFormat::Contiguous) : at::empty({0}, x2.options()),
          need_A ? at::empty({A.size(0), x2.size(1)}, gdt) : at::empty({0}, gdt),
          need_B ? at::empty({weight.size(0), A.size(0)}, gdt) : at::empty({0}, gdt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dora_fwd_meta(
    const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>&, const Tensor& A, const Tensor&,
    const Tensor&, double, const c10::optional<Tensor>&, const c10::optional<Tensor>&) {
  auto f32 = x2.options().dtype(at::kFloat);
  const int64_t M = x2.size(0), N = weight.size(0);
  return {at::empty({M, N}, x2.options()), at::empty({M, A.size(0)}, f32), at::empty({M, N}, x2.options()),
          at::empty({N}, f32), at::empty({N}, f32)};
}

Tensor dora_infer_meta(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>&, const Tensor&,
                       const Tensor&, const Tensor&, double, const Tensor&) {
  return at::empty({x2.size(0), weight.size(0)}, x2.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_bwd_meta(const Tensor&, const Tensor& x2, const Tensor& S,
                                                        const Tensor&, const Tensor&, const Tensor&,
                                                        const Tensor& weight, const Tensor& A, const Tensor&, double,
                                                        bool need_x, bool need_A, bool need_B, bool need_m) {
  auto f32 = S.options().dtype(at::kFloat);
  return {need_x ? at::empty_like(x2, at::MemoryFormat::Contiguous) : at::empty({0}, x2.options()),
          need_A ? at::empty({A.size(0), x2.size(1)}, f32) : at::empty({0}, f32),
          need_B ? at::empty({weight.size(0), A.size(0)}, f32) : at::empty({0}, f32),
          need_m ? at::empty({weight.size(0)}, f32) : at::empty({0}, f32)};
}

Tensor nf4_dequantize_meta(const Tensor& packed, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                           int64_t, int64_t, bool, int64_t N, at::ScalarType, int64_t K, at::ScalarType dtype) {
  return at::empty({N, K}, packed.options().dtype(dtype));
}

// In place and without an output: the Meta kernel checks what symbolic shapes allow (ranks and list lengths).
void lora_mixed_delta_meta(const Tensor& y, const Tensor& x, const Tensor& adapter_of_segment, int64_t, int64_t) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && adapter_of_segment.dim() == 1,
              "fastpeft lora_mixed_delta_: x and y must be 2-D and adapter_of_segment 1-D");
}

#ifdef WITH_CUDA
void lora_mixed_delta_cuda_entry(const Tensor& y, const Tensor& x, const Tensor& adapter_of_segment, int64_t tokens,
                                 int64_t handle) {
  const MixedAdaptersPtr adapters = mixed_adapters_get(handle);
  lora_mixed_delta_cuda(y, x, adapter_of_segment, tokens, adapters->lora_A, adapters->lora_B, adapters->scales);
}
#endif

// A mixed batch's whole layer in one dispatcher entry: y = x·Wᵀ + b (at::linear), then lora_mixed_delta_ on it.
// Decode calls it per layer and token and is host-bound: one call from Python instead of two (F.linear, then the
// delta), with the views made here. Inference only (lora_mixed_delta_ has no autograd formula; the layers call it
// under no_grad). Registered CompositeExplicitAutograd: every backend without its own kernel (CPU, Meta, fake
// tensors under tracing) runs this composition of two ops whose Meta kernels and schema tracing knows. CUDA has
// its own kernel, lora_mixed_linear_cuda below.
Tensor lora_mixed_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const Tensor& adapter_of_segment, int64_t tokens, int64_t adapters) {
  TORCH_CHECK(x.dim() >= 2, "fastpeft lora_mixed_linear: x must be [batch, ..., in_features], got ", x.sizes());
  Tensor y = at::linear(x, weight, bias);
  static auto delta = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastpeft_ops::lora_mixed_delta_", "")
                          .typed<void(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t)>();
  delta.call(y.view({-1, y.size(-1)}), x.reshape({-1, x.size(-1)}), adapter_of_segment, tokens, adapters);
  return y;
}

// Meta (fake tensors, torch.compile): y's shape, x [..., K] -> [..., N], and the argument checks shapes allow.
Tensor lora_mixed_linear_meta(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>&, const Tensor&,
                              int64_t, int64_t) {
  TORCH_CHECK(x.dim() >= 2, "fastpeft lora_mixed_linear: x must be [batch, ..., in_features], got ", x.sizes());
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return at::empty(shape, x.options());
}

#ifdef WITH_CUDA
// On CUDA a decode-sized call (<= 8 rows of 16-bit x, fp32 adapters of rank <= 32; adapter_cuda.cu,
// lora_mixed_decode_cuda) runs as the one-adapter decode forward does: the shrink, then a GEMV of the base weight
// with every row's expand in its epilogue -- two launches, no ATen linear. Anything else: the composition above.
Tensor lora_mixed_linear_cuda(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const Tensor& adapter_of_segment, int64_t tokens, int64_t handle) {
  TORCH_CHECK(x.dim() >= 2, "fastpeft lora_mixed_linear: x must be [batch, ..., in_features], got ", x.sizes());
  const MixedAdaptersPtr adapters = mixed_adapters_get(handle);
  Tensor y = lora_mixed_decode_cuda(x, weight, bias, adapter_of_segment, tokens, adapters->lora_A, adapters->lora_B,
                                    adapters->scales);
  return y.defined() ? y : lora_mixed_linear(x, weight, bias, adapter_of_segment, tokens, handle);
}
#endif

std::tuple<Tensor, Tensor> ia3_fwd_meta(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>&,
                                        const Tensor&, bool feedforward) {
  auto y = at::empty({x2.size(0), weight.size(0)}, x2.options());
  return {y, feedforward ? at::empty({0}, x2.options()) : at::empty({x2.size(0), weight.size(0)}, x2.options())};
}

std::tuple<Tensor, Tensor, Tensor> ia3_bwd_meta(const Tensor& dy2, const Tensor& saved, const Tensor& weight,
                                                const Tensor& l, bool feedforward, bool need_x, bool need_b) {
  const auto dt = feedforward ? saved.scalar_type() : dy2.scalar_type();
  auto f32 = dy2.options().dtype(at::kFloat);
  return {need_x ? at::empty({dy2.size(0), weight.size(1)}, dy2.options().dtype(dt)) : at::empty({0}, dy2.options()),
          need_b ? at::empty({dy2.size(1)}, f32) : at::empty({0}, f32), at::empty({l.numel()}, f32)};
}

// ------------------------------------------------------------------------------------------------ autograd
std::tuple<Tensor, Tensor> call_lora_fwd(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                         const Tensor& A, const Tensor& B, double s, double p,
                                         const c10::optional<Tensor>& seed, int64_t rank) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::lora_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                                         const Tensor&, const Tensor&, double, double,
                                                         const c10::optional<Tensor>&, int64_t)>();
  return op.call(x2, weight, bias, A, B, s, p, seed, rank);
}

std::tuple<Tensor, Tensor, Tensor> call_lora_bwd(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                 const Tensor& weight, const Tensor& A, const Tensor& B, double s,
                                                 double p, const c10::optional<Tensor>& seed, int64_t rank,
                                                 bool need_x, bool need_A, bool need_B) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::lora_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           double, double, const c10::optional<Tensor>&, int64_t, bool, bool, bool)>();
  return op.call(dy2, x2, S, weight, A, B, s, p, seed, rank, need_x, need_A, need_B);
}

std::tuple<Tensor, Tensor> call_ia3_fwd(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                        const Tensor& l, bool feedforward) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::ia3_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                                         const Tensor&, bool)>();
  return op.call(x2, weight, bias, l, feedforward);
}

std::tuple<Tensor, Tensor, Tensor> call_ia3_bwd(const Tensor& dy2, const Tensor& saved, const Tensor& weight,
                                                const Tensor& l, bool feedforward, bool need_x, bool need_b) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::ia3_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, bool, bool, bool)>();
  return op.call(dy2, saved, weight, l, feedforward, need_x, need_b);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> call_dora_fwd(
    const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
    const Tensor& magnitude, double s, const c10::optional<Tensor>& w_sq, const c10::optional<Tensor>& weight_norm) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::dora_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&,
                           const Tensor&, double, const c10::optional<Tensor>&, const c10::optional<Tensor>&)>();
  return op.call(x2, weight, bias, A, B, magnitude, s, w_sq, weight_norm);
}

Tensor call_dora_infer(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                       const Tensor& B, const Tensor& magnitude, double s, const Tensor& weight_norm) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::dora_infer", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&,
                                     const Tensor&, const Tensor&, double, const Tensor&)>();
  return op.call(x2, weight, bias, A, B, magnitude, s, weight_norm);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_dora_bwd(const Tensor& dy2, const Tensor& x2, const Tensor& S,
                                                        const Tensor& Z, const Tensor& g, const Tensor& inv_n,
                                                        const Tensor& weight, const Tensor& A, const Tensor& B,
                                                        double s, bool need_x, bool need_A, bool need_B,
                                                        bool need_m) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::dora_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, double, bool, bool, bool, bool)>();
  return op.call(dy2, x2, S, Z, g, inv_n, weight, A, B, s, need_x, need_A, need_B, need_m);
}

c10::optional<Tensor> opt(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// What the LoRA / DoRA Functions' backwards share (dense and 4-bit bases): the adapter's gradients from dY for the
// inputs that need one. `weight_of()` gives W for the backward op (the dense weight, or a 4-bit one dequantized for
// dX); it is called only when some gradient besides db is wanted.
struct AdapterGrads {
  Tensor dx, db, dA, dB, dm;
};

// dL/db = Σ_rows dY accumulated in fp32, written in the bias's dtype: ATen's sum accumulates 16-bit inputs in fp32
// and rounds once on output, so asking for the bias's dtype directly is the fp32 sum cast, in one launch not two
Tensor bias_grad_as(const Tensor& dy2, at::ScalarType bdt) {
  if (bdt == dy2.scalar_type() || bdt == at::kFloat) return dy2.sum(0, /*keepdim=*/false, bdt);
  return dy2.sum(0, /*keepdim=*/false, at::kFloat).to(bdt);  // another 16-bit dtype: never round dY to it first
}

Tensor bias_grad(AutogradContext* ctx, const Tensor& dy2) {
  return bias_grad_as(dy2, static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
}

template <typename WeightOf>
AdapterGrads lora_grads(AutogradContext* ctx, const Tensor& dy2, const Tensor& x, const Tensor& S, WeightOf weight_of,
                        const Tensor& A, const Tensor& B, const Tensor& seed, bool need_x, bool need_b, bool need_A,
                        bool need_B) {
  AdapterGrads out;
  if (need_x || need_A || need_B) {
    auto r = call_lora_bwd(dy2, as_2d(x), S, weight_of(), A, B, ctx->saved_data["scaling"].toDouble(),
                           ctx->saved_data["p"].toDouble(), opt(seed), ctx->saved_data["rank"].toInt(), need_x, need_A,
                           need_B);
    if (need_x) out.dx = std::get<0>(r).view(x.sizes());
    if (need_A) out.dA = std::get<1>(r).to(A.scalar_type());
    if (need_B) out.dB = std::get<2>(r).to(B.scalar_type());
  }
  if (need_b) out.db = bias_grad(ctx, dy2);
  return out;
}

template <typename WeightOf>
AdapterGrads dora_grads(AutogradContext* ctx, const Tensor& dy2, const Tensor& x, const Tensor& S, const Tensor& Z0,
                        const Tensor& g, const Tensor& inv_n, WeightOf weight_of, const Tensor& A, const Tensor& B,
                        bool need_x, bool need_b, bool need_A, bool need_B, bool need_m) {
  AdapterGrads out;
  if (need_x || need_A || need_B || need_m) {
    auto r = call_dora_bwd(dy2, as_2d(x), S, Z0, g, inv_n, weight_of(), A, B, ctx->saved_data["scaling"].toDouble(),
                           need_x, need_A, need_B, need_m);
    if (need_x) out.dx = std::get<0>(r).view(x.sizes());
    if (need_A) out.dA = std::get<1>(r).to(A.scalar_type());
    if (need_B) out.dB = std::get<2>(r).to(B.scalar_type());
    if (need_m)
      out.dm = std::get<3>(r)
                   .reshape(ctx->saved_data["m_sizes"].toIntVector())
                   .to(static_cast<at::ScalarType>(ctx->saved_data["m_dtype"].toInt()));
  }
  if (need_b) out.db = bias_grad(ctx, dy2);
  return out;
}

// A frozen base weight rides in saved_data, not save_for_backward: the layer holds it anyway, and under non-reentrant
// gradient checkpointing each save_for_backward tensor passes through Python pack / unpack hooks per layer call (see
// save_nf4). A weight that requires grad stays a saved variable (autograd's in-place check guards what dW reads).
void save_with_weight(AutogradContext* ctx, std::vector<Tensor> saved, const Tensor& weight) {
  if (weight.requires_grad()) {
    saved.push_back(weight);
  } else {
    ctx->saved_data["frozen_weight"] = weight;
  }
  ctx->save_for_backward(saved);
}

Tensor load_weight(AutogradContext* ctx, const variable_list& saved) {
  auto it = ctx->saved_data.find("frozen_weight");
  return it != ctx->saved_data.end() ? it->second.toTensor() : saved.back();
}

// Chain rule (s = scaling, D = dropout mask, S = s·(D⊙X)·Aᵀ saved by the forward):
//   dL/dX = dY·W + D⊙(s·dY·B·A)    dL/dA = (s·dY·B)ᵀ·(D⊙X)    dL/dB = dYᵀ·S    dL/db = Σ_rows dY    dL/dW = dYᵀ·X
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  // Optional tensors stay c10::optional here: autograd then treats an absent bias / seed as "not an input"
  // (a plain undefined Tensor argument would count as one).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, double scaling, double p, const c10::optional<Tensor>& seed,
                        int64_t rank) {
    Tensor x2 = as_2d(x);
    auto [y2, S] = call_lora_fwd(x2, weight, bias, A, B, scaling, p, seed, rank);
    save_with_weight(ctx, {x, S, A, B, seed.value_or(Tensor())}, weight);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["rank"] = rank;
    save_bias_info(ctx, bias);
    return y2.view(with_last_dim(x, weight.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &S = saved[1], &A = saved[2], &B = saved[3], &seed = saved[4];
    const Tensor weight = load_weight(ctx, saved);
    // needs_input_grad counts the tensor inputs actually given: without a bias, lora_A is input 2
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t a_idx = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2), need_A = ctx->needs_input_grad(a_idx),
               need_B = ctx->needs_input_grad(a_idx + 1);
    Tensor dy2 = as_2d(grads[0]).to(x.scalar_type());
    AdapterGrads r = lora_grads(ctx, dy2, x, S, [&] { return weight; }, A, B, seed, need_x, need_b, need_A, need_B);
    Tensor dw;
    if (need_w) dw = at::mm(dy2.t(), as_2d(x)).to(weight.scalar_type());
    return {r.dx, dw, r.db, r.dA, r.dB, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Chain rule (p = 0; s = scaling, n detached, g = m/n, Z = Z0 + S·Bᵀ with Z0 = X·Wᵀ saved, Y = g⊙Z + b):
//   dL/dm = (Σ_rows dY⊙Z)/n   dL/dZ = g⊙dY   dL/dB = g⊙(dYᵀ·S)   dL/dA = (s·dY·(g⊙B))ᵀ·X
//   dL/dX = s·dY·(g⊙B)·A + (g⊙dY)·W   dL/db = Σ_rows dY   (the base weight is frozen: no dL/dW)
class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, const Tensor& magnitude, double scaling,
                        const c10::optional<Tensor>& w_sq, const c10::optional<Tensor>& weight_norm) {
    Tensor x2 = as_2d(x);
    auto [y2, S, Z0, g, inv_n] = call_dora_fwd(x2, weight, bias, A, B, magnitude, scaling, w_sq, weight_norm);
    // g and 1/n ([out] fp32, derived from the frozen W and the adapter) in saved_data, with the frozen W: two
    // vectors kept through a checkpointed forward instead of two more passes through its hooks (see save_nf4)
    save_with_weight(ctx, {x, S, Z0, A, B}, weight);
    ctx->saved_data["g"] = g;
    ctx->saved_data["inv_n"] = inv_n;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["m_dtype"] = static_cast<int64_t>(magnitude.scalar_type());
    ctx->saved_data["m_sizes"] = magnitude.sizes().vec();
    save_bias_info(ctx, bias);
    return y2.view(with_last_dim(x, weight.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &S = saved[1], &Z0 = saved[2], &A = saved[3], &B = saved[4];
    const Tensor weight = load_weight(ctx, saved), g = ctx->saved_data["g"].toTensor(),
                 inv_n = ctx->saved_data["inv_n"].toTensor();
    // needs_input_grad counts the tensor inputs actually given (see LoraLinearFunction::backward)
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t a_idx = has_bias ? 3 : 2;
    TORCH_CHECK(!ctx->needs_input_grad(1), "fastpeft dora_linear: the base weight must be frozen (requires_grad=False)");
    const bool need_x = ctx->needs_input_grad(0), need_b = has_bias && ctx->needs_input_grad(2),
               need_A = ctx->needs_input_grad(a_idx), need_B = ctx->needs_input_grad(a_idx + 1),
               need_m = ctx->needs_input_grad(a_idx + 2);
    AdapterGrads r = dora_grads(ctx, as_2d(grads[0]).to(x.scalar_type()), x, S, Z0, g, inv_n, [&] { return weight; },
                                A, B, need_x, need_b, need_A, need_B, need_m);
    return {r.dx, Tensor(), r.db, r.dA, r.dB, r.dm, Tensor(), Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------------------------------------ grouped LoRA
std::tuple<std::vector<Tensor>, Tensor> lora_group_fwd_meta(const Tensor& x2, at::TensorList weights, at::TensorList,
                                                            at::TensorList As, at::TensorList Bs, double) {
  std::vector<Tensor> ys;
  int64_t R = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    ys.push_back(at::empty({x2.size(0), weights[i].size(0)}, x2.options()));
    R += As[i].size(0);
  }
  return {ys, at::empty({x2.size(0), R}, x2.options().dtype(group_s_dtype(x2, As, Bs)))};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_group_bwd_meta(
    at::TensorList, const Tensor& x2, const Tensor&, at::TensorList, at::TensorList As, at::TensorList Bs, double,
    bool need_x, bool need_A, bool need_B) {
  std::vector<Tensor> dAs, dBs;
  for (size_t i = 0; i < As.size(); ++i) {  // each member's gradients as its own lora_bwd gives them
    auto gdt = x2.options().dtype(lora_native16(x2, As[i], Bs[i], 0.0) ? x2.scalar_type() : at::kFloat);
    dAs.push_back(need_A ? at::empty(As[i].sizes(), gdt) : at::empty({0}, gdt));
    dBs.push_back(need_B ? at::empty(Bs[i].sizes(), gdt) : at::empty({0}, gdt));
  }
  return {need_x ? at::empty(x2.sizes(), x2.options()) : at::empty({0}, x2.options()), dAs, dBs};
}

std::tuple<std::vector<Tensor>, Tensor> call_lora_group_fwd(const Tensor& x2, at::TensorList weights,
                                                            at::TensorList biases, at::TensorList As,
                                                            at::TensorList Bs, double s) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::lora_group_fwd", "")
                       .typed<std::tuple<std::vector<Tensor>, Tensor>(const Tensor&, at::TensorList, at::TensorList,
                                                                      at::TensorList, at::TensorList, double)>();
  return op.call(x2, weights, biases, As, Bs, s);
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> call_lora_group_bwd(
    at::TensorList dys, const Tensor& x2, const Tensor& S, at::TensorList weights, at::TensorList As,
    at::TensorList Bs, double s, bool need_x, bool need_A, bool need_B) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::lora_group_bwd", "")
                       .typed<std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(
                           at::TensorList, const Tensor&, const Tensor&, at::TensorList, at::TensorList,
                           at::TensorList, double, bool, bool, bool)>();
  return op.call(dys, x2, S, weights, As, Bs, s, need_x, need_A, need_B);
}

void check_group(const Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList As,
                 at::TensorList Bs) {
  const size_t G = weights.size();
  TORCH_CHECK(G >= 1 && As.size() == G && Bs.size() == G && (biases.empty() || biases.size() == G),
              "fastpeft lora_group_linear: weight, lora_A and lora_B need one entry per member, bias none or one per "
              "member; got ", G, " weights, ", As.size(), " lora_A, ", Bs.size(), " lora_B, ", biases.size(),
              " biases");
  for (size_t i = 0; i < G; ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == x.size(-1),
                "fastpeft lora_group_linear: member ", i, "'s weight ", weights[i].sizes(), " does not take x ",
                x.sizes());
    TORCH_CHECK(biases.empty() || biases[i].numel() == weights[i].size(0), "fastpeft lora_group_linear: member ",
                i, "'s bias has ", biases[i].numel(), " elements for ", weights[i].size(0), " outputs");
  }
}

// What the grouped LoRA forwards of dense and 4-bit bases save alike (their bases are saved by each): x, S and the
// adapters through save_for_backward, the member count, scaling and the biases' dtypes (read by lora_group_backward).
void save_lora_group(AutogradContext* ctx, const Tensor& x, const Tensor& S, at::TensorList biases, at::TensorList As,
                     at::TensorList Bs, double scaling) {
  variable_list saved{x, S};
  for (const auto& list : {As, Bs})
    for (const Tensor& t : list) saved.push_back(t);
  ctx->save_for_backward(saved);
  ctx->saved_data["G"] = static_cast<int64_t>(As.size());
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["has_bias"] = !biases.empty();
  std::vector<int64_t> bias_dtypes;
  for (const Tensor& b : biases) bias_dtypes.push_back(static_cast<int64_t>(b.scalar_type()));
  ctx->saved_data["bias_dtypes"] = bias_dtypes;
}

// The grouped LoRA backward of dense and 4-bit bases (LoraGroupFunction, Nf4LoraGroupFunction). Autograd's tensor
// inputs are x, the dense weights (dense bases only), the biases, lora_A[], lora_B[]: `first_bias` is the first bias's
// index among them, and each gradient goes to output slot index + `shift` (a 4-bit group's weights are one
// non-tensor argument: a slot, no index). `weights_of(x, need_x)` gives the bases for the backward op (x: the saved
// input, which must be unpacked once only), called only when some gradient besides the biases' is wanted; `Ns` the
// members' output sizes.
template <typename WeightsOf>
variable_list lora_group_backward(AutogradContext* ctx, const variable_list& grads, const std::vector<int64_t>& Ns,
                                  int64_t first_bias, int64_t shift, WeightsOf weights_of) {
  auto saved = ctx->get_saved_variables();
  const int64_t G = ctx->saved_data["G"].toInt();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const Tensor &x = saved[0], &S = saved[1];
  const std::vector<Tensor> As(saved.begin() + 2, saved.begin() + 2 + G),
      Bs(saved.begin() + 2 + G, saved.begin() + 2 + 2 * G);
  const int64_t nb = has_bias ? G : 0, a0 = first_bias + nb, b0 = a0 + G;
  bool need_A = false, need_B = false;
  for (int64_t i = 0; i < G; ++i) {
    need_A = need_A || ctx->needs_input_grad(a0 + i);
    need_B = need_B || ctx->needs_input_grad(b0 + i);
  }
  const bool need_x = ctx->needs_input_grad(0);
  const Tensor x2 = as_2d(x);
  std::vector<Tensor> dys;
  for (int64_t i = 0; i < G; ++i)  // a member whose output went unused contributes nothing
    dys.push_back(grads[i].defined() ? as_2d(grads[i]).to(x.scalar_type())
                                     : at::zeros({x2.size(0), Ns[i]}, x2.options()));
  variable_list out(b0 + G + shift + 1);  // one slot per forward argument, scaling last
  if (need_x || need_A || need_B) {
    auto [dx, dAs, dBs] = call_lora_group_bwd(dys, x2, S, weights_of(x, need_x), As, Bs,
                                              ctx->saved_data["scaling"].toDouble(), need_x, need_A, need_B);
    if (need_x) out[0] = dx.view(x.sizes());
    for (int64_t i = 0; i < G; ++i) {
      if (ctx->needs_input_grad(a0 + i)) out[a0 + shift + i] = dAs[i].to(As[i].scalar_type());
      if (ctx->needs_input_grad(b0 + i)) out[b0 + shift + i] = dBs[i].to(Bs[i].scalar_type());
    }
  }
  const auto bias_dtypes = ctx->saved_data["bias_dtypes"].toIntVector();
  for (int64_t i = 0; i < nb; ++i)
    if (ctx->needs_input_grad(first_bias + i))
      out[first_bias + shift + i] = bias_grad_as(dys[i], static_cast<at::ScalarType>(bias_dtypes[i]));
  return out;
}

// Chain rule, member i (s = scaling; S_i = s·X·A_iᵀ saved, side by side in S):
//   dL/dX = Σ_i (dY_i·W_i + s·dY_i·B_i·A_i)   dL/dA_i = (s·dY_i·B_i)ᵀ·X   dL/dB_i = dY_iᵀ·S_i   dL/db_i = Σ_rows dY_i
// The bases are frozen (the Python side groups only such layers; a base that needs a gradient is refused here).
class LoraGroupFunction : public torch::autograd::Function<LoraGroupFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::TensorList As, at::TensorList Bs, double scaling) {
    const Tensor x2 = as_2d(x);
    auto [ys, S] = call_lora_group_fwd(x2, weights, biases, As, Bs, scaling);
    save_lora_group(ctx, x, S, biases, As, Bs, scaling);
    ctx->saved_data["weights"] = weights.vec();  // frozen: in saved_data (see save_with_weight)
    const int64_t G = static_cast<int64_t>(weights.size());
    variable_list out;
    for (int64_t i = 0; i < G; ++i) out.push_back(ys[i].view(with_last_dim(x, weights[i].size(0))));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<Tensor> weights = ctx->saved_data["weights"].toTensorVector();
    const int64_t G = static_cast<int64_t>(weights.size());
    std::vector<int64_t> Ns;
    for (int64_t i = 0; i < G; ++i) {
      TORCH_CHECK(!ctx->needs_input_grad(1 + i),
                  "fastpeft lora_group_linear: the base weights must be frozen (requires_grad=False)");
      Ns.push_back(weights[i].size(0));
    }
    return lora_group_backward(ctx, grads, Ns, /*first_bias=*/1 + G, /*shift=*/0, [&](const Tensor&, bool) { return weights; });
  }
};

// ------------------------------------------------------------------------------------------------ 4-bit bases
// QLoRA / QDoRA: the base weight arrives as bnb's packed bytes and its QuantState's tensors and numbers (the
// Python side's KernelState). Each GEMM that reads W gets it from nf4_dequantize (forward; the backward again, for
// dX only); the dense composition (lora_fwd / lora_bwd / dora_fwd / dora_bwd) then runs on it, and nothing keeps
// the dense W beyond the call: the caching allocator hands the same block to the next layer. The numbers are
// those of the dense operators on dequant(W) in the compute dtype, i.e. bnb's Linear4bit base output plus the
// adapter, as the Triton QLoRA path's "buffer" GEMMs (ops/kernels/nf4_lora.py).
struct Nf4Weight {
  Tensor packed, absmax, code, code2, absmax2;
  double offset;
  int64_t blocksize, blocksize2;
  bool nested;
  int64_t N;
  at::ScalarType state_dtype;
};

Tensor call_nf4_dequantize(const Nf4Weight& w, int64_t K, at::ScalarType dt) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft_ops::nf4_dequantize", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                     int64_t, int64_t, bool, int64_t, at::ScalarType, int64_t, at::ScalarType)>();
  return op.call(w.packed, w.absmax, w.code, w.code2, w.absmax2, w.offset, w.blocksize, w.blocksize2, w.nested, w.N,
                 w.state_dtype, K, dt);
}

// The saved weight goes into saved_data whole, tensors and numbers: they are the frozen layer's own bytes and
// quantization state, alive with the layer anyway, so the saved-tensor machinery has nothing to do for them. Under
// non-reentrant gradient checkpointing every save_for_backward tensor passes through Python pack / unpack hooks
// (about 5-9 GC-tracked objects and some µs of host each, per layer call: QLoRA's operator passed 9 tensors through
// them, QDoRA's 12, LoRA's 5; session 27), and these five would be "recomputed" as the same tensors. What autograd
// no longer checks for them: an in-place change of the quantized weight between a forward and its backward.
void save_nf4(AutogradContext* ctx, const std::vector<Tensor>& saved, const Nf4Weight& w) {
  ctx->save_for_backward(saved);
  ctx->saved_data["nf4_packed"] = w.packed;
  ctx->saved_data["nf4_absmax"] = w.absmax;
  ctx->saved_data["nf4_code"] = w.code;
  ctx->saved_data["nf4_code2"] = w.code2;
  ctx->saved_data["nf4_absmax2"] = w.absmax2;
  ctx->saved_data["nf4_offset"] = w.offset;
  ctx->saved_data["nf4_blocksize"] = w.blocksize;
  ctx->saved_data["nf4_blocksize2"] = w.blocksize2;
  ctx->saved_data["nf4_nested"] = w.nested;
  ctx->saved_data["nf4_N"] = w.N;
  ctx->saved_data["nf4_state_dtype"] = static_cast<int64_t>(w.state_dtype);
}

Nf4Weight load_nf4(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["nf4_packed"].toTensor(), d["nf4_absmax"].toTensor(), d["nf4_code"].toTensor(),
          d["nf4_code2"].toTensor(), d["nf4_absmax2"].toTensor(), d["nf4_offset"].toDouble(),
          d["nf4_blocksize"].toInt(), d["nf4_blocksize2"].toInt(), d["nf4_nested"].toBool(), d["nf4_N"].toInt(),
          static_cast<at::ScalarType>(d["nf4_state_dtype"].toInt())};
}

// W for the backward: dequantized when dX is wanted; otherwise a stand-in of W's shape that no kernel reads (the
// dense backward reads W for dX only).
Tensor backward_weight(const Nf4Weight& w, const Tensor& x, bool need_x) {
  if (need_x) return call_nf4_dequantize(w, x.size(-1), x.scalar_type());
  return at::empty({1}, x.options()).expand({w.N, x.size(-1)});
}

// LoraLinearFunction's chain rule with W = dequant(packed) frozen (no dL/dW).
class Nf4LoraLinearFunction : public torch::autograd::Function<Nf4LoraLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Nf4Weight& w, const c10::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, double scaling, double p, const c10::optional<Tensor>& seed,
                        int64_t rank) {
    Tensor x2 = as_2d(x);
    auto [y2, S] = call_lora_fwd(x2, call_nf4_dequantize(w, x.size(-1), x.scalar_type()), bias, A, B, scaling, p,
                                 seed, rank);
    save_nf4(ctx, {x, S, A, B, seed.value_or(Tensor())}, w);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["rank"] = rank;
    save_bias_info(ctx, bias);
    return y2.view(with_last_dim(x, w.N));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &S = saved[1], &A = saved[2], &B = saved[3], &seed = saved[4];
    const Nf4Weight w = load_nf4(ctx);
    // needs_input_grad counts the tensor inputs given: x, then bias when present, then lora_A, lora_B (the 4-bit
    // weight travels in a struct: not an autograd input)
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t a_idx = has_bias ? 2 : 1;
    const bool need_x = ctx->needs_input_grad(0), need_b = has_bias && ctx->needs_input_grad(1),
               need_A = ctx->needs_input_grad(a_idx), need_B = ctx->needs_input_grad(a_idx + 1);
    AdapterGrads r = lora_grads(ctx, as_2d(grads[0]).to(x.scalar_type()), x, S,
                                [&] { return backward_weight(w, x, need_x); }, A, B, seed, need_x, need_b, need_A,
                                need_B);
    return {r.dx, Tensor(), r.db, r.dA, r.dB, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// DoraLinearFunction's chain rule with W = dequant(packed).
class Nf4DoraLinearFunction : public torch::autograd::Function<Nf4DoraLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Nf4Weight& w, const c10::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, const Tensor& magnitude, double scaling,
                        const c10::optional<Tensor>& w_sq, const c10::optional<Tensor>& weight_norm) {
    Tensor x2 = as_2d(x);
    auto [y2, S, Z0, g, inv_n] = call_dora_fwd(x2, call_nf4_dequantize(w, x.size(-1), x.scalar_type()), bias, A, B,
                                               magnitude, scaling, w_sq, weight_norm);
    save_nf4(ctx, {x, S, Z0, A, B}, w);
    ctx->saved_data["g"] = g;  // (see DoraLinearFunction::forward)
    ctx->saved_data["inv_n"] = inv_n;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["m_dtype"] = static_cast<int64_t>(magnitude.scalar_type());
    ctx->saved_data["m_sizes"] = magnitude.sizes().vec();
    save_bias_info(ctx, bias);
    return y2.view(with_last_dim(x, w.N));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &S = saved[1], &Z0 = saved[2], &A = saved[3], &B = saved[4];
    const Tensor g = ctx->saved_data["g"].toTensor(), inv_n = ctx->saved_data["inv_n"].toTensor();
    const Nf4Weight w = load_nf4(ctx);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();  // (see Nf4LoraLinearFunction::backward)
    const size_t a_idx = has_bias ? 2 : 1;
    const bool need_x = ctx->needs_input_grad(0), need_b = has_bias && ctx->needs_input_grad(1),
               need_A = ctx->needs_input_grad(a_idx), need_B = ctx->needs_input_grad(a_idx + 1),
               need_m = ctx->needs_input_grad(a_idx + 2);
    AdapterGrads r = dora_grads(ctx, as_2d(grads[0]).to(x.scalar_type()), x, S, Z0, g, inv_n,
                                [&] { return backward_weight(w, x, need_x); }, A, B, need_x, need_b, need_A, need_B,
                                need_m);
    return {r.dx, Tensor(), r.db, r.dA, r.dB, r.dm, Tensor(), Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------------------------------------ grouped QLoRA
// Sibling projections on 4-bit bases (q/k/v, gate/up of a QLoRA model) as one call: every member's W dequantized
// (nf4_dequantize, in x's dtype), then the grouped LoRA composition above on them (one shrink over x, one dA GEMM, a
// dX accumulated by cuBLAS); the backward dequantizes again, for dX only. The cost in memory: the members' dense
// weights are alive together for the group's GEMMs (gate + up at Llama-3.1-8B: 2 × 117 MB in bf16, where the
// members one by one hold one at a time); nothing is kept beyond the call.
std::vector<Nf4Weight> nf4_weights(at::TensorList packed, at::TensorList absmax, at::TensorList code,
                                   at::TensorList code2, at::TensorList absmax2, at::ArrayRef<double> offset,
                                   at::IntArrayRef blocksize, at::IntArrayRef blocksize2, const c10::List<bool>& nested,
                                   at::IntArrayRef N, at::ScalarType state_dtype) {
  const size_t G = packed.size();
  TORCH_CHECK(absmax.size() == G && code.size() == G && code2.size() == G && absmax2.size() == G &&
                  offset.size() == G && blocksize.size() == G && blocksize2.size() == G && nested.size() == G &&
                  N.size() == G,
              "fastpeft nf4_lora_group_linear: every 4-bit weight argument needs one entry per member (", G,
              " packed tensors)");
  std::vector<Nf4Weight> ws;
  for (size_t i = 0; i < G; ++i) {
    TORCH_CHECK(!packed[i].requires_grad(), "fastpeft nf4_lora_group_linear: a 4-bit base weight cannot require grad");
    ws.push_back({packed[i], absmax[i], code[i], code2[i], absmax2[i], offset[i], blocksize[i], blocksize2[i],
                  nested.get(i), N[i], state_dtype});
  }
  return ws;
}

std::vector<Tensor> dequantize_all(const std::vector<Nf4Weight>& ws, const Tensor& x) {
  std::vector<Tensor> dense;
  for (const Nf4Weight& w : ws) dense.push_back(call_nf4_dequantize(w, x.size(-1), x.scalar_type()));
  return dense;
}

// The group's 4-bit weights in saved_data (see save_nf4: frozen bytes and state, no pass through the saved-tensor
// hooks), as lists.
void save_nf4_group(AutogradContext* ctx, const std::vector<Nf4Weight>& ws) {
  std::vector<Tensor> packed, absmax, code, code2, absmax2;
  std::vector<double> offset;
  std::vector<int64_t> blocksize, blocksize2, nested, N;
  for (const Nf4Weight& w : ws) {
    packed.push_back(w.packed);
    absmax.push_back(w.absmax);
    code.push_back(w.code);
    code2.push_back(w.code2);
    absmax2.push_back(w.absmax2);
    offset.push_back(w.offset);
    blocksize.push_back(w.blocksize);
    blocksize2.push_back(w.blocksize2);
    nested.push_back(w.nested ? 1 : 0);
    N.push_back(w.N);
  }
  auto& d = ctx->saved_data;
  d["nf4_packed"] = packed;
  d["nf4_absmax"] = absmax;
  d["nf4_code"] = code;
  d["nf4_code2"] = code2;
  d["nf4_absmax2"] = absmax2;
  d["nf4_offset"] = offset;
  d["nf4_blocksize"] = blocksize;
  d["nf4_blocksize2"] = blocksize2;
  d["nf4_nested"] = nested;
  d["nf4_N"] = N;
  d["nf4_state_dtype"] = static_cast<int64_t>(ws.front().state_dtype);
}

std::vector<Nf4Weight> load_nf4_group(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  const auto packed = d["nf4_packed"].toTensorVector(), absmax = d["nf4_absmax"].toTensorVector(),
             code = d["nf4_code"].toTensorVector(), code2 = d["nf4_code2"].toTensorVector(),
             absmax2 = d["nf4_absmax2"].toTensorVector();
  const auto offset = d["nf4_offset"].toDoubleVector();
  const auto blocksize = d["nf4_blocksize"].toIntVector(), blocksize2 = d["nf4_blocksize2"].toIntVector(),
             nested = d["nf4_nested"].toIntVector(), N = d["nf4_N"].toIntVector();
  const auto state_dtype = static_cast<at::ScalarType>(d["nf4_state_dtype"].toInt());
  std::vector<Nf4Weight> ws;
  for (size_t i = 0; i < packed.size(); ++i)
    ws.push_back({packed[i], absmax[i], code[i], code2[i], absmax2[i], offset[i], blocksize[i], blocksize2[i],
                  nested[i] != 0, N[i], state_dtype});
  return ws;
}

// LoraGroupFunction's chain rule with W_i = dequant(packed_i) frozen. Autograd's inputs: x, the biases (if any),
// lora_A[], lora_B[] (the 4-bit weights travel in a vector of structs: one non-tensor argument).
class Nf4LoraGroupFunction : public torch::autograd::Function<Nf4LoraGroupFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::vector<Nf4Weight>& ws,
                               at::TensorList biases, at::TensorList As, at::TensorList Bs, double scaling) {
    const Tensor x2 = as_2d(x);
    auto [ys, S] = call_lora_group_fwd(x2, dequantize_all(ws, x), biases, As, Bs, scaling);
    save_lora_group(ctx, x, S, biases, As, Bs, scaling);
    save_nf4_group(ctx, ws);
    const int64_t G = static_cast<int64_t>(ws.size());
    variable_list out;
    for (int64_t i = 0; i < G; ++i) out.push_back(ys[i].view(with_last_dim(x, ws[i].N)));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<Nf4Weight> ws = load_nf4_group(ctx);
    std::vector<int64_t> Ns;
    for (const Nf4Weight& w : ws) Ns.push_back(w.N);
    return lora_group_backward(ctx, grads, Ns, /*first_bias=*/1, /*shift=*/1, [&](const Tensor& x, bool need_x) {
      std::vector<Tensor> weights;  // dequantized for dX only (backward_weight)
      for (const Nf4Weight& w : ws) weights.push_back(backward_weight(w, x, need_x));
      return weights;
    });
  }
};

// ------------------------------------------------------------------------------------------------ grouped DoRA
// Sibling DoRA projections (q/k/v, gate/up) in training, on dense or 4-bit frozen bases, as one call: each member's
// dora_fwd / dora_bwd as it would run alone (no shared kernels: DoRA's passes are per member), inside one autograd
// node. What it saves is host time: one Python call, one node and one pass of x through the saved-tensor hooks for
// the group instead of one each, and the members' dX summed in place. A 4-bit member's W is dequantized when its turn
// comes (forward, and the backward's dX), so the memory is that of the members one by one.
struct GroupBases {
  std::vector<Tensor> dense;     // frozen dense weights [N_i, K], or empty
  std::vector<Nf4Weight> nf4;    // 4-bit weights (when `dense` is empty)
  std::vector<Tensor> sq_norms;  // ‖W_i‖² per row (fp32 [N_i]) kept by the caller, or empty: dora_fwd computes it

  size_t size() const { return dense.empty() ? nf4.size() : dense.size(); }
  int64_t out_features(size_t i) const { return dense.empty() ? nf4[i].N : dense[i].size(0); }
  Tensor weight(size_t i, const Tensor& x) const {
    return dense.empty() ? call_nf4_dequantize(nf4[i], x.size(-1), x.scalar_type()) : dense[i];
  }
  // W for the backward: a 4-bit one dequantized for dX only (backward_weight); a dense one as it is
  Tensor weight_for_backward(size_t i, const Tensor& x, bool need_x) const {
    return dense.empty() ? backward_weight(nf4[i], x, need_x) : dense[i];
  }
  c10::optional<Tensor> sq_norm(size_t i) const { return sq_norms.empty() ? c10::nullopt : opt(sq_norms[i]); }

  // frozen: saved_data, not save_for_backward (see save_with_weight, save_nf4)
  void save(AutogradContext* ctx) const {
    if (dense.empty()) {
      save_nf4_group(ctx, nf4);
    } else {
      ctx->saved_data["weights"] = dense;
    }
  }
  static GroupBases load(AutogradContext* ctx) {
    GroupBases b;
    auto it = ctx->saved_data.find("weights");
    if (it != ctx->saved_data.end()) {
      b.dense = it->second.toTensorVector();
    } else {
      b.nf4 = load_nf4_group(ctx);
    }
    return b;
  }
};

void check_dora_group(const GroupBases& bases, at::TensorList biases, at::TensorList As, at::TensorList Bs,
                      at::TensorList ms, const char* op) {
  const size_t G = bases.size();
  TORCH_CHECK(G >= 1 && As.size() == G && Bs.size() == G && ms.size() == G && (biases.empty() || biases.size() == G)
                  && (bases.sq_norms.empty() || bases.sq_norms.size() == G),
              "fastpeft ", op, ": lora_A, lora_B and magnitude need one entry per member, bias and weight_sq_norm "
              "none or one per member; got ", G, " weights, ", As.size(), " lora_A, ", Bs.size(), " lora_B, ",
              ms.size(), " magnitudes, ", biases.size(), " biases, ", bases.sq_norms.size(), " weight_sq_norms");
  for (const Tensor& w : bases.dense)
    TORCH_CHECK(!w.requires_grad(), "fastpeft ", op, ": the base weights must be frozen (requires_grad=False)");
  for (size_t i = 0; i < G; ++i)
    TORCH_CHECK(ms[i].dim() == 1 && ms[i].size(0) == bases.out_features(i), "fastpeft ", op, ": member ", i,
                "'s magnitude must be a vector of its ", bases.out_features(i), " output features, got ",
                ms[i].sizes());
}

// DoraLinearFunction's chain rule per member i (its own S_i, Z0_i, g_i, 1/n_i); dL/dX = Σ_i dX_i. Autograd's inputs:
// x, the biases (if any), lora_A[], lora_B[], magnitude[] (the bases travel in a struct: one non-tensor argument).
class DoraGroupFunction : public torch::autograd::Function<DoraGroupFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const GroupBases& bases, at::TensorList biases,
                               at::TensorList As, at::TensorList Bs, at::TensorList ms, double scaling) {
    ctx->set_materialize_grads(false);  // an unused member's output: no gradient for it (not one from zeros)
    const Tensor x2 = as_2d(x);
    const int64_t G = static_cast<int64_t>(bases.size());
    variable_list out, Ss, Zs;
    std::vector<Tensor> gs, inv_ns;
    for (int64_t i = 0; i < G; ++i) {
      auto [y2, S, Z0, g, inv_n] =
          call_dora_fwd(x2, bases.weight(i, x), biases.empty() ? c10::nullopt : opt(biases[i]), As[i], Bs[i], ms[i],
                        scaling, bases.sq_norm(i), c10::nullopt);
      out.push_back(y2.view(with_last_dim(x, bases.out_features(i))));
      Ss.push_back(S);
      Zs.push_back(Z0);
      gs.push_back(g);
      inv_ns.push_back(inv_n);
    }
    variable_list saved{x};
    for (const auto& list : {at::TensorList(Ss), at::TensorList(Zs), As, Bs})
      for (const Tensor& t : list) saved.push_back(t);
    ctx->save_for_backward(saved);
    bases.save(ctx);
    ctx->saved_data["g"] = gs;  // derived from the frozen W and the adapter (see DoraLinearFunction::forward)
    ctx->saved_data["inv_n"] = inv_ns;
    ctx->saved_data["G"] = G;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = !biases.empty();
    std::vector<int64_t> bias_dtypes, m_dtypes;
    for (const Tensor& b : biases) bias_dtypes.push_back(static_cast<int64_t>(b.scalar_type()));
    for (const Tensor& m : ms) m_dtypes.push_back(static_cast<int64_t>(m.scalar_type()));
    ctx->saved_data["bias_dtypes"] = bias_dtypes;
    ctx->saved_data["m_dtypes"] = m_dtypes;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const int64_t G = ctx->saved_data["G"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const Tensor& x = saved[0];
    const Tensor x2 = as_2d(x);
    const GroupBases bases = GroupBases::load(ctx);
    const auto gs = ctx->saved_data["g"].toTensorVector(), inv_ns = ctx->saved_data["inv_n"].toTensorVector();
    const auto bias_dtypes = ctx->saved_data["bias_dtypes"].toIntVector(),
               m_dtypes = ctx->saved_data["m_dtypes"].toIntVector();
    // needs_input_grad counts tensors only: x, biases, lora_A[], lora_B[], magnitude[]
    const int64_t nb = has_bias ? G : 0, a0 = 1 + nb, b0 = a0 + G, m0 = b0 + G;
    // one slot per forward argument: x, the bases (one), the biases, lora_A[], lora_B[], magnitude[], scaling
    variable_list out(1 + 1 + nb + 3 * G + 1);
    const bool need_x = ctx->needs_input_grad(0);
    Tensor dx;
    for (int64_t i = 0; i < G; ++i) {
      if (!grads[i].defined()) continue;  // an output that went unused: no gradient from this member
      const Tensor dy2 = as_2d(grads[i]).to(x.scalar_type());
      const Tensor &S = saved[1 + i], &Z0 = saved[1 + G + i], &A = saved[1 + 2 * G + i], &B = saved[1 + 3 * G + i];
      const bool need_A = ctx->needs_input_grad(a0 + i), need_B = ctx->needs_input_grad(b0 + i),
                 need_m = ctx->needs_input_grad(m0 + i);
      if (need_x || need_A || need_B || need_m) {
        auto [dxi, dA, dB, dm] = call_dora_bwd(dy2, x2, S, Z0, gs[i], inv_ns[i],
                                               bases.weight_for_backward(i, x, need_x), A, B, scaling, need_x, need_A,
                                               need_B, need_m);
        if (need_x) dx = dx.defined() ? dx.add_(dxi) : dxi;
        if (need_A) out[2 + nb + i] = dA.to(A.scalar_type());
        if (need_B) out[2 + nb + G + i] = dB.to(B.scalar_type());
        if (need_m) out[2 + nb + 2 * G + i] = dm.reshape({bases.out_features(i)}).to(
            static_cast<at::ScalarType>(m_dtypes[i]));
      }
      if (has_bias && ctx->needs_input_grad(1 + i))
        out[2 + i] = bias_grad_as(dy2, static_cast<at::ScalarType>(bias_dtypes[i]));
    }
    if (need_x && dx.defined()) out[0] = dx.view(x.sizes());
    return out;
  }
};

// Chain rule (l the IA3 vector; output scaling saves Yb = X·Wᵀ + b, feedforward saves X):
//   output       Y = Yb⊙l:        dL/dl = Σ_rows Yb⊙dY   dL/dX = (dY⊙l)·W   dL/db = l⊙Σ_rows dY
//   feedforward  Y = (X⊙l)·Wᵀ+b:  dL/dl = Σ_rows X⊙(dY·W)   dL/dX = (dY·W)⊙l   dL/db = Σ_rows dY
class IA3LinearFunction : public torch::autograd::Function<IA3LinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const Tensor& l, bool feedforward) {
    auto [y2, saved] = call_ia3_fwd(as_2d(x), weight, bias, l, feedforward);
    save_with_weight(ctx, {feedforward ? x : saved, l}, weight);  // feedforward: the caller's x itself
    ctx->saved_data["feedforward"] = feedforward;
    save_bias_info(ctx, bias);
    return y2.view(with_last_dim(x, weight.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool feedforward = ctx->saved_data["feedforward"].toBool();
    const Tensor &kept = saved[0], &l = saved[1];
    const Tensor weight = load_weight(ctx, saved);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();  // (see LoraLinearFunction::backward)
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2), need_l = ctx->needs_input_grad(has_bias ? 3 : 2);
    Tensor saved2 = as_2d(kept);
    Tensor dy2 = as_2d(grads[0]);
    auto r = call_ia3_bwd(dy2, saved2, weight, l, feedforward, need_x, need_b);
    Tensor dx, dw, db, dl;
    if (need_x) dx = std::get<0>(r).view(with_last_dim(grads[0], weight.size(1)));
    if (need_b) db = std::get<1>(r).to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    if (need_l) dl = std::get<2>(r).reshape(l.sizes()).to(l.scalar_type());
    if (need_w) {  // a trainable base weight (rare): plain ATen. Output scaling saved Yb, not X: no dW from it.
      TORCH_CHECK(feedforward, "ia3_linear: gradient for an output-scaled trainable base weight is not implemented");
      const auto dt = saved2.scalar_type();
      dw = at::mm(dy2.to(dt).t(), scale_cols_cpu(saved2, l)).to(weight.scalar_type());
    }
    return {dx, dw, db, dl, Tensor()};
  }
};

// Whether a call must record an autograd node: grad mode on and some input asks for a gradient. When not
// (inference, decode, a no_grad forward), the Autograd kernels below call the forward op directly, below autograd:
// Function::apply would build a node, save tensors and wrap the outputs for nothing (~7 µs of host time per call
// on a slow host, for a layer whose decode step costs ~30 µs more than a plain Linear's).
bool records_autograd(std::initializer_list<const Tensor*> inputs, const c10::optional<Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return bias.has_value() && bias->defined() && bias->requires_grad();
}

Tensor lora_linear_plain(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                         const Tensor& B, double scaling, double p, const c10::optional<Tensor>& seed, int64_t rank) {
  auto [y2, S] = call_lora_fwd(as_2d(x), weight, bias, A, B, scaling, p, seed, rank);
  return y2.view(with_last_dim(x, weight.size(0)));
}

Tensor lora_linear_autograd(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                            const Tensor& A, const Tensor& B, double scaling, double p,
                            const c10::optional<Tensor>& seed, int64_t rank) {
  if (!records_autograd({&x, &weight, &A, &B}, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as Function::apply runs its forward
    return lora_linear_plain(x, weight, bias, A, B, scaling, p, seed, rank);
  }
  return LoraLinearFunction::apply(x, weight, bias, A, B, scaling, p, seed, rank);
}

Tensor dora_linear_plain(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                         const Tensor& B, const Tensor& magnitude, double scaling, const c10::optional<Tensor>& w_sq,
                         const c10::optional<Tensor>& weight_norm) {
  if (weight_norm.has_value() && weight_norm->defined()) {  // inference with the layer's cached norm: keep nothing
    return call_dora_infer(as_2d(x), weight, bias, A, B, magnitude, scaling, *weight_norm)
        .view(with_last_dim(x, weight.size(0)));
  }
  auto r = call_dora_fwd(as_2d(x), weight, bias, A, B, magnitude, scaling, w_sq, weight_norm);
  return std::get<0>(r).view(with_last_dim(x, weight.size(0)));
}

Tensor dora_linear_autograd(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& A,
                            const Tensor& B, const Tensor& magnitude, double scaling,
                            const c10::optional<Tensor>& w_sq, const c10::optional<Tensor>& weight_norm) {
  if (!records_autograd({&x, &weight, &A, &B, &magnitude}, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dora_linear_plain(x, weight, bias, A, B, magnitude, scaling, w_sq, weight_norm);
  }
  return DoraLinearFunction::apply(x, weight, bias, A, B, magnitude, scaling, w_sq, weight_norm);
}

Tensor ia3_linear_plain(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& l,
                        bool feedforward) {
  auto [y2, saved] = call_ia3_fwd(as_2d(x), weight, bias, l, feedforward);
  return y2.view(with_last_dim(x, weight.size(0)));
}

Tensor ia3_linear_autograd(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& l,
                           bool feedforward) {
  if (!records_autograd({&x, &weight, &l}, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ia3_linear_plain(x, weight, bias, l, feedforward);
  }
  return IA3LinearFunction::apply(x, weight, bias, l, feedforward);
}

// The 4-bit operators' entry points: the schema's arguments (bnb's bytes, the KernelState's tensors and numbers)
// gathered into one Nf4Weight. K is x's last dimension.
Tensor nf4_lora_linear_plain(const Tensor& x, const Tensor& packed, const Tensor& absmax, const Tensor& code,
                             const Tensor& code2, const Tensor& absmax2, double offset, int64_t blocksize,
                             int64_t blocksize2, bool nested, int64_t N, at::ScalarType state_dtype,
                             const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B, double scaling,
                             double p, const c10::optional<Tensor>& seed, int64_t rank) {
  const Nf4Weight w{packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype};
  return lora_linear_plain(x, call_nf4_dequantize(w, x.size(-1), x.scalar_type()), bias, A, B, scaling, p, seed,
                           rank);
}

Tensor nf4_lora_linear_autograd(const Tensor& x, const Tensor& packed, const Tensor& absmax, const Tensor& code,
                                const Tensor& code2, const Tensor& absmax2, double offset, int64_t blocksize,
                                int64_t blocksize2, bool nested, int64_t N, at::ScalarType state_dtype,
                                const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B, double scaling,
                                double p, const c10::optional<Tensor>& seed, int64_t rank) {
  TORCH_CHECK(!packed.requires_grad(), "fastpeft nf4_lora_linear: a 4-bit base weight cannot require grad");
  if (!records_autograd({&x, &A, &B}, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return nf4_lora_linear_plain(x, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N,
                                 state_dtype, bias, A, B, scaling, p, seed, rank);
  }
  const Nf4Weight w{packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype};
  return Nf4LoraLinearFunction::apply(x, w, bias, A, B, scaling, p, seed, rank);
}

Tensor nf4_dora_linear_plain(const Tensor& x, const Tensor& packed, const Tensor& absmax, const Tensor& code,
                             const Tensor& code2, const Tensor& absmax2, double offset, int64_t blocksize,
                             int64_t blocksize2, bool nested, int64_t N, at::ScalarType state_dtype,
                             const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                             const Tensor& magnitude, double scaling, const c10::optional<Tensor>& w_sq,
                             const c10::optional<Tensor>& weight_norm) {
  const Nf4Weight w{packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype};
  return dora_linear_plain(x, call_nf4_dequantize(w, x.size(-1), x.scalar_type()), bias, A, B, magnitude, scaling,
                           w_sq, weight_norm);
}

Tensor nf4_dora_linear_autograd(const Tensor& x, const Tensor& packed, const Tensor& absmax, const Tensor& code,
                                const Tensor& code2, const Tensor& absmax2, double offset, int64_t blocksize,
                                int64_t blocksize2, bool nested, int64_t N, at::ScalarType state_dtype,
                                const c10::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                                const Tensor& magnitude, double scaling, const c10::optional<Tensor>& w_sq,
                                const c10::optional<Tensor>& weight_norm) {
  TORCH_CHECK(!packed.requires_grad(), "fastpeft nf4_dora_linear: a 4-bit base weight cannot require grad");
  if (!records_autograd({&x, &A, &B, &magnitude}, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return nf4_dora_linear_plain(x, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N,
                                 state_dtype, bias, A, B, magnitude, scaling, w_sq, weight_norm);
  }
  const Nf4Weight w{packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype};
  return Nf4DoraLinearFunction::apply(x, w, bias, A, B, magnitude, scaling, w_sq, weight_norm);
}

std::vector<Tensor> lora_group_linear_plain(const Tensor& x, at::TensorList weights, at::TensorList biases,
                                            at::TensorList As, at::TensorList Bs, double scaling) {
  check_group(x, weights, biases, As, Bs);
  auto [ys, S] = call_lora_group_fwd(as_2d(x), weights, biases, As, Bs, scaling);
  for (size_t i = 0; i < ys.size(); ++i) ys[i] = ys[i].view(with_last_dim(x, weights[i].size(0)));
  return ys;
}

std::vector<Tensor> lora_group_linear_autograd(const Tensor& x, at::TensorList weights, at::TensorList biases,
                                               at::TensorList As, at::TensorList Bs, double scaling) {
  check_group(x, weights, biases, As, Bs);
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    grad = x.requires_grad();
    for (const auto& list : {weights, biases, As, Bs})
      for (const Tensor& t : list) grad = grad || t.requires_grad();
  }
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as Function::apply runs its forward
    return lora_group_linear_plain(x, weights, biases, As, Bs, scaling);
  }
  return LoraGroupFunction::apply(x, weights, biases, As, Bs, scaling);
}

// The grouped 4-bit operator's entry points: the schema's per-member lists gathered into Nf4Weights.
std::vector<Tensor> nf4_lora_group_linear_plain(const Tensor& x, at::TensorList packed, at::TensorList absmax,
                                                at::TensorList code, at::TensorList code2, at::TensorList absmax2,
                                                at::ArrayRef<double> offset, at::IntArrayRef blocksize,
                                                at::IntArrayRef blocksize2, const c10::List<bool>& nested,
                                                at::IntArrayRef N, at::ScalarType state_dtype, at::TensorList biases,
                                                at::TensorList As, at::TensorList Bs, double scaling) {
  const auto ws = nf4_weights(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N,
                              state_dtype);
  return lora_group_linear_plain(x, dequantize_all(ws, x), biases, As, Bs, scaling);
}

std::vector<Tensor> nf4_lora_group_linear_autograd(const Tensor& x, at::TensorList packed, at::TensorList absmax,
                                                   at::TensorList code, at::TensorList code2, at::TensorList absmax2,
                                                   at::ArrayRef<double> offset, at::IntArrayRef blocksize,
                                                   at::IntArrayRef blocksize2, const c10::List<bool>& nested,
                                                   at::IntArrayRef N, at::ScalarType state_dtype,
                                                   at::TensorList biases, at::TensorList As, at::TensorList Bs,
                                                   double scaling) {
  const auto ws = nf4_weights(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N,
                              state_dtype);
  TORCH_CHECK(As.size() == ws.size() && Bs.size() == ws.size() && (biases.empty() || biases.size() == ws.size()),
              "fastpeft nf4_lora_group_linear: lora_A and lora_B need one entry per member, bias none or one per "
              "member; got ", ws.size(), " weights, ", As.size(), " lora_A, ", Bs.size(), " lora_B, ", biases.size(),
              " biases");
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    grad = x.requires_grad();
    for (const auto& list : {biases, As, Bs})
      for (const Tensor& t : list) grad = grad || t.requires_grad();
  }
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return lora_group_linear_plain(x, dequantize_all(ws, x), biases, As, Bs, scaling);
  }
  return Nf4LoraGroupFunction::apply(x, ws, biases, As, Bs, scaling);
}

// The grouped DoRA operators' entry points (training; inference keeps the members' cached-norm paths): the Autograd
// kernels record the node where some input asks for a gradient (`record`), the CompositeExplicitAutograd ones never.
std::vector<Tensor> dora_group_run(const Tensor& x, const GroupBases& bases, at::TensorList biases, at::TensorList As,
                                   at::TensorList Bs, at::TensorList ms, double scaling, const char* op, bool record) {
  check_dora_group(bases, biases, As, Bs, ms, op);
  if (record && at::GradMode::is_enabled()) {
    bool grad = x.requires_grad();
    for (const auto& list : {biases, As, Bs, ms})
      for (const Tensor& t : list) grad = grad || t.requires_grad();
    if (grad) return DoraGroupFunction::apply(x, bases, biases, As, Bs, ms, scaling);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing to record: the members' forwards, nothing kept
  std::vector<Tensor> ys;
  for (size_t i = 0; i < bases.size(); ++i) {
    auto r = call_dora_fwd(as_2d(x), bases.weight(i, x), biases.empty() ? c10::nullopt : opt(biases[i]), As[i], Bs[i],
                           ms[i], scaling, bases.sq_norm(i), c10::nullopt);
    ys.push_back(std::get<0>(r).view(with_last_dim(x, bases.out_features(i))));
  }
  return ys;
}

GroupBases dense_group_bases(const Tensor& x, at::TensorList weights, at::TensorList w_sqs) {
  GroupBases bases;
  bases.dense = weights.vec();
  bases.sq_norms = w_sqs.vec();
  for (size_t i = 0; i < weights.size(); ++i)
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == x.size(-1), "fastpeft dora_group_linear: member ", i,
                "'s weight ", weights[i].sizes(), " does not take x ", x.sizes());
  return bases;
}

template <bool Record>
std::vector<Tensor> dora_group_linear(const Tensor& x, at::TensorList weights, at::TensorList biases,
                                      at::TensorList As, at::TensorList Bs, at::TensorList ms, double scaling,
                                      at::TensorList w_sqs) {
  return dora_group_run(x, dense_group_bases(x, weights, w_sqs), biases, As, Bs, ms, scaling, "dora_group_linear",
                        Record);
}

template <bool Record>
std::vector<Tensor> nf4_dora_group_linear(const Tensor& x, at::TensorList packed, at::TensorList absmax,
                                          at::TensorList code, at::TensorList code2, at::TensorList absmax2,
                                          at::ArrayRef<double> offset, at::IntArrayRef blocksize,
                                          at::IntArrayRef blocksize2, const c10::List<bool>& nested,
                                          at::IntArrayRef N, at::ScalarType state_dtype, at::TensorList biases,
                                          at::TensorList As, at::TensorList Bs, at::TensorList ms, double scaling,
                                          at::TensorList w_sqs) {
  GroupBases bases;
  bases.nf4 = nf4_weights(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, nested, N, state_dtype);
  bases.sq_norms = w_sqs.vec();
  return dora_group_run(x, bases, biases, As, Bs, ms, scaling, "nf4_dora_group_linear", Record);
}

}  // namespace

// LoRA with 16-bit adapters of x's dtype, no dropout ("native16"). FSDP2's MixedPrecisionPolicy(param_dtype=bf16)
// all-gathers the fp32 adapters as bf16, DeepSpeed's bf16 mode and model.to(torch.bfloat16) keep them so; PEFT then
// computes its adapter in that dtype, and so does this: no fp32 copies of A and B, no hi / lo splits (B's lo part
// would be zero), S kept in x's dtype. With dt = x's dtype and every product accumulated in fp32 by the GEMM:
//   forward   S = dt(s·X·Aᵀ) (saved);  Y = dt(X·Wᵀ + b + S·Bᵀ) (the expand adds into Y: beta = 1, one rounding)
//   backward  dB = dt(dYᵀ·S);  dS = dt(s·dY·B);  dA = dt(dSᵀ·X);  dX = dt(dY·W + dS·A)
// PEFT's bf16 composition rounds the same products once more each (lora_B's output, its product with s, the sum).
// ATen GEMMs only, so the CPU build CI tests is the composition CUDA runs. Bound: the base GEMMs; the LoRA products
// read X / dY once each (3 skinny GEMMs over M rows). Dropout and DoRA keep their fp32-S compositions.
bool lora_native16(const Tensor& x2, const Tensor& A, const Tensor& B, double p) {
  const auto dt = x2.scalar_type();
  return p <= 0.0 && (dt == at::kHalf || dt == at::kBFloat16) && A.scalar_type() == dt && B.scalar_type() == dt;
}

// s·M1·M2 in M1's dtype with one rounding: cuBLAS's alpha; beta = 0 never reads `self` (a 0-dim placeholder)
static Tensor scaled_mm(const Tensor& m1, const Tensor& m2, double s) {
  return at::addmm(at::empty({}, m1.options()), m1, m2, /*beta=*/0, /*alpha=*/s);
}

std::tuple<Tensor, Tensor> lora_fwd_native16(const Tensor& x2, const Tensor& weight, const c10::optional<Tensor>& bias,
                                             const Tensor& A, const Tensor& B, double scaling) {
  check_lora_args(x2, weight, bias, A, B);
  const auto dt = x2.scalar_type();
  const Tensor w = weight.to(dt);
  Tensor y = bias.has_value() && bias->defined() ? at::addmm(bias->to(dt), x2, w.t()) : at::mm(x2, w.t());
  Tensor S = scaled_mm(x2, A.t(), scaling);  // [M, r]
  y.addmm_(S, B.t());
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor> lora_bwd_native16(const Tensor& dy2_in, const Tensor& x2, const Tensor& S_in,
                                                     const Tensor& weight, const Tensor& A, const Tensor& B,
                                                     double scaling, bool need_x, bool need_A, bool need_B) {
  const auto dt = x2.scalar_type();
  const Tensor dy2 = dy2_in.to(dt), S = S_in.to(dt);  // S: fp32 only inside a group with fp32 members (exact)
  Tensor dx = at::empty({0}, x2.options()), dA = at::empty({0}, x2.options()), dB = at::empty({0}, x2.options());
  if (need_B) dB = at::mm(dy2.t(), S);                                         // [N, r]
  if (need_A || need_x) {
    const Tensor dS = scaled_mm(dy2, B, scaling);                              // [M, r]
    if (need_A) dA = at::mm(dS.t(), x2);                                       // [r, K]
    if (need_x) {
      dx = at::mm(dy2, weight.to(dt));
      dx.addmm_(dS, A);                                                        // + dS·A (beta = 1)
    }
  }
  return {dx, dA, dB};
}

// The dtype of a group's S [M, Σ r]: x's when every member is native16, else fp32 (lora_group_fwd_composed casts)
at::ScalarType group_s_dtype(const Tensor& x2, at::TensorList As, at::TensorList Bs) {
  for (size_t i = 0; i < As.size(); ++i)
    if (!lora_native16(x2, As[i], Bs[i], 0.0)) return at::kFloat;
  return x2.scalar_type();
}

// Grouped projections member by member: the CPU kernels, and the CUDA calls whose shapes or adapters the shared
// composition (adapter_cuda.cu) does not take. S is the members' S side by side, as there.
std::tuple<std::vector<Tensor>, Tensor> lora_group_fwd_composed(const Tensor& x2, at::TensorList weights,
                                                                at::TensorList biases, at::TensorList As,
                                                                at::TensorList Bs, double scaling) {
  const auto sdt = group_s_dtype(x2, As, Bs);
  std::vector<Tensor> ys, Ss;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto [y, S] = call_lora_fwd(x2, weights[i], biases.empty() ? c10::nullopt : c10::optional<Tensor>(biases[i]),
                                As[i], Bs[i], scaling, 0.0, c10::nullopt, 0);
    ys.push_back(y);
    Ss.push_back(S.to(sdt));
  }
  return {ys, at::cat(Ss, 1)};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_group_bwd_composed(
    at::TensorList dys, const Tensor& x2, const Tensor& S, at::TensorList weights, at::TensorList As,
    at::TensorList Bs, double scaling, bool need_x, bool need_A, bool need_B) {
  Tensor dx;
  std::vector<Tensor> dAs, dBs;
  int64_t col = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t r = As[i].size(0);
    auto [dxi, dAi, dBi] = call_lora_bwd(dys[i], x2, S.narrow(1, col, r), weights[i], As[i], Bs[i], scaling, 0.0,
                                         c10::nullopt, 0, need_x, need_A, need_B);
    col += r;
    if (need_x) dx = dx.defined() ? dx.add_(dxi) : dxi;
    dAs.push_back(dAi);  // empty ({0}) when not needed, in the dtype the member's lora_bwd gives
    dBs.push_back(dBi);
  }
  if (!dx.defined()) dx = at::empty({0}, x2.options());
  return {dx, dAs, dBs};
}

// Process-wide testing / benchmarking hooks of the CUDA compositions, not user settings: each an atomic mode, set
// by fastpeft_ops::set_<name>(mode) (checked against its allowed values; the previous mode returned) and read by
// adapter_cuda.cu on every call.
int64_t exchange_hook_mode(std::atomic<int64_t>& slot, int64_t mode, bool allowed, const char* message) {
  TORCH_CHECK(allowed, message);
  return slot.exchange(mode);
}

// Which LoRA composition CUDA calls take (adapter_cuda.cu): -1 automatic, 0 the split-GEMM composition, 1 the fused
// kernels, 2 the decode forward where it applies (no dropout, <= 32 rows where auto stops at 16, rank <= 64; else as
// automatic).
std::atomic<int64_t> g_lora_cuda_path{-1};
int64_t lora_cuda_path() { return g_lora_cuda_path.load(std::memory_order_relaxed); }
int64_t set_lora_cuda_path(int64_t mode) {
  return exchange_hook_mode(g_lora_cuda_path, mode, mode >= -1 && mode <= 2,
                            "set_lora_cuda_path: mode must be -1 (auto), 0 (split GEMM), 1 (fused) or 2 (decode)");
}

// Whether the decode forward runs its shrink on a side stream beside the base GEMV (adapter_cuda.cu, decode_forward):
// -1 automatic (while a CUDA graph is captured), 0 never, 1 always.
std::atomic<int64_t> g_decode_fork{-1};
int64_t decode_fork_mode() { return g_decode_fork.load(std::memory_order_relaxed); }
int64_t set_decode_fork(int64_t mode) {
  return exchange_hook_mode(
      g_decode_fork, mode, mode >= -1 && mode <= 1,
      "set_decode_fork: mode must be -1 (auto: fork while a CUDA graph is captured), 0 (never) or 1 (always)");
}

// Whether the decode forward launches its expand as a programmatic dependent of the base GEMV, and its own GEMV as
// one of the shrink (sm_90+; adapter_cuda.cu, decode_forward): -1 automatic (on), 0 never.
std::atomic<int64_t> g_decode_pdl{-1};
int64_t decode_pdl_mode() { return g_decode_pdl.load(std::memory_order_relaxed); }
int64_t set_decode_pdl(int64_t mode) {
  return exchange_hook_mode(g_decode_pdl, mode, mode == -1 || mode == 0,
                            "set_decode_pdl: mode must be -1 (auto: on where the GPU has it) or 0 (never)");
}

// Whether the decode forward computes its base product in its own GEMV with the LoRA expand in the epilogue
// (adapter_cuda.cu, decode_gemv: two launches instead of three) rather than cuBLAS + a separate expand: -1 automatic
// (where it applies: 16-bit x of <= 8 rows, aligned rows, sm_80+; inside a capture only for weights whose tiles fit
// its resident blocks), 0 never.
std::atomic<int64_t> g_decode_gemv{-1};
int64_t decode_gemv_mode() { return g_decode_gemv.load(std::memory_order_relaxed); }
int64_t set_decode_gemv(int64_t mode) {
  return exchange_hook_mode(g_decode_gemv, mode, mode == -1 || mode == 0,
                            "set_decode_gemv: mode must be -1 (auto: where it applies) or 0 (never)");
}

// Which kernel DoRA's forward output pass takes (adapter_cuda.cu, dora_pass): -1 automatic (the register form,
// dora_out_kernel, at ranks <= 16 on sm_80+; else the tiled dora_pass_kernel), 0 the tiled kernel, n in 1..4096 the
// register form with n row tiles of 16 rows a block (its grid otherwise from the wave model).
std::atomic<int64_t> g_dora_pass_form{-1};
int64_t dora_pass_form() { return g_dora_pass_form.load(std::memory_order_relaxed); }
int64_t set_dora_pass_form(int64_t mode) {
  return exchange_hook_mode(g_dora_pass_form, mode, mode >= -1 && mode <= 4096,
                            "set_dora_pass_form: mode must be -1 (auto), 0 (the tiled kernel) or 1..4096 (the "
                            "register form with that many 16-row tiles a block)");
}

// Which kernels compute DoRA's norm in training (adapter_cuda.cu, dora_fwd_cuda): -1 automatic (dora_norm_fused: one
// pass over W on the tensor cores and a finishing kernel, where W is 16-bit with 16-byte rows and the rank <= 16 on
// sm_80+), 0 the split GEMM W·[A_hi | A_lo]ᵀ, A·Aᵀ and the norm-and-scale kernel, n in 32..2048 (a multiple of 32) the
// fused pass with ranges of n columns of K a block (2048: kNormPartMaxRange in adapter_cuda.cu, the fragments' shared
// memory the kernel is allowed).
std::atomic<int64_t> g_dora_norm_form{-1};
int64_t dora_norm_form() { return g_dora_norm_form.load(std::memory_order_relaxed); }
int64_t set_dora_norm_form(int64_t mode) {
  const bool range = mode >= 32 && mode <= 2048 && mode % 32 == 0;
  return exchange_hook_mode(g_dora_norm_form, mode, mode == -1 || mode == 0 || range,
                            "set_dora_norm_form: mode must be -1 (auto), 0 (the split GEMM) or a multiple of 32 "
                            "in 32..2048 (the fused pass with that many columns of K a block)");
}

// Which product of a 16-bit split-GEMM LoRA sum cuBLAS writes first (adapter_cuda.cu: lora_fwd_split, lora_bwd_split,
// the grouped projections; DoRA's dX through lora_bwd_split): -1 automatic (adapter first where Y / dX has 8 M elements or
// more; sum_adapter_first has the measurements), 0 the base product first and the adapter's term added with beta = 1 (a read + write of Y / dX by a
// skinny GEMM), 1 the adapter's term first and the base product added with beta = 1 (its GEMM reads Y / dX as C in
// its epilogue).
std::atomic<int64_t> g_lora_sum_order{-1};
int64_t lora_sum_order() { return g_lora_sum_order.load(std::memory_order_relaxed); }
int64_t set_lora_sum_order(int64_t mode) {
  return exchange_hook_mode(g_lora_sum_order, mode, mode >= -1 && mode <= 1,
                            "set_lora_sum_order: mode must be -1 (auto), 0 (the base product first) or 1 (the "
                            "adapter's term first)");
}

// Exposed for adapter_cuda.cu (its kernels take the same seed / threshold / keep-scale values).
int64_t lora_seed_value(const c10::optional<Tensor>& seed, double p, int64_t rank) { return seed_value(seed, p, rank); }
uint32_t lora_dropout_threshold(double p) { return dropout_threshold(p); }
float lora_keep_scale(double p, at::ScalarType dt) { return keep_scale(p, dt); }

}  // namespace fastpeft

TORCH_LIBRARY(fastpeft_ops, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? seed, int rank) -> Tensor");
  m.def("lora_fwd(Tensor x2, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? seed, int rank) -> (Tensor, Tensor)");
  m.def("lora_bwd(Tensor dy2, Tensor x2, Tensor S, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor? seed, int rank, bool need_x, bool need_A, bool need_B) -> (Tensor, Tensor, Tensor)");
  m.def("dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "float scaling, Tensor? weight_sq_norm, Tensor? weight_norm) -> Tensor");
  m.def("dora_fwd(Tensor x2, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "float scaling, Tensor? weight_sq_norm, Tensor? weight_norm) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_bwd(Tensor dy2, Tensor x2, Tensor S, Tensor Z, Tensor g, Tensor inv_n, Tensor weight, Tensor lora_A, "
        "Tensor lora_B, float scaling, bool need_x, bool need_A, bool need_B, bool need_m) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_infer(Tensor x2, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "float scaling, Tensor weight_norm) -> Tensor");
  m.def("lora_group_linear(Tensor x, Tensor[] weight, Tensor[] bias, Tensor[] lora_A, Tensor[] lora_B, "
        "float scaling) -> Tensor[]");
  m.def("lora_group_fwd(Tensor x2, Tensor[] weight, Tensor[] bias, Tensor[] lora_A, Tensor[] lora_B, "
        "float scaling) -> (Tensor[], Tensor)");
  m.def("lora_group_bwd(Tensor[] dy2, Tensor x2, Tensor S, Tensor[] weight, Tensor[] lora_A, Tensor[] lora_B, "
        "float scaling, bool need_x, bool need_A, bool need_B) -> (Tensor, Tensor[], Tensor[])");
  m.def("ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_l, bool feedforward) -> Tensor");
  m.def("ia3_fwd(Tensor x2, Tensor weight, Tensor? bias, Tensor ia3_l, bool feedforward) -> (Tensor, Tensor)");
  m.def("ia3_bwd(Tensor dy2, Tensor saved, Tensor weight, Tensor ia3_l, bool feedforward, bool need_x, "
        "bool need_b) -> (Tensor, Tensor, Tensor)");
  m.def("mixed_adapters_new(Tensor[] lora_A, Tensor[] lora_B, float[] scales) -> int", &fastpeft::mixed_adapters_new);
  m.def("mixed_adapters_free(int handle) -> ()", &fastpeft::mixed_adapters_free);
  m.def("lora_mixed_delta_(Tensor(a!) y, Tensor x, Tensor adapter_of_segment, int tokens, int adapters) -> ()");
  m.def("lora_mixed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor adapter_of_segment, int tokens, "
        "int adapters) -> Tensor");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, Tensor code2, Tensor absmax2, float offset, "
        "int blocksize, int blocksize2, bool nested, int N, ScalarType state_dtype, int K, ScalarType dtype) -> Tensor");
  m.def("nf4_lora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor code2, Tensor absmax2, "
        "float offset, int blocksize, int blocksize2, bool nested, int N, ScalarType state_dtype, Tensor? bias, "
        "Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed, int rank) -> Tensor");
  m.def("nf4_dora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor code2, Tensor absmax2, "
        "float offset, int blocksize, int blocksize2, bool nested, int N, ScalarType state_dtype, Tensor? bias, "
        "Tensor lora_A, Tensor lora_B, Tensor magnitude, float scaling, Tensor? weight_sq_norm, "
        "Tensor? weight_norm) -> Tensor");
  m.def("nf4_lora_group_linear(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] code, Tensor[] code2, "
        "Tensor[] absmax2, float[] offset, int[] blocksize, int[] blocksize2, bool[] nested, int[] N, "
        "ScalarType state_dtype, Tensor[] bias, Tensor[] lora_A, Tensor[] lora_B, float scaling) -> Tensor[]");
  m.def("dora_group_linear(Tensor x, Tensor[] weight, Tensor[] bias, Tensor[] lora_A, Tensor[] lora_B, "
        "Tensor[] magnitude, float scaling, Tensor[] weight_sq_norm) -> Tensor[]");
  m.def("nf4_dora_group_linear(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] code, Tensor[] code2, "
        "Tensor[] absmax2, float[] offset, int[] blocksize, int[] blocksize2, bool[] nested, int[] N, "
        "ScalarType state_dtype, Tensor[] bias, Tensor[] lora_A, Tensor[] lora_B, Tensor[] magnitude, float scaling, "
        "Tensor[] weight_sq_norm) -> Tensor[]");
  m.def("set_lora_cuda_path(int mode) -> int", &fastpeft::set_lora_cuda_path);
  m.def("set_decode_fork(int mode) -> int", &fastpeft::set_decode_fork);
  m.def("set_decode_pdl(int mode) -> int", &fastpeft::set_decode_pdl);
  m.def("set_decode_gemv(int mode) -> int", &fastpeft::set_decode_gemv);
  m.def("set_dora_pass_form(int mode) -> int", &fastpeft::set_dora_pass_form);
  m.def("set_dora_norm_form(int mode) -> int", &fastpeft::set_dora_norm_form);
  m.def("set_lora_sum_order(int mode) -> int", &fastpeft::set_lora_sum_order);
}

TORCH_LIBRARY_IMPL(fastpeft_ops, Autograd, m) {
  m.impl("lora_linear", &fastpeft::lora_linear_autograd);
  m.impl("lora_group_linear", &fastpeft::lora_group_linear_autograd);
  m.impl("dora_linear", &fastpeft::dora_linear_autograd);
  m.impl("ia3_linear", &fastpeft::ia3_linear_autograd);
  m.impl("nf4_lora_linear", &fastpeft::nf4_lora_linear_autograd);
  m.impl("nf4_dora_linear", &fastpeft::nf4_dora_linear_autograd);
  m.impl("nf4_lora_group_linear", &fastpeft::nf4_lora_group_linear_autograd);
  m.impl("dora_group_linear", &fastpeft::dora_group_linear<true>);
  m.impl("nf4_dora_group_linear", &fastpeft::nf4_dora_group_linear<true>);
}

TORCH_LIBRARY_IMPL(fastpeft_ops, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &fastpeft::lora_linear_plain);
  m.impl("lora_group_linear", &fastpeft::lora_group_linear_plain);
  m.impl("dora_linear", &fastpeft::dora_linear_plain);
  m.impl("ia3_linear", &fastpeft::ia3_linear_plain);
  m.impl("nf4_lora_linear", &fastpeft::nf4_lora_linear_plain);
  m.impl("nf4_dora_linear", &fastpeft::nf4_dora_linear_plain);
  m.impl("nf4_lora_group_linear", &fastpeft::nf4_lora_group_linear_plain);
  m.impl("dora_group_linear", &fastpeft::dora_group_linear<false>);
  m.impl("nf4_dora_group_linear", &fastpeft::nf4_dora_group_linear<false>);
  m.impl("lora_mixed_linear", &fastpeft::lora_mixed_linear);
}


TORCH_LIBRARY_IMPL(fastpeft_ops, CPU, m) {
  m.impl("lora_fwd", &fastpeft::lora_fwd_cpu);
  m.impl("lora_bwd", &fastpeft::lora_bwd_cpu);
  m.impl("lora_group_fwd", &fastpeft::lora_group_fwd_composed);
  m.impl("lora_group_bwd", &fastpeft::lora_group_bwd_composed);
  m.impl("dora_fwd", &fastpeft::dora_fwd_cpu);
  m.impl("dora_bwd", &fastpeft::dora_bwd_cpu);
  m.impl("dora_infer", &fastpeft::dora_infer_cpu);
  m.impl("ia3_fwd", &fastpeft::ia3_fwd_cpu);
  m.impl("ia3_bwd", &fastpeft::ia3_bwd_cpu);
  m.impl("lora_mixed_delta_", &fastpeft::lora_mixed_delta_cpu);
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft_ops, CUDA, m) {
  m.impl("lora_mixed_delta_", &fastpeft::lora_mixed_delta_cuda_entry);
  m.impl("lora_mixed_linear", &fastpeft::lora_mixed_linear_cuda);
}
#endif

TORCH_LIBRARY_IMPL(fastpeft_ops, Meta, m) {
  m.impl("lora_fwd", &fastpeft::lora_fwd_meta);
  m.impl("lora_group_fwd", &fastpeft::lora_group_fwd_meta);
  m.impl("lora_group_bwd", &fastpeft::lora_group_bwd_meta);
  m.impl("lora_bwd", &fastpeft::lora_bwd_meta);
  m.impl("dora_fwd", &fastpeft::dora_fwd_meta);
  m.impl("dora_bwd", &fastpeft::dora_bwd_meta);
  m.impl("dora_infer", &fastpeft::dora_infer_meta);
  m.impl("ia3_fwd", &fastpeft::ia3_fwd_meta);
  m.impl("ia3_bwd", &fastpeft::ia3_bwd_meta);
  m.impl("lora_mixed_delta_", &fastpeft::lora_mixed_delta_meta);
  m.impl("lora_mixed_linear", &fastpeft::lora_mixed_linear_meta);
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize_meta);
}

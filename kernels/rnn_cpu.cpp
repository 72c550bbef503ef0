// Fused CPU kernels of the discrete LSTM and GRU (kernels/rnn_cpu.py builds and loads this file).
//
// lstm_forward_step does the element-wise work of one forward step, which the torch path spreads
// over about twenty aten calls (kernels/rnn_torch.py, LSTMForwardStep): gate activations, their
// codes and level values, the clamped cell update, u's code and m = o u. The backward kernels
// (below) do the same for the aten calls of one backward chunk; lstm_forward_steps runs a forward
// chunk's steps in one call, lstm_rebuild_chunk and lstm_backward_chunk a backward chunk's in two.
// They reproduce the aten path bit for bit, NaN payloads aside
// (rnn_cpu.py checks that on load and refuses the kernels otherwise):
//
// * sigmoid is aten's cpu_kernel_vec on one inner loop of length H per (row, gate plane): the
//   vector body 1 / (1 + exp(-x)) with Vectorized<float>::exp (SLEEF) in steps of two vectors, the
//   tail in scalar code with std::exp. Compiled for the CPU capability aten dispatches to, so the
//   vectors are the same width as aten's.
// * tanh is MKL's vmsTanh in the mode aten's vml::vtanh passes (its result does not depend on where
//   an element sits in the array, measured), or, without MKL, Vectorized<float>::tanh over the
//   whole array as vec::map does. Where only tanh's code is wanted, tanh_codes finds it without
//   tanh (see there).
// * every other operation is one IEEE operation per element in the order the aten calls apply
//   them, and the file is compiled with -ffp-contract=off so that no multiply-add is fused.

#include <torch/extension.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if AT_MKL_ENABLED()
extern "C" void vmsTanh(int n, const float* a, float* r, long long mode);
// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as aten's vml::vtanh
static constexpr long long kVmlMode = 0x2 | 0x140000 | 0x100;
#endif

namespace {

using Vec = at::vec::Vectorized<float>;

void tanh_array(const float* x, float* y, int64_t n) {
#if AT_MKL_ENABLED()
  constexpr int64_t kMaxMkl = std::numeric_limits<int>::max();  // MKL_INT is int (LP64)
  for (int64_t i = 0; i < n; i += kMaxMkl) {
    vmsTanh(static_cast<int>(std::min(kMaxMkl, n - i)), x + i, y + i, kVmlMode);
  }
#else
  at::vec::map([](const Vec& v) { return v.tanh(); }, y, x, n);
#endif
}

// aten's sigmoid on one contiguous inner loop of length n (see the top of the file).
void sigmoid_loop(const float* x, float* y, int64_t n) {
  const Vec one(1.0f);
  int64_t i = 0;
  for (; i <= n - 2 * Vec::size(); i += 2 * Vec::size()) {
    Vec a = Vec::loadu(x + i);
    Vec b = Vec::loadu(x + i + Vec::size());
    (one + a.neg().exp()).reciprocal().store(y + i);
    (one + b.neg().exp()).reciprocal().store(y + i + Vec::size());
  }
  for (; i < n; ++i) {
    y[i] = 1.0f / (1.0f + std::exp(-x[i]));
  }
}

// torch_encode's code of an activation already scaled to u + 0.5 (see StepTables.encode_tanh_):
// NaN -> 0 (nan_to_num), then the truncating cast (u + 0.5 lies in [0.5, L - 0.5]).
inline int32_t code_of(float shifted) {
  return static_cast<int32_t>(std::isnan(shifted) ? 0.0f : shifted);
}

// ---------------------------------------------------------------------------------------------
// The code of tanh(x) without tanh. Where only the code is wanted (the LSTM's g and u), it is a
// non-decreasing step function of x: code_of((tanh(x) + 1) (L - 1) / 2 + 0.5) with tanh_array's
// tanh, monotone as it is correctly rounded to within an ulp. So it equals the number of
// thresholds tau_k (k = 1 .. L-1, the least float whose code is k or more) at or below x, and
// tanh_codes finds that from an approximate code (tanh through SLEEF's exp, far cheaper than MKL's
// tanh, and within one level of the right code) and one comparison on either side. The thresholds
// are found by bisection on tanh_array itself and then checked on every float within 4096 ulps of
// each: outside that window tanh is hundreds of ulps from a level boundary, where a tanh within an
// ulp cannot change a code. Where the check fails, the kernels call tanh_array as before.

// Off: the kernels call tanh_array for every code (set_tanh_thresholds; the tests compare).
bool TANH_THRESHOLDS = true;

// float32 <-> an integer key in the floats' order (-0.0 and +0.0 share key 0).
int64_t order_key(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b >= 0 ? static_cast<int64_t>(b) : -static_cast<int64_t>(b & 0x7FFFFFFF);
}

float from_order_key(int64_t key) {
  const int32_t b = key >= 0 ? static_cast<int32_t>(key)
                             : static_cast<int32_t>(static_cast<uint32_t>(-key) | 0x80000000u);
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

inline int32_t tanh_code_of(float t, float half_span) {
  return code_of((t + 1.0f) * half_span + 0.5f);
}

// [L + 1] thresholds: tau[0] = -inf, tau[1 .. L-1], tau[L] = NaN (no x reaches it); empty where
// the window check fails.
std::vector<float> compute_tanh_thresholds(int64_t levels) {
  const float half_span = static_cast<float>(levels - 1) / 2.0f;
  const int64_t n = levels - 1;
  std::vector<int64_t> lo(n, order_key(-std::numeric_limits<float>::max()));
  std::vector<int64_t> hi(n, order_key(std::numeric_limits<float>::max()));
  std::vector<float> x(n), t(n);
  for (bool open = true; open;) {  // invariant: code(lo) < k <= code(hi)
    open = false;
    for (int64_t i = 0; i < n; ++i) x[i] = from_order_key(lo[i] + (hi[i] - lo[i]) / 2);
    tanh_array(x.data(), t.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      if (hi[i] - lo[i] <= 1) continue;
      const int64_t mid = lo[i] + (hi[i] - lo[i]) / 2;
      (tanh_code_of(t[i], half_span) >= i + 1 ? hi[i] : lo[i]) = mid;
      open = open || hi[i] - lo[i] > 1;
    }
  }
  constexpr int64_t kWindow = 4096;
  std::vector<float> wx(2 * kWindow), wt(2 * kWindow);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = -kWindow; d < kWindow; ++d) wx[d + kWindow] = from_order_key(hi[i] + d);
    tanh_array(wx.data(), wt.data(), 2 * kWindow);
    for (int64_t d = -kWindow; d < kWindow; ++d) {
      if ((tanh_code_of(wt[d + kWindow], half_span) >= i + 1) != (d >= 0)) return {};
    }
  }
  std::vector<float> tau(levels + 1);
  tau[0] = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) tau[i + 1] = from_order_key(hi[i]);
  tau[levels] = std::numeric_limits<float>::quiet_NaN();
  return tau;
}

// The thresholds of `levels`, computed once per process and level count; nullptr where the check
// failed.
const float* tanh_thresholds(int64_t levels) {
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  static std::once_flag once[257];
  static std::vector<float> tables[257];
  std::call_once(once[levels], [levels] { tables[levels] = compute_tanh_thresholds(levels); });
  return tables[levels].empty() ? nullptr : tables[levels].data();
}

// The codes of tanh(x[0 .. n)) into k, by the thresholds tau of `levels`.
void tanh_codes(const float* __restrict x, int32_t* __restrict k, int64_t n, const float* tau,
                int64_t levels) {
  const float half_span = static_cast<float>(levels - 1) / 2.0f;
  const int32_t top = static_cast<int32_t>(levels - 1);
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  const __m512 scale = _mm512_set1_ps(half_span), half = _mm512_set1_ps(0.5f);
  const __m512i zero_i = _mm512_setzero_si512(), top_i = _mm512_set1_epi32(top);
  const __m512 margin = _mm512_set1_ps(1e-3f), one_minus_margin = _mm512_set1_ps(1.0f - 1e-3f);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 e = Vec(_mm512_mul_ps(v, two)).exp();  // tanh = 1 - 2 / (exp(2x) + 1)
    const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
    const __m512 shifted = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(t, one), scale), half);
    const __mmask16 ordered = _mm512_cmp_ps_mask(shifted, shifted, _CMP_ORD_Q);  // NaN -> 0
    const __m512i k0 = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_maskz_cvttps_epi32(ordered, shifted), zero_i), top_i);
    _mm512_storeu_si512(k + i, k0);
    // The approximation is within 2e-4 of the exact scaled value, so k0 is the code unless that
    // value lies within `margin` of an integer (about 0.2 % of lanes): those take the thresholds.
    const __m512 frac = _mm512_sub_ps(shifted, _mm512_roundscale_ps(shifted, _MM_FROUND_TO_ZERO |
                                                                             _MM_FROUND_NO_EXC));
    const __mmask16 near = _mm512_cmp_ps_mask(frac, margin, _CMP_LT_OQ) |
                           _mm512_cmp_ps_mask(frac, one_minus_margin, _CMP_GT_OQ);
    for (uint32_t lanes = near; lanes != 0; lanes &= lanes - 1) {
      const int64_t j = i + __builtin_ctz(lanes);
      k[j] = k[j] + (x[j] >= tau[k[j] + 1]) - (x[j] < tau[k[j]]);
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // As above, 8 lanes at a time (the scalar loop's libm exp took 9 % of a training step).
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  const __m256 scale = _mm256_set1_ps(half_span), half = _mm256_set1_ps(0.5f);
  const __m256i zero_i = _mm256_setzero_si256(), top_i = _mm256_set1_epi32(top);
  const __m256 margin = _mm256_set1_ps(1e-3f), one_minus_margin = _mm256_set1_ps(1.0f - 1e-3f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 e = Vec(_mm256_mul_ps(v, two)).exp();
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
    const __m256 shifted = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(t, one), scale), half);
    // NaN -> 0: the truncating conversion gives INT_MIN there, which the max takes to 0
    const __m256i k0 = _mm256_min_epi32(
        _mm256_max_epi32(_mm256_cvttps_epi32(shifted), zero_i), top_i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(k + i), k0);
    const __m256 frac = _mm256_sub_ps(shifted, _mm256_round_ps(shifted, _MM_FROUND_TO_ZERO |
                                                                        _MM_FROUND_NO_EXC));
    const int near = _mm256_movemask_ps(_mm256_or_ps(
        _mm256_cmp_ps(frac, margin, _CMP_LT_OQ), _mm256_cmp_ps(frac, one_minus_margin, _CMP_GT_OQ)));
    for (uint32_t lanes = static_cast<uint32_t>(near); lanes != 0; lanes &= lanes - 1) {
      const int64_t j = i + __builtin_ctz(lanes);
      k[j] = k[j] + (x[j] >= tau[k[j] + 1]) - (x[j] < tau[k[j]]);
    }
  }
#endif
  for (; i < n; ++i) {
    const float t = 1.0f - 2.0f / (std::exp(2.0f * x[i]) + 1.0f);
    const int32_t k0 = std::min(std::max(code_of((t + 1.0f) * half_span + 0.5f), 0), top);
    k[i] = k0 + (x[i] >= tau[k0 + 1]) - (x[i] < tau[k0]);
  }
}

// Marks an element-wise loop whose iterations are independent: element j of every output depends
// only on element j of the inputs, and where an output aliases an input it is the same element
// (in place). GCC otherwise gives up on loops over many row pointers it cannot prove disjoint (it
// left the backward kernels scalar: about a fifth of a bf16 training step at H=256). Vector and
// scalar code compute the same IEEE operations per element, so the bits do not change.
#define VECTORIZE _Pragma("GCC ivdep")

// clamp(x, -clip, clip) that keeps NaN, as torch.clamp: std::max(x, lo) is (x < lo) ? lo : x and
// std::min(m, hi) is (hi < m) ? hi : m, both x / m where x is NaN (and vectorizable, unlike a
// std::isnan branch).
inline float clamp_cell(float x, float clip) { return std::min(std::max(x, -clip), clip); }

// The loops below are written for the compiler's vectorizer: codes go to int32 scratch first
// (a uint8 store may alias any float, which would keep them scalar) and to uint8 at the end.
void narrow(const int32_t* __restrict src, uint8_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<uint8_t>(src[j]);
}

// Per-thread scratch that outlives the call: the step kernels run once per time step, and a fresh
// buffer per call would be a malloc (and, above glibc's mmap threshold, page faults) every step.
// One buffer per type and slot: a kernel that needs two of a type at once takes two slots.
template <typename T, int Slot = 0>
T* scratch_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

void check_rows(const torch::Tensor& t, const char* name, int64_t bs, int64_t H,
                at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == bs && t.size(1) == H, name, " must be [", bs, ", ", H,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1 || H <= 1, name, " must have unit stride along units");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

}  // namespace

// One LSTM forward step for bs rows.
//   gates   [bs, 4H] float32: the pre-activations i, f, g, o (read only)
//   c_prev  [bs, H] float32
//   c_new   [bs, H] float32, contiguous: c_t = clamp(f c_prev + i g, -cell_clip, cell_clip)
//   m_out   [bs, H] float32: o u with u = discrete_tanh(c_t)
//   k_gates [bs, 4, H] uint8 (any row and plane strides): the codes of i, f, g, o
//   k_u     [bs, H] uint8: u's code
void lstm_forward_step(const torch::Tensor& gates, const torch::Tensor& c_prev,
                       const torch::Tensor& c_new, const torch::Tensor& m_out,
                       const torch::Tensor& k_gates, const torch::Tensor& k_u, int64_t levels,
                       double cell_clip) {
  const int64_t bs = c_prev.size(0), H = c_prev.size(1);
  check_rows(gates, "gates", bs, 4 * H, at::kFloat);
  check_rows(c_prev, "c_prev", bs, H, at::kFloat);
  check_rows(c_new, "c_new", bs, H, at::kFloat);
  check_rows(m_out, "m_out", bs, H, at::kFloat);
  check_rows(k_u, "k_u", bs, H, at::kByte);
  TORCH_CHECK(c_new.is_contiguous(), "c_new must be contiguous");
  TORCH_CHECK(k_gates.dim() == 3 && k_gates.size(0) == bs && k_gates.size(1) == 4 &&
                  k_gates.size(2) == H && k_gates.scalar_type() == at::kByte &&
                  (k_gates.stride(2) == 1 || H <= 1),
              "k_gates must be uint8 [", bs, ", 4, ", H, "] with unit stride along units, got ",
              k_gates.sizes(), " ", k_gates.scalar_type());
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  if (bs == 0 || H == 0) return;

  const float span = static_cast<float>(levels - 1);
  const float half_span = static_cast<float>(levels - 1) / 2.0f;  // exact for L <= 256
  const float clip = static_cast<float>(cell_clip);
  const float* tau = TANH_THRESHOLDS ? tanh_thresholds(levels) : nullptr;
  const float* g_ptr = gates.data_ptr<float>();
  const float* cp_ptr = c_prev.data_ptr<float>();
  float* c_ptr = c_new.data_ptr<float>();
  float* m_ptr = m_out.data_ptr<float>();
  uint8_t* kg_ptr = k_gates.data_ptr<uint8_t>();
  uint8_t* ku_ptr = k_u.data_ptr<uint8_t>();
  const int64_t g_rs = gates.stride(0), cp_rs = c_prev.stride(0), m_rs = m_out.stride(0);
  const int64_t kg_rs = k_gates.stride(0), kg_qs = k_gates.stride(1), ku_rs = k_u.stride(0);

  // Rows are independent; split them only when the step is large enough to pay for threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / (4 * H));
  at::parallel_for(0, bs, grain, [&](int64_t r0, int64_t r1) {
    float* __restrict act = scratch_buffer<float>(6 * H);  // [4, H] activations i, f, g, o
    float* __restrict val = act + 4 * H;           // level values of i and g, then of o
    float* __restrict tanh_c = val + H;            // tanh(c_t)
    int32_t* __restrict k = scratch_buffer<int32_t>(5 * H);  // [5, H] codes i, f, g, o, u
    for (int64_t r = r0; r < r1; ++r) {
      const float* pre = g_ptr + r * g_rs;
      sigmoid_loop(pre, act, H);                   // i
      sigmoid_loop(pre + H, act + H, H);           // f
      sigmoid_loop(pre + 3 * H, act + 3 * H, H);   // o
      for (int64_t j = 0; j < 2 * H; ++j) k[j] = code_of(act[j] * span + 0.5f);  // i, f
      if (tau != nullptr) {  // g: only its code is used
        tanh_codes(pre + 2 * H, k + 2 * H, H, tau, levels);
      } else {
        tanh_array(pre + 2 * H, act + 2 * H, H);
        for (int64_t j = 2 * H; j < 3 * H; ++j) k[j] = tanh_code_of(act[j], half_span);
      }
      for (int64_t j = 3 * H; j < 4 * H; ++j) k[j] = code_of(act[j] * span + 0.5f);  // o
      // i g, from the level values k_i / (L - 1) and (2 k_g - (L - 1)) / (L - 1)
      for (int64_t j = 0; j < H; ++j) {
        const float i_v = static_cast<float>(k[j]) / span;
        const float g_v = static_cast<float>(2 * k[2 * H + j] - (levels - 1)) / span;
        val[j] = i_v * g_v;
      }
      const float* __restrict cp = cp_ptr + r * cp_rs;
      float* __restrict c = c_ptr + r * H;
      VECTORIZE
      for (int64_t j = 0; j < H; ++j) {
        const float f_v = static_cast<float>(k[H + j]) / span;
        const float cv = f_v * cp[j] + val[j];  // two roundings: -ffp-contract=off
        c[j] = clamp_cell(cv, clip);
      }
      if (tau != nullptr) {  // u = tanh(c_t): only its code is used
        tanh_codes(c, k + 4 * H, H, tau, levels);
      } else {
        tanh_array(c, tanh_c, H);
        for (int64_t j = 0; j < H; ++j) k[4 * H + j] = tanh_code_of(tanh_c[j], half_span);
      }
      float* __restrict m = m_ptr + r * m_rs;
      for (int64_t j = 0; j < H; ++j) {
        const int32_t ku_j = k[4 * H + j];
        const float o_v = static_cast<float>(k[3 * H + j]) / span;
        const float u_v = static_cast<float>(2 * ku_j - (levels - 1)) / span;
        m[j] = o_v * u_v;
      }
      uint8_t* kg = kg_ptr + r * kg_rs;
      for (int64_t q = 0; q < 4; ++q) narrow(k + q * H, kg + q * kg_qs, H);
      narrow(k + 4 * H, ku_ptr + r * ku_rs, H);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward of one chunk (discrnn/lstm_function.py, _lstm_backward_chunked, grad="code"): the same
// arithmetic as its aten calls, element for element. Row r of an [R, H] operand starts at
// ptr + r * stride(0); units are contiguous. Codes index the tables unchecked: they come from the
// layer's own code store, where the encoder wrote codes below the number of levels.

namespace {

struct Rows {
  float* ptr;
  int64_t stride;
  float* row(int64_t r) const { return ptr + r * stride; }
};

Rows rows_of(const torch::Tensor& t, const char* name, int64_t R, int64_t H) {
  check_rows(t, name, R, H, at::kFloat);
  return {t.data_ptr<float>(), t.stride(0)};
}

const float* table_of(const torch::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 table of ", n, " entries, got ", t.sizes(), " ",
              t.scalar_type());
  return t.data_ptr<float>();
}

void check_codes(const torch::Tensor& codes, int64_t R, int64_t H) {
  TORCH_CHECK(codes.dim() == 3 && codes.size(0) == R && codes.size(1) >= 4 && codes.size(2) == H &&
                  codes.scalar_type() == at::kByte && (codes.stride(2) == 1 || H <= 1),
              "codes must be uint8 [", R, ", >= 4, ", H, "] with unit stride along units, got ",
              codes.sizes(), " ", codes.scalar_type());
}

int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)); }

}  // namespace

// From the chunk's codes [R, 4, H] (i, f, g, o) by the layer's tables (StepTables): f's value and
// straight-through derivative, g d_i and i d_g (pair tables "b_da", "a_db" at i L + g), i g ("ab"),
// o's value. Outputs [R, H] float32.
void lstm_backward_gather(const torch::Tensor& codes, const torch::Tensor& value_sig,
                          const torch::Tensor& deriv_sig, const torch::Tensor& pair_b_da,
                          const torch::Tensor& pair_a_db, const torch::Tensor& pair_ab,
                          const torch::Tensor& f_v, const torch::Tensor& d_f,
                          const torch::Tensor& g_di, const torch::Tensor& i_dg,
                          const torch::Tensor& i_g, const torch::Tensor& o_v, int64_t levels) {
  const int64_t R = codes.size(0), H = codes.size(2);
  check_codes(codes, R, H);
  const float* val = table_of(value_sig, "value_sig", levels);
  const float* der = table_of(deriv_sig, "deriv_sig", levels);
  const float* b_da = table_of(pair_b_da, "pair_b_da", levels * levels);
  const float* a_db = table_of(pair_a_db, "pair_a_db", levels * levels);
  const float* ab = table_of(pair_ab, "pair_ab", levels * levels);
  const Rows fv = rows_of(f_v, "f_v", R, H), df = rows_of(d_f, "d_f", R, H);
  const Rows gdi = rows_of(g_di, "g_di", R, H), idg = rows_of(i_dg, "i_dg", R, H);
  const Rows ig = rows_of(i_g, "i_g", R, H), ov = rows_of(o_v, "o_v", R, H);
  const uint8_t* k_ptr = codes.data_ptr<uint8_t>();
  const int64_t k_rs = codes.stride(0), k_qs = codes.stride(1);
  const int32_t L = static_cast<int32_t>(levels);
  at::parallel_for(0, R, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* k = k_ptr + r * k_rs;
      float* __restrict fv_r = fv.row(r);
      float* __restrict df_r = df.row(r);
      float* __restrict gdi_r = gdi.row(r);
      float* __restrict idg_r = idg.row(r);
      float* __restrict ig_r = ig.row(r);
      float* __restrict ov_r = ov.row(r);
      VECTORIZE
      for (int64_t j = 0; j < H; ++j) {
        const int32_t ki = k[j], kf = k[k_qs + j], kg = k[2 * k_qs + j], ko = k[3 * k_qs + j];
        const int32_t pair = ki * L + kg;
        fv_r[j] = val[kf];
        df_r[j] = der[kf];
        gdi_r[j] = b_da[pair];
        idg_r[j] = a_db[pair];
        ig_r[j] = ab[pair];
        ov_r[j] = val[ko];
      }
    }
  });
}

// One step of the cell rebuild: raw = f c_prev + i g (two roundings), c_t = clamp(raw) into c_out
// and into c_copy (the chunk's c_t in time order). [bs, H] each; c_out contiguous rows.
void lstm_rebuild_step(const torch::Tensor& f_v, const torch::Tensor& i_g,
                       const torch::Tensor& c_prev, const torch::Tensor& raw_out,
                       const torch::Tensor& c_out, const torch::Tensor& c_copy,
                       double cell_clip) {
  const int64_t bs = c_prev.size(0), H = c_prev.size(1);
  const Rows fv = rows_of(f_v, "f_v", bs, H), ig = rows_of(i_g, "i_g", bs, H);
  const Rows cp = rows_of(c_prev, "c_prev", bs, H), raw = rows_of(raw_out, "raw_out", bs, H);
  const Rows c = rows_of(c_out, "c_out", bs, H), cc = rows_of(c_copy, "c_copy", bs, H);
  TORCH_CHECK(c.stride == H, "c_out must be contiguous");
  const float clip = static_cast<float>(cell_clip);
  for (int64_t r = 0; r < bs; ++r) {
    const float* __restrict fv_r = fv.row(r);
    const float* __restrict ig_r = ig.row(r);
    const float* cp_r = cp.row(r);  // may be c_out's previous contents: read before written
    float* __restrict raw_r = raw.row(r);
    float* c_r = c.row(r);
    float* __restrict cc_r = cc.row(r);
    VECTORIZE
    for (int64_t j = 0; j < H; ++j) {
      const float x = fv_r[j] * cp_r[j] + ig_r[j];
      raw_r[j] = x;
      const float ct = clamp_cell(x, clip);
      c_r[j] = ct;
      cc_r[j] = ct;
    }
  }
}

// After the rebuild, for the whole chunk, from c_all = c_t [R, H] (contiguous): where the clamp
// passed (|raw| <= clip), u's code (the encoding of tanh(c_t), by tanh's code thresholds where they
// passed their check, else tanh_array), o tanh'(c_t) into o_du (may alias raw) with tanh' as
// rnn_torch.tanh_derivative (aten's sigmoid on all of c_all at once: one loop), u d_o and
// m = o u by the pair tables at o L + u, c_prev d_f into p[1], and p, f zeroed where the clamp was
// active (multiplied by 0 or 1, as the aten path does).
void lstm_backward_finish(const torch::Tensor& codes, const torch::Tensor& raw,
                          const torch::Tensor& c_all, const torch::Tensor& o_v,
                          const torch::Tensor& d_f, const torch::Tensor& p,
                          const torch::Tensor& f_v, const torch::Tensor& pair_b_da,
                          const torch::Tensor& pair_ab, const torch::Tensor& o_du,
                          const torch::Tensor& u_do, const torch::Tensor& m, int64_t levels,
                          double cell_clip) {
  const int64_t R = codes.size(0), H = codes.size(2);
  check_codes(codes, R, H);
  TORCH_CHECK(p.dim() == 3 && p.size(0) == 3, "p must be [3, R, H], got ", p.sizes());
  const Rows rw = rows_of(raw, "raw", R, H), ca = rows_of(c_all, "c_all", R, H);
  TORCH_CHECK(c_all.is_contiguous(), "c_all must be contiguous");
  const Rows ov = rows_of(o_v, "o_v", R, H), df = rows_of(d_f, "d_f", R, H);
  const Rows p0 = rows_of(p[0], "p[0]", R, H), p1 = rows_of(p[1], "p[1]", R, H);
  const Rows p2 = rows_of(p[2], "p[2]", R, H), fv = rows_of(f_v, "f_v", R, H);
  const Rows odu = rows_of(o_du, "o_du", R, H), udo = rows_of(u_do, "u_do", R, H);
  const Rows mm = rows_of(m, "m", R, H);
  const float* b_da = table_of(pair_b_da, "pair_b_da", levels * levels);
  const float* ab = table_of(pair_ab, "pair_ab", levels * levels);
  const float clip = static_cast<float>(cell_clip);
  const float half_span = static_cast<float>(levels - 1) / 2.0f;
  const float* tau = TANH_THRESHOLDS ? tanh_thresholds(levels) : nullptr;
  const uint8_t* k_ptr = codes.data_ptr<uint8_t>();
  const int64_t k_rs = codes.stride(0), k_qs = codes.stride(1);
  const int32_t L = static_cast<int32_t>(levels);
  if (R == 0 || H == 0) return;
  // s = sigmoid(-2 |c_t|), all of the chunk in one loop as aten's call on c_all
  float* s = scratch_buffer<float, 1>(R * H);  // slot 1: the row loop below takes slot 0
  const float* c_ptr = ca.ptr;
  for (int64_t i = 0; i < R * H; ++i) s[i] = -2.0f * std::abs(c_ptr[i]);
  sigmoid_loop(s, s, R * H);
  at::parallel_for(0, R, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
    int32_t* __restrict ku = scratch_buffer<int32_t>(H);
    float* __restrict t = scratch_buffer<float>(tau == nullptr ? H : 0);  // tanh(c_t), fallback
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* ko = k_ptr + r * k_rs + 3 * k_qs;
      const float* ca_r = ca.row(r);
      if (tau != nullptr) {
        tanh_codes(ca_r, ku, H, tau, levels);
      } else {
        tanh_array(ca_r, t, H);
        for (int64_t j = 0; j < H; ++j) ku[j] = tanh_code_of(t[j], half_span);
      }
      const float* s_r = s + r * H;
      float* rw_r = rw.row(r);  // o_du may alias it
      const float* ov_r = ov.row(r);
      const float* df_r = df.row(r);
      float* p0_r = p0.row(r);
      float* p1_r = p1.row(r);
      float* p2_r = p2.row(r);
      float* fv_r = fv.row(r);
      float* odu_r = odu.row(r);
      float* udo_r = udo.row(r);
      float* m_r = mm.row(r);
      VECTORIZE
      for (int64_t j = 0; j < H; ++j) {
        const float passed = std::abs(rw_r[j]) <= clip ? 1.0f : 0.0f;
        const int32_t pair = static_cast<int32_t>(ko[j]) * L + ku[j];
        odu_r[j] = (((-s_r[j]) + 1.0f) * s_r[j]) * 4.0f * ov_r[j];
        udo_r[j] = b_da[pair];
        m_r[j] = ab[pair];
        p0_r[j] = p0_r[j] * passed;
        p1_r[j] = (p1_r[j] * df_r[j]) * passed;
        p2_r[j] = p2_r[j] * passed;
        fv_r[j] = fv_r[j] * passed;
      }
    }
  });
}

// One step of the backward recursion: dc = dc_next_f + dm o_du (one rounding, as torch.addcmul),
// the gate gradients dc [g d_i, c_prev d_f, i d_g] (p) and dm u d_o into dgates [bs, 4H], and
// dc f into dcf_out (the next step's dc_next_f).
void lstm_backward_step(const torch::Tensor& dm, const torch::Tensor& dc_in,
                        const torch::Tensor& o_du, const torch::Tensor& u_do,
                        const torch::Tensor& p, const torch::Tensor& f_v,
                        const torch::Tensor& dgates, const torch::Tensor& dcf_out) {
  const int64_t bs = dc_in.size(0), H = dc_in.size(1);
  TORCH_CHECK(p.dim() == 3 && p.size(0) == 3, "p must be [3, bs, H], got ", p.sizes());
  const Rows dmr = rows_of(dm, "dm", bs, H), dc = rows_of(dc_in, "dc_in", bs, H);
  const Rows odu = rows_of(o_du, "o_du", bs, H), udo = rows_of(u_do, "u_do", bs, H);
  const Rows p0 = rows_of(p[0], "p[0]", bs, H), p1 = rows_of(p[1], "p[1]", bs, H);
  const Rows p2 = rows_of(p[2], "p[2]", bs, H), fv = rows_of(f_v, "f_v", bs, H);
  const Rows dg = rows_of(dgates, "dgates", bs, 4 * H), dcf = rows_of(dcf_out, "dcf_out", bs, H);
  for (int64_t r = 0; r < bs; ++r) {
    const float* dm_r = dmr.row(r);
    const float* dc_r = dc.row(r);
    const float* odu_r = odu.row(r);
    const float* udo_r = udo.row(r);
    const float* p0_r = p0.row(r);
    const float* p1_r = p1.row(r);
    const float* p2_r = p2.row(r);
    const float* fv_r = fv.row(r);
    float* __restrict dg_r = dg.row(r);
    float* __restrict dcf_r = dcf.row(r);
    VECTORIZE
    for (int64_t j = 0; j < H; ++j) {
      const float d = std::fma(dm_r[j], odu_r[j], dc_r[j]);
      dg_r[j] = d * p0_r[j];
      dg_r[H + j] = d * p1_r[j];
      dg_r[2 * H + j] = d * p2_r[j];
      dg_r[3 * H + j] = dm_r[j] * udo_r[j];
      dcf_r[j] = d * fv_r[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Whole chunks of steps in one call (discrnn/lstm_function.py): the sequential loops over a
// chunk's steps, where every step has the same bs rows. From Python each step cost about as much
// in interpreter and dispatch overhead as in arithmetic; here the loops make the same aten calls
// for the matrix products (so the same results, bit for bit) and the step kernels' arithmetic.

namespace {

// Conversions between float32 and bfloat16 rows in loops of their own: aten's copy and mixed-dtype
// add cost several microseconds per call before they convert anything, and the bfloat16 products
// need three of them a step. The same bits as aten: bfloat16 -> float32 is exact; float32 ->
// bfloat16 rounds to nearest even on the bits (subnormals included) and gives 0xFFFF for NaN, as
// aten's vectorized conversion does everywhere (measured on this build, tails included).
inline uint16_t bf16_bits(float x) {
  if (std::isnan(x)) return 0xFFFF;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float widen_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// [rows, n] with unit stride along n (or n <= 1), on the CPU.
bool unit_rows(const at::Tensor& t) {
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && t.device().is_cpu();
}

// dst.copy_(src) where one is float32 and the other bfloat16; otherwise aten's copy.
void copy_rows(const at::Tensor& src, at::Tensor dst) {
  const auto from = src.scalar_type(), to = dst.scalar_type();
  const bool narrowing = from == at::kFloat && to == at::kBFloat16;
  if (!(narrowing || (from == at::kBFloat16 && to == at::kFloat)) || !unit_rows(src) ||
      !unit_rows(dst) || !src.sizes().equals(dst.sizes())) {
    dst.copy_(src);
    return;
  }
  const int64_t rows = src.size(0), n = src.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    if (narrowing) {
      const float* s = src.data_ptr<float>() + r * src.stride(0);
      uint16_t* d = reinterpret_cast<uint16_t*>(dst.data_ptr<c10::BFloat16>()) + r * dst.stride(0);
      for (int64_t j = 0; j < n; ++j) d[j] = bf16_bits(s[j]);
    } else {
      const uint16_t* s =
          reinterpret_cast<const uint16_t*>(src.data_ptr<c10::BFloat16>()) + r * src.stride(0);
      float* d = dst.data_ptr<float>() + r * dst.stride(0);
      for (int64_t j = 0; j < n; ++j) d[j] = widen_bf16(s[j]);
    }
  }
}

// torch.add(c, b) for float32 c and bfloat16 b (promoted to float32, then one rounding), into out
// (float32) or a new tensor. The sum's bits are aten's; where both operands are NaN, which NaN's
// payload the result carries may differ.
at::Tensor add_widened(const at::Tensor& c, const at::Tensor& b, at::Tensor out) {
  if (!out.defined()) out = at::empty(c.sizes(), c.options());
  if (c.scalar_type() != at::kFloat || b.scalar_type() != at::kBFloat16 ||
      out.scalar_type() != at::kFloat || !unit_rows(c) || !unit_rows(b) || !unit_rows(out) ||
      !c.sizes().equals(b.sizes()) || !c.sizes().equals(out.sizes())) {
    return at::add_out(out, c, b);
  }
  const int64_t rows = c.size(0), n = c.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* c_r = c.data_ptr<float>() + r * c.stride(0);
    const uint16_t* b_r =
        reinterpret_cast<const uint16_t*>(b.data_ptr<c10::BFloat16>()) + r * b.stride(0);
    float* o_r = out.data_ptr<float>() + r * out.stride(0);
    for (int64_t j = 0; j < n; ++j) o_r[j] = c_r[j] + widen_bf16(b_r[j]);
  }
  return out;
}

}  // namespace

// panel_gemm.cpp
bool panel_products_supported(at::ScalarType dtype);
int64_t panel_vector_floats();
bool set_amx(bool on);
bool set_panel_prefetch(bool on);
at::Tensor amx_weight_grad(const at::Tensor& acc, const at::Tensor& grads, const at::Tensor& rows);
bool uses_amx();
at::Tensor pack_panels(const at::Tensor& weight);
at::Tensor panel_linear(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                        const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& out);
at::Tensor panel_weight_grad(const at::Tensor& acc, const at::Tensor& grads,
                             const at::Tensor& rows);

// codec_cpu.cpp
at::Tensor pack_codes(const at::Tensor& codes, int64_t bits, const std::optional<at::Tensor>& out);
at::Tensor unpack_codes(const at::Tensor& stream, int64_t bits, int64_t numel);
bool set_pdep(bool on);
bool uses_pdep();

namespace {

// oneDNN's linear on a weight prepacked by torch.ops.mkldnn._reorder_linear_weight, through the
// dispatcher (boxed: the ops' C++ signatures differ between torch versions, their schemas don't).
at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& packed) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{a, packed, c10::IValue(), std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor onednn_linear_add(const at::Tensor& a, const at::Tensor& other,
                             const at::Tensor& packed) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  std::vector<c10::IValue> stack{a, other, packed, c10::IValue(), std::string("add")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// discrnn.rnn_function.StepProduct, call for call: a @ W^T with W^T = weight_t ([in, out]), on W's
// panels (panel_gemm.cpp) or oneDNN's packed copy of W where there is one. The products' dtype is
// `result`: W's own, or bfloat16 / float16 for a widened product (rnn_function.widened_products),
// whose weight_t, panels and packed copy are the float32 widening of W: a is rounded to `result`
// and widened, the float32 product (plus c, widened) rounded once to `result`.
struct StepProduct {
  at::Tensor weight_t;
  std::optional<at::Tensor> packed;
  std::optional<at::Tensor> panels;
  at::ScalarType result;
  mutable at::Tensor converted;  // the operand in W's dtype, reused step after step
  mutable at::Tensor rounded;    // a widened product's operand rounded to `result` first
  mutable at::Tensor wide_c;     // a widened product's c in W's dtype

  at::ScalarType dtype() const { return result; }
  at::ScalarType gemm_dtype() const { return weight_t.scalar_type(); }
  bool widened() const { return result != gemm_dtype(); }

  // a.to(result).to(W's dtype), with copy_rows's conversions, into buffers that outlive the step
  // (the products read them and return new tensors, so the next step may overwrite them).
  at::Tensor operand(const at::Tensor& a_in) const {
    at::Tensor a = a_in;
    if (widened() && a.scalar_type() != result) {
      if (!rounded.defined() || !rounded.sizes().equals(a.sizes())) {
        rounded = at::empty(a.sizes(), a.options().dtype(result));
      }
      copy_rows(a, rounded);
      a = rounded;
    }
    if (a.scalar_type() == gemm_dtype()) return a;
    if (!converted.defined() || !converted.sizes().equals(a.sizes())) {
      converted = at::empty(a.sizes(), a.options().dtype(gemm_dtype()));
    }
    copy_rows(a, converted);
    return converted;
  }

  // y (a product in W's dtype) into out, or as a new tensor, in `result`.
  at::Tensor finish(const at::Tensor& y, const at::Tensor& out) const {
    if (out.defined()) {
      // a widened product rounds to `result` whatever out's dtype (as the product would)
      if (widened() && out.scalar_type() != result) {
        at::Tensor r = at::empty(y.sizes(), y.options().dtype(result));
        copy_rows(y, r);
        copy_rows(r, out);
      } else {
        copy_rows(y, out);
      }
      return out;
    }
    if (y.scalar_type() == result) return y;
    at::Tensor r = at::empty(y.sizes(), y.options().dtype(result));
    copy_rows(y, r);
    return r;
  }

  // The panel product into out where out can take it directly.
  at::Tensor on_panels(const at::Tensor& a, const std::optional<at::Tensor>& c,
                       const at::Tensor& out) const {
    const at::Tensor rows = a.stride(-1) == 1 ? a : a.contiguous();
    if (out.defined() && out.scalar_type() == gemm_dtype() && !widened() && unit_rows(out)) {
      return panel_linear(rows, *panels, weight_t.size(1), c, out);
    }
    return finish(panel_linear(rows, *panels, weight_t.size(1), c, std::nullopt), out);
  }

  at::Tensor mm(const at::Tensor& a_in, at::Tensor out = {}) const {
    const at::Tensor a = operand(a_in);
    if (panels) return on_panels(a, std::nullopt, out);
    if (!packed) {
      if (out.defined() && out.scalar_type() == gemm_dtype() && !widened()) {
        return at::mm_out(out, a, weight_t);
      }
      return finish(at::mm(a, weight_t), out);
    }
    return finish(onednn_linear(a, *packed), out);
  }

  // c + a @ W^T: one fused call where c has the products' dtype, else the product rounded to it
  // and added in c's.
  at::Tensor addmm(const at::Tensor& c_in, const at::Tensor& a_in, at::Tensor out = {}) const {
    if (c_in.scalar_type() != dtype()) {
      if (c_in.scalar_type() == at::kFloat && dtype() == at::kBFloat16) {
        return add_widened(c_in, mm(a_in), out);
      }
      return out.defined() ? at::add_out(out, c_in, mm(a_in)) : at::add(c_in, mm(a_in));
    }
    const at::Tensor a = operand(a_in);
    at::Tensor c = c_in;
    if (widened()) {
      if (!wide_c.defined() || !wide_c.sizes().equals(c_in.sizes())) {
        wide_c = at::empty(c_in.sizes(), c_in.options().dtype(gemm_dtype()));
      }
      copy_rows(c_in, wide_c);
      c = wide_c;
    }
    if (panels) return on_panels(a, unit_rows(c) ? c : c.contiguous(), out);
    if (!packed) {
      if (widened()) return finish(at::addmm(c, a, weight_t), out);
      return out.defined() ? at::addmm_out(out, c, a, weight_t) : at::addmm(c, a, weight_t);
    }
    return finish(onednn_linear_add(a, c, *packed), out);
  }
};

void check_offsets(const std::vector<int64_t>& offsets, int64_t bs, int64_t R) {
  for (const int64_t o : offsets) {
    TORCH_CHECK(o >= 0 && o + bs <= R, "step rows [", o, ", ", o + bs, ") outside the chunk's ", R,
                " rows");
  }
}

}  // namespace

// Steps of one forward chunk with one batch size (_lstm_forward_chunked's inner loop), step j's bs
// rows starting at row offsets[j] of the chunk's rows (steps in processing order, rows in time
// order) and at row j bs of the codes (rows in processing order, as the code store keeps them).
//   xproj    [R, 4H]: x W_ih^T + b, in the products' dtype
//   h_in     [bs, P] the layer's dtype, c_in [bs, H] float32: the state the first step reads
//   weight_t, packed, panels: the recurrent StepProduct (W_hh^T; oneDNN's packed W_hh or None;
//            W_hh's panels or None)
//   y        [R, P] the layer's dtype: the chunk's output rows (h_t)
//   w_hr_t   [H, P] or None: the projection (proj_size)
//   k_gates  [S bs, 4, H] uint8, k_u [S bs, H] uint8: the codes of the S steps (lstm_forward_step)
//   preact   [R, 4H] float32 or None: receives the gate pre-activations (grad="exact")
// Returns c of the last step (a tensor of its own: the next chunk's checkpoint).
at::Tensor lstm_forward_steps(const at::Tensor& xproj, const std::vector<int64_t>& offsets,
                              int64_t bs, const at::Tensor& h_in, const at::Tensor& c_in,
                              const at::Tensor& weight_t, const std::optional<at::Tensor>& packed,
                              const std::optional<at::Tensor>& panels,
                              at::ScalarType product_dtype, const at::Tensor& y,
                              const std::optional<at::Tensor>& w_hr_t,
                              const at::Tensor& k_gates, const at::Tensor& k_u,
                              const std::optional<at::Tensor>& preact, int64_t levels,
                              double cell_clip) {
  const int64_t R = y.size(0), H = c_in.size(1);
  TORCH_CHECK(!offsets.empty(), "offsets must name at least one step");
  check_offsets(offsets, bs, R);
  TORCH_CHECK(xproj.dim() == 2 && xproj.size(0) == R && xproj.size(1) == 4 * H,
              "xproj must be [", R, ", ", 4 * H, "], got ", xproj.sizes());
  const int64_t code_rows = static_cast<int64_t>(offsets.size()) * bs;
  TORCH_CHECK(k_gates.size(0) == code_rows && k_u.size(0) == code_rows, "codes must have ",
              code_rows, " rows (the steps' in processing order), got ", k_gates.size(0), " and ",
              k_u.size(0));
  const StepProduct recurrent{weight_t, packed, panels, product_dtype};
  const at::ScalarType dtype = y.scalar_type();
  const bool exact_dtype = dtype == at::kFloat;
  const bool direct = !w_hr_t && exact_dtype;  // m goes straight into y
  const auto f32 = c_in.options().dtype(at::kFloat);
  at::Tensor gates_buf = at::empty({bs, 4 * H}, f32);
  at::Tensor m_buf = direct ? at::Tensor() : at::empty({bs, H}, f32);
  at::Tensor c_bufs[2] = {at::empty({bs, H}, f32), at::empty({bs, H}, f32)};
  // The projection's products widened where the recurrent ones are (rnn_function.mm).
  const at::Tensor w_hr_wide =
      w_hr_t && recurrent.widened() ? w_hr_t->to(recurrent.gemm_dtype()) : at::Tensor();
  at::Tensor h = h_in, c = c_in;
  for (size_t j = 0; j < offsets.size(); ++j) {
    const int64_t o = offsets[j];
    at::Tensor gates = preact ? preact->narrow(0, o, bs) : gates_buf;
    const at::Tensor xp = xproj.narrow(0, o, bs);
    if (exact_dtype) {
      recurrent.addmm(xp, h, gates);
    } else {
      copy_rows(recurrent.addmm(xp, h), gates);
    }
    at::Tensor out = y.narrow(0, o, bs);
    const at::Tensor& c_new = c_bufs[j % 2];
    const at::Tensor m = direct ? out : m_buf;
    const int64_t k = static_cast<int64_t>(j) * bs;  // codes: processing order
    lstm_forward_step(gates, c, c_new, m, k_gates.narrow(0, k, bs), k_u.narrow(0, k, bs), levels,
                      cell_clip);
    if (!direct) {
      if (!w_hr_t) {
        copy_rows(m, out);  // m.to(dtype), then out.copy_: one rounding either way
      } else if (w_hr_wide.defined()) {
        copy_rows(at::mm(m.to(dtype).to(recurrent.gemm_dtype()), w_hr_wide), out);
      } else {
        at::mm_out(out, m.to(dtype), *w_hr_t);
      }
    }
    h = out;
    c = c_new;
  }
  return c;
}

// A backward chunk whose steps have one batch size, in two calls: lstm_rebuild_chunk runs the cell
// rebuild forward in time, lstm_backward_chunk the recursion backward. They give the bits of
// lstm_backward_gather, lstm_rebuild_step, lstm_backward_finish and lstm_backward_step (the path of
// chunks whose batch size changes), but compute each step's table terms (f, g d_i, i d_g, o tanh'(c),
// u d_o, the clamp's mask) inside the recursion from the codes and the rebuilt cell, instead of
// writing eleven [R, H] planes per chunk and reading them back: the chunk keeps c before its clamp,
// m = o u and u's code. All [R, ...] arrays are in time order, step j's bs rows at row offsets[j];
// c_first [bs, H]: c_{t-1} of step 0 (the chunk's checkpoint, or c_0). Level values come from
// decode's division (codec_torch.torch_decode: one rounding, as StepTables' value tables) and a
// pair table's entry is the product of two of them; only the derivative tables are looked up
// (deriv_sig, deriv_tanh [L]: StepTables' "deriv").

namespace {

// sigmoid of x[0 .. n), elements first .. first + n of one aten loop over a longer array whose
// vector body ends at vector_end (the array's length less its remainder of two vectors, see
// sigmoid_loop): the vector arithmetic below it, lane by lane (a lane's result does not depend on
// its neighbours), std::exp at and above it.
void sigmoid_span(const float* x, float* y, int64_t n, int64_t first, int64_t vector_end) {
  const int64_t nv = std::min(std::max<int64_t>(vector_end - first, 0), n);
  const Vec one(1.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= nv; i += Vec::size()) {
    (one + Vec::loadu(x + i).neg().exp()).reciprocal().store(y + i);
  }
  if (i < nv) {
    const int64_t rest = nv - i;
    (one + Vec::loadu(x + i, rest).neg().exp()).reciprocal().store(y + i, rest);
  }
  for (i = nv; i < n; ++i) y[i] = 1.0f / (1.0f + std::exp(-x[i]));
}

struct ChunkRows {
  const uint8_t* codes;
  int64_t k_rs, k_qs;
};

ChunkRows chunk_codes(const at::Tensor& codes, int64_t R, int64_t H) {
  check_codes(codes, R, H);
  return {codes.data_ptr<uint8_t>(), codes.stride(0), codes.stride(1)};
}

}  // namespace

// The cell rebuild: per step raw = f c_prev + i g (two roundings) into raw_out, c_t = clamp(raw),
// u's code (tanh_codes of c_t, row by row as lstm_backward_finish) into k_u_out and m = o u into
// m_out. Rows are independent: each thread takes whole rows through every step.
void lstm_rebuild_chunk(const at::Tensor& codes, const at::Tensor& c_first,
                        const std::vector<int64_t>& offsets, int64_t bs, const at::Tensor& raw_out,
                        const at::Tensor& m_out, const at::Tensor& k_u_out, int64_t levels,
                        double cell_clip) {
  const int64_t R = raw_out.size(0), H = c_first.size(1);
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  TORCH_CHECK(!offsets.empty(), "offsets must name at least one step");
  check_offsets(offsets, bs, R);
  const ChunkRows k = chunk_codes(codes, R, H);
  const Rows cf = rows_of(c_first, "c_first", bs, H);
  const Rows rw = rows_of(raw_out, "raw_out", R, H), mo = rows_of(m_out, "m_out", R, H);
  check_rows(k_u_out, "k_u_out", R, H, at::kByte);
  uint8_t* ku_ptr = k_u_out.data_ptr<uint8_t>();
  const int64_t ku_rs = k_u_out.stride(0);
  const float clip = static_cast<float>(cell_clip);
  const float span = static_cast<float>(levels - 1);
  const int32_t top = static_cast<int32_t>(levels - 1);
  const float half_span = static_cast<float>(levels - 1) / 2.0f;
  const float* tau = TANH_THRESHOLDS ? tanh_thresholds(levels) : nullptr;
  const int64_t S = static_cast<int64_t>(offsets.size());
  if (bs == 0 || H == 0) return;
  at::parallel_for(0, bs, row_grain(4 * H * S), [&](int64_t r0, int64_t r1) {
    float* c = scratch_buffer<float>(2 * H);  // c_t of the row's latest step (also read as c_prev)
    float* __restrict t = c + H;               // tanh(c_t), fallback
    int32_t* __restrict ku = scratch_buffer<int32_t>(H);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < S; ++j) {
        const int64_t row = offsets[j] + r;
        const uint8_t* ki = k.codes + row * k.k_rs;
        const uint8_t* kf = ki + k.k_qs;
        const uint8_t* kg = ki + 2 * k.k_qs;
        const uint8_t* ko = ki + 3 * k.k_qs;
        const float* cp = j == 0 ? cf.row(r) : c;  // read before written, element by element
        float* __restrict raw = rw.row(row);
        // i g: the "ab" table's entry, the product of the two values
        VECTORIZE
        for (int64_t e = 0; e < H; ++e) {
          const float f_v = static_cast<float>(kf[e]) / span;
          const float i_g = (static_cast<float>(ki[e]) / span) *
                            (static_cast<float>(2 * kg[e] - top) / span);
          const float x = f_v * cp[e] + i_g;
          raw[e] = x;
          c[e] = clamp_cell(x, clip);
        }
        if (tau != nullptr) {
          tanh_codes(c, ku, H, tau, levels);
        } else {
          tanh_array(c, t, H);
          for (int64_t e = 0; e < H; ++e) ku[e] = tanh_code_of(t[e], half_span);
        }
        float* __restrict m = mo.row(row);
        uint8_t* __restrict ku_out = ku_ptr + row * ku_rs;
        VECTORIZE
        for (int64_t e = 0; e < H; ++e) {
          m[e] = (static_cast<float>(ko[e]) / span) * (static_cast<float>(2 * ku[e] - top) / span);
        }
        narrow(ku, ku_out, H);
      }
    }
  });
}

// The recursion, steps S-1 .. 0: per step (below S-1, whose dm and dc the caller passes in, as
// the state gradients may come from another batch size) dh = dy + dgates_next W_hh (the
// StepProduct of W_hh^T: weight_t, packed, panels; into dh_out's rows where given), dm = dh (or
// dh W_hr), dc = the previous step's dc f; then, element by element, what lstm_backward_finish and
// lstm_backward_step compute: the clamp's mask (|raw| <= clip, as 1 or 0), o tanh'(c_t) with
// s = sigmoid(-2 |c_t|) at the element's place in aten's one loop over the chunk's c_t, dc =
// dc + dm o tanh'(c_t) (std::fma, as lstm_backward_step), the gate gradients dc [g d_i,
// c_{t-1} d_f, i d_g] (each term times the mask) and dm u d_o into dgates [R, 4H], dc f (f times
// the mask). Returns dc f of step 0 (a tensor of its own: the next chunk's).
//   codes [R, >= 4, H] uint8; k_u [R, H] uint8; raw [R, H] float32 (lstm_rebuild_chunk's)
//   dys [R, P] float32; dm_last, dc_last [bs, H]; dh_out [R, P] or None; w_hr [P, H] or None
at::Tensor lstm_backward_chunk(const at::Tensor& codes, const at::Tensor& k_u,
                               const at::Tensor& raw, const at::Tensor& c_first,
                               const std::vector<int64_t>& offsets, int64_t bs,
                               const at::Tensor& dys, const at::Tensor& dm_last,
                               const at::Tensor& dc_last, const at::Tensor& dgates,
                               const at::Tensor& deriv_sig, const at::Tensor& deriv_tanh,
                               const at::Tensor& weight_t, const std::optional<at::Tensor>& packed,
                               const std::optional<at::Tensor>& panels, at::ScalarType product_dtype,
                               const std::optional<at::Tensor>& dh_out,
                               const std::optional<at::Tensor>& w_hr, int64_t levels,
                               double cell_clip) {
  const int64_t R = raw.size(0), H = c_first.size(1);
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  TORCH_CHECK(!offsets.empty(), "offsets must name at least one step");
  check_offsets(offsets, bs, R);
  const ChunkRows k = chunk_codes(codes, R, H);
  check_rows(k_u, "k_u", R, H, at::kByte);
  const Rows rw = rows_of(raw, "raw", R, H), cf = rows_of(c_first, "c_first", bs, H);
  const Rows dg = rows_of(dgates, "dgates", R, 4 * H);
  rows_of(dm_last, "dm_last", bs, H);
  rows_of(dc_last, "dc_last", bs, H);
  const uint8_t* ku_ptr = k_u.data_ptr<uint8_t>();
  const int64_t ku_rs = k_u.stride(0);
  const float* der_sig = table_of(deriv_sig, "deriv_sig", levels);
  const float* der_tanh = table_of(deriv_tanh, "deriv_tanh", levels);
  const float clip = static_cast<float>(cell_clip);
  const float span = static_cast<float>(levels - 1);
  const int32_t top = static_cast<int32_t>(levels - 1);
  // lstm_backward_finish's sigmoid runs one loop over the chunk's R H values of c_t
  const int64_t vector_end = R * H - (R * H) % (2 * Vec::size());
  const StepProduct recurrent{weight_t, packed, panels, product_dtype};
  const auto f32 = c_first.options();
  at::Tensor dcf_bufs[2] = {at::empty({bs, H}, f32), at::empty({bs, H}, f32)};
  at::Tensor dcf_in = dc_last;
  const int64_t S = static_cast<int64_t>(offsets.size());
  for (int64_t j = S - 1; j >= 0; --j) {
    const int64_t o = offsets[j];
    at::Tensor dm = dm_last;
    if (j < S - 1) {
      const at::Tensor dh =
          recurrent.addmm(dys.narrow(0, o, bs), dgates.narrow(0, offsets[j + 1], bs),
                          dh_out ? dh_out->narrow(0, o, bs) : at::Tensor());
      dm = w_hr ? at::mm(dh, *w_hr) : dh;
    }
    const Rows dmr = rows_of(dm, "dm", bs, H), dc = rows_of(dcf_in, "dc", bs, H);
    const at::Tensor& dcf_out = dcf_bufs[j % 2];
    const Rows dcf = rows_of(dcf_out, "dcf", bs, H);
    const float* cp_rows = j == 0 ? nullptr : rw.row(offsets[j - 1]);
    at::parallel_for(0, bs, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
      float* __restrict s = scratch_buffer<float>(2 * H);
      float* __restrict c_prev = s + H;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = o + r;
        const float* rw_r = rw.row(row);
        for (int64_t e = 0; e < H; ++e) s[e] = -2.0f * std::abs(clamp_cell(rw_r[e], clip));
        sigmoid_span(s, s, H, row * H, vector_end);
        const uint8_t* ki = k.codes + row * k.k_rs;
        const uint8_t* kf = ki + k.k_qs;
        const uint8_t* kg = ki + 2 * k.k_qs;
        const uint8_t* ko = ki + 3 * k.k_qs;
        const uint8_t* ku = ku_ptr + row * ku_rs;
        const float* cp_raw = cp_rows == nullptr ? nullptr : cp_rows + r * rw.stride;
        const float* c0 = cf.row(r);
        const float* dm_r = dmr.row(r);
        const float* dc_r = dc.row(r);
        float* __restrict dg_r = dg.row(row);
        float* __restrict dcf_r = dcf.row(r);
        const float* cp = c0;
        if (cp_raw != nullptr) {  // c_{t-1}: the previous step's c_t
          for (int64_t e = 0; e < H; ++e) c_prev[e] = clamp_cell(cp_raw[e], clip);
          cp = c_prev;
        }
        // the pair tables' entries "b_da" (g d_i, u d_o) and "a_db" (i d_g) as their one product
        VECTORIZE
        for (int64_t e = 0; e < H; ++e) {
          const float passed = std::abs(rw_r[e]) <= clip ? 1.0f : 0.0f;
          const float i_v = static_cast<float>(ki[e]) / span;
          const float f_v = static_cast<float>(kf[e]) / span;
          const float g_v = static_cast<float>(2 * kg[e] - top) / span;
          const float o_v = static_cast<float>(ko[e]) / span;
          const float u_v = static_cast<float>(2 * ku[e] - top) / span;
          const float o_du = (((-s[e]) + 1.0f) * s[e]) * 4.0f * o_v;
          const float d = std::fma(dm_r[e], o_du, dc_r[e]);
          dg_r[e] = d * ((g_v * der_sig[ki[e]]) * passed);
          dg_r[H + e] = d * ((cp[e] * der_sig[kf[e]]) * passed);
          dg_r[2 * H + e] = d * ((i_v * der_tanh[kg[e]]) * passed);
          dg_r[3 * H + e] = dm_r[e] * (u_v * der_sig[ko[e]]);
          dcf_r[e] = d * (f_v * passed);
        }
      }
    });
    dcf_in = dcf_out;
  }
  return dcf_in;
}

// ---------------------------------------------------------------------------------------------
// GRU forward step (kernels/rnn_torch.py, GRUForwardStep): r and z as two [bs, H] planes whose
// sigmoid runs one inner loop of bs * H each (the aten call's loop shape), then n, h and their codes.
//   gx_rz   [bs, 2, H] float32: x W_ih^T + b_ih for r, z (any row and plane strides)
//   gx_n    [bs, H] float32: the same for n
//   gh      [bs, 3H] float32: h_prev W_hh^T + b_hh
//   h_prev  [bs, H] float32
//   k_rz    [2, bs, H] uint8: r's and z's codes (any plane and row strides); k_n, k_h [bs, H] uint8
//   h_out   [bs, H] float32: h_t, snapped to the tanh grid
//   pre_out [bs, 3H] float32 or an empty tensor: the pre-activations of r, z, n (grad="exact")
void gru_forward_step(const torch::Tensor& gx_rz, const torch::Tensor& gx_n,
                      const torch::Tensor& gh, const torch::Tensor& h_prev,
                      const torch::Tensor& k_rz, const torch::Tensor& k_n,
                      const torch::Tensor& k_h, const torch::Tensor& h_out,
                      const torch::Tensor& pre_out, int64_t levels) {
  const int64_t bs = h_prev.size(0), H = h_prev.size(1);
  TORCH_CHECK(gx_rz.dim() == 3 && gx_rz.size(0) == bs && gx_rz.size(1) == 2 && gx_rz.size(2) == H &&
                  gx_rz.scalar_type() == at::kFloat && (gx_rz.stride(2) == 1 || H <= 1),
              "gx_rz must be float32 [", bs, ", 2, ", H, "] with unit stride along units, got ",
              gx_rz.sizes(), " ", gx_rz.scalar_type());
  TORCH_CHECK(k_rz.dim() == 3 && k_rz.size(0) == 2 && k_rz.size(1) == bs && k_rz.size(2) == H &&
                  k_rz.scalar_type() == at::kByte && (k_rz.stride(2) == 1 || H <= 1),
              "k_rz must be uint8 [2, ", bs, ", ", H, "] with unit stride along units, got ",
              k_rz.sizes(), " ", k_rz.scalar_type());
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  const Rows gxn = rows_of(gx_n, "gx_n", bs, H), ghr = rows_of(gh, "gh", bs, 3 * H);
  const Rows hp = rows_of(h_prev, "h_prev", bs, H), ho = rows_of(h_out, "h_out", bs, H);
  check_rows(k_n, "k_n", bs, H, at::kByte);
  check_rows(k_h, "k_h", bs, H, at::kByte);
  const bool keep_pre = pre_out.numel() > 0;
  const Rows pre = keep_pre ? rows_of(pre_out, "pre_out", bs, 3 * H) : Rows{nullptr, 0};
  if (bs == 0 || H == 0) return;

  const float span = static_cast<float>(levels - 1);
  const float half_span = static_cast<float>(levels - 1) / 2.0f;
  const int64_t n = bs * H;
  float* __restrict rz_pre = scratch_buffer<float>(5 * n);  // [2, n]: r, z pre-activations
  float* __restrict rz = rz_pre + 2 * n;       // [2, n]: sigmoid, then level values
  float* __restrict nv = rz + 2 * n;           // [n]: n's pre-activation, then tanh
  int32_t* __restrict k = scratch_buffer<int32_t>(4 * n);  // codes r, z, n, h
  const float* gxrz = gx_rz.data_ptr<float>();
  const int64_t gxrz_rs = gx_rz.stride(0), gxrz_qs = gx_rz.stride(1);
  for (int64_t r = 0; r < bs; ++r) {
    for (int64_t q = 0; q < 2; ++q) {
      const float* gx = gxrz + r * gxrz_rs + q * gxrz_qs;
      const float* g = ghr.row(r) + q * H;
      float* dst = rz_pre + q * n + r * H;
      for (int64_t j = 0; j < H; ++j) dst[j] = gx[j] + g[j];
      if (keep_pre) std::copy(dst, dst + H, pre.row(r) + q * H);
    }
  }
  sigmoid_loop(rz_pre, rz, n);          // r
  sigmoid_loop(rz_pre + n, rz + n, n);  // z
  // Two loops: as one, GCC's if-conversion of code_of failed and left it scalar.
  for (int64_t i = 0; i < 2 * n; ++i) k[i] = code_of(rz[i] * span + 0.5f);
  for (int64_t i = 0; i < 2 * n; ++i) rz[i] = static_cast<float>(k[i]) / span;
  const float* r_v = rz;
  const float* z_v = rz + n;
  for (int64_t r = 0; r < bs; ++r) {
    const float* g_n = ghr.row(r) + 2 * H;
    const float* x_n = gxn.row(r);
    float* dst = nv + r * H;
    for (int64_t j = 0; j < H; ++j) dst[j] = r_v[r * H + j] * g_n[j] + x_n[j];  // two roundings
    if (keep_pre) std::copy(dst, dst + H, pre.row(r) + 2 * H);
  }
  const float* tau = TANH_THRESHOLDS ? tanh_thresholds(levels) : nullptr;
  if (tau != nullptr) {  // n: only its code is used
    tanh_codes(nv, k + 2 * n, n, tau, levels);
  } else {
    tanh_array(nv, nv, n);
    for (int64_t i = 0; i < n; ++i) k[2 * n + i] = tanh_code_of(nv[i], half_span);
  }
  const float top = span;  // encode's clamp of h to [0, L - 1] (h need not be a tanh output)
  for (int64_t r = 0; r < bs; ++r) {
    const float* h_p = hp.row(r);
    float* h_o = ho.row(r);
    for (int64_t j = 0; j < H; ++j) {
      const int64_t i = r * H + j;
      const int32_t kn = k[2 * n + i];
      const float n_v = static_cast<float>(2 * kn - (levels - 1)) / span;
      const float h = (1.0f - z_v[i]) * n_v + z_v[i] * h_p[j];
      float u = (h + 1.0f) * half_span + 0.5f;
      if (!std::isnan(u)) u = std::min(std::max(u, 0.0f), top);
      const int32_t kh = code_of(u);
      k[3 * n + i] = kh;
      h_o[j] = static_cast<float>(2 * kh - (levels - 1)) / span;
    }
  }
  uint8_t* krz = k_rz.data_ptr<uint8_t>();
  const int64_t krz_qs = k_rz.stride(0), krz_rs = k_rz.stride(1);
  for (int64_t r = 0; r < bs; ++r) {
    narrow(k + r * H, krz + r * krz_rs, H);
    narrow(k + n + r * H, krz + krz_qs + r * krz_rs, H);
    narrow(k + 2 * n + r * H, k_n.data_ptr<uint8_t>() + r * k_n.stride(0), H);
    narrow(k + 3 * n + r * H, k_h.data_ptr<uint8_t>() + r * k_h.stride(0), H);
  }
}

// table[code] of plane q of codes [R, Q, H] into out [R, H] (e.g. h's values as the layer's dtype
// rounds them, StepTables.table("output", "tanh")).
void lookup_plane(const torch::Tensor& codes, int64_t q, const torch::Tensor& table,
                  const torch::Tensor& out) {
  const int64_t R = codes.size(0), H = codes.size(2);
  TORCH_CHECK(codes.dim() == 3 && q >= 0 && q < codes.size(1) && codes.scalar_type() == at::kByte &&
                  (codes.stride(2) == 1 || H <= 1),
              "codes must be uint8 [R, > ", q, ", H] with unit stride along units, got ",
              codes.sizes(), " ", codes.scalar_type());
  const float* t = table_of(table, "table", table.numel());
  const Rows o = rows_of(out, "out", R, H);
  const uint8_t* k_ptr = codes.data_ptr<uint8_t>() + q * codes.stride(1);
  const int64_t k_rs = codes.stride(0);
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* k = k_ptr + r * k_rs;
    float* __restrict o_r = o.row(r);
    VECTORIZE
    for (int64_t j = 0; j < H; ++j) o_r[j] = t[static_cast<int32_t>(k[j])];
  }
}

// GRU backward, one chunk (discrnn/gru_function.py, grad="code"), from the codes [R, 4, H] (r, z,
// n, h), h_{t-1} and h_{t-1} W_hn^T + b_hn [R, H]: kk = [(1 - z) d_n gh_n d_r, (h_prev - n) d_z,
// (1 - z) d_n r] [3, R, H], z's values and a_n = (1 - z) d_n (pair table "a_n" at z L + n).
void gru_backward_prep(const torch::Tensor& codes, const torch::Tensor& h_prev,
                       const torch::Tensor& gh_n, const torch::Tensor& value_sig,
                       const torch::Tensor& deriv_sig, const torch::Tensor& value_tanh,
                       const torch::Tensor& pair_a_n, const torch::Tensor& kk,
                       const torch::Tensor& z_v, const torch::Tensor& a_n, int64_t levels) {
  const int64_t R = codes.size(0), H = codes.size(2);
  check_codes(codes, R, H);
  TORCH_CHECK(kk.dim() == 3 && kk.size(0) == 3, "kk must be [3, R, H], got ", kk.sizes());
  const float* val_s = table_of(value_sig, "value_sig", levels);
  const float* der_s = table_of(deriv_sig, "deriv_sig", levels);
  const float* val_t = table_of(value_tanh, "value_tanh", levels);
  const float* an_t = table_of(pair_a_n, "pair_a_n", levels * levels);
  const Rows hp = rows_of(h_prev, "h_prev", R, H), ghn = rows_of(gh_n, "gh_n", R, H);
  const Rows k0 = rows_of(kk[0], "kk[0]", R, H), k1 = rows_of(kk[1], "kk[1]", R, H);
  const Rows k2 = rows_of(kk[2], "kk[2]", R, H), zv = rows_of(z_v, "z_v", R, H);
  const Rows an = rows_of(a_n, "a_n", R, H);
  const uint8_t* k_ptr = codes.data_ptr<uint8_t>();
  const int64_t k_rs = codes.stride(0), k_qs = codes.stride(1);
  const int32_t L = static_cast<int32_t>(levels);
  at::parallel_for(0, R, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* k = k_ptr + r * k_rs;
      const float* hp_r = hp.row(r);
      const float* ghn_r = ghn.row(r);
      float* __restrict k0_r = k0.row(r);
      float* __restrict k1_r = k1.row(r);
      float* __restrict k2_r = k2.row(r);
      float* __restrict zv_r = zv.row(r);
      float* __restrict an_r = an.row(r);
      VECTORIZE
      for (int64_t j = 0; j < H; ++j) {
        const int32_t kr = k[j], kz = k[k_qs + j], kn = k[2 * k_qs + j];
        const float a = an_t[kz * L + kn];
        k0_r[j] = (a * ghn_r[j]) * der_s[kr];
        k1_r[j] = (hp_r[j] - val_t[kn]) * der_s[kz];
        k2_r[j] = a * val_s[kr];
        zv_r[j] = val_s[kz];
        an_r[j] = a;
      }
    }
  });
}

// Whether the kernels code tanh by thresholds (where they pass their check); returns the old value.
bool set_tanh_thresholds(bool on) {
  const bool old = TANH_THRESHOLDS;
  TANH_THRESHOLDS = on;
  return old;
}

// The thresholds of `levels` (float32 [levels + 1]), or an empty tensor where their check failed.
at::Tensor tanh_code_thresholds(int64_t levels) {
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  const float* tau = tanh_thresholds(levels);
  if (tau == nullptr) return at::empty({0});
  return at::from_blob(const_cast<float*>(tau), {levels + 1}, at::kFloat).clone();
}

// The codes of tanh(x) the forward step gives (x float32, any shape): by the thresholds where
// they are on, else from tanh_array. For rnn_cpu.py's self-check and the tests.
at::Tensor tanh_code(const at::Tensor& x, int64_t levels) {
  TORCH_CHECK(levels >= 2 && levels <= 256, "levels must be in [2, 256], got ", levels);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 on the CPU");
  const at::Tensor xc = x.contiguous();
  at::Tensor k = at::empty(x.sizes(), x.options().dtype(at::kInt));
  const int64_t n = xc.numel();
  const float* tau = TANH_THRESHOLDS ? tanh_thresholds(levels) : nullptr;
  if (tau != nullptr) {
    tanh_codes(xc.data_ptr<float>(), k.data_ptr<int32_t>(), n, tau, levels);
  } else {
    std::vector<float> t(n);
    tanh_array(xc.data_ptr<float>(), t.data(), n);
    const float half_span = static_cast<float>(levels - 1) / 2.0f;
    int32_t* kp = k.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) kp[i] = tanh_code_of(t[i], half_span);
  }
  return k;
}

// The index of the first of `tensors` (CPU) holding a NaN or an infinity, or -1: a layer call's
// value check (discrnn.rnn's _check_values, check_finite) in one call, where aten's takes four
// dispatched calls per tensor (about 0.15 ms for an LSTM layer's seven). Contiguous float32 by a
// scan of the exponent bits; other floating dtypes and layouts through aten; integers are finite.
int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "first_nonfinite: tensor ", i, " is on ", t.device(),
                ", not the CPU");
    if (t.numel() == 0 || !at::isFloatingType(t.scalar_type())) continue;
    bool finite;
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
      const float* p = t.data_ptr<float>();
      const int64_t n = t.numel();
      uint32_t bad = 0;
      VECTORIZE
      for (int64_t j = 0; j < n; ++j) {
        uint32_t bits;
        std::memcpy(&bits, p + j, sizeof(bits));
        bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      }
      finite = bad == 0;
    } else {
      finite = at::isfinite(t).all().item<bool>();
    }
    if (!finite) return static_cast<int64_t>(i);
  }
  return -1;
}

// The chunk loops' float32 <-> bfloat16 conversions, for rnn_cpu.py's self-check and the tests.
void convert_rows(const at::Tensor& src, const at::Tensor& dst) { copy_rows(src, dst); }

at::Tensor add_bfloat16(const at::Tensor& c, const at::Tensor& b) {
  return add_widened(c, b, at::Tensor());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward_step", &lstm_forward_step, "Fused discrete LSTM forward step (CPU)");
  m.def("lstm_backward_gather", &lstm_backward_gather, "A backward chunk's table lookups (CPU)");
  m.def("lstm_rebuild_step", &lstm_rebuild_step, "One step of backward's cell rebuild (CPU)");
  m.def("lstm_backward_finish", &lstm_backward_finish, "A backward chunk's u terms and masks (CPU)");
  m.def("lstm_backward_step", &lstm_backward_step, "One step of the backward recursion (CPU)");
  m.def("lstm_forward_steps", &lstm_forward_steps, "The steps of a forward chunk (CPU)");
  m.def("lstm_rebuild_chunk", &lstm_rebuild_chunk, "The cell rebuild of a backward chunk (CPU)");
  m.def("lstm_backward_chunk", &lstm_backward_chunk, "The recursion of a backward chunk (CPU)");
  m.def("set_tanh_thresholds", &set_tanh_thresholds, "Code tanh by thresholds (CPU)");
  m.def("tanh_code_thresholds", &tanh_code_thresholds, "tanh's code thresholds of L levels");
  m.def("tanh_code", &tanh_code, "The codes of tanh(x) as the forward step gives them (CPU)");
  m.def("first_nonfinite", &first_nonfinite,
        "Index of the first tensor holding NaN or an infinity, or -1 (CPU)");
  m.def("convert_rows", &convert_rows, "dst.copy_(src), float32 <-> bfloat16 rows (CPU)");
  m.def("add_bfloat16", &add_bfloat16, "float32 + bfloat16 rows, as torch.add (CPU)");
  m.def("panel_vector_floats", &panel_vector_floats,
        "The float32 panel kernels' vector width: 16 (AVX-512), 8 (AVX2), 0 (none)");
  m.def("panel_products_supported", &panel_products_supported,
        "Whether panel_linear runs for a dtype on this CPU");
  m.def("set_amx", &set_amx, "Let bfloat16 panel products run on AMX where present; the old setting");
  m.def("amx_weight_grad", &amx_weight_grad,
        "acc += bf16(grads^T @ rows), bfloat16 operands on AMX (CPU)");
  m.def("set_panel_prefetch", &set_panel_prefetch,
        "Let float32 panel products prefetch a large weight's next panel; the old setting");
  m.def("uses_amx", &uses_amx, "Whether bfloat16 panel products run on AMX on this CPU");
  m.def("pack_panels", &pack_panels, "A weight [N, K] packed for panel_linear (CPU)");
  m.def("panel_linear", &panel_linear, "a @ W^T (+ c) on W's panels (CPU)", py::arg("a"),
        py::arg("panels"), py::arg("n"), py::arg("c") = py::none(), py::arg("out") = py::none());
  m.def("panel_weight_grad", &panel_weight_grad, "acc += grads^T @ rows on panels (CPU)");
  m.def("pack_codes", &pack_codes, "codec_torch.torch_pack's stream of uint8 codes (CPU)",
        py::arg("codes"), py::arg("bits"), py::arg("out") = py::none());
  m.def("unpack_codes", &unpack_codes, "codec_torch.torch_unpack (CPU)");
  m.def("set_pdep", &set_pdep, "Let the codec use BMI2's pext / pdep where fast; the old setting");
  m.def("uses_pdep", &uses_pdep, "Whether the codec uses BMI2's pext / pdep on this CPU");
  m.def("gru_forward_step", &gru_forward_step, "Fused discrete GRU forward step (CPU)");
  m.def("lookup_plane", &lookup_plane, "Table values of one plane of codes (CPU)");
  m.def("gru_backward_prep", &gru_backward_prep, "A GRU backward chunk's per-unit terms (CPU)");
}

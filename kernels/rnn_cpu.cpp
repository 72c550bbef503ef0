// Fused CPU step of the discrete LSTM (see kernels/rnn_cpu.py, which builds and loads this file).
//
// One call does the element-wise work of one forward step, which the torch path spreads over about
// twenty aten calls (kernels/rnn_torch.py, LSTMForwardStep): gate activations, their codes and
// level values, the clamped cell update, tanh(c_t), u's code and m = o u. It reproduces those calls
// bit for bit (rnn_cpu.py checks that on load and refuses the kernel otherwise):
//
// * sigmoid is aten's cpu_kernel_vec on one inner loop of length H per (row, gate plane): the
//   vector body 1 / (1 + exp(-x)) with Vectorized<float>::exp (SLEEF) in steps of two vectors, the
//   tail in scalar code with std::exp. Compiled for the CPU capability aten dispatches to, so the
//   vectors are the same width as aten's.
// * tanh is MKL's vmsTanh in the mode aten's vml::vtanh passes (its result does not depend on where
//   an element sits in the array, measured), or, without MKL, Vectorized<float>::tanh over the whole
//   array as vec::map does.
// * every other operation is one IEEE operation per element in the order the aten calls apply
//   them, and the file is compiled with -ffp-contract=off so that no multiply-add is fused.

#include <torch/extension.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
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
  vmsTanh(static_cast<int>(n), x, y, kVmlMode);
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

// The loops below are written for the compiler's vectorizer: codes go to int32 scratch first
// (a uint8 store may alias any float, which would keep them scalar) and to uint8 at the end.
void narrow(const int32_t* __restrict src, uint8_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<uint8_t>(src[j]);
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
    std::vector<float> scratch(6 * H);
    std::vector<int32_t> code_scratch(5 * H);
    float* __restrict act = scratch.data();        // [4, H] activations i, f, g, o
    float* __restrict val = act + 4 * H;           // level values of i and g, then of o
    float* __restrict tanh_c = val + H;            // tanh(c_t)
    int32_t* __restrict k = code_scratch.data();   // [5, H] codes i, f, g, o, u
    for (int64_t r = r0; r < r1; ++r) {
      const float* pre = g_ptr + r * g_rs;
      sigmoid_loop(pre, act, H);                   // i
      sigmoid_loop(pre + H, act + H, H);           // f
      tanh_array(pre + 2 * H, act + 2 * H, H);     // g
      sigmoid_loop(pre + 3 * H, act + 3 * H, H);   // o
      for (int64_t j = 0; j < 2 * H; ++j) k[j] = code_of(act[j] * span + 0.5f);  // i, f
      for (int64_t j = 2 * H; j < 3 * H; ++j) k[j] = code_of((act[j] + 1.0f) * half_span + 0.5f);
      for (int64_t j = 3 * H; j < 4 * H; ++j) k[j] = code_of(act[j] * span + 0.5f);  // o
      // i g, from the level values k_i / (L - 1) and (2 k_g - (L - 1)) / (L - 1)
      for (int64_t j = 0; j < H; ++j) {
        const float i_v = static_cast<float>(k[j]) / span;
        const float g_v = static_cast<float>(2 * k[2 * H + j] - (levels - 1)) / span;
        val[j] = i_v * g_v;
      }
      const float* __restrict cp = cp_ptr + r * cp_rs;
      float* __restrict c = c_ptr + r * H;
      for (int64_t j = 0; j < H; ++j) {
        const float f_v = static_cast<float>(k[H + j]) / span;
        const float cv = f_v * cp[j] + val[j];  // two roundings: -ffp-contract=off
        c[j] = std::isnan(cv) ? cv : std::min(std::max(cv, -clip), clip);
      }
      tanh_array(c, tanh_c, H);
      float* __restrict m = m_ptr + r * m_rs;
      for (int64_t j = 0; j < H; ++j) {
        const int32_t ku_j = code_of((tanh_c[j] + 1.0f) * half_span + 0.5f);
        k[4 * H + j] = ku_j;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward_step", &lstm_forward_step, "Fused discrete LSTM forward step (CPU)");
}

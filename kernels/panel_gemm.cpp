// Small-batch matrix products on a prepacked weight: the recurrences' per-step products a @ W^T,
// a of a few rows (the batch) and W of up to a few million values, reused step after step.
//
// Why not aten's: at 16 rows torch.addmm (MKL) reaches about 72 of the core's ~100 GFLOP/s in
// float32, and oneDNN's linear on a prepacked weight (torch.ops.mkldnn._linear_pointwise) loses
// ~13 us per call to ideep's bookkeeping before any arithmetic, a fifth of a bfloat16 product at
// H=256. The layers run three such products per step. Measured (2-core AMD EPYC Zen 4, one thread,
// 16 rows; us per product, here / oneDNN prepacked / addmm): H=256 float32 79 / 97 / 118, bfloat16
// 41 / 58; H=1024 float32 1361 / 1529 / 2905, bfloat16 603 / 649. From about 256 rows oneDNN is
// 3-10 % faster, so the layers use these products up to 64 rows (rnn_function._MAX_PANEL_ROWS).
//
// Layout: W ([N, K], torch's linear layout) is cut into panels of kPanelCols output columns; a
// float32 panel holds, for each k, its kPanelCols values W[n, k] side by side ([P, K, 48]); a
// bfloat16 panel holds pairs (W[n, 2k'], W[n, 2k' + 1]) side by side for each k' ([P, ceil(K/2),
// 48, 2]), the operand layout of AVX512-BF16's vdpbf16ps. Columns past N and an odd K's last
// pair are zero. A tile of up to 8 rows x 48 columns is 24 vector accumulators; each k loads three
// vectors of the panel and broadcasts one value (float32) or pair (bfloat16) per row.
//
// Results: each output sums its K products in order k = 0, 1, ... in float32 with fused
// multiply-adds (bfloat16: vdpbf16ps, two products per instruction, as oneDNN's kernels; on the
// machine above the bfloat16 results equal oneDNN's bit for bit), then adds c in float32 and, for
// bfloat16, rounds once to nearest even (aten's conversion; NaN -> 0xFFFF). The order does not
// depend on the number of threads: threads split the panels, never a sum. float32 results differ
// from torch.addmm's by rounding (MKL sums in another order).
//
// Only built for AVX-512 (rnn_cpu.py compiles the extension for the capability aten dispatches
// to); bfloat16 also needs AVX512-BF16 at run time. panel_products_supported says which.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace {

constexpr int kPanelVectors = 3;
constexpr int64_t kPanelCols = 16 * kPanelVectors;
constexpr int kTileRows = 8;

int64_t panel_count(int64_t n) { return (n + kPanelCols - 1) / kPanelCols; }

// Whether the spans of memory t and u reach (first to last element) intersect.
bool shares_memory(const at::Tensor& t, const at::Tensor& u) {
  auto span = [](const at::Tensor& x) {
    const char* lo = static_cast<const char*>(x.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < x.dim(); ++d) last += (x.size(d) - 1) * x.stride(d);
    return std::make_pair(lo, lo + (last + 1) * x.element_size());
  };
  const auto [t0, t1] = span(t);
  const auto [u0, u1] = span(u);
  return t0 < u1 && u0 < t1;
}

uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>());
}

#if defined(CPU_CAPABILITY_AVX512)

__mmask16 column_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : left <= 0 ? static_cast<__mmask16>(0)
                                : static_cast<__mmask16>((1u << left) - 1);
}

// noinline: inlined into panel_linear's loop, GCC keeps the accumulators in memory (2.6x slower).
// V: the vectors of the panel the tile computes, 3 but in the last panel of an N that is not a
// multiple of 48, whose 16 or 32 columns would otherwise cost a whole panel's multiply-adds
// (N = H = 256 in the LSTM's backward product: 6 panels' work for 5.33, 84 against 73 us).
// KMajor: a's element (i, k) lies at a[k * lda + i] (a transposed operand, e.g. the gate
// gradients of a weight gradient dgates^T @ rows, read where they lie instead of copied), else at
// a[i * lda + k].
template <int Rows, int V = kPanelVectors, bool KMajor = false>
__attribute__((noinline)) void float_tile(const float* a, int64_t lda, const float* panel,
                                          int64_t K, const float* c, int64_t ldc, float* y,
                                          int64_t ldy, int64_t cols) {
  __m512 acc[Rows][V];
  for (int i = 0; i < Rows; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(panel + k * kPanelCols + 16 * v);
    for (int i = 0; i < Rows; ++i) {
      const __m512 ai = _mm512_set1_ps(KMajor ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(ai, b[v], acc[i][v]);
    }
  }
  // A mask of 0 loads and stores nothing.
  for (int v = 0; v < V; ++v) {
    const __mmask16 m = column_mask(cols - 16 * v);
    for (int i = 0; i < Rows; ++i) {
      __m512 r = acc[i][v];
      if (c) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, c + i * ldc + 16 * v));
      _mm512_mask_storeu_ps(y + i * ldy + 16 * v, m, r);
    }
  }
}

// aten's float32 -> bfloat16 conversion (round to nearest even on the bits, 0xFFFF for NaN).
inline __m256i round_to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <int Rows, int V>
__attribute__((target("avx512bf16"))) inline void bf16_pair_step(
    __m512 (&acc)[Rows][V], const int32_t (&pairs)[Rows], const uint16_t* panel_k) {
  __m512bh b[V];
  for (int v = 0; v < V; ++v) {
    b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel_k + 32 * v));
  }
  for (int i = 0; i < Rows; ++i) {
    const __m512bh ai = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[i]));
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, b[v]);
  }
}

// V as float_tile's.
template <int Rows, int V = kPanelVectors>
__attribute__((target("avx512bf16"), noinline)) void bf16_tile(const uint16_t* a, int64_t lda,
                                                    const uint16_t* panel, int64_t K,
                                                    const uint16_t* c, int64_t ldc, uint16_t* y,
                                                    int64_t ldy, int64_t cols) {
  __m512 acc[Rows][V];
  for (int i = 0; i < Rows; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  int32_t pairs[Rows];
  const int64_t full_pairs = K / 2;
  for (int64_t k = 0; k < full_pairs; ++k) {
    for (int i = 0; i < Rows; ++i) std::memcpy(&pairs[i], a + i * lda + 2 * k, sizeof(int32_t));
    bf16_pair_step<Rows, V>(acc, pairs, panel + k * kPanelCols * 2);
  }
  if (K % 2) {  // the last value pairs with zero (so does the panel's)
    for (int i = 0; i < Rows; ++i) pairs[i] = a[i * lda + K - 1];
    bf16_pair_step<Rows, V>(acc, pairs, panel + full_pairs * kPanelCols * 2);
  }
  for (int v = 0; v < V; ++v) {
    const __mmask16 m = column_mask(cols - 16 * v);
    for (int i = 0; i < Rows; ++i) {
      __m512 r = acc[i][v];
      if (c) r = _mm512_add_ps(r, widen_bf16(_mm256_maskz_loadu_epi16(m, c + i * ldc + 16 * v)));
      _mm256_mask_storeu_epi16(y + i * ldy + 16 * v, m, round_to_bf16(r));
    }
  }
}

// One tile of `rows` (1 .. kTileRows) rows.
template <typename T, template <int> class Tile>
void tile_of(int64_t rows, const T* a, int64_t lda, const T* panel, int64_t K, const T* c,
             int64_t ldc, T* y, int64_t ldy, int64_t cols) {
  switch (rows) {
#define DISCRNN_TILE_CASE(R) \
  case R:                    \
    Tile<R>::run(a, lda, panel, K, c, ldc, y, ldy, cols); \
    break;
    DISCRNN_TILE_CASE(1)
    DISCRNN_TILE_CASE(2)
    DISCRNN_TILE_CASE(3)
    DISCRNN_TILE_CASE(4)
    DISCRNN_TILE_CASE(5)
    DISCRNN_TILE_CASE(6)
    DISCRNN_TILE_CASE(7)
    DISCRNN_TILE_CASE(8)
#undef DISCRNN_TILE_CASE
    default:
      break;
  }
}

// One panel's columns for all M rows: tiles of kTileRows rows, then one of the rest. Row m of a
// starts at a + m * a_row (lda for a row-major a, 1 for a k-major one).
template <typename T, template <int> class Tile>
void panel_rows(const T* a, int64_t lda, int64_t a_row, const T* panel, int64_t K, const T* c,
                int64_t ldc, T* y, int64_t ldy, int64_t cols, int64_t M) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) {
    Tile<kTileRows>::run(a + m * a_row, lda, panel, K, c ? c + m * ldc : nullptr, ldc,
                         y + m * ldy, ldy, cols);
  }
  if (m < M) {
    tile_of<T, Tile>(M - m, a + m * a_row, lda, panel, K, c ? c + m * ldc : nullptr, ldc,
                     y + m * ldy, ldy, cols);
  }
}

// Calls tile(std::integral_constant<int, V>) with the fewest vectors V that hold `cols` columns.
template <typename Tile>
void with_vectors(int64_t cols, Tile&& tile) {
  if (cols > 32) {
    tile(std::integral_constant<int, 3>{});
  } else if (cols > 16) {
    tile(std::integral_constant<int, 2>{});
  } else {
    tile(std::integral_constant<int, 1>{});
  }
}

template <int Rows>
struct FloatTile {
  static void run(const float* a, int64_t lda, const float* panel, int64_t K, const float* c,
                  int64_t ldc, float* y, int64_t ldy, int64_t cols) {
    with_vectors(cols, [&](auto v) {
      float_tile<Rows, decltype(v)::value>(a, lda, panel, K, c, ldc, y, ldy, cols);
    });
  }
};

template <int Rows>
struct KMajorFloatTile {
  static void run(const float* a, int64_t lda, const float* panel, int64_t K, const float* c,
                  int64_t ldc, float* y, int64_t ldy, int64_t cols) {
    with_vectors(cols, [&](auto v) {
      float_tile<Rows, decltype(v)::value, true>(a, lda, panel, K, c, ldc, y, ldy, cols);
    });
  }
};

template <int Rows>
struct BFloat16Tile {
  static void run(const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t K,
                  const uint16_t* c, int64_t ldc, uint16_t* y, int64_t ldy, int64_t cols) {
    with_vectors(cols, [&](auto v) {
      bf16_tile<Rows, decltype(v)::value>(a, lda, panel, K, c, ldc, y, ldy, cols);
    });
  }
};

// Rows [g0, g1) kGroupRows at a time, all panels, of a product with a k-major a (float32): a weight gradient, whose K (the rows
// it sums over, T B) runs to thousands. The sum runs in blocks of kKBlock k, each block's sum added
// to the output (c, then y): a block's panel rows stay in L2 (a pass over all of K took 1.9x
// MKL's time at K=4096) and the rounding error stays near MKL's (a running sum grows it with K).
// a is copied a block of kGroupRows rows at a time into tiles' order: read where it lies, each
// tile's k rows are lda apart (4H floats, a multiple of 4 KiB at H=256), too far for the
// prefetcher, and share a handful of L1 sets.
constexpr int64_t kKBlock = 512;
constexpr int64_t kGroupRows = 8 * kTileRows;

void k_major_rows(const float* a, int64_t lda, const float* panels, int64_t panel_size,
                    int64_t K, const float* c, int64_t ldc, float* y, int64_t ldy, int64_t n,
                    int64_t M, int64_t g0, int64_t g1) {
  const int64_t P = (n + kPanelCols - 1) / kPanelCols;
  thread_local std::vector<float> block_buffer;
  block_buffer.resize(kKBlock * kGroupRows + 16);
  float* a_block = block_buffer.data();  // [tile][k][kTileRows]
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKBlock) {  // K = 0: y = c (or 0) once
    const int64_t kc = std::min(kKBlock, K - k0);
    for (int64_t g = g0; g < g1; g += kGroupRows) {
      const int64_t tiles = (std::min(kGroupRows, M - g) + kTileRows - 1) / kTileRows;
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a + (k0 + k) * lda + g;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t rows = std::min<int64_t>(kTileRows, M - g - t * kTileRows);
          const __mmask8 row_mask = static_cast<__mmask8>((1u << rows) - 1);
          _mm256_storeu_ps(a_block + (t * kc + k) * kTileRows,
                           _mm256_maskz_loadu_ps(row_mask, src + t * kTileRows));
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = g + t * kTileRows, rows = std::min<int64_t>(kTileRows, M - m);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, n - n0);
          float* y_mn = y + m * ldy + n0;
          const float* c_mn = k0 > 0 ? y_mn : c ? c + m * ldc + n0 : nullptr;
          tile_of<float, KMajorFloatTile>(rows, a_block + t * kc * kTileRows, kTileRows,
                                          panels + p * panel_size + k0 * kPanelCols, kc, c_mn,
                                          k0 > 0 ? ldy : ldc, y_mn, ldy, cols);
        }
      }
    }
  }
}

#endif  // CPU_CAPABILITY_AVX512

bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool panel_products_supported(at::ScalarType dtype) {
#if defined(CPU_CAPABILITY_AVX512)
  return dtype == at::kFloat || (dtype == at::kBFloat16 && cpu_has_avx512_bf16());
#else
  (void)dtype;
  return false;
#endif
}

// weight [N, K] (any strides), float32 or bfloat16 -> its panels (see the top of the file).
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(),
              "pack_panels: weight must be a 2-D CPU tensor, got ", weight.sizes(), " on ",
              weight.device());
  TORCH_CHECK(panel_products_supported(weight.scalar_type()),
              "pack_panels: no panel products for ", weight.scalar_type(), " on this CPU");
  const int64_t N = weight.size(0), K = weight.size(1), P = panel_count(N);
  const int64_t sn = weight.stride(0), sk = weight.stride(1);
  if (weight.scalar_type() == at::kFloat) {
    at::Tensor out = at::zeros({P, K, kPanelCols}, weight.options());
    const float* w = weight.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* panel = dst + p * K * kPanelCols;
        const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
        if (sk == 1) {  // read along k
          for (int64_t j = 0; j < cols; ++j) {
            const float* row = w + (p * kPanelCols + j) * sn;
            for (int64_t k = 0; k < K; ++k) panel[k * kPanelCols + j] = row[k];
          }
        } else {
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t j = 0; j < cols; ++j) {
              panel[k * kPanelCols + j] = w[(p * kPanelCols + j) * sn + k * sk];
            }
          }
        }
      }
    });
    return out;
  }
  const int64_t K2 = (K + 1) / 2;
  at::Tensor out = at::zeros({P, K2, kPanelCols, 2}, weight.options());
  const uint16_t* w = bf16_data(weight);
  uint16_t* dst = bf16_data(out);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint16_t* panel = dst + p * K2 * kPanelCols * 2;
      const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
      if (sk == 1) {
        for (int64_t j = 0; j < cols; ++j) {
          const uint16_t* row = w + (p * kPanelCols + j) * sn;
          for (int64_t k = 0; k < K; ++k) panel[((k / 2) * kPanelCols + j) * 2 + k % 2] = row[k];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < cols; ++j) {
            panel[((k / 2) * kPanelCols + j) * 2 + k % 2] = w[(p * kPanelCols + j) * sn + k * sk];
          }
        }
      }
    }
  });
  return out;
}

// a @ W^T (+ c) in W's dtype, W given by its panels and its N output columns; into out where
// given (c may be out itself: each element is read before it is written). a [M, K], c and out
// [M, N], all of W's dtype, c and out of unit stride along their last dimension, a along its last
// dimension or (float32 only) its first: a = g.t() for a row-major g [K, M] is read in place, so
// a weight gradient acc += g^T @ rows is panel_linear(g.t(), pack_panels(rows.t()), .., acc, acc).
at::Tensor panel_linear(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                        const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& out) {
  const at::ScalarType dtype = panels.scalar_type();
  const bool is_float = dtype == at::kFloat;
  TORCH_CHECK(panel_products_supported(dtype), "panel_linear: no panel products for ", dtype,
              " on this CPU");
  TORCH_CHECK(panels.dim() == (is_float ? 3 : 4) && panels.size(2) == kPanelCols &&
                  panels.is_contiguous() && panels.size(0) == panel_count(n) && n > 0,
              "panel_linear: panels ", panels.sizes(), " are not pack_panels' of ", n, " columns");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == dtype, "panel_linear: a must be [M, K] ", dtype,
              ", got ", a.sizes(), " ", a.scalar_type());
  const int64_t M = a.size(0), K = a.size(1);
  const bool k_major = !(K <= 1 || a.stride(1) == 1) && (M <= 1 || a.stride(0) == 1);
  TORCH_CHECK(K <= 1 || a.stride(1) == 1 || (k_major && is_float),
              "panel_linear: a must have unit stride along K", is_float ? " or M" : "",
              ", got strides ", a.strides(), " for ", a.sizes());
  const int64_t lda = k_major ? a.stride(1) : a.stride(0), a_row = k_major ? 1 : lda;
  TORCH_CHECK(is_float ? panels.size(1) == K : panels.size(1) == (K + 1) / 2,
              "panel_linear: a has ", K, " columns, the panels another K");
  auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == n && t.scalar_type() == dtype &&
                    (n <= 1 || t.stride(1) == 1) && t.device().is_cpu(),
                "panel_linear: ", name, " must be [", M, ", ", n, "] ", dtype,
                " rows of unit stride, got ", t.sizes(), " ", t.scalar_type());
  };
  if (c) check_rows(*c, "c");
  at::Tensor y = out ? *out : at::empty({M, n}, a.options());
  if (out) {
    check_rows(y, "out");
    TORCH_CHECK(!(M > 0 && K > 0 && n > 0 && shares_memory(a, y)),
                "panel_linear: out overlaps a (a is read until the last output is written)");
  }
  if (M == 0) return y;
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t P = panels.size(0);
  const int64_t panel_size = panels.numel() / P;
  const int64_t ldc = c ? c->stride(0) : 0;
  // A panel is M K 48 multiply-adds; below ~64k per thread's share the threads cost more.
  const int64_t work = std::max<int64_t>(1, M * K * kPanelCols);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work);
  if (k_major) {  // threads split the rows (a weight's outputs: thousands), never a sum
    const int64_t groups = (M + kGroupRows - 1) / kGroupRows;
    const int64_t group_work = std::max<int64_t>(1, kGroupRows * K * n);
    at::parallel_for(0, groups, std::max<int64_t>(1, (int64_t{1} << 16) / group_work),
                     [&](int64_t i0, int64_t i1) {
                       k_major_rows(a.data_ptr<float>(), lda, panels.data_ptr<float>(),
                                    panel_size, K, c ? c->data_ptr<float>() : nullptr, ldc,
                                    y.data_ptr<float>(), y.stride(0), n, M, i0 * kGroupRows,
                                    std::min(M, i1 * kGroupRows));
                     });
    return y;
  }
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, n - n0);
      if (is_float) {
        panel_rows<float, FloatTile>(a.data_ptr<float>(), lda, a_row,
                                     panels.data_ptr<float>() + p * panel_size, K,
                                     c ? c->data_ptr<float>() + n0 : nullptr, ldc,
                                     y.data_ptr<float>() + n0, y.stride(0), cols, M);
      } else {
        panel_rows<uint16_t, BFloat16Tile>(bf16_data(a), lda, a_row,
                                           bf16_data(panels) + p * panel_size, K,
                                           c ? bf16_data(*c) + n0 : nullptr, ldc,
                                           bf16_data(y) + n0, y.stride(0), cols, M);
      }
    }
  });
#endif
  return y;
}

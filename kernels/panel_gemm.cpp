// Small-batch matrix products on a prepacked weight: the recurrences' per-step products a @ W^T,
// a of a few rows (the batch) and W of up to a few million values, reused step after step; on
// the same tiles, the chunk-wide products where oneDNN's prepacked route does not run (float32
// weights up to 1 MiB: there they beat torch.mm, see rnn_function.chunk_product) and the layers'
// float32 weight gradients (panel_weight_grad, at the end).
//
// Why not aten's: at 16 rows torch.addmm (MKL) reaches about 72 of the core's ~100 GFLOP/s in
// float32, and oneDNN's linear on a prepacked weight (torch.ops.mkldnn._linear_pointwise) loses
// ~13 us per call to ideep's bookkeeping before any arithmetic, a fifth of a bfloat16 product at
// H=256. The layers run three such products per step. Measured (2-core AMD EPYC Zen 4, one thread,
// 16 rows; us per product, here / oneDNN prepacked / addmm): H=256 float32 79 / 97 / 118, bfloat16
// 41 / 58; H=1024 float32 1361 / 1529 / 2905, bfloat16 603 / 649. From about 256 rows oneDNN is
// 3-10 % faster, so the layers' per-step products use them up to 64 rows
// (rnn_function._MAX_PANEL_ROWS).
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
// On a CPU with AMX-BF16 (Intel Sapphire Rapids and later) the bfloat16 products run on AMX's
// tiles instead, on the same panels (see amx_panel_sums): 16 rows x 48 columns per panel, 32 k
// per tile product, the same sums in float32, c added and the result rounded as above.
//
// Built for AVX-512 and, float32 only, for AVX2 (rnn_cpu.py compiles the extension for the
// capability aten dispatches to); bfloat16 also needs AVX512-BF16 at run time.
// panel_products_supported says which. AVX2 has 16 vector registers of 8 floats: its tiles are 4
// rows x 24 columns (half a panel; 12 accumulators, 3 panel vectors, 1 broadcast), on the same
// panel layout. Measured on a 2-core AMD EPYC Zen 3, one thread: 16 x 256 @ 256 x 1024 in about 110
// us alone (75 GFLOP/s of the core's 92) and 114-155 us through panel_linear against
// torch.addmm's 148-210, but at 512 rows MKL is as fast or faster
// (rnn_cpu.panels_for_large_products).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define DISCRNN_PANELS 1
#else
#define DISCRNN_PANELS 0
#endif

// AMX (Intel Sapphire Rapids and later) for the bfloat16 products: compilers that know its
// intrinsics (GCC 11, clang 12), on Linux (which hands out the tile state on request).
#if defined(CPU_CAPABILITY_AVX512) && defined(__linux__) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DISCRNN_AMX 1
#else
#define DISCRNN_AMX 0
#endif

namespace {

constexpr int kPanelVectors = 3;
constexpr int64_t kPanelCols = 16 * kPanelVectors;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 8;
#else
// AVX2's 16 vector registers: 4 rows x 24 columns (12 accumulators, 3 panel vectors, 1 broadcast)
constexpr int kTileRows = 4;
#endif

int64_t panel_count(int64_t n) { return (n + kPanelCols - 1) / kPanelCols; }

// The panel after the one a float32 tile computes, to prefetch into L2 as it goes, or null; set
// by panel_linear for a weight too large for L2 (read from L3 or memory in every product).
thread_local const float* tl_prefetch_panel = nullptr;
bool PREFETCH_PANELS = true;

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

// r[i][j] -> r[j][i]: unpack pairs of rows, then quads within 128-bit lanes, then the lanes.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int m = 0; m < 8; ++m) {
    t[2 * m] = _mm512_unpacklo_ps(r[2 * m], r[2 * m + 1]);
    t[2 * m + 1] = _mm512_unpackhi_ps(r[2 * m], r[2 * m + 1]);
  }
  __m512 u[16];  // u[4 m + q], 128-bit lane L: rows 4 m .. 4 m + 3 at k = 4 L + q
  for (int m = 0; m < 4; ++m) {
    u[4 * m] = _mm512_shuffle_ps(t[4 * m], t[4 * m + 2], 0x44);
    u[4 * m + 1] = _mm512_shuffle_ps(t[4 * m], t[4 * m + 2], 0xEE);
    u[4 * m + 2] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0x44);
    u[4 * m + 3] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xEE);
    r[q] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[8 + q] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + q] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

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
  const float* next = tl_prefetch_panel;
  for (int64_t k = 0; k < K; ++k) {
    if (next) {  // the next panel into L2 while this one is read from it (see panel_linear)
      for (int l = 0; l < kPanelVectors; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanelCols + 16 * l), _MM_HINT_T1);
      }
    }
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

#if DISCRNN_AMX

// bfloat16 products on AMX's tiles. The bfloat16 panels are already AMX's operand layout: a
// tile of 16 pairs of k x 16 columns is 16 rows of 64 bytes, kPanelCols * 4 bytes apart. Per
// panel and up to 16 rows: tiles 0-2 the sums of its three 16-column vectors, tile 3 a's 32 k
// (16 pairs), tiles 4-5 the panel's pairs (alternating, so a load need not wait for the last
// product), tiles 6-7 a's and the panel's last pairs past the blocks of 16 (a's copied with zeros
// past K: an odd K's last pair would read past the row). Each output sums its pairs in k's order
// in float32, then c is added and the sum rounded as bf16_tile does. A 16 x 256 @ 256 x 1024
// product takes about 6 us against bf16_tile's ~90 and oneDNN's ~35 (AMX as well, through ideep)
// on a 2-core Xeon with AMX (Sapphire Rapids class).
bool USE_AMX = true;

bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
    // Linux gives a process the tile state only once asked (ARCH_REQ_XCOMP_PERM, XTILEDATA).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return has;
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int kAmxPairs = 16;                     // pairs of k per block (a tile row: 64 bytes)
constexpr int64_t kPanelPairBytes = kPanelCols * 4;  // a panel's row of one pair, 48 columns

__attribute__((target("amx-tile,amx-bf16"))) void amx_configure(int rows, int tail_pairs) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) {  // three sums and a's block: `rows` rows of 16 floats / pairs
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = kAmxPairs;
    cfg.colsb[t] = 64;
  }
  if (tail_pairs > 0) {
    cfg.rows[6] = static_cast<uint8_t>(rows);
    cfg.colsb[6] = static_cast<uint16_t>(tail_pairs * 4);
    cfg.rows[7] = static_cast<uint8_t>(tail_pairs);
    cfg.colsb[7] = 64;
  }
  // Not _tile_loadconfig: GCC 12's declares only the config's first 8 bytes read, and drops the
  // stores of the rows and columns as dead (the tiles then stay unconfigured: #UD).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

// The sums of one panel's first V vectors for the configured rows, into sums ([16][48] floats).
template <int V>
__attribute__((target("amx-tile,amx-bf16"))) void amx_panel_sums(
    const uint16_t* a, int64_t lda_bytes, const uint16_t* a_tail, const uint16_t* panel,
    int64_t blocks, bool tail, float* sums) {
  _tile_zero(0);
  if constexpr (V > 1) _tile_zero(1);
  if constexpr (V > 2) _tile_zero(2);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* b = panel + kb * kAmxPairs * kPanelCols * 2;
    _tile_loadd(3, a + 2 * kAmxPairs * kb, lda_bytes);
    _tile_loadd(4, b, kPanelPairBytes);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (V > 1) {
      _tile_loadd(5, b + 32, kPanelPairBytes);
      _tile_dpbf16ps(1, 3, 5);
    }
    if constexpr (V > 2) {
      _tile_loadd(4, b + 64, kPanelPairBytes);
      _tile_dpbf16ps(2, 3, 4);
    }
  }
  if (tail) {
    const uint16_t* b = panel + blocks * kAmxPairs * kPanelCols * 2;
    _tile_loadd(6, a_tail, 64);
    _tile_loadd(7, b, kPanelPairBytes);
    _tile_dpbf16ps(0, 6, 7);
    if constexpr (V > 1) {
      _tile_loadd(7, b + 32, kPanelPairBytes);
      _tile_dpbf16ps(1, 6, 7);
    }
    if constexpr (V > 2) {
      _tile_loadd(7, b + 64, kPanelPairBytes);
      _tile_dpbf16ps(2, 6, 7);
    }
  }
  _tile_stored(0, sums, kPanelCols * 4);
  if constexpr (V > 1) _tile_stored(1, sums + 16, kPanelCols * 4);
  if constexpr (V > 2) _tile_stored(2, sums + 32, kPanelCols * 4);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// Panels [p0, p1) of y = a @ W^T (+ c), all M rows, on AMX.
void amx_panel_range(const uint16_t* a, int64_t lda, const uint16_t* panels, int64_t panel_size,
                     int64_t K, const uint16_t* c, int64_t ldc, uint16_t* y, int64_t ldy,
                     int64_t n, int64_t M, int64_t p0, int64_t p1) {
  // Blocks of 32 k read from a's rows where they lie; the rest (an odd K's last pair included,
  // whose second value would lie past the row) from the zero-padded copy.
  const int64_t blocks = K / (2 * kAmxPairs);
  const int64_t tail_k = K - 2 * kAmxPairs * blocks;
  const int tail_pairs = static_cast<int>((tail_k + 1) / 2);
  alignas(64) uint16_t a_tail[kAmxPairs * 2 * kAmxPairs];
  alignas(64) float sums[kAmxPairs * kPanelCols];
  for (int64_t m0 = 0; m0 < M; m0 += kAmxPairs) {
    const int rows = static_cast<int>(std::min<int64_t>(kAmxPairs, M - m0));
    const uint16_t* a_rows = a + m0 * lda;
    if (tail_pairs > 0) {
      std::memset(a_tail, 0, sizeof(a_tail));
      for (int i = 0; i < rows; ++i) {
        std::memcpy(a_tail + i * 2 * kAmxPairs, a_rows + i * lda + 2 * kAmxPairs * blocks,
                    tail_k * sizeof(uint16_t));
      }
    }
    amx_configure(rows, tail_pairs);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, n - n0);
      const uint16_t* panel = panels + p * panel_size;
      with_vectors(cols, [&](auto v) {
        amx_panel_sums<decltype(v)::value>(a_rows, lda * 2, a_tail, panel, blocks,
                                           tail_pairs > 0, sums);
      });
      for (int64_t v = 0; 16 * v < cols; ++v) {
        const __mmask16 mask = column_mask(cols - 16 * v);
        for (int i = 0; i < rows; ++i) {
          __m512 r = _mm512_loadu_ps(sums + i * kPanelCols + 16 * v);
          if (c) {
            r = _mm512_add_ps(
                r, widen_bf16(_mm256_maskz_loadu_epi16(mask, c + (m0 + i) * ldc + n0 + 16 * v)));
          }
          _mm256_mask_storeu_epi16(y + (m0 + i) * ldy + n0 + 16 * v, mask, round_to_bf16(r));
        }
      }
    }
  }
  amx_release();
}


// bfloat16 weight gradients on AMX: acc [M, N] (float32) += grads [R, M]^T @ rows [R, N], the
// product summed in float32 and rounded once to bfloat16 before it is added (as the layers' aten
// route: a bfloat16 mm, then add_ into the float32 accumulator). Both operands are repacked into
// tile order, R padded with zero pairs: rows as pairs of consecutive rows interleaved ([N/16]
// [pairs][16][2], shared by the threads), grads per 16 output rows by the same interleave and a
// 16 x 16 transpose of its 32-bit pairs (a tile row holds one output's 32 k). Threads split the
// output rows, never a sum. Tiles: 0-3 the sums of 64 columns, 4 the grads' block, 5-6 rows'.
constexpr int64_t kAmxBlock = 16 * 32;  // values in one tile of 16 x 32 bfloat16

__attribute__((target("amx-tile,amx-bf16"))) void amx_configure_grads() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

template <int V>
__attribute__((target("amx-tile,amx-bf16"))) void amx_grad_sums(const uint16_t* a,
                                                                const uint16_t* b,
                                                                int64_t blocks,
                                                                int64_t b_stride, float* sums) {
  _tile_zero(0);
  if constexpr (V > 1) _tile_zero(1);
  if constexpr (V > 2) _tile_zero(2);
  if constexpr (V > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* bk = b + kb * kAmxBlock;
    _tile_loadd(4, a + kb * kAmxBlock, 64);
    _tile_loadd(5, bk, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (V > 1) {
      _tile_loadd(6, bk + b_stride, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (V > 2) {
      _tile_loadd(5, bk + 2 * b_stride, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (V > 3) {
      _tile_loadd(6, bk + 3 * b_stride, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, sums, 256);
  if constexpr (V > 1) _tile_stored(1, sums + 16, 256);
  if constexpr (V > 2) _tile_stored(2, sums + 32, 256);
  if constexpr (V > 3) _tile_stored(3, sums + 48, 256);
}

// 16 values of rows r and r + 1 (zero past `count` columns, and row r + 1 zero where `second` is
// null) interleaved: (x[r][j], x[r + 1][j]) for j = 0..15.
inline __m512i interleave_pair(const uint16_t* first, const uint16_t* second, int64_t count) {
  const __mmask16 m = column_mask(count);
  const __m256i lo = _mm256_maskz_loadu_epi16(m, first);
  const __m256i hi = second ? _mm256_maskz_loadu_epi16(m, second) : _mm256_setzero_si256();
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(index, both);
}

void amx_weight_grad_sums(float* y, int64_t ldy, const uint16_t* g, int64_t ldg,
                          const uint16_t* w, int64_t ldw, int64_t M, int64_t N, int64_t R) {
  const int64_t pairs = (R + 1) / 2, blocks = (pairs + 15) / 16, nb = (N + 15) / 16;
  const int64_t b_stride = blocks * kAmxBlock;  // one 16-column block of rows' pairs
  // torch's allocator, not a zero-filled std::vector: every value is written
  const at::Tensor b_packed = at::empty({nb * b_stride}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* const b_buf = bf16_data(b_packed);
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      uint16_t* dst = b_buf + j * b_stride;
      const int64_t count = std::min<int64_t>(16, N - 16 * j);
      for (int64_t k = 0; k < blocks * 16; ++k) {
        const __m512i v = 2 * k < R ? interleave_pair(w + 2 * k * ldw + 16 * j,
                                                      2 * k + 1 < R ? w + (2 * k + 1) * ldw + 16 * j
                                                                    : nullptr,
                                                      count)
                                    : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + k * 32, v);
      }
    }
  });
  const int64_t mb = (M + 15) / 16;
  at::parallel_for(0, mb, 1, [&](int64_t i0, int64_t i1) {
    const at::Tensor a_block = at::empty({blocks * kAmxBlock},
                                         at::TensorOptions().dtype(at::kBFloat16));
    uint16_t* const a_packed = bf16_data(a_block);
    alignas(64) float sums[16 * 64];
    amx_configure_grads();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = 16 * i, rows = std::min<int64_t>(16, M - m0);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        __m512 t[16];
        for (int64_t k = 0; k < 16; ++k) {
          const int64_t r = 2 * (16 * kb + k);
          t[k] = _mm512_castsi512_ps(
              r < R ? interleave_pair(g + r * ldg + m0, r + 1 < R ? g + (r + 1) * ldg + m0 : nullptr,
                                      rows)
                    : _mm512_setzero_si512());
        }
        transpose16(t);  // [k][m] pairs -> [m][k]
        for (int64_t m = 0; m < 16; ++m) {
          _mm512_storeu_ps(reinterpret_cast<float*>(a_packed + kb * kAmxBlock + m * 32),
                           t[m]);
        }
      }
      for (int64_t n0 = 0; n0 < N; n0 += 64) {
        const int64_t cols = std::min<int64_t>(64, N - n0);
        const uint16_t* b = b_buf + (n0 / 16) * b_stride;
        if (cols > 48) {
          amx_grad_sums<4>(a_packed, b, blocks, b_stride, sums);
        } else if (cols > 32) {
          amx_grad_sums<3>(a_packed, b, blocks, b_stride, sums);
        } else if (cols > 16) {
          amx_grad_sums<2>(a_packed, b, blocks, b_stride, sums);
        } else {
          amx_grad_sums<1>(a_packed, b, blocks, b_stride, sums);
        }
        for (int64_t v = 0; 16 * v < cols; ++v) {
          const __mmask16 mask = column_mask(cols - 16 * v);
          for (int64_t m = 0; m < rows; ++m) {
            float* dst = y + (m0 + m) * ldy + n0 + 16 * v;
            const __m512 product = widen_bf16(round_to_bf16(_mm512_load_ps(sums + m * 64 + 16 * v)));
            _mm512_mask_storeu_ps(dst, mask,
                                  _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), product));
          }
        }
      }
    }
    amx_release();
  });
}

#endif  // DISCRNN_AMX

#elif defined(CPU_CAPABILITY_AVX2)

// r[i][j] -> r[j][i]: unpack pairs of rows, then quads within 128-bit lanes, then the lanes.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int m = 0; m < 4; ++m) {
    t[2 * m] = _mm256_unpacklo_ps(r[2 * m], r[2 * m + 1]);
    t[2 * m + 1] = _mm256_unpackhi_ps(r[2 * m], r[2 * m + 1]);
  }
  for (int m = 0; m < 2; ++m) {
    u[4 * m] = _mm256_shuffle_ps(t[4 * m], t[4 * m + 2], 0x44);
    u[4 * m + 1] = _mm256_shuffle_ps(t[4 * m], t[4 * m + 2], 0xEE);
    u[4 * m + 2] = _mm256_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0x44);
    u[4 * m + 3] = _mm256_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x20);
    r[4 + q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x31);
  }
}

// Lanes 0 .. left - 1 of 8 (all for left >= 8, none for left <= 0).
inline __m256i lane_mask(int64_t left) {
  const int n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, left)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// As the AVX-512 float_tile, on 8-float vectors: V (1 .. 3) vectors from `panel`, whose rows are
// kPanelCols apart (a half panel of 24 columns, or its last 8 or 16).
template <int Rows, int V, bool KMajor = false>
__attribute__((noinline)) void float_tile(const float* a, int64_t lda, const float* panel,
                                          int64_t K, const float* c, int64_t ldc, float* y,
                                          int64_t ldy, int64_t cols) {
  __m256 acc[Rows][V];
  for (int i = 0; i < Rows; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(panel + k * kPanelCols + 8 * v);
    for (int i = 0; i < Rows; ++i) {
      // by value: from a pointer (vbroadcastss's own form) GCC 12 stores every accumulator to
      // the stack each k (2.6x slower)
      const __m256 ai = _mm256_set1_ps(KMajor ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(ai, b[v], acc[i][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    if (cols - 8 * v >= 8) {  // vmaskmovps stores are microcoded on AMD's cores: full vectors plain
      for (int i = 0; i < Rows; ++i) {
        __m256 r = acc[i][v];
        if (c) r = _mm256_add_ps(r, _mm256_loadu_ps(c + i * ldc + 8 * v));
        _mm256_storeu_ps(y + i * ldy + 8 * v, r);
      }
      continue;
    }
    const __m256i m = lane_mask(cols - 8 * v);
    for (int i = 0; i < Rows; ++i) {
      __m256 r = acc[i][v];
      if (c) r = _mm256_add_ps(r, _mm256_maskload_ps(c + i * ldc + 8 * v, m));
      _mm256_maskstore_ps(y + i * ldy + 8 * v, m, r);
    }
  }
}

// A whole panel's `cols` columns as two halves of 24, each with the fewest vectors that hold it.
template <int Rows, bool KMajor>
void float_panel_tile(const float* a, int64_t lda, const float* panel, int64_t K, const float* c,
                      int64_t ldc, float* y, int64_t ldy, int64_t cols) {
  constexpr int64_t kHalf = kPanelCols / 2;
  for (int64_t h = 0; h < kPanelCols && h < cols; h += kHalf) {
    const int64_t left = std::min(kHalf, cols - h);
    const float* c_h = c ? c + h : nullptr;
    if (left > 16) {
      float_tile<Rows, 3, KMajor>(a, lda, panel + h, K, c_h, ldc, y + h, ldy, left);
    } else if (left > 8) {
      float_tile<Rows, 2, KMajor>(a, lda, panel + h, K, c_h, ldc, y + h, ldy, left);
    } else {
      float_tile<Rows, 1, KMajor>(a, lda, panel + h, K, c_h, ldc, y + h, ldy, left);
    }
  }
}

template <int Rows>
struct FloatTile {
  static void run(const float* a, int64_t lda, const float* panel, int64_t K, const float* c,
                  int64_t ldc, float* y, int64_t ldy, int64_t cols) {
    float_panel_tile<Rows, false>(a, lda, panel, K, c, ldc, y, ldy, cols);
  }
};

template <int Rows>
struct KMajorFloatTile {
  static void run(const float* a, int64_t lda, const float* panel, int64_t K, const float* c,
                  int64_t ldc, float* y, int64_t ldy, int64_t cols) {
    float_panel_tile<Rows, true>(a, lda, panel, K, c, ldc, y, ldy, cols);
  }
};

#endif  // CPU_CAPABILITY_AVX512 / AVX2

#if DISCRNN_PANELS

// One tile of `rows` (1 .. kTileRows) rows.
template <typename T, template <int> class Tile>
void tile_of(int64_t rows, const T* a, int64_t lda, const T* panel, int64_t K, const T* c,
             int64_t ldc, T* y, int64_t ldy, int64_t cols) {
  switch (rows) {
#define DISCRNN_TILE_CASE(R) \
  case R:                    \
    if constexpr (R <= kTileRows) Tile<R>::run(a, lda, panel, K, c, ldc, y, ldy, cols); \
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

// One panel's columns for all M rows: tiles of kTileRows rows, then one of the rest.
// next: the panel after this one, prefetched during the last tile (float32 only; null: none).
template <typename T, template <int> class Tile>
void panel_rows(const T* a, int64_t lda, const T* panel, int64_t K, const T* c, int64_t ldc, T* y,
                int64_t ldy, int64_t cols, int64_t M, const float* next = nullptr) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) {
    if (m + kTileRows == M) tl_prefetch_panel = next;
    Tile<kTileRows>::run(a + m * lda, lda, panel, K, c ? c + m * ldc : nullptr, ldc, y + m * ldy,
                         ldy, cols);
  }
  if (m < M) {
    tl_prefetch_panel = next;
    tile_of<T, Tile>(M - m, a + m * lda, lda, panel, K, c ? c + m * ldc : nullptr, ldc,
                     y + m * ldy, ldy, cols);
  }
  tl_prefetch_panel = nullptr;
}

// A weight gradient's sum over K rows (T B: thousands) runs in blocks of kKBlock k, each block's
// sum added to the gradient: a block's panels stay in L2 (one pass over all of K took 1.9x MKL's
// time at K=4096) and the rounding error stays near MKL's (a running sum grows it with K).
constexpr int64_t kKBlock = 512;
constexpr int64_t kGroupRows = 8 * kTileRows;

// One block of kc k of y += a^T-block @ panels for y's rows [g0, g1), kGroupRows at a time, all
// panels: a [kc, M] k-major (row k of the block at a + k lda), the block's panels [P][kc][48]. a is
// copied a group of rows at a time into the tiles' order: read where it lies, a tile's k rows are
// lda apart (4H floats, a multiple of 4 KiB at H=256), too far for the prefetcher, and share a
// handful of L1 sets.
void k_major_rows(const float* a, int64_t lda, const float* panels, int64_t kc, float* y,
                  int64_t ldy, int64_t n, int64_t M, int64_t g0, int64_t g1) {
  const int64_t P = panel_count(n);
  thread_local std::vector<float> block_buffer;
  block_buffer.resize(kKBlock * kGroupRows);
  float* a_block = block_buffer.data();  // [tile][k][kTileRows]
  for (int64_t g = g0; g < g1; g += kGroupRows) {
    const int64_t tiles = (std::min(kGroupRows, M - g) + kTileRows - 1) / kTileRows;
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = a + k * lda + g;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = std::min<int64_t>(kTileRows, M - g - t * kTileRows);
        float* dst = a_block + (t * kc + k) * kTileRows;
        if (rows == kTileRows) {
          std::memcpy(dst, src + t * kTileRows, sizeof(float) * kTileRows);
        } else {
          std::memcpy(dst, src + t * kTileRows, sizeof(float) * rows);
          std::memset(dst + rows, 0, sizeof(float) * (kTileRows - rows));
        }
      }
    }
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = g + t * kTileRows, rows = std::min<int64_t>(kTileRows, M - m);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, n - n0);
        float* y_mn = y + m * ldy + n0;
        tile_of<float, KMajorFloatTile>(rows, a_block + t * kc * kTileRows, kTileRows,
                                        panels + p * kc * kPanelCols, kc, y_mn, ldy, y_mn, ldy,
                                        cols);
      }
    }
  }
}

#endif  // DISCRNN_PANELS


bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace

// The float32 panel kernels' vector width: 16 (AVX-512), 8 (AVX2), 0 (none built).
int64_t panel_vector_floats() {
#if defined(CPU_CAPABILITY_AVX512)
  return 16;
#elif defined(CPU_CAPABILITY_AVX2)
  return 8;
#else
  return 0;
#endif
}

// Whether panel_linear prefetches a large float32 weight's next panel; returns the previous
// setting (for comparisons: the results are the same either way).
bool set_panel_prefetch(bool on) {
  const bool old = PREFETCH_PANELS;
  PREFETCH_PANELS = on;
  return old;
}

// Whether panel_linear's bfloat16 products may run on AMX where the CPU has it; returns the
// previous setting (the tests compare both paths).
bool set_amx(bool on) {
#if DISCRNN_AMX
  const bool old = USE_AMX;
  USE_AMX = on;
  return old;
#else
  (void)on;
  return false;
#endif
}

// Whether they do on this CPU (AMX-BF16, and the tile state granted by Linux).
bool uses_amx() {
#if DISCRNN_AMX
  return USE_AMX && cpu_has_amx_bf16();
#else
  return false;
#endif
}

bool panel_products_supported(at::ScalarType dtype) {
#if defined(CPU_CAPABILITY_AVX512)
  return dtype == at::kFloat || (dtype == at::kBFloat16 && cpu_has_avx512_bf16());
#elif defined(CPU_CAPABILITY_AVX2)
  return dtype == at::kFloat;
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
#if DISCRNN_PANELS
    const bool transposes = sk == 1;  // they write every value, the zeros past N included
#else
    const bool transposes = false;
#endif
    // Not zero-filled where every value is written: in a layer call the weight and its panels
    // come from L3 or memory, and the fill took a third of the packing's time.
    at::Tensor out = transposes ? at::empty({P, K, kPanelCols}, weight.options())
                                : at::zeros({P, K, kPanelCols}, weight.options());
    const float* w = weight.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* panel = dst + p * K * kPanelCols;
        const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
#if defined(CPU_CAPABILITY_AVX512)
        if (sk == 1) {
          // A row-major weight (forward's W, every layer call): 16 rows x 16 k at a time,
          // transposed in registers (the loop below writes one float at a time, 48 apart).
          for (int64_t v = 0; v < kPanelVectors; ++v) {
            const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * v));
            const float* base = rows > 0 ? w + (p * kPanelCols + 16 * v) * sn : w;
            for (int64_t k0 = 0; k0 < K; k0 += 16) {
              const int64_t ks = std::min<int64_t>(16, K - k0);
              const __mmask16 km = column_mask(ks);
              __m512 r[16];
              for (int64_t i = 0; i < 16; ++i) {
                r[i] = i < rows ? _mm512_maskz_loadu_ps(km, base + i * sn + k0)
                                : _mm512_setzero_ps();
              }
              transpose16(r);
              for (int64_t k = 0; k < ks; ++k) {
                _mm512_storeu_ps(panel + (k0 + k) * kPanelCols + 16 * v, r[k]);
              }
            }
          }
          continue;
        }
#elif defined(CPU_CAPABILITY_AVX2)
        if (sk == 1) {  // as above, 8 rows x 8 k at a time
          for (int64_t v = 0; v < kPanelCols / 8; ++v) {
            const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * v));
            const float* base = rows > 0 ? w + (p * kPanelCols + 8 * v) * sn : w;
            for (int64_t k0 = 0; k0 < K; k0 += 8) {
              const int64_t ks = std::min<int64_t>(8, K - k0);
              const __m256i km = lane_mask(ks);
              __m256 r[8];
              for (int64_t i = 0; i < 8; ++i) {
                r[i] = i < rows ? _mm256_maskload_ps(base + i * sn + k0, km) : _mm256_setzero_ps();
              }
              transpose8(r);
              for (int64_t k = 0; k < ks; ++k) {
                _mm256_storeu_ps(panel + (k0 + k) * kPanelCols + 8 * v, r[k]);
              }
            }
          }
          continue;
        }
#endif
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
// [M, N], all of W's dtype, unit stride along their last dimension.
at::Tensor panel_linear(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                        const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& out) {
  const at::ScalarType dtype = panels.scalar_type();
  const bool is_float = dtype == at::kFloat;
  TORCH_CHECK(panel_products_supported(dtype), "panel_linear: no panel products for ", dtype,
              " on this CPU");
  TORCH_CHECK(panels.dim() == (is_float ? 3 : 4) && panels.size(2) == kPanelCols &&
                  panels.is_contiguous() && panels.size(0) == panel_count(n) && n > 0,
              "panel_linear: panels ", panels.sizes(), " are not pack_panels' of ", n, " columns");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == dtype && (a.size(1) <= 1 || a.stride(1) == 1),
              "panel_linear: a must be [M, K] ", dtype, " rows of unit stride, got ", a.sizes(),
              " ", a.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), lda = a.stride(0);
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
#if DISCRNN_PANELS
  const int64_t P = panels.size(0);
  const int64_t panel_size = panels.numel() / P;
  const int64_t ldc = c ? c->stride(0) : 0;
  // A panel is M K 48 multiply-adds; below ~64k per thread's share the threads cost more.
  const int64_t work = std::max<int64_t>(1, M * K * kPanelCols);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work);
#if DISCRNN_AMX
  if (!is_float && uses_amx()) {
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      amx_panel_range(bf16_data(a), lda, bf16_data(panels), panel_size, K,
                      c ? bf16_data(*c) : nullptr, ldc, bf16_data(y), y.stride(0), n, M, p0, p1);
    });
    return y;
  }
#endif
  // Panels past L2's share (a weight read from L3 or memory in every product: W_hh at H=1024 is
  // 16 MiB) stream in with the first row tile; the last row tile reads them from L2 and would
  // leave the bus idle, so it prefetches the next panel meanwhile.
  const bool prefetch =
      PREFETCH_PANELS && is_float && panels.numel() * int64_t{4} > (int64_t{1} << 20);
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, n - n0);
      if (is_float) {
        const float* base = panels.data_ptr<float>();
        panel_rows<float, FloatTile>(a.data_ptr<float>(), lda, base + p * panel_size, K,
                                     c ? c->data_ptr<float>() + n0 : nullptr, ldc,
                                     y.data_ptr<float>() + n0, y.stride(0), cols, M,
                                     prefetch && p + 1 < p1 ? base + (p + 1) * panel_size
                                                            : nullptr);
      } else {
#if defined(CPU_CAPABILITY_AVX512)
        panel_rows<uint16_t, BFloat16Tile>(bf16_data(a), lda,
                                           bf16_data(panels) + p * panel_size, K,
                                           c ? bf16_data(*c) + n0 : nullptr, ldc,
                                           bf16_data(y) + n0, y.stride(0), cols, M);
#endif
      }
    }
  });
#endif
  return y;
}

// acc += grads^T @ rows in float32, in place: a weight's gradient summed over R rows (the layers'
// d W per chunk: grads [R, M] the gate gradients, rows [R, N] what the weight read, acc [M, N]).
// grads is read where it lies (unit stride along M); rows (any strides) is packed into panels one
// block of kKBlock rows at a time (a block's panels, not a copy of all R rows); each block's sum is
// added to acc. Threads split acc's rows, never a sum, so the bits do not depend on their number.
at::Tensor panel_weight_grad(const at::Tensor& acc, const at::Tensor& grads,
                             const at::Tensor& rows) {
  TORCH_CHECK(panel_products_supported(at::kFloat),
              "panel_weight_grad: no panel products on this CPU");
  auto check = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu(),
                "panel_weight_grad: ", name, " must be a 2-D float32 CPU tensor, got ", t.sizes(),
                " ", t.scalar_type(), " on ", t.device());
  };
  check(acc, "acc");
  check(grads, "grads");
  check(rows, "rows");
  const int64_t R = grads.size(0), M = grads.size(1), N = rows.size(1);
  TORCH_CHECK(rows.size(0) == R && acc.size(0) == M && acc.size(1) == N,
              "panel_weight_grad: acc [M, N] += grads [R, M]^T @ rows [R, N], got acc ",
              acc.sizes(), ", grads ", grads.sizes(), ", rows ", rows.sizes());
  TORCH_CHECK((N <= 1 || acc.stride(1) == 1) && (M <= 1 || grads.stride(1) == 1),
              "panel_weight_grad: acc and grads must have unit stride along their last dimension, "
              "got strides ", acc.strides(), " and ", grads.strides());
  TORCH_CHECK(!(acc.numel() > 0 && R > 0 &&
                (shares_memory(acc, grads) || shares_memory(acc, rows))),
              "panel_weight_grad: acc overlaps grads or rows");
  if (M == 0 || N == 0 || R == 0) return acc;
#if DISCRNN_PANELS
  const int64_t P = panel_count(N);
  at::Tensor block = at::empty({P, std::min(kKBlock, R), kPanelCols}, rows.options());
  const float* g = grads.data_ptr<float>();
  const float* w = rows.data_ptr<float>();
  float* panels = block.data_ptr<float>();
  float* y = acc.data_ptr<float>();
  const int64_t ldg = grads.stride(0), ldy = acc.stride(0);
  const int64_t sr = rows.stride(0), sn = rows.stride(1);
  const int64_t groups = (M + kGroupRows - 1) / kGroupRows;
  for (int64_t k0 = 0; k0 < R; k0 += kKBlock) {
    const int64_t kc = std::min(kKBlock, R - k0);
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* panel = panels + p * kc * kPanelCols;
        const int64_t n0 = p * kPanelCols, cols = std::min(kPanelCols, N - n0);
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = w + (k0 + k) * sr + n0 * sn;
          float* dst = panel + k * kPanelCols;
          if (sn == 1) {
            std::memcpy(dst, src, cols * sizeof(float));
          } else {
            for (int64_t j = 0; j < cols; ++j) dst[j] = src[j * sn];
          }
          for (int64_t j = cols; j < kPanelCols; ++j) dst[j] = 0.0f;
        }
      }
    });
    const int64_t group_work = std::max<int64_t>(1, kGroupRows * kc * N);
    at::parallel_for(0, groups, std::max<int64_t>(1, (int64_t{1} << 16) / group_work),
                     [&](int64_t i0, int64_t i1) {
                       k_major_rows(g + k0 * ldg, ldg, panels, kc, y, ldy, N, M,
                                    i0 * kGroupRows, std::min(M, i1 * kGroupRows));
                     });
  }
#endif
  return acc;
}

// acc [M, N] (float32) += grads [R, M]^T @ rows [R, N] (bfloat16), the product summed in float32
// on AMX and rounded once to bfloat16 before it is added (what acc.add_(torch.mm(grads.t(),
// rows)) computes, up to the order of the sums). grads and rows of unit stride along their last
// dimension; only where uses_amx().
at::Tensor amx_weight_grad(const at::Tensor& acc, const at::Tensor& grads, const at::Tensor& rows) {
  TORCH_CHECK(uses_amx(), "amx_weight_grad: no AMX-BF16 on this CPU (or it is switched off)");
  auto check = [](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.device().is_cpu() &&
                    (t.size(1) <= 1 || t.stride(1) == 1),
                "amx_weight_grad: ", name, " must be a 2-D ", dtype,
                " CPU tensor of unit stride along its last dimension, got ", t.sizes(), " ",
                t.scalar_type(), " strides ", t.strides(), " on ", t.device());
  };
  check(acc, "acc", at::kFloat);
  check(grads, "grads", at::kBFloat16);
  check(rows, "rows", at::kBFloat16);
  const int64_t R = grads.size(0), M = grads.size(1), N = rows.size(1);
  TORCH_CHECK(rows.size(0) == R && acc.size(0) == M && acc.size(1) == N,
              "amx_weight_grad: acc [M, N] += grads [R, M]^T @ rows [R, N], got acc ",
              acc.sizes(), ", grads ", grads.sizes(), ", rows ", rows.sizes());
  TORCH_CHECK(!(acc.numel() > 0 && R > 0 &&
                (shares_memory(acc, grads) || shares_memory(acc, rows))),
              "amx_weight_grad: acc overlaps grads or rows");
  if (M == 0 || N == 0 || R == 0) return acc;
#if DISCRNN_AMX
  amx_weight_grad_sums(acc.data_ptr<float>(), acc.stride(0), bf16_data(grads), grads.stride(0),
                  bf16_data(rows), rows.stride(0), M, N, R);
#endif
  return acc;
}

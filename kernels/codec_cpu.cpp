// The dense code stream of discrnn.kernels.codec_torch (torch_pack / torch_unpack) in one pass
// over the codes: the CPU layers pack each chunk's codes into their store and unpack them in
// backward, and torch_pack spends ~20 aten calls (three SWAR steps over int64 words, then one
// strided copy per output byte column) on what is a shift and an or per code.
//
// The stream: code i (its low `bits` bits) at bit i * bits, least significant bit first; eight
// codes fill `bits` bytes exactly, the last group is zero-padded to ceil(n * bits / 8) bytes.
// The bytes are torch_pack's bit for bit (tests/test_codec_cpu.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <algorithm>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// Groups of eight codes per parallel task: below this many the threads cost more.
constexpr int64_t kGroupsPerTask = 1 << 14;

void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in [1, 8], got ", bits);
}

inline uint64_t pack_group(const uint8_t* codes, int64_t count, int64_t bits) {
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  uint64_t word = 0;
  for (int64_t j = 0; j < count; ++j) word |= (codes[j] & mask) << (j * bits);
  return word;
}

inline void unpack_group(uint64_t word, uint8_t* codes, int64_t count, int64_t bits) {
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  for (int64_t j = 0; j < count; ++j) codes[j] = static_cast<uint8_t>((word >> (j * bits)) & mask);
}

// Groups g0..g1 of eight codes each; Bits a constant, so that the copies of Bits bytes compile
// to moves.
template <int Bits>
void pack_groups(const uint8_t* src, uint8_t* dst, int64_t g0, int64_t g1) {
  constexpr uint64_t mask = (uint64_t{1} << Bits) - 1;
  for (int64_t g = g0; g < g1; ++g) {
    uint64_t codes8;
    std::memcpy(&codes8, src + 8 * g, 8);
    uint64_t word = 0;
    for (int j = 0; j < 8; ++j) word |= ((codes8 >> (8 * j)) & mask) << (j * Bits);
    std::memcpy(dst + g * Bits, &word, Bits);  // little-endian: the low Bits bytes
  }
}

template <int Bits>
void unpack_groups(const uint8_t* src, uint8_t* dst, int64_t g0, int64_t g1) {
  constexpr uint64_t mask = (uint64_t{1} << Bits) - 1;
  for (int64_t g = g0; g < g1; ++g) {
    uint64_t word = 0;
    std::memcpy(&word, src + g * Bits, Bits);
    uint64_t codes8 = 0;
    for (int j = 0; j < 8; ++j) codes8 |= ((word >> (j * Bits)) & mask) << (8 * j);
    std::memcpy(dst + 8 * g, &codes8, 8);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Eight groups (64 codes) per vector. Pack: torch_pack's three SWAR steps on the eight int64
// words at once, then one byte permutation that keeps the low Bits bytes of each word. Unpack:
// a byte permutation that spreads the groups' Bits bytes into eight words, then a multishift that
// takes code j from bit j Bits of its word. 64 codes in ~14 / ~5 instructions.
template <int Bits>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) int64_t pack_blocks(const uint8_t* src,
                                                                            uint8_t* dst,
                                                                            int64_t g0,
                                                                            int64_t g1) {
  alignas(64) uint8_t compact[64];
  for (int k = 0; k < 64; ++k) {
    compact[k] = static_cast<uint8_t>(k < 8 * Bits ? (k / Bits) * 8 + k % Bits : 0);
  }
  const __m512i compact_idx = _mm512_load_si512(compact);
  __m512i keep[3], move[3];
  int shift[3];
  for (int s = 0; s < 3; ++s) {
    const int lane = 8 << s, field = Bits << s;
    uint64_t k = 0, m = 0;
    for (int at = 0; at < 64; at += 2 * lane) {
      k |= ((uint64_t{1} << field) - 1) << at;
      m |= ((uint64_t{1} << field) - 1) << (at + field);
    }
    keep[s] = _mm512_set1_epi64(static_cast<long long>(k));
    move[s] = _mm512_set1_epi64(static_cast<long long>(m));
    shift[s] = lane - field;
  }
  const __mmask64 out_mask = 8 * Bits == 64 ? ~__mmask64{0} : (__mmask64{1} << (8 * Bits)) - 1;
  int64_t g = g0;
  for (; g + 8 <= g1; g += 8) {
    __m512i w = _mm512_loadu_si512(src + 8 * g);
    for (int s = 0; s < 3; ++s) {
      const __m512i moved = _mm512_and_si512(_mm512_srli_epi64(w, shift[s]), move[s]);
      w = _mm512_or_si512(_mm512_and_si512(w, keep[s]), moved);
    }
    _mm512_mask_storeu_epi8(dst + g * Bits, out_mask, _mm512_permutexvar_epi8(compact_idx, w));
  }
  return g;
}

template <int Bits>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) int64_t unpack_blocks(const uint8_t* src,
                                                                              uint8_t* dst,
                                                                              int64_t g0,
                                                                              int64_t g1) {
  alignas(64) uint8_t spread[64], offsets[64];
  for (int k = 0; k < 64; ++k) {
    spread[k] = static_cast<uint8_t>((k / 8) * Bits + std::min(k % 8, Bits - 1));
    offsets[k] = static_cast<uint8_t>((k % 8) * Bits);
  }
  const __m512i spread_idx = _mm512_load_si512(spread);
  const __m512i offset_ctl = _mm512_load_si512(offsets);
  const __m512i code_mask = _mm512_set1_epi8(static_cast<char>((1u << Bits) - 1));
  const __mmask64 in_mask = 8 * Bits == 64 ? ~__mmask64{0} : (__mmask64{1} << (8 * Bits)) - 1;
  int64_t g = g0;
  for (; g + 8 <= g1; g += 8) {
    const __m512i in = _mm512_maskz_loadu_epi8(in_mask, src + g * Bits);
    const __m512i words = _mm512_permutexvar_epi8(spread_idx, in);
    const __m512i fields = _mm512_multishift_epi64_epi8(offset_ctl, words);
    const __m512i codes = _mm512_and_si512(fields, code_mask);
    _mm512_storeu_si512(dst + 8 * g, codes);
  }
  return g;
}
#endif

bool cpu_has_avx512_vbmi() {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512vbmi");
  return has;
#else
  return false;
#endif
}

#if defined(__GNUC__) && defined(__x86_64__)
// BMI2's pext / pdep move a group of eight codes in one instruction each: pext gathers the low Bits
// bits of each byte into one word (dropping the bits above, as pack_groups), pdep spreads them
// back. Where they are fast: Intel since Haswell, AMD since Zen 3 (family 19h); Zen 1 and 2
// microcode them (hundreds of cycles), so there, and on AMD families GCC does not know, the shift
// loops run. CPUs without AVX512-VBMI take this path (AVX2 CPUs: AMD Zen 3, Intel before Ice Lake).
bool cpu_has_fast_pdep() {
  static const bool fast = __builtin_cpu_supports("bmi2") &&
                           (!__builtin_cpu_is("amd") || __builtin_cpu_is("amdfam19h"));
  return fast;
}

constexpr uint64_t low_bits_of_each_byte(int bits) {
  return 0x0101010101010101ull * ((uint64_t{1} << bits) - 1);
}

template <int Bits>
__attribute__((target("bmi2"))) void pack_groups_pext(const uint8_t* src, uint8_t* dst,
                                                      int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    uint64_t codes8;
    std::memcpy(&codes8, src + 8 * g, 8);
    const uint64_t word = _pext_u64(codes8, low_bits_of_each_byte(Bits));
    std::memcpy(dst + g * Bits, &word, Bits);
  }
}

template <int Bits>
__attribute__((target("bmi2"))) void unpack_groups_pdep(const uint8_t* src, uint8_t* dst,
                                                        int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    uint64_t word = 0;
    std::memcpy(&word, src + g * Bits, Bits);
    const uint64_t codes8 = _pdep_u64(word, low_bits_of_each_byte(Bits));
    std::memcpy(dst + 8 * g, &codes8, 8);
  }
}
#else
bool cpu_has_fast_pdep() { return false; }
template <int Bits>
void pack_groups_pext(const uint8_t*, uint8_t*, int64_t, int64_t) {}
template <int Bits>
void unpack_groups_pdep(const uint8_t*, uint8_t*, int64_t, int64_t) {}
#endif

// Off: the shift loops only (the tests compare the two).
bool USE_PDEP = true;

template <int Bits>
void pack_range(const uint8_t* src, uint8_t* dst, int64_t g0, int64_t g1) {
#if defined(CPU_CAPABILITY_AVX512)
  if (cpu_has_avx512_vbmi()) g0 = pack_blocks<Bits>(src, dst, g0, g1);
#endif
  if (Bits < 8 && USE_PDEP && cpu_has_fast_pdep()) {
    pack_groups_pext<Bits>(src, dst, g0, g1);
  } else {
    pack_groups<Bits>(src, dst, g0, g1);
  }
}

template <int Bits>
void unpack_range(const uint8_t* src, uint8_t* dst, int64_t g0, int64_t g1) {
#if defined(CPU_CAPABILITY_AVX512)
  if (cpu_has_avx512_vbmi()) g0 = unpack_blocks<Bits>(src, dst, g0, g1);
#endif
  if (Bits < 8 && USE_PDEP && cpu_has_fast_pdep()) {
    unpack_groups_pdep<Bits>(src, dst, g0, g1);
  } else {
    unpack_groups<Bits>(src, dst, g0, g1);
  }
}

template <typename F>
void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace

// Whether pack_codes / unpack_codes may use BMI2's pext / pdep where they are fast; returns the
// previous setting (the tests compare both paths).
bool set_pdep(bool on) {
  const bool old = USE_PDEP;
  USE_PDEP = on;
  return old;
}

// Whether they do on this CPU.
bool uses_pdep() { return USE_PDEP && cpu_has_fast_pdep(); }

// uint8 codes (1-D, contiguous; each code's bits past `bits` are dropped, as torch_pack does) ->
// their stream, into out (1-D contiguous uint8 of ceil(n bits / 8) bytes) where given.
at::Tensor pack_codes(const at::Tensor& codes, int64_t bits, const std::optional<at::Tensor>& out) {
  check_bits(bits);
  TORCH_CHECK(codes.dim() == 1 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.device().is_cpu(),
              "pack_codes: codes must be a contiguous 1-D uint8 CPU tensor, got ", codes.sizes(),
              " ", codes.scalar_type(), " on ", codes.device());
  const int64_t n = codes.numel(), nbytes = (n * bits + 7) / 8;
  at::Tensor stream = out ? *out : at::empty({nbytes}, codes.options());
  TORCH_CHECK(stream.dim() == 1 && stream.numel() == nbytes && stream.scalar_type() == at::kByte &&
                  stream.is_contiguous() && stream.device().is_cpu(),
              "pack_codes: out must be a contiguous 1-D uint8 CPU tensor of ", nbytes,
              " bytes, got ", stream.sizes(), " ", stream.scalar_type());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = stream.data_ptr<uint8_t>();
  const int64_t full = n / 8;
  at::parallel_for(0, full, kGroupsPerTask, [&](int64_t g0, int64_t g1) {
    with_bits(bits, [&](auto width) { pack_range<decltype(width)::value>(src, dst, g0, g1); });
  });
  if (n % 8) {
    const uint64_t word = pack_group(src + 8 * full, n % 8, bits);
    std::memcpy(dst + full * bits, &word, static_cast<size_t>(nbytes - full * bits));
  }
  return stream;
}

// A stream of pack_codes -> its first numel codes (uint8, 1-D). The stream must hold them:
// at least ceil(numel bits / 8) bytes.
at::Tensor unpack_codes(const at::Tensor& stream, int64_t bits, int64_t numel) {
  check_bits(bits);
  TORCH_CHECK(stream.dim() == 1 && stream.scalar_type() == at::kByte && stream.is_contiguous() &&
                  stream.device().is_cpu(),
              "unpack_codes: stream must be a contiguous 1-D uint8 CPU tensor, got ",
              stream.sizes(), " ", stream.scalar_type(), " on ", stream.device());
  TORCH_CHECK(numel >= 0 && stream.numel() >= (numel * bits + 7) / 8, "unpack_codes: ", numel,
              " codes of ", bits, " bits need ", (numel * bits + 7) / 8, " bytes, the stream has ",
              stream.numel());
  at::Tensor codes = at::empty({numel}, stream.options());
  const uint8_t* src = stream.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGroupsPerTask, [&](int64_t g0, int64_t g1) {
    with_bits(bits, [&](auto width) { unpack_range<decltype(width)::value>(src, dst, g0, g1); });
  });
  if (numel % 8) {
    uint64_t word = 0;
    const int64_t tail_bytes = (numel * bits + 7) / 8 - full * bits;
    std::memcpy(&word, src + full * bits, static_cast<size_t>(tail_bytes));
    unpack_group(word, dst + 8 * full, numel % 8, bits);
  }
  return codes;
}

// Matmuls straight from M0E4 4-bit weights on CPU (Transformer-Lite, arXiv 2403.20041).
//
// A weight W (N, K) is held as packed codes (N, K/2) uint8 (byte i of a row: code 2i in the low nibble,
// code 2i+1 in the high nibble), and per group of `gs` codes along K a float16 scale S and offset c:
//
//     w = (h - c) * S,   h = float32 bits (0x3F800000 | q << 19) = 1 + q/16   (the M0E4 bit trick)
//
// The code lands in the top four mantissa bits of 1.0f with one shift and one and/or: no int->float
// conversion. We compute w = h * S - c * S with one fused multiply-add per vector of weights.
//
// Ops (namespace quintet_m0e4):
//   gemv(x, qweight, scales, offsets, gs, isa) -> y     y (M, N) = x (M, K) W^T, float32; for decode-sized M
//       Each output row's codes are read once and unpacked in registers, then used for every row of x
//       (in blocks of up to 4 rows). Output rows are split over threads.
//   dequantize_rows(qweight, scales, offsets, gs, row0, out, isa)
//       Rows row0 .. row0 + out.size(0) of W into out (float32 or bfloat16), with K in the *permuted*
//       order below: the prefill path multiplies them with a permuted x, which gives the same product.
//   permute_k(x) -> xp    x (M, K) with K reordered per 32-chunk: the 16 even positions, then the 16 odd.
//   matmul_tiles(x, qweight, scales, offsets, gs, isa, bf16, small_rows, tile_bytes) -> y   the prefill
//       matmul: few rows through L1 micro-tiles and our register-blocked kernel, more through large
//       tiles and at::mm; products in bfloat16 or float32 (the caller's measured choice).
//   has_bf16() -> bool    AVX-512 BF16 (vdpbf16ps) is there.
//   best_isa() -> int     0 scalar, 1 AVX2 (+FMA, F16C), 2 AVX-512 (F, BW, VL): what this CPU runs.
//
// The decode layout (`to_decode_layout` in m0e4_cpu.py, chosen at load where the VNNI int8 GEMV runs):
// rows in tiles of 16, interleaved by words of 4 bytes (8 codes): qweight (N/16, K/8, 64), byte 4r + b of
// word w of tile t is byte 4w + b of row 16t + r; scales and offsets (N/16, G, 16), [t][g][r]. One 64-byte
// load then holds 8 codes of 16 rows: `vpdpbusd` against 4 broadcast bytes of x gives each row's partial
// dot product in its own lane (no horizontal sums, one float conversion per block of 32 codes), and a
// tile's codes are one sequential stream. Every op takes both layouts; paths without a kernel of their own
// for it copy each tile back to rows in a small scratch first.
//
// The permuted order lets a vector of unpacked low nibbles (codes 2i) meet x[2i] without any shuffle:
// per 32 codes (16 bytes), the low nibbles pair with xp[0..15], the high nibbles with xp[16..31].
//
// Vector paths are compiled with per-function target attributes and chosen at run time (`isa`, checked
// against the CPU), so one binary runs on any x86-64 CPU; other architectures get the scalar path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fast_math.h"
#include "m0e4_ops.h"
#include "simd.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>


namespace quintet_m0e4 {

#if QUINTET_X86
using quintet_simd::reduce4_avx2;
using quintet_simd::reduce4_avx512;
#endif

constexpr uint32_t kOne = 0x3F800000u;  // float32 bits of 1.0f
constexpr int kShift = 19;               // 23 mantissa bits - 4 code bits
constexpr int kChunk = 32;               // codes per 16-byte chunk, the unit of the permuted order

int64_t detect_isa() {
#if QUINTET_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kScalar;
}

int64_t cpu_isa() {
  static const int64_t isa = detect_isa();  // once per process
  return isa;
}

inline float code_to_float(uint32_t q) {
  const uint32_t bits = kOne | (q << kShift);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Problem {
  const float* xp;       // (M, K) permuted activations
  const uint8_t* qw;     // (N, K/2)
  const at::Half* S;     // (N, G)
  const at::Half* C;     // (N, G)
  float* y;              // (M, N)
  int64_t M, N, K, gs;
  bool tiled;            // the decode layout (qw (N/16, K/8, 64), S / C (N/16, G, 16))
};

// Per row: S and -c*S of each group, in float32.
inline void row_params(const Problem& p, int64_t n, float* s, float* ncs) {
  const int64_t G = p.K / p.gs;
  for (int64_t g = 0; g < G; ++g) {
    const float sv = static_cast<float>(p.S[n * G + g]);
    s[g] = sv;
    ncs[g] = -static_cast<float>(p.C[n * G + g]) * sv;
  }
}

// ------------------------------------------------------------------------------------------ decode layout
constexpr int64_t kTileRows = 16;

// Tile t of a weight in the decode layout back to 16 rows of the row layout: codes (16, K/2), scales and
// offsets (16, G).
inline void untile(const uint8_t* qw, const at::Half* S, const at::Half* C, int64_t K, int64_t G, int64_t t,
                   uint8_t* q, at::Half* s, at::Half* c) {
  const int64_t words = K / 8;
  const uint8_t* src = qw + t * words * 64;
  for (int64_t w = 0; w < words; ++w)
    for (int64_t r = 0; r < kTileRows; ++r) std::memcpy(q + r * (K / 2) + 4 * w, src + w * 64 + 4 * r, 4);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < kTileRows; ++r) {
      s[r * G + g] = S[(t * G + g) * kTileRows + r];
      c[r * G + g] = C[(t * G + g) * kTileRows + r];
    }
}

// fn(view, a, b) over rows [n0, n1) of p as the row-layout kernels expect them: p itself, or for the decode
// layout each tile copied back to rows in this thread's scratch, with a view whose pointers index rows
// 16t .. 16t + 15 into that scratch (the row kernels address row n at qw + n K/2 and S + n G).
template <typename P, typename Fn>
void in_row_layout(const P& p, int64_t n0, int64_t n1, Fn&& fn) {
  if (!p.tiled) return fn(p, n0, n1);
  const int64_t G = p.K / p.gs, half = p.K / 2;
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<at::Half> sc;
  q.resize(static_cast<size_t>(kTileRows * half));
  sc.resize(static_cast<size_t>(2 * kTileRows * G));
  for (int64_t t = n0 / kTileRows; t * kTileRows < n1; ++t) {
    untile(p.qw, p.S, p.C, p.K, G, t, q.data(), sc.data(), sc.data() + kTileRows * G);
    P v = p;
    v.tiled = false;
    const int64_t first = t * kTileRows;  // addresses only: rows first .. first + 15 land in the scratch
    v.qw = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(q.data()) - first * half);
    v.S = reinterpret_cast<const at::Half*>(reinterpret_cast<uintptr_t>(sc.data()) - first * G * sizeof(at::Half));
    v.C = reinterpret_cast<const at::Half*>(reinterpret_cast<uintptr_t>(sc.data() + kTileRows * G) -
                                            first * G * sizeof(at::Half));
    fn(v, std::max(n0, first), std::min(n1, first + kTileRows));
  }
}

// ------------------------------------------------------------------------------------------ scalar
void gemv_rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.gs, chunks = p.gs / kChunk, half = p.K / 2;
  std::vector<float> s(G), ncs(G), w(p.K), acc(p.M);
  for (int64_t n = n0; n < n1; ++n) {
    row_params(p, n, s.data(), ncs.data());
    const uint8_t* row = p.qw + n * half;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t base = (g * chunks + c) * kChunk;
        const uint8_t* b = row + base / 2;
        for (int i = 0; i < 16; ++i) {
          w[base + i] = code_to_float(b[i] & 0xF) * s[g] + ncs[g];
          w[base + 16 + i] = code_to_float(b[i] >> 4) * s[g] + ncs[g];
        }
      }
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.xp + m * p.K;
      float a = 0.f;
      for (int64_t k = 0; k < p.K; ++k) a += w[k] * x[k];
      p.y[m * p.N + n] = a;
    }
  }
}

template <typename Out>
void dequant_rows_scalar(const Problem& p, int64_t r0, int64_t r1, int64_t row_base, Out* out) {
  const int64_t G = p.K / p.gs, chunks = p.gs / kChunk, half = p.K / 2;
  std::vector<float> s(G), ncs(G);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = row_base + r;
    row_params(p, n, s.data(), ncs.data());
    const uint8_t* row = p.qw + n * half;
    Out* o = out + r * p.K;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t base = (g * chunks + c) * kChunk;
        const uint8_t* b = row + base / 2;
        for (int i = 0; i < 16; ++i) {
          o[base + i] = static_cast<Out>(code_to_float(b[i] & 0xF) * s[g] + ncs[g]);
          o[base + 16 + i] = static_cast<Out>(code_to_float(b[i] >> 4) * s[g] + ncs[g]);
        }
      }
  }
}

#if QUINTET_X86
// ------------------------------------------------------------------------------------------ AVX2

QUINTET_AVX2 inline void row_params_f16c(const Problem& p, int64_t n, float* s, float* ncs) {
  const int64_t G = p.K / p.gs;
  const uint16_t* S = reinterpret_cast<const uint16_t*>(p.S) + n * G;
  const uint16_t* C = reinterpret_cast<const uint16_t*>(p.C) + n * G;
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(S + g)));
    const __m256 cv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(C + g)));
    _mm256_storeu_ps(s + g, sv);
    _mm256_storeu_ps(ncs + g, _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), cv), sv));
  }
  for (; g < G; ++g) {
    const float sv = _cvtsh_ss(S[g]);
    s[g] = sv;
    ncs[g] = -_cvtsh_ss(C[g]) * sv;
  }
}

QUINTET_AVX2 inline float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Unpacks 8 bytes (16 codes) into the weights of the low nibbles (lo) and of the high nibbles (hi).
QUINTET_AVX2 inline void unpack8_avx2(const uint8_t* b, __m256 vs, __m256 vncs, __m256& lo, __m256& hi) {
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xFu << kShift));
  const __m256i one = _mm256_set1_epi32(static_cast<int>(kOne));
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  const __m256i l = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(v, kShift), mask), one);
  const __m256i h = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(v, kShift - 4), mask), one);
  lo = _mm256_fmadd_ps(_mm256_castsi256_ps(l), vs, vncs);
  hi = _mm256_fmadd_ps(_mm256_castsi256_ps(h), vs, vncs);
}

// MB rows of x at a time, NA accumulators per row, CH chunks of 32 codes per group: all compile-time, so
// every accumulator index is a constant and the accumulators stay in registers.
template <int CH, int MB, int NA>
QUINTET_AVX2 void gemv_block_avx2(const Problem& p, int64_t n, int64_t m0, const float* s, const float* ncs) {
  const int64_t G = p.K / p.gs;
  const uint8_t* row = p.qw + n * (p.K / 2);
  __m256 acc[MB][NA];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 vs = _mm256_set1_ps(s[g]), vncs = _mm256_set1_ps(ncs[g]);
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const int64_t base = (g * CH + c) * kChunk;
      __m256 w[4];
      unpack8_avx2(row + base / 2, vs, vncs, w[0], w[2]);
      unpack8_avx2(row + base / 2 + 8, vs, vncs, w[1], w[3]);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const float* x = p.xp + (m0 + m) * p.K + base;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          acc[m][(4 * c + j) % NA] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + 8 * j), acc[m][(4 * c + j) % NA]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    __m256 t = acc[m][0];
#pragma GCC unroll 8
    for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[m][a]);
    p.y[(m0 + m) * p.N + n] = hsum256(t);
  }
}

template <int CH>
QUINTET_AVX2 void gemv_row_avx2(const Problem& p, int64_t n, const float* s, const float* ncs) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) gemv_block_avx2<CH, 4, 2>(p, n, m, s, ncs);
  for (; m + 2 <= p.M; m += 2) gemv_block_avx2<CH, 2, 4>(p, n, m, s, ncs);
  for (; m < p.M; ++m) gemv_block_avx2<CH, 1, 4>(p, n, m, s, ncs);
}

QUINTET_AVX2 void gemv_rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.gs;
  std::vector<float> s(G), ncs(G);
  for (int64_t n = n0; n < n1; ++n) {
    row_params_f16c(p, n, s.data(), ncs.data());
    switch (p.gs / kChunk) {
      case 1: gemv_row_avx2<1>(p, n, s.data(), ncs.data()); break;
      case 2: gemv_row_avx2<2>(p, n, s.data(), ncs.data()); break;
      default: gemv_row_avx2<4>(p, n, s.data(), ncs.data()); break;
    }
  }
}

QUINTET_AVX2 inline __m256i bf16_bits_avx2(__m256 v) {
  // float32 -> bfloat16 bits in the low half of each lane, round to nearest even (finite inputs)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
}

QUINTET_AVX2 inline __m256i bf16_round_avx2(__m256 a, __m256 b) {
  // packus per 128-bit lane gives a0..3 b0..3 | a4..7 b4..7; the permute puts them in order
  const __m256i packed = _mm256_packus_epi32(bf16_bits_avx2(a), bf16_bits_avx2(b));
  return _mm256_permute4x64_epi64(packed, 0xD8);  // a0..7 b0..7
}

template <typename Out>
QUINTET_AVX2 void dequant_rows_avx2(const Problem& p, int64_t r0, int64_t r1, int64_t row_base, Out* out) {
  const int64_t G = p.K / p.gs, chunks = p.gs / kChunk;
  std::vector<float> s(G), ncs(G);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = row_base + r;
    row_params_f16c(p, n, s.data(), ncs.data());
    const uint8_t* row = p.qw + n * (p.K / 2);
    Out* o = out + r * p.K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 vs = _mm256_set1_ps(s[g]), vncs = _mm256_set1_ps(ncs[g]);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t base = (g * chunks + c) * kChunk;
        __m256 w[4];
        unpack8_avx2(row + base / 2, vs, vncs, w[0], w[2]);
        unpack8_avx2(row + base / 2 + 8, vs, vncs, w[1], w[3]);
        if constexpr (std::is_same_v<Out, float>) {
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + base + 8 * j, w[j]);
        } else {
          uint16_t* ob = reinterpret_cast<uint16_t*>(o + base);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob), bf16_round_avx2(w[0], w[1]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob + 16), bf16_round_avx2(w[2], w[3]));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX-512

// The 16 weights a group's codes stand for: lane q holds (h_q - c) * S, h_q = 1 + q/16 by the bit trick.
QUINTET_AVX512 inline __m512 group_table_avx512(float s, float ncs) {
  const __m512i q = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 h = _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(q, kShift), _mm512_set1_epi32(kOne)));
  return _mm512_fmadd_ps(h, _mm512_set1_ps(s), _mm512_set1_ps(ncs));
}

// Unpacks 16 bytes (32 codes): lo holds the weights of codes 2i, hi those of codes 2i+1. With 16 lanes a
// whole group's weights fit one register, so each code is a lane index: vpermps reads only the low four
// bits of each index, so the low nibble needs no mask and the high nibble one shift.
QUINTET_AVX512 inline void unpack16_avx512(const uint8_t* b, __m512 table, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  lo = _mm512_permutexvar_ps(v, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

template <int CH, int MB, int NA>
QUINTET_AVX512 void gemv_block_avx512(const Problem& p, int64_t n, int64_t m0, const float* s,
                                      const float* ncs) {
  const int64_t G = p.K / p.gs;
  const uint8_t* row = p.qw + n * (p.K / 2);
  __m512 acc[MB][NA];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 table = group_table_avx512(s[g], ncs[g]);
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const int64_t base = (g * CH + c) * kChunk;
      __m512 lo, hi;
      unpack16_avx512(row + base / 2, table, lo, hi);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const float* x = p.xp + (m0 + m) * p.K + base;
        acc[m][(2 * c) % NA] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc[m][(2 * c) % NA]);
        acc[m][(2 * c + 1) % NA] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), acc[m][(2 * c + 1) % NA]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
#pragma GCC unroll 8
    for (int a = 1; a < NA; ++a) t = _mm512_add_ps(t, acc[m][a]);
    p.y[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(t);
  }
}

template <int CH>
QUINTET_AVX512 void gemv_row_avx512(const Problem& p, int64_t n, const float* s, const float* ncs) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) gemv_block_avx512<CH, 4, 2>(p, n, m, s, ncs);
  for (; m + 2 <= p.M; m += 2) gemv_block_avx512<CH, 2, 2 * CH < 4 ? 2 * CH : 4>(p, n, m, s, ncs);
  for (; m < p.M; ++m) gemv_block_avx512<CH, 1, 2 * CH < 8 ? 2 * CH : 8>(p, n, m, s, ncs);
}

// One row of x (decode) against NR output rows at once: each vector of x is loaded once for the NR rows,
// and NR independent accumulator chains keep the FMA units busy where K is short.
template <int CH, int NR>
QUINTET_AVX512 void gemv_x1_avx512(const Problem& p, int64_t n, const float* s, const float* ncs) {
  const int64_t G = p.K / p.gs;
  const uint8_t* rows[NR];
  __m512 acc[NR][2];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    rows[r] = p.qw + (n + r) * (p.K / 2);
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 table[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) table[r] = group_table_avx512(s[r * G + g], ncs[r * G + g]);
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const int64_t base = (g * CH + c) * kChunk;
      const __m512 x0 = _mm512_loadu_ps(p.xp + base), x1 = _mm512_loadu_ps(p.xp + base + 16);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        __m512 lo, hi;
        unpack16_avx512(rows[r] + base / 2, table[r], lo, hi);
        acc[r][0] = _mm512_fmadd_ps(lo, x0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(hi, x1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) p.y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

template <int CH>
QUINTET_AVX512 void gemv_rows_x1_avx512(const Problem& p, int64_t n0, int64_t n1, float* s, float* ncs) {
  constexpr int NR = 4;
  const int64_t G = p.K / p.gs;
  int64_t n = n0;
  const int64_t block = NR * (p.K / 2);
  for (; n + NR <= n1; n += NR) {
    const char* ahead = reinterpret_cast<const char*>(p.qw + (n + 2 * NR) * (p.K / 2));
    for (int64_t b = 0; b < block; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);  // as in gemv_q8_vnni
    for (int r = 0; r < NR; ++r) row_params_f16c(p, n + r, s + r * G, ncs + r * G);
    gemv_x1_avx512<CH, NR>(p, n, s, ncs);
  }
  for (; n < n1; ++n) {
    row_params_f16c(p, n, s, ncs);
    gemv_x1_avx512<CH, 1>(p, n, s, ncs);
  }
}

QUINTET_AVX512 void gemv_rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.gs;
  std::vector<float> s(4 * G), ncs(4 * G);
  if (p.M == 1) {
    switch (p.gs / kChunk) {
      case 1: return gemv_rows_x1_avx512<1>(p, n0, n1, s.data(), ncs.data());
      case 2: return gemv_rows_x1_avx512<2>(p, n0, n1, s.data(), ncs.data());
      default: return gemv_rows_x1_avx512<4>(p, n0, n1, s.data(), ncs.data());
    }
  }
  for (int64_t n = n0; n < n1; ++n) {
    row_params_f16c(p, n, s.data(), ncs.data());
    switch (p.gs / kChunk) {
      case 1: gemv_row_avx512<1>(p, n, s.data(), ncs.data()); break;
      case 2: gemv_row_avx512<2>(p, n, s.data(), ncs.data()); break;
      default: gemv_row_avx512<4>(p, n, s.data(), ncs.data()); break;
    }
  }
}

QUINTET_AVX512 inline __m256i bf16_round_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  return _mm512_cvtepi32_epi16(r);
}

template <typename Out>
QUINTET_AVX512 void dequant_rows_avx512(const Problem& p, int64_t r0, int64_t r1, int64_t row_base, Out* out) {
  const int64_t G = p.K / p.gs, chunks = p.gs / kChunk;
  std::vector<float> s(G), ncs(G);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = row_base + r;
    row_params_f16c(p, n, s.data(), ncs.data());
    const uint8_t* row = p.qw + n * (p.K / 2);
    Out* o = out + r * p.K;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 table = group_table_avx512(s[g], ncs[g]);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t base = (g * chunks + c) * kChunk;
        __m512 lo, hi;
        unpack16_avx512(row + base / 2, table, lo, hi);
        if constexpr (std::is_same_v<Out, float>) {
          _mm512_storeu_ps(o + base, lo);
          _mm512_storeu_ps(o + base + 16, hi);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + base), bf16_round_avx512(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + base + 16), bf16_round_avx512(hi));
        }
      }
    }
  }
}
#endif  // QUINTET_X86

// ------------------------------------------------------------------------------------------ int8 activations
// The llama.cpp trade, opt-in: x quantized to int8 per block of 32 (dx = max|x| / 127, xq = round(x / dx)),
// then integer dot products of codes and xq. Per group g of a row,
//     sum_k w_k x_k = S_g ((1 - c_g) sum_k x_k + (1/16) sum_k q_k x_k)
// with sum_k x_k exact (float) and sum_k q_k x_k ~ sum over blocks b of dx_b * sum_k q_k xq_k (int32).
// AVX-512 VNNI: `vpdpbusd` multiplies 64 codes (u8) by 64 xq (s8) and sums them by fours in one
// instruction; for that xq is laid out per 128 codes as the 64 even positions, then the 64 odd, so that
// the low nibbles of 64 bytes meet the even ones. Lane j of an int32 accumulator then holds codes
// 8j .. 8j+7 of the 128: a block of 32 is four lanes.
constexpr int64_t kQ8Ahead = 2;  // blocks of four rows prefetched ahead

struct Q8Problem {
  const int8_t* xq;     // (M, K) permuted per 128: even positions, then odd
  const float* lane_dx; // (M, K / 8) dx / 16 of the block of each group of 8 codes
  const float* xsum;    // (M, G) exact sums of x per group
  const uint8_t* qw;
  const at::Half* S;
  const at::Half* C;
  float* y;
  int64_t M, N, K, gs;
  bool tiled;
};

void q8_row_params(const Q8Problem& p, int64_t n, float* s, float* off) {
  const int64_t G = p.K / p.gs;
  for (int64_t g = 0; g < G; ++g) {
    const float sv = static_cast<float>(p.S[n * G + g]);
    s[g] = sv;
    off[g] = sv * (1.f - static_cast<float>(p.C[n * G + g]));
  }
}

void gemv_q8_scalar(const Q8Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.gs;
  std::vector<float> s(G), off(G);
  for (int64_t n = n0; n < n1; ++n) {
    q8_row_params(p, n, s.data(), off.data());
    const uint8_t* row = p.qw + n * (p.K / 2);
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* xq = p.xq + m * p.K;
      float acc = 0.f;
      for (int64_t c = 0; c < p.K / 128; ++c)
        for (int j = 0; j < 16; ++j) {  // lane j: bytes 4j .. 4j+3 of the chunk, codes 8j .. 8j+7
          int32_t isum = 0;
          for (int t = 0; t < 4; ++t) {
            const int64_t byte = c * 64 + 4 * j + t;
            isum += (row[byte] & 0xF) * xq[c * 128 + 4 * j + t] + (row[byte] >> 4) * xq[c * 128 + 64 + 4 * j + t];
          }
          const int64_t g = (c * 128 + 8 * j) / p.gs;
          acc += static_cast<float>(isum) * s[g] * p.lane_dx[m * (p.K / 8) + c * 16 + j];
        }
      for (int64_t g = 0; g < G; ++g) acc += off[g] * p.xsum[m * G + g];
      p.y[m * p.N + n] = acc;
    }
  }
}

#if QUINTET_X86
#define QUINTET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// Parameters straight from their float16 storage: n halves from p (n <= 16), as floats, the rest zero.
QUINTET_VNNI inline __m512 load_halves(const at::Half* p, int64_t n) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// NR rows of W against row m of x. Each row's scales are converted from float16 once per sixteen groups
// (one register) and spread over the lanes of each chunk by one permute; the four rows' sums are folded by
// one transposing add tree.
template <int NR>
QUINTET_VNNI void gemv_q8_rows_vnni(const Q8Problem& p, int64_t n, int64_t m, __m512i lane_group, int64_t gpc) {
  const int64_t G = p.K / p.gs, chunks = p.K / 128;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int8_t* xq = p.xq + m * p.K;
  const float* ldx = p.lane_dx + m * (p.K / 8);
  __m512 acc[NR], srow[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g0 = c * gpc;  // the chunk's first group
    if (g0 % 16 == 0)
      for (int r = 0; r < NR; ++r) srow[r] = load_halves(p.S + (n + r) * G + g0, std::min<int64_t>(16, G - g0));
    const __m512i idx = _mm512_add_epi32(lane_group, _mm512_set1_epi32(static_cast<int>(g0 % 16)));
    const __m512i xe = _mm512_loadu_si512(xq + c * 128), xo = _mm512_loadu_si512(xq + c * 128 + 64);
    const __m512 dx = _mm512_loadu_ps(ldx + c * 16);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_loadu_si512(p.qw + (n + r) * (p.K / 2) + c * 64);
      __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low), xe);
      isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xo);
      const __m512 sl = _mm512_permutexvar_ps(idx, srow[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sl, dx), acc[r]);
    }
  }
  const float* xs = p.xsum + m * G;
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {  // + sum_g S_g (1 - c_g) xsum_g, sixteen groups at a time
    for (int64_t g = 0; g < G; g += 16) {
      const int64_t k = std::min<int64_t>(16, G - g);
      const __m512 sv = load_halves(p.S + (n + r) * G + g, k), cv = load_halves(p.C + (n + r) * G + g, k);
      const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << k) - 1u), xs + g);
      acc[r] = _mm512_fmadd_ps(_mm512_sub_ps(sv, _mm512_mul_ps(sv, cv)), xv, acc[r]);
    }
  }
  if constexpr (NR == 4) {
    _mm_storeu_ps(p.y + m * p.N + n, reduce4_avx512(acc[0], acc[1], acc[2], acc[3]));
  } else {
    for (int r = 0; r < NR; ++r) p.y[m * p.N + n + r] = _mm512_reduce_add_ps(acc[r]);
  }
}

// The decode layout: tile t (16 rows) against rows m0 .. m0 + MR - 1 of x. Each 64-byte word holds 8 codes of
// the 16 rows; its low nibbles (codes 8w, 8w+2, 8w+4, 8w+6) meet 4 broadcast bytes of xq's even half, its
// high nibbles, kept in place (16 q), the odd half's: two int32 sums per row and block of 32 codes, folded
// as 16 lo + hi and converted once; lane r of every vector is row 16t + r, so no horizontal sums.
template <int MR>
QUINTET_VNNI void gemv_q8_tile_vnni(const Q8Problem& p, int64_t t, int64_t m0) {
  const int64_t K = p.K, words = K / 8, G = K / p.gs, wpg = p.gs / 8, bpg = p.gs / 32;
  const __m512i lo = _mm512_set1_epi8(0x0F), hi = _mm512_set1_epi8(static_cast<char>(0xF0));
  const uint8_t* base = p.qw + t * words * 64;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 S = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.S + (t * G + g) * 16)));
    const __m512 C = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.C + (t * G + g) * 16)));
    const __m512 off = _mm512_fnmadd_ps(S, C, S);  // S (1 - c): times the group's exact sum of x
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(p.xsum[(m0 + m) * G + g]), acc[m]);
    for (int64_t b = 0; b < bpg; ++b) {
      __m512i il[MR], ih[MR];
      for (int m = 0; m < MR; ++m) il[m] = ih[m] = _mm512_setzero_si512();
      const int64_t w0 = g * wpg + b * 4;
#pragma GCC unroll 4
      for (int w = 0; w < 4; ++w) {
        const int64_t word = w0 + w;
        const __m512i v = _mm512_loadu_si512(base + word * 64);
        const __m512i vl = _mm512_and_si512(v, lo), vh = _mm512_and_si512(v, hi);
        const int64_t xo = (word / 16) * 128 + 4 * (word % 16);  // the word's 4 even codes in xq's layout
        for (int m = 0; m < MR; ++m) {
          const int8_t* xq = p.xq + (m0 + m) * K + xo;
          int32_t e, o;
          std::memcpy(&e, xq, 4);
          std::memcpy(&o, xq + 64, 4);
          il[m] = _mm512_dpbusd_epi32(il[m], vl, _mm512_set1_epi32(e));
          ih[m] = _mm512_dpbusd_epi32(ih[m], vh, _mm512_set1_epi32(o));
        }
      }
      for (int m = 0; m < MR; ++m) {  // 16 (sum q xq) of the block, times S dx / 16 (lane_dx holds dx / 16)
        const __m512i i = _mm512_add_epi32(_mm512_slli_epi32(il[m], 4), ih[m]);
        const __m512 sc = _mm512_mul_ps(S, _mm512_set1_ps(p.lane_dx[(m0 + m) * words + w0] * (1.f / 16.f)));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sc, acc[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(p.y + (m0 + m) * p.N + t * 16, acc[m]);
}

QUINTET_VNNI void gemv_q8_tiles_vnni(const Q8Problem& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) gemv_q8_tile_vnni<4>(p, t, m);
    switch (p.M - m) {
      case 1: gemv_q8_tile_vnni<1>(p, t, m); break;
      case 2: gemv_q8_tile_vnni<2>(p, t, m); break;
      case 3: gemv_q8_tile_vnni<3>(p, t, m); break;
      default: break;
    }
  }
}

QUINTET_VNNI void gemv_q8_vnni(const Q8Problem& p, int64_t n0, int64_t n1) {
  const int per = static_cast<int>(p.gs / 8);  // lanes (8 codes each) per group
  alignas(64) int32_t idx[16];
  for (int j = 0; j < 16; ++j) idx[j] = j / per;
  const __m512i lane_group = _mm512_load_si512(idx);
  const int64_t gpc = 128 / p.gs;  // groups per chunk of 128 codes
  for (int64_t m = 0; m < p.M; ++m) {
    int64_t n = n0;
    const int64_t block = 4 * (p.K / 2);  // bytes of four rows
    for (; n + 4 <= n1; n += 4) {
      // the hardware prefetcher alone leaves one core's loads waiting on memory here (9 GB/s against 20
      // from cache): ask for the rows kQ8Ahead blocks ahead (a prefetch past the end is harmless)
      const char* ahead = reinterpret_cast<const char*>(p.qw + (n + 4 * kQ8Ahead) * (p.K / 2));
      for (int64_t b = 0; b < block; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      gemv_q8_rows_vnni<4>(p, n, m, lane_group, gpc);
    }
    for (; n < n1; ++n) gemv_q8_rows_vnni<1>(p, n, m, lane_group, gpc);
  }
}

// AVX2 without VNNI: the same products by vpmaddubsw (codes u8 x xq s8, pairs summed to int16: at most
// 2 * 15 * 127 = 3810, the low and the high nibbles' sums together 7620, inside int16) and vpmaddwd by
// ones (fours summed to int32). A chunk of 128 codes is two halves of 32 bytes; int32 lane j of half h
// holds bytes 32h + 4j .. 32h + 4j + 3 (codes 8(8h + j) .. 8(8h + j) + 7): the VNNI path's lane 8h + j.
// Each half's lanes lie in one group for gs = 64 or 128, in two for gs = 32: its scales are broadcasts.
QUINTET_AVX2 inline __m256 half_scales_avx2(const float* s, int64_t c, int h, int64_t gs) {
  if (gs == 128) return _mm256_set1_ps(s[c]);
  if (gs == 64) return _mm256_set1_ps(s[2 * c + h]);
  return _mm256_set_m128(_mm_set1_ps(s[4 * c + 2 * h + 1]), _mm_set1_ps(s[4 * c + 2 * h]));  // gs = 32
}

template <int NR>
QUINTET_AVX2 void gemv_q8_rows_avx2(const Q8Problem& p, int64_t n, int64_t m, const float* sf, const float* off) {
  const int64_t G = p.K / p.gs, chunks = p.K / 128;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xq = p.xq + m * p.K;
  const float* ldx = p.lane_dx + m * (p.K / 8);
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c)
    for (int h = 0; h < 2; ++h) {
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 128 + 32 * h));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 128 + 64 + 32 * h));
      const __m256 dx = _mm256_loadu_ps(ldx + c * 16 + 8 * h);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.qw + (n + r) * (p.K / 2) + c * 64 + 32 * h));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, low), xe),
                                               _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), xo));
        const __m256 sl = half_scales_avx2(sf + r * G, c, h, p.gs);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), _mm256_mul_ps(sl, dx), acc[r]);
      }
    }
  const float* xs = p.xsum + m * G;
  float tail[NR];
  for (int r = 0; r < NR; ++r) {  // + sum_g S_g (1 - c_g) xsum_g
    float t = 0.f;
    for (int64_t g = 0; g < G; ++g) t += off[r * G + g] * xs[g];
    tail[r] = t;
  }
  if constexpr (NR == 4) {
    _mm_storeu_ps(p.y + m * p.N + n, _mm_add_ps(reduce4_avx2(acc[0], acc[1], acc[2], acc[3]), _mm_loadu_ps(tail)));
  } else {
    for (int r = 0; r < NR; ++r) p.y[m * p.N + n + r] = reduce4_avx2(acc[r], acc[r], acc[r], acc[r])[0] + tail[r];
  }
}

// q8_row_params with F16C: eight groups' float16 scales and offsets converted per instruction (the scalar
// conversion is a software routine, slower than the row's dot products at these widths).
QUINTET_AVX2 void q8_row_params_avx2(const Q8Problem& p, int64_t n, float* s, float* off) {
  const int64_t G = p.K / p.gs;
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.S + n * G + g)));
    const __m256 cv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.C + n * G + g)));
    _mm256_storeu_ps(s + g, sv);
    _mm256_storeu_ps(off + g, _mm256_mul_ps(sv, _mm256_sub_ps(_mm256_set1_ps(1.f), cv)));
  }
  for (; g < G; ++g) {
    const float sv = static_cast<float>(p.S[n * G + g]);
    s[g] = sv;
    off[g] = sv * (1.f - static_cast<float>(p.C[n * G + g]));
  }
}

// The decode layout on AVX2 (no VNNI): the two halves of a word (rows 8h .. 8h + 7) each one 256-bit load;
// `vpmaddubsw` of the low nibbles with 4 broadcast bytes of xq's even half and of the high nibbles (shifted
// down) with the odd half's gives each row two int16 pair sums, added over the block's 4 words (at most
// 4 * 2 * (2 * 15 * 127) = 30480: inside int16), then `vpmaddwd` by ones folds each row's pair into one int32
// lane: per block one conversion and one multiply-add per 8 rows, no horizontal sums.
template <int MR>
QUINTET_AVX2 void gemv_q8_tile_avx2(const Q8Problem& p, int64_t t, int64_t m0) {
  const int64_t K = p.K, words = K / 8, G = K / p.gs, wpg = p.gs / 8, bpg = p.gs / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* base = p.qw + t * words * 64;
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 S[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (t * G + g) * 16 + 8 * h;
      S[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.S + at)));
      const __m256 C = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.C + at)));
      const __m256 off = _mm256_fnmadd_ps(S[h], C, S[h]);  // S (1 - c): times the group's exact sum of x
      for (int m = 0; m < MR; ++m)
        acc[m][h] = _mm256_fmadd_ps(off, _mm256_set1_ps(p.xsum[(m0 + m) * G + g]), acc[m][h]);
    }
    for (int64_t b = 0; b < bpg; ++b) {
      __m256i pairs[MR][2];
      for (int m = 0; m < MR; ++m) pairs[m][0] = pairs[m][1] = _mm256_setzero_si256();
      const int64_t w0 = g * wpg + b * 4;
#pragma GCC unroll 4
      for (int w = 0; w < 4; ++w) {
        const int64_t word = w0 + w;
        const int64_t xo = (word / 16) * 128 + 4 * (word % 16);
        __m256i xe[MR], xd[MR];
        for (int m = 0; m < MR; ++m) {
          int32_t e, o;
          std::memcpy(&e, p.xq + (m0 + m) * K + xo, 4);
          std::memcpy(&o, p.xq + (m0 + m) * K + xo + 64, 4);
          xe[m] = _mm256_set1_epi32(e), xd[m] = _mm256_set1_epi32(o);
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + word * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int m = 0; m < MR; ++m)
            pairs[m][h] = _mm256_add_epi16(pairs[m][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[m]),
                                                                         _mm256_maddubs_epi16(hi, xd[m])));
        }
      }
      for (int m = 0; m < MR; ++m) {  // sum q xq of the block, times S dx / 16 (lane_dx holds dx / 16)
        const __m256 dx = _mm256_set1_ps(p.lane_dx[(m0 + m) * words + w0]);
        for (int h = 0; h < 2; ++h)
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[m][h], ones)),
                                      _mm256_mul_ps(S[h], dx), acc[m][h]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p.y + (m0 + m) * p.N + t * 16 + 8 * h, acc[m][h]);
}

QUINTET_AVX2 void gemv_q8_tiles_avx2(const Q8Problem& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 2 <= p.M; m += 2) gemv_q8_tile_avx2<2>(p, t, m);
    if (m < p.M) gemv_q8_tile_avx2<1>(p, t, m);
  }
}

QUINTET_AVX2 void gemv_q8_avx2(const Q8Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.gs;
  std::vector<float> sf(static_cast<size_t>(4 * G)), off(static_cast<size_t>(4 * G));
  for (int64_t n = n0; n < n1;) {
    const int nr = n + 4 <= n1 ? 4 : 1;
    for (int r = 0; r < nr; ++r) q8_row_params_avx2(p, n + r, sf.data() + r * G, off.data() + r * G);
    const char* ahead = reinterpret_cast<const char*>(p.qw + (n + 4 * kQ8Ahead) * (p.K / 2));
    for (int64_t b = 0; b < nr * (p.K / 2); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    for (int64_t m = 0; m < p.M; ++m) {
      if (nr == 4) gemv_q8_rows_avx2<4>(p, n, m, sf.data(), off.data());
      else gemv_q8_rows_avx2<1>(p, n, m, sf.data(), off.data());
    }
    n += nr;
  }
}
#endif  // QUINTET_X86

// ------------------------------------------------------------------------------------------ float GEMV
// y (M, N) = x (M, K) W^T for a float32 W (N, K), M small: one row of W at a time, streamed once for all
// rows of x (in blocks of up to four), with several accumulators per row of x. One sequential stream is
// what the hardware prefetcher follows best: on our EPYC it reads 22 GB/s against 12 GB/s for four rows
// interleaved, and PyTorch's CPU matmul reaches about half the memory's speed for M = 1 there.
struct FloatProblem {
  const float* x;
  const float* w;
  float* y;
  int64_t M, N, K;
};

void gemv_f32_scalar(const FloatProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* w = p.w + n * p.K;
      const float* x = p.x + m * p.K;
      float a = 0.f;
      for (int64_t k = 0; k < p.K; ++k) a += w[k] * x[k];
      p.y[m * p.N + n] = a;
    }
}

#if QUINTET_X86
template <int MB>
QUINTET_AVX2 void gemv_f32_row_avx2(const FloatProblem& p, int64_t n, int64_t m0) {
  const float* w = p.w + n * p.K;
  const int64_t K16 = p.K / 16 * 16;
  __m256 a[MB][2];
  for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int m = 0; m < MB; ++m) {
      const float* x = p.x + (m0 + m) * p.K + k;
      a[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a[m][0]);
      a[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), a[m][1]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float t = hsum256(_mm256_add_ps(a[m][0], a[m][1]));
    const float* x = p.x + (m0 + m) * p.K;
    for (int64_t k = K16; k < p.K; ++k) t += w[k] * x[k];
    p.y[(m0 + m) * p.N + n] = t;
  }
}

QUINTET_AVX2 void gemv_f32_avx2(const FloatProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) gemv_f32_row_avx2<4>(p, n, m);
    for (; m < p.M; ++m) gemv_f32_row_avx2<1>(p, n, m);
  }
}

template <int MB, int NA>
QUINTET_AVX512 void gemv_f32_row_avx512(const FloatProblem& p, int64_t n, int64_t m0) {
  const float* w = p.w + n * p.K;
  constexpr int64_t kStep = 16 * NA;
  const int64_t Kv = p.K / kStep * kStep;
  __m512 a[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NA; ++j) a[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kv; k += kStep) {
#pragma GCC unroll 4
    for (int j = 0; j < NA; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + k + 16 * j);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        a[m][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.x + (m0 + m) * p.K + k + 16 * j), a[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m512 t = a[m][0];
    for (int j = 1; j < NA; ++j) t = _mm512_add_ps(t, a[m][j]);
    float r = _mm512_reduce_add_ps(t);
    const float* x = p.x + (m0 + m) * p.K;
    for (int64_t k = Kv; k < p.K; ++k) r += w[k] * x[k];
    p.y[(m0 + m) * p.N + n] = r;
  }
}

QUINTET_AVX512 void gemv_f32_avx512(const FloatProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) gemv_f32_row_avx512<4, 1>(p, n, m);
    for (; m + 2 <= p.M; m += 2) gemv_f32_row_avx512<2, 2>(p, n, m);
    for (; m < p.M; ++m) gemv_f32_row_avx512<1, 4>(p, n, m);
  }
}
#endif  // QUINTET_X86

// ------------------------------------------------------------------------------------------ prefill micro-tiles
// y (M, N) = x W^T for a prompt piece of a few dozen rows (a chunk after a cached prefix, the tokens one expert
// receives), without the large-tile path's fixed cost (each tile dequantized to memory, then repacked by the
// library matmul, whatever M is). kNR rows of W at a time are dequantized (in the permuted K order) into a
// per-thread buffer that stays in L1, then multiplied by a register-blocked kernel, MB rows of x at a time,
// each accumulator a dot product along K. Products in float32 (FMA) or, where the caller asks for bfloat16
// and the CPU has AVX-512 BF16, bfloat16 pairs (vdpbf16ps: 32 products per instruction, twice float32's),
// rounded as the large-tile path rounds them; accumulation in float32 either way.
constexpr int kNR = 4;
constexpr int kMicroRowsAvx2 = 3;    // kNR x 3 accumulators + 3 rows of x + a weight: the 16 ymm registers
constexpr int kMicroRowsAvx512 = 6;  // kNR x 6 + 6 + 1 of the 32 zmm registers

void micro_f32_scalar(const float* w, int nr, const float* x, int mb, int64_t K, float* y, int64_t ldy) {
  for (int m = 0; m < mb; ++m)
    for (int r = 0; r < nr; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += w[r * K + k] * x[m * K + k];
      y[m * ldy + r] = acc;
    }
}

#if QUINTET_X86

template <int NR, int MB>
QUINTET_AVX2 void micro_f32_avx2(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
  __m256 acc[NR][MB];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + m * ldy, reduce4_avx2(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum256(acc[r][m]);
    }
  }
}

template <int NR, int MB>
QUINTET_AVX512 void micro_f32_avx512(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[NR][MB];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + m * ldy, reduce4_avx512(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);
    }
  }
}

#define QUINTET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

template <int NR, int MB>
QUINTET_BF16 void micro_bf16_avx512(const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[NR][MB];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + m * ldy, reduce4_avx512(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);
    }
  }
}
#endif  // QUINTET_X86

// ------------------------------------------------------------------------------------------ ops
// (N, K, tiled) of an M0E4 weight in either layout, checked.
struct WeightShape {
  int64_t N, K;
  bool tiled;
};

WeightShape check_weights(const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs) {
  TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kByte && qw.is_contiguous() &&
                  (qw.dim() == 2 || (qw.dim() == 3 && qw.size(2) == 64)),
              "m0e4: qweight must be a contiguous uint8 CPU tensor, (N, K/2) or in the decode layout (N/16, K/8, "
              "64), got ", qw.sizes());
  TORCH_CHECK(gs == 32 || gs == 64 || gs == 128, "m0e4: group size must be 32, 64 or 128, got ", gs);
  const bool tiled = qw.dim() == 3;
  const int64_t N = tiled ? qw.size(0) * kTileRows : qw.size(0), K = tiled ? qw.size(1) * 8 : qw.size(1) * 2;
  TORCH_CHECK(K % gs == 0, "m0e4: K = ", K, " is not a multiple of the group size ", gs);
  for (const auto* t : {&S, &C}) {
    const bool ok = tiled ? t->dim() == 3 && t->size(0) == N / kTileRows && t->size(1) == K / gs &&
                                t->size(2) == kTileRows
                          : t->dim() == 2 && t->size(0) == N && t->size(1) == K / gs;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && ok,
                "m0e4: scales and offsets must be contiguous float16 tensors, (N, K / group) or in the decode "
                "layout (N/16, K / group, 16)");
  }
  return {N, K, tiled};
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = cpu_isa();
  if (isa < 0) return best;
  TORCH_CHECK(isa <= best, "m0e4: instruction set ", isa, " requested, this CPU runs at most ", best);
  return isa;
}

// x (M, K) into dst in the permuted K order (per 32-chunk: the 16 even positions, then the 16 odd).
void permute_into(const float* src, float* dst, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K; b += kChunk)
      for (int i = 0; i < 16; ++i) {
        dst[m * K + b + i] = src[m * K + b + 2 * i];
        dst[m * K + b + 16 + i] = src[m * K + b + 2 * i + 1];
      }
}

at::Tensor permute_k(const at::Tensor& x_in) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kChunk == 0, "m0e4: x must be (M, K) with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xp = at::empty({M, K}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) { permute_into(src + m0 * K, dst + m0 * K, m1 - m0, K); });
  return xp;
}

Problem make_problem(const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs) {
  const WeightShape shape = check_weights(qw, S, C, gs);
  Problem p{};
  p.qw = qw.data_ptr<uint8_t>();
  p.S = S.data_ptr<at::Half>();
  p.C = C.data_ptr<at::Half>();
  p.N = shape.N;
  p.K = shape.K;
  p.gs = gs;
  p.tiled = shape.tiled;
  return p;
}

// x (M, K) in the permuted K order, into a per-thread buffer reused across calls (decode calls are small:
// an allocation and a parallel loop would cost more than the permutation).
const float* permuted(const at::Tensor& x) {
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(x.numel()));
  permute_into(x.data_ptr<float>(), buf.data(), x.size(0), x.size(1));
  return buf.data();
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs,
                int64_t isa) {
  Problem p = make_problem(qw, S, C, gs);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == p.K, "m0e4 gemv: x must be (M, ", p.K, "), got ", x_in.sizes());
  const at::Tensor x = x_in.scalar_type() == at::kFloat && x_in.is_contiguous() ? x_in : x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), p.N}, x.options());
  p.M = x.size(0);
  p.y = y.data_ptr<float>();
  if (p.M == 0 || p.N == 0) return y;
  p.xp = permuted(x);
  const int64_t which = resolve_isa(isa);
  auto rows = [&](int64_t n0, int64_t n1) {
    in_row_layout(p, n0, n1, [&](const Problem& v, int64_t a, int64_t b) {
#if QUINTET_X86
      if (which == kAvx512) return gemv_rows_avx512(v, a, b);
      if (which == kAvx2) return gemv_rows_avx2(v, a, b);
#endif
      gemv_rows_scalar(v, a, b);
    });
  };
  if (at::get_num_threads() == 1) {
    rows(0, p.N);
  } else {  // the workers read the caller's buffer: it outlives the loop
    at::parallel_for(0, p.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.K * p.M)), rows);
  }
  return y;
}

// Rows row_base + r0 .. row_base + r1 of W into out's rows r0 .. r1 (K permuted), either layout.
template <typename Out>
void dequant_any(const Problem& p, int64_t which, int64_t r0, int64_t r1, int64_t row_base, Out* out) {
  in_row_layout(p, row_base + r0, row_base + r1, [&](const Problem& v, int64_t a, int64_t b) {
#if QUINTET_X86
    if (which == kAvx512) return dequant_rows_avx512<Out>(v, a - row_base, b - row_base, row_base, out);
    if (which == kAvx2) return dequant_rows_avx2<Out>(v, a - row_base, b - row_base, row_base, out);
#endif
    dequant_rows_scalar<Out>(v, a - row_base, b - row_base, row_base, out);
  });
}

void dequantize_rows(const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs, int64_t row0,
                     at::Tensor out, int64_t isa) {
  Problem p = make_problem(qw, S, C, gs);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == p.K && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "m0e4 dequantize_rows: out must be a contiguous (R, ", p.K, ") float32 or bfloat16 tensor");
  const int64_t R = out.size(0);
  TORCH_CHECK(row0 >= 0 && row0 + R <= p.N, "m0e4 dequantize_rows: rows ", row0, "..", row0 + R,
              " outside the weight's ", p.N, " rows");
  const int64_t which = resolve_isa(isa);
  const bool f32 = out.scalar_type() == at::kFloat;
  void* base = out.data_ptr();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / p.K), [&](int64_t r0, int64_t r1) {
    if (f32) return dequant_any<float>(p, which, r0, r1, row0, static_cast<float*>(base));
    dequant_any<at::BFloat16>(p, which, r0, r1, row0, static_cast<at::BFloat16*>(base));
  });
}

at::Tensor gemv_f32(const at::Tensor& x_in, const at::Tensor& w, int64_t isa) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "gemv_f32: the weight must be a contiguous (N, K) float32 CPU tensor");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "gemv_f32: x must be (M, ", w.size(1), "), got ",
              x.sizes());
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  FloatProblem p{x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), w.size(0), w.size(1)};
  if (p.M == 0 || p.N == 0) return y;
  const int64_t which = resolve_isa(isa);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.K * p.M));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
#if QUINTET_X86
    if (which == kAvx512) return gemv_f32_avx512(p, n0, n1);
    if (which == kAvx2) return gemv_f32_avx2(p, n0, n1);
#endif
    gemv_f32_scalar(p, n0, n1);
  });
  return y;
}

bool detect_bf16() {
#if QUINTET_X86
  __builtin_cpu_init();
  return cpu_isa() == kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_bf16() {
  static const bool bf16 = detect_bf16();  // once per process, like cpu_isa
  return bf16;
}

enum MicroKind { kMicroScalar, kMicroAvx2, kMicroAvx512, kMicroBf16 };

// mb rows of x (at most MB) against nr rows of a dequantized micro-tile (at most kNR), by the kernel Fn
// compiled for exactly those counts.
template <typename T, int MB, template <int, int> class Fn>
void micro_dispatch(const T* w, int nr, const T* x, int mb, int64_t K, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (mb < MB) return micro_dispatch<T, MB - 1, Fn>(w, nr, x, mb, K, y, ldy);
  }
  if (nr == kNR) return Fn<kNR, MB>::run(w, x, K, y, ldy);
  for (int r = 0; r < nr; ++r) Fn<1, MB>::run(w + r * K, x, K, y + r, ldy);
}

#if QUINTET_X86
template <int NR, int MB> struct MicroAvx2 {
  static void run(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
    micro_f32_avx2<NR, MB>(w, x, K, y, ldy);
  }
};
template <int NR, int MB> struct MicroAvx512 {
  static void run(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
    micro_f32_avx512<NR, MB>(w, x, K, y, ldy);
  }
};
template <int NR, int MB> struct MicroBf16 {
  static void run(const at::BFloat16* w, const at::BFloat16* x, int64_t K, float* y, int64_t ldy) {
    micro_bf16_avx512<NR, MB>(reinterpret_cast<const uint16_t*>(w), reinterpret_cast<const uint16_t*>(x), K, y, ldy);
  }
};
#endif

// Rows [n0, n1) of y for every row of x, kNR rows of W at a time through a per-thread L1 buffer.
template <typename T>
void micro_rows(const Problem& p, const T* x, MicroKind kind, int64_t n0, int64_t n1) {
  thread_local std::vector<T> tile;
  tile.resize(static_cast<size_t>(kNR * p.K));
  const int mbmax = kind == kMicroAvx2 ? kMicroRowsAvx2 : kMicroRowsAvx512;
  for (int64_t n = n0; n < n1; n += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
    const int64_t which = kind == kMicroAvx2 ? kAvx2 : kind == kMicroScalar ? kScalar : kAvx512;
    dequant_any<T>(p, which, 0, nr, n, tile.data());
    for (int64_t m = 0; m < p.M; m += mbmax) {
      const int mb = static_cast<int>(std::min<int64_t>(mbmax, p.M - m));
      float* y = p.y + m * p.N + n;
      const T* xm = x + m * p.K;
      if constexpr (std::is_same_v<T, float>) {
#if QUINTET_X86
        if (kind == kMicroAvx512) { micro_dispatch<float, kMicroRowsAvx512, MicroAvx512>(tile.data(), nr, xm, mb, p.K, y, p.N); continue; }
        if (kind == kMicroAvx2) { micro_dispatch<float, kMicroRowsAvx2, MicroAvx2>(tile.data(), nr, xm, mb, p.K, y, p.N); continue; }
#endif
        micro_f32_scalar(tile.data(), nr, xm, mb, p.K, y, p.N);
      } else {
#if QUINTET_X86
        micro_dispatch<at::BFloat16, kMicroRowsAvx512, MicroBf16>(tile.data(), nr, xm, mb, p.K, y, p.N);
#endif
      }
    }
  }
}

// The prefill matmul: y (M, N) float32 = x W^T. M <= small_rows: micro-tiles (above); more rows: tiles of
// tile_bytes dequantized in parallel into one reused scratch and multiplied by at::mm. bf16: products in
// bfloat16 (the caller measured it faster here), else float32.
at::Tensor matmul_tiles(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C,
                        int64_t gs, int64_t isa, bool bf16, int64_t small_rows, int64_t tile_bytes) {
  Problem p = make_problem(qw, S, C, gs);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == p.K, "m0e4 matmul: x must be (M, ", p.K, "), got ", x_in.sizes());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = p.N, K = p.K;
  const int64_t which = resolve_isa(isa);
  if (M == 0 || N == 0) return at::zeros({M, N}, x.options());
  if (M <= small_rows) {
    at::Tensor y = at::empty({M, N}, x.options());
    p.M = M;
    p.y = y.data_ptr<float>();
    const at::Tensor xp = permute_k(x);  // parallel; the bfloat16 copy by PyTorch's vectorised cast (RNE)
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / (kNR * K * M)) * kNR;
    if (bf16 && which == kAvx512 && cpu_has_bf16()) {
      const at::Tensor xb = xp.to(at::kBFloat16);
      const at::BFloat16* xbp = xb.data_ptr<at::BFloat16>();
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { micro_rows<at::BFloat16>(p, xbp, kMicroBf16, n0, n1); });
    } else {
      const MicroKind kind = which == kAvx512 ? kMicroAvx512 : which == kAvx2 ? kMicroAvx2 : kMicroScalar;
      const float* xpp = xp.data_ptr<float>();
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { micro_rows<float>(p, xpp, kind, n0, n1); });
    }
    return y;
  }
  at::Tensor xp = permute_k(x);
  if (bf16) xp = xp.to(at::kBFloat16);
  const int64_t item = bf16 ? 2 : 4;
  const int64_t step = std::min<int64_t>(N, std::max<int64_t>(16, tile_bytes / (K * item) / 16 * 16));
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(static_cast<size_t>(step * K * item));
  const at::Tensor tile_all = at::from_blob(scratch.data(), {step, K}, xp.options());
  at::Tensor out = at::empty({M, N}, xp.options());
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t rows = std::min(step, N - n0);
    at::Tensor tile = tile_all.narrow(0, 0, rows);
    dequantize_rows(qw, S, C, gs, n0, tile, isa);
    at::Tensor dst = out.narrow(1, n0, rows);
    at::mm_out(dst, xp, tile.t());
  }
  return bf16 ? out.to(at::kFloat) : out;
}

bool detect_vnni() {
#if QUINTET_X86
  __builtin_cpu_init();
  return cpu_isa() == kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_vnni() {
  static const bool vnni = detect_vnni();  // once per process, like cpu_isa
  return vnni;
}

bool int8_runs(int64_t isa) { return resolve_isa(isa) >= kAvx2; }

// x (M, K) -> xq int8 per block of 32 (dx = max|x| / 127, xq = round-to-nearest-even(x / dx)), permuted per
// 128 (the 64 even positions, then the 64 odd); lane_dx (M, K/8): the block's dx / 16 for each group of 8
// codes; xsum (M, K/gs): exact sums per weight group. The loops are vectorised per instruction set.
inline __attribute__((always_inline)) void quantize_q8_rows(const float* xs, int8_t* q, float* ld, float* sums,
                                                            int64_t M, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xs + m * K;
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) t += xr[k];  // in order: exact as before
      sums[m * G + g] = t;
    }
    for (int64_t c = 0; c < K / 128; ++c) {
      alignas(64) int32_t qi[128];
      for (int b = 0; b < 4; ++b) {
        const float* xb = xr + c * 128 + b * 32;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xb[k]));
        const float dx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
#pragma omp simd
        for (int k = 0; k < 32; ++k) qi[b * 32 + k] = static_cast<int32_t>(std::nearbyint(xb[k] * inv));
        for (int j = 0; j < 4; ++j) ld[m * (K / 8) + (c * 4 + b) * 4 + j] = dx / 16.f;
      }
      int8_t* qc = q + m * K + c * 128;
#pragma omp simd
      for (int i = 0; i < 64; ++i) {
        qc[i] = static_cast<int8_t>(qi[2 * i]);
        qc[64 + i] = static_cast<int8_t>(qi[2 * i + 1]);
      }
    }
  }
}
void quantize_q8_scalar(const float* xs, int8_t* q, float* ld, float* sums, int64_t M, int64_t K, int64_t gs) {
  quantize_q8_rows(xs, q, ld, sums, M, K, gs);
}
#if QUINTET_X86
QUINTET_AVX2 void quantize_q8_avx2(const float* xs, int8_t* q, float* ld, float* sums, int64_t M, int64_t K,
                                   int64_t gs) {
  quantize_q8_rows(xs, q, ld, sums, M, K, gs);
}
QUINTET_AVX512 void quantize_q8_avx512(const float* xs, int8_t* q, float* ld, float* sums, int64_t M, int64_t K,
                                       int64_t gs) {
  quantize_q8_rows(xs, q, ld, sums, M, K, gs);
}
#endif
void quantize_q8(const float* xs, int8_t* q, float* ld, float* sums, int64_t M, int64_t K, int64_t gs, int64_t isa) {
#if QUINTET_X86
  if (isa == kAvx512) return quantize_q8_avx512(xs, q, ld, sums, M, K, gs);
  if (isa == kAvx2) return quantize_q8_avx2(xs, q, ld, sums, M, K, gs);
#endif
  quantize_q8_scalar(xs, q, ld, sums, M, K, gs);
}

// x (M, K) -> int8 per block of 32, permuted per 128 (even positions, then odd); lane_dx (M, K/8): the
// block's dx / 16 for each group of 8 codes; xsum (M, G): exact sums per weight group.
at::Tensor gemv_q8(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C,
                   int64_t gs, int64_t isa) {
  const WeightShape shape = check_weights(qw, S, C, gs);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = shape.K, N = shape.N, G = K / gs;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "m0e4 gemv_q8: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(K % 128 == 0, "m0e4 gemv_q8: K = ", K, " must be a multiple of 128");
  at::Tensor y = at::empty({M, N}, x.options());
  // the quantized x in this thread's reused scratch (the workers read it; it outlives the loop):
  // lane_dx (M, K/8) and xsum (M, G) float32, then xq (M, K) int8
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(M * (K / 8 + G) + (M * K + 3) / 4));
  float* ld = scratch.data();
  float* sums = ld + M * (K / 8);
  int8_t* q = reinterpret_cast<int8_t*>(sums + M * G);
  quantize_q8(x.data_ptr<float>(), q, ld, sums, M, K, gs, resolve_isa(isa));
  Q8Problem p{q, ld, sums, qw.data_ptr<uint8_t>(), S.data_ptr<at::Half>(), C.data_ptr<at::Half>(),
              y.data_ptr<float>(), M, N, K, gs, shape.tiled};
  if (M == 0 || N == 0) return y;
  const int64_t which = resolve_isa(isa);
  const bool vnni = which == kAvx512 && cpu_has_vnni();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * M));
#if QUINTET_X86
  if (shape.tiled && which >= kAvx2) {
    at::parallel_for(0, N / kTileRows, std::max<int64_t>(1, grain / kTileRows), [&](int64_t t0, int64_t t1) {
      if (vnni) return gemv_q8_tiles_vnni(p, t0, t1);
      gemv_q8_tiles_avx2(p, t0, t1);
    });
    return y;
  }
#endif
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    in_row_layout(p, n0, n1, [&](const Q8Problem& v, int64_t a, int64_t b) {
#if QUINTET_X86
      if (vnni) return gemv_q8_vnni(v, a, b);
      if (which >= kAvx2) return gemv_q8_avx2(v, a, b);
#endif
      gemv_q8_scalar(v, a, b);
    });
  });
  return y;
}

// silu(a) * b for each row [a | b] of h (M, 2 I): the SwiGLU between gate_up and down. The exponential is
// the shared polynomial (fast_math.h), vectorised by the compiler for the instruction set of the wrapper.
inline __attribute__((always_inline)) void silu_mul_rows(const float* hp, float* ap, int64_t M, int64_t inter) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = hp + m * 2 * inter;
    const float* b = a + inter;
    float* o = ap + m * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) o[i] = a[i] / (1.f + quintet_math::fexp(-a[i])) * b[i];
  }
}
void silu_mul_scalar(const float* hp, float* ap, int64_t M, int64_t inter) { silu_mul_rows(hp, ap, M, inter); }
#if QUINTET_X86
QUINTET_AVX2 void silu_mul_avx2(const float* hp, float* ap, int64_t M, int64_t inter) { silu_mul_rows(hp, ap, M, inter); }
QUINTET_AVX512 void silu_mul_avx512(const float* hp, float* ap, int64_t M, int64_t inter) {
  silu_mul_rows(hp, ap, M, inter);
}
#endif

at::Tensor silu_mul(const at::Tensor& h, int64_t isa) {
  const int64_t M = h.size(0), inter = h.size(1) / 2;
  at::Tensor act = at::empty({M, inter}, h.options());
  const float* hp = h.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  const int64_t which = resolve_isa(isa);
#if QUINTET_X86
  if (which == kAvx512) return silu_mul_avx512(hp, ap, M, inter), act;
  if (which == kAvx2) return silu_mul_avx2(hp, ap, M, inter), act;
#endif
  silu_mul_scalar(hp, ap, M, inter);
  return act;
}

// down(silu(a) * b) with [a | b] = gate_up(x), both weights in M0E4: the decode step's SwiGLU in one call.
at::Tensor swiglu_gemv(const at::Tensor& x, const at::Tensor& gu_q, const at::Tensor& gu_s, const at::Tensor& gu_o,
                       const at::Tensor& dn_q, const at::Tensor& dn_s, const at::Tensor& dn_o, int64_t gs,
                       int64_t isa, bool int8) {
  const WeightShape up = check_weights(gu_q, gu_s, gu_o, gs), down = check_weights(dn_q, dn_s, dn_o, gs);
  const int64_t inter = up.N / 2;
  TORCH_CHECK(up.N % 2 == 0 && down.K == inter,
              "m0e4 swiglu_gemv: gate_up must have 2 I rows and down I inputs, got ", gu_q.sizes(), " and ",
              dn_q.sizes());
  const bool q8_up = int8 && x.size(1) % 128 == 0 && int8_runs(isa);
  const at::Tensor act =
      silu_mul(q8_up ? gemv_q8(x, gu_q, gu_s, gu_o, gs, isa) : gemv(x, gu_q, gu_s, gu_o, gs, isa), isa);
  const bool q8_down = int8 && inter % 128 == 0 && int8_runs(isa);
  return q8_down ? gemv_q8(act, dn_q, dn_s, dn_o, gs, isa) : gemv(act, dn_q, dn_s, dn_o, gs, isa);
}

// The same for float32 weights (the float engine's decode step).
at::Tensor swiglu_f32(const at::Tensor& x, const at::Tensor& w_gu, const at::Tensor& w_dn, int64_t isa) {
  const int64_t inter = w_gu.size(0) / 2;
  TORCH_CHECK(w_gu.size(0) % 2 == 0 && w_dn.size(1) == inter,
              "swiglu_f32: gate_up must have 2 I rows and down I inputs, got ", w_gu.sizes(), " and ", w_dn.sizes());
  return gemv_f32(silu_mul(gemv_f32(x, w_gu, isa), isa), w_dn, isa);
}

// RMSNorm of each row of x (+ h, when given: the residual add first), float32: the decode step calls it
// twice per layer on one row, where PyTorch's composite rms_norm costs ~15 us of dispatching per call.
// Returns (x + h, norm) (x itself when h is absent), norm = w * (r / sqrt(mean(r^2) + eps)).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& h,
                                                const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.scalar_type() == at::kFloat &&
                  w.is_contiguous() && w.dim() == 1 && x.size(-1) == w.size(0),
              "add_rms_norm: contiguous float32 x (..., D) and weight (D,)");
  const bool add = h.has_value() && h->defined();
  if (add)
    TORCH_CHECK(h->scalar_type() == at::kFloat && h->is_contiguous() && h->sizes() == x.sizes(),
                "add_rms_norm: h must be a contiguous float32 tensor shaped like x");
  const int64_t D = w.size(0), rows = D ? x.numel() / D : 0;
  at::Tensor sum = add ? at::empty_like(x) : x;
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* hp = add ? h->data_ptr<float>() : nullptr;
  const float* wp = w.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = xp + r * D;
    float* t = sp + r * D;
    double ss = 0.0;
    if (add) {
      const float* b = hp + r * D;
      for (int64_t i = 0; i < D; ++i) {
        t[i] = a[i] + b[i];
        ss += static_cast<double>(t[i]) * t[i];
      }
    } else {
      for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(a[i]) * a[i];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
    const float* src = add ? t : a;
    float* o = op + r * D;
    for (int64_t i = 0; i < D; ++i) o[i] = wp[i] * (src[i] * inv);
  }
  return {sum, out};
}

int64_t best_isa() { return cpu_isa(); }

}  // namespace quintet_m0e4

using namespace quintet_m0e4;

TORCH_LIBRARY(quintet_m0e4, m) {
  m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int isa) -> Tensor");
  m.def(
      "dequantize_rows(Tensor qweight, Tensor scales, Tensor offsets, int group_size, int row0, Tensor(a!) out, "
      "int isa) -> ()");
  m.def("permute_k(Tensor x) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor weight, int isa) -> Tensor");
  m.def("gemv_q8(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int isa) -> Tensor");
  m.def("has_vnni() -> bool", &cpu_has_vnni);
  m.def("add_rms_norm(Tensor x, Tensor? h, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("swiglu_f32(Tensor x, Tensor w_gu, Tensor w_dn, int isa) -> Tensor");
  m.def(
      "swiglu_gemv(Tensor x, Tensor gu_q, Tensor gu_s, Tensor gu_o, Tensor dn_q, Tensor dn_s, Tensor dn_o, "
      "int group_size, int isa, bool int8) -> Tensor");
  m.def(
      "matmul_tiles(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int isa, bool bf16, "
      "int small_rows, int tile_bytes) -> Tensor");
  m.def("has_bf16() -> bool", &cpu_has_bf16);
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(quintet_m0e4, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("dequantize_rows", &dequantize_rows);
  m.impl("permute_k", &permute_k);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_q8", &gemv_q8);
  m.impl("swiglu_gemv", &swiglu_gemv);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("swiglu_f32", &swiglu_f32);
  m.impl("matmul_tiles", &matmul_tiles);
}

// What the kernel sources share for x86 vector code: per-function target attributes (one binary runs on
// any x86-64 CPU; the caller picks the path by what the CPU has, at run time) and horizontal sums.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QUINTET_X86 1
#define QUINTET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QUINTET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#else
#define QUINTET_X86 0
#endif

#if QUINTET_X86
namespace quintet_simd {

// The sums of four accumulators at once, in order (a transposing add tree: 13 operations where four
// separate horizontal sums take about 32).
QUINTET_AVX512 inline __m128 reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // lane i: a, b, c, d
  const __m512d td = _mm512_castps_pd(t);
  const __m256 u = _mm256_add_ps(_mm256_castpd_ps(_mm512_castpd512_pd256(td)),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(td, 1)));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

QUINTET_AVX2 inline __m128 reduce4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256d abd = _mm256_castps_pd(ab), cdd = _mm256_castps_pd(cd);
  const __m256 t = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(abd, cdd)),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(abd, cdd)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

}  // namespace quintet_simd
#endif

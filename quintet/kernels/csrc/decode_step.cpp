// One decode step of a Jamba engine in one call (one new token for each of a few rows).
//
// A step is some sixty kernel calls (M0E4 or float GEMVs, the fused Mamba step, SwiGLU, residual + RMSNorm,
// attention over the cached keys) and, made from Python, the calls, their argument parsing and the small
// PyTorch ops between them cost about a third of a token's time. `DecodeProgram` holds the engine's weights,
// bound once, and runs a whole step from C++: the same kernels (m0e4_ops.h; the Mamba step through the
// dispatcher, it lives in the selective-scan library), in the model's order:
//
//   per layer: h = RMSNorm(x + pending); h = mixer(h); x, h = x + h, RMSNorm(x + h); pending = ff(h)
//   mixer: out_proj(mamba_step(in_proj(h)))  or  o_proj(attention(qkv_proj(h), cached K/V))
//   ff: SwiGLU, or the MoE router's softmax and top-k, then the chosen experts' SwiGLU weighted and summed
//   logits = head(RMSNorm(x + pending))
//
// Caches are updated in place: each Mamba layer's conv and SSM states, and each attention layer's K/V
// buffers (rows, kv_heads, capacity, head_dim), where row r writes its new key at positions[r] and attends
// to keys 0 .. positions[r] (a server's rows may have different lengths).
//
// Attention (`attend_decode`, also an op of its own): per row and K/V head, the scores of the group's query
// heads against every valid key, a softmax (exp by the shared polynomial, fast_math.h) and the weighted sum
// of values; loops vectorised per instruction set by target attributes, chosen at run time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "fast_math.h"
#include "m0e4_ops.h"
#include "simd.h"

namespace quintet_decode {
namespace {

using at::Tensor;
using quintet_m0e4::kAvx2;
using quintet_m0e4::kAvx512;

#define QD_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------------------------ attention
// E: the K/V buffers' element type, float or at::Half (float16 halves attention's reads; values are
// widened to float32 as they are loaded, and products and sums stay float32).
template <typename E>
struct Attention {
  const float* qkv;  // (rows, (H + 2 hk) d): [q | k | v] of the new token
  int64_t ld;
  const E* kb;  // K/V buffers, strides in elements (the innermost is 1)
  const E* vb;
  int64_t k_row, k_head, k_pos, v_row, v_head, v_pos;
  const int64_t* pos;  // (rows,) the new token's slot
  float* out;          // (rows, H d)
  int64_t heads, kv_heads, d;
  float scale;
};

// Row r, K/V head j: its g query heads against keys 0 .. pos[r]. s: scratch of g * (pos[r] + 1) floats.
template <typename E>
QD_INLINE void attend_group(const Attention<E>& a, int64_t r, int64_t j, float* s) {
  const int64_t g = a.heads / a.kv_heads, d = a.d, T = a.pos[r] + 1;
  const E* kbase = a.kb + r * a.k_row + j * a.k_head;
  const E* vbase = a.vb + r * a.v_row + j * a.v_head;
  for (int64_t h = 0; h < g; ++h) {
    const float* q = a.qkv + r * a.ld + (j * g + h) * d;
    float* sh = s + h * T;
    for (int64_t t = 0; t < T; ++t) {
      const E* k = kbase + t * a.k_pos;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < d; ++i) acc += q[i] * static_cast<float>(k[i]);
      sh[t] = acc * a.scale;
    }
    float m = sh[0];
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < T; ++t) m = std::max(m, sh[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < T; ++t) {
      sh[t] = quintet_math::fexp(sh[t] - m);
      sum += sh[t];
    }
    float* o = a.out + r * a.heads * d + (j * g + h) * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float p = sh[t];
      const E* v = vbase + t * a.v_pos;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += p * static_cast<float>(v[i]);
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

#define QD_ATTEND_RANGE(NAME, ATTR)                                                      \
  template <typename E>                                                                  \
  ATTR void NAME(const Attention<E>& a, int64_t i0, int64_t i1, float* s) {              \
    for (int64_t i = i0; i < i1; ++i) attend_group(a, i / a.kv_heads, i % a.kv_heads, s); \
  }
QD_ATTEND_RANGE(attend_scalar, )
#if QUINTET_X86
QD_ATTEND_RANGE(attend_avx2, QUINTET_AVX2)
QD_ATTEND_RANGE(attend_avx512, QUINTET_AVX512)

// The softmax of each head over its T scores, s laid out (key, head) with g heads (g divides 16), in place;
// sums[h] gets head h's sum of exponentials. The exponentials run sixteen at a time (lane l of a block of
// 16 floats is head l % g); compiled for the caller's instruction set.
QD_INLINE void softmax_keys(float* s, int64_t T, int64_t g, float* sums) {
  alignas(64) float mx[16];
  for (int64_t h = 0; h < g; ++h) mx[h] = s[h];
  for (int64_t t = 1; t < T; ++t)
    for (int64_t h = 0; h < g; ++h) mx[h] = std::max(mx[h], s[t * g + h]);
  for (int l = g; l < 16; ++l) mx[l] = mx[l % g];
  const int64_t n = T * g, full = n / 16 * 16;
  alignas(64) float acc[16] = {};
  for (int64_t i = 0; i < full; i += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      const float e = quintet_math::fexp(s[i + l] - mx[l]);
      s[i + l] = e;
      acc[l] += e;
    }
  }
  for (int64_t h = 0; h < g; ++h) sums[h] = 0.f;
  for (int l = 0; l < 16; ++l) sums[l % g] += acc[l];
  for (int64_t i = full; i < n; ++i) {
    s[i] = quintet_math::fexp(s[i] - mx[i % g]);
    sums[i % g] += s[i];
  }
}

// The same on AVX-512 for head_dim = 16 NV and a multiple of 4 query heads per K/V head, with the scores
// laid out (key, head): each key is loaded once for four heads, whose dot products are summed by one
// transposing add tree; the exponentials run sixteen at a time; each value is loaded once for HP heads.
QUINTET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
QUINTET_AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
QUINTET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
QUINTET_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename E, int NV, int HP>
QUINTET_AVX512 void attend_group_avx512(const Attention<E>& a, int64_t r, int64_t j, float* s) {
  const int64_t g = a.heads / a.kv_heads, d = NV * 16, T = a.pos[r] + 1;
  const E* kbase = a.kb + r * a.k_row + j * a.k_head;
  const E* vbase = a.vb + r * a.v_row + j * a.v_head;
  const float* q = a.qkv + r * a.ld + j * g * d;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t h0 = 0; h0 < g; h0 += 4) {
    const float *q0 = q + h0 * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
    for (int64_t t = 0; t < T; ++t) {
      const E* k = kbase + t * a.k_pos;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m512 kv = load16(k + 16 * v);
        c0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 16 * v), kv, c0);
        c1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + 16 * v), kv, c1);
        c2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + 16 * v), kv, c2);
        c3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + 16 * v), kv, c3);
      }
      _mm_storeu_ps(s + t * g + h0, _mm_mul_ps(quintet_simd::reduce4_avx512(c0, c1, c2, c3),
                                               _mm512_castps512_ps128(scale)));
    }
  }
  alignas(64) float sums[16];
  softmax_keys(s, T, g, sums);
  // weighted sum of the values, HP heads at a time
  for (int64_t h0 = 0; h0 < g; h0 += HP) {
    __m512 acc[HP][NV];
    for (int h = 0; h < HP; ++h)
      for (int v = 0; v < NV; ++v) acc[h][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const E* vr = vbase + t * a.v_pos;
      __m512 vv[NV];
      for (int v = 0; v < NV; ++v) vv[v] = load16(vr + 16 * v);
      for (int h = 0; h < HP; ++h) {
        const __m512 p = _mm512_set1_ps(s[t * g + h0 + h]);
        for (int v = 0; v < NV; ++v) acc[h][v] = _mm512_fmadd_ps(p, vv[v], acc[h][v]);
      }
    }
    for (int h = 0; h < HP; ++h) {
      const __m512 inv = _mm512_set1_ps(1.f / sums[h0 + h]);
      float* o = a.out + r * a.heads * d + (j * g + h0 + h) * d;
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + 16 * v, _mm512_mul_ps(acc[h][v], inv));
    }
  }
}

template <typename E, int NV, int HP>
QUINTET_AVX512 void attend_range_avx512(const Attention<E>& a, int64_t i0, int64_t i1, float* s) {
  for (int64_t i = i0; i < i1; ++i) attend_group_avx512<E, NV, HP>(a, i / a.kv_heads, i % a.kv_heads, s);
}


// The same on AVX2: head_dim = 8 NV, four query heads per pass for the scores, HP for the values.
template <typename E, int NV, int HP>
QUINTET_AVX2 void attend_group_avx2(const Attention<E>& a, int64_t r, int64_t j, float* s) {
  const int64_t g = a.heads / a.kv_heads, d = NV * 8, T = a.pos[r] + 1;
  const E* kbase = a.kb + r * a.k_row + j * a.k_head;
  const E* vbase = a.vb + r * a.v_row + j * a.v_head;
  const float* q = a.qkv + r * a.ld + j * g * d;
  const __m128 scale = _mm_set1_ps(a.scale);
  for (int64_t h0 = 0; h0 < g; h0 += 4) {
    const float *q0 = q + h0 * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
    for (int64_t t = 0; t < T; ++t) {
      const E* k = kbase + t * a.k_pos;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m256 kv = load8(k + 8 * v);
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 8 * v), kv, c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + 8 * v), kv, c1);
        c2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + 8 * v), kv, c2);
        c3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + 8 * v), kv, c3);
      }
      _mm_storeu_ps(s + t * g + h0, _mm_mul_ps(quintet_simd::reduce4_avx2(c0, c1, c2, c3), scale));
    }
  }
  alignas(64) float sums[16];
  softmax_keys(s, T, g, sums);
  for (int64_t h0 = 0; h0 < g; h0 += HP) {
    __m256 acc[HP][NV];
    for (int h = 0; h < HP; ++h)
      for (int v = 0; v < NV; ++v) acc[h][v] = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const E* vr = vbase + t * a.v_pos;
      for (int h = 0; h < HP; ++h) {
        const __m256 p = _mm256_set1_ps(s[t * g + h0 + h]);
        for (int v = 0; v < NV; ++v) acc[h][v] = _mm256_fmadd_ps(p, load8(vr + 8 * v), acc[h][v]);
      }
    }
    for (int h = 0; h < HP; ++h) {
      const __m256 inv = _mm256_set1_ps(1.f / sums[h0 + h]);
      float* o = a.out + r * a.heads * d + (j * g + h0 + h) * d;
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + 8 * v, _mm256_mul_ps(acc[h][v], inv));
    }
  }
}

template <typename E, int NV, int HP>
QUINTET_AVX2 void attend_range_avx2(const Attention<E>& a, int64_t i0, int64_t i1, float* s) {
  for (int64_t i = i0; i < i1; ++i) attend_group_avx2<E, NV, HP>(a, i / a.kv_heads, i % a.kv_heads, s);
}

template <typename E>
using AttendRange = void (*)(const Attention<E>&, int64_t, int64_t, float*);

// The vector kernel for this shape and instruction set, or nullptr (then the generic loops run).
template <typename E>
AttendRange<E> attend_fast_for(int64_t which, int64_t d, int64_t g) {
  if (g % 4 != 0 || 16 % g != 0) return nullptr;
  if (which == kAvx512) {
    switch (d) {
      case 32: return attend_range_avx512<E, 2, 4>;
      case 64: return attend_range_avx512<E, 4, 4>;
      case 128: return attend_range_avx512<E, 8, 2>;
      default: return nullptr;
    }
  }
  if (which == kAvx2) {
    switch (d) {
      case 32: return attend_range_avx2<E, 4, 2>;
      case 64: return attend_range_avx2<E, 8, 1>;
      case 128: return attend_range_avx2<E, 16, 1>;
      default: return nullptr;
    }
  }
  return nullptr;
}
#endif

// Writes row r's new K/V at its position (converted to the buffers' type) and attends; E as Attention's.
template <typename E>
void attend_rows(const Tensor& keys, const Tensor& values, const float* src, int64_t ld, const int64_t* pp,
                 int64_t rows, int64_t heads, int64_t hk, int64_t d, int64_t longest, double scale, int64_t which,
                 float* out) {
  E* kb = static_cast<E*>(keys.data_ptr());
  E* vb = static_cast<E*>(values.data_ptr());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < hk; ++j) {
      E* kd = kb + r * keys.stride(0) + j * keys.stride(1) + pp[r] * keys.stride(2);
      E* vd = vb + r * values.stride(0) + j * values.stride(1) + pp[r] * values.stride(2);
      const float* ks = src + r * ld + (heads + j) * d;
      const float* vs = src + r * ld + (heads + hk + j) * d;
      for (int64_t i = 0; i < d; ++i) kd[i] = static_cast<E>(ks[i]), vd[i] = static_cast<E>(vs[i]);
    }
  const Attention<E> a{src, ld, kb, vb, keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
                       values.stride(1), values.stride(2), pp, out, heads, hk, d, static_cast<float>(scale)};
  const int64_t scratch = (heads / hk) * longest;
#if QUINTET_X86
  const AttendRange<E> fast = attend_fast_for<E>(which, d, heads / hk);
#endif
  at::parallel_for(0, rows * hk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(static_cast<size_t>(scratch));
#if QUINTET_X86
    if (fast) return fast(a, i0, i1, s.data());
    if (which == kAvx512) return attend_avx512(a, i0, i1, s.data());
    if (which == kAvx2) return attend_avx2(a, i0, i1, s.data());
#endif
    attend_scalar(a, i0, i1, s.data());
  });
}

// qkv (rows, (H + 2 hk) d) float32; keys / values (rows, hk, capacity, d), float32 or float16 (both the
// same), written in place at positions.
Tensor attend_decode(const Tensor& qkv_in, const Tensor& keys, const Tensor& values, const Tensor& positions,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, int64_t isa) {
  const Tensor qkv = qkv_in.contiguous();
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0,
              "attend_decode: heads must be a positive multiple of kv_heads, got ", heads, " and ", kv_heads);
  const int64_t rows = qkv.size(0), d = head_dim, hk = kv_heads;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.size(1) == (heads + 2 * hk) * d,
              "attend_decode: qkv must be float32 (rows, ", (heads + 2 * hk) * d, "), got ", qkv.sizes());
  const auto kv_type = keys.scalar_type();
  for (const Tensor* t : {&keys, &values})
    TORCH_CHECK((kv_type == at::kFloat || kv_type == at::kHalf) && t->scalar_type() == kv_type && t->dim() == 4 &&
                    t->size(0) == rows && t->size(1) == hk && t->size(3) == d && t->stride(3) == 1,
                "attend_decode: the K/V buffers must be both float32 or both float16 (", rows, ", ", hk,
                ", capacity, ", d, ") with contiguous rows of head_dim, got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(keys.size(2) == values.size(2), "attend_decode: K and V buffers of different capacities");
  const Tensor pos = positions.contiguous();
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == rows,
              "attend_decode: positions must be int64 (", rows, ",)");
  const int64_t cap = keys.size(2);
  const int64_t* pp = pos.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] < cap, "attend_decode: position ", pp[r], " of row ", r,
                " is outside the cache's ", cap, " slots");
    longest = std::max(longest, pp[r] + 1);
  }
  Tensor out = at::empty({rows, heads * d}, qkv.options());
  const int64_t which = quintet_m0e4::resolve_isa(isa);
  const float* src = qkv.data_ptr<float>();
  if (kv_type == at::kHalf) {
    attend_rows<at::Half>(keys, values, src, qkv.size(1), pp, rows, heads, hk, d, longest, scale, which,
                          out.data_ptr<float>());
  } else {
    attend_rows<float>(keys, values, src, qkv.size(1), pp, rows, heads, hk, d, longest, scale, which,
                       out.data_ptr<float>());
  }
  return out;
}

// ------------------------------------------------------------------------------------------ the program
struct Linear {
  Tensor q, s, o;  // M0E4 codes, scales, offsets (q undefined: a float32 weight w)
  Tensor w;
  std::optional<Tensor> bias;
  int64_t gs = 0;
};

struct Layer {
  Tensor norm_in, norm_ff;
  double eps_in = 0, eps_ff = 0;
  bool attention = false, mixer_set = false;
  // Mamba: in_proj, the fused step's weights, out_proj
  int64_t in_proj = -1, out_proj = -1;
  Tensor conv_w, x_proj, dt_norm, b_norm, c_norm, dt_proj, dt_bias, A;
  std::optional<Tensor> conv_b, D;
  double mixer_eps = 0;
  // attention: merged q/k/v projection and o_proj
  int64_t qkv = -1, o = -1, heads = 0, kv_heads = 0, head_dim = 0;
  double scale = 1;
  // feed-forward: SwiGLU (gate_up, down), or the MoE router and experts
  int64_t gate_up = -1, down = -1, router = -1, top_k = 0;
  std::vector<int64_t> expert_gu, expert_dn;
};

using MixerStep = void(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor&, double, const Tensor&, const Tensor&,
                       const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&);

}  // namespace

class DecodeProgram : public torch::CustomClassHolder {
 public:
  // isa: the M0E4 GEMV's instruction set; float_isa: the float GEMV's; int8: int8 activations where they run
  DecodeProgram(int64_t isa, int64_t float_isa, bool int8) : isa_(isa), float_isa_(float_isa), int8_(int8) {}

  int64_t add_m0e4(Tensor q, Tensor s, Tensor o, int64_t gs, std::optional<Tensor> bias) {
    TORCH_CHECK(q.scalar_type() == at::kByte && (q.dim() == 2 || q.dim() == 3) && q.is_contiguous(),
                "DecodeProgram: M0E4 codes must be a contiguous uint8 tensor, (N, K/2) or (N/16, K/8, 64)");
    check_bias(bias, q.dim() == 3 ? q.size(0) * 16 : q.size(0));
    Linear l;
    l.q = q, l.s = s, l.o = o, l.gs = gs, l.bias = bias;
    linears_.push_back(l);
    return static_cast<int64_t>(linears_.size()) - 1;
  }

  int64_t add_float(Tensor w, std::optional<Tensor> bias) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
                "DecodeProgram: a float weight must be a contiguous (N, K) float32 tensor");
    check_bias(bias, w.size(0));
    Linear l;
    l.w = w, l.bias = bias;
    linears_.push_back(l);
    return static_cast<int64_t>(linears_.size()) - 1;
  }

  void add_layer(Tensor norm_in, double eps_in, Tensor norm_ff, double eps_ff) {
    for (const Tensor* t : {&norm_in, &norm_ff})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous(),
                  "DecodeProgram: norm weights must be contiguous float32 vectors");
    Layer layer;
    layer.norm_in = norm_in, layer.eps_in = eps_in, layer.norm_ff = norm_ff, layer.eps_ff = eps_ff;
    layers_.push_back(layer);
  }

  void set_mamba(int64_t in_proj, int64_t out_proj, Tensor conv_w, std::optional<Tensor> conv_b, Tensor x_proj,
                 Tensor dt_norm, Tensor b_norm, Tensor c_norm, double eps, Tensor dt_proj, Tensor dt_bias, Tensor A,
                 std::optional<Tensor> D) {
    Layer& l = current();
    l.in_proj = check_index(in_proj), l.out_proj = check_index(out_proj);
    l.conv_w = conv_w, l.conv_b = conv_b, l.x_proj = x_proj, l.dt_norm = dt_norm, l.b_norm = b_norm;
    l.c_norm = c_norm, l.mixer_eps = eps, l.dt_proj = dt_proj, l.dt_bias = dt_bias, l.A = A, l.D = D;
    l.attention = false, l.mixer_set = true;
    ++mamba_layers_;
  }

  void set_attention(int64_t qkv, int64_t o, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale) {
    Layer& l = current();
    l.qkv = check_index(qkv), l.o = check_index(o);
    l.heads = heads, l.kv_heads = kv_heads, l.head_dim = head_dim, l.scale = scale;
    l.attention = true, l.mixer_set = true;
    ++attention_layers_;
  }

  void set_swiglu(int64_t gate_up, int64_t down) {
    Layer& l = current();
    l.gate_up = check_index(gate_up), l.down = check_index(down);
    check_pair(l.gate_up, l.down);
  }

  void set_moe(int64_t router, std::vector<int64_t> gate_ups, std::vector<int64_t> downs, int64_t top_k) {
    Layer& l = current();
    TORCH_CHECK(gate_ups.size() == downs.size() && !gate_ups.empty() && top_k >= 1 &&
                    top_k <= static_cast<int64_t>(gate_ups.size()),
                "DecodeProgram: the MoE needs as many gate_up as down experts and 1 <= top_k <= experts");
    l.router = check_index(router);
    for (size_t e = 0; e < gate_ups.size(); ++e) check_pair(check_index(gate_ups[e]), check_index(downs[e]));
    l.expert_gu = gate_ups, l.expert_dn = downs, l.top_k = top_k;
  }

  // The token embedding: an M0E4 table (codes (V, K/2), scales, offsets) or a float32 one (scales absent).
  void set_embedding(Tensor table, std::optional<Tensor> scales, std::optional<Tensor> offsets, int64_t gs) {
    TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "DecodeProgram: the embedding table must be contiguous 2-D");
    if (scales.has_value()) {
      TORCH_CHECK(offsets.has_value() && table.scalar_type() == at::kByte && gs > 0 &&
                      (table.size(1) * 2) % gs == 0 && scales->scalar_type() == at::kHalf &&
                      offsets->scalar_type() == at::kHalf && scales->is_contiguous() && offsets->is_contiguous() &&
                      scales->size(0) == table.size(0) && scales->size(1) == table.size(1) * 2 / gs &&
                      offsets->sizes() == scales->sizes(),
                  "DecodeProgram: an M0E4 embedding needs uint8 codes (V, K/2) and float16 scales and offsets "
                  "(V, K/gs)");
    } else {
      TORCH_CHECK(table.scalar_type() == at::kFloat, "DecodeProgram: a float embedding table must be float32");
    }
    embedding_ = table, embedding_scales_ = scales, embedding_offsets_ = offsets, embedding_gs_ = gs;
  }

  void set_final(Tensor norm, double eps, int64_t head) {
    TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.dim() == 1 && norm.is_contiguous(),
                "DecodeProgram: the final norm weight must be a contiguous float32 vector");
    final_norm_ = norm, final_eps_ = eps, head_ = check_index(head);
  }

  // Logits (rows, vocab) of the new tokens ids (rows,) int64; the states are updated in place: conv / ssm per Mamba layer, keys / values per attention layer (in layer order).
  Tensor step(Tensor ids, std::vector<Tensor> conv, std::vector<Tensor> ssm, std::vector<Tensor> keys,
              std::vector<Tensor> values, Tensor positions) {
    TORCH_CHECK(head_ >= 0 && embedding_.defined(), "DecodeProgram: set_embedding and set_final first");
    Tensor x = embed(ids);
    TORCH_CHECK(static_cast<int64_t>(conv.size()) == mamba_layers_ && static_cast<int64_t>(ssm.size()) == mamba_layers_,
                "DecodeProgram.step: ", mamba_layers_, " Mamba states expected, got ", conv.size());
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == attention_layers_ &&
                    static_cast<int64_t>(values.size()) == attention_layers_,
                "DecodeProgram.step: ", attention_layers_, " K/V buffers expected, got ", keys.size());
    const int64_t rows = x.size(0);
    if (mamba_layers_ > 0 && !mixer_step_) {
      mixer_step_ = c10::Dispatcher::singleton().findSchemaOrThrow("quintet_scan::mixer_step", "").typed<MixerStep>();
    }
    std::optional<Tensor> pending;
    size_t mi = 0, ai = 0;
    for (const Layer& l : layers_) {
      TORCH_CHECK(l.mixer_set && (l.gate_up >= 0 || l.router >= 0), "DecodeProgram: a layer is incomplete");
      auto [xs, h] = quintet_m0e4::add_rms_norm(x, pending, l.norm_in, l.eps_in);
      x = xs;
      if (l.attention) {
        const Tensor qkv = apply(l.qkv, h);
        h = apply(l.o, attend_decode(qkv, keys[ai], values[ai], positions, l.heads, l.kv_heads, l.head_dim,
                                     l.scale, isa_));
        ++ai;
      } else {
        const Tensor xz = apply(l.in_proj, h);
        const Tensor& cs = conv[mi];
        const Tensor& ss = ssm[mi];
        TORCH_CHECK(cs.size(0) == rows && ss.size(0) == rows, "DecodeProgram.step: Mamba states of ", cs.size(0),
                    " rows for ", rows, " rows");
        Tensor y = at::empty({rows, l.conv_w.size(0)}, x.options());
        mixer_step_->call(xz, cs, l.conv_w, l.conv_b, l.x_proj, l.dt_norm, l.b_norm, l.c_norm, l.mixer_eps,
                          l.dt_proj, l.dt_bias, l.A, l.D, ss, y, cs, ss);  // in place: row by row, channel by channel
        h = apply(l.out_proj, y);
        ++mi;
      }
      auto [x2, h2] = quintet_m0e4::add_rms_norm(x, h, l.norm_ff, l.eps_ff);
      x = x2;
      pending = l.router >= 0 ? moe(l, h2) : swiglu(l.gate_up, l.down, h2);
    }
    auto [xf, hf] = quintet_m0e4::add_rms_norm(x, pending, final_norm_, final_eps_);
    return apply(head_, hf);
  }

  // The step for a cache whose buffers do not change between steps (the engine's): bind them once, then
  // each step passes only the new tokens ids (rows, 1) and their common position; logits (rows, 1, vocab).
  void bind_state(std::vector<Tensor> conv, std::vector<Tensor> ssm, std::vector<Tensor> keys,
                  std::vector<Tensor> values) {
    bound_conv_ = std::move(conv), bound_ssm_ = std::move(ssm);
    bound_keys_ = std::move(keys), bound_values_ = std::move(values);
  }

  Tensor step_bound(const Tensor& ids, int64_t position) {
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(1) == 1,
                "DecodeProgram.step_bound: ids must be int64 (rows, 1)");
    const int64_t rows = ids.size(0);
    if (!bound_positions_.defined() || bound_positions_.size(0) != rows)
      bound_positions_ = at::empty({rows}, ids.options());
    bound_positions_.fill_(position);
    return step(ids.reshape({rows}), bound_conv_, bound_ssm_, bound_keys_, bound_values_, bound_positions_)
        .unsqueeze(1);
  }

 private:
  std::vector<Tensor> bound_conv_, bound_ssm_, bound_keys_, bound_values_;
  Tensor bound_positions_;

  // The rows of the embedding table for ids, float32 (M0E4: w = (h - c) * S, as the module computes it).
  Tensor embed(const Tensor& ids_in) const {
    const Tensor ids = ids_in.contiguous();
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "DecodeProgram.step: ids must be int64 (rows,)");
    const int64_t rows = ids.size(0), V = embedding_.size(0);
    const bool m0e4 = embedding_scales_.has_value();
    const int64_t K = m0e4 ? embedding_.size(1) * 2 : embedding_.size(1);
    Tensor x = at::empty({rows, K}, ids.options().dtype(at::kFloat));
    const int64_t* ip = ids.data_ptr<int64_t>();
    float* xp = x.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t id = ip[r];
      TORCH_CHECK(id >= 0 && id < V, "DecodeProgram.step: token id ", id, " outside the vocabulary of ", V);
      float* o = xp + r * K;
      if (!m0e4) {
        const float* w = embedding_.data_ptr<float>() + id * K;
        std::copy(w, w + K, o);
        continue;
      }
      const int64_t gs = embedding_gs_, G = K / gs;
      const uint8_t* codes = embedding_.data_ptr<uint8_t>() + id * (K / 2);
      const at::Half* S = embedding_scales_->data_ptr<at::Half>() + id * G;
      const at::Half* C = embedding_offsets_->data_ptr<at::Half>() + id * G;
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t q = k % 2 ? codes[k / 2] >> 4 : codes[k / 2] & 0xF;
        const uint32_t bits = 0x3F800000u | (q << 19);  // 1 + q/16: the M0E4 bit trick
        float h;
        std::memcpy(&h, &bits, sizeof h);
        o[k] = (h - static_cast<float>(C[k / gs])) * static_cast<float>(S[k / gs]);
      }
    }
    return x;
  }

  Layer& current() {
    TORCH_CHECK(!layers_.empty(), "DecodeProgram: add_layer first");
    return layers_.back();
  }

  int64_t check_index(int64_t i) const {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(linears_.size()), "DecodeProgram: no linear ", i);
    return i;
  }

  static void check_bias(const std::optional<Tensor>& bias, int64_t n) {
    if (bias.has_value())
      TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n,
                  "DecodeProgram: a bias must be a float32 vector of the output width ", n);
  }

  void check_pair(int64_t gate_up, int64_t down) const {
    const Linear &a = linears_[gate_up], &b = linears_[down];
    TORCH_CHECK(!a.bias.has_value() && !b.bias.has_value() && a.q.defined() == b.q.defined() && a.gs == b.gs,
                "DecodeProgram: SwiGLU needs two bias-free M0E4 weights of one group size or two float32 weights");
  }

  Tensor apply(int64_t index, const Tensor& x) const {
    const Linear& l = linears_[index];
    Tensor y;
    if (l.q.defined()) {
      const bool q8 = int8_ && x.size(1) % 128 == 0 && quintet_m0e4::int8_runs(isa_);
      y = q8 ? quintet_m0e4::gemv_q8(x, l.q, l.s, l.o, l.gs, isa_) : quintet_m0e4::gemv(x, l.q, l.s, l.o, l.gs, isa_);
    } else {
      y = quintet_m0e4::gemv_f32(x, l.w, float_isa_);
    }
    return l.bias.has_value() ? y + *l.bias : y;
  }

  Tensor swiglu(int64_t gate_up, int64_t down, const Tensor& h) const {
    const Linear &a = linears_[gate_up], &b = linears_[down];
    if (a.q.defined()) return quintet_m0e4::swiglu_gemv(h, a.q, a.s, a.o, b.q, b.s, b.o, b.gs, isa_, int8_);
    return quintet_m0e4::swiglu_f32(h, a.w, b.w, float_isa_);
  }

  // JambaSparseMoeBlock's decode step: softmax over the router's logits in float32 and the top k (the lower
  // expert first among equals); each chosen expert runs once on the rows routed to it, and each row adds
  // its experts' outputs times their weights in the experts' order, so a row's output does not depend on
  // the rows beside it.
  Tensor moe(const Layer& l, const Tensor& h) const {
    const Tensor logits = apply(l.router, h).contiguous();
    const int64_t rows = h.size(0), E = logits.size(1), k = l.top_k, H = h.size(1);
    std::vector<float> weight(static_cast<size_t>(rows * E), 0.f);  // 0 where the expert is not chosen
    std::vector<float> p(static_cast<size_t>(E));
    const float* lp = logits.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* lr = lp + r * E;
      const float m = *std::max_element(lr, lr + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(lr[e] - m);
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t best = std::max_element(p.begin(), p.end()) - p.begin();
        weight[r * E + best] = p[best];
        p[best] = -1.f;
      }
    }
    Tensor out = at::zeros_like(h);
    float* op = out.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> idx;
      for (int64_t r = 0; r < rows; ++r)
        if (weight[r * E + e] > 0.f) idx.push_back(r);
      if (idx.empty()) continue;
      const int64_t n = static_cast<int64_t>(idx.size());
      const Tensor y = swiglu(l.expert_gu[e], l.expert_dn[e], n == rows ? h : h.index_select(0, at::tensor(idx, at::kLong)))
                           .contiguous();
      const float* yp = y.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const float w = weight[idx[i] * E + e];
        float* o = op + idx[i] * H;
        const float* yr = yp + i * H;
        for (int64_t c = 0; c < H; ++c) o[c] += w * yr[c];
      }
    }
    return out;
  }

  int64_t isa_, float_isa_;
  bool int8_;
  std::vector<Linear> linears_;
  std::vector<Layer> layers_;
  Tensor embedding_;
  std::optional<Tensor> embedding_scales_, embedding_offsets_;
  int64_t embedding_gs_ = 0;
  Tensor final_norm_;
  double final_eps_ = 0;
  int64_t head_ = -1;
  int64_t mamba_layers_ = 0, attention_layers_ = 0;
  std::optional<c10::TypedOperatorHandle<MixerStep>> mixer_step_;
};

}  // namespace quintet_decode

TORCH_LIBRARY_FRAGMENT(quintet_m0e4, m) {
  using quintet_decode::DecodeProgram;
  m.class_<DecodeProgram>("DecodeProgram")
      .def(torch::init<int64_t, int64_t, bool>())
      .def("add_m0e4", &DecodeProgram::add_m0e4)
      .def("add_float", &DecodeProgram::add_float)
      .def("add_layer", &DecodeProgram::add_layer)
      .def("set_mamba", &DecodeProgram::set_mamba)
      .def("set_attention", &DecodeProgram::set_attention)
      .def("set_swiglu", &DecodeProgram::set_swiglu)
      .def("set_moe", &DecodeProgram::set_moe)
      .def("set_embedding", &DecodeProgram::set_embedding)
      .def("set_final", &DecodeProgram::set_final)
      .def("step", &DecodeProgram::step)
      .def("bind_state", &DecodeProgram::bind_state)
      .def("step_bound", &DecodeProgram::step_bound);
  m.def(
      "attend_decode(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, Tensor positions, int heads, int kv_heads, "
      "int head_dim, float scale, int isa) -> Tensor",
      &quintet_decode::attend_decode);
}

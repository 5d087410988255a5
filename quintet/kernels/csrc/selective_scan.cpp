// Fused selective scan for CPU: forward, backward and the one-token decode step.
//
// Loaded by quintet/kernels/selective_scan_cpu.py with torch.utils.cpp_extension.load (JIT). The ops are
// registered as torch.ops.quintet_scan.*; they write into tensors the Python side allocates, so this file
// needs only the light ATen headers (a fresh build takes seconds, not the minute torch/extension.h costs).
//
// Shapes (b = batch, d = channels, L = length, n = state size), all in one compute type T (float or
// double; the Python side casts):
//   u, delta, z, grad_y : (b, d, L), any strides          A : (d, n) contiguous
//   B, C                : (b, L, n) contiguous (time-major, so one step reads n contiguous values)
//   D, delta_bias       : (d,)                            states : (b, d, n) contiguous
//
// Per channel and step (the math of quintet/kernels/selective_scan.py):
//   dt = softplus(delta + bias);  h = exp(dt * A) * h + dt * u * B;  y = (C . h + D * u) * silu(z)
// The discretisation is computed inside the time loop; nothing of size (b, d, L, n) is ever stored.
// Time is processed in chunks of kChunk steps: the forward pass can save the state entering each chunk,
// and the backward pass recomputes one chunk of states from its checkpoint before walking it in reverse.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "fast_math.h"
#include "simd.h"

namespace {

constexpr int64_t kChunk = 32;  // steps between saved states; the backward pass recomputes one chunk
constexpr int64_t kLanes = 16;  // channels per block: one AVX-512 register of floats

// ---------------------------------------------------------------------------------------------------------
// Elementwise math. The float versions are branch-free polynomials that GCC vectorises inside `omp simd`
// loops (libm's expf/log1pf would stay scalar; fexp is shared, fast_math.h); the double versions call libm
// and serve the gradient tests.

using quintet_math::fexp;

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, a series in s^2 (rel. error < 2e-9).
inline float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

inline double log1p_unit(double e) { return std::log1p(e); }

// torch.nn.functional.softplus with beta 1 and threshold 20.
template <typename T>
inline T softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  const T pos = x > T(0) ? x : T(0);
  const T sp = pos + log1p_unit(fexp(-ax));
  return x > T(20) ? x : sp;
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fexp(-x));
}

// ---------------------------------------------------------------------------------------------------------
// Views and arguments.

template <typename T>
struct Seq {  // a (b, d, L) tensor with arbitrary strides, or absent
  const T* p = nullptr;
  int64_t sb = 0, sd = 0, sl = 0;
  const T* row(int64_t b, int64_t d) const { return p + b * sb + d * sd; }
};

template <typename T>
Seq<T> seq_of(const at::Tensor& t) {
  return Seq<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct Problem {
  int64_t batch = 0, dim = 0, len = 0, n = 0;
  Seq<T> u, delta, z;
  const T* A = nullptr;
  const T* B = nullptr;
  const T* C = nullptr;
  const T* D = nullptr;
  const T* bias = nullptr;
  bool softplus = false;
};

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "quintet_scan: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "quintet_scan: ", name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
}

void check_contiguous(const at::Tensor& t, const char* name, at::ScalarType dtype,
                      std::initializer_list<int64_t> shape) {
  check_cpu(t, name, dtype);
  TORCH_CHECK(t.is_contiguous(), "quintet_scan: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes().equals(shape), "quintet_scan: ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

void check_seq(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t b, int64_t d, int64_t L) {
  check_cpu(t, name, dtype);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == b && t.size(1) == d && t.size(2) == L, "quintet_scan: ", name,
              " has shape ", t.sizes(), ", expected (", b, ", ", d, ", ", L, ")");
}

template <typename T>
Problem<T> make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                        bool softplus) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(u.dim() == 3, "quintet_scan: u must be (b, d, L), got ", u.sizes());
  TORCH_CHECK(A.dim() == 2, "quintet_scan: A must be (d, n), got ", A.sizes());
  Problem<T> p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.len = u.size(2);
  p.n = A.size(1);
  check_seq(u, "u", dtype, p.batch, p.dim, p.len);
  check_seq(delta, "delta", dtype, p.batch, p.dim, p.len);
  check_contiguous(A, "A", dtype, {p.dim, p.n});
  check_contiguous(B, "B (time-major)", dtype, {p.batch, p.len, p.n});
  check_contiguous(C, "C (time-major)", dtype, {p.batch, p.len, p.n});
  if (D.has_value() && D->defined()) check_contiguous(*D, "D", dtype, {p.dim});
  if (delta_bias.has_value() && delta_bias->defined()) check_contiguous(*delta_bias, "delta_bias", dtype, {p.dim});
  if (z.has_value() && z->defined()) {
    check_seq(*z, "z", dtype, p.batch, p.dim, p.len);
    p.z = seq_of<T>(*z);
  }
  p.u = seq_of<T>(u);
  p.delta = seq_of<T>(delta);
  p.A = A.data_ptr<T>();
  p.B = B.data_ptr<T>();
  p.C = C.data_ptr<T>();
  p.D = opt_ptr<T>(D);
  p.bias = opt_ptr<T>(delta_bias);
  p.softplus = softplus;
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// Blocks. The scan kernels vectorise across channels: a block is kLanes consecutive channels of one batch
// row (one AVX-512 register of floats) and every inner loop runs over those lanes. exp(dt A) then needs no
// horizontal work, y = C . h is a vertical multiply-add over the state index, and B_t, C_t (shared by all
// channels of a row) are broadcast. A short last block is padded with lanes whose A, u and gradients are
// zero and whose results are dropped. Per-step buffers are lane-major: buf[i * kLanes + lane].

struct Block {
  int64_t bi, c0, cw;  // batch row, first channel, channels in use (<= kLanes)
};

inline int64_t blocks_per_row(int64_t dim) { return (dim + kLanes - 1) / kLanes; }

inline Block block_at(int64_t bi, int64_t index_in_row, int64_t dim) {
  const int64_t c0 = index_in_row * kLanes;
  return Block{bi, c0, std::min(kLanes, dim - c0)};
}

// Buffers of one task: kChunk * kLanes values each, n * kLanes for states, kChunk * n * kLanes for the
// per-step exp(dt A) and states the backward pass keeps.
template <typename T>
struct Scratch {
  std::vector<T> mem;
  T *x, *uu, *dt, *dtu, *ys, *zz, *g, *gy, *gdt, *gu, *gd, *gz;
  T *At, *h, *hin, *gh, *gA;
  T *dA = nullptr, *hs = nullptr;
  Scratch(int64_t n, bool backward)
      : mem(static_cast<size_t>(kLanes * (12 * kChunk + 5 * n + (backward ? 2 * kChunk * n : 0)))) {
    T* q = mem.data();
    for (T** slot : {&x, &uu, &dt, &dtu, &ys, &zz, &g, &gy, &gdt, &gu, &gd, &gz}) {
      *slot = q;
      q += kChunk * kLanes;
    }
    for (T** slot : {&At, &h, &hin, &gh, &gA}) {
      *slot = q;
      q += n * kLanes;
    }
    if (backward) {
      dA = q;
      hs = q + kChunk * n * kLanes;
    }
  }
};

// 16 x 16 float transpose in registers (GCC vector extensions; one two-source shuffle per row and stage on
// AVX-512). Stage w swaps bit w of the row and column index wherever they differ.
using v16f = float __attribute__((vector_size(64)));

template <int W, size_t... J>
inline void swap_blocks(v16f& a, v16f& b, std::index_sequence<J...>) {
  const v16f na = __builtin_shufflevector(a, b, ((J & W) == 0 ? int(J) : int(16 + J - W))...);
  const v16f nb = __builtin_shufflevector(a, b, ((J & W) == 0 ? int(J + W) : int(16 + J))...);
  a = na;
  b = nb;
}

template <int W>
inline void transpose_stage(v16f* r) {
  for (int i = 0; i < 16; ++i) {
    if ((i & W) == 0) swap_blocks<W>(r[i], r[i + W], std::make_index_sequence<16>{});
  }
}

inline void transpose16(v16f* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

static_assert(kLanes == 16, "the block transposes are written for 16 lanes");

// Steps [t0, t0 + tn) of the block's channels, from a strided (b, d, L) tensor into a lane-major buffer;
// padding lanes get 0.
template <typename T>
void gather(const Seq<T>& s, const Block& blk, int64_t t0, int64_t tn, T* out) {
  int64_t done = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (s.sl == 1 && blk.cw == kLanes) {  // time-contiguous rows: whole 16 x 16 tiles through registers
      for (; done + 16 <= tn; done += 16) {
        v16f r[16];
        for (int c = 0; c < 16; ++c) {
          const float* src = s.row(blk.bi, blk.c0 + c) + t0 + done;
          std::memcpy(&r[c], src, sizeof(v16f));
          __builtin_prefetch(src + kChunk);  // the same row one chunk later: 16+ streams outrun the prefetcher
        }
        transpose16(r);
        std::memcpy(out + done * kLanes, r, sizeof(r));
      }
    }
  }
  for (int64_t c = 0; c < kLanes; ++c) {
    if (c < blk.cw) {
      const T* r = s.row(blk.bi, blk.c0 + c) + t0 * s.sl;
      for (int64_t i = done; i < tn; ++i) out[i * kLanes + c] = r[i * s.sl];
    } else {
      for (int64_t i = done; i < tn; ++i) out[i * kLanes + c] = T(0);
    }
  }
}

// A lane-major buffer back into a contiguous (b, d, L) tensor.
template <typename T>
void scatter(const T* in, const Block& blk, int64_t dim, int64_t L, int64_t t0, int64_t tn, T* out) {
  T* row0 = out + (blk.bi * dim + blk.c0) * L + t0;
  int64_t done = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (blk.cw == kLanes) {
      for (; done + 16 <= tn; done += 16) {
        v16f r[16];
        std::memcpy(r, in + done * kLanes, sizeof(r));
        transpose16(r);
        for (int c = 0; c < 16; ++c) std::memcpy(row0 + c * L + done, &r[c], sizeof(v16f));
      }
    }
  }
  for (int64_t c = 0; c < blk.cw; ++c) {
    for (int64_t i = done; i < tn; ++i) row0[c * L + i] = in[i * kLanes + c];
  }
}

// Rows of a contiguous (b, d, slots, n) tensor <-> a lane-major state h[k * kLanes + lane].
template <typename T>
void load_state(const T* src, const Block& blk, int64_t dim, int64_t slots, int64_t slot, int64_t n, T* h) {
  std::fill(h, h + n * kLanes, T(0));
  for (int64_t c = 0; c < blk.cw; ++c) {
    const T* r = src + ((blk.bi * dim + blk.c0 + c) * slots + slot) * n;
    for (int64_t k = 0; k < n; ++k) h[k * kLanes + c] = r[k];
  }
}

template <typename T>
void store_state(const T* h, const Block& blk, int64_t dim, int64_t slots, int64_t slot, int64_t n, T* dst) {
  for (int64_t c = 0; c < blk.cw; ++c) {
    T* r = dst + ((blk.bi * dim + blk.c0 + c) * slots + slot) * n;
    for (int64_t k = 0; k < n; ++k) r[k] = h[k * kLanes + c];
  }
}

// The block's A (lane-major, At[k * kLanes + lane]), delta_bias and D; 0 in padding lanes.
template <typename T>
void load_block_consts(const Problem<T>& p, const Block& blk, Scratch<T>& s, T* bias, T* Dv) {
  std::fill(s.At, s.At + p.n * kLanes, T(0));
  for (int64_t c = 0; c < kLanes; ++c) {
    const bool live = c < blk.cw;
    bias[c] = live && p.bias ? p.bias[blk.c0 + c] : T(0);
    Dv[c] = live && p.D ? p.D[blk.c0 + c] : T(0);
    for (int64_t k = 0; live && k < p.n; ++k) s.At[k * kLanes + c] = p.A[(blk.c0 + c) * p.n + k];
  }
}

// One chunk of inputs: x = delta + bias, dt = softplus(x) (or x), dtu = dt * u.
template <typename T>
void load_chunk(const Problem<T>& p, const Block& blk, const T* bias, int64_t t0, int64_t tn, Scratch<T>& s) {
  gather(p.delta, blk, t0, tn, s.x);
  gather(p.u, blk, t0, tn, s.uu);
  for (int64_t i = 0; i < tn; ++i) {
    T* __restrict__ x = s.x + i * kLanes;
    T* __restrict__ dt = s.dt + i * kLanes;
    T* __restrict__ dtu = s.dtu + i * kLanes;
    const T* __restrict__ uu = s.uu + i * kLanes;
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) {
      const T xv = x[c] + bias[c];
      const T dv = p.softplus ? softplus(xv) : xv;
      x[c] = xv;
      dt[c] = dv;
      dtu[c] = dv * uu[c];
    }
  }
}

// The recurrence over one chunk: s.h enters as the state before the chunk and leaves as the state after
// it; s.ys gets C_t . h_t + D u_t. With kStore every exp(dt A) and every state are kept for the backward pass.
template <typename T, bool kStore>
void recur_chunk(int64_t n, int64_t tn, const T* __restrict__ Bt, const T* __restrict__ Ct, const T* Dv,
                 Scratch<T>& s) {
  const T* __restrict__ At = s.At;
  T* __restrict__ h = s.h;
  for (int64_t i = 0; i < tn; ++i) {
    const T* __restrict__ dt = s.dt + i * kLanes;
    const T* __restrict__ dtu = s.dtu + i * kLanes;
    T y[kLanes] = {};
    for (int64_t k = 0; k < n; ++k) {
      const T bk = Bt[i * n + k], ck = Ct[i * n + k];
      T* __restrict__ hk = h + k * kLanes;
      const T* __restrict__ ak = At + k * kLanes;
      T* __restrict__ dAk = kStore ? s.dA + (i * n + k) * kLanes : nullptr;
      T* __restrict__ hsk = kStore ? s.hs + (i * n + k) * kLanes : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < kLanes; ++c) {
        const T a = fexp(dt[c] * ak[c]);
        const T hv = a * hk[c] + dtu[c] * bk;
        hk[c] = hv;
        y[c] += ck * hv;
        if constexpr (kStore) {
          dAk[c] = a;
          hsk[c] = hv;
        }
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) s.ys[i * kLanes + c] = y[c] + Dv[c] * s.uu[i * kLanes + c];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_impl(const Problem<T>& p, const T* h0, T* y, T* h_last, T* ckpt) {
  const int64_t L = p.len, n = p.n, dim = p.dim, nb = blocks_per_row(dim);
  const int64_t n_chunks = (L + kChunk - 1) / kChunk;
  at::parallel_for(0, p.batch * nb, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(n, false);
    T bias[kLanes], Dv[kLanes];
    for (int64_t index = begin; index < end; ++index) {
      const Block blk = block_at(index / nb, index % nb, dim);
      load_block_consts(p, blk, s, bias, Dv);
      if (h0) {
        load_state(h0, blk, dim, 1, 0, n, s.h);
      } else {
        std::fill(s.h, s.h + n * kLanes, T(0));
      }
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t t0 = c * kChunk, tn = std::min(kChunk, L - t0);
        if (ckpt) store_state(s.h, blk, dim, n_chunks, c, n, ckpt);
        load_chunk(p, blk, bias, t0, tn, s);
        recur_chunk<T, false>(n, tn, p.B + (blk.bi * L + t0) * n, p.C + (blk.bi * L + t0) * n, Dv, s);
        if (p.z.p) {
          gather(p.z, blk, t0, tn, s.zz);
#pragma omp simd
          for (int64_t j = 0; j < tn * kLanes; ++j) {
            const T zv = s.zz[j];
            s.g[j] = s.ys[j] * (zv * sigmoid(zv));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < tn * kLanes; ++j) s.g[j] = s.ys[j];
        }
        scatter(s.g, blk, dim, L, t0, tn, y);
      }
      store_state(s.h, blk, dim, 1, 0, n, h_last);
    }
  });
}

void scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
              const std::optional<at::Tensor>& delta_bias, bool softplus, const std::optional<at::Tensor>& h0,
              const at::Tensor& y, const at::Tensor& h_last, const std::optional<at::Tensor>& ckpt) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "quintet_scan: float32 or float64 only, got ",
              dtype);
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const bool has_h0 = h0.has_value() && h0->defined();
  const bool has_ckpt = ckpt.has_value() && ckpt->defined();
  if (has_h0) check_contiguous(*h0, "initial_state", dtype, {b, d, n});
  check_contiguous(y, "y", dtype, {b, d, L});
  check_contiguous(h_last, "final_state", dtype, {b, d, n});
  if (has_ckpt) check_contiguous(*ckpt, "checkpoints", dtype, {b, d, (L + kChunk - 1) / kChunk, n});
  if (dtype == at::kFloat) {
    auto p = make_problem<float>(u, delta, A, B, C, D, z, delta_bias, softplus);
    forward_impl<float>(p, has_h0 ? h0->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                         h_last.data_ptr<float>(), has_ckpt ? ckpt->data_ptr<float>() : nullptr);
  } else {
    auto p = make_problem<double>(u, delta, A, B, C, D, z, delta_bias, softplus);
    forward_impl<double>(p, has_h0 ? h0->data_ptr<double>() : nullptr, y.data_ptr<double>(),
                          h_last.data_ptr<double>(), has_ckpt ? ckpt->data_ptr<double>() : nullptr);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward. One task = one batch row and one group of blocks. B and C are shared by all channels of a row,
// so their gradients are sums over channels: each task adds into its own (L, n) partial sums (the Python
// side sums the groups); A, D and delta_bias gradients are written per batch row and summed there too.

template <typename T>
struct Grads {
  Seq<T> gy;                             // incoming (b, d, L), any strides
  const T* gh_last;                      // incoming (b, d, n)
  T *gu, *gdelta, *gz;                   // (b, d, L) contiguous
  T *gA, *gB, *gC, *gD, *gbias, *gh0;    // (b, d, n), (b, G, L, n) x 2, (b, d) x 2, (b, d, n)
  int64_t groups;
};

// Sum of the kLanes values of v as a short tree of vector adds (a plain loop becomes a chain of scalar adds).
static_assert(kLanes == 16, "lane_sum is written out for 16 lanes");

#if defined(__AVX512F__)
// The sixteen sums of rows[16 c .. 16 c + 15], c < 16, as one vector (lane c): a transposing add tree, 45
// operations where sixteen separate horizontal sums take about 160.
inline __m512 sum_rows16(const float* rows) {
  __m512 w[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_load_ps(rows + 32 * i), b = _mm512_load_ps(rows + 32 * i + 16);
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a, b, a, b
  }
  __m512 x[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));  // per 128 bits: rows 4i .. 4i + 3
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}
#endif
template <typename T>
inline T lane_sum(const T* v) {
  T s8[8], s4[4];
#pragma omp simd
  for (int c = 0; c < 8; ++c) s8[c] = v[c] + v[c + 8];
#pragma omp simd
  for (int c = 0; c < 4; ++c) s4[c] = s8[c] + s8[c + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Walks one recomputed chunk backwards. s.gh holds dLoss/dh after the chunk on entry, before it on exit.
template <typename T>
void reverse_chunk(int64_t n, int64_t tn, const T* __restrict__ Bt, const T* __restrict__ Ct, const T* Dv,
                   Scratch<T>& s, T* __restrict__ gB, T* __restrict__ gC) {
  const T* __restrict__ At = s.At;
  T* __restrict__ gh = s.gh;
  T* __restrict__ gA = s.gA;
  for (int64_t i = tn - 1; i >= 0; --i) {
    const T* __restrict__ gy = s.gy + i * kLanes;
    const T* __restrict__ dt = s.dt + i * kLanes;
    const T* __restrict__ dtu = s.dtu + i * kLanes;
    const T* __restrict__ uu = s.uu + i * kLanes;
    T su[kLanes] = {}, sdt[kLanes] = {};
    for (int64_t k = 0; k < n; ++k) {
      const T bk = Bt[i * n + k], ck = Ct[i * n + k];
      const T* __restrict__ ak = s.dA + (i * n + k) * kLanes;
      const T* __restrict__ hk = s.hs + (i * n + k) * kLanes;
      const T* __restrict__ hp = i > 0 ? s.hs + ((i - 1) * n + k) * kLanes : s.hin + k * kLanes;
      T* __restrict__ ghk = gh + k * kLanes;
      T* __restrict__ gAk = gA + k * kLanes;
      const T* __restrict__ Ak = At + k * kLanes;
      T lb[kLanes], lc[kLanes];
#pragma omp simd
      for (int64_t c = 0; c < kLanes; ++c) {
        const T g = ghk[c] + gy[c] * ck;  // dLoss/dh_t
        lc[c] = gy[c] * hk[c];
        lb[c] = g * dtu[c];
        su[c] += g * bk;
        const T tmp = g * ak[c] * hp[c];
        gAk[c] += dt[c] * tmp;
        sdt[c] += Ak[c] * tmp;
        ghk[c] = g * ak[c];
      }
      gB[i * n + k] += lane_sum(lb);
      gC[i * n + k] += lane_sum(lc);
    }
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) {
      s.gu[i * kLanes + c] = dt[c] * su[c] + Dv[c] * gy[c];
      s.gdt[i * kLanes + c] = sdt[c] + uu[c] * su[c];
    }
  }
}

template <typename T>
void backward_impl(const Problem<T>& p, const T* ckpt, const Grads<T>& g) {
  const int64_t L = p.len, n = p.n, dim = p.dim, G = g.groups, nb = blocks_per_row(dim);
  const int64_t n_chunks = (L + kChunk - 1) / kChunk;
  at::parallel_for(0, p.batch * G, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(n, true);
    T bias[kLanes], Dv[kLanes], gD[kLanes], gbias[kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / G, gi = task % G;
      T* gB = g.gB + task * L * n;
      T* gC = g.gC + task * L * n;
      std::fill(gB, gB + L * n, T(0));
      std::fill(gC, gC + L * n, T(0));
      for (int64_t index = gi * nb / G; index < (gi + 1) * nb / G; ++index) {
        const Block blk = block_at(bi, index, dim);
        load_block_consts(p, blk, s, bias, Dv);
        load_state(g.gh_last, blk, dim, 1, 0, n, s.gh);
        std::fill(s.gA, s.gA + n * kLanes, T(0));
        std::fill(gD, gD + kLanes, T(0));
        std::fill(gbias, gbias + kLanes, T(0));
        for (int64_t c = n_chunks - 1; c >= 0; --c) {
          const int64_t t0 = c * kChunk, tn = std::min(kChunk, L - t0), m = tn * kLanes;
          const T* Bt = p.B + (bi * L + t0) * n;
          const T* Ct = p.C + (bi * L + t0) * n;
          load_chunk(p, blk, bias, t0, tn, s);
          load_state(ckpt, blk, dim, n_chunks, c, n, s.hin);
          std::copy(s.hin, s.hin + n * kLanes, s.h);
          recur_chunk<T, true>(n, tn, Bt, Ct, Dv, s);
          // Output side, y = ys * silu(z): gy = dLoss/dys, gz = dLoss/dz.
          gather(g.gy, blk, t0, tn, s.g);
          if (p.z.p) {
            gather(p.z, blk, t0, tn, s.zz);
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) {
              const T zv = s.zz[j], sg = sigmoid(zv);
              s.gy[j] = s.g[j] * zv * sg;
              s.gz[j] = s.g[j] * s.ys[j] * sg * (T(1) + zv * (T(1) - sg));
            }
            scatter(s.gz, blk, dim, L, t0, tn, g.gz);
          } else {
            std::copy(s.g, s.g + m, s.gy);
          }
          reverse_chunk(n, tn, Bt, Ct, Dv, s, gB + t0 * n, gC + t0 * n);
          // dt = softplus(x): dLoss/dx = dLoss/ddt * sigmoid(x), or 1 above torch's threshold of 20.
          if (p.softplus) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) {
              const T xv = s.x[j];
              s.gd[j] = xv > T(20) ? s.gdt[j] : s.gdt[j] * sigmoid(xv);
            }
          } else {
            std::copy(s.gdt, s.gdt + m, s.gd);
          }
          for (int64_t i = 0; i < tn; ++i) {
#pragma omp simd
            for (int64_t lane = 0; lane < kLanes; ++lane) {
              gbias[lane] += s.gd[i * kLanes + lane];
              gD[lane] += s.gy[i * kLanes + lane] * s.uu[i * kLanes + lane];
            }
          }
          scatter(s.gu, blk, dim, L, t0, tn, g.gu);
          scatter(s.gd, blk, dim, L, t0, tn, g.gdelta);
        }
        store_state(s.gh, blk, dim, 1, 0, n, g.gh0);
        store_state(s.gA, blk, dim, 1, 0, n, g.gA);
        for (int64_t lane = 0; lane < blk.cw; ++lane) {
          g.gD[bi * dim + blk.c0 + lane] = gD[lane];
          g.gbias[bi * dim + blk.c0 + lane] = gbias[lane];
        }
      }
    }
  });
}

template <typename T>
Grads<T> make_grads(const at::Tensor& grad_y, const at::Tensor& grad_h_last, const at::Tensor& grad_u,
                    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_z,
                    const at::Tensor& grad_A_part, const at::Tensor& grad_B_part, const at::Tensor& grad_C_part,
                    const at::Tensor& grad_D_part, const at::Tensor& grad_bias_part, const at::Tensor& grad_h0) {
  Grads<T> g;
  g.gy = seq_of<T>(grad_y);
  g.gh_last = grad_h_last.data_ptr<T>();
  g.gu = grad_u.data_ptr<T>();
  g.gdelta = grad_delta.data_ptr<T>();
  g.gz = grad_z.has_value() && grad_z->defined() ? grad_z->data_ptr<T>() : nullptr;
  g.gA = grad_A_part.data_ptr<T>();
  g.gB = grad_B_part.data_ptr<T>();
  g.gC = grad_C_part.data_ptr<T>();
  g.gD = grad_D_part.data_ptr<T>();
  g.gbias = grad_bias_part.data_ptr<T>();
  g.gh0 = grad_h0.data_ptr<T>();
  g.groups = grad_B_part.size(1);
  return g;
}

void scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
              const std::optional<at::Tensor>& delta_bias, bool softplus, const at::Tensor& ckpt,
              const at::Tensor& grad_y, const at::Tensor& grad_h_last, const at::Tensor& grad_u,
              const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_z, const at::Tensor& grad_A_part,
              const at::Tensor& grad_B_part, const at::Tensor& grad_C_part, const at::Tensor& grad_D_part,
              const at::Tensor& grad_bias_part, const at::Tensor& grad_h0) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "quintet_scan: float32 or float64 only, got ",
              dtype);
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  TORCH_CHECK(grad_B_part.dim() == 4 && grad_B_part.size(1) >= 1 && grad_B_part.size(1) <= std::max<int64_t>(d, 1),
              "quintet_scan: grad_B_part must be (b, groups, L, n) with 1 <= groups <= d");
  const int64_t G = grad_B_part.size(1);
  check_contiguous(ckpt, "checkpoints", dtype, {b, d, (L + kChunk - 1) / kChunk, n});
  check_seq(grad_y, "grad_y", dtype, b, d, L);
  check_contiguous(grad_h_last, "grad_final_state", dtype, {b, d, n});
  check_contiguous(grad_u, "grad_u", dtype, {b, d, L});
  check_contiguous(grad_delta, "grad_delta", dtype, {b, d, L});
  const bool has_z = z.has_value() && z->defined();
  TORCH_CHECK(has_z == (grad_z.has_value() && grad_z->defined()), "quintet_scan: grad_z must be given iff z is");
  if (has_z) check_contiguous(*grad_z, "grad_z", dtype, {b, d, L});
  check_contiguous(grad_A_part, "grad_A_part", dtype, {b, d, n});
  check_contiguous(grad_B_part, "grad_B_part", dtype, {b, G, L, n});
  check_contiguous(grad_C_part, "grad_C_part", dtype, {b, G, L, n});
  check_contiguous(grad_D_part, "grad_D_part", dtype, {b, d});
  check_contiguous(grad_bias_part, "grad_bias_part", dtype, {b, d});
  check_contiguous(grad_h0, "grad_initial_state", dtype, {b, d, n});
  if (dtype == at::kFloat) {
    auto p = make_problem<float>(u, delta, A, B, C, D, z, delta_bias, softplus);
    auto g = make_grads<float>(grad_y, grad_h_last, grad_u, grad_delta, grad_z, grad_A_part, grad_B_part,
                               grad_C_part, grad_D_part, grad_bias_part, grad_h0);
    backward_impl<float>(p, ckpt.data_ptr<float>(), g);
  } else {
    auto p = make_problem<double>(u, delta, A, B, C, D, z, delta_bias, softplus);
    auto g = make_grads<double>(grad_y, grad_h_last, grad_u, grad_delta, grad_z, grad_A_part, grad_B_part,
                                grad_C_part, grad_D_part, grad_bias_part, grad_h0);
    backward_impl<double>(p, ckpt.data_ptr<double>(), g);
  }
}

// ---------------------------------------------------------------------------------------------------------
// One decode step: state (b, d, n); u, delta, z (b, d) any strides; B, C (b, n) contiguous.

// Channels go in blocks of kLanes: dt, softplus and silu are computed for the whole block at once (vectorised
// over channels), then each channel's state row is updated along n (vectorised over n) and reduced by a tree.
template <typename T, int N>
void step_impl(const T* state, const Seq<T>& u2, const Seq<T>& delta2, const Seq<T>& z2, const T* A, const T* B,
               const T* C, const T* D, const T* bias, bool use_softplus, int64_t batch, int64_t dim,
               int64_t n_rt, T* y, T* new_state) {
  const int64_t n = N > 0 ? N : n_rt, nb = blocks_per_row(dim);
  at::parallel_for(0, batch * nb, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> prod_buf(static_cast<size_t>(std::max<int64_t>(n, kLanes)));
    T* __restrict__ prod = prod_buf.data();
    for (int64_t index = begin; index < end; ++index) {
      const Block blk = block_at(index / nb, index % nb, dim);
      T dt[kLanes], dtu[kLanes], gate[kLanes], skip[kLanes];
      for (int64_t c = 0; c < kLanes; ++c) {
        const bool live = c < blk.cw;
        const int64_t di = blk.c0 + c;
        dt[c] = live ? delta2.p[blk.bi * delta2.sb + di * delta2.sd] + (bias ? bias[di] : T(0)) : T(0);
        dtu[c] = live ? u2.p[blk.bi * u2.sb + di * u2.sd] : T(0);
        gate[c] = live && z2.p ? z2.p[blk.bi * z2.sb + di * z2.sd] : T(0);
        skip[c] = live && D ? D[di] * dtu[c] : T(0);
      }
#pragma omp simd
      for (int64_t c = 0; c < kLanes; ++c) {
        const T dv = use_softplus ? softplus(dt[c]) : dt[c];
        dt[c] = dv;
        dtu[c] = dv * dtu[c];
        gate[c] = z2.p ? gate[c] * sigmoid(gate[c]) : T(1);
      }
      const T* __restrict__ b = B + blk.bi * n;
      const T* __restrict__ cc = C + blk.bi * n;
      // channel c of the block: its new state row, and C times it into pr (n products)
      auto update = [&](int64_t c, T* __restrict__ pr) {
        const int64_t ch = blk.bi * dim + blk.c0 + c;
        const T* __restrict__ a = A + (blk.c0 + c) * n;
        const T* h = state + ch * n;  // state and new_state may be one buffer (an in-place decode step):
        T* out = new_state + ch * n;   // each k is read before it is written
        const T dtc = dt[c], dtuc = dtu[c];
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const T hk = fexp(dtc * a[k]) * h[k] + dtuc * b[k];
          out[k] = hk;
          pr[k] = cc[k] * hk;
        }
      };
#if defined(__AVX512F__)
      if constexpr (N == kLanes && std::is_same_v<T, float>) {
        if (blk.cw == kLanes) {  // a full block: its sixteen sums over n folded by one transposing add tree
          alignas(64) float rows[kLanes * kLanes];
          for (int64_t c = 0; c < kLanes; ++c) update(c, rows + c * kLanes);
          const __m512 sums = sum_rows16(rows);
          float* yo = y + blk.bi * dim + blk.c0;
          _mm512_storeu_ps(yo, _mm512_mul_ps(_mm512_add_ps(sums, _mm512_loadu_ps(skip)), _mm512_loadu_ps(gate)));
          continue;
        }
      }
#endif
      for (int64_t c = 0; c < blk.cw; ++c) {
        const int64_t ch = blk.bi * dim + blk.c0 + c;
        update(c, prod);
        T acc;
        if constexpr (N == kLanes) {
          acc = lane_sum(prod);
        } else {
          acc = T(0);
          for (int64_t k = 0; k < n; ++k) acc += prod[k];
        }
        y[ch] = (acc + skip[c]) * gate[c];
      }
    }
  });
}

template <typename T>
Seq<T> seq2_of(const std::optional<at::Tensor>& t) {  // a (b, d) tensor as a Seq with L = 1
  if (!t.has_value() || !t->defined()) return Seq<T>{};
  return Seq<T>{t->data_ptr<T>(), t->stride(0), t->stride(1), 0};
}

void state_update(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias, bool softplus,
                  const at::Tensor& y, const at::Tensor& new_state) {
  const auto dtype = state.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "quintet_scan: float32 or float64 only, got ",
              dtype);
  TORCH_CHECK(state.dim() == 3, "quintet_scan: state must be (b, d, n), got ", state.sizes());
  const int64_t b = state.size(0), d = state.size(1), n = state.size(2);
  check_contiguous(state, "state", dtype, {b, d, n});
  for (const auto* t : {&u, &delta}) {
    check_cpu(*t, "u/delta", dtype);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == b && t->size(1) == d, "quintet_scan: u and delta must be (b, d)");
  }
  if (z.has_value() && z->defined()) {
    check_cpu(*z, "z", dtype);
    TORCH_CHECK(z->dim() == 2 && z->size(0) == b && z->size(1) == d, "quintet_scan: z must be (b, d)");
  }
  check_contiguous(A, "A", dtype, {d, n});
  check_contiguous(B, "B", dtype, {b, n});
  check_contiguous(C, "C", dtype, {b, n});
  if (D.has_value() && D->defined()) check_contiguous(*D, "D", dtype, {d});
  if (delta_bias.has_value() && delta_bias->defined()) check_contiguous(*delta_bias, "delta_bias", dtype, {d});
  check_contiguous(y, "y", dtype, {b, d});
  check_contiguous(new_state, "new_state", dtype, {b, d, n});
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const std::optional<at::Tensor> u_opt(u), delta_opt(delta);
    auto fn = n == 16 ? step_impl<T, 16> : step_impl<T, 0>;
    fn(state.data_ptr<T>(), seq2_of<T>(u_opt), seq2_of<T>(delta_opt), seq2_of<T>(z), A.data_ptr<T>(),
       B.data_ptr<T>(), C.data_ptr<T>(), opt_ptr<T>(D), opt_ptr<T>(delta_bias), softplus, b, d, n,
       y.data_ptr<T>(), new_state.data_ptr<T>());
  };
  if (dtype == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The whole Mamba mixer between in_proj and out_proj for one decoded token (the math of
// quintet/models/jamba/mamba.py with L = 1), in one call instead of some forty small PyTorch ops:
//   x, z = xz[:d], xz[d:];  window = [conv_state, x];  x = silu(conv_w . window + conv_b)
//   dt, B, C = split(x_proj_w @ x);  RMSNorm each;  delta = dt_proj_w @ dt  (bias added in the step)
//   y, h = step(h, x, delta, A = -exp(A_log), B, C, D, z, dt_bias)
// At batch 1 the time of a decoded token is the time to read the weights, and these ops' fixed costs were
// a quarter of it (docs/kernels.md). Shapes: xz (b, 2d); conv_state (b, d, K-1); conv_w (d, K);
// x_proj_w (R + 2n, d); dt_proj_w (d, R); norm weights (R), (n), (n); A = -exp(A_log) (d, n), computed once
// by the caller; ssm_state (b, d, n).

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += a[i] * b[i];
  return acc;
}

// out[j] = dot(w + j * len, x, len) for j < rows, one row after the other: the weight is read as one
// sequential stream (what the hardware prefetcher follows best; four rows at a time made four streams),
// each row's sum kept in 32 lanes so that no multiply-add waits on the one before.
template <typename T>
inline void dots_in_order(const T* __restrict__ w, const T* __restrict__ x, int64_t len, int64_t rows,
                          T* __restrict__ out) {
  for (int64_t j = 0; j < rows; ++j) {
    const T* __restrict__ wr = w + j * len;
    T acc[32] = {};
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
#pragma omp simd
      for (int l = 0; l < 32; ++l) acc[l] += wr[i + l] * x[i + l];
    }
    T sum = T(0);
    for (; i < len; ++i) sum += wr[i] * x[i];
    for (int l = 0; l < 32; ++l) sum += acc[l];
    out[j] = sum;
  }
}

template <typename T>
inline void rms_norm_inplace(T* v, const T* w, int64_t len, T eps) {
  T ms = dot(v, v, len) / static_cast<T>(len);
  const T inv = T(1) / std::sqrt(ms + eps);
  for (int64_t i = 0; i < len; ++i) v[i] = w[i] * (v[i] * inv);
}

// delta[c] = dot(w + c * R, dt, R) for c < d: a thousand dots of a few dozen. Where the build has AVX-512
// and R is a multiple of 16, four channels' sums are folded by one transposing add tree (a dot's own
// horizontal sum costs more than its multiply-adds at this length).
template <typename T>
inline void dt_projection(const T* w, const T* dt, int64_t d, int64_t R, T* delta) {
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (R % 16 == 0 && R <= 64) {
      __m512 p[4];
      for (int64_t v = 0; v < R / 16; ++v) p[v] = _mm512_loadu_ps(dt + 16 * v);
      for (; c + 4 <= d; c += 4) {
        __m512 a[4];
        for (int q = 0; q < 4; ++q) {
          const float* wr = w + (c + q) * R;
          a[q] = _mm512_mul_ps(_mm512_loadu_ps(wr), p[0]);
          for (int64_t v = 1; v < R / 16; ++v) a[q] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + 16 * v), p[v], a[q]);
        }
        _mm_storeu_ps(delta + c, quintet_simd::reduce4_avx512(a[0], a[1], a[2], a[3]));
      }
    }
  }
#endif
  for (; c < d; ++c) delta[c] = dot(w + c * R, dt, R);
}

template <typename T>
void mixer_step_impl(const T* xz, const T* conv_state, const T* conv_w, const T* conv_b, const T* x_proj_w,
                     const T* dt_norm_w, const T* b_norm_w, const T* c_norm_w, T eps, const T* dt_proj_w,
                     const T* dt_bias, const T* A, const T* D, const T* ssm_state, int64_t batch, int64_t d,
                     int64_t K, int64_t R, int64_t n, T* y, T* new_conv_state, T* new_ssm_state) {
  const int64_t P = R + 2 * n, W = K - 1;
  std::vector<T> xc(static_cast<size_t>(batch * d)), delta(static_cast<size_t>(batch * d));
  std::vector<T> Bn(static_cast<size_t>(batch * n)), Cn(static_cast<size_t>(batch * n));
  std::vector<T> proj(static_cast<size_t>(P));
  for (int64_t bi = 0; bi < batch; ++bi) {
    const T* x = xz + bi * 2 * d;
    const T* cs = conv_state + bi * d * W;
    T* ncs = new_conv_state + bi * d * W;
    T* xo = xc.data() + bi * d;
    if (W == 3 && conv_b) {  // Mamba's d_conv = 4: the taps written out, so the compiler vectorises across channels
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        const T* w = conv_w + c * 4;
        const T s0 = cs[c * 3], s1 = cs[c * 3 + 1], s2 = cs[c * 3 + 2];
        xo[c] = conv_b[c] + w[0] * s0 + w[1] * s1 + w[2] * s2 + w[3] * x[c];
        ncs[c * 3] = s1, ncs[c * 3 + 1] = s2, ncs[c * 3 + 2] = x[c];
      }
    } else {
      for (int64_t c = 0; c < d; ++c) {
        const T* w = conv_w + c * K;
        T acc = conv_b ? conv_b[c] : T(0);
        for (int64_t k = 0; k < W; ++k) acc += w[k] * cs[c * W + k];
        acc += w[W] * x[c];
        for (int64_t k = 0; k + 1 < W; ++k) ncs[c * W + k] = cs[c * W + k + 1];
        if (W > 0) ncs[c * W + W - 1] = x[c];
        xo[c] = acc;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) xo[c] = xo[c] * sigmoid(xo[c]);
    dots_in_order(x_proj_w, xo, d, P, proj.data());
    rms_norm_inplace(proj.data(), dt_norm_w, R, eps);
    rms_norm_inplace(proj.data() + R, b_norm_w, n, eps);
    rms_norm_inplace(proj.data() + R + n, c_norm_w, n, eps);
    dt_projection(dt_proj_w, proj.data(), d, R, delta.data() + bi * d);
    std::memcpy(Bn.data() + bi * n, proj.data() + R, sizeof(T) * n);
    std::memcpy(Cn.data() + bi * n, proj.data() + R + n, sizeof(T) * n);
  }
  const Seq<T> u2{xc.data(), d, 1, 0}, delta2{delta.data(), d, 1, 0}, z2{xz + d, 2 * d, 1, 0};
  auto fn = n == 16 ? step_impl<T, 16> : step_impl<T, 0>;
  fn(ssm_state, u2, delta2, z2, A, Bn.data(), Cn.data(), D, dt_bias, true, batch, d, n, y, new_ssm_state);
}

void mixer_step(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& conv_w,
                const std::optional<at::Tensor>& conv_b, const at::Tensor& x_proj_w, const at::Tensor& dt_norm_w,
                const at::Tensor& b_norm_w, const at::Tensor& c_norm_w, double eps, const at::Tensor& dt_proj_w,
                const at::Tensor& dt_bias, const at::Tensor& A, const std::optional<at::Tensor>& D,
                const at::Tensor& ssm_state, const at::Tensor& y, const at::Tensor& new_conv_state,
                const at::Tensor& new_ssm_state) {
  const auto dtype = xz.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "quintet_scan: float32 or float64 only, got ", dtype);
  TORCH_CHECK(xz.dim() == 2 && xz.size(1) % 2 == 0, "quintet_scan: xz must be (b, 2 d), got ", xz.sizes());
  TORCH_CHECK(conv_w.dim() == 2 && x_proj_w.dim() == 2 && A.dim() == 2,
              "quintet_scan: conv_w, x_proj_w and A must be 2-D");
  const int64_t b = xz.size(0), d = xz.size(1) / 2, K = conv_w.size(1), n = A.size(1);
  const int64_t R = x_proj_w.size(0) - 2 * n;
  TORCH_CHECK(K >= 1 && R >= 1, "quintet_scan: need d_conv >= 1 and dt_rank >= 1");
  check_contiguous(xz, "xz", dtype, {b, 2 * d});
  check_contiguous(conv_state, "conv_state", dtype, {b, d, K - 1});
  check_contiguous(conv_w, "conv_w", dtype, {d, K});
  if (conv_b.has_value() && conv_b->defined()) check_contiguous(*conv_b, "conv_b", dtype, {d});
  check_contiguous(x_proj_w, "x_proj_w", dtype, {R + 2 * n, d});
  check_contiguous(dt_norm_w, "dt_norm_w", dtype, {R});
  check_contiguous(b_norm_w, "b_norm_w", dtype, {n});
  check_contiguous(c_norm_w, "c_norm_w", dtype, {n});
  check_contiguous(dt_proj_w, "dt_proj_w", dtype, {d, R});
  check_contiguous(dt_bias, "dt_bias", dtype, {d});
  check_contiguous(A, "A", dtype, {d, n});
  if (D.has_value() && D->defined()) check_contiguous(*D, "D", dtype, {d});
  check_contiguous(ssm_state, "ssm_state", dtype, {b, d, n});
  check_contiguous(y, "y", dtype, {b, d});
  check_contiguous(new_conv_state, "new_conv_state", dtype, {b, d, K - 1});
  check_contiguous(new_ssm_state, "new_ssm_state", dtype, {b, d, n});
  auto run = [&](auto zero) {
    using T = decltype(zero);
    mixer_step_impl<T>(xz.data_ptr<T>(), conv_state.data_ptr<T>(), conv_w.data_ptr<T>(), opt_ptr<T>(conv_b),
                       x_proj_w.data_ptr<T>(), dt_norm_w.data_ptr<T>(), b_norm_w.data_ptr<T>(),
                       c_norm_w.data_ptr<T>(), static_cast<T>(eps), dt_proj_w.data_ptr<T>(), dt_bias.data_ptr<T>(),
                       A.data_ptr<T>(), opt_ptr<T>(D), ssm_state.data_ptr<T>(), b, d, K, R, n, y.data_ptr<T>(),
                       new_conv_state.data_ptr<T>(), new_ssm_state.data_ptr<T>());
  };
  if (dtype == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The Mamba mixer's causal depthwise convolution and SiLU over a whole prompt, read in the (b, L, d) layout
// in_proj produces (channels contiguous, so each tap is one vectorised multiply-add across channels) and
// written the same way. Going through Conv1d instead costs a transposing concatenation with the conv
// state and a layout reorder, each as slow as the convolution itself (docs/kernels.md).
//   out[b, t, c] = silu(bias[c] + sum_k w[c, k] * window[b, c, t + k]),  window = [state (K-1), x (L)]
//   new_state    = the last K-1 columns of window
// x: (b, L, d) with channel stride 1; state, new_state: (b, d, K-1); w: (d, K); out: (b, L, d) contiguous.

template <typename T>
void conv_impl(const T* x, int64_t sb, int64_t sl, const T* state, const T* w, const T* bias, bool silu,
               int64_t batch, int64_t L, int64_t d, int64_t K, T* out, T* new_state) {
  const int64_t W = K - 1, tile = 64, tiles = (L + tile - 1) / tile;
  std::vector<T> wt(static_cast<size_t>(K * d));  // taps laid out (K, d): contiguous across channels
  for (int64_t c = 0; c < d; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * d + c] = w[c * K + k];
  std::vector<T> zeros(static_cast<size_t>(d), T(0));
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> past(static_cast<size_t>(d));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bi = index / tiles, t0 = (index % tiles) * tile, t1 = std::min(L, t0 + tile);
      for (int64_t t = t0; t < t1; ++t) {
        T* __restrict__ o = out + (bi * L + t) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = bias ? bias[c] : T(0);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = t - W + k;  // time index into x; negative: into the state
          const T* __restrict__ in;
          if (src >= 0) {
            in = x + bi * sb + src * sl;
          } else if (state) {
            for (int64_t c = 0; c < d; ++c) past[c] = state[(bi * d + c) * W + W + src];
            in = past.data();
          } else {
            in = zeros.data();
          }
          const T* __restrict__ wk = wt.data() + k * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) o[c] += wk[c] * in[c];
        }
        if (silu) {
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) o[c] = o[c] * sigmoid(o[c]);
        }
      }
    }
  });
  for (int64_t bi = 0; bi < batch; ++bi)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < W; ++j) {
        const int64_t pos = L + j;  // index into window
        new_state[(bi * d + c) * W + j] =
            pos >= W ? x[bi * sb + (pos - W) * sl + c] : (state ? state[(bi * d + c) * W + pos] : T(0));
      }
}

void causal_conv(const at::Tensor& x, const std::optional<at::Tensor>& state, const at::Tensor& w,
                 const std::optional<at::Tensor>& bias, bool silu, const at::Tensor& out,
                 const at::Tensor& new_state) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "quintet_scan: float32 or float64 only, got ", dtype);
  check_cpu(x, "x", dtype);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "quintet_scan: x must be (b, L, d) with contiguous channels, got ",
              x.sizes(), " strides ", x.strides());
  TORCH_CHECK(w.dim() == 2, "quintet_scan: conv weight must be (d, K), got ", w.sizes());
  const int64_t b = x.size(0), L = x.size(1), d = x.size(2), K = w.size(1);
  check_contiguous(w, "w", dtype, {d, K});
  const bool has_state = state.has_value() && state->defined();
  if (has_state) check_contiguous(*state, "state", dtype, {b, d, K - 1});
  if (bias.has_value() && bias->defined()) check_contiguous(*bias, "bias", dtype, {d});
  check_contiguous(out, "out", dtype, {b, L, d});
  check_contiguous(new_state, "new_state", dtype, {b, d, K - 1});
  auto run = [&](auto zero) {
    using T = decltype(zero);
    conv_impl<T>(x.data_ptr<T>(), x.stride(0), x.stride(1), has_state ? state->data_ptr<T>() : nullptr,
                 w.data_ptr<T>(), opt_ptr<T>(bias), silu, b, L, d, K, out.data_ptr<T>(), new_state.data_ptr<T>());
  };
  if (dtype == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
}

}  // namespace

TORCH_LIBRARY(quintet_scan, m) {
  m.def(
      "scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, Tensor? h0, Tensor(a!) y, Tensor(b!) h_last, Tensor(c!)? ckpt) -> ()",
      &scan_fwd);
  m.def(
      "scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, Tensor ckpt, Tensor grad_y, Tensor grad_h_last, Tensor(a!) grad_u, Tensor(b!) grad_delta, "
      "Tensor(c!)? grad_z, Tensor(d!) grad_A_part, Tensor(e!) grad_B_part, Tensor(f!) grad_C_part, "
      "Tensor(g!) grad_D_part, Tensor(h!) grad_bias_part, Tensor(i!) grad_h0) -> ()",
      &scan_bwd);
  m.def(
      "state_update(Tensor state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool softplus, Tensor(a!) y, Tensor(b!) new_state) -> ()",
      &state_update);
  m.def(
      "mixer_step(Tensor xz, Tensor conv_state, Tensor conv_w, Tensor? conv_b, Tensor x_proj_w, Tensor dt_norm_w, "
      "Tensor b_norm_w, Tensor c_norm_w, float eps, Tensor dt_proj_w, Tensor dt_bias, Tensor A, Tensor? D, "
      "Tensor ssm_state, Tensor(a!) y, Tensor(b!) new_conv_state, Tensor(c!) new_ssm_state) -> ()",
      &mixer_step);
  m.def(
      "causal_conv(Tensor x, Tensor? state, Tensor w, Tensor? bias, bool silu, Tensor(a!) out, "
      "Tensor(b!) new_state) -> ()",
      &causal_conv);
}

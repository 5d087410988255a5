// The M0E4 library's ops as C++ functions (defined in m0e4_gemm.cpp), for the other sources of the same
// library (decode_step.cpp calls them directly, without the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace quintet_m0e4 {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t cpu_isa();                     // the best of Isa this CPU runs
int64_t resolve_isa(int64_t isa);      // the caller's choice, checked against the CPU
bool cpu_has_vnni();                   // AVX-512 VNNI (the int8 GEMV's fastest path)
bool int8_runs(int64_t isa);           // the int8-activation GEMV runs vector code (AVX2 or AVX-512)

// y (M, N) float32 = x (M, K) W^T, W in M0E4 (qweight (N, K/2) uint8, scales / offsets (N, K/gs) float16)
at::Tensor gemv(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs,
                int64_t isa);
// the same with x quantized to int8 per block of 32 (K % 128 == 0; VNNI where the CPU has it)
at::Tensor gemv_q8(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& S, const at::Tensor& C, int64_t gs,
                   int64_t isa);
// y (M, N) = x (M, K) W^T for a float32 W
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w, int64_t isa);
// down(silu(a) * b), [a | b] = gate_up(x): M0E4 weights (int8: activations as gemv_q8 where it runs) or float32
at::Tensor swiglu_gemv(const at::Tensor& x, const at::Tensor& gu_q, const at::Tensor& gu_s, const at::Tensor& gu_o,
                       const at::Tensor& dn_q, const at::Tensor& dn_s, const at::Tensor& dn_o, int64_t gs,
                       int64_t isa, bool int8);
at::Tensor swiglu_f32(const at::Tensor& x, const at::Tensor& w_gu, const at::Tensor& w_dn, int64_t isa);
// (x + h, RMSNorm(x + h) * w); h absent: (x, RMSNorm(x) * w)
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& h,
                                                const at::Tensor& w, double eps);

}  // namespace quintet_m0e4

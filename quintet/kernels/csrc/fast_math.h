// Elementwise math shared by the kernel libraries: branch-free float polynomials that GCC vectorises
// inside `omp simd` loops (libm's expf stays scalar there); the double overloads call libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace quintet_math {

inline float fexp(float x) {
  // Cephes expf: exp(x) = 2^k * exp(r), |r| <= ln(2)/2; relative error ~2e-7. x is clamped to [-87.3, 88]
  // (results saturate at about 1e-38 and 1.7e38 instead of reaching 0 and inf; the scan's dt A <= 0).
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

inline double fexp(double x) { return std::exp(x); }

}  // namespace quintet_math

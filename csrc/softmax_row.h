// One row of logits: softmax statistics at temperature tau, and the logit gradient written in place.
//
// A row is x[0:V] (unscaled logits); the scaled logits are z = x / tau. Everything is shifted by the
// row max m = max z (started from -inf, so a row of very negative logits is still exact), u = z - m:
//   s = sum exp(u),  q = sum exp(u) * u,  lse = m + log s,  H = log s - q / s   (q <= 0: no cancellation).
// u is floored at kFloorU, where exp is exactly 0 in float and double: a -inf logit (an absent vocabulary
// entry) then adds 0 to s and q and gets a zero gradient, instead of 0 * -inf = NaN.
// The vocabulary tail that does not fill a SIMD vector is handled by scalar code, never padded.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace ekipl {

constexpr double kFloorU = -1.0e4;

struct RowSoftmax {
  double max_z;    // m
  double log_sum;  // log s
  double entropy;  // H (0 when not asked for)
  double mean_u;   // q / s = sum p * u (0 when not asked for)

  double lse() const { return max_z + log_sum; }
};

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = Vec::size();
  T best = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= kWidth) {
    Vec acc = Vec::loadu(x);
    for (i = kWidth; i + kWidth <= n; i += kWidth) {
      acc = at::vec::maximum(acc, Vec::loadu(x + i));
    }
    T lanes[kWidth];
    acc.store(lanes);
    for (int64_t l = 0; l < kWidth; ++l) best = std::fmax(best, lanes[l]);
  }
  for (; i < n; ++i) best = std::fmax(best, x[i]);
  return best;
}

// Sums of exp(u) (and exp(u) * u) in SIMD lanes of T, flushed into double every block so that a
// 150k-wide row keeps double-like accuracy at the speed of T.
template <typename T>
RowSoftmax row_softmax(const T* x, int64_t n, T inv_tau, bool want_entropy) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t kBlock = 256 * kWidth;
  const T m = row_max(x, n) * inv_tau;
  const Vec scale(inv_tau);
  const Vec shift(m);
  const Vec floor_u(static_cast<T>(kFloorU));
  double sum = 0.0;
  double weighted = 0.0;
  int64_t i = 0;
  const int64_t vector_end = n - n % kWidth;
  while (i < vector_end) {
    const int64_t block_end = std::min(vector_end, i + kBlock);
    Vec block_sum(T(0));
    Vec block_weighted(T(0));
    if (want_entropy) {
      for (; i < block_end; i += kWidth) {
        const Vec u = at::vec::maximum(Vec::loadu(x + i) * scale - shift, floor_u);
        const Vec e = u.exp_u20();
        block_sum = block_sum + e;
        block_weighted = at::vec::fmadd(e, u, block_weighted);
      }
    } else {
      for (; i < block_end; i += kWidth) {
        block_sum = block_sum + (Vec::loadu(x + i) * scale - shift).exp_u20();
      }
    }
    T lanes[kWidth];
    block_sum.store(lanes);
    for (int64_t l = 0; l < kWidth; ++l) sum += lanes[l];
    block_weighted.store(lanes);
    for (int64_t l = 0; l < kWidth; ++l) weighted += lanes[l];
  }
  for (; i < n; ++i) {
    const T u = std::fmax(x[i] * inv_tau - m, static_cast<T>(kFloorU));
    const T e = std::exp(u);
    sum += e;
    weighted += double(e) * double(u);
  }
  RowSoftmax r{double(m), std::log(sum), 0.0, 0.0};
  if (want_entropy) {
    r.mean_u = weighted / sum;
    r.entropy = r.log_sum - r.mean_u;
  }
  return r;
}

// grad[v] = c_lp * (1[v = y] - p_v) + c_h * (-p_v * (z_v - lse + H)), p_v = exp(z_v - lse),
// where z_v - lse + H = u_v - q/s. grad may alias x (the chunk buffer is overwritten in place).
template <typename T>
void row_grad(const T* x, T* grad, int64_t n, T inv_tau, const RowSoftmax& r, int64_t target, double c_lp,
              double c_h) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = Vec::size();
  const T m = T(r.max_z);
  const T log_sum = T(r.log_sum);
  // -p * (c_lp + c_h * (u - q/s)) = -p * (base + c_h * u)
  const T base = T(c_lp - c_h * r.mean_u);
  const T ch = T(c_h);
  const Vec scale(inv_tau), shift(m), vlog_sum(log_sum), vbase(base), vch(ch), floor_u(static_cast<T>(kFloorU));
  int64_t i = 0;
  const int64_t vector_end = n - n % kWidth;
  for (; i < vector_end; i += kWidth) {
    const Vec u = at::vec::maximum(Vec::loadu(x + i) * scale - shift, floor_u);
    const Vec p = (u - vlog_sum).exp_u20();
    (Vec(T(0)) - p * at::vec::fmadd(vch, u, vbase)).store(grad + i);
  }
  for (; i < n; ++i) {
    const T u = std::fmax(x[i] * inv_tau - m, static_cast<T>(kFloorU));
    const T p = std::exp(u - log_sum);
    grad[i] = -p * (base + ch * u);
  }
  grad[target] += T(c_lp);
}

}  // namespace ekipl

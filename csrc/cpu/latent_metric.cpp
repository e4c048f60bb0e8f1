// The Chadebec-Allassonniere latent metric (MATH.md 2), OpenMP-parallel over points, blocked over centroids.
//
//   G(z) = sum_i w_i M_i + lam exp(-tau |z|^2) I,   w_i = exp(e_i),  e_i = -(z - c_i)^T M_i (z - c_i) / rho^2
//
// Everything is accumulated in log space: each point keeps a running maximum s of the exponents (e_0 = -tau |z|^2 for
// the lam term, e_i for the centroids) and sums exp(e_i - s) M_i, rescaling its accumulators when s grows (the online
// softmax trick). Outputs are G_s = exp(-s) G, s and dG_s = exp(-s) dG, so far-away points never underflow to G = 0.
// Centroids and precisions are transposed once per call to [d][N] / [d*d][N], so the inner loops run over contiguous
// centroids and vectorise; exp is a polynomial written in plain arithmetic for the same reason.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

// The selects in exp_scaled and the max reductions are if-converted (hence vectorised) only when floating-point
// comparisons may be treated as non-trapping; nothing here reads the floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace pygeo {

namespace {

constexpr int64_t kBlock = 64;  // centroids per block: the block's scratch ([d][kBlock]) stays in L1/L2
// Below this many point-centroid-entry products a call runs on one thread: waking an OpenMP team costs more (samplers
// call with a few hundred points and few centroids, thousands of times).
constexpr int64_t kParallelWork = 1 << 16;

// The per-point loops are compiled for AVX2+FMA and for the baseline ISA, picked at load time (the build flags target
// the baseline only); helpers are force-inlined into both versions.
#if defined(__x86_64__) && defined(__GNUC__)
#define PYGEO_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define PYGEO_VECTOR_CLONES
#endif
#define PYGEO_INLINE inline __attribute__((always_inline))

// exp(x) for x <= ~700 (float: <= ~80) with about 1 ulp relative error; exactly 0 below the normal range (those
// weights are below 1e-300 (1e-37) relative to the largest one, which is 1). Cody-Waite reduction x = n ln2 + r,
// Taylor polynomial in r, 2^n built in the exponent bits: all plain arithmetic, so `omp simd` loops vectorise it.
PYGEO_INLINE double exp_scaled(double x) {
  const double lowest = -708.0;
  const double xc = x < lowest ? lowest : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer kept in the low bits
  const double shifted = xc * 1.4426950408889634 + magic;
  const double n = shifted - magic;
  const double r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t shifted_bits, magic_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(double));
  std::memcpy(&magic_bits, &magic, sizeof(double));
  const int64_t power_bits = (shifted_bits - magic_bits + 1023) << 52;
  double power;
  std::memcpy(&power, &power_bits, sizeof(double));
  return x < lowest ? 0.0 : p * power;
}

PYGEO_INLINE float exp_scaled(float x) {
  const float lowest = -87.0f;
  const float xc = x < lowest ? lowest : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = xc * 1.44269504f + magic;
  const float n = shifted - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t shifted_bits, magic_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  std::memcpy(&magic_bits, &magic, sizeof(float));
  const int32_t power_bits = (shifted_bits - magic_bits + 127) << 23;
  float power;
  std::memcpy(&power, &power_bits, sizeof(float));
  return x < lowest ? 0.0f : p * power;
}

// Centroids [N, d] -> [d][N] and precisions [N, dd] -> [dd][N] (dd = d diagonal, d*d full).
template <typename T>
std::vector<T> transpose(const T* x, int64_t rows, int64_t cols) {
  std::vector<T> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = x[r * cols + c];
  return out;
}

// Per-thread scratch: one block of centroids, and the point's accumulators.
template <typename T>
struct Scratch {
  std::vector<T> diff, y, e, w, wy;  // diff, y = M_i (z - c_i), wy = dw_i/dz: [d][kBlock]; e, w: [kBlock]
  std::vector<T> acc, dacc;          // [dd], [d * dd]
  Scratch(int64_t d, int64_t dd, bool derivative)
      : diff(d * kBlock), y(d * kBlock), e(kBlock), w(kBlock), wy(derivative ? d * kBlock : 0), acc(dd),
        dacc(derivative ? d * dd : 0) {}
};

// One call's inputs, with centroids [d][N] and precisions [dd][N] transposed (dd = d diagonal, d*d full).
template <typename T>
struct Problem {
  const T* z;
  std::vector<T> cT, PT;
  bool full;
  int64_t N, d, dd;
  double lam, tau;
  T inv_rho2, derivative_factor;  // 1/rho^2 and -2/rho^2 (dw_i/dz = -(2/rho^2) w_i M_i (z - c_i))

  Problem(const T* z_, const T* centroids, const T* precisions, bool full_, double lam_, double tau_, double rho,
          int64_t N_, int64_t d_)
      : z(z_), cT(transpose(centroids, N_, d_)), PT(transpose(precisions, N_, full_ ? d_ * d_ : d_)), full(full_),
        N(N_), d(d_), dd(full_ ? d_ * d_ : d_), lam(lam_), tau(tau_), inv_rho2(T(1.0 / (rho * rho))),
        derivative_factor(T(-2.0 / (rho * rho))) {}
};

// Exponents e_t = -q_t / rho^2 and y[k][t] = (M_i (z - c_i))_k for centroids i0 .. i0 + nb of the point zb.
template <typename T>
PYGEO_INLINE void block_exponents(const Problem<T>& p, const T* zb, int64_t i0, int64_t nb, Scratch<T>& s) {
  const int64_t N = p.N, d = p.d;
  T* diff = s.diff.data();
  T* y = s.y.data();
  T* e = s.e.data();
  for (int64_t k = 0; k < d; ++k) {
    const T zk = zb[k];
    const T* ck = p.cT.data() + k * N + i0;
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) diff[k * kBlock + t] = zk - ck[t];
  }
  std::fill(e, e + nb, T(0));
  for (int64_t k = 0; k < d; ++k) {
    T* yk = y + k * kBlock;
    const T* dk = diff + k * kBlock;
    if (p.full) {
      std::fill(yk, yk + nb, T(0));
      for (int64_t l = 0; l < d; ++l) {
        const T* Mkl = p.PT.data() + (k * d + l) * N + i0;
        const T* dl = diff + l * kBlock;
#pragma omp simd
        for (int64_t t = 0; t < nb; ++t) yk[t] += Mkl[t] * dl[t];
      }
    } else {
      const T* mk = p.PT.data() + k * N + i0;
#pragma omp simd
      for (int64_t t = 0; t < nb; ++t) yk[t] = mk[t] * dk[t];
    }
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) e[t] += yk[t] * dk[t];
  }
  const T inv_rho2 = p.inv_rho2;
#pragma omp simd
  for (int64_t t = 0; t < nb; ++t) e[t] = -e[t] * inv_rho2;
}

template <typename T>
PYGEO_INLINE T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) sum += a[t] * b[t];
  return sum;
}

// Accumulates point zb's G_s (upper triangle when full) and dG_s over all centroids into s.acc / s.dacc and returns
// its scale s (e0 = -tau |z|^2, the lam term's exponent).
template <typename T>
PYGEO_VECTOR_CLONES T forward_point(const Problem<T>& p, const T* zb, T e0, Scratch<T>& s) {
  const int64_t N = p.N, d = p.d, dd = p.dd;
  const bool derivative = !s.dacc.empty();
  T running = p.lam > 0 ? e0 : -std::numeric_limits<T>::infinity();
  std::fill(s.acc.begin(), s.acc.end(), T(0));
  std::fill(s.dacc.begin(), s.dacc.end(), T(0));
  T* w = s.w.data();
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - i0);
    block_exponents(p, zb, i0, nb, s);
    const T* e = s.e.data();
    T block_max = e[0];
#pragma omp simd reduction(max : block_max)
    for (int64_t t = 1; t < nb; ++t) block_max = block_max > e[t] ? block_max : e[t];
    if (block_max > running) {  // rescale what was summed under the old maximum
      const T factor = std::exp(running - block_max);
      for (auto& a : s.acc) a *= factor;
      for (auto& a : s.dacc) a *= factor;
      running = block_max;
    }
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) w[t] = exp_scaled(e[t] - running);
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t l = p.full ? j : 0; l < (p.full ? d : 1); ++l) {  // full: upper triangle, mirrored by the caller
        const int64_t jl = p.full ? j * d + l : j;
        s.acc[jl] += dot(w, p.PT.data() + jl * N + i0, nb);
      }
    }
    if (derivative) {
      for (int64_t k = 0; k < d; ++k) {
        const T* yk = s.y.data() + k * kBlock;
        T* wyk = s.wy.data() + k * kBlock;
        const T factor = p.derivative_factor;
#pragma omp simd
        for (int64_t t = 0; t < nb; ++t) wyk[t] = factor * w[t] * yk[t];
        for (int64_t j = 0; j < d; ++j) {
          for (int64_t l = p.full ? j : 0; l < (p.full ? d : 1); ++l) {
            const int64_t jl = p.full ? j * d + l : j;
            s.dacc[k * dd + jl] += dot(wyk, p.PT.data() + jl * N + i0, nb);
          }
        }
      }
    }
  }
  return running;
}

// s.acc[k] = sum_i exp(e_i - sb) <A, M_i> (-2/rho^2) (M_i (z - c_i))_k for the point zb.
template <typename T>
PYGEO_VECTOR_CLONES void vjp_point(const Problem<T>& p, const T* zb, const T* Ab, T sb, Scratch<T>& s) {
  const int64_t N = p.N, d = p.d, dd = p.dd;
  T* coef = s.w.data();
  std::fill(s.acc.begin(), s.acc.begin() + d, T(0));
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - i0);
    block_exponents(p, zb, i0, nb, s);
    std::fill(coef, coef + nb, T(0));
    for (int64_t jl = 0; jl < dd; ++jl) {  // coef_i = <A, M_i>
      const T a = Ab[jl];
      const T* Mjl = p.PT.data() + jl * N + i0;
#pragma omp simd
      for (int64_t t = 0; t < nb; ++t) coef[t] += a * Mjl[t];
    }
    const T* e = s.e.data();
    const T factor = p.derivative_factor;
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) coef[t] *= factor * exp_scaled(e[t] - sb);
    for (int64_t k = 0; k < d; ++k) s.acc[k] += dot(coef, s.y.data() + k * kBlock, nb);
  }
}

void check_sizes(int64_t B, int64_t N, int64_t d, double rho) {
  check_nonnegative(B, "B");
  check_positive(N, "N");
  check_positive(d, "d");
  PYGEO_CHECK(rho > 0, "rho must be positive");
}

}  // namespace

// z: [B, d]; centroids: [N, d]; precisions: [N, d] (full = false) or [N, d, d] (full = true).
// Outputs: G_s [B, d] (diagonal) or [B, d, d]; scale [B]; dG_s (nullptr = not wanted) [B, d, d] with
// dG_s[b, k, j] = d G_jj / d z_k (diagonal) or [B, d, d, d] with dG_s[b, k, i, j] = d G_ij / d z_k; all times exp(-scale).
template <typename T>
void latent_metric_forward_cpu(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                               double rho, T* G_s, T* scale, T* dG_s, int64_t B, int64_t N, int64_t d) {
  check_sizes(B, N, d, rho);
  const Problem<T> p(z, centroids, precisions, full, lam, tau, rho, N, d);
  const int64_t dd = p.dd;
#pragma omp parallel if (B * N * dd >= kParallelWork)
  {
    Scratch<T> s(d, dd, dG_s != nullptr);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* zb = z + b * d;
      T norm2 = 0;
      for (int64_t k = 0; k < d; ++k) norm2 += zb[k] * zb[k];
      const T e0 = T(-tau) * norm2;
      const T running = forward_point(p, zb, e0, s);
      // The lam term under the final scale: lam exp(e0 - s) I, and its derivative -2 tau z_k lam exp(e0 - s) I.
      const T prior = lam > 0 ? T(lam) * std::exp(e0 - running) : T(0);
      scale[b] = running;
      T* Gb = G_s + b * dd;
      for (int64_t j = 0; j < d; ++j) {
        if (full) {
          for (int64_t l = j; l < d; ++l) Gb[j * d + l] = Gb[l * d + j] = s.acc[j * d + l] + (j == l ? prior : T(0));
        } else {
          Gb[j] = s.acc[j] + prior;
        }
      }
      if (dG_s) {
        T* dGb = dG_s + b * d * dd;
        for (int64_t k = 0; k < d; ++k) {
          const T prior_k = T(-2.0 * tau) * zb[k] * prior;
          for (int64_t j = 0; j < d; ++j) {
            if (full) {
              for (int64_t l = j; l < d; ++l) {
                const T value = s.dacc[k * dd + j * d + l] + (j == l ? prior_k : T(0));
                dGb[k * dd + j * d + l] = dGb[k * dd + l * d + j] = value;
              }
            } else {
              dGb[k * d + j] = s.dacc[k * d + j] + prior_k;
            }
          }
        }
      }
    }
  }
}

// v[b, k] = sum_ij A[b, i, j] dG_s[b, k, i, j] with weights exp(e_i - scale[b]) (the backward of G when scale = 0 and
// A = dL/dG; the gradient of 1/2 log det G when A = G_s^-1 / 2 and scale is the forward's). A: [B, d] (diagonal
// precisions: A's diagonal) or [B, d, d]; v: [B, d].
template <typename T>
void latent_metric_vjp_cpu(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                           double rho, const T* A, const T* scale, T* v, int64_t B, int64_t N, int64_t d) {
  check_sizes(B, N, d, rho);
  const Problem<T> p(z, centroids, precisions, full, lam, tau, rho, N, d);
  const int64_t dd = p.dd;
#pragma omp parallel if (B * N * dd >= kParallelWork)
  {
    Scratch<T> s(d, dd, false);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* zb = z + b * d;
      const T* Ab = A + b * dd;
      vjp_point(p, zb, Ab, scale[b], s);
      T norm2 = 0, trace = 0;
      for (int64_t k = 0; k < d; ++k) {
        norm2 += zb[k] * zb[k];
        trace += full ? Ab[k * d + k] : Ab[k];
      }
      const T prior = lam > 0 ? T(lam) * std::exp(T(-tau) * norm2 - scale[b]) : T(0);
      for (int64_t k = 0; k < d; ++k) v[b * d + k] = s.acc[k] + T(-2.0 * tau) * prior * trace * zb[k];
    }
  }
}

template void latent_metric_forward_cpu<float>(const float*, const float*, const float*, bool, double, double, double,
                                               float*, float*, float*, int64_t, int64_t, int64_t);
template void latent_metric_forward_cpu<double>(const double*, const double*, const double*, bool, double, double,
                                                double, double*, double*, double*, int64_t, int64_t, int64_t);
template void latent_metric_vjp_cpu<float>(const float*, const float*, const float*, bool, double, double, double,
                                           const float*, const float*, float*, int64_t, int64_t, int64_t);
template void latent_metric_vjp_cpu<double>(const double*, const double*, const double*, bool, double, double, double,
                                            const double*, const double*, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo

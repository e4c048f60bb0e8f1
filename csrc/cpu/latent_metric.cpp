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

constexpr int64_t kBlock = 256;  // centroids per block: the block's scratch ([d][kBlock]) stays in L1/L2; fewer, longer dot products
// Below this many point-centroid-entry products a call runs on one thread: waking an OpenMP team costs more (samplers
// call with a few hundred points and few centroids, thousands of times).
constexpr int64_t kParallelWork = 1 << 16;
constexpr int64_t kMaxD = 64;  // point-blocked paths (G only): d up to this (larger d takes the general path)

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

// Centroids [N, d] -> [d][stride] and precisions [N, dd] -> [dd][stride] (dd = d diagonal, d*d full), with the
// centroid axis zero-padded to stride = N rounded up to kBlock, so vector loops may read whole blocks, plus 16 more
// elements so that rows are not a multiple of 4 KiB apart (rows read together would evict each other from L1).
inline int64_t padded(int64_t N) { return (N + kBlock - 1) / kBlock * kBlock + 16; }

template <typename T>
std::vector<T> transpose(const T* x, int64_t rows, int64_t cols) {
  const int64_t stride = padded(rows);
  std::vector<T> out(static_cast<size_t>(stride * cols), T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * stride + r] = x[r * cols + c];
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
  int64_t N, stride, d, dd;  // stride: row length of cT / PT (N padded to a multiple of kBlock)
  double lam, tau;
  T inv_rho2, derivative_factor;  // 1/rho^2 and -2/rho^2 (dw_i/dz = -(2/rho^2) w_i M_i (z - c_i))

  Problem(const T* z_, const T* centroids, const T* precisions, bool full_, double lam_, double tau_, double rho,
          int64_t N_, int64_t d_)
      : z(z_), cT(transpose(centroids, N_, d_)), PT(transpose(precisions, N_, full_ ? d_ * d_ : d_)), full(full_),
        N(N_), stride(padded(N_)), d(d_), dd(full_ ? d_ * d_ : d_), lam(lam_), tau(tau_), inv_rho2(T(1.0 / (rho * rho))),
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
    const T* ck = p.cT.data() + k * p.stride + i0;
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
        const T* Mkl = p.PT.data() + (k * d + l) * p.stride + i0;
        const T* dl = diff + l * kBlock;
#pragma omp simd
        for (int64_t t = 0; t < nb; ++t) yk[t] += Mkl[t] * dl[t];
      }
    } else {
      const T* mk = p.PT.data() + k * p.stride + i0;
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
        s.acc[jl] += dot(w, p.PT.data() + jl * p.stride + i0, nb);
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
            s.dacc[k * dd + jl] += dot(wyk, p.PT.data() + jl * p.stride + i0, nb);
          }
        }
      }
    }
  }
  return running;
}

constexpr int kPoints = 4;  // points per task of the point-blocked paths

// Point-blocked paths: exponents -q / rho^2 of one vector of centroids for each point, -inf past the block's end.
template <typename T, int kLanes>
PYGEO_INLINE void store_exponents(T (*e)[kBlock], const T (&quad)[kPoints][kLanes], int64_t t0, int64_t nb, T inv_rho2) {
  for (int q = 0; q < kPoints; ++q)
#pragma omp simd
    for (int v = 0; v < kLanes; ++v)
      e[q][t0 + v] = t0 + v < nb ? -quad[q][v] * inv_rho2 : -std::numeric_limits<T>::infinity();
}

// One point's block exponents e -> weights exp(e - s), raising its running maximum s first and then rescaling its
// accumulators acc[0 .. count) by exp(s_old - s_new).
template <typename T>
PYGEO_INLINE void block_weights(T* e, int64_t nb, int64_t nb_lanes, T& running, T* acc, int64_t count) {
  T block_max = e[0];
#pragma omp simd reduction(max : block_max)
  for (int64_t t = 1; t < nb; ++t) block_max = block_max > e[t] ? block_max : e[t];
  if (block_max > running) {
    const T factor = std::exp(running - block_max);
    for (int64_t j = 0; j < count; ++j) acc[j] *= factor;
    running = block_max;
  }
  const T shift = running;  // a local: stores to e[t] could otherwise alias `running` and stop the loop vectorising
#pragma omp simd
  for (int64_t t = 0; t < nb_lanes; ++t) e[t] = exp_scaled(e[t] - shift);  // -inf (padding) -> 0
}

// totals[q] = sum_t w[q][t] m[t] over the block, for every point of the block.
template <typename T, int kLanes>
PYGEO_INLINE void weighted_sums(const T (*w)[kBlock], const T* m, int64_t nb_lanes, T (&totals)[kPoints]) {
  T sums[kPoints][kLanes] = {};
  for (int64_t t0 = 0; t0 < nb_lanes; t0 += kLanes)
    for (int q = 0; q < kPoints; ++q)
#pragma omp simd
      for (int v = 0; v < kLanes; ++v) sums[q][v] += w[q][t0 + v] * m[t0 + v];
  for (int q = 0; q < kPoints; ++q) {
    T total = 0;
    for (int v = 0; v < kLanes; ++v) total += sums[q][v];
    totals[q] = total;
  }
}

// Diagonal precisions, G only: kPoints points at a time against vectors of kLanes centroids, with the partial sums in
// fixed-size local arrays the compiler keeps in registers, so each centroid value loaded serves kPoints points.
template <typename T>
struct PointBlock {
  T e[kPoints][kBlock];  // exponents, then weights, of the current centroid block
  T acc[kPoints][kMaxD]; // G_s diagonal
  T running[kPoints];
};

template <typename T>
PYGEO_VECTOR_CLONES void forward_points_diagonal(const Problem<T>& p, const T* const* zs, const T* e0, PointBlock<T>& s) {
  constexpr int kLanes = 64 / sizeof(T);
  const int64_t N = p.N, d = p.d;
  const T inv_rho2 = p.inv_rho2;
  for (int q = 0; q < kPoints; ++q) {
    s.running[q] = p.lam > 0 ? e0[q] : -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < d; ++j) s.acc[q][j] = 0;
  }
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - i0);
    const int64_t nb_lanes = (nb + kLanes - 1) / kLanes * kLanes;  // reads past N hit the zero padding
    for (int64_t t0 = 0; t0 < nb_lanes; t0 += kLanes) {
      T quad[kPoints][kLanes] = {};
      for (int64_t k = 0; k < d; ++k) {
        const T* ck = p.cT.data() + k * p.stride + i0 + t0;
        const T* mk = p.PT.data() + k * p.stride + i0 + t0;
        for (int q = 0; q < kPoints; ++q) {
          const T zq = zs[q][k];
#pragma omp simd
          for (int v = 0; v < kLanes; ++v) {
            const T diff = zq - ck[v];
            quad[q][v] += mk[v] * diff * diff;
          }
        }
      }
      store_exponents<T, kLanes>(s.e, quad, t0, nb, inv_rho2);
    }
    for (int q = 0; q < kPoints; ++q) block_weights(s.e[q], nb, nb_lanes, s.running[q], s.acc[q], d);
    for (int64_t j = 0; j < d; ++j) {
      T totals[kPoints];
      weighted_sums<T, kLanes>(s.e, p.PT.data() + j * p.stride + i0, nb_lanes, totals);
      for (int q = 0; q < kPoints; ++q) s.acc[q][j] += totals[q];
    }
  }
}

// Full precisions, G only: as forward_points_diagonal, kPoints points against vectors of kLanes centroids, so each
// precision entry loaded serves kPoints points (the per-point path streams every M_i from L2 once per point). The
// quadratic form runs over the upper triangle (M_i symmetric): q = sum_k M_kk d_k^2 + 2 sum_{k<l} M_kl d_k d_l.
template <typename T>
struct PointBlockFull {
  explicit PointBlockFull(int64_t d) : acc(static_cast<size_t>(kPoints * d * d)) {}
  T e[kPoints][kBlock];                 // exponents, then weights, of the current centroid block
  T diff[kPoints][kMaxD][64 / sizeof(T)];  // z_q - c_i for one vector of centroids
  std::vector<T> acc;                   // [kPoints][d * d], upper triangle of G_s
  T running[kPoints];
};

template <typename T>
PYGEO_VECTOR_CLONES void forward_points_full(const Problem<T>& p, const T* const* zs, const T* e0, PointBlockFull<T>& s) {
  constexpr int kLanes = 64 / sizeof(T);
  const int64_t N = p.N, d = p.d, dd = p.dd;
  const T inv_rho2 = p.inv_rho2;
  for (int q = 0; q < kPoints; ++q) s.running[q] = p.lam > 0 ? e0[q] : -std::numeric_limits<T>::infinity();
  std::fill(s.acc.begin(), s.acc.end(), T(0));
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - i0);
    const int64_t nb_lanes = (nb + kLanes - 1) / kLanes * kLanes;  // reads past N hit the zero padding
    for (int64_t t0 = 0; t0 < nb_lanes; t0 += kLanes) {
      for (int64_t k = 0; k < d; ++k) {
        const T* ck = p.cT.data() + k * p.stride + i0 + t0;
        for (int q = 0; q < kPoints; ++q) {
          const T zq = zs[q][k];
#pragma omp simd
          for (int v = 0; v < kLanes; ++v) s.diff[q][k][v] = zq - ck[v];
        }
      }
      T quad[kPoints][kLanes] = {};
      for (int64_t k = 0; k < d; ++k) {
        T twice_dk[kPoints][kLanes];  // 2 d_k, so that the off-diagonal terms need one product each
        const T* mkk = p.PT.data() + (k * d + k) * p.stride + i0 + t0;
        for (int q = 0; q < kPoints; ++q) {
#pragma omp simd
          for (int v = 0; v < kLanes; ++v) {
            const T dk = s.diff[q][k][v];
            quad[q][v] += mkk[v] * dk * dk;
            twice_dk[q][v] = dk + dk;
          }
        }
        for (int64_t l = k + 1; l < d; ++l) {
          const T* mkl = p.PT.data() + (k * d + l) * p.stride + i0 + t0;
          for (int q = 0; q < kPoints; ++q) {
#pragma omp simd
            for (int v = 0; v < kLanes; ++v) quad[q][v] += mkl[v] * twice_dk[q][v] * s.diff[q][l][v];
          }
        }
      }
      store_exponents<T, kLanes>(s.e, quad, t0, nb, inv_rho2);
    }
    for (int q = 0; q < kPoints; ++q) block_weights(s.e[q], nb, nb_lanes, s.running[q], s.acc.data() + q * dd, dd);
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t l = j; l < d; ++l) {
        T totals[kPoints];
        weighted_sums<T, kLanes>(s.e, p.PT.data() + (j * d + l) * p.stride + i0, nb_lanes, totals);
        for (int q = 0; q < kPoints; ++q) s.acc[q * dd + j * d + l] += totals[q];
      }
    }
  }
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
      const T* Mjl = p.PT.data() + jl * p.stride + i0;
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

// G_s and scale without dG, kPoints points per task (the last block padded with its last point).
template <typename T>
void forward_blocked(const Problem<T>& p, T* G_s, T* scale, int64_t B) {
  const int64_t d = p.d, dd = p.dd;
#pragma omp parallel if (B * p.N * dd >= kParallelWork)
  {
    PointBlock<T> s;
    PointBlockFull<T> s_full(p.full ? d : 0);
#pragma omp for schedule(static)
    for (int64_t b0 = 0; b0 < B; b0 += kPoints) {
      const T* zs[kPoints];
      T e0[kPoints];
      for (int q = 0; q < kPoints; ++q) {
        zs[q] = p.z + std::min(b0 + q, B - 1) * d;
        T norm2 = 0;
        for (int64_t k = 0; k < d; ++k) norm2 += zs[q][k] * zs[q][k];
        e0[q] = T(-p.tau) * norm2;
      }
      if (p.full) {
        forward_points_full(p, zs, e0, s_full);
      } else {
        forward_points_diagonal(p, zs, e0, s);
      }
      for (int q = 0; q < kPoints && b0 + q < B; ++q) {
        const T running = p.full ? s_full.running[q] : s.running[q];
        const T prior = p.lam > 0 ? T(p.lam) * std::exp(e0[q] - running) : T(0);
        scale[b0 + q] = running;
        T* Gb = G_s + (b0 + q) * dd;
        for (int64_t j = 0; j < d; ++j) {
          if (p.full) {
            for (int64_t l = j; l < d; ++l) {
              Gb[j * d + l] = Gb[l * d + j] = s_full.acc[q * dd + j * d + l] + (j == l ? prior : T(0));
            }
          } else {
            Gb[j] = s.acc[q][j] + prior;
          }
        }
      }
    }
  }
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
  if (!dG_s && d <= kMaxD) {
    forward_blocked(p, G_s, scale, B);
    return;
  }
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

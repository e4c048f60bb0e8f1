// Hermitian metric of the log-sum-exp Kahler potential (MATH.md section 5), OpenMP-parallel over tiles of points.
//   G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),  p = softmax(log pi + u / T),
//   u_i = (z - c_i)^H P_i (z - c_i),  y_i = P_i (z - c_i).
// One pass over the K components per tile with an online softmax: running max m, accumulators scaled by exp(s - m)
// and rescaled when m grows (once per chunk of components, as keys in flash attention).
//
// Both weighted sums run in one accumulator, M = sum_i w_i (T P_i + (y_i - r)(y_i - r)^H), so that
// G = (1/T) (M / W - mean mean^H) with W = sum w and mean = sum w (y - r) / W. The shift r is the y of the component with
// the largest score so far: the covariance is the same for every r, but the plain second moment minus the squared mean
// cancels catastrophically for a sharp softmax (one weight ~1) in float32. When the maximum moves to another component
// the sums move to its y exactly (the P part does not depend on r): M' = M - m d^H - d m^H + W d d^H, m' = m - W d,
// d = r' - r.
//
// Layout: a tile is one SIMD vector of points (GCC vector extensions, as wide as the CPU's registers: 64, 32 or 16
// bytes, picked at run time) and every quantity of the tile is an array of such vectors. The two
// O(K n^2) loops, y = P (z - c) and the update of M, are register-blocked (4 rows of y; 2 x 4 entries of M) so that
// they run at the fused multiply-add rate rather than at the latency of one accumulator.
// Complex numbers arrive as (real, imaginary) pairs, as torch.view_as_real lays them out; they are split into real
// and imaginary arrays once per call.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/simd.h"

namespace pygeo {

namespace {

constexpr int kChunk = 8;  // components per chunk: one max update per chunk, and the M update's reuse of its entries
// Register blocks: y = P d runs 4 rows at a time (16 accumulators), M is updated in 2 x 4 blocks (16 accumulators).
// Narrower blocks for 16-register targets measured the same on AVX2.
constexpr int kRows = 4;
constexpr int kBlockI = 2;
constexpr int kBlockJ = 4;
constexpr int kPad = 4;  // n is padded to a multiple of this (and so of kRows, kBlockI, kBlockJ) with zeros
static_assert(kPad % kRows == 0 && kPad % kBlockI == 0 && kPad % kBlockJ == 0, "blocks must tile the padded n");

// The problem of one call, with the components split into zero-padded real and imaginary arrays.
template <typename T>
struct Problem {
  const T* z;            // [B, n, 2]
  const T* log_weights;  // [K]
  T* G;                  // [B, n, n, 2]
  T inv_T, temperature;
  bool diagonal;
  int64_t B, K, n, np;     // np: n padded to kPad
  std::vector<T> c_re, c_im;  // [K, np]
  std::vector<T> P_re, P_im;  // [K, np, np], or P_re [K, np] for diagonal precisions

  Problem(const T* z_, const T* centers, const T* precisions, const T* log_weights_, T* G_, double temperature_,
          bool diagonal_, int64_t B_, int64_t K_, int64_t n_)
      : z(z_), log_weights(log_weights_), G(G_), inv_T(T(1) / static_cast<T>(temperature_)),
        temperature(static_cast<T>(temperature_)), diagonal(diagonal_), B(B_), K(K_), n(n_),
        np((n_ + kPad - 1) / kPad * kPad), c_re(K_ * np, T(0)), c_im(K_ * np, T(0)),
        P_re(diagonal_ ? K_ * np : K_ * np * np, T(0)), P_im(diagonal_ ? 0 : K_ * np * np, T(0)) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < n; ++i) {
        c_re[k * np + i] = centers[2 * (k * n + i)];
        c_im[k * np + i] = centers[2 * (k * n + i) + 1];
        if (diagonal) {
          P_re[k * np + i] = precisions[k * n + i];
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          P_re[(k * np + i) * np + j] = precisions[2 * ((k * n + i) * n + j)];
          P_im[(k * np + i) * np + j] = precisions[2 * ((k * n + i) * n + j) + 1];
        }
      }
    }
  }
};

// Per-thread state of one tile: arrays of vectors, lane l of every vector belonging to point l of the tile.
template <typename T, int Bytes>
struct Scratch {
  using V = typename Simd<T, Bytes>::V;
  explicit Scratch(const Problem<T>& p)
      : z_re(p.np), z_im(p.np), d_re(p.np), d_im(p.np), y_re(kChunk * p.np), y_im(kChunk * p.np),
        wy_re(kChunk * p.np), wy_im(kChunk * p.np), mean_re(p.np), mean_im(p.np), r_re(p.np), r_im(p.np),
        shift_re(p.np), shift_im(p.np), diag_P(p.diagonal ? p.np : 0), M_re(p.np * p.np), M_im(p.np * p.np) {}
  VectorArray<V> z_re, z_im, d_re, d_im;    // [i]: the tile's points, and z - c_k
  VectorArray<V> y_re, y_im, wy_re, wy_im;  // [c, i]: y_c - r and w_c (y_c - r) of the current chunk
  VectorArray<V> mean_re, mean_im;          // [i]: sum w (y - r)
  VectorArray<V> r_re, r_im, shift_re, shift_im;  // [i]: the shift r and its change d
  VectorArray<V> diag_P;                    // [i]: sum w P for diagonal precisions (M holds it for full ones)
  VectorArray<V> M_re, M_im;                // [i, j], upper triangle: sum w (T P + (y - r)(y - r)^H)
};

// y_c = P_k d for one component, 4 rows at a time (re/im products in separate accumulators: 16 independent chains),
// and u = Re(d^H y).
template <typename T, int Bytes>
PYGEO_INLINE typename Simd<T, Bytes>::V apply_precision(const Problem<T>& prob, Scratch<T, Bytes>& s, int64_t k, int c) {
  using V = typename Simd<T, Bytes>::V;
  const int64_t np = prob.np;
  V* y_re = s.y_re.data() + c * np;
  V* y_im = s.y_im.data() + c * np;
  const V* d_re = s.d_re.data();
  const V* d_im = s.d_im.data();
  V u = V{} + T(0);
  if (prob.diagonal) {
    const T* p = prob.P_re.data() + k * np;
    for (int64_t i = 0; i < np; ++i) {
      y_re[i] = p[i] * d_re[i];
      y_im[i] = p[i] * d_im[i];
      u += d_re[i] * y_re[i] + d_im[i] * y_im[i];
    }
    return u;
  }
  for (int64_t i0 = 0; i0 < np; i0 += kRows) {
    const T* Pr = prob.P_re.data() + (k * np + i0) * np;
    const T* Pi = prob.P_im.data() + (k * np + i0) * np;
    V rr[kRows], ii[kRows], ri[kRows], ir[kRows];  // sums of Re P Re d, Im P Im d, Re P Im d, Im P Re d
    for (int r = 0; r < kRows; ++r) rr[r] = ii[r] = ri[r] = ir[r] = V{} + T(0);
    for (int64_t j = 0; j < np; ++j) {
      const V dr = d_re[j], di = d_im[j];
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const T pr = Pr[r * np + j], pi = Pi[r * np + j];
        rr[r] += pr * dr;
        ii[r] += pi * di;
        ri[r] += pr * di;
        ir[r] += pi * dr;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const V yr = rr[r] - ii[r], yi = ri[r] + ir[r];
      y_re[i0 + r] = yr;
      y_im[i0 + r] = yi;
      u += d_re[i0 + r] * yr + d_im[i0 + r] * yi;
    }
  }
  return u;
}

// M[i0:i0+2, j0:j0+4] += sum_c w_c (T P_c + (y_c - r)(y_c - r)^H) over the chunk, in registers; (a b^H)_ij = a_i conj(b_j).
template <typename T, int Bytes>
PYGEO_INLINE void update_block(const Problem<T>& prob, Scratch<T, Bytes>& s, int64_t k0, int chunk,
                               const typename Simd<T, Bytes>::V* w, int64_t i0, int64_t j0) {
  using V = typename Simd<T, Bytes>::V;
  const int64_t np = prob.np;
  V acc_re[kBlockI][kBlockJ], acc_im[kBlockI][kBlockJ];
  for (int a = 0; a < kBlockI; ++a) {
    for (int b = 0; b < kBlockJ; ++b) {
      acc_re[a][b] = s.M_re[(i0 + a) * np + j0 + b];
      acc_im[a][b] = s.M_im[(i0 + a) * np + j0 + b];
    }
  }
  for (int c = 0; c < chunk; ++c) {
    V a_re[kBlockI], a_im[kBlockI], b_re[kBlockJ], b_im[kBlockJ];
    for (int a = 0; a < kBlockI; ++a) {
      a_re[a] = s.wy_re[c * np + i0 + a];
      a_im[a] = s.wy_im[c * np + i0 + a];
    }
    for (int b = 0; b < kBlockJ; ++b) {
      b_re[b] = s.y_re[c * np + j0 + b];
      b_im[b] = s.y_im[c * np + j0 + b];
    }
    if (!prob.diagonal) {
      const V wT = w[c] * prob.temperature;
      const T* Pr = prob.P_re.data() + ((k0 + c) * np + i0) * np + j0;
      const T* Pi = prob.P_im.data() + ((k0 + c) * np + i0) * np + j0;
#pragma GCC unroll 8
      for (int a = 0; a < kBlockI; ++a) {
#pragma GCC unroll 8
        for (int b = 0; b < kBlockJ; ++b) {
          acc_re[a][b] += wT * Pr[a * np + b];
          acc_im[a][b] += wT * Pi[a * np + b];
        }
      }
    }
#pragma GCC unroll 8
    for (int a = 0; a < kBlockI; ++a) {
#pragma GCC unroll 8
      for (int b = 0; b < kBlockJ; ++b) {
        acc_re[a][b] += a_re[a] * b_re[b];
        acc_re[a][b] += a_im[a] * b_im[b];
        acc_im[a][b] += a_im[a] * b_re[b];
        acc_im[a][b] -= a_re[a] * b_im[b];
      }
    }
  }
  for (int a = 0; a < kBlockI; ++a) {
    for (int b = 0; b < kBlockJ; ++b) {
      s.M_re[(i0 + a) * np + j0 + b] = acc_re[a][b];
      s.M_im[(i0 + a) * np + j0 + b] = acc_im[a][b];
    }
  }
}

// Moves the sums of the lanes whose shift changes by d (d = 0 in the other lanes) to the new shift:
// M' = M - m d^H - d m^H + W d d^H (upper triangle), m' = m - W d.
template <typename T, int Bytes>
PYGEO_INLINE void move_shift(Scratch<T, Bytes>& s, const typename Simd<T, Bytes>::V& total, int64_t np) {
  using V = typename Simd<T, Bytes>::V;
  for (int64_t i = 0; i < np; ++i) {
    const V mi_re = s.mean_re[i], mi_im = s.mean_im[i], di_re = s.shift_re[i], di_im = s.shift_im[i];
    for (int64_t j = i; j < np; ++j) {
      const V wd_re = total * s.shift_re[j] - s.mean_re[j], wd_im = total * s.shift_im[j] - s.mean_im[j];  // W d_j - m_j
      s.M_re[i * np + j] += di_re * wd_re + di_im * wd_im - (mi_re * s.shift_re[j] + mi_im * s.shift_im[j]);
      s.M_im[i * np + j] += di_im * wd_re - di_re * wd_im - (mi_im * s.shift_re[j] - mi_re * s.shift_im[j]);
    }
  }
  for (int64_t i = 0; i < np; ++i) {
    s.mean_re[i] -= total * s.shift_re[i];
    s.mean_im[i] -= total * s.shift_im[i];
  }
}

// One tile of points. The components go through in chunks of kChunk: y and the scores of a chunk first, then one max
// update and one rescale per chunk, then the chunk's contributions to M summed in registers and added once.
template <typename T, int Bytes>
PYGEO_INLINE void process_tile(const Problem<T>& prob, Scratch<T, Bytes>& s, int64_t tile) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  const int64_t n = prob.n, np = prob.np, K = prob.K;
  const int64_t b0 = tile * L;
  const int count = static_cast<int>(std::min<int64_t>(L, prob.B - b0));
  for (int64_t i = 0; i < np; ++i) {
    for (int l = 0; l < L; ++l) {
      const int64_t b = b0 + (l < count ? l : 0);  // padding lanes repeat the tile's first point, never written
      s.z_re[i][l] = i < n ? prob.z[2 * (b * n + i)] : T(0);
      s.z_im[i][l] = i < n ? prob.z[2 * (b * n + i) + 1] : T(0);
    }
  }
  const V zero = V{} + T(0);
  s.M_re.fill(zero);
  s.M_im.fill(zero);
  s.mean_re.fill(zero);
  s.mean_im.fill(zero);
  s.r_re.fill(zero);
  s.r_im.fill(zero);
  s.diag_P.fill(zero);
  V running_max = V{} - std::numeric_limits<T>::infinity();
  V total = zero;
  V w[kChunk];  // the chunk's scores, then its weights
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kChunk, K - k0));
    // 1. y_c = P_c (z - c_c) and the scores log pi_c + u_c / T.
    for (int c = 0; c < chunk; ++c) {
      const int64_t k = k0 + c;
      for (int64_t i = 0; i < np; ++i) {
        s.d_re[i] = s.z_re[i] - prob.c_re[k * np + i];
        s.d_im[i] = s.z_im[i] - prob.c_im[k * np + i];
      }
      w[c] = prob.log_weights[k] + apply_precision(prob, s, k, c) * prob.inv_T;
    }
    // 2. One max update per chunk. Where it grows, the y of the new maximum becomes the lane's shift (the sums move to
    // it) and the sums are rescaled.
    bool grew = false;
    int argmax[L];  // the chunk's component with the lane's new maximum, -1 where the maximum stays
    V new_max = running_max;
    for (int l = 0; l < L; ++l) {
      argmax[l] = -1;
      for (int c = 0; c < chunk; ++c) {
        if (w[c][l] > new_max[l]) {
          new_max[l] = w[c][l];
          argmax[l] = c;
        }
      }
      grew |= argmax[l] >= 0;
    }
    if (grew) {
      const V rescale = exp_weight<T, Bytes>(running_max - new_max);  // 1 where it stays; exp(-inf) = 0 at the start
      running_max = new_max;
      for (int64_t i = 0; i < np; ++i) {
        for (int l = 0; l < L; ++l) {
          const bool moves = argmax[l] >= 0;
          s.shift_re[i][l] = moves ? s.y_re[argmax[l] * np + i][l] - s.r_re[i][l] : T(0);
          s.shift_im[i][l] = moves ? s.y_im[argmax[l] * np + i][l] - s.r_im[i][l] : T(0);
        }
        s.r_re[i] += s.shift_re[i];
        s.r_im[i] += s.shift_im[i];
      }
      move_shift(s, total, np);
      total *= rescale;
      s.M_re.scale(rescale);
      s.M_im.scale(rescale);
      s.mean_re.scale(rescale);
      s.mean_im.scale(rescale);
      s.diag_P.scale(rescale);
    }
    for (int c = 0; c < chunk; ++c) {
      w[c] = exp_weight<T, Bytes>(w[c] - running_max);
      total += w[c];
    }
    // 3. y_c - r, its weighted copy w_c (y_c - r), and their sum.
    for (int c = 0; c < chunk; ++c) {
      for (int64_t i = 0; i < np; ++i) {
        const int64_t e = c * np + i;
        s.y_re[e] -= s.r_re[i];
        s.y_im[e] -= s.r_im[i];
        s.wy_re[e] = w[c] * s.y_re[e];
        s.wy_im[e] = w[c] * s.y_im[e];
        s.mean_re[i] += s.wy_re[e];
        s.mean_im[i] += s.wy_im[e];
      }
      if (prob.diagonal) {
        const T* p = prob.P_re.data() + (k0 + c) * np;
        for (int64_t i = 0; i < np; ++i) s.diag_P[i] += w[c] * p[i];
      }
    }
    // 4. The upper triangle of M, block by block (blocks that cross the diagonal also fill a few entries below it,
    // which are never read).
    for (int64_t i0 = 0; i0 < np; i0 += kBlockI) {
      for (int64_t j0 = i0 / kBlockJ * kBlockJ; j0 < np; j0 += kBlockJ) update_block(prob, s, k0, chunk, w, i0, j0);
    }
  }
  // G = (1/T) (M / W - mean mean^H) + sum w P / W for diagonal precisions; written in full, exactly Hermitian.
  for (int l = 0; l < count; ++l) {
    const T inv_total = T(1) / total[l];
    T* Gb = prob.G + (b0 + l) * n * n * 2;
    for (int64_t i = 0; i < n; ++i) {
      const T mean_re_i = s.mean_re[i][l] * inv_total, mean_im_i = s.mean_im[i][l] * inv_total;
      for (int64_t j = i; j < n; ++j) {
        const T mean_re_j = s.mean_re[j][l] * inv_total, mean_im_j = s.mean_im[j][l] * inv_total;
        T g_re = (s.M_re[i * np + j][l] * inv_total - (mean_re_i * mean_re_j + mean_im_i * mean_im_j)) * prob.inv_T;
        T g_im = (s.M_im[i * np + j][l] * inv_total - (mean_im_i * mean_re_j - mean_re_i * mean_im_j)) * prob.inv_T;
        if (i == j) {
          if (prob.diagonal) g_re += s.diag_P[i][l] * inv_total;
          g_im = 0;  // a Hermitian matrix has a real diagonal
        }
        Gb[2 * (i * n + j)] = g_re;
        Gb[2 * (i * n + j) + 1] = g_im;
        Gb[2 * (j * n + i)] = g_re;
        Gb[2 * (j * n + i) + 1] = -g_im;
      }
    }
  }
}

// The tile kernel for each vector width (common/simd.h), one OpenMP thread per tile.
template <typename T>
void tile_16(const Problem<T>& prob, Scratch<T, 16>& s, int64_t tile) {
  process_tile<T, 16>(prob, s, tile);
}
template <typename T>
PYGEO_TARGET_32 void tile_32(const Problem<T>& prob, Scratch<T, 32>& s, int64_t tile) {
  process_tile<T, 32>(prob, s, tile);
}
template <typename T>
PYGEO_TARGET_64 void tile_64(const Problem<T>& prob, Scratch<T, 64>& s, int64_t tile) {
  process_tile<T, 64>(prob, s, tile);
}

template <typename T, int Bytes>
void run_tiles(const Problem<T>& prob, void (*tile_fn)(const Problem<T>&, Scratch<T, Bytes>&, int64_t)) {
  const int64_t n_tiles = (prob.B + Simd<T, Bytes>::lanes - 1) / Simd<T, Bytes>::lanes;
#pragma omp parallel
  {
    Scratch<T, Bytes> scratch(prob);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) tile_fn(prob, scratch, tile);
  }
}

template <typename T>
void run_all_tiles(const Problem<T>& prob) {
  const int bytes = simd_bytes();
  if (bytes >= 64) return run_tiles<T, 64>(prob, tile_64<T>);
  if (bytes >= 32) return run_tiles<T, 32>(prob, tile_32<T>);
  run_tiles<T, 16>(prob, tile_16<T>);
}

}  // namespace

// z: [B, n, 2]; centers: [K, n, 2]; precisions: [K, n, n, 2] (diagonal == false, Hermitian) or [K, n] (diagonal, real);
// log_weights: [K]; G: [B, n, n, 2], written in full (exactly Hermitian, real diagonal).
template <typename T>
void lse_kahler_metric_cpu(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature,
                           bool diagonal, T* G, int64_t B, int64_t K, int64_t n) {
  check_nonnegative(B, "B");
  check_positive(K, "K");
  check_positive(n, "n");
  PYGEO_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0");
  const Problem<T> prob(z, centers, precisions, log_weights, G, temperature, diagonal, B, K, n);
  run_all_tiles(prob);
}

template void lse_kahler_metric_cpu<float>(const float*, const float*, const float*, const float*, double, bool, float*,
                                           int64_t, int64_t, int64_t);
template void lse_kahler_metric_cpu<double>(const double*, const double*, const double*, const double*, double, bool,
                                            double*, int64_t, int64_t, int64_t);

}  // namespace pygeo

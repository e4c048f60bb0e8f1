// Hermitian metric of the log-sum-exp Kahler potential (MATH.md section 5), OpenMP-parallel over points.
//   G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),  p = softmax(log pi + u / T),
//   u_i = (z - c_i)^H P_i (z - c_i),  y_i = P_i (z - c_i).
// One pass over the K components per point with an online softmax: running max m, accumulators scaled by exp(s - m)
// and rescaled when m grows (once per chunk of components, as keys in flash attention).
// The covariance sum p y y^H - ybar ybar^H is accumulated around a shift r, the y of the component with the largest
// score so far (sums of w (y - r) and w (y - r)(y - r)^H): it is the same for every r, but the plain second moment minus
// the squared mean cancels catastrophically for a sharp softmax (one weight ~1) in float32. When the maximum moves to
// another component the sums are moved to its y exactly: S' = S - m d^H - d m^H + W d d^H, m' = m - W d, d = r' - r.
// Complex numbers are (real, imaginary) pairs, as torch.view_as_real lays them out; the arithmetic is written on split
// real/imaginary arrays so the inner loops vectorise (std::complex multiplies do not).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

namespace pygeo {

namespace {

constexpr int kTile = 8;    // points per tile: one or two SIMD registers of float, the unit every inner loop runs over
constexpr int kChunk = 16;  // components per chunk: one max update and one accumulator read/write per chunk

// exp(x) for x <= 0, with weights below 1e-25 (float) / 1e-290 (double) relative to the largest set to exactly 0:
// they cannot change a sum that holds a weight of 1, and left alone they decay into denormals whose arithmetic is ~100x
// slower (a far-away component's weight times y y^H).
template <typename T>
inline T negligible_as_zero(T x) {
  const T cutoff = std::log(std::numeric_limits<T>::min()) + T(30);
  return x < cutoff ? T(0) : std::exp(x);
}

// acc [m, kTile] *= factor [kTile], lane by lane.
template <typename T>
void scale_lanes(std::vector<T>& acc, const T* factor) {
  const size_t rows = acc.size() / kTile;
  for (size_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int t = 0; t < kTile; ++t) acc[r * kTile + t] *= factor[t];
  }
}

// Inputs and shared read-only data of one call.
template <typename T>
struct Problem {
  const T* z;            // [B, n, 2]
  const T* centers;      // [K, n, 2]
  const T* precisions;   // [K, n, n, 2] or [K, n] (diagonal)
  const T* log_weights;  // [K]
  const T* P_t_re;       // [p_stride, K_padded]: precisions transposed, real parts
  const T* P_t_im;       // [n * n, K_padded]: imaginary parts (full precisions only)
  T* G;                  // [B, n, n, 2]
  T inv_T;
  bool diagonal;
  int64_t B, K, n, nn, p_stride, K_padded;
};

// Per-thread state of one tile of kTile points, point index innermost ([..., kTile]) so that every loop below is a
// unit-stride loop over the tile's points that the compiler vectorises.
template <typename T>
struct Scratch {
  explicit Scratch(const Problem<T>& p)
      : z_re(p.n * kTile), z_im(p.n * kTile), d_re(p.n * kTile), d_im(p.n * kTile), y_re(kChunk * p.n * kTile), y_im(kChunk * p.n * kTile),
        wy_re(kChunk * p.n * kTile), wy_im(kChunk * p.n * kTile), ysum_re(p.n * kTile), ysum_im(p.n * kTile),
        S_re(p.nn * kTile), S_im(p.nn * kTile), A_re(p.p_stride * kTile), A_im(p.diagonal ? 0 : p.nn * kTile),
        r_re(p.n * kTile), r_im(p.n * kTile), shift_re(p.n * kTile), shift_im(p.n * kTile) {}
  std::vector<T> z_re, z_im, d_re, d_im;  // [i, t]: the tile's points, and z - c_k
  std::vector<T> y_re, y_im, wy_re, wy_im;  // [c, i, t]: y_c and w_c y_c of the current chunk
  std::vector<T> ysum_re, ysum_im, S_re, S_im, A_re, A_im;  // sums of w (y - r), w (y - r)(y - r)^H and w P
  std::vector<T> r_re, r_im, shift_re, shift_im;          // [i, t]: the shift r and its change d
};

// Moves the sums of the lanes whose shift changes by d (d = 0 in the other lanes) to the new shift:
// S' = S - m d^H - d m^H + W d d^H (upper triangle), m' = m - W d.
template <typename T>
void move_shift(Scratch<T>& s, const T* total, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T* mi_re = s.ysum_re.data() + i * kTile;
    const T* mi_im = s.ysum_im.data() + i * kTile;
    const T* di_re = s.shift_re.data() + i * kTile;
    const T* di_im = s.shift_im.data() + i * kTile;
    for (int64_t j = i; j < n; ++j) {
      const T* mj_re = s.ysum_re.data() + j * kTile;
      const T* mj_im = s.ysum_im.data() + j * kTile;
      const T* dj_re = s.shift_re.data() + j * kTile;
      const T* dj_im = s.shift_im.data() + j * kTile;
      T* sr = s.S_re.data() + (i * n + j) * kTile;
      T* si = s.S_im.data() + (i * n + j) * kTile;
#pragma omp simd
      for (int t = 0; t < kTile; ++t) {  // (a b^H)_ij = a_i conj(b_j)
        const T wd_re = total[t] * dj_re[t] - mj_re[t], wd_im = total[t] * dj_im[t] - mj_im[t];  // W d_j - m_j
        sr[t] += di_re[t] * wd_re + di_im[t] * wd_im - (mi_re[t] * dj_re[t] + mi_im[t] * dj_im[t]);
        si[t] += di_im[t] * wd_re - di_re[t] * wd_im - (mi_im[t] * dj_re[t] - mi_re[t] * dj_im[t]);
      }
    }
  }
  for (int64_t e = 0; e < n * kTile; ++e) {
    const T W = total[e % kTile];
    s.ysum_re[e] -= W * s.shift_re[e];
    s.ysum_im[e] -= W * s.shift_im[e];
  }
}

// One tile of points. The components go through in chunks of kChunk (as keys do in flash attention): y and the scores
// of a chunk first, then one max update and one rescale per chunk, then the chunk's contributions to sum w P and
// sum w y y^H summed in registers and added once.
template <typename T>
inline __attribute__((always_inline)) void process_tile(const Problem<T>& prob, Scratch<T>& scratch, int64_t tile) {
  const T* z = prob.z;
  const T* centers = prob.centers;
  const T* precisions = prob.precisions;
  const T* log_weights = prob.log_weights;
  T* G = prob.G;
  const T inv_T = prob.inv_T;
  const bool diagonal = prob.diagonal;
  const int64_t B = prob.B, K = prob.K, n = prob.n, nn = prob.nn, p_stride = prob.p_stride, K_padded = prob.K_padded;
  const T* P_t_re_data = prob.P_t_re;
  const T* P_t_im_data = prob.P_t_im;
  std::vector<T>&z_re = scratch.z_re, &z_im = scratch.z_im, &d_re = scratch.d_re, &d_im = scratch.d_im;
  std::vector<T>&y_re = scratch.y_re, &y_im = scratch.y_im;
  std::vector<T>&wy_re = scratch.wy_re, &wy_im = scratch.wy_im, &ysum_re = scratch.ysum_re, &ysum_im = scratch.ysum_im;
  std::vector<T>&S_re = scratch.S_re, &S_im = scratch.S_im, &A_re = scratch.A_re, &A_im = scratch.A_im;
  alignas(64) T running_max[kTile], total[kTile], rescale[kTile], chunk_max[kTile];
  alignas(64) T score[kChunk * kTile];  // [c, t], then the weights w
  const int64_t b0 = tile * kTile;
  const int64_t count = std::min<int64_t>(kTile, B - b0);
  for (int64_t i = 0; i < n; ++i) {
    for (int t = 0; t < kTile; ++t) {
      const int64_t b = b0 + (t < count ? t : 0);  // padding lanes repeat the tile's first point, never written
      z_re[i * kTile + t] = z[2 * (b * n + i)];
      z_im[i * kTile + t] = z[2 * (b * n + i) + 1];
    }
  }
  std::fill(S_re.begin(), S_re.end(), T(0));
  std::fill(S_im.begin(), S_im.end(), T(0));
  std::fill(A_re.begin(), A_re.end(), T(0));
  std::fill(A_im.begin(), A_im.end(), T(0));
  std::fill(ysum_re.begin(), ysum_re.end(), T(0));
  std::fill(ysum_im.begin(), ysum_im.end(), T(0));
  std::fill(scratch.r_re.begin(), scratch.r_re.end(), T(0));
  std::fill(scratch.r_im.begin(), scratch.r_im.end(), T(0));
  for (int t = 0; t < kTile; ++t) {
    running_max[t] = -std::numeric_limits<T>::infinity();
    total[t] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kChunk, K - k0));
    // 1. y_c = P_c (z - c_c) and u_c = Re((z - c_c)^H y_c) for the chunk's components.
    for (int c = 0; c < chunk; ++c) {
      const int64_t k = k0 + c;
      const T* ck = centers + k * n * 2;
      T* yr_c = y_re.data() + c * n * kTile;
      T* yi_c = y_im.data() + c * n * kTile;
      for (int64_t j = 0; j < n; ++j) {
        const T c_re = ck[2 * j], c_im = ck[2 * j + 1];
#pragma omp simd
        for (int t = 0; t < kTile; ++t) {
          d_re[j * kTile + t] = z_re[j * kTile + t] - c_re;
          d_im[j * kTile + t] = z_im[j * kTile + t] - c_im;
        }
      }
      alignas(64) T u[kTile] = {};  // Re(d^H y), accumulated in registers
      for (int64_t i = 0; i < n; ++i) {
        alignas(64) T acc_re[kTile], acc_im[kTile];
        if (diagonal) {
          const T p = precisions[k * n + i];
#pragma omp simd
          for (int t = 0; t < kTile; ++t) {
            acc_re[t] = p * d_re[i * kTile + t];
            acc_im[t] = p * d_im[i * kTile + t];
          }
        } else {
          const T* row = precisions + 2 * (k * nn + i * n);  // interleaved (re, im) row i of P_k
          for (int t = 0; t < kTile; ++t) acc_re[t] = acc_im[t] = 0;
          for (int64_t j = 0; j < n; ++j) {
            const T p_re = row[2 * j], p_im = row[2 * j + 1];
            const T* dr = d_re.data() + j * kTile;
            const T* di = d_im.data() + j * kTile;
#pragma omp simd
            for (int t = 0; t < kTile; ++t) {
              acc_re[t] += p_re * dr[t] - p_im * di[t];
              acc_im[t] += p_re * di[t] + p_im * dr[t];
            }
          }
        }
#pragma omp simd
        for (int t = 0; t < kTile; ++t) {
          yr_c[i * kTile + t] = acc_re[t];
          yi_c[i * kTile + t] = acc_im[t];
          u[t] += d_re[i * kTile + t] * acc_re[t] + d_im[i * kTile + t] * acc_im[t];
        }
      }
      for (int t = 0; t < kTile; ++t) score[c * kTile + t] = log_weights[k] + u[t] * inv_T;
    }
    // 2. One max update per chunk. Where it grows, the y of the new maximum becomes the lane's shift (the sums move to
    // it) and the sums are rescaled.
    bool grew = false;
    int argmax[kTile];
    for (int t = 0; t < kTile; ++t) {
      argmax[t] = 0;
      chunk_max[t] = score[t];
      for (int c = 1; c < chunk; ++c) {
        if (score[c * kTile + t] > chunk_max[t]) {
          chunk_max[t] = score[c * kTile + t];
          argmax[t] = c;
        }
      }
      rescale[t] = 1;
      if (chunk_max[t] > running_max[t]) {
        rescale[t] = negligible_as_zero(running_max[t] - chunk_max[t]);  // exp(-inf) = 0 at the start
        running_max[t] = chunk_max[t];
        grew = true;
      } else {
        argmax[t] = -1;
      }
    }
    if (grew) {
      for (int64_t i = 0; i < n; ++i) {
        for (int t = 0; t < kTile; ++t) {
          const int64_t e = i * kTile + t;
          const bool moves = argmax[t] >= 0;
          scratch.shift_re[e] = moves ? y_re[(argmax[t] * n + i) * kTile + t] - scratch.r_re[e] : T(0);
          scratch.shift_im[e] = moves ? y_im[(argmax[t] * n + i) * kTile + t] - scratch.r_im[e] : T(0);
          scratch.r_re[e] += scratch.shift_re[e];
          scratch.r_im[e] += scratch.shift_im[e];
        }
      }
      move_shift(scratch, total, n);
      for (int t = 0; t < kTile; ++t) total[t] *= rescale[t];
      scale_lanes(S_re, rescale);
      scale_lanes(S_im, rescale);
      scale_lanes(A_re, rescale);
      scale_lanes(A_im, rescale);
      scale_lanes(ysum_re, rescale);
      scale_lanes(ysum_im, rescale);
    }
    for (int c = 0; c < kChunk; ++c) {
      for (int t = 0; t < kTile; ++t) {
        const T w = c < chunk ? negligible_as_zero(score[c * kTile + t] - running_max[t]) : T(0);
        score[c * kTile + t] = w;
        total[t] += w;
      }
    }
    // 3. y_c - r, sum_c w_c (y_c - r) and the weighted copies w_c (y_c - r) for the second moment.
    for (int c = 0; c < chunk; ++c) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = (c * n + i) * kTile;
#pragma omp simd
        for (int t = 0; t < kTile; ++t) {
          y_re[e + t] -= scratch.r_re[i * kTile + t];
          y_im[e + t] -= scratch.r_im[i * kTile + t];
        }
      }
    }
    for (int c = 0; c < chunk; ++c) {
      const T* w = score + c * kTile;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = (c * n + i) * kTile;
#pragma omp simd
        for (int t = 0; t < kTile; ++t) {
          wy_re[e + t] = w[t] * y_re[e + t];
          wy_im[e + t] = w[t] * y_im[e + t];
          ysum_re[i * kTile + t] += wy_re[e + t];
          ysum_im[i * kTile + t] += wy_im[e + t];
        }
      }
    }
    // 4. sum_c w_c P_c entry by entry (padded components have zero weight and zero precision).
    for (int64_t e = 0; e < p_stride; ++e) {
      const T* p_re = P_t_re_data + e * K_padded + k0;
      const T* p_im = diagonal ? nullptr : P_t_im_data + e * K_padded + k0;
      alignas(64) T acc_re[kTile] = {}, acc_im[kTile] = {};
      for (int c = 0; c < kChunk; ++c) {
        const T* w = score + c * kTile;
#pragma omp simd
        for (int t = 0; t < kTile; ++t) acc_re[t] += w[t] * p_re[c];
        if (!diagonal) {
#pragma omp simd
          for (int t = 0; t < kTile; ++t) acc_im[t] += w[t] * p_im[c];
        }
      }
#pragma omp simd
      for (int t = 0; t < kTile; ++t) A_re[e * kTile + t] += acc_re[t];
      if (!diagonal) {
#pragma omp simd
        for (int t = 0; t < kTile; ++t) A_im[e * kTile + t] += acc_im[t];
      }
    }
    // 5. Upper triangle of sum_c w_c (y_c - r)(y_c - r)^H, (y y^H)_ij = y_i conj(y_j).
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i; j < n; ++j) {
        alignas(64) T acc_re[kTile] = {}, acc_im[kTile] = {};
        for (int c = 0; c < chunk; ++c) {
          const T* a_re = wy_re.data() + (c * n + i) * kTile;
          const T* a_im = wy_im.data() + (c * n + i) * kTile;
          const T* b_re = y_re.data() + (c * n + j) * kTile;
          const T* b_im = y_im.data() + (c * n + j) * kTile;
#pragma omp simd
          for (int t = 0; t < kTile; ++t) {
            acc_re[t] += a_re[t] * b_re[t] + a_im[t] * b_im[t];
            acc_im[t] += a_im[t] * b_re[t] - a_re[t] * b_im[t];
          }
        }
        T* sr = S_re.data() + (i * n + j) * kTile;
        T* si = S_im.data() + (i * n + j) * kTile;
#pragma omp simd
        for (int t = 0; t < kTile; ++t) {
          sr[t] += acc_re[t];
          si[t] += acc_im[t];
        }
      }
    }
  }
  for (int t = 0; t < count; ++t) {
    const T inv_total = T(1) / total[t];
    T* Gb = G + (b0 + t) * nn * 2;
    for (int64_t i = 0; i < n; ++i) {
      const T mean_re_i = ysum_re[i * kTile + t] * inv_total, mean_im_i = ysum_im[i * kTile + t] * inv_total;
      for (int64_t j = i; j < n; ++j) {
        const T mean_re_j = ysum_re[j * kTile + t] * inv_total, mean_im_j = ysum_im[j * kTile + t] * inv_total;
        const int64_t e = (i * n + j) * kTile + t;
        const T cov_re = S_re[e] * inv_total - (mean_re_i * mean_re_j + mean_im_i * mean_im_j);
        const T cov_im = S_im[e] * inv_total - (mean_im_i * mean_re_j - mean_re_i * mean_im_j);
        T g_re = cov_re * inv_T, g_im = cov_im * inv_T;
        if (diagonal) {
          if (i == j) g_re += A_re[i * kTile + t] * inv_total;
        } else {
          g_re += A_re[e] * inv_total;
          g_im += A_im[e] * inv_total;
        }
        if (i == j) g_im = 0;  // a Hermitian matrix has a real diagonal
        Gb[2 * (i * n + j)] = g_re;
        Gb[2 * (i * n + j) + 1] = g_im;
        Gb[2 * (j * n + i)] = g_re;
        Gb[2 * (j * n + i) + 1] = -g_im;
      }
    }
  }
}

// The tile kernel compiled for AVX2/FMA as well as the baseline, picked at run time (GCC function multiversioning): the
// wheel stays portable and the inner loops get 8-wide fused multiply-adds where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYGEO_TILE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYGEO_TILE_CLONES
#endif
PYGEO_TILE_CLONES void process_tile_float(const Problem<float>& p, Scratch<float>& s, int64_t tile) {
  process_tile(p, s, tile);
}
PYGEO_TILE_CLONES void process_tile_double(const Problem<double>& p, Scratch<double>& s, int64_t tile) {
  process_tile(p, s, tile);
}
inline void run_tile(const Problem<float>& p, Scratch<float>& s, int64_t tile) { process_tile_float(p, s, tile); }
inline void run_tile(const Problem<double>& p, Scratch<double>& s, int64_t tile) { process_tile_double(p, s, tile); }

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
  const T inv_T = T(1) / static_cast<T>(temperature);
  const int64_t nn = n * n;
  const int64_t p_stride = diagonal ? n : nn;  // entries of one P_k
  const int64_t K_padded = (K + kChunk - 1) / kChunk * kChunk;

  // Precisions transposed to [entry, k] (real and imaginary parts apart, zero-padded to whole chunks), shared by every
  // thread: sum_k w_k P_k[e] over a chunk is then a unit-stride dot product per entry e.
  std::vector<T> P_t_re(static_cast<size_t>(p_stride * K_padded), T(0));
  std::vector<T> P_t_im(diagonal ? 0 : static_cast<size_t>(nn * K_padded), T(0));
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < p_stride; ++e) {
    for (int64_t k = 0; k < K; ++k) {
      if (diagonal) {
        P_t_re[e * K_padded + k] = precisions[k * n + e];
      } else {
        P_t_re[e * K_padded + k] = precisions[2 * (k * nn + e)];
        P_t_im[e * K_padded + k] = precisions[2 * (k * nn + e) + 1];
      }
    }
  }

const Problem<T> prob{z, centers, precisions, log_weights, P_t_re.data(), diagonal ? nullptr : P_t_im.data(), G,
                        inv_T, diagonal, B, K, n, nn, p_stride, K_padded};
  const int64_t n_tiles = (B + kTile - 1) / kTile;
#pragma omp parallel
  {
    Scratch<T> scratch(prob);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) run_tile(prob, scratch, tile);
  }
}

template void lse_kahler_metric_cpu<float>(const float*, const float*, const float*, const float*, double, bool, float*,
                                           int64_t, int64_t, int64_t);
template void lse_kahler_metric_cpu<double>(const double*, const double*, const double*, const double*, double, bool,
                                            double*, int64_t, int64_t, int64_t);

}  // namespace pygeo

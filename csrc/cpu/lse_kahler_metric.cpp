// Hermitian metric of the log-sum-exp Kahler potential (MATH.md section 5), OpenMP-parallel over points.
//   G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),  p = softmax(log pi + u / T),
//   u_i = (z - c_i)^H P_i (z - c_i),  y_i = P_i (z - c_i).
// One pass over the K components per point with an online softmax: running max m, accumulators scaled by exp(s - m)
// and rescaled when m grows. Complex numbers are (real, imaginary) pairs, as torch.view_as_real lays them out; the
// arithmetic is written on split real/imaginary arrays so the inner loops vectorise (std::complex multiplies do not).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

namespace pygeo {

namespace {

constexpr int kTile = 8;  // points per tile: one or two SIMD registers of float, the unit every inner loop runs over

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
  const int64_t p_stride = diagonal ? n : nn;

  // Precisions in planar layout (all real parts, then all imaginary parts), shared by every thread: unit-stride rows
  // for the matrix-vector products and the weighted sums.
  std::vector<T> planar_re(static_cast<size_t>(K * p_stride)), planar_im(diagonal ? 0 : static_cast<size_t>(K * nn));
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    if (diagonal) {
      for (int64_t i = 0; i < n; ++i) planar_re[k * n + i] = precisions[k * n + i];
    } else {
      for (int64_t e = 0; e < nn; ++e) {
        planar_re[k * nn + e] = precisions[2 * (k * nn + e)];
        planar_im[k * nn + e] = precisions[2 * (k * nn + e) + 1];
      }
    }
  }

#pragma omp parallel
  {
    // Per-thread accumulators of one tile of kTile points, point index innermost ([..., kTile]) so that every update
    // below is a unit-stride loop over the tile's points that the compiler vectorises, and each P_k is read once per tile.
    std::vector<T> z_re(n * kTile), z_im(n * kTile), d_re(n * kTile), d_im(n * kTile), y_re(n * kTile), y_im(n * kTile);
    std::vector<T> ysum_re(n * kTile), ysum_im(n * kTile), S_re(nn * kTile), S_im(nn * kTile);
    std::vector<T> A_re(p_stride * kTile), A_im(diagonal ? 0 : nn * kTile);
    T running_max[kTile], total[kTile], score[kTile], rescale[kTile], w[kTile], wy_re[kTile], wy_im[kTile];
    const int64_t n_tiles = (B + kTile - 1) / kTile;
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
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
      for (int t = 0; t < kTile; ++t) {
        running_max[t] = -std::numeric_limits<T>::infinity();
        total[t] = 0;
        score[t] = 0;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T* ck = centers + k * n * 2;
        for (int64_t i = 0; i < n; ++i) {
          const T c_re = ck[2 * i], c_im = ck[2 * i + 1];
#pragma omp simd
          for (int t = 0; t < kTile; ++t) {
            d_re[i * kTile + t] = z_re[i * kTile + t] - c_re;
            d_im[i * kTile + t] = z_im[i * kTile + t] - c_im;
          }
        }
        const T* Pr = planar_re.data() + k * p_stride;
        const T* Pi = diagonal ? nullptr : planar_im.data() + k * nn;
        for (int t = 0; t < kTile; ++t) score[t] = 0;  // holds u until the scores are formed
        for (int64_t i = 0; i < n; ++i) {
          T* yr = y_re.data() + i * kTile;
          T* yi = y_im.data() + i * kTile;
          if (diagonal) {
#pragma omp simd
            for (int t = 0; t < kTile; ++t) {
              yr[t] = Pr[i] * d_re[i * kTile + t];
              yi[t] = Pr[i] * d_im[i * kTile + t];
            }
          } else {
            for (int t = 0; t < kTile; ++t) yr[t] = yi[t] = 0;
            for (int64_t j = 0; j < n; ++j) {
              const T p_re = Pr[i * n + j], p_im = Pi[i * n + j];
              const T* dr = d_re.data() + j * kTile;
              const T* di = d_im.data() + j * kTile;
#pragma omp simd
              for (int t = 0; t < kTile; ++t) {
                yr[t] += p_re * dr[t] - p_im * di[t];
                yi[t] += p_re * di[t] + p_im * dr[t];
              }
            }
          }
#pragma omp simd
          for (int t = 0; t < kTile; ++t)  // u += Re(conj(d_i) y_i); real for Hermitian P
            score[t] += d_re[i * kTile + t] * yr[t] + d_im[i * kTile + t] * yi[t];
        }
        bool grew = false;
        for (int t = 0; t < kTile; ++t) {
          score[t] = log_weights[k] + score[t] * inv_T;
          rescale[t] = 1;
          if (score[t] > running_max[t]) {
            // The max grew: bring this point's accumulators to the new reference (exp(-inf) = 0 at the start).
            rescale[t] = negligible_as_zero(running_max[t] - score[t]);
            running_max[t] = score[t];
            grew = true;
          }
          w[t] = negligible_as_zero(score[t] - running_max[t]);
          total[t] = total[t] * rescale[t] + w[t];
        }
        if (grew) {
          scale_lanes(S_re, rescale);
          scale_lanes(S_im, rescale);
          scale_lanes(A_re, rescale);
          scale_lanes(A_im, rescale);
          scale_lanes(ysum_re, rescale);
          scale_lanes(ysum_im, rescale);
        }
        for (int64_t e = 0; e < p_stride; ++e) {
          const T p_re = Pr[e];
          T* acc = A_re.data() + e * kTile;
#pragma omp simd
          for (int t = 0; t < kTile; ++t) acc[t] += w[t] * p_re;
        }
        if (!diagonal) {
          for (int64_t e = 0; e < nn; ++e) {
            const T p_im = Pi[e];
            T* acc = A_im.data() + e * kTile;
#pragma omp simd
            for (int t = 0; t < kTile; ++t) acc[t] += w[t] * p_im;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const T* yr_i = y_re.data() + i * kTile;
          const T* yi_i = y_im.data() + i * kTile;
#pragma omp simd
          for (int t = 0; t < kTile; ++t) {
            wy_re[t] = w[t] * yr_i[t];
            wy_im[t] = w[t] * yi_i[t];
            ysum_re[i * kTile + t] += wy_re[t];
            ysum_im[i * kTile + t] += wy_im[t];
          }
          // Upper triangle of sum_k w_k y y^H, (y y^H)_ij = y_i conj(y_j).
          for (int64_t j = i; j < n; ++j) {
            const T* yr_j = y_re.data() + j * kTile;
            const T* yi_j = y_im.data() + j * kTile;
            T* sr = S_re.data() + (i * n + j) * kTile;
            T* si = S_im.data() + (i * n + j) * kTile;
#pragma omp simd
            for (int t = 0; t < kTile; ++t) {
              sr[t] += wy_re[t] * yr_j[t] + wy_im[t] * yi_j[t];
              si[t] += wy_im[t] * yr_j[t] - wy_re[t] * yi_j[t];
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
  }
}

template void lse_kahler_metric_cpu<float>(const float*, const float*, const float*, const float*, double, bool, float*,
                                           int64_t, int64_t, int64_t);
template void lse_kahler_metric_cpu<double>(const double*, const double*, const double*, const double*, double, bool,
                                            double*, int64_t, int64_t, int64_t);

}  // namespace pygeo

// Gradient in z of a real loss of the LSE Kahler metric G (the first-order backward of lse_kahler_metric), in closed
// form (MATH.md section 5; derived and checked against autograd in pygeo/reference/lse_kahler_metric.py,
// lse_kahler_metric_vjp_z). With the upstream gradient g = dloss/dRe G + i dloss/dIm G and H = (g + g^H) / 2:
//   v = (2/T) sum_i p_i [ (e_i - ebar) y_i + P_i H (y_i - ybar) ],
//   e_i = Re tr(H P_i) + (y_i^H H y_i - 2 Re (H ybar)^H y_i) / T,  ebar = sum_i p_i e_i,
// and dloss/dRe z + i dloss/dIm z = v; with every y_i shifted by the dominant component's y (v does not change).
//
// OpenMP over points. The components are the vectorised axis: the call lays centers and precisions out once as
// [n, K] and [n, n, K] real / imaginary arrays, and every per-point quantity (z - c_i, y_i, H y_i, the scores) is an
// [n, K] array, so that each step is a loop over K that the compiler turns into SIMD code (compiled for 16-, 32- and
// 64-byte vectors, simd.h). The plain-PyTorch form of the same sums streams [B, K, n] complex tensors through memory
// a dozen times; this keeps them in per-thread buffers.
// Complex numbers arrive as (real, imaginary) pairs, as torch.view_as_real lays them out.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/simd.h"

namespace pygeo {

namespace {

// Centers and precisions with the components last: c [n][K], P [n][n][K] (or the diagonal [n][K], P_im empty).
template <typename T>
struct Components {
  int64_t K, n;
  bool diagonal;
  std::vector<T> c_re, c_im, P_re, P_im, log_weights;

  Components(const T* centers, const T* precisions, const T* log_weights_, bool diagonal_, int64_t K_, int64_t n_)
      : K(K_), n(n_), diagonal(diagonal_), c_re(n_ * K_), c_im(n_ * K_), P_re(diagonal_ ? n_ * K_ : n_ * n_ * K_),
        P_im(diagonal_ ? 0 : n_ * n_ * K_), log_weights(log_weights_, log_weights_ + K_) {
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t a = 0; a < n; ++a) {
        c_re[a * K + i] = centers[2 * (i * n + a)];
        c_im[a * K + i] = centers[2 * (i * n + a) + 1];
        if (diagonal) {
          P_re[a * K + i] = precisions[i * n + a];
          continue;
        }
        for (int64_t c = 0; c < n; ++c) {
          P_re[(a * n + c) * K + i] = precisions[2 * ((i * n + a) * n + c)];
          P_im[(a * n + c) * K + i] = precisions[2 * ((i * n + a) * n + c) + 1];
        }
      }
    }
  }
};

// Per-thread buffers: [n][K] complex arrays d = z - c, y = P d, Hy = H y (then H (y - ybar)); [K] arrays p, e and
// the weights p (e - ebar).
template <typename T>
struct Scratch {
  std::vector<T> d_re, d_im, y_re, y_im, Hy_re, Hy_im, p, e, t_re;
  std::vector<T> H_re, H_im;  // [n, n]
  std::vector<T> ybar, Hybar;  // [2 n]: real parts, then imaginary parts
  Scratch(int64_t K, int64_t n)
      : d_re(n * K), d_im(n * K), y_re(n * K), y_im(n * K), Hy_re(n * K), Hy_im(n * K), p(K), e(K), t_re(K),
        H_re(n * n), H_im(n * n), ybar(2 * n), Hybar(2 * n) {}
};

// out[a][:] = sum_c M[a][c][:] x[c][:] (complex, per component) for the precisions; the diagonal case is elementwise.
template <typename T>
inline void apply_precisions(const Components<T>& comp, const T* x_re, const T* x_im, T* out_re, T* out_im) {
  const int64_t K = comp.K, n = comp.n;
  for (int64_t a = 0; a < n; ++a) {
    T* o_re = out_re + a * K;
    T* o_im = out_im + a * K;
    if (comp.diagonal) {
      const T* P = comp.P_re.data() + a * K;
      const T* xr = x_re + a * K;
      const T* xi = x_im + a * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) {
        o_re[i] = P[i] * xr[i];
        o_im[i] = P[i] * xi[i];
      }
      continue;
    }
    for (int64_t i = 0; i < K; ++i) o_re[i] = o_im[i] = T(0);
    for (int64_t c = 0; c < n; ++c) {
      const T* Pr = comp.P_re.data() + (a * n + c) * K;
      const T* Pi = comp.P_im.data() + (a * n + c) * K;
      const T* xr = x_re + c * K;
      const T* xi = x_im + c * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) {
        o_re[i] += Pr[i] * xr[i] - Pi[i] * xi[i];
        o_im[i] += Pr[i] * xi[i] + Pi[i] * xr[i];
      }
    }
  }
}

// (re, im) = sum_i w_i x_i over the K components of one row of an [n][K] complex array.
template <typename T>
inline void weighted_sum(const T* w, const T* x_re, const T* x_im, int64_t K, T& re, T& im) {
  T sum_re = 0, sum_im = 0;
#pragma omp simd reduction(+ : sum_re, sum_im)
  for (int64_t i = 0; i < K; ++i) {
    sum_re += w[i] * x_re[i];
    sum_im += w[i] * x_im[i];
  }
  re = sum_re;
  im = sum_im;
}

template <typename T>
inline void vjp_point(const Components<T>& comp, const T* z, const T* grad_G, T inv_T, T* out, Scratch<T>& s) {
  const int64_t K = comp.K, n = comp.n;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t c = 0; c < n; ++c) {
      s.H_re[a * n + c] = T(0.5) * (grad_G[2 * (a * n + c)] + grad_G[2 * (c * n + a)]);
      s.H_im[a * n + c] = T(0.5) * (grad_G[2 * (a * n + c) + 1] - grad_G[2 * (c * n + a) + 1]);
    }
  }
  // y_i = P_i (z - c_i); scores log pi_i + u_i / T with u_i = Re (z - c_i)^H y_i; p = softmax.
  for (int64_t a = 0; a < n; ++a) {
    const T zr = z[2 * a], zi = z[2 * a + 1];
    const T* cr = comp.c_re.data() + a * K;
    const T* ci = comp.c_im.data() + a * K;
    T* dr = s.d_re.data() + a * K;
    T* di = s.d_im.data() + a * K;
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) {
      dr[i] = zr - cr[i];
      di[i] = zi - ci[i];
    }
  }
  apply_precisions(comp, s.d_re.data(), s.d_im.data(), s.y_re.data(), s.y_im.data());
  T* p = s.p.data();
  for (int64_t i = 0; i < K; ++i) p[i] = T(0);
  for (int64_t a = 0; a < n; ++a) {
    const T* dr = s.d_re.data() + a * K;
    const T* di = s.d_im.data() + a * K;
    const T* yr = s.y_re.data() + a * K;
    const T* yi = s.y_im.data() + a * K;
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) p[i] += dr[i] * yr[i] + di[i] * yi[i];
  }
  T max_score = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < K; ++i) {
    p[i] = comp.log_weights[i] + p[i] * inv_T;
    max_score = std::max(max_score, p[i]);
  }
  double total = 0;
  for (int64_t i = 0; i < K; ++i) {
    p[i] = std::exp(p[i] - max_score);
    total += p[i];
  }
  const T inv_total = static_cast<T>(1.0 / total);
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) p[i] *= inv_total;
  // From here on y_i means y_i - y_r, r the component of largest weight. v is the same for any shift (e_i moves by a
  // constant, which e_i - ebar removes, and sum_i p_i (e_i - ebar) = 0), but with a sharp softmax the unshifted sums
  // cancel catastrophically (float32 lost a third of the gradient at T = 0.01); the forward kernel shifts alike.
  int64_t dominant = 0;
  for (int64_t i = 1; i < K; ++i) dominant = p[i] > p[dominant] ? i : dominant;
  for (int64_t a = 0; a < n; ++a) {
    T* yr = s.y_re.data() + a * K;
    T* yi = s.y_im.data() + a * K;
    const T shift_re = yr[dominant], shift_im = yi[dominant];
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) {
      yr[i] -= shift_re;
      yi[i] -= shift_im;
    }
  }
  // ybar = sum_i p_i y_i and H ybar.
  T* ybar = s.ybar.data();
  T* Hybar = s.Hybar.data();
  for (int64_t a = 0; a < n; ++a) {
    weighted_sum(p, s.y_re.data() + a * K, s.y_im.data() + a * K, K, ybar[a], ybar[n + a]);
  }
  for (int64_t a = 0; a < n; ++a) {
    T re = 0, im = 0;
    for (int64_t c = 0; c < n; ++c) {
      re += s.H_re[a * n + c] * ybar[c] - s.H_im[a * n + c] * ybar[n + c];
      im += s.H_re[a * n + c] * ybar[n + c] + s.H_im[a * n + c] * ybar[c];
    }
    Hybar[a] = re;
    Hybar[n + a] = im;
  }
  // Hy_i = H y_i; e_i = Re tr(H P_i) + (y_i^H H y_i - 2 Re (H ybar)^H y_i) / T.
  T* e = s.e.data();
  for (int64_t i = 0; i < K; ++i) e[i] = T(0);
  for (int64_t a = 0; a < n; ++a) {
    T* hr = s.Hy_re.data() + a * K;
    T* hi = s.Hy_im.data() + a * K;
    for (int64_t i = 0; i < K; ++i) hr[i] = hi[i] = T(0);
    for (int64_t c = 0; c < n; ++c) {
      const T Hr = s.H_re[a * n + c], Hi = s.H_im[a * n + c];
      const T* yr = s.y_re.data() + c * K;
      const T* yi = s.y_im.data() + c * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) {
        hr[i] += Hr * yr[i] - Hi * yi[i];
        hi[i] += Hr * yi[i] + Hi * yr[i];
      }
      // Re tr(H P_i) = sum_ac Re(H_ac conj(P_i,ac)) (P_i Hermitian); diagonal: sum_a Re H_aa P_i,a.
      if (comp.diagonal) {
        if (c != a) continue;
        const T* P = comp.P_re.data() + a * K;
#pragma omp simd
        for (int64_t i = 0; i < K; ++i) e[i] += Hr * P[i];
      } else {
        const T* Pr = comp.P_re.data() + (a * n + c) * K;
        const T* Pi = comp.P_im.data() + (a * n + c) * K;
#pragma omp simd
        for (int64_t i = 0; i < K; ++i) e[i] += Hr * Pr[i] + Hi * Pi[i];
      }
    }
    const T* yr = s.y_re.data() + a * K;
    const T* yi = s.y_im.data() + a * K;
    const T cross_r = 2 * Hybar[a], cross_i = 2 * Hybar[n + a];
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) {
      e[i] += (yr[i] * (hr[i] - cross_r) + yi[i] * (hi[i] - cross_i)) * inv_T;
      hr[i] -= Hybar[a];  // from here on H (y_i - ybar)
      hi[i] -= Hybar[n + a];
    }
  }
  T e_mean = 0;
#pragma omp simd reduction(+ : e_mean)
  for (int64_t i = 0; i < K; ++i) e_mean += p[i] * e[i];
  // v = (2/T) [ sum_i p_i (e_i - ebar) y_i + sum_i p_i P_i H (y_i - ybar) ]; the second sum reuses y's buffers.
  for (int64_t i = 0; i < K; ++i) s.t_re[i] = p[i] * (e[i] - e_mean);
  for (int64_t a = 0; a < n; ++a) {
    weighted_sum(s.t_re.data(), s.y_re.data() + a * K, s.y_im.data() + a * K, K, out[2 * a], out[2 * a + 1]);
  }
  apply_precisions(comp, s.Hy_re.data(), s.Hy_im.data(), s.y_re.data(), s.y_im.data());
  for (int64_t a = 0; a < n; ++a) {
    T re, im;
    weighted_sum(p, s.y_re.data() + a * K, s.y_im.data() + a * K, K, re, im);
    out[2 * a] = 2 * inv_T * (out[2 * a] + re);
    out[2 * a + 1] = 2 * inv_T * (out[2 * a + 1] + im);
  }
}

// The same code compiled for 16-, 32- and 64-byte vectors (simd.h); the entry point picks the CPU's widest.
template <typename T>
void vjp_point_16(const Components<T>& comp, const T* z, const T* grad_G, T inv_T, T* out, Scratch<T>& s) {
  vjp_point(comp, z, grad_G, inv_T, out, s);
}
template <typename T>
PYGEO_TARGET_32 void vjp_point_32(const Components<T>& comp, const T* z, const T* grad_G, T inv_T, T* out,
                                  Scratch<T>& s) {
  vjp_point(comp, z, grad_G, inv_T, out, s);
}
template <typename T>
PYGEO_TARGET_64 void vjp_point_64(const Components<T>& comp, const T* z, const T* grad_G, T inv_T, T* out,
                                  Scratch<T>& s) {
  vjp_point(comp, z, grad_G, inv_T, out, s);
}

}  // namespace

template <typename T>
void lse_kahler_metric_vjp_cpu(const T* z, const T* centers, const T* precisions, const T* log_weights,
                               double temperature, bool diagonal, const T* grad_G, T* out, int64_t B, int64_t K,
                               int64_t n) {
  // z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] | [K, n] (diagonal), log_weights [K],
  // grad_G [B, n, n, 2] -> out [B, n, 2]
  check_nonnegative(B, "B");
  check_positive(K, "K");
  check_positive(n, "n");
  PYGEO_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0");
  const T inv_T = static_cast<T>(1.0 / temperature);
  const Components<T> comp(centers, precisions, log_weights, diagonal, K, n);
  const int bytes = simd_bytes();
  const auto point = bytes >= 64 ? vjp_point_64<T> : bytes >= 32 ? vjp_point_32<T> : vjp_point_16<T>;
#pragma omp parallel
  {
    Scratch<T> scratch(K, n);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) point(comp, z + 2 * b * n, grad_G + 2 * b * n * n, inv_T, out + 2 * b * n, scratch);
  }
}

template void lse_kahler_metric_vjp_cpu<float>(const float*, const float*, const float*, const float*, double, bool,
                                               const float*, float*, int64_t, int64_t, int64_t);
template void lse_kahler_metric_vjp_cpu<double>(const double*, const double*, const double*, const double*, double,
                                                bool, const double*, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo

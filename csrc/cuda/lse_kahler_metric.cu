// Hermitian metric of the log-sum-exp Kahler potential on the GPU (MATH.md section 5), mirroring
// csrc/cpu/lse_kahler_metric.cpp: one block per point, the K components streamed one at a time with an online softmax.
// Per component: threads i < n form d_i = z_i - c_ki and y_i = (P_k d)_i in shared memory; every thread then forms the
// same score (so the running max, rescale and weight agree without another barrier) and updates the upper-triangle
// entries (i, j) it owns of sum w P_k and sum w (y - r)(y - r)^H, around the shift r of the CPU kernel (the y of the
// component with the largest score so far; the sums move to it exactly when the maximum moves, which every thread sees
// at the same component). Complex values are (real, imaginary) pairs (torch.view_as_real).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/upper_pairs.cuh"

namespace pygeo {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxPairsPerThread = 16;  // n(n+1)/2 <= 4096 covers n <= 90
constexpr int kMaxN = 90;

template <typename T>
__device__ inline T negligible_as_zero(T x);  // exp(x) for x <= 0; 0 below the denormal range (cf. the CPU kernel)
template <>
__device__ inline float negligible_as_zero<float>(float x) { return x < -57.0f ? 0.0f : expf(x); }
template <>
__device__ inline double negligible_as_zero<double>(double x) { return x < -678.0 ? 0.0 : exp(x); }

template <typename T>
__global__ void lse_kahler_metric_kernel(const T* __restrict__ z,            // [B, n, 2]
                                         const T* __restrict__ centers,      // [K, n, 2]
                                         const T* __restrict__ precisions,   // [K, n, n, 2] or [K, n] (diagonal)
                                         const T* __restrict__ log_weights,  // [K]
                                         T inv_T, bool diagonal,
                                         T* __restrict__ G,  // [B, n, n, 2]
                                         int64_t K, int n) {
  __shared__ T d_re[kMaxN], d_im[kMaxN], y_re[kMaxN], y_im[kMaxN], u_part[kMaxN];
  __shared__ T r_re[kMaxN], r_im[kMaxN], m_re[kMaxN], m_im[kMaxN];  // the shift r, and m = sum w (y - r)
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t nn = static_cast<int64_t>(n) * n;

  int pair_i[kMaxPairsPerThread], pair_j[kMaxPairsPerThread];
  T S_re[kMaxPairsPerThread], S_im[kMaxPairsPerThread], A_re[kMaxPairsPerThread], A_im[kMaxPairsPerThread];
  const int n_mine = upper_pairs_of_thread(n, pair_i, pair_j, kMaxPairsPerThread);
  for (int q = 0; q < n_mine; ++q) S_re[q] = S_im[q] = A_re[q] = A_im[q] = T(0);
  const T z_re_mine = tid < n ? z[2 * (b * n + tid)] : T(0);
  const T z_im_mine = tid < n ? z[2 * (b * n + tid) + 1] : T(0);
  if (tid < n) r_re[tid] = r_im[tid] = m_re[tid] = m_im[tid] = T(0);  // visible after the loop's first barrier
  T running_max = -INFINITY, total = 0;

  for (int64_t k = 0; k < K; ++k) {
    if (tid < n) {
      d_re[tid] = z_re_mine - centers[2 * (k * n + tid)];
      d_im[tid] = z_im_mine - centers[2 * (k * n + tid) + 1];
    }
    __syncthreads();
    if (tid < n) {
      T acc_re = 0, acc_im = 0;
      if (diagonal) {
        const T p = precisions[k * n + tid];
        acc_re = p * d_re[tid];
        acc_im = p * d_im[tid];
      } else {
        const T* row = precisions + 2 * (k * nn + static_cast<int64_t>(tid) * n);
        for (int j = 0; j < n; ++j) {
          const T p_re = row[2 * j], p_im = row[2 * j + 1];
          acc_re += p_re * d_re[j] - p_im * d_im[j];
          acc_im += p_re * d_im[j] + p_im * d_re[j];
        }
      }
      y_re[tid] = acc_re;
      y_im[tid] = acc_im;
      u_part[tid] = d_re[tid] * acc_re + d_im[tid] * acc_im;
    }
    __syncthreads();
    T u = 0;
    for (int i = 0; i < n; ++i) u += u_part[i];  // every thread sums in the same order: identical scores
    const T score = log_weights[k] + u * inv_T;
    T rescale = 1;
    if (score > running_max) {  // the same branch in every thread: y_k becomes the shift
      // S' = S - m d^H - d m^H + W d d^H with d = y_k - r, (a b^H)_ij = a_i conj(b_j); then m' = m - W d, r' = y_k.
      for (int q = 0; q < n_mine; ++q) {
        const int i = pair_i[q], j = pair_j[q];
        const T di_re = y_re[i] - r_re[i], di_im = y_im[i] - r_im[i];
        const T dj_re = y_re[j] - r_re[j], dj_im = y_im[j] - r_im[j];
        const T wd_re = total * dj_re - m_re[j], wd_im = total * dj_im - m_im[j];
        S_re[q] += di_re * wd_re + di_im * wd_im - (m_re[i] * dj_re + m_im[i] * dj_im);
        S_im[q] += di_im * wd_re - di_re * wd_im - (m_im[i] * dj_re - m_re[i] * dj_im);
      }
      __syncthreads();  // every read of the old m and r is done
      if (tid < n) {
        m_re[tid] -= total * (y_re[tid] - r_re[tid]);
        m_im[tid] -= total * (y_im[tid] - r_im[tid]);
        r_re[tid] = y_re[tid];
        r_im[tid] = y_im[tid];
      }
      __syncthreads();
      rescale = negligible_as_zero<T>(running_max - score);
      running_max = score;
    }
    const T w = negligible_as_zero<T>(score - running_max);
    total = total * rescale + w;
    if (tid < n) {  // only thread tid writes m[tid]; others read it after the loop's last barrier
      m_re[tid] = m_re[tid] * rescale + w * (y_re[tid] - r_re[tid]);
      m_im[tid] = m_im[tid] * rescale + w * (y_im[tid] - r_im[tid]);
    }
    for (int q = 0; q < n_mine; ++q) {
      const int i = pair_i[q], j = pair_j[q];
      const T ei_re = y_re[i] - r_re[i], ei_im = y_im[i] - r_im[i];
      const T ej_re = y_re[j] - r_re[j], ej_im = y_im[j] - r_im[j];
      S_re[q] = S_re[q] * rescale + w * (ei_re * ej_re + ei_im * ej_im);
      S_im[q] = S_im[q] * rescale + w * (ei_im * ej_re - ei_re * ej_im);
      if (diagonal) {
        A_re[q] = A_re[q] * rescale + (i == j ? w * precisions[k * n + i] : T(0));
      } else {
        const T* P = precisions + 2 * (k * nn + static_cast<int64_t>(i) * n + j);
        A_re[q] = A_re[q] * rescale + w * P[0];
        A_im[q] = A_im[q] * rescale + w * P[1];
      }
    }
    __syncthreads();  // d, y and u_part are overwritten by the next component
  }

  const T inv_total = T(1) / total;
  if (tid < n) {  // the mean of y - r, shared for the final covariance
    d_re[tid] = m_re[tid] * inv_total;
    d_im[tid] = m_im[tid] * inv_total;
  }
  __syncthreads();
  T* Gb = G + 2 * b * nn;
  for (int q = 0; q < n_mine; ++q) {
    const int i = pair_i[q], j = pair_j[q];
    const T cov_re = S_re[q] * inv_total - (d_re[i] * d_re[j] + d_im[i] * d_im[j]);
    const T cov_im = S_im[q] * inv_total - (d_im[i] * d_re[j] - d_re[i] * d_im[j]);
    const T g_re = A_re[q] * inv_total + cov_re * inv_T;
    const T g_im = i == j ? T(0) : A_im[q] * inv_total + cov_im * inv_T;  // Hermitian: real diagonal
    Gb[2 * (i * n + j)] = g_re;
    Gb[2 * (i * n + j) + 1] = g_im;
    Gb[2 * (j * n + i)] = g_re;
    Gb[2 * (j * n + i) + 1] = -g_im;
  }
}

}  // namespace

template <typename T>
void lse_kahler_metric_cuda(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature,
                            bool diagonal, T* G, int64_t B, int64_t K, int64_t n, std::uintptr_t stream) {
  if (n <= 0 || n > kMaxN)
    throw std::invalid_argument("pygeo._C: lse_kahler_metric_cuda supports 1 <= n <= 90, got n=" + std::to_string(n));
  if (K <= 0) throw std::invalid_argument("pygeo._C: K must be positive, got " + std::to_string(K));
  if (!(temperature > 0)) throw std::invalid_argument("pygeo._C: temperature must be > 0");
  if (B == 0) return;
  lse_kahler_metric_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      z, centers, precisions, log_weights, static_cast<T>(1.0 / temperature), diagonal, G, K, static_cast<int>(n));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pygeo._C: lse_kahler_metric_cuda launch failed: ") + cudaGetErrorString(err));
}

template void lse_kahler_metric_cuda<float>(const float*, const float*, const float*, const float*, double, bool, float*,
                                            int64_t, int64_t, int64_t, std::uintptr_t);
template void lse_kahler_metric_cuda<double>(const double*, const double*, const double*, const double*, double, bool,
                                             double*, int64_t, int64_t, int64_t, std::uintptr_t);

}  // namespace pygeo

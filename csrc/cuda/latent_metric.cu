// The Chadebec-Allassonniere latent metric on the GPU; same arguments and outputs as csrc/cpu/latent_metric.cpp
// (scaled G_s = exp(-s) G, the log scale s, scaled dG_s; and the vjp v = sum_ij A_ij dG_s[k, i, j]).
// One block per point (and, for dG, per derivative index k): the block's threads take one centroid each per tile of
// kThreads centroids (quadratic form, exponent), the tile maximum updates the running log scale (online-softmax
// rescaling), and each thread then accumulates a few of the d*d (or d) output entries over the tile.
// Limits: d <= 64 (per-thread registers), precision entries per point dd <= kThreads * kMaxColsPerThread.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pygeo {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxD = 64;
constexpr int kMaxColsPerThread = 16;  // dd <= 4096: full precisions up to d = 64

template <typename T>
__device__ T block_max(T value, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] = fmax(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();
  return result;
}

template <typename T>
__device__ T block_sum(T value, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();
  return result;
}

// Exponent e = -(z - c_i)^T M_i (z - c_i) / rho^2 of centroid i; y = M_i (z - c_i) into y[0..d) when y is given.
template <typename T>
__device__ T exponent(const T* z, const T* c, const T* P, bool full, int64_t i, int d, T inv_rho2, T* y) {
  T diff[kMaxD];
  for (int k = 0; k < d; ++k) diff[k] = z[k] - c[i * d + k];
  T q = 0;
  if (full) {
    const T* M = P + i * d * d;
    for (int k = 0; k < d; ++k) {
      T yk = 0;
      for (int l = 0; l < d; ++l) yk += M[k * d + l] * diff[l];
      if (y) y[k] = yk;
      q += yk * diff[k];
    }
  } else {
    const T* m = P + i * d;
    for (int k = 0; k < d; ++k) {
      const T yk = m[k] * diff[k];
      if (y) y[k] = yk;
      q += yk * diff[k];
    }
  }
  return -q * inv_rho2;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ z,  // [B, d]
                               const T* __restrict__ c,  // [N, d]
                               const T* __restrict__ P,  // [N, dd]
                               bool full, T lam, T tau, T inv_rho2,
                               T* __restrict__ G_s,    // [B, dd]
                               T* __restrict__ scale,  // [B]
                               T* __restrict__ dG_s,   // [B, d, dd] or nullptr
                               int64_t N, int d) {
  __shared__ T z_s[kMaxD];
  __shared__ T w_s[kThreads];
  __shared__ T yk_s[kThreads];
  __shared__ T scratch[kThreads];
  const int64_t b = blockIdx.x;
  const int k = blockIdx.y;  // derivative index (0 when dG_s is null)
  const int dd = full ? d * d : d;
  const int tid = threadIdx.x;
  for (int j = tid; j < d; j += blockDim.x) z_s[j] = z[b * d + j];
  __syncthreads();
  T norm2 = 0;
  for (int j = 0; j < d; ++j) norm2 += z_s[j] * z_s[j];
  const T e0 = -tau * norm2;
  T running = lam > 0 ? e0 : -INFINITY;
  T acc[kMaxColsPerThread], dacc[kMaxColsPerThread];
  for (int q = 0; q < kMaxColsPerThread; ++q) acc[q] = dacc[q] = 0;
  T y[kMaxD];
  for (int64_t i0 = 0; i0 < N; i0 += kThreads) {
    const int64_t i = i0 + tid;
    T e = -INFINITY, yk = 0;
    if (i < N) {
      e = exponent(z_s, c, P, full, i, d, inv_rho2, dG_s ? y : static_cast<T*>(nullptr));
      if (dG_s) yk = y[k];
    }
    const T tile_max = block_max(e, scratch);
    if (tile_max > running) {  // rescale what was summed under the old maximum
      const T factor = exp(running - tile_max);
      for (int q = 0; q < kMaxColsPerThread; ++q) {
        acc[q] *= factor;
        dacc[q] *= factor;
      }
      running = tile_max;
    }
    w_s[tid] = i < N ? exp(e - running) : T(0);
    yk_s[tid] = yk;
    __syncthreads();
    const int tile = static_cast<int>(N - i0 < kThreads ? N - i0 : kThreads);
    for (int q = 0; q < kMaxColsPerThread; ++q) {
      const int jl = tid + q * kThreads;
      if (jl >= dd) break;
      T sum = 0, dsum = 0;
      for (int t = 0; t < tile; ++t) {
        const T m = P[(i0 + t) * dd + jl];
        sum += w_s[t] * m;
        if (dG_s) dsum += w_s[t] * yk_s[t] * m;
      }
      acc[q] += sum;
      dacc[q] += dsum;
    }
    __syncthreads();
  }
  const T prior = lam > 0 ? lam * exp(e0 - running) : T(0);
  for (int q = 0; q < kMaxColsPerThread; ++q) {
    const int jl = tid + q * kThreads;
    if (jl >= dd) break;
    const bool on_diagonal = full ? (jl / d == jl % d) : true;
    if (k == 0) G_s[b * dd + jl] = acc[q] + (on_diagonal ? prior : T(0));
    if (dG_s) {
      const T prior_k = T(-2) * tau * z_s[k] * prior;
      dG_s[(b * d + k) * dd + jl] = T(-2) * inv_rho2 * dacc[q] + (on_diagonal ? prior_k : T(0));
    }
  }
  if (k == 0 && tid == 0) scale[b] = running;
}

template <typename T>
__global__ void vjp_kernel(const T* __restrict__ z, const T* __restrict__ c, const T* __restrict__ P, bool full, T lam,
                           T tau, T inv_rho2,
                           const T* __restrict__ A,      // [B, dd]
                           const T* __restrict__ scale,  // [B]
                           T* __restrict__ v,            // [B, d]
                           int64_t N, int d) {
  extern __shared__ unsigned char shared_raw[];
  T* A_s = reinterpret_cast<T*>(shared_raw);  // [dd]
  __shared__ T z_s[kMaxD];
  __shared__ T scratch[kThreads];
  const int64_t b = blockIdx.x;
  const int dd = full ? d * d : d;
  const int tid = threadIdx.x;
  for (int j = tid; j < d; j += blockDim.x) z_s[j] = z[b * d + j];
  for (int j = tid; j < dd; j += blockDim.x) A_s[j] = A[b * dd + j];
  __syncthreads();
  const T s = scale[b];
  T partial[kMaxD];
  for (int k = 0; k < d; ++k) partial[k] = 0;
  T y[kMaxD];
  for (int64_t i = tid; i < N; i += blockDim.x) {
    const T e = exponent(z_s, c, P, full, i, d, inv_rho2, y);
    T inner = 0;  // <A, M_i>
    for (int jl = 0; jl < dd; ++jl) inner += A_s[jl] * P[i * dd + jl];
    const T coef = T(-2) * inv_rho2 * exp(e - s) * inner;
    for (int k = 0; k < d; ++k) partial[k] += coef * y[k];
  }
  T norm2 = 0, trace = 0;
  for (int k = 0; k < d; ++k) {
    norm2 += z_s[k] * z_s[k];
    trace += full ? A_s[k * d + k] : A_s[k];
  }
  const T prior = lam > 0 ? lam * exp(-tau * norm2 - s) : T(0);
  for (int k = 0; k < d; ++k) {
    const T total = block_sum(partial[k], scratch);
    if (tid == 0) v[b * d + k] = total + T(-2) * tau * prior * trace * z_s[k];
  }
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("pygeo._C: ") + name + " launch failed: " + cudaGetErrorString(err));
}

void check_sizes(int64_t B, int64_t N, int64_t d, bool full, double rho) {
  if (B < 0 || N <= 0 || d <= 0 || rho <= 0)
    throw std::invalid_argument("pygeo._C: latent_metric needs B >= 0, N >= 1, d >= 1, rho > 0");
  if (d > kMaxD || (full ? d * d : d) > kThreads * kMaxColsPerThread)
    throw std::invalid_argument("pygeo._C: latent_metric CUDA kernels support d <= 64, got d=" + std::to_string(d));
}

}  // namespace

template <typename T>
void latent_metric_forward_cuda(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                                double rho, T* G_s, T* scale, T* dG_s, int64_t B, int64_t N, int64_t d,
                                std::uintptr_t stream) {
  check_sizes(B, N, d, full, rho);
  if (B == 0) return;
  const dim3 grid(static_cast<unsigned>(B), dG_s ? static_cast<unsigned>(d) : 1u);
  forward_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      z, centroids, precisions, full, T(lam), T(tau), T(1.0 / (rho * rho)), G_s, scale, dG_s, N, static_cast<int>(d));
  check_launch("latent_metric_forward_cuda");
}

template <typename T>
void latent_metric_vjp_cuda(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                            double rho, const T* A, const T* scale, T* v, int64_t B, int64_t N, int64_t d,
                            std::uintptr_t stream) {
  check_sizes(B, N, d, full, rho);
  if (B == 0) return;
  const size_t shared = static_cast<size_t>(full ? d * d : d) * sizeof(T);
  vjp_kernel<T><<<static_cast<unsigned>(B), kThreads, shared, reinterpret_cast<cudaStream_t>(stream)>>>(
      z, centroids, precisions, full, T(lam), T(tau), T(1.0 / (rho * rho)), A, scale, v, N, static_cast<int>(d));
  check_launch("latent_metric_vjp_cuda");
}

template void latent_metric_forward_cuda<float>(const float*, const float*, const float*, bool, double, double, double,
                                                float*, float*, float*, int64_t, int64_t, int64_t, std::uintptr_t);
template void latent_metric_forward_cuda<double>(const double*, const double*, const double*, bool, double, double,
                                                 double, double*, double*, double*, int64_t, int64_t, int64_t,
                                                 std::uintptr_t);
template void latent_metric_vjp_cuda<float>(const float*, const float*, const float*, bool, double, double, double,
                                            const float*, const float*, float*, int64_t, int64_t, int64_t,
                                            std::uintptr_t);
template void latent_metric_vjp_cuda<double>(const double*, const double*, const double*, bool, double, double, double,
                                             const double*, const double*, double*, int64_t, int64_t, int64_t,
                                             std::uintptr_t);

}  // namespace pygeo

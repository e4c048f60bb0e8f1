// Christoffel symbols of the second kind on the GPU: one block per point. The block factorises the symmetrised G
// cooperatively (right-looking Cholesky in shared memory), then each thread solves for one lower-index pair (i <= j).
// Same argument layout and semantics as csrc/cpu/christoffel.cpp.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pygeo {

namespace {

constexpr int kThreads = 128;
constexpr int kMaxDim = 64;  // per-thread solve vector lives in registers / local memory

template <typename T>
__device__ __forceinline__ T sym_dG(const T* dGb, int d, int k, int a, int c) {
  const int dd = d * d;
  return T(0.5) * (dGb[k * dd + a * d + c] + dGb[k * dd + c * d + a]);
}

template <typename T>
__global__ void christoffel_kernel(const T* __restrict__ G,   // [B, d, d]
                                   const T* __restrict__ dG,  // [B, d, d, d]
                                   T* __restrict__ Gamma,     // [B, d, d, d]
                                   int32_t* __restrict__ failed,  // [B]
                                   int d) {
  extern __shared__ unsigned char shared_raw[];
  T* A = reinterpret_cast<T*>(shared_raw);  // [d, d]: symmetrised G, overwritten by its lower Cholesky factor
  __shared__ int not_positive;
  const int64_t b = blockIdx.x;
  const int dd = d * d;
  const T* Gb = G + b * dd;
  const T* dGb = dG + b * static_cast<int64_t>(dd) * d;
  T* out = Gamma + b * static_cast<int64_t>(dd) * d;
  if (threadIdx.x == 0) not_positive = 0;
  for (int e = threadIdx.x; e < dd; e += blockDim.x) {
    const int i = e / d, j = e - (e / d) * d;
    A[e] = T(0.5) * (Gb[i * d + j] + Gb[j * d + i]);
  }
  __syncthreads();
  for (int j = 0; j < d; ++j) {
    if (threadIdx.x == 0) {
      const T pivot = A[j * d + j];
      if (!(pivot > T(0))) not_positive = 1;
      A[j * d + j] = pivot > T(0) ? sqrt(pivot) : T(1);
    }
    __syncthreads();
    const T diag = A[j * d + j];
    for (int i = j + 1 + threadIdx.x; i < d; i += blockDim.x) A[i * d + j] /= diag;
    __syncthreads();
    // Trailing update of the lower triangle: A[i][k] -= L[i][j] L[k][j] for j < k <= i.
    const int trailing = d - j - 1;
    for (int e = threadIdx.x; e < trailing * trailing; e += blockDim.x) {
      const int i = j + 1 + e / trailing, k = j + 1 + e % trailing;
      if (k <= i) A[i * d + k] -= A[i * d + j] * A[k * d + j];
    }
    __syncthreads();
  }
  if (not_positive) {
    if (threadIdx.x == 0) failed[b] = 1;
    for (int e = threadIdx.x; e < dd * d; e += blockDim.x) out[e] = static_cast<T>(CUDART_NAN);
    return;
  }
  if (threadIdx.x == 0) failed[b] = 0;
  const int n_pairs = d * (d + 1) / 2;
  T x[kMaxDim];
  for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) {
    int i = 0, remaining = p;
    while (remaining >= d - i) {
      remaining -= d - i;
      ++i;
    }
    const int j = i + remaining;
    // x = L^{-T} L^{-1} T[:, i, j], T[l,i,j] = dG[i,l,j] + dG[j,l,i] - dG[l,i,j]
    for (int l = 0; l < d; ++l) {
      T s = sym_dG(dGb, d, i, l, j) + sym_dG(dGb, d, j, l, i) - sym_dG(dGb, d, l, i, j);
      for (int m = 0; m < l; ++m) s -= A[l * d + m] * x[m];
      x[l] = s / A[l * d + l];
    }
    for (int l = d - 1; l >= 0; --l) {
      T s = x[l];
      for (int m = l + 1; m < d; ++m) s -= A[m * d + l] * x[m];
      x[l] = s / A[l * d + l];
    }
    for (int k = 0; k < d; ++k) {
      const T value = T(0.5) * x[k];
      out[k * dd + i * d + j] = value;
      out[k * dd + j * d + i] = value;
    }
  }
}

}  // namespace

template <typename T>
void christoffel_cuda(const T* G, const T* dG, T* Gamma, int32_t* failed, int64_t B, int64_t d, std::uintptr_t stream) {
  if (d <= 0 || d > kMaxDim)
    throw std::invalid_argument("pygeo._C: christoffel_cuda supports 1 <= d <= 64, got d=" + std::to_string(d));
  if (B < 0) throw std::invalid_argument("pygeo._C: B must be non-negative, got " + std::to_string(B));
  if (B == 0) return;
  const size_t shared = static_cast<size_t>(d * d) * sizeof(T);
  christoffel_kernel<T><<<static_cast<unsigned>(B), kThreads, shared, reinterpret_cast<cudaStream_t>(stream)>>>(
      G, dG, Gamma, failed, static_cast<int>(d));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pygeo._C: christoffel_cuda launch failed: ") + cudaGetErrorString(err));
}

template void christoffel_cuda<float>(const float*, const float*, float*, int32_t*, int64_t, int64_t, std::uintptr_t);
template void christoffel_cuda<double>(const double*, const double*, double*, int32_t*, int64_t, int64_t, std::uintptr_t);

}  // namespace pygeo

// G = J^T diag(w) J on the GPU: one block per batch item, J streamed through shared memory in row tiles,
// each thread accumulating a few upper-triangle entries. Same argument layout as csrc/cpu/jtj.cpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/upper_pairs.cuh"

namespace pygeo {

namespace {

constexpr int kRowsPerTile = 32;
constexpr int kThreads = 256;
constexpr int kMaxPairsPerThread = 16;  // d(d+1)/2 <= 256 * 16 = 4096 covers d <= 90

template <typename T>
__global__ void jtj_kernel(const T* __restrict__ J,  // [B, D, d]
                           const T* __restrict__ w,  // [B, D], [D] or nullptr
                           int64_t w_batch_stride,
                           T* __restrict__ G,  // [B, d, d]
                           int64_t D, int d) {
  extern __shared__ unsigned char shared_raw[];
  T* tile = reinterpret_cast<T*>(shared_raw);  // [kRowsPerTile, d], rows pre-scaled by w
  T* tile_unscaled = tile + kRowsPerTile * d;  // [kRowsPerTile, d]
  const int64_t b = blockIdx.x;
  const T* Jb = J + b * D * d;
  const T* wb = w ? w + b * w_batch_stride : nullptr;

  // This thread's upper-triangle entries (i, j), mapped once.
  int pair_i[kMaxPairsPerThread], pair_j[kMaxPairsPerThread];
  T acc[kMaxPairsPerThread];
  const int n_mine = upper_pairs_of_thread(d, pair_i, pair_j, kMaxPairsPerThread);
  for (int q = 0; q < n_mine; ++q) acc[q] = T(0);

  for (int64_t r0 = 0; r0 < D; r0 += kRowsPerTile) {
    const int rows = static_cast<int>(D - r0 < kRowsPerTile ? D - r0 : kRowsPerTile);
    for (int e = threadIdx.x; e < rows * d; e += blockDim.x) {
      const int r = e / d;
      const T v = Jb[(r0 + r) * d + (e - r * d)];
      tile_unscaled[e] = v;
      tile[e] = wb ? v * wb[r0 + r] : v;
    }
    __syncthreads();
    for (int q = 0; q < n_mine; ++q) {
      T s = acc[q];
      for (int r = 0; r < rows; ++r) s += tile[r * d + pair_i[q]] * tile_unscaled[r * d + pair_j[q]];
      acc[q] = s;
    }
    __syncthreads();
  }
  T* Gb = G + b * static_cast<int64_t>(d) * d;
  for (int q = 0; q < n_mine; ++q) {
    Gb[pair_i[q] * d + pair_j[q]] = acc[q];
    Gb[pair_j[q] * d + pair_i[q]] = acc[q];
  }
}

}  // namespace

template <typename T>
void jtj_cuda(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d,
              std::uintptr_t stream) {
  if (d <= 0 || d * (d + 1) / 2 > kThreads * kMaxPairsPerThread)
    throw std::invalid_argument("pygeo._C: jtj_cuda supports 1 <= d <= 90, got d=" + std::to_string(d));
  if (B == 0) return;
  const size_t shared = 2 * kRowsPerTile * d * sizeof(T);
  jtj_kernel<T><<<static_cast<unsigned>(B), kThreads, shared, reinterpret_cast<cudaStream_t>(stream)>>>(
      J, w, w_batch_stride, G, D, static_cast<int>(d));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("pygeo._C: jtj_cuda launch failed: ") + cudaGetErrorString(err));
}

template void jtj_cuda<float>(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, std::uintptr_t);
template void jtj_cuda<double>(const double*, const double*, int64_t, double*, int64_t, int64_t, int64_t, std::uintptr_t);

}  // namespace pygeo

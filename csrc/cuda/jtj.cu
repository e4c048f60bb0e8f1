// G = J^T diag(w) J on the GPU: one block per batch item, J streamed through shared memory in row tiles,
// each thread accumulating a few upper-triangle entries. Same argument layout as csrc/cpu/jtj.cpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
  const int n_pairs = d * (d + 1) / 2;

  // Map the flat pair index p to (i, j) with i <= j, once.
  int pair_i[kMaxPairsPerThread], pair_j[kMaxPairsPerThread];
  T acc[kMaxPairsPerThread];
  int n_mine = 0;
  for (int p = threadIdx.x; p < n_pairs && n_mine < kMaxPairsPerThread; p += blockDim.x) {
    int i = 0, remaining = p;
    while (remaining >= d - i) {
      remaining -= d - i;
      ++i;
    }
    pair_i[n_mine] = i;
    pair_j[n_mine] = i + remaining;
    acc[n_mine] = T(0);
    ++n_mine;
  }

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

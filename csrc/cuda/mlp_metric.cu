// Fused MLP pullback / Fisher metric G = J^T diag(w) J on the GPU; same arguments as csrc/cpu/mlp_metric.cpp plus the
// stream. Hidden layers run as shared-memory tiled GEMMs (primal with a(h) and a'(h), then tangents scaled by a'(h));
// the last layer, the big one, is one block per point that forms tiles of its output columns (primal and tangent
// rows) in shared memory and reduces them into the d x d Gram at once, so the [B, D, d] Jacobian is never written.
// Scratch (hidden activations, slopes and tangents: O(B d n_l), never O(B d D)) comes from cudaMallocAsync.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/upper_pairs.cuh"

namespace pygeo {

namespace {

constexpr int kTile = 16;             // hidden-layer GEMM tile (kTile x kTile threads)
constexpr int kGramThreads = 256;     // threads of a last-layer block
constexpr int kColumnsPerTile = 32;   // last-layer output columns per shared-memory tile
constexpr int kMaxPairsPerThread = 16;  // d (d + 1) / 2 <= 256 * 16 covers d <= 90

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

// value = a(h), slope = a'(h); codes and parameters as in pygeo/reference/mlp_metric.py.
template <typename T>
__device__ __forceinline__ void activate(int code, T p0, T p1, T h, T& value, T& slope) {
  switch (code) {
    case 1:
      value = h > T(0) ? h : T(0);
      slope = h > T(0) ? T(1) : T(0);
      break;
    case 2:
      value = h > T(0) ? h : p0 * h;
      slope = h > T(0) ? T(1) : p0;
      break;
    case 3:
      if (h > T(0)) {
        value = h;
        slope = T(1);
      } else {
        value = p0 * expm1(h);
        slope = value + p0;
      }
      break;
    case 4: {
      const T s = sigmoid(h);
      value = h * s;
      slope = s * (T(1) + h * sigmoid(-h));  // 1 - s cancels where s -> 1 (as csrc/cpu/mlp_metric.cpp)
      break;
    }
    case 5: {
      const T scaled = p0 * h;
      if (scaled > p1) {
        value = h;
        slope = T(1);
      } else {
        value = log1p(exp(scaled)) / p0;
        slope = sigmoid(scaled);
      }
      break;
    }
    case 6: {
      value = tanh(h);
      slope = T(4) * sigmoid(T(2) * h) * sigmoid(T(-2) * h);  // 1 - t^2 without the cancellation
      break;
    }
    case 7: {
      const T s = sigmoid(h);
      value = s;
      slope = s * sigmoid(-h);
      break;
    }
    default:
      value = h;
      slope = T(1);
  }
}

// (X W^T)[row, col] for the block's kTile x kTile output tile, X [rows, K] and W [N, K] row-major, staged through shared
// memory tile by tile along K. Every thread of the block must call it (it synchronises).
template <typename T>
__device__ T tile_product(const T* __restrict__ X, const T* __restrict__ W, int64_t rows, int64_t K, int64_t N) {
  __shared__ T x_tile[kTile][kTile + 1];
  __shared__ T w_tile[kTile][kTile + 1];
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t w_row = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  T acc = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    x_tile[threadIdx.y][threadIdx.x] = (row < rows && k0 + threadIdx.x < K) ? X[row * K + k0 + threadIdx.x] : T(0);
    w_tile[threadIdx.y][threadIdx.x] = (w_row < N && k0 + threadIdx.x < K) ? W[w_row * K + k0 + threadIdx.x] : T(0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc += x_tile[threadIdx.y][k] * w_tile[threadIdx.x][k];
    __syncthreads();
  }
  return acc;
}

// Hidden layer, primal rows: h = A W^T + b [B, N], out = a(h), slope = a'(h).
template <typename T>
__global__ void primal_layer_kernel(const T* __restrict__ A,  // [B, K]
                                    const T* __restrict__ W,  // [N, K]
                                    const T* __restrict__ bias,  // [N]
                                    T* __restrict__ out,  // [B, N]
                                    T* __restrict__ slope,  // [B, N]
                                    int64_t B, int64_t K, int64_t N, int code, T p0, T p1) {
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const T acc = tile_product(A, W, B, K, N);
  if (row < B && col < N) {
    T value, s;
    activate(code, p0, p1, acc + bias[col], value, s);
    out[row * N + col] = value;
    slope[row * N + col] = s;
  }
}

// Hidden layer, tangent rows (row = point * d + k): out = (T_in W^T) * slope[point]; T_in = identity when null.
template <typename T>
__global__ void tangent_layer_kernel(const T* __restrict__ tangents,  // [B * d, K] or null (identity, K = d)
                                     const T* __restrict__ W,  // [N, K]
                                     const T* __restrict__ slope,  // [B, N]
                                     T* __restrict__ out,  // [B * d, N]
                                     int64_t rows, int64_t d, int64_t K, int64_t N) {
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  T acc = T(0);
  if (tangents == nullptr) {  // the same branch for the whole grid
    if (row < rows && col < N) acc = W[col * K + row % d];
  } else {
    acc = tile_product(tangents, W, rows, K, N);
  }
  if (row < rows && col < N) out[row * N + col] = acc * slope[(row / d) * N + col];
}

// Last layer and Gram, one block per point. tile rows: 0 = primal h, 1..d = tangent rows of J (before a'(h)).
template <typename T>
__global__ void last_layer_gram_kernel(const T* __restrict__ A,  // [B, K] primal input of the last layer
                                       const T* __restrict__ tangents,  // [B * d, K] or null (identity)
                                       const T* __restrict__ W,  // [D, K]
                                       const T* __restrict__ bias,  // [D]
                                       const T* __restrict__ output_weight,  // [D] or null
                                       T* __restrict__ G,  // [B, d, d]
                                       int64_t d, int64_t K, int64_t D, int code, T p0, T p1, bool bernoulli, T eps,
                                       bool upper_triangular) {
  extern __shared__ unsigned char shared_raw[];
  T* tile = reinterpret_cast<T*>(shared_raw);  // [d + 1, kColumnsPerTile]
  T* scale = tile + (d + 1) * kColumnsPerTile;  // [kColumnsPerTile]: w a'(h)^2
  const int64_t b = blockIdx.x;
  const T* a = A + b * K;
  const T* t = tangents ? tangents + b * d * K : nullptr;

  int pair_i[kMaxPairsPerThread], pair_j[kMaxPairsPerThread];
  T acc[kMaxPairsPerThread];
  const int n_mine = upper_pairs_of_thread(static_cast<int>(d), pair_i, pair_j, kMaxPairsPerThread);
  for (int q = 0; q < n_mine; ++q) acc[q] = T(0);

  for (int64_t o0 = 0; o0 < D; o0 += kColumnsPerTile) {
    const int columns = static_cast<int>(D - o0 < kColumnsPerTile ? D - o0 : kColumnsPerTile);
    for (int e = threadIdx.x; e < (d + 1) * kColumnsPerTile; e += blockDim.x) {
      const int r = e / kColumnsPerTile, c = e % kColumnsPerTile;
      T sum = T(0);
      if (c < columns) {
        const int64_t o = o0 + c;
        const T* w = W + o * K;
        if (r > 0 && t == nullptr) {
          sum = w[r - 1];
        } else {
          const T* x = r == 0 ? a : t + (r - 1) * K;
          // An upper-triangular last layer has zeros left of its diagonal (tangent rows only need the skip).
          const int64_t k_begin = (upper_triangular && r > 0) ? o : 0;
          for (int64_t k = k_begin; k < K; ++k) sum += x[k] * w[k];
        }
      }
      tile[r * kColumnsPerTile + c] = sum;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < kColumnsPerTile; c += blockDim.x) {
      T s = T(0);
      if (c < columns) {
        const int64_t o = o0 + c;
        T value, slope;
        activate(code, p0, p1, tile[c] + bias[o], value, slope);
        T w = output_weight ? output_weight[o] : T(1);
        if (bernoulli) {
          const T prob = fmin(fmax(sigmoid(value), eps), T(1) - eps);
          w = prob * (T(1) - prob);
        }
        s = w * slope * slope;
      }
      scale[c] = s;
    }
    __syncthreads();
    for (int q = 0; q < n_mine; ++q) {
      const T* yi = tile + (1 + pair_i[q]) * kColumnsPerTile;
      const T* yj = tile + (1 + pair_j[q]) * kColumnsPerTile;
      T sum = acc[q];
      for (int c = 0; c < columns; ++c) sum += scale[c] * yi[c] * yj[c];
      acc[q] = sum;
    }
    __syncthreads();
  }
  T* Gb = G + b * d * d;
  for (int q = 0; q < n_mine; ++q) {
    Gb[pair_i[q] * d + pair_j[q]] = acc[q];
    Gb[pair_j[q] * d + pair_i[q]] = acc[q];
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("pygeo._C: ") + what + " failed: " + cudaGetErrorString(err));
}

}  // namespace

template <typename T>
void mlp_metric_cuda(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases,
                     const std::vector<int64_t>& widths, const std::vector<int64_t>& codes,
                     const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps,
                     bool last_upper_triangular, T* G, int64_t B, std::uintptr_t stream_handle) {
  const int64_t L = static_cast<int64_t>(weights.size());
  if (L <= 0 || static_cast<int64_t>(biases.size()) != L || static_cast<int64_t>(codes.size()) != L ||
      static_cast<int64_t>(params.size()) != 2 * L || static_cast<int64_t>(widths.size()) != L + 1)
    throw std::invalid_argument("pygeo._C: mlp_metric: weights, biases, codes (L each), params (2 L) and widths (L + 1) disagree");
  for (int64_t l = 0; l <= L; ++l)
    if (widths[l] <= 0) throw std::invalid_argument("pygeo._C: mlp_metric: layer widths must be positive");
  for (int64_t l = 0; l < L; ++l)
    if (codes[l] < 0 || codes[l] > 7) throw std::invalid_argument("pygeo._C: mlp_metric: unknown activation code");
  const int64_t d = widths[0];
  if (d * (d + 1) / 2 > static_cast<int64_t>(kGramThreads) * kMaxPairsPerThread)
    throw std::invalid_argument("pygeo._C: mlp_metric_cuda supports 1 <= d <= 90, got d=" + std::to_string(d));
  if (B < 0) throw std::invalid_argument("pygeo._C: mlp_metric: B must be non-negative");
  if (B == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);

  // Scratch for the hidden layers: activations and slopes [B, n], tangents [B d, n], twice (input and output).
  int64_t widest = 1;
  for (int64_t l = 1; l < L; ++l) widest = widths[l] > widest ? widths[l] : widest;
  T* scratch = nullptr;
  const size_t per_buffer = static_cast<size_t>(B * widest), tangent_buffer = static_cast<size_t>(B * d * widest);
  if (L > 1) {
    const cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), (3 * per_buffer + 2 * tangent_buffer) * sizeof(T), stream);
    if (err != cudaSuccess) throw std::runtime_error(std::string("pygeo._C: mlp_metric_cuda scratch allocation failed: ") + cudaGetErrorString(err));
  }
  T* activations[2] = {scratch, scratch + per_buffer};
  T* slope = scratch + 2 * per_buffer;
  T* tangent_buffers[2] = {scratch + 3 * per_buffer, scratch + 3 * per_buffer + tangent_buffer};

  const T* a = z;
  const T* t = nullptr;  // identity before the first layer
  for (int64_t l = 0; l + 1 < L; ++l) {
    const int64_t K = widths[l], N = widths[l + 1];
    T* a_next = activations[l % 2];
    T* t_next = tangent_buffers[l % 2];
    const dim3 threads(kTile, kTile);
    primal_layer_kernel<T><<<dim3(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>((B + kTile - 1) / kTile)), threads, 0, stream>>>(
        a, weights[l], biases[l], a_next, slope, B, K, N, static_cast<int>(codes[l]), static_cast<T>(params[2 * l]),
        static_cast<T>(params[2 * l + 1]));
    check_launch("mlp_metric_cuda primal layer");
    tangent_layer_kernel<T><<<dim3(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>((B * d + kTile - 1) / kTile)), threads, 0, stream>>>(
        t, weights[l], slope, t_next, B * d, d, K, N);
    check_launch("mlp_metric_cuda tangent layer");
    a = a_next;
    t = t_next;
  }
  const int64_t last = L - 1;
  const size_t shared = static_cast<size_t>((d + 2) * kColumnsPerTile) * sizeof(T);
  last_layer_gram_kernel<T><<<static_cast<unsigned>(B), kGramThreads, shared, stream>>>(
      a, t, weights[last], biases[last], output_weight, G, d, widths[last], widths[L], static_cast<int>(codes[last]),
      static_cast<T>(params[2 * last]), static_cast<T>(params[2 * last + 1]), bernoulli, static_cast<T>(eps),
      last_upper_triangular);
  check_launch("mlp_metric_cuda last layer");
  if (scratch) cudaFreeAsync(scratch, stream);
}

template void mlp_metric_cuda<float>(const float*, const std::vector<const float*>&, const std::vector<const float*>&,
                                     const std::vector<int64_t>&, const std::vector<int64_t>&,
                                     const std::vector<double>&, const float*, bool, double, bool, float*, int64_t,
                                     std::uintptr_t);
template void mlp_metric_cuda<double>(const double*, const std::vector<const double*>&,
                                      const std::vector<const double*>&, const std::vector<int64_t>&,
                                      const std::vector<int64_t>&, const std::vector<double>&, const double*, bool,
                                      double, bool, double*, int64_t, std::uintptr_t);

}  // namespace pygeo

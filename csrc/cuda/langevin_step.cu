// One Riemannian Langevin (MMALA) step for B chains on the GPU: a chain per thread, running the same per-chain code as
// the C++ kernel (common/langevin_step_chain.h). Scratch (C, and C^-1, G^-1 with dG) lives in thread-local arrays for
// d <= 8 and in a global workspace otherwise, reused over chunks of chains. Same argument layout as
// csrc/cpu/langevin_step.cpp. Compile-checked; the Triton kernel is the default GPU backend.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/langevin_step_chain.h"

namespace pygeo {

namespace {

constexpr int kThreads = 128;
constexpr int kLocalMaxDim = 8;
constexpr int64_t kChunkChains = 16384;  // chains per launch when scratch is in global memory

template <typename T, bool kLocalScratch>
__global__ void langevin_step_kernel(const T* __restrict__ z,         // [B, d]
                                     const T* __restrict__ G,         // [B, d, d]
                                     const T* __restrict__ grad,      // [B, d]
                                     const T* __restrict__ h,         // [B]
                                     const T* __restrict__ noise,     // [B, d]
                                     const T* __restrict__ dG,        // [B, d, d, d] or nullptr
                                     const T* __restrict__ div_Ginv,  // [B, d] or nullptr
                                     const T* __restrict__ target,    // [B, d] or nullptr
                                     T* __restrict__ proposal,        // [B, d]
                                     T* __restrict__ mean,            // [B, d]
                                     T* __restrict__ half_log_det,    // [B]
                                     T* __restrict__ log_q_proposal,  // [B]
                                     T* __restrict__ log_q_target,    // [B] or nullptr
                                     uint8_t* __restrict__ ok,        // [B]
                                     T* __restrict__ workspace,       // [chunk, scratch] when !kLocalScratch
                                     int64_t first, int64_t count, int d) {
  const int64_t local = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (local >= count) return;
  const int64_t b = first + local;
  T local_scratch[kLocalScratch ? 3 * kLocalMaxDim * kLocalMaxDim + 3 * kLocalMaxDim : 1];
  T* scratch = kLocalScratch ? local_scratch : workspace + local * langevin_chain_scratch_size(d, dG != nullptr);
  const int64_t v = b * d, m = b * d * d;
  ok[b] = langevin_step_chain<T>(z + v, G + m, grad + v, h[b], noise + v, dG ? dG + m * d : nullptr,
                                 div_Ginv ? div_Ginv + v : nullptr, target ? target + v : nullptr, proposal + v,
                                 mean + v, half_log_det + b, log_q_proposal + b,
                                 log_q_target ? log_q_target + b : nullptr, scratch, d)
              ? 1 : 0;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("pygeo._C: langevin_step_cuda ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

template <typename T>
void langevin_step_cuda(const T* z, const T* G, const T* grad, const T* h, const T* noise, const T* dG,
                        const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det, T* log_q_proposal,
                        T* log_q_target, uint8_t* ok, int64_t B, int64_t d, std::uintptr_t stream_handle) {
  if (d <= 0 || d > 4096) throw std::invalid_argument("pygeo._C: langevin_step_cuda needs 1 <= d <= 4096, got d=" + std::to_string(d));
  if (B < 0) throw std::invalid_argument("pygeo._C: B must be non-negative");
  if (dG && div_Ginv) throw std::invalid_argument("pygeo._C: langevin_step: give dG or div_Ginv, not both");
  if ((target == nullptr) != (log_q_target == nullptr))
    throw std::invalid_argument("pygeo._C: langevin_step: target and log_q_target go together");
  if (B == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int n = static_cast<int>(d);
  if (d <= kLocalMaxDim) {
    const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
    langevin_step_kernel<T, true><<<blocks, kThreads, 0, stream>>>(z, G, grad, h, noise, dG, div_Ginv, target, proposal, mean,
                                                                    half_log_det, log_q_proposal, log_q_target, ok, nullptr, 0, B, n);
    check_cuda(cudaGetLastError(), "launch failed");
    return;
  }
  const int64_t chunk = B < kChunkChains ? B : kChunkChains;
  T* workspace = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&workspace),
                             static_cast<size_t>(chunk * langevin_chain_scratch_size(n, dG != nullptr)) * sizeof(T), stream),
             "workspace allocation failed");
  for (int64_t first = 0; first < B; first += chunk) {
    const int64_t count = B - first < chunk ? B - first : chunk;
    const unsigned blocks = static_cast<unsigned>((count + kThreads - 1) / kThreads);
    langevin_step_kernel<T, false><<<blocks, kThreads, 0, stream>>>(z, G, grad, h, noise, dG, div_Ginv, target, proposal, mean,
                                                                     half_log_det, log_q_proposal, log_q_target, ok, workspace,
                                                                     first, count, n);
    check_cuda(cudaGetLastError(), "launch failed");
  }
  check_cuda(cudaFreeAsync(workspace, stream), "workspace release failed");
}

template void langevin_step_cuda<float>(const float*, const float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, float*, float*, float*, float*,
                                        float*, uint8_t*, int64_t, int64_t, std::uintptr_t);
template void langevin_step_cuda<double>(const double*, const double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, double*, double*, double*,
                                         double*, double*, uint8_t*, int64_t, int64_t, std::uintptr_t);

}  // namespace pygeo

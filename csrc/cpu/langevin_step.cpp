// One Riemannian Langevin (MMALA) step for B chains, OpenMP-parallel over chains (MATH.md section 4). Per chain:
// Cholesky G = C C^T (jitter retries, else a flagged chain), drift, proposal and the proposal log-densities.
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/langevin_step_chain.h"
#include "common/parallel.h"

namespace pygeo {

// z, grad, noise, div_Ginv, target, proposal, mean: [B, d]; G: [B, d, d]; dG: [B, d, d, d] (dG[b, k, i, j] =
// dG_ij / dz_k); h, half_log_det, log_q_proposal, log_q_target: [B]; ok: [B] (bool bytes). dG, div_Ginv, target and
// log_q_target may be null (target and log_q_target together).
template <typename T>
void langevin_step_cpu(const T* z, const T* G, const T* grad, const T* h, const T* noise, const T* dG,
                       const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det, T* log_q_proposal,
                       T* log_q_target, uint8_t* ok, int64_t B, int64_t d) {
  check_nonnegative(B, "B");
  check_positive(d, "d");
  PYGEO_CHECK(d <= 4096, "langevin_step: d must be at most 4096");
  PYGEO_CHECK(!(dG && div_Ginv), "langevin_step: give dG or div_Ginv, not both");
  PYGEO_CHECK((target == nullptr) == (log_q_target == nullptr), "langevin_step: target and log_q_target go together");
  const int n = static_cast<int>(d);
  // Small batches run on one thread: waking a team costs more than the work (and much more on a loaded machine).
  const bool worth_threads = B * (d * d * d + 8 * d) > 65536;
#pragma omp parallel if (worth_threads)
  {
    // Per-thread scratch, allocated once: C, and Cinv + Ginv when dG is given, plus 3 vectors.
    std::vector<T> scratch(langevin_chain_scratch_size(n, dG != nullptr));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t v = b * d, m = b * d * d;
      ok[b] = langevin_step_chain<T>(z + v, G + m, grad + v, h[b], noise + v, dG ? dG + m * d : nullptr,
                                     div_Ginv ? div_Ginv + v : nullptr, target ? target + v : nullptr, proposal + v,
                                     mean + v, half_log_det + b, log_q_proposal + b,
                                     log_q_target ? log_q_target + b : nullptr, scratch.data(), n)
                  ? 1 : 0;
    }
  }
}

template void langevin_step_cpu<float>(const float*, const float*, const float*, const float*, const float*,
                                       const float*, const float*, const float*, float*, float*, float*, float*,
                                       float*, uint8_t*, int64_t, int64_t);
template void langevin_step_cpu<double>(const double*, const double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, double*, double*, double*,
                                        double*, double*, uint8_t*, int64_t, int64_t);

}  // namespace pygeo

// One chain of the Riemannian Langevin step, shared by the C++ kernel (a chain per loop iteration) and the CUDA kernel
// (a chain per thread). MATH.md section 4; the PyTorch reference is pygeo/reference/langevin_step.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/small_cholesky.h"

namespace pygeo {

// Scratch elements one chain needs: C [d, d], Cinv and Ginv [d, d] with dG, and three vectors [d].
PYGEO_HOST_DEVICE int64_t langevin_chain_scratch_size(int d, bool has_dG) {
  return static_cast<int64_t>(d) * d * (has_dG ? 3 : 1) + 3 * static_cast<int64_t>(d);
}

// z, grad, noise, div_Ginv, target, proposal, mean: [d]; G: [d, d]; dG: [d, d, d]; returns false (and writes
// proposal = mean = z, zero log terms) when G is not positive definite even with jitter.
template <typename T>
PYGEO_HOST_DEVICE bool langevin_step_chain(const T* z, const T* G, const T* grad, T h, const T* noise, const T* dG,
                                           const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det,
                                           T* log_q_proposal, T* log_q_target, T* scratch, int d) {
  T* C = scratch;
  T* Cinv = C + d * d;  // only with dG
  T* Ginv = Cinv + d * d;
  T* force = scratch + static_cast<int64_t>(d) * d * (dG ? 3 : 1);
  T* spread = force + d;
  T* work = spread + d;
  T jitter;
  if (!small::cholesky_with_jitter(G, C, d, &jitter)) {
    for (int i = 0; i < d; ++i) {
      proposal[i] = z[i];
      mean[i] = z[i];
    }
    *half_log_det = T(0);
    *log_q_proposal = T(0);
    if (log_q_target) *log_q_target = T(0);
    return false;
  }
  // force = grad - v with v_a = sum_{k, c} dG[k, a, c] Ginv[c, k], so that G^-1 force = G^-1 grad + div(G^-1).
  for (int i = 0; i < d; ++i) force[i] = grad[i];
  if (dG) {
    small::inverse_from_cholesky(C, Cinv, Ginv, d);
    for (int k = 0; k < d; ++k) {
      const T* Ginv_k = Ginv + k * d;  // Ginv[c, k] = Ginv[k, c]
      for (int a = 0; a < d; ++a) {
        const T* dG_ka = dG + (static_cast<int64_t>(k) * d + a) * d;
        T s = T(0);
        for (int c = 0; c < d; ++c) s += dG_ka[c] * Ginv_k[c];
        force[a] -= s;
      }
    }
  }
  small::solve_lower(C, force, d);
  small::solve_lower_transposed(C, force, d);  // force = G^-1 (grad - v)
  T noise_sq = T(0);
  for (int i = 0; i < d; ++i) {
    spread[i] = noise[i];
    noise_sq += noise[i] * noise[i];
  }
  small::solve_lower_transposed(C, spread, d);  // C^-T noise
  const T half_h = T(0.5) * h, root_h = std::sqrt(h);
  for (int i = 0; i < d; ++i) {
    const T drift = force[i] + (div_Ginv ? div_Ginv[i] : T(0));
    const T m = z[i] + half_h * drift;
    mean[i] = m;
    proposal[i] = m + root_h * spread[i];
  }
  T hld = T(0);
  for (int i = 0; i < d; ++i) hld += std::log(C[i * d + i]);
  *half_log_det = hld;
  const T log_norm = T(-0.5) * T(d) * std::log(T(2.0 * 3.14159265358979323846) * h) + hld;
  *log_q_proposal = log_norm - T(0.5) * noise_sq;
  if (target) {
    // (target - z) - (h/2) drift, not target - mean: mean carries an ulp of z, far more than a residual ~ sqrt(h)
    // can take (the MALA reverse move at a small step); target - z is exact where the points are close.
    for (int i = 0; i < d; ++i) spread[i] = (target[i] - z[i]) - half_h * (force[i] + (div_Ginv ? div_Ginv[i] : T(0)));
    *log_q_target = log_norm - T(0.5) * small::quadratic_form(C, spread, work, d) / h;
  }
  return true;
}

}  // namespace pygeo

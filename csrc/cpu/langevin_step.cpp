// One Riemannian Langevin (MMALA) step for B chains, OpenMP-parallel over chains (MATH.md section 4). Per chain:
// Cholesky G = C C^T (jitter retries, else a flagged chain), drift, proposal and the proposal log-densities.
//
// Small matrices do not vectorise along a row, so chains are processed kLanes at a time in a lane-interleaved layout
// (scratch[element * kLanes + lane]): every inner loop runs over the lanes and vectorises. A lane whose G is not
// positive definite on the first try is redone by the scalar per-chain code (common/langevin_step_chain.h), which
// owns the jitter retries; so do the B % kLanes last chains.
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/langevin_step_chain.h"
#include "common/parallel.h"

namespace pygeo {

namespace {

constexpr int kLanes = 8;

template <typename T>
struct StepPointers {
  const T *z, *G, *grad, *h, *noise, *dG, *div_Ginv, *target;  // [B, d], [B, d, d], [B, d], [B], [B, d], [B, d, d, d], [B, d], [B, d]
  T *proposal, *mean, *half_log_det, *log_q_proposal, *log_q_target;  // [B, d], [B, d], [B], [B], [B]
  uint8_t* ok;  // [B]
  int d;
};

int64_t lane_scratch_size(int d, bool has_dG) {
  return (static_cast<int64_t>(d) * d * (has_dG ? 3 : 1) + 4 * static_cast<int64_t>(d) + 4) * kLanes;
}

template <typename T>
void scalar_chain(const StepPointers<T>& p, int64_t b, T* scratch) {
  const int d = p.d;
  const int64_t v = b * d, m = b * d * d;
  p.ok[b] = langevin_step_chain<T>(p.z + v, p.G + m, p.grad + v, p.h[b], p.noise + v, p.dG ? p.dG + m * d : nullptr,
                                   p.div_Ginv ? p.div_Ginv + v : nullptr, p.target ? p.target + v : nullptr,
                                   p.proposal + v, p.mean + v, p.half_log_det + b, p.log_q_proposal + b,
                                   p.log_q_target ? p.log_q_target + b : nullptr, scratch, d)
                ? 1 : 0;
}

// Chains b0 .. b0 + kLanes - 1, all lanes at once; lanes that need jitter are redone by scalar_chain.
template <typename T>
void lane_block(const StepPointers<T>& p, int64_t b0, T* scratch, T* chain_scratch) {
  constexpr int W = kLanes;
  const int d = p.d;
  const int64_t dd = static_cast<int64_t>(d) * d;
  T* C = scratch;  // [d, d, W], lower triangle
  T* Cinv = C + dd * W;  // with dG only
  T* Ginv = Cinv + dd * W;
  T* force = scratch + dd * W * (p.dG ? 3 : 1);  // [d, W]
  T* spread = force + d * W;
  T* residual = spread + d * W;
  T* work = residual + d * W;
  T* inv_diag = work + d * W;  // reused per column: [W]
  T pivot_ok[W], hld[W], noise_sq[W], h[W];
  auto at = [](int64_t element) { return element * kLanes; };

  for (int l = 0; l < W; ++l) {
    const T* Gl = p.G + (b0 + l) * dd;
    for (int i = 0; i < d; ++i)
      for (int j = 0; j <= i; ++j) C[at(i * d + j) + l] = Gl[i * d + j];
    pivot_ok[l] = T(1);
    hld[l] = T(0);
    h[l] = p.h[b0 + l];
  }
  // Cholesky, column by column (same order of operations as small::cholesky). Failed lanes continue on a pivot of 1.
  for (int j = 0; j < d; ++j) {
    for (int i = j; i < d; ++i) {
      T* Cij = C + at(i * d + j);
      for (int k = 0; k < j; ++k) {
        const T* Cik = C + at(i * d + k);
        const T* Cjk = C + at(j * d + k);
#pragma omp simd
        for (int l = 0; l < W; ++l) Cij[l] -= Cik[l] * Cjk[l];
      }
      if (i == j) {
#pragma omp simd
        for (int l = 0; l < W; ++l) {
          const bool positive = Cij[l] > T(0);
          pivot_ok[l] = positive ? pivot_ok[l] : T(0);
          const T root = std::sqrt(positive ? Cij[l] : T(1));
          Cij[l] = root;
          inv_diag[l] = T(1) / root;
          hld[l] += std::log(root);
        }
      } else {
#pragma omp simd
        for (int l = 0; l < W; ++l) Cij[l] *= inv_diag[l];
      }
    }
  }
  for (int l = 0; l < W; ++l) {
    const T* grad = p.grad + (b0 + l) * d;
    for (int i = 0; i < d; ++i) force[at(i) + l] = grad[i];
  }
  if (p.dG) {
    // Cinv row by row, then Ginv = Cinv^T Cinv (lower triangle, mirrored), as small::inverse_from_cholesky.
    for (int i = 0; i < d; ++i) {
      for (int j = 0; j <= i; ++j)
        for (int l = 0; l < W; ++l) Cinv[at(i * d + j) + l] = i == j ? T(1) : T(0);
      for (int k = 0; k < i; ++k) {
        const T* Cik = C + at(i * d + k);
        for (int j = 0; j <= k; ++j) {
          T* row = Cinv + at(i * d + j);
          const T* row_k = Cinv + at(k * d + j);
#pragma omp simd
          for (int l = 0; l < W; ++l) row[l] -= Cik[l] * row_k[l];
        }
      }
      const T* Cii = C + at(i * d + i);
      for (int j = 0; j <= i; ++j) {
        T* row = Cinv + at(i * d + j);
#pragma omp simd
        for (int l = 0; l < W; ++l) row[l] /= Cii[l];
      }
    }
    for (int i = 0; i < d; ++i)
      for (int j = 0; j <= i; ++j) {
        T* Gij = Ginv + at(i * d + j);
        for (int l = 0; l < W; ++l) Gij[l] = T(0);
        for (int k = i; k < d; ++k) {
          const T* a = Cinv + at(k * d + i);
          const T* b = Cinv + at(k * d + j);
#pragma omp simd
          for (int l = 0; l < W; ++l) Gij[l] += a[l] * b[l];
        }
        if (i != j)
          for (int l = 0; l < W; ++l) Ginv[at(j * d + i) + l] = Gij[l];
      }
    // force -= v, v_a = sum_{k, c} dG[k, a, c] Ginv[k, c]; dG is read contiguously, lane by lane.
    for (int l = 0; l < W; ++l) {
      const T* dG = p.dG + (b0 + l) * dd * d;
      for (int k = 0; k < d; ++k)
        for (int a = 0; a < d; ++a) {
          const T* row = dG + (static_cast<int64_t>(k) * d + a) * d;
          const T* Ginv_k = Ginv + at(k * d) + l;
          T s = T(0);
          for (int c = 0; c < d; ++c) s += row[c] * Ginv_k[c * W];
          force[at(a) + l] -= s;
        }
    }
  }
  // force <- C^-T C^-1 force, spread <- C^-T noise.
  for (int i = 0; i < d; ++i) {
    T* fi = force + at(i);
    for (int k = 0; k < i; ++k) {
      const T* Cik = C + at(i * d + k);
      const T* fk = force + at(k);
#pragma omp simd
      for (int l = 0; l < W; ++l) fi[l] -= Cik[l] * fk[l];
    }
    const T* Cii = C + at(i * d + i);
#pragma omp simd
    for (int l = 0; l < W; ++l) fi[l] /= Cii[l];
  }
  for (int l = 0; l < W; ++l) {
    const T* noise = p.noise + (b0 + l) * d;
    noise_sq[l] = T(0);
    for (int i = 0; i < d; ++i) {
      spread[at(i) + l] = noise[i];
      noise_sq[l] += noise[i] * noise[i];
    }
  }
  for (int i = d - 1; i >= 0; --i) {
    const T* Cii = C + at(i * d + i);
    T* fi = force + at(i);
    T* si = spread + at(i);
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      fi[l] /= Cii[l];
      si[l] /= Cii[l];
    }
    for (int k = 0; k < i; ++k) {
      const T* Cik = C + at(i * d + k);
      T* fk = force + at(k);
      T* sk = spread + at(k);
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        fk[l] -= Cik[l] * fi[l];
        sk[l] -= Cik[l] * si[l];
      }
    }
  }
  const T log_2pi = std::log(T(2.0 * 3.14159265358979323846));
  for (int l = 0; l < W; ++l) {
    const int64_t b = b0 + l;
    if (pivot_ok[l] == T(0)) continue;
    const T half_h = T(0.5) * h[l], root_h = std::sqrt(h[l]);
    for (int i = 0; i < d; ++i) {
      const T drift = force[at(i) + l] + (p.div_Ginv ? p.div_Ginv[b * d + i] : T(0));
      const T m = p.z[b * d + i] + half_h * drift;
      p.mean[b * d + i] = m;
      p.proposal[b * d + i] = m + root_h * spread[at(i) + l];
      // (target - z) - (h/2) drift, not target - m: m carries an ulp of z, far more than a residual ~ sqrt(h) can
      // take; target - z is exact where the points are close (the MALA reverse move).
      if (p.target) residual[at(i) + l] = (p.target[b * d + i] - p.z[b * d + i]) - half_h * drift;
    }
    const T log_norm = T(-0.5) * T(d) * (log_2pi + std::log(h[l])) + hld[l];
    p.half_log_det[b] = hld[l];
    p.log_q_proposal[b] = log_norm - T(0.5) * noise_sq[l];
    p.ok[b] = 1;
    work[l] = log_norm;
  }
  if (p.target) {  // |C^T r|^2
    T quadratic[W];
    for (int l = 0; l < W; ++l) quadratic[l] = T(0);
    for (int i = 0; i < d; ++i) {
      T t[W];
      for (int l = 0; l < W; ++l) t[l] = T(0);
      for (int k = i; k < d; ++k) {
        const T* Cki = C + at(k * d + i);
        const T* rk = residual + at(k);
#pragma omp simd
        for (int l = 0; l < W; ++l) t[l] += Cki[l] * rk[l];
      }
      for (int l = 0; l < W; ++l) quadratic[l] += t[l] * t[l];
    }
    for (int l = 0; l < W; ++l)
      if (pivot_ok[l] != T(0)) p.log_q_target[b0 + l] = work[l] - T(0.5) * quadratic[l] / h[l];
  }
  for (int l = 0; l < W; ++l)
    if (pivot_ok[l] == T(0)) scalar_chain(p, b0 + l, chain_scratch);
}

}  // namespace

// z, grad, noise, div_Ginv, target, proposal, mean: [B, d]; G: [B, d, d] (lower triangle read); dG: [B, d, d, d]
// (dG[b, k, i, j] = dG_ij / dz_k); h, half_log_det, log_q_proposal, log_q_target: [B]; ok: [B] (bool bytes).
// dG, div_Ginv, target and log_q_target may be null (target and log_q_target together).
template <typename T>
void langevin_step_cpu(const T* z, const T* G, const T* grad, const T* h, const T* noise, const T* dG,
                       const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det, T* log_q_proposal,
                       T* log_q_target, uint8_t* ok, int64_t B, int64_t d) {
  check_nonnegative(B, "B");
  check_positive(d, "d");
  PYGEO_CHECK(d <= 4096, "langevin_step: d must be at most 4096");
  PYGEO_CHECK(!(dG && div_Ginv), "langevin_step: give dG or div_Ginv, not both");
  PYGEO_CHECK((target == nullptr) == (log_q_target == nullptr), "langevin_step: target and log_q_target go together");
  const StepPointers<T> p{z, G, grad, h, noise, dG, div_Ginv, target, proposal, mean, half_log_det, log_q_proposal,
                          log_q_target, ok, static_cast<int>(d)};
  const int64_t blocks = B / kLanes;
  // Small batches run on one thread: waking a team costs more than the work (and much more on a loaded machine).
  const bool worth_threads = B * (d * d * d + 8 * d) > 65536;
#pragma omp parallel if (worth_threads)
  {
    // Per-thread scratch, allocated once.
    std::vector<T> scratch(lane_scratch_size(p.d, dG != nullptr));
    std::vector<T> chain_scratch(langevin_chain_scratch_size(p.d, dG != nullptr));
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) lane_block(p, block * kLanes, scratch.data(), chain_scratch.data());
#pragma omp for schedule(static)
    for (int64_t b = blocks * kLanes; b < B; ++b) scalar_chain(p, b, chain_scratch.data());
  }
}

template void langevin_step_cpu<float>(const float*, const float*, const float*, const float*, const float*,
                                       const float*, const float*, const float*, float*, float*, float*, float*,
                                       float*, uint8_t*, int64_t, int64_t);
template void langevin_step_cpu<double>(const double*, const double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, double*, double*, double*,
                                        double*, double*, uint8_t*, int64_t, int64_t);

}  // namespace pygeo

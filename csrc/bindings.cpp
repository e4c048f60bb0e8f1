// The one pybind11 module pygeo._C. It does not link libtorch: every kernel takes raw data pointers (as integers from
// tensor.data_ptr()), sizes, the dtype name and, for CUDA, the stream handle. The Python ops in pygeo/ops/ validate
// shapes, dtypes, devices and contiguity before calling in; the kernels re-check sizes and throw ValueError.
// Adding an op: declare its cpu (and cuda) entry points below and add one PYGEO_BIND line per backend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::vector arguments (mlp_metric)

#include <cstdint>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "common/parallel.h"

namespace py = pybind11;
using std::uintptr_t;

namespace pygeo {
// --- declarations (definitions in cpu/<op>.cpp and cuda/<op>.cu) ---
template <typename T> void jtj_cpu(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d);
template <typename T> void mlp_metric_cpu(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases, const std::vector<int64_t>& widths, const std::vector<int64_t>& codes, const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps, bool last_upper_triangular, T* G, int64_t B);
template <typename T> void mlp_ensemble_metric_cpu(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases, const std::vector<int64_t>& widths, const std::vector<int64_t>& codes, const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps, bool last_upper_triangular, T* G, int64_t B, int64_t M);
template <typename T> void latent_metric_forward_cpu(const T* z, const T* c, const T* P, bool full, double lam, double tau, double rho, T* G_s, T* scale, T* dG_s, int64_t B, int64_t N, int64_t d);
template <typename T> void latent_metric_vjp_cpu(const T* z, const T* c, const T* P, bool full, double lam, double tau, double rho, const T* A, const T* scale, T* v, int64_t B, int64_t N, int64_t d);
#ifdef PYGEO_WITH_CUDA
template <typename T> void latent_metric_forward_cuda(const T* z, const T* c, const T* P, bool full, double lam, double tau, double rho, T* G_s, T* scale, T* dG_s, int64_t B, int64_t N, int64_t d, uintptr_t stream);
template <typename T> void latent_metric_vjp_cuda(const T* z, const T* c, const T* P, bool full, double lam, double tau, double rho, const T* A, const T* scale, T* v, int64_t B, int64_t N, int64_t d, uintptr_t stream);
#endif
#ifdef PYGEO_WITH_CUDA
template <typename T> void jtj_cuda(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d, uintptr_t stream);
template <typename T> void mlp_metric_cuda(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases, const std::vector<int64_t>& widths, const std::vector<int64_t>& codes, const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps, bool last_upper_triangular, T* G, int64_t B, uintptr_t stream);
#endif
template <typename T> void christoffel_cpu(const T* G, const T* dG, T* Gamma, int32_t* failed, int64_t B, int64_t d);
#ifdef PYGEO_WITH_CUDA
template <typename T> void christoffel_cuda(const T* G, const T* dG, T* Gamma, int32_t* failed, int64_t B, int64_t d, uintptr_t stream);
#endif
template <typename T> void langevin_step_cpu(const T* z, const T* G, const T* grad, const T* h, const T* noise, const T* dG, const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det, T* log_q_proposal, T* log_q_target, uint8_t* ok, int64_t B, int64_t d);
#ifdef PYGEO_WITH_CUDA
template <typename T> void langevin_step_cuda(const T* z, const T* G, const T* grad, const T* h, const T* noise, const T* dG, const T* div_Ginv, const T* target, T* proposal, T* mean, T* half_log_det, T* log_q_proposal, T* log_q_target, uint8_t* ok, int64_t B, int64_t d, uintptr_t stream);
#endif
template <typename T> void lse_kahler_metric_cpu(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature, bool diagonal, T* G, int64_t B, int64_t K, int64_t n);
template <typename T> void lse_kahler_metric_vjp_cpu(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature, bool diagonal, const T* grad_G, T* out, int64_t B, int64_t K, int64_t n);
#ifdef PYGEO_WITH_CUDA
template <typename T> void lse_kahler_metric_cuda(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature, bool diagonal, T* G, int64_t B, int64_t K, int64_t n, uintptr_t stream);
#endif
}  // namespace pygeo

namespace {

py::dict build_info() {
  py::dict info;
#ifdef PYGEO_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef PYGEO_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["max_threads"] = pygeo::max_threads();
  return info;
}

}  // namespace

template <typename T>
std::vector<T*> pointer_list(const std::vector<uintptr_t>& addresses) {  // a list of tensors (one per layer)
  std::vector<T*> pointers;
  for (uintptr_t address : addresses) pointers.push_back(pygeo::as_ptr<T>(address));
  return pointers;
}

#define P(T, x) pygeo::as_ptr<T>(x)
#define CP(T, x) pygeo::as_ptr<const T>(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "pygeo compiled kernels (C++/OpenMP, optional CUDA); call through pygeo.ops, not directly";
  m.def("build_info", &build_info);
  auto nogil = py::call_guard<py::gil_scoped_release>();

  // jtj: J [B, D, d], w [B, D] | [D] | 0 (null), G [B, d, d]
  m.def("jtj_cpu", [](uintptr_t J, uintptr_t w, int64_t ws, uintptr_t G, int64_t B, int64_t D, int64_t d, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::jtj_cpu<scalar_t>(CP(scalar_t, J), CP(scalar_t, w), ws, P(scalar_t, G), B, D, d));
  }, nogil);

  // mlp_metric: z [B, d], weights[l] [n_{l+1}, n_l], biases[l] [n_{l+1}], widths (n_0 = d, ..., n_L = D), codes [L],
  // params [2 L], output_weight [D] | 0 (null), G [B, d, d]
  m.def("mlp_metric_cpu", [](uintptr_t z, std::vector<uintptr_t> weights, std::vector<uintptr_t> biases, std::vector<int64_t> widths, std::vector<int64_t> codes, std::vector<double> params, uintptr_t output_weight, bool bernoulli, double eps, bool last_upper_triangular, uintptr_t G, int64_t B, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::mlp_metric_cpu<scalar_t>(CP(scalar_t, z), pointer_list<const scalar_t>(weights), pointer_list<const scalar_t>(biases), widths, codes, params, CP(scalar_t, output_weight), bernoulli, eps, last_upper_triangular, P(scalar_t, G), B));
  }, nogil);
  // mlp_ensemble_metric: as mlp_metric with M members stacked, weights[l] [M, n_{l+1}, n_l], biases[l] [M, n_{l+1}]
  m.def("mlp_ensemble_metric_cpu", [](uintptr_t z, std::vector<uintptr_t> weights, std::vector<uintptr_t> biases, std::vector<int64_t> widths, std::vector<int64_t> codes, std::vector<double> params, uintptr_t output_weight, bool bernoulli, double eps, bool last_upper_triangular, uintptr_t G, int64_t B, int64_t M, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::mlp_ensemble_metric_cpu<scalar_t>(CP(scalar_t, z), pointer_list<const scalar_t>(weights), pointer_list<const scalar_t>(biases), widths, codes, params, CP(scalar_t, output_weight), bernoulli, eps, last_upper_triangular, P(scalar_t, G), B, M));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("jtj_cuda", [](uintptr_t J, uintptr_t w, int64_t ws, uintptr_t G, int64_t B, int64_t D, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::jtj_cuda<scalar_t>(CP(scalar_t, J), CP(scalar_t, w), ws, P(scalar_t, G), B, D, d, stream));
  }, nogil);
  m.def("mlp_metric_cuda", [](uintptr_t z, std::vector<uintptr_t> weights, std::vector<uintptr_t> biases, std::vector<int64_t> widths, std::vector<int64_t> codes, std::vector<double> params, uintptr_t output_weight, bool bernoulli, double eps, bool last_upper_triangular, uintptr_t G, int64_t B, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::mlp_metric_cuda<scalar_t>(CP(scalar_t, z), pointer_list<const scalar_t>(weights), pointer_list<const scalar_t>(biases), widths, codes, params, CP(scalar_t, output_weight), bernoulli, eps, last_upper_triangular, P(scalar_t, G), B, stream));
  }, nogil);
#endif

  // christoffel: G [B, d, d], dG [B, d, d, d], Gamma [B, d, d, d], failed [B] int32
  m.def("christoffel_cpu", [](uintptr_t G, uintptr_t dG, uintptr_t Gamma, uintptr_t failed, int64_t B, int64_t d, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::christoffel_cpu<scalar_t>(CP(scalar_t, G), CP(scalar_t, dG), P(scalar_t, Gamma), P(int32_t, failed), B, d));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("christoffel_cuda", [](uintptr_t G, uintptr_t dG, uintptr_t Gamma, uintptr_t failed, int64_t B, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::christoffel_cuda<scalar_t>(CP(scalar_t, G), CP(scalar_t, dG), P(scalar_t, Gamma), P(int32_t, failed), B, d, stream));
  }, nogil);
#endif

  // latent_metric: z [B, d], c [N, d], P [N, d] | [N, d, d] (full), G_s [B, d] | [B, d, d], scale [B],
  // dG_s [B, d, d] | [B, d, d, d] | 0 (null); vjp: A [B, d] | [B, d, d], scale [B], v [B, d]
  m.def("latent_metric_forward_cpu", [](uintptr_t z, uintptr_t c, uintptr_t prec, bool full, double lam, double tau, double rho, uintptr_t G, uintptr_t scale, uintptr_t dG, int64_t B, int64_t N, int64_t d, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::latent_metric_forward_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), full, lam, tau, rho, P(scalar_t, G), P(scalar_t, scale), P(scalar_t, dG), B, N, d));
  }, nogil);
  m.def("latent_metric_vjp_cpu", [](uintptr_t z, uintptr_t c, uintptr_t prec, bool full, double lam, double tau, double rho, uintptr_t A, uintptr_t scale, uintptr_t v, int64_t B, int64_t N, int64_t d, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::latent_metric_vjp_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), full, lam, tau, rho, CP(scalar_t, A), CP(scalar_t, scale), P(scalar_t, v), B, N, d));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("latent_metric_forward_cuda", [](uintptr_t z, uintptr_t c, uintptr_t prec, bool full, double lam, double tau, double rho, uintptr_t G, uintptr_t scale, uintptr_t dG, int64_t B, int64_t N, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::latent_metric_forward_cuda<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), full, lam, tau, rho, P(scalar_t, G), P(scalar_t, scale), P(scalar_t, dG), B, N, d, stream));
  }, nogil);
  m.def("latent_metric_vjp_cuda", [](uintptr_t z, uintptr_t c, uintptr_t prec, bool full, double lam, double tau, double rho, uintptr_t A, uintptr_t scale, uintptr_t v, int64_t B, int64_t N, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::latent_metric_vjp_cuda<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), full, lam, tau, rho, CP(scalar_t, A), CP(scalar_t, scale), P(scalar_t, v), B, N, d, stream));
  }, nogil);
#endif

  // langevin_step: z, grad, noise, div_Ginv | 0, target | 0, proposal, mean [B, d]; G [B, d, d]; dG [B, d, d, d] | 0;
  // h, half_log_det, log_q_proposal, log_q_target | 0 [B]; ok [B] bool
  m.def("langevin_step_cpu", [](uintptr_t z, uintptr_t G, uintptr_t grad, uintptr_t h, uintptr_t noise, uintptr_t dG, uintptr_t div, uintptr_t target,
                                uintptr_t proposal, uintptr_t mean, uintptr_t hld, uintptr_t lqp, uintptr_t lqt, uintptr_t ok, int64_t B, int64_t d, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::langevin_step_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, G), CP(scalar_t, grad), CP(scalar_t, h), CP(scalar_t, noise), CP(scalar_t, dG), CP(scalar_t, div), CP(scalar_t, target),
                                                                      P(scalar_t, proposal), P(scalar_t, mean), P(scalar_t, hld), P(scalar_t, lqp), P(scalar_t, lqt), P(uint8_t, ok), B, d));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("langevin_step_cuda", [](uintptr_t z, uintptr_t G, uintptr_t grad, uintptr_t h, uintptr_t noise, uintptr_t dG, uintptr_t div, uintptr_t target,
                                 uintptr_t proposal, uintptr_t mean, uintptr_t hld, uintptr_t lqp, uintptr_t lqt, uintptr_t ok, int64_t B, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::langevin_step_cuda<scalar_t>(CP(scalar_t, z), CP(scalar_t, G), CP(scalar_t, grad), CP(scalar_t, h), CP(scalar_t, noise), CP(scalar_t, dG), CP(scalar_t, div), CP(scalar_t, target),
                                                                       P(scalar_t, proposal), P(scalar_t, mean), P(scalar_t, hld), P(scalar_t, lqp), P(scalar_t, lqt), P(uint8_t, ok), B, d, stream));
  }, nogil);
#endif

  // lse_kahler_metric: z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] | [K, n] (diagonal), log_weights [K], G [B, n, n, 2]
  m.def("lse_kahler_metric_cpu", [](uintptr_t z, uintptr_t c, uintptr_t prec, uintptr_t lw, double T, bool diagonal, uintptr_t G, int64_t B, int64_t K, int64_t n, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::lse_kahler_metric_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), CP(scalar_t, lw), T, diagonal, P(scalar_t, G), B, K, n));
  }, nogil);
  // lse_kahler_metric_vjp: the same inputs and grad_G [B, n, n, 2] -> out [B, n, 2], the first-order gradient in z
  m.def("lse_kahler_metric_vjp_cpu", [](uintptr_t z, uintptr_t c, uintptr_t prec, uintptr_t lw, double T, bool diagonal, uintptr_t grad_G, uintptr_t out, int64_t B, int64_t K, int64_t n, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::lse_kahler_metric_vjp_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), CP(scalar_t, lw), T, diagonal, CP(scalar_t, grad_G), P(scalar_t, out), B, K, n));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("lse_kahler_metric_cuda", [](uintptr_t z, uintptr_t c, uintptr_t prec, uintptr_t lw, double T, bool diagonal, uintptr_t G, int64_t B, int64_t K, int64_t n, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::lse_kahler_metric_cuda<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), CP(scalar_t, lw), T, diagonal, P(scalar_t, G), B, K, n, stream));
  }, nogil);
#endif
}

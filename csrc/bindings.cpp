// The one pybind11 module pygeo._C. It does not link libtorch: every kernel takes raw data pointers (as integers from
// tensor.data_ptr()), sizes, the dtype name and, for CUDA, the stream handle. The Python ops in pygeo/ops/ validate
// shapes, dtypes, devices and contiguity before calling in; the kernels re-check sizes and throw ValueError.
// Adding an op: declare its cpu (and cuda) entry points below and add one PYGEO_BIND line per backend.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/dispatch.h"
#include "common/parallel.h"

namespace py = pybind11;
using std::uintptr_t;

namespace pygeo {
// --- declarations (definitions in cpu/<op>.cpp and cuda/<op>.cu) ---
template <typename T> void jtj_cpu(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d);
#ifdef PYGEO_WITH_CUDA
template <typename T> void jtj_cuda(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d, uintptr_t stream);
#endif
template <typename T> void lse_kahler_metric_cpu(const T* z, const T* centers, const T* precisions, const T* log_weights, double temperature, bool diagonal, T* G, int64_t B, int64_t K, int64_t n);
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
#ifdef PYGEO_WITH_CUDA
  m.def("jtj_cuda", [](uintptr_t J, uintptr_t w, int64_t ws, uintptr_t G, int64_t B, int64_t D, int64_t d, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::jtj_cuda<scalar_t>(CP(scalar_t, J), CP(scalar_t, w), ws, P(scalar_t, G), B, D, d, stream));
  }, nogil);
#endif

  // lse_kahler_metric: z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] | [K, n] (diagonal), log_weights [K], G [B, n, n, 2]
  m.def("lse_kahler_metric_cpu", [](uintptr_t z, uintptr_t c, uintptr_t prec, uintptr_t lw, double T, bool diagonal, uintptr_t G, int64_t B, int64_t K, int64_t n, std::string dtype) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::lse_kahler_metric_cpu<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), CP(scalar_t, lw), T, diagonal, P(scalar_t, G), B, K, n));
  }, nogil);
#ifdef PYGEO_WITH_CUDA
  m.def("lse_kahler_metric_cuda", [](uintptr_t z, uintptr_t c, uintptr_t prec, uintptr_t lw, double T, bool diagonal, uintptr_t G, int64_t B, int64_t K, int64_t n, std::string dtype, uintptr_t stream) {
    PYGEO_DISPATCH_FLOATING(dtype, pygeo::lse_kahler_metric_cuda<scalar_t>(CP(scalar_t, z), CP(scalar_t, c), CP(scalar_t, prec), CP(scalar_t, lw), T, diagonal, P(scalar_t, G), B, K, n, stream));
  }, nogil);
#endif
}

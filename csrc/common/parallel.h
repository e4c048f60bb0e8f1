// OpenMP helpers: kernels parallelise over independent batch items and stay correct without OpenMP.
#pragma once
#include <cstdint>
#ifdef PYGEO_WITH_OPENMP
#include <omp.h>
#endif

namespace pygeo {

inline int max_threads() {
#ifdef PYGEO_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace pygeo

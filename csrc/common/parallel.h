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

// Hot per-item kernels are compiled for AVX-512, AVX2+FMA and baseline x86-64 and the best one is picked at load time
// (GCC function multi-versioning): the wheel stays portable while using the vector width of the machine it runs on.
// Put it on a function without an OpenMP region inside (the outlined region would not inherit the clone's target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PYGEO_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYGEO_SIMD_CLONES
#endif

// SIMD vectors at the CPU's width for the C++ kernels, written with GCC vector extensions so that the same code
// compiles to AVX-512, AVX2 or SSE/NEON. The latent-metric and Kahler kernels run tiles of points, every quantity of
// a tile a vector whose lane l belongs to point l; jtj runs blocks of G a vector wide. The vector width is a template
// parameter (Bytes = 64, 32 or 16); a kernel compiles its per-tile (per-item) function three times, with
// PYGEO_TARGET_64 / PYGEO_TARGET_32 / no attribute, and picks one per call with simd_bytes(). (GCC's target_clones cannot do this: every clone has the same types, and 64-byte vectors on a
// 32-byte target spill.) The attribute goes on the per-tile function, not on the OpenMP loop around it: an outlined
// parallel region does not inherit it. Everything a tile calls must be PYGEO_INLINE, so that it is compiled for the
// tile function's target, and takes vectors by reference (their calling convention differs between targets).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>

#define PYGEO_INLINE inline __attribute__((always_inline))

// GCC notes that a vector returned by value has a target-dependent calling convention; the functions that do so are
// all PYGEO_INLINE, so no call with that convention is ever made.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYGEO_X86_TARGETS 1
#define PYGEO_TARGET_64 __attribute__((target("arch=x86-64-v4")))
#define PYGEO_TARGET_32 __attribute__((target("arch=x86-64-v3")))
#else
#define PYGEO_TARGET_64
#define PYGEO_TARGET_32
#endif

namespace pygeo {

// One SIMD vector of Bytes bytes of T.
template <typename T, int Bytes>
struct Simd {
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int lanes = Bytes / sizeof(T);
};

// The widest vectors this CPU has (64, 32 or 16 bytes), or fewer if the environment variable PYGEO_SIMD_BYTES asks for
// them: the tests run every width on one machine that way.
inline int simd_bytes() {
  int bytes = 16;
#ifdef PYGEO_X86_TARGETS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl")) {
    bytes = 64;  // x86-64-v4
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
    bytes = 32;  // x86-64-v3
  }
#endif
  if (const char* asked = std::getenv("PYGEO_SIMD_BYTES")) bytes = std::min(bytes, std::max(16, std::atoi(asked)));
  return bytes;
}

// A fixed-size array of SIMD vectors on 64-byte boundaries (std::vector does not honour the vectors' alignment).
template <typename V>
class VectorArray {
 public:
  explicit VectorArray(int64_t size)
      : size_(size),
        data_(static_cast<V*>(::operator new(sizeof(V) * std::max<int64_t>(size, 1), std::align_val_t(64)))) {}
  ~VectorArray() { ::operator delete(data_, std::align_val_t(64)); }
  VectorArray(const VectorArray&) = delete;
  VectorArray& operator=(const VectorArray&) = delete;
  V& operator[](int64_t i) { return data_[i]; }
  const V& operator[](int64_t i) const { return data_[i]; }
  V* data() { return data_; }
  const V* data() const { return data_; }
  PYGEO_INLINE void fill(const V& value) { std::fill(data_, data_ + size_, value); }
  PYGEO_INLINE void scale(const V& factor) {
    for (int64_t i = 0; i < size_; ++i) data_[i] *= factor;
  }

 private:
  int64_t size_;
  V* data_;
};

// Weights exp(x) for x <= 0 (scores minus their running maximum), with those below 1e-25 (float) / 1e-290 (double)
// set to exactly 0: they cannot change a sum that holds a weight of 1, and left alone they decay into denormals whose
// arithmetic is ~100x slower.
template <typename T>
constexpr T negligible_below() {
  return (std::numeric_limits<T>::min_exponent - 1) * T(0.6931471805599453) + T(30);  // log of the smallest normal, + 30
}

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  typedef int32_t Int;
  static constexpr int degree = 7;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  static constexpr int32_t magic_bits = 0x4B400000, bias = 127, mantissa_bits = 23;
};
template <>
struct ExpConstants<double> {
  typedef int64_t Int;
  static constexpr int degree = 13;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int64_t magic_bits = 0x4338000000000000LL, bias = 1023, mantissa_bits = 52;
};

// Lane by lane: exp(x) = 2^k exp(r) with k = round(x / log 2) and r = x - k log 2 (log 2 in two parts, so r is exact),
// exp(r) by its Taylor polynomial on |r| <= log(2) / 2: degree 7 for float (error < 5e-9), 13 for double (< 5e-18).
template <typename T, int Bytes>
PYGEO_INLINE typename Simd<T, Bytes>::V exp_weight(const typename Simd<T, Bytes>::V& x) {
  using V = typename Simd<T, Bytes>::V;
  using C = ExpConstants<T>;
  typedef typename C::Int I __attribute__((vector_size(Bytes)));
  const V shifted = x * T(1.4426950408889634) + C::round_magic;  // round(x / log 2) in the low mantissa bits
  const V k = shifted - C::round_magic;
  const V r = (x - k * T(0.693145751953125)) - k * T(1.4286068203094173e-06);  // log 2 = 0.693145751953125 + 1.43e-6
  V p = V{} + T(1);
  for (int i = C::degree; i >= 1; --i) p = p * (r * (T(1) / T(i))) + T(1);  // Horner on 1 + r (1 + r/2 (1 + r/3 ...))
  const I exponent = ((I)shifted - C::magic_bits + C::bias) << C::mantissa_bits;  // the bits of 2^k
  const V result = p * (V)exponent;
  return x < negligible_below<T>() ? V{} + T(0) : result;
}

}  // namespace pygeo

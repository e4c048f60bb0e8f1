// Argument checks shared by every kernel entry point. The Python op validates first (with messages that name the
// argument); these re-checks keep a bad call from C++'s side from ever touching memory out of bounds. A failed check
// throws std::invalid_argument, which pybind11 turns into a Python ValueError.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#define PYGEO_CHECK(cond, msg)                                                       \
  do {                                                                               \
    if (!(cond)) throw std::invalid_argument(std::string("pygeo._C: ") + (msg));    \
  } while (0)

namespace pygeo {

// Pointers cross the Python boundary as integers (tensor.data_ptr()); this turns one back into a typed pointer.
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void check_positive(int64_t value, const char* name) {
  PYGEO_CHECK(value > 0, std::string(name) + " must be positive, got " + std::to_string(value));
}

inline void check_nonnegative(int64_t value, const char* name) {
  PYGEO_CHECK(value >= 0, std::string(name) + " must be non-negative, got " + std::to_string(value));
}

}  // namespace pygeo

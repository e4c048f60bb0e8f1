// Float / double dispatch from the dtype name the Python side passes ("float32" or "float64").
#pragma once
#include <string>
#include "common/checks.h"

// Calls BODY with `scalar_t` bound to float or double.
#define PYGEO_DISPATCH_FLOATING(dtype_name, BODY)                                                   \
  do {                                                                                              \
    if ((dtype_name) == "float32") {                                                                \
      using scalar_t = float;                                                                       \
      BODY;                                                                                         \
    } else if ((dtype_name) == "float64") {                                                         \
      using scalar_t = double;                                                                      \
      BODY;                                                                                         \
    } else {                                                                                        \
      throw std::invalid_argument("pygeo._C: dtype must be float32 or float64, got " + (dtype_name)); \
    }                                                                                               \
  } while (0)

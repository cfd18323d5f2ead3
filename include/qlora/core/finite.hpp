#pragma once
// check_finite: refuse NaN / inf before quantizing. One NaN would silently turn its whole block
// (or row) into garbage, so every quantizer that takes user data checks first.
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/parallel.hpp"

namespace qlora {

// Throws naming `what` and the first non-finite value's index.
inline void check_finite(const float* x, std::size_t n, const std::string& what) {
  bool bad = false;
  parallel_for(n, 4096, 1 << 18, [&](std::size_t b0, std::size_t b1) {
    bool local = false;
    for (std::size_t i = b0; i < b1; ++i) local |= !(std::fabs(x[i]) <= std::numeric_limits<float>::max());
    if (local) bad = true;  // benign: only ever set to true, read after the join
  });
  if (!bad) return;
  for (std::size_t i = 0; i < n; ++i)
    QLORA_CHECK(std::isfinite(x[i]), what, ": value ", i, " is ", x[i], ", expected a finite number");
}

}  // namespace qlora

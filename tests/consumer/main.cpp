// Built by the consumer tests (tests/consumer.cmake) against an installed or vendored qlora:
// includes the umbrella header and checks a result, so both the include path and the headers'
// self-sufficiency are exercised. Exit status 0 means the conversions came out right.
#include "qlora/qlora.hpp"

#include <cstdio>

int main() {
  int errors = 0;
  const qlora::bf16 b = qlora::to_bf16(1.5f);
  if (b.bits != 0x3fc0 || qlora::to_float(b) != 1.5f) {
    std::printf("bf16(1.5f): bits 0x%04x, back %g; expected 0x3fc0, 1.5\n", b.bits, double(qlora::to_float(b)));
    ++errors;
  }
  const qlora::fp16 h = qlora::to_fp16(-2.75f);
  if (h.bits != 0xc180 || qlora::to_float(h) != -2.75f) {
    std::printf("fp16(-2.75f): bits 0x%04x, back %g; expected 0xc180, -2.75\n", h.bits, double(qlora::to_float(h)));
    ++errors;
  }
  std::printf("qlora consumer: %s\n", errors ? "FAILED" : "ok");
  return errors ? 1 : 0;
}

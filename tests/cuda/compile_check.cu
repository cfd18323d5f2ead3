// Compiles the headers that CUDA code shares with the CPU library under nvcc, and checks at run time
// (on a GPU machine) that a kernel reads the same NF4 table. Without a GPU it says so and passes.
#include <cstdio>

#include "qlora/core/half.hpp"
#include "qlora/quant/codebooks.hpp"

// Device code gets the tables through __constant__ copies made from the one host definition
// (namespace-scope constexpr arrays have no device storage of their own).
__constant__ unsigned nf4_bits[16];

__global__ void read_nf4(float* out) { out[threadIdx.x] = __uint_as_float(nf4_bits[threadIdx.x]); }

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device: compile check only (skipped the kernel run)\n");
    return 0;
  }
  float* d = nullptr;
  float h[16];
  if (cudaMemcpyToSymbol(nf4_bits, qlora::codebook::kNF4Bits, sizeof nf4_bits) != cudaSuccess) return 1;
  if (cudaMalloc(&d, sizeof h) != cudaSuccess) return 1;
  read_nf4<<<1, 16>>>(d);
  if (cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) != cudaSuccess) return 1;
  cudaFree(d);
  for (int i = 0; i < 16; ++i)
    if (qlora::float_bits(h[i]) != qlora::codebook::kNF4Bits[i]) {
      std::printf("NF4 code %d differs on the device\n", i);
      return 1;
    }
  std::printf("NF4 table identical on the device\n");
  return 0;
}

// Lab: the large-M 4-bit product as dequantize + cuBLAS, with the dequantization of the NEXT product's
// weight run on a side stream on k SMs while cuBLAS, told to target sm_count - k SMs
// (cublasSetSmCountTarget), multiplies with the weight dequantized one call earlier.
//
// Why: dequantize + cuBLAS is 1.09x cuBLAS bf16 at 14336x4096, M = 4096 on the H100 (dequantizing
// costs 60 µs of a 673 µs product), and slicing the product to overlap the two on a second stream
// without a carve-out found no room on the SMs (docs/performance.md). With k SMs carved out, the
// product loses k / 132 of the tensor cores and the dequantization is hidden, if k SMs can write
// N·K bf16 in the product's time.
//
// Rows (every ratio is the median of 11 rounds timed in alternation with cuBLAS bf16, time_graph_pair):
//   dq_cublas      dequantize (whole GPU) + cuBLAS, the path matmul_4bit takes today
//   carve_k        cuBLAS bf16 alone, targeting sm_count - k SMs (what the carve-out costs)
//   dq_only_k      the side dequantizer alone on k SMs (µs per weight; must fit in the product's time)
//   chain_k        the pipelined chain of 30 products (weights rotated): per product
// Usage: overlap_lab [csv]; OV_SHAPES="14336x4096,4096x4096", OV_M=4096, OV_KS="2,4,8".
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"
#include "qlora/cuda/gemm_bf16.cuh"
#include "qlora/cuda/layout4bit.cuh"
#include "qlora/cuda/matmul4bit.cuh"
#include "qlora/cuda/quantize4bit.cuh"

using namespace qlora;
using benchutil::fill;
using benchutil::fmt;
using benchutil::PairTiming;
using benchutil::report;
using benchutil::time_graph;
using benchutil::time_graph_pair;
using cuda::DeviceBuffer;

namespace {

constexpr int kWarps = 32;  // one 1024-thread block per SM (its shared memory keeps a second off)

// v1: the first side kernel (two units per warp in flight, each unit's absmax loaded after its bytes).
__global__ void __launch_bounds__(kWarps * 32, 1)
    dq_side1_kernel(const std::uint8_t* __restrict__ packed, std::size_t units, std::size_t K,
                    int block_shift, cuda::detail::AbsmaxView am, cuda::detail::Code16Param code,
                    cuda::detail::Code256Param map, __nv_bfloat16* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_code[16];
  __shared__ float s_map[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < 16) s_code[threadIdx.x] = code.v[threadIdx.x];
  if (!am.absmax && threadIdx.x < 256) s_map[threadIdx.x] = map.v[threadIdx.x];
  __syncthreads();
  __nv_bfloat16* su = reinterpret_cast<__nv_bfloat16*>(smem) + warp * 2 * 16 * 64;
  const std::size_t KC = K / 64;
  const std::size_t warps = std::size_t(gridDim.x) * kWarps;
  for (std::size_t u0 = blockIdx.x * std::size_t(kWarps) + warp; u0 < units; u0 += 2 * warps) {
    uint4 v[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const std::size_t ui = u0 + p * warps;
      v[p] = ui < units ? __ldcs(reinterpret_cast<const uint4*>(packed + ui * 512) + lane)
                        : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const std::size_t unit = u0 + p * warps;
      if (unit >= units) break;
      const std::size_t r = unit / KC * 16, k = unit % KC * 64;
      const int g = lane >> 2, t = lane & 3;
      const std::uint32_t w[4] = {v[p].x, v[p].y, v[p].z, v[p].w};
      __nv_bfloat16* s = su + p * 16 * 64;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float amax =
            cuda::detail::block_absmax(am, s_map, ((r + g + 8 * h) * K + k + 16 * t) >> block_shift);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float f[8];
          cuda::detail::decode8(w[2 * h + q], s_code, amax, f);
          cuda::detail::store8(s + (g + 8 * h) * 64 + 16 * t + 8 * q, f);
        }
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i * 4 + lane / 8, c = lane % 8;
        *reinterpret_cast<uint4*>(out + (r + row) * K + k + c * 8) =
            *reinterpret_cast<const uint4*>(s + row * 64 + c * 8);
      }
      __syncwarp();
    }
  }
}

// v1: the tiles-layout dequantizer of dequantize4bit.cuh with one block of 32 warps per SM and two
// units per warp in flight: grid = k puts it on exactly k SMs (the library's dequantize_4bit_on_sms).
// v2 (template U): a warp issues every load of U units first (packed bytes, absmax codes and nested
// absmax: one memory latency per U units instead of three per unit), stages one unit at a time, and
// stores with the streaming hint (the next product reads W from DRAM; keep x in L2).
template <int U, bool kStream>
__global__ void __launch_bounds__(kWarps * 32, 1)
    dq_side2_kernel(const std::uint8_t* __restrict__ packed, std::size_t units, std::size_t K,
                    int block_shift, cuda::detail::AbsmaxView am, cuda::detail::Code16Param code,
                    cuda::detail::Code256Param map, __nv_bfloat16* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_code[16];
  __shared__ float s_map[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < 16) s_code[threadIdx.x] = code.v[threadIdx.x];
  if (!am.absmax && threadIdx.x < 256) s_map[threadIdx.x] = map.v[threadIdx.x];
  __syncthreads();
  __nv_bfloat16* s = reinterpret_cast<__nv_bfloat16*>(smem) + warp * 16 * 64;
  const std::size_t KC = K / 64;
  const std::size_t warps = std::size_t(gridDim.x) * kWarps;
  const int g = lane >> 2, t = lane & 3;
  for (std::size_t u0 = blockIdx.x * std::size_t(kWarps) + warp; u0 < units; u0 += U * warps) {
    uint4 v[U];
    float a2[U][2];
    unsigned c[U][2];
#pragma unroll
    for (int p = 0; p < U; ++p) {
      const std::size_t unit = min(u0 + p * warps, units - 1);  // past the end: load the last unit again
      v[p] = __ldcs(reinterpret_cast<const uint4*>(packed + unit * 512) + lane);
      const std::size_t r = unit / KC * 16, k = unit % KC * 64;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const std::size_t b = ((r + g + 8 * h) * K + k + 16 * t) >> block_shift;
        if (am.absmax) {
          a2[p][h] = __ldg(am.absmax + b);
          c[p][h] = 0;
        } else {
          c[p][h] = __ldg(am.qabsmax + b);
          a2[p][h] = __ldg(am.absmax2 + (b >> am.nested_shift));
        }
      }
    }
#pragma unroll
    for (int p = 0; p < U; ++p) {
      const std::size_t unit = u0 + p * warps;
      if (unit >= units) break;
      const std::size_t r = unit / KC * 16, k = unit % KC * 64;
      const std::uint32_t w[4] = {v[p].x, v[p].y, v[p].z, v[p].w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float amax =
            am.absmax ? a2[p][h] : cuda::detail::nested_absmax(s_map[c[p][h]], a2[p][h], am.offset);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float f[8];
          cuda::detail::decode8(w[2 * h + q], s_code, amax, f);
          cuda::detail::store8(s + (g + 8 * h) * 64 + 16 * t + 8 * q, f);
        }
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // 8 16-byte chunks a row, 4 rows per store instruction
        const int row = i * 4 + lane / 8, cc = lane % 8;
        const uint4 val = *reinterpret_cast<const uint4*>(s + row * 64 + cc * 8);
        uint4* dst = reinterpret_cast<uint4*>(out + (r + row) * K + k + cc * 8);
        if (kStream)
          __stcs(dst, val);
        else
          *dst = val;
      }
      __syncwarp();
    }
  }
}

// v5: v2 (U = 4, streaming) with fewer instructions per unit: the v1 kernel issues ~300 SASS
// instructions per unit and warp (~60 GB/s per SM if issue-bound; it ran at 30), much of it 64-bit
// index arithmetic (a 64-bit division by KC per unit, in v2 twice). Here a unit's index, tile and
// column are 32-bit and computed once, its output row pointer once, and the codes come from a
// byte-indexed table of value pairs (one 8-byte shared load per packed byte instead of a shift, a
// mask and a 4-byte load per value).
__global__ void __launch_bounds__(kWarps * 32, 1)
    dq_side5_kernel(const std::uint8_t* __restrict__ packed, unsigned units, unsigned K, int block_shift,
                    cuda::detail::AbsmaxView am, cuda::detail::Code16Param code,
                    cuda::detail::Code256Param map, __nv_bfloat16* __restrict__ out) {
  constexpr int U = 4;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float2 s_pair[256];  // byte b -> (code[b >> 4], code[b & 15]): the high nibble is first
  __shared__ float s_map[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < 256) {
    s_pair[threadIdx.x] = make_float2(code.v[threadIdx.x >> 4], code.v[threadIdx.x & 15]);
    if (!am.absmax) s_map[threadIdx.x] = map.v[threadIdx.x];
  }
  __syncthreads();
  __nv_bfloat16* s = reinterpret_cast<__nv_bfloat16*>(smem) + warp * 16 * 64;
  const unsigned KC = K / 64;
  const unsigned warps = gridDim.x * kWarps;
  const int g = lane >> 2, t = lane & 3;
  for (unsigned u0 = blockIdx.x * kWarps + warp; u0 < units; u0 += U * warps) {
    uint4 v[U];
    float a2[U][2];
    unsigned c[U][2];
    std::size_t base[U];  // the unit's first output element: row r, column k
#pragma unroll
    for (int p = 0; p < U; ++p) {
      const unsigned unit = min(u0 + p * warps, units - 1);  // past the end: the last unit again, unused
      v[p] = __ldcs(reinterpret_cast<const uint4*>(packed + std::size_t(unit) * 512) + lane);
      const unsigned tile = unit / KC, k = (unit - tile * KC) * 64;
      base[p] = std::size_t(tile) * 16 * K + k;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // row g, then row g + 8
        const std::size_t b = (base[p] + std::size_t(g + 8 * h) * K + 16 * t) >> block_shift;
        if (am.absmax) {
          a2[p][h] = __ldg(am.absmax + b);
          c[p][h] = 0;
        } else {
          c[p][h] = __ldg(am.qabsmax + b);
          a2[p][h] = __ldg(am.absmax2 + (b >> am.nested_shift));
        }
      }
    }
#pragma unroll
    for (int p = 0; p < U; ++p) {
      if (u0 + p * warps >= units) break;
      const std::uint32_t w[4] = {v[p].x, v[p].y, v[p].z, v[p].w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float amax =
            am.absmax ? a2[p][h] : cuda::detail::nested_absmax(s_map[c[p][h]], a2[p][h], am.offset);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const std::uint32_t word = w[2 * h + q];
          uint4 o;
          std::uint32_t* ou = reinterpret_cast<std::uint32_t*>(&o);
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // byte j: values 2j (high nibble) and 2j + 1
            const float2 cv = s_pair[(word >> (8 * j)) & 0xffu];
            const __nv_bfloat162 hv = __floats2bfloat162_rn(__fmul_rn(cv.x, amax), __fmul_rn(cv.y, amax));
            ou[j] = *reinterpret_cast<const std::uint32_t*>(&hv);
          }
          *reinterpret_cast<uint4*>(s + (g + 8 * h) * 64 + 16 * t + 8 * q) = o;
        }
      }
      __syncwarp();
      __nv_bfloat16* dst = out + base[p] + std::size_t(lane / 8) * K + (lane % 8) * 8;
#pragma unroll
      for (int i = 0; i < 4; ++i)  // 8 16-byte chunks a row, 4 rows per store instruction
        __stcs(reinterpret_cast<uint4*>(dst + std::size_t(4 * i) * K),
               *reinterpret_cast<const uint4*>(s + (i * 4 + lane / 8) * 64 + (lane % 8) * 8));
      __syncwarp();
    }
  }
}

constexpr int kSideSmem = 160 << 10;  // > half an SM's shared memory: one block per SM

// variant: 1 = v1; L = the library's dequantize_4bit_on_sms (v5, clusters of 2
// for an even k); 2 = v2, U = 4, streaming stores; 3 = v2, U = 4,
// plain stores; 4 = v2, U = 2, streaming; 5 = v5 (32-bit indices, pair table). cluster: launch as clusters of
// 2 blocks (whole pairs of SMs of a GPC, as cuBLAS's 2-CTA clusters need them).
int g_variant = 1;
const cuda::Context* g_ctx_ptr = nullptr;
const cuda::Context& g_ctx() { return *g_ctx_ptr; }
bool g_cluster = false;

template <class Kern>
void launch_side(Kern kern, int k, cudaStream_t s, const cuda::DeviceQuantized4bit& q, __nv_bfloat16* out) {
  const std::size_t K = std::size_t(q.cols()), units = std::size_t(q.rows()) / 16 * (K / 64);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(k));
  cfg.blockDim = dim3(kWarps * 32);
  cfg.dynamicSmemBytes = kSideSmem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = g_cluster ? 1 : 0;
  QLORA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, q.packed.data(), units, K,
                                      cuda::detail::log2_exact(q.blocksize), cuda::detail::absmax_view(q),
                                      cuda::detail::decode_table(q), cuda::detail::map_param(q), out));
}

void dq_side(const cuda::DeviceQuantized4bit& q, int k, __nv_bfloat16* out, cudaStream_t s) {
  switch (g_variant) {
    case 1: return launch_side(dq_side1_kernel, k, s, q, out);
    case 'L' - '0': return cuda::dequantize_4bit_on_sms(g_ctx(), q, out, k, s);
    case 2: return launch_side(dq_side2_kernel<4, true>, k, s, q, out);
    case 3: return launch_side(dq_side2_kernel<4, false>, k, s, q, out);
    case 5: {
      const unsigned K = unsigned(q.cols()), units = unsigned(q.rows() / 16) * (K / 64);
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(unsigned(k));
      cfg.blockDim = dim3(kWarps * 32);
      cfg.dynamicSmemBytes = kSideSmem;
      cfg.stream = s;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = 2;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = g_cluster ? 1 : 0;
      QLORA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, dq_side5_kernel, q.packed.data(), units, K,
                                          cuda::detail::log2_exact(q.blocksize), cuda::detail::absmax_view(q),
                                          cuda::detail::decode_table(q), cuda::detail::map_param(q), out));
      return;
    }
    default: return launch_side(dq_side2_kernel<2, true>, k, s, q, out);
  }
}

cuda::DeviceQuantized4bit clone(const cuda::Context& ctx, const cuda::DeviceQuantized4bit& q) {
  cuda::DeviceQuantized4bit c;
  c.type = q.type, c.blocksize = q.blocksize, c.shape = q.shape, c.dtype = q.dtype, c.code = q.code;
  c.double_quant = q.double_quant, c.offset = q.offset, c.nested_blocksize = q.nested_blocksize;
  c.nested_code = q.nested_code, c.layout = q.layout;
  auto cp = [&](auto& dst, const auto& src) {
    using T = std::remove_reference_t<decltype(*src.data())>;
    dst = DeviceBuffer<std::remove_const_t<T>>(src.size());
    if (src.size())
      QLORA_CUDA_CHECK(
          cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
  };
  cp(c.packed, q.packed);
  cp(c.absmax, q.absmax);
  cp(c.qabsmax, q.qabsmax);
  cp(c.absmax2, q.absmax2);
  return c;
}

std::vector<int> int_list(const char* env, std::vector<int> def) {
  const char* e = std::getenv(env);
  if (!e) return def;
  std::vector<int> v;
  std::istringstream in(e);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) v.push_back(std::atoi(item.c_str()));
  return v;
}

void gemm_on(cublasHandle_t h, const __nv_bfloat16* x, int M, int K, const __nv_bfloat16* w, int N,
             __nv_bfloat16* y) {
  const float alpha = 1.0f, beta = 0.0f;
  QLORA_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16BF, K, x,
                                  CUDA_R_16BF, K, &beta, y, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

}  // namespace

int main(int argc, char** argv) {
  if (!benchutil::start(argc, argv)) return 0;
  cuda::Context ctx(0);
  const int sms = ctx.sm_count();
  std::printf("device: %s, %d SMs, L2 %d MB\n", ctx.name().c_str(), sms, ctx.props().l2CacheSize >> 20);
  g_ctx_ptr = &ctx;
  QLORA_CUDA_CHECK(
      cudaFuncSetAttribute(dq_side1_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSideSmem));
  QLORA_CUDA_CHECK(
      cudaFuncSetAttribute(dq_side2_kernel<4, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSideSmem));
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(dq_side2_kernel<4, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, kSideSmem));
  QLORA_CUDA_CHECK(
      cudaFuncSetAttribute(dq_side2_kernel<2, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSideSmem));
  QLORA_CUDA_CHECK(
      cudaFuncSetAttribute(dq_side5_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSideSmem));
  std::vector<std::string> variants = {"1", "2", "2c", "3c", "4c", "L"};
  if (const char* e = std::getenv("OV_VARIANTS")) {
    variants.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) variants.push_back(item);
  }
  int lo = 0, hi = 0;
  QLORA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
  cudaStream_t side;
  QLORA_CUDA_CHECK(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, hi));
  DeviceBuffer<unsigned char> ws(std::size_t(32) << 20);

  std::vector<std::pair<int, int>> shapes = {{14336, 4096}, {4096, 4096}};
  if (const char* e = std::getenv("OV_SHAPES")) {
    shapes.clear();
    std::istringstream in(e);
    for (std::string item; std::getline(in, item, ',');) {
      int n = 0, k = 0;
      if (std::sscanf(item.c_str(), "%dx%d", &n, &k) == 2) shapes.emplace_back(n, k);
    }
  }
  const int M = int_list("OV_M", {4096})[0];
  const std::vector<int> ks = int_list("OV_KS", {2, 4, 8});
  const std::size_t rotate_bytes = std::size_t(512) << 20;

  for (const auto& nk_pair : shapes) {
    const int N = nk_pair.first, K = nk_pair.second;
    const std::string suffix = std::to_string(N) + "x" + std::to_string(K) + "/m" + std::to_string(M);
    const std::size_t nk = std::size_t(N) * K;
    const int nbf =
        int(std::min<std::size_t>(64, std::max<std::size_t>(2, (rotate_bytes + 2 * nk - 1) / (2 * nk))));
    std::vector<DeviceBuffer<__nv_bfloat16>> wb;
    for (int i = 0; i < nbf; ++i) {
      wb.emplace_back(nk);
      fill(ctx, wb.back().data(), nk, 100 + i, 0.05f);
    }
    std::vector<cuda::DeviceQuantized4bit> wq;
    wq.push_back(cuda::quantize_4bit(ctx, wb[0].data(), {N, K},
                                     quant::Quant4Config{quant::Quant4Type::NF4, 64, true}));
    const int nq = int(std::min<std::size_t>(
        64, std::max<std::size_t>(2, (rotate_bytes + wq[0].weight_bytes() - 1) / wq[0].weight_bytes())));
    for (int i = 1; i < nq; ++i) wq.push_back(clone(ctx, wq[0]));
    for (auto& w : wq) cuda::use_gemv_layout(ctx, w);
    DeviceBuffer<__nv_bfloat16> x(std::size_t(M) * K), y(std::size_t(M) * N), yref(std::size_t(M) * N);
    fill(ctx, x.data(), x.size(), 7, 2.0f);
    DeviceBuffer<__nv_bfloat16> scratch[2] = {DeviceBuffer<__nv_bfloat16>(nk),
                                              DeviceBuffer<__nv_bfloat16>(nk)};
    ctx.synchronize();

    auto base = [&](int i) { cuda::gemm_bf16(ctx, x.data(), M, K, wb[i % nbf].data(), N, y.data()); };
    const double flops = 2.0 * M * double(nk);
    {
      const PairTiming p = time_graph_pair(ctx, base, [&](int i) {
        cuda::matmul_4bit_dequant(ctx, wq[i % nq], x.data(), M, y.data(), scratch[0]);
      });
      report("ov/dq_cublas/" + suffix, p.best_b,
             fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); cuBLAS %.2f us", p.ratio_median,
                 p.ratio_min, p.ratio_max, p.best_a));
      std::printf("  cuBLAS bf16 %.1f TFLOP/s\n", flops / p.best_a * 1e-6);
    }
    for (int k : ks) {
      cublasHandle_t h;
      QLORA_CUBLAS_CHECK(cublasCreate(&h));
      QLORA_CUBLAS_CHECK(cublasSetStream(h, ctx.stream()));
      QLORA_CUBLAS_CHECK(cublasSetWorkspace(h, ws.data(), ws.bytes()));
      QLORA_CUBLAS_CHECK(cublasSetSmCountTarget(h, sms - k));
      {
        const PairTiming p = time_graph_pair(
            ctx, base, [&](int i) { gemm_on(h, x.data(), M, K, wb[i % nbf].data(), N, y.data()); });
        report("ov/carve_" + std::to_string(k) + "/" + suffix, p.best_b,
               fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); cuBLAS targeting %.0f SMs",
                   p.ratio_median, p.ratio_min, p.ratio_max, double(sms - k)));
      }
      for (const std::string& v : variants) {
        g_variant = v[0] - '0';
        g_cluster = v.size() > 1 && v[1] == 'c';
        if (g_cluster && k % 2) continue;
        if (k == ks[0] || (k == 2 && ks[0] != 2)) {  // the side dequantizer gives the library's values
          cuda::dequantize_4bit(ctx, wq[1], scratch[0].data());
          QLORA_CUDA_CHECK(cudaMemsetAsync(scratch[1].data(), 0xff, scratch[1].bytes(), ctx.stream()));
          dq_side(wq[1], k, scratch[1].data(), ctx.stream());
          const auto a = scratch[0].to_host(ctx.stream()), b = scratch[1].to_host(ctx.stream());
          std::size_t bad = 0;
          for (std::size_t i = 0; i < nk; ++i) bad += std::memcmp(&a[i], &b[i], 2) != 0;
          std::printf("side dequantizer v%s on %d SMs against dequantize_4bit: %zu of %zu values differ\n",
                      v.c_str(), k, bad, nk);
        }
        {
          const double us =
              time_graph(ctx, [&](int i) { dq_side(wq[i % nq], k, scratch[0].data(), ctx.stream()); });
          report("ov/dq_only_" + std::to_string(k) + "_v" + v + "/" + suffix, us,
                 fmt("%.3f TB/s on %.0f SMs (read + write)", (wq[0].weight_bytes() + 2.0 * nk) / us * 1e-6,
                     double(k)));
        }
        // the chain: call i multiplies with scratch[i % 2] (dequantized during call i - 1) while the side
        // stream dequantizes weight i + 1 into scratch[(i + 1) % 2]; call 0 dequantizes its own first
        cudaEvent_t before[2], ready[2];
        for (int j = 0; j < 2; ++j) {
          QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&before[j], cudaEventDisableTiming));
          QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&ready[j], cudaEventDisableTiming));
        }
        const int calls = 30;
        auto chain = [&](int i) {
          const int cur = i % 2, nxt = (i + 1) % 2;
          if (i == 0)
            cuda::dequantize_4bit(ctx, wq[0], scratch[0].data());
          else
            QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), ready[cur], 0));
          // scratch[nxt] was read by call i - 1, done in stream order before this point
          QLORA_CUDA_CHECK(cudaEventRecord(before[cur], ctx.stream()));
          QLORA_CUDA_CHECK(cudaStreamWaitEvent(side, before[cur], 0));
          dq_side(wq[(i + 1) % nq], k, scratch[nxt].data(), side);
          QLORA_CUDA_CHECK(cudaEventRecord(ready[nxt], side));
          gemm_on(h, x.data(), M, K, scratch[cur].data(), N, y.data());
          if (i == calls - 1) QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), ready[nxt], 0));  // join
        };
        {
          const PairTiming p = time_graph_pair(ctx, base, chain, calls);
          report("ov/chain_" + std::to_string(k) + "_v" + v + "/" + suffix, p.best_b,
                 fmt("%.3fx cuBLAS bf16 (median of 11, spread %.3f-%.3f); %.0f TFLOP/s", p.ratio_median,
                     p.ratio_min, p.ratio_max, flops / p.best_b * 1e-6));
        }
        for (int j = 0; j < 2; ++j) {
          cudaEventDestroy(before[j]);
          cudaEventDestroy(ready[j]);
        }
      }
      cublasDestroy(h);
    }
  }
  cudaStreamDestroy(side);
  return 0;
}

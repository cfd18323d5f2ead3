// finetune_cuda() of a qlora tool built without the CUDA backend (QLORA_CUDA off): an error that says
// so. The real one is examples/qlora/cuda/finetune_cuda.cu.
#include "../finetune_cuda.hpp"

namespace cli {

template <class Quant>
int finetune_cuda(const CudaFinetuneJob<Quant>&) {
  qlora::throw_error(
      "--device cuda: this qlora was built without CUDA (configure with -DQLORA_CUDA=ON, or build it with "
      "bench/cuda/device_run.sh); use --device cpu");
}

template int finetune_cuda(const CudaFinetuneJob<qlora::format::NF4>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::FP4>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::BF16>&);
template int finetune_cuda(const CudaFinetuneJob<qlora::format::F32>&);

}  // namespace cli

// The attention logit of one dot product in the CUDA kernels: scale rounded once (as the CPU kernels' matmul then
// mul_), then the logit soft-capping of Gemma 2 when asked (softcap > 0).
#pragma once

namespace cakekv::cuda {

__device__ __forceinline__ float attention_logit(float dot, float scale, float softcap) {
  const float logit = __fmul_rn(dot, scale);
  return softcap > 0.f ? softcap * tanhf(logit / softcap) : logit;
}

}  // namespace cakekv::cuda

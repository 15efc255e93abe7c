// Attention logits from dot products, shared by the CPU kernels: the softmax scale, then the logit soft-capping
// of Gemma 2 when asked (softcap > 0), in the order of transformers' eager attention.
#pragma once
#include <ATen/ATen.h>

namespace cakekv::cpu {

inline at::Tensor& logits_from_dots_(at::Tensor& dots, double scale, double softcap) {
  dots.mul_(scale);
  if (softcap > 0.0) dots.div_(softcap).tanh_().mul_(softcap);
  return dots;
}

}  // namespace cakekv::cpu

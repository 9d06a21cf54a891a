// Schemas of the fused rank-1 LoRA ops (implementations: lora1_cuda.cu; fake/autograd: lora_cuda.py).
//
// rank1::lora1_linear(x, W, bias, a, b, s) -> (y, u)
//   y = x W^T + bias + s (x . a) b^T  in x's dtype, u = x . a in fp32; x (N, in), W (out, in) frozen,
//   a (in,) and b (out,) the adapter's A and B in fp32.
// rank1::lora1_linear_backward(g, x, W, u, a, b, s, need_dx) -> (dx, dA, dB)
//   dx = g W + s (g . b) a^T (empty unless need_dx), dA = s sum_t (g_t . b) x_t, dB = s sum_t u_t g_t.
// Both are functional (no input is mutated), so autograd and torch.compile can treat them as usual.
#include <torch/library.h>

TORCH_LIBRARY(rank1, m) {
  m.def("lora1_linear(Tensor x, Tensor W, Tensor? bias, Tensor a, Tensor b, float s) -> (Tensor, Tensor)");
  m.def("lora1_linear_backward(Tensor g, Tensor x, Tensor W, Tensor u, Tensor a, Tensor b, float s, bool need_dx)"
        " -> (Tensor, Tensor, Tensor)");
}

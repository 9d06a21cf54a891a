// Fused rank-1 LoRA kernels: the adapter's update applied in one pass over each activation.
//
// Build: on first use by lora_cuda.py (torch.utils.cpp_extension.load, cached); CI only compiles:
//   python tests/test_cuda_kernel.py --compile-only      (nvcc, sm_80 and sm_90)
//
// The frozen matmuls (y = x W^T + bias, dx = g W) stay with cuBLAS; these kernels add the rank-1
// part around them. Per token row t, with a (in,), b (out,) fp32 and s the LoRA scale:
//   forward   u_t = x_t . a                y_t += s u_t b               (rank1_fwd_kernel)
//   backward  gb_t = g_t . b               dB = s sum_t u_t g_t          (rank1_bwd_g_kernel)
//             dx_t += s gb_t a             dA = s sum_t gb_t x_t         (rank1_bwd_x_kernel)
// All sums accumulate in fp32. The cross-row sums (dA, dB) are two-stage and deterministic: each
// block writes its partial for a chunk of rows, then rank1_reduce_kernel adds the chunks in order; no
// atomics touch a result.
//
// Memory traffic per token (the whole cost of a rank-1 update; arithmetic is negligible):
//   rank1_fwd_kernel    reads x_t (in) and y_t (out), writes y_t (out)
//   rank1_bwd_g_kernel  reads g_t (out)
//   rank1_bwd_x_kernel  reads x_t (in) and dx_t (in), writes dx_t (in)
// Vector width: 16-byte loads (of x, y, g, dx, and of a and b as float4) when both widths are
// multiples of 16 / sizeof(T) and the pointers are aligned, else one element at a time (odd widths
// work, just slower). Built for float32, float16 and bfloat16 only (what the op accepts).
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that
// a bare nvcc install lacks), so CI can compile this file without the CUDA math libraries.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

constexpr int WARPS = 8;       // warps per block; each warp handles whole rows
constexpr int ITERS = 4;       // vectors per lane per row in a column tile
constexpr int THREADS = WARPS * 32;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// r = p[0 .. V) of an fp32 vector (a or b): V / 4 16-byte loads when V is a multiple of 4.
template <int V>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&r)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = *reinterpret_cast<const float4*>(p + 4 * q);
      r[4 * q] = f.x, r[4 * q + 1] = f.y, r[4 * q + 2] = f.z, r[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = p[k];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row: u_t = x_t . a, then y_t += s u_t b. Grid: ceil(N / WARPS) blocks.
template <typename T, int V>
__global__ void rank1_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ a,
                           const float* __restrict__ b, float* __restrict__ u, float s, int64_t N, int in,
                           int out) {
  const int64_t t = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= N) return;
  const T* xr = x + t * in;
  float acc = 0.f;
  for (int j = lane * V; j < in; j += 32 * V) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(xr + j);
    float av[V];
    load_f32<V>(a + j, av);
#pragma unroll
    for (int k = 0; k < V; ++k) acc += static_cast<float>(p.v[k]) * av[k];
  }
  const float ut = warp_sum(acc);
  if (lane == 0) u[t] = ut;
  const float c = s * ut;
  T* yr = y + t * out;
  for (int j = lane * V; j < out; j += 32 * V) {
    Pack<T, V> p = *reinterpret_cast<Pack<T, V>*>(yr + j);
    float bv[V];
    load_f32<V>(b + j, bv);
#pragma unroll
    for (int k = 0; k < V; ++k) p.v[k] = static_cast<T>(static_cast<float>(p.v[k]) + c * bv[k]);
    *reinterpret_cast<Pack<T, V>*>(yr + j) = p;
  }
}

// Column tile of C = 32 * V * ITERS columns x a chunk of R rows; lane owns V-wide vectors at
// columns c0 + (it * 32 + lane) * V, so each warp load is contiguous.
//
// The start of both backward kernels: zero the accumulators and load this lane's columns of a
// vector (times scale; 0 past width).
template <int V>
__device__ __forceinline__ void load_tile(float (&acc)[ITERS][V], float (&w)[ITERS][V], const float* vec, float scale,
                                          int c0, int width) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int j = c0 + (it * 32 + lane) * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc[it][k] = 0.f;
      w[it][k] = j < width ? scale * vec[j + k] : 0.f;
    }
  }
}

// The end of both backward kernels: add each column's per-warp accumulators over the block's warps
// (through shared memory, in warp order) and write the chunk's partial row part[c0 .. c0 + C).
template <int V>
__device__ __forceinline__ void write_chunk_partial(float (&acc)[ITERS][V], float* sm, int c0, int width, float* part) {
  constexpr int C = 32 * V * ITERS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int k = 0; k < V; ++k) sm[warp * C + (it * 32 + lane) * V + k] = acc[it][k];
  __syncthreads();
  for (int c = threadIdx.x; c < C && c0 + c < width; c += THREADS) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += sm[w * C + c];
    part[c0 + c] = sum;
  }
}

//
// rank1_bwd_g_kernel: gb_part[tile, t] = g_t[tile] . b[tile];  dB_part[chunk, cols] = sum_t u_t g_t[cols].
template <typename T, int V>
__global__ void rank1_bwd_g_kernel(const T* __restrict__ g, const float* __restrict__ b, const float* __restrict__ u,
                             float* __restrict__ gb_part, float* __restrict__ dB_part, int64_t N, int out,
                             int64_t R) {
  constexpr int C = 32 * V * ITERS;
  __shared__ float sm[WARPS * C];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c0 = blockIdx.x * C;
  const int64_t r0 = (int64_t)blockIdx.y * R, r1 = min(N, r0 + R);
  float acc[ITERS][V], bb[ITERS][V];
  load_tile<V>(acc, bb, b, 1.f, c0, out);
  for (int64_t t = r0 + warp; t < r1; t += WARPS) {
    const T* gr = g + t * out;
    const float ut = u[t];
    float dot = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int j = c0 + (it * 32 + lane) * V;
      if (j < out) {
        const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(gr + j);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float gv = static_cast<float>(p.v[k]);
          dot += gv * bb[it][k];
          acc[it][k] += ut * gv;
        }
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) gb_part[blockIdx.x * N + t] = dot;
  }
  write_chunk_partial<V>(acc, sm, c0, out, dB_part + blockIdx.y * (int64_t)out);
}

// rank1_bwd_x_kernel: gb_t = sum over g-tiles of gb_part;  dx_t[cols] += s gb_t a[cols] (when dx is given);
// dA_part[chunk, cols] = sum_t gb_t x_t[cols].
template <typename T, int V>
__global__ void rank1_bwd_x_kernel(const T* __restrict__ x, T* __restrict__ dx, const float* __restrict__ a,
                             const float* __restrict__ gb_part, int n_gtiles, float* __restrict__ dA_part,
                             float s, int64_t N, int in, int64_t R) {
  constexpr int C = 32 * V * ITERS;
  __shared__ float sm[WARPS * C];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c0 = blockIdx.x * C;
  const int64_t r0 = (int64_t)blockIdx.y * R, r1 = min(N, r0 + R);
  float acc[ITERS][V], aa[ITERS][V];
  load_tile<V>(acc, aa, a, s, c0, in);
  for (int64_t t = r0 + warp; t < r1; t += WARPS) {
    float gbt = 0.f;
    for (int k = 0; k < n_gtiles; ++k) gbt += gb_part[k * N + t];  // fixed order: deterministic
    const T* xr = x + t * in;
    T* dxr = dx ? dx + t * in : nullptr;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int j = c0 + (it * 32 + lane) * V;
      if (j < in) {
        const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(xr + j);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[it][k] += gbt * static_cast<float>(p.v[k]);
        if (dxr) {
          Pack<T, V> q = *reinterpret_cast<Pack<T, V>*>(dxr + j);
#pragma unroll
          for (int k = 0; k < V; ++k) q.v[k] = static_cast<T>(static_cast<float>(q.v[k]) + gbt * aa[it][k]);
          *reinterpret_cast<Pack<T, V>*>(dxr + j) = q;
        }
      }
    }
  }
  write_chunk_partial<V>(acc, sm, c0, in, dA_part + blockIdx.y * (int64_t)in);
}

// out[c] = s * sum_chunk part[chunk, c], chunks added in order.
__global__ void rank1_reduce_kernel(const float* __restrict__ part, int64_t n_chunks, int width, float s,
                              float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  float sum = 0.f;
  for (int64_t k = 0; k < n_chunks; ++k) sum += part[k * width + c];
  out[c] = s * sum;
}

// f(T{}) for the op's dtypes: float32, float16, bfloat16 (no double kernels are built).
template <typename F>
void dispatch(at::ScalarType t, F f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "lora1: unsupported dtype ", t);
  }
}

template <typename T>
int vec_width(std::initializer_list<const at::Tensor*> ts, std::initializer_list<int64_t> widths) {
  constexpr int V = 16 / sizeof(T);
  for (int64_t w : widths)
    if (w % V) return 1;
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return 1;
  return V;
}

// Enough row chunks that the grid has a few blocks per SM; a chunk is a multiple of WARPS rows.
int64_t rows_per_chunk(int64_t N, int64_t n_tiles) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  int64_t chunks = std::max<int64_t>(1, (4 * sms + n_tiles - 1) / n_tiles);
  chunks = std::min<int64_t>(chunks, (N + WARPS - 1) / WARPS);
  int64_t R = (N + chunks - 1) / chunks;
  return (R + WARPS - 1) / WARPS * WARPS;
}

void check_inputs(const at::Tensor& x, const at::Tensor& W, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(x.is_cuda() && W.is_cuda() && a.is_cuda() && b.is_cuda(), "lora1: all tensors must be on CUDA");
  TORCH_CHECK(x.device() == W.device() && x.device() == a.device() && x.device() == b.device(),
              "lora1: all tensors must be on the same device");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "lora1: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(W.scalar_type() == x.scalar_type(), "lora1: W dtype ", W.scalar_type(), " != x dtype ", x.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "lora1: a and b must be float32");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && a.dim() == 1 && b.dim() == 1,
              "lora1: expected x (N, in), W (out, in), a (in,), b (out,)");
  TORCH_CHECK(W.size(1) == x.size(1) && a.size(0) == x.size(1) && b.size(0) == W.size(0),
              "lora1: shape mismatch: x ", x.sizes(), ", W ", W.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(x.is_contiguous() && a.is_contiguous() && b.is_contiguous(), "lora1: x, a, b must be contiguous");
  TORCH_CHECK(x.size(1) < (1 << 30) && W.size(0) < (1 << 30), "lora1: widths must fit in int32");
}

template <typename T, int V>
void launch_fwd(const at::Tensor& x, at::Tensor& y, const at::Tensor& a, const at::Tensor& b, at::Tensor& u,
                float s) {
  const int64_t N = x.size(0);
  const int64_t blocks = (N + WARPS - 1) / WARPS;
  rank1_fwd_kernel<T, V><<<blocks, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), y.data_ptr<T>(), a.data_ptr<float>(), b.data_ptr<float>(), u.data_ptr<float>(), s, N,
      (int)x.size(1), (int)y.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void launch_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& u, const at::Tensor& a,
                const at::Tensor& b, float s, at::Tensor* dx, at::Tensor& dA, at::Tensor& dB) {
  constexpr int C = 32 * V * ITERS;
  const int64_t N = x.size(0), in = x.size(1), out = g.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto f32 = x.options().dtype(at::kFloat);
  // stage 1 over g's columns
  const int64_t gt = (out + C - 1) / C, Rg = rows_per_chunk(N, gt), gc = (N + Rg - 1) / Rg;
  auto gb_part = at::empty({gt, N}, f32);
  auto dB_part = at::empty({gc, out}, f32);
  rank1_bwd_g_kernel<T, V><<<dim3(gt, gc), THREADS, 0, stream>>>(g.data_ptr<T>(), b.data_ptr<float>(), u.data_ptr<float>(),
                                                            gb_part.data_ptr<float>(), dB_part.data_ptr<float>(), N,
                                                            (int)out, Rg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // stage 1 over x's columns (needs every gb partial: runs after bwd_g on the same stream)
  const int64_t xt = (in + C - 1) / C, Rx = rows_per_chunk(N, xt), xc = (N + Rx - 1) / Rx;
  auto dA_part = at::empty({xc, in}, f32);
  rank1_bwd_x_kernel<T, V><<<dim3(xt, xc), THREADS, 0, stream>>>(
      x.data_ptr<T>(), dx ? dx->data_ptr<T>() : nullptr, a.data_ptr<float>(), gb_part.data_ptr<float>(), (int)gt,
      dA_part.data_ptr<float>(), s, N, (int)in, Rx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // stage 2: fixed-order sums over row chunks
  rank1_reduce_kernel<<<(in + 255) / 256, 256, 0, stream>>>(dA_part.data_ptr<float>(), xc, (int)in, s, dA.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  rank1_reduce_kernel<<<(out + 255) / 256, 256, 0, stream>>>(dB_part.data_ptr<float>(), gc, (int)out, s, dB.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// (y, u) = (x W^T + bias + s (x.a) b^T, x.a): x (N, in), W (out, in), a (in,), b (out,) fp32.
std::tuple<at::Tensor, at::Tensor> lora1_linear_cuda(const at::Tensor& x, const at::Tensor& W,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                                     const at::Tensor& b, double s) {
  check_inputs(x, W, a, b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::linear(x, W, bias).contiguous();
  at::Tensor u = at::zeros({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || x.size(1) == 0) return {y, u};  // no tokens, or u = 0 and y is the linear
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (vec_width<T>({&x, &y, &a, &b}, {x.size(1), y.size(1)}) > 1)
      launch_fwd<T, 16 / sizeof(T)>(x, y, a, b, u, (float)s);
    else
      launch_fwd<T, 1>(x, y, a, b, u, (float)s);
  });
  return {y, u};
}

// (dx, dA, dB) for the op above, given g = dL/dy; dx is empty when need_dx is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora1_linear_backward_cuda(
    const at::Tensor& g_, const at::Tensor& x, const at::Tensor& W, const at::Tensor& u, const at::Tensor& a,
    const at::Tensor& b, double s, bool need_dx) {
  check_inputs(x, W, a, b);
  const at::Tensor g = g_.contiguous();
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == W.size(0),
              "lora1_backward: g must be (N, out) in x's dtype, got ", g.sizes(), " ", g.scalar_type());
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.dim() == 1 && u.size(0) == x.size(0) && u.is_contiguous(),
              "lora1_backward: u must be a contiguous float32 (N,)");
  TORCH_CHECK(g.device() == x.device() && u.device() == x.device(),
              "lora1_backward: g and u must be on x's device, got ", g.device(), ", ", u.device(), " and ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = need_dx ? at::mm(g, W).contiguous() : at::empty({0}, x.options());
  at::Tensor dA = at::zeros({x.size(1)}, a.options());
  at::Tensor dB = at::zeros({W.size(0)}, b.options());
  // no tokens or a zero width: the rank-1 terms are all zero (and the tiling would divide by 0)
  if (x.size(0) == 0 || x.size(1) == 0 || W.size(0) == 0) return {dx, dA, dB};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool vec = need_dx ? vec_width<T>({&g, &x, &dx}, {x.size(1), g.size(1)}) > 1
                             : vec_width<T>({&g, &x}, {x.size(1), g.size(1)}) > 1;
    if (vec)
      launch_bwd<T, 16 / sizeof(T)>(g, x, u, a, b, (float)s, need_dx ? &dx : nullptr, dA, dB);
    else
      launch_bwd<T, 1>(g, x, u, a, b, (float)s, need_dx ? &dx : nullptr, dA, dB);
  });
  return {dx, dA, dB};
}

TORCH_LIBRARY_IMPL(rank1, CUDA, m) {
  m.impl("lora1_linear", &lora1_linear_cuda);
  m.impl("lora1_linear_backward", &lora1_linear_backward_cuda);
}

// Residual add + LayerNorm / RMSNorm in one pass, for inference (the prefill / forward without
// autograd): one block per row of d_model values.
//
//   residual_out = hidden + residual        (in RT: fp32 with residual_in_fp32, else the model dtype)
//   normed       = norm(E(residual_out))    (statistics in fp32, output rounded to E once)
//
// This is Block._add_norm's arithmetic (torch's add, cast, LayerNorm / our RMSNorm) with the four
// kernels and three round trips through memory of the unfused path replaced by one read of hidden and
// residual and one write of each output. The row is kept in shared memory between the passes.
#include "common.cuh"
#include "params.h"

namespace mambabyte {
namespace {

constexpr int kAnThreads = 256;

// grid (rows); dynamic smem: D floats.
template <typename E, typename RT>
__global__ void __launch_bounds__(kAnThreads) add_norm_kernel(const AddNormParams p) {
  extern __shared__ float s_row[];
  __shared__ float red[33];
  const int D = p.dim;
  const long row = (long)blockIdx.x * D;
  const E* h = static_cast<const E*>(p.hidden) + row;
  const RT* r = p.residual ? static_cast<const RT*>(p.residual) + row : nullptr;
  RT* ro = static_cast<RT*>(p.residual_out) + row;
  float s = 0.f;
  for (int k = threadIdx.x; k < D; k += kAnThreads) {
    float v = to_float(h[k]);
    if (r) v += to_float(r[k]);
    const RT rv = from_float<RT>(v);
    ro[k] = rv;
    const float x = to_float(from_float<E>(to_float(rv)));  // the norm reads the residual cast to E
    s_row[k] = x;
    s += x;
  }
  float mean = 0.f;
  if (!p.rms) mean = block_sum(s, red) / (float)D;
  float ss = 0.f;
  for (int k = threadIdx.x; k < D; k += kAnThreads) {
    const float d = s_row[k] - mean;
    ss = fmaf(d, d, ss);
  }
  const float rstd = rsqrtf(block_sum(ss, red) / (float)D + p.eps);
  const E* w = static_cast<const E*>(p.weight);
  const E* b = static_cast<const E*>(p.bias);
  E* out = static_cast<E*>(p.out) + row;
  for (int k = threadIdx.x; k < D; k += kAnThreads) {
    float y = (s_row[k] - mean) * rstd * to_float(w[k]);
    if (b) y += to_float(b[k]);
    out[k] = from_float<E>(y);
  }
}

template <typename E>
void launch_e(const AddNormParams& p, cudaStream_t s) {
  const size_t smem = (size_t)p.dim * sizeof(float);
  if (smem > 48 * 1024) {
    if (p.residual_f32)
      cudaFuncSetAttribute(add_norm_kernel<E, float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    else
      cudaFuncSetAttribute(add_norm_kernel<E, E>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  }
  if (p.residual_f32) add_norm_kernel<E, float><<<p.rows, kAnThreads, smem, s>>>(p);
  else add_norm_kernel<E, E><<<p.rows, kAnThreads, smem, s>>>(p);
}

}  // namespace

void add_norm(AddNormParams& p, int dtype, cudaStream_t s) {
  if (p.rows == 0) return;
  if (dtype == kF32) launch_e<float>(p, s);
  else if (dtype == kF16) launch_e<__half>(p, s);
  else launch_e<__nv_bfloat16>(p, s);
}

}  // namespace mambabyte

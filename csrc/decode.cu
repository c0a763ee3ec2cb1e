// Single-step decode kernels: the scan step (optionally with dt_proj fused) and the conv step.
// One thread per (batch, channel); the state rows are updated in place.
#include "common.cuh"
#include "params.h"

namespace mambabyte {

template <typename E>
__global__ void ssm_step_kernel(const StepParams p) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int bi = idx / p.dim, ch = idx % p.dim;
  const int N = p.dstate;
  const float xv = to_float(static_cast<const E*>(p.x)[idx]);
  float dt;
  if (p.dt_w) {  // fused dt_proj: dt = dt_w[ch, :] . dt_low[bi, :]
    const E* wr = static_cast<const E*>(p.dt_w) + (long)ch * p.dt_rank;
    const E* lr = static_cast<const E*>(p.dt_low) + (long)bi * p.dt_low_stride;
    float acc = 0.f;
    for (int r = 0; r < p.dt_rank; ++r) acc = fmaf(to_float(wr[r]), to_float(lr[r]), acc);
    dt = acc;
  } else {
    dt = to_float(static_cast<const E*>(p.dt)[idx]);
  }
  if (p.dt_bias) dt += p.dt_bias[ch];
  if (p.softplus) dt = softplus_f(dt);
  const E* Br = static_cast<const E*>(p.B) + (long)bi * p.bc_stride;
  const E* Cr = static_cast<const E*>(p.C) + (long)bi * p.bc_stride;
  const float* A = p.A + (long)ch * N;
  float* st = p.state + (long)idx * N;
  const float dx = dt * xv;
  float y = 0.f;
  for (int n = 0; n < N; ++n) {
    const float h = fmaf(__expf(dt * A[n]), st[n], dx * to_float(Br[n]));
    st[n] = h;
    y = fmaf(h, to_float(Cr[n]), y);
  }
  if (p.D) y = fmaf(xv, p.D[ch], y);
  if (p.z) {
    const float zv = to_float(static_cast<const E*>(p.z)[idx]);
    y *= zv * sigmoid_f(zv);
  }
  static_cast<E*>(p.out)[idx] = from_float<E>(y);
}

template <typename E, typename S>
__global__ void conv_step_kernel(const ConvStepParams p) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int ch = idx % p.dim;
  const int W = p.width;
  S* st = static_cast<S*>(p.state) + (long)idx * W;
  const float xv = to_float(static_cast<const E*>(p.x)[idx]);
  float win[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k < W) win[k] = (k + 1 < W) ? to_float(st[k + 1]) : xv;
  float a = p.bias ? p.bias[ch] : 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k < W) {
      // the state holds its own dtype: round the window as the reference does
      const S sv = from_float<S>(win[k]);
      st[k] = sv;
      a = fmaf(to_float(sv), p.weight[ch * W + k], a);
    }
  if (p.silu) a = a * sigmoid_f(a);
  static_cast<E*>(p.out)[idx] = from_float<E>(a);
}

void ssm_step(StepParams& p, int dtype, cudaStream_t s) {
  const int total = p.batch * p.dim;
  const int threads = 128;
  const int blocks = (total + threads - 1) / threads;
  if (dtype == kF32) ssm_step_kernel<float><<<blocks, threads, 0, s>>>(p);
  else if (dtype == kF16) ssm_step_kernel<__half><<<blocks, threads, 0, s>>>(p);
  else ssm_step_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(p);
}

template <typename E>
static void conv_step_t(ConvStepParams& p, int state_dtype, int blocks, int threads, cudaStream_t s) {
  if (state_dtype == kF32) conv_step_kernel<E, float><<<blocks, threads, 0, s>>>(p);
  else if (state_dtype == kF16) conv_step_kernel<E, __half><<<blocks, threads, 0, s>>>(p);
  else conv_step_kernel<E, __nv_bfloat16><<<blocks, threads, 0, s>>>(p);
}

void conv_step(ConvStepParams& p, int x_dtype, int state_dtype, cudaStream_t s) {
  const int total = p.batch * p.dim;
  const int threads = 128;
  const int blocks = (total + threads - 1) / threads;
  if (x_dtype == kF32) conv_step_t<float>(p, state_dtype, blocks, threads, s);
  else if (x_dtype == kF16) conv_step_t<__half>(p, state_dtype, blocks, threads, s);
  else conv_step_t<__nv_bfloat16>(p, state_dtype, blocks, threads, s);
}

}  // namespace mambabyte

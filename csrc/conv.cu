// Causal depthwise conv1d (width 1..4) with a window state in and out: forward and backward.
//
// out[t] = act(bias + sum_k w[k] * xp[t + k]),  xp = cat(state[:, :, 1:], x)  (state: last w inputs
// seen before x, oldest first). new_state = last w columns of cat(state, x).
// Each thread owns kItems consecutive outputs of one (batch, channel) row; a block is one row
// segment, so the weight / bias gradients are reduced in the block and added with one atomic per
// warp.
#include "common.cuh"
#include "params.h"

namespace mambabyte {

constexpr int kConvItems = 8;
constexpr int kConvThreads = 128;

template <typename E, int kW>
__device__ __forceinline__ float conv_xp(const E* __restrict__ x, const float* __restrict__ st, int j, int L) {
  // position j in x's coordinates; j < 0 reads the state window (j = -1 is its newest column)
  if (j >= 0) return j < L ? to_float(x[j]) : 0.f;
  return st ? st[kW + j] : 0.f;
}

// Each thread loads its kConvItems inputs with 16-byte loads when the rows allow (p.vec); the kW - 1
// inputs left of them (and, in the backward, right of them) come from the neighbouring lane by a
// shuffle, so each input is read from memory once. Lanes at a warp's edge read their halo directly.
template <typename E, int kW>
__global__ void __launch_bounds__(kConvThreads) conv_fwd_kernel(const ConvParams p) {
  const int ch = blockIdx.y, bi = blockIdx.z;
  const int L = p.seqlen;
  const long bd = (long)bi * p.dim + ch;
  const E* x = static_cast<const E*>(p.x) + bd * L;
  const float* st = p.state ? p.state + bd * kW : nullptr;
  float w[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = p.weight[ch * kW + k];
  const float b = p.bias ? p.bias[ch] : 0.f;
  const int t0 = (blockIdx.x * kConvThreads + threadIdx.x) * kConvItems;
  const int lane = threadIdx.x & 31;
  if (p.new_state && blockIdx.x == 0 && threadIdx.x < kW) {
    const int j = threadIdx.x;  // new_state[j] = cat(state, x)[L + j]
    const int xi = L + j - kW;
    p.new_state[bd * kW + j] = xi >= 0 ? to_float(x[xi]) : (st ? st[L + j] : 0.f);
  }
  float xv[kConvItems];
  load_run_f<E, kConvItems>(x, t0, L, p.vec, xv);  // zero past L; every lane joins the shuffles
  float xs[kConvItems + kW - 1];
#pragma unroll
  for (int k = 0; k < kW - 1; ++k) {
    const float up = __shfl_up_sync(kFullMask, xv[kConvItems - (kW - 1) + k], 1);
    xs[k] = lane == 0 ? conv_xp<E, kW>(x, st, t0 - (kW - 1) + k, L) : up;
  }
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) xs[kW - 1 + i] = xv[i];
  if (t0 >= L) return;
  float o[kConvItems];
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) {
    float a = b;
#pragma unroll
    for (int k = 0; k < kW; ++k) a = fmaf(w[k], xs[i + k], a);
    if (p.silu) a = a * sigmoid_f(a);
    o[i] = a;
  }
  store_run_f<E, kConvItems>(static_cast<E*>(p.out) + bd * L, t0, L, p.vec, o);
}

template <typename E, int kW>
__global__ void __launch_bounds__(kConvThreads) conv_bwd_kernel(const ConvParams p) {
  constexpr int kP = kConvItems + kW - 1;  // dpre values a thread needs (its outputs + right halo)
  constexpr int kX = kP + kW - 1;          // inputs needed to recompute them
  const int ch = blockIdx.y, bi = blockIdx.z;
  const int L = p.seqlen;
  const long bd = (long)bi * p.dim + ch;
  const E* x = static_cast<const E*>(p.x) + bd * L;
  const E* dout = static_cast<const E*>(p.dout) + bd * L;
  const float* st = p.state ? p.state + bd * kW : nullptr;
  const float* dfin = p.dfinal ? p.dfinal + bd * kW : nullptr;
  float w[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = p.weight[ch * kW + k];
  const float b = p.bias ? p.bias[ch] : 0.f;
  const int t0 = (blockIdx.x * kConvThreads + threadIdx.x) * kConvItems;
  const int lane = threadIdx.x & 31;

  float xv[kConvItems], gv[kConvItems];
  load_run_f<E, kConvItems>(x, t0, L, p.vec, xv);
  load_run_f<E, kConvItems>(dout, t0, L, p.vec, gv);
  float xs[kX];
#pragma unroll
  for (int k = 0; k < kW - 1; ++k) {  // left halo from lane - 1, right halo from lane + 1
    const float up = __shfl_up_sync(kFullMask, xv[kConvItems - (kW - 1) + k], 1);
    const float dn = __shfl_down_sync(kFullMask, xv[k], 1);
    xs[k] = lane == 0 ? conv_xp<E, kW>(x, st, t0 - (kW - 1) + k, L) : up;
    xs[kW - 1 + kConvItems + k] = lane == 31 ? conv_xp<E, kW>(x, st, t0 + kConvItems + k, L) : dn;
  }
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) xs[kW - 1 + i] = xv[i];
  float dp[kP];
#pragma unroll
  for (int e = 0; e < kP; ++e) {
    float g;
    if (e < kConvItems) {
      g = gv[e];
    } else {
      const float dn = __shfl_down_sync(kFullMask, gv[e - kConvItems], 1);
      const int t = t0 + e;
      g = lane == 31 ? (t < L ? to_float(dout[t]) : 0.f) : dn;
    }
    if (p.silu) {
      float a = b;
#pragma unroll
      for (int k = 0; k < kW; ++k) a = fmaf(w[k], xs[e + k], a);
      const float s = sigmoid_f(a);
      g *= s * (1.f + a * (1.f - s));
    }
    dp[e] = g;  // zero past L (dout is read as zero there)
  }
  float gw[kW], gb = 0.f;
#pragma unroll
  for (int k = 0; k < kW; ++k) gw[k] = 0.f;
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) {
    gb += dp[i];
#pragma unroll
    for (int k = 0; k < kW; ++k) gw[k] = fmaf(dp[i], xs[i + k], gw[k]);
  }
  if (t0 < L) {
    float g[kConvItems];
#pragma unroll
    for (int i = 0; i < kConvItems; ++i) {
      const int t = t0 + i;
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < kW; ++k) v = fmaf(w[k], dp[i + kW - 1 - k], v);
      const int j = t - L + kW;  // x[t] is new_state[j] when 0 <= j < kW
      if (dfin && j >= 0 && t < L) v += dfin[j];
      g[i] = v;
    }
    store_run_f<E, kConvItems>(static_cast<E*>(p.dx) + bd * L, t0, L, p.vec, g);
  }
  if (p.dstate && blockIdx.x == 0 && threadIdx.x == 0) {
#pragma unroll
    for (int m = 0; m < kW; ++m) {
      float g = 0.f;
#pragma unroll
      for (int k = 0; k < kW; ++k) {
        const int e = m - 1 - k;  // state column m feeds output t = m - 1 - k through tap k
        if (e >= 0) g = fmaf(w[k], dp[e], g);
      }
      if (dfin && m >= L) g += dfin[m - L];
      p.dstate[bd * kW + m] = g;
    }
  }
  // reduce the weight / bias gradients over the warp, one atomic per warp
  gb = warp_sum(gb);
#pragma unroll
  for (int k = 0; k < kW; ++k) gw[k] = warp_sum(gw[k]);
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < kW; ++k) atomicAdd(p.dweight + ch * kW + k, gw[k]);
    if (p.dbias) atomicAdd(p.dbias + ch, gb);
  }
}

template <typename E>
static void conv_fwd_t(ConvParams& p, cudaStream_t s) {
  const int per_block = kConvThreads * kConvItems;
  dim3 grid((p.seqlen + per_block - 1) / per_block, p.dim, p.batch);
  if (grid.x == 0) grid.x = 1;
  switch (p.width) {
    case 1: conv_fwd_kernel<E, 1><<<grid, kConvThreads, 0, s>>>(p); break;
    case 2: conv_fwd_kernel<E, 2><<<grid, kConvThreads, 0, s>>>(p); break;
    case 3: conv_fwd_kernel<E, 3><<<grid, kConvThreads, 0, s>>>(p); break;
    default: conv_fwd_kernel<E, 4><<<grid, kConvThreads, 0, s>>>(p); break;
  }
}

template <typename E>
static void conv_bwd_t(ConvParams& p, cudaStream_t s) {
  const int per_block = kConvThreads * kConvItems;
  dim3 grid((p.seqlen + per_block - 1) / per_block, p.dim, p.batch);
  if (grid.x == 0) grid.x = 1;
  switch (p.width) {
    case 1: conv_bwd_kernel<E, 1><<<grid, kConvThreads, 0, s>>>(p); break;
    case 2: conv_bwd_kernel<E, 2><<<grid, kConvThreads, 0, s>>>(p); break;
    case 3: conv_bwd_kernel<E, 3><<<grid, kConvThreads, 0, s>>>(p); break;
    default: conv_bwd_kernel<E, 4><<<grid, kConvThreads, 0, s>>>(p); break;
  }
}

void conv_fwd(ConvParams& p, int dtype, cudaStream_t s) {
  if (dtype == kF32) conv_fwd_t<float>(p, s);
  else if (dtype == kF16) conv_fwd_t<__half>(p, s);
  else conv_fwd_t<__nv_bfloat16>(p, s);
}

void conv_bwd(ConvParams& p, int dtype, cudaStream_t s) {
  if (dtype == kF32) conv_bwd_t<float>(p, s);
  else if (dtype == kF16) conv_bwd_t<__half>(p, s);
  else conv_bwd_t<__nv_bfloat16>(p, s);
}

}  // namespace mambabyte

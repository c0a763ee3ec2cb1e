// Residual add + LayerNorm / RMSNorm in one pass, for inference (the prefill / forward without
// autograd): one block per row of d_model values.
//
//   residual_out = hidden + residual        (in RT: fp32 with residual_in_fp32, else the model dtype)
//   normed       = norm(E(residual_out))    (statistics in fp32, output rounded to E once)
//
// This is Block._add_norm's arithmetic (torch's add, cast, LayerNorm / our RMSNorm) with the four
// kernels and three round trips through memory of the unfused path replaced by one read of hidden and
// residual and one write of each output. The row stays in registers (add_norm_vec_kernel, the usual
// case) or, for odd widths, in shared memory between the passes.
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

// 8 consecutive values of a 16-byte aligned row, as floats / from floats (one or two 16-byte accesses).
template <typename T>
__device__ __forceinline__ void load8f(const T* src, float (&f)[8]) {
  alignas(16) T v[8];
#pragma unroll
  for (int k = 0; k < 8 * (int)sizeof(T) / 16; ++k) reinterpret_cast<uint4*>(v)[k] = reinterpret_cast<const uint4*>(src)[k];
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(v[i]);
}
template <typename T>
__device__ __forceinline__ void store8(T* dst, const T (&v)[8]) {
#pragma unroll
  for (int k = 0; k < 8 * (int)sizeof(T) / 16; ++k) reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(v)[k];
}

// The same arithmetic with each thread owning 8 consecutive values of the row in registers: 16-byte
// loads and stores, no shared-memory copy of the row. grid (rows), block ceil(D / 8 / 32) warps;
// needs D % 8 == 0, D <= 8192 and 16-byte aligned rows (checked by the launcher).
template <typename E, typename RT>
__global__ void __launch_bounds__(1024) add_norm_vec_kernel(const AddNormParams p) {
  __shared__ float red[33];
  const int D = p.dim;
  const long row = (long)blockIdx.x * D;
  const int k0 = threadIdx.x * 8;
  const bool act = k0 < D;
  float x[8];
  float s = 0.f;
  if (act) {
    float h[8], r[8];
    load8f<E>(static_cast<const E*>(p.hidden) + row + k0, h);
    if (p.residual) {
      load8f<RT>(static_cast<const RT*>(p.residual) + row + k0, r);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) r[i] = 0.f;
    }
    alignas(16) RT ro[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      ro[i] = from_float<RT>(p.residual ? h[i] + r[i] : h[i]);
      x[i] = to_float(from_float<E>(to_float(ro[i])));  // the norm reads the residual cast to E
      s += x[i];
    }
    store8<RT>(static_cast<RT*>(p.residual_out) + row + k0, ro);
  }
  float mean = 0.f;
  if (!p.rms) mean = block_sum(s, red) / (float)D;
  float ss = 0.f;
  if (act) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = x[i] - mean;
      ss = fmaf(d, d, ss);
    }
  }
  const float rstd = rsqrtf(block_sum(ss, red) / (float)D + p.eps);
  if (act) {
    float w[8], b[8];
    load8f<E>(static_cast<const E*>(p.weight) + k0, w);
    if (p.bias) load8f<E>(static_cast<const E*>(p.bias) + k0, b);
    alignas(16) E o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float y = (x[i] - mean) * rstd * w[i];
      if (p.bias) y += b[i];
      o[i] = from_float<E>(y);
    }
    store8<E>(static_cast<E*>(p.out) + row + k0, o);
  }
}

inline bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename E>
void launch_e(const AddNormParams& p, cudaStream_t s) {
  if (p.dim % 8 == 0 && p.dim <= 8192 && aligned16(p.hidden) && aligned16(p.residual) && aligned16(p.residual_out) &&
      aligned16(p.out) && aligned16(p.weight) && aligned16(p.bias)) {
    const int threads = ((p.dim / 8 + 31) / 32) * 32;
    if (p.residual_f32) add_norm_vec_kernel<E, float><<<p.rows, threads, 0, s>>>(p);
    else add_norm_vec_kernel<E, E><<<p.rows, threads, 0, s>>>(p);
    return;
  }
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

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

// mean (0 for RMSNorm) and 1 / std of a row whose values the block's threads hold 8 each in registers
// (x; act: this thread holds some; s: the sum of its values). Every thread of the block calls it.
__device__ __forceinline__ void row_stats8(const float (&x)[8], bool act, float s, int D, bool rms, float eps,
                                           float* red, float& mean, float& rstd) {
  mean = rms ? 0.f : block_sum(s, red) / (float)D;
  float ss = 0.f;
  if (act) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = x[i] - mean;
      ss = fmaf(d, d, ss);
    }
  }
  rstd = rsqrtf(block_sum(ss, red) / (float)D + eps);
}

// out[k0 .. k0 + 8) = (x - mean) * rstd * weight (+ bias), in O.
template <typename W, typename O>
__device__ __forceinline__ void norm_store8(const float (&x)[8], float mean, float rstd, const W* weight, const W* bias,
                                            int k0, O* out) {
  float w[8], b[8];
  load8f<W>(weight + k0, w);
  if (bias) load8f<W>(bias + k0, b);
  alignas(16) O o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float y = (x[i] - mean) * rstd * w[i];
    if (bias) y += b[i];
    o[i] = from_float<O>(y);
  }
  store8<O>(out + k0, o);
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
  float mean, rstd;
  row_stats8(x, act, s, D, p.rms, p.eps, red, mean, rstd);
  if (act)
    norm_store8<E, E>(x, mean, rstd, static_cast<const E*>(p.weight), static_cast<const E*>(p.bias), k0,
                      static_cast<E*>(p.out) + row);
}

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

// ---- training: fp32 weights and residual stream, statistics saved for the backward -------------------

// grid (rows), block ceil(D / 8 / 32) warps; D % 8 == 0, D <= 8192, 16-byte aligned rows.
template <typename EH, typename O>
__global__ void __launch_bounds__(1024) add_norm_train_fwd_kernel(const AddNormTrainParams p) {
  __shared__ float red[33];
  const int D = p.dim;
  const long row = (long)blockIdx.x * D;
  const int k0 = threadIdx.x * 8;
  const bool act = k0 < D;
  float x[8];
  float s = 0.f;
  if (act) {
    load8f<EH>(static_cast<const EH*>(p.hidden) + row + k0, x);
    if (p.residual) {
      float r[8];
      load8f<float>(p.residual + row + k0, r);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] += r[i];
    }
    store8<float>(p.residual_out + row + k0, x);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += x[i];
  }
  float mean, rstd;
  row_stats8(x, act, s, D, p.rms, p.eps, red, mean, rstd);
  if (threadIdx.x == 0) {
    p.mean[blockIdx.x] = mean;
    p.rstd[blockIdx.x] = rstd;
  }
  if (act) norm_store8<float, O>(x, mean, rstd, p.weight, p.bias, k0, static_cast<O*>(p.out) + row);
}

// grid (p.blocks), block ceil(D / 8 / 32) warps; each block walks rows blockIdx.x, + gridDim.x, ...
// dx = rstd (g - mean(g) - xhat mean(g xhat)) + d(residual_out), g = dy w (RMSNorm: no mean(g) term);
// dweight / dbias are summed over the block's rows in registers and written as (blocks, D) partials.
template <typename EH, typename O>
__global__ void __launch_bounds__(1024) add_norm_train_bwd_kernel(const AddNormTrainParams p) {
  __shared__ float red[33];
  const int D = p.dim;
  const int k0 = threadIdx.x * 8;
  const bool act = k0 < D;
  float w[8], dwa[8], dba[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) dwa[i] = dba[i] = 0.f;
  if (act) load8f<float>(p.weight + k0, w);
  for (long r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const long row = r * D;
    const float mean = p.mean[r], rstd = p.rstd[r];
    float xh[8], g[8], dy[8];
    float s1 = 0.f, s2 = 0.f;  // sum g xhat, sum g
    if (act) {
      load8f<float>(p.residual_out + row + k0, xh);
      load8f<O>(static_cast<const O*>(p.dout) + row + k0, dy);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        xh[i] = (xh[i] - mean) * rstd;
        g[i] = dy[i] * w[i];
        s1 = fmaf(g[i], xh[i], s1);
        s2 += g[i];
        dwa[i] = fmaf(dy[i], xh[i], dwa[i]);
        dba[i] += dy[i];
      }
    }
    const float c1 = block_sum(s1, red) / (float)D;
    const float c2 = p.rms ? 0.f : block_sum(s2, red) / (float)D;
    if (act) {
      float dr[8];
      if (p.dres) {
        load8f<float>(p.dres + row + k0, dr);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) dr[i] = 0.f;
      }
      float dx[8];
      alignas(16) EH dh[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        dx[i] = fmaf(rstd, g[i] - c2 - xh[i] * c1, dr[i]);
        dh[i] = from_float<EH>(dx[i]);
      }
      store8<EH>(static_cast<EH*>(p.dhidden) + row + k0, dh);
      if (p.dresidual) store8<float>(p.dresidual + row + k0, dx);
    }
  }
  if (act) {
    store8<float>(p.dw_part + (long)blockIdx.x * D + k0, dwa);
    if (p.db_part) store8<float>(p.db_part + (long)blockIdx.x * D + k0, dba);
  }
}

template <typename EH, typename O>
void train_launch(const AddNormTrainParams& p, bool fwd, cudaStream_t s) {
  const int threads = ((p.dim / 8 + 31) / 32) * 32;
  if (fwd) add_norm_train_fwd_kernel<EH, O><<<p.rows, threads, 0, s>>>(p);
  else add_norm_train_bwd_kernel<EH, O><<<p.blocks, threads, 0, s>>>(p);
}

// (hidden, out) dtype pairs: bf16 / fp16 hidden with an output in the same dtype (autocast), fp32 hidden
// (the first block's embedding output) with any output.
bool train_dispatch(const AddNormTrainParams& p, int eh, int o, bool fwd, cudaStream_t s) {
  if (p.dim % 8 != 0 || p.dim > 8192 || p.rows == 0) return false;
  if (eh == kBF16 && o == kBF16) return train_launch<__nv_bfloat16, __nv_bfloat16>(p, fwd, s), true;
  if (eh == kF16 && o == kF16) return train_launch<__half, __half>(p, fwd, s), true;
  if (eh == kF32 && o == kBF16) return train_launch<float, __nv_bfloat16>(p, fwd, s), true;
  if (eh == kF32 && o == kF16) return train_launch<float, __half>(p, fwd, s), true;
  if (eh == kF32 && o == kF32) return train_launch<float, float>(p, fwd, s), true;
  return false;
}

}  // namespace

bool add_norm_train_fwd(const AddNormTrainParams& p, int hidden_dtype, int out_dtype, cudaStream_t s) {
  return train_dispatch(p, hidden_dtype, out_dtype, true, s);
}

bool add_norm_train_bwd(const AddNormTrainParams& p, int hidden_dtype, int out_dtype, cudaStream_t s) {
  return train_dispatch(p, hidden_dtype, out_dtype, false, s);
}

void add_norm(AddNormParams& p, int dtype, cudaStream_t s) {
  if (p.rows == 0) return;
  if (dtype == kF32) launch_e<float>(p, s);
  else if (dtype == kF16) launch_e<__half>(p, s);
  else launch_e<__nv_bfloat16>(p, s);
}

}  // namespace mambabyte

// One whole Mamba block per decode step in three launches (instead of ~10 small ones):
//
//   kernel 1 (layer_in_kernel)  residual add -> LayerNorm / RMSNorm -> in_proj GEMV -> conv window
//                               shift + conv + bias + silu -> x_proj partial sums over the block's
//                               channels; the last block of each group of kLsGroup blocks adds the
//                               group's partials in a fixed order (deterministic, no float atomics)
//   kernel 2 (layer_ssm_kernel) group sums -> x_proj output (dt_low, B, C) -> dt_proj + bias +
//                               softplus -> state update -> C readout + D skip -> silu(z) gate
//   kernel 3 (layer_out_kernel) out_proj GEMV
//
// x_proj needs every channel's conv output and out_proj every channel's SSM output, so the three
// cannot be one launch without a grid-wide barrier. Intermediates are rounded to the weights' dtype
// E where the unfused path rounds them (in_proj, conv, x_proj and SSM outputs, the norm's input and
// output), so both paths agree to accumulation order. Weights are read with 16-byte loads; the host
// checks d_model % 8 == 0, d_inner % 16 == 0 and 16-byte aligned weights.
#include "common.cuh"
#include "params.h"

namespace mambabyte {
namespace {

constexpr int kInThreads = 256;   // kernel 1: 8 warps x 4 in_proj rows (2 x rows + 2 z rows)
constexpr int kSsmThreads = 128;  // kernel 2: one channel per thread, one batch row per blockIdx.y
constexpr int kOutWarps = 8;      // kernel 3: one out_proj row per warp
static_assert(kLsInChannels == 2 * (kInThreads / 32), "each warp owns two channels");

template <typename E>
__device__ __forceinline__ float round_e(float v) {
  return to_float(from_float<E>(v));
}

// The 16 / sizeof(E) values of a 16-byte vector, as floats.
template <typename E>
__device__ __forceinline__ void unpack16(const uint4& v, float (&f)[16 / sizeof(E)]) {
  const E* e = reinterpret_cast<const E*>(&v);
#pragma unroll
  for (int i = 0; i < (int)(16 / sizeof(E)); ++i) f[i] = to_float(e[i]);
}

// Sum over the block; every thread gets it. red: shared float[33]; reusable on return.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  const float r = red[32];
  __syncthreads();
  return r;
}

// grid (d_inner / kLsInChannels, ceil(batch / kLsMaxB)); dynamic smem: min(batch, 8) * D * sizeof(E).
template <typename E, typename RT>
__global__ void __launch_bounds__(kInThreads) layer_in_kernel(const LayerStepParams p) {
  constexpr int V = 16 / sizeof(E);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* s_norm = reinterpret_cast<E*>(smem_raw);  // [nb][D]: the norm's input, then its output
  __shared__ float s_red[33];
  __shared__ float s_xz[kLsMaxB][2 * kLsInChannels];
  __shared__ float s_xc[kLsMaxB][kLsInChannels];
  __shared__ int s_last;

  const int Dm = p.d_model, di = p.d_inner, J = p.dt_rank + 2 * p.d_state;
  const int chunk = blockIdx.y, b0 = chunk * kLsMaxB;
  const int nb = min(kLsMaxB, p.batch - b0);
  const int c0 = blockIdx.x * kLsInChannels;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 1. residual add (in RT); the norm reads the residual cast to E
  for (int bi = 0; bi < nb; ++bi) {
    const long row = (long)(b0 + bi) * Dm;
    const E* h = static_cast<const E*>(p.hidden) + row;
    const RT* r = p.residual ? static_cast<const RT*>(p.residual) + row : nullptr;
    RT* ro = static_cast<RT*>(p.residual_out) + row;
    E* x = s_norm + bi * Dm;
    for (int k = tid; k < Dm; k += kInThreads) {
      float v = to_float(h[k]);
      if (r) v += to_float(r[k]);
      const RT rv = from_float<RT>(v);
      if (blockIdx.x == 0) ro[k] = rv;
      x[k] = from_float<E>(to_float(rv));
    }
  }
  __syncthreads();

  // 2. the norm, in fp32 per row, output rounded to E
  const E* nw = static_cast<const E*>(p.norm_w);
  const E* nbias = static_cast<const E*>(p.norm_b);
  for (int bi = 0; bi < nb; ++bi) {
    E* x = s_norm + bi * Dm;
    float mean = 0.f;
    if (!p.rms) {
      float s = 0.f;
      for (int k = tid; k < Dm; k += kInThreads) s += to_float(x[k]);
      mean = block_sum(s, s_red) / (float)Dm;
    }
    float ss = 0.f;
    for (int k = tid; k < Dm; k += kInThreads) {
      const float dv = to_float(x[k]) - mean;
      ss = fmaf(dv, dv, ss);
    }
    const float rstd = rsqrtf(block_sum(ss, s_red) / (float)Dm + p.eps);
    for (int k = tid; k < Dm; k += kInThreads) {
      float v = (to_float(x[k]) - mean) * rstd * to_float(nw[k]);
      if (nbias) v += to_float(nbias[k]);
      x[k] = from_float<E>(v);
    }
  }
  __syncthreads();

  // 3. in_proj: warp w computes x rows c0+w, c0+w+8 and the z rows (d_inner + the same channels)
  {
    const E* in_w = static_cast<const E*>(p.in_w);
    const E* wrow[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + warp + 8 * (j & 1);
      wrow[j] = in_w + (long)((j < 2) ? c : di + c) * Dm;
    }
    float acc[4][kLsMaxB];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int bi = 0; bi < kLsMaxB; ++bi) acc[j][bi] = 0.f;
#pragma unroll 2
    for (int k = lane * V; k < Dm; k += 32 * V) {
      float wf[4][V];
#pragma unroll
      for (int j = 0; j < 4; ++j) unpack16<E>(__ldg(reinterpret_cast<const uint4*>(wrow[j] + k)), wf[j]);
#pragma unroll
      for (int bi = 0; bi < kLsMaxB; ++bi) {
        if (bi < nb) {
          float xf[V];
          unpack16<E>(*reinterpret_cast<const uint4*>(s_norm + bi * Dm + k), xf);
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[j][bi] = fmaf(wf[j][i], xf[i], acc[j][bi]);
        }
      }
    }
    const E* in_b = static_cast<const E*>(p.in_b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lc = warp + 8 * (j & 1);  // local channel 0..15
      const int grow = (j < 2) ? c0 + lc : di + c0 + lc;
#pragma unroll
      for (int bi = 0; bi < kLsMaxB; ++bi) {
        if (bi < nb) {
          float v = warp_sum(acc[j][bi]);
          if (lane == 0) {
            if (in_b) v += to_float(in_b[grow]);
            s_xz[bi][(j < 2 ? 0 : kLsInChannels) + lc] = round_e<E>(v);
          }
        }
      }
    }
  }
  __syncthreads();

  // 4. conv step on this block's channels: shift the window in place, conv + bias, silu
  if (tid < nb * kLsInChannels) {
    const int bi = tid / kLsInChannels, j = tid % kLsInChannels, c = c0 + j;
    const int W = p.d_conv;
    const long bc = (long)(b0 + bi) * di + c;
    float* st = p.conv_state + bc * W;
    const float xv = s_xz[bi][j];
    float win[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < W) win[k] = (k + 1 < W) ? st[k + 1] : xv;
    float a = p.conv_b ? p.conv_b[c] : 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < W) {
        st[k] = win[k];
        a = fmaf(win[k], p.conv_w[c * W + k], a);
      }
    a *= sigmoid_f(a);
    const E xe = from_float<E>(a);
    static_cast<E*>(p.xc)[bc] = xe;
    s_xc[bi][j] = to_float(xe);
    static_cast<E*>(p.z)[bc] = from_float<E>(s_xz[bi][kLsInChannels + j]);
  }
  __syncthreads();

  // 5. x_proj partial sums over this block's 16 channels
  const int nblk = p.n_in_blocks;
  float* part = p.part + ((long)chunk * nblk + blockIdx.x) * kLsMaxB * J;
  for (int j = tid; j < J; j += kInThreads) {
    const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const E*>(p.x_w) + (long)j * di + c0);
    float wf[kLsInChannels];
#pragma unroll
    for (int v = 0; v < kLsInChannels / V; ++v) {
      float f[V];
      unpack16<E>(__ldg(xr + v), f);
#pragma unroll
      for (int i = 0; i < V; ++i) wf[v * V + i] = f[i];
    }
#pragma unroll
    for (int bi = 0; bi < kLsMaxB; ++bi) {
      if (bi < nb) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kLsInChannels; ++i) s = fmaf(wf[i], s_xc[bi][i], s);
        part[bi * J + j] = s;
      }
    }
  }

  // 6. the last block of its group to finish adds the group's partials, in block order
  __threadfence();
  __syncthreads();
  const int g = blockIdx.x / kLsGroup, g0 = g * kLsGroup, gn = min(kLsGroup, nblk - g0);
  int* counter = p.counters + chunk * p.n_groups + g;
  if (tid == 0) s_last = (atomicAdd(counter, 1) == gn - 1);
  __syncthreads();
  if (s_last) {
    __threadfence();
    const float* gp = p.part + ((long)chunk * nblk + g0) * kLsMaxB * J;
    float* out = p.gpart + ((long)chunk * p.n_groups + g) * kLsMaxB * J;
    for (int e = tid; e < nb * J; e += kInThreads) {  // e = bi * J + j
      float s = 0.f;
      for (int m = 0; m < gn; ++m) s += __ldcg(gp + (long)m * kLsMaxB * J + e);
      out[e] = s;
    }
    if (tid == 0) *counter = 0;  // ready for the next call
  }
}

// grid (ceil(d_inner / kSsmThreads), batch); dynamic smem: (R + 2n) floats.
template <typename E>
__global__ void __launch_bounds__(kSsmThreads) layer_ssm_kernel(const LayerStepParams p) {
  constexpr int V = 16 / sizeof(E);
  extern __shared__ float s_x[];  // this row's x_proj output (dt_low, B, C), rounded to E
  const int di = p.d_inner, R = p.dt_rank, N = p.d_state, J = R + 2 * N;
  const int bb = blockIdx.y, chunk = bb / kLsMaxB, bi = bb % kLsMaxB;
  const float* gp = p.gpart + (long)chunk * p.n_groups * kLsMaxB * J + bi * J;
  for (int j = threadIdx.x; j < J; j += kSsmThreads) {
    float s = 0.f;
    for (int g = 0; g < p.n_groups; ++g) s += gp[(long)g * kLsMaxB * J + j];
    s_x[j] = round_e<E>(s);
  }
  __syncthreads();
  const int c = blockIdx.x * kSsmThreads + threadIdx.x;
  if (c >= di) return;
  const long bc = (long)bb * di + c;
  const E* wr = static_cast<const E*>(p.dt_w) + (long)c * R;
  float dt = 0.f;
  if (R % V == 0) {  // rows are 16-byte aligned (the host checks the base)
    for (int r = 0; r < R; r += V) {
      float f[V];
      unpack16<E>(__ldg(reinterpret_cast<const uint4*>(wr + r)), f);
#pragma unroll
      for (int i = 0; i < V; ++i) dt = fmaf(f[i], s_x[r + i], dt);
    }
  } else {
    for (int r = 0; r < R; ++r) dt = fmaf(to_float(wr[r]), s_x[r], dt);
  }
  if (p.dt_b) dt += p.dt_b[c];
  dt = softplus_f(dt);
  const float xv = to_float(static_cast<const E*>(p.xc)[bc]);
  const float* A = p.A + (long)c * N;
  float* st = p.ssm_state + bc * N;
  const float dx = dt * xv;
  float y = 0.f;
  for (int n = 0; n < N; ++n) {
    const float h = fmaf(__expf(dt * A[n]), st[n], dx * s_x[R + n]);
    st[n] = h;
    y = fmaf(h, s_x[R + N + n], y);
  }
  if (p.D) y = fmaf(xv, p.D[c], y);
  const float zv = to_float(static_cast<const E*>(p.z)[bc]);
  y *= zv * sigmoid_f(zv);
  static_cast<E*>(p.y)[bc] = from_float<E>(y);
}

// grid (ceil(d_model / kOutWarps), ceil(batch / kLsMaxB)).
template <typename E>
__global__ void __launch_bounds__(kOutWarps * 32) layer_out_kernel(const LayerStepParams p) {
  constexpr int V = 16 / sizeof(E);
  const int Dm = p.d_model, di = p.d_inner;
  const int lane = threadIdx.x & 31;
  const int d = blockIdx.x * kOutWarps + (threadIdx.x >> 5);
  const int b0 = blockIdx.y * kLsMaxB, nb = min(kLsMaxB, p.batch - b0);
  if (d >= Dm) return;  // whole warps
  const E* wr = static_cast<const E*>(p.out_w) + (long)d * di;
  const E* yb = static_cast<const E*>(p.y) + (long)b0 * di;
  float acc[kLsMaxB];
#pragma unroll
  for (int bi = 0; bi < kLsMaxB; ++bi) acc[bi] = 0.f;
#pragma unroll 2
  for (int k = lane * V; k < di; k += 32 * V) {
    float wf[V];
    unpack16<E>(__ldg(reinterpret_cast<const uint4*>(wr + k)), wf);
#pragma unroll
    for (int bi = 0; bi < kLsMaxB; ++bi) {
      if (bi < nb) {
        float yf[V];
        unpack16<E>(__ldg(reinterpret_cast<const uint4*>(yb + (long)bi * di + k)), yf);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[bi] = fmaf(wf[i], yf[i], acc[bi]);
      }
    }
  }
  const E* ob = static_cast<const E*>(p.out_b);
#pragma unroll
  for (int bi = 0; bi < kLsMaxB; ++bi) {
    if (bi < nb) {
      float v = warp_sum(acc[bi]);
      if (lane == 0) {
        if (ob) v += to_float(ob[d]);
        static_cast<E*>(p.out)[(long)(b0 + bi) * Dm + d] = from_float<E>(v);
      }
    }
  }
}

int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

template <typename E, typename RT>
void launch(LayerStepParams& p, int smem1, cudaStream_t s) {
  const int chunks = (p.batch + kLsMaxB - 1) / kLsMaxB;
  const int J = p.dt_rank + 2 * p.d_state;
  if (smem1 > 48 * 1024)
    cudaFuncSetAttribute(layer_in_kernel<E, RT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem1);
  layer_in_kernel<E, RT><<<dim3(p.n_in_blocks, chunks), kInThreads, smem1, s>>>(p);
  layer_ssm_kernel<E><<<dim3((p.d_inner + kSsmThreads - 1) / kSsmThreads, p.batch), kSsmThreads,
                        J * sizeof(float), s>>>(p);
  layer_out_kernel<E><<<dim3((p.d_model + kOutWarps - 1) / kOutWarps, chunks), kOutWarps * 32, 0, s>>>(p);
}

}  // namespace

int layer_step_smem(const LayerStepParams& p, int dtype) {
  const int rows = p.batch < kLsMaxB ? p.batch : kLsMaxB;
  const long need = (long)rows * p.d_model * elem_size(dtype);
  int dev = 0, limit = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // kernel 1's static shared memory (~1.4 KB) comes out of the same budget
  return need + 2048 <= limit ? (int)need : -1;
}

void layer_step(LayerStepParams& p, int dtype, cudaStream_t s) {
  const int smem1 = layer_step_smem(p, dtype);
  if (dtype == kF32) {
    launch<float, float>(p, smem1, s);
  } else if (dtype == kF16) {
    if (p.residual_f32) launch<__half, float>(p, smem1, s);
    else launch<__half, __half>(p, smem1, s);
  } else {
    if (p.residual_f32) launch<__nv_bfloat16, float>(p, smem1, s);
    else launch<__nv_bfloat16, __nv_bfloat16>(p, smem1, s);
  }
}

}  // namespace mambabyte

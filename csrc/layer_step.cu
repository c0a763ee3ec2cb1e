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
//
// Latency, not bandwidth, bounds a decode step at batch 1, so each kernel first issues the loads of
// what does not depend on the previous kernel (its weights), then waits on it. With programmatic
// dependent launch (Hopper, `pdl`), a kernel starts while its predecessor is still running: the
// weight loads of the next kernel overlap the tail of the previous one, across the three kernels and
// across blocks. Everything written by an earlier kernel is read after griddepcontrol.wait, through
// L2 (__ldcg), never through the non-coherent read-only path.
#include "common.cuh"
#include "params.h"

namespace mambabyte {
namespace {

constexpr int kInThreads = 256;   // kernel 1: 8 warps x 4 in_proj rows (2 x rows + 2 z rows)
constexpr int kSsmThreads = 128;  // kernel 2: one (channel, state) per thread, one batch row per blockIdx.y
constexpr int kOutWarps = 8;      // kernel 3: one out_proj row per warp
constexpr int kOutUnroll = 8;     // kernel 3: 16-byte weight loads in flight per lane
constexpr int kInPre = 2;         // kernel 1: in_proj weight vectors per row loaded before the wait

// Programmatic dependent launch: let the next kernel in the stream start now / wait for the previous
// one (its completion and its memory). No-ops below sm_90 and when launched without the attribute.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
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

  // 0. before waiting on the previous kernel: this warp's first in_proj weight vectors, this thread's
  //    x_proj row slice and conv taps (weights only: nothing an earlier kernel writes)
  const E* in_w = static_cast<const E*>(p.in_w);
  const E* wrow[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = c0 + warp + 8 * (j & 1);
    wrow[j] = in_w + (long)((j < 2) ? c : di + c) * Dm;
  }
  uint4 wpre[kInPre][4];
#pragma unroll
  for (int it = 0; it < kInPre; ++it) {
    const int k = (it * 32 + lane) * V;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k < Dm) wpre[it][j] = __ldg(reinterpret_cast<const uint4*>(wrow[j] + k));
  }
  constexpr int kXv = kLsInChannels / V;
  uint4 xwpre[kXv];
  if (tid < J) {
    const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const E*>(p.x_w) + (long)tid * di + c0);
#pragma unroll
    for (int v = 0; v < kXv; ++v) xwpre[v] = __ldg(xr + v);
  }
  float cw[4] = {0.f, 0.f, 0.f, 0.f}, cb = 0.f;
  if (tid < nb * kLsInChannels) {
    const int c = c0 + tid % kLsInChannels;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < p.d_conv) cw[k] = __ldg(p.conv_w + c * p.d_conv + k);
    if (p.conv_b) cb = __ldg(p.conv_b + c);
  }
  pdl_launch_dependents();
  pdl_wait();
  // this thread's conv window (written by the previous step's kernel 1), loaded now, used in step 4
  float win_old[4] = {0.f, 0.f, 0.f, 0.f};
  if (tid < nb * kLsInChannels) {
    const long bc = (long)(b0 + tid / kLsInChannels) * di + c0 + tid % kLsInChannels;
    const float* st = p.conv_state + bc * p.d_conv;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k + 1 < p.d_conv) win_old[k] = __ldcg(st + k + 1);
  }

  // 1. residual add (in RT); the norm reads the residual cast to E
  for (int bi = 0; bi < nb; ++bi) {
    const long row = (long)(b0 + bi) * Dm;
    const E* h = static_cast<const E*>(p.hidden) + row;
    const RT* r = p.residual ? static_cast<const RT*>(p.residual) + row : nullptr;
    RT* ro = static_cast<RT*>(p.residual_out) + row;
    E* x = s_norm + bi * Dm;
    for (int k = tid; k < Dm; k += kInThreads) {
      float v = to_float(__ldcg(h + k));
      if (r) v += to_float(__ldcg(r + k));
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
    float acc[4][kLsMaxB];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int bi = 0; bi < kLsMaxB; ++bi) acc[j][bi] = 0.f;
    auto fma_vec = [&](const uint4 (&wv)[4], int k) {
      float wf[4][V];
#pragma unroll
      for (int j = 0; j < 4; ++j) unpack16<E>(wv[j], wf[j]);
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
    };
#pragma unroll
    for (int it = 0; it < kInPre; ++it) {
      const int k = (it * 32 + lane) * V;
      if (k < Dm) fma_vec(wpre[it], k);
    }
#pragma unroll 2
    for (int k = (kInPre * 32 + lane) * V; k < Dm; k += 32 * V) {
      uint4 wv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) wv[j] = __ldg(reinterpret_cast<const uint4*>(wrow[j] + k));
      fma_vec(wv, k);
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
      if (k < W) win[k] = (k + 1 < W) ? win_old[k] : xv;
    float a = cb;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < W) {
        st[k] = win[k];
        a = fmaf(win[k], cw[k], a);
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
    for (int v = 0; v < kXv; ++v) {
      float f[V];
      unpack16<E>(j == tid ? xwpre[v] : __ldg(xr + v), f);
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

// Kernel 2's prologue: batch row (chunk, bi)'s x_proj output (dt_low, B, C) into s_x[R + 2n], the sum
// of kernel 1's group partials, rounded to E as the per-op x_proj output is. Ends with a barrier.
template <typename E>
__device__ __forceinline__ void load_xproj_sums(const LayerStepParams& p, int chunk, int bi, float* s_x) {
  const int J = p.dt_rank + 2 * p.d_state;
  const float* gp = p.gpart + (long)chunk * p.n_groups * kLsMaxB * J + bi * J;
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < p.n_groups; ++g) s += __ldcg(gp + (long)g * kLsMaxB * J + j);
    s_x[j] = round_e<E>(s);
  }
  __syncthreads();
}

// grid (ceil(d_inner / kSsmThreads), batch); dynamic smem: (R + 2n) floats.
template <typename E>
__global__ void __launch_bounds__(kSsmThreads) layer_ssm_kernel(const LayerStepParams p) {
  constexpr int V = 16 / sizeof(E);
  extern __shared__ float s_x[];  // this row's x_proj output (dt_low, B, C), rounded to E
  const int di = p.d_inner, R = p.dt_rank, N = p.d_state;
  const int bb = blockIdx.y, chunk = bb / kLsMaxB, bi = bb % kLsMaxB;
  pdl_launch_dependents();
  pdl_wait();
  load_xproj_sums<E>(p, chunk, bi, s_x);
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
  const float xv = to_float(__ldcg(static_cast<const E*>(p.xc) + bc));
  const float* A = p.A + (long)c * N;
  float* st = p.ssm_state + bc * N;
  const float dx = dt * xv;
  float y = 0.f;
  for (int n = 0; n < N; ++n) {
    const float h = fmaf(__expf(dt * A[n]), __ldcg(st + n), dx * s_x[R + n]);
    st[n] = h;
    y = fmaf(h, s_x[R + N + n], y);
  }
  if (p.D) y = fmaf(xv, p.D[c], y);
  const float zv = to_float(__ldcg(static_cast<const E*>(p.z) + bc));
  y *= zv * sigmoid_f(zv);
  static_cast<E*>(p.y)[bc] = from_float<E>(y);
}

// Kernel 2 when d_state is a power of two <= 32: P = d_state lanes per channel, one state each, so
// the fp32 state is read and written coalesced and 128 / P channels share a block.
// grid (ceil(d_inner / (128 / P)), batch); dynamic smem: (R + 2n) floats.
template <typename E>
__global__ void __launch_bounds__(kSsmThreads) layer_ssm_lanes_kernel(const LayerStepParams p) {
  extern __shared__ float s_x[];
  const int di = p.d_inner, R = p.dt_rank, N = p.d_state;
  const int P = N, cpb = kSsmThreads / P;
  const int bb = blockIdx.y, chunk = bb / kLsMaxB, bi = bb % kLsMaxB;
  const int n = threadIdx.x % P;
  const int c = blockIdx.x * cpb + threadIdx.x / P;
  const bool live = c < di;  // whole P-lane groups are live or not; all lanes join the shuffles
  // constants first (nothing an earlier kernel writes): A, biases, this lane's dt_proj weights
  constexpr int kDtPre = 8;  // dt_proj weights per lane held in registers (R <= 8 P; more are read later)
  float a = 0.f, dtb = 0.f, dd = 0.f, dtw[kDtPre];
  const E* wr = static_cast<const E*>(p.dt_w) + (long)(live ? c : 0) * R;
  if (live) {
    a = __ldg(p.A + (long)c * N + n);
    if (p.dt_b) dtb = __ldg(p.dt_b + c);
    if (p.D) dd = __ldg(p.D + c);
  }
#pragma unroll
  for (int i = 0; i < kDtPre; ++i) {
    const int r = n + i * P;
    dtw[i] = (live && r < R) ? to_float(__ldg(wr + r)) : 0.f;
  }
  pdl_launch_dependents();
  pdl_wait();
  // what kernel 1 wrote for this (row, channel) and the state, loaded before the x_proj reduction
  const long bc = (long)bb * di + c;
  float xv = 0.f, zv = 0.f, h0 = 0.f;
  if (live) {
    xv = to_float(__ldcg(static_cast<const E*>(p.xc) + bc));
    zv = to_float(__ldcg(static_cast<const E*>(p.z) + bc));
    h0 = __ldcg(p.ssm_state + bc * N + n);
  }
  load_xproj_sums<E>(p, chunk, bi, s_x);
  float dt = 0.f;
  if (live) {
#pragma unroll
    for (int i = 0; i < kDtPre; ++i)
      if (n + i * P < R) dt = fmaf(dtw[i], s_x[n + i * P], dt);
    for (int r = n + kDtPre * P; r < R; r += P) dt = fmaf(to_float(__ldg(wr + r)), s_x[r], dt);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < P) dt += __shfl_xor_sync(kFullMask, dt, off, P);
  float yp = 0.f;
  if (live) {
    dt = softplus_f(dt + dtb);
    const float h = fmaf(__expf(dt * a), h0, (dt * xv) * s_x[R + n]);
    p.ssm_state[bc * N + n] = h;
    yp = h * s_x[R + N + n];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < P) yp += __shfl_xor_sync(kFullMask, yp, off, P);
  if (live && n == 0) {
    float y = yp;
    if (p.D) y = fmaf(xv, dd, y);
    y *= zv * sigmoid_f(zv);
    static_cast<E*>(p.y)[bc] = from_float<E>(y);
  }
}

// grid (ceil(d_model / kOutWarps), ceil(batch / kLsMaxB)); dynamic smem: min(batch, 8) * d_inner * sizeof(E).
// The first kOutUnroll weight vectors of each lane are loaded before waiting on kernel 2 (the whole row
// when d_inner <= 32 * V * kOutUnroll); the block's y rows are staged once in shared memory for its
// kOutWarps rows (read from L2 once per block, not once per row).
template <typename E>
__global__ void __launch_bounds__(kOutWarps * 32) layer_out_kernel(const LayerStepParams p) {
  constexpr int V = 16 / sizeof(E);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* s_y = reinterpret_cast<E*>(smem_raw);
  constexpr int kSpan = 32 * V * kOutUnroll;
  const int Dm = p.d_model, di = p.d_inner;
  const int lane = threadIdx.x & 31;
  const int d = blockIdx.x * kOutWarps + (threadIdx.x >> 5);
  const int b0 = blockIdx.y * kLsMaxB, nb = min(kLsMaxB, p.batch - b0);
  const bool live = d < Dm;
  const E* wr = static_cast<const E*>(p.out_w) + (long)(live ? d : 0) * di;
  uint4 wv[kOutUnroll];
#pragma unroll
  for (int u = 0; u < kOutUnroll; ++u) {
    const int k = (u * 32 + lane) * V;
    if (live && k < di) wv[u] = __ldg(reinterpret_cast<const uint4*>(wr + k));
  }
  pdl_launch_dependents();
  pdl_wait();
  {
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const E*>(p.y) + (long)b0 * di);
    uint4* dst = reinterpret_cast<uint4*>(s_y);
    const int nvec = nb * di / V;
    for (int i = threadIdx.x; i < nvec; i += kOutWarps * 32) dst[i] = __ldcg(src + i);
  }
  __syncthreads();
  if (!live) return;  // whole warps
  const E* yb = s_y;
  float acc[kLsMaxB];
#pragma unroll
  for (int bi = 0; bi < kLsMaxB; ++bi) acc[bi] = 0.f;
  for (int k0 = 0; k0 < di; k0 += kSpan) {
    if (k0 > 0) {
#pragma unroll
      for (int u = 0; u < kOutUnroll; ++u) {
        const int k = k0 + (u * 32 + lane) * V;
        if (k < di) wv[u] = __ldg(reinterpret_cast<const uint4*>(wr + k));
      }
    }
#pragma unroll
    for (int u = 0; u < kOutUnroll; ++u) {
      const int k = k0 + (u * 32 + lane) * V;
      if (k < di) {
        float wf[V];
        unpack16<E>(wv[u], wf);
#pragma unroll
        for (int bi = 0; bi < kLsMaxB; ++bi) {
          if (bi < nb) {
            float yf[V];
            unpack16<E>(*reinterpret_cast<const uint4*>(yb + bi * di + k), yf);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[bi] = fmaf(wf[i], yf[i], acc[bi]);
          }
        }
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

// Launch with programmatic stream serialisation when pdl: the kernel may start before the previous
// kernel in the stream has finished (it waits with griddepcontrol.wait before reading its outputs).
template <typename... Args>
void launch_pdl(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl,
                const LayerStepParams& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, p);
}

template <typename E, typename RT>
void launch(LayerStepParams& p, int smem1, cudaStream_t s, bool pdl) {
  const int chunks = (p.batch + kLsMaxB - 1) / kLsMaxB;
  const int J = p.dt_rank + 2 * p.d_state;
  if (smem1 > 48 * 1024)
    cudaFuncSetAttribute(layer_in_kernel<E, RT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem1);
  launch_pdl(layer_in_kernel<E, RT>, dim3(p.n_in_blocks, chunks), dim3(kInThreads), smem1, s, pdl, p);
  const int N = p.d_state;
  if (N <= 32 && (N & (N - 1)) == 0) {
    const int cpb = kSsmThreads / N;
    launch_pdl(layer_ssm_lanes_kernel<E>, dim3((p.d_inner + cpb - 1) / cpb, p.batch), dim3(kSsmThreads),
               J * sizeof(float), s, pdl, p);
  } else {
    launch_pdl(layer_ssm_kernel<E>, dim3((p.d_inner + kSsmThreads - 1) / kSsmThreads, p.batch),
               dim3(kSsmThreads), J * sizeof(float), s, pdl, p);
  }
  const int smem3 = min(p.batch, kLsMaxB) * p.d_inner * (int)sizeof(E);
  if (smem3 > 48 * 1024)
    cudaFuncSetAttribute(layer_out_kernel<E>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem3);
  launch_pdl(layer_out_kernel<E>, dim3((p.d_model + kOutWarps - 1) / kOutWarps, chunks), dim3(kOutWarps * 32),
             smem3, s, pdl, p);
}

}  // namespace

int layer_step_smem(const LayerStepParams& p, int dtype) {
  const int rows = p.batch < kLsMaxB ? p.batch : kLsMaxB;
  const long need = (long)rows * p.d_model * elem_size(dtype);
  const long need3 = (long)rows * p.d_inner * elem_size(dtype);  // kernel 3's staged y rows
  int dev = 0, limit = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // kernel 1's static shared memory (~1.7 KB) comes out of the same budget
  return (need + 2048 <= limit && need3 <= limit) ? (int)need : -1;
}

void layer_step(LayerStepParams& p, int dtype, cudaStream_t s, bool pdl) {
  const int smem1 = layer_step_smem(p, dtype);
  if (dtype == kF32) {
    launch<float, float>(p, smem1, s, pdl);
  } else if (dtype == kF16) {
    if (p.residual_f32) launch<__half, float>(p, smem1, s, pdl);
    else launch<__half, __half>(p, smem1, s, pdl);
  } else {
    if (p.residual_f32) launch<__nv_bfloat16, float>(p, smem1, s, pdl);
    else launch<__nv_bfloat16, __nv_bfloat16>(p, smem1, s, pdl);
  }
}

}  // namespace mambabyte

// Selective scan (Mamba-1 recurrence) forward and backward, resumable from a state.
//
// Layout of the work: one warp owns one (batch, channel) row and walks it in chunks of
// kScanChunk = 32 lanes x kScanItems time steps. Each lane owns kScanItems consecutive steps.
// For each state index n the lane composes its steps into one affine map h -> P*h + S
// (P = prod exp(delta*A), S = state reached from zero), a warp shuffle scan composes the lanes,
// and the carry (state at the chunk start, kept in shared memory, any n) enters every lane through
// its exclusive prefix. There is no block-level synchronisation in the forward pass; a block holds a
// few channels of one batch element so that their shared B / C rows are served from L1.
//
// The backward pass walks the chunks in reverse. It re-computes the chunk's forward states from the
// chunk-start states the forward pass saved, then runs the reverse recurrence
//   Q_t = exp(delta_t A) * (dy_t C_t + Q_{t+1}),   Q_L = d(final_state),
// (Q_t is the gradient reaching h_{t-1} through step t) with the same lane/warp structure, so
//   G_t = dy_t C_t + Q_{t+1} = dL/dh_t,   d(initial_state) = Q_0.
// Per-channel sums (dA, fixed dB/dC, dD, d delta_bias) are warp-reduced; variable dB / dC are summed
// over the block's channels in shared memory and added to an fp32 buffer with atomics.
#pragma once

#include "common.cuh"
#include "params.h"

namespace mambabyte {

template <typename BE>
__device__ __forceinline__ void fetch_bc(const BE* __restrict__ base, int var, int n, int L, int t0, int vec,
                                         BE (&v)[kScanItems]) {
  if (var) {
    load_run<BE, kScanItems>(base + (long)n * L, t0, L, vec, v);
  } else {
    const BE c = base[n];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) v[i] = c;
  }
}

template <typename E, typename BE>
__global__ void __launch_bounds__(128) scan_fwd_kernel(const ScanParams p) {
  constexpr int kT = kScanItems;
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ch = blockIdx.x * nwarps + warp;
  const int bi = blockIdx.y;
  const int L = p.seqlen, N = p.dstate;
  if (ch >= p.dim) return;  // whole warp leaves (no block barriers in this kernel)
  float* carry = smem + warp * N;

  const long bd = (long)bi * p.dim + ch;
  const long row = bd * L;
  const E* u = static_cast<const E*>(p.u) + row;
  const E* dlt = static_cast<const E*>(p.delta) + row;
  const E* zr = p.z ? static_cast<const E*>(p.z) + row : nullptr;
  E* out = static_cast<E*>(p.out) + row;
  const float* A = p.A + (long)ch * N;
  const BE* Bb = static_cast<const BE*>(p.B);
  const BE* Cb = static_cast<const BE*>(p.C);
  Bb += p.B_var ? ((long)bi * p.B_groups + ch / p.B_cpg) * N * (long)L : (long)ch * N;
  Cb += p.C_var ? ((long)bi * p.C_groups + ch / p.C_cpg) * N * (long)L : (long)ch * N;

  for (int n = lane; n < N; n += 32) carry[n] = p.h0 ? p.h0[bd * N + n] : 0.f;
  __syncwarp();
  const float Dv = p.D ? p.D[ch] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[ch] : 0.f;

  for (int c = 0; c < p.n_chunks; ++c) {
    const int t0 = c * kScanChunk + lane * kT;
    float uv[kT], dl[kT], du[kT], y[kT];
    load_run_f<E, kT>(u, t0, L, p.in_vec, uv);
    load_run_f<E, kT>(dlt, t0, L, p.in_vec, dl);
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      float d = dl[i] + bias;
      if (p.softplus) d = softplus_f(d);
      dl[i] = (t0 + i < L) ? d : 0.f;  // padded steps: exp(0*A) = 1, input 0: state passes through
      du[i] = dl[i] * uv[i];
      y[i] = 0.f;
    }
    float* cs = p.chunk_states ? p.chunk_states + (bd * p.n_chunks + c) * N : nullptr;

    BE Bn[kT], Cn[kT];
    fetch_bc<BE>(Bb, p.B_var, 0, L, t0, p.B_vec, Bn);
    fetch_bc<BE>(Cb, p.C_var, 0, L, t0, p.C_vec, Cn);
#pragma unroll 1
    for (int n = 0; n < N; ++n) {
      float Bv[kT], Cv[kT];
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        Bv[i] = to_float(Bn[i]);
        Cv[i] = to_float(Cn[i]);
      }
      if (n + 1 < N) {  // prefetch the next state's B / C rows
        fetch_bc<BE>(Bb, p.B_var, n + 1, L, t0, p.B_vec, Bn);
        fetch_bc<BE>(Cb, p.C_var, n + 1, L, t0, p.C_vec, Cn);
      }
      const float a2 = A[n] * kLog2e;
      float h0l[kT], cp[kT];
      float h = 0.f, pr = 1.f;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        const float dA = exp2f(dl[i] * a2);
        pr *= dA;
        h = fmaf(dA, h, du[i] * Bv[i]);
        h0l[i] = h;
        cp[i] = pr;
      }
      float P = pr, S = h;
      warp_scan_fwd(P, S, lane);
      const float cin = carry[n];
      const float hend = fmaf(P, cin, S);
      float hin = __shfl_up_sync(kFullMask, hend, 1);
      if (lane == 0) hin = cin;
#pragma unroll
      for (int i = 0; i < kT; ++i) y[i] = fmaf(fmaf(cp[i], hin, h0l[i]), Cv[i], y[i]);
      const float cnew = __shfl_sync(kFullMask, hend, 31);
      if (lane == 0) {
        if (cs) cs[n] = cin;
        carry[n] = cnew;
      }
    }
    __syncwarp();

    float zv[kT];
    if (zr) load_run_f<E, kT>(zr, t0, L, p.in_vec, zv);
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      float o = fmaf(Dv, uv[i], y[i]);
      if (zr) o *= zv[i] * sigmoid_f(zv[i]);
      y[i] = o;
    }
    store_run_f<E, kT>(out, t0, L, p.in_vec, y);
  }
  if (p.final_state)
    for (int n = lane; n < N; n += 32) p.final_state[bd * N + n] = carry[n];
}

template <typename E, typename BE>
__global__ void __launch_bounds__(128) scan_bwd_kernel(const ScanParams p) {
  constexpr int kT = kScanItems;
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ch = blockIdx.x * nwarps + warp;  // the host picks nwarps | d: every warp is a channel
  const int bi = blockIdx.y;
  const int L = p.seqlen, N = p.dstate;
  const bool red = p.B_var || p.C_var;  // block-level reduction of variable dB / dC
  // shared: [nwarps][N] reverse carry, [nwarps][N] x3 per-channel sums, [2][nwarps][kScanChunk] exchange
  float* carry = smem + warp * N;
  float* accA = smem + nwarps * N + warp * N;
  float* accB = smem + 2 * nwarps * N + warp * N;
  float* accC = smem + 3 * nwarps * N + warp * N;
  float* xch = smem + ((4 * nwarps * N + 3) & ~3);  // [2][nwarps][kScanChunk], 16-byte aligned

  const long bd = (long)bi * p.dim + ch;
  const long row = bd * L;
  const E* u = static_cast<const E*>(p.u) + row;
  const E* dlt = static_cast<const E*>(p.delta) + row;
  const E* zr = p.z ? static_cast<const E*>(p.z) + row : nullptr;
  const E* dout = static_cast<const E*>(p.dout) + row;
  E* du_o = static_cast<E*>(p.du) + row;
  E* ddelta_o = static_cast<E*>(p.ddelta) + row;
  E* dz_o = p.z ? static_cast<E*>(p.dz) + row : nullptr;
  const float* A = p.A + (long)ch * N;
  const BE* Bb = static_cast<const BE*>(p.B);
  const BE* Cb = static_cast<const BE*>(p.C);
  const long Bg = p.B_var ? ((long)bi * p.B_groups + (long)ch / p.B_cpg) * N : 0;
  const long Cg = p.C_var ? ((long)bi * p.C_groups + (long)ch / p.C_cpg) * N : 0;
  Bb += p.B_var ? Bg * L : (long)ch * N;
  Cb += p.C_var ? Cg * L : (long)ch * N;

  for (int n = lane; n < N; n += 32) {
    carry[n] = p.dfinal ? p.dfinal[bd * N + n] : 0.f;
    accA[n] = 0.f;
    accB[n] = 0.f;
    accC[n] = 0.f;
  }
  __syncwarp();
  const float Dv = p.D ? p.D[ch] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[ch] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;

  for (int c = p.n_chunks - 1; c >= 0; --c) {
    const int t0 = c * kScanChunk + lane * kT;
    float uv[kT], dl[kT], spg[kT], dy[kT], gz[kT], dua[kT], dda[kT], y[kT];
    {
      float dr[kT], dov[kT];
      load_run_f<E, kT>(u, t0, L, p.in_vec, uv);
      load_run_f<E, kT>(dlt, t0, L, p.in_vec, dr);
      load_run_f<E, kT>(dout, t0, L, p.in_vec, dov);
      float zv[kT];
      if (zr) load_run_f<E, kT>(zr, t0, L, p.in_vec, zv);
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        const bool in = t0 + i < L;
        const float d = dr[i] + bias;
        dl[i] = in ? (p.softplus ? softplus_f(d) : d) : 0.f;
        spg[i] = in ? (p.softplus ? sigmoid_f(d) : 1.f) : 0.f;
        const float go = in ? dov[i] : 0.f;
        if (zr) {
          const float s = sigmoid_f(zv[i]);
          dy[i] = go * zv[i] * s;
          gz[i] = go * s * (1.f + zv[i] * (1.f - s));
        } else {
          dy[i] = go;
          gz[i] = 0.f;
        }
        dua[i] = dy[i] * Dv;
        dda[i] = 0.f;
        y[i] = 0.f;
      }
    }
    const float* cs = p.chunk_states + (bd * p.n_chunks + c) * N;

#pragma unroll 1
    for (int n = 0; n < N; ++n) {
      float Bv[kT], Cv[kT];
      {
        BE Br[kT], Cr[kT];
        fetch_bc<BE>(Bb, p.B_var, n, L, t0, p.B_vec, Br);
        fetch_bc<BE>(Cb, p.C_var, n, L, t0, p.C_vec, Cr);
#pragma unroll
        for (int i = 0; i < kT; ++i) {
          Bv[i] = to_float(Br[i]);
          Cv[i] = to_float(Cr[i]);
        }
      }
      const float a = A[n];
      const float a2 = a * kLog2e;
      // forward re-computation of this chunk's states
      float dA[kT], hv[kT], cp[kT];
      float h = 0.f, pr = 1.f;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        dA[i] = exp2f(dl[i] * a2);
        pr *= dA[i];
        h = fmaf(dA[i], h, dl[i] * uv[i] * Bv[i]);
        hv[i] = h;
        cp[i] = pr;
      }
      float P = pr, S = h;
      warp_scan_fwd(P, S, lane);
      const float hstart = cs[n];
      const float hend = fmaf(P, hstart, S);
      float hin = __shfl_up_sync(kFullMask, hend, 1);
      if (lane == 0) hin = hstart;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        hv[i] = fmaf(cp[i], hin, hv[i]);
        y[i] = fmaf(hv[i], Cv[i], y[i]);
      }
      // reverse recurrence, lane-local from zero
      float Q0[kT], rp[kT];
      float q = 0.f, r = 1.f;
#pragma unroll
      for (int i = kT - 1; i >= 0; --i) {
        q = dA[i] * fmaf(dy[i], Cv[i], q);
        r *= dA[i];
        Q0[i] = q;
        rp[i] = r;
      }
      P = r;
      S = q;
      warp_scan_rev(P, S, lane);
      const float cq = carry[n];
      const float qs = fmaf(P, cq, S);
      float qin = __shfl_down_sync(kFullMask, qs, 1);
      if (lane == 31) qin = cq;

      float gA = 0.f, gB = 0.f, gC = 0.f;
      float qnext = qin;
      float vB[kT], vC[kT];
#pragma unroll
      for (int i = kT - 1; i >= 0; --i) {
        const float Q = fmaf(rp[i], qin, Q0[i]);
        const float G = fmaf(dy[i], Cv[i], qnext);
        const float hprev = (i == 0) ? hin : hv[i - 1];
        const float Qh = Q * hprev;
        dda[i] = fmaf(G * uv[i], Bv[i], fmaf(Qh, a, dda[i]));
        dua[i] = fmaf(G * dl[i], Bv[i], dua[i]);
        gA = fmaf(Qh, dl[i], gA);
        vB[i] = G * dl[i] * uv[i];
        vC[i] = dy[i] * hv[i];
        gB += vB[i];
        gC += vC[i];
        qnext = Q;
      }
      if (p.B_var) {
        float4* xB = reinterpret_cast<float4*>(xch + (0 * nwarps + warp) * kScanChunk + lane * kT);
#pragma unroll
        for (int j = 0; j < kT / 4; ++j) xB[j] = make_float4(vB[4 * j], vB[4 * j + 1], vB[4 * j + 2], vB[4 * j + 3]);
      }
      if (p.C_var) {
        float4* xC = reinterpret_cast<float4*>(xch + (1 * nwarps + warp) * kScanChunk + lane * kT);
#pragma unroll
        for (int j = 0; j < kT / 4; ++j) xC[j] = make_float4(vC[4 * j], vC[4 * j + 1], vC[4 * j + 2], vC[4 * j + 3]);
      }
      const float cqnew = __shfl_sync(kFullMask, qs, 0);
      gA = warp_sum(gA);
      if (!p.B_var) gB = warp_sum(gB);
      if (!p.C_var) gC = warp_sum(gC);
      if (lane == 0) {
        carry[n] = cqnew;
        accA[n] += gA;
        if (!p.B_var) accB[n] += gB;
        if (!p.C_var) accC[n] += gC;
      }
      if (red) {
        __syncthreads();
        // sum the block's channels, 4 consecutive positions per thread, one vector atomic each
        for (int q4 = threadIdx.x; q4 < 2 * kScanChunk / 4; q4 += blockDim.x) {
          const int which = (q4 * 4) / kScanChunk;  // 0: B, 1: C
          const int pos = (q4 * 4) % kScanChunk;
          if (which == 0 ? !p.B_var : !p.C_var) continue;
          float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int w = 0; w < nwarps; ++w) {
            const float4 v = *reinterpret_cast<const float4*>(xch + (which * nwarps + w) * kScanChunk + pos);
            s.x += v.x;
            s.y += v.y;
            s.z += v.z;
            s.w += v.w;
          }
          float* dst = (which == 0 ? p.dB + (Bg + n) * (long)p.Lpad : p.dC + (Cg + n) * (long)p.Lpad) +
                       c * kScanChunk + pos;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float4*>(dst), s);
#else
          atomicAdd(dst + 0, s.x);
          atomicAdd(dst + 1, s.y);
          atomicAdd(dst + 2, s.z);
          atomicAdd(dst + 3, s.w);
#endif
        }
        __syncthreads();
      }
    }
    __syncwarp();

    float ddr[kT], dzv[kT];
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      dD_acc = fmaf(dy[i], uv[i], dD_acc);
      ddr[i] = dda[i] * spg[i];  // spg is 0 on padded steps
      dbias_acc += ddr[i];
      dzv[i] = gz[i] * fmaf(Dv, uv[i], y[i]);
    }
    store_run_f<E, kT>(du_o, t0, L, p.in_vec, dua);
    store_run_f<E, kT>(ddelta_o, t0, L, p.in_vec, ddr);
    if (zr) store_run_f<E, kT>(dz_o, t0, L, p.in_vec, dzv);
  }
  __syncwarp();
  for (int n = lane; n < N; n += 32) {
    p.dh0[bd * N + n] = carry[n];
    p.dA_part[bd * N + n] = accA[n];
    if (!p.B_var) p.dB[bd * N + n] = accB[n];
    if (!p.C_var) p.dC[bd * N + n] = accC[n];
  }
  dD_acc = warp_sum(dD_acc);
  dbias_acc = warp_sum(dbias_acc);
  if (lane == 0) {
    p.dD_part[bd] = dD_acc;
    p.dbias_part[bd] = dbias_acc;
  }
}

inline int scan_warps_per_block(const ScanParams& p) {
  // the channels of one block must share their B / C group (the backward sums dB / dC over them)
  for (int w : {4, 2}) {
    if (p.dim % w == 0 && (!p.B_var || p.B_cpg % w == 0) && (!p.C_var || p.C_cpg % w == 0)) return w;
  }
  return 1;
}

template <typename E, typename BE>
void scan_fwd_launch(ScanParams& p, cudaStream_t s) {
  const int nw = scan_warps_per_block(p);
  dim3 grid((p.dim + nw - 1) / nw, p.batch);
  const size_t sm = sizeof(float) * nw * p.dstate;
  scan_fwd_kernel<E, BE><<<grid, nw * 32, sm, s>>>(p);
}

template <typename E, typename BE>
void scan_bwd_launch(ScanParams& p, cudaStream_t s) {
  const int nw = scan_warps_per_block(p);
  dim3 grid(p.dim / nw, p.batch);
  const size_t sm = sizeof(float) * (((4 * nw * p.dstate + 3) & ~3) + 2 * nw * kScanChunk);
  if (sm > 48 * 1024) {
    cudaFuncSetAttribute(scan_bwd_kernel<E, BE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  }
  scan_bwd_kernel<E, BE><<<grid, nw * 32, sm, s>>>(p);
}

}  // namespace mambabyte

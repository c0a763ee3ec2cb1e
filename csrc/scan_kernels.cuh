// Selective scan (Mamba-1 recurrence) forward and backward, resumable from a state.
//
// Layout of the work: one warp owns one (batch, channel) row and walks it in chunks of
// 32 lanes x kT time steps (kT = kScanItems = 8: 256 steps). Each lane owns kT consecutive steps.
// For each state index n the lane composes its steps into one affine map h -> P*h + S
// (P = exp2(A log2(e) * sum delta) over the lane, S = state reached from zero), a warp shuffle scan
// composes the lanes, and the carry (state at the chunk start, kept in shared memory, any n) enters
// every lane through its exclusive prefix; a second pass over the lane's steps then produces the
// states and y = sum_n C h. A block holds 4 channels of one batch element (8 in the backward): when B
// and C are both variable, each chunk of their rows is staged once per block in shared memory by
// cp.async one chunk ahead (double-buffered), and u / delta / z of the next chunk are prefetched into
// registers, so the n loop reads only registers and shared memory. In the staged forward two states
// are processed per iteration (their shuffle scans interleave).
//
// The backward pass walks the chunks in reverse. It re-computes the chunk's forward states from the
// chunk-start states the forward pass saved (every 256 steps), then runs the reverse recurrence
//   Q_t = exp(delta_t A) * (dy_t C_t + Q_{t+1}),   Q_L = d(final_state),
// (Q_t is the gradient reaching h_{t-1} through step t) with the same lane/warp structure, so
//   G_t = dy_t C_t + Q_{t+1} = dL/dh_t,   d(initial_state) = Q_0.
// The forward re-computation scan and the reverse scan are interleaved (they are independent).
// Per-channel sums (dA, fixed dB/dC, dD, d delta_bias) are warp-reduced into per-batch partials;
// variable dB / dC are summed over the block's channels in shared memory (double-buffered, one
// barrier per state index) and added to an fp32 buffer with 16-byte vector atomics.
#pragma once

#include "common.cuh"
#include "params.h"

#include <algorithm>
#include <type_traits>

namespace mambabyte {

// The forward's per-row pointers: u, delta, z (or null) and out, at row offset (batch * dim + channel) * L.
template <typename E>
struct FwdRow {
  const E* u;
  const E* dlt;
  const E* z;
  E* out;
  __device__ __forceinline__ FwdRow(const ScanParams& p, long row)
      : u(static_cast<const E*>(p.u) + row),
        dlt(static_cast<const E*>(p.delta) + row),
        z(p.z ? static_cast<const E*>(p.z) + row : nullptr),
        out(static_cast<E*>(p.out) + row) {}
};

template <typename BE, int kT>
__device__ __forceinline__ void fetch_bc(const BE* __restrict__ base, int var, int n, int L, int t0, int vec,
                                         BE (&v)[kT]) {
  if (var) {
    load_run<BE, kT>(base + (long)n * L, t0, L, vec, v);
  } else {
    const BE c = base[n];
#pragma unroll
    for (int i = 0; i < kT; ++i) v[i] = c;
  }
}

// kStage: B and C are both variable; each chunk of their rows is staged in shared memory (cp.async,
// double-buffered, one chunk ahead) and shared by the block's channels.
// kNP: states processed together in the n loop (2: two independent shuffle scans interleaved).
template <typename E, typename BE, int kT, int kMinBlocks, bool kStage, int kNP>
__global__ void __launch_bounds__(128, kMinBlocks) scan_fwd_kernel(const ScanParams p) {
  constexpr int kChunk = 32 * kT;
  constexpr int kSavesPerChunk = kChunk / kScanChunk;  // states saved every kScanChunk steps
  constexpr int kLanesPerSave = kScanChunk / kT;
  static_assert(kStage || kNP == 1, "the register-prefetch path takes one state at a time");
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ch = blockIdx.x * nwarps + warp;
  const int bi = blockIdx.y;
  const int L = p.seqlen, N = p.dstate;
  float* carry = smem + warp * N;
  BE* stage = reinterpret_cast<BE*>(smem + ((nwarps * N + 3) & ~3));  // [2][2][N][kChunk] when kStage
  const int n_chunks = (L + kChunk - 1) / kChunk;

  const long bd = (long)bi * p.dim + ch;
  const FwdRow<E> rp(p, bd * L);
  const E *u = rp.u, *dlt = rp.dlt, *zr = rp.z;
  E* out = rp.out;
  const float* A = p.A + (long)ch * N;
  const BE* Bb = static_cast<const BE*>(p.B);
  const BE* Cb = static_cast<const BE*>(p.C);
  Bb += p.B_var ? ((long)bi * p.B_groups + ch / p.B_cpg) * N * (long)L : (long)ch * N;
  Cb += p.C_var ? ((long)bi * p.C_groups + ch / p.C_cpg) * N * (long)L : (long)ch * N;

  for (int n = lane; n < N; n += 32) carry[n] = p.h0 ? p.h0[bd * N + n] : 0.f;
  __syncwarp();
  const float Dv = p.D ? p.D[ch] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[ch] : 0.f;

  if constexpr (kStage) {
    stage_bc_rows<BE, kChunk>(stage, Bb, Cb, N, L, 0, p.B_vec, p.C_vec);
    cp_async_commit();
  }
  // raw inputs of the next chunk, loaded one chunk ahead
  E ru[kT], rd[kT], rz[kT];
  load_run<E, kT>(u, lane * kT, L, p.in_vec, ru);
  load_run<E, kT>(dlt, lane * kT, L, p.in_vec, rd);
  if (zr) load_run<E, kT>(zr, lane * kT, L, p.in_vec, rz);

  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * kChunk + lane * kT;
    float uv[kT], dl[kT], du[kT], y[kT], zv[kT];
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      uv[i] = to_float(ru[i]);
      dl[i] = to_float(rd[i]);
      zv[i] = zr ? to_float(rz[i]) : 0.f;
    }
    if (c + 1 < n_chunks) {
      load_run<E, kT>(u, t0 + kChunk, L, p.in_vec, ru);
      load_run<E, kT>(dlt, t0 + kChunk, L, p.in_vec, rd);
      if (zr) load_run<E, kT>(zr, t0 + kChunk, L, p.in_vec, rz);
    }
    float dsum = 0.f;
#pragma unroll
    for (int i = 0; i < kT; ++i) {
      float d = dl[i] + bias;
      if (p.softplus) d = softplus_f(d);
      dl[i] = (t0 + i < L) ? d : 0.f;  // padded steps: exp(0*A) = 1, input 0: state passes through
      dsum += dl[i];
      du[i] = dl[i] * uv[i];
      y[i] = 0.f;
    }
    float* cs = p.chunk_states ? p.chunk_states + (bd * p.n_save + (long)c * kSavesPerChunk) * N : nullptr;

    const BE* st = stage + (c & 1) * 2 * N * kChunk;
    if constexpr (kStage) {
      if (c + 1 < n_chunks) stage_bc_rows<BE, kChunk>(stage + ((c + 1) & 1) * 2 * N * kChunk, Bb, Cb, N, L,
                                                      (c + 1) * kChunk, p.B_vec, p.C_vec);
      cp_async_commit();
      cp_async_wait<1>();  // this chunk's rows have landed (for this thread's copies) ...
      __syncthreads();     // ... and for everyone's
    }
    alignas(16) BE Bn[kT], Cn[kT];
    if constexpr (!kStage) {
      fetch_bc<BE, kT>(Bb, p.B_var, 0, L, t0, p.B_vec, Bn);
      fetch_bc<BE, kT>(Cb, p.C_var, 0, L, t0, p.C_vec, Cn);
    }
#pragma unroll 1
    for (int n = 0; n < N; n += kNP) {  // kNP states at a time: independent chains to overlap
      float Cv[kNP][kT], dA[kNP][kT], dBu[kNP][kT], P[kNP], S[kNP];
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        float Bv[kT];
        if constexpr (kStage) {
          alignas(16) BE Br[kT], Cr[kT];
          const uint4* sb = reinterpret_cast<const uint4*>(st + (n + j) * kChunk + lane * kT);
          const uint4* sc = reinterpret_cast<const uint4*>(st + (N + n + j) * kChunk + lane * kT);
#pragma unroll
          for (int v = 0; v < kT * (int)sizeof(BE) / 16; ++v) {
            reinterpret_cast<uint4*>(Br)[v] = sb[v];
            reinterpret_cast<uint4*>(Cr)[v] = sc[v];
          }
#pragma unroll
          for (int i = 0; i < kT; ++i) {
            Bv[i] = to_float(Br[i]);
            Cv[j][i] = to_float(Cr[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kT; ++i) {
            Bv[i] = to_float(Bn[i]);
            Cv[j][i] = to_float(Cn[i]);
          }
          if (n + 1 < N) {  // prefetch the next state's B / C rows (kNP == 1 here)
            fetch_bc<BE, kT>(Bb, p.B_var, n + 1, L, t0, p.B_vec, Bn);
            fetch_bc<BE, kT>(Cb, p.C_var, n + 1, L, t0, p.C_vec, Cn);
          }
        }
        const float a2 = A[n + j] * kLog2e;
        // pass 1: the lane's map h -> P*h + S
        S[j] = 0.f;
#pragma unroll
        for (int i = 0; i < kT; ++i) {
          dA[j][i] = exp2f(dl[i] * a2);
          dBu[j][i] = du[i] * Bv[i];
          S[j] = fmaf(dA[j][i], S[j], dBu[j][i]);
        }
        P[j] = exp2f(a2 * dsum);
      }
      warp_scan_fwd_n<kNP>(P, S, lane);
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        const float cin = carry[n + j];
        const float hend = fmaf(P[j], cin, S[j]);
        float hin = __shfl_up_sync(kFullMask, hend, 1);
        if (lane == 0) hin = cin;
        // pass 2: the states from the lane's true incoming state, read out through C
        float h = hin;
#pragma unroll
        for (int i = 0; i < kT; ++i) {
          h = fmaf(dA[j][i], h, dBu[j][i]);
          y[i] = fmaf(h, Cv[j][i], y[i]);
        }
        const float cnew = __shfl_sync(kFullMask, hend, 31);
        if (cs) {
#pragma unroll
          for (int k = 1; k < kSavesPerChunk; ++k) {
            const float v = __shfl_sync(kFullMask, hend, k * kLanesPerSave - 1);
            if (lane == 0 && c * kSavesPerChunk + k < p.n_save) cs[k * N + n + j] = v;
          }
          if (lane == 0) cs[n + j] = cin;
        }
        if (lane == 0) carry[n + j] = cnew;
      }
    }
    __syncwarp();
    if constexpr (kStage) __syncthreads();  // everyone is done with this stage before it is refilled

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

// kMinBlocks = 2 caps registers at 128 (some spills) for twice the resident warps.
// kXS: states whose dB / dC contributions share one exchange (one barrier per kXS states).
// kThreads: the most threads a block may have (512 for 16 channels a block).
template <typename E, typename BE, int kMinBlocks, bool kStage, int kXS = 1, int kThreads = 256>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_bwd_kernel(const ScanParams p) {
  constexpr int kT = kScanItems;
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ch = blockIdx.x * nwarps + warp;  // the host picks nwarps | d: every warp is a channel
  const int bi = blockIdx.y;
  const int L = p.seqlen, N = p.dstate;
  const bool red = p.B_var || p.C_var;  // block-level reduction of variable dB / dC
  // shared: [nwarps][N] reverse carry, [nwarps][N] x3 per-channel sums,
  // then (16-byte aligned) [2 buffers][kXS states][2 (B, C)][nwarps][kScanChunk] exchange for dB / dC
  float* carry = smem + warp * N;
  float* accA = smem + nwarps * N + warp * N;
  float* accB = smem + 2 * nwarps * N + warp * N;
  float* accC = smem + 3 * nwarps * N + warp * N;
  float* xch0 = smem + ((4 * nwarps * N + 3) & ~3);
  const int xstride = 2 * nwarps * kScanChunk;  // one state's exchange
  BE* stage = reinterpret_cast<BE*>(xch0 + 2 * kXS * xstride);  // [2][2][N][kScanChunk] when kStage
  // per-lane dA partials [nwarps][N][32] (staged launches with p.bwd_lane_acc): no warp reduction per n
  const bool lane_acc = kStage && p.bwd_lane_acc;
  float* laneA = reinterpret_cast<float*>(stage + 2 * 2 * N * kScanChunk) + (long)warp * N * 32 + lane;

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
  if (lane_acc)
    for (int n = 0; n < N; ++n) laneA[n * 32] = 0.f;
  __syncwarp();
  const float Dv = p.D ? p.D[ch] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[ch] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  int buf = 0;
  if constexpr (kStage) {
    stage_bc_rows<BE, kScanChunk>(stage + ((p.n_save - 1) & 1) * 2 * N * kScanChunk, Bb, Cb, N, L,
                                  (p.n_save - 1) * kScanChunk, p.B_vec, p.C_vec);
    cp_async_commit();
  }

  for (int c = p.n_save - 1; c >= 0; --c) {
    const int t0 = c * kScanChunk + lane * kT;
    const BE* st = stage + (c & 1) * 2 * N * kScanChunk;
    if constexpr (kStage) {
      if (c > 0) stage_bc_rows<BE, kScanChunk>(stage + ((c - 1) & 1) * 2 * N * kScanChunk, Bb, Cb, N, L,
                                               (c - 1) * kScanChunk, p.B_vec, p.C_vec);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
    }
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
    const float* cs = p.chunk_states + (bd * p.n_save + c) * N;
    float dsum = 0.f;
#pragma unroll
    for (int i = 0; i < kT; ++i) dsum += dl[i];

    alignas(16) BE Bn[kT], Cn[kT];
    if constexpr (!kStage) {
      fetch_bc<BE, kT>(Bb, p.B_var, 0, L, t0, p.B_vec, Bn);
      fetch_bc<BE, kT>(Cb, p.C_var, 0, L, t0, p.C_vec, Cn);
    }
#pragma unroll 1
    for (int n = 0; n < N; ++n) {
      float Bv[kT], Cv[kT];
      if constexpr (kStage) {
        const uint4* sb = reinterpret_cast<const uint4*>(st + n * kScanChunk + lane * kT);
        const uint4* sc = reinterpret_cast<const uint4*>(st + (N + n) * kScanChunk + lane * kT);
#pragma unroll
        for (int j = 0; j < kT * (int)sizeof(BE) / 16; ++j) {
          reinterpret_cast<uint4*>(Bn)[j] = sb[j];
          reinterpret_cast<uint4*>(Cn)[j] = sc[j];
        }
      }
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        Bv[i] = to_float(Bn[i]);
        Cv[i] = to_float(Cn[i]);
      }
      if constexpr (!kStage) {
        if (n + 1 < N) {  // prefetch the next state's B / C rows
          fetch_bc<BE, kT>(Bb, p.B_var, n + 1, L, t0, p.B_vec, Bn);
          fetch_bc<BE, kT>(Cb, p.C_var, n + 1, L, t0, p.C_vec, Cn);
        }
      }
      const float a = A[n];
      const float a2 = a * kLog2e;
      // forward re-computation of this chunk's states
      float dA[kT], hv[kT];
      float h = 0.f;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        dA[i] = exp2f(dl[i] * a2);
        hv[i] = dl[i] * uv[i] * Bv[i];  // dBu for now
        h = fmaf(dA[i], h, hv[i]);
      }
      const float Pl = exp2f(a2 * dsum);  // the lane's total decay (also the reverse scan's)
      // reverse recurrence, lane-local from zero (independent of the forward states)
      float q = 0.f;
#pragma unroll
      for (int i = kT - 1; i >= 0; --i) q = dA[i] * fmaf(dy[i], Cv[i], q);
      // the forward and the reverse warp scans, interleaved
      float P = Pl, S = h, Pr = Pl, Sr = q;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float Pp = __shfl_up_sync(kFullMask, P, off);
        const float Sp = __shfl_up_sync(kFullMask, S, off);
        const float Pn = __shfl_down_sync(kFullMask, Pr, off);
        const float Sn = __shfl_down_sync(kFullMask, Sr, off);
        if (lane >= off) {
          S = fmaf(P, Sp, S);
          P *= Pp;
        }
        if (lane + off < 32) {
          Sr = fmaf(Pr, Sn, Sr);
          Pr *= Pn;
        }
      }
      const float hstart = cs[n];
      const float hend = fmaf(P, hstart, S);
      float hin = __shfl_up_sync(kFullMask, hend, 1);
      if (lane == 0) hin = hstart;
      const float cq = carry[n];
      const float qs = fmaf(Pr, cq, Sr);
      float qin = __shfl_down_sync(kFullMask, qs, 1);
      if (lane == 31) qin = cq;
      h = hin;
#pragma unroll
      for (int i = 0; i < kT; ++i) {
        h = fmaf(dA[i], h, hv[i]);
        hv[i] = h;
        y[i] = fmaf(h, Cv[i], y[i]);
      }

      float gA = 0.f, gB = 0.f, gC = 0.f;
      float vB[kT], vC[kT];
      float qnext = qin;  // Q_{t+1}
#pragma unroll
      for (int i = kT - 1; i >= 0; --i) {
        const float G = fmaf(dy[i], Cv[i], qnext);  // dL/dh_t
        const float Q = dA[i] * G;                   // reaches h_{t-1} through step t
        const float hprev = (i == 0) ? hin : hv[i - 1];
        const float Qh = Q * hprev;
        const float GB = G * Bv[i];  // shared by d(delta) and d(u)
        dda[i] = fmaf(GB, uv[i], fmaf(Qh, a, dda[i]));
        dua[i] = fmaf(GB, dl[i], dua[i]);
        gA = fmaf(Qh, dl[i], gA);
        vB[i] = G * dl[i] * uv[i];
        vC[i] = dy[i] * hv[i];
        if (!p.B_var) gB += vB[i];
        if (!p.C_var) gC += vC[i];
        qnext = Q;
      }
      const float cqnew = __shfl_sync(kFullMask, qs, 0);
      if (lane_acc) {
        laneA[n * 32] += gA;
        gA = 0.f;
      } else {
        gA = warp_sum(gA);
      }
      if (!p.B_var) gB = warp_sum(gB);
      if (!p.C_var) gC = warp_sum(gC);
      if (lane == 0) {
        carry[n] = cqnew;
        accA[n] += gA;
        if (!p.B_var) accB[n] += gB;
        if (!p.C_var) accC[n] += gC;
      }
      if (red) {
        // double-buffered exchange: one barrier per kXS state indices
        const int slot = n % kXS;
        float* xch = xch0 + (buf * kXS + slot) * xstride;
        if (p.B_var) {
          float4* xB = reinterpret_cast<float4*>(xch + warp * kScanChunk + lane * kT);
#pragma unroll
          for (int j = 0; j < kT / 4; ++j) xB[j] = make_float4(vB[4 * j], vB[4 * j + 1], vB[4 * j + 2], vB[4 * j + 3]);
        }
        if (p.C_var) {
          float4* xC = reinterpret_cast<float4*>(xch + (nwarps + warp) * kScanChunk + lane * kT);
#pragma unroll
          for (int j = 0; j < kT / 4; ++j) xC[j] = make_float4(vC[4 * j], vC[4 * j + 1], vC[4 * j + 2], vC[4 * j + 3]);
        }
        if (slot == kXS - 1 || n == N - 1) {
        const float* xb = xch0 + buf * kXS * xstride;
        const int n0 = n - slot;  // the first state of this exchange
        buf ^= 1;
        __syncthreads();
        // sum the block's channels, 4 consecutive positions per thread, one vector atomic each
        for (int q4 = threadIdx.x; q4 < (slot + 1) * 2 * kScanChunk / 4; q4 += blockDim.x) {
          const int j = (q4 * 4) / (2 * kScanChunk);        // state n0 + j
          const int which = (q4 * 4) / kScanChunk - 2 * j;  // 0: B, 1: C
          const int pos = (q4 * 4) % kScanChunk;
          if (which == 0 ? !p.B_var : !p.C_var) continue;
          float4 s4 = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int w = 0; w < nwarps; ++w) {
            const float4 v = *reinterpret_cast<const float4*>(xb + j * xstride + (which * nwarps + w) * kScanChunk + pos);
            s4.x += v.x;
            s4.y += v.y;
            s4.z += v.z;
            s4.w += v.w;
          }
          float* dst = (which == 0 ? p.dB + (Bg + n0 + j) * (long)p.Lpad : p.dC + (Cg + n0 + j) * (long)p.Lpad) +
                       c * kScanChunk + pos;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float4*>(dst), s4);
#else
          atomicAdd(dst + 0, s4.x);
          atomicAdd(dst + 1, s4.y);
          atomicAdd(dst + 2, s4.z);
          atomicAdd(dst + 3, s4.w);
#endif
        }
        }
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
    if constexpr (kStage) __syncthreads();  // everyone is done with this stage before it is refilled
  }
  __syncwarp();
  if (lane_acc) {
    for (int n = 0; n < N; ++n) {
      const float v = warp_sum(laneA[n * 32]);
      if (lane == 0) accA[n] += v;
    }
    __syncwarp();
  }
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

// ---------------------------------------------------------------------------------------------
// State-parallel forward (the default for d_state 16 with variable B and C): lanes own states, not
// time steps. A group of kLPC = 16 / kS lanes owns one channel, each lane kS of its 16 states, and
// walks time strictly in order (h = exp(delta A) h + delta u B, one fused multiply-add per step and
// state, the reference's arithmetic), so there is no per-state warp scan and no second pass. Work per
// tile of 16 steps:
//   A. each lane turns 16 / kLPC of its channel's steps into delta (bias, softplus) and delta * u,
//      shared through a per-warp buffer;
//   B. each lane advances its kS states over the 16 steps, accumulating C h into 16 partial sums;
//   C. the kLPC lanes' partial sums meet in shared memory, and each lane finishes (D skip, gate,
//      store) the same steps it prepared in A.
// B and C rows are staged per block, kScanChunk steps at a time (cp.async, double-buffered, rows
// padded apart in banks); the block's 1-8 warps' channels share one batch element and B / C group.
// The state at every kScanChunk boundary is saved for the backward pass, as the chunked kernel does.
// Its parallelism is (batch x channels / 8) warps, each walking all L steps, so it wins where that is
// large (training batches) or L is short (verification from a state), and the chunked kernel, which
// also splits time across lanes, wins for one long sequence (prefill); see scan_fwd_use_sp.
constexpr int kSpTile = 16;                    // time steps per tile
constexpr int kSpStride = kScanChunk + 8;      // staged row stride (elements): 16 bytes of padding
constexpr int kSpRedStride = kSpTile + 4;      // partial-sum row stride (floats)

template <int kS>
struct SpShape {
  static constexpr int kLPC = 16 / kS;               // lanes per channel
  static constexpr int kCPW = 32 / kLPC;             // channels per warp
  static constexpr int kSteps = kSpTile / kLPC;      // steps each lane prepares / finishes per tile
};

template <typename E, int K>
__device__ __forceinline__ void load_few(const E* __restrict__ row, int t, int L, bool vec, E (&v)[K]) {
  constexpr int kBytes = K * (int)sizeof(E);
  if (vec && t + K <= L && (kBytes == 4 || kBytes == 8 || kBytes == 16)) {
    if constexpr (kBytes == 4) *reinterpret_cast<uint32_t*>(v) = __ldg(reinterpret_cast<const unsigned*>(row + t));
    if constexpr (kBytes == 8) *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(row + t));
    if constexpr (kBytes == 16) *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(row + t));
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = (t + i < L) ? row[t + i] : from_float<E>(0.f);
  }
}

// 8 consecutive B or C values of a staged row (16-byte aligned), as floats.
template <typename BE>
__device__ __forceinline__ void load_stage8(const BE* src, float (&v)[8]) {
  alignas(16) BE r[8];
#pragma unroll
  for (int k = 0; k < 8 * (int)sizeof(BE) / 16; ++k)
    reinterpret_cast<uint4*>(r)[k] = reinterpret_cast<const uint4*>(src)[k];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(r[i]);
}

template <typename E, int K>
__device__ __forceinline__ void store_few(E* __restrict__ row, int t, int L, bool vec, const float (&f)[K]) {
  constexpr int kBytes = K * (int)sizeof(E);
  alignas(16) E v[K];
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = from_float<E>(f[i]);
  if (vec && t + K <= L && (kBytes == 4 || kBytes == 8 || kBytes == 16)) {
    if constexpr (kBytes == 4) *reinterpret_cast<uint32_t*>(row + t) = *reinterpret_cast<const uint32_t*>(v);
    if constexpr (kBytes == 8) *reinterpret_cast<uint2*>(row + t) = *reinterpret_cast<const uint2*>(v);
    if constexpr (kBytes == 16) *reinterpret_cast<uint4*>(row + t) = *reinterpret_cast<const uint4*>(v);
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (t + i < L) row[t + i] = v[i];
  }
}

template <typename E, typename BE, int kS>
__global__ void __launch_bounds__(256) scan_fwd_sp_kernel(const ScanParams p) {
  using Sh = SpShape<kS>;
  constexpr int kLPC = Sh::kLPC, kCPW = Sh::kCPW, kK = Sh::kSteps;
  constexpr int N = 16;
  extern __shared__ __align__(16) unsigned char sp_smem[];
  BE* stage = reinterpret_cast<BE*>(sp_smem);  // [2 buffers][2 (B, C)][N][kSpStride]
  float* scratch = reinterpret_cast<float*>(sp_smem + 2 * 2 * N * kSpStride * sizeof(BE));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int cpb = nwarps * kCPW;  // channels per block
  const int cw = lane / kLPC;         // channel within the warp
  const int sl = lane % kLPC;         // lane within the channel
  float* s_dl = scratch + warp * (2 * kCPW * kSpTile + kCPW * kLPC * kSpRedStride);
  float* s_du = s_dl + kCPW * kSpTile;
  float* s_red = s_du + kCPW * kSpTile;  // [kCPW][kLPC][kSpRedStride]

  const int ch = blockIdx.x * cpb + warp * kCPW + cw;
  const int bi = blockIdx.y;
  const int L = p.seqlen;
  const long bd = (long)bi * p.dim + ch;
  const FwdRow<E> rp(p, bd * L);
  const E *u = rp.u, *dlt = rp.dlt, *zr = rp.z;
  E* out = rp.out;
  const int ch0 = blockIdx.x * cpb;  // the block's channels share this B / C group
  const BE* Bb = static_cast<const BE*>(p.B) + ((long)bi * p.B_groups + ch0 / p.B_cpg) * N * (long)L;
  const BE* Cb = static_cast<const BE*>(p.C) + ((long)bi * p.C_groups + ch0 / p.C_cpg) * N * (long)L;

  float h[kS], a2[kS];
#pragma unroll
  for (int j = 0; j < kS; ++j) {
    const int n = sl + kLPC * j;
    h[j] = p.h0 ? p.h0[bd * N + n] : 0.f;
    a2[j] = p.A[(long)ch * N + n] * kLog2e;
  }
  const float Dv = p.D ? p.D[ch] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[ch] : 0.f;
  const int n_stages = (L + kScanChunk - 1) / kScanChunk;

  stage_bc_rows<BE, kScanChunk, kSpStride>(stage, Bb, Cb, N, L, 0, p.B_vec, p.C_vec);
  cp_async_commit();
  // this lane's steps of the next tile, loaded one tile ahead
  E nu[kK], nd[kK];
  load_few<E, kK>(u, sl * kK, L, p.in_vec, nu);
  load_few<E, kK>(dlt, sl * kK, L, p.in_vec, nd);

  for (int sg = 0; sg < n_stages; ++sg) {
    if (sg + 1 < n_stages)
      stage_bc_rows<BE, kScanChunk, kSpStride>(stage + ((sg + 1) & 1) * 2 * N * kSpStride, Bb, Cb, N, L,
                                               (sg + 1) * kScanChunk, p.B_vec, p.C_vec);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (p.chunk_states) {
#pragma unroll
      for (int j = 0; j < kS; ++j) p.chunk_states[(bd * p.n_save + sg) * N + sl + kLPC * j] = h[j];
    }
    const BE* sB = stage + (sg & 1) * 2 * N * kSpStride;
    const BE* sC = sB + N * kSpStride;
    const int t_end = min(L, (sg + 1) * kScanChunk);
    for (int tt = sg * kScanChunk; tt < t_end; tt += kSpTile) {
      // A. this lane's kK steps: delta (bias, softplus, 0 past L) and delta * u
      const int tm = tt + sl * kK;
      E cu[kK], zz[kK];
      float dl[kK];
#pragma unroll
      for (int i = 0; i < kK; ++i) {
        cu[i] = nu[i];
        float d = to_float(nd[i]) + bias;
        if (p.softplus) d = softplus_f(d);
        dl[i] = (tm + i < L) ? d : 0.f;
      }
      if (tt + kSpTile < L) {
        load_few<E, kK>(u, tm + kSpTile, L, p.in_vec, nu);
        load_few<E, kK>(dlt, tm + kSpTile, L, p.in_vec, nd);
      }
      if (zr) load_few<E, kK>(zr, tm, L, p.in_vec, zz);
#pragma unroll
      for (int i = 0; i < kK; ++i) {
        s_dl[cw * kSpTile + sl * kK + i] = dl[i];
        s_du[cw * kSpTile + sl * kK + i] = dl[i] * to_float(cu[i]);
      }
      __syncwarp();
      // B. kS states over the tile's 16 steps
      float part[kSpTile];
      const int to = tt - sg * kScanChunk;  // offset in the stage
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float dlh[8], duh[8];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const float4 a = *reinterpret_cast<const float4*>(s_dl + cw * kSpTile + half * 8 + q * 4);
          const float4 b = *reinterpret_cast<const float4*>(s_du + cw * kSpTile + half * 8 + q * 4);
          dlh[4 * q] = a.x; dlh[4 * q + 1] = a.y; dlh[4 * q + 2] = a.z; dlh[4 * q + 3] = a.w;
          duh[4 * q] = b.x; duh[4 * q + 1] = b.y; duh[4 * q + 2] = b.z; duh[4 * q + 3] = b.w;
        }
#pragma unroll
        for (int j = 0; j < kS; ++j) {
          const int n = sl + kLPC * j;
          float Bv[8], Cv[8];
          load_stage8<BE>(sB + n * kSpStride + to + half * 8, Bv);
          load_stage8<BE>(sC + n * kSpStride + to + half * 8, Cv);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            h[j] = fmaf(exp2f(dlh[i] * a2[j]), h[j], duh[i] * Bv[i]);
            part[half * 8 + i] = j == 0 ? h[j] * Cv[i] : fmaf(h[j], Cv[i], part[half * 8 + i]);
          }
        }
      }
      // C. sum the channel's kLPC partials; finish this lane's kK steps
      float* red = s_red + (cw * kLPC + sl) * kSpRedStride;
#pragma unroll
      for (int q = 0; q < kSpTile / 4; ++q)
        *reinterpret_cast<float4*>(red + 4 * q) = make_float4(part[4 * q], part[4 * q + 1], part[4 * q + 2], part[4 * q + 3]);
      __syncwarp();
      float y[kK];
#pragma unroll
      for (int i = 0; i < kK; ++i) y[i] = 0.f;
#pragma unroll
      for (int l = 0; l < kLPC; ++l) {
        const float* src = s_red + (cw * kLPC + l) * kSpRedStride + sl * kK;
#pragma unroll
        for (int i = 0; i < kK; ++i) y[i] += src[i];
      }
#pragma unroll
      for (int i = 0; i < kK; ++i) {
        float o = fmaf(Dv, to_float(cu[i]), y[i]);
        if (zr) {
          const float zv = to_float(zz[i]);
          o *= zv * sigmoid_f(zv);
        }
        y[i] = o;
      }
      store_few<E, kK>(out, tm, L, p.in_vec, y);
      __syncwarp();  // the buffers are rewritten by the next tile
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  if (p.final_state) {
#pragma unroll
    for (int j = 0; j < kS; ++j) p.final_state[bd * N + sl + kLPC * j] = h[j];
  }
}

inline int scan_warps_per_block(const ScanParams& p, int want) {
  // the channels of one block must share their B / C group (the backward sums dB / dC over them)
  for (int w = want; w >= 2; w >>= 1) {
    if (p.dim % w == 0 && (!p.B_var || p.B_cpg % w == 0) && (!p.C_var || p.C_cpg % w == 0)) return w;
  }
  return 1;
}

// Staging B / C in shared memory needs both variable and a small state (<= 64 KB of stages).
template <typename BE>
inline bool scan_can_stage(const ScanParams& p, int chunk) {
  return p.B_var && p.C_var && 2 * 2 * (size_t)p.dstate * chunk * sizeof(BE) <= 64 * 1024;
}


template <typename K>
inline void scan_smem_attr(K kernel, size_t sm) {
  if (sm > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
}

// Where the state-parallel forward runs (p.fwd_sp: 0 never, 1 wherever the shapes allow it, -1 auto):
// d_state 16 with variable B and C, and in auto mode where its parallelism beats splitting time,
// i.e. short sequences (one stage of kScanChunk steps or less) or at least a warp of channels for
// each of the GPU's warp schedulers (4 an SM). On an H100: (2, 3072, 8192) and (8, 2048, 2048) take
// it; one 3584-channel sequence of 8,192 steps (448 warps) is faster split over time.
inline bool scan_fwd_use_sp(const ScanParams& p) {
  if (p.fwd_sp == 0 || p.dstate != 16 || !p.B_var || !p.C_var) return false;
  constexpr int kCPW = SpShape<4>::kCPW;
  if (p.dim % kCPW || p.B_cpg % kCPW || p.C_cpg % kCPW) return false;
  if (p.fwd_sp == 1) return true;
  return p.seqlen <= kScanChunk || (long)p.batch * p.dim / kCPW >= 4L * sm_count();
}

// Launches the state-parallel forward with 8, 4, 2 or 1 warps a block: the most that still gives
// two blocks an SM (or the fewest blocks that divide the channels and B / C groups).
template <typename E, typename BE>
void scan_fwd_sp_go(ScanParams& p, cudaStream_t s) {
  constexpr int kS = 4;
  using Sh = SpShape<kS>;
  auto fits = [&](int nw) {
    const int cpb = nw * Sh::kCPW;
    return p.dim % cpb == 0 && p.B_cpg % cpb == 0 && p.C_cpg % cpb == 0;
  };
  const long want = 2L * sm_count();
  int nw = 8;
  while (nw > 1 && (!fits(nw) || (long)p.batch * (p.dim / (nw * Sh::kCPW)) < want)) nw >>= 1;
  const size_t sm = 2 * 2 * 16 * (size_t)kSpStride * sizeof(BE) +
                    sizeof(float) * nw * (2 * Sh::kCPW * kSpTile + 32 * kSpRedStride);
  scan_smem_attr(scan_fwd_sp_kernel<E, BE, kS>, sm);
  dim3 grid(p.dim / (nw * Sh::kCPW), p.batch);
  scan_fwd_sp_kernel<E, BE, kS><<<grid, 32 * nw, sm, s>>>(p);
}

template <typename E, typename BE, int kT, int kMinBlocks, int kNP>
void scan_fwd_go(ScanParams& p, cudaStream_t s) {
  const int nw = scan_warps_per_block(p, 4);
  dim3 grid(p.dim / nw, p.batch);
  const size_t base = sizeof(float) * ((nw * p.dstate + 3) & ~3);
  if (scan_can_stage<BE>(p, 32 * kT) && p.dstate % kNP == 0) {
    const size_t sm = base + 2 * 2 * (size_t)p.dstate * 32 * kT * sizeof(BE);
    scan_smem_attr(scan_fwd_kernel<E, BE, kT, kMinBlocks, true, kNP>, sm);
    scan_fwd_kernel<E, BE, kT, kMinBlocks, true, kNP><<<grid, nw * 32, sm, s>>>(p);
  } else {
    scan_fwd_kernel<E, BE, kT, kMinBlocks, false, 1><<<grid, nw * 32, base, s>>>(p);
  }
}

// Tuning variants are compiled for the hot case only (16-bit inputs with B / C in the same dtype):
// fwd_states = 1 or 4 (states per n iteration); fwd_min_blocks = 4 (registers capped at 128).
// Default: 8 items, two states per iteration when B / C are staged, no register cap. (16 items per
// thread measured 1.28x slower on an H100, 2026-11-23, and is no longer compiled.)
template <typename E, typename BE>
void scan_fwd_launch(ScanParams& p, cudaStream_t s) {
  if (scan_fwd_use_sp(p)) return scan_fwd_sp_go<E, BE>(p, s);
  if constexpr (std::is_same<E, BE>::value && !std::is_same<E, float>::value) {
    if (p.fwd_states == 1) return scan_fwd_go<E, BE, 8, 1, 1>(p, s);
    if (p.fwd_states == 4) return scan_fwd_go<E, BE, 8, 1, 4>(p, s);
    if (p.fwd_min_blocks == 4) return scan_fwd_go<E, BE, 8, 4, 2>(p, s);
  }
  p.items = 8;
  scan_fwd_go<E, BE, 8, 1, 2>(p, s);
}

template <typename E, typename BE, int kMinBlocks, int kXS = 1, int kThreads = 256>
void scan_bwd_go(ScanParams& p, cudaStream_t s) {
  const int nw = scan_warps_per_block(p, std::min(kThreads / 32, p.bwd_warps >= 16 ? 16 : p.bwd_warps == 8 ? 8 : 4));
  dim3 grid(p.dim / nw, p.batch);
  const size_t base = sizeof(float) * (((4 * nw * p.dstate + 3) & ~3) + 4 * kXS * nw * kScanChunk);
  if (scan_can_stage<BE>(p, kScanChunk)) {
    const size_t sm = base + 2 * 2 * (size_t)p.dstate * kScanChunk * sizeof(BE) +
                      (p.bwd_lane_acc ? sizeof(float) * nw * p.dstate * 32 : 0);
    scan_smem_attr(scan_bwd_kernel<E, BE, kMinBlocks, true, kXS, kThreads>, sm);
    scan_bwd_kernel<E, BE, kMinBlocks, true, kXS, kThreads><<<grid, nw * 32, sm, s>>>(p);
  } else {
    scan_smem_attr(scan_bwd_kernel<E, BE, kMinBlocks, false, kXS, kThreads>, base);
    scan_bwd_kernel<E, BE, kMinBlocks, false, kXS, kThreads><<<grid, nw * 32, base, s>>>(p);
  }
}

// Tuning variants (16-bit inputs with B / C in the same dtype): bwd_warps 4 / 8 / 16 channels a
// block, bwd_min_blocks 2 (registers capped at 128), bwd_xs 2 (two states an exchange).
template <typename E, typename BE>
void scan_bwd_launch(ScanParams& p, cudaStream_t s) {
  if constexpr (std::is_same<E, BE>::value && !std::is_same<E, float>::value) {
    if (p.bwd_warps == 16) {
      if (p.bwd_xs == 2) return scan_bwd_go<E, BE, 1, 2, 512>(p, s);
      return scan_bwd_go<E, BE, 1, 1, 512>(p, s);
    }
    if (p.bwd_min_blocks == 2) {
      if (p.bwd_xs == 2) return scan_bwd_go<E, BE, 2, 2>(p, s);
      return scan_bwd_go<E, BE, 2>(p, s);
    }
  }
  scan_bwd_go<E, BE, 1>(p, s);
}

}  // namespace mambabyte

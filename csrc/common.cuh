// Shared device helpers for the MambaByte kernels (no torch headers here: keeps nvcc fast).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mambabyte {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// softplus with torch's default threshold (x > 20 -> x).
__device__ __forceinline__ float softplus_f(float x) {
  // log1p(e^x) = e^x (1 - e^x / 2 + ...): below -15 the first term is exact to 2e-7 relative
  return x > 20.f ? x : (x < -15.f ? __expf(x) : __logf(1.f + __expf(x)));
}
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

// kT consecutive elements of a row starting at t0, zero past L. `vec` says the row is 16-byte
// aligned at every multiple of kT elements (checked on the host), so full runs use 16-byte loads.
template <typename E, int kT>
__device__ __forceinline__ void load_run(const E* __restrict__ row, int t0, int L, bool vec, E (&v)[kT]) {
  static_assert((kT * sizeof(E)) % 16 == 0, "run must be a whole number of 16-byte vectors");
  static_assert(alignof(E[kT]) <= 16, "");
  if (vec && t0 + kT <= L) {
    constexpr int kV = kT * sizeof(E) / 16;
    const uint4* src = reinterpret_cast<const uint4*>(row + t0);
    uint4* dst = reinterpret_cast<uint4*>(v);
#pragma unroll
    for (int i = 0; i < kV; ++i) dst[i] = __ldg(src + i);
  } else {
#pragma unroll
    for (int i = 0; i < kT; ++i) v[i] = (t0 + i < L) ? row[t0 + i] : from_float<E>(0.f);
  }
}

template <typename E, int kT>
__device__ __forceinline__ void load_run_f(const E* __restrict__ row, int t0, int L, bool vec, float (&f)[kT]) {
  alignas(16) E v[kT];
  load_run<E, kT>(row, t0, L, vec, v);
#pragma unroll
  for (int i = 0; i < kT; ++i) f[i] = to_float(v[i]);
}

template <typename E, int kT>
__device__ __forceinline__ void store_run_f(E* __restrict__ row, int t0, int L, bool vec, const float (&f)[kT]) {
  alignas(16) E v[kT];
#pragma unroll
  for (int i = 0; i < kT; ++i) v[i] = from_float<E>(f[i]);
  if (vec && t0 + kT <= L) {
    constexpr int kV = kT * sizeof(E) / 16;
    uint4* dst = reinterpret_cast<uint4*>(row + t0);
    const uint4* src = reinterpret_cast<const uint4*>(v);
#pragma unroll
    for (int i = 0; i < kV; ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int i = 0; i < kT; ++i)
      if (t0 + i < L) row[t0 + i] = v[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
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

// Inclusive scan of the affine maps h -> P*h + S over lanes 0..31 (earlier lanes applied first).
__device__ __forceinline__ void warp_scan_fwd(float& P, float& S, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float Pp = __shfl_up_sync(kFullMask, P, off);
    const float Sp = __shfl_up_sync(kFullMask, S, off);
    if (lane >= off) {
      S = fmaf(P, Sp, S);
      P *= Pp;
    }
  }
}

// The same for kNP independent maps at once (interleaved shuffles).
template <int kNP>
__device__ __forceinline__ void warp_scan_fwd_n(float (&P)[kNP], float (&S)[kNP], int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    float Pp[kNP], Sp[kNP];
#pragma unroll
    for (int j = 0; j < kNP; ++j) {
      Pp[j] = __shfl_up_sync(kFullMask, P[j], off);
      Sp[j] = __shfl_up_sync(kFullMask, S[j], off);
    }
    if (lane >= off) {
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        S[j] = fmaf(P[j], Sp[j], S[j]);
        P[j] *= Pp[j];
      }
    }
  }
}

// Reverse inclusive scan: lane i ends with the composition of lanes i..31 where
// value_i = S_i + P_i * value_{i+1}.
__device__ __forceinline__ void warp_scan_rev(float& P, float& S, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float Pn = __shfl_down_sync(kFullMask, P, off);
    const float Sn = __shfl_down_sync(kFullMask, S, off);
    if (lane + off < 32) {
      S = fmaf(P, Sn, S);
      P *= Pn;
    }
  }
}

}  // namespace mambabyte

namespace mambabyte {

// 16-byte asynchronous global -> shared copies (sm_80+), one commit group per stage.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

// Stage rows [t_base, t_base + kLen) of the N rows of B and of C (each row L long, rows N apart in
// memory order n * L) into dst = [2 (B, C)][N][kStride], zero past L. All threads of the block call it.
// kStride >= kLen (a multiple of 16 bytes) pads the rows apart in shared-memory banks.
template <typename BE, int kLen, int kStride = kLen>
__device__ __forceinline__ void stage_bc_rows(BE* dst, const BE* __restrict__ Bb, const BE* __restrict__ Cb, int N,
                                              int L, int t_base, int vecB, int vecC) {
  static_assert((kStride * sizeof(BE)) % 16 == 0, "rows must stay 16-byte aligned");
  constexpr int kPer = 16 / sizeof(BE);
  constexpr int kVecPerRow = kLen / kPer;
  const int total = 2 * N * kVecPerRow;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int row = idx / kVecPerRow;  // 0..2N-1: B rows then C rows
    const int v = idx - row * kVecPerRow;
    const int which = row >= N;
    const int n = row - which * N;
    const BE* src = (which ? Cb : Bb) + (long)n * L + t_base + v * kPer;
    BE* d = dst + (long)row * kStride + v * kPer;
    const int t = t_base + v * kPer;
    if ((which ? vecC : vecB) && t + kPer <= L) {
      cp_async16(d, src);
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) d[j] = (t + j < L) ? src[j] : from_float<BE>(0.f);
    }
  }
}

}  // namespace mambabyte

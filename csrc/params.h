// Plain parameter structs shared by the host bindings (bindings.cpp) and the kernels (*.cu).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace mambabyte {

// Element types of the (b, d, L) tensors u / delta / z / out, and of B / C.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Selective scan. All (b, d, L) tensors are contiguous with rows of length L. Variable B / C are
// contiguous (b, g, n, L); fixed B / C are contiguous (d, n). A is fp32 (d, n).
struct ScanParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0;
  int n_save = 0;     // ceil(L / kScanChunk): chunk-start states saved by the forward for the backward
  int items = 8;      // forward: time steps per thread (8 or 16)
  int bwd_warps = 4;  // backward: channels per block (4 or 8)
  int fwd_min_blocks = 1, bwd_min_blocks = 1;  // register-cap variants (see scan_kernels.cuh)
  int fwd_states = 2;  // forward: states per n iteration where B / C are staged (1, 2 or 4)
  int bwd_lane_acc = 0;  // backward (staged): per-lane dA partials in shared memory
  int B_var = 0, C_var = 0;   // 1: (b, g, n, L); 0: (d, n)
  int B_cpg = 1, C_cpg = 1;   // channels per group (d / g) for variable B / C
  int B_groups = 1, C_groups = 1;
  int in_vec = 0, B_vec = 0, C_vec = 0;  // rows 16-byte aligned at multiples of the run length
  int softplus = 0;
  int bc_dtype = kF32;        // dtype of B and C (same for both)

  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;      // optional
  const void* B = nullptr;
  const void* C = nullptr;
  const float* A = nullptr;
  const float* D = nullptr;           // optional (d,)
  const float* delta_bias = nullptr;  // optional (d,)
  const float* h0 = nullptr;          // optional (b, d, n)

  void* out = nullptr;
  float* final_state = nullptr;   // (b, d, n)
  float* chunk_states = nullptr;  // optional (b, d, n_save, n): state every kScanChunk steps

  // backward
  const void* dout = nullptr;
  const float* dfinal = nullptr;  // optional (b, d, n)
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA_part = nullptr;     // (b, d, n) per-batch partial sums
  float* dD_part = nullptr;     // (b, d)
  float* dbias_part = nullptr;  // (b, d)
  float* dB = nullptr;          // variable: (b, g, n, Lpad) fp32, zeroed, atomics; fixed: (b, d, n) partials
  float* dC = nullptr;
  float* dh0 = nullptr;         // (b, d, n)
  int Lpad = 0;
};

// Causal depthwise conv1d. x / out / dx: contiguous (b, d, L); weight fp32 (d, w); bias fp32 (d,);
// state / new_state / dstate fp32 (b, d, w).
struct ConvParams {
  int batch = 0, dim = 0, seqlen = 0, width = 0;
  int silu = 0;
  const void* x = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  const float* state = nullptr;
  void* out = nullptr;
  float* new_state = nullptr;
  // backward
  const void* dout = nullptr;
  const float* dfinal = nullptr;
  void* dx = nullptr;
  float* dstate = nullptr;
  float* dweight = nullptr;  // fp32 (d, w), zeroed, atomics
  float* dbias = nullptr;    // fp32 (d,), zeroed, atomics
};

// One decode step of the scan, in place on an fp32 (b, d, n) state. Either dt (b, d) is given, or
// dt_low (b, R) with dt_w (d, R) (then dt = dt_w @ dt_low, the fused dt_proj).
struct StepParams {
  int batch = 0, dim = 0, dstate = 0, dt_rank = 0;
  int softplus = 0;
  const void* x = nullptr;   // (b, d), row stride x_stride
  const void* z = nullptr;   // optional (b, d)
  const void* dt = nullptr;  // (b, d) or null
  const void* dt_low = nullptr;
  const void* dt_w = nullptr;
  long dt_low_stride = 0;
  const void* B = nullptr;   // (b, n) with batch stride bc_stride
  const void* C = nullptr;
  long bc_stride = 0;
  const float* A = nullptr;
  const float* D = nullptr;
  const float* dt_bias = nullptr;
  float* state = nullptr;
  void* out = nullptr;       // (b, d)
};

// One decode step of the conv, in place on a (b, d, w) window.
struct ConvStepParams {
  int batch = 0, dim = 0, width = 0;
  int silu = 0;
  const void* x = nullptr;   // (b, d)
  void* state = nullptr;     // (b, d, w), dtype state_dtype
  const float* weight = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;       // (b, d), x's dtype
};

// Host entry points (defined in the .cu files).
void scan_fwd_f32(ScanParams& p, cudaStream_t s);
void scan_fwd_f16(ScanParams& p, cudaStream_t s);
void scan_fwd_bf16(ScanParams& p, cudaStream_t s);
void scan_bwd_f32(ScanParams& p, cudaStream_t s);
void scan_bwd_f16(ScanParams& p, cudaStream_t s);
void scan_bwd_bf16(ScanParams& p, cudaStream_t s);
void conv_fwd(ConvParams& p, int dtype, cudaStream_t s);
void conv_bwd(ConvParams& p, int dtype, cudaStream_t s);
void ssm_step(StepParams& p, int dtype, cudaStream_t s);
void conv_step(ConvStepParams& p, int x_dtype, int state_dtype, cudaStream_t s);

constexpr int kScanItems = 8;                  // time steps per thread
constexpr int kScanChunk = 32 * kScanItems;    // time steps per warp per chunk

}  // namespace mambabyte

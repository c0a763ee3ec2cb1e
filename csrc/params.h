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
  int items = 8;      // forward: time steps per thread (only 8 is instantiated; the binding refuses others)
  int bwd_warps = 4;  // backward: channels per block (4 or 8)
  int fwd_min_blocks = 1, bwd_min_blocks = 1;  // register-cap variants (see scan_kernels.cuh)
  int fwd_states = 2;  // forward: states per n iteration where B / C are staged (1, 2 or 4)
  int fwd_sp = -1;     // forward: the state-parallel kernel: 0 never, 1 where it applies, -1 auto
  int bwd_lane_acc = 0;  // backward (staged): per-lane dA partials in shared memory
  int bwd_xs = 2;        // backward: states per dB / dC exchange (1 or 2)
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
  int vec = 0;  // x / out / dout / dx rows 16-byte aligned at every multiple of kConvItems elements
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

// One whole Mamba block at decode (layer_step.cu): residual add + norm + in_proj + conv step + x_proj
// (kernel 1), dt_proj + softplus + state update + D skip + gate (kernel 2), out_proj (kernel 3).
// E = the weights' and activations' dtype; the residual is fp32 (residual_f32) or E.
struct LayerStepParams {
  int batch = 0, d_model = 0, d_inner = 0, d_state = 0, dt_rank = 0, d_conv = 0;
  int n_in_blocks = 0;  // kernel 1 blocks along d_inner (d_inner / kLsInChannels)
  int n_groups = 0;     // groups of kLsGroup kernel-1 blocks whose x_proj partials are pre-reduced
  int rms = 0;          // RMSNorm (no bias) instead of LayerNorm
  float eps = 1e-5f;
  int residual_f32 = 1;
  const void* hidden = nullptr;    // (b, D) E: the previous block's output (or the embedding)
  const void* residual = nullptr;  // (b, D) or null (first block: residual = hidden)
  void* residual_out = nullptr;    // (b, D)
  const void* norm_w = nullptr;    // (D,) E
  const void* norm_b = nullptr;    // (D,) E or null
  const void* in_w = nullptr;      // (2 di, D) E
  const void* in_b = nullptr;      // (2 di,) E or null
  const float* conv_w = nullptr;   // (di, w) fp32
  const float* conv_b = nullptr;   // (di,) fp32 or null
  float* conv_state = nullptr;     // (b, di, w) fp32, in place
  const void* x_w = nullptr;       // (R + 2n, di) E
  const void* dt_w = nullptr;      // (di, R) E
  const float* dt_b = nullptr;     // (di,) fp32 or null (softplus after it)
  const float* A = nullptr;        // (di, n) fp32 (= -exp(A_log))
  const float* D = nullptr;        // (di,) fp32 or null
  float* ssm_state = nullptr;      // (b, di, n) fp32, in place
  const void* out_w = nullptr;     // (D, di) E
  const void* out_b = nullptr;     // (D,) E or null
  void* xc = nullptr;              // scratch (b, di) E: conv output after silu
  void* z = nullptr;               // scratch (b, di) E: the gate
  void* y = nullptr;               // scratch (b, di) E: the SSM output (out_proj's input)
  float* part = nullptr;           // scratch (n_chunks, n_in_blocks, kLsMaxB, R + 2n) x_proj partials
  float* gpart = nullptr;          // scratch (n_chunks, n_groups, kLsMaxB, R + 2n) group sums
  int* counters = nullptr;         // (n_chunks, n_groups) int32, zero on entry, zero again on exit
  void* out = nullptr;             // (b, D) E: this block's output
};

// Residual add + LayerNorm / RMSNorm over rows of `dim` values (add_norm.cu, inference only).
// hidden / weight / bias / out: E; residual / residual_out: fp32 (residual_f32) or E.
struct AddNormParams {
  int rows = 0, dim = 0;
  int rms = 0, residual_f32 = 1;
  float eps = 1e-5f;
  const void* hidden = nullptr;
  const void* residual = nullptr;  // or null (first block)
  const void* weight = nullptr;
  const void* bias = nullptr;      // or null
  void* residual_out = nullptr;
  void* out = nullptr;
};

// The same for training (add_norm.cu): fp32 weights, fp32 residual stream (or none: the first block),
// hidden in EH, the normed output in O; the forward saves each row's mean and 1 / std, the backward
// returns d(hidden) in EH, d(residual) in fp32 (the same values) and per-block dweight / dbias partials.
struct AddNormTrainParams {
  int rows = 0, dim = 0;
  int rms = 0;
  float eps = 1e-5f;
  const void* hidden = nullptr;    // EH (rows, dim)
  const float* residual = nullptr; // fp32 or null
  const float* weight = nullptr;   // fp32 (dim,)
  const float* bias = nullptr;     // fp32 or null
  float* residual_out = nullptr;   // fp32 (rows, dim): the norm's input, kept for the backward
  void* out = nullptr;             // O (rows, dim)
  float* mean = nullptr;           // (rows,)
  float* rstd = nullptr;           // (rows,)
  // backward
  const void* dout = nullptr;      // O (rows, dim)
  const float* dres = nullptr;     // fp32 (rows, dim) gradient of residual_out, or null
  void* dhidden = nullptr;         // EH (rows, dim)
  float* dresidual = nullptr;      // fp32 (rows, dim) or null (no residual input)
  float* dw_part = nullptr;        // (blocks, dim)
  float* db_part = nullptr;        // (blocks, dim) or null (no bias)
  int blocks = 0;                  // backward grid: each block walks rows blockIdx.x, + blocks, ...
};

constexpr int kLsMaxB = 8;          // batch rows one kernel-1 / kernel-3 block handles (grid.y covers more)
constexpr int kLsInChannels = 16;   // d_inner channels per kernel-1 block (32 in_proj rows)
constexpr int kLsGroup = 16;        // kernel-1 blocks per x_proj pre-reduction group

// The scan backward's small tail in one launch (scan_finish.cu): per-batch partial sums of dA, dD and
// d(delta_bias) summed over the batch, and dB / dC either cut from their padded fp32 accumulators and
// cast to B / C's dtype (variable) or summed over the batch (fixed, fp32 (d, n)).
struct ScanFinishParams {
  int batch = 0, dim = 0, dstate = 0, seqlen = 0, Lpad = 0;
  int B_var = 0, C_var = 0, B_rows = 0, C_rows = 0;  // variable: b * groups * n rows of length L
  int bc_dtype = kF32;                               // dtype of variable dB / dC outputs
  const float* dA_part = nullptr;                    // (b, d, n)
  const float* dD_part = nullptr;                    // (b, d) or null (no D)
  const float* dbias_part = nullptr;                 // (b, d) or null (no delta_bias)
  const float* dB = nullptr;                         // variable: (rows, Lpad); fixed: (b, d, n)
  const float* dC = nullptr;
  float* dA = nullptr;                               // (d, n)
  float* dD = nullptr;                               // (d,)
  float* dbias = nullptr;                            // (d,)
  void* dB_out = nullptr;                            // variable: (rows, L) in bc_dtype; fixed: fp32 (d, n)
  void* dC_out = nullptr;
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
// Returns the dynamic shared memory kernel 1 needs, or -1 if it exceeds the device's limit.
int layer_step_smem(const LayerStepParams& p, int dtype);
// pdl: launch with programmatic dependent launch (sm_90+; the kernels wait on their predecessor).
void layer_step(LayerStepParams& p, int dtype, cudaStream_t s, bool pdl);
void add_norm(AddNormParams& p, int dtype, cudaStream_t s);
// Returns false when the (hidden, out) dtype pair or the width is not supported (the caller falls back).
bool add_norm_train_fwd(const AddNormTrainParams& p, int hidden_dtype, int out_dtype, cudaStream_t s);
bool add_norm_train_bwd(const AddNormTrainParams& p, int hidden_dtype, int out_dtype, cudaStream_t s);
void scan_finish(const ScanFinishParams& p, cudaStream_t s);

// Host helpers shared by the launchers and the bindings.
// The current device's SM count, queried once per device (132, an H100's, if the query fails).
inline int sm_count() {
  static int counts[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 132;
  if (!counts[dev]) cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev);
  return counts[dev] > 0 ? counts[dev] : 132;
}
// A null pointer, or one on a 16-byte boundary (what the kernels' vector loads need).
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

constexpr int kScanItems = 8;                  // time steps per thread
constexpr int kScanChunk = 32 * kScanItems;    // time steps per warp per chunk

}  // namespace mambabyte

// Python bindings for mambabyte._C: argument checks, allocation, dispatch to the CUDA launchers.
// The Python side (mambabyte/ops/cuda_backend.py) normalises dtypes, layouts and optional inputs;
// this file only checks what the kernels rely on.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "params.h"

namespace mb = mambabyte;
using at::Tensor;
using OptT = std::optional<Tensor>;

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_F32(x) TORCH_CHECK((x).scalar_type() == at::kFloat, #x " must be float32")

static int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mb::kF32;
    case at::kHalf: return mb::kF16;
    case at::kBFloat16: return mb::kBF16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
  return -1;
}

using mb::aligned16;

static const float* opt_f32(const OptT& t, const char* name, int64_t numel) {
  if (!t.has_value()) return nullptr;
  CHECK_CUDA(*t);
  CHECK_CONTIG(*t);
  CHECK_F32(*t);
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
  return t->data_ptr<float>();
}

// Fills the shape / pointer part of ScanParams shared by forward and backward.
static void fill_scan(mb::ScanParams& p, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                      const Tensor& C, const OptT& D, const OptT& z, const OptT& delta_bias, bool softplus) {
  CHECK_CUDA(u);
  CHECK_CUDA(delta);
  CHECK_CUDA(A);
  CHECK_CUDA(B);
  CHECK_CUDA(C);
  TORCH_CHECK(u.dim() == 3, "u must be (b, d, L)");
  CHECK_CONTIG(u);
  CHECK_CONTIG(delta);
  TORCH_CHECK(delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(), "delta must match u");
  CHECK_CONTIG(A);
  CHECK_F32(A);
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d, "A must be (d, n)");
  const int64_t n = A.size(1);
  TORCH_CHECK(n >= 1 && n <= 256, "n must be in [1, 256]");
  TORCH_CHECK(L >= 1 && L < (int64_t(1) << 31), "L out of range");
  TORCH_CHECK(b >= 1 && b <= 65535, "batch must be in [1, 65535] (one grid row per batch element)");
  TORCH_CHECK(d >= 1, "d must be >= 1");
  TORCH_CHECK(B.scalar_type() == C.scalar_type(), "B and C must share a dtype");
  TORCH_CHECK(B.scalar_type() == at::kFloat || B.scalar_type() == u.scalar_type(),
              "B / C must be float32 or u's dtype");
  p.batch = (int)b;
  p.dim = (int)d;
  p.seqlen = (int)L;
  p.dstate = (int)n;
  p.n_save = (int)((L + mb::kScanChunk - 1) / mb::kScanChunk);
  p.softplus = softplus ? 1 : 0;
  p.bc_dtype = dtype_code(B);
  const int64_t esz = u.element_size(), bsz = B.element_size();
  auto bc = [&](const Tensor& M, int& var, int& cpg, int& groups, int& vec, const char* name) {
    CHECK_CONTIG(M);
    if (M.dim() == 2) {
      TORCH_CHECK(M.size(0) == d && M.size(1) == n, name, " must be (d, n)");
      var = 0;
      cpg = 1;
      groups = 1;
      vec = 0;
    } else {
      TORCH_CHECK(M.dim() == 4 && M.size(0) == b && M.size(2) == n && M.size(3) == L, name,
                  " must be (b, g, n, L)");
      const int64_t g = M.size(1);
      TORCH_CHECK(d % g == 0, name, ": d must be divisible by g");
      var = 1;
      groups = (int)g;
      cpg = (int)(d / g);
      vec = aligned16(M.data_ptr()) && (L * bsz) % 16 == 0;
    }
  };
  bc(B, p.B_var, p.B_cpg, p.B_groups, p.B_vec, "B");
  bc(C, p.C_var, p.C_cpg, p.C_groups, p.C_vec, "C");
  p.in_vec = aligned16(u.data_ptr()) && aligned16(delta.data_ptr()) && (L * esz) % 16 == 0;
  if (z.has_value()) {
    CHECK_CUDA(*z);
    CHECK_CONTIG(*z);
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(), "z must match u");
    p.z = z->data_ptr();
    p.in_vec = p.in_vec && aligned16(p.z);
  }
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = opt_f32(D, "D", d);
  p.delta_bias = opt_f32(delta_bias, "delta_bias", d);
}

static void run_scan_fwd(mb::ScanParams& p, int dt, cudaStream_t s) {
  if (dt == mb::kF32) mb::scan_fwd_f32(p, s);
  else if (dt == mb::kF16) mb::scan_fwd_f16(p, s);
  else mb::scan_fwd_bf16(p, s);
}

static void run_scan_bwd(mb::ScanParams& p, int dt, cudaStream_t s) {
  if (dt == mb::kF32) mb::scan_bwd_f32(p, s);
  else if (dt == mb::kF16) mb::scan_bwd_f16(p, s);
  else mb::scan_bwd_bf16(p, s);
}

// Returns [out, final_state, chunk_states (empty unless save_states)]. items: time steps per thread (8).
std::vector<Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                             const OptT& D, const OptT& z, const OptT& delta_bias, bool softplus, const OptT& h0,
                             bool save_states, int64_t items, int64_t min_blocks, int64_t states, int64_t sp) {
  c10::cuda::CUDAGuard guard(u.device());
  mb::ScanParams p;
  fill_scan(p, u, delta, A, B, C, D, z, delta_bias, softplus);
  TORCH_CHECK(items == 8, "items must be 8");
  p.items = (int)items;
  p.fwd_min_blocks = (int)min_blocks;
  TORCH_CHECK(states == 1 || states == 2 || states == 4, "states must be 1, 2 or 4");
  p.fwd_states = (int)states;
  TORCH_CHECK(sp == -1 || sp == 0 || sp == 1, "sp must be -1 (auto), 0 or 1");
  p.fwd_sp = (int)sp;
  const int64_t b = p.batch, d = p.dim, n = p.dstate;
  p.h0 = opt_f32(h0, "initial_state", b * d * n);
  Tensor out = at::empty_like(u);
  Tensor fin = at::empty({b, d, n}, u.options().dtype(at::kFloat));
  Tensor cs = save_states ? at::empty({b, d, (int64_t)p.n_save, n}, u.options().dtype(at::kFloat))
                          : at::empty({0}, u.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.in_vec = p.in_vec && aligned16(p.out);
  p.final_state = fin.data_ptr<float>();
  p.chunk_states = save_states ? cs.data_ptr<float>() : nullptr;
  run_scan_fwd(p, dtype_code(u), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, fin, cs};
}

// Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0]; dD / dz / ddelta_bias are empty when the
// input was absent. Variable dB / dC come back as fp32 (b, g, n, L); fixed ones as fp32 (d, n).
std::vector<Tensor> scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                             const OptT& D, const OptT& z, const OptT& delta_bias, bool softplus,
                             const Tensor& chunk_states, const Tensor& dout, const OptT& dfinal, int64_t warps, int64_t min_blocks, bool lane_acc,
                             int64_t xs) {
  c10::cuda::CUDAGuard guard(u.device());
  mb::ScanParams p;
  fill_scan(p, u, delta, A, B, C, D, z, delta_bias, softplus);
  TORCH_CHECK(warps == 4 || warps == 8 || warps == 16, "warps must be 4, 8 or 16");
  TORCH_CHECK(xs == 1 || xs == 2, "xs must be 1 or 2");
  p.bwd_warps = (int)warps;
  p.bwd_xs = (int)xs;
  p.bwd_min_blocks = (int)min_blocks;
  p.bwd_lane_acc = lane_acc ? 1 : 0;
  const int64_t b = p.batch, d = p.dim, n = p.dstate, L = p.seqlen;
  CHECK_CONTIG(chunk_states);
  CHECK_F32(chunk_states);
  TORCH_CHECK(chunk_states.numel() == b * d * p.n_save * n, "chunk_states has the wrong size");
  CHECK_CONTIG(dout);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(), "dout must match u");
  p.chunk_states = chunk_states.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dfinal = opt_f32(dfinal, "dfinal_state", b * d * n);
  auto f32 = u.options().dtype(at::kFloat);
  Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  Tensor dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  Tensor dA_part = at::empty({b, d, n}, f32);
  Tensor dD_part = at::empty({b, d}, f32), dbias_part = at::empty({b, d}, f32);
  Tensor dh0 = at::empty({b, d, n}, f32);
  const int64_t Lpad = (int64_t)p.n_save * mb::kScanChunk;
  p.Lpad = (int)Lpad;
  // variable dB / dC accumulate by atomics: one zeroed buffer for both (one memset)
  const int64_t nB = p.B_var ? b * p.B_groups * n * Lpad : b * d * n;
  const int64_t nC = p.C_var ? b * p.C_groups * n * Lpad : b * d * n;
  Tensor dBC = (p.B_var || p.C_var) ? at::zeros({nB + nC}, f32) : at::empty({nB + nC}, f32);
  Tensor dB = dBC.narrow(0, 0, nB), dC = dBC.narrow(0, nB, nC);
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.in_vec = p.in_vec && aligned16(p.dout) && aligned16(p.du) && aligned16(p.ddelta) &&
             (p.dz == nullptr || aligned16(p.dz));
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  p.dbias_part = dbias_part.data_ptr<float>();
  p.dh0 = dh0.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  run_scan_bwd(p, dtype_code(u), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the tail (batch sums, dB / dC cut to L and cast to B / C's dtype) in one launch
  Tensor dA = at::empty({d, n}, f32);
  Tensor dD = D.has_value() ? at::empty({d}, f32) : at::empty({0}, f32);
  Tensor dbias = delta_bias.has_value() ? at::empty({d}, f32) : at::empty({0}, f32);
  Tensor dBo = p.B_var ? at::empty({b, (int64_t)p.B_groups, n, L}, B.options()) : at::empty({d, n}, f32);
  Tensor dCo = p.C_var ? at::empty({b, (int64_t)p.C_groups, n, L}, C.options()) : at::empty({d, n}, f32);
  mb::ScanFinishParams f;
  f.batch = (int)b;
  f.dim = (int)d;
  f.dstate = (int)n;
  f.seqlen = (int)L;
  f.Lpad = (int)Lpad;
  f.B_var = p.B_var;
  f.C_var = p.C_var;
  f.B_rows = (int)(b * p.B_groups * n);
  f.C_rows = (int)(b * p.C_groups * n);
  f.bc_dtype = p.bc_dtype;
  f.dA_part = p.dA_part;
  f.dD_part = D.has_value() ? p.dD_part : nullptr;
  f.dbias_part = delta_bias.has_value() ? p.dbias_part : nullptr;
  f.dB = p.dB;
  f.dC = p.dC;
  f.dA = dA.data_ptr<float>();
  f.dD = D.has_value() ? dD.data_ptr<float>() : nullptr;
  f.dbias = delta_bias.has_value() ? dbias.data_ptr<float>() : nullptr;
  f.dB_out = dBo.data_ptr();
  f.dC_out = dCo.data_ptr();
  mb::scan_finish(f, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, ddelta, dA, dBo, dCo, dD, dz, dbias, dh0};
}

static void fill_conv(mb::ConvParams& p, const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& state,
                      bool silu) {
  CHECK_CUDA(x);
  CHECK_CONTIG(x);
  TORCH_CHECK(x.dim() == 3, "x must be (b, d, L)");
  CHECK_CUDA(weight);
  CHECK_CONTIG(weight);
  CHECK_F32(weight);
  const int64_t b = x.size(0), d = x.size(1), L = x.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d && weight.size(1) >= 1 && weight.size(1) <= 4,
              "weight must be (d, w) with w <= 4");
  const int64_t w = weight.size(1);
  p.batch = (int)b;
  p.dim = (int)d;
  p.seqlen = (int)L;
  p.width = (int)w;
  p.silu = silu ? 1 : 0;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = opt_f32(bias, "bias", d);
  p.state = opt_f32(state, "conv_state", b * d * w);
}

// Returns [out, new_state (fp32 (b, d, w), empty unless want_state)].
std::vector<Tensor> conv_fwd(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& state, bool silu,
                             bool want_state) {
  c10::cuda::CUDAGuard guard(x.device());
  mb::ConvParams p;
  fill_conv(p, x, weight, bias, state, silu);
  Tensor out = at::empty_like(x);
  Tensor ns = want_state ? at::empty({x.size(0), x.size(1), weight.size(1)}, x.options().dtype(at::kFloat))
                         : at::empty({0}, x.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.new_state = want_state ? ns.data_ptr<float>() : nullptr;
  p.vec = aligned16(p.x) && aligned16(p.out) && (x.size(2) * x.element_size()) % 16 == 0;
  if (x.numel() > 0 || want_state) mb::conv_fwd(p, dtype_code(x), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, ns};
}

// Returns [dx, dweight fp32 (d, w), dbias fp32 (d,) or empty, dstate fp32 (b, d, w) or empty].
std::vector<Tensor> conv_bwd(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& state,
                             const Tensor& dout, const OptT& dfinal, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  mb::ConvParams p;
  fill_conv(p, x, weight, bias, state, silu);
  CHECK_CONTIG(dout);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(), "dout must match x");
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x);
  Tensor dw = at::zeros_like(weight);
  Tensor db = bias.has_value() ? at::zeros({x.size(1)}, f32) : at::empty({0}, f32);
  Tensor ds = state.has_value() ? at::empty({x.size(0), x.size(1), weight.size(1)}, f32) : at::empty({0}, f32);
  p.dout = dout.data_ptr();
  p.dfinal = opt_f32(dfinal, "dfinal_state", x.size(0) * x.size(1) * weight.size(1));
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr<float>();
  p.dbias = bias.has_value() ? db.data_ptr<float>() : nullptr;
  p.dstate = state.has_value() ? ds.data_ptr<float>() : nullptr;
  p.vec = aligned16(p.x) && aligned16(p.dout) && aligned16(p.dx) && (x.size(2) * x.element_size()) % 16 == 0;
  mb::conv_bwd(p, dtype_code(x), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw, db, ds};
}

// One scan step in place on state (b, d, n) fp32. B / C: (b, n) views with unit inner stride (rows
// of x_proj's output are fine). Either dt (b, d), or dt_low (b, R) + dt_w (d, R) (fused dt_proj).
Tensor ssm_step(const Tensor& state, const Tensor& x, const OptT& dt, const OptT& dt_low, const OptT& dt_w,
                const Tensor& A, const Tensor& B, const Tensor& C, const OptT& D, const OptT& z, const OptT& dt_bias,
                bool softplus) {
  c10::cuda::CUDAGuard guard(x.device());
  CHECK_CUDA(state);
  CHECK_CONTIG(state);
  CHECK_F32(state);
  CHECK_CUDA(x);
  CHECK_CONTIG(x);
  TORCH_CHECK(x.dim() == 2, "x must be (b, d)");
  const int64_t b = x.size(0), d = x.size(1);
  CHECK_CONTIG(A);
  CHECK_F32(A);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d, "A must be (d, n)");
  const int64_t n = A.size(1);
  TORCH_CHECK(state.dim() == 3 && state.size(0) == b && state.size(1) == d && state.size(2) == n,
              "state must be (b, d, n)");
  mb::StepParams p;
  p.batch = (int)b;
  p.dim = (int)d;
  p.dstate = (int)n;
  p.softplus = softplus ? 1 : 0;
  p.x = x.data_ptr();
  for (const Tensor* M : {&B, &C}) {
    CHECK_CUDA(*M);
    TORCH_CHECK(M->scalar_type() == x.scalar_type(), "B / C must have x's dtype");
    TORCH_CHECK(M->dim() == 2 && M->size(0) == b && M->size(1) == n && M->stride(1) == 1,
                "B / C must be (b, n) with unit inner stride");
  }
  TORCH_CHECK(B.stride(0) == C.stride(0), "B and C must share a row stride");
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.bc_stride = B.stride(0);
  if (dt.has_value()) {
    CHECK_CONTIG(*dt);
    TORCH_CHECK(dt->sizes() == x.sizes() && dt->scalar_type() == x.scalar_type(), "dt must match x");
    p.dt = dt->data_ptr();
  } else {
    TORCH_CHECK(dt_low.has_value() && dt_w.has_value(), "need dt, or dt_low and dt_w");
    CHECK_CONTIG(*dt_w);
    TORCH_CHECK(dt_w->dim() == 2 && dt_w->size(0) == d && dt_w->scalar_type() == x.scalar_type(),
                "dt_w must be (d, R) in x's dtype");
    const int64_t R = dt_w->size(1);
    TORCH_CHECK(dt_low->dim() == 2 && dt_low->size(0) == b && dt_low->size(1) == R && dt_low->stride(1) == 1 &&
                    dt_low->scalar_type() == x.scalar_type(),
                "dt_low must be (b, R) with unit inner stride in x's dtype");
    p.dt_rank = (int)R;
    p.dt_low = dt_low->data_ptr();
    p.dt_low_stride = dt_low->stride(0);
    p.dt_w = dt_w->data_ptr();
  }
  if (z.has_value()) {
    CHECK_CONTIG(*z);
    TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type(), "z must match x");
    p.z = z->data_ptr();
  }
  p.A = A.data_ptr<float>();
  p.D = opt_f32(D, "D", d);
  p.dt_bias = opt_f32(dt_bias, "dt_bias", d);
  p.state = state.data_ptr<float>();
  Tensor out = at::empty_like(x);
  p.out = out.data_ptr();
  mb::ssm_step(p, dtype_code(x), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// One conv step in place on state (b, d, w) (any float dtype). Returns (b, d) in x's dtype.
Tensor conv_step(const Tensor& x, const Tensor& state, const Tensor& weight, const OptT& bias, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  CHECK_CUDA(x);
  CHECK_CONTIG(x);
  CHECK_CUDA(state);
  CHECK_CONTIG(state);
  CHECK_CONTIG(weight);
  CHECK_F32(weight);
  TORCH_CHECK(x.dim() == 2, "x must be (b, d)");
  const int64_t b = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d && weight.size(1) >= 1 && weight.size(1) <= 4,
              "weight must be (d, w), w <= 4");
  const int64_t w = weight.size(1);
  TORCH_CHECK(state.dim() == 3 && state.size(0) == b && state.size(1) == d && state.size(2) == w,
              "conv_state must be (b, d, w)");
  mb::ConvStepParams p;
  p.batch = (int)b;
  p.dim = (int)d;
  p.width = (int)w;
  p.silu = silu ? 1 : 0;
  p.x = x.data_ptr();
  p.state = state.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = opt_f32(bias, "bias", d);
  Tensor out = at::empty_like(x);
  p.out = out.data_ptr();
  mb::conv_step(p, dtype_code(x), dtype_code(state), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// One Mamba block at decode (see layer_step.cu). E-typed tensors share hidden's dtype; conv_w (d_inner,
// w), conv_b, dt_b, A (d_inner, n), D and both states are fp32. counters: int32, zero, at least
// ceil(b / 8) * ceil(d_inner / 256) elements (left zero). Returns (block output, new residual).
std::vector<Tensor> layer_step(const Tensor& hidden, const OptT& residual, bool residual_f32, const Tensor& norm_w,
                               const OptT& norm_b, double eps, bool rms, const Tensor& in_w, const OptT& in_b,
                               const Tensor& conv_w, const OptT& conv_b, const Tensor& conv_state, const Tensor& x_w,
                               const Tensor& dt_w, const OptT& dt_b, const Tensor& A, const OptT& D,
                               const Tensor& ssm_state, const Tensor& out_w, const OptT& out_b,
                               const Tensor& counters, bool pdl) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const auto E = hidden.scalar_type();
  TORCH_CHECK(hidden.dim() == 2, "hidden must be (b, d_model)");
  const int64_t b = hidden.size(0), Dm = hidden.size(1);
  TORCH_CHECK(in_w.dim() == 2 && in_w.size(1) == Dm && in_w.size(0) % 2 == 0, "in_proj weight must be (2 d_inner, d_model)");
  const int64_t di = in_w.size(0) / 2;
  TORCH_CHECK(A.dim() == 2 && A.size(0) == di, "A must be (d_inner, n)");
  const int64_t n = A.size(1);
  TORCH_CHECK(dt_w.dim() == 2 && dt_w.size(0) == di, "dt_proj weight must be (d_inner, R)");
  const int64_t R = dt_w.size(1);
  TORCH_CHECK(conv_w.dim() == 2 && conv_w.size(0) == di && conv_w.size(1) >= 1 && conv_w.size(1) <= 4,
              "conv weight must be (d_inner, w), w <= 4");
  const int64_t w = conv_w.size(1);
  TORCH_CHECK(b >= 1 && Dm % 8 == 0 && di % 16 == 0, "layer_step needs d_model % 8 == 0 and d_inner % 16 == 0");
  auto check_e = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    CHECK_CUDA(t);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == E, name, " must have hidden's dtype");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has the wrong shape");
    TORCH_CHECK(aligned16(t.data_ptr()), name, " must be 16-byte aligned");
  };
  auto check_f = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    CHECK_CUDA(t);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    CHECK_F32(t);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has the wrong shape");
  };
  check_e(hidden, "hidden", {b, Dm});
  check_e(norm_w, "norm weight", {Dm});
  if (norm_b.has_value()) check_e(*norm_b, "norm bias", {Dm});
  check_e(in_w, "in_proj weight", {2 * di, Dm});
  if (in_b.has_value()) check_e(*in_b, "in_proj bias", {2 * di});
  check_f(conv_w, "conv weight", {di, w});
  if (conv_b.has_value()) check_f(*conv_b, "conv bias", {di});
  check_f(conv_state, "conv state", {b, di, w});
  check_e(x_w, "x_proj weight", {R + 2 * n, di});
  check_e(dt_w, "dt_proj weight", {di, R});
  if (dt_b.has_value()) check_f(*dt_b, "dt bias", {di});
  check_f(A, "A", {di, n});
  if (D.has_value()) check_f(*D, "D", {di});
  check_f(ssm_state, "ssm state", {b, di, n});
  check_e(out_w, "out_proj weight", {Dm, di});
  if (out_b.has_value()) check_e(*out_b, "out_proj bias", {Dm});
  const bool res_f32 = (E == at::kFloat) || residual_f32;
  const auto RT = res_f32 ? at::kFloat : E;
  if (residual.has_value()) {
    CHECK_CUDA(*residual);
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == RT && residual->sizes() == hidden.sizes(),
                "residual must be contiguous (b, d_model) in ", RT);
  }
  const int64_t chunks = (b + mb::kLsMaxB - 1) / mb::kLsMaxB;
  const int64_t nblk = di / mb::kLsInChannels;
  const int64_t groups = (nblk + mb::kLsGroup - 1) / mb::kLsGroup;
  CHECK_CUDA(counters);
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= chunks * groups,
              "counters must be int32 with at least ", chunks * groups, " elements");
  const int64_t J = R + 2 * n;

  mb::LayerStepParams p;
  p.batch = (int)b;
  p.d_model = (int)Dm;
  p.d_inner = (int)di;
  p.d_state = (int)n;
  p.dt_rank = (int)R;
  p.d_conv = (int)w;
  p.n_in_blocks = (int)nblk;
  p.n_groups = (int)groups;
  p.rms = rms ? 1 : 0;
  p.eps = (float)eps;
  p.residual_f32 = res_f32 ? 1 : 0;
  TORCH_CHECK(mb::layer_step_smem(p, dtype_code(hidden)) >= 0, "layer_step: d_model too large for shared memory");
  auto opt_ptr = [](const OptT& t) -> const void* { return t.has_value() ? t->data_ptr() : nullptr; };
  auto opt_fptr = [](const OptT& t) -> const float* { return t.has_value() ? t->data_ptr<float>() : nullptr; };
  Tensor out = at::empty_like(hidden);
  Tensor res_out = at::empty({b, Dm}, hidden.options().dtype(RT));
  Tensor xc = at::empty({b, di}, hidden.options());
  Tensor z = at::empty({b, di}, hidden.options());
  Tensor y = at::empty({b, di}, hidden.options());
  Tensor part = at::empty({chunks * nblk * mb::kLsMaxB * J}, hidden.options().dtype(at::kFloat));
  Tensor gpart = at::empty({chunks * groups * mb::kLsMaxB * J}, hidden.options().dtype(at::kFloat));
  p.hidden = hidden.data_ptr();
  p.residual = opt_ptr(residual);
  p.residual_out = res_out.data_ptr();
  p.norm_w = norm_w.data_ptr();
  p.norm_b = opt_ptr(norm_b);
  p.in_w = in_w.data_ptr();
  p.in_b = opt_ptr(in_b);
  p.conv_w = conv_w.data_ptr<float>();
  p.conv_b = opt_fptr(conv_b);
  p.conv_state = conv_state.data_ptr<float>();
  p.x_w = x_w.data_ptr();
  p.dt_w = dt_w.data_ptr();
  p.dt_b = opt_fptr(dt_b);
  p.A = A.data_ptr<float>();
  p.D = opt_fptr(D);
  p.ssm_state = ssm_state.data_ptr<float>();
  p.out_w = out_w.data_ptr();
  p.out_b = opt_ptr(out_b);
  p.xc = xc.data_ptr();
  p.z = z.data_ptr();
  p.y = y.data_ptr();
  p.part = part.data_ptr<float>();
  p.gpart = gpart.data_ptr<float>();
  p.counters = counters.data_ptr<int>();
  p.out = out.data_ptr();
  mb::layer_step(p, dtype_code(hidden), c10::cuda::getCurrentCUDAStream().stream(), pdl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, res_out};
}

// Residual add + LayerNorm / RMSNorm (inference). hidden (rows, D) contiguous; residual (rows, D) in
// fp32 (residual_f32) or hidden's dtype, or none; weight / bias (D,) in hidden's dtype.
// Returns (normed in hidden's dtype, new residual).
std::vector<Tensor> add_norm(const Tensor& hidden, const OptT& residual, bool residual_f32, const Tensor& weight,
                             const OptT& bias, double eps, bool rms) {
  c10::cuda::CUDAGuard guard(hidden.device());
  CHECK_CUDA(hidden);
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous (rows, d)");
  const auto E = hidden.scalar_type();
  const int64_t rows = hidden.size(0), D = hidden.size(1);
  const bool res_f32 = (E == at::kFloat) || residual_f32;
  const auto RT = res_f32 ? at::kFloat : E;
  auto check_w = [&](const Tensor& t, const char* name) {
    CHECK_CUDA(t);
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == E && t.dim() == 1 && t.size(0) == D, name,
                " must be contiguous (d,) in hidden's dtype");
  };
  check_w(weight, "norm weight");
  if (bias.has_value()) check_w(*bias, "norm bias");
  if (residual.has_value()) {
    CHECK_CUDA(*residual);
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == RT && residual->sizes() == hidden.sizes(),
                "residual must be contiguous (rows, d) in ", RT);
  }
  TORCH_CHECK(D >= 1 && D * 4 <= 96 * 1024, "add_norm: d must be in [1, 24576]");
  Tensor out = at::empty_like(hidden);
  Tensor res_out = at::empty({rows, D}, hidden.options().dtype(RT));
  mb::AddNormParams p;
  p.rows = (int)rows;
  p.dim = (int)D;
  p.rms = rms ? 1 : 0;
  p.residual_f32 = res_f32 ? 1 : 0;
  p.eps = (float)eps;
  p.hidden = hidden.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.residual_out = res_out.data_ptr();
  p.out = out.data_ptr();
  mb::add_norm(p, dtype_code(hidden), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, res_out};
}

static at::ScalarType scalar_of(int64_t code) {
  TORCH_CHECK(code == mb::kF32 || code == mb::kF16 || code == mb::kBF16, "dtype code must be 0, 1 or 2");
  return code == mb::kF32 ? at::kFloat : code == mb::kF16 ? at::kHalf : at::kBFloat16;
}

// Residual add + LayerNorm / RMSNorm for training (fp32 weights and residual stream). hidden (rows, d)
// contiguous; residual fp32 (rows, d) or none; out_dtype: the normed output's dtype code. Returns
// [normed, residual_out (fp32), mean, rstd], or [] when the dtypes / width / alignment are not supported.
std::vector<Tensor> add_norm_train_fwd(const Tensor& hidden, const OptT& residual, const Tensor& weight,
                                       const OptT& bias, double eps, bool rms, int64_t out_dtype) {
  c10::cuda::CUDAGuard guard(hidden.device());
  CHECK_CUDA(hidden);
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous (rows, d)");
  const int64_t rows = hidden.size(0), D = hidden.size(1);
  auto check_f32 = [&](const Tensor& t, const char* name, int64_t numel) {
    CHECK_CUDA(t);
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.numel() == numel, name,
                " must be contiguous fp32 with ", numel, " elements");
  };
  check_f32(weight, "norm weight", D);
  if (bias.has_value()) check_f32(*bias, "norm bias", D);
  if (residual.has_value()) check_f32(*residual, "residual", rows * D);
  auto f32 = hidden.options().dtype(at::kFloat);
  Tensor out = at::empty({rows, D}, hidden.options().dtype(scalar_of(out_dtype)));
  Tensor res_out = at::empty({rows, D}, f32);
  Tensor mean = at::empty({rows}, f32), rstd = at::empty({rows}, f32);
  mb::AddNormTrainParams p;
  p.rows = (int)rows;
  p.dim = (int)D;
  p.rms = rms ? 1 : 0;
  p.eps = (float)eps;
  p.hidden = hidden.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  p.weight = weight.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.residual_out = res_out.data_ptr<float>();
  p.out = out.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  if (!aligned16(p.hidden) || !aligned16(p.residual) || !aligned16(p.weight) || !aligned16(p.bias)) return {};
  if (!mb::add_norm_train_fwd(p, dtype_code(hidden), (int)out_dtype, c10::cuda::getCurrentCUDAStream().stream()))
    return {};
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, res_out, mean, rstd};
}

// Its backward: from the forward's residual_out / mean / rstd and the gradients of normed (dout) and of
// residual_out (dres, or none). Returns [d(hidden) in hidden_dtype, d(residual) fp32 (empty unless
// want_dresidual), d(weight), d(bias) (empty unless has_bias)], or [] when not supported.
std::vector<Tensor> add_norm_train_bwd(const Tensor& res_out, const Tensor& mean, const Tensor& rstd,
                                       const Tensor& weight, bool has_bias, const Tensor& dout, const OptT& dres,
                                       bool rms, int64_t hidden_dtype, bool want_dresidual) {
  c10::cuda::CUDAGuard guard(res_out.device());
  TORCH_CHECK(res_out.dim() == 2 && res_out.is_contiguous() && res_out.scalar_type() == at::kFloat,
              "residual_out must be contiguous fp32 (rows, d)");
  const int64_t rows = res_out.size(0), D = res_out.size(1);
  TORCH_CHECK(dout.is_contiguous() && dout.numel() == rows * D, "dout must be contiguous (rows, d)");
  if (dres.has_value())
    TORCH_CHECK(dres->is_contiguous() && dres->scalar_type() == at::kFloat && dres->numel() == rows * D,
                "dres must be contiguous fp32 (rows, d)");
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * mb::sm_count()));
  auto f32 = res_out.options();
  Tensor dh = at::empty({rows, D}, res_out.options().dtype(scalar_of(hidden_dtype)));
  Tensor dr = want_dresidual ? at::empty({rows, D}, f32) : at::empty({0}, f32);
  Tensor dw_part = at::empty({blocks, D}, f32);
  Tensor db_part = has_bias ? at::empty({blocks, D}, f32) : at::empty({0}, f32);
  mb::AddNormTrainParams p;
  p.rows = (int)rows;
  p.dim = (int)D;
  p.rms = rms ? 1 : 0;
  p.weight = weight.data_ptr<float>();
  p.residual_out = res_out.data_ptr<float>();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dres = dres.has_value() ? dres->data_ptr<float>() : nullptr;
  p.dhidden = dh.data_ptr();
  p.dresidual = want_dresidual ? dr.data_ptr<float>() : nullptr;
  p.dw_part = dw_part.data_ptr<float>();
  p.db_part = has_bias ? db_part.data_ptr<float>() : nullptr;
  p.blocks = (int)blocks;
  if (!aligned16(p.dout) || !aligned16(p.dres) || !aligned16(p.weight)) return {};
  if (!mb::add_norm_train_bwd(p, (int)hidden_dtype, dtype_code(dout), c10::cuda::getCurrentCUDAStream().stream()))
    return {};
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dh, dr, dw_part.sum(0), has_bias ? db_part.sum(0) : db_part};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MambaByte CUDA kernels: resumable selective scan, causal conv1d, decode steps";
  m.def("scan_fwd", &scan_fwd, "selective scan forward");
  m.def("scan_bwd", &scan_bwd, "selective scan backward");
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d forward");
  m.def("conv_bwd", &conv_bwd, "causal depthwise conv1d backward");
  m.def("ssm_step", &ssm_step, "one selective-scan step, in place");
  m.def("conv_step", &conv_step, "one causal-conv step, in place");
  m.def("add_norm", &add_norm, "residual add + LayerNorm / RMSNorm (inference)");
  m.def("add_norm_train_fwd", &add_norm_train_fwd, "residual add + LayerNorm / RMSNorm for training (forward)");
  m.def("add_norm_train_bwd", &add_norm_train_bwd, "residual add + LayerNorm / RMSNorm for training (backward)");
  m.def("layer_step", &layer_step, "one Mamba block at decode: add + norm + mixer step, states in place");
}

// The selective-scan backward's tail in one launch (see ScanFinishParams): five or six small torch ops
// (three batch sums, two narrow + cast copies) cost more in launches than in work.
#include <algorithm>

#include "common.cuh"
#include "params.h"

namespace mambabyte {
namespace {

__device__ __forceinline__ float batch_sum(const float* part, long stride, int batch, long i) {
  float s = 0.f;
  for (int b = 0; b < batch; ++b) s += part[b * stride + i];  // fixed order: deterministic
  return s;
}

template <typename BE>
__device__ __forceinline__ void finish_bc(const ScanFinishParams& p, int var, int rows, const float* acc, void* out,
                                          long i) {
  if (var) {
    const long r = i / p.seqlen, t = i - r * p.seqlen;
    static_cast<BE*>(out)[i] = from_float<BE>(acc[r * (long)p.Lpad + t]);
  } else {
    static_cast<float*>(out)[i] = batch_sum(acc, (long)p.dim * p.dstate, p.batch, i);
  }
}

template <typename BE>
__global__ void scan_finish_kernel(const ScanFinishParams p) {
  const long dn = (long)p.dim * p.dstate;
  const long nD = p.dD_part ? p.dim : 0, nb = p.dbias_part ? p.dim : 0;
  const long nB = p.B_var ? (long)p.B_rows * p.seqlen : dn;
  const long nC = p.C_var ? (long)p.C_rows * p.seqlen : dn;
  const long total = dn + nD + nb + nB + nC;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    long k = i;
    if (k < dn) { p.dA[k] = batch_sum(p.dA_part, dn, p.batch, k); continue; }
    k -= dn;
    if (k < nD) { p.dD[k] = batch_sum(p.dD_part, p.dim, p.batch, k); continue; }
    k -= nD;
    if (k < nb) { p.dbias[k] = batch_sum(p.dbias_part, p.dim, p.batch, k); continue; }
    k -= nb;
    if (k < nB) { finish_bc<BE>(p, p.B_var, p.B_rows, p.dB, p.dB_out, k); continue; }
    k -= nB;
    finish_bc<BE>(p, p.C_var, p.C_rows, p.dC, p.dC_out, k);
  }
}

}  // namespace

void scan_finish(const ScanFinishParams& p, cudaStream_t s) {
  const long dn = (long)p.dim * p.dstate;
  const long total = dn + (p.dD_part ? p.dim : 0) + (p.dbias_part ? p.dim : 0) +
                     (p.B_var ? (long)p.B_rows * p.seqlen : dn) + (p.C_var ? (long)p.C_rows * p.seqlen : dn);
  if (total == 0) return;
  const int threads = 256;
  const int blocks = (int)std::min<long>((total + threads - 1) / threads, 8L * sm_count());
  if (p.bc_dtype == kF16) scan_finish_kernel<__half><<<blocks, threads, 0, s>>>(p);
  else if (p.bc_dtype == kBF16) scan_finish_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(p);
  else scan_finish_kernel<float><<<blocks, threads, 0, s>>>(p);
}

}  // namespace mambabyte

// Instantiates the selective-scan bwd pass for __nv_bfloat16 u / delta / z (B / C in __nv_bfloat16 or fp32).
#include "scan_kernels.cuh"

namespace mambabyte {

void scan_bwd_bf16(ScanParams& p, cudaStream_t s) {
  if (p.bc_dtype == kF32) {
    scan_bwd_launch<__nv_bfloat16, float>(p, s);
  } else {
    scan_bwd_launch<__nv_bfloat16, __nv_bfloat16>(p, s);
  }
}

}  // namespace mambabyte

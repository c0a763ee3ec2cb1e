// Instantiates the selective-scan fwd pass for __half u / delta / z (B / C in __half or fp32).
#include "scan_kernels.cuh"

namespace mambabyte {

void scan_fwd_f16(ScanParams& p, cudaStream_t s) {
  if (p.bc_dtype == kF32) {
    scan_fwd_launch<__half, float>(p, s);
  } else {
    scan_fwd_launch<__half, __half>(p, s);
  }
}

}  // namespace mambabyte

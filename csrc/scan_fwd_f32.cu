// Instantiates the selective-scan fwd pass for float u / delta / z (B / C in float or fp32).
#include "scan_kernels.cuh"

namespace mambabyte {

void scan_fwd_f32(ScanParams& p, cudaStream_t s) {
  if (p.bc_dtype == kF32) {
    scan_fwd_launch<float, float>(p, s);
  } else {
    scan_fwd_launch<float, float>(p, s);
  }
}

}  // namespace mambabyte

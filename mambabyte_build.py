"""Build-time helpers for setup.py (not part of the installed package)."""

import os


def _local_arch():
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:
        pass
    return "9.0"


def cuda_build_flags():
    """nvcc flags: -gencode for each arch in MAMBABYTE_CUDA_ARCH_LIST (default: the local GPU)."""
    archs = os.environ.get("MAMBABYTE_CUDA_ARCH_LIST") or _local_arch()
    flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "").replace("+PTX", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags

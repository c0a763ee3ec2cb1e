"""``mambabyte doctor``: the environment and which backend each op uses, and why."""

from __future__ import annotations

import platform
import sys

from .common import ArgumentParser, cli_entry


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mambabyte doctor", description=__doc__)
    p.parse_args(argv)
    import torch

    from .. import __version__
    from ..io import list_shipped_models
    from ..ops import backend_report

    print(f"mambabyte {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({sys.platform})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("CUDA device: none (CPU tensors always use the PyTorch reference ops)")
    print("backends for CUDA tensors:")
    for op, how in backend_report().items():
        print(f"  {op:<24} {how}")
    from ..ops import cuda_backend_status

    if cuda_backend_status()[0]:
        from ..ops import cuda_backend

        ok = cuda_backend.FUSED_BLOCK_STEP and hasattr(cuda_backend._ext(), "layer_step")
        pdl = "with" if cuda_backend._pdl_ok(torch.device("cuda")) else "without"
        print(f"  {'model.step (decode)':<24} "
              + (f"fused block step, 3 launches per block {pdl} programmatic dependent launch, batches of up"
                 f" to {cuda_backend.FUSED_MAX_BATCH} (MAMBABYTE_FUSED_MAX_BATCH); larger batches per-op" if ok else
                 "per-op step (MAMBABYTE_FUSED_BLOCK_STEP=0, or the extension predates layer_step)"))
        sp = cuda_backend.TUNING.get("fwd_sp", -1)
        print(f"  {'scan forward kernel':<24} "
              + {0: "chunked (lanes over time) everywhere (MAMBABYTE_SCAN_FWD_SP=0)",
                 1: "state-parallel wherever it applies (d_state 16, variable B / C; MAMBABYTE_SCAN_FWD_SP=1)"}.get(
                  sp, "state-parallel for d_state 16 with variable B / C when batch x channels / 8 >= 4 x SMs or "
                      "L <= 256, else chunked (MAMBABYTE_SCAN_FWD_SP=0 / 1 to force)"))
    for mod in ("triton", "datasets", "huggingface_hub", "tokenizers"):
        try:
            m = __import__(mod)
            print(f"optional {mod:<16} {getattr(m, '__version__', 'installed')}")
        except Exception:
            print(f"optional {mod:<16} not installed")
    shipped = list_shipped_models()
    print(f"shipped models: {', '.join(shipped) if shipped else 'none found'}")
    return 0

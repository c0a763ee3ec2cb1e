"""Mamba-1 ops with explicit backend dispatch.

Public ops (same signatures whichever backend runs them):

* :func:`selective_scan` -- the selective scan, resumable from ``initial_state``.
* :func:`causal_conv1d` -- causal depthwise conv that takes and returns its window state.
* :func:`selective_state_update` -- one scan step, in place on the state (decoding).
* :func:`causal_conv1d_update` -- one conv step, in place on the window (decoding).

Backends: ``cuda`` (our compiled kernels from ``csrc/``, used for CUDA tensors when the extension is
built or can be JIT-built) and ``reference`` (pure PyTorch, everywhere). ``MAMBABYTE_BACKEND=reference``
forces the reference path. The first call logs one line naming the backend chosen and why;
:func:`backend_report` returns the same information for ``mambabyte doctor``.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch

from .reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "selective_scan",
    "causal_conv1d",
    "selective_state_update",
    "causal_conv1d_update",
    "selective_scan_ref",
    "causal_conv1d_ref",
    "selective_state_update_ref",
    "causal_conv1d_update_ref",
    "backend_report",
    "cuda_backend_status",
]

logger = logging.getLogger("mambabyte.ops")

_cuda_status: Optional[Tuple[bool, str]] = None
_logged: Dict[str, bool] = {}


def cuda_backend_status() -> Tuple[bool, str]:
    """(available, reason) for the compiled CUDA backend. Cached after the first call."""
    global _cuda_status
    if _cuda_status is not None:
        return _cuda_status
    if os.environ.get("MAMBABYTE_BACKEND", "").lower() == "reference":
        _cuda_status = (False, "MAMBABYTE_BACKEND=reference forces the PyTorch reference path")
    elif not torch.cuda.is_available():
        _cuda_status = (False, "no CUDA device visible to torch")
    else:
        try:
            from . import cuda_backend  # noqa: WPS433 (imported lazily on purpose)
        except ImportError as exc:  # the module itself is missing (stripped install)
            _cuda_status = (False, f"CUDA backend module not importable: {exc}")
        else:
            _cuda_status = cuda_backend.status()
    return _cuda_status


def _use_cuda(t: torch.Tensor, op: str) -> bool:
    if t.is_cuda:
        ok, reason = cuda_backend_status()
    else:
        ok, reason = False, "inputs are on the CPU"
    key = f"{op}:{'cuda' if ok else 'reference'}"
    if key not in _logged:
        _logged[key] = True
        logger.info("mambabyte.ops.%s uses the %s backend (%s)", op, "cuda" if ok else "reference", reason)
    return ok


def backend_report() -> Dict[str, str]:
    """Which backend each op uses for CUDA tensors on this machine, and why."""
    ok, reason = cuda_backend_status()
    name = "cuda" if ok else "reference"
    return {
        op: f"{name} ({reason})"
        for op in ("selective_scan", "causal_conv1d", "selective_state_update", "causal_conv1d_update")
    }


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` conventions plus a resumable state.

    Args:
        u, delta: (b, d, L); z: optional (b, d, L) gate.
        A: (d, n) fp32. B, C: (d, n), (b, n, L) or (b, g, n, L).
        D, delta_bias: optional (d,) fp32.
        delta_softplus: apply softplus to delta (+ delta_bias).
        initial_state: optional (b, d, n) fp32 state to start from.
        return_final_state: also return the final (b, d, n) fp32 state.

    Returns ``out`` (b, d, L) in u's dtype, or ``(out, final_state)``. Differentiable with respect to
    every tensor input, including ``initial_state``.
    """
    if _use_cuda(u, "selective_scan"):
        from .cuda_backend import selective_scan_cuda

        return selective_scan_cuda(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
        )
    return selective_scan_ref(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )


def causal_conv1d(x, weight, bias=None, conv_state=None, activation=None, return_final_state=False):
    """Causal depthwise conv1d over (b, d, L) with an optional (b, d, w) window state in and out."""
    if _use_cuda(x, "causal_conv1d"):
        from .cuda_backend import causal_conv1d_cuda

        return causal_conv1d_cuda(x, weight, bias, conv_state, activation, return_final_state)
    return causal_conv1d_ref(
        x, weight, bias=bias, conv_state=conv_state, activation=activation, return_final_state=return_final_state
    )


def selective_state_update(ssm_state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the scan; updates ``ssm_state`` (b, d, n) in place, returns y (b, d)."""
    if _use_cuda(x, "selective_state_update"):
        from .cuda_backend import selective_state_update_cuda

        return selective_state_update_cuda(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_ref(ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decode step of the conv; updates ``conv_state`` (b, d, w) in place, returns (b, d)."""
    if _use_cuda(x, "causal_conv1d_update"):
        from .cuda_backend import causal_conv1d_update_cuda

        return causal_conv1d_update_cuda(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias=bias, activation=activation)

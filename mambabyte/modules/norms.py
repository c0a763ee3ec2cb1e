"""Normalisation layers: LayerNorm (with bias, as MambaByte uses) and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def add_norm(hidden: torch.Tensor, residual, norm: nn.Module, residual_in_fp32: bool):
    """``residual = hidden + residual`` (fp32 when ``residual_in_fp32``), then ``norm`` of it cast to the
    norm's dtype. Returns (normed, residual). On a CUDA tensor this is one fused kernel (csrc/add_norm.cu):
    without autograd for norm weights in hidden's dtype, and with autograd (a forward and a backward
    kernel) for fp32 norm weights, where the normed output comes in the autocast dtype under autocast;
    otherwise, and whenever those kernels do not apply, the three torch ops."""
    if hidden.is_cuda:
        from ..ops import cuda_backend_status

        if cuda_backend_status()[0]:
            from ..ops.cuda_backend import add_norm_cuda, add_norm_train_cuda

            fused = add_norm_cuda(hidden, residual, norm, residual_in_fp32)
            if fused is None:
                fused = add_norm_train_cuda(hidden, residual, norm, residual_in_fp32)
            if fused is not None:
                return fused
    residual = hidden if residual is None else hidden + residual
    if residual_in_fp32:
        residual = residual.float()
    return norm(residual.to(norm.weight.dtype)), residual


def make_norm(kind: str, dim: int, eps: float, device=None, dtype=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm {kind!r}")

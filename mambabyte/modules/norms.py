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


def make_norm(kind: str, dim: int, eps: float, device=None, dtype=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm {kind!r}")

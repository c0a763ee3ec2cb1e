"""Residual block: residual add -> norm -> mixer (Mamba's pre-norm ordering)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .mixer import MambaMixer
from .norms import add_norm, make_norm

Tensor = torch.Tensor


class Block(nn.Module):
    """``residual = hidden + residual; hidden = mixer(norm(residual))``.

    Returns (hidden, residual); the residual stream is kept in fp32 when ``residual_in_fp32``.
    """

    def __init__(self, d_model: int, mixer: MambaMixer, norm: str, norm_eps: float, residual_in_fp32: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = make_norm(norm, d_model, norm_eps, device=device, dtype=dtype)
        self.residual_in_fp32 = residual_in_fp32

    def _add_norm(self, hidden: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return add_norm(hidden, residual, self.norm, self.residual_in_fp32)

    def forward(
        self,
        hidden: Tensor,
        residual: Optional[Tensor],
        conv_state: Optional[Tensor] = None,
        ssm_state: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        normed, residual = self._add_norm(hidden, residual)
        out, new_conv, new_ssm = self.mixer(normed, conv_state, ssm_state)
        return out, residual, new_conv, new_ssm

    def step(self, hidden: Tensor, residual: Optional[Tensor], conv_state: Tensor, ssm_state: Tensor):
        normed, residual = self._add_norm(hidden, residual)
        return self.mixer.step(normed, conv_state, ssm_state), residual

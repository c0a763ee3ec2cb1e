"""Building blocks of the MambaByte LM: norms, the Mamba-1 mixer, the residual block."""

from .block import Block
from .mixer import CausalConv1d, MambaMixer
from .norms import RMSNorm, make_norm

__all__ = ["Block", "MambaMixer", "CausalConv1d", "RMSNorm", "make_norm"]

"""The recurrent state of a MambaByte model.

A :class:`MambaState` holds, for every layer, the causal-conv window and the SSM state:

* ``conv``: (n_layer, b, d_inner, d_conv) -- the last d_conv inputs of each layer's conv, oldest first
* ``ssm``: (n_layer, b, d_inner, d_state) -- the SSM hidden state h

both in fp32, plus ``bytes_consumed`` (how many bytes of input produced it). Stacking layers into one
tensor each keeps the state cheap to clone, save, and capture in CUDA graphs.

States never alias by accident: :meth:`MambaState.clone` is a deep copy, ``model(...)`` returns a new
state and leaves the one passed in untouched. :meth:`MambaByteLM.step` is the one explicit in-place
operation (for decoding speed).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .errors import StateError

Tensor = torch.Tensor


class MambaState:
    """Per-layer conv windows and SSM states of a batch of byte streams."""

    __slots__ = ("conv", "ssm", "bytes_consumed", "logits")

    def __init__(self, conv: Tensor, ssm: Tensor, bytes_consumed: int = 0, logits: Optional[Tensor] = None) -> None:
        if conv.dim() != 4 or ssm.dim() != 4:
            raise StateError(
                f"state tensors must be 4-D (n_layer, b, d_inner, *); got conv {tuple(conv.shape)}, ssm {tuple(ssm.shape)}"
            )
        if conv.shape[:3] != ssm.shape[:3]:
            raise StateError(f"conv {tuple(conv.shape)} and ssm {tuple(ssm.shape)} disagree on (n_layer, b, d_inner)")
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != conv.shape[1]):
            raise StateError(f"logits must be (batch {conv.shape[1]}, vocab); got {tuple(logits.shape)}")
        self.conv = conv
        self.ssm = ssm
        self.bytes_consumed = int(bytes_consumed)
        # the next-byte logits after the last byte consumed (b, 256) fp32, when known: what lets an
        # empty prompt continue from this state; carried by copies, not compared by equal()/allclose()
        self.logits = logits

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls,
        n_layer: int,
        batch_size: int,
        d_inner: int,
        d_conv: int,
        d_state: int,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "MambaState":
        conv = torch.zeros(n_layer, batch_size, d_inner, d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(n_layer, batch_size, d_inner, d_state, device=device, dtype=dtype)
        return cls(conv, ssm, 0)

    # -- shape info ---------------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return self.conv.shape[0]

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def d_inner(self) -> int:
        return self.conv.shape[2]

    @property
    def d_conv(self) -> int:
        return self.conv.shape[3]

    @property
    def d_state(self) -> int:
        return self.ssm.shape[3]

    @property
    def device(self) -> torch.device:
        return self.ssm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ssm.dtype

    def layer(self, i: int) -> Tuple[Tensor, Tensor]:
        """(conv (b, d_inner, d_conv), ssm (b, d_inner, d_state)) views of layer i."""
        return self.conv[i], self.ssm[i]

    def layers(self) -> Iterator[Tuple[Tensor, Tensor]]:
        for i in range(self.n_layer):
            yield self.layer(i)

    # -- copies and moves --------------------------------------------------------------------------
    def clone(self) -> "MambaState":
        """An independent deep copy."""
        return MambaState(self.conv.clone(), self.ssm.clone(), self.bytes_consumed, _opt(self.logits, "clone"))

    def detach(self) -> "MambaState":
        """The same values without autograd history (for truncated BPTT). Shares storage."""
        return MambaState(self.conv.detach(), self.ssm.detach(), self.bytes_consumed, _opt(self.logits, "detach"))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MambaState":
        """A copy on ``device`` and/or in ``dtype`` (always a new object)."""
        conv = self.conv.to(device=device, dtype=dtype, copy=True)
        ssm = self.ssm.to(device=device, dtype=dtype, copy=True)
        logits = self.logits.to(device=device, copy=True) if self.logits is not None else None
        return MambaState(conv, ssm, self.bytes_consumed, logits)

    def reset(self) -> "MambaState":
        """Zero in place (back to the start-of-text state). Returns self."""
        self.conv.zero_()
        self.ssm.zero_()
        self.bytes_consumed = 0
        self.logits = None
        return self

    zero_ = reset

    def copy_(self, other: "MambaState") -> "MambaState":
        """Copy ``other``'s values into this state's buffers in place (shapes must match)."""
        self.check_compatible(other, check_batch=True)
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        self.bytes_consumed = other.bytes_consumed
        self.logits = _opt(other.logits, "clone")
        return self

    def select(self, index: Union[int, Sequence[int], Tensor]) -> "MambaState":
        """A new state holding the batch rows in ``index`` (a copy)."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.conv.device)
        logits = self.logits.index_select(0, idx.to(self.logits.device)) if self.logits is not None else None
        return MambaState(self.conv.index_select(1, idx), self.ssm.index_select(1, idx), self.bytes_consumed, logits)

    def repeat(self, times: int) -> "MambaState":
        """Each batch row repeated ``times`` times (row-major: r0, r0, ..., r1, r1, ...)."""
        return MambaState(
            self.conv.repeat_interleave(times, dim=1), self.ssm.repeat_interleave(times, dim=1), self.bytes_consumed,
            self.logits.repeat_interleave(times, dim=0) if self.logits is not None else None,
        )

    @staticmethod
    def cat(states: List["MambaState"]) -> "MambaState":
        """Concatenate states along the batch dimension."""
        if not states:
            raise StateError("cannot concatenate an empty list of states")
        for s in states[1:]:
            states[0].check_compatible(s, check_batch=False)
        logits = None
        if all(s.logits is not None for s in states):
            logits = torch.cat([s.logits.to(states[0].logits.device) for s in states], dim=0)
        return MambaState(
            torch.cat([s.conv for s in states], dim=1),
            torch.cat([s.ssm for s in states], dim=1),
            max(s.bytes_consumed for s in states),
            logits,
        )

    # -- comparisons --------------------------------------------------------------------------
    def check_compatible(self, other: "MambaState", check_batch: bool = True) -> None:
        a = (self.n_layer, self.d_inner, self.d_conv, self.d_state)
        b = (other.n_layer, other.d_inner, other.d_conv, other.d_state)
        if a != b:
            raise StateError(
                f"incompatible states: (n_layer, d_inner, d_conv, d_state) {a} vs {b}"
            )
        if check_batch and self.batch_size != other.batch_size:
            raise StateError(f"incompatible states: batch size {self.batch_size} vs {other.batch_size}")

    def equal(self, other: "MambaState") -> bool:
        """Bit-exact equality of shapes and values."""
        return (
            self.conv.shape == other.conv.shape
            and self.ssm.shape == other.ssm.shape
            and torch.equal(self.conv, other.conv.to(self.conv.device))
            and torch.equal(self.ssm, other.ssm.to(self.ssm.device))
        )

    def allclose(self, other: "MambaState", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        if self.conv.shape != other.conv.shape or self.ssm.shape != other.ssm.shape:
            return False
        return torch.allclose(self.conv, other.conv.to(self.conv), rtol=rtol, atol=atol) and torch.allclose(
            self.ssm, other.ssm.to(self.ssm), rtol=rtol, atol=atol
        )

    def max_abs_diff(self, other: "MambaState") -> float:
        return max(
            (self.conv - other.conv.to(self.conv)).abs().max().item() if self.conv.numel() else 0.0,
            (self.ssm - other.ssm.to(self.ssm)).abs().max().item() if self.ssm.numel() else 0.0,
        )

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def __repr__(self) -> str:
        return (
            f"MambaState(n_layer={self.n_layer}, batch_size={self.batch_size}, d_inner={self.d_inner}, "
            f"d_conv={self.d_conv}, d_state={self.d_state}, dtype={self.dtype}, device={self.device}, "
            f"bytes_consumed={self.bytes_consumed}{', with next-byte logits' if self.logits is not None else ''})"
        )


def _opt(t: Optional[Tensor], how: str) -> Optional[Tensor]:
    return None if t is None else getattr(t, how)()

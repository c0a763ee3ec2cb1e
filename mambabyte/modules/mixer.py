"""The Mamba-1 mixer with the reference parameter names and initialisation.

Shapes: b batch, L bytes, D d_model, di d_inner = expand * D, n d_state, r dt_rank, w d_conv.

Parameters (names and shapes as mamba_ssm's ``Mamba``, so its checkpoints load unchanged):
in_proj (2di, D), conv1d.weight (di, 1, w) + conv1d.bias (di), x_proj (r + 2n, di),
dt_proj (di, r) + bias (di), A_log (di, n) fp32, D (di) fp32, out_proj (D, di).

Every projection is called as a module, so forward hooks on ``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj`` and ``out_proj`` see exactly the values the model computes (``dt_proj``'s output includes
its bias; Δ = softplus of it). ``conv1d``'s hooked output is the convolution before the SiLU.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .hooks import has_forward_hooks

Tensor = torch.Tensor


class CausalConv1d(nn.Module):
    """Depthwise causal conv over (b, di, L) that resumes from a (b, di, w) window of past inputs.

    ``forward(x, conv_state=None)`` returns ``(y, new_conv_state)``; y is pre-activation.
    """

    def __init__(self, channels: int, width: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default initialisation (fan_in = width for a depthwise conv)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.width)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, conv_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return ops.causal_conv1d(
            x, self.weight.squeeze(1), self.bias, conv_state=conv_state, activation=None, return_final_state=True
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}, bias={self.bias is not None}"


def _weight_grad(g: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """out = sum_b g[b] @ h[b], one GEMM per batch element accumulating into ``out`` (no (b, rows, cols)
    intermediate and no separate reduction over the batch)."""
    torch.mm(g[0], h[0], out=out)
    for i in range(1, g.shape[0]):
        out.addmm_(g[i], h[i])
    return out


class _InProjToChannels(torch.autograd.Function):
    """h (b, L, D) and in_proj's weight (2 di, D) -> x, z, each (b, di, L) contiguous (two batched GEMMs).
    The backward accumulates dh from both halves in place (no separate add) and writes the weight's
    gradient as one (2 di, D) tensor (no per-half zero-fill, copy and add through ``narrow``)."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, di: int):
        ctx.save_for_backward(h, w)
        ctx.di = di
        ctx.set_materialize_grads(False)
        b, ht = h.shape[0], h.transpose(1, 2)
        return torch.bmm(w[:di].expand(b, -1, -1), ht), torch.bmm(w[di:].expand(b, -1, -1), ht)

    @staticmethod
    def backward(ctx, gx: Optional[Tensor], gz: Optional[Tensor]):
        h, w = ctx.saved_tensors
        di, b = ctx.di, h.shape[0]
        halves = [(g, w[k * di : (k + 1) * di], k) for k, g in enumerate((gx, gz))]
        dh = dw = None
        if ctx.needs_input_grad[0]:
            for g, wk, _ in halves:
                if g is None:
                    continue
                if dh is None:
                    dh = torch.bmm(g.transpose(1, 2), wk.expand(b, -1, -1))
                else:
                    dh.baddbmm_(g.transpose(1, 2), wk.expand(b, -1, -1))
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w)
            for g, _, k in halves:
                out = dw[k * di : (k + 1) * di]
                if g is None:
                    out.zero_()
                else:
                    _weight_grad(g, h, out)
        return dh, dw, None


class _LinearFromChannels(torch.autograd.Function):
    """y (b, di, L) -> y.T @ w.T (b, L, D) contiguous; dy comes back as (b, di, L), the scan's layout."""

    @staticmethod
    def forward(ctx, y: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(y, w)
        return torch.bmm(y.transpose(1, 2), w.t().expand(y.shape[0], -1, -1))

    @staticmethod
    def backward(ctx, g: Tensor):
        y, w = ctx.saved_tensors
        dy = torch.bmm(w.t().expand(y.shape[0], -1, -1), g.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(g.transpose(1, 2), y.transpose(1, 2), torch.empty_like(w)) if ctx.needs_input_grad[1] else None
        return dy, dw


class MambaMixer(nn.Module):
    """Selective SSM mixer (Mamba-1)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = CausalConv1d(self.d_inner, d_conv, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

        # dt_proj: weights keep the variance at init; bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(self.d_inner, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real initialisation of A, kept in fp32
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=torch.float32))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        # forward in the kernels' (b, d, L) layout (see _forward_channel_first): None = on CUDA tensors
        # (on the CPU the module path is faster), True = always, False = never
        self.channel_first: Optional[bool] = None

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: Tensor,
        conv_state: Optional[Tensor] = None,
        ssm_state: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """hidden_states (b, L, D) -> (out (b, L, D), new conv_state (b, di, w), new ssm_state (b, di, n)).

        The states passed in are not modified; new tensors are returned.
        """
        cf = hidden_states.is_cuda if self.channel_first is None else self.channel_first
        if cf and not self._hooked():
            return self._forward_channel_first(hidden_states, conv_state, ssm_state)
        b, L, _ = hidden_states.shape
        xz = self.in_proj(hidden_states)  # (b, L, 2di)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (b, di, L) each
        x_conv, new_conv = self.conv1d(x, conv_state)
        x = F.silu(x_conv)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, r + 2n)
        dt_low, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low).transpose(1, 2)  # (b, di, L), bias included
        A = -torch.exp(self.A_log.float())
        y, new_ssm = ops.selective_scan(
            x,
            dt,
            A,
            Bm.transpose(1, 2),
            Cm.transpose(1, 2),
            D=self.D.float(),
            z=z,
            delta_bias=None,
            delta_softplus=True,
            initial_state=ssm_state,
            return_final_state=True,
        )
        out = self.out_proj(y.transpose(1, 2))
        return out, new_conv, new_ssm

    def _hooked(self) -> bool:
        """Whether a forward (pre-)hook would see the projections' outputs (then run them as modules)."""
        return has_forward_hooks(self.in_proj, self.conv1d, self.x_proj, self.dt_proj, self.out_proj)

    def _forward_channel_first(
        self, hidden_states: Tensor, conv_state: Optional[Tensor], ssm_state: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The same block computed in the (b, channels, L) layout the conv and scan kernels read.

        Each projection is one batched GEMM whose output is already in the layout its consumer
        needs, so no (b, L, d) <-> (b, d, L) transposes are materialised: x and z come out of two
        GEMMs as (b, di, L), Δ = dt_proj.weight @ dt_low as (b, di, L) with its bias added inside the
        scan, SiLU is fused into the conv, and out_proj reads y transposed. Used when no hook watches
        the projections (hooks get the module path, whose outputs they are documented to see).
        """
        b, L, _ = hidden_states.shape
        di, r, n = self.d_inner, self.dt_rank, self.d_state
        dev = hidden_states.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

        def w(t: Optional[Tensor]) -> Optional[Tensor]:
            # cast before expanding: autocast would otherwise copy the expanded (b, ...) view
            return t if (t is None or cast is None or t.dtype == cast) else t.to(cast)

        # the layout-keeping autograd functions only when a gradient is wanted (their Python cost is
        # a large share of a short forward); without autograd the same batched GEMMs directly
        grad = torch.is_grad_enabled() and (hidden_states.requires_grad or self.in_proj.weight.requires_grad)
        h = hidden_states if cast is None else hidden_states.to(cast)
        w_in = w(self.in_proj.weight)
        if grad:
            x, z = _InProjToChannels.apply(h, w_in, di)  # (b, di, L) each, contiguous
        else:
            h_t = h.transpose(1, 2)
            x = torch.bmm(w_in.narrow(0, 0, di).expand(b, -1, -1), h_t)
            z = torch.bmm(w_in.narrow(0, di, di).expand(b, -1, -1), h_t)
        if self.in_proj.bias is not None:
            bi = w(self.in_proj.bias)
            x = x + bi.narrow(0, 0, di).unsqueeze(-1)
            z = z + bi.narrow(0, di, di).unsqueeze(-1)
        if not torch.is_grad_enabled() and self.A_log.dtype == torch.float32:
            # no autograd: the fp32 constants (A = -exp(A_log), D, conv taps, Δ bias) as cached for the
            # decode step, rebuilt only when a parameter changes -- five fewer small kernels a layer
            from ..ops.cuda_backend import _block_consts

            A, D, conv_w, conv_b, dt_bias = _block_consts(self)
        else:
            A, D = -torch.exp(self.A_log.float()), self.D.float()
            conv_w, conv_b, dt_bias = self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_proj.bias
            dt_bias = dt_bias if dt_bias.dtype == torch.float64 else dt_bias.float()
        x, new_conv = ops.causal_conv1d(
            x, conv_w, conv_b, conv_state=conv_state, activation="silu", return_final_state=True,
        )
        x_dbl = torch.bmm(w(self.x_proj.weight).expand(b, -1, -1), x)  # (b, r + 2n, L)
        dt = torch.bmm(w(self.dt_proj.weight).expand(b, -1, -1), x_dbl.narrow(1, 0, r))  # (b, di, L), no bias
        y, new_ssm = ops.selective_scan(
            x,
            dt,
            A,
            x_dbl.narrow(1, r, n),
            x_dbl.narrow(1, r + n, n),
            D=D,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
            initial_state=ssm_state,
            return_final_state=True,
        )
        w_out = w(self.out_proj.weight)
        if grad or y.requires_grad:
            out = _LinearFromChannels.apply(y, w_out)  # (b, L, D)
        else:
            out = torch.bmm(y.transpose(1, 2), w_out.t().expand(b, -1, -1))
        if self.out_proj.bias is not None:
            out = out + w(self.out_proj.bias)
        return out, new_conv, new_ssm

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """One byte: hidden_states (b, D) -> out (b, D); conv_state and ssm_state updated in place."""
        dtype = hidden_states.dtype
        xz = self.in_proj(hidden_states)
        x, z = xz.chunk(2, dim=-1)  # (b, di)
        if x.is_cuda and ops.cuda_backend_status()[0]:
            # fused path: conv step + silu + x_proj + dt_proj + softplus + state update + D + gate
            from ..ops.cuda_backend import mamba_decode_step_cuda

            y = mamba_decode_step_cuda(
                x, z, conv_state, self.conv1d.weight, self.conv1d.bias, ssm_state, self.x_proj.weight,
                self.dt_proj.weight, self.dt_proj.bias, -torch.exp(self.A_log.float()), self.D,
            )
            return self.out_proj(y.to(dtype))
        w = self.conv1d.weight.squeeze(1)
        x = ops.causal_conv1d_update(x, conv_state, w, self.conv1d.bias, activation=None)
        x = F.silu(x).to(dtype)
        x_db = self.x_proj(x)
        dt_low, Bm, Cm = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low)
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(
            ssm_state, x, dt, A, Bm, Cm, D=self.D.float(), z=z, dt_bias=None, dt_softplus=True
        )
        return self.out_proj(y.to(dtype))

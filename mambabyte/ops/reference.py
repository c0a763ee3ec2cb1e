"""Pure-PyTorch reference implementations of the Mamba-1 ops.

Dimension glossary used throughout:

* ``b`` batch size
* ``d`` channels (``d_inner`` of a mixer)
* ``n`` SSM state size (``d_state``)
* ``L`` sequence length (bytes)
* ``g`` groups of channels that share one B / C
* ``w`` width of the causal depthwise convolution (``d_conv``)

These run anywhere PyTorch runs (no compiler needed), are differentiable with respect to every
input, and are the ground truth every fast path is tested against. The scan is exact in the sense
that it performs the recurrence ``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t`` step by
step in fp32 (fp64 when any input is fp64); the only vectorisation is over (b, d, n) and over the
elementwise work of a chunk of time steps, so memory stays bounded for long inputs.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Time steps handled per chunk by the reference scan. Bounded memory: one chunk materialises
# (chunk, b, d, n) fp32 tensors for exp(delta*A), delta*B*u and the states.
REF_CHUNK = 256


class _LinearRecurrence(torch.autograd.Function):
    """hs[t] = a[t] * hs[t-1] + x[t] with hs[-1] = h0, over the leading (time) dimension.

    a, x: (T, ...); h0: (...). Returns hs: (T, ...). The forward is one fused multiply-add per step
    (no Python-level allocation); the backward is the reverse recurrence
    g[t] = grad[t] + a[t+1] * g[t+1], da[t] = g[t] * hs[t-1], dx[t] = g[t], dh0 = a[0] * g[0].
    """

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor) -> Tensor:
        hs = torch.empty_like(x)
        h = h0
        for a_t, x_t, h_t in zip(a.unbind(0), x.unbind(0), hs.unbind(0)):
            torch.addcmul(x_t, a_t, h, out=h_t)
            h = h_t
        ctx.save_for_backward(a, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: Tensor):
        a, hs, h0 = ctx.saved_tensors
        T = a.shape[0]
        g = grad_hs.clone()
        g_steps, a_steps = g.unbind(0), a.unbind(0)
        for t in range(T - 2, -1, -1):
            g_steps[t].addcmul_(a_steps[t + 1], g_steps[t + 1])
        prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)
        da = g * prev
        dh0 = a[0] * g[0]
        return da, g, dh0


def _bc_time_major(M: Tensor, d: int, dtype: torch.dtype) -> Tuple[Tensor, bool]:
    """Bring B or C to a layout broadcastable against (L, b, d, n).

    (d, n) -> (1, 1, d, n) [constant]; (b, n, L) -> (L, b, 1, n); (b, g, n, L) -> (L, b, d, n).
    Returns the tensor and whether it varies with time.
    """
    if M.dim() == 2:
        return M.to(dtype)[None, None], False
    if M.dim() == 3:
        return M.to(dtype).permute(2, 0, 1).unsqueeze(2), True
    if M.dim() == 4:
        g = M.shape[1]
        if d % g != 0:
            raise ValueError(f"d={d} is not divisible by the number of B/C groups g={g}")
        Mt = M.to(dtype).permute(3, 0, 1, 2)  # (L, b, g, n)
        if g == 1:
            return Mt, True
        return Mt.repeat_interleave(d // g, dim=2), True
    raise ValueError(f"B/C must be (d, n), (b, n, L) or (b, g, n, L); got shape {tuple(M.shape)}")


def _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, L); got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2 and tuple(M.shape) != (d, n):
            raise ValueError(f"{name} as weights must be (d={d}, n={n}); got {tuple(M.shape)}")
        if M.dim() == 3 and tuple(M.shape) != (b, n, L):
            raise ValueError(f"{name} must be (b={b}, n={n}, L={L}); got {tuple(M.shape)}")
        if M.dim() == 4 and (M.shape[0] != b or M.shape[2] != n or M.shape[3] != L):
            raise ValueError(f"{name} must be (b={b}, g, n={n}, L={L}); got {tuple(M.shape)}")
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"D must be (d={d},); got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise ValueError(f"delta_bias must be (d={d},); got {tuple(delta_bias.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, d, n):
        raise ValueError(f"initial_state must be (b={b}, d={d}, n={n}); got {tuple(initial_state.shape)}")
    return b, d, L, n


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[Tensor] = None,
    return_final_state: bool = False,
    chunk_size: int = REF_CHUNK,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan (Mamba-1), resumable from a state.

    Args:
        u: (b, d, L) input.
        delta: (b, d, L) step sizes (before ``delta_bias`` / softplus).
        A: (d, n) real, negative for a stable system.
        B, C: (d, n) weights, or (b, n, L) / (b, g, n, L) input-dependent.
        D: optional (d,) skip connection.
        z: optional (b, d, L) gate: ``out = y * silu(z)``.
        delta_bias: optional (d,) added to delta before the softplus.
        delta_softplus: apply softplus to delta.
        initial_state: optional (b, d, n) state to start from (zeros if None).
        return_final_state: also return the state after the last step, (b, d, n).

    Returns:
        out (b, d, L) in u's dtype, or (out, final_state) with final_state in fp32 (fp64 for fp64
        inputs).
    """
    b, d, L, n = _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    any64 = any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    cdt = torch.float64 if any64 else torch.float32
    dtype_in = u.dtype

    uf = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(cdt)
    Bt, B_var = _bc_time_major(B, d, cdt)
    Ct, C_var = _bc_time_major(C, d, cdt)
    u_t = uf.permute(2, 0, 1).contiguous()  # (L, b, d): time-major, so each step's slice is contiguous
    dt_t = dt.permute(2, 0, 1).contiguous()  # (L, b, d)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )

    if initial_state is None:
        h = torch.zeros(b, d, n, dtype=cdt, device=u.device)
    else:
        h = initial_state.to(cdt)

    ys = []
    for s in range(0, L, chunk_size):
        e = min(L, s + chunk_size)
        dts = dt_t[s:e]  # (T, b, d)
        Bs = Bt[s:e] if B_var else Bt
        Cs = Ct[s:e] if C_var else Ct
        if needs_grad:
            dA = torch.exp(dts.unsqueeze(-1) * Af)  # (T, b, d, n)
            dBu = (dts * u_t[s:e]).unsqueeze(-1) * Bs  # (T, b, d, n)
            hs = _LinearRecurrence.apply(dA, dBu, h)
        else:  # inference: same arithmetic, in place, no autograd bookkeeping
            dA = torch.mul(dts.unsqueeze(-1), Af).exp_()
            hs = torch.mul((dts * u_t[s:e]).unsqueeze(-1), Bs)  # dBu, overwritten by the states
            prev = h
            for a_t, h_t in zip(dA.unbind(0), hs.unbind(0)):  # unbind: all step views made in one call
                h_t.addcmul_(a_t, prev)
                prev = h_t
        if C_var and Cs.shape[2] == 1:
            ys.append(torch.matmul(hs, Cs.transpose(-1, -2)).squeeze(-1))  # (T, b, d)
        else:
            ys.append((hs * Cs).sum(-1))  # (T, b, d)
        h = hs[-1]
    if L == 0:
        y = uf.new_zeros(0, b, d)
    else:
        y = torch.cat(ys, dim=0) if len(ys) > 1 else ys[0]
    y = y.permute(1, 2, 0)  # (b, d, L)
    if D is not None:
        y = y + uf * D.to(cdt)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    if return_final_state:
        return out, h
    return out


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    conv_state: Optional[Tensor] = None,
    activation: Optional[str] = None,
    return_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Causal depthwise 1-D convolution that can resume from a window of past inputs.

    Args:
        x: (b, d, L) input.
        weight: (d, w) filters (a (d, 1, w) nn.Conv1d weight is accepted too).
        bias: optional (d,).
        conv_state: optional (b, d, w) window: the last w inputs seen before ``x`` (oldest first;
            Mamba's convention). Only its last w-1 columns enter the convolution. Zeros if None.
        activation: None, "silu" or "swish".
        return_final_state: also return the new (b, d, w) window (the last w inputs, zero-padded
            on the left when fewer were seen), in conv_state's dtype (fp32 when no state was given).

    Returns:
        out (b, d, L) in x's dtype, or (out, new_state).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3:
        raise ValueError(f"x must be (b, d, L); got {tuple(x.shape)}")
    b, d, L = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (d={d}, w); got {tuple(weight.shape)}")
    w = weight.shape[1]
    if conv_state is not None and tuple(conv_state.shape) != (b, d, w):
        raise ValueError(f"conv_state must be (b={b}, d={d}, w={w}); got {tuple(conv_state.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    if conv_state is None:
        hist = x.new_zeros(b, d, w)
    else:
        hist = conv_state.to(x.dtype)
    xp = torch.cat([hist[..., 1:], x], dim=-1)  # (b, d, w-1+L)
    out = F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), None if bias is None else bias.to(x.dtype), groups=d)
    if activation is not None:
        out = F.silu(out)
    if not return_final_state:
        return out
    if conv_state is not None:
        state_dtype = conv_state.dtype
    else:
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    new_state = torch.cat([hist, x], dim=-1)[..., -w:].to(state_dtype)
    return out, new_state


def selective_state_update_ref(
    ssm_state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One step of the selective scan, updating ``ssm_state`` in place.

    Args:
        ssm_state: (b, d, n) fp32 state, modified in place.
        x, dt, z: (b, d). A: (d, n). B, C: (b, n). D, dt_bias: (d,).

    Returns:
        y: (b, d) in x's dtype.
    """
    sdt = ssm_state.dtype
    dtf = dt.to(sdt)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(sdt)
    if dt_softplus:
        dtf = F.softplus(dtf)
    dA = torch.exp(dtf.unsqueeze(-1) * A.to(sdt))
    dBx = (dtf * x.to(sdt)).unsqueeze(-1) * B.to(sdt).unsqueeze(1)
    ssm_state.mul_(dA).add_(dBx)
    y = (ssm_state * C.to(sdt).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + x.to(sdt) * D.to(sdt)
    if z is not None:
        y = y * F.silu(z.to(sdt))
    return y.to(x.dtype)


def causal_conv1d_update_ref(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """One step of the causal conv: shift ``conv_state`` (b, d, w) left, append x (b, d), convolve.

    The state is updated in place. Returns (b, d) in x's dtype.
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state * weight.to(conv_state.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(conv_state.dtype)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)

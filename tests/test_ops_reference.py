"""The reference ops against plain per-step loops in float64, resume parity, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from mambabyte import ops
from mambabyte.ops.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """The recurrence written as plainly as possible, one time step and one group at a time."""
    b, d, L = u.shape
    n = A.shape[1]
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))

    def at(M, t):  # -> (b, d, n) slice of B or C at time t
        if M.dim() == 2:
            return M.double().expand(b, d, n)
        if M.dim() == 3:
            return M.double()[:, None, :, t].expand(b, d, n)
        g = M.shape[1]
        return M.double()[:, :, :, t].repeat_interleave(d // g, dim=1)

    h = torch.zeros(b, d, n, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)
        h = dA * h + delta[:, :, t, None] * at(B, t) * u[:, :, t, None]
        y = (h * at(C, t)).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        if z is not None:
            y = y * (z.double()[:, :, t] * torch.sigmoid(z.double()[:, :, t]))
        ys.append(y)
    return torch.stack(ys, dim=-1), h


def make_inputs(b=2, d=4, L=37, n=3, bc="var", g=2, dtype=torch.float64, with_state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    u = r(b, d, L)
    delta = r(b, d, L) * 0.5
    A = -torch.rand(d, n, generator=gen, dtype=dtype) * 2 - 0.1
    shape = {"fixed": (d, n), "var": (b, n, L), "group": (b, g, n, L)}[bc]
    B, C = r(*shape), r(*shape)
    D = r(d)
    z = r(b, d, L)
    bias = r(d) * 0.3
    h0 = r(b, d, n) if with_state else None
    return u, delta, A, B, C, D, z, bias, h0


@pytest.mark.parametrize("bc", ["fixed", "var", "group"])
@pytest.mark.parametrize("with_z", [False, True], ids=["no_z", "z"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("L", [1, 37, 300], ids=lambda L: f"L{L}")
def test_scan_matches_naive_loop(bc, with_z, with_state, L):
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(L=L, bc=bc, with_state=with_state)
    z = z if with_z else None
    out, hT = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, return_final_state=True)
    ref, ref_h = naive_scan(u, delta, A, B, C, D, z, bias, True, h0)
    assert out.dtype == torch.float64 and hT.shape == (2, 4, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hT, ref_h, rtol=1e-10, atol=1e-10)


def test_scan_without_optional_inputs_and_fp32():
    u, delta, A, B, C, *_ = make_inputs(dtype=torch.float32)
    out = selective_scan_ref(u, delta, A, B, C)
    ref, _ = naive_scan(u, delta, A, B, C)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_scan_bf16_inputs_keep_fp32_state():
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(dtype=torch.float32)
    out, hT = selective_scan_ref(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(),
                                 bias, True, h0, return_final_state=True)
    assert out.dtype == torch.bfloat16 and hT.dtype == torch.float32
    ref, _ = naive_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(), bias, True, h0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("splits", [[20], [1, 2, 3], [5, 5, 5, 5, 5, 5, 5], list(range(1, 37))], ids=["2seg", "3seg", "7seg", "1byte"])
def test_scan_split_and_resume(splits):
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(L=37, bc="var")
    whole, h_whole = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, return_final_state=True)
    bounds = [0] + splits + [37]
    outs, h = [], h0
    for s, e in zip(bounds[:-1], bounds[1:]):
        o, h = selective_scan_ref(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e], D, z[..., s:e], bias,
                                  True, h, return_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_whole, rtol=1e-12, atol=1e-12)


def test_scan_resume_paper_length_fp32():
    """The paper code's own check: L = 8,492 whole vs two halves resumed."""
    b, d, n, L = 1, 8, 16, 8492
    g = torch.Generator().manual_seed(3)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, bias = torch.ones(d), torch.zeros(d)
    whole, hw = selective_scan_ref(u, delta, A, B, C, D, None, bias, True, None, return_final_state=True)
    m = L // 2
    o1, h1 = selective_scan_ref(u[..., :m], delta[..., :m], A, B[..., :m], C[..., :m], D, None, bias, True, None, True)
    o2, h2 = selective_scan_ref(u[..., m:], delta[..., m:], A, B[..., m:], C[..., m:], D, None, bias, True, h1, True)
    # fp32: equal up to summation order inside vectorised kernels
    torch.testing.assert_close(torch.cat([o1, o2], -1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2, hw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bc", ["fixed", "var", "group"])
def test_scan_gradcheck_including_initial_state(bc):
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(b=1, d=4, L=6, n=2, bc=bc)
    inputs = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias, h0)]

    def f(u, delta, A, B, C, D, z, bias, h0):
        out, hT = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, return_final_state=True)
        return out, hT

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_scan_gradient_matches_naive_autograd():
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(b=2, d=4, L=300, n=3, bc="var")
    ins = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias, h0)]
    ins2 = [t.clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias, h0)]
    out, hT = selective_scan_ref(*ins[:8], True, ins[8], return_final_state=True)
    ref, ref_h = naive_scan(*ins2[:8], True, ins2[8])
    gy, gh = torch.randn_like(out), torch.randn_like(hT)
    ((out * gy).sum() + (hT * gh).sum()).backward()
    ((ref * gy).sum() + (ref_h * gh).sum()).backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_scan_rejects_bad_shapes():
    u, delta, A, B, C, *_ = make_inputs()
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan_ref(u, delta, A, B, C, initial_state=torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="delta"):
        selective_scan_ref(u, delta[..., :3], A, B, C)
    with pytest.raises(ValueError, match="groups"):
        selective_scan_ref(u, delta, A, torch.randn(2, 3, 3, 37, dtype=torch.float64), C)


def naive_conv(x, w, bias, hist):
    b, d, L = x.shape
    W = w.shape[1]
    full = torch.cat([hist, x], -1)  # hist holds W values, the last W-1 matter
    out = torch.empty_like(x)
    for t in range(L):
        window = full[..., t + 1 : t + 1 + W]
        out[..., t] = (window * w).sum(-1) + (bias if bias is not None else 0)
    return out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 3, 50])
def test_conv_matches_naive_and_resumes(width, L):
    b, d = 2, 5
    x = torch.randn(b, d, L, dtype=torch.float64)
    w = torch.randn(d, width, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64)
    hist = torch.randn(b, d, width, dtype=torch.float64)
    out, st = causal_conv1d_ref(x, w, bias, conv_state=hist, return_final_state=True)
    torch.testing.assert_close(out, naive_conv(x, w, bias, hist))
    torch.testing.assert_close(st, torch.cat([hist, x], -1)[..., -width:])
    # no state == zero state
    out0 = causal_conv1d_ref(x, w, bias)
    torch.testing.assert_close(out0, naive_conv(x, w, bias, torch.zeros_like(hist)))
    # step-by-step update reproduces the sequence
    s = hist.clone()
    steps = [causal_conv1d_update_ref(x[..., t], s, w, bias) for t in range(L)]
    torch.testing.assert_close(torch.stack(steps, -1), out)
    torch.testing.assert_close(s, st)
    # silu activation
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, hist, activation="silu"), F.silu(out))


def test_conv_gradcheck_with_state():
    x = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    hist = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, h: causal_conv1d_ref(x, w, b, h, activation="silu", return_final_state=True), (x, w, bias, hist)
    )


def test_state_update_equals_one_scan_step():
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(L=1, bc="var")
    out, hT = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, return_final_state=True)
    s = h0.clone()
    y = selective_state_update_ref(s, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True)
    torch.testing.assert_close(y, out[..., 0])
    torch.testing.assert_close(s, hT)


def test_dispatch_uses_reference_on_cpu(caplog):
    u, delta, A, B, C, D, z, bias, h0 = make_inputs(dtype=torch.float32)
    with caplog.at_level("INFO", logger="mambabyte.ops"):
        ops._logged.clear()
        a = ops.selective_scan(u, delta, A, B, C, D, z, bias, True, h0, True)
        ops.selective_scan(u, delta, A, B, C, D, z, bias, True, h0, True)
    b = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lines = [r.getMessage() for r in caplog.records if "selective_scan" in r.getMessage()]
    assert len(lines) == 1 and "reference" in lines[0] and "CPU" in lines[0]
    report = ops.backend_report()
    assert set(report) == {"selective_scan", "causal_conv1d", "selective_state_update", "causal_conv1d_update"}

"""GPU parity tests for the CUDA kernels in csrc/ (mambabyte.ops.cuda_backend).

Every check compares against the PyTorch reference run in float64 on the same (rounded) inputs,
with a norm-relative error keyed by dtype, on fresh random inputs. Outputs the kernels allocate are
NaN-filled first (torch's deterministic mode fills torch.empty / at::empty with NaN), so an element a
kernel forgets to write fails the test. Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from mambabyte.ops import reference as R

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from mambabyte.ops import cuda_backend as CB  # noqa: E402

DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture
def poison():
    """Make torch.empty (also at::empty inside the extension) return NaN-filled memory."""
    import torch.utils.deterministic as det

    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def rel(a, b):
    a = a.detach().double()
    b = b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ext_ok():
    ok, reason = CB.status()
    assert ok, f"CUDA kernels unavailable on a GPU machine: {reason}"


def make_scan(b, d, L, n, dtype, bc="var", g=1, z=True, D=True, bias=True, h0=True, bc_dtype=None):
    bc_dtype = bc_dtype or dtype
    u = torch.randn(b, d, L, device=DEV).to(dtype)
    if bias:  # goes through softplus: any sign
        delta = (0.5 * torch.randn(b, d, L, device=DEV) - 1.0).to(dtype)
    else:  # used as is: keep the step sizes positive so exp(delta * A) decays
        delta = (0.05 + 0.3 * torch.rand(b, d, L, device=DEV)).to(dtype)
    A = -torch.exp(0.5 * torch.randn(d, n, device=DEV))
    if bc == "fixed":
        B = torch.randn(d, n, device=DEV).to(bc_dtype)
        C = torch.randn(d, n, device=DEV).to(bc_dtype)
    elif bc == "var":
        B = torch.randn(b, n, L, device=DEV).to(bc_dtype)
        C = torch.randn(b, n, L, device=DEV).to(bc_dtype)
    else:  # grouped
        B = torch.randn(b, g, n, L, device=DEV).to(bc_dtype)
        C = torch.randn(b, g, n, L, device=DEV).to(bc_dtype)
    return dict(
        u=u,
        delta=delta,
        A=A,
        B=B,
        C=C,
        D=torch.randn(d, device=DEV) if D else None,
        z=torch.randn(b, d, L, device=DEV).to(dtype) if z else None,
        delta_bias=(0.5 * torch.randn(d, device=DEV)) if bias else None,
        delta_softplus=bias,
        initial_state=torch.randn(b, d, n, device=DEV) if h0 else None,
    )


def run_cuda(kw, final=True):
    return CB.selective_scan_cuda(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        kw["delta_softplus"], kw["initial_state"], final,
    )


def run_ref64(kw, final=True):
    k64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return R.selective_scan_ref(**k64, return_final_state=final)


def test_backend_available_and_poison_works(poison):
    _ext_ok()
    assert torch.isnan(torch.empty(1000, device=DEV)).all()


SCAN_CASES = [
    # (b, d, L, n, bc, g, z, D, bias, h0)
    (2, 8, 1, 16, "var", 1, True, True, True, True),
    (2, 8, 7, 16, "var", 1, True, True, True, True),
    (1, 4, 256, 16, "var", 1, False, False, False, False),
    (2, 12, 300, 16, "fixed", 1, True, True, True, True),
    (2, 8, 1000, 16, "group", 2, True, False, True, True),
    (1, 6, 513, 4, "var", 1, False, True, False, True),
    (1, 5, 77, 64, "fixed", 1, True, True, False, False),
    (1, 4, 129, 256, "var", 1, True, True, True, True),
    (3, 3, 37, 3, "group", 3, True, True, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "case", SCAN_CASES, ids=[f"b{c[0]}d{c[1]}L{c[2]}n{c[3]}-{c[4]}{c[5]}-z{int(c[6])}D{int(c[7])}bias{int(c[8])}h{int(c[9])}" for c in SCAN_CASES]
)
def test_scan_forward_parity(case, dtype, poison):
    _ext_ok()
    b, d, L, n, bc, g, z, D, bias, h0 = case
    kw = make_scan(b, d, L, n, dtype, bc, g, z, D, bias, h0)
    out, fin = run_cuda(kw)
    ro, rf = run_ref64(kw)
    assert out.dtype == dtype and fin.dtype == torch.float32
    assert rel(out, ro) < TOL[dtype]
    assert rel(fin, rf) < (TOL[dtype] if dtype == torch.float32 else 2e-3)


def test_scan_fp32_bc_with_bf16_inputs(poison):
    _ext_ok()
    kw = make_scan(2, 8, 333, 16, torch.bfloat16, "var", bc_dtype=torch.float32)
    out, fin = run_cuda(kw)
    ro, rf = run_ref64(kw)
    assert rel(out, ro) < TOL[torch.bfloat16] and rel(fin, rf) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_resume_8492(dtype, poison):
    """The paper code's check: L = 8492 whole == two halves, the second resumed from the first."""
    _ext_ok()
    L = 8492
    kw = make_scan(2, 16, L, 16, dtype, "var")
    out, fin = run_cuda(kw)
    ro, rf = run_ref64(kw)
    assert rel(out, ro) < TOL[dtype]
    for cut in (L // 2, 3001):
        a = {k: (v[..., :cut] if torch.is_tensor(v) and v.dim() == 3 and v.shape[-1] == L else v) for k, v in kw.items()}
        c = {k: (v[..., cut:] if torch.is_tensor(v) and v.dim() == 3 and v.shape[-1] == L else v) for k, v in kw.items()}
        o1, f1 = run_cuda(a)
        c["initial_state"] = f1
        o2, f2 = run_cuda(c)
        assert rel(torch.cat([o1, o2], -1), out) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel(f2, fin) < 1e-5
        assert rel(f2, rf) < (1e-4 if dtype == torch.float32 else 2e-3)


def _slice(kw, s, e, L):
    return {k: (v[..., s:e] if torch.is_tensor(v) and v.dim() in (3, 4) and v.shape[-1] == L and k != "initial_state" else v) for k, v in kw.items()}


@pytest.mark.parametrize("segments", [[1000, 2500, 4992], [1] * 20, [3, 1, 250, 1, 7]], ids=["three", "bytes", "mixed"])
def test_scan_resume_chains(segments, poison):
    _ext_ok()
    L = sum(segments)
    kw = make_scan(2, 8, L, 16, torch.float32, "var")
    out, fin = run_cuda(kw)
    state = kw["initial_state"]
    outs = []
    s = 0
    for seg in segments:
        part = _slice(kw, s, s + seg, L)
        part["initial_state"] = state
        o, state = run_cuda(part)
        outs.append(o)
        s += seg
    assert rel(torch.cat(outs, -1), out) < 1e-5
    assert rel(state, fin) < 1e-5


# The state-parallel forward (TUNING["fwd_sp"] = 1: wherever it applies) runs for d_state 16 with
# variable B and C, 8 channels a warp, 1-8 warps a block of one B / C group: these shapes take it.
SP_CASES = [
    # (b, d, L, bc, g, z, D, bias, h0)
    (2, 64, 1, "var", 1, True, True, True, True),
    (1, 64, 15, "var", 1, False, False, False, False),
    (2, 64, 17, "var", 1, True, True, True, True),
    (1, 128, 256, "group", 2, True, False, True, True),
    (2, 64, 257, "var", 1, False, True, False, True),
    (1, 64, 1100, "var", 1, True, True, True, False),
]


@pytest.mark.parametrize("sp", [1, -1], ids=["forced", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", SP_CASES, ids=[f"b{c[0]}d{c[1]}L{c[2]}-{c[3]}{c[4]}-z{int(c[5])}D{int(c[6])}bias{int(c[7])}h{int(c[8])}" for c in SP_CASES])
def test_scan_state_parallel(case, dtype, sp, poison, monkeypatch):
    """Forward parity, resume across odd cuts, and all gradients (the backward reads its chunk states)."""
    _ext_ok()
    monkeypatch.setitem(CB.TUNING, "fwd_sp", sp)
    b, d, L, bc, g, z, D, bias, h0 = case
    kw = make_scan(b, d, L, 16, dtype, bc, g, z, D, bias, h0)
    out, fin = run_cuda(kw)
    ro, rf = run_ref64(kw)
    assert rel(out, ro) < TOL[dtype]
    assert rel(fin, rf) < (TOL[dtype] if dtype == torch.float32 else 2e-3)
    if L > 2:
        cut = L // 3 + 1
        o1, f1 = run_cuda(_slice(kw, 0, cut, L))
        part = _slice(kw, cut, L, L)
        part["initial_state"] = f1
        o2, f2 = run_cuda(part)
        assert rel(torch.cat([o1, o2], -1), out) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel(f2, fin) < 1e-5
    if dtype == torch.float16:
        return
    leaves = {k: kw[k].detach().clone().requires_grad_(True) for k in NAMES if kw[k] is not None}
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    dout = torch.randn(b, d, L, device=DEV).to(dtype)
    dfin = torch.randn(b, d, 16, device=DEV)
    out, fin = run_cuda(dict(kw, **leaves))
    ((out.float() * dout.float()).sum() + (fin * dfin).sum()).backward()
    k64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ro, rf = R.selective_scan_ref(**dict(k64, **leaves64), return_final_state=True)
    ((ro * dout.double()).sum() + (rf * dfin.double()).sum()).backward()
    for k in leaves:
        err = rel(leaves[k].grad, leaves64[k].grad)
        assert err < GRAD_TOL[dtype], f"d{k}: rel err {err:.2e}"


def test_scan_state_parallel_fp32_bc_and_8492(poison, monkeypatch):
    """bf16 inputs with fp32 B / C, and the paper's 8,492-byte resume check, on the state-parallel path."""
    _ext_ok()
    for sp in (1, 0):
        monkeypatch.setitem(CB.TUNING, "fwd_sp", sp)
        kw = make_scan(2, 64, 333, 16, torch.bfloat16, "var", bc_dtype=torch.float32)
        out, fin = run_cuda(kw)
        ro, rf = run_ref64(kw)
        assert rel(out, ro) < TOL[torch.bfloat16] and rel(fin, rf) < 2e-3
        L = 8492
        kw = make_scan(1, 64, L, 16, torch.float32, "var")
        out, fin = run_cuda(kw)
        ro, rf = run_ref64(kw)
        assert rel(out, ro) < 1e-4 and rel(fin, rf) < 1e-4
        o1, f1 = run_cuda(_slice(kw, 0, L // 2, L))
        part = _slice(kw, L // 2, L, L)
        part["initial_state"] = f1
        o2, f2 = run_cuda(part)
        assert rel(torch.cat([o1, o2], -1), out) < 1e-5 and rel(f2, fin) < 1e-5


GRAD_CASES = [
    # (b, d, L, n, bc, g, z, D, bias, h0)
    (2, 8, 1, 16, "var", 1, True, True, True, True),
    (2, 8, 300, 16, "var", 1, True, True, True, True),
    (2, 8, 600, 16, "group", 2, False, True, True, True),
    (2, 8, 257, 16, "fixed", 1, True, False, False, True),
    (1, 4, 100, 5, "var", 1, True, True, False, False),
    (1, 4, 64, 64, "fixed", 1, False, False, True, True),
]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"b{c[0]}d{c[1]}L{c[2]}n{c[3]}-{c[4]}{c[5]}-z{int(c[6])}D{int(c[7])}bias{int(c[8])}h{int(c[9])}" for c in GRAD_CASES])
def test_scan_gradients(case, dtype, poison):
    _ext_ok()
    b, d, L, n, bc, g, z, D, bias, h0 = case
    kw = make_scan(b, d, L, n, dtype, bc, g, z, D, bias, h0)
    leaves = {k: kw[k].detach().clone().requires_grad_(True) for k in NAMES if kw[k] is not None}
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    dout = torch.randn(b, d, L, device=DEV).to(dtype)
    dfin = torch.randn(b, d, n, device=DEV)

    kc = dict(kw, **leaves)
    out, fin = run_cuda(kc)
    ((out.float() * dout.float()).sum() + (fin * dfin).sum()).backward()

    k64 = dict({k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}, **leaves64)
    ro, rf = R.selective_scan_ref(**k64, return_final_state=True)
    ((ro * dout.double()).sum() + (rf * dfin.double()).sum()).backward()

    for k in leaves:
        got, want = leaves[k].grad, leaves64[k].grad
        assert got is not None, f"no gradient for {k}"
        assert got.shape == leaves[k].shape and got.dtype == leaves[k].dtype
        err = rel(got, want)
        assert err < GRAD_TOL[dtype], f"d{k}: rel err {err:.2e}"


def test_scan_gradient_through_final_state_only(poison):
    """Only the final state is used: the out gradient is absent, d(initial_state) must still flow."""
    _ext_ok()
    kw = make_scan(1, 4, 90, 16, torch.float32, "var")
    h0 = kw["initial_state"].clone().requires_grad_(True)
    h064 = h0.detach().double().requires_grad_(True)
    _, fin = run_cuda(dict(kw, initial_state=h0))
    fin.square().sum().backward()
    _, rf = R.selective_scan_ref(**dict({k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}, initial_state=h064), return_final_state=True)
    rf.square().sum().backward()
    assert rel(h0.grad, h064.grad) < 1e-4


def test_scan_through_dispatch():
    from mambabyte import ops

    ok, reason = ops.cuda_backend_status()
    assert ok, reason
    kw = make_scan(1, 4, 50, 16, torch.float32, "var")
    out = ops.selective_scan(**kw)
    assert rel(out, run_ref64(kw, final=False)) < 1e-4


# ------------------------------------------------------------------ conv


CONV_CASES = [
    # (b, d, L, w, bias, state, act)
    (2, 8, 1, 4, True, True, "silu"),
    (2, 8, 2, 4, True, True, None),
    (2, 8, 3, 3, False, True, "silu"),
    (2, 8, 1000, 4, True, False, "silu"),
    (1, 5, 1025, 2, True, True, None),
    (1, 3, 17, 1, False, False, "silu"),
    (3, 4, 2049, 4, True, True, "silu"),
    # 16-byte-aligned rows (the vectorised loads, halos shuffled across lanes and blocks)
    (2, 8, 4096, 4, True, True, "silu"),
    (1, 6, 2048, 3, True, True, None),
    (2, 3, 8, 4, True, True, "silu"),
    (1, 2, 1032, 2, False, True, "silu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"b{c[0]}d{c[1]}L{c[2]}w{c[3]}-bias{int(c[4])}st{int(c[5])}-{c[6]}" for c in CONV_CASES])
def test_conv_forward_backward(case, dtype, poison):
    _ext_ok()
    b, d, L, w, bias, state, act = case
    x = torch.randn(b, d, L, device=DEV).to(dtype).requires_grad_(True)
    wt = torch.randn(d, w, device=DEV).requires_grad_(True)
    bs = torch.randn(d, device=DEV).requires_grad_(True) if bias else None
    st = torch.randn(b, d, w, device=DEV).requires_grad_(True) if state else None
    out, ns = CB.causal_conv1d_cuda(x, wt, bs, st, act, True)
    leaves = [t for t in (x, wt, bs, st) if t is not None]
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(l64)
    x64 = next(it)
    w64 = next(it)
    b64 = next(it) if bias else None
    s64 = next(it) if state else None
    ro, rns = R.causal_conv1d_ref(x64, w64, b64, s64, act, True)
    assert out.dtype == dtype and out.shape == (b, d, L)
    assert rel(out, ro) < TOL[dtype]
    assert rel(ns, rns) < (1e-6 if dtype == torch.float32 else 1e-2)
    dout = torch.randn(b, d, L, device=DEV)
    dns = torch.randn(b, d, w, device=DEV)
    ((out.float() * dout).sum() + (ns.float() * dns).sum()).backward()
    ((ro * dout.double()).sum() + (rns * dns.double()).sum()).backward()
    names = ["x", "weight"] + (["bias"] if bias else []) + (["state"] if state else [])
    for name, t, t64 in zip(names, leaves, l64):
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        err = rel(t.grad, t64.grad)
        assert err < GRAD_TOL[dtype], f"grad {name}: {err:.2e}"


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_update_matches_reference_and_scan(dtype, poison):
    _ext_ok()
    b, d, n, T = 3, 40, 16, 12
    kw = make_scan(b, d, T, n, dtype, "var")
    state = kw["initial_state"].clone()
    state_ref = kw["initial_state"].double().clone()
    ys = []
    for t in range(T):
        y = CB.selective_state_update_cuda(
            state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t], kw["D"],
            kw["z"][..., t], kw["delta_bias"], True,
        )
        yr = R.selective_state_update_ref(
            state_ref, kw["u"][..., t].double(), kw["delta"][..., t].double(), kw["A"].double(),
            kw["B"][..., t].double(), kw["C"][..., t].double(), kw["D"].double(), kw["z"][..., t].double(),
            kw["delta_bias"].double(), True,
        )
        assert y.dtype == dtype
        assert rel(y, yr) < TOL[dtype]
        ys.append(y)
    assert rel(state, state_ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    # teacher-forced steps == the scan over the same bytes
    out, fin = run_cuda(kw)
    assert rel(torch.stack(ys, -1), out) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel(state, fin) < 1e-5


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16], ids=["state_fp32", "state_bf16"])
@pytest.mark.parametrize("w", [2, 4])
def test_conv_update_matches_reference_and_conv(sdtype, w, poison):
    _ext_ok()
    b, d, T = 2, 24, 9
    x = torch.randn(b, d, T, device=DEV)
    wt = torch.randn(d, w, device=DEV)
    bs = torch.randn(d, device=DEV)
    st0 = torch.randn(b, d, w, device=DEV).to(sdtype)
    st = st0.clone()
    st_ref = st0.clone()
    ys = []
    for t in range(T):
        y = CB.causal_conv1d_update_cuda(x[..., t], st, wt, bs, "silu")
        yr = R.causal_conv1d_update_ref(x[..., t], st_ref, wt, bs, "silu")
        assert rel(y, yr) < (1e-5 if sdtype == torch.float32 else 2e-2)
        ys.append(y)
    assert torch.equal(st, st_ref)
    if sdtype == torch.float32:
        out, ns = CB.causal_conv1d_cuda(x, wt, bs, st0, "silu", True)
        assert rel(torch.stack(ys, -1), out) < 1e-5
        assert rel(st, ns) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba_decode_step(dtype, poison):
    _ext_ok()
    import torch.nn.functional as F

    b, d, n, w, Rk = 2, 64, 16, 4, 8
    x = torch.randn(b, d, device=DEV).to(dtype)
    z = torch.randn(b, d, device=DEV).to(dtype)
    conv_w = (0.5 * torch.randn(d, 1, w, device=DEV)).to(dtype)
    conv_b = torch.randn(d, device=DEV).to(dtype)
    xproj = (0.1 * torch.randn(Rk + 2 * n, d, device=DEV)).to(dtype)
    dtproj = (0.3 * torch.randn(d, Rk, device=DEV)).to(dtype)
    dtbias = torch.randn(d, device=DEV) - 2
    A = -torch.exp(torch.randn(d, n, device=DEV))
    D = torch.randn(d, device=DEV)
    cs = torch.randn(b, d, w, device=DEV).to(dtype)
    ss = torch.randn(b, d, n, device=DEV)
    cs_r, ss_r = cs.clone(), ss.clone()
    for _ in range(3):
        y = CB.mamba_decode_step_cuda(x, z, cs, conv_w, conv_b, ss, xproj, dtproj, dtbias, A, D)
        xc = R.causal_conv1d_update_ref(x, cs_r, conv_w, conv_b, "silu")
        xd = F.linear(xc.float(), xproj.float())
        dt = F.linear(xd[:, :Rk], dtproj.float())
        yr = R.selective_state_update_ref(ss_r, xc.float(), dt, A, xd[:, Rk : Rk + n], xd[:, Rk + n :], D, z.float(), dtbias, True)
        assert rel(y, yr) < (1e-4 if dtype == torch.float32 else 3e-2)
        x = torch.randn(b, d, device=DEV).to(dtype)
    assert rel(ss, ss_r) < (1e-4 if dtype == torch.float32 else 3e-2)


# ------------------------------------------------------------------ tuning variants

VARIANTS = [
    dict(fwd_states=2, fwd_min_blocks=1, bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=0, bwd_xs=1),
    dict(fwd_states=1, fwd_min_blocks=1, bwd_warps=4, bwd_min_blocks=1, bwd_lane_acc=1),
    dict(fwd_states=2, fwd_min_blocks=4, bwd_warps=8, bwd_min_blocks=1, bwd_lane_acc=0),
    dict(fwd_states=4, fwd_min_blocks=1, bwd_warps=4, bwd_min_blocks=2, bwd_lane_acc=0),
    dict(fwd_states=4, fwd_min_blocks=1, bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=1),
    dict(fwd_sp=1),
    dict(fwd_sp=0),
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_xs=2),
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=1, bwd_xs=2),
    dict(bwd_warps=16, bwd_min_blocks=1),
    dict(bwd_warps=16, bwd_min_blocks=1, bwd_lane_acc=1, bwd_xs=2),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{x}" for k, x in sorted(v.items())))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scan_variants(variant, dtype, poison, monkeypatch):
    """Every compiled kernel variant: forward, resume across an odd cut, and all gradients."""
    _ext_ok()
    for k, v in variant.items():
        monkeypatch.setitem(CB.TUNING, k, v)
    b, d, L, n = 2, 16, 1100, 16
    kw = make_scan(b, d, L, n, dtype, "var")
    out, fin = run_cuda(kw)
    ro, rf = run_ref64(kw)
    assert rel(out, ro) < TOL[dtype] and rel(fin, rf) < 2e-3
    cut = 517
    o1, f1 = run_cuda(_slice(kw, 0, cut, L))
    part = _slice(kw, cut, L, L)
    part["initial_state"] = f1
    o2, f2 = run_cuda(part)
    assert rel(torch.cat([o1, o2], -1), out) < 1e-2 and rel(f2, fin) < 1e-5
    leaves = {k: kw[k].detach().clone().requires_grad_(True) for k in NAMES if kw[k] is not None}
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    dout = torch.randn(b, d, L, device=DEV).to(dtype)
    dfin = torch.randn(b, d, n, device=DEV)
    out, fin = run_cuda(dict(kw, **leaves))
    ((out.float() * dout.float()).sum() + (fin * dfin).sum()).backward()
    ro, rf = R.selective_scan_ref(**dict({k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}, **leaves64), return_final_state=True)
    ((ro * dout.double()).sum() + (rf * dfin.double()).sum()).backward()
    for k in leaves:
        err = rel(leaves[k].grad, leaves64[k].grad)
        assert err < GRAD_TOL[dtype], f"d{k}: rel err {err:.2e}"

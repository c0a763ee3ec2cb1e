"""The Python side of the fused block step (``ops.cuda_backend.fused_blocks_step``), on the CPU.

The three kernels of ``csrc/layer_step.cu`` are stood in for by a PyTorch transcription of what they
compute (same rounding points, the x_proj sum in groups of 16 blocks of 16 channels), so the wiring --
argument order, the fp32 constants, the residual stream, the counters -- is checked here without a GPU.
The kernels themselves are checked against the per-op step in tests/test_model_gpu.py (GPU)."""

import pytest
import torch
import torch.nn.functional as F

from mambabyte import MambaByteConfig, MambaByteLM
from mambabyte.ops import cuda_backend


def _round(t, dtype):
    return t.to(dtype).float()


def emulated_layer_step(hidden, residual, residual_f32, norm_w, norm_b, eps, rms, in_w, in_b, conv_w, conv_b,
                        conv_state, x_w, dt_w, dt_b, A, D, ssm_state, out_w, out_b, counters, pdl=False):
    E = hidden.dtype
    RT = torch.float32 if (residual_f32 or E == torch.float32) else E
    di, R, n = in_w.shape[0] // 2, dt_w.shape[1], A.shape[1]
    assert counters.dtype == torch.int32 and int(counters.abs().sum()) == 0
    # kernel 1: residual add (RT), norm of the residual cast to E, in_proj, conv step, silu
    r = hidden.float() if residual is None else hidden.float() + residual.float()
    res_out = r.to(RT)
    x = res_out.to(E).float()
    if rms:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = x.mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)
    y = y * norm_w.float() + (norm_b.float() if norm_b is not None else 0.0)
    normed = _round(y, E)
    xz = normed @ in_w.float().T + (in_b.float() if in_b is not None else 0.0)
    xz = _round(xz, E)
    xin, z = xz[:, :di], xz[:, di:]
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], xin.unsqueeze(-1)], -1))
    a = (conv_state * conv_w).sum(-1) + (conv_b if conv_b is not None else 0.0)
    xc = _round(F.silu(a), E)
    # x_proj: 16-channel block sums, added in groups of 16 blocks, then over the groups, in order
    parts = torch.stack([xc[:, c:c + 16] @ x_w.float()[:, c:c + 16].T for c in range(0, di, 16)])
    groups = [parts[g:g + 16].sum(0) for g in range(0, parts.shape[0], 16)]
    x_dbl = _round(torch.stack(groups).sum(0), E)
    # kernel 2: dt_proj + bias + softplus, state update, C readout, D skip, gate
    dt = x_dbl[:, :R] @ dt_w.float().T + (dt_b if dt_b is not None else 0.0)
    dt = F.softplus(dt)
    Bm, Cm = x_dbl[:, R:R + n], x_dbl[:, R + n:]
    ssm_state.mul_(torch.exp(dt.unsqueeze(-1) * A)).add_((dt * xc).unsqueeze(-1) * Bm.unsqueeze(1))
    yv = (ssm_state * Cm.unsqueeze(1)).sum(-1)
    if D is not None:
        yv = yv + xc * D
    yv = _round(yv * F.silu(z), E)
    # kernel 3: out_proj
    out = yv @ out_w.float().T + (out_b.float() if out_b is not None else 0.0)
    return [out.to(E), res_out]


@pytest.fixture
def emulated(monkeypatch):
    fake = type("FakeExt", (), {"layer_step": staticmethod(emulated_layer_step)})()
    monkeypatch.setattr(cuda_backend, "_EXT", fake)
    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,res_fp32,bias", [("layernorm", True, False), ("rmsnorm", False, True)])
@pytest.mark.parametrize("d_model,batch", [(64, 3), (256, 2)])  # 256: d_inner 512 = 32 blocks in 2 groups
def test_fused_blocks_step_wiring_matches_the_per_op_step(emulated, dtype, norm, res_fp32, bias, d_model, batch):
    torch.manual_seed(0)
    cfg = MambaByteConfig(d_model=d_model, n_layer=2, norm=norm, residual_in_fp32=res_fp32, bias=bias)
    m = MambaByteLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.cast_(dtype)
    ids = torch.randint(0, 256, (batch, 16))
    with torch.no_grad():
        start = m(ids[:, :10], return_state=True).state
        s_ref, s_fused = start.clone(), start.clone()
        for t in range(10, 16):
            hidden = m.backbone.embedding(ids[:, t])
            h_ref, r_ref = hidden, None
            for i, layer in enumerate(m.backbone.layers):
                h_ref, r_ref = layer.step(h_ref, r_ref, s_ref.conv[i], s_ref.ssm[i])
            h_f, r_f = cuda_backend.fused_blocks_step(m, hidden, s_fused)
            assert h_f.dtype == h_ref.dtype and r_f.dtype == r_ref.dtype
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(h_f.float(), h_ref.float(), **tol)
            torch.testing.assert_close(r_f.float(), r_ref.float(), **tol)
    stol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(s_fused.ssm, s_ref.ssm, **stol)
    torch.testing.assert_close(s_fused.conv, s_ref.conv, **stol)


def test_block_constants_are_cached_and_follow_parameter_updates(emulated):
    m = MambaByteLM(MambaByteConfig(d_model=64, n_layer=1)).eval()
    mx = m.backbone.layers[0].mixer
    a1 = cuda_backend._block_consts(mx)[0]
    assert cuda_backend._block_consts(mx)[0] is a1  # cached
    torch.testing.assert_close(a1, -torch.exp(mx.A_log.float()))
    with torch.no_grad():
        mx.A_log.add_(0.5)  # an in-place update bumps the version: rebuilt
    a2 = cuda_backend._block_consts(mx)[0]
    assert a2 is not a1
    torch.testing.assert_close(a2, -torch.exp(mx.A_log.float()))

"""Model-level state tests: full forward == chunked forwards == byte-by-byte steps, and init."""

import math

import pytest
import torch

from mambabyte import MambaByteConfig, MambaByteLM, MambaState
from mambabyte.errors import MambaByteError, StateError


@pytest.fixture
def model64():
    torch.manual_seed(7)
    return MambaByteLM(MambaByteConfig(d_model=32, n_layer=3, d_state=8)).double().eval()


def test_config_presets_and_param_counts():
    assert MambaByteConfig.from_preset("353M").d_model == 1024
    assert MambaByteConfig.from_preset("353M").n_layer == 53
    assert MambaByteConfig.from_preset("972M").d_model == 1792
    assert MambaByteConfig.from_preset("972M").n_layer == 48
    # the anchors: 353.9M and 973.9M parameters with an untied byte head
    assert abs(MambaByteConfig.from_preset("353M").num_parameters() / 1e6 - 353.9) < 0.1
    assert abs(MambaByteConfig.from_preset("972M").num_parameters() / 1e6 - 973.9) < 0.1
    cfg = MambaByteConfig(d_model=48, n_layer=2)
    assert cfg.dt_rank_value == 3 and cfg.d_inner == 96
    assert MambaByteLM(cfg).num_parameters() == cfg.num_parameters()
    with pytest.raises(MambaByteError, match="norm"):
        MambaByteConfig(norm="batchnorm")
    with pytest.raises(MambaByteError, match="unknown preset"):
        MambaByteConfig.from_preset("nope")
    with pytest.raises(MambaByteError, match="unknown MambaByteConfig keys"):
        MambaByteConfig.from_dict({"d_model": 8, "wat": 1})


def test_yaml_config_mirrors_paper_file():
    from mambabyte.config import config_from_yaml

    cfg = config_from_yaml("scripts/configs/mambabyte_lm.yml", "972M")
    assert (cfg.d_model, cfg.n_layer, cfg.d_state, cfg.d_conv) == (1792, 48, 16, 4)
    with pytest.raises(MambaByteError, match="no model"):
        config_from_yaml("scripts/configs/mambabyte_lm.yml", "7B")


def test_reference_initialisation():
    torch.manual_seed(0)
    cfg = MambaByteConfig(d_model=64, n_layer=4, dt_min=1e-3, dt_max=0.1)
    m = MambaByteLM(cfg)
    mix = m.backbone.layers[0].mixer
    assert mix.A_log.dtype == torch.float32
    torch.testing.assert_close(torch.exp(mix.A_log), torch.arange(1, 17, dtype=torch.float32).repeat(128, 1))
    assert torch.equal(mix.D, torch.ones(128))
    dt = torch.nn.functional.softplus(mix.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert isinstance(m.backbone.layers[0].norm, torch.nn.LayerNorm) and m.backbone.norm_f.bias is not None
    assert m.lm_head.weight.data_ptr() != m.backbone.embedding.weight.data_ptr()
    # out_proj rescaled by 1/sqrt(n_layer): kaiming-uniform bound 1/sqrt(fan_in) shrunk by 2
    bound = 1 / math.sqrt(128) / math.sqrt(4)
    assert mix.out_proj.weight.abs().max() <= bound + 1e-6
    assert mix.out_proj.weight.abs().max() > 0.8 * bound
    names = {n for n, _ in m.named_parameters()}
    for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
              "A_log", "D", "out_proj.weight"):
        assert f"backbone.layers.0.mixer.{k}" in names
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "backbone.norm_f.bias", "lm_head.weight"} <= names


@pytest.mark.parametrize("splits", [[10], [1, 2, 3, 20], [7, 14, 21, 28, 35]], ids=["2chunks", "uneven", "many"])
def test_full_forward_equals_chunked_forwards(model64, splits):
    x = torch.randint(0, 256, (2, 41))
    full = model64(x, return_state=True)
    assert full.logits.shape == (2, 41, 256)
    bounds = [0] + splits + [41]
    state, logits = None, []
    for s, e in zip(bounds[:-1], bounds[1:]):
        out = model64(x[:, s:e], state=state, return_state=True)
        logits.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, rtol=1e-10, atol=1e-10)
    assert state.allclose(full.state, rtol=1e-10, atol=1e-12)
    assert state.bytes_consumed == 41


def test_full_forward_equals_byte_steps(model64):
    x = torch.randint(0, 256, (3, 25))
    full = model64(x, return_state=True)
    state = model64.allocate_state(3)
    steps = torch.stack([model64.step(x[:, t], state) for t in range(25)], 1)
    torch.testing.assert_close(steps, full.logits, rtol=1e-10, atol=1e-10)
    assert state.allclose(full.state, rtol=1e-10, atol=1e-12)


def test_prefix_forward_then_steps_fp32():
    torch.manual_seed(3)
    m = MambaByteLM.from_preset("tiny").eval()
    x = torch.randint(0, 256, (1, 60))
    full = m(x).logits
    out = m(x[:, :40], return_state=True)
    state = out.state.clone()
    steps = [m.step(x[:, t], state) for t in range(40, 60)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 40:], rtol=1e-4, atol=1e-5)


def test_forward_does_not_modify_the_state_passed_in(model64):
    x = torch.randint(0, 256, (1, 9))
    s = model64(x, return_state=True).state
    before = s.clone()
    model64(x, state=s, return_state=True)
    assert s.equal(before)


def test_teacher_forced_greedy_equals_argmax_of_full_forward(model64):
    prompt = torch.tensor([list(b"The ")])
    with torch.no_grad():
        out = model64(prompt, return_state=True)
        state = out.state
        nxt = out.logits[:, -1].argmax(-1)
        generated = [nxt]
        for _ in range(15):
            nxt = model64.step(nxt, state).argmax(-1)
            generated.append(nxt)
        seq = torch.cat([prompt, torch.stack(generated, 1)], 1)
        full = model64(seq[:, :-1]).logits
    torch.testing.assert_close(full[:, prompt.shape[1] - 1 :].argmax(-1), seq[:, prompt.shape[1] :], rtol=0, atol=0)


def test_state_object_helpers(model64):
    x = torch.randint(0, 256, (2, 5))
    s = model64(x, return_state=True).state
    c = s.clone()
    c.ssm.add_(1)
    assert not c.equal(s) and s.max_abs_diff(c) == pytest.approx(1.0)
    assert s.select(1).batch_size == 1 and s.repeat(3).batch_size == 6
    assert MambaState.cat([s, s]).batch_size == 4
    z = s.clone().reset()
    assert float(z.ssm.detach().abs().sum()) == 0 and z.bytes_consumed == 0
    with pytest.raises(StateError, match="batch size"):
        model64(torch.randint(0, 256, (3, 2)), state=s)
    with pytest.raises(StateError, match="does not fit"):
        MambaByteLM.from_preset("tiny")(torch.randint(0, 256, (2, 2)), state=s.to(dtype=torch.float32))


def test_rmsnorm_and_tied_variants_run():
    cfg = MambaByteConfig(d_model=16, n_layer=2, norm="rmsnorm", tie_embeddings=True, pad_vocab_size_multiple=16)
    m = MambaByteLM(cfg)
    assert m.lm_head.weight is m.backbone.embedding.weight
    out = m(torch.randint(0, 256, (1, 7)))
    assert out.logits.shape == (1, 7, 256)
    assert m.num_parameters() == cfg.num_parameters()


def test_training_gradients_flow_through_state():
    torch.manual_seed(0)
    m = MambaByteLM.from_preset("tiny")
    x = torch.randint(0, 256, (2, 16))
    s = m(x[:, :8], return_state=True).state
    out = m(x[:, 8:], state=s, return_state=True)
    loss = out.logits.logsumexp(-1).mean() + out.state.ssm.pow(2).mean()
    loss.backward()
    g = m.backbone.layers[0].mixer.A_log.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = MambaByteLM(MambaByteConfig(d_model=32, n_layer=3)).double().train()
    b = MambaByteLM(MambaByteConfig(d_model=32, n_layer=3)).double().train()
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, 256, (2, 40))
    for m in (a, b):
        s = m(x[:, :15], return_state=True).state
        out = m(x[:, 15:], state=s, return_state=True)
        (out.logits.logsumexp(-1).mean() + out.state.ssm.pow(2).mean()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


def _mamba_ssm_slow_path(sd, cfg, ids):
    """An independent transcription of mamba_ssm's MambaLMHeadModel slow path (no fused kernels):
    nn.Conv1d with padding d_conv - 1 cut to L, dt_proj's bias applied inside the scan as delta_bias,
    the sequential selective_scan_ref recurrence, Block's add -> norm with the residual kept in fp32."""
    import torch.nn.functional as F

    di, n, R, W = cfg.d_inner, cfg.d_state, cfg.dt_rank_value, cfg.d_conv
    L = ids.shape[1]

    def norm(x, pre):
        if cfg.norm == "rmsnorm":  # mamba_ssm's rms_norm_ref (upcast): in fp32, back to x's dtype
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[pre + ".weight"].float()
            return y.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), sd[pre + ".weight"], sd[pre + ".bias"], cfg.norm_eps)

    hidden, residual = sd["backbone.embedding.weight"][ids], None
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        if cfg.residual_in_fp32:  # Block: residual.to(torch.float32), the norm reads it in the weights' dtype
            residual = residual.float()
        h = norm(residual.to(sd[p + "norm.weight"].dtype), p + "norm")
        xz = (h @ sd[p + "mixer.in_proj.weight"].T).transpose(1, 2)  # (b, 2di, L)
        x, z = xz[:, :di], xz[:, di:]
        x = F.conv1d(x, sd[p + "mixer.conv1d.weight"], sd[p + "mixer.conv1d.bias"], padding=W - 1, groups=di)[..., :L]
        x = F.silu(x)
        x_dbl = x.transpose(1, 2) @ sd[p + "mixer.x_proj.weight"].T  # (b, L, R + 2n)
        dt, B, C = x_dbl[..., :R], x_dbl[..., R:R + n], x_dbl[..., R + n:]
        # mamba_ssm hands the scan A = -exp(A_log.float()) and D.float(): fp32 values. (It also passes
        # dt_proj.bias.float() as delta_bias, where our dt_proj adds its bias in the model's dtype: the
        # same for fp32 / bf16 / fp16 models; this fp64 check keeps the bias in fp64.)
        bias = sd[p + "mixer.dt_proj.bias"]
        delta = F.softplus(dt @ sd[p + "mixer.dt_proj.weight"].T + bias)  # (b, L, di)
        A = (-torch.exp(sd[p + "mixer.A_log"].float())).to(x.dtype)
        state = torch.zeros(ids.shape[0], di, n, dtype=x.dtype)
        ys = []
        for t in range(L):
            dA = torch.exp(delta[:, t, :, None] * A)
            dBu = delta[:, t, :, None] * B[:, t, None, :] * x[:, :, t, None]
            state = dA * state + dBu
            ys.append((state * C[:, t, None, :]).sum(-1))
        y = torch.stack(ys, -1) + x * sd[p + "mixer.D"].float().to(x.dtype)[:, None]
        y = y * F.silu(z)
        hidden = y.transpose(1, 2) @ sd[p + "mixer.out_proj.weight"].T
    residual = hidden + residual
    if cfg.residual_in_fp32:
        residual = residual.float()
    return norm(residual.to(sd["backbone.norm_f.weight"].dtype), "backbone.norm_f") @ sd["lm_head.weight"].T


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_forward_equals_an_independent_mamba_ssm_transcription(norm):
    torch.manual_seed(3)
    cfg = MambaByteConfig(d_model=48, n_layer=2, norm=norm)
    m = MambaByteLM(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the initialisation's symmetries (norm weights of 1, ...)
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 256, (2, 37))
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ours = m(ids).logits
        ref = _mamba_ssm_slow_path(sd, cfg, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def _on_both_paths(m, run):
    """``run(m)`` with every mixer on the channel-first path, then on the module path; each time after
    zeroing the gradients. Returns [(run's result, {name: gradient} of the parameters that want one)]."""
    results = []
    for channel_first in (True, False):
        for layer in m.backbone.layers:
            layer.mixer.channel_first = channel_first
        m.zero_grad()
        out = run(m)
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    return results


@pytest.mark.parametrize("bias", [False, True])
def test_channel_first_forward_equals_the_module_path(bias):
    """The (b, d, L) GEMM layout (no transposes, Δ bias in the scan, SiLU in the conv) computes the same
    block as the module-by-module path: outputs, states and every gradient, in fp64, from a state."""
    torch.manual_seed(0)
    m = MambaByteLM(MambaByteConfig(d_model=64, n_layer=2, bias=bias)).double()
    x = torch.randint(0, 256, (3, 37))
    with torch.no_grad():
        start = m(x[:, :10], return_state=True).state

    def run(m):
        out = m(x[:, 10:], state=start, return_state=True)
        (out.logits.square().mean() + out.state.ssm.sum() + out.state.conv.sum()).backward()
        return out.logits.detach(), out.state

    ((la, sa), ga), ((lb, sb), gb) = _on_both_paths(m, run)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.ssm, sb.ssm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.conv, sb.conv, rtol=1e-12, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-10, atol=1e-12, msg=name)


def test_hooks_on_the_projections_take_the_module_path():
    m = MambaByteLM(MambaByteConfig(d_model=32, n_layer=1)).eval()
    mixer = m.backbone.layers[0].mixer
    mixer.channel_first = True
    assert not mixer._hooked()
    seen = []
    h = mixer.dt_proj.register_forward_hook(lambda mod, i, o: seen.append(o))
    try:
        assert mixer._hooked()
        with torch.no_grad():
            hooked = m(torch.tensor([[1, 2, 3, 4]])).logits
        assert len(seen) == 1 and seen[0].shape == (1, 4, mixer.d_inner)
    finally:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(m(torch.tensor([[1, 2, 3, 4]])).logits, hooked, rtol=1e-5, atol=1e-6)


def test_channel_first_without_autograd_uses_cached_constants_that_follow_the_weights():
    """No grad: A, D, the conv taps and Δ's bias come from the per-mixer fp32 cache, which is rebuilt
    when a parameter changes in place; the result equals the module path before and after a change."""
    torch.manual_seed(0)
    m = MambaByteLM(MambaByteConfig(d_model=32, n_layer=2)).eval()
    x = torch.randint(0, 256, (2, 21))

    def both():
        out = []
        for cf in (True, False):
            for layer in m.backbone.layers:
                layer.mixer.channel_first = cf
            with torch.no_grad():
                o = m(x, return_state=True)
            out.append((o.logits, o.state.ssm))
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
        return out[0][0]

    first = both()
    assert hasattr(m.backbone.layers[0].mixer, "_mb_block_consts")
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.A_log.add_(0.3)
            layer.mixer.dt_proj.bias.sub_(0.5)
            layer.mixer.conv1d.weight.mul_(1.5)
    second = both()
    assert not torch.allclose(first, second)


def test_channel_first_gradients_with_frozen_projections():
    """The layout-keeping autograd functions with some weights frozen (no weight gradient wanted) and
    with batch sizes 1 and 4: the same gradients as the module path, in fp64."""
    for batch in (1, 4):
        torch.manual_seed(batch)
        m = MambaByteLM(MambaByteConfig(d_model=32, n_layer=2)).double()
        for layer in m.backbone.layers:
            layer.mixer.in_proj.weight.requires_grad_(False)
        m.backbone.layers[1].mixer.out_proj.weight.requires_grad_(False)
        x = torch.randint(0, 256, (batch, 23))
        grads = [g for _, g in _on_both_paths(m, lambda m: m(x).logits.square().mean().backward())]
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12, msg=name)

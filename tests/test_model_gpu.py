"""GPU: the model on our CUDA kernels equals the reference path (forward, resume, fused decode step)."""

import pytest
import torch

from mambabyte import MambaByteConfig, MambaByteLM

pytestmark = pytest.mark.gpu


@pytest.fixture
def pair():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    cpu = MambaByteLM(MambaByteConfig(d_model=64, n_layer=3)).eval()
    gpu = MambaByteLM(MambaByteConfig(d_model=64, n_layer=3)).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_forward_chunks_and_fused_steps_match_reference(pair):
    from mambabyte.ops import cuda_backend_status

    assert cuda_backend_status()[0], cuda_backend_status()[1]
    cpu, gpu = pair
    x = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        ref = cpu(x, return_state=True)
        full = gpu(x.cuda(), return_state=True)
        torch.testing.assert_close(full.logits.cpu(), ref.logits, rtol=1e-4, atol=1e-4)
        assert full.state.to("cpu").allclose(ref.state, rtol=1e-4, atol=1e-5)
        a = gpu(x[:, :123].cuda(), return_state=True)
        b = gpu(x[:, 123:].cuda(), state=a.state, return_state=True)
        torch.testing.assert_close(torch.cat([a.logits, b.logits], 1).cpu(), ref.logits, rtol=1e-4, atol=1e-4)
        s = a.state.clone()
        steps = torch.stack([gpu.step(x[:, t].cuda(), s) for t in range(123, 160)], 1)
        torch.testing.assert_close(steps.cpu(), ref.logits[:, 123:160], rtol=1e-4, atol=1e-4)


def test_bf16_training_step_runs_on_kernels(pair):
    _, gpu = pair
    gpu.train()
    x = torch.randint(0, 256, (2, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in gpu.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# -- the fused block step (csrc/layer_step.cu): add + norm + in_proj + conv + x_proj | dt_proj + state
#    update + gate | out_proj, three launches per block; the default for batches up to FUSED_MAX_BATCH
def _random_model(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    m = MambaByteLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # non-trivial norm weights and biases
                p.add_(0.1 * torch.randn_like(p))
    return m.cuda().cast_(dtype)


def _steps(model, state, ids, fused, monkeypatch):
    from mambabyte.ops import cuda_backend

    monkeypatch.setattr(cuda_backend, "FUSED_BLOCK_STEP", fused)
    monkeypatch.setattr(cuda_backend, "FUSED_MAX_BATCH", 64)  # the kernels at every batch size tested
    with torch.no_grad():
        assert (cuda_backend.fused_block_step_unsupported(model, state, ids.shape[0]) is None) == fused
        return torch.stack([model.step(ids[:, t], state).float() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,res_fp32,bias", [("layernorm", True, False), ("rmsnorm", False, True)])
@pytest.mark.parametrize("batch", [1, 3, 11])
def test_fused_block_step_matches_per_op_step(monkeypatch, dtype, norm, res_fp32, bias, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = MambaByteConfig(d_model=64, n_layer=2, norm=norm, residual_in_fp32=res_fp32, bias=bias)
    m = _random_model(cfg, dtype)
    ids = torch.randint(0, 256, (batch, 40), device="cuda")
    with torch.no_grad():
        start = m(ids[:, :24], return_state=True).state  # a non-zero state to continue from
    s_ref, s_fused = start.clone(), start.clone()
    ref = _steps(m, s_ref, ids[:, 24:], False, monkeypatch)
    got = _steps(m, s_fused, ids[:, 24:], True, monkeypatch)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, ref, **tol)
    stol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(s_fused.ssm, s_ref.ssm, **stol)
    torch.testing.assert_close(s_fused.conv, s_ref.conv, **stol)
    assert s_fused.bytes_consumed == s_ref.bytes_consumed


@pytest.mark.parametrize("batch", [1, 8, 9])
def test_fused_block_step_at_a_real_width_is_deterministic_and_matches(monkeypatch, batch):
    """d_model 1024: 128 kernel-1 blocks in 8 groups (the grouped x_proj reduction), bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m = _random_model(MambaByteConfig(d_model=1024, n_layer=2), torch.bfloat16)
    ids = torch.randint(0, 256, (batch, 12), device="cuda")
    with torch.no_grad():
        start = m(ids[:, :4], return_state=True).state
    ref = _steps(m, start.clone(), ids[:, 4:], False, monkeypatch)
    s1, s2 = start.clone(), start.clone()
    a = _steps(m, s1, ids[:, 4:], True, monkeypatch)
    b = _steps(m, s2, ids[:, 4:], True, monkeypatch)
    assert torch.equal(a, b) and torch.equal(s1.ssm, s2.ssm)  # no float atomics: bit-identical reruns
    torch.testing.assert_close(a, ref, rtol=3e-2, atol=5e-2)


def test_fused_block_step_under_cuda_graph_generates_the_same_greedy_text(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.ops import cuda_backend

    m = _random_model(MambaByteConfig(d_model=128, n_layer=3), torch.float32)
    monkeypatch.setattr(cuda_backend, "FUSED_BLOCK_STEP", False)
    plain = m.generate("The state of", max_new_bytes=64, temperature=0)
    monkeypatch.setattr(cuda_backend, "FUSED_BLOCK_STEP", True)
    fused = m.generate("The state of", max_new_bytes=64, temperature=0)
    assert fused.stats.cuda_graph
    assert fused.bytes == plain.bytes
    torch.testing.assert_close(fused.state.ssm, plain.state.ssm, rtol=1e-4, atol=1e-5)


def test_fused_block_step_falls_back_when_it_cannot_run(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.ops import cuda_backend

    monkeypatch.setattr(cuda_backend, "FUSED_BLOCK_STEP", True)
    m = _random_model(MambaByteConfig(d_model=60, n_layer=1), torch.float32)  # d_model % 8 != 0
    s = m.allocate_state(1)
    assert "d_model" in cuda_backend.fused_block_step_unsupported(m, s, 1)
    with torch.no_grad():
        assert m.step(torch.tensor([65], device="cuda"), s).shape == (1, 256)  # the per-op path
    m2 = _random_model(MambaByteConfig(d_model=64, n_layer=1), torch.float32)
    s2 = m2.allocate_state(1)
    assert cuda_backend.fused_block_step_unsupported(m2, s2, 1) == "gradients are enabled"
    with torch.no_grad():
        assert cuda_backend.fused_block_step_unsupported(m2, s2, 1) is None
        m2.requires_grad_(False)
    assert cuda_backend.fused_block_step_unsupported(m2, s2, 1) is None  # frozen weights: no autograd graph
    monkeypatch.setattr(cuda_backend, "FUSED_MAX_BATCH", 4)
    assert "MAMBABYTE_FUSED_MAX_BATCH" in cuda_backend.fused_block_step_unsupported(m2, m2.allocate_state(5), 5)
    h = m2.backbone.layers[0].mixer.in_proj.register_forward_hook(lambda *a: None)
    assert "hooks" in cuda_backend.fused_block_step_unsupported(m2, m2.allocate_state(1), 1)
    h.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8, 10])
def test_layer_step_kernel_matches_its_pytorch_transcription(dtype, batch):
    """ext.layer_step against tests/test_fused_block_step_wiring.py's transcription of the three kernels,
    on the same inputs: the kernel alone (no model wiring), d_model 512 (d_inner 1024 = 4 groups)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_fused_block_step_wiring import emulated_layer_step

    from mambabyte.ops import cuda_backend

    assert cuda_backend.status()[0] and hasattr(cuda_backend._ext(), "layer_step")
    m = _random_model(MambaByteConfig(d_model=512, n_layer=1, bias=True), dtype)
    layer = m.backbone.layers[0]
    mx = layer.mixer
    A, D, conv_w, conv_b, dt_b = cuda_backend._block_consts(mx)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(batch, 512, device="cuda", generator=g).to(dtype)
    residual = torch.randn(batch, 512, device="cuda", generator=g)
    st = m.allocate_state(batch)
    st.conv.normal_(generator=g)
    st.ssm.normal_(generator=g)
    outs = []
    ext = cuda_backend._ext().layer_step
    for fn in (lambda *a: ext(*a, False), lambda *a: ext(*a, True), emulated_layer_step):  # PDL off / on
        s = st.clone()
        counters = torch.zeros(64, dtype=torch.int32, device="cuda")
        with torch.no_grad():
            out, res = fn(hidden, residual, True, layer.norm.weight, layer.norm.bias, float(layer.norm.eps), False,
                          mx.in_proj.weight, mx.in_proj.bias, conv_w, conv_b, s.conv[0], mx.x_proj.weight,
                          mx.dt_proj.weight, dt_b, A, D, s.ssm[0], mx.out_proj.weight, mx.out_proj.bias, counters)
        assert int(counters.abs().sum()) == 0  # the kernel leaves its counters zero
        outs.append((out.float(), res.float(), s))
    (o0, r0, s0), (o1, r1, s1), (o2, r2, s2) = outs
    assert torch.equal(o0, o1) and torch.equal(s0.ssm, s1.ssm) and torch.equal(s0.conv, s1.conv)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(s1.ssm, s2.ssm, **tol)
    torch.testing.assert_close(s1.conv, s2.conv, **tol)


@pytest.mark.parametrize("d_state", [12, 16, 64])
def test_fused_block_step_for_other_state_sizes_and_without_pdl(monkeypatch, d_state):
    """d_state 16: one lane per state; 12 and 64 take the one-thread-per-channel kernel. Programmatic
    dependent launch on or off gives the same bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.ops import cuda_backend

    m = _random_model(MambaByteConfig(d_model=128, n_layer=2, d_state=d_state), torch.float32)
    ids = torch.randint(0, 256, (2, 20), device="cuda")
    with torch.no_grad():
        start = m(ids[:, :8], return_state=True).state
    ref = _steps(m, start.clone(), ids[:, 8:], False, monkeypatch)
    runs = []
    for pdl in (True, False):
        monkeypatch.setattr(cuda_backend, "PDL", pdl)
        s = start.clone()
        runs.append((_steps(m, s, ids[:, 8:], True, monkeypatch), s))
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b) and torch.equal(sa.ssm, sb.ssm) and torch.equal(sa.conv, sb.conv)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_channel_first_forward_matches_the_module_path_on_the_kernels(autocast):
    """The transpose-free (b, d, L) forward against the module path, both on the CUDA kernels: logits,
    states and gradients (fp32, or under bf16 autocast as in training), batch 3, from a state."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = MambaByteLM(MambaByteConfig(d_model=128, n_layer=2, bias=True)).cuda()
    x = torch.randint(0, 256, (3, 200), device="cuda")
    with torch.no_grad():
        start = m(x[:, :77], return_state=True).state
    runs = []
    for channel_first in (True, False):
        for layer in m.backbone.layers:
            layer.mixer.channel_first = channel_first
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = m(x[:, 77:], state=start, return_state=True)
        (out.logits.float().square().mean() + out.state.ssm.sum()).backward()
        runs.append((out.logits.float().detach(), out.state, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (la, sa, ga), (lb, sb, gb) = runs
    tol = dict(rtol=5e-2, atol=5e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(la, lb, **tol)
    torch.testing.assert_close(sa.ssm, sb.ssm, **tol)
    for name in ga:
        scale = gb[name].abs().max().clamp(min=1e-6)
        assert ((ga[name] - gb[name]).abs().max() / scale).item() < (5e-2 if autocast else 1e-3), name


@pytest.mark.parametrize("dtype,res_fp32", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                            (torch.float16, True)])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("D", [1792, 1000, 1030, 10000])
def test_fused_add_norm_matches_the_torch_ops(monkeypatch, dtype, res_fp32, norm, D):
    """csrc/add_norm.cu against add + cast + norm: the residual exactly, the normed output to an ulp of
    its dtype (LayerNorm's statistics are summed in another order than torch's Welford). Widths that are
    multiples of 8 up to 8192 take the register kernel (1000: a partly idle last warp); 1030 and 10000
    the shared-memory one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.modules.norms import add_norm, make_norm
    from mambabyte.ops import cuda_backend

    assert cuda_backend.status()[0]
    torch.manual_seed(0)
    mod = make_norm(norm, D, 1e-5, device="cuda", dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(1 + 0.1 * torch.randn(D))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(0.1 * torch.randn(D))
    h = (3 * torch.randn(3, 37, D, device="cuda")).to(dtype)
    rdt = torch.float32 if res_fp32 or dtype == torch.float32 else dtype
    for r in (None, torch.randn(3, 37, D, device="cuda").to(rdt)):
        with torch.no_grad():
            monkeypatch.setattr(cuda_backend, "FUSED_ADD_NORM", True)
            assert cuda_backend.add_norm_cuda(h, r, mod, res_fp32) is not None
            n1, r1 = add_norm(h, r, mod, res_fp32)
            monkeypatch.setattr(cuda_backend, "FUSED_ADD_NORM", False)
            n2, r2 = add_norm(h, r, mod, res_fp32)
        assert r1.dtype == r2.dtype and n1.dtype == n2.dtype == dtype
        assert torch.equal(r1, r2)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(n1, n2, **tol)


def test_fused_add_norm_is_skipped_under_autograd_and_the_model_agrees(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.ops import cuda_backend

    m = _random_model(MambaByteConfig(d_model=128, n_layer=2), torch.float32)
    h = torch.randn(2, 5, 128, device="cuda")
    assert cuda_backend.add_norm_cuda(h, None, m.backbone.layers[0].norm, True) is None  # weights want grads
    x = torch.randint(0, 256, (2, 300), device="cuda")
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(cuda_backend, "FUSED_ADD_NORM", fused)
        with torch.no_grad():
            o = m(x, return_state=True)
        outs.append((o.logits, o.state.ssm))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("case", ["fp32", "bf16-autocast", "first-block-autocast", "fp16-autocast", "width-1000", "width-1030"])
def test_fused_add_norm_training_matches_the_torch_ops(monkeypatch, norm, case):
    """The training add + norm kernels (fp32 weights and residual stream) against add + cast + norm with
    torch's autograd: the normed output, the new residual, and the gradients of hidden, residual, weight
    and bias, with and without a gradient reaching the residual output. Width 1030 falls back."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.modules.norms import add_norm, make_norm
    from mambabyte.ops import cuda_backend

    assert cuda_backend.status()[0]
    torch.manual_seed(1)
    D = {"width-1000": 1000, "width-1030": 1030}.get(case, 1024)
    amp = {"bf16-autocast": torch.bfloat16, "first-block-autocast": torch.bfloat16, "fp16-autocast": torch.float16,
           "width-1000": torch.bfloat16, "width-1030": torch.bfloat16}.get(case)
    hdt = torch.float32 if case in ("fp32", "first-block-autocast") else amp
    with_res = case != "first-block-autocast"
    mod = make_norm(norm, D, 1e-5, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        mod.weight.copy_(1 + 0.1 * torch.randn(D))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(0.1 * torch.randn(D))
    h0 = (2 * torch.randn(3, 41, D, device="cuda")).to(hdt)
    r0 = torch.randn(3, 41, D, device="cuda") if with_res else None
    go = torch.randn(3, 41, D, device="cuda")
    gr = torch.randn(3, 41, D, device="cuda")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(cuda_backend, "FUSED_ADD_NORM", fused)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            taken = cuda_backend.add_norm_train_cuda(h0, r0, mod, True) is not None
        assert taken == (fused and case != "width-1030")
        for use_res_grad in (True, False):
            mod.zero_grad()
            h = h0.clone().requires_grad_(True)
            r = r0.clone().requires_grad_(True) if with_res else None
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                n, res = add_norm(h, r, mod, True)
                # as the mixer reads it: in the autocast dtype (the torch ops' fp32 output is cast there,
                # so its gradient is rounded to that dtype as the fused output's is)
                n = n.to(amp) if amp is not None else n
                loss = (n.float() * go).sum() + ((res * gr).sum() if use_res_grad else 0)
            loss.backward()
            results.append((n.detach().float(), res.detach(), h.grad.float(), None if r is None else r.grad,
                            mod.weight.grad.clone(), None if getattr(mod, "bias", None) is None else mod.bias.grad.clone()))
    low = amp is not None and case != "fp32"
    for a, b in zip(results[:2], results[2:]):
        for x, y in zip(a, b):
            if x is None:
                assert y is None
                continue
            tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(x, y, **tol)


def test_fused_add_norm_training_is_what_a_training_step_uses(monkeypatch):
    """A model's training step with the fused training add + norm against the torch ops: the same loss
    and gradients (bf16 autocast, fp32 master weights)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mambabyte.ops import cuda_backend

    m = _random_model(MambaByteConfig(d_model=128, n_layer=2), torch.float32)
    x = torch.randint(0, 256, (2, 300), device="cuda")
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(cuda_backend, "FUSED_ADD_NORM", fused)
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = runs
    assert abs(la - lb) < 1e-2 * abs(lb)
    for name in ga:
        scale = gb[name].abs().max().clamp(min=1e-6)
        assert ((ga[name] - gb[name]).abs().max() / scale).item() < 5e-2, name

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

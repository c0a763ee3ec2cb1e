"""Speculative decoding with a subword (BPE) drafter, verified at byte level (CPU, tiny models).

The drafter is trained for a few seconds on the target's own greedy output, so its proposals are often
right: greedy output must equal plain greedy output byte for byte, the drafter's state must follow the
accepted text (high acceptance), and with sampling the point-mass rule reproduces the target's
distribution (chi-square)."""

import pytest
import torch

pytest.importorskip("tokenizers", reason="the subword drafter needs the tokenizers package (a test extra)")

from mambabyte import MambaByteLM  # noqa: E402
from mambabyte.errors import MambaByteError  # noqa: E402
from mambabyte.generation.decode import prefill  # noqa: E402
from mambabyte.generation.sampling import SamplingParams, logits_to_probs  # noqa: E402
from mambabyte.generation.speculative import SubwordDraftRunner, speculative_accept, speculative_decode  # noqa: E402
from mambabyte.subword import SubwordDrafter, train_subword_drafter  # noqa: E402

PROMPT = b"Once"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(1)
    target = MambaByteLM.from_preset("tiny").eval()
    text = target.generate(PROMPT, max_new_bytes=600, temperature=0).bytes
    d = tmp_path_factory.mktemp("subword")
    (d / "g.txt").write_bytes(text * 4)
    torch.manual_seed(0)
    train_subword_drafter([d / "g.txt"], d / "drafter", vocab_size=300, d_model=32, n_layer=1, seq_len=32, batch_size=8,
                          lr=3e-3, max_steps=80, warmup_steps=5, device="cpu", log=lambda *a: None)
    return target, SubwordDrafter.from_pretrained(d / "drafter"), d / "drafter"


@pytest.mark.parametrize("rollback", ["deferred", "rerun"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_identity_and_exact_state(pair, k, rollback):
    target, drafter, _ = pair
    plain = target.generate(PROMPT, max_new_bytes=100, temperature=0)
    spec = target.generate(PROMPT, max_new_bytes=100, temperature=0, draft_model=drafter, draft_len=k,
                           speculative_rollback=rollback)
    assert spec.bytes == plain.bytes
    assert spec.state.allclose(plain.state, rtol=1e-4, atol=1e-5) and torch.allclose(spec.logits, plain.logits, atol=1e-4)
    sp = spec.stats.speculative
    assert sp["drafter"] == "subword"
    # the drafter's state follows the accepted text (token healing after each rollback): it keeps agreeing
    assert sp["acceptance_rate"] > 0.5, sp


def test_partial_and_full_acceptances(pair):
    target, drafter, _ = pair
    plain = target.generate(PROMPT + b"x", max_new_bytes=150, temperature=0)
    spec = target.generate(PROMPT + b"x", max_new_bytes=150, temperature=0, draft_model=drafter, draft_len=4)
    assert spec.bytes == plain.bytes
    hist = spec.stats.speculative["accepted_histogram"]
    assert len(hist) >= 2 and "4" in hist, hist  # rejections inside drafted tokens and full acceptances


def test_point_mass_rule_is_exact():
    """q = one-hot on the proposed byte: P(emitted) = p for any proposal (chi-square, p = 0.001)."""
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([[0.45, 0.30, 0.15, 0.10, 0.0], [0.25] * 4 + [0.0]])
    n, counts = 6000, torch.zeros(5)
    for i in range(n):
        x = torch.tensor([i % 5])  # proposals that ignore p entirely, including an impossible byte
        a, y = speculative_accept(p, torch.nn.functional.one_hot(x, 5).float(), x, g)
        counts[int(x) if a == 1 else y] += 1
    exp = p[0] * n
    assert counts[4] == 0
    assert (((counts[:4] - exp[:4]) ** 2) / exp[:4]).sum().item() < 16.27


def test_sampling_matches_target_joint_distribution(pair):
    target, drafter, _ = pair
    params = SamplingParams(temperature=1.0, top_k=3)
    lg, st = prefill(target, [PROMPT])
    p0 = logits_to_probs(lg, params)[0]
    joint = {}
    for b0 in torch.nonzero(p0).flatten().tolist():
        p1 = logits_to_probs(target(torch.tensor([list(PROMPT) + [b0]])).logits[:, -1], params)[0]
        for b1 in torch.nonzero(p1).flatten().tolist():
            joint[(b0, b1)] = (p0[b0] * p1[b1]).item()
    g = torch.Generator().manual_seed(5)
    n, counts, accepted = 400, {c: 0 for c in joint}, 0
    for _ in range(n):
        runner = SubwordDraftRunner(drafter, PROMPT, use_cuda_graph=False)
        out, _, _, _, sst = speculative_decode(target, runner, st, lg, None, None, 3, params, draft_len=2, generator=g)
        counts[(out[0], out[1])] += 1
        accepted += sst.accepted
    assert accepted > 0  # the acceptance path was exercised, not only the residual one
    chi2 = sum((counts[c] - n * joint[c]) ** 2 / (n * joint[c]) for c in joint)
    crit = {8: 26.12, 7: 24.32, 6: 22.46, 5: 20.52, 4: 18.47, 3: 16.27}[len(joint) - 1]
    assert chi2 < crit, (chi2, counts, joint)


def test_cli_detects_a_subword_drafter_folder(pair, tmp_path, capsysbinary):
    from mambabyte.cli import generate as gen_cli

    target, _, folder = pair
    target.save_pretrained(tmp_path / "t")
    argv = ["--model", str(tmp_path / "t"), "--prompt", "Once", "--max_new_bytes", "40", "--temperature", "0", "--raw",
            "--speculative", "--drafter", str(folder), "--draft_len", "6", "--stats"]
    assert gen_cli.main(argv) == 0
    out, err = capsysbinary.readouterr()
    assert out[:-1] == target.generate(PROMPT, max_new_bytes=40, temperature=0).bytes
    assert b"acceptance" in err


def test_subword_errors(pair):
    target, drafter, _ = pair
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=drafter, draft_state=target.allocate_state(1))
    other = MambaByteLM.from_preset("tiny", vocab_size=300)  # not a byte model, no tokenizer
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=other)

"""Speculative decoding with a byte drafter (CPU, tiny models): greedy identity with plain greedy for
several k (rejections at every position), drafter == target accepts everything, the sampling rule
reproduces the target's distribution (chi-square), exact states after rollback, UTF-8 and stop strings."""

import copy

import pytest
import torch

from mambabyte import MambaByteLM
from mambabyte.errors import MambaByteError
from mambabyte.generation.sampling import SamplingParams, logits_to_probs
from mambabyte.generation.speculative import speculative_accept, speculative_decode
from mambabyte.generation.decode import prefill

from test_generation import scripted  # noqa: E402  (tests/ is on sys.path under pytest)


def perturbed(model, scale, seed=0):
    """A drafter that agrees with the target often but not always."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device) * p.std().clamp_min(1e-3))
    return d.eval()


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(1)
    return MambaByteLM.from_preset("tiny").eval()


@pytest.mark.parametrize("rollback", ["deferred", "rerun"])
@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_greedy_identity_with_plain_greedy(target, k, rollback):
    drafter = perturbed(target, 0.05)
    prompt = "Speculative"
    plain = target.generate(prompt, max_new_bytes=40, temperature=0)
    spec = target.generate(prompt, max_new_bytes=40, temperature=0, draft_model=drafter, draft_len=k,
                           speculative_rollback=rollback)
    assert spec.bytes == plain.bytes
    assert spec.state.allclose(plain.state, rtol=1e-4, atol=1e-5)
    assert torch.allclose(spec.logits, plain.logits, atol=1e-4)
    assert spec.state.bytes_consumed == plain.state.bytes_consumed
    sp = spec.stats.speculative
    assert sp["emitted"] >= 40 and sp["verifications"] >= 40 / (k + 1)
    assert 0 < sp["acceptance_rate"] < 1 or k == 1


def test_rejections_happen_at_every_position(target):
    hist = {}
    for seed, scale in ((0, 0.05), (1, 0.1), (2, 0.03)):
        drafter = perturbed(target, scale, seed)
        plain = target.generate("every position", max_new_bytes=60, temperature=0)
        spec = target.generate("every position", max_new_bytes=60, temperature=0, draft_model=drafter, draft_len=4)
        assert spec.bytes == plain.bytes
        for a, n in spec.stats.speculative["accepted_histogram"].items():
            hist[int(a)] = hist.get(int(a), 0) + n
    assert all(hist.get(a, 0) > 0 for a in range(5)), hist  # rejected at 0..3 and fully accepted


def test_adaptive_draft_len_keeps_identity(target):
    drafter = perturbed(target, 0.03)
    plain = target.generate("adaptive", max_new_bytes=50, temperature=0)
    spec = target.generate("adaptive", max_new_bytes=50, temperature=0, draft_model=drafter, draft_len=2,
                           adaptive_draft=True)
    assert spec.bytes == plain.bytes
    assert len(set(spec.stats.speculative["accepted_histogram"])) > 1


def test_drafter_equal_to_target_accepts_everything(target):
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=4), dict(temperature=1.0, top_p=0.9, seed=5)):
        spec = target.generate("same model", max_new_bytes=30, draft_model=target, draft_len=5, **kw)
        sp = spec.stats.speculative
        assert sp["acceptance_rate"] == 1.0 and sp["drafted"] > 0
        assert len(spec.bytes) == 30


@pytest.mark.parametrize("rollback", ["deferred", "rerun"])
def test_state_after_speculative_sampling_equals_plain_state(target, rollback):
    drafter = perturbed(target, 0.1)
    spec = target.generate("sampled", max_new_bytes=40, temperature=0.9, seed=3, draft_model=drafter, draft_len=4,
                           speculative_rollback=rollback)
    ref = target(torch.tensor([list(b"sampled" + spec.bytes)]), return_state=True)
    assert spec.state.allclose(ref.state, rtol=1e-4, atol=1e-5)
    assert torch.allclose(spec.logits, ref.logits[:, -1], atol=1e-4)
    # and continuing from it equals continuing after a plain pass over the same bytes
    a = target.generate("", state=spec.state, logits=spec.logits, max_new_bytes=10, temperature=0)
    b = target.generate(b"sampled" + spec.bytes, max_new_bytes=10, temperature=0)
    assert a.bytes == b.bytes


def test_batches_are_decoded_row_by_row(target):
    drafter = perturbed(target, 0.05)
    prompts = ["one", "a longer prompt"]
    spec = target.generate(prompts, max_new_bytes=20, temperature=0, draft_model=drafter, draft_len=3)
    plain = target.generate(prompts, max_new_bytes=20, temperature=0)
    assert spec.sequences == plain.sequences
    assert spec.state.allclose(plain.state, rtol=1e-4, atol=1e-5)


def test_acceptance_rule_reproduces_target_distribution():
    """The rule alone, many trials: P(first emitted byte) must equal p_0 (chi-square, p = 0.001)."""
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.10, 0.00], [0.2] * 5 + [0.0]])
    q = torch.tensor([[0.05, 0.05, 0.30, 0.30, 0.20, 0.10]])
    counts = torch.zeros(V)
    n = 6000
    for _ in range(n):
        x = torch.multinomial(q[0], 1, generator=g)
        a, y = speculative_accept(p, q, x, g)
        counts[int(x) if a == 1 else y] += 1
    exp = p[0] * n
    assert counts[5] == 0
    chi2 = (((counts[:5] - exp[:5]) ** 2) / exp[:5]).sum().item()
    assert chi2 < 18.47, (counts, exp)  # 4 dof


def test_speculative_sampling_matches_target_joint_distribution(target):
    """End to end with a real drafter: the joint distribution of the first two bytes equals the
    target's (top-3 truncation keeps 9 cells), chi-square at p = 0.001."""
    drafter = perturbed(target, 0.2, seed=0)  # P(accept first draft) ~ 0.3: residual draws are common
    params = SamplingParams(temperature=1.0, top_k=3)
    prompt = b"chi"
    lg, st = prefill(target, [prompt])
    dl, dst = prefill(drafter, [prompt])
    p0 = logits_to_probs(lg, params)[0]
    joint = {}
    for b0 in torch.nonzero(p0).flatten().tolist():
        l1 = target(torch.tensor([list(prompt) + [b0]])).logits[:, -1]
        p1 = logits_to_probs(l1, params)[0]
        for b1 in torch.nonzero(p1).flatten().tolist():
            joint[(b0, b1)] = (p0[b0] * p1[b1]).item()
    g = torch.Generator().manual_seed(123)
    n = 500
    counts = {key: 0 for key in joint}
    rejected_first = 0
    for _ in range(n):
        out, _, _, _, sst = speculative_decode(target, drafter, st, lg, dst, dl, 3, params, draft_len=2, generator=g)
        counts[(out[0], out[1])] += 1  # a pair outside the support would raise KeyError
        rejected_first += sst.accepted_history[0] == 0
    assert 0 < rejected_first < n  # the drafter's proposal was rejected sometimes, accepted sometimes
    chi2 = sum((counts[c] - n * joint[c]) ** 2 / (n * joint[c]) for c in joint)
    dof = len(joint) - 1
    crit = {8: 26.12, 7: 24.32, 6: 22.46, 5: 20.52, 4: 18.47, 3: 16.27}[dof]
    assert chi2 < crit, (chi2, counts, joint)


def test_rollback_inside_multibyte_characters_and_stream():
    """The drafter diverges in the middle of multi-byte UTF-8 characters; output and stream are exact."""
    prompt = "» ".encode()
    t_script = "héllo wörld 😀 — fin".encode()
    d_script = "héllo wèrld 😃 – fun".encode()
    target = scripted(prompt, t_script)
    drafter = scripted(prompt, d_script)
    torch.manual_seed(8)
    drafter.load_state_dict(perturbed(drafter, 0.2).state_dict())
    pieces = []
    spec = target.generate(prompt, max_new_bytes=len(t_script), temperature=0, draft_model=drafter, draft_len=6,
                           stream=pieces.append)
    assert spec.bytes == t_script and pieces and "".join(pieces) == t_script.decode()
    for piece in pieces:
        piece.encode("utf-8")  # whole characters only (a split character would be U+FFFD or fail)
    assert "\ufffd" not in "".join(pieces)
    hist = spec.stats.speculative["accepted_histogram"]
    assert any(int(a) < 6 for a in hist)  # rejections happened
    ref = MambaByteLM.forward(target, torch.tensor([list(prompt + t_script)]), return_state=True)
    assert spec.state.allclose(ref.state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rollback", ["deferred", "rerun"])
@pytest.mark.parametrize("k", [2, 5])
def test_stop_string_across_a_verification(k, rollback):
    prompt = b"Q:"
    script = "r\u00e9ponse 42.\nQ: ignored text".encode()
    target = scripted(prompt, script)
    drafter = scripted(prompt, script)  # perfect drafter: a stop string lands inside one verification
    pieces = []
    spec = target.generate(prompt, max_new_bytes=len(script), temperature=0, draft_model=drafter, draft_len=k,
                           stop="\nQ:", stream=pieces.append, speculative_rollback=rollback)
    assert spec.bytes == "r\u00e9ponse 42.".encode() and spec.stop_reasons == ["stop"]
    assert "".join(pieces) == "r\u00e9ponse 42."
    ref = MambaByteLM.forward(target, torch.tensor([list(prompt + spec.bytes)]), return_state=True)
    assert spec.state.allclose(ref.state, rtol=1e-4, atol=1e-5)
    assert spec.state.bytes_consumed == len(prompt) + len(spec.bytes)
    inc = target.generate(prompt, max_new_bytes=len(script), temperature=0, draft_model=drafter, draft_len=k,
                          stop="\nQ:", include_stop=True)
    assert inc.bytes == "r\u00e9ponse 42.\nQ:".encode()


def test_speculative_errors(target):
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=target, repetition_penalty=1.2)
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=target, draft_len=-1)
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=target, speculative_rollback="sideways")
    big = MambaByteLM(target.config.__class__.from_preset("tiny", vocab_size=512))
    with pytest.raises(MambaByteError):
        target.generate("x", max_new_bytes=4, draft_model=big)


@pytest.mark.gpu
def test_speculative_on_cuda_matches_plain_greedy():
    torch.manual_seed(1)
    t = MambaByteLM.from_preset("tiny", device="cuda").eval()
    d = perturbed(t, 0.05)
    plain = t.generate("cuda spec", max_new_bytes=48, temperature=0)
    for graph, vgraph, rollback in ((True, False, "deferred"), (False, False, "rerun"), (True, True, "deferred"),
                                    (True, True, "rerun")):
        spec = t.generate("cuda spec", max_new_bytes=48, temperature=0, draft_model=d, draft_len=4, use_cuda_graph=graph,
                          verify_cuda_graph=vgraph, speculative_rollback=rollback)
        assert spec.bytes == plain.bytes
        assert spec.state.allclose(plain.state, rtol=1e-4, atol=1e-5)
        assert spec.stats.speculative["verify_cuda_graph"] == vgraph


def test_cli_speculative_stats(target, tmp_path, capsysbinary):
    from mambabyte.cli import generate as gen_cli

    target.save_pretrained(tmp_path / "t")
    perturbed(target, 0.05).save_pretrained(tmp_path / "d")
    argv = ["--model", str(tmp_path / "t"), "--prompt", "cli spec", "--max_new_bytes", "24", "--temperature", "0",
            "--raw", "--speculative", "--drafter", str(tmp_path / "d"), "--draft_len", "4", "--adaptive", "--stats"]
    assert gen_cli.main(argv) == 0
    out, err = capsysbinary.readouterr()
    assert out[:-1] == target.generate("cli spec", max_new_bytes=24, temperature=0).bytes
    err = err.decode()
    assert "acceptance" in err and "speedup" in err and "accepted bytes / verification" in err
    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--model", str(tmp_path / "t"), "--prompt", "x", "--drafter", str(tmp_path / "d")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--model", str(tmp_path / "t"), "--prompt", "x", "--speculative", "--drafter", str(tmp_path / "nope")])
    assert e.value.code == 2


# -- drafters that are independent models of another size ------------------------------------------------
from mambabyte import MambaByteConfig  # noqa: E402
from test_generation import ScriptedLM  # noqa: E402

OTHER_SIZES = [(32, 1), (48, 3)]  # the target is 64 x 2 ("tiny")
OTHER_PROMPT = b"independent drafters"


def independent_drafter(d_model, n_layer, seed, cls=MambaByteLM):
    """A freshly initialised model of its own size (not derived from the target's weights)."""
    torch.manual_seed(seed)
    return cls(MambaByteConfig(d_model=d_model, n_layer=n_layer)).eval()


def assert_same_as_plain(spec, plain):
    assert spec.bytes == plain.bytes
    assert spec.stop_reasons == plain.stop_reasons
    assert spec.state.bytes_consumed == plain.state.bytes_consumed
    assert spec.state.allclose(plain.state, rtol=1e-5, atol=1e-5), spec.state.max_abs_diff(plain.state)
    assert torch.allclose(spec.logits, plain.logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d_model,n_layer", OTHER_SIZES)
def test_greedy_identity_with_independent_drafters_of_other_sizes(target, d_model, n_layer, seed):
    drafter = independent_drafter(d_model, n_layer, 100 + seed)
    assert (drafter.config.d_model, drafter.config.n_layer) != (target.config.d_model, target.config.n_layer)
    plain = target.generate(OTHER_PROMPT, max_new_bytes=40, temperature=0)
    for k in (1, 3, 8):
        for adaptive in (False, True):
            spec = target.generate(OTHER_PROMPT, max_new_bytes=40, temperature=0, draft_model=drafter, draft_len=k,
                                   adaptive_draft=adaptive)
            assert_same_as_plain(spec, plain)
            sp = spec.stats.speculative
            assert sp["drafter"] == "byte" and sp["drafted"] > 0 and sp["emitted"] == 40, (k, adaptive, sp)
            assert sp["acceptance_rate"] < 1  # an unrelated drafter: the target corrected it


def _simulate_verifications(wrong, n, k0, adaptive):
    """Accepted-count histogram of a drafter that proposes the target's greedy byte except at ``wrong``
    positions (the loop and adaptive rule of speculative_decode, as documented)."""
    k, k_max, pos, hist = k0, min(64, max(1, 4 * k0)), 0, {}
    while pos < n:
        kk = min(k, n - pos - 1)
        a = next((j for j in range(kk) if pos + j in wrong), kk)
        hist[str(a)] = hist.get(str(a), 0) + 1
        pos += a + 1
        if adaptive and kk > 0:
            if a == kk:
                k = min(k_max, k + 1)
            elif a < kk / 2:
                k = max(1, a + 1)
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0])))


@pytest.mark.parametrize("d_model,n_layer", OTHER_SIZES)
def test_other_size_drafter_rejected_at_every_position_keeps_identity_and_stays_in_sync(target, d_model, n_layer):
    """A real model of another size whose argmax is scripted to the target's greedy output with errors at
    known positions: rejections land at every draft position, and since the drafter's proposal at a
    position depends on how many bytes its own state has consumed, the exact accepted-count histogram
    checks that the drafter is rolled back to the right snapshot every time."""
    n = 64
    plain = target.generate(OTHER_PROMPT, max_new_bytes=n, temperature=0)
    wrong, w = set(), -1
    for gap in (3, 0, 5, 1, 7, 2, 6, 4, 12, 8):  # runs of 0..8 right proposals between wrong ones
        w += gap + 1
        wrong.add(w)
    assert max(wrong) < n
    script = bytes((b + 1) % 256 if i in wrong else b for i, b in enumerate(plain.bytes))
    drafter = independent_drafter(d_model, n_layer, 7, cls=ScriptedLM)
    drafter.script, drafter.offset = script, len(OTHER_PROMPT)
    seen = set()
    for k in (1, 3, 8):
        for adaptive in (False, True):
            for rollback in ("deferred", "rerun"):
                spec = target.generate(OTHER_PROMPT, max_new_bytes=n, temperature=0, draft_model=drafter, draft_len=k,
                                       adaptive_draft=adaptive, speculative_rollback=rollback)
                assert_same_as_plain(spec, plain)
                hist = spec.stats.speculative["accepted_histogram"]
                assert hist == _simulate_verifications(wrong, n, k, adaptive), (k, adaptive, rollback)
                seen |= {int(a) for a in hist}
    assert set(range(9)) <= seen  # rejected at each of positions 0..7 and fully accepted


def _stop_cases():
    """(stop, k, prefix): the script is `prefix` bytes, the stop string, then more text. A perfect drafter
    makes every verification emit k + 1 bytes, so over the prefixes the stop string lands at every offset
    inside a verification and (for the 3-byte one) across two of them."""
    return [(stop, k, prefix) for stop in (b"\n", b"\nQ:") for k in (2, 5) for prefix in range(9)]


def _stop_script(stop, prefix):
    return "é".encode() * (prefix // 2) + b"x" * (prefix % 2) + stop + " tail → text".encode()


def test_stop_string_inside_and_across_verifications_output_and_stream():
    prompt = b"Q:"
    target, drafter = scripted(prompt, b""), scripted(prompt, b"")
    for stop, k, prefix in _stop_cases():
        script = _stop_script(stop, prefix)
        target.script = drafter.script = script
        for include_stop in (False, True):
            plain_pieces, pieces = [], []
            plain = target.generate(prompt, max_new_bytes=len(script), temperature=0, stop=stop,
                                    include_stop=include_stop, stream=plain_pieces.append)
            spec = target.generate(prompt, max_new_bytes=len(script), temperature=0, stop=stop, include_stop=include_stop,
                                   draft_model=drafter, draft_len=k, stream=pieces.append)
            case = (stop, k, prefix, include_stop)
            assert spec.bytes == plain.bytes == script[: prefix + include_stop * len(stop)], case
            assert spec.stop_reasons == plain.stop_reasons == ["stop"], case
            assert spec.stats.speculative["acceptance_rate"] == 1.0  # a perfect drafter: no rollback at all
            # whole characters only; the stop string reaches the stream only when it is included
            assert "".join(pieces) == "".join(plain_pieces) == spec.bytes.decode(), case
            assert spec.state.bytes_consumed == plain.state.bytes_consumed == len(prompt) + len(spec.bytes)


def test_state_after_stop_string_inside_and_across_verifications():
    prompt = b"Q:"
    target, drafter = scripted(prompt, b""), scripted(prompt, b"")
    bad = []
    for stop, k, prefix in _stop_cases():
        script = _stop_script(stop, prefix)
        target.script = drafter.script = script
        for include_stop in (False, True):
            rollback = "rerun" if prefix % 2 else "deferred"
            plain = target.generate(prompt, max_new_bytes=len(script), temperature=0, stop=stop, include_stop=include_stop)
            spec = target.generate(prompt, max_new_bytes=len(script), temperature=0, stop=stop, include_stop=include_stop,
                                   draft_model=drafter, draft_len=k, speculative_rollback=rollback)
            assert spec.bytes == plain.bytes
            if not (spec.state.allclose(plain.state, rtol=1e-5, atol=1e-5)
                    and torch.allclose(spec.logits, plain.logits, rtol=1e-5, atol=1e-4)):
                bad.append((stop, k, prefix, include_stop, spec.state.max_abs_diff(plain.state)))
    assert not bad, f"{len(bad)} wrong final states: {bad}"


def test_draft_context_lets_the_drafter_read_what_the_state_holds(target):
    """Continuing a state the drafter never saw: with draft_context (the text behind the state) a drafter
    equal to the target accepts everything; without it the drafter guesses from the new prompt alone.
    Output is plain greedy's either way."""
    first = target.generate("An earlier turn of a conversation.\n", max_new_bytes=40, temperature=0)
    history = b"An earlier turn of a conversation.\n" + first.bytes
    plain = target.generate("Next:", max_new_bytes=40, temperature=0, state=first.state)
    blind = target.generate("Next:", max_new_bytes=40, temperature=0, state=first.state, draft_model=target,
                            draft_len=4)
    told = target.generate("Next:", max_new_bytes=40, temperature=0, state=first.state, draft_model=target,
                           draft_len=4, draft_context=history)
    assert blind.bytes == told.bytes == plain.bytes
    assert told.stats.speculative["acceptance_rate"] == 1.0
    assert blind.stats.speculative["acceptance_rate"] < 1.0
    with pytest.raises(MambaByteError, match="either draft_state or draft_context"):
        target.generate("x", max_new_bytes=2, draft_model=target, draft_state=first.state, draft_context=b"y")

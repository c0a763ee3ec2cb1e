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


# -- rollback inside multi-byte UTF-8 characters and across stop strings ------------------------------------
from test_generation import scripted  # noqa: E402  (tests/ is on sys.path under pytest)

U_PROMPT = "Note → ".encode()
U_SCRIPT = "café → naïve 😀 déjà vu → 北京 😃 résumé → fin 🎉 über → ok · señor ⇒ 東京 😀 «ça va» → 🎉 Ünïcödé ←".encode()
# the drafter learns near-misses of the script: characters that share lead bytes with the target's
# (😀/😃/😁, →/←/⇒, 北京/北海, é/è, ...), so drafted tokens are accepted up to the middle of a character
U_TRAIN = ("café → naïve 😃 déjà vu ← 北海 😀 résumé ⇒ fin 🎈 über → ok · senor → 京都 😁 «ça» → 🎊 Ünicode ←\n"
           "caffè ← naive 😀 deja vu → 北京 😄 résume → fín 🎉 uber ⇒ ok · señora ⇐ 東北 😃 «çà va» ← 🎈 Ünïcödé →\n")


@pytest.fixture(scope="module")
def utf8_pair(tmp_path_factory):
    """A target that greedily emits U_SCRIPT (a real tiny model plus a script bias) and a subword drafter
    briefly trained on near-misses of it, with multi-byte and partial-character BPE tokens."""
    d = tmp_path_factory.mktemp("subword_utf8")
    (d / "t.txt").write_bytes(U_TRAIN.encode() * 8)
    torch.manual_seed(0)
    train_subword_drafter([d / "t.txt"], d / "drafter", vocab_size=300, d_model=32, n_layer=1, seq_len=32, batch_size=8,
                          lr=3e-3, max_steps=60, warmup_steps=5, device="cpu", log=lambda *a: None)
    drafter = SubwordDrafter.from_pretrained(d / "drafter")
    toks = [drafter.token_bytes(i) for i in range(drafter.tokenizer.vocab_size)]
    assert any(len(t) > 1 and max(t) >= 0x80 for t in toks)  # tokens holding (parts of) multi-byte characters
    return scripted(U_PROMPT, U_SCRIPT), drafter


def _is_continuation(b: int) -> bool:
    return 0x80 <= b < 0xC0


def assert_whole_characters(pieces, text):
    assert pieces and all(pieces)
    for piece in pieces:
        assert "\ufffd" not in piece, pieces  # a character split between pieces would decode to U+FFFD
        piece.encode("utf-8")  # no lone surrogates
    assert "".join(pieces) == text


def test_subword_rollback_inside_multibyte_characters_and_stream(utf8_pair):
    target, drafter = utf8_pair
    n = len(U_SCRIPT)
    plain_pieces = []
    plain = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, stream=plain_pieces.append)
    assert plain.bytes == U_SCRIPT
    for k, adaptive, rollback in ((1, False, "deferred"), (2, True, "deferred"), (3, False, "rerun"), (5, False, "deferred"),
                                  (8, False, "rerun")):
        pieces = []
        spec = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, draft_model=drafter, draft_len=k,
                               adaptive_draft=adaptive, speculative_rollback=rollback, stream=pieces.append)
        assert spec.bytes == plain.bytes, (k, adaptive, rollback)
        assert spec.stop_reasons == plain.stop_reasons == ["length"]
        assert spec.state.allclose(plain.state, rtol=1e-5, atol=1e-5) and torch.allclose(spec.logits, plain.logits, atol=1e-4)
        assert spec.state.bytes_consumed == plain.state.bytes_consumed
        assert_whole_characters(pieces, U_SCRIPT.decode())
        assert "".join(pieces) == "".join(plain_pieces)
        assert 0 < spec.stats.speculative["acceptance_rate"] < 1
    # the same decode, called directly for its per-verification history: rejections happened in the middle of
    # multi-byte characters (lead bytes accepted, a continuation byte corrected), and verifications ended
    # inside characters, so the drafter's next tokens had to re-read a partial character (token healing)
    lg, st = prefill(target, [U_PROMPT])
    pieces = []
    out, S, L, reason, sst = speculative_decode(target, SubwordDraftRunner(drafter, U_PROMPT, use_cuda_graph=False), st, lg,
                                                None, None, n, SamplingParams(temperature=0), draft_len=5,
                                                stream=pieces.append)
    assert out == U_SCRIPT and reason == "length"
    assert_whole_characters(pieces, U_SCRIPT.decode())
    assert S.allclose(plain.state, rtol=1e-5, atol=1e-5)
    pos, mid_char_rejections, mid_char_boundaries = 0, 0, 0
    for kk, a in zip(sst.draft_len_history, sst.accepted_history):
        if a < kk and a > 0 and _is_continuation(U_SCRIPT[pos + a]):
            mid_char_rejections += 1
        pos += a + 1
        mid_char_boundaries += pos < n and _is_continuation(U_SCRIPT[pos])
    assert pos == n
    assert mid_char_rejections > 0 and mid_char_boundaries > 0, (mid_char_rejections, mid_char_boundaries)


U_STOPS = ["😃", "北京", "é", "ok · ", "→ 🎉", "not in the text"]


def test_subword_rollback_across_stop_strings(utf8_pair, pair):
    target, drafter = utf8_pair
    n = len(U_SCRIPT)
    rejected = 0
    ks = (2, 5, 3, 8, 1)
    for i, stop in enumerate(U_STOPS):
        for k, include_stop in ((ks[i % 5], False), (ks[(i + 2) % 5], True)):
            plain_pieces, pieces = [], []
            plain = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, stop=stop, include_stop=include_stop,
                                    stream=plain_pieces.append)
            spec = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, stop=stop, include_stop=include_stop,
                                   draft_model=drafter, draft_len=k, stream=pieces.append,
                                   speculative_rollback=("deferred", "rerun")[i % 2])
            case = (stop, k, include_stop)
            assert spec.bytes == plain.bytes, case
            assert spec.stop_reasons == plain.stop_reasons == (["length"] if stop == U_STOPS[-1] else ["stop"]), case
            assert spec.state.bytes_consumed == plain.state.bytes_consumed
            assert_whole_characters(pieces, spec.bytes.decode())
            assert "".join(pieces) == "".join(plain_pieces), case
            rejected += spec.stats.speculative["acceptance_rate"] < 1
    assert rejected > 0
    # the first target (arbitrary bytes, not UTF-8): stops at a few offsets of its greedy output
    target, drafter, _ = pair
    full = target.generate(PROMPT, max_new_bytes=80, temperature=0).bytes
    for start, length, k in ((10, 1, 3), (23, 2, 8), (41, 3, 1), (57, 4, 4)):
        stop = full[start : start + length]
        plain = target.generate(PROMPT, max_new_bytes=80, temperature=0, stop=stop)
        spec = target.generate(PROMPT, max_new_bytes=80, temperature=0, stop=stop, draft_model=drafter, draft_len=k)
        assert spec.bytes == plain.bytes == full[: full.find(stop)] and spec.stop_reasons == ["stop"], (start, length, k)


def test_subword_state_after_stop_strings(utf8_pair):
    target, drafter = utf8_pair
    n, bad = len(U_SCRIPT), []
    for stop in (" ", "→"):  # early in the script: the drafter's first tokens are accepted across them
        for k in (2, 3, 4, 5, 6):
            for include_stop in (False, True):
                plain = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, stop=stop, include_stop=include_stop)
                spec = target.generate(U_PROMPT, max_new_bytes=n, temperature=0, stop=stop, include_stop=include_stop,
                                       draft_model=drafter, draft_len=k)
                assert spec.bytes == plain.bytes
                if not (spec.state.allclose(plain.state, rtol=1e-5, atol=1e-5)
                        and torch.allclose(spec.logits, plain.logits, rtol=1e-5, atol=1e-4)):
                    bad.append((stop, k, include_stop, spec.state.max_abs_diff(plain.state)))
    assert not bad, f"{len(bad)} wrong final states: {bad}"

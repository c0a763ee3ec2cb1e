"""Generation on CPU with tiny models: greedy == argmax over full forwards, exact state continuation,
stop strings across step boundaries, UTF-8 streaming, batches, sampling filters, penalties, seeds."""


import pytest
import torch

import mambabyte
from mambabyte import MambaByteLM
from mambabyte.errors import MambaByteError, StateError
from mambabyte.generation import SamplingParams, StopMatcher, Utf8Stream, generate, logits_to_probs
from mambabyte.generation.sampling import sample_from_probs


class ScriptedLM(MambaByteLM):
    """A real tiny MambaByte whose logits get +1e4 on ``script[bytes_consumed - offset]``, so greedy
    decoding emits the script exactly (the state still runs through the real model)."""

    script = b""
    offset = 0

    def _bias(self, consumed):
        i = consumed - self.offset
        b = torch.zeros(256)
        if 0 <= i < len(self.script):
            b[self.script[i]] = 1e4
        return b

    def forward(self, input_ids, state=None, return_state=False, num_last_tokens=0, output_hidden_states=False):
        out = super().forward(input_ids, state=state, return_state=return_state, num_last_tokens=num_last_tokens)
        prev = state.bytes_consumed if state is not None else 0
        L = input_ids.shape[-1]
        n = out.logits.shape[1]
        bias = torch.stack([self._bias(prev + L - n + j + 1) for j in range(n)])
        out.logits = out.logits + bias.to(out.logits)
        return out

    @torch.no_grad()
    def step(self, byte_ids, state):
        logits = super().step(byte_ids, state)
        return logits + self._bias(state.bytes_consumed).to(logits)


def scripted(prompt: bytes, script: bytes) -> ScriptedLM:
    torch.manual_seed(7)
    m = ScriptedLM(mambabyte.MambaByteConfig.from_preset("tiny")).eval()
    m.script, m.offset = script, len(prompt)
    return m


def argmax_loop(model, prompt: bytes, n: int) -> bytes:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return bytes(seq[len(prompt):])


# ---------------------------------------------------------------------------------------------------
def test_greedy_equals_argmax_over_full_forwards(tiny_model):
    prompt = b"The quick brown fox"
    r = tiny_model.generate(prompt, max_new_bytes=48, temperature=0)
    assert r.bytes == argmax_loop(tiny_model, prompt, 48)
    assert len(r.bytes) == 48 and r.stop_reasons == ["length"]
    # the result's state and logits are those after prompt + output
    out = tiny_model(torch.tensor([list(prompt + r.bytes)]), return_state=True)
    assert r.state.allclose(out.state, rtol=1e-4, atol=1e-5)
    assert torch.allclose(r.logits, out.logits[:, -1], atol=1e-4)
    assert r.state.bytes_consumed == len(prompt) + 48
    assert r.stats.new_bytes == 48 and r.stats.prompt_bytes == len(prompt) and r.stats.decode_s > 0
    assert r.stats.decode_bytes_per_s > 0 and not r.stats.cuda_graph


def test_entry_points_agree(tiny_model):
    a = tiny_model.generate("abc", max_new_bytes=10, temperature=0)
    b = mambabyte.generate(tiny_model, "abc", max_new_bytes=10, temperature=0)
    c = generate(tiny_model, b"abc", max_new_tokens=10, temperature=0)
    assert a.bytes == b.bytes == c.bytes
    assert isinstance(a.text, str) and a.text == a.bytes.decode("utf-8", errors="replace")


def test_continue_from_result_state_is_exact(tiny_model):
    full = tiny_model.generate("Once upon", max_new_bytes=30, temperature=0)
    first = tiny_model.generate("Once upon", max_new_bytes=12, temperature=0)
    rest = tiny_model.generate("", state=first.state, logits=first.logits, max_new_bytes=18, temperature=0)
    assert first.bytes + rest.bytes == full.bytes
    # a non-empty prompt from a state == the concatenated prompt from scratch
    a = tiny_model.generate(" a time", state=first.state, max_new_bytes=15, temperature=0)
    b = tiny_model.generate(b"Once upon" + first.bytes + b" a time", max_new_bytes=15, temperature=0)
    assert a.bytes == b.bytes


def test_generate_does_not_modify_the_state_passed_in(tiny_model):
    st = tiny_model(torch.tensor([list(b"branch point")]), return_state=True).state
    before = st.clone()
    r1 = tiny_model.generate("x", state=st, max_new_bytes=8, temperature=1.0, seed=1)
    r2 = tiny_model.generate("y", state=st, max_new_bytes=8, temperature=1.0, seed=2)
    assert st.equal(before)
    r1.state.ssm.add_(1.0)  # results never alias each other or the input
    assert st.equal(before) and not r2.state.equal(r1.state)


def test_empty_prompt_from_zero_state_uses_bos(tiny_model):
    r = tiny_model.generate("", max_new_bytes=10, temperature=0)
    assert r.bytes == tiny_model.generate("\n", max_new_bytes=10, temperature=0).bytes
    with pytest.raises(MambaByteError):
        tiny_model.generate("", max_new_bytes=3, bos=b"")


def test_batch_of_different_lengths_equals_one_by_one(tiny_model):
    prompts = ["a", "hello there", "", "mid size"]
    r = tiny_model.generate(prompts, max_new_bytes=16, temperature=0)
    assert len(r.sequences) == 4 and r.state.batch_size == 4
    for i, p in enumerate(prompts):
        single = tiny_model.generate(p, max_new_bytes=16, temperature=0)
        assert r.sequences[i] == single.bytes
        assert r.state.select(i).allclose(single.state, rtol=1e-4, atol=1e-5)


def test_num_samples_and_seeds(tiny_model):
    r = tiny_model.generate("seed", max_new_bytes=20, num_samples=3, temperature=0)
    assert len(set(r.sequences)) == 1 and len(r.sequences) == 3
    a = tiny_model.generate("seed", max_new_bytes=20, num_samples=2, temperature=1.0, seed=5)
    b = tiny_model.generate("seed", max_new_bytes=20, num_samples=2, temperature=1.0, seed=5)
    c = tiny_model.generate("seed", max_new_bytes=20, num_samples=2, temperature=1.0, seed=6)
    assert a.sequences == b.sequences and a.sequences != c.sequences
    assert a.sequences[0] != a.sequences[1]  # samples are independent
    assert a.prompts == [b"seed", b"seed"]


def test_state_per_prompt_or_shared(tiny_model):
    st = tiny_model(torch.tensor([list(b"ctx")]), return_state=True).state
    r = tiny_model.generate(["a", "b"], state=st, max_new_bytes=5, temperature=0)
    assert r.sequences[0] == tiny_model.generate("ctxa", max_new_bytes=5, temperature=0).bytes
    with pytest.raises(StateError):
        tiny_model.generate(["a", "b", "c"], state=st.repeat(2), max_new_bytes=2)
    other = MambaByteLM.from_preset("mini")
    with pytest.raises(StateError):
        tiny_model.generate("a", state=other.allocate_state(1), max_new_bytes=2)


# ---------------------------------------------------------------------------------------------------
# stop strings
@pytest.mark.parametrize("sync_every", [1, 2, 3, 16])
def test_stop_string_across_steps_and_windows(sync_every):
    prompt, script = b"Q:", b"the answer is 42.\nQ: next"
    m = scripted(prompt, script)
    r = m.generate(prompt, max_new_bytes=len(script), temperature=0, stop=["\nQ:", "zzz"], sync_every=sync_every)
    assert r.bytes == b"the answer is 42." and r.stop_reasons == ["stop"]
    # the returned state is the state after prompt + returned bytes (rolled back exactly)
    ref = MambaByteLM.forward(m, torch.tensor([list(prompt + r.bytes)]), return_state=True)
    assert r.state.allclose(ref.state, rtol=1e-4, atol=1e-5)
    assert r.state.bytes_consumed == len(prompt) + len(r.bytes)
    r2 = m.generate(prompt, max_new_bytes=len(script), temperature=0, stop=b"\nQ:", include_stop=True,
                    sync_every=sync_every)
    assert r2.bytes == b"the answer is 42.\nQ:"
    ref2 = MambaByteLM.forward(m, torch.tensor([list(prompt + r2.bytes)]), return_state=True)
    assert r2.state.allclose(ref2.state, rtol=1e-4, atol=1e-5)


def test_stop_at_first_byte_and_batch_rows_stop_independently():
    prompt, script = b">", b"STOP and more text here"
    m = scripted(prompt, script)
    r = m.generate(prompt, max_new_bytes=10, temperature=0, stop="STOP")
    assert r.bytes == b"" and r.stop_reasons == ["stop"]
    ref = MambaByteLM.forward(m, torch.tensor([list(prompt)]), return_state=True)
    assert r.state.allclose(ref.state, rtol=1e-4, atol=1e-5)
    r = m.generate(prompt, max_new_bytes=16, temperature=0, stop="more", sync_every=4)
    assert r.bytes == b"STOP and "


def test_batch_rows_stop_independently(tiny_model):
    kw = dict(max_new_bytes=40, temperature=1.0, seed=11, num_samples=3, sync_every=5)
    free = tiny_model.generate("rows", **kw)
    stop = bytes(free.sequences[0][20:22])
    r = tiny_model.generate("rows", stop=stop, **kw)
    for i, s in enumerate(free.sequences):
        k = s.find(stop)
        assert r.sequences[i] == (s[:k] if k >= 0 else s)
        assert r.stop_reasons[i] == ("stop" if k >= 0 else "length")
        ref = tiny_model(torch.tensor([list(b"rows" + r.sequences[i])]), return_state=True)
        assert r.state.select(i).allclose(ref.state, rtol=1e-4, atol=1e-5)
        assert torch.allclose(r.logits[i], ref.logits[0, -1], atol=1e-4)


def test_stop_matcher_unit():
    m = StopMatcher([b"ab", b"bcd"])
    assert m.find(b"xxa", 0) is None
    assert m.find(b"xxab", 3) == (2, 4)
    assert m.find(b"xbcdab", 3) == (1, 4) and m.find(b"xbcdab", 4) == (4, 6)
    assert m.holdback(b"zzx") == 0 and m.holdback(b"zza") == 1 and m.holdback(b"zbc") == 2


# ---------------------------------------------------------------------------------------------------
# UTF-8 streaming
def test_streaming_hands_out_whole_characters_only():
    prompt, script = "Ünï: ".encode(), "héllo wörld €uro 😀 日本".encode()
    m = scripted(prompt, script)
    pieces = []
    r = m.generate(prompt, max_new_bytes=len(script), temperature=0, stream=pieces.append, sync_every=1)
    assert r.text == script.decode() and "".join(pieces) == r.text
    # one step = at most one character, and a character split over 2..4 steps comes out whole once
    assert pieces == list(script.decode())


def test_streaming_never_leaks_a_stop_string():
    prompt, script = b"", "caf\u00e9 END more".encode()
    m = scripted(b"\n", script)
    pieces = []
    r = m.generate(prompt, max_new_bytes=len(script), temperature=0, stop="END", stream=pieces.append)
    assert r.text == "caf\u00e9 " and "".join(pieces) == "caf\u00e9 "


def test_streaming_batch_callback_gets_index(tiny_model):
    got = {0: [], 1: []}
    r = tiny_model.generate(["a", "b"], max_new_bytes=12, temperature=0, stream=lambda t, i: got[i].append(t))
    assert ["".join(got[i]) for i in (0, 1)] == r.texts


def test_utf8_stream_unit():
    s = Utf8Stream()
    data = "a€😀".encode()
    out = [s.feed(data[i : i + 1]) for i in range(len(data))]
    assert out == ["a", "", "", "€", "", "", "", "😀"]
    assert s.feed(b"\xff") == "\ufffd" and s.feed(b"\xe2\x82") == "" and s.finish() == "\ufffd"


# ---------------------------------------------------------------------------------------------------
# sampling
def test_filters_reduce_to_greedy(tiny_model):
    g = tiny_model.generate("filters", max_new_bytes=16, temperature=0).bytes
    assert tiny_model.generate("filters", max_new_bytes=16, top_k=1, seed=3).bytes == g
    assert tiny_model.generate("filters", max_new_bytes=16, top_p=1e-6, seed=3).bytes == g
    assert tiny_model.generate("filters", max_new_bytes=16, min_p=0.999999, seed=3).bytes == g


def test_logits_to_probs_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 256) * 3
    p = logits_to_probs(logits, SamplingParams(top_k=7))
    assert ((p > 0).sum(-1) == 7).all() and torch.allclose(p.sum(-1), torch.ones(3))
    p = logits_to_probs(logits, SamplingParams(top_p=0.5))
    full = logits.softmax(-1)
    kept_mass = (full * (p > 0)).sum(-1)
    assert (kept_mass >= 0.5).all()
    # minimal: dropping the least likely kept byte falls below top_p
    least = torch.where(p > 0, full, torch.full_like(full, 2.0)).min(-1).values
    assert (kept_mass - least < 0.5).all()
    p = logits_to_probs(logits, SamplingParams(min_p=0.1))
    assert (p[p > 0] >= 0.1 * p.max(-1, keepdim=True).values.expand_as(p)[p > 0] - 1e-7).all()
    p = logits_to_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1), atol=1e-6)


def test_sampler_frequencies_match_probs():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_from_probs(probs.expand(n, -1).contiguous(), g)
    counts = torch.bincount(draws, minlength=5).double()
    exp = probs[0].double() * n
    assert counts[4] == 0
    chi2 = (((counts[:4] - exp[:4]) ** 2) / exp[:4]).sum().item()
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_penalties_change_the_output(tiny_model):
    r = tiny_model.generate("pen", max_new_bytes=40, temperature=0, presence_penalty=1e4)
    assert len(set(r.bytes)) == len(r.bytes)  # every generated byte is new
    r = tiny_model.generate("pen", max_new_bytes=40, temperature=0, repetition_penalty=1e4)
    assert not (set(r.bytes) & set(b"pen")) or len(set(r.bytes)) == len(r.bytes)


def test_bad_arguments_are_one_clear_error(tiny_model):
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.0), dict(max_new_bytes=-1),
               dict(num_samples=0), dict(stop=[""]), dict(repetition_penalty=0)):
        with pytest.raises(MambaByteError):
            tiny_model.generate("x", **{"max_new_bytes": 2, **kw})


def test_zero_new_bytes_returns_prefill_state(tiny_model):
    r = tiny_model.generate("abc", max_new_bytes=0)
    assert r.bytes == b"" and r.state.bytes_consumed == 3
    ref = tiny_model(torch.tensor([list(b"abc")]), return_state=True)
    assert r.state.allclose(ref.state, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager():
    torch.manual_seed(1234)
    m = MambaByteLM.from_preset("tiny", device="cuda").eval()
    a = m.generate("graph", max_new_bytes=64, temperature=0, use_cuda_graph=True)
    b = m.generate("graph", max_new_bytes=64, temperature=0, use_cuda_graph=False)
    assert a.stats.cuda_graph and not b.stats.cuda_graph
    assert a.bytes == b.bytes and a.state.allclose(b.state, rtol=1e-4, atol=1e-5)
    c = m.generate("graph", max_new_bytes=64, temperature=0, use_cuda_graph=True, stop=a.bytes[40:43].decode("latin-1"))
    assert a.bytes.startswith(c.bytes)


@pytest.mark.gpu
def test_cuda_graph_prefill_matches_eager():
    """Graph-replayed prefill == eager prefill: batches of mixed lengths, from a state, replayed with new
    bytes of a captured length, and the per-model cache stays bounded."""
    from mambabyte.generation import cuda_graph
    from mambabyte.generation.decode import prefill

    torch.manual_seed(99)
    m = MambaByteLM.from_preset("tiny", device="cuda").eval()
    start = m.generate("the state we resume from", max_new_bytes=8, temperature=0).state
    cases = [
        ([b"abcdefgh", b"xyz", b"12345678"], None),
        ([b"hgfedcba", b"zyx", b"87654321"], None),  # same lengths: replays the captured graphs
        ([b"abcdefgh"], start),
        ([b"a" * 300, b"b" * 300], start.repeat(2)),
    ]
    for prompts, st in cases:
        lg_e, st_e = prefill(m, prompts, st)
        lg_g, st_g = prefill(m, prompts, st, cuda_graph=True)
        torch.testing.assert_close(lg_g, lg_e, rtol=1e-4, atol=1e-4)
        assert st_g.allclose(st_e, rtol=1e-4, atol=1e-5) and st_g.bytes_consumed == st_e.bytes_consumed
    assert 0 < len(m.__dict__["_mambabyte_prefill_graphs"]) <= cuda_graph.PREFILL_GRAPHS_MAX
    a = m.generate("graph prefill", max_new_bytes=32, temperature=0, prefill_cuda_graph=True)
    b = m.generate("graph prefill", max_new_bytes=32, temperature=0)
    assert a.bytes == b.bytes
    cuda_graph.clear_graph_cache(m)
    assert "_mambabyte_prefill_graphs" not in m.__dict__

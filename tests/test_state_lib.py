"""State files, build_state, combine_states and the state library (CPU, tiny model)."""

import json
import struct

import pytest
import torch

import mambabyte
from mambabyte import MambaByteLM
from mambabyte.errors import MambaByteError, StateError
from mambabyte.statelib import StateLibrary, read_state_file, resolve_state_path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBABYTE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _state(model, text: bytes):
    out = model(torch.tensor([list(text)]), return_state=True)
    return out.state, out.logits[:, -1].detach()


def test_save_load_roundtrip_and_metadata(tiny_model, tmp_path):
    st, lg = _state(tiny_model, b"a shared context")
    p = mambabyte.save_state(tmp_path / "s.safetensors", st,
                             {"text": b"a shared context", "description": "demo", "tags": ["x", "y"], "source": "f.txt"},
                             model=tiny_model, logits=lg)
    st2, meta, lg2 = mambabyte.load_state(p, tiny_model, return_meta=True)
    assert st2.equal(st) and st2.bytes_consumed == 16 and torch.equal(lg2, lg)
    assert meta["fingerprint"] == tiny_model.fingerprint() and meta["format_version"] == 1
    assert meta["dtype"] == "float32" and meta["bytes_consumed"] == 16 and meta["tags"] == ["x", "y"]
    assert meta["text"] == "a shared context" and meta["source"] == ["f.txt"] and meta["created"]
    import hashlib

    assert meta["text_sha256"] == hashlib.sha256(b"a shared context").hexdigest()
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_continuing_from_saved_state_is_bit_exact(tiny_model, tmp_path):
    first = tiny_model.generate("Saved context:", max_new_bytes=10, temperature=0)
    mambabyte.save_state(tmp_path / "s.safetensors", first.state, model=tiny_model, logits=first.logits)
    st, meta, lg = mambabyte.load_state(tmp_path / "s.safetensors", tiny_model, return_meta=True)
    a = tiny_model.generate(" more", state=first.state, max_new_bytes=20, temperature=0)
    b = tiny_model.generate(" more", state=st, max_new_bytes=20, temperature=0)
    assert a.bytes == b.bytes and a.state.equal(b.state) and torch.equal(a.logits, b.logits)
    c = tiny_model.generate("", state=first.state, logits=first.logits, max_new_bytes=20, temperature=0.9, seed=3)
    d = tiny_model.generate("", state=st, logits=lg, max_new_bytes=20, temperature=0.9, seed=3)
    assert c.bytes == d.bytes and c.state.equal(d.state)


@pytest.mark.parametrize("chunk", [3, 64, 10_000])
def test_build_state_in_chunks_equals_one_pass(tiny_model, tmp_path, chunk):
    a, b = b"First file. " * 9, "second \u00e9 file\n".encode() * 5
    (tmp_path / "a.txt").write_bytes(a)
    (tmp_path / "b.txt").write_bytes(b)
    st, info = mambabyte.build_state(tiny_model, [tmp_path / "a.txt", str(tmp_path / "b.txt")], chunk_bytes=chunk,
                                     separator=b"\n\n", return_info=True, progress=False)
    ref, ref_lg = _state(tiny_model, a + b"\n\n" + b)
    assert st.bytes_consumed == len(a) + 2 + len(b) == info["bytes"]
    assert st.allclose(ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(info["logits"], ref_lg, atol=1e-5)
    import hashlib

    assert info["text_sha256"] == hashlib.sha256(a + b"\n\n" + b).hexdigest()


def test_build_state_bad_sources(tiny_model, tmp_path):
    with pytest.raises(MambaByteError):
        mambabyte.build_state(tiny_model, tmp_path / "missing.txt", progress=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(MambaByteError):
        mambabyte.build_state(tiny_model, tmp_path / "empty.txt", progress=False)
    with pytest.raises(MambaByteError):
        mambabyte.build_state(tiny_model, b"abc", chunk_bytes=0)


def test_fingerprint_mismatch_is_an_error_unless_allowed(tiny_model, tmp_path):
    st, _ = _state(tiny_model, b"abc")
    mambabyte.save_state(tmp_path / "s.safetensors", st, model=tiny_model)
    torch.manual_seed(99)
    other = MambaByteLM.from_preset("tiny").eval()  # same shapes, other weights
    with pytest.raises(StateError, match="built by model"):
        mambabyte.load_state(tmp_path / "s.safetensors", other)
    assert mambabyte.load_state(tmp_path / "s.safetensors", other, allow_fingerprint_mismatch=True).equal(st)
    # a different shape is refused even with the override
    with pytest.raises(StateError, match="does not fit"):
        mambabyte.load_state(tmp_path / "s.safetensors", MambaByteLM.from_preset("mini"), allow_fingerprint_mismatch=True)


def test_broken_files_give_one_clear_error(tiny_model, tmp_path):
    st, _ = _state(tiny_model, b"abc")
    good = mambabyte.save_state(tmp_path / "good.safetensors", st, model=tiny_model)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) - 100],
        "truncated_header": data[:20],
        "tiny": b"abc",
        "garbage": b"\x00" * 64,
        "not_json": struct.pack("<Q", 5) + b"{{{{{",
    }
    # a safetensors file without our metadata
    from safetensors.torch import save_file

    save_file({"conv": st.conv.contiguous(), "ssm": st.ssm.contiguous()}, str(tmp_path / "nometa.safetensors"))
    # metadata that disagrees with the tensors
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["mambabyte_state"])
    meta["shape"]["d_state"] = 99
    header["__metadata__"]["mambabyte_state"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    cases["wrong_meta_shape"] = struct.pack("<Q", len(hb)) + hb + data[8 + n :]
    meta["format_version"] = 99
    header["__metadata__"]["mambabyte_state"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    cases["future_version"] = struct.pack("<Q", len(hb)) + hb + data[8 + n :]
    paths = [tmp_path / "nometa.safetensors"]
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        paths.append(p)
    for p in paths:
        with pytest.raises(StateError) as ei:
            mambabyte.load_state(p, tiny_model)
        assert "\n" not in str(ei.value) and str(ei.value)
    with pytest.raises(StateError):
        mambabyte.load_state(tmp_path / "does_not_exist.safetensors")


def test_save_state_rejects_bad_input(tiny_model, tmp_path):
    st, _ = _state(tiny_model, b"abc")
    with pytest.raises(StateError):
        mambabyte.save_state(tmp_path / "x.safetensors", "not a state")
    with pytest.raises(StateError):
        mambabyte.save_state(tmp_path / "x.safetensors", st, logits=torch.zeros(3, 256))
    assert not (tmp_path / "x.safetensors").exists()


def test_combine_states(tiny_model):
    s1, _ = _state(tiny_model, b"one")
    s2, _ = _state(tiny_model, b"second text")
    c = mambabyte.combine_states([s1, s2], [3, 1])
    assert torch.allclose(c.ssm, 0.75 * s1.ssm + 0.25 * s2.ssm) and torch.allclose(c.conv, 0.75 * s1.conv + 0.25 * s2.conv)
    assert c.bytes_consumed == 11
    assert mambabyte.combine_states([s1, s1]).allclose(s1)
    raw = mambabyte.combine_states([s1, s2], [1, 1], normalize=False)
    assert torch.allclose(raw.ssm, s1.ssm + s2.ssm)
    c.ssm.add_(1)  # a new object: the inputs are untouched
    assert not torch.equal(c.ssm, s1.ssm) and s1.allclose(_state(tiny_model, b"one")[0])
    with pytest.raises(StateError):
        mambabyte.combine_states([s1, MambaByteLM.from_preset("mini").allocate_state(1)])
    with pytest.raises(StateError):
        mambabyte.combine_states([s1, s2.repeat(2)])
    with pytest.raises(StateError):
        mambabyte.combine_states([s1, s2], [1.0])
    with pytest.raises(StateError):
        mambabyte.combine_states([s1, s2], [1.0, -1.0])
    with pytest.raises(StateError):
        mambabyte.combine_states([s1, s2], [1.0, float("nan")])
    with pytest.raises(StateError):
        mambabyte.combine_states([])
    # a combined state drives generation like any other
    r = tiny_model.generate("x", state=mambabyte.combine_states([s1, s2]), max_new_bytes=5, temperature=0)
    assert len(r.bytes) == 5


def test_library(tiny_model, home, tmp_path):
    lib = StateLibrary()
    assert lib.root == home / "states" and lib.names() == []
    st, lg = _state(tiny_model, b"library text")
    lib.save("my-ctx", st, {"description": "d"}, model=tiny_model, logits=lg)
    with pytest.raises(MambaByteError):
        lib.save("my-ctx", st, model=tiny_model)
    lib.save("my-ctx", st, {"description": "d2"}, model=tiny_model, overwrite=True)
    assert lib.names() == ["my-ctx"] and lib.info("my-ctx")["description"] == "d2"
    assert resolve_state_path("my-ctx") == lib.path("my-ctx")
    assert mambabyte.load_state("my-ctx", tiny_model).equal(st)
    dest = lib.export("my-ctx", tmp_path)
    assert read_state_file(dest)[0].equal(st)
    for bad in ("../evil", "a/b", "", ".hidden", "x.safetensors"):
        with pytest.raises(MambaByteError):
            lib.path(bad)
    lib.remove("my-ctx")
    assert lib.names() == []
    with pytest.raises(StateError):
        lib.remove("my-ctx")
    with pytest.raises(StateError):
        mambabyte.load_state("my-ctx")


def _greedy(model, prompt, n, **kw):
    return mambabyte.generate(model, prompt, max_new_bytes=n, temperature=0, use_cuda_graph=False, **kw)


def test_state_carries_its_logits_so_an_empty_prompt_continues_exactly(tiny_model, tmp_path):
    whole = _greedy(tiny_model, "Hello there", 24)
    first = _greedy(tiny_model, "Hello there", 12)
    assert first.state.logits is not None and torch.equal(first.state.logits, first.logits)
    rest = _greedy(tiny_model, "", 12, state=first.state)  # no logits= needed, no bos consumed
    assert first.bytes + rest.bytes == whole.bytes
    # through a file: save_state stores the state's logits, load_state gives them back
    p = mambabyte.save_state(tmp_path / "s.safetensors", first.state, model=tiny_model)
    assert _greedy(tiny_model, "", 12, state=mambabyte.load_state(p, tiny_model)).bytes == rest.bytes
    # from a forward: the state of model(..., return_state=True) holds the last position's logits
    st = tiny_model(torch.tensor([list(b"Hello there")]), return_state=True).state
    assert _greedy(tiny_model, "", 24, state=st).bytes == whole.bytes
    # copies carry them; a reset drops them; a combined state has none (an empty prompt eats bos)
    assert torch.equal(st.clone().logits, st.logits) and torch.equal(st.repeat(2).logits[1], st.logits[0])
    assert st.clone().reset().logits is None
    mixed = mambabyte.combine_states([st, first.state])
    assert mixed.logits is None
    assert _greedy(tiny_model, "", 5, state=mixed).bytes == _greedy(tiny_model, "\n", 5, state=mixed).bytes


def test_a_state_saved_from_several_samples_continues_each_sample(tiny_model):
    r = mambabyte.generate(tiny_model, "ab", max_new_bytes=6, num_samples=3, seed=0, use_cuda_graph=False)
    assert r.state.batch_size == 3
    both = _greedy(tiny_model, "", 8, state=r.state, num_samples=3)
    for i in range(3):
        one = _greedy(tiny_model, "", 8, state=r.state.select(i))
        assert both.sequences[i] == one.bytes
    with pytest.raises(StateError, match="needs 1 or 2 rows"):
        _greedy(tiny_model, ["x", "y"], 2, state=r.state)


def test_fingerprint_ignores_the_load_dtype_and_cast_keeps_fp32_params_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    m32 = MambaByteLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    m16 = MambaByteLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert m32.fingerprint() == m16.fingerprint()
    assert m16.fingerprint() != tiny_model.fingerprint()  # bf16-rounded weights are other weights
    for a, b in zip(m32.backbone.layers, m16.backbone.layers):
        assert b.mixer.A_log.dtype == torch.float32 and torch.equal(a.mixer.A_log, b.mixer.A_log)
    c = MambaByteLM(tiny_model.config)
    c.load_state_dict(tiny_model.state_dict())
    c.cast_(torch.bfloat16)
    assert torch.equal(c.backbone.layers[0].mixer.A_log, tiny_model.backbone.layers[0].mixer.A_log)


def test_stored_text_has_a_size_limit(tiny_model, tmp_path, monkeypatch):
    from mambabyte import statelib

    monkeypatch.setattr(statelib, "MAX_STORED_TEXT", 10)
    st, _ = _state(tiny_model, b"0123456789ab")
    with pytest.raises(StateError, match="at most 10 bytes of text"):
        mambabyte.save_state(tmp_path / "t.safetensors", st, {"text": b"0123456789ab"}, model=tiny_model)
    assert not (tmp_path / "t.safetensors").exists()
    p = mambabyte.save_state(tmp_path / "t.safetensors", st, {"text": b"0123456789ab", "store_text": False},
                             model=tiny_model)
    assert read_state_file(p)[1]["text"] is None

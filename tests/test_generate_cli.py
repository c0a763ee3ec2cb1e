"""`mambabyte generate`, `mambabyte state` and scripts/generate.py end to end on a tiny checkpoint."""

import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

import mambabyte
from mambabyte import MambaByteLM
from mambabyte.cli import generate as gen_cli
from mambabyte.cli import state as state_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBABYTE_HOME", str(tmp_path / "home"))
    d = tmp_path / "tiny_ckpt"
    tiny_model.save_pretrained(d)
    return str(d)


def run_cli(main, argv, capsysbinary):
    """(exit status, stdout bytes, stderr text) of an in-process CLI call."""
    capsysbinary.readouterr()  # drop anything printed before
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode("utf-8", errors="replace")


def test_generate_cli_matches_api(ckpt, tiny_model, capsysbinary):
    rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "Hello", "--max_new_bytes", "24",
                                          "--temperature", "0", "--raw", "--stats"], capsysbinary)
    assert rc == 0, err
    api = tiny_model.generate("Hello", max_new_bytes=24, temperature=0)
    assert out == api.bytes + b"\n"
    assert "decode 24 B" in err
    rc, out2, _ = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "Hello", "--max_new_bytes", "24",
                                         "--temperature", "0", "--stream"], capsysbinary)
    assert rc == 0 and out2.decode("utf-8") == api.text + "\n"


def test_generate_cli_samples_seed_and_stop(ckpt, tiny_model, capsysbinary):
    args = ["--model", ckpt, "--prompt", "abc", "--max_new_bytes", "16", "--seed", "3", "--num_samples", "2"]
    rc, a, _ = run_cli(gen_cli.main, args, capsysbinary)
    rc2, b, _ = run_cli(gen_cli.main, args, capsysbinary)
    assert rc == rc2 == 0 and a == b and a.count(b"sample ") == 2
    full = tiny_model.generate("abc", max_new_bytes=30, temperature=0).bytes
    stop = full[12:14]
    rc, out, _ = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "abc", "--max_new_bytes", "30", "--temperature", "0",
                                        "--stop", stop.decode("latin-1"), "--raw"], capsysbinary)
    # a non-UTF-8 stop byte in argv arrives as its UTF-8 encoding; compare with what the CLI was given
    want = stop.decode("latin-1").encode("utf-8")
    k = full.find(want)
    assert rc == 0 and out == (full[:k] if k >= 0 else full) + b"\n"


def test_save_state_then_continue_is_exact(ckpt, tiny_model, capsysbinary, tmp_path):
    rc, first, err = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "Chapter 1.", "--max_new_bytes", "10",
                                            "--temperature", "0", "--raw", "--save_state", "ch1"], capsysbinary)
    assert rc == 0 and "saved state" in err
    rc, second, _ = run_cli(gen_cli.main, ["--model", ckpt, "--state", "ch1", "--max_new_bytes", "15",
                                           "--temperature", "0", "--raw", "--save_state", str(tmp_path / "x.safetensors")],
                            capsysbinary)
    assert rc == 0
    whole = tiny_model.generate("Chapter 1.", max_new_bytes=25, temperature=0).bytes
    assert first[:-1] + second[:-1] == whole
    meta = mambabyte.load_state(tmp_path / "x.safetensors", tiny_model, return_meta=True)[1]
    assert meta["bytes_consumed"] == 35 and meta["text"] == (b"Chapter 1." + whole).decode("utf-8", "surrogateescape")


def test_generate_cli_errors_are_one_line(ckpt, capsysbinary, tmp_path):
    torch.manual_seed(5)
    other = tmp_path / "other"
    MambaByteLM.from_preset("tiny").save_pretrained(other)
    run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "x", "--max_new_bytes", "2", "--save_state", "s"], capsysbinary)
    cases = [
        ["--model", ckpt, "--prompt", "x", "--prompt_file", "f"],
        ["--model", ckpt],  # empty prompt without a state
        ["--model", ckpt, "--prompt", "x", "--temperature", "-1"],
        ["--model", ckpt, "--prompt", "x", "--top_p", "0"],
        ["--model", ckpt, "--state", "no_such_state"],
        ["--model", str(other), "--state", "s"],  # fingerprint mismatch
        ["--model", ckpt, "--prompt", "x", "--speculative"],
        ["--model", ckpt, "--prompt", "x", "--save_state", "bad name!"],
        ["--model", ckpt, "--prompt", "x", "--max_new_bytes", "lots"],
    ]
    for argv in cases:
        rc, out, err = run_cli(gen_cli.main, argv, capsysbinary)
        assert rc == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    rc, out, err = run_cli(gen_cli.main, ["--model", str(other), "--state", "s", "--force", "--max_new_bytes", "3"],
                           capsysbinary)
    assert rc == 0


def test_interactive_keeps_the_state(ckpt, tiny_model, capsysbinary, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"first turn\n/save turn1\nsecond\n/quit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--interactive", "--max_new_bytes", "8", "--temperature", "0"],
                           capsysbinary)
    assert rc == 0, err
    r1 = tiny_model.generate("first turn\n", max_new_bytes=8, temperature=0)
    r2 = tiny_model.generate("second\n", state=r1.state, max_new_bytes=8, temperature=0)
    assert out.decode("utf-8") == r1.text + "\n" + r2.text + "\n"
    saved = mambabyte.load_state("turn1", tiny_model)
    assert saved.equal(r1.state)


def test_state_cli_end_to_end(ckpt, tiny_model, capsysbinary, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"Call me Ishmael. " * 20)
    (tmp_path / "b.txt").write_bytes("Some years ago \u2014 never mind".encode())
    rc, out, err = run_cli(state_cli.main, ["build", "moby", "--model", ckpt, "--source", str(tmp_path / "a.txt"),
                                            str(tmp_path / "b.txt"), "--chunk_bytes", "50", "--description", "whale",
                                            "--tags", "x,y", "--store_text", "--no_progress"], capsysbinary)
    assert rc == 0, err
    ref = mambabyte.build_state(tiny_model, [tmp_path / "a.txt", tmp_path / "b.txt"], progress=False)
    st = mambabyte.load_state("moby", tiny_model)
    assert st.allclose(ref, rtol=1e-5, atol=1e-6) and st.bytes_consumed == ref.bytes_consumed
    rc, out, _ = run_cli(state_cli.main, ["list"], capsysbinary)
    assert rc == 0 and b"moby" in out and b"whale" in out
    rc, out, _ = run_cli(state_cli.main, ["show", "moby"], capsysbinary)
    assert rc == 0 and tiny_model.fingerprint().encode() in out and b"x, y" in out
    rc, out, _ = run_cli(state_cli.main, ["show", "moby", "--json"], capsysbinary)
    assert rc == 0 and b'"bytes_consumed"' in out
    rc, _, err = run_cli(state_cli.main, ["build", "moby", "--model", ckpt, "--source", str(tmp_path / "a.txt")],
                         capsysbinary)
    assert rc == 2 and "exists" in err
    # generate continues from the library state exactly like the API does
    rc, out, _ = run_cli(gen_cli.main, ["--model", ckpt, "--state", "moby", "--prompt", " and", "--max_new_bytes", "8",
                                        "--temperature", "0", "--raw"], capsysbinary)
    assert out[:-1] == tiny_model.generate(" and", state=ref, max_new_bytes=8, temperature=0).bytes
    (tmp_path / "c.txt").write_bytes(b"Another text entirely.")
    rc, _, err = run_cli(state_cli.main, ["build", "other", "--model", ckpt, "--source", str(tmp_path / "c.txt"),
                                          "--no_progress"], capsysbinary)
    assert rc == 0, err
    rc, out, err = run_cli(state_cli.main, ["combine", "mix", "moby", "other", "--weights", "3", "1"], capsysbinary)
    assert rc == 0, err
    mix = mambabyte.load_state("mix", tiny_model)
    other = mambabyte.load_state("other", tiny_model)
    assert mix.allclose(mambabyte.combine_states([st, other], [0.75, 0.25]))
    for argv in (["combine", "mix", "moby", "other"], ["combine", "m2", "moby"], ["combine", "m2", "moby", "other", "--weights", "1"],
                 ["combine", "m2", "moby", "nope"]):
        rc, _, err = run_cli(state_cli.main, argv, capsysbinary)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)
    rc, out, _ = run_cli(state_cli.main, ["export", "moby", str(tmp_path)], capsysbinary)
    assert rc == 0 and (tmp_path / "moby.safetensors").is_file()
    rc, out, _ = run_cli(state_cli.main, ["rm", "moby"], capsysbinary)
    assert rc == 0
    for argv in (["rm", "moby"], ["show", "moby"], ["export", "moby", str(tmp_path)], ["rm", "../x"], [],
                 ["build", "z", "--model", ckpt, "--source", str(tmp_path / "missing.txt")], ["frobnicate"]):
        rc, _, err = run_cli(state_cli.main, argv, capsysbinary)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)


def test_dispatcher_and_paper_script(ckpt, tiny_model, capsysbinary):
    from mambabyte.cli.main import main as mb_main

    rc, out, _ = run_cli(mb_main, ["generate", "--model", ckpt, "--prompt", "hi", "--max_new_bytes", "5",
                                   "--temperature", "0", "--raw"], capsysbinary)
    assert rc == 0 and out[:-1] == tiny_model.generate("hi", max_new_bytes=5, temperature=0).bytes
    spec = importlib.util.spec_from_file_location("paper_generate", REPO / "scripts" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc, out, err = run_cli(mod.main, ["--pretrained_model_filepath", ckpt, "--prompt", "hi", "--max_new_tokens", "6",
                                      "--num_samples", "2", "--temperature", "0", "--top_k", "256", "--top_p", "0",
                                      "--seed", "1"], capsysbinary)
    assert rc == 0, err
    text = out.decode("utf-8")
    g = tiny_model.generate("hi", max_new_bytes=6, temperature=0).text
    assert text.startswith("PROMPT\n======\nhi\n\nGENERATIONS\n===========\n")
    assert text.count(g + "\n" + "-" * 80) == 2
    rc, out, err = run_cli(mod.main, ["--config_path", str(REPO / "scripts/configs/mambabyte_lm.yml"), "--model_id", "tiny",
                                      "--prompt", "x", "--max_new_tokens", "3"], capsysbinary)
    assert rc == 0 and "RANDOMLY INITIALISED" in err
    rc, _, err = run_cli(mod.main, ["--config_path", str(REPO / "scripts/configs/mambabyte_lm.yml"), "--model_id", "nope"],
                         capsysbinary)
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_cli_bytes_that_are_not_utf8_and_bad_numbers(ckpt, tiny_model, capsysbinary, tmp_path):
    """A shell passes non-UTF-8 argv bytes as surrogate escapes: they are bytes, not a traceback."""
    rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "x", "--max_new_bytes", "20", "--temperature",
                                          "0", "--stop", "\udcff"], capsysbinary)
    assert rc == 0, err
    src = tmp_path / "a.txt"
    src.write_bytes(b"one\ntwo\n")
    rc, out, err = run_cli(state_cli.main, ["build", "sep", "--model", ckpt, "--source", str(src), str(src),
                                            "--separator", "\udcff", "--no_progress"], capsysbinary)
    assert rc == 0, err
    st, meta, _ = mambabyte.load_state("sep", tiny_model, return_meta=True)
    assert st.bytes_consumed == 2 * 8 + 1  # the separator is the one byte 0xff
    for argv in (["--temperature", "nan"], ["--presence_penalty", "inf"], ["--frequency_penalty", "-inf"],
                 ["--save_state", str(tmp_path / "no_such_dir" / "s.safetensors")]):
        rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--prompt", "x", "--max_new_bytes", "3", *argv],
                               capsysbinary)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert out == b""  # refused before anything was generated
    assert not (tmp_path / "no_such_dir").exists()
    rc, out, err = run_cli(state_cli.main, ["export", "sep", str(tmp_path / "nope" / "x.safetensors")], capsysbinary)
    assert rc == 2 and "does not exist" in err and not (tmp_path / "nope").exists()


def test_a_subword_model_is_refused_as_the_main_model(tmp_path, capsysbinary):
    from mambabyte import MambaByteConfig

    sub = tmp_path / "sub"
    MambaByteLM(MambaByteConfig(vocab_size=512, d_model=32, n_layer=1)).save_pretrained(sub)
    rc, out, err = run_cli(gen_cli.main, ["--model", str(sub), "--prompt", "hi", "--max_new_bytes", "2"], capsysbinary)
    assert rc == 2 and "512-token vocabulary" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(mambabyte.MambaByteError, match="not 256 bytes"):
        mambabyte.generate(MambaByteLM.from_pretrained(sub), "hi", max_new_bytes=2)


def test_cli_broken_state_files_are_one_line_each(ckpt, tiny_model, capsysbinary, tmp_path):
    from mambabyte import MambaByteConfig

    good = tmp_path / "good.safetensors"
    st = tiny_model(torch.tensor([list(b"some text")]), return_state=True).state
    mambabyte.save_state(good, st, model=tiny_model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a state file at all")
    other = MambaByteLM(MambaByteConfig(d_model=32, n_layer=1))  # another shape
    wrong = tmp_path / "wrong_shape.safetensors"
    mambabyte.save_state(wrong, other.allocate_state(1), model=other)
    for path, needle in ((truncated, ""), (junk, ""), (wrong, "does not fit"), (tmp_path / "gone.safetensors", "")):
        rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--state", str(path), "--prompt", "x",
                                              "--max_new_bytes", "2"], capsysbinary)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (path.name, err)
        assert needle in err, (path.name, err)
        assert out == b""


@pytest.mark.parametrize("sep", ["", "\n--\n"])
def test_state_build_from_an_existing_state_equals_one_build(ckpt, tiny_model, capsysbinary, tmp_path, sep):
    import hashlib

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"The first part of a long text. " * 5)
    b.write_bytes("and the second, with é and → in it.".encode() * 3)
    common = ["--model", ckpt, "--no_progress", "--chunk_bytes", "40", "--separator", sep]
    for argv in (["build", "whole", "--source", str(a), str(b), "--store_text"],
                 ["build", "first", "--source", str(a), "--store_text"],
                 ["build", "more", "--source", str(b), "--from", "first", "--store_text"],
                 ["build", "first_bare", "--source", str(a)],
                 ["build", "more_bare", "--source", str(b), "--from", "first_bare"]):
        rc, out, err = run_cli(state_cli.main, argv + common, capsysbinary)
        assert rc == 0, (argv, err)
    whole, wm, _ = mambabyte.load_state("whole", tiny_model, return_meta=True)
    more, mm, _ = mambabyte.load_state("more", tiny_model, return_meta=True)
    bare, bm, _ = mambabyte.load_state("more_bare", tiny_model, return_meta=True)
    assert more.allclose(whole, rtol=1e-5, atol=1e-6) and bare.allclose(whole, rtol=1e-5, atol=1e-6)
    assert more.bytes_consumed == whole.bytes_consumed == len(a.read_bytes() + sep.encode() + b.read_bytes())
    assert mm["text_sha256"] == wm["text_sha256"]  # stored text: the whole text's hash
    assert mm["source"] == wm["source"]
    assert bm["text_sha256"] is None and bm["extra"]["extension_text_sha256"] == hashlib.sha256(
        sep.encode() + b.read_bytes()).hexdigest() and bm["extra"]["parent"].endswith("first_bare.safetensors")
    # it continues exactly: greedy from the extended state == greedy from the one-pass state
    g1 = mambabyte.generate(tiny_model, "", max_new_bytes=12, temperature=0, state=more)
    g2 = mambabyte.generate(tiny_model, "", max_new_bytes=12, temperature=0, state=whole)
    assert g1.bytes == g2.bytes


def test_interactive_speculative_gives_the_drafter_the_earlier_turns(ckpt, tiny_model, capsysbinary, monkeypatch):
    """--interactive --speculative with the target as its own drafter: the drafter reads the transcript
    before each new line, every drafted byte is accepted, and the text is plain greedy's."""
    from mambabyte.generation import speculative

    seen, real = [], speculative.speculative_generate

    def spy(*a, **kw):
        seen.append(kw.get("draft_context"))
        return real(*a, **kw)

    monkeypatch.setattr(speculative, "speculative_generate", spy)
    stdin = io.TextIOWrapper(io.BytesIO(b"first turn\nsecond\n/quit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = run_cli(gen_cli.main, ["--model", ckpt, "--interactive", "--max_new_bytes", "24", "--temperature",
                                          "0", "--speculative", "--drafter", ckpt, "--draft_len", "4", "--stats"],
                           capsysbinary)
    assert rc == 0, err
    r1 = tiny_model.generate("first turn\n", max_new_bytes=24, temperature=0)
    r2 = tiny_model.generate("second\n", state=r1.state, max_new_bytes=24, temperature=0)
    assert out.decode("utf-8") == r1.text + "\n" + r2.text + "\n"
    rates = [line for line in err.splitlines() if "speculative: draft_len" in line]
    assert len(rates) == 2 and all("acceptance 1.000" in line for line in rates), err
    assert seen == [b"", b"first turn\n" + r1.bytes]  # the second turn's drafter read the first

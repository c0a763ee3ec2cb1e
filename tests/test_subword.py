"""The byte-level BPE tokenizer and the subword drafter (train, save, load, score)."""

import pytest
import torch

pytest.importorskip("tokenizers", reason="the subword drafter needs the tokenizers package (a test extra)")

from mambabyte.errors import CheckpointError  # noqa: E402
from mambabyte.subword import ByteBPE, SubwordDrafter, train_subword_drafter  # noqa: E402

TEXT = (b"To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        b"The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 20


def test_every_byte_string_round_trips():
    tok = ByteBPE.train([TEXT], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    samples = [bytes(range(256)), b"\xef\xbb\xbfBOM\r\nCRLF", b"\xff\xfe\xfd invalid utf-8 \xc3", b" to be", b""]
    for s in samples:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
    # merges learned from the text make it shorter than one token a byte
    assert len(tok.encode(TEXT[:200])) < 120


def test_train_save_load_and_score(tmp_path):
    logs = []
    summary = train_subword_drafter([_write(tmp_path, TEXT)], tmp_path / "d", val=[_write(tmp_path, TEXT[:400], "v.txt")],
                                    vocab_size=300, d_model=32, n_layer=1, seq_len=32, batch_size=4, lr=3e-3,
                                    max_steps=40, warmup_steps=5, device="cpu", log=logs.append)
    assert summary["steps"] == 40 and summary["val_bpb"] < 8.0
    d = SubwordDrafter.from_pretrained(tmp_path / "d")
    assert d.tokenizer.vocab_size == summary["vocab_size"]
    assert d.model.config.vocab_size >= d.tokenizer.vocab_size
    assert d.model.lm_head.weight.dtype == torch.float32  # loaded in the default dtype
    bpb = d.bits_per_byte(TEXT[:400])
    assert abs(bpb - summary["val_bpb"]) < 0.05


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from mambabyte import MambaByteLM

    MambaByteLM.from_preset("tiny").save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a subword drafter"):
        SubwordDrafter.from_pretrained(tmp_path / "m")


def _write(tmp_path, data, name="t.txt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_training_script_reads_the_shipped_recipe_and_flags_override_it(tmp_path, capsys):
    """scripts/train_subword_drafter.py --config <the shipped recipe>, shrunk by command-line flags."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("tsd", repo / "scripts" / "train_subword_drafter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recipe = repo / "scripts" / "configs" / "mambabyte_subword_draft.yml"
    rc = mod.main(["--config", str(recipe), "--train", str(_write(tmp_path, TEXT)), "--out", str(tmp_path / "d"),
                   "--vocab_size", "300", "--d_model", "32", "--n_layer", "1", "--seq_len", "32", "--batch_size", "4",
                   "--max_steps", "3", "--device", "cpu"])
    assert rc == 0
    d = SubwordDrafter.from_pretrained(tmp_path / "d")
    assert d.model.config.d_model == 32 and d.tokenizer.vocab_size <= 300
    bad = tmp_path / "bad.yml"
    bad.write_text("vocab_sise: 3\n")
    with pytest.raises(SystemExit) as e:
        mod.main(["--config", str(bad), "--train", "x", "--out", "y"])
    assert e.value.code == 2 and "unknown key(s) vocab_sise" in capsys.readouterr().err

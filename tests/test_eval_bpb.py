"""Evaluation: state-carried bpb equals one long forward; per-window bpb resets the state; word-level
perplexity; the eval and plot-train CLIs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mambabyte import MambaByteLM
from mambabyte.cli.evaluate import main as eval_main
from mambabyte.cli.plot_train import main as plot_main
from mambabyte.data import ByteData, load_byte_data, prepare_data
from mambabyte.training import evaluate_bpb, train, word_perplexity

DATA = Path(__file__).parent / "data" / "corpus"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return MambaByteLM.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def stream():
    raw = (DATA / "val" / "shakespeare_tempest_excerpt.txt").read_bytes()[:1201]
    return ByteData(np.frombuffer(raw, dtype=np.uint8).copy(), name="tempest")


def _nll_bits(model, ids):
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    with torch.no_grad():
        lg = model(x).logits
    return F.cross_entropy(lg.reshape(-1, 256), y.reshape(-1), reduction="sum").item() / math.log(2)


def test_carried_equals_one_long_forward_and_window_resets(model, stream):
    ids = list(bytes(stream.array))
    res = evaluate_bpb(model, stream, seq_len=100, streams=1, mode="both")
    full = _nll_bits(model, ids) / (len(ids) - 1)
    assert res["val_bytes"] == len(ids) - 1
    assert res["val_bpb_carried"] == pytest.approx(full, rel=1e-5)
    per_window = sum(_nll_bits(model, ids[k : k + 101]) for k in range(0, len(ids) - 1, 100)) / (len(ids) - 1)
    assert res["val_bpb_window"] == pytest.approx(per_window, rel=1e-5)
    assert res["val_bpb_window"] != pytest.approx(res["val_bpb_carried"], rel=1e-6)
    # one window covering everything: both modes agree
    one = evaluate_bpb(model, stream, seq_len=5000, streams=1, mode="both")
    assert one["val_bpb_window"] == pytest.approx(one["val_bpb_carried"], rel=1e-6)


def test_streams_split_the_data_into_contiguous_chunks(model, stream):
    ids = list(bytes(stream.array))
    res = evaluate_bpb(model, stream, seq_len=64, streams=3, mode="carried")
    M = len(ids) // 3
    bits = sum(_nll_bits(model, ids[i * M : (i + 1) * M]) for i in range(3))
    assert res["val_streams"] == 3 and res["val_bytes"] == 3 * (M - 1)
    assert res["val_bpb"] == pytest.approx(bits / (3 * (M - 1)), rel=1e-5)


def test_word_perplexity(model, tmp_path, stream):
    assert word_perplexity(1.0, 100, 20) == pytest.approx(2.0**5)
    (tmp_path / "v.txt").write_bytes(bytes(stream.array))
    prepare_data([str(tmp_path / "v.txt")], tmp_path / "p", val_sources=[str(tmp_path / "v.txt")])
    d = load_byte_data([str(tmp_path / "p")], split="val")
    res = evaluate_bpb(model, d, seq_len=128, streams=2, mode="carried")
    words = len(bytes(stream.array).split())
    assert res["val_words"] == words
    assert res["val_word_ppl"] == pytest.approx(2 ** (res["val_bpb"] * len(d) / words))
    capped = evaluate_bpb(model, d, seq_len=128, streams=2, mode="carried", max_bytes=500)
    assert "val_word_ppl" not in capped and capped["val_bytes"] <= 500


def test_eval_and_plot_cli(tmp_path, capsys):
    res = train(dict(model={"preset": "tiny"}, data=[str(DATA / "train")], val_data=[str(DATA / "val")], seq_len=64,
                     batch_size=4, max_steps=4, warmup_steps=1, lr=2e-3, eval_every=2, eval_bytes=1000, eval_streams=2,
                     progress="off", out_dir=str(tmp_path / "run")))
    capsys.readouterr()
    rc = eval_main(["--model", res.last_checkpoint, "--data", str(DATA / "val"), "--seq_len", "64", "--streams", "2",
                    "--max_bytes", "1000", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "carried" in out and "reset every window" in out
    js = json.loads((tmp_path / "e.json").read_text())
    # same bytes, same chunking as the trainer's final eval -> same number
    assert js["val_bpb"] == pytest.approx(res.final_eval["val_bpb"], rel=1e-5)
    rc = plot_main([str(tmp_path / "run")])
    png = tmp_path / "run" / "train_curves.png"
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as e:
        plot_main([str(tmp_path / "no_run")])
    assert e.value.code == 2
    # a run still writing (or killed mid-row): the partial last row is skipped with a note
    metrics = tmp_path / "run" / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 99, "lo')
    png.unlink()
    assert plot_main([str(tmp_path / "run")]) == 0 and png.is_file()
    assert "unfinished last line" in capsys.readouterr().err
    metrics.write_text('{"step": 1, "lo\n' + good)  # a broken row in the middle is still an error
    with pytest.raises(SystemExit) as e:
        plot_main([str(tmp_path / "run")])
    assert e.value.code == 2 and "line 1 is not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_main(["--model", res.last_checkpoint, "--data", str(tmp_path / "missing.txt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not exist" in err[-1]

"""Trainer on CPU: learns, resume == uninterrupted, NaN guard, atomic checkpoints, config errors, export."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mambabyte import MambaByteLM
from mambabyte.cli.train import main as train_main
from mambabyte.training import list_checkpoints, load_checkpoint, lr_at, save_checkpoint, train
from mambabyte.training.config import make_config

DATA = Path(__file__).parent / "data" / "corpus"
REPO = Path(__file__).resolve().parents[1]


def base(tmp_path, name="run", **kw):
    cfg = dict(
        model={"preset": "tiny"}, data=[str(DATA / "train")], seq_len=64, batch_size=4, max_steps=6,
        lr=2e-3, warmup_steps=2, eval_every=0, checkpoint_every=0, progress="off", out_dir=str(tmp_path / name),
    )
    cfg.update(kw)
    return cfg


def rows(run_dir, key="loss"):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if key in r]


def test_tiny_model_learns_and_exports(tmp_path):
    res = train(base(tmp_path, seq_len=128, batch_size=8, max_steps=40, lr=3e-3, warmup_steps=5,
                     val_data=[str(DATA / "val")], eval_every=20, eval_bytes=4000, eval_streams=4,
                     export_dir=str(tmp_path / "export")))
    losses = [r["loss"] for r in rows(res.out_dir)]
    assert len(losses) == 40 and losses[0] / math.log(2) > 7.5  # starts near uniform (8 bits)
    assert res.final_eval["val_bpb"] < 5.0, res.final_eval  # well below 8.0 after a few dozen steps
    assert res.final_eval["val_bpb_window"] < 5.0
    evals = rows(res.out_dir, "val_bpb")
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_bpb"] < evals[0]["val_bpb"]
    for r in rows(res.out_dir):
        assert {"step", "loss", "lr", "bytes_per_s"} <= set(r)
    # checkpoints are self-describing: from_pretrained reads them and gives the trained weights
    ck = Path(res.last_checkpoint)
    m = MambaByteLM.from_pretrained(ck)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("backbone.layers.0.mixer.A_log").dtype == torch.float32
    exp = MambaByteLM.from_pretrained(tmp_path / "export")
    x = torch.tensor([list(b"To be, or not to be")])
    torch.testing.assert_close(exp(x).logits, m(x).logits, atol=0.15, rtol=0.05)  # bf16 export of the same weights
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["mambabyte"]["training"]["steps"] == 40
    assert Path(res.best_checkpoint).name == "best.pt"


@pytest.mark.parametrize("tbptt", [False, True], ids=["random-windows", "tbptt"])
def test_resume_equals_uninterrupted(tmp_path, tbptt):
    common = dict(micro_batch_size=2, lr_decay_steps=6, tbptt=tbptt, checkpoint_every=3)
    full = train(base(tmp_path, "full", **common))
    part = train(base(tmp_path, "part", max_steps=3, **common))
    assert part.step == 3 and Path(part.last_checkpoint).name == "step_000003.pt"
    # a half-written row past the checkpoint (as after a crash) is dropped on resume
    with open(Path(part.out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0, "lr": 0.0, "bytes_per_s": 0}) + "\n")
    resumed = train(base(tmp_path, "part", resume=True, **common))
    assert resumed.step == 6
    a, b = rows(full.out_dir), rows(resumed.out_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical curve on CPU
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    fa = MambaByteLM.from_pretrained(full.last_checkpoint).fingerprint()
    fb = MambaByteLM.from_pretrained(resumed.last_checkpoint).fingerprint()
    assert fa == fb


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = train(base(tmp_path, "one", max_steps=3))
    acc = train(base(tmp_path, "acc", max_steps=3, micro_batch_size=1))
    for r1, r2 in zip(rows(one.out_dir), rows(acc.out_dir)):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)


def _diverging_run(out, max_steps, capsys):
    """train (CLI) into ``out`` with a checkpoint every 2 steps; it must exit 1. Returns the error lines."""
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(DATA / "train"), "--out_dir", str(out), "--seq_len", "32", "--batch_size", "2",
                    "--max_steps", str(max_steps), "--checkpoint_every", "2", "--progress", "off",
                    "--warmup_steps", "1"])
    assert e.value.code == 1
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import mambabyte.training.trainer as tr

    real, calls = tr.compute_loss, {"n": 0}

    def poisoned(logits, y):
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(tr, "compute_loss", poisoned)
    out = tmp_path / "nan"
    last = _diverging_run(out, 8, capsys)
    assert len(last) == 1 and "at step 5" in last[-1] and "step_000004.pt" in last[-1]
    cks = list_checkpoints(out)
    assert [p.name for p in cks] == ["step_000002.pt", "step_000004.pt"]
    ck = load_checkpoint(cks[-1])
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert max(r["step"] for r in rows(out)) == 4  # the diverged step was not applied or logged


def test_checkpoint_write_is_atomic_under_kill(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    script = textwrap.dedent(f"""
        import os, torch
        from mambabyte.training import save_checkpoint
        os.replace = lambda *a, **k: os._exit(9)   # die after the temp file is written, before the rename
        save_checkpoint({str(path)!r}, {{"model": {{"w": torch.zeros(3)}}, "step": 2}})
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert p.returncode == 9, p.stderr.decode()[-500:]
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    leftovers = [q.name for q in tmp_path.iterdir() if q.name != "ck.pt"]
    assert leftovers and all(q.endswith(".tmp") for q in leftovers)  # the killed write left only a temp file


def test_keep_last_and_max_time(tmp_path):
    res = train(base(tmp_path, "keep", max_steps=5, checkpoint_every=1, keep_last=2))
    assert [p.name for p in list_checkpoints(res.out_dir)] == ["step_000004.pt", "step_000005.pt"]
    t = train(base(tmp_path, "time", max_steps=100000, max_time_minutes=0.02, decay_by_time=True,
                   export_dir=str(tmp_path / "time_export")))
    assert t.stopped_by == "max_time" and 1 <= t.step < 100000
    assert Path(t.last_checkpoint).is_file() and (tmp_path / "time_export" / "model.safetensors").is_file()


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(20, 1.0, 10, 100, min_lr_ratio=0.0, time_fraction=1.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bogus_key", "3"], "unknown option or config key '--bogus_key'"),
        (["--set", "model.d_modle=3"], "unknown model config key 'd_modle'"),
        (["--max_steps", "many"], "must be an integer"),
        (["--data", "/definitely/not/here"], "does not exist"),
        (["--lr_schedule", "zigzag"], "lr_schedule must be"),
        (["--micro_batch_size", "0"], "micro_batch_size must be >= 1"),
        (["--resume"], "no checkpoint to resume"),
    ],
    ids=["unknown-key", "unknown-model-key", "bad-type", "missing-data", "bad-choice", "bad-batch", "nothing-to-resume"],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    args = ["--data", str(DATA / "train"), "--out_dir", str(tmp_path / "o"), "--max_steps", "1", "--progress", "off"]
    with pytest.raises(SystemExit) as e:
        train_main(args + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err
    assert "Traceback" not in err


def test_yaml_config_errors_and_overrides(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("model: {preset: tiny}\nlerning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(bad), "--data", str(DATA / "train")])
    assert e.value.code == 2 and "unknown config key 'lerning_rate'" in capsys.readouterr().err
    broken = tmp_path / "broken.yml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(broken)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "not valid YAML" in err and "\n" not in err
    good = tmp_path / "good.yml"
    good.write_text(f"model: {{preset: tiny}}\ndata: {DATA / 'train'}\nseq_len: 32\nbatch_size: 2\nmax_steps: 50\n"
                    f"lr: 1e-3\nprogress: off\n")
    rc = train_main(["--config", str(good), "--max_steps", "2", "--set", "model.d_model=32", "--out_dir", str(tmp_path / "g")])
    assert rc == 0
    ck = load_checkpoint(list_checkpoints(tmp_path / "g")[-1])
    assert ck["step"] == 2 and ck["model_config"]["d_model"] == 32 and ck["train_config"]["lr"] == 1e-3
    assert {"optimizer", "scheduler", "rng", "data", "train_config"} <= set(ck)


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path, capsys):
    train(base(tmp_path, "old", max_steps=2))
    capsys.readouterr()
    args = ["--data", str(DATA / "train"), "--out_dir", str(tmp_path / "old"), "--max_steps", "1", "--seq_len", "32",
            "--batch_size", "2", "--progress", "off"]
    with pytest.raises(SystemExit) as e:
        train_main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "already holds checkpoints" in err and "\n" not in err
    assert train_main(args + ["--overwrite", "true"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "old")] == ["step_000001.pt"]
    assert [r["step"] for r in rows(tmp_path / "old")] == [1]


def test_train_on_prepared_folder_uses_its_val_split(tmp_path):
    from mambabyte.data import prepare_data

    val = tmp_path / "val.txt"
    val.write_bytes((DATA / "val" / "shakespeare_tempest_excerpt.txt").read_bytes()[:3000])
    prepare_data([str(DATA / "train")], tmp_path / "shards", val_sources=[str(val)])
    res = train(base(tmp_path, "prep", data=[str(tmp_path / "shards")], max_steps=2, eval_bytes=None,
                     eval_seq_len=256, eval_streams=4, eval_mode="carried"))
    fe = res.final_eval
    assert fe["val_bytes"] == 4 * (750 - 1)  # the whole val.bin was scored, in 4 chunks
    assert fe["val_words"] == len(val.read_bytes().split())
    assert fe["val_word_ppl"] == pytest.approx(2 ** (fe["val_bpb"] * 3000 / fe["val_words"]), rel=1e-9)


def test_training_does_not_import_generation_or_analysis():
    code = ("import sys, mambabyte.training, mambabyte.cli.train, mambabyte.cli.evaluate; "
            "bad = [m for m in sys.modules if m.startswith(('mambabyte.generation', 'mambabyte.analysis'))]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-1000:]


def test_micro_batch_size_is_a_cap_and_every_shipped_config_fits_1_to_8_processes(tmp_path, capsys):
    """batch 3 with micro_batch_size 2 on one process runs as 3 forwards of 1 window (a note says so);
    the repo's training configs load and split their batch over 1, 2, 4 and 8 processes."""
    res = train(base(tmp_path, "cap", max_steps=1, batch_size=3, micro_batch_size=2))
    assert res.step == 1
    assert "micro_batch_size 2 -> 1" in capsys.readouterr().err
    configs = sorted(Path(__file__).resolve().parents[1].glob("scripts/configs/*.yml"))
    # not trainer configs: the paper code's file, and the subword drafter's recipe (train_subword_drafter.py)
    train_configs = [p for p in configs if p.name not in ("mambabyte_lm.yml", "mambabyte_subword_draft.yml")]
    assert {p.name for p in train_configs} >= {"353M.yml", "972M.yml", "tiny_cpu.yml", "mambabyte_small.yml"}
    for path in train_configs:
        cfg = make_config(path, {"data": [str(DATA / "train")]})
        for world in (1, 2, 4, 8):
            assert cfg.batch_size % world == 0, (path.name, world)


def test_model_override_without_a_model_section_refines_the_default(tmp_path):
    cfg = make_config(None, {"model.d_state": 4, "data": [str(DATA / "train")]})
    assert cfg.model == {"preset": "tiny", "d_state": 4}


def test_inf_gradient_with_a_finite_loss_also_stops_the_run(tmp_path, monkeypatch, capsys):
    import mambabyte.training.trainer as tr

    real, calls = tr.compute_loss, {"n": 0}

    class _InfGrad(torch.autograd.Function):  # identity forward, infinite gradient backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def poisoned(logits, y):
        calls["n"] += 1
        return real(_InfGrad.apply(logits) if calls["n"] == 3 else logits, y)

    monkeypatch.setattr(tr, "compute_loss", poisoned)
    out = tmp_path / "inf"
    err = _diverging_run(out, 6, capsys)
    assert len(err) == 1 and "gradient norm became" in err[0] and "at step 3" in err[0], err
    assert [p.name for p in list_checkpoints(out)] == ["step_000002.pt"]
    ck = load_checkpoint(list_checkpoints(out)[-1])
    assert all(torch.isfinite(v).all() for v in ck["model"].values())

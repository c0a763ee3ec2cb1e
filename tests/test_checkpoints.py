"""Checkpoint formats in and out, and every bad-checkpoint case giving one clear error."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from mambabyte import MambaByteConfig, MambaByteLM
from mambabyte.errors import CheckpointError
from mambabyte.io import load_pretrained, save_pretrained


@pytest.fixture
def model():
    torch.manual_seed(11)
    return MambaByteLM(MambaByteConfig(d_model=32, n_layer=2, d_state=8)).eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "mambabyte" and cfg["d_model"] == 32
    m2 = MambaByteLM.from_pretrained(tmp_path / "m")
    assert m2.config == model.config
    assert same_weights(model, m2)
    x = torch.randint(0, 256, (1, 20))
    assert torch.equal(model(x).logits, m2(x).logits)
    assert model.fingerprint() == m2.fingerprint()


def test_save_in_bf16_keeps_A_log_and_D_fp32(model, tmp_path):
    save_pretrained(model, tmp_path / "bf", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert sd["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert sd["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    assert sd["backbone.layers.0.mixer.D"].dtype == torch.float32
    m = load_pretrained(tmp_path / "bf", dtype=torch.bfloat16)
    assert m.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_loads_mamba_ssm_folder(model, tmp_path):
    d = tmp_path / "MambaByte_PG19_tiny"
    d.mkdir()
    cfg = {"d_model": 32, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {"d_state": 8}, "rms_norm": False,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    m = MambaByteLM.from_pretrained(d)
    assert same_weights(model, m) and m.config.d_state == 8 and m.config.norm == "layernorm"
    assert m.source_layout == "mambabyte-lm"


def mambabyte_repo_keys(sd, prefix=""):
    out = {}
    for k, v in sd.items():
        k = k.replace("backbone.embedding.", "mambabyte.token_embedding.")
        k = k.replace("backbone.norm_f.", "mambabyte.final_norm.")
        k = k.replace("backbone.layers.", "mambabyte.layers.")
        out[prefix + k] = v.clone()
    return out


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp_prefix"])
def test_loads_mambabyte_repo_pt_with_inferred_config(model, tmp_path, prefix):
    sd = mambabyte_repo_keys(model.state_dict(), prefix)
    assert any(k.startswith(prefix + "mambabyte.token_embedding") for k in sd)
    torch.save(sd, tmp_path / "mambabyte_tiny.pt")
    m = MambaByteLM.from_pretrained(tmp_path / "mambabyte_tiny.pt")
    assert m.source_layout == "mambabyte-repo"
    assert (m.config.d_model, m.config.n_layer, m.config.d_state) == (32, 2, 8)
    assert same_weights(model, m)


def test_loads_mambabyte_repo_pt_with_config_beside(model, tmp_path):
    torch.save(mambabyte_repo_keys(model.state_dict()), tmp_path / "w.pt")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "num_layers": 2, "d_state": 8}))
    m = MambaByteLM.from_pretrained(tmp_path / "w.pt")
    assert same_weights(model, m)


def test_model_id_used_when_no_config(tmp_path):
    torch.manual_seed(0)
    tiny = MambaByteLM.from_preset("tiny")
    torch.save({"model": mambabyte_repo_keys(tiny.state_dict())}, tmp_path / "t.pt")
    m = MambaByteLM.from_pretrained(tmp_path / "t.pt", model_id="tiny")
    assert m.config.name == "tiny" and same_weights(tiny, m)


def test_convert_cli(model, tmp_path, capsys):
    from mambabyte.cli.convert import main

    torch.save(mambabyte_repo_keys(model.state_dict()), tmp_path / "w.pt")
    assert main([str(tmp_path / "w.pt"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert same_weights(model, MambaByteLM.from_pretrained(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------- bad input
def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    sd = model.state_dict()
    sd.pop("backbone.layers.1.mixer.D")
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    (tmp_path / "config.json").write_text(model.config.to_json())
    with pytest.raises(CheckpointError) as e:
        MambaByteLM.from_pretrained(tmp_path / "bad.pt")
    msg = one_line(e)
    assert "1 missing [backbone.layers.1.mixer.D]" in msg and "1 unexpected [backbone.layers.0.mixer.extra]" in msg


def test_wrong_shape_is_listed(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_state"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        MambaByteLM.from_pretrained(tmp_path / "m")
    msg = one_line(e)
    assert "wrong shape" in msg and "A_log (64, 8) vs model (64, 4)" in msg


def test_wrong_dtype_is_refused(model, tmp_path):
    sd = model.state_dict()
    sd["backbone.layers.0.mixer.D"] = torch.ones(64, dtype=torch.int32)
    torch.save(sd, tmp_path / "bad.pt")
    (tmp_path / "config.json").write_text(model.config.to_json())
    with pytest.raises(CheckpointError) as e:
        MambaByteLM.from_pretrained(tmp_path / "bad.pt")
    assert "not floating point [backbone.layers.0.mixer.D is torch.int32]" in one_line(e)


def test_corrupt_and_truncated_files(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="safetensors") as e:
        MambaByteLM.from_pretrained(tmp_path / "m")
    one_line(e)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        MambaByteLM.from_pretrained(tmp_path / "junk.pt")
    one_line(e)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        MambaByteLM.from_pretrained(tmp_path / "empty.bin")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_never_executed(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        MambaByteLM.from_pretrained(tmp_path / "evil.pt")


def test_bad_config_json(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON") as e:
        MambaByteLM.from_pretrained(tmp_path / "m")
    one_line(e)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "colour": "red"}))
    with pytest.raises(CheckpointError, match="colour") as e:
        MambaByteLM.from_pretrained(tmp_path / "m")
    one_line(e)


def test_missing_path_and_hub_ids_without_network(model, tmp_path, monkeypatch):
    """Every hub branch, with no network touched: huggingface_hub missing, a failing download, and a
    download that returns a folder (then loaded like any local one)."""
    import types

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        MambaByteLM.from_pretrained(str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed") as e:
        MambaByteLM.from_pretrained("someone/some-model")
    one_line(e)
    fake = types.ModuleType("huggingface_hub")
    asked = []

    def failing(repo_id, **kw):
        asked.append(repo_id)
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    fake.snapshot_download = failing
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(CheckpointError, match="could not fetch 'someone/some-model' from the hub") as e:
        MambaByteLM.from_pretrained("someone/some-model")
    one_line(e)
    model.save_pretrained(tmp_path / "snap")
    fake.snapshot_download = lambda repo_id, **kw: asked.append(repo_id) or str(tmp_path / "snap")
    m = MambaByteLM.from_pretrained("someone/some-model")
    assert asked == ["someone/some-model"] * 2 and m.fingerprint() == model.fingerprint()


def test_mamba2_checkpoint_is_refused(model, tmp_path):
    d = tmp_path / "m2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"}}))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Mamba-2"):
        MambaByteLM.from_pretrained(d)


def test_cli_bad_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "mambabyte", "convert", str(tmp_path / "junk.pt"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_atomic_save_leaves_old_checkpoint_on_failure(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import safetensors.torch as st

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", boom)
    from mambabyte.errors import MambaByteError

    with pytest.raises(MambaByteError, match="No space left"):
        save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


def test_save_that_fails_on_the_config_leaves_the_old_pair(model, tmp_path, monkeypatch):
    """Overwriting a model with one of another shape: a failure writing config.json must not leave the
    new weights beside the old config."""
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    other = MambaByteLM(MambaByteConfig(d_model=32, n_layer=1))
    real_open = open

    def failing_open(file, mode="r", *a, **kw):
        if "w" in mode and os.path.basename(str(file)).startswith(".config.json."):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", failing_open)
    from mambabyte.errors import MambaByteError

    with pytest.raises(MambaByteError, match="No space left"):
        save_pretrained(other, tmp_path / "m")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert MambaByteLM.from_pretrained(tmp_path / "m").config.d_model == model.config.d_model


@pytest.mark.parametrize("case, needle", [
    ("empty-folder", "no weights in folder"),
    ("two-candidates", "found several candidates: a.pt, b.pt"),
    ("not-a-dict", "expected a dict of tensors, found list"),
    ("cannot-infer", "cannot infer the model config"),
])
def test_more_bad_checkpoints_are_one_clear_error(model, tmp_path, case, needle):
    sd = model.state_dict()
    if case == "empty-folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "two-candidates":
        path = tmp_path / "two"
        path.mkdir()
        torch.save(sd, path / "a.pt")
        torch.save(sd, path / "b.pt")
    elif case == "not-a-dict":
        path = tmp_path / "x.pt"
        torch.save([1, 2, 3], path)
    else:  # no config beside it and a tensor the shapes are read from is gone
        path = tmp_path / "partial.pt"
        torch.save({k: v for k, v in sd.items() if "in_proj" not in k}, path)
    with pytest.raises(CheckpointError, match=needle) as e:
        MambaByteLM.from_pretrained(path)
    one_line(e)

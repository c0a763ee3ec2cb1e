"""Golden tests of the shipped default model: exact greedy output and a stored bits-per-byte figure (CPU)."""

import math
import os

import pytest
import torch

from mambabyte import MambaByteLM
from mambabyte.io import list_shipped_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "tests", "data", "corpus", "val", "shakespeare_tempest_excerpt.txt")

# Recorded on CPU (fp32 compute from the shipped bf16 weights) when the model was shipped.
GOLDEN_PROMPT = "First Citizen:\n"
GOLDEN_OUTPUT = b"The state is come to the sea, and the state of the sea\nWhich is "
GOLDEN_BPB_4096 = 2.2827  # first 4,096 bytes of the committed Tempest excerpt, one pass from the zero state


@pytest.fixture(scope="module")
def small():
    assert "mambabyte-small" in list_shipped_models(), "the shipped default model is missing from pretrained_models/"
    return MambaByteLM.from_pretrained("mambabyte-small", device="cpu")


def test_shipped_model_greedy_output_is_stable(small):
    out = small.generate(GOLDEN_PROMPT, max_new_bytes=len(GOLDEN_OUTPUT), temperature=0)
    assert out.bytes == GOLDEN_OUTPUT


def test_shipped_model_bpb_on_committed_excerpt(small):
    with open(EXCERPT, "rb") as f:
        data = f.read()[:4096]
    x = torch.tensor([list(data)])
    with torch.no_grad():
        logp = torch.log_softmax(small(x[:, :-1]).logits.float(), -1)
    nll = -logp[0].gather(-1, x[0, 1:, None]).sum().item()
    bpb = nll / math.log(2) / (len(data) - 1)
    assert bpb == pytest.approx(GOLDEN_BPB_4096, abs=2e-3)


def test_shipped_models_load_by_name():
    assert {"mambabyte-small", "mambabyte-draft", "mambabyte-subword-draft"} <= set(list_shipped_models())
    draft = MambaByteLM.from_pretrained("mambabyte-draft")
    assert (draft.config.d_model, draft.config.n_layer) == (192, 2)
    for name in ("mambabyte-small", "mambabyte-draft", "mambabyte-subword-draft"):
        size = os.path.getsize(os.path.join(ROOT, "pretrained_models", name, "model.safetensors"))
        assert size <= {"mambabyte-small": 16, "mambabyte-draft": 2, "mambabyte-subword-draft": 8}[name] * 1024**2


# ---------------------------------------------------------------------------------------------------
# The shipped models end to end through the CLIs and the library API (CPU, a few bytes each).
from pathlib import Path  # noqa: E402

from test_generate_cli import run_cli as _run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

CLI_BYTES = 24  # bytes generated per CLI run: enough for several speculative verifications, still fast
SHIPPED_SIZE_LIMIT_MIB = {"mambabyte-small": 16, "mambabyte-draft": 2, "mambabyte-subword-draft": 8}


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """An empty MAMBABYTE_HOME, so a model in the user's cache cannot shadow the shipped one."""
    monkeypatch.setenv("MAMBABYTE_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def small_greedy(small):
    out = small.generate(GOLDEN_PROMPT, max_new_bytes=CLI_BYTES, temperature=0).bytes
    assert len(out) == CLI_BYTES and out == GOLDEN_OUTPUT[:CLI_BYTES]
    return out


def _shipped_folder(name):
    from mambabyte.io.checkpoints import resolve_path

    return Path(resolve_path(name)).resolve()


def test_generate_cli_without_model_uses_shipped_default(clean_home, small_greedy, capsysbinary):
    from mambabyte.cli import generate as gen_cli
    from mambabyte.cli.common import DEFAULT_MODEL

    assert DEFAULT_MODEL == "mambabyte-small"
    rc, out, err = _run_cli(gen_cli.main, ["--prompt", GOLDEN_PROMPT, "--max_new_bytes", str(CLI_BYTES),
                                           "--temperature", "0", "--raw", "--device", "cpu"], capsysbinary)
    assert rc == 0, err
    assert "RANDOMLY" not in err  # no fallback to a random model
    assert out == small_greedy + b"\n"


def test_extract_cli_without_model_records_shipped_default(clean_home, small, capsysbinary):
    from mambabyte.analysis.artefact import load_artefact
    from mambabyte.cli.extract import main_discrete_A  # what scripts/extract_discrete_A.py runs

    target = clean_home / "discrete_A.pkl"
    prompt = "The state is come"
    rc, out, err = _run_cli(main_discrete_A, ["--prompt", prompt, "-o", str(target), "--device", "cpu",
                                              "--reduction", "mean", "--reduction_dim", "-2",
                                              "--return_log_probs"], capsysbinary)
    assert rc == 0, err
    assert "RANDOMLY" not in err
    art = load_artefact(target)
    assert art["kind"] == "discrete_A"
    cfg = art["config"]
    assert (cfg["d_model"], cfg["n_layer"], cfg["vocab_size"]) == (384, 7, 256)
    assert cfg == small.config.to_dict()
    assert art["model_id"] == small.config.name == "mambabyte-small"  # not the clashing preset name "small"
    path = art["pretrained_model_filepath"]
    assert path is not None and Path(path).name == "mambabyte-small"
    assert Path(path).resolve() == _shipped_folder("mambabyte-small")
    assert art["layer_idxs"] == list(range(7)) and sorted(art["discrete_A"]) == list(range(7))
    assert tuple(art["discrete_A"][0].shape) == (len(prompt), small.config.d_state)
    # the artefact's numbers come from the shipped weights, not merely a model of the same shape
    x = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        logp = torch.log_softmax(small(x).logits.float(), -1)[0, :-1].gather(-1, x[0, 1:, None])[:, 0]
    assert torch.allclose(torch.as_tensor(art["log_probs"]).float(), logp, atol=1e-4)


@pytest.mark.parametrize("drafter", ["mambabyte-draft", "mambabyte-subword-draft"])
def test_generate_cli_speculative_with_shipped_drafter_is_exact(drafter, clean_home, small_greedy, capsysbinary):
    from mambabyte.cli import generate as gen_cli

    rc, out, err = _run_cli(gen_cli.main, ["--prompt", GOLDEN_PROMPT, "--max_new_bytes", str(CLI_BYTES),
                                           "--temperature", "0", "--raw", "--device", "cpu",
                                           "--speculative", "--drafter", drafter, "--draft_len", "4", "--stats"],
                            capsysbinary)
    assert rc == 0, err
    assert "speculative: draft_len 4" in err  # the drafter was loaded and used
    assert out == small_greedy + b"\n"


def test_speculative_drafter_resolution_picks_the_right_kind():
    import argparse

    from mambabyte.cli.generate import _load_drafter
    from mambabyte.subword import SubwordDrafter

    target = MambaByteLM.from_preset("tiny").eval()
    args = argparse.Namespace(drafter="mambabyte-subword-draft", dtype=None, drafter_id=None)
    assert isinstance(_load_drafter(args, target), SubwordDrafter)
    args.drafter = "mambabyte-draft"
    d = _load_drafter(args, target)
    assert isinstance(d, MambaByteLM) and (d.config.d_model, d.config.n_layer) == (192, 2)


def test_subword_drafter_loads_by_name_and_shipped_folders_fit_the_size_limit():
    from mambabyte.subword import SubwordDrafter

    d = SubwordDrafter.from_pretrained("mambabyte-subword-draft", device="cpu")
    assert d.tokenizer.vocab_size == 2048
    assert (d.model.config.d_model, d.model.config.n_layer) == (256, 4)
    assert d.model.config.vocab_size >= d.tokenizer.vocab_size
    data = bytes(range(256)) + "Full fathom five thy father lies".encode()
    ids = d.encode(data)
    assert b"".join(d.token_bytes(i) for i in ids) == data  # every byte string round-trips
    with open(EXCERPT, "rb") as f:
        text = f.read()[:2048]
    # recorded on CPU for the shipped weights (a randomly initialised drafter of this shape scores ~4.8)
    assert d.bits_per_byte(text) == pytest.approx(2.889, abs=5e-3)

    # every file of each shipped folder counts: weights, config.json, tokenizer.json and the model card
    for name, limit_mib in SHIPPED_SIZE_LIMIT_MIB.items():
        folder = _shipped_folder(name)
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert (folder / "model.safetensors") in files
        if name == "mambabyte-subword-draft":
            assert (folder / "tokenizer.json") in files
        total = sum(p.stat().st_size for p in files)
        assert total <= limit_mib * 1024**2, f"{name}: {total} bytes in {folder} exceeds {limit_mib} MiB"

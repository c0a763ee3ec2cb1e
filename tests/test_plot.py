"""Plots of extraction artefacts: PNGs are written, open, have the expected size and are not blank."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mambabyte.analysis import extraction
from mambabyte.analysis.artefact import build_artefact, save_artefact
from mambabyte.analysis.plots import byte_labels, plot_artefact
from mambabyte.cli import plot as plot_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The quick brown fox\njumps over the lazy dog. Ünï ✓"


def _png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(np.std(img[..., :3])) > 0.05  # not a blank canvas
    return img


def _art(model, kind, prompt=PROMPT, **kw):
    data = prompt.encode()
    if kind == "module_outputs":
        res = extraction.extract_module_outputs(model, data, kw.get("module_ids", ["dt_proj"]), nonlinearity="softplus")
        return build_artefact(kind, res, data, model, module_ids=kw.get("module_ids", ["dt_proj"]), nonlinearity="softplus")
    if kind == "discrete_A":
        res = extraction.extract_discrete_A(model, data, reduction=kw.get("reduction"), reduction_dim=kw.get("dim"))
        return build_artefact(kind, res, data, model, reduction=kw.get("reduction"), reduction_dim=kw.get("dim"))
    res = extraction.extract_input_sim_with_discrete_A(model, data)
    return build_artefact(kind, res, data, model)


CASES = [
    ("module_outputs", {}),
    ("discrete_A", {}),
    ("discrete_A", {"reduction": "norm", "dim": -2}),
    ("discrete_A", {"reduction": "fro"}),
    ("discrete_A", {"reduction": "max", "dim": 0}),  # reduced over positions: (d_inner, d_state) maps
    ("input_sim_with_discrete_A", {}),
]


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{v.get('reduction')}-{v.get('dim')}" for k, v in CASES])
def test_plot_every_kind(tiny_model, tmp_path, kind, kw):
    art = _art(tiny_model, kind, **kw)
    out = plot_artefact(art, tmp_path / "p.png", dpi=60)
    img = _png(out)
    h, w = img.shape[:2]
    assert w >= 600 and h >= 150
    assert os.listdir(tmp_path) == ["p.png"]  # atomic: no temp file left


def test_plot_sizes_follow_layout(tiny_model, tmp_path):
    art = dict(_art(tiny_model, "discrete_A", reduction="norm", dim=-2), log_probs=None, probs=None, ranks=None)
    # 2 heatmaps + curves; then with stats (log-probs / ranks) the figure gets a row taller
    a = _png(plot_artefact(art, tmp_path / "a.png", dpi=50))
    short = ["T", "h", "e", "␣"]
    assert byte_labels(b"The ")[:4] == short
    art_stats = dict(art, log_probs=torch.randn(len(PROMPT.encode()) - 1).clamp(max=0),
                     ranks=torch.randint(0, 256, (len(PROMPT.encode()) - 1,)))
    art_stats["probs"] = art_stats["log_probs"].exp()
    b = _png(plot_artefact(art_stats, tmp_path / "b.png", dpi=50))
    assert b.shape[0] > a.shape[0] + 40
    one = _png(plot_artefact(art, tmp_path / "c.png", dpi=50, layers=[1]))
    assert one.shape[0] < a.shape[0] - 40


def test_byte_labels():
    assert byte_labels(b"a b\n\t") == ["a", "␣", "b", "↵", "⇥"]
    assert byte_labels("Ü✓".encode()) == ["Ü", "·", "✓", "·", "·"]
    assert byte_labels(b"\xff\x00A") == ["\\xff", "\\x00", "A"]
    assert byte_labels(b"\xc3") == ["\\xc3"]  # truncated UTF-8 sequence


def _pkl(tiny_model, tmp_path, **kw):
    art = _art(tiny_model, "discrete_A", **kw)
    art["log_probs"] = torch.zeros(len(PROMPT.encode()) - 1) - 1.0
    art["probs"] = art["log_probs"].exp()
    return str(save_artefact(art, tmp_path / "a.pkl"))


def test_cli_plot(tiny_model, tmp_path, capsys):
    pkl = _pkl(tiny_model, tmp_path, reduction="mean", dim=1)
    assert plot_cli.main([pkl, "-o", str(tmp_path / "o.png"), "--dpi", "50"]) == 0
    assert "wrote" in capsys.readouterr().out
    _png(tmp_path / "o.png")
    # default output: next to the artefact
    assert plot_cli.main([pkl, "--window", "4:20", "--layers", "0", "--relative", "--dpi", "50"]) == 0
    _png(tmp_path / "a.png")


def test_mambabyte_plot_dispatch_on_cli_artefact(tmp_path, capsys):
    from mambabyte.cli.extract import main_module_outputs
    from mambabyte.cli.main import main as mb_main

    pkl = tmp_path / "delta.pkl"
    assert main_module_outputs(["--prompt", "Hello, world", "--model_id", "tiny", "-o", str(pkl), "--module_ids",
                                "dt_proj", "--nonlinearity", "softplus", "--return_log_probs", "--return_ranks"]) == 0
    png = tmp_path / "delta.png"
    assert mb_main(["plot", str(pkl), "-o", str(png), "--dpi", "50"]) == 0
    img = _png(png)
    assert img.shape[1] > 500


BAD = [
    ["/nonexistent/a.pkl"],
    ["{pkl}", "--window", "abc"],
    ["{pkl}", "--window", "30:10"],
    ["{pkl}", "--layers", "9"],
    ["{pkl}", "--key", "dt_proj"],
    ["{pkl}", "--max_layers", "0"],
    ["{notpkl}"],
    ["{otherpkl}"],
    ["{pkl}", "--bogus"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_cli_plot_bad_input_one_line(tiny_model, tmp_path, capsys, argv):
    pkl = _pkl(tiny_model, tmp_path, reduction="fro")
    notpkl = tmp_path / "n.pkl"
    notpkl.write_text("this is not a pickle")
    otherpkl = tmp_path / "o.pkl"
    with open(otherpkl, "wb") as f:
        pickle.dump({"hello": 1}, f)
    argv = [a.format(pkl=pkl, notpkl=notpkl, otherpkl=otherpkl) for a in argv] + ["-o", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        plot_cli.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_matplotlib_is_lazy_and_pyplot_unused(tmp_path):
    code = (
        "import sys, mambabyte, mambabyte.cli.plot, mambabyte.analysis;"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly';"
        "import torch; from mambabyte import MambaByteLM; from mambabyte.analysis import extraction, artefact, plots;"
        "m = MambaByteLM.from_preset('tiny').eval();"
        "r = extraction.extract_discrete_A(m, b'hi there', reduction='fro');"
        f"plots.plot_artefact(artefact.build_artefact('discrete_A', r, b'hi there', m, reduction='fro'), {str(tmp_path / 'z.png')!r}, dpi=40);"
        "assert 'matplotlib.pyplot' not in sys.modules;"
        "import matplotlib; print(matplotlib.get_backend())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "z.png").stat().st_size > 1000


def test_paper_code_pickle_is_read_and_plotted(tmp_path):
    """The paper code's pickles (probabilities stored under log_probs, no schema) still plot."""
    from mambabyte.analysis.artefact import load_artefact

    L = 30
    old = {
        "prompt": "x" * L,
        "discrete_A": {0: torch.rand(L, 16), 3: torch.rand(L, 16)},
        "log_probs": torch.full((L - 1,), 0.25),
        "ranks": torch.zeros(L - 1, dtype=torch.long),
        "model_id": "972M",
        "layer_idxs": [0, 3],
        "reduction": "norm",
        "pretrained_model_filepath": None,
    }
    pkl = tmp_path / "old.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(old, f)
    art = load_artefact(pkl)
    assert art["kind"] == "discrete_A" and art["legacy_paper_artefact"]
    torch.testing.assert_close(art["probs"], old["log_probs"])
    torch.testing.assert_close(art["log_probs"], torch.full((L - 1,), 0.25).log())
    assert plot_cli.main([str(pkl), "-o", str(tmp_path / "old.png"), "--dpi", "50"]) == 0
    _png(tmp_path / "old.png")

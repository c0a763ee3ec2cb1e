"""Extraction CLIs and their artefacts, checked against an independent fp64 recomputation from the weights.

The reference below re-implements the forward pass of a MambaByteLM in plain torch from its state dict
(embedding, pre-norm residual, in_proj, causal depthwise conv, x_proj, dt_proj, sequential selective
scan, gate, out_proj, final norm, head). It shares no code with mambabyte.analysis or the model; the
first test checks it reproduces the model's logits, so agreeing with it means something.
"""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mambabyte.analysis import extraction
from mambabyte.analysis.artefact import REQUIRED_KEYS, SCHEMA_VERSION, load_artefact
from mambabyte.cli import extract as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "High up on the hillside, the Union Jack."  # 40 bytes


# ---------------------------------------------------------------------------------------------------
# independent reference
def reference_forward(model, prompt: bytes):
    """Per-layer dict of fp64 intermediates + logits (L, 256), recomputed from the weights only."""
    cfg = model.config
    sd = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    ids = torch.tensor(list(prompt), dtype=torch.long)
    L, D, di, n, W = len(ids), cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
    r = cfg.dt_rank_value

    def norm(x, prefix):
        if cfg.norm == "layernorm":
            return F.layer_norm(x, (D,), sd[prefix + ".weight"], sd[prefix + ".bias"], cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".weight"]

    h = sd["backbone.embedding.weight"][ids]
    res = None
    layers = []
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        res = h if res is None else h + res
        u = norm(res, p + "norm")
        xz = u @ sd[p + "mixer.in_proj.weight"].T
        if p + "mixer.in_proj.bias" in sd:
            xz = xz + sd[p + "mixer.in_proj.bias"]
        x, z = xz[:, :di], xz[:, di:]
        w = sd[p + "mixer.conv1d.weight"][:, 0, :]  # (di, W)
        xpad = torch.cat([torch.zeros(W - 1, di, dtype=x.dtype), x], 0)
        xc = sum(xpad[k : k + L] * w[:, k] for k in range(W))
        if p + "mixer.conv1d.bias" in sd:
            xc = xc + sd[p + "mixer.conv1d.bias"]
        xs = xc * torch.sigmoid(xc)
        xdbl = xs @ sd[p + "mixer.x_proj.weight"].T
        dt_low, Bm, Cm = xdbl[:, :r], xdbl[:, r : r + n], xdbl[:, r + n :]
        dt_raw = dt_low @ sd[p + "mixer.dt_proj.weight"].T + sd[p + "mixer.dt_proj.bias"]
        delta = torch.log1p(torch.exp(dt_raw))
        A = -torch.exp(sd[p + "mixer.A_log"])
        dA = torch.exp(delta[:, :, None] * A[None])  # (L, di, n)
        state = torch.zeros(di, n, dtype=torch.float64)
        ys = []
        for t in range(L):
            state = dA[t] * state + (delta[t][:, None] * Bm[t][None, :]) * xs[t][:, None]
            ys.append(state @ Cm[t] + sd[p + "mixer.D"] * xs[t])
        y = torch.stack(ys) * (z * torch.sigmoid(z))
        h = y @ sd[p + "mixer.out_proj.weight"].T
        if p + "mixer.out_proj.bias" in sd:
            h = h + sd[p + "mixer.out_proj.bias"]
        layers.append(dict(in_proj=xz, x=x, conv1d=xc, x_proj=xdbl, dt_proj=dt_raw, delta=delta, A=A,
                           discrete_A=dA, out_proj=h))
    res = h + res
    logits = norm(res, "backbone.norm_f") @ sd["lm_head.weight"].T
    return layers, logits[:, : cfg.vocab_size]


@pytest.fixture
def saved_tiny(tiny_model, tmp_path):
    path = tmp_path / "tiny_ckpt"
    tiny_model.save_pretrained(path)
    return str(path)


@pytest.fixture
def ref(tiny_model):
    return reference_forward(tiny_model, PROMPT.encode())


def run_cli(fn, argv):
    rc = fn(argv)
    assert rc == 0
    out = [a for a in argv if a.endswith(".pkl")][0]
    return load_artefact(out)


def base_args(ckpt, out, *extra):
    return ["--prompt", PROMPT, "--pretrained_model_filepath", ckpt, "--filepath_to_store_outputs", str(out),
            "--device", "cpu", "--return_log_probs", "--return_ranks", *extra]


# ---------------------------------------------------------------------------------------------------
def test_reference_reproduces_model_logits(tiny_model, ref):
    ids = torch.tensor([list(PROMPT.encode())])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0].double()
    torch.testing.assert_close(logits, ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module_id", ["dt_proj", "x_proj", "in_proj", "conv1d", "out_proj"])
def test_module_outputs_equal_recomputation(tiny_model, ref, module_id):
    res = extraction.extract_module_outputs(tiny_model, PROMPT.encode(), [module_id])
    layers, _ = ref
    assert sorted(res.tensors[module_id]) == [0, 1]
    for i, t in res.tensors[module_id].items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        torch.testing.assert_close(t.double(), layers[i][module_id], rtol=1e-4, atol=1e-5)


def test_cli_dt_proj_softplus_is_delta(saved_tiny, ref, tmp_path):
    out = tmp_path / "delta.pkl"
    art = run_cli(cli.main_module_outputs,
                  base_args(saved_tiny, out, "--module_id", "dt_proj", "--nonlinearity", "softplus"))
    assert art["kind"] == "module_outputs" and art["module_id"] == "dt_proj" and art["nonlinearity"] == "softplus"
    assert art["tensor_keys"] == ["dt_proj"]
    for i in (0, 1):
        assert art["dt_proj"][i].shape == (len(PROMPT), 128)
        torch.testing.assert_close(art["dt_proj"][i].double(), ref[0][i]["delta"], rtol=1e-4, atol=1e-6)


def test_module_ids_alias_and_several_modules(saved_tiny, tmp_path):
    out = tmp_path / "alias.pkl"
    art = run_cli(cli.main_module_outputs,
                  base_args(saved_tiny, out, "--module_ids", "x_proj", "mixer", "--layer_idxs", "1"))
    assert art["module_ids"] == ["x_proj", "mixer"] and art["layer_idxs"] == [1]
    assert list(art["x_proj"]) == [1] and art["x_proj"][1].shape == (len(PROMPT), 4 + 2 * 16)
    # "mixer" picks the mixer itself (its output is (L, d_model)), not one of its sub-projections
    assert art["mixer"][1].shape == (len(PROMPT), 64)
    single = run_cli(cli.main_module_outputs,
                     base_args(saved_tiny, tmp_path / "one.pkl", "--module_id", "x_proj", "--layer_idxs", "1"))
    torch.testing.assert_close(single["x_proj"][1], art["x_proj"][1])


def test_mixer_output_equals_out_proj(saved_tiny, tmp_path, ref):
    art = run_cli(cli.main_module_outputs, base_args(saved_tiny, tmp_path / "m.pkl", "--module_id", "mixer"))
    for i in (0, 1):
        torch.testing.assert_close(art["mixer"][i].double(), ref[0][i]["out_proj"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nl,fn", [("relu", F.relu), ("tanh", torch.tanh), ("gelu", F.gelu), ("lrelu", F.leaky_relu),
                                   ("elu", F.elu), ("swish", F.silu), ("linear", lambda t: t)])
def test_nonlinearities(tiny_model, ref, nl, fn):
    res = extraction.extract_module_outputs(tiny_model, PROMPT.encode(), ["x_proj"], layer_idxs=[0], nonlinearity=nl)
    torch.testing.assert_close(res.tensors["x_proj"][0].double(), fn(ref[0][0]["x_proj"]), rtol=1e-4, atol=1e-5)


def test_discrete_A_unreduced_equals_recomputation(saved_tiny, ref, tmp_path):
    out = tmp_path / "dA.pkl"
    art = run_cli(cli.main_discrete_A, base_args(saved_tiny, out, "--seed", "7"))
    assert set(REQUIRED_KEYS) <= set(art) and art["schema_version"] == SCHEMA_VERSION
    assert art["kind"] == "discrete_A" and art["reduction"] is None and art["layer_idxs"] == [0, 1]
    assert art["dims"]["discrete_A"] == ("L", "d_inner", "d_state")
    assert art["config"]["d_model"] == 64 and art["seed"] == 7 and art["pretrained_model_filepath"] == saved_tiny
    assert art["prompt"] == PROMPT and art["prompt_bytes"] == PROMPT.encode()
    for i in (0, 1):
        t = art["discrete_A"][i]
        assert t.shape == (len(PROMPT), 128, 16) and t.dtype == torch.float32
        torch.testing.assert_close(t.double(), ref[0][i]["discrete_A"], rtol=1e-5, atol=1e-6)


def test_log_probs_probs_ranks(saved_tiny, ref, tmp_path):
    art = run_cli(cli.main_input_sim, base_args(saved_tiny, tmp_path / "s.pkl"))
    logits = ref[1]
    ids = torch.tensor(list(PROMPT.encode()))
    logp = torch.log_softmax(logits[:-1], -1)
    true = logp[torch.arange(len(ids) - 1), ids[1:]]
    assert art["log_probs"].shape == (len(PROMPT) - 1,) and art["log_probs"].dtype == torch.float32
    torch.testing.assert_close(art["log_probs"].double(), true, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(art["probs"].double(), true.exp(), rtol=1e-4, atol=1e-6)
    ranks = (logp > true[:, None]).sum(1)
    assert art["ranks"].dtype == torch.int64 and art["ranks"].shape == (len(PROMPT) - 1,)
    assert (art["ranks"] - ranks).abs().max() <= 1  # ties within fp rounding may differ by one
    assert (art["ranks"] == ranks).float().mean() > 0.9
    assert (art["probs"] <= 1).all() and (art["log_probs"] <= 0).all()


def test_flags_off_store_none(saved_tiny, tmp_path):
    out = tmp_path / "n.pkl"
    argv = ["--prompt", "ab", "--pretrained_model_filepath", saved_tiny, "-o", str(out)]
    art = run_cli(cli.main_input_sim, argv)
    assert art["log_probs"] is None and art["probs"] is None and art["ranks"] is None


REDUCTION_CASES = [
    ("mean", 0), ("mean", -2), ("mean", 2), ("min", -1), ("min", 0), ("max", 1), ("max", -3),
    ("norm", -2), ("norm", 0), ("norm", -1), ("fro", None), ("fro", -2), ("nuc", None),
]


def _expected(full, reduction, dim):
    if reduction == "mean":
        return full.mean(dim), None
    if reduction == "norm":
        return torch.linalg.vector_norm(full, dim=dim), None
    if reduction in ("min", "max"):
        v, i = full.min(dim) if reduction == "min" else full.max(dim)
        return v, i
    return torch.linalg.matrix_norm(full, ord=reduction, dim=(1, 2)), None


@pytest.mark.parametrize("reduction,dim", REDUCTION_CASES, ids=[f"{r}-{d}" for r, d in REDUCTION_CASES])
def test_cli_reductions(saved_tiny, ref, tmp_path, reduction, dim):
    out = tmp_path / f"r_{reduction}.pkl"
    extra = ["--reduction", reduction] + ([] if dim is None else ["--reduction_dim", str(dim)])
    art = run_cli(cli.main_discrete_A, base_args(saved_tiny, out, *extra))
    assert art["reduction"] == reduction
    assert art["reduction_dim"] == (None if reduction in ("fro", "nuc") else dim)
    for i in (0, 1):
        want, want_idx = _expected(ref[0][i]["discrete_A"], reduction, dim)
        got = art["discrete_A"][i]
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        if reduction in ("min", "max"):
            idx = art["discrete_A_indices"][i]
            assert idx.dtype == torch.int64 and idx.shape == want.shape
            # the stored index points at the stored extreme value (ties may pick either)
            d = dim % 3
            picked = ref[0][i]["discrete_A"].gather(d, idx.unsqueeze(d)).squeeze(d)
            torch.testing.assert_close(picked, want, rtol=1e-5, atol=1e-6)
        else:
            assert "discrete_A_indices" not in art


@pytest.mark.parametrize("reduction,dim", [(None, None), ("mean", 0), ("min", 0), ("max", 0), ("norm", 0),
                                           ("max", 2), ("fro", None), ("nuc", None)])
def test_chunked_reduction_matches_whole(reduction, dim):
    g = torch.Generator().manual_seed(3)
    delta = torch.rand(37, 12, generator=g) * 0.5
    A = -torch.rand(12, 5, generator=g) * 4 - 0.1
    whole, whole_i = extraction.discrete_A_reduced(delta, A, reduction, dim, chunk_elements=10**9)
    for chunk in (60, 1):  # 1 position per chunk, and one element budget below one position
        got, got_i = extraction.discrete_A_reduced(delta, A, reduction, dim, chunk_elements=chunk)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        if whole_i is not None:
            assert torch.equal(got_i, whole_i)


def test_input_sim_equals_recomputation(saved_tiny, ref, tmp_path):
    art = run_cli(cli.main_input_sim, base_args(saved_tiny, tmp_path / "sim.pkl", "--layer_idxs", "0", "1"))
    assert art["kind"] == "input_sim_with_discrete_A" and art["tensor_keys"] == ["input_sim_with_discrete_A"]
    for i in (0, 1):
        dA, x = ref[0][i]["discrete_A"], ref[0][i]["x"]
        want = (dA * x[:, :, None]).sum(1) / (dA.norm(dim=1) * x.norm(dim=1)[:, None])
        got = art["input_sim_with_discrete_A"][i]
        assert got.shape == (len(PROMPT), 16) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_out_dtype_float16_halves(saved_tiny, tmp_path):
    a32 = run_cli(cli.main_discrete_A, base_args(saved_tiny, tmp_path / "a.pkl", "--reduction", "norm", "--reduction_dim", "-2"))
    a16 = run_cli(cli.main_discrete_A, base_args(saved_tiny, tmp_path / "b.pkl", "--reduction", "norm",
                                                 "--reduction_dim", "-2", "--out_dtype", "float16"))
    assert a16["discrete_A"][0].dtype == torch.float16 and a16["out_dtype"] == "float16"
    torch.testing.assert_close(a16["discrete_A"][0].float(), a32["discrete_A"][0], rtol=2e-3, atol=1e-3)


def test_pickle_is_highest_protocol_and_atomic(saved_tiny, tmp_path):
    out = tmp_path / "sub" / "p.pkl"
    run_cli(cli.main_discrete_A, base_args(saved_tiny, out, "--reduction", "fro"))
    raw = out.read_bytes()
    assert raw[:2] == bytes([0x80, pickle.HIGHEST_PROTOCOL])
    assert os.listdir(out.parent) == ["p.pkl"]  # no temp file left behind


def test_mambabyte_extract_dispatch(saved_tiny, tmp_path, capsys):
    from mambabyte.cli.main import main as mb_main

    out = tmp_path / "d.pkl"
    rc = mb_main(["extract", "discrete-A", *base_args(saved_tiny, out, "--reduction", "mean", "--reduction_dim", "1")])
    assert rc == 0 and "stored the outputs to" in capsys.readouterr().out
    assert load_artefact(out)["discrete_A"][0].shape == (len(PROMPT), 16)
    out2 = tmp_path / "m.pkl"
    assert mb_main(["extract", "module-outputs", *base_args(saved_tiny, out2, "--module_ids", "conv1d")]) == 0
    assert load_artefact(out2)["conv1d"][1].shape == (len(PROMPT), 128)
    out3 = tmp_path / "s.pkl"
    assert mb_main(["extract", "input-sim", *base_args(saved_tiny, out3)]) == 0
    assert load_artefact(out3)["input_sim_with_discrete_A"][0].shape == (len(PROMPT), 16)


def test_prompt_file_and_config_path(tmp_path):
    pf = os.path.join(REPO, "pg19_samples", "860.txt")
    out = tmp_path / "pf.pkl"
    argv = ["--prompt_file", pf, "--config_path", os.path.join(REPO, "scripts", "configs", "mambabyte_lm.yml"),
            "--model_id", "tiny", "-o", str(out), "--reduction", "fro", "--layer_idxs", "-1", "--device", "cpu"]
    art = run_cli(cli.main_discrete_A, argv)
    with open(pf, "rb") as f:
        data = f.read()
    assert art["prompt_bytes"] == data and art["layer_idxs"] == [1] and art["model_id"] == "tiny"
    assert art["discrete_A"][1].shape == (len(data),)
    # discrete_A entries lie in (0, 1], so the Frobenius norm is at most sqrt(d_inner * d_state)
    assert (art["discrete_A"][1] > 0).all() and (art["discrete_A"][1] <= (128 * 16) ** 0.5 + 1e-4).all()


def test_oversize_refused(saved_tiny, tmp_path, capsys):
    out = tmp_path / "big.pkl"
    with pytest.raises(SystemExit) as e:
        cli.main_discrete_A(base_args(saved_tiny, out, "--max_output_gb", "0.00001"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    msg = [line for line in err if line.startswith("error:")]
    assert len(msg) == 1
    assert "--max_output_gb" in msg[0] and "--reduction" in msg[0] and "KB" in msg[0]
    assert not out.exists() and not any(tmp_path.glob("*.tmp"))


def test_size_estimate_matches_paper_scale():
    from mambabyte import MambaByteLM

    with torch.device("meta"):
        model = MambaByteLM.from_preset("972M")
    L = os.path.getsize(os.path.join(REPO, "pg19_samples", "4128.txt"))  # the 10 KB sample
    est = extraction.estimate_discrete_A(model, L, [0], None, None, torch.float32)
    assert 2.35 < est.gb < 2.45  # L x 3584 x 16 x 4 bytes: the issue's ~2.4 GB per layer
    assert extraction.format_bytes(est.total_bytes).startswith("2.39 GB")
    est = extraction.estimate_discrete_A(model, L, list(range(48)), "norm", 1, torch.float16)
    assert est.total_bytes < 20 * 10**6


BAD = [
    (cli.main_discrete_A, ["--reduction", "median"]),
    (cli.main_discrete_A, ["--reduction", "mean"]),  # needs --reduction_dim
    (cli.main_discrete_A, ["--reduction", "norm", "--reduction_dim", "5"]),
    (cli.main_discrete_A, ["--reduction_dim", "1"]),
    (cli.main_discrete_A, ["--layer_idxs", "7"]),
    (cli.main_discrete_A, ["--layer_idxs", "one"]),
    (cli.main_discrete_A, ["--out_dtype", "int8"]),
    (cli.main_discrete_A, ["--bogus_flag"]),
    (cli.main_module_outputs, ["--module_id", "dt_proj", "--nonlinearity", "sigmoidish"]),
    (cli.main_module_outputs, ["--module_id", "proj"]),  # ambiguous: in_proj, x_proj, dt_proj, out_proj
    (cli.main_module_outputs, ["--module_id", "attention"]),
    (cli.main_module_outputs, []),  # --module_id is required
    (cli.main_input_sim, ["--pretrained_model_filepath", "/nonexistent/ckpt"]),
]


@pytest.mark.parametrize("fn,extra", BAD, ids=[f"{f.__name__}:{' '.join(a) or 'none'}" for f, a in BAD])
def test_bad_flags_exit_2_with_one_line(saved_tiny, tmp_path, capsys, fn, extra):
    out = tmp_path / "bad.pkl"
    argv = ["--prompt", "abc", "-o", str(out), "--device", "cpu"]
    if "--pretrained_model_filepath" not in extra:
        argv += ["--pretrained_model_filepath", saved_tiny]
    with pytest.raises(SystemExit) as e:
        fn(argv + extra)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error" in lines[0]
    assert not out.exists()


def test_missing_prompt_and_unknown_subcommand(capsys, tmp_path):
    from mambabyte.cli.main import main as mb_main

    with pytest.raises(SystemExit) as e:
        cli.main_input_sim(["-o", str(tmp_path / "x.pkl")])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        mb_main(["extract", "attention-maps", "-o", "x.pkl"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_script_runs_as_file(saved_tiny, tmp_path):
    out = tmp_path / "script.pkl"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "extract_discrete_A.py"), "--prompt", "hello",
         "--pretrained_model_filepath", saved_tiny, "-o", str(out), "--reduction", "max", "--reduction_dim", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    art = load_artefact(out)
    assert art["discrete_A"][0].shape == (5, 128) and art["discrete_A_indices"][0].shape == (5, 128)


def test_imports_stay_light():
    code = (
        "import sys, mambabyte, mambabyte.cli.extract, mambabyte.analysis.extraction, mambabyte.analysis.artefact;"
        "bad = [m for m in ('matplotlib', 'mambabyte.training', 'mambabyte.generation') if m in sys.modules];"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_load_artefact_refuses_code_in_pickles(tmp_path):
    import os
    import pickle

    from mambabyte.analysis.artefact import load_artefact
    from mambabyte.errors import MambaByteError

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"prompt": "x", "layer_idxs": [0], "payload": Evil()}, f)
    with pytest.raises(MambaByteError, match="refusing to load"):
        load_artefact(bad)
    assert not (tmp_path / "pwned").exists()

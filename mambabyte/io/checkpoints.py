"""Checkpoint formats in and out.

Reads:

* our folders: ``config.json`` (a MambaByteConfig) + ``model.safetensors``;
* mamba_ssm ``MambaLMHeadModel`` folders: ``config.json`` (d_model, n_layer, vocab_size, ssm_cfg,
  rms_norm, tie_embeddings, ...) + ``pytorch_model.bin`` with ``backbone.*`` keys (the authors'
  released MambaByte_* checkpoints are of this kind);
* the MambaByte repo's ``.pt`` state dicts (``mambabyte.*`` keys, optionally under ``module.``), with a
  ``config.json`` beside the file or, failing that, a config inferred from the tensor shapes;
* single ``.safetensors`` / ``.bin`` / ``.pt`` files, training checkpoints that wrap a state dict;
* shipped model names (``mambabyte-small``) and, when huggingface_hub is installed and online, hub ids.

Pickled files are opened with ``torch.load(weights_only=True)`` only. Every problem becomes one
:class:`~mambabyte.errors.CheckpointError` line that lists what differs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import MambaByteConfig, PRESETS
from ..errors import CheckpointError, MambaByteError

Tensor = torch.Tensor
FORMAT_VERSION = 1

_OUR_WEIGHTS = "model.safetensors"
_MAMBA_WEIGHTS = "pytorch_model.bin"


# ---------------------------------------------------------------------------------------------------
# locating files
def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def mambabyte_home() -> Path:
    """``$MAMBABYTE_HOME`` or the user cache dir (``$XDG_CACHE_HOME/mambabyte``, ``~/.cache/mambabyte``)."""
    env = os.environ.get("MAMBABYTE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mambabyte"


def shipped_model_dirs() -> List[Path]:
    """Folders searched for shipped model names, in order."""
    dirs = [mambabyte_home() / "models", _package_root() / "pretrained_models", _package_root().parent / "pretrained_models"]
    return [d for d in dirs if d.is_dir()]


def list_shipped_models() -> List[str]:
    names = []
    for d in shipped_model_dirs():
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / "config.json").is_file() and sub.name not in names:
                names.append(sub.name)
    return names


def resolve_path(name_or_path: str) -> Path:
    """A local file or folder for ``name_or_path``: a path, a shipped name, or a hub id."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.exists():
        return p
    s = str(name_or_path)
    for d in shipped_model_dirs():
        if (d / s).is_dir():
            return d / s
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) and not s.startswith((".", "/")):
        return _hub_download(s)
    shipped = list_shipped_models()
    hint = f" (shipped models: {', '.join(shipped)})" if shipped else ""
    raise CheckpointError(f"no checkpoint at {s!r}: not a file or folder, not a shipped model name{hint}")


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # lazy: optional dependency
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local path and looks like a hub id, but huggingface_hub is not installed "
            "(pip install huggingface_hub)"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"]))
    except Exception as exc:  # offline, unknown repo, auth ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not fetch {repo_id!r} from the hub (offline or unknown id?): {first}") from None


# ---------------------------------------------------------------------------------------------------
# reading tensors
def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0][:300] if s else type(exc).__name__


def read_tensor_file(path: Path) -> Dict[str, Any]:
    """Tensors of a .safetensors file, or the object in a pickled torch file (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {str(path)!r} is empty")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"could not read {str(path)!r} as safetensors (corrupt or truncated?): {_first_line(exc)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        # torch's own message here suggests retrying with weights_only=False: unsafe advice for a
        # file from elsewhere, so it is not passed on
        why = "" if "weights only" in msg.lower().replace("_", " ") or "unpickler" in msg.lower() else f": {_first_line(exc)}"
        raise CheckpointError(
            f"could not read {str(path)!r} as a torch checkpoint with weights_only=True (corrupt, truncated, or "
            f"contains pickled objects we refuse to load){why}"
        ) from None


def _unwrap(obj: Any, source: str) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Any]]]:
    """(state_dict, embedded config dict or None) from a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    cfg = None
    for key in ("model_config", "config"):
        if isinstance(obj.get(key), dict):
            cfg = obj[key]
            break
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj.get(key), dict) and obj[key] and all(isinstance(v, Tensor) for v in obj[key].values()):
            return obj[key], cfg
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (keys: {', '.join(map(str, list(obj)[:8]))})")
    return tensors, cfg


def normalize_keys(sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], str]:
    """Map any supported key layout onto ours (mamba_ssm's). Returns (state_dict, layout name)."""
    out: Dict[str, Tensor] = {}
    layout = "mambabyte-lm"
    for k, v in sd.items():
        nk = k
        for prefix in ("module.", "_orig_mod.", "model."):
            while nk.startswith(prefix):
                nk = nk[len(prefix):]
        nk = nk.replace("._orig_mod.", ".")
        if nk.startswith("mambabyte."):
            layout = "mambabyte-repo"
            nk = nk[len("mambabyte."):]
            nk = nk.replace("token_embedding.", "embedding.", 1) if nk.startswith("token_embedding.") else nk
            nk = nk.replace("final_norm.", "norm_f.", 1) if nk.startswith("final_norm.") else nk
            nk = "backbone." + nk
        out[nk] = v
    return out, layout


# ---------------------------------------------------------------------------------------------------
# configs
def config_from_mamba_ssm(d: Dict[str, Any]) -> MambaByteConfig:
    """A MambaByteConfig from a mamba_ssm MambaConfig dict."""
    ssm = dict(d.get("ssm_cfg") or {})
    if ssm.pop("layer", "Mamba1") not in ("Mamba1", None):
        raise CheckpointError("this checkpoint uses Mamba-2 layers; MambaByte models are Mamba-1")
    if d.get("attn_layer_idx"):
        raise CheckpointError("this checkpoint has attention layers (hybrid model); not supported")
    if d.get("d_intermediate"):
        raise CheckpointError("this checkpoint has MLP layers (d_intermediate > 0); not supported")
    kw = dict(
        d_model=int(d["d_model"]),
        n_layer=int(d["n_layer"]),
        vocab_size=int(d.get("vocab_size", 256)),
        norm="rmsnorm" if d.get("rms_norm", True) else "layernorm",
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        tie_embeddings=bool(d.get("tie_embeddings", True)),
        pad_vocab_size_multiple=int(d.get("pad_vocab_size_multiple", 8)),
        norm_eps=float(d.get("norm_epsilon", d.get("norm_eps", 1e-5))),
    )
    allowed = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
               "conv_bias", "bias"}
    for k, v in ssm.items():
        if k in allowed:
            kw[k] = v
    return MambaByteConfig(**kw)


def config_from_dict(d: Dict[str, Any]) -> MambaByteConfig:
    """Our config.json, a mamba_ssm config.json, or the MambaByte repo's yml-style keys."""
    d = dict(d)
    d.pop("model_type", None)
    d.pop("format_version", None)
    d.pop("mambabyte", None)
    if "ssm_cfg" in d or "rms_norm" in d or "fused_add_norm" in d:
        return config_from_mamba_ssm(d)
    if "num_layers" in d and "n_layer" not in d:
        d["n_layer"] = d.pop("num_layers")
    return MambaByteConfig.from_dict(d)


def infer_config(sd: Dict[str, Tensor]) -> MambaByteConfig:
    """Infer a config from the tensor shapes of a (normalised) state dict."""
    try:
        emb = sd["backbone.embedding.weight"]
        layer_ids = {int(m.group(1)) for k in sd for m in [re.match(r"backbone\.layers\.(\d+)\.", k)] if m}
        n_layer = max(layer_ids) + 1 if layer_ids else 0
        in_proj = sd["backbone.layers.0.mixer.in_proj.weight"]
        A_log = sd["backbone.layers.0.mixer.A_log"]
        conv = sd["backbone.layers.0.mixer.conv1d.weight"]
        dt_w = sd["backbone.layers.0.mixer.dt_proj.weight"]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the model config from the tensors: key {exc} is missing") from None
    V, d_model = emb.shape
    d_inner = in_proj.shape[0] // 2
    if d_inner % d_model:
        raise CheckpointError(f"cannot infer the config: d_inner {d_inner} is not a multiple of d_model {d_model}")
    vocab = 256 if V >= 256 else V
    return MambaByteConfig(
        vocab_size=vocab,
        d_model=int(d_model),
        n_layer=int(n_layer),
        d_state=int(A_log.shape[1]),
        d_conv=int(conv.shape[-1]),
        expand=d_inner // d_model,
        dt_rank=int(dt_w.shape[1]) if int(dt_w.shape[1]) != -(-d_model // 16) else "auto",
        conv_bias="backbone.layers.0.mixer.conv1d.bias" in sd,
        bias="backbone.layers.0.mixer.in_proj.bias" in sd,
        norm="layernorm" if "backbone.norm_f.bias" in sd else "rmsnorm",
        tie_embeddings="lm_head.weight" not in sd,
        pad_vocab_size_multiple=V if V != vocab else 1,
    )


# ---------------------------------------------------------------------------------------------------
# loading
def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"could not read {str(path)!r} as JSON: {_first_line(exc)}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return d


def _locate(path: Path) -> Tuple[Path, Optional[Path]]:
    """(weights file, config.json or None) for a folder or a file."""
    if path.is_dir():
        cfg = path / "config.json"
        for name in (_OUR_WEIGHTS, _MAMBA_WEIGHTS, "model.pt", "pytorch_model.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name, cfg if cfg.is_file() else None
        cands = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")) + list(path.glob("*.pt")))
        if len(cands) == 1:
            return cands[0], cfg if cfg.is_file() else None
        raise CheckpointError(
            f"no weights in folder {str(path)!r}: expected {_OUR_WEIGHTS} or {_MAMBA_WEIGHTS}"
            + (f" (found several candidates: {', '.join(c.name for c in cands)})" if cands else "")
        )
    cfg = path.parent / "config.json"
    return path, cfg if cfg.is_file() else None


def check_state_dict(model, sd: Dict[str, Tensor], source: str) -> Dict[str, Tensor]:
    """Compare ``sd`` with the model's parameters; raise one CheckpointError listing every difference."""
    want = model.state_dict()
    tied = model.config.tie_embeddings
    sd = dict(sd)
    if tied:
        sd.pop("lm_head.weight", None)
        want = {k: v for k, v in want.items() if k != "lm_head.weight"}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(set(sd) & set(want))
        if tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    dtypes = [
        f"{k} is {sd[k].dtype}"
        for k in sorted(set(sd) & set(want))
        if not (sd[k].is_floating_point() and not sd[k].is_complex())
    ]
    problems = []

    def fmt(label: str, items: List[str]) -> None:
        if items:
            shown = ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
            problems.append(f"{label} [{shown}]")

    fmt(f"{len(missing)} missing", missing)
    fmt(f"{len(unexpected)} unexpected", unexpected)
    fmt(f"{len(shapes)} wrong shape", shapes)
    fmt(f"{len(dtypes)} not floating point", dtypes)
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model config: " + "; ".join(problems))
    return sd


def load_pretrained(name_or_path, device=None, dtype: Optional[torch.dtype] = None, model_id: Optional[str] = None):
    """Build a MambaByteLM from any supported checkpoint (see module docstring)."""
    from ..model import MambaByteLM

    path = resolve_path(str(name_or_path))
    weights, cfg_path = _locate(path)
    raw = read_tensor_file(weights)
    sd, embedded_cfg = _unwrap(raw, str(weights))
    sd, layout = normalize_keys(sd)
    try:
        if embedded_cfg is not None:
            config = config_from_dict(embedded_cfg)
        elif cfg_path is not None:
            config = config_from_dict(_read_json(cfg_path))
        elif model_id is not None:
            config = MambaByteConfig.from_preset(model_id)
        else:
            config = infer_config(sd)
    except CheckpointError:
        raise
    except (MambaByteError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"bad model config for {str(path)!r}: {_first_line(exc)}") from None
    with torch.device("meta"):
        skeleton = MambaByteLM(config)
    sd = check_state_dict(skeleton, sd, repr(str(weights)))
    model = MambaByteLM(config, device="cpu")
    # copy the tensors exactly (no re-initialisation noise survives); cast to the model's dtype
    own = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    model.cast_(dtype)  # A_log and D stay fp32, as the reference keeps them
    if device is not None:
        model = model.to(device)
    model.eval()
    model.source_path = str(path)  # type: ignore[attr-defined]
    model.source_layout = layout  # type: ignore[attr-defined]
    return model


# ---------------------------------------------------------------------------------------------------
# saving
def _stage(target: Path, write_fn) -> str:
    """Write a complete, synced temp file beside ``target`` through ``write_fn(tmp)``; returns its path
    (removed again if writing fails)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _atomic_write_bytes(target: Path, write_fn) -> None:
    tmp = _stage(target, write_fn)
    try:
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_file(target, write_fn) -> Path:
    """Write ``target`` through ``write_fn(tmp_path)`` into a temp file renamed into place.

    A failure (a full disk, a missing folder, no permission) leaves any old file intact and becomes one
    :class:`MambaByteError` line.
    """
    target = Path(os.fspath(target)).expanduser()
    try:
        _atomic_write_bytes(target, write_fn)
    except OSError as exc:
        raise MambaByteError(f"could not write {str(target)!r}: {exc.strerror or exc}") from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _text_writer(text: str):
    """write_fn for :func:`_stage` / :func:`_atomic_write_bytes` that writes ``text`` as UTF-8."""
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return w


def atomic_write_text(target, text: str) -> None:
    try:
        _atomic_write_bytes(Path(target), _text_writer(text))
    except OSError as exc:
        raise MambaByteError(f"could not write {str(target)!r}: {exc.strerror or exc}") from None


def save_pretrained(model, directory, dtype: Optional[torch.dtype] = None, extra_config: Optional[Dict[str, Any]] = None) -> None:
    """config.json + model.safetensors: both written to temp files first, then renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    tensors = {}
    for k, v in sd.items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not k.endswith(("A_log", ".D")):
            t = t.to(dtype)
        tensors[k] = t.contiguous().clone()
    cfg = {"model_type": "mambabyte", "format_version": FORMAT_VERSION, **model.config.to_dict()}
    meta = {"format": "pt", "mambabyte_format_version": str(FORMAT_VERSION)}
    text = json.dumps({**cfg, **({"mambabyte": extra_config} if extra_config else {})}, indent=2, sort_keys=True) + "\n"
    # both files are written in full before either replaces its old version, so a failure while writing
    # (a full disk) leaves the folder as it was, never new weights beside an old config
    staged = []
    try:
        staged.append((_stage(directory / _OUR_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta)),
                       directory / _OUR_WEIGHTS))
        staged.append((_stage(directory / "config.json", _text_writer(text)), directory / "config.json"))
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        raise MambaByteError(f"could not write the model to {str(directory)!r}: {exc.strerror or exc}") from None


__all__ = [
    "load_pretrained",
    "save_pretrained",
    "normalize_keys",
    "infer_config",
    "config_from_dict",
    "config_from_mamba_ssm",
    "read_tensor_file",
    "resolve_path",
    "list_shipped_models",
    "mambabyte_home",
    "atomic_write_text",
    "atomic_write_file",
    "PRESETS",
]

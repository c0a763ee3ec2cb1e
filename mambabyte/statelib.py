"""Recurrent states as files, built from text, combined, and kept in a local library.

* :func:`save_state` / :func:`load_state`: one ``.safetensors`` file per state -- tensors ``conv``
  (n_layer, b, d_inner, d_conv), ``ssm`` (n_layer, b, d_inner, d_state) and optionally ``logits``
  (b, 256) (the next-byte logits at the state, so generation can continue from an empty prompt) --
  plus JSON metadata in the safetensors header: format version, model fingerprint, bytes consumed,
  dtype, shapes, sha256 of the consumed text, the text itself or its source paths (the recipe that
  rebuilds it), description, tags, created time. Loading never unpickles anything.
* :func:`build_state`: stream long files through the model in chunks (constant memory, the scan resumed
  between chunks); equals one pass over the concatenated text.
* :func:`combine_states`: a weighted sum of compatible states.
* :class:`StateLibrary`: named states under ``$MAMBABYTE_HOME/states`` (``mambabyte state ...``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import MambaByteError, StateError
from .io.checkpoints import _atomic_write_bytes, mambabyte_home
from .state import MambaState

Tensor = torch.Tensor
STATE_FORMAT_VERSION = 1
META_KEY = "mambabyte_state"
SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# save / load
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# safetensors caps its JSON header near 100 MB; stored text is escaped JSON inside it
MAX_STORED_TEXT = 32 * 1024 * 1024


def save_state(
    path: Union[str, os.PathLike],
    state: MambaState,
    meta: Optional[Dict[str, Any]] = None,
    *,
    model=None,
    logits: Optional[Tensor] = None,
) -> Path:
    """Write ``state`` (and optional next-byte ``logits`` (b, 256)) to ``path`` atomically.

    ``meta`` may hold: ``fingerprint`` (else taken from ``model``), ``text`` (str/bytes consumed: its
    sha256 is stored, and the text itself when ``store_text`` is true), ``text_sha256``, ``source``
    (path or list of paths), ``description``, ``tags`` (list of str), ``model_config`` and any other
    JSON-serialisable keys (kept under ``extra``). Returns the path written.
    """
    if not isinstance(state, MambaState):
        raise StateError(f"save_state needs a MambaState, got {type(state).__name__}")
    meta = dict(meta or {})
    path = Path(path)
    if logits is None:
        logits = state.logits  # what the state carries (None for e.g. a combined state)
    fingerprint = meta.pop("fingerprint", None)
    if fingerprint is None and model is not None:
        fingerprint = model.fingerprint()
    text = meta.pop("text", None)
    store_text = bool(meta.pop("store_text", True))
    text_sha = meta.pop("text_sha256", None)
    if text is not None:
        tb = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        text_sha = hashlib.sha256(tb).hexdigest()
        if store_text and len(tb) > MAX_STORED_TEXT:
            raise StateError(
                f"the text is {len(tb):,} bytes; a state file stores at most {MAX_STORED_TEXT:,} bytes of text "
                f"(its header has a size limit): keep its source path instead of the text itself"
            )
    source = meta.pop("source", None)
    if isinstance(source, (str, os.PathLike)):
        source = [str(source)]
    tags = meta.pop("tags", None) or []
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t]
    model_config = meta.pop("model_config", None)
    if model_config is None and model is not None:
        model_config = model.config.to_dict()
    header: Dict[str, Any] = {
        "format": "mambabyte-state",
        "format_version": STATE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "bytes_consumed": int(state.bytes_consumed),
        "dtype": str(state.dtype).replace("torch.", ""),
        "shape": {"n_layer": state.n_layer, "batch_size": state.batch_size, "d_inner": state.d_inner,
                  "d_conv": state.d_conv, "d_state": state.d_state},
        "text_sha256": text_sha,
        "text": (tb.decode("utf-8", errors="surrogateescape") if text is not None and store_text else None),
        "text_is_utf8": (_is_utf8(tb) if text is not None and store_text else None),
        "source": source,
        "description": meta.pop("description", None),
        "tags": list(tags),
        "created": meta.pop("created", None) or _now(),
        "has_logits": logits is not None,
        "model_config": model_config,
        "extra": meta or None,
    }
    tensors = {"conv": state.conv.detach().to("cpu").contiguous().clone(),
               "ssm": state.ssm.detach().to("cpu").contiguous().clone()}
    if logits is not None:
        lg = torch.as_tensor(logits).detach().to("cpu", torch.float32)
        if lg.dim() == 1:
            lg = lg.unsqueeze(0)
        if lg.dim() != 2 or lg.shape[0] != state.batch_size:
            raise StateError(f"logits must be ({state.batch_size}, V) to go with this state; got {tuple(lg.shape)}")
        tensors["logits"] = lg.contiguous()
    try:
        blob = json.dumps(header, sort_keys=True)
    except TypeError as exc:
        raise StateError(f"state metadata is not JSON-serialisable: {exc}") from None
    from safetensors.torch import save_file

    try:
        _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: blob}))
    except OSError as exc:
        raise MambaByteError(f"could not write {str(path)!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # the serialiser's own errors (e.g. a header over its limit)
        raise StateError(f"could not write {str(path)!r}: {str(exc).strip() or type(exc).__name__}") from None
    return path


def meta_text_bytes(meta: Dict[str, Any]) -> Optional[bytes]:
    """The consumed text stored in a state's metadata, as bytes (None when not stored).

    Text is stored as a JSON string decoded with ``surrogateescape``, so non-UTF-8 bytes round-trip."""
    t = meta.get("text")
    return None if t is None else t.encode("utf-8", errors="surrogateescape")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _read_header(path: Path, data: bytes) -> Dict[str, Any]:
    if len(data) < 8:
        raise StateError(f"{path}: not a state file (truncated: {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise StateError(f"{path}: truncated or not a safetensors state file (header says {n} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path}: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise StateError(f"{path}: malformed safetensors header (not a JSON object)")
    return header


def read_state_file(path: Union[str, os.PathLike]) -> Tuple[MambaState, Dict[str, Any], Optional[Tensor]]:
    """(state on CPU, metadata dict, logits or None) from a state file; checks its own consistency."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"no state file at {str(path)!r}") from None
    except IsADirectoryError:
        raise StateError(f"{str(path)!r} is a directory, not a state file") from None
    except OSError as exc:
        raise StateError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    header = _read_header(path, data)
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY)
    if raw_meta is None:
        raise StateError(f"{path}: a safetensors file but not a MambaByte state (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: malformed state metadata JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "mambabyte-state":
        raise StateError(f"{path}: malformed state metadata (format is not 'mambabyte-state')")
    ver = meta.get("format_version")
    if not isinstance(ver, int) or ver > STATE_FORMAT_VERSION or ver < 1:
        raise StateError(f"{path}: state format version {ver!r} is not supported (this build reads 1..{STATE_FORMAT_VERSION})")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for truncated / corrupt payloads
        raise StateError(f"{path}: corrupt state file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for k in ("conv", "ssm"):
        if k not in tensors:
            raise StateError(f"{path}: state file has no '{k}' tensor")
    conv, ssm = tensors["conv"], tensors["ssm"]
    if conv.dim() != 4 or ssm.dim() != 4 or conv.shape[:3] != ssm.shape[:3]:
        raise StateError(f"{path}: malformed state tensors: conv {tuple(conv.shape)}, ssm {tuple(ssm.shape)}")
    shp = meta.get("shape") or {}
    want = (shp.get("n_layer"), shp.get("batch_size"), shp.get("d_inner"), shp.get("d_conv"))
    if want != tuple(conv.shape) or shp.get("d_state") != ssm.shape[3]:
        raise StateError(f"{path}: tensor shapes conv {tuple(conv.shape)} / ssm {tuple(ssm.shape)} disagree with the metadata {shp}")
    if not conv.is_floating_point() or conv.dtype != ssm.dtype:
        raise StateError(f"{path}: state tensors must share one floating dtype (got {conv.dtype}, {ssm.dtype})")
    logits = tensors.get("logits")
    if logits is not None and (logits.dim() != 2 or logits.shape[0] != conv.shape[1]):
        raise StateError(f"{path}: logits tensor has shape {tuple(logits.shape)}, expected ({conv.shape[1]}, V)")
    state = MambaState(conv, ssm, int(meta.get("bytes_consumed") or 0))
    return state, meta, logits


def load_state(
    path: Union[str, os.PathLike],
    model=None,
    *,
    allow_fingerprint_mismatch: bool = False,
    device=None,
    return_meta: bool = False,
):
    """Load a state saved by :func:`save_state` (a path, or a name in the state library).

    With ``model``: the state's shapes must fit it (always an error otherwise), and its fingerprint
    must equal ``model.fingerprint()`` unless ``allow_fingerprint_mismatch`` (for the same shapes).
    The state goes to the model's device (or ``device``). Returns the :class:`MambaState`, or
    ``(state, meta, logits)`` with ``return_meta=True``.
    """
    p = resolve_state_path(path)
    state, meta, logits = read_state_file(p)
    if model is not None:
        check_state_for_model(state, meta, model, allow_fingerprint_mismatch=allow_fingerprint_mismatch, where=str(p))
        if device is None:
            device = model.device
    if device is not None:
        state = state.to(device)
        logits = logits.to(device) if logits is not None else None
    if logits is not None and logits.dim() == 2 and logits.shape[0] == state.batch_size:
        state.logits = logits.float()
    return (state, meta, logits) if return_meta else state


def check_state_for_model(state: MambaState, meta: Dict[str, Any], model, allow_fingerprint_mismatch=False, where="state") -> None:
    cfg = model.config
    want = (cfg.n_layer, cfg.d_inner, cfg.d_conv, cfg.d_state)
    got = (state.n_layer, state.d_inner, state.d_conv, state.d_state)
    if want != got:
        raise StateError(
            f"{where}: state shape (n_layer, d_inner, d_conv, d_state) = {got} does not fit this model {want}"
        )
    fp = meta.get("fingerprint")
    if not allow_fingerprint_mismatch:
        mfp = model.fingerprint()
        if fp is None:
            raise StateError(f"{where}: the state records no model fingerprint; pass allow_fingerprint_mismatch (--force) to use it anyway")
        if fp != mfp:
            raise StateError(
                f"{where}: built by model {fp}, but this model is {mfp} (use allow_fingerprint_mismatch / --force to load anyway)"
            )


# ---------------------------------------------------------------------------------------------------
# build / combine
def _iter_sources(source) -> List[Tuple[str, Any]]:
    """-> [(label, bytes or Path)] in order."""
    if isinstance(source, (bytes, bytearray)):
        return [("<bytes>", bytes(source))]
    if isinstance(source, (str, os.PathLike)):
        return [(str(source), Path(source))]
    if isinstance(source, (list, tuple)):
        out = []
        for s in source:
            out += _iter_sources(s)
        return out
    raise MambaByteError(f"build_state source must be a path, bytes or a list of them; got {type(source).__name__}")


@torch.no_grad()
def build_state(
    model,
    source,
    chunk_bytes: int = 65536,
    state: Optional[MambaState] = None,
    progress: Optional[bool] = None,
    separator: bytes = b"",
    return_info: bool = False,
):
    """Stream ``source`` (a file path, bytes, or a list of them, concatenated in order with
    ``separator`` between) through ``model`` in ``chunk_bytes`` pieces, resuming the scan between
    pieces. Memory is bounded by one chunk; the result equals one forward pass over the whole text.

    Returns the state (batch 1), or ``(state, info)`` with ``return_info=True`` where info holds
    ``logits`` (1, 256) at the end, ``bytes``, ``text_sha256`` and ``sources``.
    """
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise MambaByteError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    items = _iter_sources(source)
    total = 0
    for label, obj in items:
        if isinstance(obj, Path):
            if not obj.is_file():
                raise MambaByteError(f"build_state: no such file {label!r}")
            total += obj.stat().st_size
        else:
            total += len(obj)
    total += len(separator) * max(0, len(items) - 1)
    if state is not None:
        model.check_state(state, 1)
        state = state.to(model.device, model.allocate_state(1).dtype)
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="build_state", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    sha = hashlib.sha256()
    consumed = 0
    logits = None
    pending = bytearray()
    dev = model.device

    def run(piece: bytes):
        nonlocal state, logits, consumed
        ids = torch.tensor(list(piece), dtype=torch.long, device=dev).unsqueeze(0)
        out = model(ids, state=state, return_state=True, num_last_tokens=1)
        state, logits = out.state, out.logits[:, -1].float()
        consumed += len(piece)
        sha.update(piece)
        if bar is not None:
            bar.update(len(piece))

    def feed(data: bytes):
        # always run full chunks so chunk boundaries do not depend on file boundaries
        pending.extend(data)
        while len(pending) >= chunk_bytes:
            run(bytes(pending[:chunk_bytes]))
            del pending[:chunk_bytes]

    try:
        for k, (label, obj) in enumerate(items):
            if k and separator:
                feed(separator)
            if isinstance(obj, Path):
                try:
                    with open(obj, "rb") as f:
                        while True:
                            block = f.read(chunk_bytes)
                            if not block:
                                break
                            feed(block)
                except OSError as exc:
                    raise MambaByteError(f"build_state: cannot read {label!r}: {exc.strerror or exc}") from None
            else:
                feed(obj)
        if pending:
            run(bytes(pending))
            pending.clear()
    finally:
        if bar is not None:
            bar.close()
    if consumed == 0:
        raise MambaByteError("build_state: the source is empty")
    info = {"logits": logits, "bytes": consumed, "text_sha256": sha.hexdigest(),
            "sources": [label for label, _ in items]}
    return (state, info) if return_info else state


def combine_states(states: Sequence[MambaState], weights: Optional[Sequence[float]] = None, normalize: bool = True) -> MambaState:
    """Weighted sum ``sum_i w_i * s_i`` of compatible states (same shapes, batch included).

    ``weights`` default to uniform; with ``normalize`` they are divided by their sum (which must not be
    0). The result is a new state; ``bytes_consumed`` is the largest of the inputs'.
    """
    states = list(states)
    if not states:
        raise StateError("combine_states needs at least one state")
    for s in states:
        if not isinstance(s, MambaState):
            raise StateError(f"combine_states takes MambaState objects, got {type(s).__name__}")
    for s in states[1:]:
        states[0].check_compatible(s, check_batch=True)
        if s.dtype != states[0].dtype:
            raise StateError(f"combine_states: dtypes differ ({states[0].dtype} vs {s.dtype})")
    if weights is None:
        weights = [1.0] * len(states)
    weights = [float(w) for w in weights]
    if len(weights) != len(states):
        raise StateError(f"combine_states: {len(states)} states but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise StateError(f"combine_states: weights must be finite, got {weights}")
    if normalize:
        tot = sum(weights)
        if abs(tot) < 1e-12:
            raise StateError("combine_states: the weights sum to 0 and cannot be normalised")
        weights = [w / tot for w in weights]
    dev = states[0].device
    conv = sum(w * s.conv.to(dev) for w, s in zip(weights, states))
    ssm = sum(w * s.ssm.to(dev) for w, s in zip(weights, states))
    return MambaState(conv, ssm, max(s.bytes_consumed for s in states))


# ---------------------------------------------------------------------------------------------------
# the library
def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(SUFFIX):
        raise MambaByteError(
            f"invalid state name {name!r}: use letters, digits, '.', '_' or '-' (no path separators, no {SUFFIX} suffix)"
        )
    return name


class StateLibrary:
    """Named state files in ``root`` (default ``mambabyte_home()/"states"``)."""

    def __init__(self, root: Optional[Union[str, os.PathLike]] = None) -> None:
        self.root = Path(root) if root is not None else mambabyte_home() / "states"

    def path(self, name: str) -> Path:
        return self.root / (check_name(name) + SUFFIX)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def names(self) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.iterdir() if p.is_file() and p.name.endswith(SUFFIX)
                      and not p.name.startswith("."))

    def save(self, name: str, state: MambaState, meta=None, *, model=None, logits=None, overwrite: bool = False) -> Path:
        p = self.path(name)
        if p.exists() and not overwrite:
            raise MambaByteError(f"a state named {name!r} already exists in {self.root} (use --force / overwrite=True)")
        return save_state(p, state, meta, model=model, logits=logits)

    def load(self, name: str, model=None, **kw):
        p = self.path(name)
        if not p.is_file():
            raise StateError(f"no state named {name!r} in {self.root}")
        return load_state(p, model, **kw)

    def info(self, name: str) -> Dict[str, Any]:
        p = self.path(name)
        if not p.is_file():
            raise StateError(f"no state named {name!r} in {self.root}")
        _, meta, _ = read_state_file(p)
        meta = dict(meta)
        meta["name"] = name
        meta["path"] = str(p)
        meta["file_bytes"] = p.stat().st_size
        return meta

    def list(self) -> List[Dict[str, Any]]:
        out = []
        for n in self.names():
            try:
                out.append(self.info(n))
            except StateError as exc:
                out.append({"name": n, "path": str(self.path(n)), "error": str(exc)})
        return out

    def remove(self, name: str) -> Path:
        p = self.path(name)
        if not p.is_file():
            raise StateError(f"no state named {name!r} in {self.root}")
        p.unlink()
        return p

    def export(self, name: str, dest: Union[str, os.PathLike], overwrite: bool = False) -> Path:
        src = self.path(name)
        if not src.is_file():
            raise StateError(f"no state named {name!r} in {self.root}")
        read_state_file(src)  # never export a broken file
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / src.name
        if dest.exists() and not overwrite:
            raise MambaByteError(f"{str(dest)!r} exists (use --force to overwrite)")
        try:
            _atomic_write_bytes(dest, lambda tmp: shutil.copyfile(src, tmp))
        except OSError as exc:
            raise MambaByteError(f"could not write {str(dest)!r}: {exc.strerror or exc}") from None
        return dest


def resolve_state_path(name_or_path: Union[str, os.PathLike], library: Optional[StateLibrary] = None) -> Path:
    """An existing file path as is; otherwise a name in the state library."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_file():
        return p
    s = os.fspath(name_or_path)
    lib = library or StateLibrary()
    if isinstance(s, str) and _NAME_RE.fullmatch(s) and not s.endswith(SUFFIX):
        q = lib.path(s)
        if q.is_file():
            return q
        raise StateError(f"no state file {s!r} and no state named {s!r} in {lib.root}")
    if p.exists():
        raise StateError(f"{str(p)!r} is not a state file")
    raise StateError(f"no state file at {str(p)!r}")


__all__ = [
    "save_state",
    "load_state",
    "read_state_file",
    "build_state",
    "combine_states",
    "StateLibrary",
    "resolve_state_path",
    "check_state_for_model",
    "meta_text_bytes",
    "STATE_FORMAT_VERSION",
]

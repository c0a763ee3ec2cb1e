"""Where training bytes come from: files, folders, globs, prepared shards and Hugging Face datasets.

A *source spec* is a string:

* a file path (any bytes: text, binary, a uint8 shard; read as-is, BOMs / CRLF / invalid UTF-8 untouched);
* a folder: every non-hidden file under it, recursively, in sorted order; a folder holding ``meta.json``
  and ``train.bin`` is a *prepared* folder (see :mod:`mambabyte.data.prepare`) and stands for its split;
* a glob (``books/*.txt``, ``**`` allowed), matched files in sorted order;
* ``hf:NAME`` or ``hf:NAME?config=C&split=S&column=text&streaming=1``: a Hugging Face dataset (the
  ``datasets`` package is imported only when such a spec is used). Each row is one document.

Documents (files, dataset rows) are concatenated, with an optional separator between them.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union
from urllib.parse import parse_qsl

from ..errors import MambaByteError

META_NAME = "meta.json"
READ_CHUNK = 1 << 22  # 4 MiB


@dataclass
class Source:
    """One resolved source: ``kind`` is "file", "prepared" or "hf"."""

    kind: str
    spec: str
    path: Optional[Path] = None
    options: Dict[str, str] = field(default_factory=dict)


def is_prepared_dir(path: Union[str, Path]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_NAME).is_file() and (p / "train.bin").is_file()


def parse_hf_spec(spec: str) -> Dict[str, str]:
    """``hf:NAME?config=C&split=S&column=text&streaming=1`` -> dict(name=..., config=..., ...)."""
    body = spec[3:]
    name, _, query = body.partition("?")
    if not name:
        raise MambaByteError(f"bad dataset spec {spec!r}: expected hf:NAME[?config=..&split=..&column=..&streaming=1]")
    opts = {"name": name, "split": "train", "column": "text", "streaming": "0"}
    allowed = {"config", "split", "column", "streaming", "revision", "data_dir", "data_files"}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in allowed:
            raise MambaByteError(f"bad dataset spec {spec!r}: unknown option {k!r} (use {', '.join(sorted(allowed))})")
        opts[k] = v
    return opts


def resolve_sources(specs: Union[str, Sequence[str]], what: str = "data") -> List[Source]:
    """Expand specs into an ordered list of :class:`Source`. Missing paths raise one clear error."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out: List[Source] = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith("hf:"):
            out.append(Source("hf", spec, options=parse_hf_spec(spec)))
            continue
        p = Path(spec).expanduser()
        if p.is_file():
            out.append(Source("file", spec, p))
        elif p.is_dir():
            if is_prepared_dir(p):
                out.append(Source("prepared", spec, p))
                continue
            files = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not files:
                raise MambaByteError(f"{what} folder {spec!r} holds no files")
            out.extend(Source("file", str(f), f) for f in files)
        elif any(ch in spec for ch in "*?["):
            files = sorted(Path(f) for f in _glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
            if not files:
                raise MambaByteError(f"{what} pattern {spec!r} matches no files")
            out.extend(Source("file", str(f), f) for f in files)
        else:
            raise MambaByteError(f"{what} path {spec!r} does not exist")
    if not out:
        raise MambaByteError(f"no {what} given")
    return out


def iter_hf_documents(opts: Dict[str, str]) -> Iterator[bytes]:
    """Rows of a Hugging Face dataset as UTF-8 bytes (bytes columns pass through)."""
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise MambaByteError("hf: sources need the 'datasets' package: pip install datasets") from None
    kw = {}
    for k in ("revision", "data_dir", "data_files"):
        if opts.get(k):
            kw[k] = opts[k]
    streaming = opts.get("streaming", "0").lower() in ("1", "true", "yes")
    try:
        ds = datasets.load_dataset(opts["name"], opts.get("config") or None, split=opts["split"], streaming=streaming, **kw)
    except Exception as exc:  # network, unknown name, bad split: one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MambaByteError(f"could not load dataset {opts['name']!r} (split {opts['split']!r}): {msg}") from None
    col = opts["column"]
    for i, row in enumerate(ds):
        if col not in row:
            raise MambaByteError(f"dataset {opts['name']!r} has no column {col!r} (columns: {', '.join(map(str, row))})")
        v = row[col]
        if v is None:
            continue
        if isinstance(v, str):
            yield v.encode("utf-8", errors="surrogateescape")
        elif isinstance(v, (bytes, bytearray, memoryview)):
            yield bytes(v)
        else:
            raise MambaByteError(f"dataset column {col!r} holds {type(v).__name__}, not text or bytes")


def iter_source_chunks(src: Source, separator: bytes = b"", split: str = "train") -> Iterator[bytes]:
    """The bytes of one source in chunks. Dataset rows are joined with ``separator``."""
    if src.kind == "file":
        with open(src.path, "rb") as f:
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    break
                yield chunk
    elif src.kind == "prepared":
        path = src.path / f"{split}.bin"
        if not path.is_file():
            raise MambaByteError(f"prepared folder {src.spec!r} has no {split}.bin")
        yield from iter_source_chunks(Source("file", str(path), path))
    elif src.kind == "hf":
        first = True
        for doc in iter_hf_documents(src.options):
            if not first and separator:
                yield separator
            first = False
            yield doc
    else:  # pragma: no cover
        raise MambaByteError(f"unknown source kind {src.kind!r}")


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_separator(sep: Union[str, bytes, None]) -> bytes:
    """A document separator from the command line: escapes like ``\\n`` and ``\\x00`` are understood."""
    if sep is None or sep == "":
        return b""
    if isinstance(sep, bytes):
        return sep
    try:
        return sep.encode("latin-1", errors="strict").decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return sep.encode("utf-8")

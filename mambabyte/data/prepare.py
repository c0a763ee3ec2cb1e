"""Write uint8 shards (``train.bin``, ``val.bin``) and ``meta.json`` from sources.

The shards are the raw bytes of the sources, concatenated (with an optional separator between
documents), so they can be memory-mapped and sampled without any decoding. ``meta.json`` records each
source with its sha256 and byte count, each split's byte count, sha256 and whitespace-separated word
count (for PG19-style word-level perplexity), and the separator.

Everything is written to temporary files and renamed into place, ``meta.json`` last: an interrupted
run leaves no half-written shard under the final names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import MambaByteError
from ..io.checkpoints import _umask
from .sources import META_NAME, READ_CHUNK, iter_source_chunks, resolve_sources

FORMAT = "mambabyte-bytes"
FORMAT_VERSION = 1

_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


class _WordCounter:
    """Counts whitespace-separated words (as Python's ``bytes.split()``) over a chunked stream."""

    def __init__(self) -> None:
        self.words = 0
        self.prev_space = True

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        sp = _WS[np.frombuffer(chunk, dtype=np.uint8)]
        prev = np.empty_like(sp)
        prev[0] = self.prev_space
        prev[1:] = sp[:-1]
        self.words += int(np.count_nonzero(prev & ~sp))
        self.prev_space = bool(sp[-1])


def count_words(data: bytes) -> int:
    c = _WordCounter()
    c.update(data)
    return c.words


def _file_stats(path: Path) -> Dict[str, object]:
    h, wc, n = hashlib.sha256(), _WordCounter(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            h.update(chunk)
            wc.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest(), "words": wc.words}


def _write_sources(specs, f, separator: bytes, split: str, records: List[dict], first: bool) -> bool:
    for src in resolve_sources(specs, what="data" if split == "train" else "val data"):
        h, n = hashlib.sha256(), 0
        if not first and separator:
            f.write(separator)
        first = False
        for chunk in iter_source_chunks(src, separator=separator, split=split):
            h.update(chunk)
            n += len(chunk)
            f.write(chunk)
        rec = {"split": split, "source": src.spec, "kind": src.kind, "bytes": n, "sha256": h.hexdigest()}
        if src.kind == "hf":
            rec["options"] = dict(src.options)
        records.append(rec)
    return first


def prepare_data(
    sources: Sequence[str],
    out_dir,
    val_sources: Optional[Sequence[str]] = None,
    val_fraction: float = 0.0,
    separator: bytes = b"",
) -> Dict[str, object]:
    """Write ``out_dir/train.bin``, ``out_dir/val.bin`` (when there is a val split) and ``meta.json``.

    ``val_sources`` give the val split explicitly; otherwise ``val_fraction`` of the concatenated
    training bytes (the tail) becomes the val split. Returns the meta dict.
    """
    if val_sources and val_fraction:
        raise MambaByteError("give either val sources or a val fraction, not both")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise MambaByteError(f"val fraction must be in [0, 1), got {val_fraction}")
    # resolve early so a missing path fails before anything is written
    resolve_sources(sources, what="data")
    if val_sources:
        resolve_sources(val_sources, what="val data")
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MambaByteError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from None
    tmps: List[str] = []

    def tmp(name: str) -> str:
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=str(out))
        os.close(fd)
        os.chmod(path, 0o666 & ~_umask())  # mkstemp makes 0600; shards get the usual permissions
        tmps.append(path)
        return path

    records: List[dict] = []
    done = False
    try:
        train_tmp = tmp("train.bin")
        with open(train_tmp, "wb") as f:
            _write_sources(sources, f, separator, "train", records, True)
        val_tmp = None
        if val_sources:
            val_tmp = tmp("val.bin")
            with open(val_tmp, "wb") as f:
                _write_sources(val_sources, f, separator, "val", records, True)
        elif val_fraction > 0:
            total = os.path.getsize(train_tmp)
            n_val = int(round(total * float(val_fraction)))
            if n_val < 2 or total - n_val < 2:
                raise MambaByteError(f"val fraction {val_fraction} of {total} bytes leaves an empty split")
            val_tmp = tmp("val.bin")
            with open(train_tmp, "r+b") as f, open(val_tmp, "wb") as g:
                f.seek(total - n_val)
                for chunk in iter(lambda: f.read(READ_CHUNK), b""):
                    g.write(chunk)
                f.truncate(total - n_val)
        splits = {}
        for name, path in (("train", train_tmp), ("val", val_tmp)):
            if path is None:
                continue
            stats = _file_stats(Path(path))
            if stats["bytes"] == 0:
                raise MambaByteError(f"the {name} split is empty")
            splits[name] = {"file": f"{name}.bin", **stats}
        for path in (train_tmp, val_tmp):
            if path is not None:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": "uint8",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "separator_hex": separator.hex(),
            "val_fraction": float(val_fraction) if not val_sources else None,
            "splits": splits,
            "sources": records,
        }
        os.replace(train_tmp, out / "train.bin")
        if val_tmp is not None:
            os.replace(val_tmp, out / "val.bin")
        elif (out / "val.bin").exists():
            os.unlink(out / "val.bin")  # stale split from an earlier run would contradict meta.json
        meta_tmp = tmp(META_NAME)
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, out / META_NAME)
        done = True
    except OSError as exc:
        raise MambaByteError(f"could not write shards in {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        for p in tmps:
            if os.path.exists(p):
                os.unlink(p)
        if not done and created:
            try:  # a failed run leaves no empty folder behind (only if this run made it)
                out.rmdir()
            except OSError:
                pass
    return meta


def read_meta(folder) -> Dict[str, object]:
    path = Path(folder) / META_NAME
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise MambaByteError(f"cannot read {str(path)!r}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise MambaByteError(f"{str(path)!r} is not a mambabyte shard description (format {meta.get('format')!r})")
    return meta

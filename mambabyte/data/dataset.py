"""Byte streams and the window samplers the trainer draws from.

Dimension glossary: ``b`` windows in a batch, ``L`` bytes per window (``seq_len``). A window of
``L + 1`` bytes gives inputs ``x = w[:-1]`` and targets ``y = w[1:]`` (both (b, L), int64).

* :class:`ByteData` -- a read-only uint8 array (memory-mapped for files and prepared shards).
* :class:`WindowSampler` -- random contiguous windows. Epoch ``e`` cuts the stream into
  non-overlapping windows at a random offset and visits them in a random order; both come from a
  generator seeded by ``(seed, e)``. Sample ``i`` is a pure function of ``(seed, i)``, so a run is
  deterministic given the seed and resumes mid-epoch from the sample index alone, and ranks of a
  distributed run take disjoint slices of the same global order.
* :class:`StreamSampler` -- for truncated backprop through time: ``n_streams`` contiguous regions,
  each read window after window, so the recurrent state can be carried from one window to the next.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import MambaByteError
from .sources import iter_source_chunks, parse_separator, resolve_sources


@dataclass
class ByteData:
    """A byte stream: ``array`` is a 1-D uint8 numpy array (often a read-only memmap)."""

    array: np.ndarray
    name: str = ""
    words: Optional[int] = None  # whitespace-separated words, when known (prepared shards)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        return self.array[start : start + length]


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise MambaByteError(f"data file {str(path)!r} is empty")
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_byte_data(specs: Union[str, Sequence[str]], split: str = "train", separator: Union[str, bytes] = b"",
                   what: str = "data") -> ByteData:
    """One byte stream from source specs (see :mod:`mambabyte.data.sources`).

    A single file or prepared folder is memory-mapped (``split`` picks ``train.bin`` / ``val.bin`` of
    a prepared folder); several sources are concatenated in memory with ``separator`` between them.
    """
    sep = parse_separator(separator)
    srcs = resolve_sources(specs, what=what)
    if len(srcs) == 1 and srcs[0].kind in ("file", "prepared"):
        s = srcs[0]
        if s.kind == "prepared":
            from .prepare import read_meta

            meta = read_meta(s.path)
            path = s.path / f"{split}.bin"
            if not path.is_file():
                raise MambaByteError(f"prepared folder {s.spec!r} has no {split} split ({split}.bin)")
            words = (meta.get("splits", {}).get(split) or {}).get("words")
            return ByteData(_memmap(path), name=str(path), words=words)
        return ByteData(_memmap(s.path), name=str(s.path))
    buf = io.BytesIO()
    for i, s in enumerate(srcs):
        if i and sep:
            buf.write(sep)
        for chunk in iter_source_chunks(s, separator=sep, split=split):
            buf.write(chunk)
    data = np.frombuffer(buf.getbuffer(), dtype=np.uint8).copy()
    if data.size == 0:
        raise MambaByteError(f"{what} {', '.join(map(str, specs if not isinstance(specs, str) else [specs]))} is empty")
    return ByteData(data, name=f"{len(srcs)} sources")


def split_tail(data: ByteData, fraction: float) -> Tuple[ByteData, ByteData]:
    """(head, tail) with the last ``fraction`` of the bytes in the tail (a held-out val split)."""
    n = len(data)
    k = int(round(n * fraction))
    if k < 2 or n - k < 2:
        raise MambaByteError(f"val_fraction {fraction} of {n} bytes leaves an empty split")
    return ByteData(data.array[: n - k], name=data.name + " (train part)"), ByteData(data.array[n - k :], name=data.name + " (val tail)")


def _to_batch(windows: List[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.stack(windows).astype(np.int64))
    return w[:, :-1], w[:, 1:]


class WindowSampler:
    """Random contiguous windows of ``seq_len`` (+1) bytes, deterministic in ``(seed, index)``."""

    def __init__(self, n_bytes: int, seq_len: int, seed: int = 0) -> None:
        if seq_len < 1:
            raise MambaByteError(f"seq_len must be >= 1, got {seq_len}")
        if n_bytes < seq_len + 1:
            raise MambaByteError(f"the data holds {n_bytes} bytes, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.n_bytes = int(n_bytes)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        span = seq_len + 1
        # windows start at offset + j * seq_len (they share one byte: the last target of one window is
        # the first input of the next, so every byte is a target exactly once per epoch)
        self.windows_per_epoch = max(1, (self.n_bytes - span) // self.seq_len)
        self.max_offset = min(self.seq_len, self.n_bytes - span - (self.windows_per_epoch - 1) * self.seq_len + 1)
        self._cache: Dict[int, Tuple[int, torch.Tensor]] = {}

    def _epoch(self, e: int) -> Tuple[int, torch.Tensor]:
        got = self._cache.get(e)
        if got is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + e * 7_919 + 17) % (2**63))
            offset = int(torch.randint(0, max(1, self.max_offset), (1,), generator=g))
            perm = torch.randperm(self.windows_per_epoch, generator=g)
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            got = self._cache[e] = (offset, perm)
        return got

    def start(self, index: int) -> int:
        """Byte offset of global sample ``index``."""
        e, j = divmod(int(index), self.windows_per_epoch)
        offset, perm = self._epoch(e)
        return offset + int(perm[j]) * self.seq_len

    def epoch_of(self, index: int) -> float:
        return index / self.windows_per_epoch

    def batch(self, data: ByteData, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (len(indices), seq_len) int64, for global sample indices."""
        span = self.seq_len + 1
        return _to_batch([np.asarray(data.window(self.start(i), span)) for i in indices])


class StreamSampler:
    """``n_streams`` consecutive-window readers over contiguous regions of the data (for TBPTT).

    Stream ``s`` owns bytes ``[s * region, (s + 1) * region)`` and its ``k``-th window starts at
    ``s * region + (k mod windows_per_region) * seq_len``. ``reset`` is True where a stream wraps
    around to the start of its region, i.e. where a carried state must be dropped.
    """

    def __init__(self, n_bytes: int, seq_len: int, n_streams: int, seed: int = 0) -> None:
        self.seq_len = int(seq_len)
        self.n_streams = int(n_streams)
        self.region = int(n_bytes) // self.n_streams
        self.windows_per_region = (self.region - 1) // self.seq_len
        if self.windows_per_region < 1:
            raise MambaByteError(
                f"tbptt: {n_bytes} bytes split into {n_streams} streams leaves fewer than seq_len + 1 = "
                f"{seq_len + 1} bytes per stream; use less data parallelism or a shorter seq_len"
            )
        self.seed = int(seed)

    def batch(self, data: ByteData, streams: Sequence[int], k: int) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Window ``k`` of each stream: (x, y, reset)."""
        j = int(k) % self.windows_per_region
        span = self.seq_len + 1
        wins = [np.asarray(data.window(s * self.region + j * self.seq_len, span)) for s in streams]
        x, y = _to_batch(wins)
        return x, y, j == 0

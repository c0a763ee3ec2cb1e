"""Bytes <-> text for generation: stop strings matched on bytes, and UTF-8 streaming.

* :class:`StopMatcher` finds the earliest occurrence of any stop sequence in a growing byte buffer,
  including occurrences that straddle the boundary between two decode steps (or two host syncs).
* :class:`Utf8Stream` releases text only as complete UTF-8 characters: a multi-byte character split
  across steps is held until its last byte arrives (invalid bytes become U+FFFD). Bytes that might be
  the start of a stop string are held back too, so a stop string never leaks into the stream.
"""

from __future__ import annotations

import codecs
from typing import Iterable, List, Optional, Sequence, Union

from ..errors import MambaByteError

StopSpec = Union[str, bytes, Sequence[Union[str, bytes]], None]


def normalize_stop(stop: StopSpec) -> List[bytes]:
    """``stop`` (a str, bytes, or a list of them) -> list of non-empty byte strings."""
    if stop is None:
        return []
    if isinstance(stop, (str, bytes, bytearray)):
        stop = [stop]
    out: List[bytes] = []
    for s in stop:
        if isinstance(s, str):
            try:  # surrogateescape: bytes a command line passed that are not UTF-8 come back unchanged
                b = s.encode("utf-8", errors="surrogateescape")
            except UnicodeEncodeError:
                raise MambaByteError(f"stop string {s!r} cannot be encoded as bytes (lone surrogate)") from None
        elif isinstance(s, (bytes, bytearray)):
            b = bytes(s)
        else:
            raise MambaByteError(f"stop strings must be str or bytes, got {type(s).__name__}")
        if not b:
            raise MambaByteError("stop strings must not be empty")
        if b not in out:
            out.append(b)
    return out


class StopMatcher:
    """Earliest match of any of ``stops`` in a buffer that grows at its end."""

    def __init__(self, stops: Iterable[bytes]) -> None:
        self.stops = [bytes(s) for s in stops]
        self.max_len = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, buf: bytes, new_from: int) -> Optional[tuple]:
        """(start, end) of the earliest stop occurrence that ends at or after ``new_from``, or None.

        ``buf[:new_from]`` was searched before, so only matches ending in the new bytes count; the
        search starts ``max_len - 1`` bytes before them to catch matches across the boundary.
        """
        if not self.stops:
            return None
        lo = max(0, new_from - self.max_len + 1)
        best = None
        for s in self.stops:
            i = buf.find(s, lo)
            if i != -1 and (best is None or i + len(s) < best[1] or (i + len(s) == best[1] and i < best[0])):
                best = (i, i + len(s))
        return best

    def holdback(self, buf: bytes) -> int:
        """How many trailing bytes of ``buf`` could still become the start of a stop string."""
        n = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), n, -1):
                if buf.endswith(s[:k]):
                    n = k
                    break
        return n


class Utf8Stream:
    """Incremental UTF-8 decoder that emits only whole characters (errors -> U+FFFD)."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.released = 0  # bytes handed to the decoder so far

    def feed(self, data: bytes) -> str:
        self.released += len(data)
        return self._dec.decode(data, final=False)

    def finish(self) -> str:
        return self._dec.decode(b"", final=True)


def bytes_to_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


__all__ = ["normalize_stop", "StopMatcher", "Utf8Stream", "bytes_to_text", "StopSpec"]

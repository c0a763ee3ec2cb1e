"""The decode ladder: prefill -> decode_one -> decode_n.

Shapes: b streams, L prompt bytes, V = 256.

* :func:`prefill` runs prompts (of any lengths) through the model's parallel forward, resuming from a
  given state, and returns the next-byte logits and the state after each prompt.
* :func:`decode_one` samples one byte per stream and feeds it back (one step).
* :func:`decode_n` runs up to n steps with a step runner (eager or CUDA graph), talking to the host only
  every ``sync_every`` steps to match stop strings and stream text. Rows that hit a stop string are
  rolled back exactly: the state snapshot taken at the start of a sync window is resumed over the kept
  bytes only, so every returned state equals the state after ``prompt + returned bytes``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..state import MambaState
from .cuda_graph import get_step_runner
from .sampling import SamplingParams, sample
from .text import StopMatcher, Utf8Stream

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# prefill
def forward_chunked(model, ids: Tensor, state: Optional[MambaState], chunk_bytes: int = 65536) -> Tuple[Tensor, MambaState]:
    """ids (b, L>=1) from ``state`` (or zero) -> (last-position logits (b, V) fp32, state after ids).

    Long inputs go through in chunks, each resuming the scan from the previous chunk's state, so memory
    stays bounded; the result equals one pass.
    """
    L = ids.shape[1]
    logits = None
    for s in range(0, L, chunk_bytes):
        out = model(ids[:, s : s + chunk_bytes], state=state, return_state=True, num_last_tokens=1)
        state, logits = out.state, out.logits[:, -1]
    return logits.float(), state


@torch.no_grad()
def prefill(
    model,
    prompts: Sequence[bytes],
    state: Optional[MambaState] = None,
    logits: Optional[Tensor] = None,
    chunk_bytes: int = 65536,
    cuda_graph: bool = False,
) -> Tuple[Tensor, MambaState]:
    """Consume ``prompts[i]`` from row i of ``state`` (zero state if None).

    Rows with an empty prompt keep their state and take their next-byte logits from ``logits`` (b, V)
    (the caller makes sure those exist). Prompts of equal length are run together in one forward.
    ``cuda_graph=True`` (CUDA only) replays a CUDA graph per (rows, length) up to ``chunk_bytes``,
    captured on first use (see :class:`~mambabyte.generation.cuda_graph.GraphedPrefill`).
    Returns (logits (b, V) fp32, state (b rows)); ``state`` is not modified.
    """
    b = len(prompts)
    dev = model.device
    out_state = state.clone() if state is not None else model.allocate_state(b)
    out_logits = torch.zeros(b, model.config.vocab_size, device=dev, dtype=torch.float32)
    if logits is not None:
        out_logits.copy_(logits.to(dev, torch.float32))
    groups: Dict[int, List[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
        if p:
            groups[len(p)].append(i)
    for L, rows in sorted(groups.items()):
        # bytes -> uint8 tensor without a Python int per byte, then one host-to-device copy
        flat = torch.frombuffer(bytearray(b"".join(prompts[i] for i in rows)), dtype=torch.uint8)
        ids = flat.view(len(rows), L).to(dev).long()
        src = state.select(rows) if state is not None else None
        runner = None
        if cuda_graph and ids.is_cuda and L <= chunk_bytes:
            from .cuda_graph import get_prefill_graph

            runner = get_prefill_graph(model, len(rows), L)
        if runner is not None:
            lg, st = runner(ids, src)
        else:
            lg, st = forward_chunked(model, ids, src, chunk_bytes)
        idx = torch.tensor(rows, device=dev)
        out_state.conv.index_copy_(1, idx, st.conv.to(out_state.dtype))
        out_state.ssm.index_copy_(1, idx, st.ssm.to(out_state.dtype))
        out_logits.index_copy_(0, idx, lg)
    base = state.bytes_consumed if state is not None else 0
    out_state.bytes_consumed = base + max((len(p) for p in prompts), default=0)
    return out_logits, out_state


# ---------------------------------------------------------------------------------------------------
# one step
@dataclass
class PenaltyState:
    """Per-row byte statistics for the penalties: ``seen`` (prompt + generated), ``counts`` (generated)."""

    seen: Tensor
    counts: Tensor

    @classmethod
    def create(cls, prompts: Sequence[bytes], device) -> "PenaltyState":
        b = len(prompts)
        seen = torch.zeros(b, 256, dtype=torch.bool)
        for i, p in enumerate(prompts):
            if p:
                seen[i, torch.tensor(list(set(p)), dtype=torch.long)] = True
        return cls(seen.to(device), torch.zeros(b, 256, dtype=torch.float32, device=device))

    def update(self, tok: Tensor) -> None:
        self.seen.scatter_(1, tok[:, None], True)
        self.counts.scatter_add_(1, tok[:, None], torch.ones_like(self.counts[:, :1]))


def decode_one(runner, logits: Tensor, params: SamplingParams, generator=None, penalties: Optional[PenaltyState] = None):
    """Sample one byte per row from ``logits`` (b, V), feed it; returns (bytes (b,), next logits (b, V))."""
    tok = sample(
        logits, params, generator,
        seen=penalties.seen if penalties is not None else None,
        counts=penalties.counts if penalties is not None else None,
    )
    if penalties is not None and params.uses_penalties:
        penalties.update(tok)
    return tok, runner(tok)


# ---------------------------------------------------------------------------------------------------
# n steps
@dataclass
class DecodeOutput:
    sequences: List[bytes]
    state: MambaState
    logits: Tensor
    stop_reasons: List[str]
    steps: int
    cuda_graph: bool
    rows_bytes_fed: List[int] = field(default_factory=list)


@torch.no_grad()
def decode_n(
    model,
    state: MambaState,
    logits: Tensor,
    max_new_bytes: int,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    stops: Sequence[bytes] = (),
    include_stop: bool = False,
    stream: Optional[Callable[[int, str], None]] = None,
    penalties: Optional[PenaltyState] = None,
    use_cuda_graph: bool = True,
    sync_every: int = 16,
) -> DecodeOutput:
    """Generate up to ``max_new_bytes`` bytes per row from (state, logits) after a prefill.

    ``stream(index, text)`` receives whole UTF-8 characters as they become final. ``state`` is not
    modified. The returned state/logits are those after each row's prompt + returned bytes.
    """
    b = logits.shape[0]
    n = int(max_new_bytes)
    dev = logits.device
    runner = get_step_runner(model, b, use_cuda_graph)
    runner.load(state)
    runner.state.bytes_consumed = state.bytes_consumed
    matcher = StopMatcher(stops)
    sync_every = max(1, int(sync_every))
    gen = torch.zeros(b, max(n, 1), dtype=torch.long, device=dev)
    bufs = [bytearray() for _ in range(b)]
    final_len: List[Optional[int]] = [None] * b
    reasons = ["length"] * b
    fixed: Dict[int, Tuple[MambaState, Tensor]] = {}
    streams = [Utf8Stream() for _ in range(b)] if stream is not None else None
    snaps: collections.deque = collections.deque()
    cur = logits
    t = 0
    steps = 0
    while t < n and any(f is None for f in final_len):
        c0 = t
        if matcher:
            snaps.append((c0, runner.state.clone(), cur.clone()))
            while len(snaps) >= 2 and snaps[1][0] <= c0 + 1 - matcher.max_len:
                snaps.popleft()
        c1 = min(n, c0 + sync_every)
        for t in range(c0, c1):
            tok, cur = decode_one(runner, cur, params, generator, penalties)
            gen[:, t] = tok
        steps += c1 - c0
        t = c1
        if not matcher and streams is None:
            continue  # nothing to look at on the host until the end: no sync at all
        new = gen[:, c0:c1].tolist()  # the one host sync per window
        for i in range(b):
            if final_len[i] is not None:
                continue
            old = len(bufs[i])
            bufs[i].extend(new[i])
            m = matcher.find(bytes(bufs[i]), old) if matcher else None
            if m is not None:
                keep = m[1] if include_stop else m[0]
                final_len[i] = keep
                reasons[i] = "stop"
                fixed[i] = _rewind_row(model, gen, i, keep, snaps)
            if streams is not None:
                if final_len[i] is not None:
                    upto = final_len[i]
                elif t >= n:
                    upto = len(bufs[i])
                else:
                    upto = len(bufs[i]) - (matcher.holdback(bytes(bufs[i])) if matcher else 0)
                text = streams[i].feed(bytes(bufs[i][streams[i].released : upto]))
                if final_len[i] is not None or t >= n:
                    text += streams[i].finish()
                if text:
                    stream(i, text)
    if not matcher and streams is None and n > 0:
        rows = gen[:, :n].tolist()
        bufs = [bytearray(r) for r in rows]
    sequences = []
    for i in range(b):
        k = final_len[i] if final_len[i] is not None else min(len(bufs[i]), n)
        sequences.append(bytes(bufs[i][:k]))
    out_state = runner.state.clone()
    out_logits = cur.clone()
    for i, (st, lg) in fixed.items():
        out_state.conv[:, i] = st.conv[:, 0]
        out_state.ssm[:, i] = st.ssm[:, 0]
        out_logits[i] = lg[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return DecodeOutput(sequences, out_state, out_logits, reasons, steps, runner.uses_cuda_graph)


def _rewind_row(model, gen: Tensor, i: int, keep: int, snaps) -> Tuple[MambaState, Tensor]:
    """State and logits of row i after exactly ``keep`` generated bytes: latest snapshot at or before
    ``keep``, resumed over the bytes between (one forward call)."""
    pos, st, lg = None, None, None
    for p, s, l in snaps:
        if p <= keep:
            pos, st, lg = p, s, l
    assert st is not None, "no snapshot before the stop position (internal error)"
    row = st.select(i)
    if keep == pos:
        return row, lg[i : i + 1].clone()
    out_logits, out_state = forward_chunked(model, gen[i : i + 1, pos:keep], row)
    return out_state, out_logits


__all__ = ["prefill", "forward_chunked", "decode_one", "decode_n", "DecodeOutput", "PenaltyState"]

"""Bits per byte on a byte stream, with the recurrent state carried across windows or reset per window.

Dimension glossary: ``s`` streams (contiguous chunks of the val bytes scored in parallel), ``M`` bytes
per chunk, ``L`` window length (``seq_len``).

The val bytes (at most ``max_bytes`` of them) are cut into ``s`` equal contiguous chunks; within a
chunk every byte after the first is a target. Two ways to score the same targets:

* **carried**: window ``k + 1`` starts from the state left by window ``k`` -- the whole chunk is read as
  one sequence, as only a recurrent model can do at constant memory;
* **window**: every window starts from the zero state (what a fixed-context model sees).

Carried bpb is the headline ``val_bpb`` when computed. Distributed runs split the chunks over ranks and
sum the results, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ByteData
from ..errors import MambaByteError

LN2 = math.log(2.0)


def autocast_context(device_type: str, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def word_perplexity(bpb: float, n_bytes: int, n_words: int) -> float:
    """PG19-style word-level perplexity: 2 ** (bits per byte * bytes / words)."""
    return float(2.0 ** (bpb * n_bytes / n_words))


@torch.no_grad()
def evaluate_bpb(
    model,
    data: ByteData,
    seq_len: int,
    streams: int = 8,
    mode: str = "both",
    max_bytes: Optional[int] = None,
    device=None,
    autocast_dtype: Optional[torch.dtype] = None,
    rank: int = 0,
    world_size: int = 1,
    num_words: Optional[int] = None,
) -> Dict[str, float]:
    """Score ``data`` with ``model``; returns a dict of metrics (see the module docstring).

    ``model`` is any module with MambaByteLM's call signature. ``num_words`` (or ``data.words``) enables
    word-level perplexity, computed only when the whole stream is scored.
    """
    if mode not in ("both", "carried", "window"):
        raise MambaByteError(f"eval mode must be both, carried or window, got {mode!r}")
    n = len(data) if max_bytes is None else min(len(data), int(max_bytes))
    streams = max(1, int(streams))
    n_streams = -(-streams // world_size) * world_size
    while n_streams > world_size and n // n_streams < 2:
        n_streams -= world_size
    M = n // n_streams
    if M < 2:
        raise MambaByteError(f"val data too short to score: {n} bytes for {n_streams} streams")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    local = list(range(rank, n_streams, world_size))
    arr = np.asarray(data.array[: n_streams * M]).reshape(n_streams, M)[local]
    chunk = torch.from_numpy(arr.astype(np.int64)).to(device)
    x_all, y_all = chunk[:, :-1], chunk[:, 1:]
    T = x_all.shape[1]
    L = int(seq_len)
    was_training = model.training
    model.eval()
    modes = ["carried", "window"] if mode == "both" else [mode]
    sums = {m: torch.zeros((), dtype=torch.float64, device=device) for m in modes}
    try:
        with autocast_context(device.type, autocast_dtype):
            for m in modes:
                state = None
                for k in range(0, T, L):
                    x, y = x_all[:, k : k + L], y_all[:, k : k + L]
                    if m == "carried":
                        out = model(x, state=state, return_state=True)
                        state = out.state
                    else:
                        out = model(x)
                    sums[m] += F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1), reduction="sum").double()
    finally:
        model.train(was_training)
    count = torch.tensor(float(T * len(local)), dtype=torch.float64, device=device)
    vec = torch.stack([count] + [sums[m] for m in modes])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(vec)
    vec = vec.tolist()
    total = vec[0]
    res: Dict[str, float] = {"val_bytes": int(total), "val_streams": n_streams, "val_seq_len": L}
    for m, s in zip(modes, vec[1:]):
        res[f"val_bpb_{m}"] = s / total / LN2
    head = "carried" if "carried" in modes else "window"
    res["val_bpb"] = res[f"val_bpb_{head}"]
    res["val_loss"] = res["val_bpb"] * LN2
    words = num_words if num_words is not None else data.words
    if words and n == len(data):
        res["val_words"] = int(words)
        res["val_word_ppl"] = word_perplexity(res["val_bpb"], len(data), int(words))
    return res

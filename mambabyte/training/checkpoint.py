"""Self-describing training checkpoints, written atomically.

A checkpoint is a ``torch.save`` dict readable with ``torch.load(weights_only=True)``:

``model`` (fp32 state dict), ``model_config`` (MambaByteConfig dict) -- so
``MambaByteLM.from_pretrained("ckpt.pt")`` loads it directly -- plus ``optimizer`` (keyed by parameter
name, so it loads under DDP, FSDP or a single process alike), ``scheduler``, ``step``, ``data``
(sampler seed and position, carried TBPTT states), ``rng`` (torch CPU / CUDA, Python), ``train_config``,
``metrics`` (best val bpb so far), ``world_size`` and ``format_version``.

Files: ``OUT/checkpoints/step_000123.pt`` (the last ``keep_last`` are kept) and ``OUT/checkpoints/best.pt``
(lowest val bpb). Each is written to a temp file in the same folder, fsynced, then renamed over the old
name, so a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import CheckpointError, MambaByteError
from ..io.checkpoints import _atomic_write_bytes, read_tensor_file

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def step_path(out_dir, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:06d}.pt"


def list_checkpoints(out_dir) -> List[Path]:
    """Step checkpoints in ``out_dir``, oldest first."""
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir) -> Optional[Path]:
    c = list_checkpoints(out_dir)
    return c[-1] if c else None


def save_checkpoint(path, payload: Dict[str, Any]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        _atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))
    except OSError as exc:
        raise MambaByteError(f"could not write checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    return path


def load_checkpoint(path) -> Dict[str, Any]:
    ck = read_tensor_file(Path(path))  # weights_only=True; a missing, empty or corrupt file is one error line
    if not isinstance(ck, dict) or "model" not in ck or "step" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a mambabyte training checkpoint (no model/step)")
    return ck


def prune_checkpoints(out_dir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``best.pt`` is never touched)."""
    for p in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        try:
            p.unlink()
        except OSError:
            pass


def rng_state() -> Dict[str, Any]:
    import random

    st: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    import random

    if not st:
        return
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "python" in st:
        v = st["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])

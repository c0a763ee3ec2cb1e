"""MambaByte: token-free byte-level language modelling with Mamba.

Quick use::

    import mambabyte
    model = mambabyte.MambaByteLM.from_pretrained("mambabyte-small")
    out = model(torch.tensor([list(b"Hello")]), return_state=True)
    out.logits.shape   # (1, 5, 256)
    out.state          # MambaState: per-layer conv windows and SSM states, fp32
"""

from .config import PRESETS, MambaByteConfig
from .errors import CheckpointError, MambaByteError, StateError

__version__ = "0.1.0"

__all__ = [
    "MambaByteConfig",
    "MambaByteLM",
    "MambaByteOutput",
    "MambaState",
    "MambaByteError",
    "CheckpointError",
    "StateError",
    "PRESETS",
    "__version__",
]

# Names that need torch (or heavier sub-modules) are imported on first use: `import mambabyte` itself
# does not import torch, so it stays fast (the first model use pays torch's own import time).
_LAZY = {
    "MambaByteLM": ("mambabyte.model", "MambaByteLM"),
    "MambaByteOutput": ("mambabyte.model", "MambaByteOutput"),
    "MambaState": ("mambabyte.state", "MambaState"),
    "save_state": ("mambabyte.statelib", "save_state"),
    "load_state": ("mambabyte.statelib", "load_state"),
    "build_state": ("mambabyte.statelib", "build_state"),
    "combine_states": ("mambabyte.statelib", "combine_states"),
    "generate": ("mambabyte.generation", "generate"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'mambabyte' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

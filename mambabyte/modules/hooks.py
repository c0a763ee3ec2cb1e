"""Whether forward hooks watch a module (then the fused paths step aside so the hooks see every value)."""

from __future__ import annotations

import torch.nn as nn


def has_forward_hooks(*modules: nn.Module) -> bool:
    """True when a global forward (pre-)hook is registered, or one on any of ``modules`` themselves
    (not their children: pass ``m.modules()`` for a whole subtree)."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)

"""Forward hooks on a MambaByteLM's per-layer modules.

Shapes: b batch (always 1 here), L bytes, C a module's output channels.

The model's normal (fast) forward calls every projection as a module, so a forward hook sees exactly
the values the model computes; nothing here needs a special slow mode.

* :func:`select_modules` -- which module of each layer a ``module_id`` names.
* :func:`hooked` -- a context manager that registers hooks and always removes them.
* :func:`per_position` -- a hooked output as a (L, C) tensor (tuple outputs -> first element,
  channel-first conv outputs transposed, batch dimension dropped).
* :data:`NONLINEARITIES` / :func:`get_nonlinearity` -- the functions ``--nonlinearity`` names.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MambaByteError

Tensor = torch.Tensor

NONLINEARITIES: Dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda t: t,
    "relu": F.relu,
    "lrelu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}


def get_nonlinearity(name: Optional[str]) -> Callable[[Tensor], Tensor]:
    """The function for ``name`` (None -> identity)."""
    key = "linear" if name is None else str(name).lower()
    if key not in NONLINEARITIES:
        raise MambaByteError(f"unknown nonlinearity {name!r}; choose one of: {', '.join(NONLINEARITIES)}")
    return NONLINEARITIES[key]


def layer_index(qualified_name: str) -> Optional[int]:
    """3 for ``backbone.layers.3.mixer.dt_proj``; None for modules outside the layers."""
    parts = qualified_name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def check_layer_idxs(model: nn.Module, layer_idxs: Optional[Sequence[int]]) -> List[int]:
    """Layer indices as a sorted, de-duplicated list (None -> every layer; negative ints count from the end)."""
    n = len(model.backbone.layers)
    if layer_idxs is None:
        return list(range(n))
    out = []
    for i in layer_idxs:
        j = int(i)
        if not -n <= j < n:
            raise MambaByteError(f"--layer_idxs {i} is out of range: this model has {n} layers (0..{n - 1})")
        out.append(j % n)
    if not out:
        raise MambaByteError("--layer_idxs is empty")
    return sorted(set(out))


def select_modules(model: nn.Module, module_id: str, layer_idxs: Sequence[int]) -> Dict[int, Tuple[str, nn.Module]]:
    """layer index -> (qualified name, module) of the module ``module_id`` names in each chosen layer.

    A module matches when its qualified name contains ``module_id`` (``dt_proj``, ``mixer.x_proj``,
    ``backbone.layers.3.mixer.dt_proj``, ...). When several modules of one layer match, the one whose
    name *ends* with ``module_id`` is taken (``mixer`` -> the mixer, not its sub-projections); if that
    is still ambiguous (``proj``), the names are listed in the error.
    """
    if not module_id or not module_id.strip():
        raise MambaByteError("--module_id is empty")
    wanted = set(layer_idxs)
    per_layer: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        li = layer_index(name)
        if li is None or li not in wanted or module_id not in name:
            continue
        per_layer.setdefault(li, []).append((name, mod))
    if not per_layer:
        leaf = sorted({n.split(".")[-1] for n, _ in model.backbone.layers[0].named_modules() if n})
        raise MambaByteError(
            f"--module_id {module_id!r} matches no module in layers {list(layer_idxs)}; "
            f"module names in a layer: {', '.join(leaf)}"
        )
    chosen: Dict[int, Tuple[str, nn.Module]] = {}
    for li, cands in sorted(per_layer.items()):
        if len(cands) > 1:
            ending = [c for c in cands if c[0] == module_id or c[0].endswith("." + module_id)]
            if len(ending) == 1:
                cands = ending
            else:
                names = ", ".join(n for n, _ in cands[:8])
                raise MambaByteError(
                    f"--module_id {module_id!r} is ambiguous: it matches {len(cands)} modules in layer {li} "
                    f"({names}); give a more specific name"
                )
        chosen[li] = cands[0]
    return chosen


def per_position(module: nn.Module, output) -> Tensor:
    """A hooked output as (L, C): tuples -> first element, (1, C, L) conv outputs -> (L, C)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise MambaByteError(f"{type(module).__name__} returned {type(output).__name__}, not a tensor")
    t = output.detach()
    if t.dim() == 3:
        if t.shape[0] != 1:
            raise MambaByteError(f"extraction runs one prompt at a time; got a batch of {t.shape[0]}")
        t = t[0]
        channels_first = getattr(module, "channels", None)
        if channels_first is not None and t.shape[0] == channels_first and hasattr(module, "width"):
            t = t.transpose(0, 1)  # CausalConv1d: (C, L) -> (L, C)
    elif t.dim() != 2:
        raise MambaByteError(f"cannot store a {t.dim()}-d output of {type(module).__name__} per position")
    return t


@contextlib.contextmanager
def hooked(modules: Dict[str, nn.Module], hook_fn: Callable[[str, nn.Module, object], None]) -> Iterator[None]:
    """Register ``hook_fn(name, module, output)`` as a forward hook on each module; remove them all on exit."""
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(lambda m, _inp, out, _n=name: hook_fn(_n, m, out)))
        yield
    finally:
        for h in handles:
            h.remove()

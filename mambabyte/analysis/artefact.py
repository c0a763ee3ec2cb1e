"""The pickled artefact an extraction run writes, and reading it back.

A pickle (highest protocol) of a plain dict, readable with ``pickle.load`` wherever torch is installed:

============================  ==========================================================================
key                           value
============================  ==========================================================================
``schema_version``            int (:data:`SCHEMA_VERSION`)
``kind``                      ``module_outputs`` | ``discrete_A`` | ``input_sim_with_discrete_A``
``tensor_keys``               the keys below that map layer index -> tensor
``<tensor key>``              {layer index: CPU tensor}; ``<module_id>`` (L, C) for module outputs,
                              ``discrete_A`` (L, d_inner, d_state) or reduced, ``discrete_A_indices``
                              (int64, min/max only), ``input_sim_with_discrete_A`` (L, d_state)
``dims``                      {tensor key: names of its dimensions, e.g. ("L", "d_state")}
``prompt``                    the prompt as text (UTF-8, undecodable bytes replaced)
``prompt_bytes``              the prompt's bytes (position i of every tensor is byte i)
``log_probs``                 (L-1,) float32 natural-log probability of each true next byte, or None
``probs``                     (L-1,) float32 exp(log_probs), or None
``ranks``                     (L-1,) int64: bytes with strictly higher probability (0 = top-1), or None
``model_id``                  preset / config name of the model
``module_id``, ``module_ids`` module outputs only (None otherwise); ``nonlinearity`` likewise
``layer_idxs``                list of int
``reduction``, ``reduction_dim``  discrete_A only (None otherwise; None dim for fro / nuc)
``pretrained_model_filepath`` the checkpoint given, else the shipped default loaded (None: random init)
``config``                    the model's MambaByteConfig as a dict
``out_dtype``, ``seed``, ``mambabyte_version``, ``created``
============================  ==========================================================================
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import MambaByteError
from ..io.checkpoints import atomic_write_file

SCHEMA_VERSION = 1
KINDS = ("module_outputs", "discrete_A", "input_sim_with_discrete_A")
REQUIRED_KEYS = (
    "schema_version", "kind", "tensor_keys", "dims", "prompt", "prompt_bytes", "log_probs", "probs", "ranks",
    "model_id", "layer_idxs", "reduction", "reduction_dim", "pretrained_model_filepath", "config",
)


def build_artefact(kind: str, result, prompt: bytes, model, *, model_id: Optional[str] = None,
                   pretrained_model_filepath: Optional[str] = None, module_ids=None, nonlinearity: Optional[str] = None,
                   reduction: Optional[str] = None, reduction_dim: Optional[int] = None, out_dtype=None,
                   seed: Optional[int] = None) -> Dict[str, Any]:
    """The artefact dict for an :class:`~mambabyte.analysis.extraction.ExtractionResult`."""
    from .. import __version__

    if kind not in KINDS:
        raise ValueError(f"unknown artefact kind {kind!r}")
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    cfg = model.config
    art: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "tensor_keys": list(result.tensors),
        "dims": {k: tuple(v) for k, v in result.dims.items()},
        "prompt": bytes(prompt).decode("utf-8", errors="replace"),
        "prompt_bytes": bytes(prompt),
        "log_probs": result.stats.log_probs,
        "probs": result.stats.probs,
        "ranks": result.stats.ranks,
        "model_id": model_id or getattr(cfg, "name", None),
        "module_id": None,
        "module_ids": None,
        "nonlinearity": nonlinearity,
        "layer_idxs": list(result.layer_idxs),
        "reduction": reduction,
        "reduction_dim": None if reduction in ("fro", "nuc") else reduction_dim,
        "pretrained_model_filepath": pretrained_model_filepath,
        "config": cfg.to_dict(),
        "out_dtype": str(out_dtype).replace("torch.", "") if out_dtype is not None else None,
        "seed": seed,
        "mambabyte_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if module_ids is not None:
        ids = [module_ids] if isinstance(module_ids, str) else list(module_ids)
        art["module_ids"] = ids
        art["module_id"] = ids[0] if len(ids) == 1 else ids
    for k, per_layer in result.tensors.items():
        if k in art:
            raise MambaByteError(f"--module_id {k!r} collides with an artefact field of the same name")
        art[k] = {int(i): t for i, t in sorted(per_layer.items())}
    return art


def save_artefact(artefact: Dict[str, Any], path) -> Path:
    """Pickle (highest protocol) to a temp file beside ``path``, fsync, then rename into place."""
    target = Path(os.fspath(path)).expanduser()
    if target.is_dir():
        raise MambaByteError(f"--filepath_to_store_outputs {str(target)!r} is a folder; give a file name such as out.pkl")
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(artefact, f, protocol=pickle.HIGHEST_PROTOCOL)

    return atomic_write_file(target, write)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and torch tensors only; any other global (os.system, eval, a class) is refused.

    A pickle can run arbitrary code through the globals it names, and artefacts are files people
    share, so only what an artefact needs is resolved: builtin containers and scalars, OrderedDict,
    torch dtypes, torch's tensor rebuild function, and the storage loader (replaced by one that reads the
    storage bytes with ``torch.load(weights_only=True)``), plus numpy's array reconstruction.
    """

    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "bool", "complex", "slice", "range"}

    def find_class(self, module: str, name: str):
        import torch

        if module == "builtins" and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            import torch._utils

            return getattr(torch._utils, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            import io

            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            import importlib

            return getattr(importlib.import_module(module), name)
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            import numpy

            return getattr(numpy, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (artefacts hold only data and tensors)")


def load_artefact(path) -> Dict[str, Any]:
    """Read and check an artefact. Only data and tensors are unpickled; code references are refused."""
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise MambaByteError(f"no artefact at {str(p)!r}")
    try:
        import torch  # noqa: F401  (tensors inside the pickle need it)

        with open(p, "rb") as f:
            art = _SafeUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError, KeyError,
            IndexError) as exc:
        raise MambaByteError(f"{str(p)!r} is not a readable artefact pickle: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(art, dict) and "schema_version" not in art and "prompt" in art and "layer_idxs" in art:
        art = from_paper_artefact(art)
    check_artefact(art, str(p))
    return art


def from_paper_artefact(old: Dict[str, Any]) -> Dict[str, Any]:
    """Convert a pickle written by the MambaByte paper code's scripts to this schema.

    Those dicts hold ``prompt`` (str), one tensor key, ``log_probs`` (which were plain probabilities),
    ``ranks``, ``model_id``, ``layer_idxs``, ``pretrained_model_filepath`` and, for discrete_A,
    ``reduction`` (no ``reduction_dim``). Dimension names that cannot be known are left generic.
    """
    import torch

    if "input_sim_with_discrete_A" in old:
        kind, keys = "input_sim_with_discrete_A", ["input_sim_with_discrete_A"]
    elif "discrete_A" in old:
        kind, keys = "discrete_A", ["discrete_A"]
    elif isinstance(old.get("module_id"), str) and isinstance(old.get(old["module_id"]), dict):
        kind, keys = "module_outputs", [old["module_id"]]
    else:
        raise MambaByteError("this pickle is neither a mambabyte artefact nor one of the paper code's")
    new = dict(old)
    dims = {}
    for k in keys:
        first = next(iter(old[k].values()), None)
        nd = first.dim() if isinstance(first, torch.Tensor) else 0
        if kind == "discrete_A" and nd == 3:
            dims[k] = ("L", "d_inner", "d_state")
        elif kind == "input_sim_with_discrete_A":
            dims[k] = ("L", "d_state")
        else:
            dims[k] = ("L",) + tuple(f"dim{i}" for i in range(1, nd))
    probs = old.get("log_probs")
    prompt = old.get("prompt") or ""
    new.update(
        schema_version=0,
        kind=kind,
        tensor_keys=keys,
        dims=dims,
        prompt_bytes=prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt),
        probs=probs,
        log_probs=probs.double().log().float() if isinstance(probs, torch.Tensor) else None,
        reduction=old.get("reduction"),
        reduction_dim=old.get("reduction_dim"),
        config=old.get("config"),
        module_ids=[old["module_id"]] if kind == "module_outputs" else None,
        legacy_paper_artefact=True,
    )
    new.setdefault("pretrained_model_filepath", None)
    new.setdefault("model_id", None)
    return new


def check_artefact(art: Any, where: str = "artefact") -> None:
    if not isinstance(art, dict):
        raise MambaByteError(f"{where} holds a {type(art).__name__}, not an artefact dict")
    missing = [k for k in REQUIRED_KEYS if k not in art]
    if missing:
        raise MambaByteError(f"{where} is not a mambabyte artefact (missing keys: {', '.join(missing)})")
    if art["schema_version"] > SCHEMA_VERSION:
        raise MambaByteError(f"{where} has schema_version {art['schema_version']}; this mambabyte reads up to {SCHEMA_VERSION}")
    for k in art["tensor_keys"]:
        if not isinstance(art.get(k), dict):
            raise MambaByteError(f"{where}: tensor key {k!r} does not map layer index -> tensor")

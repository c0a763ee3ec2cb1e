"""MambaByteConfig: the model's hyper-parameters, with named presets.

Presets: ``353M`` and ``972M`` are the paper's (d_model 1024 x 53 layers and 1792 x 48). The small
ones are for tests, demos and CPU training: ``tiny`` (d_model 64, 2 layers), ``mini`` (128 x 4),
``small`` (256 x 8, the CPU benchmark shape), ``base-16m`` (512 x 12) and ``draft`` (128 x 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Union

from .errors import MambaByteError

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layer=2),
    "mini": dict(d_model=128, n_layer=4),
    "draft": dict(d_model=128, n_layer=2),
    "small": dict(d_model=256, n_layer=8),
    "base-16m": dict(d_model=512, n_layer=12),
    "353M": dict(d_model=1024, n_layer=53),
    "972M": dict(d_model=1792, n_layer=48),
}


@dataclass
class MambaByteConfig:
    """Hyper-parameters of a MambaByte LM (Mamba-1 blocks over raw bytes)."""

    vocab_size: int = 256
    d_model: int = 256
    n_layer: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = False
    pad_vocab_size_multiple: int = 1
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return int(self.expand * self.d_model)

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, int(self.pad_vocab_size_multiple))
        return ((self.vocab_size + m - 1) // m) * m

    def num_parameters(self) -> int:
        """Parameter count implied by the config (matches ``sum(p.numel())`` of the model)."""
        d, di, n, r, w = self.d_model, self.d_inner, self.d_state, self.dt_rank_value, self.d_conv
        norm_p = 2 * d if self.norm == "layernorm" else d
        mixer = d * 2 * di + (2 * di if self.bias else 0)  # in_proj
        mixer += di * w + (di if self.conv_bias else 0)  # conv1d
        mixer += di * (r + 2 * n)  # x_proj
        mixer += r * di + di  # dt_proj
        mixer += di * n + di  # A_log, D
        mixer += di * d + (d if self.bias else 0)  # out_proj
        V = self.padded_vocab_size
        total = V * d + self.n_layer * (mixer + norm_p) + norm_p
        if not self.tie_embeddings:
            total += V * d
        return total

    # -- validation / (de)serialisation --------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise MambaByteError(f"invalid MambaByteConfig: {msg}")

        for k in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            v = getattr(self, k)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{k} must be a positive int, got {v!r}")
        need(self.vocab_size >= 256, f"vocab_size must be >= 256 for a byte model, got {self.vocab_size}")
        need(self.d_conv <= 8, f"d_conv must be <= 8, got {self.d_conv}")
        need(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
             f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        need(self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        need(0 < self.dt_min <= self.dt_max, f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        need(self.dt_init in ("random", "constant"), f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MambaByteConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MambaByteError(f"unknown MambaByteConfig keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MambaByteConfig":
        if name not in PRESETS:
            raise MambaByteError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        kw.setdefault("name", name)
        return cls(**kw)

    def fingerprint_dict(self) -> Dict[str, Any]:
        """The fields that determine the computation (name excluded)."""
        d = self.to_dict()
        d.pop("name", None)
        return d


def preset_names():
    return list(PRESETS)


def read_yaml(path: str, what: str = "config") -> Any:
    """The parsed YAML document at ``path``; an unreadable or invalid file is one MambaByteError line."""
    import yaml  # fast, but only needed here

    try:
        with open(path, "r", encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise MambaByteError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise MambaByteError(f"{what} {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None


def config_from_yaml(path: str, model_id: str) -> MambaByteConfig:
    """A config from a YAML file in the paper code's layout (model.common + model.<model_id>).

    ``num_layers`` is accepted for ``n_layer``; unknown keys are an error.
    """
    doc = read_yaml(path)
    model = (doc or {}).get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise MambaByteError(f"config {path!r} has no 'model' section")
    if model_id not in model:
        ids = [k for k in model if k != "common"]
        raise MambaByteError(f"config {path!r} has no model {model_id!r} (it has: {', '.join(ids)})")
    kw: Dict[str, Any] = {}
    kw.update(model.get("common") or {})
    kw.update(model[model_id] or {})
    if "num_layers" in kw:
        kw["n_layer"] = kw.pop("num_layers")
    for ignored in ("use_fast_path", "disable_optimizations", "is_generating"):
        kw.pop(ignored, None)
    kw.setdefault("name", model_id)
    return MambaByteConfig.from_dict(kw)

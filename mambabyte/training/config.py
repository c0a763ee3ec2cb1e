"""The training configuration: a flat dataclass read from YAML, overridable key by key.

YAML layout (every key optional except the data; see ``scripts/configs/*.yml``)::

    model: {preset: tiny, d_model: 96}   # a preset name and/or MambaByteConfig fields
    data: [path/or/glob, ...]            # see mambabyte.data.sources
    seq_len: 256
    batch_size: 8                        # global windows per optimizer step
    ...

Overrides: ``key=value`` strings (``model.d_model=96`` reaches into the model section). Values are
parsed as YAML scalars and checked against the field's type; an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from ..config import MambaByteConfig
from ..errors import MambaByteError


@dataclass
class TrainConfig:
    # model --------------------------------------------------------------------------------------
    model: Dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    init_from: Optional[str] = None  # start from these weights (any format from_pretrained reads)
    # data ---------------------------------------------------------------------------------------
    data: List[str] = field(default_factory=list)
    val_data: List[str] = field(default_factory=list)
    val_fraction: float = 0.0  # with no val_data: hold out this tail fraction of the training bytes
    doc_separator: str = ""  # between concatenated files / rows ("\n\n", "\x00", ...)
    seq_len: int = 8192
    batch_size: int = 8  # global windows per optimizer step (all ranks, all micro-steps)
    micro_batch_size: Optional[int] = None  # at most this many windows per forward per rank; default: batch_size / world
    tbptt: bool = False  # carry the detached state from window to window of each stream
    # optimisation -------------------------------------------------------------------------------
    max_steps: int = 1000
    max_time_minutes: Optional[float] = None  # stop cleanly (eval, checkpoint, export) after this
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # cosine | linear | constant
    lr_decay_steps: Optional[int] = None  # schedule length; default max_steps
    decay_by_time: bool = False  # schedule progress = max(step / decay_steps, elapsed / max_time)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # hardware -----------------------------------------------------------------------------------
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    check_sync: bool = False  # at the end, verify every rank holds identical parameters
    seed: int = 0
    # evaluation ---------------------------------------------------------------------------------
    eval_every: int = 500  # 0: only at the end
    eval_bytes: Optional[int] = 1_000_000  # cap on val bytes scored per eval (None: all)
    eval_seq_len: Optional[int] = None  # default seq_len
    eval_streams: int = 8  # parallel contiguous chunks of the val stream
    eval_mode: str = "both"  # both | carried | window
    eval_at_start: bool = False
    # checkpoints / logging / export -------------------------------------------------------------
    out_dir: str = "runs/default"
    checkpoint_every: int = 1000  # 0: only at the end
    keep_last: int = 3
    keep_best: bool = True
    resume: Union[bool, str] = False  # True: latest checkpoint in out_dir; or a checkpoint path
    overwrite: bool = False  # a fresh run may replace the checkpoints of an earlier run in out_dir
    log_every: int = 1
    progress: str = "auto"  # auto (when stderr is a terminal) | on | off
    tensorboard: bool = False
    export_dir: Optional[str] = None
    export_dtype: str = "bf16"
    export_which: str = "last"  # last | best

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise MambaByteError(f"bad training config: {msg}")

        for k in ("seq_len", "batch_size", "max_steps", "eval_streams", "keep_last", "log_every"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "eval_every", "checkpoint_every"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size must be >= 1")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.grad_clip >= 0, "grad_clip must be >= 0")
        need(self.lr_schedule in ("cosine", "linear", "constant"), f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        need(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}")
        need(self.eval_mode in ("both", "carried", "window"), f"eval_mode must be both, carried or window, got {self.eval_mode!r}")
        need(self.progress in ("auto", "on", "off"), f"progress must be auto, on or off, got {self.progress!r}")
        need(self.export_which in ("last", "best"), f"export_which must be last or best, got {self.export_which!r}")
        need(self.export_dtype in ("bf16", "fp16", "fp32"), f"export_dtype must be bf16, fp16 or fp32, got {self.export_dtype!r}")
        need(self.max_time_minutes is None or self.max_time_minutes > 0, "max_time_minutes must be > 0")
        need(not self.decay_by_time or self.max_time_minutes, "decay_by_time needs max_time_minutes")
        need(self.eval_seq_len is None or self.eval_seq_len >= 1, "eval_seq_len must be >= 1")
        need(self.eval_bytes is None or self.eval_bytes >= 2, "eval_bytes must be >= 2")
        need(self.lr_decay_steps is None or self.lr_decay_steps >= 1, "lr_decay_steps must be >= 1")
        need(bool(self.data), "no training data: set data in the config or pass --data")
        self.model_config()  # raises on a bad model section
        return self

    def model_config(self) -> MambaByteConfig:
        m = dict(self.model or {})
        preset = m.pop("preset", None)
        try:
            if preset is not None:
                return MambaByteConfig.from_preset(str(preset), **m)
            return MambaByteConfig(**m)
        except TypeError as exc:
            raise MambaByteError(f"bad model section in the training config: {exc}") from None


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_MODEL_KEYS = {f.name for f in dataclasses.fields(MambaByteConfig)} | {"preset"}


def _check_type(key: str, value: Any) -> Any:
    """Coerce ``value`` to the declared type of TrainConfig.<key> or raise a one-line error."""
    tp = typing.get_type_hints(TrainConfig)[key]
    if key == "progress" and isinstance(value, bool):  # YAML reads a bare off / on as a bool
        return "on" if value else "off"
    if isinstance(value, str) and tp is not str:
        parsed = _parse_scalar(value)
        if not isinstance(parsed, str) or typing.get_origin(tp) in (list, List, Union):
            value = parsed if not (isinstance(parsed, str) and typing.get_origin(tp) in (list, List)) else value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin is Union and type(None) in args
    if value is None:
        if optional:
            return None
        raise MambaByteError(f"config key {key!r} cannot be null")
    if optional:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Union[tuple(inner)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:  # e.g. resume: bool | str
        if isinstance(value, bool) or isinstance(value, str):
            return value
        raise MambaByteError(f"config key {key!r} must be true/false or a path, got {value!r}")
    if origin in (list, List):
        if isinstance(value, (str, Path)):
            return [str(value)]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, Path)) for v in value):
            return [str(v) for v in value]
        raise MambaByteError(f"config key {key!r} must be a path or a list of paths, got {value!r}")
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise MambaByteError(f"config key {key!r} must be a mapping, got {value!r}")
        bad = sorted(set(value) - _MODEL_KEYS)
        if bad:
            raise MambaByteError(f"unknown model config key {bad[0]!r} (valid: {', '.join(sorted(_MODEL_KEYS))})")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MambaByteError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MambaByteError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise MambaByteError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise MambaByteError(f"config key {key!r} must be a string, got {value!r}")
    return value


def _parse_scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(v) if any(c in v for c in ".eE") or v.lower() in ("inf", "nan") else int(v)
        except ValueError:
            return v
    return v


def apply_overrides(cfg: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Apply ``{key: value}`` (``model.x`` reaches into the model section; string values are parsed
    as YAML scalars) to a raw config dict. Unknown keys raise."""
    cfg = dict(cfg)
    for key, value in overrides.items():
        if key.startswith("model."):
            if isinstance(value, str):
                value = _parse_scalar(value)
            sub = key[len("model."):]
            if sub not in _MODEL_KEYS:
                raise MambaByteError(f"unknown model config key {sub!r} (valid: {', '.join(sorted(_MODEL_KEYS))})")
            # no model section yet: the override refines the default model, it does not replace it
            model = dict(cfg["model"] if cfg.get("model") is not None else TrainConfig().model)
            model[sub] = value
            cfg["model"] = model
            continue
        if key not in _FIELDS:
            raise MambaByteError(f"unknown config key {key!r} (see mambabyte train --help for the keys)")
        if key == "model" and isinstance(value, str):  # --model tiny: a preset name
            value = {"preset": value}
        cfg[key] = value
    return cfg


def load_config_file(path) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MambaByteError(f"config file {str(path)!r} does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        raise MambaByteError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    except OSError as exc:
        raise MambaByteError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MambaByteError(f"config file {str(path)!r} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def make_config(config: Union[None, str, Path, Mapping[str, Any], TrainConfig] = None,
                overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML path, a dict or a TrainConfig, plus overrides."""
    if isinstance(config, TrainConfig):
        raw = config.to_dict()
    elif config is None:
        raw = {}
    elif isinstance(config, (str, Path)):
        raw = load_config_file(config)
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise MambaByteError(f"config must be a path, a mapping or a TrainConfig, not {type(config).__name__}")
    raw = apply_overrides({}, raw)  # checks every key of the file too
    if overrides:
        raw = apply_overrides(raw, overrides)
    kwargs = {k: _check_type(k, v) for k, v in raw.items()}
    return TrainConfig(**kwargs).validate()


def config_keys() -> List[str]:
    return list(_FIELDS)

"""Checkpoint formats in and out (see :mod:`mambabyte.io.checkpoints`)."""

from .checkpoints import (  # noqa: F401
    atomic_write_file,
    atomic_write_text,
    config_from_dict,
    infer_config,
    list_shipped_models,
    load_pretrained,
    mambabyte_home,
    normalize_keys,
    read_tensor_file,
    resolve_path,
    save_pretrained,
)

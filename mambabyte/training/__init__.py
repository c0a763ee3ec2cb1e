"""Training MambaByte models: the loop, its configuration, checkpoints, evaluation and distributed runs.

Python API::

    from mambabyte.training import train
    result = train("scripts/configs/tiny_cpu.yml", out_dir="runs/tiny", max_steps=50)
    result.final_eval["val_bpb"]

Does not import :mod:`mambabyte.generation` or :mod:`mambabyte.analysis`.
"""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig, config_keys, load_config_file, make_config
from .evaluate import evaluate_bpb, word_perplexity
from .schedule import lr_at
from .trainer import TrainingDiverged, TrainResult, compute_loss, train

__all__ = [
    "train",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "make_config",
    "load_config_file",
    "config_keys",
    "evaluate_bpb",
    "word_perplexity",
    "lr_at",
    "compute_loss",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
]

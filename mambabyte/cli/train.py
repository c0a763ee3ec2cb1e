"""``mambabyte train``: train a MambaByte model from a YAML config, any key overridable.

    mambabyte train --config scripts/configs/tiny_cpu.yml --out_dir runs/tiny
    mambabyte train --config cfg.yml --data corpus/train --val_data corpus/val --max_steps 2000 --lr 1e-3
    mambabyte train --config cfg.yml --set model.d_model=96 --set eval_every=100
    mambabyte train --config cfg.yml --out_dir runs/tiny --resume          # continue the same run
    torchrun --nproc_per_node 2 -m mambabyte train --config cfg.yml         # DDP (NCCL / gloo)

Every key of the config (see ``--help``) can be given as ``--key value`` or ``--set key=value``;
``--max_time`` is ``max_time_minutes``. Exit status: 0 done, 1 the loss diverged (NaN / inf; the last
good checkpoint is kept), 2 a bad config, flag or data path (one line on stderr).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from ..errors import MambaByteError
from .common import ArgumentParser, cli_entry


def _parser() -> ArgumentParser:
    from ..training.config import config_keys

    p = ArgumentParser(
        prog="mambabyte train",
        description="Train a MambaByte model (one process, or many under torchrun). Any config key can be "
        "overridden with --KEY VALUE or --set KEY=VALUE (model.* keys reach into the model section).",
        epilog="config keys: " + ", ".join(config_keys()),
    )
    p.add_argument("--config", default=None, help="YAML training config (scripts/configs/*.yml)")
    p.add_argument("--data", nargs="+", default=None, help="training data: files, folders, globs, prepared folders, hf:NAME")
    p.add_argument("--val_data", nargs="+", default=None, help="validation data (same forms as --data)")
    p.add_argument("--out_dir", default=None, help="run folder: metrics.jsonl, checkpoints/, summary.json")
    p.add_argument("--max_steps", default=None, help="optimizer steps")
    p.add_argument("--max_time", "--max_time_minutes", dest="max_time_minutes", default=None,
                   help="wall-clock budget in minutes: stop cleanly, evaluate, checkpoint and export")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue the run in --out_dir from its latest checkpoint (or from the checkpoint given)")
    p.add_argument("--export_dir", default=None, help="at the end, save_pretrained the model here (export_dtype, bf16 default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key (repeatable)")
    return p


def _collect_overrides(args, rest: List[str]) -> Dict[str, Any]:
    from ..training.config import config_keys

    ov: Dict[str, Any] = {}
    for k in ("data", "val_data", "out_dir", "max_steps", "max_time_minutes", "export_dir"):
        v = getattr(args, k)
        if v is not None:
            ov[k] = v
    if args.resume is not None:
        ov["resume"] = args.resume
    for item in args.set:
        if "=" not in item:
            raise MambaByteError(f"--set needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        ov[k.strip().replace("-", "_")] = v
    known = set(config_keys())
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or tok == "--":
            raise MambaByteError(f"unexpected argument {tok!r}")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known and not key.startswith("model."):
            raise MambaByteError(f"unknown option or config key {'--' + key!r} (mambabyte train --help lists the keys)")
        if not eq:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2):
                raise MambaByteError(f"--{key} needs a value")
            val = rest[i + 1]
            i += 1
        ov[key] = val
        i += 1
    return ov


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args, rest = p.parse_known_args(argv)
    overrides = _collect_overrides(args, rest)
    from ..training import TrainingDiverged, train

    if args.config is None and "data" not in overrides:
        raise MambaByteError("give --config FILE.yml (scripts/configs/ has examples) or at least --data")
    try:
        result = train(args.config, overrides)
    except TrainingDiverged:
        return 1  # the trainer has already said why, in one line (rank 0)
    if result.final_eval:
        fe = result.final_eval
        parts = [f"val_bpb={fe['val_bpb']:.4f}"]
        if "val_bpb_window" in fe:
            parts.append(f"val_bpb_window={fe['val_bpb_window']:.4f}")
        print(f"step={result.step} " + " ".join(parts) + f" out_dir={result.out_dir}")
    else:
        print(f"step={result.step} out_dir={result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mambabyte <command> ...``: one entry point for every command.

Each command lives in its own module under ``mambabyte.cli`` and exposes ``main(argv=None)``; this
file only dispatches, so ``mambabyte --help`` stays fast (nothing heavy is imported here).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# command -> (module, function, one-line description)
COMMANDS = {
    "generate": ("mambabyte.cli.generate", "main", "generate bytes from a prompt (sampling, streaming, state, speculative)"),
    "extract": ("mambabyte.cli.extract", "main", "interpretability extraction: module-outputs | discrete-A | input-sim"),
    "plot": ("mambabyte.cli.plot", "main", "plot an extraction artefact (.pkl) to PNG"),
    "prepare-data": ("mambabyte.cli.prepare_data", "main", "write uint8 train/val shards + meta.json from files or datasets"),
    "train": ("mambabyte.cli.train", "main", "train a MambaByte model (single process, CPU/GPU, or torchrun)"),
    "eval": ("mambabyte.cli.evaluate", "main", "bits per byte of a model on a file or shard (state carried or per window)"),
    "plot-train": ("mambabyte.cli.plot_train", "main", "PNG of loss / bpb / lr curves of a training run"),
    "state": ("mambabyte.cli.state", "main", "the local state library: build | list | show | rm | export | combine"),
    "convert": ("mambabyte.cli.convert", "main", "convert a mamba_ssm / MambaByte checkpoint to our safetensors folder"),
    "doctor": ("mambabyte.cli.doctor", "main", "which backend each op uses and why; environment report"),
}


def _usage() -> str:
    lines = ["usage: mambabyte <command> [options]", "", "commands:"]
    for name, (_, _, desc) in COMMANDS.items():
        lines.append(f"  {name:<13} {desc}")
    lines += ["", "mambabyte <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"mambabyte {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        sys.stderr.write(f"mambabyte: error: unknown command {cmd!r} (choose from {', '.join(COMMANDS)})\n")
        raise SystemExit(2)
    mod_name, fn_name, _ = COMMANDS[cmd]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name == mod_name:
            sys.stderr.write(f"mambabyte: error: command {cmd!r} is not available in this build\n")
            raise SystemExit(2)
        raise
    return getattr(mod, fn_name)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

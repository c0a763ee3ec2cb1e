"""Shared pieces of the command-line front ends.

* :class:`ArgumentParser`: argparse that reports a bad flag as one line (``prog: error: ...``) and exits 2.
* :func:`cli_entry`: wraps a ``main(argv)`` so a :class:`MambaByteError`, a full disk or a Ctrl-C end
  with one ``error:`` line and a non-zero status instead of a traceback.
* :func:`add_model_args` / :func:`load_model`: the flags every model-using command shares.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Callable, List, Optional

from ..errors import MambaByteError

DEFAULT_MODEL = "mambabyte-small"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def cli_entry(fn: Callable[[Optional[List[str]]], Optional[int]]):
    """Decorate a CLI ``main(argv=None)``: user errors -> one line on stderr + exit 2."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        try:
            rc = fn(argv)
        except MambaByteError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return _exit(2)
        except KeyboardInterrupt:
            sys.stderr.write("error: interrupted\n")
            return _exit(130)
        except MemoryError:
            sys.stderr.write("error: out of memory (try a smaller input, --dtype bfloat16, or a reduction flag)\n")
            return _exit(1)
        except OSError as exc:
            where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
            sys.stderr.write(f"error: I/O failure{where}: {exc.strerror or exc}\n")
            return _exit(1)
        return _exit(int(rc or 0))

    return wrapper


def _exit(code: int) -> int:
    if code:
        raise SystemExit(code)
    return 0


def setup_logging(verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s")


def parse_dtype(name: Optional[str]):
    import torch

    table = {
        None: None,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp64": torch.float64, "float64": torch.float64,
    }
    if name not in table:
        raise MambaByteError(f"unknown dtype {name!r}; use fp32, fp16, bf16 or fp64")
    return table[name]


def resolve_device(name: Optional[str]) -> str:
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MambaByteError(f"--device {name} asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MambaByteError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    return name


def add_model_args(p: argparse.ArgumentParser, paper_names: bool = True) -> None:
    """--pretrained_model_filepath, --model_id, --config_path, --device, --dtype, --seed."""
    p.add_argument("--pretrained_model_filepath", "--model", dest="pretrained_model_filepath", default=None,
                   help=f"checkpoint: our folder, a mamba_ssm folder, a MambaByte .pt, a shipped name "
                        f"(default: {DEFAULT_MODEL} when shipped, else a random model with a warning)")
    p.add_argument("--model_id", default=None,
                   help="preset name (353M, 972M, tiny, mini, small, ...) used when the checkpoint carries no config")
    p.add_argument("--config_path", default=None, help="YAML config in the paper code's layout (optional)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU), bf16, fp16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often fastest for small models and on busy machines)")
    p.add_argument("--verbose", action="store_true",
                   help="log which backend each op uses and why, and other details, on stderr")


def read_yaml_general(path: str) -> dict:
    """The ``general`` section (device, dtype) of a paper-style config YAML; {} when absent."""
    from ..config import read_yaml

    doc = read_yaml(path, "--config_path")
    gen = doc.get("general") if isinstance(doc, dict) else None
    return gen if isinstance(gen, dict) else {}


def _random_model(config, args, what: str):
    import torch

    from ..model import MambaByteLM

    sys.stderr.write(f"warning: using a RANDOMLY INITIALISED model {what}; its outputs are meaningless\n")
    torch.manual_seed(int(getattr(args, "seed", 0) or 0))
    model = MambaByteLM(config, device=resolve_device(getattr(args, "device", None)))
    return model.cast_(parse_dtype(getattr(args, "dtype", None))).eval()


def load_model(args, default_random_preset: str = "tiny", default_model_id: Optional[str] = None):
    """See :func:`_load_model`; the model must be byte-level (a subword model only drafts)."""
    if getattr(args, "verbose", False):
        setup_logging(True)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise MambaByteError("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)
    model = _load_model(args, default_random_preset, default_model_id)
    check_byte_level(model)
    return model


def check_byte_level(model, what: str = "this command") -> None:
    v = model.config.vocab_size
    if v != 256:
        raise MambaByteError(
            f"the model has a {v}-token vocabulary, not 256 bytes (a subword model?): {what} needs a byte-level "
            f"MambaByte model; a subword model serves as a speculative drafter (--drafter)"
        )


def _load_model(args, default_random_preset: str = "tiny", default_model_id: Optional[str] = None):
    """The model the flags ask for.

    Order: ``--pretrained_model_filepath`` (any format; ``--model_id`` supplies a config when the
    checkpoint has none); with the paper code's ``--config_path`` and a ``--model_id`` (or
    ``default_model_id``) but no checkpoint, that yml section with random weights (warned), the yml's
    ``general`` section filling ``--device`` / ``--dtype`` when not given; the shipped default model;
    a random ``default_random_preset`` model (warned).
    """
    from ..config import PRESETS, MambaByteConfig, config_from_yaml
    from ..io import list_shipped_models, load_pretrained

    path = getattr(args, "pretrained_model_filepath", None)
    model_id = getattr(args, "model_id", None)
    cfg_path = getattr(args, "config_path", None)
    if cfg_path:
        general = read_yaml_general(cfg_path)
        if getattr(args, "dtype", None) is None and general.get("dtype"):
            args.dtype = str(general["dtype"])
        if getattr(args, "device", None) in (None, "auto") and general.get("device"):
            args.device = str(general["device"])
        if path and model_id is not None and model_id not in PRESETS:
            model_id = None  # a section of the yml, not a preset: infer the shapes from the weights
        if not path and (model_id or default_model_id):
            section = model_id or default_model_id
            return _random_model(config_from_yaml(cfg_path, section), args, f"'{section}' from {cfg_path}")
    device = resolve_device(getattr(args, "device", None))
    dtype = parse_dtype(getattr(args, "dtype", None))
    if path:
        return load_pretrained(path, device=device, dtype=dtype, model_id=model_id)
    if model_id is None and DEFAULT_MODEL in list_shipped_models():
        return load_pretrained(DEFAULT_MODEL, device=device, dtype=dtype)
    preset = model_id or default_random_preset
    why = ("--model_id without a checkpoint builds that preset" if model_id
           else "no checkpoint given or shipped")
    return _random_model(MambaByteConfig.from_preset(preset), args, f"'{preset}' ({why})")


def read_prompt(args, allow_empty: bool = False) -> bytes:
    """Prompt bytes from --prompt (UTF-8 text) or --prompt_file (raw bytes)."""
    prompt = getattr(args, "prompt", None)
    pfile = getattr(args, "prompt_file", None)
    if prompt is not None and pfile is not None:
        raise MambaByteError("give either --prompt or --prompt_file, not both")
    if pfile is not None:
        try:
            with open(pfile, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise MambaByteError(f"cannot read --prompt_file {pfile!r}: {exc.strerror or exc}") from None
    elif prompt is not None:
        try:
            data = prompt.encode("utf-8")
        except UnicodeEncodeError:
            data = os.fsencode(prompt)
    else:
        data = b""
    if not data and not allow_empty:
        raise MambaByteError("the prompt is empty: give a non-empty --prompt or --prompt_file")
    return data


def check_output_path(path, flag: str) -> None:
    """Refuse up front (before any model is loaded or text generated) an output path whose folder is
    missing or not writable; nothing creates folders the user did not ask for."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not os.path.isdir(folder):
        raise MambaByteError(f"{flag}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise MambaByteError(f"{flag}: folder {folder!r} is not writable")


"""Interpretability extraction CLIs (the paper code's three scripts, same flags).

* ``extract_module_outputs.py`` / ``mambabyte extract module-outputs``: hooked outputs of every
  per-layer module whose name contains ``--module_id`` (alias ``--module_ids``), with ``--nonlinearity``.
* ``extract_discrete_A.py`` / ``mambabyte extract discrete-A``: discrete_A = exp(Δ ⊗ A) per layer,
  optionally reduced (``--reduction``, ``--reduction_dim``).
* ``extract_input_sim_with_discrete_A.py`` / ``mambabyte extract input-sim``: cosine similarity over
  d_inner of discrete_A[..., k] with in_proj's x half, (L, d_state) per layer.

Each writes one pickle (see :mod:`mambabyte.analysis.artefact`) atomically, after checking that its
estimated size is under ``--max_output_gb``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import MambaByteError
from .common import ArgumentParser, add_model_args, cli_entry, load_model, parse_dtype, read_prompt

DEFAULT_SEED = 4740
DEFAULT_MAX_OUTPUT_GB = 4.0
NONLINEARITY_CHOICES = ("linear", "relu", "lrelu", "elu", "gelu", "silu", "swish", "tanh", "softplus")
REDUCTION_CHOICES = ("mean", "min", "max", "norm", "fro", "nuc")

SUBCOMMANDS = {
    "module-outputs": "module_outputs",
    "discrete-A": "discrete_A",
    "input-sim": "input_sim_with_discrete_A",
}
_ALIASES = {
    "module_outputs": "module-outputs",
    "discrete_A": "discrete-A",
    "discrete-a": "discrete-A",
    "discrete_a": "discrete-A",
    "input_sim": "input-sim",
    "input-sim-with-discrete-A": "input-sim",
    "input_sim_with_discrete_A": "input-sim",
}


# ---------------------------------------------------------------------------------------------------
# flags
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filepath_to_store_outputs", "-o", required=True, metavar="PATH",
                   help="pickle to write (e.g. artefacts/discrete_A_860.pkl); written atomically")
    src = p.add_argument_group("prompt (one of)")
    src.add_argument("--prompt", default=None, help="prompt text (UTF-8)")
    src.add_argument("--prompt_file", default=None, help="read the prompt's bytes from a file (e.g. pg19_samples/860.txt)")
    p.add_argument("--layer_idxs", nargs="+", type=int, default=None, metavar="I",
                   help="layer indices to extract (default: all layers)")
    add_model_args(p)
    p.add_argument("--return_log_probs", action="store_true",
                   help="also store log_probs (and probs) of each true next byte, shape (L-1,)")
    p.add_argument("--return_ranks", action="store_true",
                   help="also store ranks of each true next byte (0 = top-1), shape (L-1,)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--out_dtype", default="float32",
                   help="dtype of the stored tensors: float32 (default), float16 / bfloat16 halve the size")
    p.add_argument("--max_output_gb", type=float, default=DEFAULT_MAX_OUTPUT_GB,
                   help=f"refuse to run when the artefact would exceed this many GB (default {DEFAULT_MAX_OUTPUT_GB:g}; 0 = no limit)")


def _parser(kind: str, prog: Optional[str] = None) -> ArgumentParser:
    desc = {
        "module_outputs": "Extract (hooked) module outputs of a MambaByte model along a prompt.",
        "discrete_A": "Extract discrete-A = exp(delta x A) (the hidden -> hidden transition) per layer.",
        "input_sim_with_discrete_A": "Extract the cosine similarity of discrete-A with the input (in_proj's x half).",
    }[kind]
    p = ArgumentParser(prog=prog, description=desc)
    _add_kind_args(p, kind)
    return p


def _add_kind_args(p: argparse.ArgumentParser, kind: str) -> None:
    _add_common(p)
    if kind == "module_outputs":
        p.add_argument("--module_id", "--module_ids", dest="module_ids", nargs="+", required=True, metavar="NAME",
                       help="module(s) to hook in each layer: dt_proj, x_proj, in_proj, conv1d, out_proj, mixer, norm, ... "
                            "(a module matches when its qualified name contains NAME)")
        p.add_argument("--nonlinearity", default=None, choices=NONLINEARITY_CHOICES,
                       help="applied to each output (default linear); softplus on dt_proj gives delta")
    elif kind == "discrete_A":
        p.add_argument("--reduction", default=None, choices=REDUCTION_CHOICES,
                       help="mean/min/max/norm along --reduction_dim; fro/nuc: matrix norm over (d_inner, d_state) per byte")
        p.add_argument("--reduction_dim", type=int, default=None,
                       help="dimension of discrete_A (L, d_inner, d_state) to reduce: e.g. -2 -> (L, d_state)")


# ---------------------------------------------------------------------------------------------------
# model
def run(kind: str, args) -> int:
    import torch

    from ..analysis.artefact import build_artefact, save_artefact
    from ..analysis.extraction import (
        extract_discrete_A,
        extract_input_sim_with_discrete_A,
        extract_module_outputs,
        format_bytes,
        normalize_reduction,
    )

    try:
        out_dtype = parse_dtype(args.out_dtype)
    except MambaByteError:
        out_dtype = None
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise MambaByteError(f"--out_dtype {args.out_dtype!r}: use float32, float16 or bfloat16")
    if kind == "discrete_A":
        normalize_reduction(args.reduction, args.reduction_dim)  # bad pairs fail before the model loads
    prompt = read_prompt(args)
    torch.manual_seed(args.seed)
    model = load_model(args)
    common = dict(
        layer_idxs=args.layer_idxs,
        out_dtype=out_dtype,
        return_log_probs=args.return_log_probs,
        return_ranks=args.return_ranks,
        max_output_gb=args.max_output_gb,
    )
    extra = {}
    if kind == "module_outputs":
        res = extract_module_outputs(model, prompt, args.module_ids, nonlinearity=args.nonlinearity, **common)
        extra = dict(module_ids=args.module_ids, nonlinearity=args.nonlinearity or "linear")
    elif kind == "discrete_A":
        if args.reduction in ("fro", "nuc") and args.reduction_dim is not None:
            sys.stderr.write(f"note: --reduction {args.reduction} is a matrix norm over (d_inner, d_state) per byte; "
                             f"--reduction_dim {args.reduction_dim} is ignored\n")
        res = extract_discrete_A(model, prompt, reduction=args.reduction, reduction_dim=args.reduction_dim, **common)
        extra = dict(reduction=args.reduction, reduction_dim=args.reduction_dim)
    else:
        res = extract_input_sim_with_discrete_A(model, prompt, **common)
    art = build_artefact(
        kind, res, prompt, model,
        # the name the model was actually built under (a --model_id is ignored by a checkpoint that
        # carries its own config, so recording it would mislabel the artefact)
        model_id=getattr(model.config, "name", None) or args.model_id,
        # the checkpoint given, else the shipped default actually loaded (None for a random model)
        pretrained_model_filepath=args.pretrained_model_filepath or getattr(model, "source_path", None),
        out_dtype=out_dtype, seed=args.seed, **extra,
    )
    path = save_artefact(art, args.filepath_to_store_outputs)
    shapes = []
    for k in art["tensor_keys"]:
        per = art[k]
        if per:
            first = next(iter(per.values()))
            shapes.append(f"{k}: {len(per)} layer(s) x {tuple(first.shape)} {str(first.dtype).replace('torch.', '')}")
    size = path.stat().st_size
    print(f"stored the outputs to {path} ({format_bytes(size)}; {'; '.join(shapes)}; {len(prompt)} bytes)")
    return 0


def _main_for(kind: str, prog: str):
    @cli_entry
    def _main(argv: Optional[List[str]] = None) -> int:
        args = _parser(kind, prog=prog).parse_args(argv)
        return run(kind, args)

    return _main


main_module_outputs = _main_for("module_outputs", "extract_module_outputs.py")
main_discrete_A = _main_for("discrete_A", "extract_discrete_A.py")
main_input_sim = _main_for("input_sim_with_discrete_A", "extract_input_sim_with_discrete_A.py")
main_module_outputs.__doc__ = "``extract_module_outputs.py ...`` (argv without the program name)."
main_discrete_A.__doc__ = "``extract_discrete_A.py ...`` (argv without the program name)."
main_input_sim.__doc__ = "``extract_input_sim_with_discrete_A.py ...`` (argv without the program name)."


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    """``mambabyte extract {module-outputs,discrete-A,input-sim} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _ALIASES:
        argv[0] = _ALIASES[argv[0]]
    p = ArgumentParser(prog="mambabyte extract",
                       description="Interpretability extraction from a MambaByte model (writes one pickle).")
    sub = p.add_subparsers(dest="what", metavar="{module-outputs,discrete-A,input-sim}")
    sub.required = True
    for name, kind in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=_parser(kind).description, description=_parser(kind).description)
        _add_kind_args(sp, kind)
    args = p.parse_args(argv)
    return run(SUBCOMMANDS[args.what], args)


if __name__ == "__main__":
    sys.exit(main())

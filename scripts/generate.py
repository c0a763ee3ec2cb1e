#!/usr/bin/env python
"""Generate bytes with a MambaByte model -- the paper code's ``scripts/generate.py`` interface.

Flags kept from the paper code: --config_path --prompt --max_new_tokens --num_samples --temperature
--top_k --top_p --pretrained_model_filepath --model_id --seed (same meanings; ``--top_p 0`` means off,
as in mamba_ssm). Extra: --device, --dtype, --stop, --stream. Differences: --config_path is optional
(a checkpoint carries its config), and without a checkpoint and without --config_path the shipped
default model (or a random tiny one, warned) is used. Output is printed in the paper script's layout.

For states, streaming, speculative decoding and an interactive REPL use ``mambabyte generate``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from mambabyte.cli.common import ArgumentParser, add_model_args, cli_entry  # noqa: E402
from mambabyte.errors import MambaByteError  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Generate (text) bytes using a pretrained MambaByte model.")
    add_model_args(p)
    p.add_argument("--prompt", type=str, default=None, help="the prompt to continue (default: empty)")
    p.add_argument("--max_new_tokens", type=int, default=100, help="bytes to generate (default 100)")
    p.add_argument("--num_samples", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top_k", type=int, default=256, help="top-k, applied before top-p (default 256 = all bytes)")
    p.add_argument("--top_p", type=float, default=0.98, help="top-p (default 0.98; 0 = off)")
    p.add_argument("--seed", type=int, default=4740, help="random seed (default 4740)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one sample)")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise MambaByteError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if not 0 <= args.top_k <= 256:
        raise MambaByteError(f"--top_k must be in [0, 256], got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise MambaByteError(f"--top_p must be in [0, 1], got {args.top_p}")
    if args.stream and args.num_samples > 1:
        raise MambaByteError("--stream prints one sequence; use --num_samples 1")
    import torch

    from mambabyte.cli.generate import load_generation_model
    from mambabyte.generation import generate

    torch.manual_seed(args.seed)
    model = load_generation_model(args, default_model_id="972M")
    prompt = (args.prompt or "").encode("utf-8", errors="surrogateescape")
    out = sys.stdout
    out.write(f"PROMPT\n{'=' * 6}\n{prompt.decode('utf-8', errors='replace')}\n\nGENERATIONS\n{'=' * 11}\n")
    out.flush()
    stream = None
    if args.stream:
        stream = lambda t: (out.write(t), out.flush())  # noqa: E731
    result = generate(
        model, prompt, max_new_bytes=args.max_new_tokens, num_samples=args.num_samples,
        temperature=args.temperature, top_k=0 if args.top_k >= 256 else args.top_k,
        top_p=1.0 if args.top_p == 0.0 else args.top_p, seed=args.seed, stop=args.stop, stream=stream,
    )
    for i, text in enumerate(result.texts):
        if stream is None:
            out.write(text)
        out.write(f"\n{'-' * 80}\n")
    out.flush()
    sys.stderr.write(result.stats.summary() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train the subword drafter (byte-level BPE tokenizer + a small Mamba over its tokens).

The recipe of pretrained_models/mambabyte-subword-draft is scripts/configs/mambabyte_subword_draft.yml:
    python scripts/train_subword_drafter.py --config scripts/configs/mambabyte_subword_draft.yml \
        --train CORPUS/train --val CORPUS/val --out pretrained_models/mambabyte-subword-draft
A --config YAML holds any of the flags below (without the dashes); flags given on the command line win.
"""

import sys

from mambabyte.cli.common import ArgumentParser, cli_entry
from mambabyte.errors import MambaByteError


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="train_subword_drafter.py", description=__doc__)
    p.add_argument("--config", default=None, help="YAML recipe: keys are this script's flags")
    p.add_argument("--train", nargs="+", default=None, help="training files or folders")
    p.add_argument("--val", nargs="*", default=None, help="validation files or folders (bits per byte reported)")
    p.add_argument("--out", default=None, help="output folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max_steps", type=int, default=2000)
    p.add_argument("--max_time_minutes", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        from mambabyte.config import read_yaml

        recipe = read_yaml(pre.config)
        if not isinstance(recipe, dict):
            raise MambaByteError(f"--config {pre.config!r}: expected a mapping of flag names to values")
        known = {a.dest for a in p._actions} - {"help", "config"}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise MambaByteError(f"--config {pre.config!r}: unknown key(s) {', '.join(unknown)} "
                                 f"(valid: {', '.join(sorted(known))})")
        for k in ("train", "val"):
            if isinstance(recipe.get(k), str):
                recipe[k] = [recipe[k]]
        p.set_defaults(**recipe)
    a = p.parse_args(argv)
    if not a.train or not a.out:
        raise MambaByteError("give --train and --out (on the command line or in --config)")
    from mambabyte.subword import train_subword_drafter

    train_subword_drafter(a.train, a.out, val=a.val, vocab_size=a.vocab_size, d_model=a.d_model, n_layer=a.n_layer,
                          seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, max_steps=a.max_steps,
                          max_time_minutes=a.max_time_minutes, device=a.device, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

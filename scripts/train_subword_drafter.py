#!/usr/bin/env python
"""Train the subword drafter (byte-level BPE tokenizer + a small Mamba over its tokens).

Example (the recipe of pretrained_models/mambabyte-subword-draft):
    python scripts/train_subword_drafter.py --train CORPUS/train --val CORPUS/val \
        --out pretrained_models/mambabyte-subword-draft --vocab_size 2048 --d_model 256 --n_layer 4 \
        --seq_len 512 --batch_size 64 --max_steps 3000 --max_time_minutes 2
"""

import sys

from mambabyte.cli.common import ArgumentParser, cli_entry


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="train_subword_drafter.py", description=__doc__)
    p.add_argument("--train", nargs="+", required=True, help="training files or folders")
    p.add_argument("--val", nargs="*", default=None, help="validation files or folders (bits per byte reported)")
    p.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer.json)")
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
    a = p.parse_args(argv)
    from mambabyte.subword import train_subword_drafter

    train_subword_drafter(a.train, a.out, val=a.val, vocab_size=a.vocab_size, d_model=a.d_model, n_layer=a.n_layer,
                          seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, max_steps=a.max_steps,
                          max_time_minutes=a.max_time_minutes, device=a.device, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

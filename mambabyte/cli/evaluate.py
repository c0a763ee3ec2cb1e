"""``mambabyte eval``: bits per byte of a model on a file, folder or prepared shard.

    mambabyte eval --model runs/small/export --data corpus/val
    mambabyte eval --model runs/small/checkpoints/best.pt --data data/books --split val --seq_len 8192 --json out.json

Scores the stream in ``--streams`` contiguous chunks, each read window after window (``--seq_len``):
``carried`` keeps the recurrent state from one window to the next, ``window`` starts every window from
zero; both score the same bytes. With a word count (``--num_words``, or a prepared folder's meta.json)
it also reports PG19-style word-level perplexity, 2 ** (bpb * bytes / words).
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from ..errors import MambaByteError
from .common import ArgumentParser, add_model_args, cli_entry, load_model


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="mambabyte eval", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data", nargs="+", required=True, help="files, folders, globs, a prepared folder, hf:NAME")
    p.add_argument("--split", default="val", help="split of a prepared folder (default val)")
    p.add_argument("--seq_len", type=int, default=8192, help="window length in bytes (default 8192)")
    p.add_argument("--streams", type=int, default=1, help="contiguous chunks scored in parallel (default 1: one stream)")
    p.add_argument("--mode", choices=("both", "carried", "window"), default="both")
    p.add_argument("--max_bytes", type=int, default=None, help="score only the first N bytes")
    p.add_argument("--num_words", type=int, default=None, help="words in the data, for word-level perplexity")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast: auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--separator", default="", help="bytes between concatenated files")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.seq_len < 1 or args.streams < 1:
        raise MambaByteError("--seq_len and --streams must be >= 1")
    import torch

    from ..data import load_byte_data
    from ..training.evaluate import evaluate_bpb

    data = load_byte_data(args.data, split=args.split, separator=args.separator, what="data")
    model = load_model(args)
    dev = model.device
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and dev.type == "cuda")
    res = evaluate_bpb(model, data, seq_len=args.seq_len, streams=args.streams, mode=args.mode,
                       max_bytes=args.max_bytes, device=dev, autocast_dtype=torch.bfloat16 if use_bf16 else None,
                       num_words=args.num_words)
    res["data"] = [str(x) for x in args.data]
    res["model"] = getattr(model, "source_path", None)
    print(f"scored {res['val_bytes']:,} bytes in {res['val_streams']} stream(s) of windows of {args.seq_len} bytes")
    if "val_bpb_carried" in res:
        print(f"bpb (state carried across windows): {res['val_bpb_carried']:.4f}")
    if "val_bpb_window" in res:
        print(f"bpb (state reset every window):     {res['val_bpb_window']:.4f}")
    if "val_word_ppl" in res:
        print(f"word-level perplexity ({res['val_words']:,} words): {res['val_word_ppl']:.2f}")
    if args.json:
        from ..io.checkpoints import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mambabyte prepare-data``: write uint8 shards (train.bin / val.bin) and meta.json.

    mambabyte prepare-data corpus/train --val corpus/val --out data/books
    mambabyte prepare-data 'texts/*.txt' --val_fraction 0.01 --separator '\\n\\n' --out data/texts
    mambabyte prepare-data 'hf:wikitext?config=wikitext-103-raw-v1&split=train' --val_fraction 0.005 --out data/wt

Files are bytes: BOMs, CRLF and invalid UTF-8 pass through untouched. The shards are memory-mapped by
``mambabyte train --data OUT``; meta.json records every source's sha256 and byte count and each split's
word count (for word-level perplexity in ``mambabyte eval``).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from .common import ArgumentParser, cli_entry


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="mambabyte prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="files, folders, globs, prepared folders or hf:NAME[?config=..&split=..&column=..&streaming=1]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", nargs="+", default=None, help="validation sources (instead of --val_fraction)")
    p.add_argument("--val_fraction", type=float, default=0.0, help="hold out this tail fraction of the training bytes as val")
    p.add_argument("--separator", default="", help="bytes between documents (escapes like \\n, \\x00 understood)")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ..data import parse_separator, prepare_data

    meta = prepare_data(args.sources, args.out, val_sources=args.val, val_fraction=args.val_fraction,
                        separator=parse_separator(args.separator))
    for name, sp in meta["splits"].items():
        print(f"{name}: {sp['bytes']:,} bytes, {sp['words']:,} words, sha256 {sp['sha256'][:16]}... -> {args.out}/{sp['file']}")
    print(f"{len(meta['sources'])} sources; meta -> {args.out}/meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mambabyte plot ARTEFACT.pkl -o out.png``: a PNG of an extraction artefact.

Heatmaps per layer over byte position x state / channel, per-layer curves along the text, and the
log-prob / rank of each true next byte (when the artefact has them). See
:func:`mambabyte.analysis.plots.plot_artefact`.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

from ..errors import MambaByteError
from .common import ArgumentParser, cli_entry


def _window(text: str) -> Tuple[int, int]:
    try:
        a, b = text.split(":")
        return (int(a) if a else 0, int(b) if b else 1 << 62)
    except ValueError:
        raise MambaByteError(f"--window {text!r}: expected START:END byte positions, e.g. 0:120") from None


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="mambabyte plot", description="Plot an extraction artefact (.pkl) to a PNG.")
    p.add_argument("artefact", help="a .pkl written by extract_*.py / mambabyte extract")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: the artefact's path with .png)")
    p.add_argument("--layers", nargs="+", type=int, default=None, help="layers to draw (default: up to --max_layers, evenly spaced)")
    p.add_argument("--max_layers", type=int, default=6, help="heatmaps drawn when --layers is not given (default 6)")
    p.add_argument("--window", default=None, metavar="START:END",
                   help="byte range to show, e.g. 0:120 or --window=-200: (last 200); with <= 160 bytes the prompt's characters label the axis")
    p.add_argument("--key", default=None, help="which tensor key to draw (default: the artefact's main one)")
    p.add_argument("--relative", action="store_true",
                   help="heatmaps show each row minus its mean over the window (variation along the text)")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if args.max_layers < 1:
        p.error("--max_layers must be >= 1")
    if args.dpi < 20 or args.dpi > 600:
        p.error("--dpi must be between 20 and 600")
    window = _window(args.window) if args.window else None
    out = args.output
    if out is None:
        out = args.artefact[:-4] + ".png" if args.artefact.endswith(".pkl") else args.artefact + ".png"
    from ..analysis.plots import plot_artefact

    path = plot_artefact(args.artefact, out, layers=args.layers, window=window, key=args.key,
                         max_layers=args.max_layers, dpi=args.dpi, title=args.title,
                         relative=args.relative)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

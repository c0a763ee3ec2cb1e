"""``mambabyte plot-train RUN_DIR``: a PNG of a run's training loss, val bpb, learning rate and bytes/s.

    mambabyte plot-train runs/tiny                    # -> runs/tiny/train_curves.png
    mambabyte plot-train runs/a runs/b --out cmp.png  # several runs on the same axes
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import MambaByteError
from .common import ArgumentParser, cli_entry


def read_metrics(run_dir) -> List[Dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise MambaByteError(f"run folder {str(run_dir)!r} does not exist")
    if not path.is_file():
        raise MambaByteError(f"{str(path)!r} does not exist (is {str(run_dir)!r} a training run folder?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1:  # a run still writing (or killed mid-line): its last row is partial
                sys.stderr.write(f"note: skipped the unfinished last line ({i}) of {str(path)!r}\n")
                break
            raise MambaByteError(f"{str(path)!r} line {i} is not JSON") from None
    if not rows:
        raise MambaByteError(f"{str(path)!r} holds no rows yet")
    return rows


def _smooth(ys: List[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_runs(run_dirs: List[str], out_path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.checkpoints import _atomic_write_bytes

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in run_dirs:
        rows = read_metrics(run)
        name = Path(run).name
        tr = [r for r in rows if "loss" in r]
        ev = [r for r in rows if "val_bpb" in r]
        if tr:
            steps = [r["step"] for r in tr]
            bpb = [r["loss"] / math.log(2) for r in tr]
            k = max(1, len(bpb) // 50)
            axes[0].plot(steps, _smooth(bpb, k), lw=1.2, label=f"{name} train" + (f" (avg {k})" if k > 1 else ""))
            axes[1].plot(steps, [r["lr"] for r in tr], label=name)
            axes[2].plot(steps, [r.get("bytes_per_s", float("nan")) for r in tr], lw=0.8, label=name)
        for key, style in (("val_bpb_carried", "o-"), ("val_bpb_window", "s--")):
            pts = [(r["step"], r[key]) for r in ev if key in r]
            if pts:
                axes[0].plot(*zip(*pts), style, ms=4, label=f"{name} val ({key.split('_')[-1]})")
        if ev and not any("val_bpb_carried" in r or "val_bpb_window" in r for r in ev):
            axes[0].plot([r["step"] for r in ev], [r["val_bpb"] for r in ev], "o-", ms=4, label=f"{name} val")
    axes[0].set_title("bits per byte")
    axes[1].set_title("learning rate")
    axes[2].set_title("training throughput (bytes/s)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    try:
        _atomic_write_bytes(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise MambaByteError(f"could not write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="mambabyte plot-train", description="PNG of loss / bpb / lr curves of training runs")
    p.add_argument("run_dirs", nargs="+", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/train_curves.png)")
    args = p.parse_args(argv)
    out = plot_runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "train_curves.png")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

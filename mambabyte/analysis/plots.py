"""Pictures of an extraction artefact (PNG, matplotlib's Agg canvas; matplotlib is imported only here).

:func:`plot_artefact` draws, for the artefact's quantity (Δ / module outputs, discrete_A, or its
similarity with the input):

* one heatmap per layer over byte position (x) x state or channel (y); an unreduced discrete_A
  (L, d_inner, d_state) is shown averaged over d_inner; 1-d quantities (fro / nuc norms) are drawn as
  curves instead;
* a panel of per-layer curves along the text (the 1-d quantity itself, or the mean over channels,
  e.g. mean Δ per byte);
* when stored, the log-probability of each true next byte and its rank (0 = top-1) along the text.

When the shown window is short enough (``max_char_ticks`` bytes) the prompt's characters label the
byte axis (space as ␣, newline as ↵, other control / non-ASCII bytes as hex); otherwise positions
are shown and ``window=(start, end)`` zooms in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import MambaByteError
from ..io.checkpoints import atomic_write_file

Tensor = torch.Tensor
MAX_CHAR_TICKS = 160


def byte_labels(data: bytes) -> List[str]:
    """One readable label per byte: the character (UTF-8 lead bytes carry the whole character)."""
    out: List[str] = []
    i = 0
    while i < len(data):
        b = data[i]
        n = 1
        if b >= 0xC0:
            n = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        chunk = data[i : i + n]
        try:
            ch = chunk.decode("utf-8") if n > 1 else None
        except UnicodeDecodeError:
            ch, n = None, 1
        if ch is not None:
            out.append(ch)
            out.extend("·" for _ in range(n - 1))
            i += n
            continue
        if b == 0x20:
            out.append("␣")
        elif b == 0x0A:
            out.append("↵")
        elif b == 0x09:
            out.append("⇥")
        elif 0x21 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
        i += 1
    return out


def _main_key(art: Dict[str, Any], key: Optional[str]) -> str:
    keys = [k for k in art["tensor_keys"] if not k.endswith("_indices")]
    if key is not None:
        if key not in art["tensor_keys"]:
            raise MambaByteError(f"--key {key!r} is not in this artefact (it has: {', '.join(art['tensor_keys'])})")
        return key
    if not keys:
        raise MambaByteError("the artefact holds no tensors to plot")
    return keys[0]


def _pick_layers(available: Sequence[int], layers: Optional[Sequence[int]], max_layers: int) -> List[int]:
    available = sorted(int(i) for i in available)
    if layers is not None:
        missing = [i for i in layers if i not in available]
        if missing:
            raise MambaByteError(f"layer(s) {missing} are not in this artefact (it has layers {available})")
        return sorted(set(int(i) for i in layers))
    if len(available) <= max_layers:
        return available
    step = (len(available) - 1) / (max_layers - 1)
    return sorted({available[round(k * step)] for k in range(max_layers)})


def _compact(idx: Sequence[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    parts, run = [], []
    for i in list(idx) + [None]:
        if run and (i is None or i != run[-1] + 1):
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
            run = []
        if i is not None:
            run.append(i)
    return ", ".join(parts)


def _describe(art: Dict[str, Any], key: str) -> Tuple[str, Tuple[str, ...]]:
    dims = tuple(art.get("dims", {}).get(key, ()))
    if art["kind"] == "module_outputs":
        nl = art.get("nonlinearity") or "linear"
        if key.endswith("dt_proj") and nl == "softplus":
            return "Δ = softplus(dt_proj)", dims or ("L", "d_inner")
        return (f"{key}" if nl == "linear" else f"{nl}({key})"), dims or ("L", "C")
    if art["kind"] == "discrete_A":
        red = art.get("reduction")
        if red is None:
            return "discrete A = exp(ΔA)", dims
        if red in ("fro", "nuc"):
            return f"{red} norm of discrete A over (d_inner, d_state)", dims
        dropped = [d for d in ("L", "d_inner", "d_state") if d not in dims]
        what = "2-norm" if red == "norm" else red
        return f"{what} of discrete A over {dropped[0] if dropped else '?'}", dims
    return "cos sim(discrete A[..., n], x) over d_inner", dims or ("L", "d_state")


def _as_float(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32)


def plot_artefact(artefact: Union[str, os.PathLike, Dict[str, Any]], out_path: Union[str, os.PathLike],
                  layers: Optional[Sequence[int]] = None, window: Optional[Tuple[int, int]] = None,
                  key: Optional[str] = None, max_layers: int = 6, dpi: int = 110,
                  max_char_ticks: int = MAX_CHAR_TICKS, title: Optional[str] = None, relative: bool = False) -> Path:
    """Draw ``artefact`` (a dict or a .pkl path) to the PNG ``out_path`` (written atomically). Returns the path.

    ``layers``: which layers get a heatmap (default: up to ``max_layers``, evenly spaced); ``window``:
    (start, end) byte range; ``key``: which tensor key to draw; ``relative``: subtract each channel's
    mean over the window in the heatmaps, so variation along the text stands out over fixed per-channel
    offsets (diverging colours).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .artefact import check_artefact, load_artefact

    art = load_artefact(artefact) if not isinstance(artefact, dict) else artefact
    check_artefact(art)
    key = _main_key(art, key)
    per_layer: Dict[int, Tensor] = art[key]
    if not per_layer:
        raise MambaByteError(f"the artefact's {key!r} holds no layers")
    shown = _pick_layers(per_layer.keys(), layers, max_layers)
    label, dims = _describe(art, key)
    data = art.get("prompt_bytes") or art["prompt"].encode("utf-8")

    first = per_layer[shown[0]]
    L = first.shape[0] if first.dim() > 0 else 1
    if art.get("reduction") in ("mean", "min", "max", "norm") and "L" not in dims:
        L = len(data)  # reduced over positions: nothing is indexed by byte
    s, e = (0, L) if window is None else (int(window[0]), int(window[1]))
    if s < 0:
        s += L
    if e < 0:
        e += L
    s, e = max(0, s), min(L, e)
    if e <= s:
        raise MambaByteError(f"--window {window[0]}:{window[1]} selects no bytes (the prompt has {L})")

    over_positions = "L" in dims or not dims
    labels = byte_labels(data)[s:e]
    show_chars = (e - s) <= max_char_ticks

    maps = []  # (layer, 2-d array (channels, positions) or None, 1-d curve over positions or None)
    for li in shown:
        t = _as_float(per_layer[li])
        note = ""
        if not over_positions:  # reduced over L: (d_inner, d_state) or (d_state,)
            maps.append((li, t if t.dim() == 2 else t[None, :], None, note))
            continue
        t = t[s:e]
        if t.dim() == 3:
            t = t.mean(1)
            note = " (mean over d_inner)"
        if t.dim() == 1:
            maps.append((li, None, t, note))
        else:
            maps.append((li, t.T, t.mean(1), note))

    has_maps = any(m[1] is not None for m in maps)
    has_stats = art.get("log_probs") is not None or art.get("ranks") is not None
    n_rows = (len(maps) if has_maps else 0) + (1 if over_positions else 0) + (1 if has_stats else 0)
    width = 14.0 if not show_chars else min(40.0, max(12.0, 0.13 * (e - s) + 3))
    heights = ([1.6] * len(maps) if has_maps else []) + ([1.8] if over_positions else []) + ([1.8] if has_stats else [])
    fig = Figure(figsize=(width, sum(heights) + 1.3), dpi=dpi, constrained_layout=True)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(n_rows, 2, height_ratios=heights, width_ratios=[60, 1])
    x = torch.arange(s, e).numpy()
    axes_x = []
    row = 0

    chan_name = dims[-1] if len(dims) >= 2 and dims[-1] != "L" else "channel"
    if has_maps:
        for li, mat, _curve, note in maps:
            ax = fig.add_subplot(gs[row, 0])
            cax = fig.add_subplot(gs[row, 1])
            rel = relative and over_positions
            if rel:
                mat = mat - mat.mean(1, keepdim=True)
            m = mat.numpy()
            kw = dict(aspect="auto", interpolation="nearest", origin="lower")
            if rel:
                lim = float(mat.abs().max()) or 1.0
                kw.update(cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                kw.update(cmap="viridis")
            if over_positions:
                im = ax.imshow(m, extent=(s - 0.5, e - 0.5, -0.5, m.shape[0] - 0.5), **kw)
                axes_x.append(ax)
                ax.set_ylabel(chan_name, fontsize=8)
            else:
                im = ax.imshow(m, **kw)
                ax.set_ylabel(dims[0] if len(dims) == 2 else "", fontsize=8)
                ax.set_xlabel(dims[-1], fontsize=8)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.set_title(f"layer {li}: {label}{note}" + (" - its mean over the window, per row" if rel else ""),
                         fontsize=9, loc="left")
            ax.tick_params(labelsize=7)
            fig.colorbar(im, cax=cax)
            cax.tick_params(labelsize=7)
            row += 1

    if over_positions:
        ax = fig.add_subplot(gs[row, 0])
        for li, _mat, curve, note in maps:
            ax.plot(x, curve.numpy(), lw=1.0, label=f"layer {li}")
        one_d = all(m[1] is None for m in maps)
        what = label if one_d else f"{label}: mean over {chan_name}"
        ax.set_title(what + (maps[0][3] if maps else ""), fontsize=9, loc="left")
        ax.legend(fontsize=7, ncol=min(len(maps), 8), loc="best")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        axes_x.append(ax)
        row += 1

    if has_stats:
        ax = fig.add_subplot(gs[row, 0])
        handles = []
        lp = art.get("log_probs")
        if lp is not None:
            xs = torch.arange(1, lp.shape[0] + 1)
            keep = (xs >= s) & (xs < e)
            many = int(keep.sum()) > 400
            (h1,) = ax.plot(xs[keep].numpy(), _as_float(lp)[keep].numpy(), color="tab:blue",
                            lw=0.5 if many else 1.0, alpha=0.5 if many else 1.0, label="log p(true next byte)")
            handles.append(h1)
            if many:  # a running mean keeps the trend readable over thousands of bytes
                k = max(5, int(keep.sum()) // 100)
                v = _as_float(lp)[keep]
                smooth = torch.nn.functional.avg_pool1d(v[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
                (h3,) = ax.plot(xs[keep].numpy(), smooth[: v.shape[0]].numpy(), color="navy", lw=1.4,
                                label=f"running mean ({k} bytes)")
                handles.append(h3)
            ax.set_ylabel("log prob", fontsize=8)
        rk = art.get("ranks")
        if rk is not None:
            xs = torch.arange(1, rk.shape[0] + 1)
            keep = (xs >= s) & (xs < e)
            ax2 = ax.twinx() if lp is not None else ax
            many = int(keep.sum()) > 400
            h2 = ax2.scatter(xs[keep].numpy(), rk[keep].numpy(), s=2 if many else 6, alpha=0.35 if many else 0.9,
                             color="tab:red", linewidths=0, label="rank (0 = top-1)")
            ax2.set_yscale("symlog", linthresh=1)
            ax2.set_ylabel("rank", fontsize=8)
            ax2.tick_params(labelsize=7)
            handles.append(h2)
        ax.set_title("next-byte prediction along the text (position i: byte i given bytes < i)", fontsize=9, loc="left")
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        axes_x.append(ax)

    for ax in axes_x:
        ax.set_xlim(s - 0.5, e - 0.5)
    if axes_x:
        for ax in axes_x[:-1]:
            ax.tick_params(labelbottom=False)
        last = axes_x[-1]
        if show_chars:
            last.set_xticks(list(range(s, e)))
            last.set_xticklabels(labels, fontsize=7 if e - s <= 100 else 6, family="monospace")
            last.set_xlabel("byte (prompt characters)", fontsize=8)
        else:
            last.set_xlabel(f"byte position (bytes {s}..{e - 1}; --window START:END with <= {max_char_ticks} bytes "
                            "shows the characters)", fontsize=8)
    head = title or (
        f"{art['kind']} · model {art.get('model_id')} · {len(data)} bytes · layers {_compact(shown)}"
        + (f" (of {len(per_layer)} stored)" if len(shown) < len(per_layer) else "")
    )
    if show_chars or len(data) <= 80:
        snippet = data[s:e].decode("utf-8", errors="replace").replace("\n", " ")
        head += "\n" + (snippet if len(snippet) <= 120 else snippet[:117] + "...")
    fig.suptitle(head, fontsize=10)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")

    return atomic_write_file(out_path, write)

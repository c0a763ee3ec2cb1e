"""``mambabyte state``: the local library of recurrent states ($MAMBABYTE_HOME/states).

    mambabyte state build NAME --source book.txt [more.txt ...] [--from STATE] [--chunk_bytes N] [--store_text] [--model M]
    mambabyte state list [--json]
    mambabyte state show NAME|PATH [--json]
    mambabyte state rm NAME
    mambabyte state export NAME DEST [--force]
    mambabyte state combine NEW A B [...] [--weights 0.7 0.3] [--force]

Use a state with ``mambabyte generate --state NAME``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import MambaByteError
from .common import ArgumentParser, add_model_args, check_output_path, cli_entry, load_model, setup_logging


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="mambabyte state", description="Build, list, show, remove and export saved states.")
    sub = p.add_subparsers(dest="cmd", metavar="{build,list,show,rm,export,combine}")
    sub.required = True
    b = sub.add_parser("build", help="run files through the model and save the final state")
    b.add_argument("name", help="library name (letters, digits, . _ -) or a path ending in .safetensors")
    b.add_argument("--source", nargs="+", required=True, help="text files, consumed in order")
    b.add_argument("--separator", default="", help="text placed between files (default none; e.g. $'\\n\\n')")
    b.add_argument("--chunk_bytes", type=int, default=65536, help="bytes per forward call (default 65536)")
    b.add_argument("--store_text", action="store_true", help="store the consumed text itself in the file")
    b.add_argument("--description", default=None)
    b.add_argument("--tags", default=None, help="comma-separated tags")
    b.add_argument("--force", action="store_true", help="overwrite an existing state of that name")
    b.add_argument("--from", dest="from_state", default=None, metavar="STATE",
                   help="continue this saved state (name or path) instead of starting from the zero state")
    b.add_argument("--seed", type=int, default=0, help="seed for a random model (when no checkpoint is given)")
    b.add_argument("--no_progress", action="store_true")
    add_model_args(b)
    ls = sub.add_parser("list", help="list the library")
    ls.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="metadata of one state")
    sh.add_argument("name", help="library name or file path")
    sh.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="delete a state from the library")
    rm.add_argument("name", nargs="+")
    ex = sub.add_parser("export", help="copy a state file out of the library")
    ex.add_argument("name")
    ex.add_argument("dest", help="file or directory")
    ex.add_argument("--force", action="store_true")
    co = sub.add_parser("combine", help="save a weighted sum of saved states (same model and shapes)")
    co.add_argument("name", help="name (or .safetensors path) of the new state")
    co.add_argument("states", nargs="+", help="states to combine: library names or paths")
    co.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per state (default equal)")
    co.add_argument("--no_normalize", action="store_true", help="use the weights as given (default: divide by their sum)")
    co.add_argument("--description", default=None)
    co.add_argument("--force", action="store_true", help="overwrite an existing state; combine states of different models")
    for sp in (b, ls, sh, rm, ex, co):
        sp.error = p.error  # type: ignore[assignment]  (one-line errors from subcommands too)
    return p


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cmd_build(args) -> int:
    import torch

    from ..statelib import StateLibrary, build_state, check_name, save_state

    if os.sep in args.name or args.name.endswith(".safetensors"):
        target = Path(args.name)
    else:
        target = StateLibrary().path(check_name(args.name))
    if target.exists() and not args.force:
        raise MambaByteError(f"{str(target)!r} exists (use --force to overwrite)")
    srcs = [Path(s) for s in args.source]
    for s in srcs:
        if not s.is_file():
            raise MambaByteError(f"--source: no such file {str(s)!r}")
    # the separator as typed: bytes a shell passed that are not UTF-8 come back unchanged
    sep = os.fsencode(args.separator)
    if args.store_text:
        from ..statelib import MAX_STORED_TEXT

        total = sum(s.stat().st_size for s in srcs) + len(sep) * (len(srcs) - 1)
        if total > MAX_STORED_TEXT:
            raise MambaByteError(f"--store_text: the sources hold {total:,} bytes, more than the {MAX_STORED_TEXT:,} "
                                 f"a state file can store; leave out --store_text (the source paths are kept)")
    torch.manual_seed(args.seed)
    model = load_model(args)
    start = parent = None
    if args.from_state:
        from ..statelib import load_state, resolve_state_path

        start, parent, _ = load_state(args.from_state, model, allow_fingerprint_mismatch=args.force, return_meta=True)
    # continuing a state: the separator also goes between its text and the first new file
    items = ([b""] if (start is not None and sep) else []) + srcs
    state, info = build_state(model, items, chunk_bytes=args.chunk_bytes, separator=sep, return_info=True,
                              progress=False if args.no_progress else None, state=start)
    meta = {"text_sha256": info["text_sha256"], "source": [str(s.resolve()) for s in srcs],
            "description": args.description, "tags": args.tags or []}
    if sep:
        meta["separator"] = sep.decode("utf-8", errors="surrogateescape")
    # the text is stored only whole: a continued state whose parent did not store its text keeps the
    # sha256 of each part instead
    whole = parent is None or parent.get("text") is not None
    if parent is not None:
        meta["parent"] = str(resolve_state_path(args.from_state))
        meta["source"] = list(parent.get("source") or []) + meta["source"]
        if not (args.store_text and whole):
            meta.update(text_sha256=None, parent_text_sha256=parent.get("text_sha256"),
                        extension_text_sha256=info["text_sha256"])
    if args.store_text and whole:
        from ..statelib import meta_text_bytes

        text = sep.join(s.read_bytes() for s in srcs)
        if parent is not None:  # save_state hashes the whole text again
            text = meta_text_bytes(parent) + sep + text
        meta["text"] = text
    meta = {k: v for k, v in meta.items() if v is not None}
    p = save_state(target, state, meta, model=model, logits=info["logits"])
    print(f"built state from {len(srcs)} file(s), {info['bytes']} bytes -> {p}")
    return 0


def _cmd_combine(args) -> int:
    from ..statelib import StateLibrary, check_name, combine_states, read_state_file, resolve_state_path, save_state

    if len(args.states) < 2:
        raise MambaByteError("combine needs at least two states")
    if args.weights is not None and len(args.weights) != len(args.states):
        raise MambaByteError(f"{len(args.states)} states but {len(args.weights)} --weights")
    target = Path(args.name) if (os.sep in args.name or args.name.endswith(".safetensors")) else StateLibrary().path(check_name(args.name))
    if target.exists() and not args.force:
        raise MambaByteError(f"{str(target)!r} exists (use --force to overwrite)")
    loaded = [(resolve_state_path(s),) + read_state_file(resolve_state_path(s)) for s in args.states]
    fps = {m.get("fingerprint") for _, _, m, _ in loaded}
    if len(fps) > 1 and not args.force:
        raise MambaByteError(f"the states were built by different models ({', '.join(sorted(map(str, fps)))}); --force to combine anyway")
    states = [st for _, st, _, _ in loaded]
    combined = combine_states(states, args.weights, normalize=not args.no_normalize)
    w = args.weights or [1.0] * len(states)
    # no next-byte logits are stored: the model's logits at a mixed state are unknown (a generation from
    # it with an empty prompt feeds the bos byte first)
    meta = {"fingerprint": loaded[0][2].get("fingerprint"), "model_config": loaded[0][2].get("model_config"),
            "description": args.description,
            "combined_from": [{"path": str(p), "text_sha256": m.get("text_sha256"), "weight": wi}
                              for (p, _, m, _), wi in zip(loaded, w)]}
    p = save_state(target, combined, {k: v for k, v in meta.items() if v is not None})
    print(f"combined {len(states)} states -> {p}")
    return 0


def _cmd_list(args) -> int:
    from ..statelib import StateLibrary

    lib = StateLibrary()
    items = lib.list()
    if args.json:
        print(json.dumps([{k: v for k, v in m.items() if k != "text"} for m in items], indent=2, sort_keys=True))
        return 0
    if not items:
        print(f"no states in {lib.root}")
        return 0
    print(f"{'name':<24} {'bytes':>10} {'model':<17} {'size':>9}  created                    description")
    for m in items:
        if "error" in m:
            print(f"{m['name']:<24} (unreadable: {m['error']})")
            continue
        print(f"{m['name']:<24} {m.get('bytes_consumed', 0):>10} {str(m.get('fingerprint')):<17} "
              f"{_fmt_size(m['file_bytes']):>9}  {m.get('created', ''):<26} {m.get('description') or ''}")
    return 0


def _cmd_show(args) -> int:
    from ..statelib import read_state_file, resolve_state_path

    p = resolve_state_path(args.name)
    state, meta, logits = read_state_file(p)
    meta = dict(meta, path=str(p), file_bytes=p.stat().st_size)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    shp = meta["shape"]
    print(f"path           {p}")
    print(f"model          {meta.get('fingerprint')}")
    print(f"bytes consumed {meta.get('bytes_consumed')}")
    print(f"shape          n_layer {shp['n_layer']}, batch {shp['batch_size']}, d_inner {shp['d_inner']}, "
          f"d_conv {shp['d_conv']}, d_state {shp['d_state']} ({meta.get('dtype')}, {_fmt_size(state.nbytes())})")
    print(f"next logits    {'stored' if logits is not None else 'not stored'}")
    print(f"text sha256    {meta.get('text_sha256')}")
    if meta.get("source"):
        print(f"source         {', '.join(meta['source'])}")
    if meta.get("text") is not None:
        t = meta["text"]
        print(f"text           {len(t)} chars stored: {t[:60]!r}{'...' if len(t) > 60 else ''}")
    print(f"description    {meta.get('description') or ''}")
    print(f"tags           {', '.join(meta.get('tags') or [])}")
    print(f"created        {meta.get('created')}")
    print(f"format         {meta.get('format')} v{meta.get('format_version')}")
    return 0


def _cmd_rm(args) -> int:
    from ..statelib import StateLibrary

    lib = StateLibrary()
    for n in args.name:
        lib.path(n)  # validate all names before removing any
        if not lib.exists(n):
            raise MambaByteError(f"no state named {n!r} in {lib.root}")
    for n in args.name:
        print(f"removed {lib.remove(n)}")
    return 0


def _cmd_export(args) -> int:
    from ..statelib import StateLibrary

    check_output_path(args.dest, "state export")
    print(f"exported to {StateLibrary().export(args.name, args.dest, overwrite=args.force)}")
    return 0


@cli_entry
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(False)
    return {"build": _cmd_build, "list": _cmd_list, "show": _cmd_show, "rm": _cmd_rm, "export": _cmd_export,
            "combine": _cmd_combine}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

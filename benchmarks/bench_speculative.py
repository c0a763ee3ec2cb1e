#!/usr/bin/env python
"""Speculative decoding with a byte drafter: measured speedups and a cost model for large targets.

Two parts, each optional:

1. ``--target T --drafter D`` (checkpoints; e.g. the shipped trained pair; D may be a byte-level
   MambaByte or a subword drafter folder with a tokenizer.json): speculative vs plain
   decoding of T on prompts cut from ``--texts`` (default pg19_samples/*.txt), at temperature 0 and 0.8,
   for each k in ``--ks``: acceptance rate, accepted bytes per verification, bytes/s, speedup, and
   (at temperature 0) a check that the output equals plain greedy decoding.
2. ``--shapes 353M 972M`` (random weights, speed only; GPU): the cost of one decode step (CUDA graph),
   one drafter step (``--drafter_shape``, CUDA graph), one verification call over L = k+1 bytes (the
   resumable scan), and the projected speedup for each k and acceptance rate alpha (measured ones from
   part 1 when given, else ``--alphas``), using the i.i.d.-acceptance model:

       bytes per verification  E(k, a) = (1 - a^(k+1)) / (1 - a)
       time per verification   rerun:    T = k t_draft + t_verify(k+1) + (1 - a^k) t_verify(~E) + t_sync
                               deferred: T = k t_draft + t_verify(k+1+d) + t_sync,
                                         d = (1 - a^k) E  (bytes carried into the next call)
       projected speedup       E t_step / T

   ``--costs_json FILE`` recomputes the projection from the costs of an earlier run (no GPU needed).

Prints tables and writes JSON to ``--json`` (rewritten after each measurement).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402

from mambabyte.generation import generate  # noqa: E402

from bench_generate import _sync, make_model, step_only_rate  # noqa: E402  (sibling script in benchmarks/)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
RESULTS = {"meta": {}, "measured": [], "cost": [], "projection": []}


def _dump(path):
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(RESULTS, f, indent=2)
        os.replace(path + ".tmp", path)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ---------------------------------------------------------------------------------------------------
# part 1: a real pair
def measure_pair(args):
    from mambabyte.io import load_pretrained

    dev = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    T = load_pretrained(args.target, device=dev, dtype=dtype).eval()
    if os.path.isfile(os.path.join(args.drafter, "tokenizer.json")):
        from mambabyte.subword import SubwordDrafter

        D = SubwordDrafter.from_pretrained(args.drafter, device=dev, dtype=dtype)
        D.model.eval()
        D.num_parameters = D.model.num_parameters
    else:
        D = load_pretrained(args.drafter, device=dev, dtype=dtype).eval()
    texts = args.texts or sorted(glob.glob(os.path.join(REPO, "pg19_samples", "*.txt")))
    prompts = []
    for path in texts:
        data = open(path, "rb").read()
        for j in range(args.prompts_per_text):
            s = (j + 1) * len(data) // (args.prompts_per_text + 1)
            prompts.append(data[s : s + args.prompt_bytes])
    RESULTS["meta"].update(target=args.target, drafter=args.drafter, target_params=T.num_parameters(),
                           drafter_params=D.num_parameters(), texts=texts, n_prompts=len(prompts))
    for temp in args.temperatures:
        plain_rate, plain_out = [], []
        for i, pr in enumerate(prompts):
            r = generate(T, pr, max_new_bytes=args.new_bytes, temperature=temp, seed=i)
            plain_rate.append(r.stats.decode_bytes_per_s)
            plain_out.append(r.bytes)
        for k in args.ks:
            acc = drafted = ver = emitted = 0
            rates, same = [], 0
            for i, pr in enumerate(prompts):
                r = generate(T, pr, max_new_bytes=args.new_bytes, temperature=temp, seed=i, draft_model=D, draft_len=k,
                             verify_cuda_graph=args.verify_cuda_graph)
                sp = r.stats.speculative
                acc += sp["accepted"]
                drafted += sp["drafted"]
                ver += sp["verifications"]
                emitted += sp["emitted"]
                rates.append(r.stats.decode_bytes_per_s)
                same += r.bytes == plain_out[i]
            row = {"temperature": temp, "k": k, "acceptance_rate": acc / max(drafted, 1),
                   "bytes_per_verification": emitted / max(ver, 1), "spec_bytes_per_s": sum(rates) / len(rates),
                   "plain_bytes_per_s": sum(plain_rate) / len(plain_rate),
                   "speedup": (sum(rates) / len(rates)) / (sum(plain_rate) / len(plain_rate)),
                   "identical_to_plain": f"{same}/{len(prompts)}" if temp == 0 else None}
            RESULTS["measured"].append(row)
            _dump(args.json)
            print(f"T={temp} k={k:>2}: acceptance {row['acceptance_rate']:.3f}, {row['bytes_per_verification']:.2f} B/verif, "
                  f"{row['spec_bytes_per_s']:.1f} vs {row['plain_bytes_per_s']:.1f} B/s -> {row['speedup']:.2f}x"
                  + (f", identical {row['identical_to_plain']}" if temp == 0 else ""))


# ---------------------------------------------------------------------------------------------------
# part 2: cost model at large shapes
def step_time(m, graph=True, n=200):
    """Seconds per graph-replayed (or eager) decode step at batch 1."""
    return 1.0 / step_only_rate(m, 1, n, graph)


@torch.no_grad()
def verify_time(m, L, reps=5, graph=False):
    """One verification call over L bytes from a state: eager forward, or its CUDA-graph replay."""
    from mambabyte.generation.cuda_graph import ForwardRunner

    dev = m.device
    st = m(torch.tensor([list(b"warm up the state")], device=dev), return_state=True).state
    ids = torch.randint(32, 127, (L,), device=dev)
    fwd = ForwardRunner(m, use_cuda_graph=graph)
    fwd(ids, st)
    ts = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        fwd(ids, st)
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return _median(ts)


@torch.no_grad()
def sync_time(dev, n=200):
    x = torch.zeros(4, device=dev)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1).tolist()
    return (time.perf_counter() - t) / n


def _interp(tv, L):
    """Verify time at length L from the measured lengths (linear between, flat beyond)."""
    xs = sorted(tv)
    if L <= xs[0]:
        return tv[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if a <= L <= b:
            return tv[a] + (tv[b] - tv[a]) * (L - a) / (b - a)
    return tv[xs[-1]] * L / xs[-1] if L > xs[-1] else tv[xs[-1]]


def project(row, ks, alphas, out):
    """Projected speedups from one cost row (times in ms) for both rollback modes."""
    tv = {int(L): v for L, v in row["t_verify_ms"].items()}
    t_step, t_draft, t_sync = row["t_step_ms"], row["t_draft_step_ms"], row["t_sync_ms"]
    for k in ks:
        for a in alphas:
            E = (k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
            t_rerun = k * t_draft + _interp(tv, k + 1) + (1 - a ** k) * _interp(tv, max(1, round(E))) + t_sync
            d = (1 - a ** k) * E
            t_def = k * t_draft + _interp(tv, k + 1 + d) + t_sync
            out.append({"shape": row["shape"], "k": k, "alpha": a, "bytes_per_verification": E,
                        "ms_per_verification_rerun": t_rerun, "speedup_rerun": E * t_step / t_rerun,
                        "ms_per_verification_deferred": t_def, "speedup_deferred": E * t_step / t_def})


def print_projection(shapes, ks, alphas):
    for mode in ("deferred", "rerun"):
        print(f"projected speedup, rollback={mode}")
        print(f"{'shape':<6} {'k':>3} " + " ".join(f"a={a:<5}" for a in alphas))
        for shape in shapes:
            for k in ks:
                cells = [p for p in RESULTS["projection"] if p["shape"] == shape and p["k"] == k]
                print(f"{shape:<6} {k:>3} " + " ".join(f"{p['speedup_' + mode]:>6.2f}x" for p in cells))


def cost_model(args):
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
    from mambabyte.ops import backend_report

    RESULTS["meta"].update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           backend=backend_report()["selective_scan"] if dev.type == "cuda" else "reference (CPU)")
    d = make_model(args.drafter_shape, dev, dtype)
    t_draft = step_time(d)
    t_sync = sync_time(dev)
    del d
    alphas = sorted({round(r["acceptance_rate"], 3) for r in RESULTS["measured"]}) or args.alphas
    for shape in args.shapes:
        m = make_model(shape, dev, dtype)
        t_step = step_time(m)
        lens = sorted({k + 1 for k in args.ks} | {1, 2, 3, 5})
        tv = {L: verify_time(m, L, graph=args.verify_cuda_graph) for L in lens}
        row = {"shape": shape, "dtype": args.dtype or "bf16", "drafter_shape": args.drafter_shape,
               "t_step_ms": t_step * 1e3, "t_draft_step_ms": t_draft * 1e3, "t_sync_ms": t_sync * 1e3,
               "t_verify_ms": {str(L): v * 1e3 for L, v in tv.items()}, "verify_cuda_graph": args.verify_cuda_graph}
        RESULTS["cost"].append(row)
        _dump(args.json)
        print(f"{shape}: step {t_step * 1e3:.3f} ms (graph), drafter step {t_draft * 1e3:.3f} ms, "
              f"verify " + ", ".join(f"L={L} {v * 1e3:.2f} ms" for L, v in tv.items()))
        project(row, args.ks, alphas, RESULTS["projection"])
        _dump(args.json)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print_projection(args.shapes, args.ks, alphas)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--target", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--texts", nargs="*", default=None)
    p.add_argument("--prompts_per_text", type=int, default=2)
    p.add_argument("--prompt_bytes", type=int, default=256)
    p.add_argument("--new_bytes", type=int, default=128)
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.8])
    p.add_argument("--ks", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--shapes", nargs="*", default=None, help="random-weight shapes for the cost model (GPU)")
    p.add_argument("--drafter_shape", default="draft")
    p.add_argument("--verify_cuda_graph", action="store_true", help="verification calls replayed from CUDA graphs")
    p.add_argument("--costs_json", default=None, help="recompute projections from this earlier --json output")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS["meta"].update(torch=torch.__version__, argv=sys.argv[1:], date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    if args.target or args.drafter:
        if not (args.target and args.drafter):
            p.error("--target and --drafter go together")
        measure_pair(args)
    if args.shapes:
        cost_model(args)
    if args.costs_json:
        with open(args.costs_json) as f:
            old = json.load(f)
        RESULTS["cost"] = old["cost"]
        RESULTS["meta"]["costs_from"] = {"file": args.costs_json, **old.get("meta", {})}
        alphas = sorted({round(r["acceptance_rate"], 3) for r in RESULTS["measured"]}) or args.alphas
        for row in RESULTS["cost"]:
            project(row, args.ks, alphas, RESULTS["projection"])
        print_projection([r["shape"] for r in RESULTS["cost"]], args.ks, alphas)
    if not (args.target or args.shapes or args.costs_json):
        p.error("nothing to do: give --target/--drafter and/or --shapes")
    _dump(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

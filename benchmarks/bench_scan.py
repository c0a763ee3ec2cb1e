"""Benchmark the CUDA selective scan (and the conv / decode kernels) against the ANCHORS figures.

Usage (on a GPU machine): ``python benchmarks/bench_scan.py [--json out.json] [--quick]``

Timings are medians of ``triton.testing.do_bench`` (CUDA events) when Triton is installed, else of a
CUDA-event loop. The mamba-ssm figures come from ../shared/docs/ANCHORS.md (same GPU model, measured
separately; mamba-ssm is not installed here), so the speed-ups are across runs, not side by side.

Byte model for GB/s (the fewest bytes each pass must move, bf16 = 2 bytes):
  forward:  read u, delta, z, B, C; write out and the fp32 final state.
  fwd+bwd:  the forward, plus the backward reading u, delta, z, B, C, dout and writing du, ddelta, dz,
            dB, dC (as bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mambabyte.ops import cuda_backend as CB  # noqa: E402

ANCHOR = {  # mamba-ssm selective_scan_fn, H100, ms (ANCHORS.md)
    (2, 3072, 8192, 16): (1.112, 5.349),
    (8, 2048, 2048, 16): (0.595, 3.320),
}


def bench(fn, warmup=25, rep=100):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)


def scan_inputs(b, d, L, n, dtype=torch.bfloat16, h0=False, grad=False):
    dev = "cuda"
    t = dict(
        u=torch.randn(b, d, L, device=dev, dtype=dtype),
        delta=(0.5 * torch.randn(b, d, L, device=dev) - 1).to(dtype),
        A=-torch.exp(0.5 * torch.randn(d, n, device=dev)),
        B=torch.randn(b, n, L, device=dev, dtype=dtype),
        C=torch.randn(b, n, L, device=dev, dtype=dtype),
        D=torch.randn(d, device=dev),
        z=torch.randn(b, d, L, device=dev, dtype=dtype),
        delta_bias=0.5 * torch.randn(d, device=dev),
        initial_state=torch.randn(b, d, n, device=dev) if h0 else None,
    )
    if grad:
        for k, v in t.items():
            if v is not None:
                v.requires_grad_(True)
    return t


def call_scan(t, final=True):
    return CB.selective_scan_cuda(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, t["initial_state"], final
    )


def bench_scan_shape(b, d, L, n, h0=False):
    esz = 2
    t = scan_inputs(b, d, L, n, h0=h0)
    with torch.no_grad():
        fwd_ms = bench(lambda: call_scan(t))
    tg = scan_inputs(b, d, L, n, h0=h0, grad=True)
    leaves = [v for v in tg.values() if v is not None and v.requires_grad]
    dout = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)

    def fb():
        out, fin = call_scan(tg)
        torch.autograd.grad([out], leaves, [dout])

    fb_ms = bench(fb, warmup=10, rep=50)
    bdl = b * d * L
    bnl = b * n * L
    fwd_bytes = 4 * bdl * esz + 2 * bnl * esz + b * d * n * 4
    bwd_bytes = 7 * bdl * esz + 4 * bnl * esz
    return dict(
        shape=[b, d, L, n],
        initial_state=h0,
        fwd_ms=fwd_ms,
        fwd_bwd_ms=fb_ms,
        fwd_GBps=fwd_bytes / fwd_ms / 1e6,
        fwd_bwd_GBps=(fwd_bytes + bwd_bytes) / fb_ms / 1e6,
    )


FWD_VARIANTS = [  # fwd_sp: -1 auto (the default), 0 the chunked kernel, 1 the state-parallel one
    dict(fwd_sp=-1),
    dict(fwd_sp=1),
    dict(fwd_sp=0, fwd_states=2, fwd_min_blocks=1),
    dict(fwd_sp=0, fwd_states=1, fwd_min_blocks=1),
    dict(fwd_sp=0, fwd_states=4, fwd_min_blocks=1),
    dict(fwd_sp=0, fwd_states=2, fwd_min_blocks=4),
]
BWD_VARIANTS = [
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=0, bwd_xs=1),
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=1, bwd_xs=1),
    dict(bwd_warps=4, bwd_min_blocks=2, bwd_lane_acc=1, bwd_xs=1),
    dict(bwd_warps=8, bwd_min_blocks=1, bwd_lane_acc=0, bwd_xs=1),
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=0, bwd_xs=2),
    dict(bwd_warps=8, bwd_min_blocks=2, bwd_lane_acc=1, bwd_xs=2),
    dict(bwd_warps=16, bwd_min_blocks=1, bwd_lane_acc=0, bwd_xs=1),
    dict(bwd_warps=16, bwd_min_blocks=1, bwd_lane_acc=1, bwd_xs=1),
    dict(bwd_warps=16, bwd_min_blocks=1, bwd_lane_acc=0, bwd_xs=2),
    dict(bwd_warps=16, bwd_min_blocks=1, bwd_lane_acc=1, bwd_xs=2),
]


# forward-only sweep shapes: the 972M prefill (8,192 bytes) and verification calls from a state
SWEEP_FWD_SHAPES = [(1, 3584, 8192, 16), (1, 3584, 128, 16), (1, 3584, 16, 16)]


def sweep_variants(shape, backward=True):
    """Forward (and forward+backward) time of every compiled kernel variant at one shape."""
    b, d, L, n = shape
    saved = dict(CB.TUNING)
    rows = []
    t = scan_inputs(b, d, L, n, h0=not backward)
    with torch.no_grad():
        bench(lambda: call_scan(t))  # untimed: the first timing at a new shape runs slow
    for v in FWD_VARIANTS:
        CB.TUNING.update(saved)  # a variant names only what it changes from the defaults
        CB.TUNING.update(v)
        with torch.no_grad():
            ms = bench(lambda: call_scan(t))
        rows.append(dict(shape=list(shape), pass_="fwd", variant=v, ms=ms))
        print(json.dumps(rows[-1]), flush=True)
    CB.TUNING.update(saved)
    del t
    if not backward:
        return rows
    tg = scan_inputs(b, d, L, n, grad=True)
    leaves = [v for v in tg.values() if v is not None and v.requires_grad]
    dout = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)
    for v in BWD_VARIANTS:
        CB.TUNING.update(saved)
        CB.TUNING.update(v)

        def fb():
            out, fin = call_scan(tg)
            torch.autograd.grad([out], leaves, [dout])

        ms = bench(fb, warmup=10, rep=50)
        rows.append(dict(shape=list(shape), pass_="fwd+bwd", variant=v, ms=ms))
        print(json.dumps(rows[-1]), flush=True)
    CB.TUNING.update(saved)
    return rows


def bench_verify(d=3584, n=16, ks=(1, 8, 32, 128, 512)):
    """Multi-byte scan from a state (speculative verification), batch 1, bf16, no grad."""
    rows = []
    for k in ks:
        t = scan_inputs(1, d, k, n, h0=True)
        with torch.no_grad():
            gpu_ms = bench(lambda: call_scan(t))
            for _ in range(20):
                call_scan(t)
            torch.cuda.synchronize()
            iters = 200
            t0 = time.perf_counter()
            for _ in range(iters):
                call_scan(t)
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) / iters * 1e6
        rows.append(dict(k=k, gpu_us=gpu_ms * 1e3, wall_us_per_call=wall_us))
    return rows


def bench_conv(b=2, d=3072, L=8192, w=4):
    x = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(d, w, device="cuda")
    bs = torch.randn(d, device="cuda")
    st = torch.randn(b, d, w, device="cuda")
    with torch.no_grad():
        fwd = bench(lambda: CB.causal_conv1d_cuda(x, wt, bs, st, "silu", True))
    xg, wg, bg, sg = (v.clone().requires_grad_(True) for v in (x, wt, bs, st))
    dout = torch.randn_like(x)

    def fb():
        out, ns = CB.causal_conv1d_cuda(xg, wg, bg, sg, "silu", True)
        torch.autograd.grad([out], [xg, wg, bg, sg], [dout])

    fbm = bench(fb, warmup=10, rep=50)
    nbytes = 2 * b * d * L * 2
    return dict(shape=[b, d, L, w], fwd_ms=fwd, fwd_bwd_ms=fbm, fwd_GBps=nbytes / fwd / 1e6)


def bench_decode(b=1, d=3584, n=16, w=4, R=112):
    dev = "cuda"
    bf = torch.bfloat16
    x = torch.randn(b, d, device=dev, dtype=bf)
    z = torch.randn(b, d, device=dev, dtype=bf)
    cw = torch.randn(d, w, device=dev, dtype=bf)
    cb = torch.randn(d, device=dev, dtype=bf)
    xp = 0.05 * torch.randn(R + 2 * n, d, device=dev, dtype=bf)
    dp = 0.1 * torch.randn(d, R, device=dev, dtype=bf)
    dtb = torch.randn(d, device=dev)
    A = -torch.exp(torch.randn(d, n, device=dev))
    D = torch.randn(d, device=dev)
    cs = torch.randn(b, d, w, device=dev, dtype=bf)
    ss = torch.randn(b, d, n, device=dev)
    Bv = torch.randn(b, n, device=dev, dtype=bf)
    with torch.no_grad():
        step = bench(lambda: CB.mamba_decode_step_cuda(x, z, cs, cw, cb, ss, xp, dp, dtb, A, D))
        upd = bench(lambda: CB.selective_state_update_cuda(ss, x, x, A, Bv, Bv, D, z, dtb, True))
        cupd = bench(lambda: CB.causal_conv1d_update_cuda(x, cs, cw, cb, "silu"))
    return dict(shape=[b, d, n, w, R], decode_step_us=step * 1e3, state_update_us=upd * 1e3, conv_update_us=cupd * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="scan shapes only")
    ap.add_argument("--sweep", action="store_true", help="also time every compiled scan kernel variant")
    args = ap.parse_args(argv)
    ok, reason = CB.status()
    if not ok:
        print(f"CUDA kernels unavailable: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    res = dict(
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        backend=reason,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        scan=[],
    )
    res["tuning"] = dict(CB.TUNING)
    if args.sweep:
        res["sweep"] = []
        for shape in ANCHOR:
            res["sweep"] += sweep_variants(shape)
        for shape in SWEEP_FWD_SHAPES:
            res["sweep"] += sweep_variants(shape, backward=False)
    for shape in ANCHOR:
        for h0 in (False, True):
            r = bench_scan_shape(*shape, h0=h0)
            af, afb = ANCHOR[shape]
            r["speedup_fwd_vs_mamba_ssm"] = af / r["fwd_ms"]
            r["speedup_fwd_bwd_vs_mamba_ssm"] = afb / r["fwd_bwd_ms"]
            res["scan"].append(r)
            print(json.dumps(r), flush=True)
    if not args.quick:
        res["verify"] = bench_verify()
        res["conv"] = bench_conv()
        res["decode"] = bench_decode()
        print(json.dumps(res["verify"]), flush=True)
        print(json.dumps(res["conv"]), flush=True)
        print(json.dumps(res["decode"]), flush=True)
    print("\n| shape (b,d,L,n) | h0 | fwd ms | x vs mamba-ssm | fwd GB/s | fwd+bwd ms | x vs mamba-ssm | fwd+bwd GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["scan"]:
        print(
            f"| {tuple(r['shape'])} | {int(r['initial_state'])} | {r['fwd_ms']:.3f} | {r['speedup_fwd_vs_mamba_ssm']:.2f} | "
            f"{r['fwd_GBps']:.0f} | {r['fwd_bwd_ms']:.3f} | {r['speedup_fwd_bwd_vs_mamba_ssm']:.2f} | {r['fwd_bwd_GBps']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

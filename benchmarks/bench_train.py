"""Training throughput of MambaByte at the paper's shapes: bytes/s and peak GPU memory per train step.

One train step = forward + next-byte loss + backward + gradient clipping + AdamW step, exactly as
``mambabyte train`` does it (same loss, parameter groups, autocast): bf16 autocast with fp32 master
weights and fused AdamW on GPU. Defaults: the 353M and 972M presets, batch 4 x 8192 bytes -- the shape
of the mamba-ssm figures in ../shared/docs/ANCHORS.md (64,912 and 37,259 bytes/s on an H100).

    python benchmarks/bench_train.py --json bench_train.json                       # GPU, 353M + 972M
    python benchmarks/bench_train.py --presets 353M --batch 4 --seq_len 8192 --steps 10
    python benchmarks/bench_train.py --device cpu --presets tiny --batch 2 --seq_len 256 --steps 2   # smoke test

Prints a table (ms/step, bytes/s, peak GiB, ratio to the anchor) and writes JSON to --json.
A preset that runs out of memory is reported as OOM and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

# anchors: mamba-ssm MambaLMHeadModel on one H100, batch 4 x 8192, bf16 autocast, fused AdamW (ANCHORS.md)
ANCHORS = {
    "353M": {"ms_per_step": 504.8, "bytes_per_s": 64912, "peak_gib": 36.9},
    "972M": {"ms_per_step": 879.5, "bytes_per_s": 37259, "peak_gib": 63.9},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(preset: str, device: torch.device, batch: int, seq_len: int, steps: int, warmup: int,
                 precision: str, compile_model: bool, micro_batch: int, checkpointing: bool = False) -> dict:
    from mambabyte import MambaByteLM
    from mambabyte.training.evaluate import autocast_context
    from mambabyte.training.trainer import _param_groups, compute_loss

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = MambaByteLM.from_preset(preset, device=device)
    model.train()
    model.gradient_checkpointing = checkpointing
    n_params = model.num_parameters()
    runner = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=4e-4, betas=(0.9, 0.95),
                            fused=True if device.type == "cuda" else None)
    amp = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and device.type == "cuda")) else None
    mb = micro_batch or batch
    if batch % mb:
        raise SystemExit(f"--batch {batch} is not a multiple of --micro_batch {mb}")
    accum = batch // mb
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, 256, (batch, seq_len + 1), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        loss_sum = 0.0
        for m in range(accum):
            w = data[m * mb : (m + 1) * mb]
            with autocast_context(device.type, amp):
                out = runner(w[:, :-1])
                loss = compute_loss(out.logits, w[:, 1:])
            (loss / accum).backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum / accum

    for _ in range(warmup):
        step()
    _sync(device)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())  # float(loss) synchronizes each micro-step, as the trainer's logging does
        _sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    res = {
        "preset": preset, "activation_checkpointing": checkpointing, "params": n_params, "d_model": model.config.d_model, "n_layer": model.config.n_layer,
        "batch": batch, "micro_batch": mb, "seq_len": seq_len, "steps_timed": steps,
        "ms_per_step": med * 1e3, "ms_per_step_min": min(times) * 1e3, "bytes_per_s": batch * seq_len / med,
        "final_loss": losses[-1], "precision": "bf16 autocast" if amp else "fp32",
    }
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if preset in ANCHORS and device.type == "cuda" and (batch, seq_len) == (4, 8192):
        a = ANCHORS[preset]
        res["anchor_bytes_per_s"] = a["bytes_per_s"]
        res["speed_vs_anchor"] = res["bytes_per_s"] / a["bytes_per_s"]
        res["anchor_peak_gib"] = a["peak_gib"]
    del model, opt, runner
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["353M", "972M"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro_batch", type=int, default=0, help="forward micro-batch (gradient accumulation); 0 = --batch")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block in the backward (less memory, more compute)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu" and any(pr in ANCHORS for pr in args.presets):
        print("note: 353M / 972M on the CPU reference path take minutes per step; use a GPU", file=sys.stderr)
    from mambabyte.ops import cuda_backend_status

    ok, why = cuda_backend_status()
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "scan_backend": "cuda" if (ok and device.type == "cuda") else "reference", "backend_reason": why,
        "compile": args.compile, "activation_checkpointing": args.activation_checkpointing, "host": platform.node(),
    }
    results = []
    for preset in args.presets:
        try:
            r = bench_preset(preset, device, args.batch, args.seq_len, args.steps, args.warmup, args.precision,
                             args.compile, args.micro_batch, args.activation_checkpointing)
        except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
            r = {"preset": preset, "error": "OOM", "detail": str(exc).splitlines()[0]}
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"\ntraining throughput on {env['device_name']} ({env['device']}, scan backend: {env['scan_backend']}), "
          f"torch {env['torch']}")
    hdr = f"{'preset':>8} {'params':>9} {'batch x L':>11} {'ms/step':>9} {'bytes/s':>10} {'peak GiB':>9} {'anchor B/s':>11} {'vs anchor':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['preset']:>8} {'':>9} {'':>11} {r['error']:>9}")
            continue
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        anc = f"{r['anchor_bytes_per_s']:,}" if "anchor_bytes_per_s" in r else "-"
        vs = f"{r['speed_vs_anchor']:.2f}x" if "speed_vs_anchor" in r else "-"
        print(f"{r['preset']:>8} {r['params'] / 1e6:>8.1f}M {str(r['batch']) + ' x ' + str(r['seq_len']):>11} "
              f"{r['ms_per_step']:>9.1f} {r['bytes_per_s']:>10,.0f} {peak:>9} {anc:>11} {vs:>9}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "anchors": ANCHORS, "results": results}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the GPU time of a prefill, a training step or a decode step goes: torch.profiler kernel tables.

    python benchmarks/profile_model.py --what prefill --preset 972M --seq_len 8192
    python benchmarks/profile_model.py --what train --preset 353M --batch 4 --seq_len 8192
    python benchmarks/profile_model.py --what decode --preset 353M

Prints the CUDA kernels sorted by total time (with call counts and share of the profiled GPU time) and the
same time grouped into coarse families (GEMM, scan, conv, norm, elementwise, copies, optimizer), for one
profiled iteration after warm-up. Used to decide what to fuse next; the numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import torch

FAMILIES = [
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|splitK|Kernel2"),
    ("scan", r"selective_scan|scan_fwd|scan_bwd|ssm"),
    ("conv", r"conv1d|causal_conv"),
    ("norm", r"layer_norm|rms_norm|LayerNorm|RmsNorm|norm"),
    ("optimizer", r"adam|Adam|multi_tensor"),
    ("copy/cast", r"copy|Copy|cast|direct_copy|to_copy|transpose"),
    ("reduce", r"reduce|Reduce|sum_|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|softplus|mul|add|exp"),
]


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if re.search(pat, name):
            return fam
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("prefill", "train", "decode"), required=True)
    p.add_argument("--preset", default="353M")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--fused_block_step", action="store_true", help="decode: the fused block step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: profiling needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from mambabyte import MambaByteLM
    from mambabyte.ops import cuda_backend

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MambaByteLM.from_preset(args.preset, device=dev)
    ids = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=dev)

    if args.what == "prefill":
        model.cast_(torch.bfloat16).eval()

        def once():
            with torch.no_grad():
                model(ids[:, :-1], return_state=True)
    elif args.what == "train":
        from mambabyte.training.trainer import _param_groups

        model.train()
        opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=4e-4, fused=True)

        def once():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, 256), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.cast_(torch.bfloat16).eval()
        cuda_backend.FUSED_BLOCK_STEP = args.fused_block_step
        state = model.allocate_state(args.batch)
        tok = torch.full((args.batch,), 65, device=dev)

        def once():
            with torch.no_grad():
                for _ in range(8):
                    model.step(tok, state)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    key = "self_device_time_total" if hasattr(rows[0], "self_device_time_total") else "self_cuda_time_total"
    rows = [r for r in rows if getattr(r, key) > 0]
    rows.sort(key=lambda r: -getattr(r, key))
    total = sum(getattr(r, key) for r in rows)
    print(f"{args.what} {args.preset} batch {args.batch} x {args.seq_len}: {total / 1e3:.2f} ms of GPU kernel time"
          f" in {sum(r.count for r in rows)} kernels")
    fam = defaultdict(float)
    for r in rows:
        fam[family(r.key)] += getattr(r, key)
    for f, t in sorted(fam.items(), key=lambda x: -x[1]):
        print(f"  {f:12s} {t / 1e3:9.2f} ms {100 * t / total:5.1f}%")
    print(f"{'ms':>9s} {'%':>5s} {'calls':>6s}  kernel")
    for r in rows[: args.top]:
        t = getattr(r, key)
        print(f"{t / 1e3:9.3f} {100 * t / total:5.1f} {r.count:6d}  {r.key[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

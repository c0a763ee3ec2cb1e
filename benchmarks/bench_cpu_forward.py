"""CPU forward pass of the reference path: d_model=256, 8 layers ("small" preset) over 8,192 bytes.

Usage: python benchmarks/bench_cpu_forward.py [--threads N] [--repeats R] [--json OUT]
Prints the median wall time of a no-grad forward (after one warm-up) and bytes/s.
"""

import argparse
import json
import platform
import statistics
import time

import torch

from mambabyte import MambaByteLM


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--preset", default="small")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MambaByteLM.from_preset(args.preset).eval()
    x = torch.randint(0, 256, (1, args.length))
    times = []
    with torch.no_grad():
        model(x[:, :256])  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            model(x, return_state=True)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    res = {
        "preset": args.preset, "d_model": model.config.d_model, "n_layer": model.config.n_layer,
        "length": args.length, "threads": torch.get_num_threads(), "median_s": round(med, 3),
        "bytes_per_s": round(args.length / med, 1), "all_s": [round(t, 3) for t in times],
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    print(f"forward {args.preset} (d_model {res['d_model']}, {res['n_layer']} layers) over {args.length} bytes "
          f"on {res['threads']} threads: median {med:.2f} s ({res['bytes_per_s']:.0f} bytes/s), runs {res['all_s']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

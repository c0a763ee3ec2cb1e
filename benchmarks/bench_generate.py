#!/usr/bin/env python
"""Generation speed: decode bytes/s (batch 1 and 8, CUDA graph vs eager), prefill time, CPU bytes/s.

GPU (default shapes 353M and 972M, bf16, random weights -- speed does not depend on the values):

* decode bytes/s through ``generate`` (sampling included, temperature 1) at batch 1 and 8, CUDA graph;
  batch 1 also eager; plus the bare graph replay (the model step alone, no sampling);
* the weight-bandwidth floor: every decode step reads all weights once, so bytes/s <= copy bandwidth /
  weight bytes (copy bandwidth measured here, on the same GPU);
* prefill of 8192 bytes at batch 1 (ms).

CPU: bytes/s of the shipped small model (``mambabyte-small``; its 384 x 7 shape with random weights
when it is not installed) in fp32 at batch 1 with 1 and 2 threads (``--cpu_threads``).

Prints a table and writes every number to ``--json PATH``; the JSON is rewritten after each
measurement, so a run cut short still leaves what it measured.

    python benchmarks/bench_generate.py --json out.json                 # GPU shapes + CPU small
    python benchmarks/bench_generate.py --cpu_only --json cpu.json
    python benchmarks/bench_generate.py --shapes tiny --device cpu --decode_bytes 64   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402

from mambabyte import MambaByteLM  # noqa: E402
from mambabyte.generation import generate  # noqa: E402
from mambabyte.generation.cuda_graph import get_step_runner  # noqa: E402
from mambabyte.generation.decode import prefill  # noqa: E402

RESULTS = {"meta": {}, "gpu": [], "cpu": []}
ANCHOR = {  # mamba-ssm, CUDA graphs, bf16, H100 (shared/docs/ANCHORS.md)
    ("353M", 1): 566, ("972M", 1): 440, ("353M", 8): 4138, ("972M", 8): 3174,
}
ANCHOR_PREFILL_MS = {"353M": 42.0, "972M": 67.2}


def _dump(path):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(RESULTS, f, indent=2)
        os.replace(tmp, path)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev, nbytes=1 << 30, reps=10) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), median of ``reps``."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 2):
        _sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        _sync(dev)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    del a, b
    return 2 * nbytes / times[len(times) // 2]


def make_model(preset, dev, dtype):
    torch.manual_seed(0)
    m = MambaByteLM.from_preset(preset, device=dev)
    return m.cast_(None if dtype == torch.float32 else dtype).eval()  # A_log and D stay fp32


def weight_bytes(m) -> int:
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def decode_rate(m, batch, n_bytes, graph, warm=16) -> dict:
    prompts = ["The"] * batch
    generate(m, prompts, max_new_bytes=warm, use_cuda_graph=graph, seed=0)  # capture / warm up
    r = generate(m, prompts, max_new_bytes=n_bytes, use_cuda_graph=graph, seed=1)
    return {"bytes_per_s": r.stats.decode_bytes_per_s, "per_sequence_bytes_per_s": r.stats.per_sequence_bytes_per_s,
            "cuda_graph": r.stats.cuda_graph, "new_bytes": r.stats.new_bytes, "decode_s": r.stats.decode_s}


@torch.no_grad()
def step_only_rate(m, batch, n_steps, graph) -> float:
    """Bytes/s of the bare decode step (graph replay or eager), no sampling, no host sync."""
    dev = m.device
    runner = get_step_runner(m, batch, use_cuda_graph=graph)
    runner.load(m.allocate_state(batch))
    tok = torch.full((batch,), 65, dtype=torch.long, device=dev)
    for _ in range(8):
        runner(tok)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(n_steps):
        runner(tok)
    _sync(dev)
    return batch * n_steps / (time.perf_counter() - t)


@torch.no_grad()
def prefill_ms(m, n_bytes, reps, graph=False) -> float:
    """Median wall time of prefill(m, [n_bytes]) from the zero state; graph=True replays the CUDA graph
    that prefill(..., cuda_graph=True) captures for this length (captured by the untimed warm-up)."""
    dev = m.device
    g = torch.Generator().manual_seed(0)
    data = bytes(torch.randint(32, 127, (n_bytes,), generator=g).tolist())
    prefill(m, [data if graph else data[:64]], None, cuda_graph=graph)  # warm up (graph: capture)
    times = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        prefill(m, [data], None, cuda_graph=graph)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def bench_gpu(args):
    dev = torch.device(args.device)
    from mambabyte.ops import backend_report

    RESULTS["meta"].update(gpu=torch.cuda.get_device_name(dev), backend=backend_report()["selective_state_update"])
    bw = copy_bandwidth(dev)
    RESULTS["meta"]["copy_bandwidth_GBps"] = bw / 1e9
    _dump(args.json)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    for preset in args.shapes:
        m = make_model(preset, dev, dtype)
        wb = weight_bytes(m)
        floor = bw / wb
        row = {"shape": preset, "dtype": args.dtype, "params": m.num_parameters(), "weight_bytes": wb,
               "floor_bytes_per_s_b1": floor}
        RESULTS["gpu"].append(row)
        from mambabyte.ops import cuda_backend

        modes = {"both": [False, True], "on": [True], "off": [False]}[args.fused_block_step]
        saved = cuda_backend.FUSED_BLOCK_STEP, cuda_backend.FUSED_MAX_BATCH
        for batch in args.batch_sizes:
            t0 = time.perf_counter()
            for fused in modes:
                # the per-op decode step, and the fused three-launch block step (csrc/layer_step.cu)
                # at every batch size (the library's default takes it up to FUSED_MAX_BATCH only)
                cuda_backend.FUSED_BLOCK_STEP, cuda_backend.FUSED_MAX_BATCH = fused, 1 << 30
                tag = "_fused" if fused else ""
                row[f"decode_b{batch}_graph{tag}"] = decode_rate(m, batch, args.decode_bytes, graph=True)
                row[f"step_only_b{batch}_graph{tag}"] = step_only_rate(m, batch, args.decode_bytes, graph=True)
            cuda_backend.FUSED_BLOCK_STEP, cuda_backend.FUSED_MAX_BATCH = saved
            if batch == 1 and not args.skip_eager:
                row["decode_b1_eager"] = decode_rate(m, 1, max(32, args.decode_bytes // 8), graph=False)
            row[f"decode_b{batch}_s"] = time.perf_counter() - t0
            _dump(args.json)
        if not args.skip_prefill:
            row["prefill_ms"] = {str(args.prefill_bytes): prefill_ms(m, args.prefill_bytes, args.prefill_reps)}
            row["prefill_graph_ms"] = {str(args.prefill_bytes): prefill_ms(m, args.prefill_bytes, args.prefill_reps, graph=True)}
            _dump(args.json)
        del m
        torch.cuda.empty_cache()


def cpu_model(spec: str):
    """A preset name, 'DxN' (d_model x n_layer, random weights), or a checkpoint path / shipped name.
    'shipped' = the shipped mambabyte-small if present, else its shape (384x7) with random weights."""
    import re

    from mambabyte.config import PRESETS, MambaByteConfig
    from mambabyte.io import list_shipped_models, load_pretrained

    if spec == "shipped":
        spec = "mambabyte-small" if "mambabyte-small" in list_shipped_models() else "384x7"
    if spec in PRESETS:
        return make_model(spec, torch.device("cpu"), torch.float32), f"{spec} (random weights)"
    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if m:
        torch.manual_seed(0)
        cfg = MambaByteConfig(d_model=int(m.group(1)), n_layer=int(m.group(2)))
        return MambaByteLM(cfg).eval(), f"{spec} (random weights)"
    return load_pretrained(spec, device="cpu", dtype=torch.float32).eval(), spec


def bench_cpu(args):
    RESULTS["meta"].update(cpu=platform.processor() or platform.machine(),
                           loadavg_before_cpu=os.getloadavg() if hasattr(os, "getloadavg") else None)
    for spec in args.cpu_shapes:
        m, label = cpu_model(spec)
        for threads in args.cpu_threads:
            torch.set_num_threads(threads)
            r = decode_rate(m, 1, args.cpu_decode_bytes, graph=False, warm=8)
            RESULTS["cpu"].append({"shape": label, "dtype": "fp32", "params": m.num_parameters(), "batch": 1,
                                   "threads": threads, **r, "prefill_ms_1024": prefill_ms(m, 1024, 1),
                                   "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None})
            _dump(args.json)


def print_table():
    if RESULTS["gpu"]:
        meta = RESULTS["meta"]
        print(f"device: {meta.get('gpu') or 'cpu (smoke test)'}  backend: {meta.get('backend')}  copy bandwidth {meta.get('copy_bandwidth_GBps', 0):.0f} GB/s")
        print(f"{'shape':<6} {'what':<34} {'measured':>12} {'mamba-ssm':>10} {'ratio':>6} {'floor':>8} {'of floor':>8}")
        for row in RESULTS["gpu"]:
            s = row["shape"]
            for key, val in row.items():
                if key.startswith("decode_b") and isinstance(val, dict):
                    b = int(key.split("_")[1][1:])
                    anc = ANCHOR.get((s, b)) if val["cuda_graph"] else None
                    floor = row["floor_bytes_per_s_b1"] * b
                    print(f"{s:<6} {key + ' B/s':<34} {val['bytes_per_s']:>12.0f} {anc or '':>10} "
                          f"{(val['bytes_per_s'] / anc) if anc else 0:>6.2f} {floor:>8.0f} {val['bytes_per_s'] / floor:>8.1%}")
                if key.startswith("step_only"):
                    print(f"{s:<6} {key + ' B/s':<34} {val:>12.0f}")
            for kind, tag in (("prefill_ms", "prefill"), ("prefill_graph_ms", "prefill (CUDA graph)")):
                for n, ms in row.get(kind, {}).items():
                    anc = ANCHOR_PREFILL_MS.get(s) if n == "8192" else None
                    print(f"{s:<6} {tag + ' ' + n + ' B, ms':<34} {ms:>12.1f} {anc or '':>10} {(anc / ms) if anc else 0:>6.2f}")
    for row in RESULTS["cpu"]:
        print(f"CPU {row['shape']} fp32 batch 1, {row['threads']} thread(s): {row['bytes_per_s']:.1f} B/s decode; "
              f"prefill 1024 B {row['prefill_ms_1024']:.0f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here (JSON)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["353M", "972M"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--decode_bytes", type=int, default=512)
    p.add_argument("--prefill_bytes", type=int, default=8192)
    p.add_argument("--prefill_reps", type=int, default=5)
    p.add_argument("--skip_prefill", action="store_true")
    p.add_argument("--skip_eager", action="store_true")
    p.add_argument("--fused_block_step", default="both", choices=["both", "on", "off"],
                   help="decode with the fused three-launch block step, the per-op step, or both (GPU)")
    p.add_argument("--cpu_only", action="store_true")
    p.add_argument("--skip_cpu", action="store_true")
    p.add_argument("--cpu_shapes", nargs="+", default=["shipped"],
                   help="presets, DxN shapes, checkpoints; 'shipped' = mambabyte-small or its 384x7 shape")
    p.add_argument("--cpu_threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpu_decode_bytes", type=int, default=256)
    args = p.parse_args(argv)
    RESULTS["meta"].update(torch=torch.__version__, cuda=torch.version.cuda, argv=sys.argv[1:],
                           date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    if not args.cpu_only and args.device.startswith("cuda"):
        bench_gpu(args)
    elif not args.cpu_only and args.device == "cpu" and args.shapes != ["353M", "972M"]:
        # CPU run of chosen shapes through the same code (no graphs): a smoke test of this script
        dev = torch.device("cpu")
        for preset in args.shapes:
            m = make_model(preset, dev, torch.float32)
            RESULTS["gpu"].append({"shape": preset, "dtype": "fp32", "params": m.num_parameters(),
                                   "weight_bytes": weight_bytes(m), "floor_bytes_per_s_b1": float("inf"),
                                   "decode_b1_eager": decode_rate(m, 1, args.decode_bytes, graph=False, warm=4)})
    if not args.skip_cpu:
        bench_cpu(args)
    _dump(args.json)
    print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())

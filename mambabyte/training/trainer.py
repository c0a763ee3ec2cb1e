"""The training loop: one process, CPU or GPU, or many processes under ``torchrun`` (DDP / FSDP).

Read top to bottom: :func:`train` builds a validated :class:`TrainConfig`, sets up the process group
when ``WORLD_SIZE > 1``, and runs :class:`Trainer`, whose :meth:`Trainer.run` is

    data -> model (fresh, ``init_from`` or resumed) -> wrap (DDP / FSDP, compile) -> optimizer
    -> loop over steps: micro-batches (gradient accumulation) -> all-reduce the loss -> NaN guard
       -> clip -> AdamW step -> log -> eval -> checkpoint -> wall-clock budget
    -> final eval, checkpoint, export (``save_pretrained``), rank-sync check.

Batch geometry: ``batch_size`` (G) windows of ``seq_len`` bytes make one optimizer step, whatever the
number of processes (W) and the micro-batch size (mb): each step does ``G / (mb * W)`` micro-steps. Step
``s`` uses global samples ``s*G .. s*G + G - 1``; micro-step ``m`` of rank ``r`` takes
``s*G + m*mb*W + r*mb + [0, mb)``. So a 2-process run sees exactly the windows of a 1-process run with
the same ``batch_size`` -- its losses match up to float summation order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import MambaByteError
from ..model import MambaByteLM
from ..state import MambaState
from ..data import ByteData, StreamSampler, WindowSampler, is_prepared_dir, load_byte_data, split_tail
from .checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_path,
)
from .config import TrainConfig, make_config
from .evaluate import LN2, autocast_context, evaluate_bpb
from .schedule import lr_at


class TrainingDiverged(MambaByteError):
    """The loss or the gradient norm became NaN / inf; the run stopped without taking that step."""


@dataclass
class TrainResult:
    step: int
    out_dir: str
    stopped_by: str  # "max_steps" | "max_time"
    last_checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    best_val_bpb: Optional[float] = None
    final_eval: Dict[str, Any] = field(default_factory=dict)
    last_loss: Optional[float] = None
    export_dir: Optional[str] = None
    fingerprints: List[str] = field(default_factory=list)
    metrics_path: Optional[str] = None


def compute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats; logits (b, L, V) are upcast to fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------------
# processes
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name in ("", "auto", None):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MambaByteError(f"device {name!r} asked for, but no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "cpu":
        return torch.device("cpu")
    raise MambaByteError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=_resolve_device(cfg.device, 0))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = _resolve_device(cfg.device, local)
    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # NVLink multicast (NVLS) stays off unless asked for: it has hung collectives on shared hosts
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return DistInfo(rank, world, local, device, created)


# ---------------------------------------------------------------------------------------------------
# small helpers
class _MetricsLog:
    """metrics.jsonl (rank 0): one JSON object per line; optional TensorBoard mirror."""

    def __init__(self, path: Path, truncate_after_step: Optional[int], tensorboard: bool) -> None:
        self.path = path
        if truncate_after_step is not None and path.is_file():
            keep = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if int(row.get("step", 0)) <= truncate_after_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        elif truncate_after_step is None and path.exists():
            path.unlink()
        self.f = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception as exc:  # tensorboard not installed
                sys.stderr.write(f"warning: TensorBoard logging disabled ({str(exc).splitlines()[0]})\n")

    def write(self, row: Dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: decay matrices; no decay for biases, norms, A_log, D and the embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = (
            p.dim() < 2
            or getattr(p, "_no_weight_decay", False)
            or name.endswith(("A_log", ".D"))
            or "embedding" in name
        )
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fmt_rate(x: float) -> str:
    for unit, div in (("MB/s", 1e6), ("kB/s", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B/s"


# ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.d = dist_info
        self.device = dist_info.device
        self.out_dir = Path(cfg.out_dir)

    # -- logging ---------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.d.is_main:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()

    # -- data --------------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        train = load_byte_data(cfg.data, split="train", separator=cfg.doc_separator, what="data")
        val: Optional[ByteData] = None
        if cfg.val_data:
            val = load_byte_data(cfg.val_data, split="val", separator=cfg.doc_separator, what="val data")
        elif len(cfg.data) == 1 and is_prepared_dir(cfg.data[0]) and (Path(cfg.data[0]) / "val.bin").is_file():
            val = load_byte_data(cfg.data, split="val", what="val data")
        elif cfg.val_fraction > 0:
            train, val = split_tail(train, cfg.val_fraction)
        return train, val

    # -- state dicts (every rank calls these; collective under FSDP) ---------------------------------
    def _model_state(self) -> Dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}

    def _optim_state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        osd = get_optimizer_state_dict(self.raw, self.opt, options=opts)
        if not self.fsdp:  # detach from the live tensors (the optimizer keeps stepping them)
            osd = {"state": {k: {kk: (vv.detach().to("cpu", copy=True) if torch.is_tensor(vv) else vv)
                                 for kk, vv in v.items()} for k, v in osd["state"].items()},
                   "param_groups": osd["param_groups"]}
        return osd

    def _gather_streams(self) -> Optional[Dict[str, torch.Tensor]]:
        """TBPTT states of all global streams, (n_layer, G, d_inner, *), or None."""
        if not self.cfg.tbptt or all(s is None for s in self.states):
            return None
        mc = self.model_config
        G, mb, W = self.cfg.batch_size, self.mb, self.d.world_size
        out = {
            "conv": torch.zeros(mc.n_layer, G, mc.d_inner, mc.d_conv),
            "ssm": torch.zeros(mc.n_layer, G, mc.d_inner, mc.d_state),
        }
        for m, st in enumerate(self.states):
            if st is None:
                st = self.raw.allocate_state(mb, device=self.device)
            for key in ("conv", "ssm"):
                t = getattr(st, key).detach().float().contiguous()
                if W > 1:
                    import torch.distributed as dist

                    parts = [torch.empty_like(t) for _ in range(W)]
                    dist.all_gather(parts, t)
                else:
                    parts = [t]
                for r, part in enumerate(parts):
                    j = m * mb * W + r * mb
                    out[key][:, j : j + mb] = part.cpu()
        return out

    def _payload(self, step: int) -> Dict[str, Any]:
        return {
            "model": self._model_state(),
            "model_config": self.model_config.to_dict(),
            "optimizer": self._optim_state(),
            "scheduler": {"kind": self.cfg.lr_schedule, "lr": self.cur_lr, "warmup_steps": self.cfg.warmup_steps,
                          "decay_steps": self.decay_steps, "elapsed_s": self.elapsed},
            "step": step,
            "data": {"seed": self.cfg.seed, "next_sample": step * self.cfg.batch_size, "seq_len": self.cfg.seq_len,
                     "batch_size": self.cfg.batch_size, "tbptt_states": self._gather_streams()},
            "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
            "metrics": {"best_val_bpb": self.best_val, "best_eval": self.best_eval, "last_loss": self.last_loss, "bytes_seen": self.bytes_seen},
            "world_size": self.d.world_size,
        }

    def _save(self, step: int, best: bool = False) -> Optional[Path]:
        payload = self._payload(step)
        path = None
        if self.d.is_main:
            if best:
                path = save_checkpoint(self.out_dir / "checkpoints" / "best.pt", payload)
            else:
                path = save_checkpoint(step_path(self.out_dir, step), payload)
                prune_checkpoints(self.out_dir, self.cfg.keep_last)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.d.enabled:
            import torch.distributed as dist

            dist.barrier()

    # -- evaluation --------------------------------------------------------------------------------
    def _evaluate(self, step: int) -> Dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        res = evaluate_bpb(
            self.model if self.fsdp else self.raw,
            self.val,
            seq_len=cfg.eval_seq_len or cfg.seq_len,
            streams=cfg.eval_streams,
            mode=cfg.eval_mode,
            max_bytes=cfg.eval_bytes,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            rank=self.d.rank,
            world_size=self.d.world_size,
        )
        row = {"step": step, **res, "eval_s": round(time.perf_counter() - t0, 3)}
        if self.d.is_main:
            self.metrics.write(row)
            extra = ""
            if "val_bpb_window" in res and "val_bpb_carried" in res:
                extra = f" (carried {res['val_bpb_carried']:.4f}, per-window {res['val_bpb_window']:.4f})"
            self.log(f"step {step}: val bpb {res['val_bpb']:.4f}{extra} on {res['val_bytes']:,} bytes")
        if self.best_val is None or res["val_bpb"] < self.best_val:
            self.best_val = res["val_bpb"]
            self.best_eval = dict(row)
            if self.cfg.keep_best:
                self.best_path = self._save(step, best=True) or self.best_path
        return res

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, d = self.cfg, self.d
        self.bar = None
        if d.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / "checkpoints").mkdir(exist_ok=True)
            except OSError as exc:
                raise MambaByteError(f"cannot create out_dir {str(self.out_dir)!r}: {exc.strerror or exc}") from None
        self._barrier()

        # checkpoint to resume from ------------------------------------------------------------------
        ck = None
        if cfg.resume:
            path = latest_checkpoint(self.out_dir) if cfg.resume is True else Path(str(cfg.resume))
            if path is not None and path.is_dir():  # a run folder (or its checkpoints/ folder)
                path = latest_checkpoint(path) or latest_checkpoint(path.parent if path.name == "checkpoints" else path)
                if path is None:
                    raise MambaByteError(f"--resume: no step checkpoint in {str(cfg.resume)!r}")
            if path is None:
                raise MambaByteError(f"--resume: no checkpoint to resume in {str(self.out_dir / 'checkpoints')!r}")
            ck = load_checkpoint(path)
            self.resumed_from = str(path)

        elif latest_checkpoint(self.out_dir) is not None or (self.out_dir / "checkpoints" / "best.pt").is_file():
            if not cfg.overwrite:
                raise MambaByteError(
                    f"out_dir {str(self.out_dir)!r} already holds checkpoints of a run: continue it with --resume, "
                    f"or start over with --overwrite true, or choose another --out_dir"
                )
            self._barrier()
            if d.is_main:
                for p in list_checkpoints(self.out_dir) + [self.out_dir / "checkpoints" / "best.pt"]:
                    if p.exists():
                        p.unlink()
            self._barrier()

        # data -------------------------------------------------------------------------------------------
        self.train_data, self.val = self._load_data()
        G, W = cfg.batch_size, d.world_size
        if G % W:
            raise MambaByteError(
                f"batch_size {G} is not a multiple of the {W} processes; batch_size = micro_batch_size x "
                f"processes x accumulation steps"
            )
        per = G // W
        # micro_batch_size caps the windows per forward: the largest divisor of batch_size / processes
        # not above it, so one config runs on 1, 2, 4 or 8 GPUs (never more memory than asked for)
        cap = min(cfg.micro_batch_size or per, per)
        self.mb = max(k for k in range(1, cap + 1) if per % k == 0)
        if cfg.micro_batch_size and self.mb != cfg.micro_batch_size:
            self.log(f"note: micro_batch_size {cfg.micro_batch_size} -> {self.mb} windows per forward "
                     f"(batch_size {G} over {W} process{'es' if W > 1 else ''} = {per} per process)")
        self.accum = G // (self.mb * W)
        if cfg.tbptt:
            self.sampler = StreamSampler(len(self.train_data), cfg.seq_len, G, seed=cfg.seed)
        else:
            self.sampler = WindowSampler(len(self.train_data), cfg.seq_len, seed=cfg.seed)

        # model ------------------------------------------------------------------------------------------
        from ..io.checkpoints import config_from_dict, load_pretrained

        if ck is not None:
            self.model_config = config_from_dict(ck["model_config"])
            want = cfg.model_config()
            if cfg.init_from is None and want.to_dict() | {"name": ""} != self.model_config.to_dict() | {"name": ""}:
                diff = [k for k, v in want.to_dict().items() if k != "name" and self.model_config.to_dict().get(k) != v]
                raise MambaByteError(f"--resume: the config's model differs from the checkpoint's in {', '.join(diff)}")
        elif cfg.init_from:
            init = load_pretrained(cfg.init_from, device="cpu", dtype=torch.float32)
            self.model_config = init.config
        else:
            self.model_config = cfg.model_config()
        torch.manual_seed(cfg.seed)
        raw = MambaByteLM(self.model_config, device="cpu")
        if ck is not None:
            raw.load_state_dict(ck["model"])
        elif cfg.init_from:
            raw.load_state_dict(init.state_dict())
            del init
        raw = raw.to(self.device)
        raw.train()
        raw.gradient_checkpointing = bool(cfg.activation_checkpointing)
        self.raw = raw
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None

        # wrap ---------------------------------------------------------------------------------------------
        self.fsdp = d.enabled and cfg.distributed == "fsdp"
        model: torch.nn.Module = raw
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (W,))
            for layer in raw.backbone.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(raw, mesh=mesh)
        if cfg.compile:
            model = torch.compile(model)
        if d.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model

        # optimizer -------------------------------------------------------------------------------------
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(_param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     eps=cfg.eps, fused=fused or None)
        self.decay_steps = cfg.lr_decay_steps or cfg.max_steps
        self.best_val: Optional[float] = None
        self.best_path: Optional[Path] = None
        self.best_eval: Dict[str, Any] = {}
        self.last_loss: Optional[float] = None
        self.bytes_seen = 0
        self.elapsed = 0.0
        self.cur_lr = 0.0
        self.states: List[Optional[MambaState]] = [None] * self.accum
        self.step_times: List[float] = []
        start = 0
        if ck is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(raw, self.opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
            start = int(ck["step"])
            met = ck.get("metrics") or {}
            self.best_val = met.get("best_val_bpb")
            self.best_eval = dict(met.get("best_eval") or {})
            self.last_loss = met.get("last_loss")
            self.bytes_seen = int(met.get("bytes_seen") or 0)
            self.elapsed = float((ck.get("scheduler") or {}).get("elapsed_s") or 0.0)
            if (self.out_dir / "checkpoints" / "best.pt").is_file():
                self.best_path = self.out_dir / "checkpoints" / "best.pt"
            data = ck.get("data") or {}
            if data.get("seq_len") != cfg.seq_len or data.get("batch_size") != cfg.batch_size or data.get("seed") != cfg.seed:
                self.log("warning: seq_len, batch_size or seed differ from the checkpoint's; the data order changes")
            ts = data.get("tbptt_states")
            if cfg.tbptt and ts is not None and ts["conv"].shape[1] == G:
                for m in range(self.accum):
                    j = m * self.mb * W + d.rank * self.mb
                    self.states[m] = MambaState(ts["conv"][:, j : j + self.mb].to(self.device).contiguous(),
                                                ts["ssm"][:, j : j + self.mb].to(self.device).contiguous())
            set_rng_state(ck.get("rng") or {})
            if start >= cfg.max_steps:
                self.log(f"note: the checkpoint is at step {start}, max_steps is {cfg.max_steps}: nothing to train")
            del ck

        # logging ---------------------------------------------------------------------------------------
        self.metrics = _MetricsLog(self.out_dir / "metrics.jsonl", start if cfg.resume else None, cfg.tensorboard) if d.is_main else None
        if d.is_main:
            import yaml

            from ..io.checkpoints import atomic_write_text

            atomic_write_text(self.out_dir / "train_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        if d.is_main:
            n_params = raw.num_parameters() if not self.fsdp else self.model_config.num_parameters()
            self.log(
                f"mambabyte train: {self.model_config.d_model}x{self.model_config.n_layer} ({n_params / 1e6:.2f}M params) on "
                f"{self.device}{' x' + str(W) if W > 1 else ''} ({'bf16 autocast' if self.amp_dtype else 'fp32'}"
                f"{', ' + cfg.distributed.upper() if W > 1 else ''}); {len(self.train_data):,} train bytes, "
                f"{(f'{len(self.val):,}' if self.val is not None else 'no')} val bytes; batch {G} x {cfg.seq_len} bytes ({self.mb} per forward, {self.accum} "
                f"accumulation steps); {'resuming at step ' + str(start) if start else 'from scratch'}"
            )
            if show:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            return self._loop(start)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.metrics is not None:
                self.metrics.close()

    def _loop(self, start: int) -> TrainResult:
        cfg, d = self.cfg, self.d
        G, W, mb, L = cfg.batch_size, d.world_size, self.mb, cfg.seq_len
        budget = cfg.max_time_minutes * 60.0 if cfg.max_time_minutes else None
        if self.val is not None and cfg.eval_at_start and start == 0:
            self._evaluate(0)
        step = start
        stopped_by = "max_steps"
        last_saved, last_eval = (start if cfg.resume else -1), -1
        t_loop = time.perf_counter() - self.elapsed
        if budget is not None and self.elapsed >= budget:
            stopped_by = "max_time"
            self.log(f"the run already used its wall-clock budget ({cfg.max_time_minutes} min); raise --max_time to go on")
        params = [p for p in self.raw.parameters() if p.requires_grad]
        while step < cfg.max_steps and stopped_by != "max_time":
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, self.decay_steps, cfg.min_lr_ratio, cfg.lr_schedule,
                       time_fraction=(self.elapsed / budget) if (cfg.decay_by_time and budget) else 0.0)
            self.cur_lr = lr
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
            for m in range(self.accum):
                slot = m * mb * W + d.rank * mb  # first global slot of this rank's micro-batch
                state = None
                if cfg.tbptt:
                    x, y, reset = self.sampler.batch(self.train_data, range(slot, slot + mb), step)
                    state = None if reset else self.states[m]
                else:
                    x, y = self.sampler.batch(self.train_data, range(step * G + slot, step * G + slot + mb))
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                last = m == self.accum - 1
                if self.fsdp:
                    self.model.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext()
                elif d.enabled and not last:
                    sync = self.model.no_sync()
                else:
                    sync = contextlib.nullcontext()
                with sync:
                    with autocast_context(self.device.type, self.amp_dtype):
                        out = self.model(x, state=state, return_state=cfg.tbptt)
                        loss = compute_loss(out.logits, y)
                    (loss / self.accum).backward()
                loss_sum += loss.detach()
                if cfg.tbptt:
                    self.states[m] = out.state.detach()
            # one collective per step: mean loss and mean elapsed time, identical on every rank
            vec = torch.stack([loss_sum / self.accum,
                               torch.tensor(time.perf_counter() - t_loop, dtype=torch.float32, device=self.device)])
            if d.enabled:
                import torch.distributed as dist

                dist.all_reduce(vec)
                vec = vec / W
            loss_val, elapsed = (float(v) for v in vec.tolist())
            if not math.isfinite(loss_val):
                self._diverged(step + 1, f"loss became {loss_val}")
            if cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gn = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
            gn = float(gn)
            if not math.isfinite(gn):
                self._diverged(step + 1, f"gradient norm became {gn} (loss {loss_val:.4f})")
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            step += 1
            self.elapsed = elapsed
            self.last_loss = loss_val
            self.bytes_seen += G * L
            dt = time.perf_counter() - t0
            self.step_times.append(dt)
            if d.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                row = {"step": step, "loss": loss_val, "bpb": loss_val / LN2, "lr": lr, "grad_norm": gn,
                       "bytes_per_s": G * L / dt, "bytes_seen": self.bytes_seen, "elapsed_s": round(elapsed, 3),
                       "epoch": round(step * G / getattr(self.sampler, "windows_per_epoch", max(1, len(self.train_data) // L)), 4)}
                if self.device.type == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                self.metrics.write(row)
                if self.bar is not None:
                    self.bar.update(step - self.bar.n)
                    self.bar.set_postfix_str(f"loss {loss_val:.4f} bpb {loss_val / LN2:.3f} {_fmt_rate(G * L / dt)} lr {lr:.2e}")
            if budget is not None and elapsed >= budget and step < cfg.max_steps:
                stopped_by = "max_time"
                self.log(f"wall-clock budget of {cfg.max_time_minutes} min reached at step {step}: stopping")
                break
            if self.val is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                self._evaluate(step)
                last_eval = step
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                self._save(step)
                last_saved = step

        # the end: eval, checkpoint, export, sync check ------------------------------------------------
        final: Dict[str, Any] = {}
        if self.val is not None and last_eval != step:
            final = self._evaluate(step)
        last_path = None
        if last_saved != step or latest_checkpoint(self.out_dir) is None:
            last_path = self._save(step)
        elif d.is_main:
            last_path = latest_checkpoint(self.out_dir)
        fingerprints = self._check_sync() if (cfg.check_sync and d.enabled) else []
        export = None
        if cfg.export_dir:
            export = self._export(step, final)
        res = TrainResult(
            step=step, out_dir=str(self.out_dir), stopped_by=stopped_by,
            last_checkpoint=str(last_path) if last_path else None,
            best_checkpoint=str(self.best_path) if self.best_path else None,
            best_val_bpb=self.best_val, final_eval=final, last_loss=self.last_loss,
            export_dir=export, fingerprints=fingerprints,
            metrics_path=str(self.out_dir / "metrics.jsonl"),
        )
        if d.is_main:
            summary = {k: v for k, v in res.__dict__.items()}
            if self.step_times:
                # steady-state throughput: the slowest first steps (allocation, autotuning) left out
                tail = self.step_times[len(self.step_times) // 10 + (1 if len(self.step_times) > 1 else 0):] or self.step_times
                summary["steady_bytes_per_s"] = G * L * len(tail) / sum(tail)
                summary["steps_this_session"] = len(self.step_times)
            if self.device.type == "cuda":
                summary["peak_mem_gib_rank0"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            summary.update({"bytes_seen": self.bytes_seen, "elapsed_s": round(self.elapsed, 3),
                            "model_config": self.model_config.to_dict(), "world_size": W})
            from ..io.checkpoints import atomic_write_text

            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            msg = f"done: step {step} ({stopped_by})"
            if final:
                msg += f", val bpb {final['val_bpb']:.4f}"
            if export:
                msg += f"; exported to {export}"
            self.log(msg)
        return res

    def _diverged(self, step: int, what: str) -> None:
        last = latest_checkpoint(self.out_dir)
        where = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint had been written yet"
        self.log(f"error: {what} at step {step}; stopped without applying it; {where}")
        raise TrainingDiverged(f"{what} at step {step}; training stopped; {where}")

    def _check_sync(self) -> List[str]:
        """Every rank's parameter fingerprint (DDP; under FSDP the gathered full weights)."""
        import torch.distributed as dist

        if self.fsdp:
            sd = self._model_state()
            fp = "n/a (rank %d)" % self.d.rank
            if self.d.is_main:
                m = MambaByteLM(self.model_config, device="cpu")
                m.load_state_dict(sd)
                fp = m.fingerprint()
        else:
            fp = self.raw.fingerprint()
        fps: List[Any] = [None] * self.d.world_size
        dist.all_gather_object(fps, fp)
        if not self.fsdp and len(set(fps)) != 1:
            raise MambaByteError(f"ranks out of sync: parameter fingerprints differ across ranks: {fps}")
        self.log(f"rank sync check: {'all ranks identical' if not self.fsdp else 'FSDP full weights'} ({fps[0]})")
        return fps

    def _export(self, step: int, final: Dict[str, Any]) -> Optional[str]:
        cfg = self.cfg
        which = cfg.export_which
        if which == "best" and self.best_path is None:
            self.log("note: export_which=best but no best checkpoint exists; exporting the last weights")
            which = "last"
        sd = self._model_state() if which == "last" else None
        if not self.d.is_main:
            return None
        if sd is None:
            sd = load_checkpoint(self.best_path)["model"]
        m = MambaByteLM(self.model_config, device="cpu")
        m.load_state_dict(sd)
        ev = final if which == "last" else self.best_eval
        info = {"training": {"steps": step, "bytes_seen": self.bytes_seen, "weights": which,
                             "weights_step": step if which == "last" else ev.get("step"),
                             "val_bpb": ev.get("val_bpb"), "val_bpb_window": ev.get("val_bpb_window"),
                             "val_bpb_carried": ev.get("val_bpb_carried"), "val_bytes": ev.get("val_bytes"),
                             "val_streams": ev.get("val_streams"), "val_seq_len": ev.get("val_seq_len"),
                             "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
                             "data": [str(x) for x in cfg.data]}}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.export_dtype]
        m.save_pretrained(cfg.export_dir, dtype=dtype, extra_config=info)
        return str(cfg.export_dir)


# ---------------------------------------------------------------------------------------------------
def train(config: Union[None, str, Path, Mapping[str, Any], TrainConfig] = None,
          overrides: Optional[Mapping[str, Any]] = None, **kwargs) -> TrainResult:
    """Train a MambaByte model. ``config``: a YAML path, a dict or a :class:`TrainConfig`; ``overrides``
    and keyword arguments replace its keys (``model.d_model=...`` style keys go in ``overrides``).

    Under ``torchrun`` (WORLD_SIZE > 1) each process calls this; it joins the process group itself.
    Returns a :class:`TrainResult` (rank 0's paths; other ranks get the same step and eval numbers).
    """
    ov: Dict[str, Any] = dict(overrides or {})
    ov.update(kwargs)
    cfg = make_config(config, ov)
    d = setup_distributed(cfg)
    ok = False
    trainer = None
    try:
        trainer = Trainer(cfg, d)
        res = trainer.run()
        ok = True
        return res
    finally:
        if d.created_group:
            import gc

            import torch.distributed as dist

            # free the wrapped model (DDP's reducer holds communication work objects) while the process
            # group and the interpreter are alive, not in the garbage collection at interpreter exit
            trainer = None
            gc.collect()
            if dist.is_initialized():
                if ok:
                    # every rank leaves together: a rank that tears its connections down while a peer is
                    # still writing its summary can make gloo abort that peer (seen on a loaded CI box)
                    dist.barrier()
                dist.destroy_process_group()

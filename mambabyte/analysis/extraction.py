"""Extraction of what MambaByte computes along a byte stream: module outputs, Δ, discretised A.

Shapes: L bytes of the prompt, D d_model, di d_inner, n d_state, r dt_rank, C a module's channels.

Everything is taken from the model's normal forward pass through forward hooks (see
:mod:`mambabyte.analysis.hooks`) and processed *inside* the hook, layer by layer, as the forward pass
reaches that layer; a layer's full (L, di, n) discretised A is never materialised at once: it is built
``chunk`` positions at a time and reduced on the fly, and only the (reduced) result is kept, on the CPU.

* Δ = softplus(dt_proj(x_proj(x)[:r])), bias included (dt_proj's hooked output already holds it).
* A = -exp(A_log); discrete_A = exp(Δ ⊗ A): (L, di, n) per layer.
* reductions of discrete_A: ``mean``/``min``/``max``/``norm`` along ``reduction_dim`` (norm = 2-norm),
  ``fro``/``nuc``: matrix norms over (di, n) per position -> (L,). min/max also give indices.
* input_sim_with_discrete_A: cosine similarity over di between discrete_A[..., k] and the x half of
  in_proj's output (before the conv): (L, n) per layer.
* log_probs (L-1,): natural-log probability of each true next byte; probs = exp(log_probs);
  ranks (L-1,): how many bytes have a strictly higher probability than the true one (0 = top-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MambaByteError
from .hooks import check_layer_idxs, get_nonlinearity, hooked, per_position, select_modules

Tensor = torch.Tensor

REDUCTIONS = ("mean", "min", "max", "norm", "fro", "nuc")
DISCRETE_A_DIMS = ("L", "d_inner", "d_state")
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of fp32 per chunk of discrete_A


# ---------------------------------------------------------------------------------------------------
# next-byte statistics
@dataclass
class PredictionStats:
    """log_probs, probs (float32) and ranks (int64), each (L-1,); None where not asked for."""

    log_probs: Optional[Tensor] = None
    probs: Optional[Tensor] = None
    ranks: Optional[Tensor] = None


def prediction_stats(logits: Tensor, input_ids: Tensor, return_log_probs: bool = True,
                     return_ranks: bool = True) -> PredictionStats:
    """logits (L, V) and input_ids (L,) -> statistics of each true next byte (positions 1..L-1)."""
    if not (return_log_probs or return_ranks):
        return PredictionStats()
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (L-1, V)
    target = input_ids[1:].to(logp.device).long()
    true_lp = logp.gather(1, target[:, None])  # (L-1, 1)
    out = PredictionStats()
    if return_log_probs:
        out.log_probs = true_lp[:, 0].cpu()
        out.probs = out.log_probs.exp()
    if return_ranks:
        out.ranks = (logp > true_lp).sum(dim=1).long().cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# reductions of discrete_A
def normalize_reduction(reduction: Optional[str], reduction_dim: Optional[int]) -> Tuple[Optional[str], Optional[int]]:
    """Validate the pair; returns (reduction, dim in 0..2 or None). fro/nuc ignore reduction_dim."""
    if reduction is None:
        if reduction_dim is not None:
            raise MambaByteError("--reduction_dim needs a --reduction (mean, min, max or norm)")
        return None, None
    if reduction not in REDUCTIONS:
        raise MambaByteError(f"unknown --reduction {reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
    if reduction in ("fro", "nuc"):
        return reduction, None
    if reduction_dim is None:
        raise MambaByteError(
            f"--reduction {reduction} needs --reduction_dim: a dimension of discrete_A (L, d_inner, d_state), "
            "e.g. -2 to reduce over d_inner -> (L, d_state)"
        )
    if not -3 <= int(reduction_dim) <= 2:
        raise MambaByteError(f"--reduction_dim {reduction_dim} is out of range for discrete_A (L, d_inner, d_state): use -3..2")
    return reduction, int(reduction_dim) % 3


def reduced_dims(reduction: Optional[str], dim: Optional[int]) -> Tuple[str, ...]:
    """Names of the dimensions left after the reduction (dim already normalised to 0..2)."""
    if reduction is None:
        return DISCRETE_A_DIMS
    if reduction in ("fro", "nuc"):
        return ("L",)
    return tuple(d for i, d in enumerate(DISCRETE_A_DIMS) if i != dim)


def _sizes(L: int, di: int, n: int) -> Dict[str, int]:
    return {"L": L, "d_inner": di, "d_state": n}


def reduced_shape(L: int, di: int, n: int, reduction: Optional[str], dim: Optional[int]) -> Tuple[int, ...]:
    s = _sizes(L, di, n)
    return tuple(s[d] for d in reduced_dims(reduction, dim))


def _chunk_len(di: int, n: int, chunk_elements: int) -> int:
    return max(1, int(chunk_elements) // max(1, di * n))


def discrete_A_reduced(delta: Tensor, A: Tensor, reduction: Optional[str] = None, dim: Optional[int] = None,
                       out_dtype: torch.dtype = torch.float32,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tuple[Tensor, Optional[Tensor]]:
    """exp(Δ ⊗ A), reduced, built ``chunk`` positions at a time.

    Args:
        delta: (L, di) Δ (after softplus), any float dtype, any device.
        A: (di, n) the continuous A (= -exp(A_log)).
        reduction / dim: see :func:`normalize_reduction` (dim normalised to 0..2).
    Returns:
        (values on the CPU in ``out_dtype``, int64 indices for min/max else None).
    """
    L, di = delta.shape
    n = A.shape[1]
    delta = delta.float()
    A = A.float().to(delta.device)
    shape = reduced_shape(L, di, n, reduction, dim)
    step = _chunk_len(di, n, chunk_elements)
    want_idx = reduction in ("min", "max")

    if reduction in ("mean", "norm", "min", "max") and dim == 0:  # across positions: running accumulators
        acc = None
        best_idx = None
        for l0 in range(0, L, step):
            c = torch.exp(delta[l0:l0 + step, :, None] * A[None])  # (l, di, n)
            if reduction == "mean":
                part = c.sum(0, dtype=torch.float64)
                acc = part if acc is None else acc + part
            elif reduction == "norm":
                part = c.double().pow(2).sum(0)
                acc = part if acc is None else acc + part
            else:
                v, i = (c.min(0) if reduction == "min" else c.max(0))
                i = i + l0
                if acc is None:
                    acc, best_idx = v, i
                else:
                    better = v < acc if reduction == "min" else v > acc
                    acc = torch.where(better, v, acc)
                    best_idx = torch.where(better, i, best_idx)
        if reduction == "mean":
            acc = acc / L
        elif reduction == "norm":
            acc = acc.sqrt()
        vals = acc.to(out_dtype).cpu()
        return vals, (best_idx.cpu() if want_idx else None)

    vals = torch.empty(shape, dtype=out_dtype)
    idx = torch.empty(shape, dtype=torch.int64) if want_idx else None
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        c = torch.exp(delta[l0:l1, :, None] * A[None])  # (l, di, n) fp32
        i = None
        if reduction is None:
            r = c
        elif reduction == "mean":
            r = c.mean(dim)
        elif reduction == "norm":
            r = torch.linalg.vector_norm(c, ord=2, dim=dim)
        elif reduction in ("min", "max"):
            r, i = (c.min(dim) if reduction == "min" else c.max(dim))
        elif reduction == "fro":
            r = torch.linalg.matrix_norm(c, ord="fro", dim=(1, 2))
        else:  # nuc
            r = torch.linalg.matrix_norm(c, ord="nuc", dim=(1, 2))
        vals[l0:l1] = r.to(out_dtype).cpu()
        if i is not None:
            idx[l0:l1] = i.cpu()
    return vals, idx


def input_sim_with_discrete_A(delta: Tensor, A: Tensor, x: Tensor, out_dtype: torch.dtype = torch.float32,
                              chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Cosine similarity over di of discrete_A[l, :, k] and x[l, :]: delta (L, di), A (di, n), x (L, di) -> (L, n)."""
    L, di = delta.shape
    n = A.shape[1]
    delta = delta.float()
    A = A.float().to(delta.device)
    x = x.float().to(delta.device)
    out = torch.empty(L, n, dtype=out_dtype)
    step = _chunk_len(di, n, chunk_elements)
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        c = torch.exp(delta[l0:l1, :, None] * A[None])  # (l, di, n)
        out[l0:l1] = F.cosine_similarity(c, x[l0:l1, :, None], dim=1).to(out_dtype).cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# size estimates
_GB = 10**9  # decimal gigabytes, as --max_output_gb counts them


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class SizeEstimate:
    """Bytes the artefact's tensors will take, with a one-line description of what dominates."""

    total_bytes: int
    detail: str
    per_layer: Dict[int, int] = field(default_factory=dict)

    @property
    def gb(self) -> float:
        return self.total_bytes / _GB


def _stats_bytes(L: int) -> int:
    return 3 * max(0, L - 1) * 8


def estimate_discrete_A(model: nn.Module, L: int, layer_idxs: Sequence[int], reduction: Optional[str],
                        dim: Optional[int], out_dtype: torch.dtype) -> SizeEstimate:
    cfg = model.config
    shape = reduced_shape(L, cfg.d_inner, cfg.d_state, reduction, dim)
    numel = 1
    for s in shape:
        numel *= s
    per = numel * dtype_size(out_dtype) + (numel * 8 if reduction in ("min", "max") else 0)
    what = f"discrete_A {'unreduced' if reduction is None else reduction}: {len(layer_idxs)} layer(s) x {shape} {str(out_dtype).replace('torch.', '')}"
    return SizeEstimate(per * len(layer_idxs) + _stats_bytes(L), what, {i: per for i in layer_idxs})


def estimate_input_sim(model: nn.Module, L: int, layer_idxs: Sequence[int], out_dtype: torch.dtype) -> SizeEstimate:
    per = L * model.config.d_state * dtype_size(out_dtype)
    what = f"input_sim_with_discrete_A: {len(layer_idxs)} layer(s) x ({L}, {model.config.d_state})"
    return SizeEstimate(per * len(layer_idxs) + _stats_bytes(L), what, {i: per for i in layer_idxs})


@torch.no_grad()
def module_channels(model: nn.Module, chosen: Dict[int, Tuple[str, nn.Module]]) -> Dict[int, int]:
    """Channels C of each chosen module's per-position output, measured by a 2-byte probe forward."""
    found: Dict[int, int] = {}
    by_name = {name: li for li, (name, _) in chosen.items()}

    def grab(name, mod, out):
        found[by_name[name]] = per_position(mod, out).shape[1]

    probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    with hooked({name: mod for name, mod in chosen.values()}, grab):
        model(probe)
    missing = sorted(set(chosen) - set(found))
    if missing:
        names = ", ".join(chosen[i][0] for i in missing[:4])
        raise MambaByteError(f"module(s) {names} are not called in the forward pass, so nothing can be hooked")
    return found


def estimate_module_outputs(model: nn.Module, L: int, selections: Dict[str, Dict[int, Tuple[str, nn.Module]]],
                            out_dtype: torch.dtype) -> SizeEstimate:
    total, per_layer, parts = 0, {}, []
    for module_id, chosen in selections.items():
        chans = module_channels(model, chosen)
        b = 0
        for li, c in chans.items():
            nb = L * c * dtype_size(out_dtype)
            per_layer[li] = per_layer.get(li, 0) + nb
            b += nb
        total += b
        c0 = sorted(set(chans.values()))
        parts.append(f"{module_id}: {len(chans)} layer(s) x ({L}, {c0[0] if len(c0) == 1 else c0})")
    return SizeEstimate(total + _stats_bytes(L), "; ".join(parts), per_layer)


def check_size(est: SizeEstimate, max_output_gb: Optional[float], hint: str) -> None:
    """Refuse (MambaByteError) when the estimate exceeds ``max_output_gb`` (None or <= 0: no limit)."""
    if max_output_gb is None or max_output_gb <= 0:
        return
    if est.total_bytes > max_output_gb * _GB:
        raise MambaByteError(
            f"the artefact would be about {format_bytes(est.total_bytes)} ({est.detail}), over "
            f"--max_output_gb {max_output_gb:g}; {hint}, or raise --max_output_gb"
        )


# ---------------------------------------------------------------------------------------------------
# extraction runs
@dataclass
class ExtractionResult:
    """``tensors``: artefact key -> {layer index -> CPU tensor}; plus the next-byte statistics."""

    tensors: Dict[str, Dict[int, Tensor]]
    stats: PredictionStats
    layer_idxs: List[int]
    dims: Dict[str, Tuple[str, ...]]


def _input_ids(model: nn.Module, prompt: bytes) -> Tensor:
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if not prompt:
        raise MambaByteError("the prompt is empty")
    return torch.tensor(list(prompt), dtype=torch.long, device=model.device)[None, :]


def _forward(model: nn.Module, ids: Tensor, hooks: Dict[str, nn.Module], fn, return_log_probs: bool,
             return_ranks: bool) -> PredictionStats:
    with torch.inference_mode(), hooked(hooks, fn):
        logits = model(ids).logits[0]
    return prediction_stats(logits, ids[0], return_log_probs, return_ranks)


def _A(mixer: nn.Module) -> Tensor:
    return -torch.exp(mixer.A_log.detach().float())


def extract_module_outputs(model: nn.Module, prompt: bytes, module_ids: Sequence[str],
                           layer_idxs: Optional[Sequence[int]] = None, nonlinearity: Optional[str] = None,
                           out_dtype: torch.dtype = torch.float32, return_log_probs: bool = True,
                           return_ranks: bool = True, max_output_gb: Optional[float] = None) -> ExtractionResult:
    """Hooked outputs of the modules named by ``module_ids`` with ``nonlinearity`` applied: each (L, C)."""
    layer_idxs = check_layer_idxs(model, layer_idxs)
    fn_nl = get_nonlinearity(nonlinearity)
    if isinstance(module_ids, str):
        module_ids = [module_ids]
    module_ids = list(dict.fromkeys(module_ids))
    ids = _input_ids(model, prompt)
    selections = {m: select_modules(model, m, layer_idxs) for m in module_ids}
    est = estimate_module_outputs(model, ids.shape[1], selections, out_dtype)
    check_size(est, max_output_gb, "extract fewer --layer_idxs, use --out_dtype float16, or a shorter prompt")

    tensors: Dict[str, Dict[int, Tensor]] = {m: {} for m in module_ids}
    route: Dict[str, List[Tuple[str, int]]] = {}
    hooks: Dict[str, nn.Module] = {}
    for m, chosen in selections.items():
        for li, (name, mod) in chosen.items():
            route.setdefault(name, []).append((m, li))
            hooks[name] = mod

    def on_output(name, mod, out):
        t = fn_nl(per_position(mod, out).float()).to(out_dtype).cpu()
        for m, li in route[name]:
            tensors[m][li] = t

    stats = _forward(model, ids, hooks, on_output, return_log_probs, return_ranks)
    used = sorted({li for chosen in selections.values() for li in chosen})
    return ExtractionResult(tensors, stats, used, {m: ("L", "C") for m in module_ids})


def extract_discrete_A(model: nn.Module, prompt: bytes, layer_idxs: Optional[Sequence[int]] = None,
                       reduction: Optional[str] = None, reduction_dim: Optional[int] = None,
                       out_dtype: torch.dtype = torch.float32, return_log_probs: bool = True,
                       return_ranks: bool = True, max_output_gb: Optional[float] = None,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> ExtractionResult:
    """discrete_A = exp(Δ ⊗ A) per layer, reduced on the fly. Keys ``discrete_A`` (+ ``discrete_A_indices``)."""
    layer_idxs = check_layer_idxs(model, layer_idxs)
    reduction, dim = normalize_reduction(reduction, reduction_dim)
    ids = _input_ids(model, prompt)
    est = estimate_discrete_A(model, ids.shape[1], layer_idxs, reduction, dim, out_dtype)
    check_size(est, max_output_gb,
               "reduce it with --reduction (e.g. --reduction norm --reduction_dim -2 -> (L, d_state), or fro -> (L,)), "
               "fewer --layer_idxs, --out_dtype float16")
    vals: Dict[int, Tensor] = {}
    idxs: Dict[int, Tensor] = {}
    hooks = {f"backbone.layers.{i}.mixer.dt_proj": model.backbone.layers[i].mixer.dt_proj for i in layer_idxs}
    mixer_of = {f"backbone.layers.{i}.mixer.dt_proj": (i, model.backbone.layers[i].mixer) for i in layer_idxs}

    def on_dt(name, mod, out):
        li, mixer = mixer_of[name]
        delta = F.softplus(per_position(mod, out).float())  # (L, di)
        v, ix = discrete_A_reduced(delta, _A(mixer), reduction, dim, out_dtype, chunk_elements)
        vals[li] = v
        if ix is not None:
            idxs[li] = ix

    stats = _forward(model, ids, hooks, on_dt, return_log_probs, return_ranks)
    tensors = {"discrete_A": vals}
    dims = {"discrete_A": reduced_dims(reduction, dim)}
    if reduction in ("min", "max"):
        tensors["discrete_A_indices"] = idxs
        dims["discrete_A_indices"] = dims["discrete_A"]
    return ExtractionResult(tensors, stats, layer_idxs, dims)


def extract_input_sim_with_discrete_A(model: nn.Module, prompt: bytes, layer_idxs: Optional[Sequence[int]] = None,
                                      out_dtype: torch.dtype = torch.float32, return_log_probs: bool = True,
                                      return_ranks: bool = True, max_output_gb: Optional[float] = None,
                                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> ExtractionResult:
    """Cosine similarity (over d_inner) of discrete_A[..., k] with in_proj's x half: (L, d_state) per layer."""
    layer_idxs = check_layer_idxs(model, layer_idxs)
    ids = _input_ids(model, prompt)
    est = estimate_input_sim(model, ids.shape[1], layer_idxs, out_dtype)
    check_size(est, max_output_gb, "extract fewer --layer_idxs or use --out_dtype float16")
    pending_x: Dict[int, Tensor] = {}
    sims: Dict[int, Tensor] = {}
    hooks: Dict[str, nn.Module] = {}
    role: Dict[str, Tuple[str, int]] = {}
    for i in layer_idxs:
        mixer = model.backbone.layers[i].mixer
        hooks[f"backbone.layers.{i}.mixer.in_proj"] = mixer.in_proj
        hooks[f"backbone.layers.{i}.mixer.dt_proj"] = mixer.dt_proj
        role[f"backbone.layers.{i}.mixer.in_proj"] = ("in", i)
        role[f"backbone.layers.{i}.mixer.dt_proj"] = ("dt", i)

    def on_out(name, mod, out):
        kind, li = role[name]
        mixer = model.backbone.layers[li].mixer
        if kind == "in":
            pending_x[li] = per_position(mod, out)[:, : mixer.d_inner]  # x half, before the conv
            return
        delta = F.softplus(per_position(mod, out).float())
        x = pending_x.pop(li)
        sims[li] = input_sim_with_discrete_A(delta, _A(mixer), x, out_dtype, chunk_elements)

    stats = _forward(model, ids, hooks, on_out, return_log_probs, return_ranks)
    return ExtractionResult({"input_sim_with_discrete_A": sims}, stats, layer_idxs,
                            {"input_sim_with_discrete_A": ("L", "d_state")})

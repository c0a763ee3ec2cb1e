"""CUDA backend for :mod:`mambabyte.ops`: our kernels from ``csrc/`` behind the reference's signatures.

Dimension glossary: ``b`` batch, ``d`` channels, ``L`` time steps (bytes), ``n`` state size, ``g`` B/C
groups, ``w`` conv width, ``R`` dt rank.

Where the kernels come from, in order:

1. ``mambabyte._C``, built by ``pip install -e .`` when a CUDA torch and nvcc were present;
2. a JIT build of the same sources through :func:`torch.utils.cpp_extension.load`, cached under
   ``$MAMBABYTE_CACHE_DIR`` (default ``~/.cache/mambabyte``); ``MAMBABYTE_NO_JIT=1`` disables it;
3. otherwise :func:`status` says why not and :mod:`mambabyte.ops` uses the PyTorch reference.

Nothing here is imported by ``import mambabyte``; the extension is loaded on the first CUDA op.

Inputs the kernels do not cover (fp64, n > 256, conv width > 4, L = 0, a non-fp32 scan state) are
handed to the reference implementation, so every function accepts what the reference accepts.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference as _ref

__all__ = [
    "status",
    "selective_scan_cuda",
    "causal_conv1d_cuda",
    "selective_state_update_cuda",
    "causal_conv1d_update_cuda",
    "mamba_decode_step_cuda",
]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

# Scan kernel variants (benchmarks/bench_scan.py --sweep times them). items: time steps per thread
# (8); fwd_states: states per n iteration of the forward where B / C are staged in shared memory
# (1, 2 or 4); fwd_min_blocks: 1, or 4 to cap the forward's registers at 128; bwd_warps: channels
# per block in the backward (4, 8 or 16); bwd_min_blocks: 1, or 2 to cap the backward's registers at 128;
# bwd_lane_acc: 1 keeps per-lane dA partials in shared memory instead of a warp sum per state;
# bwd_xs: states whose dB / dC contributions share one block-wide exchange (1 or 2);
# fwd_sp: the forward with lanes over states (d_state 16, variable B / C): -1 where it is faster
# (batch x channels / 8 >= 4 x the SM count, or sequences of <= 256 steps), 1 wherever it applies,
# 0 never (lanes over time).
TUNING = {
    "items": int(os.environ.get("MAMBABYTE_SCAN_ITEMS", "8")),
    "fwd_states": int(os.environ.get("MAMBABYTE_SCAN_FWD_STATES", "2")),
    "fwd_min_blocks": int(os.environ.get("MAMBABYTE_SCAN_FWD_MIN_BLOCKS", "1")),
    "bwd_warps": int(os.environ.get("MAMBABYTE_SCAN_BWD_WARPS", "8")),
    "bwd_min_blocks": int(os.environ.get("MAMBABYTE_SCAN_BWD_MIN_BLOCKS", "2")),
    "bwd_lane_acc": int(os.environ.get("MAMBABYTE_SCAN_BWD_LANE_ACC", "0")),
    "fwd_sp": int(os.environ.get("MAMBABYTE_SCAN_FWD_SP", "-1")),
    "bwd_xs": int(os.environ.get("MAMBABYTE_SCAN_BWD_XS", "2")),
}
_EXT = None
_STATUS: Optional[Tuple[bool, str]] = None
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _csrc_dir() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.normpath(os.path.join(here, "..", "..", "csrc"))
    return cand if os.path.isdir(cand) else None


def _arch_flags() -> list:
    archs = os.environ.get("MAMBABYTE_CUDA_ARCH_LIST")
    if not archs:
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        archs = f"{major}.{minor}"
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            num = arch.replace(".", "").replace("+PTX", "")
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = _csrc_dir()
    if src is None:
        return None, "mambabyte._C is not built and the csrc/ sources are not next to the package (no JIT build)"
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if not nvcc or not os.path.exists(nvcc):
        return None, "mambabyte._C is not built and nvcc was not found (set CUDA_HOME) for a JIT build"
    sources = sorted(glob.glob(os.path.join(src, "*.cu"))) + sorted(glob.glob(os.path.join(src, "*.cpp")))
    arch = _arch_flags()
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(src, "*"))):
        with open(path, "rb") as fh:
            h.update(path.encode() + fh.read())
    h.update(" ".join(arch).encode() + torch.__version__.encode() + str(torch.version.cuda).encode())
    cache = os.environ.get("MAMBABYTE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mambabyte")
    build_dir = os.path.join(cache, "jit-" + h.hexdigest()[:16])
    os.makedirs(build_dir, exist_ok=True)
    ext = load(
        name="mambabyte_jit_C",
        sources=sources,
        extra_include_paths=[src],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + arch,
        build_directory=build_dir,
        verbose=bool(os.environ.get("MAMBABYTE_JIT_VERBOSE")),
    )
    return ext, f"JIT-built CUDA kernels (cached in {build_dir})"


def _load() -> Tuple[object, str]:
    try:
        from mambabyte import _C  # type: ignore[attr-defined]

        return _C, "compiled extension mambabyte._C"
    except ImportError as exc:
        prebuilt_err = str(exc)
    if torch.version.cuda is None:
        return None, "torch was built without CUDA"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    if os.environ.get("MAMBABYTE_NO_JIT"):
        return None, f"mambabyte._C not importable ({prebuilt_err}) and MAMBABYTE_NO_JIT is set"
    try:
        return _jit_build()
    except Exception as exc:  # compiler missing / failing: report, use the reference
        msg = str(exc).strip().splitlines()
        return None, "JIT build of the CUDA kernels failed: " + (msg[-1] if msg else type(exc).__name__)


def status() -> Tuple[bool, str]:
    """(available, reason): whether the CUDA kernels can be used here, and how they were obtained."""
    global _EXT, _STATUS
    with _LOCK:
        if _STATUS is None:
            _EXT, reason = _load()
            _STATUS = (_EXT is not None, reason)
    return _STATUS


def _ext():
    ok, reason = status()
    if not ok:
        raise RuntimeError(f"mambabyte CUDA kernels unavailable: {reason}")
    return _EXT


# ----------------------------------------------------------------------------------------------
# Selective scan
# ----------------------------------------------------------------------------------------------


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t in dtype and contiguous; no op (and no autograd node) when it already is."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return _as(t, torch.float32)


class _SelectiveScanFn(torch.autograd.Function):
    """Inputs already normalised by :func:`selective_scan_cuda` (see ``_prepare_scan``)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        out, fin, cs = _ext().scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, True,
            TUNING["items"], TUNING["fwd_min_blocks"], TUNING["fwd_states"], TUNING["fwd_sp"],
        )
        ctx.delta_softplus = delta_softplus
        ctx.has_h0 = initial_state is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, cs)
        ctx.set_materialize_grads(False)
        return out, fin

    @staticmethod
    def backward(ctx, dout, dfin):
        u, delta, A, B, C, D, z, delta_bias, cs = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        dout = dout.to(u.dtype).contiguous()
        dfin = None if dfin is None else dfin.to(torch.float32).contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _ext().scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, cs, dout, dfin,
            TUNING["bwd_warps"], TUNING["bwd_min_blocks"], bool(TUNING["bwd_lane_acc"]), TUNING["bwd_xs"],
        )
        return (
            du,
            ddelta,
            dA,
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD if D is not None else None,
            dz if z is not None else None,
            dbias if delta_bias is not None else None,
            dh0 if ctx.has_h0 else None,
            None,
        )


def _prepare_scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Differentiable casts / reshapes into the layout the kernels take (no-ops when already so)."""
    same = delta.dtype == u.dtype and (z is None or z.dtype == u.dtype)
    e = u.dtype if same else torch.float32
    bc_dt = e if (B.dtype == e and C.dtype == e) else torch.float32

    def bc(M):
        if M.dim() == 3:
            M = M.unsqueeze(1)
        return _as(M, bc_dt)

    return (
        _as(u, e),
        _as(delta, e),
        _f32(A),
        bc(B),
        bc(C),
        _f32(D),
        _as(z, e),
        _f32(delta_bias),
        _f32(initial_state),
    )


def selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state):
    """Selective scan on the GPU, resumable from ``initial_state``; see ``selective_scan_ref``.

    u, delta, z: (b, d, L) fp32 / fp16 / bf16. A: (d, n) fp32. B, C: (d, n), (b, n, L) or (b, g, n, L).
    D, delta_bias: (d,). initial_state: (b, d, n). Returns out (b, d, L) in u's dtype, or
    (out, final_state fp32 (b, d, n)). Differentiable in every tensor input, including the initial
    state, and accepts a gradient on the final state.
    """
    b, d, L, n = _ref._check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if (
        L == 0
        or n > 256
        or any(t is not None and t.dtype not in _SUPPORTED for t in tensors)
        or any(t is not None and not t.is_cuda for t in tensors)
    ):
        return _ref.selective_scan_ref(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            initial_state=initial_state, return_final_state=return_final_state,
        )
    args = _prepare_scan(*tensors)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad:
        out, fin = _SelectiveScanFn.apply(*args, bool(delta_softplus))
    else:
        out, fin, _ = _ext().scan_fwd(
            *args[:8], bool(delta_softplus), args[8], False,
            TUNING["items"], TUNING["fwd_min_blocks"], TUNING["fwd_states"], TUNING["fwd_sp"],
        )
    out = out.to(u.dtype)
    return (out, fin) if return_final_state else out


# ----------------------------------------------------------------------------------------------
# Causal conv1d
# ----------------------------------------------------------------------------------------------


class _CausalConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, silu):
        out, ns = _ext().conv_fwd(x, weight, bias, conv_state, silu, True)
        ctx.silu = silu
        ctx.save_for_backward(x, weight, bias, conv_state)
        ctx.set_materialize_grads(False)
        return out, ns

    @staticmethod
    def backward(ctx, dout, dns):
        x, weight, bias, conv_state = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dout = dout.to(x.dtype).contiguous()
        dns = None if dns is None else dns.to(torch.float32).contiguous()
        dx, dw, db, ds = _ext().conv_bwd(x, weight, bias, conv_state, dout, dns, ctx.silu)
        return dx, dw, (db if bias is not None else None), (ds if conv_state is not None else None), None


def causal_conv1d_cuda(x, weight, bias, conv_state, activation, return_final_state):
    """Causal depthwise conv1d (w <= 4) with a (b, d, w) window state in and out; see ``causal_conv1d_ref``.

    x: (b, d, L); weight: (d, w) or (d, 1, w); bias: (d,); conv_state: (b, d, w) (the last w inputs
    seen, oldest first). Returns out (b, d, L) in x's dtype, or (out, new_state) with new_state in
    conv_state's dtype (fp32 when none was given). Differentiable in x, weight, bias and conv_state.
    """
    w2 = weight.squeeze(1) if weight.dim() == 3 else weight
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    tensors = (x, w2, bias, conv_state)
    if (
        x.dim() != 3
        or w2.dim() != 2
        or w2.shape[0] != x.shape[1]
        or not 1 <= w2.shape[1] <= 4
        or (conv_state is not None and tuple(conv_state.shape) != (x.shape[0], x.shape[1], w2.shape[1]))
        or any(t is not None and (t.dtype not in _SUPPORTED or not t.is_cuda) for t in tensors)
    ):
        return _ref.causal_conv1d_ref(
            x, weight, bias=bias, conv_state=conv_state, activation=activation, return_final_state=return_final_state
        )
    silu = activation is not None
    args = (x.contiguous(), _f32(w2), _f32(bias), _f32(conv_state))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad:
        out, ns = _CausalConvFn.apply(*args, silu)
    else:
        out, ns = _ext().conv_fwd(*args, silu, bool(return_final_state))
    if not return_final_state:
        return out
    state_dtype = conv_state.dtype if conv_state is not None else torch.float32
    return out, ns.to(state_dtype)


# ----------------------------------------------------------------------------------------------
# Decode steps
# ----------------------------------------------------------------------------------------------


def selective_state_update_cuda(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One scan step in place on ``ssm_state`` (b, d, n) fp32; see ``selective_state_update_ref``.

    x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,). Returns y (b, d) in x's dtype.
    Not differentiable (a decoding op): with autograd recording it defers to the reference.
    """
    tensors = (ssm_state, x, dt, A, B, C, D, z, dt_bias)
    if (
        ssm_state.dtype != torch.float32
        or not ssm_state.is_contiguous()
        or x.dim() != 2
        or B.dim() != 2
        or C.dim() != 2
        or ssm_state.shape[-1] != A.shape[-1]
        or any(t is not None and (t.dtype not in _SUPPORTED or not t.is_cuda) for t in tensors)
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    ):
        return _ref.selective_state_update_ref(
            ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
    e = x.dtype
    xs = _as(x, x.dtype)
    return _ext().ssm_step(
        ssm_state,
        xs,
        _as(dt, e),
        None,
        None,
        _f32(A),
        _as(B, e),
        _as(C, e),
        _f32(D),
        _as(z, e),
        _f32(dt_bias),
        bool(dt_softplus),
    )


def causal_conv1d_update_cuda(x, conv_state, weight, bias, activation):
    """One conv step: shift ``conv_state`` (b, d, w) left, append x (b, d), convolve; in place.

    Returns (b, d) in x's dtype; see ``causal_conv1d_update_ref``.
    """
    w2 = weight.squeeze(1) if weight.dim() == 3 else weight
    tensors = (x, conv_state, w2, bias)
    if (
        x.dim() != 2
        or w2.dim() != 2
        or not 1 <= w2.shape[1] <= 4
        or not conv_state.is_contiguous()
        or any(t is not None and (t.dtype not in _SUPPORTED or not t.is_cuda) for t in tensors)
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    ):
        return _ref.causal_conv1d_update_ref(x, conv_state, weight, bias=bias, activation=activation)
    return _ext().conv_step(x.contiguous(), conv_state, _f32(w2), _f32(bias), activation is not None)


def mamba_decode_step_cuda(
    x,
    z,
    conv_state,
    conv_weight,
    conv_bias,
    ssm_state,
    x_proj_weight,
    dt_proj_weight,
    dt_proj_bias,
    A,
    D,
    activation="silu",
):
    """One Mamba-1 mixer decode step between in_proj and out_proj, updating both states in place.

    Args (b batch, d = d_inner, n state size, w conv width, R dt rank):
        x: (b, d) conv input (the first half of in_proj's output).
        z: (b, d) gate (the second half).
        conv_state: (b, d, w) window, updated in place (any float dtype).
        conv_weight: (d, w) or (d, 1, w); conv_bias: (d,) or None.
        ssm_state: (b, d, n) fp32, updated in place.
        x_proj_weight: (R + 2n, d); dt_proj_weight: (d, R); dt_proj_bias: (d,) (the dt bias, softplus
            applied after it).
        A: (d, n) fp32 (= -exp(A_log)); D: (d,).

    Returns:
        y: (b, d) in x's dtype, = (C . h + D * xc) * silu(z), the input of out_proj.

    Three launches: (1) conv-window shift + conv + bias + silu, (2) x_proj as one cuBLAS GEMV,
    (3) dt_proj + dt bias + softplus + state update + C readout + D skip + gate, fused. x_proj
    needs every channel's conv output, so (1) and (3) cannot be one launch without a grid-wide sync.
    """
    xc = causal_conv1d_update_cuda(x, conv_state, conv_weight, conv_bias, activation)
    x_dbl = F.linear(xc, _as(x_proj_weight, xc.dtype))
    R = dt_proj_weight.shape[1]
    n = A.shape[-1]
    tensors = (xc, z, ssm_state, dt_proj_weight, A, D, dt_proj_bias)
    if (
        ssm_state.dtype != torch.float32
        or not ssm_state.is_contiguous()
        or any(t is not None and (t.dtype not in _SUPPORTED or not t.is_cuda) for t in tensors)
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    ):
        dt = F.linear(x_dbl[:, :R], dt_proj_weight.to(xc.dtype))
        return _ref.selective_state_update_ref(
            ssm_state, xc, dt, A, x_dbl[:, R : R + n], x_dbl[:, R + n :], D=D, z=z, dt_bias=dt_proj_bias,
            dt_softplus=True,
        )
    e = xc.dtype
    return _ext().ssm_step(
        ssm_state,
        xc,
        None,
        x_dbl[:, :R],
        _as(dt_proj_weight, e),
        _f32(A),
        x_dbl[:, R : R + n],
        x_dbl[:, R + n :],
        _f32(D),
        _as(z, e),
        _f32(dt_proj_bias),
        True,
    )


# ----------------------------------------------------------------------------------------------
# Whole blocks at decode: add + norm + mixer step in three launches per block (csrc/layer_step.cu)
# ----------------------------------------------------------------------------------------------

# The fused block step (csrc/layer_step.cu) decodes batches of up to FUSED_MAX_BATCH streams; larger
# batches take the per-op step, whose cuBLAS GEMMs are faster there (docs/benchmarks.md).
# MAMBABYTE_FUSED_BLOCK_STEP=0 turns it off; MAMBABYTE_FUSED_MAX_BATCH moves the crossover.
FUSED_BLOCK_STEP = os.environ.get("MAMBABYTE_FUSED_BLOCK_STEP", "1") != "0"
FUSED_MAX_BATCH = int(os.environ.get("MAMBABYTE_FUSED_MAX_BATCH", "4") or 4)
# Programmatic dependent launch between the fused step's kernels (Hopper and newer): each kernel loads
# its weights while the previous one finishes. MAMBABYTE_PDL=0 turns it off (older GPUs ignore it).
PDL = os.environ.get("MAMBABYTE_PDL", "1") != "0"


# The fused residual add + norm, for forwards without autograd and (fp32 norm weights) for training
# (MAMBABYTE_FUSED_ADD_NORM=0 turns both off).
FUSED_ADD_NORM = os.environ.get("MAMBABYTE_FUSED_ADD_NORM", "1") != "0"


def _pdl_ok(device: torch.device) -> bool:
    return PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _has_hooks(module: torch.nn.Module) -> bool:
    """A forward hook on ``module`` or anywhere below it (or a global one)."""
    from ..modules.hooks import has_forward_hooks

    return has_forward_hooks(*module.modules())


def fused_block_step_unsupported(model, state, batch: int) -> Optional[str]:
    """Why :func:`fused_blocks_step` cannot run ``model.step`` here (None when it can)."""
    if not FUSED_BLOCK_STEP:
        return "MAMBABYTE_FUSED_BLOCK_STEP=0"
    if batch > FUSED_MAX_BATCH:
        return f"batch {batch} > {FUSED_MAX_BATCH} (MAMBABYTE_FUSED_MAX_BATCH): the per-op step is faster there"
    ok, reason = status()
    if not ok:
        return reason
    if not hasattr(_EXT, "layer_step"):
        return "the loaded extension predates layer_step (rebuild it)"
    cfg = model.config
    e = model.backbone.embedding.weight.dtype
    if e not in _SUPPORTED:
        return f"dtype {e} not supported"
    if cfg.d_model % 8 or cfg.d_inner % 16 or cfg.d_conv > 4:
        return "needs d_model % 8 == 0, d_inner % 16 == 0 and d_conv <= 4"
    if state.conv.dtype != torch.float32 or state.ssm.dtype != torch.float32:
        return "the state is not fp32"
    if not (state.conv.is_contiguous() and state.ssm.is_contiguous()):
        return "the state is not contiguous"
    props = torch.cuda.get_device_properties(model.device)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    if min(batch, 8) * cfg.d_model * e.itemsize + 2048 > limit or min(batch, 8) * cfg.d_inner * e.itemsize > limit:
        return "d_model too large for the kernels' shared memory"
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return "gradients are enabled"
    if _has_hooks(model.backbone.layers):
        return "forward hooks are registered on the blocks"
    for layer in model.backbone.layers:
        mx = layer.mixer
        big = [layer.norm.weight, mx.in_proj.weight, mx.x_proj.weight, mx.dt_proj.weight, mx.out_proj.weight]
        big += [t for t in (getattr(layer.norm, "bias", None), mx.in_proj.bias, mx.out_proj.bias) if t is not None]
        if any(t.dtype != e or not t.is_cuda or not t.is_contiguous() or t.data_ptr() % 16 for t in big):
            return "block weights are not all contiguous, aligned CUDA tensors in the embedding's dtype"
    return None


def _fusable_norm(norm, entry: str) -> Optional[bool]:
    """Whether the add + norm kernels take ``norm``: True for RMSNorm, False for an affine LayerNorm over
    one dimension; None for any other norm, or when fusing is off (MAMBABYTE_FUSED_ADD_NORM=0) or the
    extension lacks ``entry``."""
    from ..modules.norms import RMSNorm

    if not FUSED_ADD_NORM or _EXT is None or not hasattr(_EXT, entry):
        return None
    if isinstance(norm, RMSNorm):
        return True
    if isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return False
    return None


def add_norm_cuda(hidden, residual, norm, residual_in_fp32: bool):
    """The fused residual add + norm (csrc/add_norm.cu) when it applies, else None: CUDA, no autograd,
    LayerNorm (affine) or RMSNorm in hidden's dtype, contiguous inputs, no hooks on the norm."""
    rms = _fusable_norm(norm, "add_norm")
    if rms is None or hidden.dtype not in _SUPPORTED:
        return None
    w = norm.weight
    bias = getattr(norm, "bias", None)
    D = hidden.shape[-1]
    if w.dtype != hidden.dtype or w.shape != (D,) or D * 4 > 48 * 1024 or not hidden.is_contiguous():
        return None
    if torch.is_grad_enabled() and (hidden.requires_grad or w.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return None
    res_dtype = torch.float32 if (residual_in_fp32 or hidden.dtype == torch.float32) else hidden.dtype
    if residual is not None and (residual.dtype != res_dtype or residual.shape != hidden.shape
                                 or not residual.is_contiguous()):
        return None
    if _has_hooks(norm):
        return None
    out, res = _EXT.add_norm(hidden.reshape(-1, D), None if residual is None else residual.reshape(-1, D),
                             residual_in_fp32, w, bias, float(norm.eps), rms)
    return out.view(hidden.shape), res.view(hidden.shape)


_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when its data does not start on a 16-byte boundary (a view at an offset)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _AddNormTrainFn(torch.autograd.Function):
    """Residual add + norm with autograd, two kernels (csrc/add_norm.cu) instead of add, cast, norm, and
    in the backward the norm's input and weight gradients, the residual gradient's add and the cast."""

    @staticmethod
    def forward(ctx, hidden, residual, weight, bias, eps, rms, out_dtype):
        D = hidden.shape[-1]
        res = _EXT.add_norm_train_fwd(hidden.reshape(-1, D), None if residual is None else residual.reshape(-1, D),
                                      weight, bias, float(eps), bool(rms), _DT_CODE[out_dtype])
        if not res:
            raise RuntimeError("add_norm_train_fwd: not supported here")  # checked by the caller first
        out, res_out, mean, rstd = res
        ctx.save_for_backward(res_out, mean, rstd, weight)
        ctx.rms, ctx.has_bias, ctx.has_res = bool(rms), bias is not None, residual is not None
        ctx.hidden_dtype, ctx.out_dtype, ctx.shape = hidden.dtype, out_dtype, hidden.shape
        ctx.set_materialize_grads(False)
        return out.view(hidden.shape), res_out.view(hidden.shape)

    @staticmethod
    def backward(ctx, dout, dres):
        res_out, mean, rstd, weight = ctx.saved_tensors
        D = res_out.shape[-1]
        if dout is None:
            dout = torch.zeros(res_out.shape, device=res_out.device, dtype=ctx.out_dtype)
        dout = _aligned(dout.reshape(-1, D).contiguous())
        dres = None if dres is None else _aligned(dres.reshape(-1, D).float().contiguous())
        dh, dr, dw, db = _EXT.add_norm_train_bwd(res_out, mean, rstd, weight, ctx.has_bias, dout, dres, ctx.rms,
                                                 _DT_CODE[ctx.hidden_dtype], ctx.has_res)
        return (dh.view(ctx.shape), dr.view(ctx.shape) if ctx.has_res else None, dw,
                db if ctx.has_bias else None, None, None, None)


def add_norm_train_cuda(hidden, residual, norm, residual_in_fp32: bool):
    """The fused residual add + norm with autograd (training) when it applies, else None: CUDA, fp32
    norm weights, a residual stream in fp32 (or none), LayerNorm (affine) or RMSNorm, width a multiple
    of 8 up to 8192, no hooks on the norm. The normed output is in the autocast dtype under autocast
    (what the mixer's GEMMs read), else in the weights' fp32, as the unfused path gives it."""
    rms = _fusable_norm(norm, "add_norm_train_fwd")
    if rms is None:
        return None
    w, bias = norm.weight, getattr(norm, "bias", None)
    D = hidden.shape[-1]
    if hidden.numel() == 0 or w.dtype != torch.float32 or w.shape != (D,) or D % 8 or D > 8192 \
            or hidden.dtype not in _DT_CODE:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    if residual is not None and residual.dtype != torch.float32:
        return None
    if not (residual_in_fp32 or hidden.dtype == torch.float32):
        return None
    dev = hidden.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
    if hidden.dtype != torch.float32 and hidden.dtype != out_dtype:
        return None  # the kernels take (bf16, bf16), (fp16, fp16) and fp32 hidden with any output
    if _has_hooks(norm):
        return None
    hidden = hidden.contiguous()
    residual = residual.contiguous() if residual is not None else None
    if any(t is not None and t.data_ptr() % 16 for t in (hidden, residual, w, bias)):
        return None
    return _AddNormTrainFn.apply(hidden, residual, w, bias, norm.eps, rms, out_dtype)


def _block_consts(mixer) -> Tuple[torch.Tensor, ...]:
    """fp32 copies the kernels read (A = -exp(A_log), D, conv weight / bias, dt bias), rebuilt when a
    parameter changes (new storage or an in-place update bumps its version)."""
    src = (mixer.A_log, mixer.D, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_proj.bias)
    key = tuple((t.data_ptr(), t._version) if t is not None else None for t in src)
    cached = getattr(mixer, "_mb_block_consts", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        consts = (
            (-torch.exp(mixer.A_log.float())).contiguous(),
            mixer.D.float().contiguous() if mixer.D is not None else None,
            mixer.conv1d.weight.float().reshape(mixer.conv1d.weight.shape[0], -1).contiguous(),
            mixer.conv1d.bias.float().contiguous() if mixer.conv1d.bias is not None else None,
            mixer.dt_proj.bias.float().contiguous() if mixer.dt_proj.bias is not None else None,
        )
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        # made during a graph capture, the kernels computing them have not run yet: use, don't keep
        mixer._mb_block_consts = (key, consts)
    return consts


def fused_blocks_step(model, hidden: torch.Tensor, state) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every block of ``model`` for one byte: hidden (b, D) embedding -> (last block's output, residual).
    States are updated in place. Call only when :func:`fused_block_step_unsupported` returns None."""
    cfg = model.config
    b = hidden.shape[0]
    groups = -(-cfg.d_inner // 256)
    chunks = -(-b // 8)
    counters = torch.zeros(chunks * groups, dtype=torch.int32, device=hidden.device)
    ext = _EXT
    pdl = _pdl_ok(hidden.device)
    residual = None
    hidden = hidden.contiguous()
    for i, layer in enumerate(model.backbone.layers):
        mx = layer.mixer
        A, D, conv_w, conv_b, dt_b = _block_consts(mx)
        hidden, residual = ext.layer_step(
            hidden, residual, bool(cfg.residual_in_fp32), layer.norm.weight, getattr(layer.norm, "bias", None),
            float(layer.norm.eps), cfg.norm == "rmsnorm", mx.in_proj.weight, mx.in_proj.bias, conv_w, conv_b,
            state.conv[i], mx.x_proj.weight, mx.dt_proj.weight, dt_b, A, D, state.ssm[i], mx.out_proj.weight,
            mx.out_proj.bias, counters, pdl,
        )
    return hidden, residual

"""The decode step, eager or captured in a CUDA graph.

:class:`EagerStep` and :class:`GraphedStep` share one interface::

    runner.load(state)          # copy a state into the runner's own buffers
    logits = runner(byte_ids)   # (b,) -> (b, 256); the runner's state advances by one byte
    runner.state                # the runner's MambaState (its buffers; clone before keeping)

:class:`GraphedStep` owns static input / state / output buffers, captures ``model.step`` once and
replays it; graphs are cached on the model per (batch size, device), so a second ``generate`` with the
same batch size replays without re-capturing. Nothing in a replay synchronises with the host.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch

from ..state import MambaState

logger = logging.getLogger("mambabyte.generation")

Tensor = torch.Tensor


class EagerStep:
    """``model.step`` called directly (CPU, or CUDA with graphs off)."""

    uses_cuda_graph = False

    def __init__(self, model, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.state = model.allocate_state(batch_size)

    def load(self, state: MambaState) -> None:
        self.state.copy_(state)

    def __call__(self, byte_ids: Tensor) -> Tensor:
        return self.model.step(byte_ids, self.state)


class GraphedStep:
    """``model.step`` captured once in a CUDA graph with static buffers, then replayed."""

    uses_cuda_graph = True

    def __init__(self, model, batch_size: int, warmup: int = 2) -> None:
        self.model = model
        self.batch_size = batch_size
        dev = model.device
        self.state = model.allocate_state(batch_size, device=dev)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # first calls allocate workspaces / pick kernels outside the capture
                model.step(self.tokens, self.state)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = model.step(self.tokens, self.state)
        self.state.reset()

    def load(self, state: MambaState) -> None:
        self.state.copy_(state)

    def __call__(self, byte_ids: Tensor) -> Tensor:
        self.tokens.copy_(byte_ids)
        self.graph.replay()
        self.state.bytes_consumed += 1
        return self.logits


class EagerForward:
    """``model(ids, state=S, return_state=True)`` for one stream: ids (L,) -> (logits (L, V), new state)."""

    uses_cuda_graph = False

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, ids: Tensor, state: MambaState):
        out = self.model(ids.unsqueeze(0), state=state, return_state=True)
        return out.logits[0], out.state


def _capture_forward(model, ids: Tensor, state: MambaState, warmup: int, **kwargs):
    """``model(ids, state=state, return_state=True, **kwargs)`` run ``warmup`` times on a side stream
    (workspaces and kernel choices settle outside the capture), then captured in a CUDA graph on the
    static buffers ``ids`` / ``state``. Returns (graph, the captured call's output)."""
    dev = model.device
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            model(ids, state=state, return_state=True, **kwargs)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(ids, state=state, return_state=True, **kwargs)
    return graph, out


class GraphedForward:
    """The resumable forward over a fixed number of bytes L (batch 1), captured in a CUDA graph.

    ``__call__(ids (L,), state)`` copies both into static buffers, replays, and returns copies of the
    logits (L, V) and of the new state, so results outlive the next replay. Used for speculative
    verification, where the eager forward's per-call host work costs far more than its kernels.
    """

    uses_cuda_graph = True

    def __init__(self, model, length: int, warmup: int = 2) -> None:
        dev = model.device
        self.length = length
        self.ids = torch.full((1, length), 32, dtype=torch.long, device=dev)
        self.state_in = model.allocate_state(1, device=dev)
        self.graph, out = _capture_forward(model, self.ids, self.state_in, warmup)
        self.logits, self.state_out = out.logits[0], out.state

    def __call__(self, ids: Tensor, state: MambaState):
        self.ids.copy_(ids.view(1, -1))
        self.state_in.copy_(state)
        self.graph.replay()
        new = MambaState(self.state_out.conv.clone(), self.state_out.ssm.clone(), state.bytes_consumed + self.length)
        return self.logits.clone(), new


class ForwardRunner:
    """Resumable forwards of any length for one stream: a CUDA graph per length (captured on first use,
    cached on the model) when asked for and on CUDA, else eager. A failed capture falls back to eager."""

    def __init__(self, model, use_cuda_graph: bool = False) -> None:
        self.model = model
        self.eager = EagerForward(model)
        self.graphed = bool(use_cuda_graph and model.device.type == "cuda" and torch.cuda.is_available())
        self.cache: Dict[Tuple, object] = model.__dict__.setdefault("_mambabyte_forward_graphs", {}) if self.graphed else {}

    def __call__(self, ids: Tensor, state: MambaState):
        if not self.graphed:
            return self.eager(ids, state)
        key = (int(ids.numel()),) + _graph_key(self.model, 1)
        runner = self.cache.get(key)
        if runner is None:
            try:
                runner = GraphedForward(self.model, int(ids.numel()))
            except Exception as exc:  # pragma: no cover - depends on the GPU stack
                logger.warning("CUDA-graph capture of the forward failed (%s); using eager forwards", exc)
                self.graphed = False
                return self.eager(ids, state)
            self.cache[key] = runner
        return runner(ids, state)


class GraphedPrefill:
    """A batch of ``batch`` prompts of ``length`` bytes each, resumed from a state, captured in a CUDA
    graph: ``__call__(ids (batch, length), state)`` -> (last-position logits (batch, V) fp32, new state),
    both copies that outlive the next replay. For workloads that prefill the same length again and
    again (fixed evaluation windows, serving with a fixed context): it removes the per-kernel launch
    gaps of an eager forward (~600 kernels at the 972M shape). The graph keeps its activation memory.
    """

    uses_cuda_graph = True

    def __init__(self, model, batch: int, length: int, warmup: int = 1) -> None:
        dev = model.device
        self.batch, self.length = batch, length
        self.ids = torch.full((batch, length), 32, dtype=torch.long, device=dev)
        self.state_in = model.allocate_state(batch, device=dev)
        self.graph, out = _capture_forward(model, self.ids, self.state_in, warmup, num_last_tokens=1)
        self.logits, self.state_out = out.logits[:, -1], out.state

    def __call__(self, ids: Tensor, state: Optional[MambaState]):
        """``state`` None: from the zero state."""
        self.ids.copy_(ids)
        if state is None:
            self.state_in.reset()
        else:
            self.state_in.copy_(state)
        self.graph.replay()
        base = state.bytes_consumed if state is not None else 0
        new = MambaState(self.state_out.conv.clone(), self.state_out.ssm.clone(), base + self.length)
        return self.logits.float(), new


# captured prefills kept per model (least recently used dropped first): each holds its activations
PREFILL_GRAPHS_MAX = 4


def get_prefill_graph(model, batch: int, length: int):
    """The cached :class:`GraphedPrefill` for (batch, length) on ``model``, captured on first use; None
    when capture fails (the caller runs eagerly; one log line)."""
    cache: Dict[Tuple, GraphedPrefill] = model.__dict__.setdefault("_mambabyte_prefill_graphs", {})
    key = (batch, length) + _graph_key(model, batch)
    runner = cache.pop(key, None)
    if runner is None:
        while len(cache) >= PREFILL_GRAPHS_MAX:
            cache.pop(next(iter(cache)))
        try:
            runner = GraphedPrefill(model, batch, length)
        except Exception as exc:  # pragma: no cover - depends on the GPU stack
            logger.warning("CUDA-graph capture of the prefill failed (%s); prefilling eagerly", exc)
            return None
    cache[key] = runner  # most recently used last
    return runner


def _graph_key(model, batch_size: int) -> Tuple:
    """What a captured graph depends on: batch, device, dtype, weights' storage, and which step path
    (per-op or the fused block step) ``model.step`` takes, so toggling that path recaptures."""
    w = model.lm_head.weight
    path: Tuple = ()
    if w.is_cuda:
        from ..ops import cuda_backend

        path = (bool(cuda_backend.FUSED_BLOCK_STEP), cuda_backend.FUSED_MAX_BATCH, bool(cuda_backend.PDL))
    return (batch_size, str(w.device), w.dtype, w.data_ptr()) + path


def get_step_runner(model, batch_size: int, use_cuda_graph: bool = True):
    """A runner for ``batch_size`` streams: graphed on CUDA when asked for and possible, else eager.

    Falls back to eager (with one log line) when capture fails, e.g. a kernel that cannot be captured.
    """
    if not (use_cuda_graph and model.device.type == "cuda" and torch.cuda.is_available()):
        return EagerStep(model, batch_size)
    cache: Dict[Tuple, GraphedStep] = model.__dict__.setdefault("_mambabyte_cuda_graphs", {})
    key = _graph_key(model, batch_size)
    runner = cache.get(key)
    if runner is None:
        try:
            runner = GraphedStep(model, batch_size)
        except Exception as exc:  # pragma: no cover - depends on the GPU stack
            logger.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly", exc)
            return EagerStep(model, batch_size)
        cache[key] = runner
    return runner


def clear_graph_cache(model) -> None:
    """Drop the captured graphs (and their buffers) cached on ``model``."""
    model.__dict__.pop("_mambabyte_cuda_graphs", None)
    model.__dict__.pop("_mambabyte_forward_graphs", None)
    model.__dict__.pop("_mambabyte_prefill_graphs", None)


__all__ = ["EagerStep", "GraphedStep", "get_step_runner", "EagerForward", "GraphedForward", "ForwardRunner",
           "GraphedPrefill", "get_prefill_graph", "clear_graph_cache"]

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
from typing import Dict, Tuple

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


def _graph_key(model, batch_size: int) -> Tuple:
    w = model.lm_head.weight
    return (batch_size, str(w.device), w.dtype, w.data_ptr())


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


__all__ = ["EagerStep", "GraphedStep", "get_step_runner", "clear_graph_cache"]

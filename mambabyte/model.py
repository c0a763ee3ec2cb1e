"""MambaByteLM: byte embedding -> n_layer Mamba blocks -> final norm -> byte head.

Shapes: b batch, L bytes, D d_model, V vocabulary (256 bytes).

Parameter names follow mamba_ssm's ``MambaLMHeadModel`` (``backbone.embedding``,
``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm``, ``backbone.norm_f``, ``lm_head``), so its
checkpoints load unchanged; see :mod:`mambabyte.io` for the other formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .config import MambaByteConfig
from .errors import MambaByteError, StateError
from .modules import Block, MambaMixer, make_norm
from .modules.norms import add_norm
from .state import MambaState

Tensor = torch.Tensor


@dataclass
class MambaByteOutput:
    """``logits`` (b, L, 256) and, when asked for, the ``state`` after the last byte."""

    logits: Tensor
    state: Optional[MambaState] = None
    hidden_states: Optional[Tensor] = None


class _Backbone(nn.Module):
    def __init__(self, config: MambaByteConfig, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **fk)
        self.layers = nn.ModuleList(
            [
                Block(
                    config.d_model,
                    MambaMixer(
                        config.d_model,
                        d_state=config.d_state,
                        d_conv=config.d_conv,
                        expand=config.expand,
                        dt_rank=config.dt_rank,
                        dt_min=config.dt_min,
                        dt_max=config.dt_max,
                        dt_init=config.dt_init,
                        dt_scale=config.dt_scale,
                        dt_init_floor=config.dt_init_floor,
                        conv_bias=config.conv_bias,
                        bias=config.bias,
                        layer_idx=i,
                        **fk,
                    ),
                    config.norm,
                    config.norm_eps,
                    config.residual_in_fp32,
                    **fk,
                )
                for i in range(config.n_layer)
            ]
        )
        self.norm_f = make_norm(config.norm, config.d_model, config.norm_eps, **fk)


class MambaByteLM(nn.Module):
    """A byte-level Mamba language model that can continue from a recurrent state.

    ``model(input_ids, state=None, return_state=False)``: input_ids (b, L) int64 bytes; returns a
    :class:`MambaByteOutput`. Running [x1; x2] at once gives the same logits and final state as running
    x1, then x2 from the returned state (any split, down to single bytes).
    """

    def __init__(self, config: MambaByteConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self._init_weights()
        # recompute each block's activations in the backward instead of keeping them (training only)
        self.gradient_checkpointing = False
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device=None, dtype=None, **overrides) -> "MambaByteLM":
        return cls(MambaByteConfig.from_preset(name, **overrides), device=device, dtype=dtype)

    def _init_weights(self) -> None:
        cfg = self.config
        with torch.no_grad():
            nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range)
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    if not getattr(module.bias, "_no_reinit", False):
                        nn.init.zeros_(module.bias)
            if cfg.rescale_prenorm_residual:
                # out_proj rescaled by 1/sqrt(n_layer) (GPT-2 style, as the reference does)
                for layer in self.backbone.layers:
                    w = layer.mixer.out_proj.weight
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                    w.div_(math.sqrt(cfg.n_layer))

    # -- state --------------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int = 1, device=None) -> MambaState:
        """A zero state (the start of a text) for ``batch_size`` streams, fp32, on the model's device."""
        cfg = self.config
        dev = device if device is not None else self.device
        sdt = torch.float64 if self.dtype == torch.float64 else torch.float32
        return MambaState.zeros(cfg.n_layer, batch_size, cfg.d_inner, cfg.d_conv, cfg.d_state, device=dev, dtype=sdt)

    def check_state(self, state: MambaState, batch_size: Optional[int] = None) -> None:
        cfg = self.config
        want = (cfg.n_layer, cfg.d_inner, cfg.d_conv, cfg.d_state)
        got = (state.n_layer, state.d_inner, state.d_conv, state.d_state)
        if want != got:
            raise StateError(f"state does not fit this model: (n_layer, d_inner, d_conv, d_state) is {got}, model needs {want}")
        if batch_size is not None and state.batch_size != batch_size:
            raise StateError(f"state holds {state.batch_size} streams but the input has batch size {batch_size}")

    def cast_(self, dtype: Optional[torch.dtype]) -> "MambaByteLM":
        """Cast the weights to ``dtype`` in place, keeping A_log and D in fp32 as the reference does."""
        if dtype is None:
            return self
        # keep the fp32 values themselves: casting them to dtype and back would round them
        keep = [(layer.mixer, layer.mixer.A_log.data.float(), layer.mixer.D.data.float())
                for layer in self.backbone.layers]
        self.to(dtype=dtype)
        for mixer, a_log, d in keep:
            mixer.A_log.data = a_log
            mixer.D.data = d
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        state: Optional[MambaState] = None,
        return_state: bool = False,
        num_last_tokens: int = 0,
        output_hidden_states: bool = False,
    ) -> MambaByteOutput:
        """input_ids (b, L) -> logits (b, L, 256) [and the state after the last byte].

        ``state`` (optional) is where to continue from; it is not modified. ``num_last_tokens`` > 0
        computes logits only for the last positions (prefill for generation).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise MambaByteError(f"input_ids must be (b, L); got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise MambaByteError(f"input_ids must be integer byte ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise MambaByteError("input_ids holds no bytes (L = 0)")
        if not input_ids.is_cuda:  # on the GPU the check would cost a host sync per call
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise MambaByteError(f"input_ids must be in [0, {self.config.vocab_size}); got values in [{lo}, {hi}]")
        b, L = input_ids.shape
        if state is not None:
            self.check_state(state, b)
        want_state = return_state or state is not None
        hidden = self.backbone.embedding(input_ids)
        residual = None
        convs, ssms = [], []
        for i, layer in enumerate(self.backbone.layers):
            cs = state.conv[i] if state is not None else None
            ss = state.ssm[i] if state is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual, new_conv, new_ssm = torch.utils.checkpoint.checkpoint(
                    layer, hidden, residual, cs, ss, use_reentrant=False
                )
            else:
                hidden, residual, new_conv, new_ssm = layer(hidden, residual, cs, ss)
            if want_state:
                convs.append(new_conv)
                ssms.append(new_ssm)
        if num_last_tokens > 0:  # only the last positions go through the final norm and the head
            hidden = hidden[:, -num_last_tokens:].contiguous()
            residual = residual[:, -num_last_tokens:].contiguous() if residual is not None else None
        hidden, _ = add_norm(hidden, residual, self.backbone.norm_f, self.config.residual_in_fp32)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]
        new_state = None
        if want_state:
            prev = state.bytes_consumed if state is not None else 0
            sdt = torch.float64 if ssms[0].dtype == torch.float64 else torch.float32
            new_state = MambaState(torch.stack(convs).to(sdt), torch.stack(ssms).to(sdt), prev + L)
            # the next-byte logits go with the state (an empty prompt can continue from it)
            new_state.logits = logits[:, -1].detach().float().clone()
        return MambaByteOutput(logits=logits, state=new_state, hidden_states=hidden if output_hidden_states else None)

    @torch.no_grad()
    def step(self, byte_ids: Tensor, state: MambaState) -> Tensor:
        """One byte per stream: byte_ids (b,) -> logits (b, 256). ``state`` is updated in place."""
        if byte_ids.dim() == 2 and byte_ids.shape[1] == 1:
            byte_ids = byte_ids[:, 0]
        if byte_ids.dim() != 1:
            raise MambaByteError(f"step takes (b,) byte ids; got shape {tuple(byte_ids.shape)}")
        self.check_state(state, byte_ids.shape[0])
        hidden = self.backbone.embedding(byte_ids)
        residual = None
        if hidden.is_cuda and self._fused_block_step_ok(state, hidden.shape[0]):
            from .ops.cuda_backend import fused_blocks_step

            hidden, residual = fused_blocks_step(self, hidden, state)
        else:
            for i, layer in enumerate(self.backbone.layers):
                hidden, residual = layer.step(hidden, residual, state.conv[i], state.ssm[i])
        residual = hidden + residual if residual is not None else hidden
        if self.config.residual_in_fp32:
            residual = residual.float()
        hidden = self.backbone.norm_f(residual.to(self.backbone.norm_f.weight.dtype))
        state.bytes_consumed += 1
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def _fused_block_step_ok(self, state: MambaState, batch: int) -> bool:
        """Whether :meth:`step` runs each block as the three fused kernels of ``csrc/layer_step.cu``
        (CUDA, batches up to ``MAMBABYTE_FUSED_MAX_BATCH``); the reason it does not is logged once."""
        from . import ops

        if not ops.cuda_backend_status()[0]:
            return False
        from .ops.cuda_backend import fused_block_step_unsupported

        why = fused_block_step_unsupported(self, state, batch)
        if why is not None and why != getattr(self, "_mb_fused_why", None):
            self._mb_fused_why = why
            logging.getLogger("mambabyte.model").info("model.step: per-op decode path (%s)", why)
        return why is None

    # -- identity -----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the config and every weight's name, shape and value; 16 hex chars.

        Values are hashed as fp32 (fp64 weights as fp64), so the same weights loaded in bf16, fp16 or
        fp32 share a fingerprint (a state built with one dtype loads in another); weights that differ,
        e.g. an fp32 model and its rounded bf16 copy, do not."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config.fingerprint_dict(), sort_keys=True).encode())  # its name is a label
        sd = self.state_dict()
        for k in sorted(sd):
            t = sd[k].detach().to("cpu")
            if t.is_floating_point() and t.dtype != torch.float64:
                t = t.float()
            t = t.contiguous()
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    # -- checkpoints (implemented in mambabyte.io) ------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, "os.PathLike[str]"],
        device=None,
        dtype: Optional[torch.dtype] = None,
        model_id: Optional[str] = None,
    ) -> "MambaByteLM":
        """Load our folders, mamba_ssm folders, MambaByte ``.pt`` files, shipped names or hub ids."""
        from .io import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype, model_id=model_id)

    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None, extra_config=None) -> None:
        """Write config.json + model.safetensors into ``directory`` atomically."""
        from .io import save_pretrained

        save_pretrained(self, directory, dtype=dtype, extra_config=extra_config)

    # -- generation (implemented in mambabyte.generation) ------------------------------------------------
    def generate(self, *args, **kwargs):
        """See :func:`mambabyte.generation.generate`."""
        from .generation import generate

        return generate(self, *args, **kwargs)


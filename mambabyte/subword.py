"""Subword Mamba drafters: a byte-level BPE tokenizer and a Mamba LM over its tokens.

The MambaByte paper drafts with a small subword Mamba and verifies at byte level. This module holds
the subword side:

* :class:`ByteBPE` -- a BPE tokenizer (trained with the ``tokenizers`` library, imported lazily) over
  an alphabet of all 256 bytes, so *every* byte string, invalid UTF-8 included, encodes, and every
  token decodes to an exact byte string. Bytes are mapped one-to-one onto printable characters before
  the library sees them (the GPT-2 trick), so no byte is ever lost or merged by a normaliser.
* :class:`SubwordDrafter` -- the tokenizer plus a :class:`~mambabyte.model.MambaByteLM` whose
  vocabulary is the tokenizer's; folders hold ``config.json``, ``model.safetensors`` and
  ``tokenizer.json``.
* :func:`train_subword_drafter` -- trains the tokenizer and the model on files of text.

Speculative decoding with it lives in :mod:`mambabyte.generation` (it only needs
:meth:`SubwordDrafter.encode`, :meth:`SubwordDrafter.token_bytes` and the model).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from .config import MambaByteConfig
from .errors import CheckpointError, MambaByteError
from .model import MambaByteLM

TOKENIZER_FILE = "tokenizer.json"


def _byte_to_char() -> Dict[int, str]:
    """A bijection bytes -> printable characters (printable ASCII/Latin-1 map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_B2C = _byte_to_char()
_C2B = {c: b for b, c in _B2C.items()}
_SPACE, _NL = _B2C[ord(" ")], _B2C[ord("\n")]
# pre-tokenisation on the mapped characters: words with their leading space, runs of newlines, runs of
# spaces, each punctuation run on its own
_PRETOKEN_REGEX = f"{_SPACE}?[^{_SPACE}{_NL}]+|{_NL}+|{_SPACE}+"


def _to_chars(data: bytes) -> str:
    return "".join(_B2C[b] for b in data)


class ByteBPE:
    """Byte-level BPE whose tokens are exact byte strings."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        vocab = tokenizer.get_vocab()
        self.vocab_size = len(vocab)
        table: List[bytes] = [b""] * self.vocab_size
        for s, i in vocab.items():
            try:
                table[i] = bytes(_C2B[c] for c in s)
            except KeyError:
                raise MambaByteError(f"tokenizer token {s!r} is not over the byte alphabet") from None
        self.table = table

    @classmethod
    def train(cls, texts: Sequence[bytes], vocab_size: int = 2048, min_frequency: int = 2) -> "ByteBPE":
        tokenizers = _import_tokenizers()
        from tokenizers import Regex, models, pre_tokenizers, trainers

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKEN_REGEX), behavior="isolated")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=[_B2C[b] for b in range(256)],
            show_progress=False,
            special_tokens=[],
        )
        tok.train_from_iterator((_to_chars(t) for t in texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ByteBPE":
        tokenizers = _import_tokenizers()
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"could not read tokenizer {str(path)!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        return cls(tok)

    def save(self, path: Union[str, Path]) -> None:
        from .io.checkpoints import atomic_write_text

        atomic_write_text(path, self.tok.to_str())

    def encode(self, data: bytes) -> List[int]:
        if not data:
            return []
        return self.tok.encode(_to_chars(data)).ids

    def decode(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.table[i] for i in ids)

    def token_bytes(self, i: int) -> bytes:
        return self.table[i]


def _import_tokenizers():
    try:
        import tokenizers  # lazy: optional dependency
    except ImportError:
        raise MambaByteError("the subword drafter needs the 'tokenizers' package (pip install tokenizers)") from None
    return tokenizers


class SubwordDrafter:
    """A byte-level BPE tokenizer and a Mamba LM over its tokens."""

    def __init__(self, model: MambaByteLM, tokenizer: ByteBPE) -> None:
        if model.config.vocab_size < tokenizer.vocab_size:
            raise MambaByteError(
                f"drafter model vocabulary {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "SubwordDrafter":
        from .io.checkpoints import resolve_path

        folder = resolve_path(str(path))
        if not (folder / TOKENIZER_FILE).is_file():
            raise CheckpointError(f"{str(folder)!r} is not a subword drafter: no {TOKENIZER_FILE}")
        tok = ByteBPE.load(folder / TOKENIZER_FILE)
        model = MambaByteLM.from_pretrained(folder, device=device, dtype=dtype)
        return cls(model, tok)

    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None, extra_config=None) -> None:
        self.model.save_pretrained(directory, dtype=dtype, extra_config=extra_config)
        self.tokenizer.save(Path(directory) / TOKENIZER_FILE)

    def encode(self, data: bytes) -> List[int]:
        return self.tokenizer.encode(data)

    def token_bytes(self, i: int) -> bytes:
        return self.tokenizer.token_bytes(i)

    @torch.no_grad()
    def bits_per_byte(self, data: bytes, chunk_tokens: int = 4096) -> float:
        """Bits per byte of ``data`` under the drafter (carrying the state across chunks)."""
        ids = torch.tensor(self.encode(data), dtype=torch.long, device=self.model.device)
        if ids.numel() < 2:
            raise MambaByteError("need at least two tokens to score")
        state, nll, prev = None, 0.0, None
        for s in range(0, ids.numel(), chunk_tokens):
            chunk = ids[s : s + chunk_tokens]
            out = self.model(chunk[None], state=state, return_state=True)
            logp = torch.log_softmax(out.logits[0].float(), -1)
            if prev is not None:
                nll -= float(prev[chunk[0]])
            nll -= float(logp[:-1].gather(-1, chunk[1:, None]).sum())
            prev = logp[-1]
            state = out.state
        n_bytes = len(data) - len(self.token_bytes(int(ids[0])))
        return nll / math.log(2) / max(1, n_bytes)


def _read_files(paths: Sequence[Union[str, Path]]) -> List[bytes]:
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                out.append(f.read_bytes())
            except OSError as exc:
                raise MambaByteError(f"cannot read {str(f)!r}: {exc.strerror or exc}") from None
    if not out:
        raise MambaByteError(f"no training files found in {', '.join(map(str, paths))}")
    return out


def train_subword_drafter(
    train: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    val: Optional[Sequence[Union[str, Path]]] = None,
    vocab_size: int = 2048,
    d_model: int = 256,
    n_layer: int = 4,
    seq_len: int = 512,
    batch_size: int = 32,
    lr: float = 2e-3,
    max_steps: int = 2000,
    max_time_minutes: Optional[float] = None,
    warmup_steps: int = 100,
    device: Optional[str] = None,
    seed: int = 0,
    log=print,
) -> Dict[str, object]:
    """Train a BPE tokenizer and a small Mamba over its tokens; save both to ``out_dir`` (bf16 weights).

    Returns a summary (steps, tokens seen, wall time, final train loss, val bits per byte).
    """
    t0 = time.time()
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    texts = _read_files(train)
    tok = ByteBPE.train(texts, vocab_size=vocab_size)
    ids = torch.tensor([i for t in texts for i in tok.encode(t)], dtype=torch.int32)
    n_bytes = sum(len(t) for t in texts)
    log(f"tokenizer: {tok.vocab_size} tokens; {n_bytes} bytes -> {ids.numel()} tokens ({n_bytes / ids.numel():.2f} bytes/token)")
    cfg = MambaByteConfig(vocab_size=max(256, tok.vocab_size), d_model=d_model, n_layer=n_layer,
                          pad_vocab_size_multiple=8, name=f"subword-{d_model}x{n_layer}")
    model = MambaByteLM(cfg, device=dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    ids_dev = ids.to(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    use_bf16 = dev.type == "cuda"
    step, loss_val = 0, float("nan")
    model.train()
    while step < max_steps:
        if max_time_minutes is not None and time.time() - t0 > 60 * max_time_minutes:
            break
        frac = step / max(1, max_steps)
        if max_time_minutes:  # the schedule follows whichever budget runs out first
            frac = max(frac, (time.time() - t0) / (60 * max_time_minutes))
        frac = min(frac, 1.0)
        cur = lr * min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen).to(dev)
        idx = starts[:, None] + torch.arange(seq_len + 1, device=dev)[None]
        batch = ids_dev[idx].long()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            loss_val = float(loss.detach())
            log(f"step {step} loss {loss_val:.3f} lr {cur:.2e} {time.time() - t0:.0f}s")
    loss_val = float(loss.detach())
    model.eval()
    drafter = SubwordDrafter(model, tok)
    summary: Dict[str, object] = {
        "steps": step, "tokens_seen": step * batch_size * seq_len, "wall_s": round(time.time() - t0, 1),
        "final_train_loss_nats_per_token": round(loss_val, 4), "vocab_size": tok.vocab_size,
        "bytes_per_token": round(n_bytes / ids.numel(), 3), "params": model.num_parameters(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    if val:
        vt = b"".join(_read_files(val))
        summary["val_bpb"] = round(drafter.bits_per_byte(vt), 4)
    drafter.save_pretrained(out_dir, dtype=torch.bfloat16, extra_config={"subword_drafter": summary})
    log(json.dumps(summary))
    return summary

"""Speculative decoding: draft k bytes cheaply, verify them with ONE resumed scan of the target, roll
back exactly. Drafters: a small byte-level MambaByte (:class:`ByteDraftRunner`) or a subword Mamba over
a BPE vocabulary (:class:`SubwordDraftRunner`, the paper's setup; its rule is described there).

Shapes: V = 256, k = draft length. One sequence at a time (a batch is decoded row after row).

Per verification (the target state ``S`` has consumed everything but the pending byte ``c``, the last
byte emitted -- with ``rollback="deferred"``, also but the bytes accepted since S was last advanced,
which are fed before ``c``; the drafter has consumed everything but ``c``):

1. Draft: the drafter steps ``c`` and then its own samples, ``x_j ~ q_j`` for j < k, keeping a snapshot
   of its state after each step (its states are small).
2. Verify: ``target([c, x_0 .. x_{k-1}], state=S)`` -- one call of the resumable scan -- gives the target's
   distributions ``p_0 .. p_k`` (the same temperature / top-k / top-p / min-p transform is applied to p
   and q).
3. Accept ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))``, left to right; at the first rejection
   draw the replacement from ``norm(max(0, p_j - q_j))``; if all k pass, draw a bonus byte from ``p_k``.
   This is the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): every
   emitted byte is distributed exactly as the target's. At temperature 0 p and q are one-hot, so a draft
   is accepted iff it equals the target's argmax and the replacement is that argmax: the output is the
   target's greedy output byte for byte.
4. Roll back: if all k were accepted the verification's final state is kept; otherwise ``S`` (never
   modified: ``model(...)`` returns a new state) stays the snapshot and is resumed over the accepted
   bytes only. ``rollback="rerun"`` does that at once (a second, short scan call);
   ``rollback="deferred"`` (default) folds those bytes into the front of the next verification call, so
   every verification is exactly one target call (the bytes are re-scanned, never re-sampled; the
   deferred run is flushed with its own call once it exceeds k + 1 bytes, so calls stay <= 2k + 2 bytes). Both are exact. The
   drafter restores the snapshot taken after its a-th step. The prompt is never re-run.

The bytes a verification emits are ``x_0 .. x_{a-1}, y``; ``y`` becomes the next pending byte. At the end
(length or a stop string) the state is brought to exactly ``prompt + returned bytes``.

``verify_cuda_graph=True`` (opt-in; on CUDA) replays each verification length from a CUDA graph
captured on first use, instead of the eager forward whose per-call host work dominated on the H100
(docs/benchmarks.md). It has not been run on a GPU yet; a capture failure falls back to eager.

``adaptive=True`` changes k between verifications: +1 after a full acceptance (up to 4 x the initial k,
at most 64), down to ``max(1, a + 1)`` when fewer than half the drafts were accepted.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..errors import MambaByteError
from ..state import MambaState
from .cuda_graph import ForwardRunner, get_step_runner
from .decode import forward_chunked, prefill
from .sampling import SamplingParams, logits_to_probs, sample_from_probs
from .text import StopMatcher, Utf8Stream

Tensor = torch.Tensor


@dataclass
class SpeculativeStats:
    draft_len: int = 0
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    rollback_s: float = 0.0
    other_s: float = 0.0
    draft_len_history: List[int] = field(default_factory=list)
    accepted_history: List[int] = field(default_factory=list)

    def to_dict(self):
        tot = self.draft_s + self.verify_s + self.rollback_s + self.other_s
        return {
            "draft_len": self.draft_len,
            "verifications": self.verifications,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted": self.accepted / self.verifications if self.verifications else 0.0,
            "bytes_per_verification": self.emitted / self.verifications if self.verifications else 0.0,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s + self.rollback_s,
            "rollback_s": self.rollback_s,
            "draft_share": self.draft_s / tot if tot else 0.0,
            "verify_share": (self.verify_s + self.rollback_s) / tot if tot else 0.0,
            "mean_draft_len": (sum(self.draft_len_history) / len(self.draft_len_history)) if self.draft_len_history else 0.0,
            "accepted_histogram": {str(a): self.accepted_history.count(a) for a in sorted(set(self.accepted_history))},
        }

    def merge(self, other: "SpeculativeStats") -> None:
        for k in ("verifications", "drafted", "accepted", "emitted", "draft_s", "verify_s", "rollback_s", "other_s"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.draft_len_history += other.draft_len_history
        self.accepted_history += other.accepted_history


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def speculative_accept(p: Tensor, q: Tensor, x: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """The acceptance rule. p (k+1, V) target probs, q (k, V) drafter probs, x (k,) drafted bytes.

    Returns (a, y): the number of accepted drafts and the byte emitted after them (the replacement drawn
    from norm(max(0, p_a - q_a)) if a < k, else a draw from p_k). One host sync.
    """
    k = x.shape[0]
    if k:
        idx = torch.arange(k, device=x.device)
        px, qx = p[idx, x], q[idx, x]
        u = torch.rand(k, device=x.device, generator=generator)
        ok = (u * qx < px).tolist()
        a = next((j for j, o in enumerate(ok) if not o), k)
    else:
        a = 0
    if a < k:
        resid = (p[a] - q[a]).clamp_min(0)
        s = resid.sum()
        # s == 0 only when p_a <= q_a everywhere, i.e. p_a == q_a: then a rejection cannot happen
        dist = torch.where(s > 0, resid / s.clamp_min(1e-30), p[a])
    else:
        dist = p[k]
    y = int(sample_from_probs(dist.unsqueeze(0), generator)[0])
    return a, y


def _probs(logits: Tensor, params: SamplingParams) -> Tensor:
    return logits_to_probs(logits.float(), params)


class ByteDraftRunner:
    """A byte-level MambaByte drafter: proposes k bytes with their distributions q (k, V).

    Its state has consumed everything emitted except the pending byte, which it steps first.
    Rollback restores the snapshot taken after the a-th drafting step.
    """

    kind = "byte"

    def __init__(self, model, state: MambaState, logits: Tensor, use_cuda_graph: bool = True) -> None:
        self.dev = model.device
        self.runner = get_step_runner(model, 1, use_cuda_graph)
        self.runner.load(state)
        self.first_logits = logits
        self._snaps: List[MambaState] = []
        self._x: Optional[Tensor] = None

    def draft(self, kk: int, pending: Optional[int], params: SamplingParams, generator=None) -> Tuple[Tensor, Tensor]:
        runner = self.runner
        qlog = runner(torch.tensor([pending], device=self.dev)) if pending is not None else self.first_logits
        self._snaps, qs, xs = [], [], []
        for j in range(kk):
            self._snaps.append(runner.state.clone())  # after [pending, x_0 .. x_{j-1}]
            q = _probs(qlog, params)[0]
            x = sample_from_probs(q.unsqueeze(0), generator)
            qs.append(q)
            xs.append(x)
            if j + 1 < kk:
                qlog = runner(x)
        x_all = torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=self.dev)
        self._x = x_all
        q_all = torch.stack(qs) if qs else torch.zeros(0, 256, device=self.dev)
        return x_all, q_all

    def accept(self, a: int, kk: int, y: int) -> None:
        """a of the kk drafts were accepted, then y emitted (y stays pending: stepped by the next draft)."""
        if kk == 0:
            return
        if a < kk:
            self.runner.load(self._snaps[a])
        else:
            self.runner(self._x[kk - 1 : kk])  # the last draft had not been consumed yet


class SubwordDraftRunner:
    """A subword drafter (:class:`mambabyte.subword.SubwordDrafter`: ``.model`` over BPE tokens,
    ``.encode(bytes)``, ``.token_bytes(id)``) proposing bytes for byte-level verification.

    Drafting picks whole tokens until k bytes are covered and proposes their first k bytes as a point
    mass, q = one-hot. A token is chosen byte by byte down the vocabulary's byte trie: at each byte the
    drafter either ends the token (the token spelled so far) or continues with byte b, whichever keeps
    the larger total probability of tokens. So the proposal follows the drafter's byte-level marginals
    -- ' t' is proposed when the many tokens starting with ' t' together outweigh the single likeliest
    token ' and' -- at one drafter step per token. The proposal is this most likely path at every
    temperature: with q one-hot the acceptance rule (accept x with probability p(x), else draw from p
    with x removed, renormalised) is exact -- each emitted byte has the target's distribution whatever
    was proposed, so the output distribution equals the target's -- and the likeliest bytes are the
    ones accepted most often. The acceptance probability is p(x) rather than min(1, p/q).

    Rollback: after a verification the drafter's state is restored to the last token boundary inside
    the accepted bytes; the accepted bytes after that boundary plus the emitted byte become a pending
    remainder r. The next draft re-reads r as the tokenizer splits it (the drafter saw such splits in
    training), except the longest tail of that split that some token starts with: the first drafted
    token must start with that tail ("token healing": the drafter re-chooses how the tail and the text
    after it are tokenized). The proposal is the bytes after r.
    """

    kind = "subword"

    def __init__(self, drafter, context: bytes, use_cuda_graph: bool = True, bos: bytes = b"\n") -> None:
        self.d = drafter
        self.model = drafter.model
        self.dev = self.model.device
        self.tok_bytes, self._lens, self._tab = _vocab_table(drafter, self.model.config.vocab_size)
        self.empty = (self._lens == 0).to(self.dev)
        self.runner = get_step_runner(self.model, 1, use_cuda_graph)
        context = context or bos or b"\n"
        ids = drafter.encode(context)
        # the last token of the context stays pending (it may extend into the generated text)
        last = self.tok_bytes[ids[-1]] if ids else b""
        if len(ids) > 1:
            lg, st = forward_chunked(self.model, torch.tensor([ids[:-1]], device=self.dev), None)
            self.runner.load(st)
            self.logits = lg
            self.pending = last
        else:  # one token: it has to be read to have any logits at all
            lg, st = forward_chunked(self.model, torch.tensor([ids], device=self.dev), None)
            self.runner.load(st)
            self.logits = lg
            self.pending = b""
        self._snaps: List[Tuple[int, MambaState, Tensor]] = []
        self._consumed = b""

    def _starts(self, r: bytes) -> Tensor:
        n = len(r)
        rr = torch.tensor(list(r), dtype=torch.long)
        return (self._lens >= n) & (self._tab[:, :n] == rr[None, :]).all(1)

    def _walk(self, probs: Tensor, r: bytes) -> int:
        """The drafter's next token (an id) by the trie walk of the class docstring: probs (V,) host
        token probabilities; r: bytes the token must start with (token healing)."""
        lens, tab = self._lens, self._tab
        alive = lens > 0
        if r:
            alive = alive & self._starts(r)
        m = 0
        while True:
            end_tok, end_mass = None, -1.0
            if m > 0:
                eq = (alive & (lens == m)).nonzero()
                if eq.numel():
                    end_tok = int(eq[0, 0])
                    end_mass = float(probs[end_tok])
            # the probability each next byte keeps; -1 where no live token continues with it
            cont = torch.full((256,), -1.0, dtype=probs.dtype)
            longer = alive & (lens > m)
            if m < tab.shape[1] and bool(longer.any()):
                nxt = tab[longer, m]
                cont[nxt] = 0.0
                cont.index_add_(0, nxt, probs[longer])
            if m < len(r):  # inside r the only continuation is r's next byte
                cont[torch.arange(256) != r[m]] = -1.0
            b = int(cont.argmax())
            if end_tok is not None and end_mass >= float(cont[b]):
                return end_tok
            if float(cont[b]) < 0:  # nothing continues and no token ends here (cannot happen for a
                raise RuntimeError("subword drafter: no token fits the pending bytes")  # byte-level BPE)
            alive = alive & (tab[:, m] == b)
            m += 1

    def draft(self, kk: int, pending: Optional[int], params: SamplingParams, generator=None) -> Tuple[Tensor, Tensor]:
        r0 = self.pending
        consumed = bytearray()  # bytes read by the drafted tokens (r0 first, then the proposal)
        self._snaps = [(0, self.runner.state.clone(), self.logits.clone())]
        qlog = self.logits
        r = r0
        if r0:
            # re-read the pending bytes as the tokenizer splits them (the drafter saw such splits in
            # training), except the longest tail of that split that some token starts with: the next
            # token must start with that tail (token healing: the drafter re-chooses how the tail and
            # the text after it are tokenized)
            ids = self.d.encode(r0)
            j = len(ids) - 1
            for i in range(len(ids)):
                tail = b"".join(self.tok_bytes[t] for t in ids[i:])
                if len(tail) <= self._tab.shape[1] and bool(self._starts(tail).any()):
                    j = i
                    break
            for t in ids[:j]:
                consumed += self.tok_bytes[t]
                qlog = self.runner(torch.tensor([t], device=self.dev))
                self._snaps.append((len(consumed), self.runner.state.clone(), qlog.clone()))
            r = b"".join(self.tok_bytes[t] for t in ids[j:])
        while len(consumed) < len(r0) + kk:
            # the proposal is the drafter's most likely byte path whatever the temperature: with the
            # point-mass rule a drafted byte x is accepted with probability p(x), so the likeliest
            # bytes are the best proposals, and the output distribution stays exactly the target's
            lg = qlog.float().reshape(-1).masked_fill(self.empty, float("-inf")).to("cpu", torch.float64)
            raw = lg.softmax(-1)
            tok = self._walk(raw, r)
            consumed += self.tok_bytes[tok]
            r = b""  # the token started with r: healed
            qlog = self.runner(torch.tensor([tok], device=self.dev))
            self._snaps.append((len(consumed), self.runner.state.clone(), qlog.clone()))
        self._consumed = bytes(consumed)
        x = self._consumed[len(r0) : len(r0) + kk]
        x_all = torch.tensor(list(x), dtype=torch.long, device=self.dev)
        q_all = torch.nn.functional.one_hot(x_all, 256).float() if kk else torch.zeros(0, 256, device=self.dev)
        return x_all, q_all

    def accept(self, a: int, kk: int, y: int) -> None:
        upto = len(self.pending) + a  # text known good since the restore point: r0 + x[:a]
        text = (self.pending + self._consumed[len(self.pending):])[:upto]
        off, st, lg = self._snaps[0]
        for o, s_, l_ in self._snaps:
            if o <= upto:
                off, st, lg = o, s_, l_
        self.runner.load(st)
        self.logits = lg
        self.pending = text[off:] + bytes([y])
        if len(self.pending) > 64:  # a long run of rejections: read most of it now
            head = self.pending[:-16]
            ids = self.d.encode(head)
            lg2, st2 = forward_chunked(self.model, torch.tensor([ids], device=self.dev), self.runner.state)
            self.runner.load(st2)
            self.logits = lg2
            self.pending = self.pending[-16:]


def _vocab_table(drafter, V: int) -> Tuple[List[bytes], Tensor, Tensor]:
    """(bytes of each token id, their lengths, a (V, longest) host byte table, -1 past a token's end)
    of a subword drafter's vocabulary padded to V ids: built once per drafter, kept on it."""
    cached = getattr(drafter, "_mb_vocab_table", None)
    if cached is not None and len(cached[0]) == V:
        return cached
    n_tok = getattr(getattr(drafter, "tokenizer", None), "vocab_size", V)
    tok_bytes = [drafter.token_bytes(i) if i < n_tok else b"" for i in range(V)]
    lens = torch.tensor([len(b) for b in tok_bytes], dtype=torch.long)
    tab = torch.full((V, max(int(lens.max()), 1)), -1, dtype=torch.long)
    for i, b in enumerate(tok_bytes):
        if b:
            tab[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
    table = (tok_bytes, lens, tab)
    try:
        drafter._mb_vocab_table = table
    except AttributeError:  # a drafter object that takes no new attributes: rebuilt per runner
        pass
    return table


def is_subword_drafter(d) -> bool:
    return hasattr(d, "encode") and hasattr(d, "token_bytes") and hasattr(d, "model")


@torch.no_grad()
def speculative_decode(
    target,
    drafter,
    state: MambaState,
    logits: Tensor,
    draft_state: Optional[MambaState],
    draft_logits: Optional[Tensor],
    max_new_bytes: int,
    params: SamplingParams,
    draft_len: int = 4,
    adaptive: bool = False,
    generator: Optional[torch.Generator] = None,
    stops: Sequence[bytes] = (),
    include_stop: bool = False,
    stream: Optional[Callable[[str], None]] = None,
    use_cuda_graph: bool = True,
    rollback: str = "deferred",
    verify_cuda_graph: bool = False,
):
    """One sequence: (state (1 row), logits (1, V)) of the target and the drafter after the prompt ->
    (bytes, final target state, final target logits (1, V), stop reason, SpeculativeStats).

    ``drafter`` is a byte-level MambaByteLM (with ``draft_state`` / ``draft_logits`` after the prompt), or
    a ready draft runner (:class:`ByteDraftRunner`, :class:`SubwordDraftRunner`)."""
    dev = target.device
    n = int(max_new_bytes)
    k0 = max(0, int(draft_len))
    k_max = min(64, max(1, 4 * k0))
    k = k0
    st = SpeculativeStats(draft_len=k0)
    matcher = StopMatcher(stops)
    utf8 = Utf8Stream() if stream is not None else None
    if isinstance(drafter, (ByteDraftRunner, SubwordDraftRunner)):
        drunner = drafter
    else:
        drunner = ByteDraftRunner(drafter, draft_state, draft_logits, use_cuda_graph)
    if rollback not in ("deferred", "rerun"):
        raise MambaByteError(f"rollback must be 'deferred' or 'rerun', got {rollback!r}")
    max_deferred = k0 + 1 if rollback == "deferred" else 1  # verification calls stay <= 2k + 2 bytes
    verify = ForwardRunner(target, use_cuda_graph=verify_cuda_graph)
    out = bytearray()
    S = state  # the target has consumed prompt + out[:pos_S]
    pos_S = 0
    deferred: List[int] = []  # out[pos_S:]: emitted, not yet in S (the last one is the pending byte)
    P_first = logits  # target logits at S while nothing is deferred
    snaps: collections.deque = collections.deque([(0, S, logits)])  # (pos, state, target logits at state)
    final_len: Optional[int] = None
    reason = "length"
    while len(out) < n:
        t0 = time.perf_counter()
        remaining = n - len(out)
        kk = min(k, remaining - 1)
        # -- draft ----------------------------------------------------------------------------------
        x_all, q_all = drunner.draft(kk, deferred[-1] if deferred else None, params, generator)
        _sync(dev)
        t1 = time.perf_counter()
        # -- verify: one resumed scan over [deferred bytes, drafts] from S ----------------------------------
        nd = len(deferred)
        ids = torch.cat([torch.tensor(deferred, device=dev), x_all]) if nd else x_all
        v_state = None
        if ids.numel():
            vlog, v_state = verify(ids, S)
            vlog = vlog.float()
            plog = vlog[nd - 1 :] if nd else torch.cat([P_first.float(), vlog], 0)
        else:
            plog = P_first.float()
        p = _probs(plog, params)  # (kk + 1, V): p_0 .. p_kk
        a, y = speculative_accept(p, q_all[:, : p.shape[-1]], x_all, generator)
        t2 = time.perf_counter()
        # -- roll back / advance ------------------------------------------------------------------------
        new = x_all[:a].tolist() + [y]
        out.extend(new)
        if a == kk and v_state is not None:
            S, pos_S, deferred = v_state, len(out) - 1, [y]  # everything but y consumed
            snaps.append((pos_S, S, plog[kk : kk + 1]))
        else:
            deferred = deferred + new
            if len(deferred) > max_deferred:
                # resume S over the accepted bytes now (the snapshot S was never modified)
                S = verify(torch.tensor(deferred[:-1], device=dev), S)[1]
                pos_S, deferred = len(out) - 1, [y]
                snaps.append((pos_S, S, plog[a : a + 1]))
        drunner.accept(a, kk, y)
        P_first = None
        t3 = time.perf_counter()
        st.verifications += 1
        st.drafted += kk
        st.accepted += a
        st.emitted += len(new)
        st.draft_s += t1 - t0
        st.verify_s += t2 - t1
        st.rollback_s += t3 - t2
        st.draft_len_history.append(kk)
        st.accepted_history.append(a)
        lookback = matcher.max_len if matcher else 0
        # the final state starts from the latest snapshot at or before the returned length. A stop
        # string found below may start up to lookback - 1 bytes before this verification's new bytes,
        # so the returned length is at least len(out) - len(new) - lookback + 1: older snapshots go
        while len(snaps) >= 2 and snaps[1][0] <= len(out) - len(new) - lookback + 1:
            snaps.popleft()
        if adaptive and kk > 0:
            if a == kk:
                k = min(k_max, k + 1)
            elif a < kk / 2:
                k = max(1, a + 1)
        # -- stops and streaming ---------------------------------------------------------------------------
        old = len(out) - len(new)
        m = matcher.find(bytes(out), old) if matcher else None
        if m is not None:
            final_len = m[1] if include_stop else m[0]
            reason = "stop"
        if utf8 is not None:
            if final_len is not None:
                upto = final_len
            elif len(out) >= n:
                upto = n
            else:
                upto = len(out) - (matcher.holdback(bytes(out)) if matcher else 0)
            text = utf8.feed(bytes(out[utf8.released : max(upto, utf8.released)]))
            if final_len is not None or len(out) >= n:
                text += utf8.finish()
            if text:
                stream(text)
        if final_len is not None:
            break
    keep = final_len if final_len is not None else min(len(out), n)
    result = bytes(out[:keep])
    # bring the target to exactly prompt + result: latest snapshot at or before `keep`, resumed
    pos, S0, L0 = snaps[0]
    for sp in snaps:
        if sp[0] <= keep:
            pos, S0, L0 = sp
    if keep > pos:
        ids = torch.tensor([list(result[pos:keep])], device=dev)
        L, S_fin = forward_chunked(target, ids, S0)
    else:
        S_fin, L = S0, L0
    S_fin = S_fin.clone()
    S_fin.bytes_consumed = state.bytes_consumed + keep
    st.other_s = 0.0
    return result, S_fin, L.float().clone(), reason, st


def speculative_generate(
    model, draft_model, feed, st, lg, max_new_bytes, params: SamplingParams, stops=(), include_stop=False,
    generator=None, stream=None, draft_len=4, adaptive=False, draft_state=None, stats=None, bos=b"\n",
    prompts_given=None, use_cuda_graph: bool = True, rollback: str = "deferred", verify_cuda_graph: bool = False,
    draft_context: bytes = b"",
):
    """``generate(..., draft_model=D)``: prefill the drafter (with ``draft_context`` before each prompt:
    text the target's state holds but the drafter has not read), then decode each sequence speculatively."""
    from .core import GenerationResult

    if params.uses_penalties:
        raise MambaByteError("speculative decoding does not support repetition / presence / frequency penalties")
    if not isinstance(draft_len, int) or draft_len < 0:
        raise MambaByteError(f"draft_len must be an int >= 0, got {draft_len!r}")
    subword = is_subword_drafter(draft_model)
    dmodel = draft_model.model if subword else draft_model
    if not subword and dmodel.config.vocab_size != model.config.vocab_size:
        raise MambaByteError(
            f"the drafter's vocabulary ({dmodel.config.vocab_size}) differs from the target's ({model.config.vocab_size}); "
            "a subword drafter must be a mambabyte.subword.SubwordDrafter"
        )
    if dmodel.device != model.device:
        raise MambaByteError(f"the drafter is on {dmodel.device} but the model is on {model.device}")
    if subword and draft_state is not None:
        raise MambaByteError("draft_state is for byte-level drafters; a subword drafter re-reads the prompt")
    if draft_state is not None and draft_context:
        raise MambaByteError("give the drafter either draft_state or draft_context, not both")
    dev = model.device
    was_training = dmodel.training
    dmodel.eval()
    n_seq = len(feed)
    t0 = time.perf_counter()
    # rows without prompt bytes (continuing from given target logits) give the drafter the bos byte
    dfeed = [draft_context + p if (draft_context or p) else (bos or b"\n") for p in feed]
    runners = []
    if subword:
        with torch.no_grad():
            runners = [SubwordDraftRunner(draft_model, p, use_cuda_graph, bos=bos) for p in dfeed]
    else:
        ds = None
        if draft_state is not None:
            dmodel.check_state(draft_state)
            ds = draft_state.to(dev, dmodel.allocate_state(1).dtype)
            ds = ds if ds.batch_size == n_seq else ds.repeat(n_seq) if ds.batch_size == 1 else None
            if ds is None:
                raise MambaByteError(f"draft_state holds {draft_state.batch_size} streams; need 1 or {n_seq}")
            dfeed = list(feed)  # the given drafter state already holds the context; feed only the prompts
            if any(not p for p in dfeed):
                dfeed = [p if p else (bos or b"\n") for p in dfeed]
        dl, dst = prefill(dmodel, dfeed, ds, None)
    _sync(dev)
    draft_prefill_s = time.perf_counter() - t0
    seqs, states, logits_out, reasons = [], [], [], []
    total = SpeculativeStats(draft_len=draft_len)
    t1 = time.perf_counter()
    try:
        for i in range(n_seq):
            cb = None if stream is None else (lambda text, i=i: stream(i, text))
            if subword:
                drafter_i, ds_i, dl_i = runners[i], None, None
            else:
                drafter_i, ds_i, dl_i = dmodel, dst.select(i), dl[i : i + 1]
            b, s, l, r, sst = speculative_decode(
                model, drafter_i, st.select(i), lg[i : i + 1], ds_i, dl_i, max_new_bytes, params,
                draft_len=draft_len, adaptive=adaptive, generator=generator, stops=stops, include_stop=include_stop,
                stream=cb, use_cuda_graph=use_cuda_graph, rollback=rollback, verify_cuda_graph=verify_cuda_graph,
            )
            seqs.append(b)
            states.append(s)
            logits_out.append(l)
            reasons.append(r)
            total.merge(sst)
    finally:
        if was_training:
            dmodel.train()
    _sync(dev)
    t2 = time.perf_counter()
    state = MambaState.cat(states) if len(states) > 1 else states[0]
    base = st.bytes_consumed - max(len(p) for p in feed)
    state.bytes_consumed = base + max(len(p) + len(s) for p, s in zip(feed, seqs))
    stats.decode_s = t2 - t1
    stats.prefill_s += draft_prefill_s
    stats.steps = max(len(s) for s in seqs)
    stats.new_bytes = sum(len(s) for s in seqs)
    stats.speculative = dict(total.to_dict(), adaptive=adaptive, draft_prefill_s=draft_prefill_s, rollback=rollback,
                               verify_cuda_graph=verify_cuda_graph, drafter="subword" if subword else "byte")
    return GenerationResult(seqs, state, torch.cat(logits_out, 0), stats, reasons, list(prompts_given or feed))


__all__ = ["speculative_accept", "speculative_decode", "speculative_generate", "SpeculativeStats",
           "ByteDraftRunner", "SubwordDraftRunner", "is_subword_drafter"]

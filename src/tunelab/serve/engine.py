"""The serving engines: continuous batching for generation, micro-batching for encoders.

`GenerationEngine` runs one decode loop in its own thread. Every sequence owns a row of a left-padded
batch KV cache: the requests that arrived since the last step are prefilled together (left-padded to the
longest of them), then their cache rows join the running batch between two decode steps; a finished or
cancelled sequence leaves its row at once and the all-padding columns it leaves behind are trimmed.
Each decode step feeds every running sequence its last token, at its own position, under one attention
mask. Prefill per iteration is bounded by a token budget so that a burst of new prompts cannot stall the
sequences already decoding. `batching="static"` is the classic alternative, kept to measure against: a batch is
formed from the waiting requests only when nothing runs, and none joins it until all of its sequences are done.

A model in bf16 decodes batch-invariantly (`serve.batch_invariant`): each row attends over its own tokens only and
a lone row's matrix products run as a batch's do, so on the CPU (oneDNN's kernels, measured) a greedy answer is
the same whichever requests share its batch. Logits are read in fp32 (`.float()`) for sampling and
log-probabilities whatever the model's dtype.

Results go to each sequence's `sink` (called on the engine thread) as events: `TextEvent`s, then one `DoneEvent`
(finish reason and token counts) or one `ErrorEvent`. Text is detokenised
incrementally (never a half UTF-8 character) and held back while it could be the start of a stop string.
Per token, each sequence costs the same whatever its parameters (stop strings are matched incrementally,
sampling is shifted so no temperature overflows), and a failure inside one sequence's step — sampling,
detokenising, a stop check — ends that sequence alone with an error event; only a failed batch forward
fails the whole batch.

`MicroBatcher` collects encoder requests (lists of texts) for up to `max_wait_ms` or `max_batch` texts,
runs the model function once over all of them and hands each request its share.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.generate import StopTrimmer

log = logging.getLogger("tunelab.serve")

MAX_PENDING_TOKENS = 8  # tokens detokenising may wait for the rest of a UTF-8 character


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability under the model (before penalties, temperature, top-k/top-p), and the `top`
    alternatives as (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TextEvent:
    """The next piece of a sequence's text (whole characters; never part of a stop string), with the
    `logprobs` of the generated tokens not reported before (when the sequence asked for them). A piece may be
    empty when it carries only log-probabilities (tokens whose text is held back, or was cut by a stop string)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """The sequence finished: `finish_reason` "stop" or "length", and its token counts for usage."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The sequence failed and is over. `shutdown`: the engine stopped with it unfinished (not a fault)."""

    message: str
    shutdown: bool = False


Event = TextEvent | DoneEvent | ErrorEvent


class EngineFull(Exception):
    """More sequences than the engine admits (running + waiting); the caller answers 503."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each generated token's log-probability and k alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (`Sequence.prompt_logprobs`)


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    # with params.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it); set by the
    # engine before the sequence's first event
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # engine-side state
    _gen: torch.Generator | None = None
    _trim: StopTrimmer | None = None
    _prefix: int = 0
    _read: int = 0
    _counts: dict[int, int] = field(default_factory=dict)
    _logprobs: list[TokenLogprob] = field(default_factory=list)  # generated, not yet sent

    @property
    def greedy(self) -> bool:
        """True at temperature 0: the most likely token (after penalties) is taken; nothing is sampled."""
        return self.params.temperature == 0

    @property
    def n_ctx(self) -> int:
        """Tokens this sequence has in the KV cache (its prompt, and every generated token but the last)."""
        return len(self.prompt) + len(self.tokens) - 1


class ThreadStarter:
    """Starts threads from a thread of its own, so that they take its CPU priority rather than their caller's:
    a Linux thread inherits its creator's nice value and cannot lower it again without privileges, and an engine
    built by a low-priority loader (`serve.follow`) must serve at the server's priority. Create it on a thread
    at that priority."""

    def __init__(self):
        self._jobs: deque[tuple[threading.Thread, threading.Event]] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="thread-starter", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                thread, started = self._jobs.popleft()
            thread.start()
            started.set()

    def start(self, thread: threading.Thread) -> None:
        started = threading.Event()
        with self._cond:
            self._jobs.append((thread, started))
            self._cond.notify()
        started.wait()


STARTER: ThreadStarter | None = None  # set by the server when models may be built on a low-priority thread


class _Worker:
    """A daemon thread running `_loop`, woken through `_cond`; `close` stops it. The thread is started through
    `STARTER` when there is one."""

    def _start(self, name: str) -> None:
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        if STARTER is not None:
            STARTER.start(self._thread)
        else:
            self._thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)


BATCHING = ("continuous", "static")


class GenerationEngine(_Worker):
    """Continuous batching over one causal LM (optionally a PEFT model with several LoRA adapters, picked
    per sequence), or static batching (`batching="static"`). `submit` and `cancel` are thread-safe; everything
    else runs on the engine thread."""

    prompt_logprobs = True  # it can score prompt tokens (`SamplingParams.prompt_logprobs`)

    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch: int = 16, max_waiting: int = 64,
                 prefill_budget: int = 1024, name: str = "model", metrics=None, multi_adapter: bool = False,
                 batching: str = "continuous"):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, not {batching!r}")
        self.model, self.tokenizer, self.name, self.batching = model, tokenizer, name, batching
        self.stop_ids = set(stop_ids)
        self.max_batch, self.max_waiting, self.prefill_budget = max_batch, max_waiting, prefill_budget
        self.metrics = metrics
        # per-token counters resolved once (a labels() lookup takes a lock; this runs for every token)
        self._generated = metrics.generated_tokens.labels(name) if metrics else None
        self._prompted = metrics.prompt_tokens.labels(name) if metrics else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.dtype == torch.bfloat16:
            from tunelab.serve.batch_invariant import make_batch_invariant  # imports transformers: with the model

            if not make_batch_invariant(model):
                log.warning("%s decodes in bf16 with its own attention: a greedy answer may change with the "
                            "requests batched with it", name)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # token ids a prompt may hold
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling = 0  # taken from the queue, not yet in the batch (still counts against capacity)
        self._cache = None  # transformers DynamicCache, rows = self._running
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token
        self._multi_adapter = multi_adapter  # a PEFT model with several LoRA adapters: pick one per row
        self._start(f"engine-{name}")

    # ---- thread-safe API --------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); raises `EngineFull` when they do not fit."""
        with self._cond:
            if self._stopped:
                raise EngineFull("the server is shutting down")
            held = len(self._waiting) + len(self._running) + self._prefilling
            if held + len(seqs) > self.max_batch + self.max_waiting:
                raise EngineFull(f"{self.name} is at capacity")
            for s in seqs:
                seed = s.params.seed if s.params.seed is not None else int.from_bytes(os.urandom(8), "little")
                if not s.greedy:
                    s._gen = torch.Generator(device=self.device).manual_seed(seed)
                self._waiting.append(s)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Mark `seqs` cancelled (thread-safe; cancelling twice, or a finished sequence, is harmless). Once the
        engine thread sees the flag their sinks get no more events, not even a `DoneEvent`: at its next iteration
        it drops them from the queue or frees their batch rows, and marks them finished."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._cond.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._cond:
            return len(self._running) + self._prefilling, len(self._waiting)

    # ---- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopped:
                    for s in list(self._waiting) + self._running:
                        self._finish(s, error=ErrorEvent("the server shut down before this request finished",
                                                         shutdown=True))
                    return
                new = self._take_waiting()
                self._prefilling = len(new)
            try:
                with torch.inference_mode():
                    self._drop([s for s in self._running if s.cancelled])
                    self._prefill(new)
                    if self._running:
                        self._decode_step()
            except Exception:  # the batch forward failed (an engine bug, a device error): fail these, keep serving
                log.exception("generation engine %s failed; failing the running requests", self.name)
                for s in new + self._running:
                    if not s.finished:
                        self._finish(s, error=ErrorEvent("the generation engine failed on this request"))
                self._running, self._cache, self._mask = [], None, None
            with self._cond:
                self._prefilling = 0
            self._report()

    def _take_waiting(self) -> list[Sequence]:
        """The waiting sequences that start now: continuous, as many as fit the batch and the prefill budget;
        static, a whole batch, and only when nothing runs."""
        static = self.batching == "static"
        if static and self._running:
            for s in [s for s in self._waiting if s.cancelled]:  # a cancelled request frees its place at once
                self._waiting.remove(s)
                s.finished = True
            return []
        new, budget = [], self.prefill_budget
        while self._waiting and len(self._running) + len(new) < self.max_batch:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                s.finished = True
                continue
            if new and len(s.prompt) > budget and not static:  # one over the whole budget still goes in alone
                break
            budget -= len(s.prompt)
            new.append(self._waiting.popleft())
        return new

    def _forward(self, ids, mask, positions, cache, adapters, keep_last: bool):
        from transformers import DynamicCache  # transformers loads with the model, not with this module

        cache = cache if cache is not None else DynamicCache(config=self._config())
        # keep_last (prefill): logits of the last position only, not [rows, prompt length, vocabulary]
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True, logits_to_keep=1 if keep_last else 0)
        if self._multi_adapter:
            kwargs["adapter_names"] = adapters
        out = self.model(**kwargs)
        return out.logits, out.past_key_values

    def _config(self):
        m = self.model
        return m.get_base_model().config if hasattr(m, "get_base_model") else m.config

    def _prefill(self, new: list[Sequence]) -> None:
        """Left-padded forwards over the new prompts: for those that need only the last position's logits, as few
        as keep their tokens within the prefill budget (one, under continuous batching: it took no more), and,
        for those that score their prompt tokens (logits at every position), as few as keep
        rows × longest prompt within the prefill budget; a prompt to score that is longer than the budget goes
        through in chunks (`_prefill_long`). Each picks its first token, then the rows that go on join the batch
        cache. A prompt asking for nothing (echo, max_tokens 0, no scores) is answered without a forward."""
        for s in new:
            if s.cancelled:
                s.finished = True
            elif s.params.max_tokens == 0 and s.params.prompt_logprobs is None:
                self._finish(s, "length")
        new = [s for s in new if not s.finished]
        plain: list[Sequence] = []
        for s in (s for s in new if s.params.prompt_logprobs is None):  # one forward per prefill budget
            if plain and sum(len(p.prompt) for p in plain) + len(s.prompt) > self.prefill_budget:
                self._prefill_group(plain, every_position=False)
                plain = []
            plain.append(s)
        if plain:
            self._prefill_group(plain, every_position=False)
        group: list[Sequence] = []
        for s in sorted((s for s in new if s.params.prompt_logprobs is not None), key=lambda s: len(s.prompt)):
            if len(s.prompt) > self.prefill_budget:
                self._step(s, lambda s=s: self._prefill_long(s))
                continue
            if group and (len(group) + 1) * len(s.prompt) > self.prefill_budget:
                self._prefill_group(group, every_position=True)
                group = []
            group.append(s)
        if group:
            self._prefill_group(group, every_position=True)

    def _prefill_group(self, new: list[Sequence], every_position: bool) -> None:
        width = max(len(s.prompt) for s in new)
        ids = torch.zeros(len(new), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(new):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
        # "__base__": peft's name for "no adapter" in a mixed-adapter batch
        out, cache = self._forward(ids, mask, positions, None, [s.adapter or "__base__" for s in new],
                                   keep_last=not every_position)
        if self._prompted is not None:
            self._prompted.inc(int(mask.sum()))
        scores = None
        if every_position:
            def scores(i: int) -> list[TokenLogprob | None]:
                p = new[i].prompt
                return [None] + _scored(out[i, width - len(p):-1], p[1:], new[i].params.prompt_logprobs)
        self._begin(new, out[:, -1, :].float(), cache, mask, scores)

    def _prefill_long(self, s: Sequence) -> bool:
        """Score a prompt longer than the prefill budget: forwarded a budget of tokens at a time through its own
        cache, so that only one chunk's logits exist at once; then it starts as `_begin` starts any. -> True when
        it is finished (max_tokens 0)."""
        n, size, cache, scored = len(s.prompt), self.prefill_budget, None, [None]
        for start in range(0, n, size):
            end = min(start + size, n)
            ids = torch.tensor([s.prompt[start:end]], device=self.device)
            mask = torch.ones(1, end, dtype=torch.long, device=self.device)
            positions = torch.arange(start, end, device=self.device)[None]
            out, cache = self._forward(ids, mask, positions, cache, [s.adapter or "__base__"], keep_last=False)
            targets = s.prompt[start + 1:end + 1]  # each position scores the next token (the last, none)
            scored += _scored(out[0, :len(targets)], targets, s.params.prompt_logprobs)
        if self._prompted is not None:
            self._prompted.inc(n)
        self._begin([s], out[:, -1, :].float(), cache, mask, lambda i: scored)
        return s.finished

    def _begin(self, new: list[Sequence], logits: torch.Tensor, cache, mask: torch.Tensor,
               scores: Callable[[int], list[TokenLogprob | None]] | None) -> None:
        """Prefilled sequences (`logits`: each row's last position) take their prompt scores when asked, pick
        their first token, and those that go on join the batch cache."""

        def first(i: int, s: Sequence) -> bool:
            if scores is not None:
                s.prompt_logprobs = scores(i)
            if s.params.max_tokens == 0:  # scoring the prompt (echo) is all it asked for
                self._finish(s, "length")
                return True
            return self._emit(s, self._choose(s, logits[i]), logits[i])

        goes_on = [i for i, s in enumerate(new) if not self._step(s, lambda i=i, s=s: first(i, s))]
        if not goes_on:
            return
        if len(goes_on) < len(new):
            cache.batch_select_indices(torch.tensor(goes_on, device=self.device))
            mask = mask[goes_on]
        self._join([new[i] for i in goes_on], cache, mask)

    def _join(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        """Append rows of a cache to the batch cache, left-padding whichever is shorter."""
        if self._cache is None:
            self._cache, self._mask, self._running = cache, mask, list(seqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for big, small in zip(self._cache.layers, cache.layers):
            big.keys = torch.cat([_pad_left(big.keys, width), _pad_left(small.keys, width)], dim=0)
            big.values = torch.cat([_pad_left(big.values, width), _pad_left(small.values, width)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
        self._running.extend(seqs)

    def _drop(self, gone: list[Sequence]) -> None:
        """Remove finished/cancelled rows and the leading columns that are padding in every remaining row."""
        for s in gone:
            if not s.finished:
                s.finished = True
        if not gone:
            return
        keep = [i for i, s in enumerate(self._running) if s not in gone]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # the first column holding a real token in some remaining row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]

    def _decode_step(self) -> None:
        run = self._running
        ids = torch.tensor([[s.tokens[-1]] for s in run], device=self.device)
        positions = torch.tensor([[s.n_ctx] for s in run], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(run), 1)], dim=1)
        out, self._cache = self._forward(ids, mask, positions, self._cache,
                                         [s.adapter or "__base__" for s in run], keep_last=False)
        logits = out[:, -1, :].float()
        self._mask = mask
        fast = [s.greedy and not _penalised(s) for s in run]  # plain greedy rows: one argmax for all
        greedy = logits.argmax(-1).tolist() if any(fast) else None
        done = []
        for i, s in enumerate(run):
            token = (lambda i=i: greedy[i]) if fast[i] else (lambda s=s, i=i: self._choose(s, logits[i]))
            if s.cancelled or self._step(s, lambda s=s, i=i, token=token: self._emit(s, token(), logits[i])):
                done.append(s)
        self._drop(done)

    def _step(self, s: Sequence, step: Callable[[], bool]) -> bool:
        """Run one sequence's share of a step (pick and emit a token) -> True when it is finished. Whatever fails
        here (sampling, log-probabilities, detokenising, a stop check) ends this sequence alone, with an error
        event; the batch goes on."""
        try:
            return step()
        except Exception:
            log.exception("generation failed on one sequence of %s; ending it alone", self.name)
            if not s.finished:
                self._finish(s, error=ErrorEvent("generation failed on this request"))
            return True

    def _choose(self, s: Sequence, logits: torch.Tensor) -> int:
        p = s.params
        if _penalised(s) and s._counts:
            ids = torch.tensor(list(s._counts), device=logits.device)
            counts = torch.tensor(list(s._counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if s.greedy:
            return int(logits.argmax())
        # shifted so that the best logit is 0: dividing by any temperature > 0, however small, then gives
        # 0 for the best token and finite or -inf for the others, never inf - inf (NaN probabilities)
        logits = (logits - logits.max()) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            order = torch.argsort(logits, descending=True)
            probs = torch.softmax(logits[order], -1)
            outside = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            logits = logits.clone()
            logits[order[outside]] = float("-inf")
        probs = torch.softmax(logits, -1)
        if not bool(torch.isfinite(probs).all()):  # NaN logits from the model itself: an error for this sequence
            raise FloatingPointError("the model produced non-finite logits")
        return int(torch.multinomial(probs, 1, generator=s._gen))

    def _emit(self, s: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Record a generated token (picked from `logits`, the model's for this position) and send its text;
        True when the sequence is finished."""
        if self._generated is not None:
            self._generated.inc()
        if s._trim is None:  # built here, on the engine thread: a failure is this sequence's alone
            s._trim = StopTrimmer(s.params.stop)
        s.tokens.append(token)
        s._counts[token] = s._counts.get(token, 0) + 1
        if s.params.logprobs is not None:  # the end-of-turn token too: it was generated (lm-eval scores with it)
            s._logprobs += _scored(logits[None], [token], s.params.logprobs)
        if token in self.stop_ids:
            s.tokens.pop()  # the end-of-turn token is not part of the answer's text
            piece = s._trim.flush()
            self._send(s, piece)
            self._finish(s, "stop", counted=len(s.tokens) + 1)  # it was generated: usage counts it
            return True
        piece = s._trim.push(self._detok(s))
        self._send(s, piece)
        if s._trim.done:
            self._finish(s, "stop")
            return True
        if len(s.tokens) >= s.params.max_tokens:
            self._send(s, s._trim.flush())
            self._finish(s, "length")
            return True
        return False

    def _detok(self, s: Sequence) -> str:
        """New text since the last call; waits while the tail is an incomplete UTF-8 character, for at most
        `MAX_PENDING_TOKENS` tokens (then releases what it has), so decoding costs the same for every token."""
        dec = self.tokenizer.decode
        before = dec(s.tokens[s._prefix:s._read], skip_special_tokens=False)
        now = dec(s.tokens[s._prefix:], skip_special_tokens=False)
        stuck = len(s.tokens) - s._read >= MAX_PENDING_TOKENS
        if (len(now) > len(before) and not now.endswith("\ufffd")) or stuck:
            s._prefix, s._read = s._read, len(s.tokens)
            return now[len(before):] if len(now) > len(before) else ""
        return ""

    @staticmethod
    def _send(s: Sequence, piece: str) -> None:
        """Send a piece of text with the log-probabilities not sent yet (nothing when there is neither)."""
        if (piece or s._logprobs) and not s.cancelled:
            s.sink(TextEvent(piece, tuple(s._logprobs)))
        s._logprobs.clear()

    def _finish(self, s: Sequence, reason: str | None = None, error: ErrorEvent | None = None,
                counted: int | None = None) -> None:
        s.finished = True
        if s.cancelled:
            return
        if error:
            s.sink(error)
        else:
            s.sink(DoneEvent(reason, len(s.prompt), counted if counted is not None else len(s.tokens)))

    def _report(self) -> None:
        if self.metrics:
            self.metrics.running.labels(self.name).set(len(self._running))
            self.metrics.queue_depth.labels(self.name).set(len(self._waiting))


def _scored(logits: torch.Tensor, targets: list[int], k: int, chunk: int = 256) -> list[TokenLogprob]:
    """Each target token's log-probability under the logits row before it ([len(targets), vocabulary]), with the
    `k` most likely tokens there; normalised `chunk` rows at a time (no second copy of the logits)."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), chunk):
        logprobs = torch.log_softmax(logits[start:start + chunk].float(), -1)
        part = targets[start:start + chunk]
        chosen = logprobs.gather(1, torch.tensor(part, device=logprobs.device)[:, None])[:, 0].tolist()
        if not k:
            out += [TokenLogprob(t, lp) for t, lp in zip(part, chosen)]
            continue
        top = torch.topk(logprobs, k, dim=-1)
        out += [TokenLogprob(t, lp, tuple(zip(ti, tv)))
                for t, lp, ti, tv in zip(part, chosen, top.indices.tolist(), top.values.tolist())]
    return out


def _penalised(s: Sequence) -> bool:
    return bool(s.params.presence_penalty or s.params.frequency_penalty)


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class MicroBatcher(_Worker):
    """Run `fn(texts) -> list[result]` over requests gathered for up to `max_wait_ms` or `max_batch` texts.
    `submit(texts)` returns a Future of that request's results, in order."""

    def __init__(self, fn: Callable[[list[str]], list], max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_waiting: int = 256, name: str = "encoder", metrics=None):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.max_waiting, self.name, self.metrics = max_waiting, name, metrics
        self._queue: deque[tuple[list[str], Future]] = deque()
        self._in_batch = 0  # requests taken from the queue whose batch is running
        self._start(f"batcher-{name}")

    def submit(self, texts: list[str]) -> Future:
        """Queue one request's texts (thread-safe). -> a Future of their results, in order, or of the exception
        `fn` raised for the batch. `EngineFull` when `max_waiting` requests are queued or the batcher is closed."""
        fut: Future = Future()
        with self._cond:
            if self._stopped:
                raise EngineFull("the server is shutting down")
            if len(self._queue) >= self.max_waiting:
                raise EngineFull(f"{self.name} is at capacity")
            self._queue.append((texts, fut))
            self._cond.notify()
        return fut

    def pending(self) -> int:
        """Requests queued or in the running batch."""
        with self._cond:
            return len(self._queue) + self._in_batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._queue:
                    self._cond.wait()
                if self._stopped and not self._queue:  # closing runs what is queued: every Future gets an answer
                    return
                deadline = time.monotonic() + self.max_wait
                while not self._stopped and sum(len(t) for t, _ in self._queue) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, n = [], 0
                # at least one request, even one with more than max_batch texts
                while self._queue and (not batch or n + len(self._queue[0][0]) <= self.max_batch):
                    texts, fut = self._queue.popleft()
                    batch.append((texts, fut))
                    n += len(texts)
                self._in_batch = len(batch)
            if self.metrics:
                self.metrics.running.labels(self.name).set(n)
                self.metrics.queue_depth.labels(self.name).set(len(self._queue))
            try:
                with torch.inference_mode():
                    results = self.fn([t for texts, _ in batch for t in texts])
            except Exception as err:  # an engine bug: fail this batch, keep serving
                log.exception("encoder %s failed", self.name)
                for _, fut in batch:
                    fut.set_exception(err)
                with self._cond:
                    self._in_batch = 0
                continue
            start = 0
            for texts, fut in batch:
                fut.set_result(results[start:start + len(texts)])
                start += len(texts)
            with self._cond:
                self._in_batch = 0
            if self.metrics:
                self.metrics.running.labels(self.name).set(0)

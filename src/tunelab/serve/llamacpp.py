"""Generation through llama.cpp (the `xllamacpp` wheel) for GGUF exports, behind the interface of
`GenerationEngine`: `submit` / `cancel` of `Sequence`s whose sinks get `TextEvent`s, then one `DoneEvent` or
`ErrorEvent`, so the routes, limits, metrics and error envelopes are the PyTorch engine's.

llama.cpp owns the batching: `slots` parallel slots (each a share of the KV cache: `context` tokens), continuous
batching across them, its own queue when every slot is busy. Each sequence is one streamed completion whose
prompt is the token ids tunelab rendered and tokenised with the model's own tokenizer (chat template included),
so llama.cpp's template engine and tokenizer never touch a prompt. The call blocks a worker thread (llama.cpp
releases the GIL) and streams one chunk per token through a callback; a cancelled sequence's callback tells
llama.cpp to stop at its next token, freeing the slot. llama.cpp holds back text that could begin a stop string
and never splits a UTF-8 character; EOS / end-of-turn tokens come from the file's metadata (`tunelab export`
writes the model's stop tokens there).

Log-probabilities of generated tokens come from llama.cpp (`n_probs`: the model's distribution before sampling),
one entry per streamed piece: a token whose bytes llama.cpp held back (part of a UTF-8 character) has no entry of
its own. Prompt tokens are not scored (`prompt_logprobs` is False: the routes refuse echo with logprobs).

The wheel also opens llama.cpp's own HTTP server on a loopback port; it gets a random API key that nothing
knows, so it answers nobody.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.serve.engine import DoneEvent, EngineFull, ErrorEvent, Sequence, TextEvent, TokenLogprob

log = logging.getLogger("tunelab.serve")


def gguf_context(path: Path) -> int:
    """The context length a GGUF file declares (`<arch>.context_length`), 0 when it says none."""
    import gguf  # reads the header only (memory-mapped)

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return 0
    name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{name}.context_length")
    return int(field.parts[field.data[0]][0]) if field is not None else 0


class LlamaCppEngine:
    """`slots` sequences decoded together by llama.cpp, up to `max_waiting` more queued; thread-safe `submit`,
    `cancel`, `load`, `close` as `GenerationEngine`'s."""

    prompt_logprobs = False  # llama.cpp does not score prompt tokens

    def __init__(self, path: Path, slots: int, context: int, max_waiting: int = 64, name: str = "model",
                 metrics=None, threads: int | None = None):
        import xllamacpp  # llama.cpp: only for a GGUF export

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = slots
        params.n_ctx = context * slots  # each slot gets n_ctx / n_parallel
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or torch.get_num_threads()
        # threads sleep between jobs instead of spinning: the HTTP side shares these cores, and spinning threads
        # that lose their core stall every token (measured: same speed when idle, 1.7x faster under load)
        params.cpuparams.poll = params.cpuparams_batch.poll = 0
        params.warmup = False
        params.verbosity = 0  # quiet: errors come back in the answers
        params.api_keys = [secrets.token_urlsafe(32)]  # its own HTTP server: a key nobody holds
        try:
            self.server = xllamacpp.Server(params)
        except RuntimeError as err:
            raise UserError(f"llama.cpp cannot load {path}: {err}") from None
        self.name, self.slots, self.max_waiting, self.metrics = name, slots, max_waiting, metrics
        self.context = context  # penalties look back over the whole sequence, as OpenAI's do
        self._generated = metrics.generated_tokens.labels(name) if metrics else None
        self._prompted = metrics.prompt_tokens.labels(name) if metrics else None
        self._lock = threading.Lock()
        self._held: set[int] = set()  # ids of the sequences submitted and not finished
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=slots + max_waiting, thread_name_prefix=f"llama-{name}")

    # ---- thread-safe API --------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); raises `EngineFull` when they do not fit."""
        with self._lock:
            if self._stopped:
                raise EngineFull("the server is shutting down")
            if len(self._held) + len(seqs) > self.slots + self.max_waiting:
                raise EngineFull(f"{self.name} is at capacity")
            self._held.update(id(s) for s in seqs)
            self._report()
        for s in seqs:
            self._pool.submit(self._run, s)

    def cancel(self, seqs: list[Sequence]) -> None:
        """Mark `seqs` cancelled: llama.cpp stops each at its next token; their sinks get nothing more."""
        for s in seqs:
            s.cancelled = True

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._lock:
            return min(len(self._held), self.slots), max(0, len(self._held) - self.slots)

    def close(self, timeout: float = 5.0) -> None:
        """Stop: the sequences still held end with a shutdown error; llama.cpp is released once its calls return."""
        with self._lock:
            self._stopped = True
        self._pool.shutdown(wait=False, cancel_futures=False)

    # ---- worker threads ---------------------------------------------------------------------------
    def _request(self, s: Sequence) -> dict:
        p = s.params
        req = {"prompt": s.prompt, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
               "top_k": p.top_k, "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
               "repeat_last_n": self.context, "repeat_penalty": 1.0, "stop": p.stop, "stream": True,
               "cache_prompt": True, "min_p": 0.0}  # llama.cpp's default min-p (0.05) cuts a tail OpenAI's keeps
        if p.seed is not None:
            req["seed"] = p.seed % 2**32  # llama.cpp seeds are 32-bit
        if p.logprobs is not None:
            req["n_probs"] = max(p.logprobs, 1)  # 0 turns them off in llama.cpp; the alternatives are dropped
        return req

    def _run(self, s: Sequence) -> None:
        """One sequence, start to end, on a worker thread."""
        state: dict = {"finish": None, "usage": None, "error": None, "streamed": 0}

        def on_chunk(chunk: dict) -> bool:
            try:  # an exception in here would be swallowed by llama.cpp and end the stream silently
                if self._stopped or s.cancelled:
                    return True
                if "error" in chunk:
                    state["error"] = str((chunk["error"] or {}).get("message") or chunk["error"])[:300]
                    return True
                for choice in chunk.get("choices") or []:
                    logprobs = _logprobs(choice, s.params.logprobs)
                    if choice.get("text") or logprobs:
                        state["streamed"] += 1  # about a token each (a held-back stop candidate comes later)
                        if self._generated:
                            self._generated.inc()
                        s.sink(TextEvent(choice.get("text") or "", logprobs))
                    if choice.get("finish_reason"):
                        state["finish"] = choice["finish_reason"]
                if chunk.get("usage"):
                    state["usage"] = chunk["usage"], chunk.get("timings") or {}
                return False
            except Exception as err:  # a sink that fails: this sequence ends with an error, others go on
                log.exception("streaming a llama.cpp answer failed")
                state["error"] = f"generation failed on this request ({type(err).__name__})"
                return True

        try:
            if s.params.max_tokens == 0:  # echo alone: nothing to generate
                state.update(finish="length", usage=({"completion_tokens": 0}, {"prompt_n": 0}))
            elif not (self._stopped or s.cancelled):
                self.server.handle_completions(self._request(s), on_chunk)
        except Exception:
            log.exception("llama.cpp failed on a request")
            state["error"] = "the generation engine failed on this request"
        finally:
            self._finish(s, state)

    def _finish(self, s: Sequence, state: dict) -> None:
        with self._lock:
            self._held.discard(id(s))
            self._report()
        s.finished = True
        if s.cancelled:
            return
        if self._stopped and state["finish"] is None:
            s.sink(ErrorEvent("the server shut down before this request finished", shutdown=True))
        elif state["error"] or state["finish"] is None or state["usage"] is None:
            s.sink(ErrorEvent(state["error"] or "llama.cpp ended this request without an answer"))
        else:
            usage, timings = state["usage"]
            completion = int(usage.get("completion_tokens", 0))
            if self.metrics:  # the tokens streamed were counted as they came; the rest now
                self._generated.inc(max(0, completion - state["streamed"]))
                self._prompted.inc(int(timings.get("prompt_n", usage.get("prompt_tokens", 0))))
            s.sink(DoneEvent(state["finish"], len(s.prompt), completion))

    def _report(self) -> None:
        if self.metrics:
            self.metrics.running.labels(self.name).set(min(len(self._held), self.slots))
            self.metrics.queue_depth.labels(self.name).set(max(0, len(self._held) - self.slots))


def _logprobs(choice: dict, k: int | None) -> tuple[TokenLogprob, ...]:
    """The token log-probabilities of one llama.cpp stream choice (`logprobs.content`), with at most `k`
    alternatives each; () when none were asked for or sent."""
    if k is None:
        return ()
    content = (choice.get("logprobs") or {}).get("content") or []
    return tuple(TokenLogprob(int(e["id"]), float(e["logprob"]),
                              tuple((int(t["id"]), float(t["logprob"])) for t in (e.get("top_logprobs") or [])[:k]))
                 for e in content)

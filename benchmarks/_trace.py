"""A seeded, realistic mixed generation trace: staggered arrivals, long-tailed prompt and output lengths.

The trace (`mixed_trace(n, rate, seed)`), all draws from one `numpy.random.default_rng(seed)`:
- arrivals: a Poisson process of `rate` requests per second — independent exponential gaps of mean 1/rate, the
  first request at its first gap;
- prompt lengths: log-uniform on [16, 512] tokens (exp of a uniform on [ln 16, ln 512], rounded): median ~91,
  mean ~143, a long tail of long prompts;
- output lengths: log-uniform on [8, 256] tokens, independent of the prompt: median ~45, mean ~72; the request
  generates exactly that many (no stop token ends it early).
`run_trace` drives a `GenerationEngine` in this process with it (greedy) and measures each request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

PROMPT_TOKENS = (16, 512)
OUTPUT_TOKENS = (8, 256)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the start of the trace
    prompt_tokens: int
    output_tokens: int


def _log_uniform(rng: np.random.Generator, bounds: tuple[int, int], n: int) -> list[int]:
    low, high = bounds
    return np.rint(np.exp(rng.uniform(np.log(low), np.log(high), n))).astype(int).clip(low, high).tolist()


def mixed_trace(n: int, rate: float, seed: int = 0, prompt: tuple[int, int] = PROMPT_TOKENS,
                output: tuple[int, int] = OUTPUT_TOKENS) -> list[TraceRequest]:
    """`n` requests arriving at `rate` per second on average (see the module docstring for the distributions)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)).tolist()
    return [TraceRequest(round(a, 4), p, o)
            for a, p, o in zip(arrivals, _log_uniform(rng, prompt, n), _log_uniform(rng, output, n))]


def trace_prompts(trace: list[TraceRequest], stream: list[int], seed: int = 0) -> list[list[int]]:
    """Each request's prompt: a window of its length cut from `stream` (token ids of real text, longer than the
    longest prompt) at a seeded offset."""
    rng = np.random.default_rng(seed + 1)
    return [stream[o:o + r.prompt_tokens] for r, o in
            zip(trace, (int(rng.integers(0, len(stream) - r.prompt_tokens)) for r in trace))]


def run_trace(engine, trace: list[TraceRequest], prompts: list[list[int]]) -> dict:
    """Submit each request to `engine` (a `GenerationEngine`, greedy) at its arrival time and wait for all of
    them. -> {"requests", "generated_tokens", "wall_s" (first arrival to last answer), "output_tokens_per_s",
    "ttft_s" and "e2e_s" ({"p50", "p99", "max"}: first text, and answer, after arrival), "_tokens" (each
    request's)}."""
    from tunelab.serve.engine import DoneEvent, SamplingParams, Sequence, TextEvent

    seqs, first, done = [], [None] * len(trace), [None] * len(trace)
    finished = threading.Semaphore(0)

    def sink(i: int):
        def on(event) -> None:
            now = time.perf_counter()
            if isinstance(event, TextEvent) and first[i] is None:
                first[i] = now
            elif not isinstance(event, TextEvent):
                done[i] = (now, event)
                finished.release()
        return on

    start = time.perf_counter()
    for i, (r, p) in enumerate(zip(trace, prompts)):
        time.sleep(max(0.0, start + r.arrival_s - time.perf_counter()))
        seqs.append(Sequence(p, SamplingParams(max_tokens=r.output_tokens, temperature=0), sink(i)))
        engine.submit([seqs[-1]])
    for _ in trace:
        finished.acquire()
    failed = [i for i, (_, ev) in enumerate(done) if not isinstance(ev, DoneEvent)]
    if failed:
        raise RuntimeError(f"{len(failed)} trace requests failed: {done[failed[0]][1]}")
    arrive = [start + r.arrival_s for r in trace]
    generated = sum(len(s.tokens) for s in seqs)
    wall = max(t for t, _ in done) - arrive[0]
    return {"requests": len(trace), "generated_tokens": generated, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(generated / wall, 1),
            "ttft_s": summary([(f or d[0]) - a for f, d, a in zip(first, done, arrive)]),
            "e2e_s": summary([d[0] - a for d, a in zip(done, arrive)]), "_tokens": [s.tokens for s in seqs]}


def pct(values: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict:
    return {"p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3), "max": round(max(values), 3)}

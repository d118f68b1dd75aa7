"""POST /v1/chat/completions and /v1/completions, streamed (SSE) or not.

Each choice is one engine sequence. Events from the engine thread reach the request's asyncio queue
through `call_soon_threadsafe`. Whatever ends the request — done, error, a client that disconnects —
the `finally` cancels its unfinished sequences, which frees their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tunelab.serve.engine import EngineFull, SamplingParams, Sequence
from tunelab.serve.protocol import APIError, ChatRequest, CompletionRequest, bad_request
from tunelab.serve.registry import Served
from tunelab.serve.state import ServerState, disconnected, state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    """POST /v1/chat/completions, a `ChatRequest` -> a `chat.completion` with `n` choices, or with `stream` SSE
    `chat.completion.chunk` events ending `data: [DONE]` (a failed choice: one error envelope, then [DONE]).
    Errors: 400 (body, chat template missing or rejecting the messages, context length, `n` over `max_n`), 401,
    404 (model), 429, 503 (loading, overloaded); not streamed, also 500 for a failed choice (503 at shutdown)."""
    st = state(request)
    st.admit(request)
    req = await st.parse(request, ChatRequest)
    served = st.registry.get(req.model, "generate")
    # `developer` is OpenAI's newer name for `system`, the role chat templates know
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    prompt = await asyncio.to_thread(served.chat_prompt, messages)  # templating + tokenising: off the event loop
    return await _run(request, st, served, req, [prompt], chat=True)


@router.post("/v1/completions")
async def completions(request: Request):
    """POST /v1/completions, a `CompletionRequest` -> a `text_completion` with `n` choices per prompt (prompt-major;
    `echo` prefixes the decoded prompt), or with `stream` SSE chunks ending `data: [DONE]`. Errors: those of
    /v1/chat/completions, with 400 for an empty prompt instead of the chat-template ones."""
    st = state(request)
    st.admit(request)
    req = await st.parse(request, CompletionRequest)
    served = st.registry.get(req.model, "generate")
    prompts = await asyncio.to_thread(lambda: [served.text_prompt(p) for p in req.prompts()])
    return await _run(request, st, served, req, prompts, chat=False)


def _params(req, prompt: list[int], served: Served, st: ServerState, seed: int | None) -> SamplingParams:
    limit, n_prompt = served.context, len(prompt)
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    if n_prompt >= limit:
        raise bad_request(f"the prompt has {n_prompt} tokens; '{served.id}' reads at most {limit}", param=where,
                          code="context_length_exceeded")
    max_tokens = req.limit() or min(st.settings.default_max_tokens, limit - n_prompt)
    if n_prompt + max_tokens > limit:
        raise bad_request(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                          f"'{served.id}' ({limit} tokens)", param="max_tokens", code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          stop=req.stops(), seed=seed)


@dataclass
class _Job:
    seqs: list[Sequence]
    queue: asyncio.Queue
    prompt_tokens: int

    def cancel(self, served: Served) -> None:
        left = [s for s in self.seqs if not s.finished]
        if left:
            served.engine.cancel(left)


def _submit(st: ServerState, served: Served, req, prompts: list[list[int]]) -> _Job:
    if req.n * len(prompts) > st.settings.max_n:
        raise bad_request(f"n × prompts is {req.n * len(prompts)}; at most {st.settings.max_n} choices per "
                          "request", param="n")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def sink(index: int):
        def put(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (server stopped)
                pass
        return put

    seqs = []
    for p, prompt in enumerate(prompts):
        for j in range(req.n):
            # the n choices of a seeded request differ from each other, and each is reproducible
            seed = None if req.seed is None else (req.seed + j) % 2 ** 63
            seqs.append(Sequence(prompt, _params(req, prompt, served, st, seed), sink(p * req.n + j),
                                 adapter=served.adapter))
    try:
        served.engine.submit(seqs)
    except EngineFull as err:
        raise st.overloaded(err) from None
    return _Job(seqs, queue, sum(len(p) for p in prompts))


async def _run(request: Request, st: ServerState, served: Served, req, prompts: list[list[int]], chat: bool):
    start = time.perf_counter()
    job = _submit(st, served, req, prompts)
    route = "/v1/chat/completions" if chat else "/v1/completions"
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": served.id}
    if req.stream:
        return StreamingResponse(_stream(st, served, req, job, meta, chat, start, route),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no nginx buffer
    try:
        texts, finish, completion = await _collect(request, st, served, job, start)
    finally:
        job.cancel(served)
    st.metrics.latency.labels(route).observe(time.perf_counter() - start)
    if not chat and req.echo:
        prompts = await asyncio.to_thread(lambda: [served.tokenizer.decode(s.prompt) for s in job.seqs])
        texts = [p + t for p, t in zip(prompts, texts)]
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
    return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                         "usage": _usage(job.prompt_tokens, completion)})


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(request: Request, st: ServerState, served: Served, job: _Job, start: float):
    n = len(job.seqs)
    texts, finish, completion, first = [""] * n, [None] * n, 0, True
    gone = asyncio.create_task(disconnected(request))
    try:
        while any(f is None for f in finish):
            get = asyncio.create_task(job.queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise APIError(499, "client closed the request")
            i, ev = get.result()
            if ev[0] == "text":
                if first:
                    st.metrics.ttft.labels(served.id).observe(time.perf_counter() - start)
                    first = False
                texts[i] += ev[1]
            elif ev[0] == "done":
                finish[i], completion = ev[1], completion + ev[3]
            else:  # "shut down": the engine's message when it stops with this request unfinished (not a fault)
                raise APIError(503 if "shut down" in ev[1] else 500, ev[1], type="server_error")
    finally:
        gone.cancel()
    return texts, finish, completion


async def _stream(st: ServerState, served: Served, req, job: _Job, meta: dict, chat: bool, start: float,
                  route: str):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict], usage: dict | None = None) -> str:
        body = {**meta, "object": obj, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(i: int, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

    n, open_choices, completion, first = len(job.seqs), len(job.seqs), 0, True
    try:
        if chat:
            yield event([choice(i, "", role=True) for i in range(n)])
        while open_choices:
            i, ev = await job.queue.get()
            if ev[0] == "text":
                if first:
                    st.metrics.ttft.labels(served.id).observe(time.perf_counter() - start)
                    first = False
                yield event([choice(i, ev[1])])
            elif ev[0] == "done":
                open_choices -= 1
                completion += ev[3]
                yield event([choice(i, None, ev[1])])
            else:  # this choice failed (the others of other requests go on); the stream ends here
                err = APIError(500, ev[1], type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
        if not open_choices and req.include_usage():
            yield event([], _usage(job.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
        st.metrics.latency.labels(route).observe(time.perf_counter() - start)
    finally:
        job.cancel(served)

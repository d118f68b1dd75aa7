"""POST /v1/chat/completions and /v1/completions, streamed (SSE) or not.

Each choice is one engine sequence. Events from the engine thread reach the request's asyncio queue
through `call_soon_threadsafe`. Whatever ends the request — done, error, a client that disconnects —
the `finally` cancels its unfinished sequences, which frees their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from tunelab.serve.engine import DoneEvent, EngineFull, ErrorEvent, Event, SamplingParams, Sequence, TextEvent
from tunelab.serve.protocol import (APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatRequest, Completion, CompletionRequest, Delta,
                                    TextChoice, TextCompletion, Usage, bad_request)
from tunelab.serve.registry import Served
from tunelab.serve.state import Call, ServerState, disconnected, model_call

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, call: Annotated[Call, Depends(model_call(ChatRequest, "generate"))]):
    """POST /v1/chat/completions, a `ChatRequest` -> a `ChatCompletion` with `n` choices, or with `stream` SSE
    `ChatCompletionChunk`s ending `data: [DONE]` (a failed choice: one error envelope, then [DONE]).
    Errors: 400 (body, chat template missing or rejecting the messages, context length, `n` over `max_n`), 401,
    404 (model), 429, 503 (loading, overloaded); not streamed, also 500 for a failed choice (503 at shutdown)."""
    # `developer` is OpenAI's newer name for `system`, the role chat templates know
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in call.body.messages]
    prompt = await asyncio.to_thread(call.served.chat_prompt, messages)  # templating + tokenising: off the loop
    return await _run(request, call, [prompt], chat=True)


@router.post("/v1/completions")
async def completions(request: Request, call: Annotated[Call, Depends(model_call(CompletionRequest, "generate"))]):
    """POST /v1/completions, a `CompletionRequest` -> a `TextCompletion` with `n` choices per prompt
    (prompt-major; `echo` prefixes the decoded prompt), or with `stream` SSE chunks ending `data: [DONE]`.
    Errors: those of /v1/chat/completions, with 400 for an empty prompt instead of the chat-template ones."""
    served = call.served
    prompts = await asyncio.to_thread(lambda: [served.text_prompt(p) for p in call.body.prompts()])
    return await _run(request, call, prompts, chat=False)


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
        def put(event: Event) -> None:
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
    served.engine.submit(seqs)  # EngineFull: the caller's to answer
    return _Job(seqs, queue, sum(len(p) for p in prompts))


async def _run(request: Request, call: Call, prompts: list[list[int]], chat: bool):
    st, served, req = call.state, call.served, call.body
    call.start = time.perf_counter()  # generation's latency and time to first token count from engine submission
    try:
        job = _submit(st, served, req, prompts)
    except EngineFull as err:
        # a registry model swapped since the lookup: its new version (the same line, so the same tokenizer and
        # the same prompt ids) takes the request; otherwise the engine is full
        if not call.swapped():
            raise st.overloaded(err) from None
        served = call.served
        try:
            job = _submit(st, served, req, prompts)
        except EngineFull as err2:
            raise st.overloaded(err2) from None
    route = "/v1/chat/completions" if chat else "/v1/completions"
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": served.id}
    if req.stream:
        return StreamingResponse(_stream(call, job, meta, chat, route), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no nginx buffer
    try:
        texts, finish, completion = await _collect(request, call, job)
    finally:
        job.cancel(served)
    call.observe_latency(route)
    usage = Usage.of(job.prompt_tokens, completion)
    if chat:
        answer: Completion = ChatCompletion(
            **meta, usage=usage, choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                                          for i, (t, f) in enumerate(zip(texts, finish))])
    else:
        if req.echo:
            prompts = await asyncio.to_thread(lambda: [served.tokenizer.decode(s.prompt) for s in job.seqs])
            texts = [p + t for p, t in zip(prompts, texts)]
        answer = TextCompletion(**meta, usage=usage, choices=[TextChoice(index=i, text=t, finish_reason=f)
                                                              for i, (t, f) in enumerate(zip(texts, finish))])
    return answer.response()


async def _collect(request: Request, call: Call, job: _Job) -> tuple[list[str], list[str | None], int]:
    """Wait for every choice to finish -> (texts, finish reasons, completion tokens); 499 when the client goes,
    500 for a failed choice (503 when the engine shut down under it)."""
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
            match ev:
                case TextEvent(text):
                    if first:
                        call.observe_first_token()
                        first = False
                    texts[i] += text
                case DoneEvent(reason, _, tokens):
                    finish[i], completion = reason, completion + tokens
                case ErrorEvent(message, shutdown):
                    raise APIError(503 if shutdown else 500, message, type="server_error")
    finally:
        gone.cancel()
    return texts, finish, completion


async def _stream(call: Call, job: _Job, meta: dict, chat: bool, route: str):
    """The SSE events of a streamed request: (chat) the role, then one chunk per text piece and one per finished
    choice, the usage chunk when asked, `data: [DONE]`; a failed choice sends an error envelope and ends it."""

    def chunk(choices: list, usage: Usage | None = None) -> str:
        return (ChatCompletionChunk if chat else TextCompletion)(**meta, choices=choices, usage=usage).sse()

    def event(i: int, text: str | None, reason: str | None = None) -> str:
        if chat:
            return chunk([ChatChunkChoice(index=i, delta=Delta(content=text), finish_reason=reason)])
        return chunk([TextChoice(index=i, text=text or "", finish_reason=reason)])

    n, open_choices, completion, first = len(job.seqs), len(job.seqs), 0, True
    try:
        if chat:
            yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        while open_choices:
            i, ev = await job.queue.get()
            match ev:
                case TextEvent(text):
                    if first:
                        call.observe_first_token()
                        first = False
                    yield event(i, text)
                case DoneEvent(reason, _, tokens):
                    open_choices -= 1
                    completion += tokens
                    yield event(i, None, reason)
                case ErrorEvent(message):  # this choice failed (other requests go on); the stream ends here
                    yield APIError(500, message, type="server_error").envelope().sse()
                    break
        if not open_choices and call.body.include_usage():
            yield chunk([], Usage.of(job.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
        call.observe_latency(route)
    finally:
        job.cancel(call.served)

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

from tunelab.serve.engine import (DoneEvent, EngineFull, ErrorEvent, Event, SamplingParams, Sequence, TextEvent,
                                  TokenLogprob)
from tunelab.serve.logprobs import TextOffsets, chat_logprobs, joined, text_logprobs
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
    if call.served.rag is not None:
        return await _grounded(request, call, messages)
    prompt = await asyncio.to_thread(call.served.chat_prompt, messages)  # templating + tokenising: off the loop
    return await _run(request, call, [prompt], chat=True)


async def _grounded(request: Request, call: Call, messages: list[dict]):
    """A knowledge-base model's chat completion: retrieve for the conversation, hand off when nothing relevant is
    found, else generate from the passages and check the answer (`tunelab.rag.answer`). The answer is checked
    whole before any of it is sent, so a stream carries it in one content chunk, with the citations and the
    hand-off flag, after the role chunk; its latency and time to first token both count from the request's
    arrival to that answer (retrieval and the check included). A failed generation is a 500/503 JSON error, streamed
    or not (nothing was sent yet)."""
    began, served, req = time.perf_counter(), call.served, call.body
    if req.n != 1 or req.logprobs:
        raise bad_request(f"'{served.id}' answers from a knowledge base: one choice (n 1), no logprobs",
                          param="n" if req.n != 1 else "logprobs")
    assistant = served.rag
    retrieval = await asyncio.to_thread(assistant.retrieve, messages)
    if not assistant.grounded(retrieval):
        verdict, finish, usage = assistant.handoff("no_relevant_passage"), "stop", Usage.of(0, 0)
    else:
        prompt = await asyncio.to_thread(served.chat_prompt, assistant.prompt(messages, retrieval))
        job = _start(call, [prompt])
        try:
            texts, reasons, completion, _ = await _collect(request, call, job, first_token=False)
        finally:
            job.cancel(call.served)
        verdict = await asyncio.to_thread(assistant.check, texts[0], retrieval)
        finish, usage = reasons[0] if verdict.handoff is None else "stop", Usage.of(job.prompt_tokens, completion)
    call.start = began
    call.observe_first_token()
    call.observe_latency("/v1/chat/completions")
    meta = {**_meta(call.served, True), "citations": verdict.citations, "handoff": verdict.flag}
    if not req.stream:
        return ChatCompletion(**meta, usage=usage, choices=[ChatChoice(
            index=0, message=AssistantMessage(content=verdict.text), finish_reason=finish)]).response()

    def events():
        plain = {k: v for k, v in meta.items() if k not in ("citations", "handoff")}
        yield ChatCompletionChunk(**plain, choices=[ChatChunkChoice(index=0, delta=Delta(role="assistant",
                                                                                           content=""))]).sse()
        yield ChatCompletionChunk(**plain, choices=[ChatChunkChoice(index=0, delta=Delta(content=verdict.text))]).sse()
        yield ChatCompletionChunk(**meta, choices=[ChatChunkChoice(index=0, delta=Delta(),
                                                                   finish_reason=finish)]).sse()
        if req.include_usage():
            yield ChatCompletionChunk(**plain, choices=[], usage=usage).sse()
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions")
async def completions(request: Request, call: Annotated[Call, Depends(model_call(CompletionRequest, "generate"))]):
    """POST /v1/completions, a `CompletionRequest` (prompts as text or token ids) -> a `TextCompletion` with `n`
    choices per prompt (prompt-major; `echo` prefixes the decoded prompt and, with `logprobs`, its tokens'
    log-probabilities), or with `stream` SSE chunks ending `data: [DONE]`.
    Errors: those of /v1/chat/completions, with 400 for an empty prompt or a token id outside the vocabulary
    instead of the chat-template ones, and for echo with logprobs on an engine that cannot score prompts."""
    served = call.served
    if served.rag is not None:  # its answers are retrieved, checked and cited: chat only
        raise bad_request(f"'{served.id}' answers from a knowledge base at /v1/chat/completions", param="model",
                          code="wrong_model_kind")
    prompts = await asyncio.to_thread(lambda: [served.text_prompt(p) if isinstance(p, str) else served.token_prompt(p)
                                               for p in call.body.prompts()])
    return await _run(request, call, prompts, chat=False)


def _params(req, prompt: list[int], served: Served, st: ServerState, seed: int | None) -> SamplingParams:
    limit, n_prompt, asked = served.context, len(prompt), req.limit()
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    if n_prompt > limit or (n_prompt == limit and asked != 0):  # max_tokens 0 (echo): the prompt alone may fill it
        raise bad_request(f"the prompt has {n_prompt} tokens; '{served.id}' reads at most {limit}", param=where,
                          code="context_length_exceeded")
    max_tokens = asked if asked is not None else min(st.settings.default_max_tokens, limit - n_prompt)
    if n_prompt + max_tokens > limit:
        raise bad_request(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                          f"'{served.id}' ({limit} tokens)", param="max_tokens", code="context_length_exceeded")
    logprobs, prompt_logprobs = req.token_logprobs()
    if prompt_logprobs is not None and not served.engine.prompt_logprobs:
        raise bad_request(f"'{served.id}' runs in {served.runtime}, which does not score prompt tokens: echo with "
                          "logprobs is not available for it", param="echo")
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          stop=req.stops(), seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


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


def _start(call: Call, prompts: list[list[int]]) -> _Job:
    """Submit the request's sequences to its model's engine (the clock of its latency starts); 503 when full."""
    st, req = call.state, call.body
    call.start = time.perf_counter()  # generation's latency and time to first token count from engine submission
    try:
        return _submit(st, call.served, req, prompts)
    except EngineFull as err:
        # a registry model swapped since the lookup: its new version (the same line, so the same tokenizer and
        # the same prompt ids) takes the request; otherwise the engine is full
        if not call.swapped():
            raise st.overloaded(err) from None
        try:
            return _submit(st, call.served, req, prompts)
        except EngineFull as err2:
            raise st.overloaded(err2) from None


def _meta(served: Served, chat: bool) -> dict:
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": served.id}


async def _run(request: Request, call: Call, prompts: list[list[int]], chat: bool):
    job = _start(call, prompts)
    served, req = call.served, call.body
    route = "/v1/chat/completions" if chat else "/v1/completions"
    meta = _meta(served, chat)
    if req.stream:
        return StreamingResponse(_stream(call, job, meta, chat, route), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no nginx buffer
    try:
        texts, finish, completion, logprobs = await _collect(request, call, job)
    finally:
        job.cancel(served)
    call.observe_latency(route)
    usage = Usage.of(job.prompt_tokens, completion)
    answer = await asyncio.to_thread(_answer, served, req, job, meta, texts, finish, logprobs, usage)  # decodes
    return answer.response()


def _answer(served: Served, req, job: _Job, meta: dict, texts: list[str], finish: list[str | None],
            logprobs: list[list[TokenLogprob]], usage: Usage) -> Completion:
    """The whole (not streamed) answer of a finished job."""
    if isinstance(req, ChatRequest):
        return ChatCompletion(**meta, usage=usage, choices=[
            ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f,
                       logprobs=chat_logprobs(lp, served.token_texts()) if req.logprobs else None)
            for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs))])
    choices, scoring = [], req.logprobs is not None
    for i, (s, text, f, lp) in enumerate(zip(job.seqs, texts, finish, logprobs)):
        offsets, parts = TextOffsets(), []
        if req.echo:
            text = served.tokenizer.decode(s.prompt) + text
            if scoring:
                parts.append(text_logprobs(s.prompt_logprobs, s.prompt, served.token_texts(), offsets))
                offsets.segment()  # the answer was decoded on its own
        if scoring:
            parts.append(text_logprobs(lp, [e.token for e in lp], served.token_texts(), offsets))
        choices.append(TextChoice(index=i, text=text, finish_reason=f, logprobs=joined(parts) if scoring else None))
    return TextCompletion(**meta, usage=usage, choices=choices)


async def _collect(request: Request, call: Call, job: _Job, first_token: bool = True
                   ) -> tuple[list[str], list[str | None], int, list[list[TokenLogprob]]]:
    """Wait for every choice to finish -> (texts, finish reasons, completion tokens, generated tokens'
    log-probabilities when asked); 499 when the client goes, 500 for a failed choice (503 when the engine shut
    down under it). `first_token`: record the time to the first generated text (else the caller does)."""
    n = len(job.seqs)
    texts, finish, completion, first = [""] * n, [None] * n, 0, first_token
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
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
                case TextEvent(text, scored):
                    if first:
                        call.observe_first_token()
                        first = False
                    texts[i] += text
                    logprobs[i].extend(scored)
                case DoneEvent(reason, _, tokens):
                    finish[i], completion = reason, completion + tokens
                case ErrorEvent(message, shutdown):
                    raise APIError(503 if shutdown else 500, message, type="server_error")
    finally:
        gone.cancel()
    return texts, finish, completion, logprobs


async def _stream(call: Call, job: _Job, meta: dict, chat: bool, route: str):
    """The SSE events of a streamed request: (chat) the role, (echo) each choice's prompt before its first
    piece, then one chunk per text piece (with its tokens' log-probabilities when asked) and one per finished
    choice, the usage chunk when asked, `data: [DONE]`; a failed choice sends an error envelope and ends it."""
    req, served = call.body, call.served
    texts = served.token_texts() if req.token_logprobs()[0] is not None else None
    offsets = [TextOffsets() for _ in job.seqs]  # completions: where each choice's text so far ends

    def chunk(choices: list, usage: Usage | None = None) -> str:
        return (ChatCompletionChunk if chat else TextCompletion)(**meta, choices=choices, usage=usage).sse()

    def event(i: int, text: str | None, reason: str | None = None, scored: tuple[TokenLogprob, ...] = ()) -> str:
        if chat:
            return chunk([ChatChunkChoice(index=i, delta=Delta(content=text), finish_reason=reason,
                                          logprobs=chat_logprobs(scored, texts) if scored else None)])
        logprobs = text_logprobs(scored, [e.token for e in scored], texts, offsets[i]) if scored else None
        return chunk([TextChoice(index=i, text=text or "", finish_reason=reason, logprobs=logprobs)])

    def echo(i: int) -> str:
        s = job.seqs[i]
        logprobs = text_logprobs(s.prompt_logprobs, s.prompt, texts, offsets[i]) if req.logprobs is not None else None
        offsets[i].segment()  # the answer was decoded on its own
        return chunk([TextChoice(index=i, text=served.tokenizer.decode(s.prompt), logprobs=logprobs)])

    n, open_choices, completion, first = len(job.seqs), len(job.seqs), 0, True
    echoing = set(range(n)) if not chat and req.echo else set()  # choices whose prompt is still to be sent
    try:
        if chat:
            yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        while open_choices:
            i, ev = await job.queue.get()
            if i in echoing and not isinstance(ev, ErrorEvent):
                echoing.discard(i)
                yield await asyncio.to_thread(echo, i)  # decoding a long prompt: off the event loop
            match ev:
                case TextEvent(text, scored):
                    if first:
                        call.observe_first_token()
                        first = False
                    yield event(i, text, scored=scored)
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

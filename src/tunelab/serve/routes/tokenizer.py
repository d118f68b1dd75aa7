"""POST /tokenize and /detokenize, GET /tokenizer_info: a served generation model's tokenizer in vLLM's shapes,
which lm-evaluation-harness reads with `tokenizer_backend=remote` (it finds them on its own), so that an evaluation
client needs no tokenizer files — not even for a built-in base or a GGUF export, whose tokenizer is inside the
model file. `model` may be left out while one generation model is served."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from tunelab.serve.protocol import (DetokenizeRequest, Detokenized, TokenizeRequest, Tokenized, TokenizerInfo,
                                    bad_request)
from tunelab.serve.registry import Served
from tunelab.serve.state import ServerState, admitted

router = APIRouter()


def _model(st: ServerState, model_id: str | None) -> Served:
    """The generation model `model_id` names, or the only one served when it is None (400 when there are several)."""
    if model_id is not None:
        return st.registry.get(model_id, "generate")
    generating = [s for s in st.registry.models.values() if s.kind == "generate"]
    if len(generating) != 1:
        names = ", ".join(s.id for s in generating) or "none"
        raise bad_request(f"name the model: this server has {len(generating)} generation models ({names})",
                          param="model")
    return generating[0]


@router.post("/tokenize")
async def tokenize(request: Request, st: Annotated[ServerState, Depends(admitted)]):
    """POST /tokenize, a `TokenizeRequest` (`prompt`, or `messages` through the chat template) -> `Tokenized`
    (`tokens`, `count`, `max_model_len`). 400 (body, model), 401, 404 (model), 429, 503."""
    req = await st.parse(request, TokenizeRequest)
    served = _model(st, req.model)

    def encode() -> list[int]:
        if req.messages is not None:
            return served.chat_prompt([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                       for m in req.messages], req.add_generation_prompt)
        return served.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]

    ids = await asyncio.to_thread(encode)
    return Tokenized(tokens=ids, count=len(ids), max_model_len=served.context).response()


@router.post("/detokenize")
async def detokenize(request: Request, st: Annotated[ServerState, Depends(admitted)]):
    """POST /detokenize, a `DetokenizeRequest` (`tokens`) -> `Detokenized` (`prompt`: their text, special tokens
    included). 400 also for an id outside the vocabulary."""
    req = await st.parse(request, DetokenizeRequest)
    served = _model(st, req.model)
    if req.tokens:
        served.token_prompt(req.tokens, param="tokens")  # the range check
    text = await asyncio.to_thread(served.tokenizer.decode, req.tokens)
    return Detokenized(prompt=text).response()


@router.get("/tokenizer_info")
async def tokenizer_info(st: Annotated[ServerState, Depends(admitted)], model: str | None = None):
    """GET /tokenizer_info[?model=ID] -> `TokenizerInfo`: the special tokens, the chat template and the context."""
    served = _model(st, model)
    tok = served.tokenizer
    template = getattr(tok, "chat_template", None)
    return TokenizerInfo(tokenizer_class=type(tok).__name__, eos_token=tok.eos_token, bos_token=tok.bos_token,
                         pad_token=tok.pad_token, unk_token=tok.unk_token,
                         chat_template=template if isinstance(template, str) else None,
                         model_max_length=served.context).response()

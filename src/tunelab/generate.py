"""Text generation for `tunelab generate` and `tunelab chat`: greedy or sampled decoding through
transformers' `generate` (temperature, top-p, top-k, repetition penalty, max tokens), stop strings,
and token streaming through a callback.

Streaming and stop strings meet in `StopTrimmer`: text is released as soon as it cannot be the start
of a stop string, and never includes the stop string itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunelab.errors import UserError, read_json_file
from tunelab.models import META_FILE, load_causal_lm, load_model_dir, read_meta, resolve_base
from tunelab.tasks import refuse_stage, tasks_where
from tunelab.tasks.sft import stop_tokens


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def check(self) -> "GenerationParams":
        if self.max_new_tokens < 1:
            raise UserError("max tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError("temperature >= 0, 0 < top-p <= 1, top-k >= 0 and repetition penalty > 0 are required")
        return self


@dataclass
class Generator:
    model: torch.nn.Module
    tokenizer: object
    stop: list[str]  # stop strings of the model (end-of-turn / end-of-text tokens)
    name: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def load_generator(ref: str, device: str | None = None) -> Generator:
    """A tunelab model dir (causal_lm / sft) or a base model (builtin:…, tiny-llama, HF dir, .gguf). Anything
    that is not a causal LM (a classifier or NER model dir, an encoder) is a `UserError` saying what to use."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (Path(ref) / META_FILE).is_file():
        spec = refuse_stage(read_meta(ref).get("task"), ref, "generate with")
        if spec.served_as in MODEL_DIR_USE:
            raise UserError(f"{ref} is a {spec.name} model dir, not a text generator: {MODEL_DIR_USE[spec.served_as]}")
        model, tok, meta = load_model_dir(ref, device, tasks=tasks_where(generates=True))
        stop = list(meta.get("stop") or [tok.eos_token])
    else:
        base = resolve_base(ref)
        if not isinstance(base.path, str):  # a local folder: refused before its weights are read
            check_generator(ref, read_json_file(base.path / "config.json", f"{base.path} has no config.json"))
        model, tok, _, _ = load_causal_lm(ref)
        if isinstance(base.path, str):  # a hub id: its config is known once loaded
            check_generator(ref, model.config.to_dict())
        model.to(device).eval()
        stop = stop_tokens(tok, chat=True)
    return Generator(model, tok, sorted(set(stop)), ref)


MODEL_DIR_USE = {"classify": "label texts with `tunelab predict`, or `tunelab serve` it for /v1/classify",
                 "entities": "find entities with `tunelab predict`, or `tunelab serve` it for /v1/entities",
                 "embed": "index documents with it (`tunelab index build --encoder DIR`), or `tunelab serve` it for "
                          "/v1/embeddings"}
DECODER_HINT = "to generate, use a causal LM (e.g. builtin:smollm2-135m-instruct) or a causal_lm/sft model dir"


def model_family(config: dict) -> str:
    """What an HF config (`config.json` as a dict) describes: "decoder" (a causal LM: it generates text),
    "encoder" (BERT and its kin: embeddings, classifiers, NER) or "other" (encoder-decoder, unknown types).
    transformers also gives BERT-like types a causal-LM class (a random LM head on an encoder): a type with a
    masked-LM class counts as an encoder unless its config says `is_decoder`."""
    # transformers (~0.6 s over torch) loads when a config is checked, not when serve.engine imports StopTrimmer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if not isinstance(config, dict) or config.get("is_encoder_decoder"):
        return "other"
    kind = config.get("model_type")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                                                      or config.get("is_decoder")):
        return "decoder"
    return "encoder" if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "other"


def base_kind(ref: str) -> str:
    """How a base model is served, read from its config before any weights: "generate" for a decoder, "embed"
    for an encoder."""
    d = Path(ref)
    if ref in ("builtin:minilm-l6", "tiny-bert"):
        return "embed"
    if ref.startswith("builtin:") or ref == "tiny-llama" or (d.is_file() and d.suffix == ".gguf"):
        return "generate"
    if not d.exists():
        raise UserError(f"model '{ref}' not found: not a model dir, a base model dir, a .gguf file or builtin:NAME")
    if (d / "config.json").is_file():
        family = model_family(read_json_file(d / "config.json", ""))
        if family == "other":
            raise UserError(f"{ref} is neither a decoder (served for generation) nor an encoder (served for "
                            "embeddings)")
        return "generate" if family == "decoder" else "embed"
    if d.is_dir() and any(d.glob("*.gguf")):
        return "generate"
    raise UserError(f"{ref} is not a model: no tunelab.json, config.json or .gguf file")


def check_generator(ref: str, config: dict) -> None:
    """A `UserError` unless the HF config of `ref` is a causal LM."""
    family = model_family(config)
    kind = (config.get("model_type") if isinstance(config, dict) else None) or "unknown"
    if family == "encoder":
        raise UserError(f"{ref} is an encoder ({kind}), not a text generator: `tunelab serve {ref}` gives its "
                        f"embeddings; {DECODER_HINT}")
    if family == "other":
        raise UserError(f"{ref} is a '{kind}' model, not a causal LM; {DECODER_HINT}")


class StopTrimmer:
    """Feed decoded text pieces; `push` returns what can be shown now, `done` is set at a stop string.

    Incremental: each stop string keeps a Knuth–Morris–Pratt state (the longest prefix of it that ends the
    text so far), so a character costs O(number of stops) amortised whatever the stops' lengths, and only
    the text that could still be the start of a stop string is held back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_prefix_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.text = ""  # everything released (the stop string and what follows it never are)
        self._held = ""
        self.done = False

    def push(self, piece: str) -> str:
        if self.done or not piece:
            return ""
        pending = self._held + piece
        offset = len(self._held)
        for pos, ch in enumerate(piece):
            cut = -1
            for j, stop in enumerate(self.stops):
                k, fail = self._state[j], self._fail[j]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):  # a match ending here; of several, the one starting first wins
                    start = offset + pos + 1 - k
                    cut = start if cut < 0 else min(cut, start)
                    k = fail[k - 1]
                self._state[j] = k
            if cut >= 0:
                self.done = True
                self._held = ""
                return self._release(pending[:cut])
        hold = max(self._state, default=0)
        self._held = pending[len(pending) - hold:] if hold else ""
        return self._release(pending[:len(pending) - hold])

    def flush(self) -> str:
        out, self._held = self._held, ""
        return self._release(out)

    def _release(self, out: str) -> str:
        self.text += out
        return out


def _prefix_function(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _streamer(tokenizer, on_piece: Callable[[str], None]):
    from transformers import TextStreamer  # ~0.6 s over torch; only streamed output needs it

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_piece(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=False)


def prompt_ids(gen: Generator, prompt: str | list[dict], chat: bool) -> torch.Tensor:
    """Token ids of a raw prompt, or of a conversation rendered with the model's chat template."""
    tok = gen.tokenizer
    if chat:
        if not gen.has_chat_template:
            raise UserError(f"{gen.name} has no chat template; use --raw")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    limit = getattr(gen.model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] >= limit:
        raise UserError(f"the prompt has {ids.shape[1]} tokens; this model reads at most {limit}")
    return ids


@torch.no_grad()
def generate(gen: Generator, prompt: str | list[dict], params: GenerationParams, chat: bool = True,
             on_text: Callable[[str], None] | None = None) -> dict:
    """-> {"text", "prompt_tokens", "completion_tokens", "finish_reason": "stop" | "length"}.
    `on_text` receives the text piece by piece as it is generated (stop strings never shown)."""
    params.check()
    ids = prompt_ids(gen, prompt, chat).to(gen.model.device)
    trimmer = StopTrimmer(gen.stop + params.stop)

    def on_piece(piece: str) -> None:
        shown = trimmer.push(piece)
        if shown and on_text:
            on_text(shown)

    if params.seed is not None:
        torch.manual_seed(params.seed)
    sample = params.temperature > 0
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=sample,
                  repetition_penalty=params.repetition_penalty, pad_token_id=gen.tokenizer.pad_token_id,
                  eos_token_id=[gen.tokenizer.convert_tokens_to_ids(s) for s in gen.stop
                                if s in gen.tokenizer.get_vocab()] or None)
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.stop:
        kwargs.update(stop_strings=params.stop, tokenizer=gen.tokenizer)
    out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             streamer=_streamer(gen.tokenizer, on_piece), **kwargs)
    new = out[0, ids.shape[1]:]
    rest = trimmer.flush() if not trimmer.done else ""
    if rest and on_text:
        on_text(rest)
    finish = "stop" if trimmer.done or len(new) < params.max_new_tokens else "length"
    return {"text": trimmer.text, "prompt_tokens": int(ids.shape[1]),
            "completion_tokens": int(len(new)), "finish_reason": finish}

"""Instruction / chat fine-tuning: rows {"messages": [{"role", "content"}, …]} rendered with the model's
own chat template; the loss covers assistant tokens only (every assistant turn of a multi-turn
conversation), and short conversations are packed whole into blocks.

Assistant spans are found by rendering prefixes of the conversation: the text an assistant turn adds is
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True), so the span is exactly
the answer plus the template's end-of-turn marker (which the model must learn to emit to stop).
Tokens whose characters fall inside a span are targets; everything else (system, user, role headers)
is context only.
"""

from __future__ import annotations

from tunelab.errors import UserError
from tunelab.tasks.causal_lm import IGNORE, CausalLMTask, build_lm, one_per_row, pack_bins, shift_targets

# Used when a tokenizer has no chat template (e.g. a model trained from scratch): ChatML, as SmolLM2.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the ChatML one (`CHATML`), in place (a saved tokenizer keeps it)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML


def stop_tokens(tokenizer, chat: bool) -> list[str]:
    """What generation stops at: the end-of-text token, and for chat models the end-of-turn marker."""
    stops = {tokenizer.eos_token}
    if chat and "<|im_end|>" in tokenizer.get_vocab():
        stops.add("<|im_end|>")
    return sorted(t for t in stops if t)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (not tokenised) through the chat template; with `add_generation_prompt` it
    ends with the header that opens an assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """-> (full rendered text, character spans of the assistant turns)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[:i + 1]))
        if full[:end] != render(tokenizer, messages[:i + 1]):
            raise UserError("the chat template renders a conversation differently from its prefixes; "
                            "tunelab cannot find the assistant turns")
        spans.append((start, end))
    return full, spans


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """-> (token ids, labels: the token id on assistant tokens, IGNORE elsewhere)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= a < e for s, e in spans) and b > a
        labels.append(tok_id if inside else IGNORE)
    return enc["input_ids"], labels


class SFTTask(CausalLMTask):
    """Chat fine-tuning; evaluation adds nothing beyond token loss/perplexity on assistant tokens (the
    generation metrics, ROUGE-L and exact match, are computed by `tunelab eval`)."""

    name = "sft"

    def __init__(self, tokenizer, block: int, packing: bool = True, method: str = "full"):
        ensure_chat_template(tokenizer)
        super().__init__(tokenizer, block, packing, method)

    def segments(self, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        """Rows {"messages"} -> (ids, shifted targets) per conversation: a position is a target only where the
        next token is an assistant token (`encode_conversation`)."""
        out = []
        for r in rows:
            ids, labels = encode_conversation(self.tokenizer, r["messages"])
            out.append((ids, shift_targets(ids, labels)))
        return out

    def encode(self, rows: list[dict]):
        """Conversations packed whole into rows of at most `block` tokens (`pack_bins`: never split across rows),
        or one per row without packing; either way each is truncated to `block`."""
        segs = self.segments(rows)
        return pack_bins(segs, self.block) if self.packing else one_per_row(segs, self.block)


def build(cfg, meta: dict, train_rows: list[dict]):
    """Chat SFT on the dataset's conversations; a scratch tokenizer also learns the role names."""
    corpus = ["\n".join(m["content"] for m in r["messages"]) for r in train_rows] + ["system user assistant"]
    return build_lm(cfg, corpus, SFTTask)

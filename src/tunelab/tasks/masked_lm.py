"""Masked language modelling: continued pretraining of an encoder (BERT family) on raw in-domain text, the
"domain-adaptive pretraining" of Gururangan et al. (2020). Its model dir is a stage: the base of a later
classification or NER run (`model.base: DIR`), not a model to serve.

Rows {"text"} are tokenised without special tokens. Packed (`model.packing`), the documents form one stream,
each followed by [SEP], cut into rows of `max_length` tokens framed by [CLS] … [SEP]; unpacked, each document is
one row, truncated. Every row gets an attention mask over its real tokens and nothing more: an encoder attends
both ways anyway, and documents packed side by side are what BERT and RoBERTa pretrained on, so no
block-diagonal mask between documents is needed (unlike the causal task, whose positions restart per document).

Masking is BERT's recipe (`model.mlm`): each non-special token is chosen with probability `probability` (with
`whole_word`, each word, all its WordPiece pieces together, from the fast tokenizer's `word_ids()`), at least one
per row; a chosen token becomes [MASK] 80% of the time, a random non-special token 10%, and stays 10%; its target
is the original id, -100 elsewhere. Training masks are drawn afresh every time a row is batched (dynamic masking,
RoBERTa) from the task's own generator, seeded with `train.seed`: a run is reproducible, and torchrun's ranks,
which count the same windows in the same order, draw the same masks whatever their dropout consumed. (A resumed
run draws its masks from the seed again, so they differ from the uninterrupted run's; weights, optimizer and data
order resume exactly.) A row's masks are drawn when the loop first counts its targets (`units`, before the
batch is collated) and used by the next `collate` of that row, so normalisation counts exactly the targets
trained on. Evaluation masks are fixed: drawn once per encoded split, at its first evaluation, from a generator
seeded with `train.seed`: the same positions at every evaluation, so validation scores compare step to step.

The loss gathers the encoder's hidden states at the target positions only and runs the MLM head and a float32
cross-entropy over chunks of them (`causal_lm.chunked_sum`), so the [tokens, vocab] logits of the whole batch
never exist. A model whose MLM head is not one module, and an FSDP-sharded one, go through the model's forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import models
from tunelab.errors import UserError
from tunelab.tasks.causal_lm import IGNORE, PROMPT_LEARNING, chunked_sum

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens: [MASK], a random token; the rest stay as they are


@dataclass
class MLMEncoded:
    """Rows of token ids with, per token, the index of its word (-1: a special token, never chosen); masks drawn
    for the next batching of a row (`pending`) and the split's fixed evaluation masks (`fixed`, drawn once)."""

    input_ids: list[list[int]] = field(default_factory=list)
    words: list[list[int]] = field(default_factory=list)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    fixed: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row; evaluation sorts rows by it so that a batch pads little."""
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Masking:
    """What masking needs of the tokenizer and the config: the [MASK] id, the ids a random replacement draws
    from (the vocabulary without special tokens), the share chosen and whether whole words are."""

    mask_id: int
    pool: torch.Tensor
    probability: float = 0.15
    whole_word: bool = False

    def draw(self, ids: torch.Tensor, words: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's (masked input ids, targets), drawn from `generator`."""
        candidate = words >= 0
        if self.whole_word:
            _, word_of = torch.unique(words, return_inverse=True)
            score = torch.rand(int(word_of.max()) + 1, generator=generator)[word_of]
        else:
            score = torch.rand(len(ids), generator=generator)
        chosen = (score < self.probability) & candidate
        if not chosen.any() and candidate.any():  # at least one target per row (BERT's max(1, n * p))
            chosen = candidate & (score == score.masked_fill(~candidate, 2.0).min())
        how = torch.rand(len(ids), generator=generator)
        replacement = self.pool[torch.randint(len(self.pool), (len(ids),), generator=generator)]
        inputs = ids.clone()
        inputs[chosen & (how < MASK_SHARE)] = self.mask_id
        randomised = chosen & (how >= MASK_SHARE) & (how < MASK_SHARE + RANDOM_SHARE)
        inputs[randomised] = replacement[randomised]
        return inputs, torch.where(chosen, ids, torch.full_like(ids, IGNORE))


def frame(tokenizer, max_length: int) -> tuple[int, int, int]:
    """(CLS id, SEP id, content tokens per row); an encoder tokenizer has both, and a row needs room for one."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise UserError("masked_lm frames rows with the tokenizer's [CLS] and [SEP]; this tokenizer lacks one "
                        "(use an encoder of the BERT family)")
    if max_length < 3:
        raise UserError("masked_lm: model.max_length must be at least 3 ([CLS], a token, [SEP])")
    return cls, sep, max_length - 2


class MaskedLMTask:
    """Rows {"text"} -> [CLS] … [SEP] rows with masks; metric: validation perplexity of the masked tokens (lower
    is better), with their prediction accuracy beside it."""

    name = "masked_lm"
    metric = "perplexity"
    greater_is_better = False

    def __init__(self, tokenizer, block: int, packing: bool = True, probability: float = 0.15,
                 whole_word: bool = False, seed: int = 0):
        if whole_word and not tokenizer.is_fast:
            raise UserError("model.mlm.whole_word needs a fast tokenizer (its word_ids() group a word's pieces)")
        self.tokenizer, self.block, self.packing, self.seed = tokenizer, block, packing, seed
        self.cls, self.sep, self.room = frame(tokenizer, block)
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        self.masking = Masking(tokenizer.mask_token_id, vocab[~torch.isin(vocab, special)], probability, whole_word)
        self.generator = torch.Generator().manual_seed(seed)  # training masks (see the module docstring)
        self.pad_id = tokenizer.pad_token_id
        self.labels: list[str] = []  # no label set
        self.through_forward = False  # set for FSDP, or when the MLM head is not one module
        self.model_meta = {"mlm": {"probability": probability, "whole_word": whole_word, "packing": packing}}

    @classmethod
    def from_meta(cls, tokenizer, meta: dict) -> "MaskedLMTask":
        """The task a masked-LM model dir was trained with (its `tunelab.json`): the same rows and eval masks."""
        mlm = meta.get("mlm") or {}
        return cls(tokenizer, models.max_length_of(meta), mlm.get("packing", True), mlm.get("probability", 0.15),
                   mlm.get("whole_word", False), int(meta.get("seed") or 0))

    def documents(self, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        """(token ids, word index per token) of each row's text, no special tokens; word indices are unique
        across documents, so a word never joins one of another document."""
        enc = self.tokenizer([r["text"] for r in rows], add_special_tokens=False)
        docs, offset = [], 0
        for i, ids in enumerate(enc["input_ids"]):
            words = enc.word_ids(i) if self.tokenizer.is_fast else list(range(len(ids)))
            words = [offset + (w if w is not None else j) for j, w in enumerate(words)]
            offset = max(words, default=offset - 1) + 1
            docs.append((ids, words))
        return docs

    def encode(self, rows: list[dict]) -> MLMEncoded:
        """Documents packed into [CLS] … [SEP] rows of `block` tokens (one stream, [SEP] after each document),
        or one document per row, truncated; special tokens get word index -1."""
        enc = MLMEncoded()

        def add(ids: list[int], words: list[int]) -> None:
            enc.input_ids.append([self.cls, *ids, self.sep])
            enc.words.append([-1, *words, -1])

        if not self.packing:
            for ids, words in self.documents(rows):
                if ids:
                    add(ids[:self.room], words[:self.room])
            return enc
        stream, stream_words = [], []
        for ids, words in self.documents(rows):
            if ids:
                stream += [*ids, self.sep]
                stream_words += [*words, -1]
        for start in range(0, len(stream), self.room):
            add(stream[start:start + self.room], stream_words[start:start + self.room])
        return enc

    def _row(self, enc: MLMEncoded, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(enc.input_ids[i]), torch.as_tensor(enc.words[i])

    def _pending(self, enc: MLMEncoded, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks of row `i`'s next batching, drawn now if not yet."""
        if i not in enc.pending:
            enc.pending[i] = self.masking.draw(*self._row(enc, i), generator=self.generator)
        return enc.pending[i]

    def fixed_masks(self, enc: MLMEncoded) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split's evaluation masks: drawn once, in row order, from a generator seeded with `seed`."""
        if enc.fixed is None:
            gen = torch.Generator().manual_seed(self.seed)
            enc.fixed = [self.masking.draw(*self._row(enc, i), generator=gen) for i in range(len(enc))]
        return enc.fixed

    def units(self, enc: MLMEncoded, idx: list[int]) -> int:
        """Loss terms (masked targets) in these rows' next batching: their masks are drawn here."""
        return sum(int((self._pending(enc, i)[1] != IGNORE).sum()) for i in idx)

    def collate(self, enc: MLMEncoded, idx: list[int]) -> dict[str, torch.Tensor]:
        """A training batch: the rows with fresh masks (those `units` drew, else drawn now), right-padded."""
        rows = [self._pending(enc, i) for i in idx]
        for i in idx:
            enc.pending.pop(i, None)  # used: the row's next batching draws new masks
        return self._batch(rows)

    def _batch(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        tg = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, t) in enumerate(rows):
            ids[r, :len(x)], tg[r, :len(x)], mask[r, :len(x)] = x, t, 1
        return {"input_ids": ids, "attention_mask": mask, "targets": tg}

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of the masked tokens' cross-entropies, a float32 scalar; `units` gives the count."""
        hidden, targets, head = self._targets(model, batch)
        if len(targets) == 0:  # no targets (rows without a maskable token): a zero that still back-propagates
            return hidden.sum().float() * 0.0
        return chunked_sum(lambda h, t: F.cross_entropy(head(h).float(), t, reduction="sum"), hidden, targets)

    def _targets(self, model, batch: dict[str, torch.Tensor]):
        """(the states at the batch's targets in row-major order, the targets, what maps a state to logits): the
        encoder's hidden states and the MLM head, or the logits of the model's own forward (FSDP)."""
        head = None if self.through_forward else mlm_head(model)
        if head is not None:
            return (*target_hidden(model, batch), head)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sel = batch["targets"] != IGNORE
        return logits[:, -batch["input_ids"].shape[1]:][sel].float(), batch["targets"][sel], (lambda h: h)

    def _token_outcomes(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per target (row-major): its cross-entropy and whether the top-1 prediction is right."""
        hidden, targets, head = self._targets(model, batch)
        losses, right = [hidden.new_zeros(0, dtype=torch.float32)], [targets.new_zeros(0, dtype=torch.bool)]
        for h, t in zip(hidden.split(1024), targets.split(1024)):
            logits = head(h).float()
            losses.append(F.cross_entropy(logits, t, reduction="none"))
            right.append(logits.argmax(-1) == t)
        return torch.cat(losses), torch.cat(right)

    def through_model_forward(self) -> None:
        """Compute the loss from the full logits of the model's forward (FSDP gathers the weights there)."""
        self.through_forward = True

    @torch.no_grad()
    def evaluate(self, model, enc: MLMEncoded, batch_size: int, per_row: bool = False) -> dict:
        """Mean masked-token loss, perplexity and top-1 accuracy over the split's fixed masks; with `per_row`, each
        row's (loss sum, masked tokens) in encoded order under `blocks` (for intervals)."""
        model.eval()
        device = next(model.parameters()).device
        fixed = self.fixed_masks(enc)
        total, correct, count, blocks = 0.0, 0, 0, {}
        order = np.argsort(enc.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = {k: v.to(device) for k, v in self._batch([fixed[i] for i in idx]).items()}
            losses, right = self._token_outcomes(model, batch)
            total, correct, count = total + float(losses.sum()), correct + int(right.sum()), count + len(losses)
            if per_row:
                per = (batch["targets"] != IGNORE).sum(1).tolist()
                for i, part, n in zip(idx, losses.split(per), per):
                    blocks[i] = (float(part.sum()), n)
        loss = total / max(1, count)
        # math.exp raises OverflowError past ~709: a diverged loss reports a capped perplexity, not a crash
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(1, count),
               "tokens": count}
        if per_row:
            out["blocks"] = [blocks[i] for i in range(len(fixed))]
        return out


def mlm_parts(model):
    """(the masked LM, its encoder body) through a peft wrapper if any."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm, getattr(lm, lm.base_model_prefix)


def mlm_head(model):
    """The MLM head when it is the one module beside the encoder body (BERT's `cls`, RoBERTa's `lm_head`), else
    None (the loss then goes through the model's forward)."""
    lm, body = mlm_parts(model)
    heads = [m for name, m in lm.named_children() if m is not body and any(True for _ in m.parameters())]
    return heads[0] if len(heads) == 1 else None


def target_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden states at the batch's target positions -> ([n, hidden], their [n] targets)."""
    hidden = mlm_parts(model)[1](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    sel = batch["targets"] != IGNORE
    return hidden[sel], batch["targets"][sel]


def build(cfg, meta: dict, train_rows: list[dict]):
    """Masked language modelling on the dataset's texts, continuing an encoder (see the module docstring)."""
    mc = cfg.model
    if cfg.method.name in PROMPT_LEARNING:
        raise UserError(f"method {cfg.method.name} adds virtual tokens, which do not continue an encoder's "
                        "pretraining; use lora (or full, freeze, adapter) for masked_lm")
    if mc.base == "scratch":
        raise UserError("masked_lm continues a pretrained encoder; model.base: scratch builds decoders only")
    model, tok, base, new = models.load_masked_lm(mc.base, mc.trust_remote_code, models.dropout_of(mc))
    task = MaskedLMTask(tok, mc.max_length, mc.packing, mc.mlm.probability, mc.mlm.whole_word, cfg.train.seed)
    return model, tok, base, new, task

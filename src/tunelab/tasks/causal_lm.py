"""Causal language modelling (pretraining, continued pretraining) and the pieces SFT shares.

Examples are token sequences with per-token *targets*: `targets[t]` is the token that position `t` must
predict (already shifted), or -100 where nothing is predicted. Shifting per segment, before packing,
means the last token of a document never predicts the first token of the next.

Packing puts several segments in one row of `block` tokens. Each segment's `position_ids` restart at
0; with `attention_mask=None` transformers turns the position resets into a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), so no token attends across a document boundary.

The loss is a chunked cross-entropy: the decoder's hidden states are gathered at the target positions
only, and the vocabulary projection + float32 cross-entropy run over chunks of those rows under
activation checkpointing, so the full [tokens, vocab] float32 logits never exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab import models
from tunelab.errors import UserError

IGNORE = -100
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")  # peft methods that add virtual tokens: no packing


@dataclass
class LMEncoded:
    """Rows of token ids with aligned targets and position ids (packed or one example per row)."""

    input_ids: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row; evaluation sorts rows by it so that a batch pads little."""
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, ids: list[int], targets: list[int], positions: list[int]) -> None:
        """Append one row; the three lists are aligned token by token (same length)."""
        self.input_ids.append(ids)
        self.targets.append(targets)
        self.positions.append(positions)


def shift_targets(ids: list[int], labels: list[int] | None = None) -> list[int]:
    """Targets of one segment: position t predicts labels[t + 1]; the last position predicts nothing."""
    labels = ids if labels is None else labels
    return list(labels[1:]) + [IGNORE]


def pack_stream(segments: list[tuple[list[int], list[int]]], block: int) -> LMEncoded:
    """Concatenate (ids, targets) segments and cut into rows of `block` tokens (the last may be shorter).

    A segment crossing a row boundary continues in the next row as a new segment (positions restart);
    the target of its last token in the first row is dropped, since the token it predicts starts the
    next row's segment with no context."""
    enc = LMEncoded()
    ids, tg, pos = [], [], []
    for seg_ids, seg_tg in segments:
        start = 0
        while start < len(seg_ids):
            take = min(block - len(ids), len(seg_ids) - start)
            piece_tg = list(seg_tg[start:start + take])
            if start + take < len(seg_ids):
                piece_tg[-1] = IGNORE
            ids += seg_ids[start:start + take]
            tg += piece_tg
            pos += range(take)
            start += take
            if len(ids) == block:
                enc.add(ids, tg, pos)
                ids, tg, pos = [], [], []
    if ids:
        enc.add(ids, tg, pos)
    return enc


def pack_bins(segments: list[tuple[list[int], list[int]]], block: int) -> LMEncoded:
    """First-fit-decreasing packing of whole segments (each truncated to `block`) into rows of at most
    `block` tokens: no example is split across rows (SFT conversations)."""
    segs = [(i[:block], t[:block]) for i, t in segments if i]
    order = sorted(range(len(segs)), key=lambda k: -len(segs[k][0]))
    rows: list[list[int]] = []
    free: list[int] = []
    for k in order:
        n = len(segs[k][0])
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(k)
                free[r] -= n
                break
        else:
            rows.append([k])
            free.append(block - n)
    enc = LMEncoded()
    for members in rows:
        ids, tg, pos = [], [], []
        for k in members:
            ids += segs[k][0]
            tg += segs[k][1]
            pos += range(len(segs[k][0]))
        enc.add(ids, tg, pos)
    return enc


def one_per_row(segments: list[tuple[list[int], list[int]]], block: int) -> LMEncoded:
    """No packing: each non-empty segment is one row, truncated to `block` tokens, positions from 0."""
    enc = LMEncoded()
    for ids, tg in segments:
        if ids:
            enc.add(ids[:block], tg[:block], list(range(min(block, len(ids)))))
    return enc


def lm_parts(model):
    """(decoder body, output projection) of a causal LM, through a peft wrapper if any."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    return body, lm.get_output_embeddings()


def lm_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for a collated batch (packed rows carry positions, not a mask)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
            "position_ids": batch.get("position_ids"), "use_cache": False}


def target_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at the batch's target positions -> ([n, hidden], their [n] targets)."""
    body, _ = lm_parts(model)
    hidden = body(**lm_inputs(batch)).last_hidden_state
    sel = batch["targets"] != IGNORE
    return hidden[sel], batch["targets"][sel]


def chunked_sum(fn, *rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of `fn(*chunk of each of rows)` (a scalar each) over chunks of `chunk` rows; with gradients on, each
    chunk runs under activation checkpointing, so what `fn` builds inside (a chunk's logits) is freed at once and
    recomputed in backward."""
    total = rows[0].new_zeros((), dtype=torch.float32)
    for i in range(0, len(rows[0]), chunk):
        part = [r[i:i + chunk] for r in rows]
        total = total + (checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
    return total


def chunked_lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies over the target positions (see the module docstring)."""
    head = lm_parts(model)[1]
    return chunked_sum(lambda h, t: F.cross_entropy(head(h).float(), t, reduction="sum"),
                       *target_hidden(model, batch), chunk=chunk)


def full_logits_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Through the model's own forward (prompt-learning methods add virtual tokens/prefixes there; FSDP
    gathers the root's sharded weights in it). Prompt tuning prepends virtual positions: only the last ones count."""
    logits = model(**lm_inputs(batch)).logits[:, -batch["input_ids"].shape[1]:]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="sum",
                           ignore_index=IGNORE)


class CausalLMTask:
    """Rows {"text"} -> documents (+ EOS) -> packed blocks; metric: validation perplexity (lower is better)."""

    name = "causal_lm"
    metric = "perplexity"
    greater_is_better = False

    def __init__(self, tokenizer, block: int, packing: bool = True, method: str = "full"):
        self.tokenizer = tokenizer
        self.block = block
        self.prompt_learning = method in PROMPT_LEARNING
        self.packing = packing and not self.prompt_learning
        self.through_forward = self.prompt_learning  # set for FSDP: the chunked loss bypasses the root forward
        self.pad_id = tokenizer.pad_token_id
        self.labels: list[str] = []  # no label set

    def segments(self, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        """Rows {"text"} -> (ids, shifted targets) per document: BOS (if any) + text + EOS (if any); every
        position but the last predicts the next token."""
        ids = self.tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        out = []
        for x in ids:
            # a tokenizer whose BOS is its EOS (GPT-2's <|endoftext|>) gets it once, as the separator at the end
            x = ([bos] if bos is not None and bos != eos else []) + x + ([eos] if eos is not None else [])
            out.append((x, shift_targets(x)))
        return out

    def encode(self, rows: list[dict]) -> LMEncoded:
        """Documents packed as one stream into rows of `block` tokens (a document may span rows), or without
        packing one document per row, truncated to `block`."""
        segs = self.segments(rows)
        return pack_stream(segs, self.block) if self.packing else one_per_row(segs, self.block)

    def collate(self, enc: LMEncoded, idx: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded rows. Packed: padding is a segment of its own (positions from 0, no targets) and
        no attention mask is passed, so the block-diagonal mask comes from the positions."""
        width = max(len(enc.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        tg = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        pos = torch.arange(width).repeat(len(idx), 1)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(enc.input_ids[i])
            ids[row, :n] = torch.as_tensor(enc.input_ids[i])
            tg[row, :n] = torch.as_tensor(enc.targets[i])
            pos[row, :n] = torch.as_tensor(enc.positions[i])
            pos[row, n:] = torch.arange(width - n)
            mask[row, :n] = 1
        if self.packing:
            return {"input_ids": ids, "position_ids": pos, "targets": tg}
        return {"input_ids": ids, "attention_mask": mask, "targets": tg}

    @staticmethod
    def units(enc: LMEncoded, idx: list[int]) -> int:
        """Loss terms (predicted tokens) in these rows: accumulation normalises by tokens."""
        return sum(sum(t != IGNORE for t in enc.targets[i]) for i in idx)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of token cross-entropies over the batch's targets, a float32 scalar; `units` gives the
        count to normalise by."""
        if self.through_forward:
            return full_logits_loss_sum(model, batch)
        return chunked_lm_loss_sum(model, batch)

    def through_model_forward(self) -> None:
        """Compute the loss from the full logits of the model's forward (FSDP): the chunked loss runs the
        decoder body and the head apart, bypassing the root forward where FSDP gathers the weights."""
        self.through_forward = True

    def _block_loss_sums(self, model, batch: dict[str, torch.Tensor]) -> list[float]:
        """Each row's summed token cross-entropy from one batched forward (what `loss_sum` adds up)."""
        if self.through_forward:
            logits = model(**lm_inputs(batch)).logits[:, -batch["input_ids"].shape[1]:]
            sel = batch["targets"] != IGNORE
            losses = F.cross_entropy(logits[sel].float(), batch["targets"][sel], reduction="none")
        else:
            head = lm_parts(model)[1]
            hidden, targets = target_hidden(model, batch)
            losses = torch.cat([F.cross_entropy(head(h).float(), t, reduction="none")
                                for h, t in zip(hidden.split(1024), targets.split(1024))])
        return _row_sums(losses, batch["targets"])

    @torch.no_grad()
    def evaluate(self, model, enc: LMEncoded, batch_size: int, per_block: bool = False) -> dict:
        """Mean token loss and perplexity over all target tokens; with `per_block`, each block's (loss sum,
        tokens) in encoded order under `blocks` (for intervals)."""
        model.eval()
        device = next(model.parameters()).device
        total, count, blocks = 0.0, 0, {}
        order = np.argsort(enc.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
            if per_block:
                for i, loss in zip(idx, self._block_loss_sums(model, batch)):
                    blocks[i] = (loss, self.units(enc, [i]))
                total += sum(blocks[i][0] for i in idx)
            else:
                total += float(self.loss_sum(model, batch))
            count += self.units(enc, idx)
        loss = total / max(1, count)
        # math.exp raises OverflowError past ~709: a diverged loss reports a capped perplexity, not a crash
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
        if per_block:
            out["blocks"] = [blocks[i] for i in range(len(enc.input_ids))]
        return out


def _row_sums(values: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per-target values (in row-major order of `targets`' non-ignored positions) summed per row."""
    return [float(part.sum()) for part in values.split((targets != IGNORE).sum(1).tolist())]


def build_lm(cfg, corpus: list[str], task_class):
    """A pretrained causal LM, or with `model.base: scratch` a new one whose tokenizer is trained on `corpus`,
    and `task_class` over it (see `tunelab.tasks.TaskSpec.build`)."""
    mc = cfg.model
    if mc.base == "scratch":
        if cfg.method.name != "full":
            raise UserError("model.base: scratch trains a new model; use method.name: full")
        if mc.hidden_dropout is not None or mc.attention_dropout is not None:
            raise UserError("model.hidden_dropout / attention_dropout set a pretrained base's dropout; a scratch "
                            "model is built without dropout")
        model, tok, base, new = models.build_scratch_lm(mc.scratch, corpus, mc.max_length, cfg.train.seed)
    else:
        model, tok, base, new = models.load_causal_lm(mc.base, mc.trust_remote_code, models.dropout_of(mc))
    return model, tok, base, new, task_class(tok, mc.max_length, mc.packing, cfg.method.name)


def build(cfg, meta: dict, train_rows: list[dict]):
    """Causal language modelling on the dataset's texts."""
    return build_lm(cfg, [r["text"] for r in train_rows], CausalLMTask)

"""Knowledge distillation in the training loop (`train.distill: {teacher, temperature, alpha}`).

The student's loss is (1 - alpha) × the task's own loss + alpha × T² × KL(teacher ‖ student), both distributions
softened by the temperature T (Hinton et al., 2015), summed over the same loss terms as the task's loss: one per
example for classification, one per labelled first sub-token for NER, one per predicted token for causal LM and
SFT (token-level KD), so gradient accumulation normalises both alike. The teacher runs in inference mode beside
the student on each batch.

- Classification / NER: the teacher is a trained model dir of the same task, labels and tokenizer (e.g. the
  6-layer fine-tuned MiniLM for a 3-layer student, or a model before `compress --prune-ffn`). The student's logits
  are read from its own forward (a hook), not computed twice.
- Causal LM / SFT: the teacher is a causal LM or SFT model dir, or a base model (`builtin:…`, a local HF dir),
  with the same tokenizer — e.g. SmolLM2 teaching a small `model.base: scratch` decoder built on its tokenizer
  (`model.scratch.tokenizer`). Like the task's own loss the KD term is chunked: both models' hidden states are
  gathered at the target positions and the two vocabulary projections run chunk by chunk under activation
  checkpointing, so neither [tokens, vocab] logits tensor exists whole. Logits past the tokenizer's size
  (padded embedding rows, no token) take no part in the KL.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab import models
from tunelab.artifacts import kind_of
from tunelab.config import DistillConfig
from tunelab.errors import UserError
from tunelab.models import load_model_dir
from tunelab.tasks import TaskSpec
from tunelab.tasks.causal_lm import PROMPT_LEARNING, chunked_sum, lm_inputs, lm_parts, target_hidden

IGNORE = -100  # positions without a loss term (token classification's padding and non-first sub-tokens)


class Distilled:
    """A task whose `loss_sum` adds the teacher's soft labels; everything else is the task's own."""

    def __init__(self, task, teacher, temperature: float, alpha: float):
        self.task, self.teacher, self.temperature, self.alpha = task, teacher, temperature, alpha

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output):
            seen["logits"] = output.logits

        handle = model.register_forward_hook(keep)
        try:
            hard = self.task.loss_sum(model, batch)
        finally:
            handle.remove()
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = seen["logits"]
        if student.ndim == 3:  # token level: the positions that carry a loss term
            student = student[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual positions
            where = batch["labels"] != IGNORE
            student, teacher = student[where], teacher[where]
        return (1 - self.alpha) * hard + self.alpha * soft_kl(student, teacher, self.temperature)


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T² × KL(teacher ‖ student) of the temperature-softened distributions, summed over the rows (float32)."""
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    log_target=True, reduction="sum") * t * t


class TokenDistilled(Distilled):
    """Token-level KD for causal LM / SFT: the mixed loss at every target position, chunked (module docstring)."""

    def __init__(self, task, teacher, temperature: float, alpha: float, vocab: int):
        super().__init__(task, teacher, temperature, alpha)
        self.vocab = vocab

    def _mixed(self, logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits.float(), targets, reduction="sum")
        v = min(self.vocab, logits.shape[-1], teacher.shape[-1])
        return (1 - self.alpha) * hard + self.alpha * soft_kl(logits[:, :v], teacher[:, :v], self.temperature)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        head_t = lm_parts(self.teacher)[1]
        with torch.no_grad():
            hidden_t, _ = target_hidden(self.teacher, batch)
        if self.task.through_forward:  # prompt learning / FSDP: the student's logits come whole from its forward
            logits = model(**lm_inputs(batch)).logits[:, -batch["input_ids"].shape[1]:]
            where = batch["targets"] != IGNORE
            with torch.no_grad():
                teacher = head_t(hidden_t)
            return self._mixed(logits[where], teacher, batch["targets"][where])
        head = lm_parts(model)[1]

        def mixed(h, h_t, t):
            with torch.no_grad():
                teacher = head_t(h_t)
            return self._mixed(head(h), teacher, t)

        hidden, targets = target_hidden(model, batch)
        return chunked_sum(mixed, hidden, hidden_t, targets)


def _generative_teacher(cfg: DistillConfig):
    """The teacher of a causal LM / SFT student: a generative model dir, or a base model -> (model, tokenizer)."""
    d = Path(cfg.teacher)
    if d.is_dir() and kind_of(d) == "model":
        teacher, tok, meta = load_model_dir(d, tasks=("causal_lm", "sft"))
        if (meta.get("method") or {}).get("name") in PROMPT_LEARNING:
            raise UserError(f"the teacher {d} was trained with {meta['method']['name']} (virtual tokens); "
                            "token-level distillation needs a teacher whose outputs align with the tokens")
        return teacher, tok
    teacher, tok, _, _ = models.load_causal_lm(cfg.teacher)
    return teacher, tok


def distilled(task, spec: TaskSpec, cfg: DistillConfig, tokenizer, device: str) -> Distilled:
    """`task` learning from the teacher `cfg` names; a teacher that cannot teach this student is a `UserError`."""
    if spec.generates:
        teacher, teacher_tok = _generative_teacher(cfg)
        if teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"the teacher {cfg.teacher} has another tokenizer; token-level distillation needs the "
                            "same one (a scratch student can take the teacher's: model.scratch.tokenizer)")
        return TokenDistilled(task, _frozen(teacher, device), cfg.temperature, cfg.alpha, len(tokenizer))
    if not spec.labelled:
        raise UserError(f"train.distill covers classification, NER, causal LM and SFT; '{spec.name}' is not "
                        "distilled here")
    teacher, teacher_tok, meta = load_model_dir(cfg.teacher)
    if meta.get("task") != spec.name:
        raise UserError(f"the teacher {cfg.teacher} is a '{meta.get('task')}' model; this run trains '{spec.name}'")
    if list(meta.get("labels") or []) != list(task.labels):
        raise UserError(f"the teacher's labels {meta.get('labels')} differ from this run's {task.labels}; "
                        "distillation needs the same labels in the same order")
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"the teacher {cfg.teacher} has another tokenizer; distillation here needs the same one")
    return Distilled(task, _frozen(teacher, device), cfg.temperature, cfg.alpha)


def _frozen(teacher, device: str):
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()

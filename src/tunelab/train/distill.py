"""Knowledge distillation in the training loop (`train.distill: {teacher, temperature, alpha}`).

The student's loss is (1 - alpha) × the task's own loss + alpha × T² × KL(teacher ‖ student), both distributions
softened by the temperature T (Hinton et al., 2015), summed over the same loss terms as the task's loss: one per
example for classification, one per labelled first sub-token for NER, so gradient accumulation normalises both
alike. The teacher is a trained model dir of the same task, labels and tokenizer (e.g. the 6-layer fine-tuned
MiniLM for a 3-layer student, or a model before `compress --prune-ffn`); it runs in inference mode beside the
student on each batch. The student's logits are read from its own forward (a hook), not computed twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.config import DistillConfig
from tunelab.errors import UserError
from tunelab.models import load_model_dir
from tunelab.tasks import TaskSpec

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
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                        log_target=True, reduction="sum") * t * t
        return (1 - self.alpha) * hard + self.alpha * soft


def distilled(task, spec: TaskSpec, cfg: DistillConfig, tokenizer, device: str) -> Distilled:
    """`task` learning from the teacher `cfg` names; a teacher that cannot teach this student is a `UserError`."""
    if spec.generates or not spec.labelled:
        raise UserError(f"train.distill covers classification and NER; '{spec.name}' is not distilled here")
    teacher, teacher_tok, meta = load_model_dir(cfg.teacher)
    if meta.get("task") != spec.name:
        raise UserError(f"the teacher {cfg.teacher} is a '{meta.get('task')}' model; this run trains '{spec.name}'")
    if list(meta.get("labels") or []) != list(task.labels):
        raise UserError(f"the teacher's labels {meta.get('labels')} differ from this run's {task.labels}; "
                        "distillation needs the same labels in the same order")
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"the teacher {cfg.teacher} has another tokenizer; distillation here needs the same one")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return Distilled(task, teacher.to(device).eval(), cfg.temperature, cfg.alpha)

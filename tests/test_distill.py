"""`train.distill`: the student learns the teacher's soft labels beside the gold ones."""

import copy

import pytest
import torch

from tunelab.config import DistillConfig
from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.models import load_model_dir, read_meta
from tunelab.tasks import task_spec
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.token_classification import TokenClassificationTask
from tunelab.train.distill import Distilled, distilled


def _batch(task, model_dir, n=6):
    rows = load_split(read_meta(model_dir)["data"]["path"], "train")[:n]
    enc = task.encode(rows)
    return task.collate(enc, list(range(len(rows))))


@pytest.mark.parametrize("which", ["tiny_classifier", "tiny_ner"])
def test_the_soft_term_is_zero_against_itself_and_alpha_zero_is_the_task_loss(which, request):
    d = request.getfixturevalue(which)
    model, tok, meta = load_model_dir(d)
    kind = ClassificationTask if which == "tiny_classifier" else TokenClassificationTask
    task = kind(tok, meta["labels"], 64)
    batch = _batch(task, d)
    with torch.no_grad():
        hard = task.loss_sum(model, batch)
        assert torch.allclose(Distilled(task, copy.deepcopy(model), 2.0, 0.0).loss_sum(model, batch), hard)
        assert Distilled(task, copy.deepcopy(model), 2.0, 1.0).loss_sum(model, batch).abs() < 1e-4
        # a different teacher: a positive soft term, on the same loss terms as the task's
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        assert Distilled(task, other, 2.0, 1.0).loss_sum(model, batch) > 1e-3


def test_a_teacher_must_share_the_task_labels_and_tokenizer(tiny_classifier, tiny_ner, sft_lora):
    model, tok, meta = load_model_dir(tiny_classifier)
    task = ClassificationTask(tok, meta["labels"], 64)
    spec = task_spec("classification")
    with pytest.raises(UserError, match="is a 'token_classification' model"):
        distilled(task, spec, DistillConfig(teacher=str(tiny_ner)), tok, "cpu")
    with pytest.raises(UserError, match="labels"):
        distilled(ClassificationTask(tok, list(reversed(meta["labels"])), 64), spec,
                  DistillConfig(teacher=str(tiny_classifier)), tok, "cpu")
    with pytest.raises(UserError, match="covers classification and NER"):
        distilled(task, task_spec("sft"), DistillConfig(teacher=str(sft_lora)), tok, "cpu")
    ok = distilled(task, spec, DistillConfig(teacher=str(tiny_classifier)), tok, "cpu")
    assert ok.metric == task.metric and not any(p.requires_grad for p in ok.teacher.parameters())


def test_a_student_trains_with_a_teacher(tmp_path, small_dataset, tiny_classifier):
    from conftest import tiny_config

    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = tiny_config(small_dataset, epochs=2, distill={"teacher": str(tiny_classifier), "alpha": 0.7})
    result = train(validate(cfg), tmp_path / "student", show_progress=False)
    assert (tmp_path / "student" / "model" / "tunelab.json").is_file() and result

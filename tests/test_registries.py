"""The registries agree with each other and with the config: every task trains on a known dataset kind, every
dataset kind is one `data prepare --task` accepts and has its row extractor, every task can be built."""

import typing

import pytest
import transformers

from tunelab.config import PrepareOptions, RunConfig
from tunelab.data.dataset import DATASET_KINDS, dataset_kind
from tunelab.data.rows import RowFilter
from tunelab.errors import UserError
from tunelab.tasks import DATASET_TASKS, TASKS


def _choices(model, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_dataset_kinds_are_the_prepare_choices_and_each_has_an_extractor():
    assert set(DATASET_KINDS) == _choices(PrepareOptions, "task")
    for name, kind in DATASET_KINDS.items():
        assert kind.name == name and kind.fields
        assert callable(getattr(RowFilter, f"_extract_{name}"))
        assert set(kind.columns) <= {"text", "label"}
        assert not (kind.labelled and kind.tagged)


def test_tasks_are_the_train_choices_and_train_on_known_dataset_kinds():
    assert set(TASKS) | {"auto"} == _choices(RunConfig, "task")
    assert set(DATASET_TASKS) == set(DATASET_KINDS)
    for kind in DATASET_KINDS:  # one default task per dataset kind (`task: auto`)
        assert sum(s.dataset == kind and s.dataset_default for s in TASKS.values()) == 1
    for spec in TASKS.values():
        assert spec.dataset in DATASET_KINDS
        assert hasattr(transformers, spec.auto_class)
        assert callable(spec.build())
        # a labelled task reads labels from its dataset: classes or tags
        kind = dataset_kind(spec.dataset)
        assert spec.labelled == (kind.labelled or kind.tagged)


def test_label_sets():
    rows = [{"label": "b"}, {"label": "a"}, {"label": "b"}]
    assert dataset_kind("classification").label_set(rows) == ["a", "b"]
    tags = [{"tags": ["B-PER", "I-PER", "O", "B-LOC"]}]
    assert dataset_kind("ner").label_set(tags) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert dataset_kind("text").label_set([{"text": "x"}]) == []


def test_unknown_dataset_kind_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset task 'images'.*classification"):
        dataset_kind("images")


def test_every_task_class_satisfies_the_task_protocol():
    from tunelab.models import load_tokenizer, tiny_model_dir
    from tunelab.tasks import Task
    from tunelab.tasks.causal_lm import CausalLMTask
    from tunelab.tasks.classification import ClassificationTask
    from tunelab.tasks.masked_lm import MaskedLMTask
    from tunelab.tasks.retrieval import RetrievalTask
    from tunelab.tasks.sft import SFTTask
    from tunelab.tasks.token_classification import TokenClassificationTask

    bert, llama = load_tokenizer(str(tiny_model_dir("tiny-bert"))), load_tokenizer(str(tiny_model_dir("tiny-llama")))
    tasks = [ClassificationTask(bert, ["a", "b"], 16), TokenClassificationTask(bert, ["O", "B-X", "I-X"], 16),
             CausalLMTask(llama, 32), SFTTask(llama, 32), MaskedLMTask(bert, 32), RetrievalTask(bert, 32)]
    assert {t.name for t in tasks} == set(TASKS)
    for t in tasks:
        assert isinstance(t, Task), t.name
        assert t.metric == TASKS[t.name].score[0]
        assert t.greater_is_better == TASKS[t.name].score[2]
        assert isinstance(t.labels, list) and isinstance(t.packing, bool)

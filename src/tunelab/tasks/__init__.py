"""Task definitions: how rows become tensors, how loss and predictions are computed, and the registry that
tells the rest of tunelab what each task is.

Outside this package no code compares task names: it asks the task's `TaskSpec` (`task_spec(name)`) what it
needs — which transformers class loads the model, whether there is a label set, whether the model generates,
what the server exposes, which score a report compares. Adding a task is one module here (a class that
satisfies the `Task` protocol, and a `build` function) and one `TaskSpec` in `TASKS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, runtime_checkable

from tunelab.errors import UserError

if TYPE_CHECKING:  # torch is imported by the task modules, not by the registry (start-up)
    import torch


class Encoded(Protocol):
    """A split encoded by a task: one item per example (or packed block), with its length in tokens."""

    @property
    def lengths(self) -> list[int]:
        """Each item's length in tokens (length-grouped batching reads it)."""
        ...

    def __len__(self) -> int: ...


@runtime_checkable
class Task(Protocol):
    """What training (`train.loop`) and evaluation need of a task, whatever it is. A task's `build` returns one."""

    name: str  # its `TaskSpec` name
    metric: str  # the validation score that picks the best step
    greater_is_better: bool
    labels: list[str]  # the label set ([] for language modelling), saved in the model dir
    packing: bool  # examples are packed into blocks (the train line says so)

    def encode(self, rows: list[dict]) -> Encoded:
        """Dataset rows -> the encoded split."""
        ...

    def collate(self, enc: Any, idx: list[int]) -> dict[str, torch.Tensor]:
        """The examples `idx` of an encoded split as one padded batch of tensors."""
        ...

    def units(self, enc: Any, idx: list[int]) -> int:
        """How many loss terms the examples `idx` hold (the normaliser of a gradient-accumulation window)."""
        ...

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sum (not the mean) of the batch's loss terms."""
        ...

    def evaluate(self, model, enc: Any, batch_size: int) -> dict:
        """Scores of the model on an encoded split; holds `metric`."""
        ...

    def through_model_forward(self) -> None:
        """The model is FSDP-sharded, which gathers the root weights in the model's forward only: from now on
        compute the loss through it."""
        ...


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the training task: config `task`, a model dir's `tunelab.json` task
    dataset: str  # the dataset kind it trains on (`data prepare --task`)
    auto_class: str  # the transformers Auto class that loads its model
    peft_task_type: str  # peft's TaskType for its adapters
    labelled: bool  # a label set and a classification head (sequence or token level)
    generates: bool  # a causal LM: perplexity reports, generation, chat, the forgetting probe
    conversations: bool  # chat SFT: chat template, loss on the assistant's tokens only
    # what `tunelab serve` exposes (embed: /v1/embeddings, mean-pooled); None: a stage
    served_as: Literal["classify", "entities", "generate", "embed"] | None
    report: Literal["classes", "entities", "language", "masked", "retrieval"]  # which report `tunelab eval` writes
    score: tuple[str, str, bool]  # the report's headline score: (key, name, higher is better)
    stratify: str | None  # the row field a seeded subset keeps balanced (`data.split.seeded_subset`)
    module: str  # the module holding its `build(cfg, meta, train_rows)`
    # `task: auto` on its dataset kind picks it (one per kind); another task on that kind is said explicitly
    dataset_default: bool = True

    def build(self) -> Callable:
        """The task's `build(cfg, meta, train_rows) -> (model, tokenizer, BaseRef, new params, task)`,
        imported on first use (a task's module pulls in its model classes)."""
        return importlib.import_module(self.module).build


TASKS = {spec.name: spec for spec in (
    TaskSpec("classification", "classification", "AutoModelForSequenceClassification", "SEQ_CLS", labelled=True,
             generates=False, conversations=False, served_as="classify", report="classes",
             score=("macro_f1", "macro-F1", True), stratify="label", module="tunelab.tasks.classification"),
    TaskSpec("token_classification", "ner", "AutoModelForTokenClassification", "TOKEN_CLS", labelled=True,
             generates=False, conversations=False, served_as="entities", report="entities",
             score=("entity_f1", "entity F1", True), stratify=None, module="tunelab.tasks.token_classification"),
    TaskSpec("causal_lm", "text", "AutoModelForCausalLM", "CAUSAL_LM", labelled=False, generates=True,
             conversations=False, served_as="generate", report="language",
             score=("perplexity", "perplexity", False), stratify=None, module="tunelab.tasks.causal_lm"),
    TaskSpec("sft", "sft", "AutoModelForCausalLM", "CAUSAL_LM", labelled=False, generates=True, conversations=True,
             served_as="generate", report="language", score=("perplexity", "perplexity", False), stratify=None,
             module="tunelab.tasks.sft"),
    # continued pretraining of an encoder: its model dir is a stage, the base of a later run (served_as None)
    TaskSpec("masked_lm", "text", "AutoModelForMaskedLM", "FEATURE_EXTRACTION", labelled=False, generates=False,
             conversations=False, served_as=None, report="masked", score=("perplexity", "perplexity", False),
             stratify=None, module="tunelab.tasks.masked_lm", dataset_default=False),
    # contrastive fine-tuning of a sentence encoder on (query, passage) pairs: its model dir is a plain encoder that
    # `tunelab index build --encoder` and `tunelab serve` (/v1/embeddings) use as they use a base encoder
    TaskSpec("retrieval", "retrieval", "AutoModel", "FEATURE_EXTRACTION", labelled=False, generates=False,
             conversations=False, served_as="embed", report="retrieval", score=("mrr@10", "MRR@10", True),
             stratify=None, module="tunelab.tasks.retrieval"),
)}
# dataset task (`data prepare --task`) -> the training task `task: auto` picks for it
DATASET_TASKS = {spec.dataset: spec.name for spec in TASKS.values() if spec.dataset_default}


def task_spec(name: str | None, where: str = "") -> TaskSpec:
    """The spec of training task `name`; an unknown name is a `UserError` (naming `where` it was read)."""
    spec = TASKS.get(name)  # type: ignore[arg-type]
    if spec is None:
        raise UserError(f"{where + ': ' if where else ''}unknown task '{name}' (known: {', '.join(TASKS)})")
    return spec


def refuse_stage(task: str | None, where: str, use: str) -> TaskSpec:
    """The spec of the model dir `where`'s task; a stage's model dir (masked LM: no task head, nothing to serve)
    is a `UserError` saying that `use` needs a fine-tuned model and how to make one from it."""
    spec = task_spec(task, where)
    if spec.served_as is None:
        raise UserError(f"{where} is a {spec.name} model dir, a stage, not a model to {use}: fine-tune it for a "
                        f"task (model.base: {where} in a classification or NER run), then {use} that model")
    return spec


def tasks_where(**flags) -> tuple[str, ...]:
    """The names of the tasks whose spec has these values, e.g. `tasks_where(labelled=True)`."""
    return tuple(s.name for s in TASKS.values() if all(getattr(s, k) == v for k, v in flags.items()))

"""The models one server holds, by id, and the engine behind each.

A MODEL argument is a tunelab model dir (classification -> /v1/classify; token_classification (NER) ->
/v1/entities; causal_lm / sft -> chat and text completions), an export dir (`tunelab export`), or a base model
(builtin:…, tiny-llama, an HF dir, a .gguf): decoders are served for generation, encoders for embeddings (told
apart by `config.json`, so an encoder never generates); a run dir, or anything else that is no model, is refused
before the server starts. `NAME=PATH` sets the id; otherwise a model dir is named after its run
(`runs/NAME/model` -> NAME), an export or ensemble dir after itself and a built-in after itself
(`smollm2-135m-instruct`). An ensemble dir (`tunelab ensemble`) is served at its members' route.

The engine follows the model: model dirs and base models run in PyTorch; an ONNX export (fp32 or int8) runs in
ONNX Runtime behind the same micro-batching (`export.onnx.OnnxEncoder`); a GGUF export runs in llama.cpp
(`serve.llamacpp`), its prompts rendered and tokenised by the tokenizer the model was trained with. In PyTorch,
`precision` (auto: bf16 where the hardware has it natively) is an autocast for encoders and the dtype of a
generator's weights, cast once its adapters are loaded (`serve.precision`).

LoRA model dirs on the same base share one copy of the base and one engine: each sequence in a batch
runs through its own adapter (peft's mixed-adapter batches).

`registry:NAME@ALIAS` (or `registry:NAME:VERSION`, pinned) serves a version of the model registry
(`tunelab.registry`), its files verified first; it is named NAME, and an alias is followed (`serve.follow`): its
`Spec.follow` is the alias and `Served.version` the version answering.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tunelab.artifacts import kind_of
from tunelab.assets import builtin_path
from tunelab.ensemble import Ensemble, read_ensemble
from tunelab.errors import UserError, read_json_file
from tunelab.evaluate import drift
from tunelab.evaluate.drift import classifier_outputs
from tunelab.generate import base_kind, load_generator
from tunelab.model_files import check_model_folder, check_tokenizer_folder
from tunelab.models import (META_FILE, BaseRef, load_model_dir, load_pretrained, load_tokenizer, max_length_of,
                            quiet_transformers, read_meta, resolve_base, sentence_embeddings)
from tunelab.recommend.serving import Recommendations
from tunelab.serve.drift import DriftTracker, Observer, RequestLog
from tunelab.serve.engine import GenerationEngine, MicroBatcher
from tunelab.serve.logprobs import TokenTexts
from tunelab.serve.precision import decoding_precision
from tunelab.serve.protocol import APIError, ModelCard, bad_request
from tunelab.tasks import refuse_stage, task_spec, tasks_where
from tunelab.tasks.token_classification import TokenClassificationTask
from tunelab.train.precision import autocast, resolve_precision

log = logging.getLogger("tunelab.serve")

PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
ENCODER_CHUNK = 16  # texts per forward inside a micro-batch (length-sorted)
TORCH_ENGINES = ("pytorch", "ensemble")  # encoders computed in PyTorch, under bf16 autocast where native
ROUTE_OF_KIND = {"generate": "/v1/chat/completions or /v1/completions", "classify": "/v1/classify",
                 "entities": "/v1/entities", "embed": "/v1/embeddings", "recommend": "/v1/recommend"}


@dataclass
class Spec:
    """A MODEL argument, checked before the server starts (loading happens later, in the background)."""
    id: str
    ref: str
    kind: str  # generate | classify | entities | embed | recommend
    engine: str = "pytorch"  # pytorch | onnxruntime | llama.cpp | ensemble | recommender
    base: str | None = None  # for LoRA model dirs: the base they share
    meta: dict = field(default_factory=dict)
    follow: str | None = None  # a registry alias (NAME@ALIAS) whose moves the server follows
    version: str | None = None  # the registry version it holds: NAME:VERSION (12 hex characters)


@dataclass
class Served:
    """A loaded model as the routes see it: a generation `engine` (`adapter`: its LoRA's name when the engine is
    shared, else None) or an encoder `batcher`; `created` is the load time, Unix seconds."""

    id: str
    kind: str
    created: int
    runtime: str = "pytorch"  # the engine's name, as /v1/models lists it
    tokenizer: object = None
    engine: GenerationEngine | None = None
    batcher: MicroBatcher | None = None
    adapter: str | None = None
    context: int = 0  # generation: prompt + max_tokens must fit
    version: str | None = None  # a registry version: NAME:VERSION (12 hex characters)
    rag: object = None  # a knowledge-base model: its `tunelab.rag.answer.Assistant` (retrieval, prompt, check)
    recommender: object = None  # a recommender dir: its `tunelab.recommend.serving.Recommendations`
    precision: str | None = None  # PyTorch models: bf16 or fp32 (what generation decodes in, encoders autocast to)
    _token_texts: TokenTexts | None = field(default=None, repr=False)

    def close(self) -> None:
        """Stop its engine or micro-batcher (queued work still gets its answer or error event)."""
        worker = self.engine or self.batcher
        if worker is not None:
            worker.close()

    def busy(self) -> bool:
        """Whether work is still queued or running on it (a retired version is closed once it is not)."""
        if self.batcher is not None:
            return self.batcher.pending() > 0
        if self.engine is not None and hasattr(self.engine, "load"):
            return any(self.engine.load())
        return False

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the model's chat template, ending in the assistant header (unless
        `add_generation_prompt` is False); a 400 when there is no template or it rejects the messages."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request(f"model '{self.id}' has no chat template; use /v1/completions", param="model")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja: the template rejected this conversation (e.g. role order)
            raise bad_request(f"the chat template of '{self.id}' rejects these messages: "
                              f"{str(err)[:200]}", param="messages") from None
        return tok(text, add_special_tokens=False)["input_ids"]  # the template writes the special tokens: no second BOS

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with the tokenizer's special tokens (e.g. BOS); an empty result is a 400."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        return ids

    def token_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        """A prompt given as token ids, used as they are (no special tokens added); a 400 naming `param` for an id
        outside the vocabulary (of the tokenizer, and of the model's embeddings when it has fewer)."""
        size = min(len(self.tokenizer), getattr(self.engine, "vocab_size", None) or len(self.tokenizer))
        bad = next((t for t in ids if t >= size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary of '{self.id}' (0 to {size - 1})",
                              param=param)
        return ids

    def token_texts(self) -> TokenTexts:
        """The text and bytes of each token id, for log-probabilities (built on first use; shared)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts


def parse_spec(item: str, embedding: bool = False, registry=None) -> Spec:
    """One MODEL argument (`REF` or `NAME=REF`) -> its Spec, from metadata and config alone (no weights); one that
    cannot be served is a `UserError`. `embedding`: a base model is served for embeddings, even a decoder.
    `registry`: the `tunelab.registry.Registry` that `registry:` references name (opened when None)."""
    # an existing path that contains "=" is a path, not NAME=PATH
    name, ref = (item.split("=", 1) if "=" in item and not Path(item).exists() else (None, item))
    if not ref:
        raise UserError(f"'{item}': empty model reference")
    if ref.startswith("registry:"):
        return registry_spec(ref.removeprefix("registry:"), name, registry)
    d = Path(ref)
    folder = kind_of(d)
    if folder == "run":
        raise UserError(f"{ref} is a run dir; serve its model: {d / 'model'}" if (d / "model").is_dir() else
                        f"{ref} is a run dir without a model/ yet (its training has not finished)")
    if folder == "export":
        return _export_spec(d, name)
    if folder == "ensemble":
        meta = read_ensemble(d)
        return Spec(name or d.name, ref, refuse_stage(meta.get("task"), str(d), "serve").served_as, "ensemble",
                    meta=meta)
    if folder == "recommender":
        return Spec(name or d.name, ref, "recommend", "recommender", meta=read_json_file(d / META_FILE, ref))
    if folder not in (None, "model", "unknown"):
        raise UserError(f"{ref} is a tunelab {folder}, not a model")
    if (d / META_FILE).is_file():
        meta = read_meta(d)
        kind = refuse_stage(meta.get("task"), str(d), "serve").served_as
        method = (meta.get("method") or {}).get("name")
        if kind == "generate" and method in PROMPT_LEARNING:
            raise UserError(f"{d}: {method}-tuned models are not served (their virtual tokens do not "
                            "batch); use `tunelab generate`, or train with LoRA")
        lora = (d / "adapter_config.json").is_file() and method in ("lora", "adalora")
        default = d.parent.name if d.name == "model" and d.parent.name else d.name
        return Spec(name or default, ref, kind, base=meta["base"]["ref"] if lora else None, meta=meta)
    if ref.startswith("builtin:"):
        builtin_path(ref)  # unknown or not installed: say so now, not after the server has started
    default = ref.removeprefix("builtin:") if ref.startswith("builtin:") else d.name.removesuffix(".gguf")
    kind = base_kind(ref)
    return Spec(name or default, ref, "embed" if embedding else kind)


def registry_spec(ref: str, name: str | None, registry) -> Spec:
    """`NAME@ALIAS` (followed) or `NAME:VERSION` (pinned) of the model registry -> the Spec of that version's
    folder in the store, its files verified; served as `name`, else as NAME."""
    from tunelab.registry import Registry  # SQLAlchemy: only for registry models

    if registry is None:
        with Registry() as reg:
            return registry_spec(ref, name, reg)
    record, path = registry.resolve(ref)
    spec = parse_spec(f"{name or record['name']}={path}")
    spec.base = None  # a followed version is loaded alone: its engine is swapped, never shared
    spec.follow = ref if "@" in ref else None
    spec.version = version_label(record)
    return spec


def version_label(record: dict) -> str:
    """NAME:VERSION with the version's first 12 hex characters, as the server shows it."""
    return f"{record['name']}:{record['version'][:12]}"


def _export_spec(d: Path, name: str | None) -> Spec:
    """An export dir: ONNX (encoders) runs in ONNX Runtime, GGUF (decoders) in llama.cpp."""
    meta = read_json_file(d / META_FILE, f"{d} has no {META_FILE}")
    fmt, task = meta.get("format"), meta.get("task")
    files = {"onnx": "model.onnx", "gguf": "model.gguf"}
    if fmt not in files:
        source = (meta.get("source") or {}).get("model_dir")
        raise UserError(f"{d} is a {fmt} export; serve the model dir it came from ({source}), or its ONNX or GGUF "
                        "export")
    if not (d / files[fmt]).is_file():
        raise UserError(f"{d} is a {fmt} export without its {files[fmt]}")
    if not (d / "tokenizer_config.json").is_file():
        raise UserError(f"{d} has no tokenizer files (an export of an older tunelab); export it again")
    check_tokenizer_folder(d)
    if fmt == "onnx":
        kind = "embed" if task == "embeddings" else task_spec(task, str(d)).served_as
        return Spec(name or d.name, str(d), kind, "onnxruntime", meta=meta)
    return Spec(name or d.name, str(d), "generate", "llama.cpp", meta=meta)


def load_encoder(s: Spec, device: str, task: str):
    """(model, tokenizer, meta) of an encoder: a model dir in PyTorch, or an ONNX export in ONNX Runtime (the same
    call, see `OnnxEncoder`)."""
    if s.engine == "onnxruntime":
        from tunelab.export.onnx import OnnxEncoder  # ONNX Runtime: only for an ONNX export

        return OnnxEncoder(Path(s.ref) / "model.onnx"), load_tokenizer(BaseRef(s.ref, Path(s.ref))), s.meta
    return load_model_dir(s.ref, device, tasks=(task,))


def check_specs(items: list[str], embedding_model: str | None, registry=None) -> list[Spec]:
    """Every MODEL argument's Spec, plus `embedding_model`'s when no argument is served for embeddings; two models
    with one id are a `UserError`. `registry`: a callable -> the `tunelab.registry.Registry` of `registry:` models
    (called only when there is one)."""
    reg = registry() if registry is not None and any(i.split("=", 1)[-1].startswith("registry:") for i in items) \
        else None
    try:
        specs = [parse_spec(i, registry=reg) for i in items]
    finally:
        if reg is not None:
            reg.close()
    if embedding_model and not any(s.kind == "embed" for s in specs):
        specs.append(parse_spec(embedding_model, embedding=True))
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"two models would be served as '{dup[0]}'; name them with NAME=PATH")
    return specs


@dataclass
class RagSpec:
    """A `--rag [ID=]INDEX[@MODEL]` argument: the id served, the index folder, the generation model answering."""
    id: str
    index: Path
    model: str


def check_rag(items: list[str], specs: list[Spec]) -> list[RagSpec]:
    """Every `--rag` argument's RagSpec, checked before the server starts: the folder is an index, the model is a
    served generation model (not a followed registry alias, whose engine is swapped under it), the id is new."""
    gens = {s.id: s for s in specs if s.kind == "generate"}
    taken, out = {s.id for s in specs}, []
    for item in items:
        name, _, rest = item.partition("=") if "=" in item.split("@")[0] else ("", "", item)
        head, at, tail = rest.rpartition("@")
        if at and tail not in gens and kind_of(Path(head)) == "index":
            raise UserError(f"--rag {item}: '{tail}' is not a served generation model (served: "
                            f"{', '.join(gens) or 'none'})")
        where, model = (head, tail) if at and tail in gens else (rest, "")
        if not model:
            if len(gens) != 1:
                raise UserError(f"--rag {item}: " + ("name the generation model that answers: INDEX@MODEL, one of "
                                                     f"{', '.join(gens)}" if gens else "serve a generation model "
                                                     "(an instruct model) to write the answers"))
            model = next(iter(gens))
        if gens[model].follow:
            raise UserError(f"--rag {item}: '{model}' follows a registry alias; a knowledge-base model needs a fixed "
                            "version (registry:NAME:VERSION)")
        index = Path(where)
        if kind_of(index) != "index":
            raise UserError(f"--rag {item}: {index} is not a tunelab index (build one with `tunelab index build`)")
        rid = name or index.resolve().name
        if rid in taken:
            raise UserError(f"--rag {item}: a model is already served as '{rid}'; name it with ID=INDEX")
        taken.add(rid)
        out.append(RagSpec(rid, index, model))
    return out


class Registry:
    """The server's models: `specs` checked before start, `models` (id -> Served) filled by `load` on a
    background thread; `ready` once every one is loaded."""

    def __init__(self, specs: list[Spec], settings, metrics, device: str):
        self.specs, self.settings, self.metrics, self.device = specs, settings, metrics, device
        self.models: dict[str, Served] = {}
        self.rag = check_rag(settings.rag, specs)
        self.ready = False
        self.retiring: list[Served] = []  # replaced versions still finishing their work (`serve.follow`)
        self.request_log = None if settings.request_log is None else RequestLog(
            settings.request_log, settings.request_log_sample, int(settings.request_log_max_mb * 2 ** 20))

    # ---- lookup ----------------------------------------------------------------------------------
    def get(self, model_id: str, kind: str) -> Served:
        """The model `model_id` if it is served as `kind` (the calling route's); a 404 when there is no such model, a
        400 naming its route when it is served as another kind."""
        served = self.models.get(model_id)
        if served is None:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        if served.kind != kind:
            raise bad_request(f"'{model_id}' is served at {ROUTE_OF_KIND[served.kind]}", param="model",
                              code="wrong_model_kind")
        return served

    def listing(self) -> list[ModelCard]:
        """The loaded models as /v1/models lists them; in argument order once `ready`."""
        return [ModelCard(id=s.id, created=s.created, tunelab_kind=s.kind, tunelab_engine=s.runtime,
                          tunelab_precision=s.precision, tunelab_version=s.version) for s in self.models.values()]

    # ---- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model and start its engine; `ready` once all are up."""
        quiet_transformers()
        groups: dict[str, list[Spec]] = {}
        for s in self.specs:
            if s.kind == "generate" and s.base is not None:
                groups.setdefault(s.base, []).append(s)
        for s in self.specs:
            if s.kind == "generate" and s.base is not None:
                if groups[s.base][0] is s:  # a group's first spec loads the whole group
                    for served in self._add_generator(groups[s.base]):
                        self.models[served.id] = served
            else:
                self.models[s.id] = self.build(s)
        self.models = {s.id: self.models[s.id] for s in self.specs}  # listing in argument order
        for r in self.rag:
            self.models[r.id] = self._add_rag(r)
        if self.metrics is not None:
            for model_id in self.models:
                self.metrics.queue_capacity.labels(model_id).set(self.settings.max_waiting)
        self.ready = True

    def build(self, s: Spec) -> Served:
        """Load the model of one spec (not a LoRA group's) and start its engine -> its `Served`, not yet listed."""
        if s.engine == "llama.cpp":
            served = self._add_llamacpp(s)
        elif s.engine == "ensemble":
            served = self._add_ensemble(s)
        elif s.engine == "recommender":
            served = Served(s.id, "recommend", int(time.time()), runtime="tunelab", recommender=Recommendations(s.ref))
        elif s.kind == "classify":
            served = self._add_classifier(s)
        elif s.kind == "entities":
            served = self._add_entities(s)
        elif s.kind == "embed":
            served = self._add_embedder(s)
        else:
            served = self._add_generator([s])[0]
        served.version = s.version
        return served

    def close(self) -> None:
        """Stop every engine and micro-batcher started so far (the server's shutdown)."""
        for served in [*self.models.values(), *self.retiring]:
            served.close()

    def _add_generator(self, specs: list[Spec]) -> list[Served]:
        from transformers import AutoTokenizer  # transformers: seconds; the server binds and answers /health first

        first = specs[0]
        gen = load_generator(first.ref, self.device)  # a model dir's own stop tokens, or the base's chat stops
        model, tok, stops = gen.model, gen.tokenizer, list(gen.stop)
        adapters, tokenizers = {first.id: "default" if len(specs) > 1 else None}, {first.id: tok}
        for s in specs[1:]:
            check_model_folder(s.ref, s.meta.get("files"))
            check_tokenizer_folder(s.ref)
            model.load_adapter(s.ref, adapter_name=s.id)
            adapters[s.id] = s.id
            tokenizers[s.id] = AutoTokenizer.from_pretrained(s.ref)
            stops += list(s.meta.get("stop") or [])
        model.eval()
        precision = decoding_precision(model, self.settings.precision, self.device)  # adapters included
        for t in tokenizers.values():  # the first call resets truncation/padding state (a write): do it now, once,
            t("warm-up")               # not in the worker threads that tokenise prompts concurrently
        vocab = tok.get_vocab()
        stop_ids = sorted({vocab[t] for t in stops if t in vocab})
        cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        engine = GenerationEngine(model, tok, stop_ids, max_batch=self.settings.max_batch,
                                  max_waiting=self.settings.max_waiting, name=first.id, metrics=self.metrics,
                                  multi_adapter=len(specs) > 1)
        context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        log.info("loaded %s for generation (%s, %s)", ", ".join(s.id for s in specs),
                 "shared base, LoRA per request" if len(specs) > 1 else "one model", precision)
        return [Served(s.id, "generate", int(time.time()), "pytorch", tokenizers[s.id], engine=engine,
                       adapter=adapters[s.id], context=context, version=s.version, precision=precision)
                for s in specs]

    def _add_rag(self, r: RagSpec) -> Served:
        """A knowledge-base model: its generation model's engine, with an `Assistant` over the index."""
        from tunelab.rag.answer import AnswerSettings, Assistant  # FAISS, bm25s: only with --rag
        from tunelab.rag.index import Index

        st = self.settings
        assistant = Assistant(Index.load(r.index), AnswerSettings(top_k=st.rag_top_k, min_score=st.rag_min_score,
                                                                  handoff=st.rag_handoff))
        assistant.retrieve([{"role": "user", "content": "warm-up"}])  # tokenizer state, BM25 loaded: before requests
        log.info("loaded %s: %s answered by %s", r.id, r.index, r.model)
        return replace(self.models[r.model], id=r.id, created=int(time.time()), rag=assistant)

    def _add_llamacpp(self, s: Spec) -> Served:
        """A GGUF export in llama.cpp: `max_batch` slots of `gguf_context` tokens (at most the file's context)."""
        from tunelab.serve.llamacpp import LlamaCppEngine, gguf_context  # llama.cpp: only for a GGUF export

        d = Path(s.ref)
        tok = load_tokenizer(BaseRef(s.ref, d))
        tok("warm-up")  # the first call writes tokenizer state: once, here, not in concurrent request threads
        context = min(self.settings.gguf_context, gguf_context(d / "model.gguf") or self.settings.gguf_context)
        engine = LlamaCppEngine(d / "model.gguf", self.settings.max_batch, context, self.settings.max_waiting,
                                name=s.id, metrics=self.metrics)
        log.info("loaded %s for generation (llama.cpp, %d slots of %d tokens)", s.id, self.settings.max_batch,
                 context)
        return Served(s.id, "generate", int(time.time()), "llama.cpp", tok, engine=engine, context=context)

    def _encoder(self, s: Spec, task: str):
        return load_encoder(s, self.device, task)

    def _add_classifier(self, s: Spec) -> Served:
        model, tok, meta = self._encoder(s, "classification")
        labels, max_length = list(meta["labels"]), max_length_of(meta)
        observer = self._observer(s, tok, max_length, labels)
        embed = observer is not None and observer.wants_embeddings and s.engine == "pytorch"

        def head(enc) -> list[dict]:
            probs, vectors = classifier_outputs(model, enc, embed)
            rows = probs.tolist()
            return [{"label": labels[max(range(len(p)), key=p.__getitem__)],
                     "probabilities": {lab: round(x, 6) for lab, x in zip(labels, p)},
                     "_observed": (p, None if vectors is None else vectors[k].cpu().numpy())}
                    for k, p in enumerate(rows)]

        def after(texts: list[str], ids: list[list[int]], out: list[dict]) -> None:
            seen = [r.pop("_observed") for r in out]
            if observer is None:
                return
            try:
                observer.observe(texts, ids, np.array([p for p, _ in seen], dtype=np.float32),
                                 np.stack([v for _, v in seen]) if embed and seen else None)
            except Exception:  # noqa: BLE001 - watching must not fail the answer; a bug here is logged whole
                log.exception("observing the traffic of %s failed", s.id)

        return self._add_encoder(s, "classify", self._encoder_run(tok, max_length, head, after), tok)

    def _observer(self, s: Spec, tok, max_length: int, labels: list[str]) -> Observer | None:
        """The drift window (when the model dir has a profile and drift checks are on) and the request log (when
        one is configured) of a classifier; None when neither."""
        st = self.settings
        profile = drift.load_profile(s.ref) if st.drift_window > 0 else None
        if profile is not None and profile.labels != labels:
            log.warning("%s: its drift profile's labels differ from the model's; no drift checks", s.id)
            profile = None
        tracker = None if profile is None else DriftTracker(s.id, profile, st, self.metrics, s.version,
                                                            embeddings=s.engine == "pytorch")
        if tracker is None and self.request_log is None:
            return None
        if tracker is not None:
            log.info("%s: drift checks every %d texts over the last %d, against %d %s rows", s.id, st.drift_every,
                     st.drift_window, len(profile.features), profile.source)
        return Observer(s.id, tok, max_length, labels, tracker, self.request_log, s.version)

    def _add_entities(self, s: Spec) -> Served:
        """An NER model dir: texts -> {"entities": [{"type", "text", "start", "end", "score"}], "tokens"} each,
        character offsets into the text (`TokenClassificationTask.text_entities`)."""
        model, tok, meta = self._encoder(s, "token_classification")
        task = TokenClassificationTask(tok, list(meta["labels"]), max_length_of(meta))
        precision = resolve_precision(self.settings.precision, self.device)

        def run(texts: list[str]) -> list[dict]:
            with autocast(precision, self.device):  # the task's loop sorts by length, ENCODER_CHUNK per forward
                return task.text_entities(model, texts, ENCODER_CHUNK)

        return self._add_encoder(s, "entities", run, tok)

    def _add_ensemble(self, s: Spec) -> Served:
        """An ensemble dir (`tunelab.ensemble`): served at its members' route, answering as one model (no drift
        checks: there is no one reference profile)."""
        ens = Ensemble(s.ref, self.device, tasks=tasks_where(labelled=True))
        precision = resolve_precision(self.settings.precision, self.device)

        def run(texts: list[str]) -> list[dict]:
            with autocast(precision, self.device):
                return ens.serve(texts, ENCODER_CHUNK)

        return self._add_encoder(s, s.kind, run, ens.tokenizer)

    def _add_embedder(self, s: Spec) -> Served:
        from transformers import AutoModel  # loads with the models, as above

        if s.engine == "onnxruntime":  # the export pools and normalises in its graph
            model, tok, meta = self._encoder(s, "embeddings")
            vectors = self._encoder_run(tok, max_length_of(meta), lambda enc: [
                {"embedding": v} for v in model(**enc).embeddings.tolist()])
            return self._add_encoder(s, "embed", vectors, tok)
        base = resolve_base(s.ref)
        tok = load_tokenizer(base)
        model = load_pretrained(AutoModel, base, dtype=torch.float32).to(self.device).eval()
        max_length = min(int(getattr(model.config, "max_position_embeddings", 512) or 512), 512)

        def pool(enc) -> list[dict]:
            vectors = sentence_embeddings(model(**enc).last_hidden_state.float(), enc["attention_mask"])
            return [{"embedding": v} for v in vectors.tolist()]

        return self._add_encoder(s, "embed", self._encoder_run(tok, max_length, pool), tok)

    def _encoder_run(self, tok, max_length: int, forward, after=None):
        """texts -> one result dict per text (with its token count), in order. The texts of a micro-batch are
        sorted by length and run in chunks, so that short texts are not padded to the longest of the batch;
        under bf16 autocast where the hardware has it (`precision`). `after(texts, ids, results)` sees the
        micro-batch's results before they are answered."""
        precision = resolve_precision(self.settings.precision, self.device)

        def run(texts: list[str]) -> list[dict]:
            ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
            order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
            out: list[dict | None] = [None] * len(texts)
            for start in range(0, len(order), ENCODER_CHUNK):
                part = order[start:start + ENCODER_CHUNK]
                enc = tok.pad({"input_ids": [ids[i] for i in part]}, return_tensors="pt").to(self.device)
                with autocast(precision, self.device):
                    results = forward(enc)
                for i, r in zip(part, results):
                    out[i] = {**r, "tokens": len(ids[i])}
            if after is not None:
                after(texts, ids, out)
            return out

        return run

    def _add_encoder(self, s: Spec, kind: str, run, tok) -> Served:
        batcher = MicroBatcher(run, max_batch=self.settings.encoder_batch,
                               max_wait_ms=self.settings.encoder_wait_ms, max_waiting=self.settings.max_waiting,
                               name=s.id, metrics=self.metrics)
        precision = resolve_precision(self.settings.precision, self.device) if s.engine in TORCH_ENGINES else None
        log.info("loaded %s for %s (%s%s)", s.id, ROUTE_OF_KIND[kind], s.engine, f", {precision}" if precision else "")
        return Served(s.id, kind, int(time.time()), s.engine, tok, batcher=batcher, precision=precision)


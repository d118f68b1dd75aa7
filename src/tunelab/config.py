"""Typed run configuration: YAML file + dotted `key=value` overrides, validated by pydantic.

Unknown keys and bad values fail at load with the dotted name of the key (`UserError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from tunelab.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CleanConfig(Section):
    """Text and label cleaning steps of `data prepare`; each can be switched off, each is counted."""

    fix_text: bool = Field(True, description="repair mojibake with ftfy (non-ASCII texts only); keeps full-width "
                           "characters and curly quotes")
    fold_width: bool = Field(False, description="full-width ASCII letters, digits and punctuation to ASCII "
                             "(ＡＢＣ１２３！ -> ABC123!; ftfy fix_character_width), counted as width_folded; off: "
                             "full-width punctuation is normal in Chinese and Japanese text")
    unicode_form: Literal["NFC", "NFKC"] | None = "NFC"
    strip_invisible: bool = Field(True, description="remove control and zero-width characters")
    collapse_whitespace: bool = True
    urls: Literal["keep", "replace", "remove"] = "keep"
    mentions: Literal["keep", "replace", "remove"] = "keep"
    hashtags: Literal["keep", "strip_hash", "remove"] = "keep"
    min_chars: int = Field(1, ge=1)
    max_chars: int | None = Field(None, gt=0)
    min_words: int | None = Field(None, gt=0)
    max_words: int | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, gt=0, description="counted with `tokenizer` (no special tokens)")
    max_tokens: int | None = Field(None, gt=0, description="counted with `tokenizer` (no special tokens)")
    tokenizer: str = Field("builtin:minilm-l6", description="model whose tokenizer counts min/max_tokens; use "
                           "the model you will train")
    lowercase_labels: bool = False
    label_map: dict[str, str] = Field(default_factory=dict, description="rename labels (after strip/lower)")
    labels: list[str] | None = Field(None, description="allowed labels; others are dropped as unknown_label")


class PiiConfig(Section):
    enabled: bool = True
    types: list[Literal["secret", "email", "credit_card", "ip", "phone"]] = ["secret", "email", "credit_card",
                                                                           "ip", "phone"]


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity of word 1..n-gram shingles")
    ngram: int = Field(2, ge=1, le=5)
    num_perm: int = Field(64, ge=8, le=512)
    near_action: Literal["drop", "group"] = Field(
        "drop", description="drop: keep one row per group; group: keep all, in one split")


class AugmentConfig(Section):
    """Opt-in augmentation of the train split (originals kept; new rows counted separately)."""

    enabled: bool = False
    ops: list[Literal["swap", "delete", "synonym", "paraphrase"]] = ["swap", "delete", "synonym"]
    per_example: int = Field(1, ge=1, le=10, description="new texts per original and EDA operation")
    p: float = Field(0.1, gt=0, lt=1, description="share of words an EDA operation touches")
    max_examples: int | None = Field(None, gt=0, description="augment a seeded sample of this many originals")
    synonym_model: str = "builtin:minilm-l6"
    paraphrase_model: str = "builtin:smollm2-135m-instruct"
    filter: Literal["classifier", "none"] = Field(
        "classifier", description="keep a new text only if TF-IDF + LR fit on the originals agrees on its label")


class PrepareOptions(Section):
    """Everything `data prepare` does to a source besides naming it."""

    task: Literal["classification", "text", "sft", "ner", "retrieval"] = Field(
        "classification", description="classification: text + label; text: documents (pretraining); "
        "sft: conversations as messages; ner: tokens + BIO tags; retrieval: query + passage pairs (columns "
        "query/question/anchor and passage/answer/positive, or --text-column / --label-column; hard negatives in "
        "negative or negatives), a query's pairs kept in one split")
    text_column: str | None = None
    label_column: str | None = None
    seed: int = 0
    max_rows: int | None = Field(None, gt=0, description="a seeded stratified sample after de-duplication")
    val_ratio: float = Field(0.1, ge=0, lt=0.5)
    test_ratio: float = Field(0.1, ge=0, lt=0.5)
    split_column: str | None = Field(None, description="respect an existing split (train/validation/test)")
    max_drop_rate: float = Field(0.2, ge=0, le=1, description="fail when more rows than this are dropped")
    strict: bool = Field(False, description="stop at the first malformed row, naming file:line")
    clean: CleanConfig = CleanConfig()
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    augment: AugmentConfig = AugmentConfig()


class PrepareConfig(PrepareOptions):
    """How to build `data.dir` if it does not exist yet (same options as `tunelab data prepare`)."""

    source: str = Field(description="builtin:NAME or a CSV/TSV/JSONL/JSON/Parquet path")


class ReplayConfig(Section):
    """Old rows mixed into the training rows of an update, so that the model keeps seeing what it knew."""

    share: float = Field(0.2, gt=0, lt=1, description="share of the training rows that are replayed old rows")
    dir: str | None = Field(None, description="the old dataset dir; default: the one model.base (a tunelab model "
                            "dir) was trained on")


class DataConfig(Section):
    dir: str = Field(description="a prepared dataset dir (dataset.json + train/validation/test.jsonl)")
    prepare: PrepareConfig | None = None
    max_train_examples: int | None = Field(None, gt=0, description="seeded stratified subset of train")
    max_eval_examples: int | None = Field(None, gt=0, description="subset of validation used during training")
    replay: ReplayConfig | None = Field(None, description="mix a seeded sample of old train rows into training")


class ScratchConfig(Section):
    """A Llama-style decoder built from a config, with a byte-level BPE tokenizer trained on the corpus (or an
    existing model's tokenizer)."""

    vocab_size: int = Field(8192, ge=300, le=262144)
    hidden_size: int = Field(256, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int | None = Field(None, gt=0, description="grouped-query attention; default = heads")
    intermediate_size: int | None = Field(None, gt=0, description="default: 8/3 x hidden, rounded to 64")
    tokenizer: str | None = Field(None, description="use this model's tokenizer (a base or a model dir) instead of "
                                  "training one, e.g. to learn from it by token-level distillation")

    @model_validator(mode="after")
    def _check(self) -> "ScratchConfig":
        if self.hidden_size % self.heads:
            raise ValueError("hidden_size must be divisible by heads")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError("heads must be divisible by kv_heads")
        return self


class MaskedLMConfig(Section):
    """masked_lm: BERT's masking recipe. Of the tokens chosen, 80% become [MASK], 10% a random token, 10% stay; the
    model predicts the original token at each chosen position. Training masks are drawn afresh every batch
    (seeded by train.seed); validation masks are drawn once, so scores compare step to step."""

    probability: float = Field(0.15, gt=0, lt=1, description="share of the non-special tokens chosen for "
                               "prediction")
    whole_word: bool = Field(False, description="choose whole words: a word's WordPiece continuations (##…) are "
                             "masked with it")


class RetrievalConfig(Section):
    """retrieval: the contrastive loss (multiple-negatives ranking / InfoNCE): each query against every passage of
    its batch (the other pairs' passages and the batch's hard negatives are its negatives)."""

    scale: float = Field(20.0, gt=0, description="cosine similarities are multiplied by this before the softmax "
                         "(1 / temperature; 20 as sentence-transformers' MultipleNegativesRankingLoss)")
    hard_negatives: int = Field(0, ge=0, le=32, description="mined before training: for each train query, this "
                                "many of the train passages the base encoder ranks highest that are not paired with "
                                "it (nor the same text) join its batches as negatives; 0 = in-batch negatives and "
                                "the data's own only")


class ModelConfig(Section):
    base: str = Field(description="builtin:NAME, tiny-bert, tiny-llama, a local HF model dir, a tunelab model dir "
                      "(continue from it), a hub id, or `scratch` (causal_lm: a new model, see model.scratch)")
    max_length: int = Field(128, gt=0, le=32768, description="tokens per example; the block size when packing")
    trust_remote_code: bool = False
    scratch: ScratchConfig = ScratchConfig()
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    packing: bool = Field(True, description="causal_lm/sft: pack examples into max_length blocks (no attention "
                          "across examples); masked_lm: documents concatenated and cut into [CLS] … [SEP] blocks")
    mlm: MaskedLMConfig = Field(MaskedLMConfig(), description="masked_lm: which tokens are masked")
    retrieval: RetrievalConfig = Field(RetrievalConfig(), description="retrieval: the contrastive loss and mined "
                                       "hard negatives")
    hidden_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the hidden states (BERT's "
                                         "hidden_dropout_prob, GPT-2's resid/embd_pdrop, …); none = the base's own")
    attention_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the attention weights (BERT's "
                                            "attention_probs_dropout_prob, Llama's attention_dropout, …); none = the "
                                            "base's own")


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    dora: bool = Field(False, description="weight-decomposed LoRA")


class AdaLoraConfig(Section):
    init_r: int = Field(12, gt=0)
    target_r: int = Field(4, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    tinit: float = Field(0.1, ge=0, lt=1, description="share of steps before the rank budget starts to shrink")
    tfinal: float = Field(0.2, ge=0, lt=1, description="share of final steps at the target budget")
    delta_t: int = Field(10, gt=0, description="steps between budget allocations")


class PromptLearningConfig(Section):
    """prefix / prompt / ptuning: trainable virtual tokens."""

    virtual_tokens: int = Field(16, gt=0)
    init_text: str | None = Field(None, description="prompt: initialise the prompt from this text")
    encoder_hidden_size: int = Field(128, gt=0, description="ptuning: MLP reparameterisation width")


class AdapterConfig(Section):
    """Houlsby bottleneck adapters after the attention and feed-forward blocks of every layer."""

    bottleneck: int = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_scale: float = Field(1e-3, ge=0, description="std of the up-projection init (near identity)")


class Ia3Config(Section):
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="modules to scale (default: peft's per-architecture choice)")


class FreezeConfig(Section):
    trainable_layers: int = Field(2, ge=0, description="train the last k transformer layers + the head")


# Each method's own section of `method` (one shape for all: method.<section>.<key>), and the methods it serves.
METHOD_SECTIONS = {"lora": ("lora",), "adalora": ("adalora",), "prompt": ("prefix", "prompt", "ptuning"),
                   "ia3": ("ia3",), "adapter": ("adapter",), "freeze": ("freeze",)}


class MethodConfig(Section):
    """`method.name` and its own section; a section that belongs to another method is an error (it would be
    ignored), and a dump holds the chosen method's section only."""

    name: Literal["full", "head", "freeze", "lora", "adalora", "prefix", "prompt", "ptuning", "ia3",
                  "adapter"] = "full"
    lora: LoraConfig = LoraConfig()
    adalora: AdaLoraConfig = AdaLoraConfig()
    prompt: PromptLearningConfig = PromptLearningConfig()
    ia3: Ia3Config = Ia3Config()
    adapter: AdapterConfig = AdapterConfig()
    freeze: FreezeConfig = FreezeConfig()

    @model_validator(mode="before")
    @classmethod
    def _own_section_only(cls, data):
        if isinstance(data, dict):
            name = data.get("name", "full")
            for section, methods in METHOD_SECTIONS.items():
                if data.get(section) is not None and name not in methods:
                    raise ValueError(f"method.{section} configures method {' or '.join(methods)}, but method.name "
                                     f"is {name}: remove method.{section} or change method.name")
        return data

    @model_serializer(mode="wrap")
    def _dump_own_section(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if k not in METHOD_SECTIONS or self.name in METHOD_SECTIONS[k]}


class DistillConfig(Section):
    """Knowledge distillation from a teacher with the same tokenizer: soft labels for classification and NER (a
    model dir of the same task and labels), token-level for causal LM and SFT (a generative model dir or a base)."""

    teacher: str = Field(..., description="the teacher: a model dir of the same task, labels and tokenizer; causal "
                         "LM / SFT: a causal LM or SFT model dir, or a base model")
    temperature: float = Field(2.0, gt=0, description="softens both distributions; the KL term is scaled by T²")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher's soft labels (1 - alpha: the gold)")


class RegularizeConfig(Section):
    """A pull toward the weights an update starts from: L2-SP (every weight alike) or EWC (each weight by its
    diagonal Fisher information on the old data, normalised to a mean of 1, so a strength means the same mean pull
    in both)."""

    kind: Literal["ewc", "l2sp"]
    strength: float = Field(..., gt=0, description="λ: the penalty is λ/2 Σ w (θ - θ₀)²")
    fisher_rows: int = Field(256, gt=0, description="ewc: old train rows the Fisher information is estimated on")
    dir: str | None = Field(None, description="ewc: the old dataset dir; default: the one model.base was trained "
                            "on")


class AdversarialConfig(Section):
    """Adversarial training on the input embeddings: each batch's loss is the clean loss plus the loss under a
    perturbation of the word embeddings that raises it most (an L2 ball of radius `epsilon` over the micro-batch).
    FGM (Miyato et al., 2017) takes one normalised gradient step; PGD (Madry et al., 2018) takes `steps` steps of
    size `alpha`, each projected back onto the ball."""

    method: Literal["fgm", "pgd"]
    epsilon: float = Field(1.0, gt=0, description="the L2 radius of the perturbation of a micro-batch's word "
                           "embeddings")
    steps: int = Field(3, gt=0, le=20, description="pgd: ascent steps (each one forward and backward more)")
    alpha: float = Field(0.3, gt=0, description="pgd: the L2 size of each step")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        """`train.adversarial: fgm` means `{method: fgm}` with the default radius."""
        return {"method": value} if isinstance(value, str) else value


class MlflowConfig(Section):
    """`train.mlflow`: where a run with `mlflow` in `train.tracking` is recorded."""

    tracking_uri: str | None = Field(None, description="sqlite:///PATH.db, an http(s) tracking server, …; none = "
                                     "$MLFLOW_TRACKING_URI, else a SQLite database in the run dir (mlflow.db)")
    experiment: str = Field("tunelab", min_length=1, description="the MLflow experiment the run is recorded under")
    log_model: bool = Field(True, description="upload the finished model dir as the run's `model` artifact")


class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0, lt=1)
    head_lr: float | None = Field(None, gt=0, lt=1, description="learning rate of the new task head")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = evals_per_epoch times "
                            "an epoch")
    evals_per_epoch: int = Field(1, gt=0, description="with eval_every 0: evaluations per epoch, evenly spaced "
                                 "(a hyperparameter search can prune a trial at each)")
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = at each evaluation")
    keep_last: int = Field(2, gt=0)
    group_by_length: bool = True
    log_every: int = Field(10, gt=0)
    seed: int = 0
    num_threads: int | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware has native bf16, else fp32")
    eval_batch_size: int = Field(128, gt=0)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient norm: stop naming the step, or skip the update")
    max_nonfinite_in_row: int = Field(3, gt=0, description="skip: stop after this many skipped steps in a row")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the model; fsdp shards it (FSDP2) across ranks")
    dist_timeout_s: int = Field(600, gt=0, description="torchrun: a collective waiting longer than this fails "
                                "the job (a dead or stuck worker)")
    auto_batch_size: bool = Field(False, description="on out-of-memory, split each micro-batch in halves and retry "
                                  "(same gradient, less memory)")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="after the warmup")
    distill: DistillConfig | None = Field(None, description="learn from a teacher model dir's soft labels too")
    adversarial: AdversarialConfig | None = Field(None, description="fgm or pgd: train on the clean loss plus the "
                                                  "loss under a worst-case perturbation of the word embeddings")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="classification / NER: the target puts this share "
                                   "of its mass uniformly over all labels")
    regularize: RegularizeConfig | None = Field(None, description="an update: pull the weights toward where they "
                                                "started (ewc, l2sp)")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="where metrics go besides the run dir's metrics.jsonl (always written): "
        "tensorboard (the run dir's tb/), mlflow (params, metrics and the model dir; see train.mlflow)")
    mlflow: MlflowConfig = MlflowConfig()


class EvalConfig(Section):
    """`tunelab eval`: read from the `eval` section of the run config the model was trained with; flags win."""

    batch_size: int = Field(128, gt=0, description="examples per forward (causal_lm/sft: at most 8 blocks)")
    generation_samples: int = Field(50, ge=0, description="sft: test conversations answered for ROUGE-L / "
                                    "exact match")
    max_new_tokens: int = Field(64, gt=0, description="sft: most tokens per generated answer")
    general_text: str | None = Field(None, description="forgetting probe: a .txt file (paragraphs) or a dataset "
                                     "dir of general text; none = the built-in tweets' texts")
    general_samples: int = Field(200, gt=0, description="forgetting probe: rows of general text scored")
    baselines: list[Literal["tfidf", "zero_shot", "few_shot"]] = Field(
        ["tfidf", "zero_shot"], description="classification baselines scored beside the model (few_shot: opt-in; "
        "its result is cached by the data and settings)")
    zero_shot_model: str = Field("builtin:smollm2-135m-instruct", description="the instruct model of the zero-shot "
                                 "baseline")
    zero_shot_samples: int | None = Field(300, gt=0, description="cap on test rows scored zero-shot (a seeded "
                                          "sample); null = all")
    few_shot_k: int = Field(4, gt=0, le=32, description="few_shot: train rows shown (asked and answered) "
                            "before each scored row")
    few_shot_selection: Literal["similar", "random"] = Field(
        "similar", description="few_shot: the examples nearest each row by MiniLM sentence embeddings, or a seeded "
        "random draw that covers the labels")
    few_shot_pool: int = Field(2000, gt=0, description="few_shot: the examples come from a seeded stratified "
                               "sample of this many train rows")
    bootstrap: int = Field(1000, ge=0, description="resamples behind each 95% interval and paired comparison "
                           "(percentile bootstrap over rows, sentences or blocks; at least 100); 0 = none")

    @field_validator("bootstrap")
    @classmethod
    def _enough_resamples(cls, value: int) -> int:
        if 0 < value < 100:
            raise ValueError("0 (no intervals) or at least 100 resamples (a 95% interval from fewer is "
                             "noise)")
        return value


DEFAULT_RATE_LIMIT = 600  # requests per minute per API key, when keys are set and no limit is given
# knowledge-base answers (`serve --rag`, `eval-rag`): passages in the prompt, the retrieval score under which the
# assistant hands off, and what it says then
RAG_TOP_K = 4
RAG_MIN_SCORE = 0.45
DEFAULT_HANDOFF = ("I'm sorry, I can't answer that from our documentation. I'm passing your question to a member "
                   "of our support team, who will get back to you.")


class ServeConfig(Section):
    """`tunelab serve`: what is served and the limits that protect it."""

    models: list[str] = Field(..., min_length=1, description="model dirs, export dirs (ONNX: ONNX Runtime; GGUF: "
                              "llama.cpp) or base models; NAME=PATH sets the id")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys_file: Path | None = Field(None, description="one key per line (# comments); also TUNELAB_API_KEYS")
    embedding_model: str | None = Field("builtin:minilm-l6", description="served at /v1/embeddings; none = off")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, …; none = cuda when there is one, else cpu")
    max_batch: int = Field(16, gt=0, description="sequences decoded together per generation model")
    max_waiting: int = Field(64, ge=0, description="admitted requests waiting for a slot; beyond: 503")
    encoder_batch: int = Field(64, gt=0, description="texts per classify/embeddings forward; also the most "
                               "texts one request may send")
    encoder_wait_ms: float = Field(5.0, ge=0, description="how long a micro-batch waits to fill")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where the hardware has it "
                                                       "natively, else fp32 (classify/embeddings: bf16 autocast; "
                                                       "generation: bf16 weights and KV cache, logits read in fp32)")
    rate_limit: float | None = Field(None, ge=0, description="requests per minute per key, bursts of a sixth of "
                                     f"it; none = {DEFAULT_RATE_LIMIT} per key with keys, unlimited without (a keyless "
                                     "server answers loopback only); a number also applies per client address "
                                     "without keys; 0 = unlimited")
    max_body_bytes: int = Field(1_000_000, gt=0)
    max_header_bytes: int = Field(32_768, gt=0, description="request line + headers; beyond: 431")
    max_headers: int = Field(100, gt=0, description="header lines per request; beyond: 431")
    header_timeout_s: float = Field(10, gt=0, description="time to send the request line and headers; then the "
                                    "connection is closed (408)")
    body_timeout_s: float = Field(30, gt=0, description="time to send the body once the headers are in (408)")
    max_connections: int = Field(1000, gt=0, description="open connections; beyond: 503 and close")
    max_n: int = Field(8, gt=0, description="most choices per request (n x prompts)")
    default_max_tokens: int = Field(512, gt=0, description="when a request gives no max_tokens (capped by the "
                                    "context left)")
    gguf_context: int = Field(2048, gt=0, description="GGUF exports (llama.cpp): tokens per parallel slot, prompt "
                              "and answer together (capped by the model's context); the KV cache holds max_batch x it")
    drain_timeout_s: float = Field(30, gt=0, description="SIGTERM: how long in-flight requests may finish")
    registry: Path | None = Field(None, description="the registry folder of registry:NAME@ALIAS models (default: "
                                  "TUNELAB_REGISTRY, else ~/.local/share/tunelab/registry)")
    registry_db: str | None = Field(None, description="the registry's database URL when not the folder's SQLite "
                                    "(default: TUNELAB_REGISTRY_DB)")
    registry_poll_s: float = Field(2.0, ge=0, description="how often a registry:NAME@ALIAS model checks its alias "
                                   "(a move loads the new version beside the old, then swaps); 0 = only on "
                                   "POST /admin/reload")
    admin_keys_file: Path | None = Field(None, description="keys for POST /admin/reload, one per line (also "
                                         "TUNELAB_ADMIN_KEYS); none: the endpoint is off")
    drift_window: int = Field(500, ge=0, description="classifiers with a drift profile: texts in the sliding "
                              "window compared with it; 0 = no drift checks")
    drift_every: int = Field(100, gt=0, description="a drift check after this many new texts")
    drift_min_window: int = Field(200, gt=0, description="texts the window needs before the first check")
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="a window drifts when a statistic's p-value is under "
                               "alpha / (statistics tested)")
    drift_permutations: int = Field(200, ge=20, le=10_000, description="MMD permutation test resamples")
    request_log: Path | None = Field(None, description="a folder for a log of classify requests (sampled, "
                                     "PII-redacted, size-bounded); none = no log")
    request_log_sample: float = Field(0.1, gt=0, le=1, description="the share of texts logged")
    request_log_max_mb: float = Field(100, gt=0, description="the log folder's size bound; the oldest files go")
    rag: list[str] = Field([], description="[ID=]INDEX[@MODEL]: serve ID (default: the index folder's name), whose "
                           "chat completions answer from the index's passages with citations, with MODEL (a served "
                           "generation model's id; default: the only one) writing the answers")
    rag_top_k: int = Field(RAG_TOP_K, gt=0, le=20, description="knowledge-base models: passages in the prompt")
    rag_min_score: float = Field(RAG_MIN_SCORE, ge=-1, le=1, description="knowledge-base models: the best passage's "
                                 "cosine similarity to the question under which the reply is the hand-off message")
    rag_handoff: str = Field(DEFAULT_HANDOFF, min_length=1,
                             description="knowledge-base models: the reply when the documents do not answer")


class MonitorSentiment(Section):
    model: str = Field(..., description="a classification model dir, or its ONNX export dir")
    negative_label: str | None = Field(None, description="the label that counts as negative (none: the label named "
                                       "negative or neg, any case)")
    positive_label: str | None = Field(None, description="the label that counts as positive in the score (none: "
                                       "positive or pos; without one the score is -p(negative))")
    batch_size: int = Field(8, gt=0, description="texts per forward, sorted by length first (on a CPU, 8 wastes the "
                            "least on padding: 6.6 ms per tweet with MiniLM against 9.1 at 64)")


class WatchItem(Section):
    name: str = Field(..., min_length=1, max_length=200)
    aliases: list[str] = Field(default_factory=list, description="other names, tickers ($AAPL), handles (@united); "
                               "matched as whole words, case-insensitive unless written all in capitals")


class MonitorEntities(Section):
    watchlist: list[WatchItem] = Field(default_factory=list)
    ner_model: str | None = Field(None, description="an NER model dir (or ONNX export): the names it finds count as "
                                  "entities too (a watch-list alias maps them to its name)")
    ner_types: list[str] = Field(["ORG"], description="the NER entity types kept")


class FolderSource(Section):
    path: Path
    patterns: list[str] = Field(["*.jsonl", "*.csv"], description="file names read (new files and appended lines)")
    poll_s: float = Field(1.0, gt=0)


class MonitorSources(Section):
    folder: FolderSource | None = None
    stdin: bool = Field(False, description="JSON lines on standard input; at its end the monitor stops once "
                        "everything is stored (unless it also serves or watches a folder)")
    fields: dict[Literal["id", "timestamp", "source", "text"], str] = Field(
        default_factory=dict, description="the column holding each document field, when not its own name")


class MonitorHttp(Section):
    """The monitor's HTTP side (POST /ingest, the dashboard, /metrics), with `tunelab serve`'s protections."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8100, ge=0, le=65535)
    api_keys_file: Path | None = Field(None, description="one key per line (# comments); also TUNELAB_API_KEYS")
    rate_limit: float | None = Field(None, ge=0, description="requests per minute per key (as `tunelab serve`)")
    max_documents: int = Field(1000, gt=0, description="documents per POST /ingest")
    max_body_bytes: int = Field(4_000_000, gt=0)
    max_header_bytes: int = Field(32_768, gt=0)
    max_headers: int = Field(100, gt=0)
    header_timeout_s: float = Field(10, gt=0)
    body_timeout_s: float = Field(30, gt=0)
    max_connections: int = Field(200, gt=0)
    drain_timeout_s: float = Field(10, gt=0)


RULE_METRICS = ("volume", "negatives", "share_negative", "mean_score")


class Rule(Section):
    """An alert rule over each entity's windows. threshold: the window's metric passes `above`/`below`;
    zscore: its z-score against the trailing `baseline_windows` passes `above` (or -`below`); page_hinkley and
    adwin: a change detector over the per-window values since the last alert."""

    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["threshold", "zscore", "page_hinkley", "adwin"]
    metric: Literal["volume", "negatives", "share_negative", "mean_score"] = "share_negative"
    above: float | None = None
    below: float | None = None
    min_volume: int = Field(10, ge=0, description="documents the window needs before the rule looks at it")
    baseline_windows: int = Field(24, ge=2, le=1000, description="zscore: trailing windows compared against; "
                                  "change detectors: the most windows they look back")
    delta: float = Field(0.005, gt=0, description="page_hinkley: the change ignored; adwin: the confidence")
    entities: Literal["all", "watchlist", "overall"] | list[str] = Field(
        "watchlist", description="whose windows: the watch-list's, every entity's, the overall stream's, or names")
    cooldown_windows: int = Field(6, ge=0, description="after an alert, no other from this rule for the entity "
                                  "for this many windows")

    @model_validator(mode="after")
    def _check(self) -> "Rule":
        if self.kind in ("threshold", "zscore", "page_hinkley") and self.above is None and self.below is None:
            raise ValueError(f"rule {self.name}: a {self.kind} rule needs `above` or `below`")
        if self.kind == "adwin" and self.metric not in ("share_negative", "mean_score"):
            raise ValueError(f"rule {self.name}: adwin watches a bounded metric (share_negative, mean_score)")
        return self


class Webhook(Section):
    url: str = Field(..., pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(5, gt=0)
    max_attempts: int = Field(8, ge=1, description="then the delivery is marked failed (logged, counted)")


class MonitorAlerts(Section):
    webhooks: list[Webhook] = Field(default_factory=list)


class ServeTarget(Section):
    """A `tunelab serve` whose drift gauges the monitor polls (its /metrics needs no key)."""

    url: str = Field(..., pattern=r"^https?://", description="the server's base URL (or its /metrics URL)")
    poll_s: float = Field(30, gt=0, description="how often /metrics is read")
    checks: int = Field(3, ge=1, description="polls in a row that must find a model drifted before it alerts")
    cooldown_s: int = Field(3600, ge=0, description="after an alert, none for the same model for this long")


class MonitorConfig(Section):
    """`tunelab monitor run CONFIG`: sources -> scoring -> storage and aggregates -> rules -> alerts."""

    state: Path = Field(Path("monitor-state"), description="folder of the SQLite database (unless `database`)")
    database: str | None = Field(None, description="a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/monitor "
                                 "(default: TUNELAB_MONITOR_DB, else state/monitor.db)")
    window_s: int = Field(3600, gt=0, description="the aggregate window, in seconds of document time")
    sentiment: MonitorSentiment | None = Field(None, description="what scores the documents; required with "
                                               "document sources (a monitor that only watches servers needs none)")
    watch: list[ServeTarget] = Field(default_factory=list, description="servers whose drift gauges raise alerts")
    entities: MonitorEntities = MonitorEntities()
    sources: MonitorSources = MonitorSources()
    http: MonitorHttp = MonitorHttp()
    rules: list[Rule] = Field(default_factory=list)
    alerts: MonitorAlerts = MonitorAlerts()
    max_batch: int = Field(64, gt=0, description="documents scored and committed together")
    max_wait_ms: float = Field(200, ge=0, description="how long a batch waits to fill")
    max_text_chars: int = Field(20_000, gt=0, description="longer texts are refused (text_too_long)")

    @model_validator(mode="after")
    def _check(self) -> "MonitorConfig":
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("two rules share a name")
        if self.sentiment is None and (self.sources.folder is not None or self.sources.stdin):
            raise ValueError("sources need sentiment.model (the classifier that scores the documents)")
        return self


MONITOR_PATH_KEYS = {("state",): True, ("sentiment", "model"): True, ("entities", "ner_model"): True,
                     ("sources", "folder", "path"): True, ("http", "api_keys_file"): True}


def load_monitor_config(path: str | Path, overrides: list[str] | None = None) -> MonitorConfig:
    """A monitor config file (paths relative to it) with dotted overrides, validated."""
    raw = resolve_paths(read_yaml_mapping(path, "sections (sentiment, entities, sources, rules, …)"),
                        Path(path).resolve().parent, MONITOR_PATH_KEYS)
    raw = apply_overrides(raw, overrides or [], paths_from=Path.cwd())
    try:
        return MonitorConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


class EnsembleConfig(Section):
    """Train the config once per seed and combine the models: `tunelab train` writes each member's run dir
    (`OUT/members/seed-N/`) and the ensemble dir `OUT/model` (`tunelab ensemble`)."""

    seeds: list[int] = Field(..., min_length=2, description="one member per seed (train.seed)")
    combine: Literal["mean", "vote"] = Field("mean", description="mean: average the probabilities; vote: majority")

    @model_validator(mode="after")
    def _check(self) -> "EnsembleConfig":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("ensemble.seeds must differ")
        return self


class RunConfig(Section):
    task: Literal["auto", "classification", "token_classification", "causal_lm", "masked_lm", "sft", "retrieval"] = (
        Field("auto", description="auto: from the dataset (classification, ner -> token_classification, text -> "
              "causal_lm, sft, retrieval); masked_lm: continued pretraining of an encoder on a text dataset, said "
              "explicitly"))
    name: str | None = None
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ensemble: EnsembleConfig | None = Field(None, description="train one member per seed and combine them "
                                            "(classification and NER)")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.data.prepare and self.data.prepare.val_ratio + self.data.prepare.test_ratio >= 0.9:
            raise ValueError("data.prepare.val_ratio + test_ratio must leave at least 10% for train")
        return self


def parse_override(item: str) -> tuple[list[str], object]:
    """`train.lr=3e-5` -> (["train", "lr"], 3e-05); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like section.key=value (e.g. train.epochs=2)")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str], paths_from: Path | None = None) -> dict:
    """`raw` with each `section.key=value` set; with `paths_from`, relative paths among the values are made
    absolute against it (see `resolve_paths`)."""
    for item in overrides:
        parts, value = parse_override(item)
        if tuple(parts) in PATH_KEYS and value is not None and not isinstance(value, str):
            value = item.partition("=")[2].strip()  # a path as typed: data.dir=2024 is a folder, not a number
        if paths_from is not None and tuple(parts) in PATH_KEYS:
            value = _absolute(value, paths_from, PATH_KEYS[tuple(parts)], tuple(parts))
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif e["type"] == "value_error":  # a check of ours: its message says what is wrong and what to do
            lines.append(f"'{key}': {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def section(cls: type[BaseModel], raw: dict, what: str):
    """`cls` validated from `raw` (a saved section with command-line flags on top); errors name the key."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err).replace("invalid config", f"invalid {what}")) from None


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where (1-based line and column) and what."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = "; ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (what or str(err).splitlines()[0])


def read_yaml_mapping(path: str | Path, what: str = "sections (model, data, method, train, eval)") -> dict:
    """A YAML file holding a mapping; a missing file, bad YAML or another shape is a `UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a YAML config file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of {what}")
    return raw


# Where a run config names a file or folder: True for data paths (always paths), False for model references
# (paths only when they look like one, ./x ../x ~/x /x, or name something that exists there; else a name:
# builtin:…, tiny-bert, a hub id).
PATH_KEYS = {("data", "dir"): True, ("data", "prepare", "source"): True, ("eval", "general_text"): True,
             ("model", "base"): False, ("eval", "zero_shot_model"): False,
             ("data", "prepare", "clean", "tokenizer"): False, ("data", "prepare", "augment", "synonym_model"): False,
             ("data", "prepare", "augment", "paraphrase_model"): False}
# The same keys in a `data prepare --config` file, which holds the `data.prepare` section alone.
PREPARE_PATH_KEYS = {k[2:]: v for k, v in PATH_KEYS.items() if k[:2] == ("data", "prepare") and len(k) > 3}


NAMES = ("scratch", "tiny-bert", "tiny-llama")  # model references that are names even where a folder is so named


def _absolute(value: object, base: Path, always: bool, key: tuple[str, ...]) -> object:
    if not isinstance(value, str) or not value or value.startswith("builtin:") or (not always and value in NAMES):
        return value
    try:
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        if always or value.startswith(("./", "../")) or value in (".", "..") or (base / p).exists():
            return str((base / p).resolve())
    except (RuntimeError, ValueError, OSError) as err:  # ~unknownuser, a NUL byte, a name too long
        raise UserError(f"'{'.'.join(key)}': not a usable path ({value!r}: {err})") from None
    return value


def resolve_paths(raw: dict, base: Path, keys: dict = PATH_KEYS) -> dict:
    """Relative paths in `raw` made absolute against `base`. Values of another type are left to validation."""
    for path, always in keys.items():
        node = raw
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = _absolute(node[path[-1]], base, always, path)
    return raw


def own_method_sections(raw: dict) -> dict:
    """A run config as saved before method sections were checked (every method's section, defaults included)
    -> the same with only its own method's section, which validates and compares like a new one."""
    method = raw.get("method")
    if isinstance(method, dict):
        name = method.get("name", "full")
        method = dict(method)
        for old, section, key in (("trainable_layers", "freeze", "trainable_layers"),
                                  ("ia3_target_modules", "ia3", "target_modules")):  # the flat keys of then
            if old in method:
                method[section] = {**(method.get(section) or {}), key: method.pop(old)}
        raw = {**raw, "method": {k: v for k, v in method.items()
                                 if k not in METHOD_SECTIONS or name in METHOD_SECTIONS[k]}}
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, saved: bool = False) -> RunConfig:
    """Read a YAML config, apply dotted overrides, validate. Errors name the file or key.

    Relative paths in the file are relative to the file (a config means the same from any folder); paths given
    as overrides are relative to the current folder, as anything typed in a shell is. Both end up absolute, so
    the config a run saves names the same files wherever it is read. `saved`: the config.yaml of a run dir,
    possibly written by an earlier tunelab (see `own_method_sections`)."""
    raw = resolve_paths(read_yaml_mapping(path), Path(path).resolve().parent)
    if saved:
        raw = own_method_sections(raw)
    return validate(apply_overrides(raw, overrides or [], paths_from=Path.cwd()))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config (or any nested dict) -> {dotted key: value}; lists, scalars and empty dicts are values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

"""Load a base model (built-in, tiny, local HF dir, GGUF, hub id), add the task head, apply the
training method, and save / load model dirs per the artifact contract. The tiny random models (`tiny-bert`,
`tiny-llama`) are built here from a config, once, into the cache.

A model dir holds the Hugging Face files (`config.json` + `model.safetensors`, or PEFT's
`adapter_config.json` + `adapter_model.safetensors`), the tokenizer, and `tunelab.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from tunelab import __version__, model_files
from tunelab.artifacts import kind_of, write_folder
from tunelab.assets import TINY_MODELS, builtin_path, cache_dir, cached, is_builtin
from tunelab.errors import UserError, read_json_file
from tunelab.merge import check_mergeable, merged
from tunelab.tasks import task_spec

# transformers (~0.6-1 s over torch) and peft (~2 s more) are imported inside the functions that use them:
# importing this module costs torch alone.

META_FILE = "tunelab.json"


def quiet_transformers() -> None:
    """No per-file progress bars or load reports from transformers inside tunelab's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model: what the user wrote and the local HF dir it stands for."""

    ref: str
    path: Path | str  # a local dir, or a hub id for transformers to fetch
    gguf_file: str | None = None
    parent: dict | None = None  # a tunelab model dir continued from: its tunelab.json (lineage, labels, data)


TINY_SPECS = {
    "tiny-bert": {"arch": "bert", "tokenizer": "builtin:minilm-l6", "hidden_size": 32, "layers": 2, "heads": 2,
                  "intermediate_size": 64, "max_positions": 512, "seed": 0},
    "tiny-llama": {"arch": "llama", "tokenizer": "builtin:smollm2-135m-instruct", "hidden_size": 32, "layers": 2,
                   "heads": 2, "kv_heads": 1, "intermediate_size": 64, "max_positions": 1024, "seed": 0},
}


def tiny_model_dir(name: str) -> Path:
    """Build (once) and return the folder of a tiny random model: config, seeded weights, tokenizer.

    `tiny-bert` borrows MiniLM's WordPiece tokenizer, `tiny-llama` SmolLM2's BPE tokenizer, so
    the models read real text; the weights are random (seed 0) and identical on every machine.
    """
    if name not in TINY_MODELS:
        raise UserError(f"unknown tiny model '{name}'; known: {', '.join(TINY_MODELS)}")
    spec = TINY_SPECS[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return cached(cache_dir() / "models" / f"{name}-{key}", lambda tmp: _build_tiny(name, spec, tmp))


def _build_tiny(name: str, spec: dict, out: Path) -> None:
    from transformers import AutoModel, BertConfig, LlamaConfig

    tok = load_tokenizer(spec["tokenizer"])
    size = dict(vocab_size=len(tok), hidden_size=spec["hidden_size"], num_hidden_layers=spec["layers"],
                num_attention_heads=spec["heads"], intermediate_size=spec["intermediate_size"],
                max_position_embeddings=spec["max_positions"])
    if spec["arch"] == "bert":
        config = BertConfig(**size)
    else:
        config = LlamaConfig(**size, num_key_value_heads=spec["kv_heads"], pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(spec["seed"])
    model = AutoModel.from_config(config)
    model.config.architectures = None  # a bare body; the task head is added on load
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "tunelab-tiny.json").write_text(json.dumps({"name": name, **spec}))


def resolve_base(ref: str) -> BaseRef:
    """Map a model reference to a loadable location. Errors name what is wrong with `ref`."""
    if is_builtin(ref):
        path = builtin_path(ref)
        if path.suffix == ".gguf":
            return BaseRef(ref, _dequantised_gguf_dir(ref, path))
        return BaseRef(ref, path)
    if ref in TINY_MODELS:
        return BaseRef(ref, tiny_model_dir(ref))
    p = Path(ref)
    if p.is_file() and p.suffix == ".gguf":
        return BaseRef(ref, _dequantised_gguf_dir(ref, p))
    if p.is_dir():
        if kind_of(p) == "run":
            raise UserError(f"{p} is a run dir; its model is {p / 'model'}")
        if (p / META_FILE).is_file():
            return _model_dir_base(ref, p)
        if (p / "config.json").is_file():
            return BaseRef(ref, p)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return BaseRef(ref, _dequantised_gguf_dir(ref, ggufs[0]))
        raise UserError(f"{p} is not a model dir (no config.json or .gguf file)")
    if p.exists():
        raise UserError(f"{p} is not a model dir")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return BaseRef(ref, ref)
    raise UserError(f"model '{ref}' not found: not a local dir, a builtin:NAME, tiny-bert/tiny-llama, "
                    "or a hub id (org/name)")


def _model_dir_base(ref: str, d: Path) -> BaseRef:
    """A tunelab model dir as the start of another run: its weights (checked against its manifest) and the
    tokenizer it was trained with; a base + peft adapters merged first, once, into a cached plain folder keyed by
    the adapters' hashes. Int8 twins and adapters that cannot merge are refused with the way out."""
    meta = read_meta(d)
    if (meta.get("compression") or {}).get("int8"):
        parent = (meta.get("parent") or {}).get("model_dir", "the model dir it was compressed from")
        raise UserError(f"{d} is an int8 model dir for CPU serving; training continues from float weights: "
                        f"{parent}")
    if (d / "houlsby_config.json").is_file() or (d / "adapter_config.json").is_file():
        return BaseRef(ref, _merged_dir(d, meta), parent=meta)
    model_files.check_model_folder(d, meta.get("files"))
    return BaseRef(ref, d, parent=meta)


def _merged_dir(d: Path, meta: dict) -> Path:
    """The model dir's base with its adapters merged in, as a plain Hugging Face folder (cached)."""
    check_mergeable(meta, d, instead=f"continue from its base ({(meta.get('base') or {}).get('ref')})")
    key = json.dumps({"files": meta.get("files") or {}, "base": meta.get("base")}, sort_keys=True)
    out = cache_dir() / "models" / f"merged-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def build(tmp: Path) -> None:
        model, tok, _ = load_model_dir(d)
        model = merged(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"model_dir": str(d.resolve()), "files": meta.get("files")}))

    return cached(out, build)


def parent_record(base: BaseRef) -> dict | None:
    """The lineage a run started from a model dir records: where it was, its task, labels, base, data and
    weight hashes."""
    if base.parent is None:
        return None
    m = base.parent
    return {"model_dir": str(Path(base.ref).resolve()), "task": m.get("task"), "labels": m.get("labels"),
            "base": m.get("base"), "method": (m.get("method") or {}).get("name"), "data": m.get("data"),
            "files": {name: f.get("sha256") for name, f in (m.get("files") or {}).items()}}


def _dequantised_gguf_dir(ref: str, gguf: Path) -> Path:
    """De-quantise a GGUF once (transformers' reader) and cache it as safetensors + tokenizer, keyed by the
    file's content (sha256), so that another file with the same name and size never reuses these weights."""
    key = re.sub(r"[^\w.-]", "_", gguf.stem)[:80] + "-" + _content_hash(gguf)[:24]
    out = cache_dir() / "gguf" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    model_files.check_gguf(gguf)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"cannot read GGUF {gguf}: {err}") from None
        # The weights are plain float tensors now; drop the GGUF marker so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"ref": ref, "gguf": str(gguf)}))

    return cached(out, build)


_hashes: dict[tuple, str] = {}


def _content_hash(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file (same inode, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = model_files.sha256_file(path)
    return _hashes[key]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A fast look-up of the hub's host, so an offline machine fails in seconds, not after retries.
    Behind a proxy the local look-up says nothing, so the answer is then yes."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def load_pretrained(loader, base: BaseRef, check: bool = True, **kwargs):
    """`loader.from_pretrained` on a base: a local folder's files are checked first (tokenizer files, or
    safetensors weights only, whole and finite; `check=False` when the caller has just done so); weights load
    from safetensors only, never a pickle."""
    quiet_transformers()
    tokenizer = loader.__name__.endswith("Tokenizer")
    if isinstance(base.path, str):
        if not _hub_reachable():
            kwargs["local_files_only"] = True  # only the local HF cache can help
    elif check and tokenizer:
        model_files.check_tokenizer_folder(base.path)
    elif check:
        model_files.check_model_folder(base.path)
    if not tokenizer:
        kwargs["use_safetensors"] = True
    try:
        return loader.from_pretrained(base.path, **kwargs)
    except OSError as err:
        if isinstance(base.path, str):
            raise UserError(f"cannot load '{base.ref}' from the Hugging Face hub (offline or unknown id, or no "
                            "safetensors weights); download it elsewhere and pass the local dir instead") from None
        raise UserError(f"cannot load model from {base.path}: {_first_line(err)}") from None
    except ValueError as err:
        if isinstance(base.path, str):
            raise
        raise UserError(f"cannot load model from {base.path}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_tokenizer(ref: str | BaseRef, trust_remote_code: bool = False):
    """The tokenizer of a base, with a pad token set (decoders reuse EOS) and right padding."""
    from transformers import AutoTokenizer

    base = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    tok = load_pretrained(AutoTokenizer, base, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer of '{base.ref}' has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tokenizer_of(ref: str):
    """The tokenizer of a base (`load_tokenizer`) or of a tunelab model dir (the one it was trained with)."""
    d = Path(ref)
    if d.is_dir() and (d / META_FILE).is_file():
        read_meta(d)  # a tunelab model dir, not a run dir or an export
        return load_tokenizer(BaseRef(ref, d))
    return load_tokenizer(ref)


# the config attributes that set each dropout, by architecture (a base has one or more of each)
DROPOUT_KEYS = {"hidden": ("hidden_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"),
                "attention": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")}


def dropout_kwargs(base: BaseRef, dropout: dict[str, float | None] | None, trust_remote_code: bool = False) -> dict:
    """`{"hidden": p, "attention": q}` (None: the base's own) -> the `from_pretrained` overrides of the base's
    config attributes that set them. A base whose config has no attribute for a dropout asked for is a
    `UserError` naming the attributes looked for."""
    wanted = {kind: p for kind, p in (dropout or {}).items() if p is not None}
    if not wanted:
        return {}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of {base.ref}: {_first_line(err)}") from None
    out = {}
    for kind, p in wanted.items():
        keys = [k for k in DROPOUT_KEYS[kind] if k in config]
        if not keys:
            raise UserError(f"model.{kind}_dropout: {base.ref} ({config.get('model_type')}) has no {kind} dropout "
                            f"setting (looked for {', '.join(DROPOUT_KEYS[kind])}); leave it unset")
        out.update({k: p for k in keys})
    return out


def dropout_of(model_cfg) -> dict[str, float | None]:
    """A run config's `model` section -> the dropout `dropout_kwargs` reads."""
    return {"hidden": model_cfg.hidden_dropout, "attention": model_cfg.attention_dropout}


def _with_head(loader, ref: str, labels: list[str], task: str, trust_remote_code: bool,
               dropout: dict | None = None):
    """A base with a head over `labels` -> (model, tokenizer, BaseRef, new_param_names). Continuing a model dir of
    the same task keeps its head: its labels first, in its order, then the dataset's new ones, whose rows are
    initialised fresh (an old class's logit is unchanged; `labels_of(model)` gives the order). A model dir of
    another task gives its body only: its head, if any, is initialised afresh."""
    base = resolve_base(ref)
    tok = load_tokenizer(base, trust_remote_code)
    parent = base.parent or {}
    same_task = parent.get("task") == task
    if same_task:
        old = list(parent.get("labels") or [])
        labels = old + [label for label in labels if label not in old]
    model, info = load_pretrained(
        loader, base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tok.pad_token_id,
        dtype=torch.float32, trust_remote_code=trust_remote_code, output_loading_info=True,
        ignore_mismatched_sizes=bool(parent), **dropout_kwargs(base, dropout, trust_remote_code))
    model.config.pad_token_id = tok.pad_token_id
    new = set(info.get("missing_keys", []))
    mismatched = {name for name, _, _ in info.get("mismatched_keys", set())}
    if same_task:
        _keep_old_rows(model, base.path, mismatched)
    elif parent.get("labels"):
        new |= _reset_head(model)
    return model, tok, base, sorted(new | mismatched)


def _keep_old_rows(model: nn.Module, folder: Path, grown: set[str]) -> None:
    """Copy the saved rows of each grown head tensor (more classes now) into its first rows."""
    from safetensors import safe_open  # safetensors: only a grown head reads a checkpoint itself

    params, found = dict(model.named_parameters()), set()
    for path in model_files.weight_files(folder):
        with safe_open(str(path), "pt") as f:
            for name in set(f.keys()) & grown:
                old, p = f.get_tensor(name), params[name]
                if old.shape[1:] != p.shape[1:] or old.shape[0] > p.shape[0]:
                    raise ValueError(f"{name}: a saved {tuple(old.shape)} does not fit {tuple(p.shape)}")
                with torch.no_grad():
                    p[:old.shape[0]].copy_(old)
                found.add(name)
    if found != grown:  # a checkpoint naming its tensors otherwise than the model: the old rows would be lost
        raise ValueError(f"grown head tensors not found in {folder}: {sorted(grown - found)}")


def _reset_head(model: nn.Module) -> set[str]:
    """Initialise afresh every module outside the pretrained body (linear layers as transformers initialises a new
    head: normal with the config's `initializer_range`, zero bias) -> their parameter names."""
    std = getattr(model.config, "initializer_range", 0.02)
    names = set()
    with torch.no_grad():
        for child_name, child in model.named_children():
            if child_name == getattr(model, "base_model_prefix", None):
                continue
            for m in child.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            names |= {f"{child_name}.{n}" for n, _ in child.named_parameters()}
    return names


def load_classifier(ref: str, labels: list[str], trust_remote_code: bool = False, dropout: dict | None = None):
    """A base with a sequence-classification head -> (model, tokenizer, BaseRef, new_param_names). `dropout`:
    see `dropout_kwargs`."""
    from transformers import AutoModelForSequenceClassification

    return _with_head(AutoModelForSequenceClassification, ref, labels, "classification", trust_remote_code, dropout)


def load_token_classifier(ref: str, labels: list[str], trust_remote_code: bool = False, dropout: dict | None = None):
    """A base with a token-classification head -> (model, tokenizer, BaseRef, new_param_names). `dropout`:
    see `dropout_kwargs`."""
    from transformers import AutoModelForTokenClassification

    return _with_head(AutoModelForTokenClassification, ref, labels, "token_classification", trust_remote_code,
                      dropout)


def labels_of(model) -> list[str]:
    """The class names of a model with a classification head, in the order of its logits."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def load_causal_lm(ref: str, trust_remote_code: bool = False, dropout: dict | None = None):
    """A pretrained causal LM -> (model, tokenizer, BaseRef, []). `dropout`: see `dropout_kwargs`."""
    from transformers import AutoModelForCausalLM

    base = resolve_base(ref)
    tok = load_tokenizer(base, trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32, trust_remote_code=trust_remote_code,
                            **dropout_kwargs(base, dropout, trust_remote_code))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, base, []


def load_masked_lm(ref: str, trust_remote_code: bool = False, dropout: dict | None = None):
    """A pretrained encoder with a masked-LM head -> (model, tokenizer, BaseRef, new_param_names). A base saved
    without its MLM head (MiniLM, a sentence encoder; a classifier's model dir) gets a fresh one, whose
    parameters are the new ones; its decoder weight is tied to the word embeddings, so only the transform and the
    output bias are new. A tokenizer without a mask token is a `UserError`. `dropout`: see `dropout_kwargs`."""
    from transformers import AutoModelForMaskedLM

    base = resolve_base(ref)
    tok = load_tokenizer(base, trust_remote_code)
    if tok.mask_token_id is None:
        raise UserError(f"the tokenizer of '{base.ref}' has no mask token; masked_lm needs an encoder's "
                        "tokenizer (BERT family)")
    model, info = load_pretrained(AutoModelForMaskedLM, base, dtype=torch.float32,
                                  trust_remote_code=trust_remote_code, output_loading_info=True,
                                  **dropout_kwargs(base, dropout, trust_remote_code))
    params = {name for name, _ in model.named_parameters()}  # a tied key (decoder.bias) is not a parameter name
    return model, tok, base, sorted(set(info.get("missing_keys", [])) & params)


ENCODER_TYPES = frozenset({"albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra",
                           "mpnet", "modernbert", "roberta", "xlm-roberta"})


def encoder_type(ref: str) -> str | None:
    """The model type of base `ref` when it is a bidirectional encoder (BERT family, read from its config.json
    without loading weights), else None; also None when that cannot be known here (a hub id not on this machine,
    `scratch`). A tunelab model dir of adapters answers for its base."""
    if ref == "scratch":
        return None
    d = Path(ref)
    if d.is_dir() and (d / META_FILE).is_file() and not (d / "config.json").is_file():
        return encoder_type(((read_meta(d).get("base") or {}).get("ref")) or "scratch")
    base = resolve_base(ref)
    if isinstance(base.path, str) or not (Path(base.path) / "config.json").is_file():
        return None
    config = read_json_file(Path(base.path) / "config.json", f"{base.path} has no config.json")
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if kind in ENCODER_TYPES and not config.get("is_decoder") else None


SCRATCH_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (any byte sequence is encodable), with
    `<|endoftext|>` as BOS/EOS, ChatML turn markers, and `<pad>`."""
    # tokenizers and transformers load only when a model is trained from scratch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SCRATCH_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", padding_side="right")


def build_scratch_lm(scratch, texts, max_length: int, seed: int = 0):
    """A new Llama-style decoder sized by `scratch` (a ScratchConfig) with a tokenizer trained on `texts`, or
    the tokenizer of the model `scratch.tokenizer` names -> (model, tokenizer, BaseRef("scratch"), [])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer_of(scratch.tokenizer) if scratch.tokenizer else train_tokenizer(texts, scratch.vocab_size)
    inter = scratch.intermediate_size or 64 * round(8 * scratch.hidden_size / 3 / 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=scratch.hidden_size, intermediate_size=inter,
                      num_hidden_layers=scratch.layers, num_attention_heads=scratch.heads,
                      num_key_value_heads=scratch.kv_heads or scratch.heads, max_position_embeddings=max_length,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg), tok, BaseRef("scratch", "scratch"), []


def is_dtensor(t) -> bool:
    """An FSDP2-sharded tensor (checked by name: no import of the DTensor machinery on the common path)."""
    return type(t).__name__ == "DTensor"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """-> (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tensors (used to keep the best model and in checkpoints). FSDP-sharded
    parameters are gathered whole (a collective: every rank calls it)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().full_tensor() if is_dtensor(p) else p.detach()
            out[n] = t.to("cpu", copy=True)
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ValueError(f"state has tensors the model lacks: {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if is_dtensor(p):  # keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor  # ~0.6 s; only FSDP shards reach here

                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
            p.copy_(t)


# ---- model dirs ----------------------------------------------------------------------------------

def save_model_dir(model: nn.Module, tokenizer, out: str | Path, meta: dict, state_dict: dict | None = None,
                   overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the model dir by the folder rule (tunelab.artifacts; an existing model dir is replaced only with
    `overwrite`): HF/PEFT weights or Houlsby adapters (safetensors), tokenizer (with its chat template),
    `tunelab.json` (`kind: model`, and the size and sha256 of each weight file, verified on load).
    `state_dict`: weights to write instead of the model's own (the gathered full weights of an FSDP-sharded
    model). `extra_files`: name -> bytes written beside them (the drift profile)."""
    quiet_transformers()
    with write_folder(out, "model", overwrite) as tmp:
        if hasattr(model, "tunelab_adapter"):
            from tunelab.methods.adapter import save_adapters  # brings safetensors; only Houlsby adapters need it

            save_adapters(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        meta = {"kind": "model", **meta, "files": model_files.files_manifest(tmp)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return Path(out)


def read_meta(model_dir: str | Path) -> dict:
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model dir not found: {d}")
    meta = read_json_file(d / META_FILE,
                          f"{d} is not a tunelab model dir (no {META_FILE}); train one with `tunelab train`")
    if not isinstance(meta, dict):
        raise UserError(f"{d / META_FILE} is corrupt: not a JSON object")
    if meta.get("kind", "model") != "model":
        hint = f"; its model is {d / 'model'}" if meta["kind"] == "run" else ""
        raise UserError(f"{d} is a tunelab {meta['kind']}, not a model dir{hint}")
    return meta


DEFAULT_MAX_LENGTH = 512


def sentence_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An encoder's last hidden states [batch, seq, dim] -> one unit-length vector per text: the mean over its real
    tokens (what all-MiniLM-L6-v2 and its kin were trained to give), L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def max_length_of(meta: dict) -> int:
    """The longest input (tokens) a model dir's `tunelab.json` says it was trained with, else 512."""
    return int(meta.get("max_length") or DEFAULT_MAX_LENGTH)


def _auto_class(task: str):
    import transformers

    return getattr(transformers, task_spec(task).auto_class)


def _head_kwargs(meta: dict, tok) -> dict:
    labels = meta.get("labels") or []
    if not task_spec(meta["task"]).labelled:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": tok.pad_token_id}


def load_model_dir(model_dir: str | Path, device: str = "cpu", tasks: tuple[str, ...] | None = None):
    """A saved model dir -> (model in eval mode, tokenizer, meta). `tasks`: the tasks the caller can use;
    another task is a `UserError` naming both. Its files are checked first (tunelab.model_files): a damaged,
    truncated, non-finite or pickled weight file, or missing tokenizer files, is a `UserError` naming it."""
    quiet_transformers()
    from transformers import AutoTokenizer

    d = Path(model_dir)
    meta = read_meta(d)
    task = task_spec(meta.get("task"), f"{d} ({META_FILE})").name
    if tasks is not None and task not in tasks:
        raise UserError(f"{d} holds a '{task}' model; this command needs a {' or '.join(tasks)} model")
    peft_adapter = (d / "adapter_config.json").is_file()
    houlsby = (d / "houlsby_config.json").is_file()
    if not (peft_adapter or houlsby or (d / "config.json").is_file()):
        raise UserError(f"{d} has no model weights (config.json, adapter_config.json or houlsby_config.json)")
    model_files.check_model_folder(d, meta.get("files"))
    model_files.check_tokenizer_folder(d)
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the tokenizer in {d}: {_first_line(err)}") from None
    loader = _auto_class(task)
    if peft_adapter or houlsby:
        base = resolve_base(meta["base"]["ref"])
        # a body continued from a model dir may have had fewer classes; the adapters' head has them all
        body = load_pretrained(loader, base, dtype=torch.float32, ignore_mismatched_sizes=base.parent is not None,
                               **_head_kwargs(meta, tok))
        try:
            if peft_adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(body, d)
            else:
                from tunelab.methods.adapter import load_adapters  # safetensors again: Houlsby model dirs only

                model = load_adapters(body, d)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the adapters in {d}: {_first_line(err)}") from None
    elif (meta.get("compression") or {}).get("int8"):
        if device != "cpu":
            raise UserError(f"{d} is an int8 model for CPU serving; run it on the CPU (--device cpu)")
        from tunelab.int8 import load_int8  # torch.ao's quantised modules: only int8 model dirs need them

        model = load_int8(d, loader)
    else:
        model = load_pretrained(loader, BaseRef(str(d), d), check=False, dtype=torch.float32)
    model.to(device).eval()
    return model, tok, meta


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"tunelab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}

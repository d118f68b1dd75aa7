"""`--format gguf`: a Llama-family decoder (SmolLM2 and its fine-tunes, adapters merged first; or a base such as
`builtin:smollm2-135m-instruct` as it is) as one GGUF file for llama.cpp / Ollama, written with the `gguf`
package.

Tensors follow llama.cpp's names, with the q/k projections permuted the way its converter does (llama.cpp's rope
pairs dimensions (i, i + d/2) where transformers' rotate_half layout is stored); norms stay F32, matrices take
the asked type (F32, F16, BF16, Q8_0, Q4_0; the last two with block scales and levels fitted to calibration
text, see `quants`; a matrix whose rows do not split into 32-value blocks falls back to F16). The metadata carries the
hyper-parameters, the byte-level BPE vocabulary with its merges, the special tokens, the chat template and the
stop tokens. Parity: the file is read back by `transformers` (`gguf_file=`) and its next-token distributions are
compared with the PyTorch model's over every token of the parity rows (mean KL divergence, top-1 agreement,
perplexity ratio); then a real llama.cpp (the `xllamacpp` wheel) loads it and continues the first rows greedily:
its tokens against PyTorch's, and its top-5 next-token candidates. The tokenizer files sit beside the file, so that
`tunelab serve` renders and tokenises prompts exactly as in training and hands llama.cpp token ids.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from tunelab.errors import UserError
from tunelab.export import quants
from tunelab.merge import check_mergeable, merged
from tunelab.export.parity import calibration_rows, texts_of
from tunelab.generate import load_generator
from tunelab.model_files import sha256_file
from tunelab.models import max_length_of
from tunelab.tasks import task_spec

FILE = "model.gguf"
CALIBRATION_ROWS = 512  # train rows the quantiser is fitted to (tweets: 16k tokens, 10 per input of the widest)
TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# what a file of each type must keep of the model's next-token distribution
THRESHOLDS = {"f32": {"mean_kl": ("max", 1e-6), "top1_agreement": ("min", 0.999),
                     "llama_cpp_greedy_agreement": ("min", 0.9)},  # llama.cpp's own kernels, the same weights
              "f16": {"mean_kl": ("max", 1e-4), "top1_agreement": ("min", 0.99)},
              "bf16": {"mean_kl": ("max", 1e-3), "top1_agreement": ("min", 0.98)},
              "q8_0": {"mean_kl": ("max", 1e-3), "top1_agreement": ("min", 0.98)},
              "q4_0": {"mean_kl": ("max", 0.1), "top1_agreement": ("min", 0.8)}}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(d: Path, meta: dict, out: Path, rows: list[dict], quantize: str | None = None,
               thresholds: dict | None = None, data_dir: str | None = None) -> dict:
    """Write `model.gguf` for the decoder in model dir `d` into `out` -> the parity record. Q8_0 and Q4_0 blocks
    are fitted to calibration text (the train split of `data_dir` or of the model's dataset, see
    `quants`)."""
    qtype = (quantize or "f16").lower()
    if qtype not in TYPES:
        raise UserError(f"unknown --quantize '{quantize}' for gguf; choose {', '.join(TYPES)}")
    if not task_spec(meta["task"]).generates:
        raise UserError(f"{d} holds a '{meta['task']}' model; --format gguf exports decoders (causal_lm, sft). "
                        "Export an encoder with --format onnx or hf")
    method = check_mergeable(meta, d)
    gen = load_generator(str(d), "cpu")  # a model dir with its stop tokens, or a base with its chat stops
    model, tok = merged(gen.model).eval(), gen.tokenizer
    if model.config.model_type != "llama":
        raise UserError(f"{d}: --format gguf writes Llama-family models; this one is '{model.config.model_type}'")
    texts, max_length = texts_of(rows), max_length_of(meta)
    fitted, calibration = None, None
    if TYPES[qtype] in quants.LEVELS:
        calib, calibration = calibration_rows(meta, data_dir, CALIBRATION_ROWS)
        fitted = quants.Calibration(model, tok, texts_of(calib), max_length)
    _write(model, tok, meta, gen.stop, out / FILE, qtype, fitted)
    figures = _parity(model, tok, out, texts, max_length)
    figures.update(_llama_cpp(model, tok, out / FILE, texts, max_length))
    figures["size_mb"] = (out / FILE).stat().st_size / 2**20
    tok.save_pretrained(out)  # the tokenizer it was trained with, chat template and all: `serve` renders prompts by it
    return {"method": method, "type": qtype, "calibration": calibration, "figures": figures,
            "thresholds": THRESHOLDS[qtype] if thresholds is None else thresholds,
            "files": {FILE: {"size": (out / FILE).stat().st_size, "sha256": sha256_file(out / FILE)}}}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (per head: first halves, then second halves of the rotary pairs) -> llama.cpp's
    interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model):
    """(llama.cpp name, transformers name, float32 array) of every weight, q/k permuted (by rows: the columns,
    which the quantiser's weights follow, keep their order); the output matrix only when untied."""
    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, name in LAYER.items():
            key = f"model.layers.{i}.{hf}.weight"
            w = state[key]
            if name == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif name == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            yield f"blk.{i}.{name}.weight", key, w
    yield "output_norm.weight", "model.norm.weight", state["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", "lm_head.weight", state["lm_head.weight"]


def _vocab(tok, size: int) -> tuple[list[str], list[int], list[str]]:
    """The byte-level BPE vocabulary as GGUF wants it -> (tokens by id, token types, merges)."""
    data = json.loads(tok.backend_tokenizer.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise UserError("--format gguf writes byte-level BPE tokenizers (SmolLM2's kind); this one is "
                        f"{data.get('model', {}).get('type')}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    special = set(tok.all_special_ids) | {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens, types = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    return tokens, types, merges


def _write(model, tok, meta: dict, stop: list[str], path: Path, qtype: str,
           fitted: quants.Calibration | None) -> None:
    """The GGUF file; `fitted`: the calibration inputs that Q8_0 / Q4_0 blocks are fitted to."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(meta.get("base", {}).get("ref", "model")).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES[qtype])
    tokens, types, merges = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # SmolLM2's pre-tokenizer (digits one by one, then GPT-2's byte-level split)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    for setter, value in ((w.add_bos_token_id, tok.bos_token_id), (w.add_pad_token_id, tok.pad_token_id),
                          (w.add_unk_token_id, tok.unk_token_id)):
        if value is not None:
            setter(int(value))
    # llama.cpp's end of generation: for a chat model the end of a turn (the stop its chat template writes)
    primary = next((s for s in stop if tok.chat_template and s in tok.chat_template), stop[0] if stop else None)
    w.add_eos_token_id(int(tok.convert_tokens_to_ids(primary) if primary else tok.eos_token_id))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for name, key, data in _tensors(model):
        kind = TYPES[qtype] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind in quants.LEVELS and data.shape[-1] % quants.BLOCK:
            kind = gguf.GGMLQuantizationType.F16  # a row must split into 32-value blocks
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif kind in quants.LEVELS:
            hessian = fitted.hessian(key) if fitted else None
            compensate = name != "token_embd.weight" and fitted is not None and fitted.compensable(key)
            w.add_tensor(name, quants.quantize(data, kind, hessian, compensate), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.inference_mode()
def _parity(model, tok, out: Path, texts: list[str], max_length: int) -> dict:
    """The file read back by transformers vs the PyTorch model, over every next-token position of `texts`."""
    import warnings

    from transformers import AutoModelForCausalLM  # loads with this export only

    # its de-quantising bar (plain tqdm, deaf to transformers' own switch) is not the user's business
    with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(out, gguf_file=FILE, dtype=torch.float32).eval()
    kl_sum, agree, n, nll_ref, nll_back = 0.0, 0, 0, 0.0, 0.0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        ref = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        got = F.log_softmax(back(input_ids=ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        kl_sum += float((ref.exp() * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        nll_ref -= float(ref.gather(-1, target[:, None]).sum())
        nll_back -= float(got.gather(-1, target[:, None]).sum())
        n += len(target)
    if n == 0:
        raise UserError("the parity rows hold no text of two tokens or more; give --data DIR")
    return {"tokens": n, "mean_kl": kl_sum / n, "top1_agreement": agree / n,
            "perplexity_pytorch": math.exp(nll_ref / n), "perplexity_gguf": math.exp(nll_back / n),
            "perplexity_ratio": math.exp((nll_back - nll_ref) / n)}


LLAMA_CPP_PROMPTS, LLAMA_CPP_NEW_TOKENS = 4, 8


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to the process's stderr from C++: point file descriptor 2 at /dev/null meanwhile."""
    sys.stderr.flush()
    saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


@torch.inference_mode()
def _llama_cpp(model, tok, path: Path, texts: list[str], max_length: int) -> dict:
    """The file in llama.cpp: greedy continuations of the first rows (ids in, no end-of-text stop) against the
    PyTorch model's -> the share of generated tokens that agree (up to the first divergence per prompt) and the
    mean overlap of the first step's top-5 candidates."""
    import xllamacpp  # llama.cpp itself, the program the file is for: only for this check

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = max_length + LLAMA_CPP_NEW_TOKENS
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = torch.get_num_threads()
    params.warmup = False
    agree, total, overlap, prompts = 0, 0, 0.0, 0
    with quiet_stderr():
        server = xllamacpp.Server(params)
        for text in texts[:LLAMA_CPP_PROMPTS]:
            ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
            if not ids:
                continue
            answer = server.handle_completions({"prompt": ids, "max_tokens": LLAMA_CPP_NEW_TOKENS,
                                                "temperature": 0, "n_probs": 5, "ignore_eos": True,
                                                "cache_prompt": False})
            if "choices" not in answer:
                raise RuntimeError(f"llama.cpp did not complete with {path}: {str(answer)[:300]}")
            steps = answer["choices"][0]["logprobs"]["content"]
            got = [s["id"] for s in steps]
            seq = torch.tensor([ids])
            first_top = None
            for k in range(len(got)):
                logits = model(input_ids=seq).logits[0, -1]
                if first_top is None:
                    first_top = set(logits.topk(5).indices.tolist())
                nxt = int(logits.argmax())
                if nxt != got[k]:
                    break
                agree += 1
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            total += len(got)
            overlap += len(first_top & {c["id"] for c in steps[0]["top_logprobs"]}) / 5 if steps else 0
            prompts += 1
        del server  # its shutdown logs too
    return {"llama_cpp_prompts": prompts, "llama_cpp_greedy_agreement": agree / max(1, total),
            "llama_cpp_top5_overlap": overlap / max(1, prompts)}

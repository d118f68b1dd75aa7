"""`tunelab export`: a plain HF folder with adapters merged, ONNX for encoders (fp32 and int8), each checked
against the model it came from; unmergeable methods refused; a missed threshold leaves nothing behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.export import export_model



def _plain_load(folder: Path, auto_class: str) -> dict:
    """Load `folder` in a fresh interpreter with transformers alone -> what it found (no tunelab, no peft)."""
    code = (f"import json, sys, torch, transformers\n"
            f"m = transformers.{auto_class}.from_pretrained(sys.argv[1])\n"
            "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(json.dumps({'peft': 'peft' in sys.modules, 'tunelab': 'tunelab' in sys.modules,\n"
            "  'labels': m.config.id2label, 'template': bool(t.chat_template),\n"
            "  'eos': getattr(getattr(m, 'generation_config', None), 'eos_token_id', None)}))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hf_export_merges_lora_into_a_plain_classifier(tmp_path, lora_classifier):
    record = export_model(lora_classifier, tmp_path / "hf", "hf", rows=16)
    out = tmp_path / "hf"
    assert record["method"] == "lora" and record["figures"]["max_abs_diff"] <= 1e-4
    assert record["figures"]["top1_agreement"] == 1.0 and record["figures"]["positions"] == 16
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["kind"] == "export" and meta["format"] == "hf" and meta["source"]["method"]["name"] == "lora"
    assert meta["source"]["model_dir"] == str(lora_classifier.resolve()) and meta["files"]
    assert json.loads((out / "parity.json").read_text())["figures"] == record["figures"]
    found = _plain_load(out, "AutoModelForSequenceClassification")
    assert not found["peft"] and not found["tunelab"]
    assert list(found["labels"].values()) == json.loads((lora_classifier / "tunelab.json").read_text())["labels"]


def test_hf_export_of_a_chat_lora_keeps_template_and_stops(tmp_path, sft_lora):
    record = export_model(sft_lora, tmp_path / "chat", "hf", rows=8)
    assert record["figures"]["max_abs_diff"] <= 1e-4 and record["figures"]["positions"] > 8  # per token
    found = _plain_load(tmp_path / "chat", "AutoModelForCausalLM")
    assert found["template"] and not found["peft"]
    meta = json.loads((sft_lora / "tunelab.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_lora)
    stops = [tok.convert_tokens_to_ids(s) for s in meta["stop"]]
    assert (found["eos"] if isinstance(found["eos"], list) else [found["eos"]]) == stops


@pytest.mark.parametrize("method,reason", [("prompt", "virtual tokens"), ("prefix", "key/value"),
                                           ("adapter", "non-linear")])
def test_unmergeable_methods_are_refused_with_the_reason(tmp_path, tiny_classifier, method, reason):
    fake = tmp_path / "model"
    shutil.copytree(tiny_classifier, fake)
    meta = json.loads((fake / "tunelab.json").read_text())
    meta["method"] = {"name": method}
    (fake / "tunelab.json").write_text(json.dumps(meta))
    for fmt in ("hf", "onnx"):
        with pytest.raises(UserError, match=f"trained with {method}.*{reason}"):
            export_model(fake, tmp_path / fmt, fmt, rows=2)
        assert not (tmp_path / fmt).exists()


def test_a_missed_threshold_fails_the_export_and_leaves_nothing(tmp_path, tiny_classifier):
    out = tmp_path / "never"
    with pytest.raises(UserError, match="fails its parity check: max_abs_diff .* over its threshold"):
        export_model(tiny_classifier, out, "hf", rows=4, thresholds={"max_abs_diff": ("max", -1.0)})
    assert not out.exists() and not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # no temp folder


def test_onnx_classifier_matches_pytorch_and_int8_is_smaller(tmp_path, tiny_classifier):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    fp32 = export_model(tiny_classifier, tmp_path / "fp32", "onnx", rows=24)
    f = fp32["figures"]
    assert f["max_abs_diff"] <= 1e-4 and f["top1_agreement"] == 1.0 and f["metric"] == "macro_f1"
    assert abs(f["metric_drop"]) < 1e-9 and f["onnx_p50_ms_batch1"] > 0 and f["onnx_texts_per_s_batch32"] > 0
    # the file alone, with ONNX Runtime and the saved tokenizer: dynamic batch and sequence axes
    session = ort.InferenceSession(str(tmp_path / "fp32" / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "fp32")
    for texts in (["one"], ["a", "much longer text than the first one here", "mid length text"]):
        enc = tok(texts, padding=True, return_tensors="np")
        logits = session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                          "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
        assert logits.shape == (len(texts), len(json.loads((tiny_classifier / "tunelab.json").read_text())["labels"]))
    int8 = export_model(tiny_classifier, tmp_path / "int8", "onnx", quantize="int8", rows=24,
                        thresholds={"top1_agreement": ("min", 0.5)})
    assert int8["figures"]["size_mb"] < int8["figures"]["fp32_size_mb"]
    assert not (tmp_path / "int8" / "model.fp32.onnx").exists()
    files = json.loads((tmp_path / "int8" / "tunelab.json").read_text())["files"]
    assert files["model.onnx"]["size"] == (tmp_path / "int8" / "model.onnx").stat().st_size


def test_onnx_ner_matches_pytorch_per_token_and_in_entity_f1(tmp_path, tiny_ner):
    record = export_model(tiny_ner, tmp_path / "ner", "onnx", rows=12)
    f = record["figures"]
    assert f["max_abs_diff"] <= 1e-4 and f["positions"] > 12
    assert f["metric"] == "entity_f1" and f["metric_onnx"] == f["metric_pytorch"]
    # words get their first sub-token's tag as the training task does: the same F1 as the task's evaluation
    from tunelab.data.dataset import load_split
    from tunelab.models import load_model_dir, read_meta
    from tunelab.tasks.token_classification import TokenClassificationTask

    model, tok, meta = load_model_dir(tiny_ner)
    rows = load_split(read_meta(tiny_ner)["data"]["path"], "test")[:12]
    task = TokenClassificationTask(tok, meta["labels"], 512)
    assert f["metric_pytorch"] == pytest.approx(task.evaluate(model, task.encode(rows), 4)["entity_f1"], abs=0.02)
    assert f["metric_pytorch"] > 0.3  # the fixture finds entities; a misaligned reading would not


def test_onnx_exports_a_base_encoder_as_sentence_embeddings(tmp_path):
    import onnxruntime as ort

    record = export_model("tiny-bert", tmp_path / "emb", "onnx", rows=8)
    f = record["figures"]
    assert f["max_abs_diff"] <= 1e-4 and f["min_cosine"] > 0.9999 and f["neighbour_agreement"] == 1.0
    assert f["neighbour_recall_at_5"] == 1.0
    assert "top1_agreement" not in f
    meta = json.loads((tmp_path / "emb" / "tunelab.json").read_text())
    assert meta["task"] == "embeddings" and meta["source"]["model_dir"] == "tiny-bert"
    session = ort.InferenceSession(str(tmp_path / "emb" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    with pytest.raises(UserError, match="is a decoder"):
        export_model("tiny-llama", tmp_path / "x", "onnx", rows=2)
    assert not (tmp_path / "x").exists()


def test_onnx_refuses_a_generator_and_unknown_options(tmp_path, sft_lora, tiny_classifier):
    with pytest.raises(UserError, match="exports encoders"):
        export_model(sft_lora, tmp_path / "x", "onnx", rows=2)
    with pytest.raises(UserError, match="unknown --quantize 'int4'"):
        export_model(tiny_classifier, tmp_path / "x", "onnx", quantize="int4", rows=2)
    with pytest.raises(UserError, match="--quantize applies to --format onnx"):
        export_model(tiny_classifier, tmp_path / "x", "hf", quantize="int8", rows=2)
    with pytest.raises(UserError, match="unknown export format 'tflite'"):
        export_model(tiny_classifier, tmp_path / "x", "tflite")
    with pytest.raises(UserError, match="is a run dir"):
        export_model(tiny_classifier.parent, tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists()


def test_parity_rows_fall_back_when_the_dataset_is_gone(tmp_path, tiny_classifier):
    moved = tmp_path / "model"
    shutil.copytree(tiny_classifier, moved)
    meta = json.loads((moved / "tunelab.json").read_text())
    meta["data"] = {"path": str(tmp_path / "gone")}
    (moved / "tunelab.json").write_text(json.dumps(meta))
    record = export_model(moved, tmp_path / "hf", "hf", rows=5)
    assert record["rows"] == 5 and "built-in sentences" in record["rows_from"]
    with pytest.raises(UserError, match="not a dataset dir"):
        export_model(moved, tmp_path / "hf2", "hf", rows=5, data_dir=str(tmp_path / "gone"))


def test_gguf_f32_reads_back_exactly_and_q8_0_keeps_the_distribution(tmp_path, sft_lora):
    exact = export_model(sft_lora, tmp_path / "f32", "gguf", quantize="f32", rows=8)
    f = exact["figures"]
    assert f["tokens"] > 8 and f["mean_kl"] <= 1e-6 and f["top1_agreement"] == 1.0
    assert abs(f["perplexity_ratio"] - 1) < 1e-4
    # llama.cpp itself loads the file and continues the prompts as PyTorch does
    assert f["llama_cpp_prompts"] == 4 and f["llama_cpp_greedy_agreement"] >= 0.9 and f["llama_cpp_top5_overlap"] >= 0.8
    # a tiny random decoder's next-token distributions are nearly flat, so which token wins is a coin toss under
    # any rounding: its Q8_0 file is held to the distribution (KL), not to top-1 agreement
    q8 = export_model(sft_lora, tmp_path / "q8", "gguf", quantize="q8_0", rows=8,
                      thresholds={"mean_kl": ("max", 1e-5)})
    assert q8["figures"]["mean_kl"] <= 1e-5 and q8["figures"]["size_mb"] < f["size_mb"] / 2
    assert q8["calibration"].endswith("(train split)")
    from gguf import GGUFReader

    reader = GGUFReader(tmp_path / "q8" / "model.gguf")
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.0.attn_norm.weight"] == "F32"
    assert "tokenizer.chat_template" in reader.fields and "tokenizer.ggml.merges" in reader.fields


def test_gguf_refuses_encoders_and_unknown_types(tmp_path, tiny_classifier, sft_lora):
    with pytest.raises(UserError, match="exports decoders"):
        export_model(tiny_classifier, tmp_path / "x", "gguf", rows=2)
    with pytest.raises(UserError, match="unknown --quantize 'q3_k'"):
        export_model(sft_lora, tmp_path / "x", "gguf", quantize="q3_k", rows=2)
    assert not (tmp_path / "x").exists()


def test_gguf_exports_a_base_decoder_as_it_is(tmp_path):
    record = export_model("tiny-llama", tmp_path / "base", "gguf", quantize="f32", rows=4)
    assert record["figures"]["mean_kl"] <= 1e-6 and record["figures"]["llama_cpp_prompts"] == 4
    meta = json.loads((tmp_path / "base" / "tunelab.json").read_text())
    assert meta["source"]["model_dir"] == "tiny-llama" and meta["task"] == "causal_lm"

"""`tunelab compress --int8`: a model dir whose linear layers are int8, saved as plain tensors and loaded back
to compute exactly what was saved."""

import json

import numpy as np
import pytest
import torch

from tunelab.errors import UserError
from tunelab.export.quantize import compress_int8
from tunelab.int8 import WEIGHTS, quantised, quantised_layers
from tunelab.models import load_model_dir


@pytest.fixture(scope="module")
def int8_classifier(tmp_path_factory, tiny_classifier):
    out = tmp_path_factory.mktemp("int8") / "sentiment-int8"
    compress_int8(tiny_classifier, out)
    return out


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits


def test_int8_model_dir_reloads_to_the_model_that_was_saved(int8_classifier, tiny_classifier):
    texts = ["what a great day", "this is awful", "the train leaves at noon"]
    model, tok, meta = load_model_dir(int8_classifier)
    assert len(quantised_layers(model)) == meta["compression"]["int8"]["layers"] > 0
    fp32, _, parent = load_model_dir(tiny_classifier)
    expected = _logits(quantised(fp32), tok, texts)  # quantising the parent in memory gives the same model
    assert torch.equal(_logits(model, tok, texts), expected)
    # and it stays close to the float model it came from
    assert (_logits(load_model_dir(tiny_classifier)[0], tok, texts) - expected).abs().max() < 0.2
    assert meta["labels"] == parent["labels"] and meta["parent"]["model_dir"] == str(tiny_classifier.resolve())
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in int8_classifier.iterdir())
    assert json.loads((int8_classifier / "tunelab.json").read_text())["files"][WEIGHTS]["size"] > 0


def test_a_changed_int8_file_is_refused_and_int8_is_not_compressed_twice(tmp_path, int8_classifier):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_classifier, copy)
    with pytest.raises(UserError, match="is int8 already"):
        compress_int8(copy, tmp_path / "again")
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the size and sha256"):
        load_model_dir(copy)


def test_pruning_nothing_keeps_the_logits_and_unused_neurons_go_first(tiny_classifier):
    from tunelab.export.prune import _blocks, neuron_importance, pruned

    model, tok, _ = load_model_dir(tiny_classifier)
    texts = ["what a great day", "this is awful", "the train leaves at noon"]
    before = _logits(model, tok, texts)
    importance = neuron_importance(model, tok, texts, 32)
    same, kept = pruned(model, importance, 1.0, None)
    assert torch.equal(_logits(same, tok, texts), before) and kept["ffn_width"] == kept["ffn_width_of"]
    model, _, _ = load_model_dir(tiny_classifier)
    silent = [3, 7, 11]  # neurons whose output weights are zero move nothing: they rank last in every layer
    with torch.no_grad():
        for block in _blocks(model):
            block.output.dense.weight[:, silent] = 0
    before = _logits(model, tok, texts)
    importance = neuron_importance(model, tok, texts, 32)
    assert all(set(np.argsort(ranks)[:3]) == set(silent) for ranks in importance)
    # and they are the ones pruned away, without changing what the model computes
    width = _blocks(model)[0].intermediate.dense.out_features
    smaller, kept = pruned(model, importance, (width - 3) / width, None)
    assert kept["ffn_width"] == width - 3 and smaller.config.intermediate_size == width - 3
    assert torch.allclose(_logits(smaller, tok, texts), before, atol=1e-5)


def test_compress_prune_writes_a_smaller_model_dir_vanilla_transformers_loads(tmp_path, tiny_classifier):
    from transformers import AutoModelForSequenceClassification

    from tunelab.export.prune import compress_prune

    meta = compress_prune(tiny_classifier, tmp_path / "pruned", ffn_keep=0.5, layers=1, epochs=2, lr=3e-3,
                          show_progress=False)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned")
    parent = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    assert plain.config.num_hidden_layers == 1 < parent.config.num_hidden_layers
    assert plain.config.intermediate_size * 2 == parent.config.intermediate_size
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in parent.parameters())
    prune = meta["compression"]["prune"]
    assert prune["layers_kept"] == [0] and meta["parent"]["model_dir"] == str(tiny_classifier.resolve())
    assert meta["labels"] == json.loads((tiny_classifier / "tunelab.json").read_text())["labels"]
    model, _, _ = load_model_dir(tmp_path / "pruned")
    assert model.config.num_hidden_layers == 1


def test_pruning_refuses_decoders_and_impossible_shapes(tmp_path, tiny_classifier, sft_lora):
    from tunelab.export.prune import compress_prune

    with pytest.raises(UserError, match="pruning is for encoders"):
        compress_prune(sft_lora, tmp_path / "x")
    with pytest.raises(UserError, match="--layers must be between 1 and"):
        compress_prune(tiny_classifier, tmp_path / "x", layers=99)
    with pytest.raises(UserError, match="--prune-ffn"):
        compress_prune(tiny_classifier, tmp_path / "x", ffn_keep=0)
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("not tunelab's")
    with pytest.raises(UserError, match="taken"):  # refused before anything is computed
        compress_prune(tiny_classifier, tmp_path / "taken")


def test_the_report_measures_every_form_on_the_same_rows(tmp_path, tiny_classifier, int8_classifier, tiny_ner):
    from tunelab.export import export_model
    from tunelab.export.report import compression_report

    export_model(tiny_classifier, tmp_path / "onnx", "onnx", rows=4)
    result = compression_report([tiny_classifier, int8_classifier, tmp_path / "onnx"], rows=20, bf16=True)
    first, bf16, int8, onnx = result["models"]
    assert result["rows"] == 20 and [r["runtime"] for r in result["models"]] == ["pytorch"] * 3 + ["onnxruntime"]
    assert [r["precision"].split()[0] for r in result["models"]] == ["fp32", "bf16", "int8", "fp32"]
    assert first["metric"] == "macro_f1" and first["delta"] == 0 and first["speedup_batch1"] == 1.0
    assert bf16["model"] == first["model"] and bf16["size_mb"] == pytest.approx(first["size_mb"] / 2)
    assert abs(bf16["delta"]) < 0.2  # bf16 keeps 8 bits of mantissa: a few predictions may flip, not many
    assert onnx["value"] == pytest.approx(first["value"], abs=1e-9)  # fp32 ONNX: the same predictions
    assert int8["compression"] == ["int8"] and abs(int8["delta"]) < 0.2
    assert all(r["p50_ms_batch1"] > 0 and r["texts_per_s_batch32"] > 0 and r["size_mb"] > 0
               for r in result["models"])
    ner = compression_report([tiny_ner], rows=12)["models"][0]
    assert ner["metric"] == "entity_f1" and 0 <= ner["value"] <= 1
    with pytest.raises(UserError, match="not found"):
        compression_report([tmp_path / "nothing"])
    for not_fp32 in (int8_classifier, tmp_path / "onnx"):  # bf16 casts fp32 PyTorch weights, nothing else
        with pytest.raises(UserError, match="bf16"):
            compression_report([not_fp32], rows=4, bf16=True)

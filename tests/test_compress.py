"""`tunelab compress --int8`: a model dir whose linear layers are int8, saved as plain tensors and loaded back
to compute exactly what was saved."""

import json

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

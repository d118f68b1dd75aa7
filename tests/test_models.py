import json

import pytest
import torch

from tunelab.config import MethodConfig
from tunelab.errors import UserError
from tunelab.methods import MethodContext, apply_method
from tunelab.models import (count_parameters, load_classifier, load_model_dir, resolve_base,
                            save_model_dir)
from tunelab.tasks.classification import ClassificationTask

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["the flight was late again", "great service!", "seat 12A, Tuesday", "ok"]


def _logits(model, tok, texts=TEXTS):
    task = ClassificationTask(tok, LABELS, 32)
    return torch.from_numpy(task.logits(model, task.encode([{"text": t} for t in texts], labelled=False)))


def _meta(method="full", base="tiny-bert"):
    return {"task": "classification", "labels": LABELS, "base": {"ref": base}, "method": {"name": method},
            "max_length": 32, "data": {"dir": "x", "fingerprint": "f", "train_examples": 0}}


def test_resolve_base_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_base(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a model dir"):
        resolve_base(str(tmp_path))
    with pytest.raises(UserError, match="unknown built-in"):
        resolve_base("builtin:gpt-17")
    with pytest.raises(UserError, match="hub"):
        load_classifier("some-org/some-model-that-is-not-here", LABELS)


@pytest.mark.parametrize("base", ["tiny-bert", "tiny-llama"])
def test_save_load_same_logits_full(tmp_path, base):
    torch.manual_seed(0)
    model, tok, _, new = load_classifier(base, LABELS)
    model = apply_method(model, MethodConfig(name="full"), MethodContext("classification", new))
    before = _logits(model, tok)
    save_model_dir(model, tok, tmp_path / "m", _meta(base=base))
    loaded, tok2, meta = load_model_dir(tmp_path / "m")
    assert torch.allclose(before, _logits(loaded, tok2), atol=1e-6)
    assert meta["labels"] == LABELS
    # vanilla transformers reads it too, with the label names
    from transformers import AutoModelForSequenceClassification

    vanilla = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert vanilla.config.id2label == dict(enumerate(LABELS))


def test_decoder_classifier_has_pad_token_and_ignores_padding():
    model, tok, _, _ = load_classifier("tiny-llama", LABELS)
    assert model.config.pad_token_id == tok.pad_token_id is not None
    alone = _logits(model.eval(), tok, ["great service!"])
    padded = _logits(model, tok, ["great service!", "a much longer text that forces padding of the first"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_head_method_trains_only_the_head():
    model, tok, _, new = load_classifier("tiny-bert", LABELS)
    model = apply_method(model, MethodConfig(name="head"), MethodContext("classification", new))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_lora_save_load_and_merged_equals_unmerged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model, tok, base, new = load_classifier("tiny-bert", LABELS)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = MethodConfig(name="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = apply_method(model, lora, MethodContext("classification", new))
    n_train, n_total = count_parameters(model)
    assert 0 < n_train < n_total
    # Make the adapters non-zero so the test is not trivially true (B starts at zero).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = _logits(model.eval(), tok)
    save_model_dir(model, tok, tmp_path / "m", _meta("lora"))
    assert (tmp_path / "m" / "adapter_config.json").is_file()
    assert not (tmp_path / "m" / "model.safetensors").exists()
    loaded, tok2, _ = load_model_dir(tmp_path / "m")
    assert torch.allclose(out, _logits(loaded, tok2), atol=1e-5)
    merged = loaded.merge_and_unload()
    assert torch.allclose(out, _logits(merged, tok2), atol=1e-5)
    # the adapter never touched the base weights
    body = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=3)
    for n, p in body.named_parameters():
        if not n.startswith("classifier"):
            assert torch.equal(p, base_before[n]), n
    # vanilla peft: base with the label count, then the adapter folder
    vanilla = PeftModel.from_pretrained(body, tmp_path / "m").eval()
    assert torch.allclose(out, _logits(vanilla, tok2), atol=1e-5)


def test_model_dir_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="not a tunelab model dir"):
        load_model_dir(tmp_path)
    (tmp_path / "tunelab.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        load_model_dir(tmp_path)
    (tmp_path / "tunelab.json").write_text(json.dumps(_meta()))
    with pytest.raises(UserError, match="no model weights"):
        load_model_dir(tmp_path)

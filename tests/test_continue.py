"""Continuing from a tunelab model dir: the same weights and tokenizer at step 0, a grown label set that keeps
every old logit, the body only for another task, adapters merged first (or refused with the reason), and the
lineage recorded in the new model dir."""

import json
import shutil

import pytest
import torch

from tunelab.config import validate
from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.models import (labels_of, load_causal_lm, load_classifier, load_model_dir, load_token_classifier,
                            resolve_base)
from tunelab.train.loop import train

from conftest import tiny_config

TEXTS = ["the service was great and fast", "a terrible, slow delivery", "the shares closed flat today"]


def _logits(model, tok, texts=TEXTS) -> torch.Tensor:
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_a_classifier_dir_continues_as_its_own_weights_and_tokenizer(tiny_classifier):
    saved, saved_tok, meta = load_model_dir(tiny_classifier)
    model, tok, base, new = load_classifier(str(tiny_classifier), list(reversed(meta["labels"])))
    assert base.parent["task"] == "classification" and new == []
    assert labels_of(model) == meta["labels"]  # the saved order, whatever order the new dataset lists them in
    want = saved.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    assert tok.get_vocab() == saved_tok.get_vocab()


def test_new_labels_grow_the_head_and_keep_every_old_logit(tiny_classifier):
    saved, tok, meta = load_model_dir(tiny_classifier)
    model, _, _, new = load_classifier(str(tiny_classifier), ["spam", *meta["labels"]])
    assert labels_of(model) == [*meta["labels"], "spam"]
    assert {"classifier.weight", "classifier.bias"} <= set(new)  # the grown head trains at the head's rate
    old, grown = _logits(saved, tok), _logits(model, tok)
    assert grown.shape[-1] == old.shape[-1] + 1
    torch.testing.assert_close(grown[:, :-1], old, rtol=0, atol=1e-6)


def test_a_ner_dir_grows_its_tag_set(tiny_ner):
    saved, tok, meta = load_model_dir(tiny_ner)
    model, _, _, _ = load_token_classifier(str(tiny_ner), [*meta["labels"], "B-PRODUCT", "I-PRODUCT"])
    assert labels_of(model) == [*meta["labels"], "B-PRODUCT", "I-PRODUCT"]
    torch.testing.assert_close(_logits(model, tok)[..., :len(meta["labels"])], _logits(saved, tok), rtol=0,
                               atol=1e-6)


def test_another_tasks_dir_gives_its_body_and_a_fresh_head(tiny_classifier, tiny_ner):
    clf, _, _ = load_model_dir(tiny_classifier)
    tags = load_model_dir(tiny_ner)[2]["labels"][:3]  # as many tags as the classifier has classes: same shapes
    model, _, base, new = load_token_classifier(str(tiny_classifier), tags)
    assert base.parent["task"] == "classification" and labels_of(model) == tags
    body = clf.state_dict()
    assert all(torch.equal(t, body[k]) for k, t in model.state_dict().items() if k.startswith("bert."))
    assert {"classifier.weight", "classifier.bias"} <= set(new)
    assert not torch.equal(model.classifier.weight, clf.classifier.weight)  # a sentiment head is no tagger


def test_a_lora_dir_is_merged_once_into_a_plain_base(lora_classifier):
    saved, tok, meta = load_model_dir(lora_classifier)
    model, _, base, _ = load_classifier(str(lora_classifier), meta["labels"])
    assert not hasattr(model, "peft_config") and base.path.name.startswith("merged-")
    torch.testing.assert_close(_logits(model, tok), _logits(saved, tok), rtol=0, atol=1e-5)
    assert resolve_base(str(lora_classifier)).path == base.path  # merged once, then read from the cache


def test_a_chat_dir_continues_with_its_chat_template(sft_lora):
    saved, saved_tok, _ = load_model_dir(sft_lora)
    model, tok, base, _ = load_causal_lm(str(sft_lora))
    assert tok.chat_template == saved_tok.chat_template and base.parent["task"] == "sft"
    torch.testing.assert_close(_logits(model, tok), _logits(saved, tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    ({"method": {"name": "adapter"}}, "Houlsby adapters are extra non-linear layers"),
    ({"method": {"name": "prompt"}}, "virtual tokens are learned inputs"),
    ({"compression": {"int8": True}, "parent": {"model_dir": "runs/x/model"}}, "continues from float weights: "
                                                                                "runs/x/model"),
])
def test_dirs_that_cannot_be_continued_are_refused_with_the_way_out(tmp_path, lora_classifier, edit, message):
    d = tmp_path / "model"
    shutil.copytree(lora_classifier, d)
    meta = json.loads((d / "tunelab.json").read_text())
    (d / "tunelab.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(UserError, match=message):
        resolve_base(str(d))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_run_from_a_model_dir_learns_the_new_class_and_records_its_parent(tmp_path, tiny_classifier,
                                                                             four_labels, method):
    raw = tiny_config(four_labels, epochs=6)
    raw["model"]["base"] = str(tiny_classifier)
    raw["method"] = {"name": method, **({"lora": {"r": 4, "alpha": 8}} if method == "lora" else {})}
    train(validate(raw), tmp_path / "run", show_progress=False)
    model, tok, meta = load_model_dir(tmp_path / "run" / "model")  # a LoRA over the grown head loads too
    parent = json.loads((tiny_classifier / "tunelab.json").read_text())
    assert meta["labels"] == [*parent["labels"], "question"]
    lineage = meta["base"]["parent"]
    assert lineage["model_dir"] == str(tiny_classifier.resolve()) and lineage["task"] == "classification"
    assert lineage["files"] == {name: f["sha256"] for name, f in parent["files"].items()}
    assert lineage["data"]["fingerprint"] == parent["data"]["fingerprint"]
    asked = [r["text"] for r in load_split(four_labels, "test") if r["label"] == "question"]
    predicted = [meta["labels"][i] for i in _logits(model, tok, asked).argmax(-1).tolist()]
    assert len(asked) >= 5 and predicted.count("question") >= 0.6 * len(asked)  # the new class is learnt

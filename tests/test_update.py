"""Updates: replayed old rows (seeded, from the old train split, at the asked share), the L2-SP and EWC pulls,
and `tunelab update` end to end: before/after on the old and the new test split, the gate recorded in the model
dir, and a deliberately bad update failing its gate (exit 3)."""

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import validate
from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.train.regularize import Anchor, anchored, diagonal_fisher, replay_rows
from tunelab.train.update import gate, update

from conftest import make_rows, tiny_config, write_csv


def _cfg(base, replay_dir=None, share=0.25, seed=0):
    return SimpleNamespace(model=SimpleNamespace(base=str(base)), train=SimpleNamespace(seed=seed),
                           data=SimpleNamespace(replay=SimpleNamespace(share=share, dir=replay_dir)))


def test_replay_draws_a_seeded_share_of_the_old_train_split(tiny_classifier, small_dataset):
    old_train = load_split(small_dataset, "train")
    rows, info = replay_rows(_cfg(tiny_classifier), "classification", 300, "label")
    assert len(rows) == 100 and info["rows"] == 100 and info["share"] == pytest.approx(0.25)
    assert info["dir"] == str(small_dataset.resolve())  # found through the model dir's lineage
    assert all(r in old_train for r in rows)
    assert {r["label"] for r in rows} == {"positive", "negative", "neutral"}
    again, _ = replay_rows(_cfg(tiny_classifier), "classification", 300, "label")
    other, _ = replay_rows(_cfg(tiny_classifier, seed=1), "classification", 300, "label")
    assert again == rows and other != rows


def test_replay_needs_old_data_of_the_same_kind(tiny_classifier, small_dataset, text_data):
    with pytest.raises(UserError, match="not a tunelab model dir"):
        replay_rows(_cfg("tiny-bert"), "classification", 10, "label")
    with pytest.raises(UserError, match="holds a 'text' dataset"):
        replay_rows(_cfg(tiny_classifier, replay_dir=str(text_data)), "classification", 10, "label")


def test_l2sp_pulls_each_weight_back_by_its_distance_and_leaves_the_new_head_free():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = anchored(model, ["1.weight", "1.bias"])
    assert set(params) == {"0.weight", "0.bias"}
    anchor = Anchor(params, strength=2.0, fisher=None)
    with torch.no_grad():
        model[0].weight += 0.5
    value = anchor.add_grad()
    torch.testing.assert_close(model[0].weight.grad, torch.full((4, 3), 1.0))  # λ (θ - θ₀) = 2 × 0.5
    assert value == pytest.approx(0.5 * 2.0 * 12 * 0.25)
    assert model[1].weight.grad is None


def test_ewc_fisher_is_the_mean_squared_gradient_normalised_to_one(tiny_classifier):
    from tunelab.models import load_model_dir
    from tunelab.tasks.classification import ClassificationTask

    model, tok, meta = load_model_dir(tiny_classifier)
    task = ClassificationTask(tok, meta["labels"], 32)
    rows = [{"text": "a great flight", "label": "positive"}, {"text": "an awful delay", "label": "negative"}]
    params = anchored(model, [])
    fisher = diagonal_fisher(model, task, task.encode(rows), params, "cpu")
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert values.min() >= 0 and values.mean().item() == pytest.approx(1.0, rel=1e-4)
    # unnormalised, it is the mean of the two examples' squared gradients
    grads = []
    for i in range(2):
        model.zero_grad()
        batch = task.collate(task.encode(rows), [i])
        task.loss_sum(model, batch).backward()
        grads.append(params["classifier.weight"].grad.clone() ** 2)
    raw = (grads[0] + grads[1]) / 2
    scale = raw / fisher["classifier.weight"]
    assert torch.allclose(scale[raw > 1e-12], scale[raw > 1e-12].flatten()[0], rtol=1e-3)


def test_the_gate_passes_only_a_gain_without_forgetting():
    before = {"old": {"macro_f1": 0.80}, "new": {"macro_f1": 0.50}}
    good = gate(before, {"old": {"macro_f1": 0.795}, "new": {"macro_f1": 0.70}}, True, 0.01, 0.01)
    forgot = gate(before, {"old": {"macro_f1": 0.70}, "new": {"macro_f1": 0.70}}, True, 0.01, 0.01)
    idle = gate(before, {"old": {"macro_f1": 0.80}, "new": {"macro_f1": 0.505}}, True, 0.01, 0.01)
    assert good["passed"] and not forgot["passed"] and not idle["passed"]
    assert "old data lost 0.1000" in forgot["reason"] and "new data gained +0.0050" in idle["reason"]
    ppl = gate({"old": {"perplexity": 10.0}, "new": {"perplexity": 20.0}},
               {"old": {"perplexity": 10.5}, "new": {"perplexity": 15.0}}, False, 0.01, 0.01)
    assert not ppl["passed"] and ppl["drop"] == pytest.approx(0.05) and ppl["gain"] == pytest.approx(0.25)


def test_an_update_with_replay_and_a_pull_records_before_after_and_its_gate(tmp_path, tiny_classifier,
                                                                            small_dataset, four_labels):
    record = update(tiny_classifier, four_labels, tmp_path / "run", replay=0.3, regularize="ewc", strength=1.0,
                    overrides=["train.epochs=6"])
    for when in ("before", "after"):
        assert set(record[when]) == {"old", "new"} and "macro_f1" in record[when]["old"]
    g = record["gate"]
    assert g["passed"] == (g["gain"] >= g["min_gain"] and g["drop"] <= g["max_drop"])
    assert g["gain"] > 0.1  # the new class is learnt: before, no row of it could be right
    meta = json.loads((tmp_path / "run" / "model" / "tunelab.json").read_text())
    assert meta["update"]["gate"] == g and meta["data"]["replay"]["dir"] == str(small_dataset.resolve())
    assert meta["regularize"]["kind"] == "ewc" and meta["base"]["parent"]["model_dir"] == str(tiny_classifier.resolve())
    assert json.loads((tmp_path / "run" / "update.json").read_text()) == record
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("penalty" in entry for entry in logged)


def test_a_bad_update_fails_its_gate_and_exits_3(tmp_path, tiny_classifier, small_dataset):
    """New data whose labels contradict the old ones (positive and negative swapped): the old test split collapses."""
    from tunelab.data.prepare import prepare

    swap = {"positive": "negative", "negative": "positive", "neutral": "neutral"}
    rows = [{**r, "label": swap[r["label"]]} for r in make_rows(240, seed=21, start=9000)]
    prepare(str(write_csv(tmp_path / "bad.csv", rows)), tmp_path / "bad")
    res = CliRunner().invoke(app, ["update", str(tiny_classifier), "--data", str(tmp_path / "bad"), "--out",
                                   str(tmp_path / "run"), "train.epochs=6", "train.eval_every=0"])
    assert res.exit_code == 3, res.output
    assert "gate failed" in res.output and "old data lost" in res.output
    meta = json.loads((tmp_path / "run" / "model" / "tunelab.json").read_text())
    assert meta["update"]["gate"]["passed"] is False and meta["update"]["gate"]["drop"] > 0.3


def test_update_refuses_half_a_pull(tmp_path, tiny_classifier, small_dataset):
    with pytest.raises(UserError, match="--regularize and --strength go together"):
        update(tiny_classifier, small_dataset, tmp_path / "run", regularize="l2sp")
    assert validate(tiny_config(small_dataset)).train.regularize is None


def test_update_refuses_before_any_work_what_it_cannot_read_or_write(tmp_path, monkeypatch, tiny_classifier,
                                                                      small_dataset, ner_data):
    import tunelab.train.update as update_module

    monkeypatch.setattr(update_module, "scores", lambda *a: pytest.fail("scored before refusing"))
    with pytest.raises(UserError, match="is a ner dataset, but .* classification one"):
        update(tiny_classifier, ner_data, tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="mine"):
        update(tiny_classifier, small_dataset, mine)
    assert (mine / "notes.txt").read_text() == "keep"
    (tmp_path / "done" / "model").mkdir(parents=True)
    (tmp_path / "done" / "tunelab.json").write_text(json.dumps({"kind": "run"}))
    with pytest.raises(UserError, match="already holds a run; replace it with --overwrite"):
        update(tiny_classifier, small_dataset, tmp_path / "done")


def test_an_update_learns_chinese_rows_and_a_chinese_label(tmp_path, tiny_classifier):
    """Stranger input: the new data is Chinese (mostly unknown to tiny-bert's English vocabulary: it runs, with the
    poor-fit warning), its labels new Chinese classes; the record keeps them as written (UTF-8, not escapes)."""
    from tunelab.data.prepare import prepare

    words = {"正面": ["很好", "喜欢", "满意"], "负面": ["糟糕", "讨厌", "延误"], "投诉": ["投诉", "退款", "赔偿"]}
    rows = [{"text": f"航班{i}号 {words[label][i % 3]} 今天", "label": label}
            for i in range(180) for label in [("正面", "负面", "投诉")[i % 3]]]
    prepare(str(write_csv(tmp_path / "zh.csv", rows)), tmp_path / "zh")
    record = update(tiny_classifier, tmp_path / "zh", tmp_path / "run", replay=0.2, overrides=["train.epochs=2"])
    meta = json.loads((tmp_path / "run" / "model" / "tunelab.json").read_text(encoding="utf-8"))
    assert {"正面", "负面", "投诉", "positive", "negative", "neutral"} <= set(meta["labels"])
    assert set(record["labels_added"]) == {"正面", "负面", "投诉"}
    assert "投诉" in (tmp_path / "run" / "update.json").read_text(encoding="utf-8")
    assert set(record["after"]) == {"old", "new"} and record["training"]["examples_seen"] > 0


def test_a_ner_update_learns_a_new_entity_type_the_old_model_is_scored_on(tmp_path, tiny_ner, ner_data):
    """The new data names products (a type the old tagger does not have): before, it is scored as missing them,
    not refused; after, the tag set has grown and the new data's entity F1 has risen."""
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    rows = [{"tokens": r["tokens"] + ["via", "Acme", "Phone"], "tags": r["tags"] + ["O", "B-PRODUCT", "I-PRODUCT"]}
            for split in ("train", "validation", "test") for r in load_split(ner_data, split)]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(str(tmp_path / "new.jsonl"), tmp_path / "new", PrepareOptions(task="ner"))
    record = update(tiny_ner, tmp_path / "new", tmp_path / "run", replay=0.2, overrides=["train.epochs=4"])
    assert record["metric"] == "entity_f1"
    assert record["after"]["new"]["entity_f1"] > record["before"]["new"]["entity_f1"] + 0.05
    labels = json.loads((tmp_path / "run" / "model" / "tunelab.json").read_text())["labels"]
    assert {"B-PRODUCT", "I-PRODUCT"} <= set(labels)

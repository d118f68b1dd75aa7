"""Overfitting remedies: adversarial training (FGM, PGD), label smoothing, dropout settings; ensembles of model
dirs (predict, eval, serve); k-fold cross-validation that keeps near-duplicate groups in one fold."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_rows, tiny_config, write_csv
from tunelab.config import ServeConfig, validate
from tunelab.errors import UserError


# ---- adversarial training, label smoothing, dropout ------------------------------------------------------
def _grads(cfg_raw, small_dataset, adversarial=None):
    """The parameters' gradients of one window of the tiny classifier (seeded), with the given adversary."""
    from tunelab.config import AdversarialConfig
    from tunelab.tasks import task_spec
    from tunelab.train.adversarial import Adversary
    from tunelab.train.loop import accumulate_gradients, seed_everything
    from tunelab.data.dataset import load_meta, load_split

    cfg = validate(cfg_raw)
    seed_everything(0)
    rows = load_split(small_dataset, "train")[:16]
    model, _, _, _, task = task_spec("classification").build()(cfg, load_meta(small_dataset), rows)
    model.eval()  # no dropout: the two runs differ by the adversary only
    enc = task.encode(rows)
    adversary = Adversary(AdversarialConfig.model_validate(adversarial)) if adversarial else None
    loss = accumulate_gradients(model, task, enc, [list(range(16))], "cpu", adversary=adversary)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adversarial", [{"method": "fgm", "epsilon": 0.5},
                                         {"method": "pgd", "epsilon": 0.5, "alpha": 0.2, "steps": 3}])
def test_adversarial_training_changes_the_gradient_not_the_reported_loss(small_dataset, adversarial):
    raw = tiny_config(small_dataset)
    clean_loss, clean = _grads(raw, small_dataset)
    adv_loss, adv = _grads(raw, small_dataset, adversarial)
    assert adv_loss == pytest.approx(clean_loss, rel=1e-5)  # the clean loss is what the log shows
    assert clean.keys() == adv.keys()
    assert all(torch.isfinite(g).all() for g in adv.values())
    diff = sum(float((adv[n] - clean[n]).norm()) for n in clean)
    assert diff > 1e-3 * sum(float(g.norm()) for g in clean.values())
    # the word embeddings get the adversarial pass's gradient too (its rows for the batch's tokens)
    name = next(n for n in clean if "word_embeddings" in n)
    assert not torch.allclose(adv[name], clean[name])


def test_fgm_and_pgd_still_train_with_smoothing_and_dropout(small_dataset, tmp_path):
    from tunelab.train.loop import train

    for name, adv in [("fgm", {"method": "fgm", "epsilon": 0.02}),
                      ("pgd", {"method": "pgd", "epsilon": 0.02, "alpha": 0.01, "steps": 2})]:
        raw = tiny_config(small_dataset, epochs=10, adversarial=adv, label_smoothing=0.1)
        raw["model"].update(hidden_dropout=0.05, attention_dropout=0.0)
        summary = train(validate(raw), tmp_path / name, show_progress=False)
        assert summary["best_metric"] > 0.6, (name, summary["best_metric"])  # chance is 0.33
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [x["train_loss"] for x in lines if "train_loss" in x]
        assert losses[-1] < losses[0]


def test_dropout_settings_reach_the_model_and_are_checked(small_dataset, text_data):
    from tunelab.tasks import task_spec
    from tunelab.data.dataset import load_meta, load_split

    raw = tiny_config(small_dataset)
    raw["model"].update(hidden_dropout=0.3, attention_dropout=0.2)
    model = task_spec("classification").build()(validate(raw), load_meta(small_dataset),
                                                load_split(small_dataset, "train"))[0]
    assert model.config.hidden_dropout_prob == 0.3 and model.config.attention_probs_dropout_prob == 0.2
    ps = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.3, 0.2}
    lm = {"task": "causal_lm", "model": {"base": "tiny-llama", "hidden_dropout": 0.1},
          "data": {"dir": str(text_data)}, "method": {"name": "full"}}
    with pytest.raises(UserError, match="hidden dropout setting"):
        task_spec("causal_lm").build()(validate(lm), load_meta(text_data), load_split(text_data, "train"))


def test_label_smoothing_is_for_labelled_tasks(small_dataset, text_data, tmp_path):
    from tunelab.tasks.classification import ClassificationTask
    from tunelab.train.loop import train

    logits = torch.tensor([[4.0, 0.0, 0.0]])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()

    task = ClassificationTask.__new__(ClassificationTask)
    batch = {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([0])}
    plain_loss = float(task.loss_sum(Fixed(), batch))
    task.label_smoothing = 0.3
    p = torch.log_softmax(logits, -1)[0]
    assert float(task.loss_sum(Fixed(), batch)) == pytest.approx(float(-(0.8 * p[0] + 0.1 * p[1] + 0.1 * p[2])))
    assert float(task.loss_sum(Fixed(), batch)) > plain_loss
    lm = {"task": "causal_lm", "model": {"base": "tiny-llama", "max_length": 32}, "data": {"dir": str(text_data)},
          "method": {"name": "full"}, "train": {"label_smoothing": 0.1, "max_steps": 1}}
    with pytest.raises(UserError, match="label_smoothing"):
        train(validate(lm), tmp_path / "lm", show_progress=False)


# ---- ensembles ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_classifier):
    from tunelab.ensemble import build_ensemble

    d = tmp_path_factory.mktemp("ens")
    build_ensemble([tiny_classifier, tiny_classifier], d / "mean")
    build_ensemble([tiny_classifier, tiny_classifier, tiny_classifier], d / "vote", combine="vote")
    return d


def test_an_ensemble_of_identical_classifiers_equals_the_single_model(twin, tiny_classifier, small_dataset):
    from tunelab.evaluate.report import evaluate
    from tunelab.predict import predict_texts

    texts = [r["text"] for r in make_rows(40, seed=5, start=500)] + ["", "天气 很好 ✈️"]
    single = predict_texts(tiny_classifier, texts)
    for kind in ("mean", "vote"):
        both = predict_texts(twin / kind, texts)
        assert [r["prediction"] for r in both] == [r["prediction"] for r in single]
    for a, b in zip(predict_texts(twin / "mean", texts), single):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
    one = evaluate(tiny_classifier, small_dataset, eval_cfg=None, overrides={"baselines": []})
    ens = evaluate(twin / "mean", small_dataset, overrides={"baselines": []})
    assert ens["macro_f1"] == pytest.approx(one["macro_f1"]) and ens["accuracy"] == pytest.approx(one["accuracy"])
    assert ens["ece"] == pytest.approx(one["ece"], abs=1e-5)
    assert ens["model"]["method"] == "ensemble (mean)" and ens["leakage"]["checked"]


def test_an_ensemble_of_identical_ner_models_equals_the_single_model(tiny_ner, ner_data, tmp_path):
    from tunelab.data.dataset import load_split
    from tunelab.ensemble import build_ensemble
    from tunelab.evaluate.report import evaluate
    from tunelab.predict import predict_texts

    build_ensemble([tiny_ner, tiny_ner], tmp_path / "ner")
    texts = [" ".join(r["tokens"]) for r in load_split(ner_data, "test")[:20]]
    single, ens = predict_texts(tiny_ner, texts), predict_texts(tmp_path / "ner", texts)
    assert [[(e["type"], e["start"], e["end"]) for e in r["entities"]] for r in ens] == \
        [[(e["type"], e["start"], e["end"]) for e in r["entities"]] for r in single]
    assert any(r["entities"] for r in single)
    one = evaluate(tiny_ner, ner_data, overrides={"baselines": []})
    both = evaluate(tmp_path / "ner", ner_data, overrides={"baselines": []})
    assert both["entity_f1"] == pytest.approx(one["entity_f1"])
    assert both["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_ensembles_refuse_what_does_not_combine(tiny_classifier, tiny_ner, sft_lora, twin, tmp_path):
    from tunelab.ensemble import build_ensemble

    with pytest.raises(UserError, match="two or more"):
        build_ensemble([tiny_classifier], tmp_path / "one")
    with pytest.raises(UserError, match="share one task"):
        build_ensemble([tiny_classifier, tiny_ner], tmp_path / "mixed")
    with pytest.raises(UserError, match="classifiers or NER"):
        build_ensemble([sft_lora, sft_lora], tmp_path / "lm")
    with pytest.raises(UserError, match="do not nest"):
        build_ensemble([twin / "mean", tiny_classifier], tmp_path / "nested")
    with pytest.raises(UserError, match="one positive number per model dir"):
        build_ensemble([tiny_classifier, tiny_classifier], tmp_path / "w", weights=[1.0])
    with pytest.raises(UserError, match="already holds"):
        build_ensemble([tiny_classifier, tiny_classifier], twin / "mean")


def test_the_server_answers_for_an_ensemble(twin, tiny_classifier):
    from tunelab.predict import predict_texts
    from tunelab.serve.app import create_app
    from tunelab.serve.registry import check_specs

    cfg = ServeConfig(models=[f"ens={twin / 'vote'}"], embedding_model=None)
    texts = [r["text"] for r in make_rows(10, seed=9, start=700)]
    with TestClient(create_app(cfg, check_specs(cfg.models, None), keys=[]), base_url="http://localhost") as client:
        deadline = time.time() + 60
        while client.get("/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert client.get("/v1/models").json()["data"][0]["tunelab_engine"] == "ensemble"
        got = client.post("/v1/classify", json={"model": "ens", "input": texts}).json()
    assert [d["label"] for d in got["data"]] == [r["prediction"] for r in predict_texts(tiny_classifier, texts)]


# ---- cross-validation ------------------------------------------------------------------------------------
def test_group_kfold_never_splits_a_group_and_balances_folds():
    from tunelab.data.split import group_kfold

    rng = random.Random(0)
    rows = [{"label": rng.choice("abc")} for _ in range(1000)]
    groups = [rng.randrange(300) for _ in range(1000)]  # groups of ~3 rows, mixed labels
    for k in (2, 5):
        fold = group_kfold(rows, k, seed=1, groups=groups, label_field="label")
        by_group: dict[int, set[int]] = {}
        for g, f in zip(groups, fold):
            by_group.setdefault(g, set()).add(f)
        assert all(len(fs) == 1 for fs in by_group.values())
        sizes = np.bincount(fold, minlength=k)
        assert sizes.min() > 0.8 * 1000 / k
        assert fold == group_kfold(rows, k, seed=1, groups=groups, label_field="label")  # seeded


def test_cv_keeps_near_duplicates_in_one_fold_and_reports_mean_and_std(tmp_path):
    from tunelab.config import PrepareOptions
    from tunelab.data.dataset import load_split
    from tunelab.data.prepare import prepare
    from tunelab.train.cv import cross_validate

    rows = make_rows(240, seed=3)
    # near-duplicate families (a word changed), kept by prepare (near_action: group), so they reach train
    rows += [{"text": f"{base['text']} again {j}", "label": base["label"]} for base in rows[:30] for j in range(2)]
    prepare(str(write_csv(tmp_path / "rows.csv", rows)), tmp_path / "ds",
            PrepareOptions(dedup={"near_action": "group"}))
    raw = tiny_config(tmp_path / "ds", epochs=2)
    summary = cross_validate(validate(raw), 3, tmp_path / "cv")
    assert [r["fold"] for r in summary["per_fold"]] == [0, 1, 2]
    assert summary["data"]["near_duplicate_groups"] >= 20
    f1 = [r["scores"]["macro_f1"] for r in summary["per_fold"]]
    assert summary["scores"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert summary["scores"]["macro_f1"]["std"] == pytest.approx(np.std(f1, ddof=1))
    fold_of_text = {r["text"]: k for k in range(3) for r in load_split(tmp_path / "cv" / "folds" / str(k), "test")}
    for k in range(3):
        train_texts = {r["text"] for r in load_split(tmp_path / "cv" / "folds" / str(k), "train")}
        assert not train_texts & {t for t, f in fold_of_text.items() if f == k}
    assert len(fold_of_text) == len(load_split(tmp_path / "ds", "train"))  # every train row held out once
    # each family built above (a row and its two near copies) sits in one fold
    families = [[t for t in (base["text"], f"{base['text']} again 0", f"{base['text']} again 1") if t in fold_of_text]
                for base in rows[:30]]
    families = [f for f in families if len(f) > 1]
    assert len(families) >= 15
    assert all(len({fold_of_text[t] for t in f}) == 1 for f in families)
    # a second run keeps the trained folds (same config, same rows)
    weights = tmp_path / "cv" / "fold-0" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = cross_validate(validate(raw), 3, tmp_path / "cv")
    assert weights.stat().st_mtime_ns == stamp
    assert [r["scores"] for r in again["per_fold"]] == [r["scores"] for r in summary["per_fold"]]


def test_bootstrap_intervals_cover_and_the_paired_test_sees_only_real_gains():
    from tunelab.evaluate.metrics import bootstrap_interval, paired_bootstrap

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    weak = np.where(rng.random(2000) < 0.7, y, rng.integers(0, 3, 2000))  # ~80% right
    strong = np.where(rng.random(2000) < 0.9, y, rng.integers(0, 3, 2000))  # ~93% right
    low, high = bootstrap_interval(y, weak, "accuracy")
    assert low < float((y == weak).mean()) < high and high - low < 0.05
    assert paired_bootstrap(y, strong, weak, "macro_f1")["verdict"] == "better"
    assert paired_bootstrap(y, weak, strong, "accuracy")["verdict"] == "worse"
    same = paired_bootstrap(y, weak, weak.copy(), "macro_f1")
    assert same["difference"] == 0 and same["verdict"] == "no clear difference"


def test_a_config_with_seeds_trains_members_and_writes_an_ensemble(small_dataset, tmp_path):
    from tunelab.artifacts import kind_of
    from tunelab.evaluate.report import evaluate
    from tunelab.train.members import train_ensemble

    raw = tiny_config(small_dataset, epochs=3)
    raw["ensemble"] = {"seeds": [0, 1], "combine": "mean"}
    summary = train_ensemble(validate(raw), tmp_path / "run")
    assert kind_of(tmp_path / "run") == "run" and kind_of(tmp_path / "run" / "model") == "ensemble"
    assert [m["seed"] for m in summary["members"]] == [0, 1]
    seeds = [json.loads((tmp_path / "run" / "members" / f"seed-{s}" / "model" / "tunelab.json").read_text())["seed"]
             for s in (0, 1)]
    assert seeds == [0, 1]
    report = evaluate(tmp_path / "run" / "model", overrides={"baselines": []})
    assert report["model"]["method"] == "ensemble (mean)" and 0 <= report["macro_f1"] <= 1
    with pytest.raises(UserError, match="already holds a run"):
        train_ensemble(validate(raw), tmp_path / "run")
    weights = tmp_path / "run" / "members" / "seed-1" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    train_ensemble(validate(raw), tmp_path / "run", resume="auto")  # members kept, the ensemble rebuilt
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="must differ"):
        validate({**raw, "ensemble": {"seeds": [0, 0]}})

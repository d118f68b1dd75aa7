import random
import re

import numpy as np
import pytest

from tunelab.config import EvalConfig
from tunelab.evaluate import baselines as bl
from tunelab.evaluate.report import evaluate, print_report
from tunelab.models import load_tokenizer

from conftest import make_rows

LABELS = ["negative", "neutral", "positive"]
# Chinese-like rows without spaces: the label is decided by characters, not by any whitespace-separated word.
ZH_POS, ZH_NEG = "好棒赞爱美", "差烂坏慢贵"
ZH_FILLER = "这个产品质量服务快递包装颜色尺寸手机衣服鞋子书本商家客服价格物流东西感觉今天收到一次还是"


def zh_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        chars = rng.sample(ZH_FILLER, rng.randint(8, 14))
        pool = {"positive": ZH_POS, "negative": ZH_NEG}.get(label)
        for c in rng.sample(pool, 2) if pool else []:
            chars.insert(rng.randrange(len(chars) + 1), c)
        rows.append({"text": "".join(chars) + "。", "label": label})
    return rows


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fits(monkeypatch):
    """Counts logistic-regression fits (the grid's and the final one's)."""
    calls, real = [], bl._fit_clf
    monkeypatch.setattr(bl, "_fit_clf", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    return calls


def test_tfidf_learns_the_label_words(tmp_cache):
    rows = make_rows(300)
    out = bl.tfidf_logreg(rows[:240], rows[240:], LABELS)
    assert out["macro_f1"] > 0.9 and out["train_examples"] == 240 and out["n"] == 60
    # no validation rows: tuned on a seeded 10% hold-out of train, then refit on all of train
    assert "hold-out" in out["tuned_on"] and out["validation_examples"] == 24
    assert out["name"] == f"TF-IDF {out['features']} + LR" and len(out["grid"]) == 9


def test_tfidf_reads_text_without_spaces_by_characters(tmp_cache):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    train, val, test = zh_rows(150, 0), zh_rows(51, 1), zh_rows(51, 2)
    out = bl.tfidf_logreg(train, test, LABELS, validation_rows=val)
    assert out["features"] in ("char", "word+char") and out["feature_spec"].endswith("char 1-3-grams")
    assert out["macro_f1"] > 0.9 and out["validation_macro_f1"] > 0.9
    # the old word-only recipe sees one "word" per text here: near chance (1/3), as the grid's word rows show
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform([r["text"] for r in train]),
                                                      [r["label"] for r in train])
    word_f1 = f1_score([r["label"] for r in test], clf.predict(vec.transform([r["text"] for r in test])),
                       average="macro")
    assert word_f1 < 0.5, word_f1
    assert max(g["validation_macro_f1"] for g in out["grid"] if g["features"] == "word") < 0.5


def test_tfidf_is_tuned_on_validation_never_on_test(tmp_cache):
    from sklearn.metrics import f1_score

    rows = make_rows(360)
    train, val, test = rows[:240], rows[240:300], rows[300:]
    out = bl.tfidf_logreg(train, test, LABELS, validation_rows=val, cache=False)
    scores = [g["validation_macro_f1"] for g in out["grid"]]
    best = out["grid"][int(np.argmax(scores))]  # the first best, in grid order
    assert (out["features"], out["C"], out["validation_macro_f1"]) == (best["features"], best["C"], max(scores))
    assert {(g["features"], g["C"]) for g in out["grid"]} == {(f, c) for f in bl.FEATURE_SETS for c in bl.C_GRID}
    assert out["tuned_on"] == "validation" and out["validation_examples"] == 60
    assert out["tuned_on_evaluated_rows"] is False
    # the reported validation score is the chosen config fit on train, scored on the validation rows
    y = np.array([LABELS.index(r["label"]) for r in train])
    model = bl._fit(train, y, out["features"], out["C"], True, 0)
    pred = model.probs([r["text"] for r in val], 3).argmax(1)
    assert round(f1_score([LABELS.index(r["label"]) for r in val], pred, average="macro"), 6) == best[
        "validation_macro_f1"]
    # other test rows (even mislabelled ones) change the test score, never the choice
    flipped = [{"text": r["text"], "label": LABELS[(LABELS.index(r["label"]) + 1) % 3]} for r in test]
    other = bl.tfidf_logreg(train, flipped, LABELS, validation_rows=val, cache=False)
    assert (other["features"], other["C"], other["grid"]) == (out["features"], out["C"], out["grid"])
    assert other["macro_f1"] < 0.2 < 0.9 < out["macro_f1"]
    # scored on its own validation rows, the report says so
    assert bl.tfidf_logreg(train, val, LABELS, validation_rows=val, cache=False)["tuned_on_evaluated_rows"] is True


def test_tfidf_choice_is_cached_by_the_data(tmp_cache, fits):
    rows = make_rows(300)
    train, val, test = rows[:240], rows[240:270], rows[270:]
    first = bl.tfidf_logreg(train, test, LABELS, validation_rows=val)
    assert len(fits) == 9 and first["cache_hit"] is False  # the grid; its best model is the final one
    entries = list((tmp_cache / "baselines").glob("tfidf-*"))
    assert len(entries) == 1 and (entries[0] / "choice.json").is_file()
    fits.clear()
    second = bl.tfidf_logreg(train, test[:20], LABELS, validation_rows=val)  # other test rows: same choice
    assert fits == [first["C"]] and second["cache_hit"] is True  # one refit of the cached choice, no grid
    third = bl.tfidf_logreg(train, test, LABELS, validation_rows=val)
    assert third["cache_hit"] is True
    # the refit is the very model the grid chose: the same scores whether the cache was warm or cold
    for key in ("macro_f1", "accuracy", "confusion_matrix", "ece", "features", "C", "grid"):
        assert third[key] == first[key], key
    fits.clear()
    changed = bl.tfidf_logreg(train[1:], test, LABELS, validation_rows=val)  # other train rows: a miss
    assert len(fits) == 9 and changed["cache_hit"] is False
    fits.clear()
    bl.tfidf_logreg(train, test, LABELS, validation_rows=val, seed=1)  # another seed: a miss
    assert len(fits) == 9 and len(list((tmp_cache / "baselines").glob("tfidf-*"))) == 3


def test_tfidf_rebuilds_a_damaged_cache_entry(tmp_cache, fits):
    rows = make_rows(300)
    train, val, test = rows[:240], rows[240:270], rows[270:]
    first = bl.tfidf_logreg(train, test, LABELS, validation_rows=val)
    (entry,) = (tmp_cache / "baselines").glob("tfidf-*")
    (entry / "choice.json").write_text('{"version": "tfidf-2", "features": "wo')
    fits.clear()
    again = bl.tfidf_logreg(train, test, LABELS, validation_rows=val)
    assert len(fits) == 9 and again["cache_hit"] is False and again["macro_f1"] == first["macro_f1"]
    assert bl._read_choice(entry)["features"] == first["features"]


def test_label_tokens_cover_spellings():
    tok = load_tokenizer("tiny-llama")
    ids = bl._label_token_ids(tok, "positive")
    assert tok("positive", add_special_tokens=False)["input_ids"][0] in ids
    assert tok(" Positive", add_special_tokens=False)["input_ids"][0] in ids


def test_zero_shot_samples_and_scores_every_row():
    rows = make_rows(40)
    out = bl.zero_shot("tiny-llama", rows, LABELS, samples=25, batch_size=8)
    assert out["sample_size"] == out["n"] == 25 and out["population"] == 40
    assert sum(map(sum, out["confusion_matrix"]["matrix"])) == 25
    assert 0 <= out["macro_f1"] <= 1 and "prompt" in out


def test_zero_shot_batching_does_not_change_scores(monkeypatch):
    # zero_shot returns only aggregates, and tiny-llama predicts one class for every row, so equal confusion
    # matrices prove little: capture the per-row predictions and probabilities it hands to the metrics.
    seen, metrics = [], bl.classification_metrics

    def spy(y, pred, labels, probs=None):
        seen.append((np.asarray(pred), np.asarray(probs)))
        return metrics(y, pred, labels, probs)

    monkeypatch.setattr(bl, "classification_metrics", spy)
    rows = make_rows(12)
    a = bl.zero_shot("tiny-llama", rows, LABELS, samples=None, batch_size=1)
    b = bl.zero_shot("tiny-llama", rows, LABELS, samples=None, batch_size=12)
    (pred_a, probs_a), (pred_b, probs_b) = seen
    assert probs_a.shape == (12, 3)
    assert np.allclose(probs_a, probs_b, atol=1e-5), np.abs(probs_a - probs_b).max()
    assert (pred_a == pred_b).all()
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert np.isclose(a["ece"], b["ece"], atol=1e-4)


def test_report_keys_and_table(tmp_path, small_dataset, capsys):
    from tunelab.config import validate
    from tunelab.train.loop import train

    from conftest import tiny_config

    summary = train(validate(tiny_config(small_dataset, max_steps=4)), tmp_path / "run", show_progress=False)
    report = evaluate(summary["model_dir"], None, "test", tmp_path / "r.json",
                      EvalConfig(baselines=["tfidf", "zero_shot"], zero_shot_model="tiny-llama", zero_shot_samples=10))
    assert set(report["baselines"]) == {"tfidf_logreg", "zero_shot"}
    assert report["baselines"]["zero_shot"]["sample_size"] == 10
    assert report["data"]["same_data_as_training"] is True
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.confusion.png").is_file()
    print_report(report)
    printed = capsys.readouterr().out
    assert "TF-IDF" in printed and "fine-tuned tiny-bert" in printed and "10 of 30" in printed
    name = re.escape(report["baselines"]["tfidf_logreg"]["name"])
    assert re.search(rf"fine-tuned model (beats {name} by \+|scores \d\.\d{{4}} macro-F1 below {name} \(|shows no "
                     rf"clear difference from {name}: )", printed)
    assert "macro-F1 95% CI" in printed and "paired on the rows both scored" in printed
    # each baseline's interval, and the comparisons on the rows both scored: the zero-shot's seeded sample
    for m in (report, *report["baselines"].values()):
        lo, hi = m["intervals"]["macro_f1"]
        assert lo <= m["macro_f1"] <= hi and "predictions" not in m and "scored_rows" not in m
    assert report["comparisons"]["zero_shot"]["rows"] == 10
    assert report["comparisons"]["tfidf_logreg"]["rows"] == report["n"] == 30
    assert report["statistics"] == {"method": "percentile bootstrap", "level": 0.95, "resamples": 1000, "seed": 0,
                                    "unit": "row"}


def test_eval_reads_the_run_configs_eval_section_and_flags_win(tmp_path, small_dataset):
    import pytest

    from tunelab.config import validate
    from tunelab.errors import UserError
    from tunelab.train.loop import train

    from conftest import tiny_config

    cfg = tiny_config(small_dataset, max_steps=2)
    cfg["eval"] = {"baselines": ["zero_shot"], "zero_shot_model": "tiny-llama", "zero_shot_samples": 7,
                   "batch_size": 4}
    summary = train(validate(cfg), tmp_path / "run", show_progress=False)
    report = evaluate(summary["model_dir"])
    assert set(report["baselines"]) == {"zero_shot"} and report["baselines"]["zero_shot"]["sample_size"] == 7
    assert report["eval"]["batch_size"] == 4
    report = evaluate(summary["model_dir"], overrides={"zero_shot_samples": 5, "baselines": ["tfidf", "zero_shot"]})
    assert report["baselines"]["zero_shot"]["sample_size"] == 5 and "tfidf_logreg" in report["baselines"]
    with pytest.raises(UserError, match="invalid eval options: 'zero_shot_samples'"):
        evaluate(summary["model_dir"], overrides={"zero_shot_samples": -1})


# ---- few-shot ------------------------------------------------------------------------------------------------

def test_few_shot_prompts_answer_k_examples_before_each_row(monkeypatch, tmp_cache):
    seen = []

    def fake_scores(model_ref, conversations, labels, batch_size):
        seen.extend(conversations)
        return np.log(np.full((len(conversations), len(labels)), 1 / len(labels)))

    monkeypatch.setattr(bl, "_label_scores", fake_scores)
    train, test = make_rows(60), make_rows(20)
    out = bl.few_shot("tiny-llama", train, test, LABELS, k=4, selection="random", samples=8, seed=3,
                      predictions=True)
    assert out["sample_size"] == 8 and out["population"] == 20 and out["k"] == 4 and len(seen) == 8
    zero_rows = bl._sample(test, 8, 3)[1].tolist()
    assert out["scored_rows"] == zero_rows  # the zero-shot baseline's sample: the two compare on the same rows
    texts = {r["text"]: r["label"] for r in train}
    for conversation, i in zip(seen, zero_rows):
        roles = [m["role"] for m in conversation]
        assert roles == ["user", "assistant"] * 4 + ["user"]
        assert test[i]["text"] in conversation[-1]["content"]
        for ask, answer in zip(conversation[:-1:2], conversation[1:-1:2]):
            shown = next(t for t in texts if t in ask["content"])
            assert answer["content"] == texts[shown]  # each example answered with its own label
        assert {m["content"] for m in conversation[1:-1:2]} == set(LABELS)  # k >= 3 labels: all are shown
    again = bl.few_shot("tiny-llama", train, test, LABELS, k=4, selection="random", samples=8, seed=3)
    assert again["cache_hit"] and not out["cache_hit"] and len(seen) == 8  # scored once, then read back
    assert "predictions" not in again and again["macro_f1"] == out["macro_f1"]
    bl.few_shot("tiny-llama", train, test, LABELS, k=2, selection="random", samples=8, seed=3)
    assert len(seen) == 16  # another k is another entry


def test_random_shots_cover_the_labels_without_repeats():
    rows = [{"text": str(i), "label": LABELS[i % 3]} for i in range(30)]
    for chosen in bl._random_shots(rows, 50, 5, seed=0):
        assert len(chosen) == len(set(chosen)) == 5
        assert {rows[i]["label"] for i in chosen} == set(LABELS)
    assert all(len(c) == 2 for c in bl._random_shots(rows, 10, 2, seed=0))
    assert bl._random_shots(rows, 5, 3, seed=1) == bl._random_shots(rows, 5, 3, seed=1)


@pytest.mark.integration
def test_similar_shots_are_the_nearest_rows_nearest_last():
    examples = [{"text": t, "label": "x"} for t in (
        "The central bank raised interest rates again.", "My cat sleeps all day on the sofa.",
        "Shares fell sharply after the earnings report.", "We baked bread and a chocolate cake.")]
    query = [{"text": "Stock prices dropped after the company's quarterly results."}]
    (chosen,) = bl._similar_shots("builtin:minilm-l6", examples, query, k=2)
    assert chosen == [0, 2]  # both finance rows; the closest (the earnings one) last, nearest the question


def test_report_with_the_few_shot_baseline_compares_on_the_zero_shot_rows(tmp_path, small_dataset, tmp_cache):
    from tunelab.config import validate
    from tunelab.train.loop import train

    from conftest import tiny_config

    summary = train(validate(tiny_config(small_dataset, max_steps=2)), tmp_path / "run", show_progress=False)
    report = evaluate(summary["model_dir"], None, "test", None, EvalConfig(
        baselines=["zero_shot", "few_shot"], zero_shot_model="tiny-llama", zero_shot_samples=12, few_shot_k=2,
        few_shot_selection="random", bootstrap=200))
    few, comparisons = report["baselines"]["few_shot"], report["comparisons"]
    assert few["sample_size"] == 12 and few["name"].startswith("2-shot tiny-llama")
    assert comparisons["few_shot"]["rows"] == comparisons["zero_shot"]["rows"] == 12
    assert report["train_rows"]["baselines"]["few_shot"] == few["pool"]

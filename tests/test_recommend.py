"""Recommendation: interactions dirs (reading with accounting, time splits that never leak the future, cold items),
the ranking metrics against hand-computed values, every recommender's save → load round trip, the two-stage
ranker through the training loop, and serving (a user with no history answered, never an error)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.recommend import store
from tunelab.recommend.data import PrepareSpec, load, prepare
from tunelab.recommend.fit import train_recommender
from tunelab.recommend.hybrid import choose_weights, standardise
from tunelab.recommend.metrics import evaluate, rank_metrics, top_k
from tunelab.recommend.models import Catalogue
from tunelab.recommend.serving import Recommendations
from tunelab.serve.app import create_app
from tunelab.serve.registry import check_specs

GENRES = ["Drama", "Comedy", "Action", "Horror"]


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, Path]:
    """40 users, 60 items in 4 genres; each user mostly picks one genre, in time order (some timestamps tied);
    plus bad rows of each kind."""
    d = tmp_path_factory.mktemp("rec-raw")
    rng = np.random.default_rng(0)
    items = [{"item_id": f"m{i}", "title": f"Film {i} 電影", "genres": GENRES[i % 4] + ("|Drama" if i % 7 == 0 else "")}
             for i in range(60)]
    rows = []
    for u in range(40):
        taste = u % 4
        picks = rng.permutation([i for i in rng.permutation(60) if i % 4 == taste][:8]
                                + list(rng.choice(60, 3, replace=False)))
        t = 1_000_000 + 1000 * u
        for n, i in enumerate(dict.fromkeys(int(x) for x in picks)):
            t += 0 if n % 5 == 4 else int(rng.integers(1, 500))  # every fifth one tied with the one before
            rows.append({"user": f"u{u}", "item": f"m{i}", "rating": str(int(rng.integers(1, 6))), "timestamp": str(t)})
    rows += [{"user": "", "item": "m1", "rating": "3", "timestamp": "5"},
             {"user": "u1", "item": "m2", "rating": "x", "timestamp": "5"},
             {"user": "u1", "item": "m3", "rating": "4", "timestamp": "yesterday"},
             {"user": rows[0]["user"], "item": rows[0]["item"], "rating": "4", "timestamp": "7"}]
    return _write(d / "interactions.csv", rows), _write(d / "items.csv", items)


@pytest.fixture(scope="module")
def data_dir(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "data"
    prepare(PrepareSpec(str(raw[0]), str(raw[1]), cold_items=0.15), out)
    return out


def test_prepare_counts_every_bad_row_by_reason(data_dir):
    meta = json.loads((data_dir / "tunelab.json").read_text())
    assert meta["kind"] == "interactions"
    assert meta["counts"]["rejected"] == {"bad_rating": 1, "bad_timestamp": 1, "missing_user": 1,
                                          "repeated_interaction": 1}
    rejected = [json.loads(line) for line in (data_dir / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == sorted(meta["counts"]["rejected"])
    c = meta["counts"]
    assert c["train_rows"] + c["validation_rows"] + c["test_rows"] + c["cold_test_rows"] == c["interactions"]
    data = load(data_dir)
    assert data.cold.sum() == c["cold_items"] == 9
    for split in ("train", "validation", "test"):  # cold items appear only in cold_test
        assert not data.cold[data.splits[split]["item"]].any()
    assert data.cold[data.splits["cold_test"]["item"]].all()
    assert data.items[0]["categories"] and "電影" in data.items[0]["text"]
    # a repeated user-item pair counts once, at its earliest time (the repeat in the file is dated 7)
    first = data.splits["train"]
    pair = (data.user_index["u0"], data.item_index[next(iter(load_rows(data_dir, "train")))["item"]])
    rows = [(u, i, t) for u, i, t in zip(first["user"].tolist(), first["item"].tolist(), first["timestamp"].tolist())
            if (u, i) == pair]
    assert [t for _, _, t in rows] == [7.0]


def load_rows(data_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]


def test_too_many_bad_rows_fail_prepare(tmp_path):
    rows = [{"user": "a" if n % 2 else "", "item": f"i{n}", "timestamp": str(n)} for n in range(20)]
    with pytest.raises(UserError, match="50.0% of 20 rows are unusable"):
        prepare(PrepareSpec(str(_write(tmp_path / "bad.csv", rows))), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_leave_last_out_never_trains_on_a_later_interaction(data_dir):
    data = load(data_dir)
    ts = {s: {} for s in ("train", "validation", "test")}
    for s in ts:
        part = data.splits[s]
        for u, t in zip(part["user"].tolist(), part["timestamp"].tolist()):
            ts[s].setdefault(u, []).append(t)
    assert len(ts["test"]) == data.n_users and all(len(v) == 1 for v in ts["test"].values())
    for u, (t_test,) in ts["test"].items():
        (t_val,) = ts["validation"][u]
        assert max(ts["train"][u]) <= t_val <= t_test
    # ties: the order is the file's, the same on every run
    again = load(data_dir)
    assert all(np.array_equal(a, b) for a, b in zip(data.histories("train"), again.histories("train")))


def test_global_time_cut_puts_every_test_row_after_every_train_row(raw, tmp_path):
    meta = prepare(PrepareSpec(str(raw[0]), str(raw[1]), split="time", cold_items=0.1), tmp_path / "t")
    data = load(tmp_path / "t")
    train, val, test = (data.splits[s]["timestamp"] for s in ("train", "validation", "test"))
    assert train.max() <= val.min() <= val.max() <= test.min()
    c = meta["counts"]
    unseen = c["validation_item_unseen_before"] + c["test_item_unseen_before"]
    assert c["train_rows"] + c["validation_rows"] + c["test_rows"] + c["cold_test_rows"] + unseen == c["interactions"]
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "t" / "rejected.jsonl").read_text().splitlines()]
    assert reasons.count("test_item_unseen_before") == c["test_item_unseen_before"]
    lines = len(raw[0].read_text().splitlines()) - 1  # the header
    assert sum(c["rejected"].values()) + c["interactions"] == c["rows_read"] == lines


def test_builtin_movielens_reads_as_data(tmp_path):
    meta = prepare(PrepareSpec("builtin:movielens-100k", cold_items=0.1), tmp_path / "ml")
    c = meta["counts"]
    assert (c["interactions"], c["users"], c["items"], c["cold_items"]) == (100_000, 943, 1682, 168)
    assert c["test_rows"] == c["validation_rows"] == 943 and c["rejected"] == {}


def test_a_missing_column_is_one_clear_error(raw, tmp_path):
    result = _cli("recommend", "prepare", str(raw[1]), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "error: " in result.stderr and "no user column" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_cold_cases_read_only_the_past(data_dir):
    data = load(data_dir)
    histories, targets, earlier = data.cold_cases()
    assert targets
    cold = data.splits["cold_test"]
    for u in range(data.n_users):
        picks = sorted((t, i) for uu, i, t in zip(cold["user"].tolist(), cold["item"].tolist(),
                                                 cold["timestamp"].tolist()) if uu == u)
        warm = sorted((t, n, i) for n, (uu, i, t) in enumerate(
            zip(*(np.concatenate([data.splits[s][c] for s in ("train", "validation")]).tolist()
                  for c in ("user", "item", "timestamp")))) if uu == u)
        middle = warm[len(warm) // 2][0] if warm else None
        after = [i for t, i in picks if middle is not None and t > middle]
        assert sorted(targets.get(u, np.array([], int)).tolist()) == sorted(after)
        assert sorted(earlier.get(u, np.array([], int)).tolist()) == sorted(i for t, i in picks if i not in after) \
            or u not in targets
        if after:
            first = min(t for t, i in picks if i in after)
            assert sorted(histories[u].tolist()) == sorted(i for t, _, i in warm if t < first)


def test_metrics_equal_hand_computed_values():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    allowed = np.array([[True, False, True, True, True], [True] * 5])
    relevant = [np.array([2, 4]), np.array([0])]
    m = rank_metrics(scores, allowed, relevant, k=2)
    # user 0: ranking 0, 2, 3, 4 (1 not allowed): top-2 = [0, 2] → 1 hit at rank 2
    assert m["precision"][0] == pytest.approx(0.5) and m["recall"][0] == pytest.approx(0.5)
    assert m["ndcg"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["mrr"][0] == pytest.approx(0.5)
    # user 1: ranking 4, 3, 2, 1, 0: the relevant item is last
    assert (m["precision"][1], m["recall"][1], m["ndcg"][1]) == (0, 0, 0)
    assert m["mrr"][1] == pytest.approx(1 / 5)
    ties = top_k(np.zeros((1, 4)), np.array([[True, False, True, True]]), 3)
    assert ties.tolist() == [[0, 2, 3]]  # a list shows equal scores in item order…
    flat = rank_metrics(np.zeros((1, 4)), np.ones((1, 4), bool), [np.array([0])], k=2)
    assert flat["ndcg"][0] == 0 and flat["mrr"][0] == pytest.approx(1 / 4)  # …but a tie earns a model nothing
    pair = rank_metrics(np.array([[1.0, 1.0, 0.0]]), np.ones((1, 3), bool), [np.array([0, 1])], k=2)
    assert pair["ndcg"][0] == pytest.approx(1.0) and pair["precision"][0] == 1.0  # tied relevant: places 1 and 2
    nan = rank_metrics(np.array([[np.nan, 0.5, 0.9]]), np.ones((1, 3), bool), [np.array([0])], k=2)
    assert nan["ndcg"][0] == 0 and nan["mrr"][0] == pytest.approx(1 / 3)  # a NaN score ranks last
    z = standardise(np.array([[1.0, 2.0, 3.0, 100.0]]), np.array([[True, True, True, False]]))
    assert z[0, :3] == pytest.approx([-1.2247, 0, 1.2247], abs=1e-3)


def test_hybrid_weights_pick_the_informative_member():
    rng = np.random.default_rng(0)
    relevant = [np.array([i % 10]) for i in range(30)]
    good = rng.random((30, 10))
    for row, r in enumerate(relevant):
        good[row, r] += 1
    weights, ndcg = choose_weights([rng.random((30, 10)), good], np.ones((30, 10), bool), relevant, 3)
    assert weights[1] > weights[0] and ndcg == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recs")
    out = {}
    for name in ("popularity", "genre-popularity", "random", "itemknn", "als", "bpr"):
        train_recommender(data_dir, name, root / name, trials=2, log=lambda _: None)
        out[name] = root / name
    train_recommender(data_dir, "text", root / "text", trials=1, log=lambda _: None)
    out["text"] = root / "text"
    train_recommender(data_dir, "hybrid", root / "hybrid", members=[str(out["itemknn"]), str(out["text"])],
                      log=lambda _: None)
    out["hybrid"] = root / "hybrid"
    return out


@pytest.fixture(scope="module", autouse=True)
def tiny_text_encoder():
    from tunelab.recommend import models

    old = models.Text.defaults["encoder"]
    models.Text.defaults["encoder"] = "tiny-bert"
    yield
    models.Text.defaults["encoder"] = old


def test_every_recommender_round_trips_with_identical_scores(trained, data_dir):
    data = load(data_dir)
    hist = data.histories("train", "validation")
    users = np.arange(data.n_users)
    for name, path in trained.items():
        loaded = store.load(path)
        refit = store.build(loaded.meta["model"], loaded.meta["params"])
        refit.fit(hist, Catalogue.of(data.items))
        a = loaded.model.score(hist, users)
        b = refit.score(hist, users)
        assert np.allclose(a, b, atol=1e-5), name
        again = store.load(path).model.score(hist, users)
        assert np.array_equal(a, again), name


def test_collaborative_models_beat_random_and_only_content_scores_cold_items(trained, data_dir):
    data = load(data_dir)
    ndcg = {n: evaluate(store.load(trained[n]).model, data, "test").values["ndcg"].mean()
            for n in ("itemknn", "random")}
    assert ndcg["itemknn"] > ndcg["random"] + 0.1  # users keep to one genre: item-kNN finds it
    cold = evaluate(store.load(trained["itemknn"]).model, data, "cold_test")
    assert cold.candidates == data.cold.sum() and len(cold.values["ndcg"]) > 0
    # it cannot tell cold items apart (all score 0): the relevant ones take the last places
    _, targets, earlier = data.cold_cases()
    expected = []
    for u in sorted(targets):
        n_rel = len(set(targets[u].tolist()))
        pool = cold.candidates - len(set(earlier[u].tolist()))
        ranks = [pool - n_rel + 1 + p for p in range(n_rel)]
        ideal = sum(1 / math.log2(r + 2) for r in range(min(n_rel, 10)))
        expected.append(sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / ideal)
    assert cold.values["ndcg"] == pytest.approx(expected)
    report = _cli("recommend", "eval", str(data_dir), str(trained["itemknn"]), str(trained["als"]),
                  str(trained["hybrid"]))
    assert report.returncode == 0, report.stderr
    assert "cold_test" in report.stdout and "NDCG@10" in report.stdout


def test_a_model_of_other_data_is_refused(trained, raw, tmp_path):
    prepare(PrepareSpec(str(raw[0]), str(raw[1]), cold_items=0.3, seed=5), tmp_path / "other")
    from tunelab.recommend.evaluate import evaluate_models

    with pytest.raises(UserError, match="fitted on other data"):
        evaluate_models(tmp_path / "other", [trained["itemknn"]])


def test_serving_answers_known_unknown_and_historyless_users(trained):
    rec = Recommendations(trained["hybrid"])
    known = rec.recommend(user="u3", k=5)
    assert known["strategy"] == "hybrid" and known["user_known"] and len(known["items"]) == 5
    seen = {rec.loaded.items[i]["item"] for i in rec.loaded.histories[rec.loaded.user_index["u3"]]}
    assert not seen & {row["item"] for row in known["items"]}
    nobody = rec.recommend(user="nobody", k=5)
    assert nobody["strategy"] == "popularity" and len(nobody["items"]) == 5
    ids = rec.recommend(items=["m1", "m5", "no-such-item"], k=3)
    assert ids["strategy"] == "hybrid" and ids["unknown_items"] == ["no-such-item"]
    words = rec.recommend(texts=["Film 4 · Action"], k=3)
    assert words["strategy"] == "text-profile" and len(words["items"]) == 3


def test_recommend_endpoint(trained):
    cfg = ServeConfig(models=[f"films={trained['itemknn']}"], embedding_model=None)
    guard = create_app(cfg, check_specs(cfg.models, None), keys=[])
    with TestClient(guard, base_url="http://localhost") as client:
        deadline = time.time() + 60
        while client.get("/ready").status_code != 200:
            assert time.time() < deadline, "the recommender did not load"
            time.sleep(0.05)
        ok = client.post("/v1/recommend", json={"model": "films", "user": "u0", "k": 4})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["object"] == "recommendation" and [r["rank"] for r in body["data"]] == [1, 2, 3, 4]
        empty = client.post("/v1/recommend", json={"model": "films", "k": 3})
        assert empty.status_code == 200 and empty.json()["strategy"] == "popularity"
        bad = client.post("/v1/recommend", json={"model": "films", "k": 0})
        assert bad.status_code == 400
        wrong = client.post("/v1/classify", json={"model": "films", "input": "x"})
        assert wrong.status_code == 400 and "/v1/recommend" in wrong.json()["error"]["message"]
        models = client.get("/v1/models").json()["data"]
        assert models[0]["tunelab_kind"] == "recommend"


def test_two_stage_ranker_trains_through_the_loop_and_round_trips(data_dir, trained, tmp_path):
    meta = train_recommender(data_dir, "ranker", tmp_path / "ranker",
                             ranker={"stage1": str(trained["itemknn"]), "base": "tiny-bert", "layers": 1,
                                     "epochs": 1, "candidates": 8}, log=lambda _: None)
    assert meta["model"] == "ranker" and set(meta["blend_search"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    classifier = json.loads((tmp_path / "ranker" / "ranker" / "config.json").read_text())
    assert classifier["num_hidden_layers"] == 1  # the base cut to its first layer
    data = load(data_dir)
    a = evaluate(store.load(tmp_path / "ranker").model, data, "test")
    b = evaluate(store.load(tmp_path / "ranker").model, data, "test")
    assert np.array_equal(a.values["ndcg"], b.values["ndcg"])
    answer = Recommendations(tmp_path / "ranker").recommend(user="u1", k=3)
    assert answer["strategy"] == "ranker" and len(answer["items"]) == 3
    with pytest.raises(UserError, match="two-stage ranker"):
        train_recommender(data_dir, "hybrid", tmp_path / "h", members=[str(tmp_path / "ranker"), "popularity"],
                          log=lambda _: None)


def test_als_fold_in_is_implicits_user_step(trained, data_dir):
    """A history folded in equals implicit's own exact least-squares user step on the same item factors."""
    from implicit.cpu.als import user_linear_equation

    from tunelab.recommend.models import interaction_matrix

    model = store.load(trained["als"]).model
    hist = load(data_dir).histories("train", "validation")[:10]
    y = model.item_factors.astype(np.float64)
    alpha, reg = float(model.params["alpha"]), float(model.params["regularization"])
    cui = (alpha * interaction_matrix(hist, len(y))).tocsr()
    for u, h in enumerate(hist):
        a, b = user_linear_equation(y, y.T @ y, cui, u, reg, y.shape[1])
        assert np.allclose(model.fold_in(h), np.linalg.solve(a, b), atol=1e-4)


def test_training_needs_validation_rows_and_a_free_target(data_dir, trained, tmp_path):
    with pytest.raises(UserError, match="already holds"):
        train_recommender(data_dir, "itemknn", trained["itemknn"], trials=1, log=lambda _: None)
    short = [{"user": f"u{n % 30}", "item": f"i{n}", "timestamp": str(n)} for n in range(50)]
    prepare(PrepareSpec(str(_write(tmp_path / "short.csv", short)), cold_items=0.0), tmp_path / "short")
    with pytest.raises(UserError, match="no validation interactions"):
        train_recommender(tmp_path / "short", "itemknn", tmp_path / "m", trials=1, log=lambda _: None)
    with pytest.raises(UserError, match="unknown recommender"):
        train_recommender(data_dir, "nonsense", tmp_path / "m2", trials=1, log=lambda _: None)

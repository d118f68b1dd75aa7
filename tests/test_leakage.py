"""Every evaluation checks the evaluated rows against the model's training data (issue: a model scored on
another split of its own training rows looked better than it is)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import make_rows, write_csv
from tunelab.cli import app
from tunelab.data.dataset import load_split
from tunelab.data.prepare import prepare
from tunelab.errors import UserError
from tunelab.evaluate.report import evaluate

FAST = {"baselines": []}


@pytest.fixture(scope="module")
def leaky_data(tmp_path_factory, small_dataset):
    """A second dataset whose splits hold 45 rows of the first one's train split among 90 new rows."""
    root = tmp_path_factory.mktemp("leaky")
    seen = load_split(small_dataset, "train")[:45]
    write_csv(root / "leaky.csv", make_rows(90, seed=5, start=5000) + seen)
    prepare(str(root / "leaky.csv"), root / "ds")
    return root / "ds", {r["text"] for r in seen}


def test_the_model_dir_records_where_its_training_data_is(tiny_classifier, small_dataset):
    data = json.loads((tiny_classifier / "tunelab.json").read_text())["data"]
    assert data["path"] == str(small_dataset.resolve()) and data["fingerprint"]


def test_its_own_test_split_is_checked_and_clean(tiny_classifier, small_dataset):
    leak = evaluate(tiny_classifier, overrides=FAST)["leakage"]
    assert leak["checked"] and leak["training_data"] == str(small_dataset.resolve())
    seen = load_split(small_dataset, "train") + load_split(small_dataset, "validation")
    assert leak["training_rows"] == len(seen)
    assert leak["exact"] == 0 and not leak["loud"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_seen_in_training_are_counted_and_loud(tiny_classifier, leaky_data, split, tmp_path):
    data, seen = leaky_data
    rows = load_split(data, split)
    expected = sum(r["text"] in seen for r in rows)
    report = evaluate(tiny_classifier, data, split, out=tmp_path / "r.json", overrides=FAST)
    leak = report["leakage"]
    assert leak["checked"] and leak["exact"] == expected and leak["rows"] == len(rows)
    assert json.loads((tmp_path / "r.json").read_text())["leakage"]["exact"] == expected
    if expected:
        assert leak["loud"] and leak["share"] >= expected / len(rows)


def test_strict_refuses_and_the_cli_warns(tiny_classifier, leaky_data):
    data, _ = leaky_data
    with pytest.raises(UserError, match="--strict: .* also occur in the model's training data"):
        evaluate(tiny_classifier, data, "train", overrides=FAST, strict=True)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tiny_classifier), "--data", str(data), "--split", "train",
                              "--no-baselines"])
    output = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 0 and "WARNING" in output and "these scores are inflated" in output
    res = runner.invoke(app, ["eval", str(tiny_classifier), "--data", str(data), "--split", "train",
                              "--no-baselines", "--strict"])
    assert isinstance(res.exception, UserError) and "--strict" in str(res.exception)  # main() makes it exit 2


def test_training_data_gone_or_changed_is_said(tiny_classifier, small_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_classifier, model)
    meta_file = model / "tunelab.json"
    meta = json.loads(meta_file.read_text())
    meta["data"].update(dir=str(tmp_path / "gone"), path=str(tmp_path / "gone"))
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="training data is gone.*--data"):
        evaluate(model, overrides=FAST)
    leak = evaluate(model, small_dataset, overrides=FAST)["leakage"]
    assert not leak["checked"] and "gone" in leak["reason"]
    with pytest.raises(UserError, match="--strict"):
        evaluate(model, small_dataset, overrides=FAST, strict=True)
    meta["data"].update(dir=str(small_dataset), path=str(small_dataset), fingerprint="0" * 16)
    meta_file.write_text(json.dumps(meta))
    leak = evaluate(model, small_dataset, overrides=FAST)["leakage"]
    assert not leak["checked"] and "has changed since training" in leak["reason"]

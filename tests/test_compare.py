"""`tunelab compare`: two tiny runs side by side (the keys that differ, scores, curves) and what it refuses."""

import json
import subprocess
import sys

import pytest

from tunelab.compare import compare_runs, differing_keys, read_run
from tunelab.config import flatten
from tunelab.errors import UserError

from conftest import tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_dataset):
    from tunelab.config import validate
    from tunelab.train.loop import train

    root = tmp_path_factory.mktemp("compare")
    for name, lr in (("slow", 1e-4), ("fast", 3e-3)):
        train(validate(tiny_config(small_dataset, max_steps=6, lr=lr, eval_every=3)), root / name,
              show_progress=False)
    return root / "slow", root / "fast"


def test_flatten_and_differing_keys():
    a = flatten({"train": {"lr": 1e-3, "adversarial": None}, "model": {"base": "x", "mlm": {"p": 0.15}}})
    assert a == {"train.lr": 1e-3, "train.adversarial": None, "model.base": "x", "model.mlm.p": 0.15}
    b = {**a, "train.lr": 2e-3, "train.adversarial.method": "fgm"}
    assert differing_keys([a, b]) == ["train.adversarial.method", "train.lr"]
    assert differing_keys([a, dict(a)]) == []


def test_compare_two_tiny_runs(two_runs, tmp_path):
    slow, fast = two_runs
    summary = compare_runs([slow, fast / "model"], tmp_path / "cmp")  # a model dir stands for its run
    assert summary["differing_keys"] == ["train.lr"]
    assert summary["same_keys"] > 40
    runs = summary["runs"]
    assert [r["name"] for r in runs] == ["slow", "fast"]
    assert [r["differing"]["train.lr"] for r in runs] == [1e-4, 3e-3]
    for r in runs:
        assert r["metric"] == "macro_f1" and 0 <= r["best"]["macro_f1"] <= 1
        assert r["steps"] == 6 and r["finished"] and r["elapsed_s"] > 0
        assert [x for x, _ in r["curves"]["eval"]] == sorted({x for x, _ in r["curves"]["eval"]})  # no repeats
        assert len(r["curves"]["eval"]) == 2 and r["curves"]["train"] and r["curves"]["x"] == "epoch"
    out = tmp_path / "cmp"
    assert json.loads((out / "tunelab.json").read_text())["kind"] == "comparison"
    assert json.loads((out / "compare.json").read_text())["differing_keys"] == ["train.lr"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="already holds a comparison"):
        compare_runs([slow, fast], out)
    compare_runs([slow, fast], out, overwrite=True)


def test_compare_refuses_what_is_not_two_runs(two_runs, small_dataset, tmp_path):
    slow, fast = two_runs
    with pytest.raises(UserError, match="at least two"):
        compare_runs([slow])
    with pytest.raises(UserError, match="the same run is given twice"):
        compare_runs([slow, slow / "model"])
    with pytest.raises(UserError, match="not a run dir"):
        compare_runs([slow, small_dataset])
    with pytest.raises(UserError, match="is not a folder"):
        compare_runs([slow, tmp_path / "missing"])


def test_a_torn_metrics_log_is_read_up_to_the_tear(two_runs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(two_runs[1], copy)
    with open(copy / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "train_lo')  # killed mid-write
    assert read_run(copy)["curves"] == read_run(two_runs[1])["curves"]


def test_compare_cli_prints_the_differing_keys_and_scores(two_runs):
    r = subprocess.run([sys.executable, "-m", "tunelab", "compare", *map(str, two_runs)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train.lr" in r.stdout and "macro-F1" in r.stdout and "1 config key differs" in r.stdout
    assert "1. slow" in r.stdout and "2. fast" in r.stdout

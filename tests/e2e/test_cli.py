"""The CLI end to end in subprocesses: prepare -> train -> eval -> predict, and bad input."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import make_rows, tiny_config, write_csv


def tl(*args, cwd=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def fails_cleanly(proc, *fragments):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for f in fragments:
        assert f in out, out
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_csv(root / "reviews.csv", make_rows(300))
    tl("data", "prepare", root / "reviews.csv", "--out", root / "data", "--seed", "0")
    cfg = tiny_config(root / "data")
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    # 16 epochs: trained to convergence (at 4 a tiny random BERT is often still near uniform)
    tl("train", root / "tiny.yaml", "--out", root / "run", "train.epochs=16", "train.lr=3e-3")
    return root


def test_pipeline_outputs(trained):
    root = trained
    meta = json.loads((root / "data" / "dataset.json").read_text())
    assert meta["report"]["rows_read"] == 300 and meta["splits"]["train"] == 240
    losses = [r["train_loss"] for r in map(json.loads, (root / "run" / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    assert losses[-1] < losses[0]

    proc = tl("eval", root / "run" / "model", "--data", root / "data", "--split", "test", "--out",
              root / "report.json", "--baseline", "tfidf")
    report = json.loads((root / "report.json").read_text())
    for key in ("accuracy", "macro_f1", "macro_recall", "per_class", "confusion_matrix", "ece", "baselines"):
        assert key in report
    assert report["n"] == 30 and sum(map(sum, report["confusion_matrix"]["matrix"])) == 30
    assert report["macro_f1"] > 0.8
    assert report["baselines"]["tfidf_logreg"]["macro_f1"] > 0.9  # the label words make it easy
    assert (root / "report.confusion.png").stat().st_size > 1000
    assert "TF-IDF" in proc.stdout and "fine-tuned" in proc.stdout

    new = make_rows(3, seed=99, start=1000)  # unseen rows of the training format: negative, neutral, positive
    proc = tl("predict", root / "run" / "model", *[r["text"] for r in new], "--json")
    preds = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [p["prediction"] for p in preds] == [r["label"] for r in new]
    assert abs(sum(preds[0]["probs"].values()) - 1) < 1e-4
    proc = tl("predict", root / "run" / "model", new[2]["text"])
    assert "p(positive)" in proc.stdout and "positive" in proc.stdout

    inp = root / "new.jsonl"
    inp.write_text(json.dumps({"text": new[2]["text"], "id": 1}) + '\n{"text": ""}\n'
                   + json.dumps({"text": new[0]["text"], "id": 3}) + "\n")
    proc = tl("predict", root / "run" / "model", "--input", inp, "--out", root / "pred.jsonl")
    rows = [json.loads(x) for x in (root / "pred.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 3]
    assert [r["prediction"] for r in rows] == ["positive", "negative"]
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-4
    assert "skipped 1 rows" in proc.stderr and "line 2" in proc.stderr


def test_bad_input_gives_one_clear_message(trained, tmp_path):
    root = trained
    model = root / "run" / "model"
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    bad_cfg = tmp_path / "typo.yaml"
    cfg = tiny_config(root / "data")
    cfg["train"]["epochz"] = 3
    bad_cfg.write_text(yaml.safe_dump(cfg))
    cases = [  # (arguments, what the one message says); each its own output folder: they run two at a time
        (("data", "prepare", tmp_path / "missing.csv", "--out", tmp_path / "d1"), ["no such file"]),
        (("data", "prepare", root / "reviews.csv", "--out", tmp_path / "d2", "--text-column", "body"),
         ["no text column 'body'", "columns are: text, label"]),
        (("data", "prepare", empty, "--out", tmp_path / "d3"), ["no usable rows"]),
        (("train", bad_cfg, "--out", tmp_path / "r1"), ["unknown key 'train.epochz'"]),
        (("train", root / "tiny.yaml", "--out", tmp_path / "r2", "train.lr=-1"), ["'train.lr'"]),
        (("train", root / "tiny.yaml", "--out", root / "run"), ["already holds a run"]),
        (("eval", tmp_path), ["not a tunelab model dir"]),
        (("eval", root / "run"), ["is a tunelab run, not a model dir; its model is"]),
        (("predict", tmp_path / "nope", "hi"), ["model dir not found"]),
        (("predict", model), ["either texts"]),
    ]
    with ThreadPoolExecutor(2) as pool:  # each is a fresh interpreter importing tunelab: two cores, two at once
        procs = list(pool.map(lambda case: tl(*case[0], check=False), cases))
    for (_, fragments), proc in zip(cases, procs):
        fails_cleanly(proc, *fragments)

    # a dataset whose labels the model has never seen
    other = tmp_path / "other.csv"
    write_csv(other, [{"text": r["text"], "label": {"positive": "pos"}.get(r["label"], r["label"])}
                      for r in make_rows(60)])
    tl("data", "prepare", other, "--out", tmp_path / "other")
    fails_cleanly(tl("eval", model, "--data", tmp_path / "other", "--no-baselines", check=False),
                  "unknown to this model")


def test_data_commands(trained, tmp_path):
    root = trained
    proc = tl("data", "overlap", f"{root / 'data'}:train", root / "reviews.csv")
    assert "240 exact" in proc.stdout  # the train split came from that file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": 5.5.5}\n')
    fails_cleanly(tl("data", "prepare", bad, "--out", tmp_path / "d", "--strict", check=False),
                  "bad.jsonl:2: bad_json")
    opts = tmp_path / "prep.yaml"
    opts.write_text("clean:\n  urls: replace\ndedup:\n  treshold: 0.8\n")
    fails_cleanly(tl("data", "prepare", root / "reviews.csv", "--out", tmp_path / "d", "--config", opts,
                     check=False), "unknown key 'dedup.treshold'")
    opts.write_text("clean:\n  urls: replace\ndedup:\n  threshold: 0.8\n")
    proc = tl("data", "prepare", root / "reviews.csv", "--out", tmp_path / "d", "--config", opts, "--seed", "1")
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["options"]["dedup"]["threshold"] == 0.8 and meta["options"]["seed"] == 1
    assert "duplicates:" in proc.stdout


def test_outputs_never_replace_what_tunelab_did_not_write(trained, tmp_path):
    root = trained
    model = root / "run" / "model"
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "great"}\n')
    fails_cleanly(tl("data", "prepare", root / "reviews.csv", "--out", thesis, "--overwrite", check=False),
                  "not written by tunelab")
    fails_cleanly(tl("train", root / "tiny.yaml", "--out", thesis, "--overwrite", check=False),
                  "not written by tunelab")
    fails_cleanly(tl("eval", model, "--out", notes, "--overwrite", "--no-baselines", check=False),
                  "not written by tunelab")
    fails_cleanly(tl("predict", model, "--input", inp, "--out", notes, "--overwrite", check=False),
                  "not written by tunelab")
    assert [p.name for p in thesis.iterdir()] == ["thesis.tex"] and notes.read_text() == "my notes"

    # a dataset is replaced only with --overwrite, and only once the new one is complete
    ds = tmp_path / "ds"
    tl("data", "prepare", root / "reviews.csv", "--out", ds)
    fails_cleanly(tl("data", "prepare", root / "reviews.csv", "--out", ds, "--seed", "1", check=False),
                  "already holds a dataset; pass --overwrite")
    fails_cleanly(tl("data", "prepare", tmp_path / "missing.csv", "--out", ds, "--overwrite", check=False),
                  "no such file")
    assert json.loads((ds / "dataset.json").read_text())["options"]["seed"] == 0
    tl("data", "prepare", root / "reviews.csv", "--out", ds, "--seed", "1", "--overwrite")
    assert json.loads((ds / "dataset.json").read_text())["options"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds", "in.jsonl", "notes.json", "thesis"]


def test_train_overwrite_deletes_nothing_until_the_new_run_has_loaded(trained, tmp_path):
    root = trained
    run = tmp_path / "run"
    tl("train", root / "tiny.yaml", "--out", run, "train.max_steps=2")
    assert (run / "model" / "model.safetensors").is_file()
    fails_cleanly(tl("train", root / "tiny.yaml", "--out", run, "--overwrite", f"data.dir={tmp_path / 'nothing'}",
                     check=False), "tunelab data prepare")
    fails_cleanly(tl("train", root / "tiny.yaml", "--out", run, "--overwrite", "model.base=tiny-gpt", check=False),
                  "not found")
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "step-2").is_dir()
    assert json.loads((run / "tunelab.json").read_text())["kind"] == "run"

"""`tunelab tune`: the search space, pruning at evaluations, workers sharing a SQLite study, a killed worker's
trial failed by its heartbeat, and resumption."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from tunelab.errors import UserError

CLI = [sys.executable, "-m", "tunelab"]


def write_config(path: Path, data_dir: Path, **train) -> Path:
    raw = tiny_config(data_dir, **train)
    raw["name"] = "tiny-tune"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def load(out: Path, name: str = "tiny-tune"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


# ---- the space file ---------------------------------------------------------------------------------------

def test_space_types_and_checks(tmp_path, small_dataset):
    from tunelab.config import read_yaml_mapping
    from tunelab.tune.space import load_space

    cfg = read_yaml_mapping(write_config(tmp_path / "c.yaml", small_dataset))
    space = load_space(write_space(tmp_path / "s.yaml", {
        "train.lr": {"low": 1e-5, "high": 1e-2, "log": True},
        "train.warmup_ratio": {"low": 0, "high": 0.2},
        "train.epochs": {"low": 1, "high": 4},
        "train.batch_size": [8, 16],
        "method.name": {"choices": ["full", "lora"]}}), cfg)
    kinds = {p.key: (p.type, p.log) for p in space.params}
    assert kinds == {"train.lr": ("float", True), "train.warmup_ratio": ("float", False),
                     "train.epochs": ("int", False), "train.batch_size": ("categorical", False),
                     "method.name": ("categorical", False)}
    bad = [({"train.lr2": {"low": 0.1, "high": 0.2}}, "train.lr2"),  # not a config key
           ({"train.lr": {"low": 0.1, "high": 2.0}}, "train.lr=2.0"),  # a bound the config refuses (lr < 1)
           ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
           ({"train.lr": {"low": 0.2, "high": 0.1}}, "must be below"),
           ({"train.batch_size": {"choices": []}}, "non-empty"),
           ({"train.epochs": {"type": "int", "low": 1, "high": 2.5}}, "integer low and high"),
           ({"train.lr": {"low": 0.1, "high": 0.2, "scale": "log"}}, "unknown field"),
           ({"lr": {"low": 0.1, "high": 0.2}}, "dotted config keys"),
           ({}, "is empty")]
    for spec, words in bad:
        with pytest.raises(UserError, match=re.escape(words)):
            load_space(write_space(tmp_path / "bad.yaml", spec), cfg)


def test_the_example_space_fits_the_example_config():
    from tunelab.config import read_yaml_mapping, resolve_paths, validate
    from tunelab.tune.space import load_space

    ex = Path(__file__).parent.parent / "examples" / "tune"
    raw = resolve_paths(read_yaml_mapping(ex / "tweets-minilm.yaml"), ex)
    assert validate(raw).train.evals_per_epoch == 2
    space = load_space(ex / "space.yaml", raw)
    assert [p.key for p in space.params] == ["train.lr", "train.epochs", "train.warmup_ratio", "train.weight_decay",
                                             "train.batch_size"]


def test_evals_per_epoch_spaces_evaluations_evenly(tmp_path, small_dataset):
    from tunelab.config import validate
    from tunelab.train.loop import train

    seen = []
    summary = train(validate(tiny_config(small_dataset, epochs=2, evals_per_epoch=3)), tmp_path / "run",
                    show_progress=False, on_eval=lambda p: seen.append(p) and False)
    per_epoch = summary["steps"] / 2  # 240 rows / 16 = 15 steps an epoch
    assert [p.step for p in seen] == [round(per_epoch * k / 3) for k in range(1, 7)]
    assert [round(p.epochs, 2) for p in seen] == [0.33, 0.67, 1.0, 1.33, 1.67, 2.0]
    assert summary["epochs_trained"] == pytest.approx(2.0)


# ---- pruning ---------------------------------------------------------------------------------------------

def test_pruning_stops_a_bad_trial_at_the_first_evaluation_below_the_median(tmp_path, small_dataset):
    """Trial 0 (a learning rate that learns) completes; trial 1 (lr 1e-8: stuck at chance) is pruned at the first
    evaluation where its best so far is below trial 0's at that point (the median of one), and trains no further."""
    import optuna

    from tunelab.tune.search import TuneOptions, tune

    cfg = write_config(tmp_path / "c.yaml", small_dataset, epochs=6)
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-8, "high": 1e-2, "log": True}})
    out = tmp_path / "study"
    out.mkdir()
    (out / "tunelab.json").write_text(json.dumps({"kind": "tune"}))
    study = optuna.create_study(study_name="tiny-tune", storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize")
    study.enqueue_trial({"train.lr": 3e-3})
    study.enqueue_trial({"train.lr": 1e-8})
    tune(cfg, space, out, TuneOptions(trials=2, pruner="median", pruner_startup=1))
    good, bad = load(out).trials
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    first_below = min(step for step, v in bad.intermediate_values.items() if v < good.intermediate_values[step])
    assert max(bad.intermediate_values) == first_below  # stopped at that evaluation, not one later
    assert bad.user_attrs["epochs"] == pytest.approx(first_below)
    assert first_below < 6
    assert not (out / "trials" / "0001" / "model").exists()
    assert (out / "trials" / "0000" / "model" / "tunelab.json").is_file()
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[2].split(",")[1] == "pruned"


# ---- workers, crashes, resumption --------------------------------------------------------------------------

def test_two_invocations_and_two_workers_share_one_sqlite_study(tmp_path, small_dataset):
    """Three worker processes (one invocation with --workers 2, one with 1) on one study: every trial is
    recorded once, none is lost, no point is proposed twice."""
    cfg = write_config(tmp_path / "c.yaml", small_dataset, epochs=2)
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                              "train.warmup_ratio": {"low": 0.0, "high": 0.2}})
    out = tmp_path / "study"
    common = [*CLI, "tune", str(cfg), "--space", str(space), "--out", str(out), "--sampler", "random"]
    first = subprocess.Popen([*common, "--trials", "4", "--workers", "2", "--seed", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the first invocation creates the study folder; the second joins it
    second = subprocess.run([*common, "--trials", "2", "--seed", "2"], capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + second.stderr
    assert "2 workers × 1 thread (2 cores)" in err1 or "2 workers × 1 thread" in err1
    trials = load(out).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    points = {json.dumps(t.params, sort_keys=True) for t in trials}
    assert len(points) == 6
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 3  # each process ran trials
    assert sorted(p.name for p in (out / "trials").iterdir() if p.is_dir()) == [f"{i:04d}" for i in range(6)]
    kept = [p for p in (out / "trials").glob("*/model")]
    assert len(kept) == 1  # --keep-models best


def running_trial(db: Path) -> tuple[int, int] | None:
    """(trial number, worker pid) of a trial that is training now, read straight from Optuna's SQLite tables (fast
    enough to catch a trial of a few seconds), or None."""
    import sqlite3

    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute(
                "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'worker' AND EXISTS (SELECT 1 FROM trial_user_attributes b "
                "WHERE b.trial_id = t.trial_id AND b.key = 'run_dir')").fetchone()
    except sqlite3.Error:  # the tables are being created
        return None
    return (row[0], int(json.loads(row[1]).rsplit(":", 1)[1])) if row else None


def test_a_killed_worker_trial_is_failed_and_the_study_continues(tmp_path, small_dataset):
    cfg = write_config(tmp_path / "c.yaml", small_dataset, epochs=30)  # a few seconds a trial
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    out = tmp_path / "study"
    proc = subprocess.Popen([*CLI, "tune", str(cfg), "--space", str(space), "--out", str(out), "--trials", "3",
                             "--workers", "2", "--heartbeat", "1", "--sampler", "random"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        victim = running_trial(out / "study.db")
    if victim is not None:
        os.kill(victim[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert victim is not None, f"no trial was seen running: {err}"
    assert proc.returncode == 0, err
    assert "ended with exit code -9" in err
    trials = {t.number: t for t in load(out).trials}
    assert len(trials) == 3
    assert trials[victim[0]].state.name == "FAIL"
    assert sum(t.state.name == "COMPLETE" for t in trials.values()) == 2
    summary = json.loads((out / "tunelab.json").read_text())
    assert summary["states"] == {"fail": 1, "complete": 2}


def test_resume_adds_trials_and_registers_the_best(tmp_path, small_dataset, monkeypatch):
    from tunelab.config import load_config
    from tunelab.registry.registry import Registry
    from tunelab.tune.search import TuneOptions, tune

    for var in ("TUNELAB_REGISTRY", "TUNELAB_REGISTRY_DB"):
        monkeypatch.delenv(var, raising=False)
    cfg = write_config(tmp_path / "c.yaml", small_dataset, epochs=2)
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                              "train.batch_size": [8, 16, 32]})
    out, reg = tmp_path / "study", tmp_path / "registry"
    first = subprocess.run([*CLI, "tune", str(cfg), "--space", str(space), "--out", str(out), "--trials", "2"],
                           capture_output=True, text=True, timeout=300, env={**os.environ})
    assert first.returncode == 0, first.stderr
    assert not (out / "tunelab.json").read_text().count('"registered"')  # no registry configured: none
    summary = tune(cfg, space, out, TuneOptions(trials=2, registry=str(reg)))  # a later invocation, same study
    trials = load(out).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    first_points = {json.dumps(t.params, sort_keys=True) for t in trials[:2]}
    # the resumed invocation draws its own points (a duplicate of a finished point would reuse its score)
    assert all(json.dumps(t.params, sort_keys=True) not in first_points or "duplicate_of" in t.user_attrs
               for t in trials[2:])
    assert summary == json.loads((out / "tunelab.json").read_text())
    assert summary["kind"] == "tune" and summary["trials"] == 4
    best = summary["best"]
    assert best["value"] == max(t.value for t in trials if t.value is not None)
    cfg_best = load_config(out / "best.yaml")  # runnable as written
    assert cfg_best.train.lr == pytest.approx(best["params"]["train.lr"])
    assert cfg_best.train.num_threads is None  # the workers' thread split is not part of the config
    assert len((out / "trials.csv").read_text().splitlines()) == 5
    for png in ("history.png", "importance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    with Registry(reg) as r:
        assert [(v["name"], v["version"]) for v in r.list()] == [("tiny-tune", summary["registered"]["version"])]
    # another space is another search: refused unless forced
    other = write_space(tmp_path / "s2.yaml", {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}})
    with pytest.raises(UserError, match="started with another space"):
        tune(cfg, other, out, TuneOptions(trials=1))


def test_bad_input_is_one_clear_message(tmp_path, small_dataset):
    from tunelab.tune.search import TuneOptions, tune

    cfg = write_config(tmp_path / "c.yaml", small_dataset)
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(foreign, space, {}, "was not written by tunelab"),
             (tmp_path / "o", tmp_path / "missing.yaml", {}, "not found"),
             (tmp_path / "o", space, {"trials": 0}, "--trials must be at least 1"),
             (tmp_path / "o", space, {"workers": 0}, "--workers must be at least 1"),
             (tmp_path / "o", space, {"storage": "sqlite:///:memory:"}, "in-memory SQLite")]
    for out, sp, kw, words in cases:
        with pytest.raises(UserError, match=re.escape(words)):
            tune(cfg, sp, out, TuneOptions(**{"trials": 1, **kw}))
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    r = subprocess.run([*CLI, "tune", str(cfg), "--space", str(space), "--out", str(tmp_path / "o"), "--trials",
                        "1", "--storage", "nosuch://x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--storage" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_study_in_postgresql(tmp_path, small_dataset, postgres_url):
    """The storage workers on several machines share: the same study through a PostgreSQL URL."""
    import optuna

    from tunelab.tune.search import TuneOptions, tune

    cfg = write_config(tmp_path / "c.yaml", small_dataset, epochs=1)
    space = write_space(tmp_path / "s.yaml", {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    summary = tune(cfg, space, tmp_path / "study", TuneOptions(trials=2, storage=postgres_url, study="pg-study"))
    assert summary["states"] == {"complete": 2} and summary["storage"].startswith("postgresql")
    assert not (tmp_path / "study" / "study.db").exists()
    study = optuna.load_study(study_name="pg-study", storage=postgres_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

"""`train.tracking: [mlflow]`: an MLflow run (local SQLite store by default) holds the run's params, its metrics
per step and the model dir as an artifact; a shared store collects several runs; what goes wrong is said plainly."""

import json
import sys

import pytest

from tunelab.config import validate
from tunelab.errors import UserError
from tunelab.train.loop import train

from conftest import tiny_config

pytest.importorskip("mlflow")


def _config(data, **mlflow):
    cfg = tiny_config(data, max_steps=4, eval_every=2)
    cfg["train"].update(tracking=["mlflow"], mlflow=mlflow)
    return validate(cfg)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_an_mlflow_run_holds_params_metrics_and_the_model(tmp_path, small_dataset):
    summary = train(_config(small_dataset), tmp_path / "run", show_progress=False)
    record = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    assert record["tracking_uri"] == "sqlite:///" + str((tmp_path / "run" / "mlflow.db").resolve())
    client = _client(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.lr"] == "0.003" and params["model.base"] == "tiny-bert"
    assert params["train.tracking"] == '["mlflow"]'
    assert run.data.tags["tunelab.task"] == "classification"
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_macro_f1"] for r in jsonl if "eval_macro_f1" in r]
    assert run.data.metrics["eval_macro_f1"] == pytest.approx(evals[-1]) == pytest.approx(summary["best_metric"])
    history = client.get_metric_history(record["run_id"], "train_loss")
    assert [m.step for m in history] == [2, 4]  # log_every 2, as in metrics.jsonl
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in jsonl if "train_loss" in r])
    files = {a.path for a in client.list_artifacts(record["run_id"], "model")}
    assert "model/tunelab.json" in files
    assert (tmp_path / "run" / "mlartifacts").is_dir()  # beside the database, not in the working directory
    assert not (tmp_path / "run" / "tb").exists()  # tensorboard is not in train.tracking here


def test_a_shared_store_collects_runs(tmp_path, small_dataset):
    uri = "sqlite:///" + str(tmp_path / "shared.db")
    train(_config(small_dataset, tracking_uri=uri, experiment="tweets"), tmp_path / "a", show_progress=False)
    train(_config(small_dataset, tracking_uri=uri, experiment="tweets", log_model=False), tmp_path / "b",
          show_progress=False)
    client = _client(uri)
    experiment = client.get_experiment_by_name("tweets")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    b = next(r for r in runs if r.info.run_name == "b")
    assert client.list_artifacts(b.info.run_id) == []  # log_model: false
    assert not (tmp_path / "a" / "mlflow.db").exists()


def test_mlflow_failures_are_said_plainly(tmp_path, small_dataset, monkeypatch):
    with pytest.raises(UserError, match="MLflow tracking at .* failed before training started"):
        train(_config(small_dataset, tracking_uri="nosuchscheme://x"), tmp_path / "bad", show_progress=False)
    for name in ("mlflow", "mlflow.entities", "mlflow.tracking"):  # the client not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match="pip install mlflow-skinny"):
        train(_config(small_dataset), tmp_path / "missing", show_progress=False)


def test_tracking_settings_do_not_block_a_resume(tmp_path, small_dataset):
    from tunelab.train.loop import NOT_RESUME_CHANGES, _differences

    a = validate(tiny_config(small_dataset)).model_dump(mode="json")
    b = validate({**tiny_config(small_dataset), "train": {**tiny_config(small_dataset)["train"],
                                                          "tracking": ["mlflow"]}}).model_dump(mode="json")
    diffs = _differences(a, b)
    assert diffs == ["train.tracking"] and all(d.startswith(NOT_RESUME_CHANGES) for d in diffs)


def test_a_stopped_run_is_killed_and_a_resume_continues_it(tmp_path):
    from tunelab.config import MlflowConfig
    from tunelab.train.tracking import Tracker

    tracker = Tracker(tmp_path, tensorboard=False, mlflow=MlflowConfig(), params={"train.lr": 0.1}, tags={})
    tracker.log(1, train_loss=2.0)
    tracker.close("KILLED")
    tracker.close("KILLED")  # a second close does nothing
    record = json.loads((tmp_path / "mlflow.json").read_text())
    client = _client(record["tracking_uri"])
    assert client.get_run(record["run_id"]).info.status == "KILLED"
    resumed = Tracker(tmp_path, tensorboard=False, mlflow=MlflowConfig(), params={"train.lr": 0.1}, tags={},
                      resume=True)
    assert client.get_run(record["run_id"]).info.status == "RUNNING"
    resumed.log(2, train_loss=1.0)
    resumed.close("FINISHED")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(record["run_id"], "train_loss")] == [2.0, 1.0]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same MLflow run, not a second one

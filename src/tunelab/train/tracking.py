"""Run tracking: one JSON line per event in `metrics.jsonl` (always), scalars mirrored to TensorBoard and/or MLflow
(`train.tracking`).

MLflow: the run is recorded in `train.mlflow.experiment` at `train.mlflow.tracking_uri` (default:
$MLFLOW_TRACKING_URI, else `sqlite:///<run dir>/mlflow.db`, artifacts in `<run dir>/mlartifacts`) with the run's
whole config as params (dotted keys), every numeric value logged as a metric at its step, the task, base and method
as tags, and at the end the model dir as the `model` artifact. The MLflow run id is kept in `<run dir>/mlflow.json`,
so `--resume` continues the same MLflow run. Only the client is needed (`pip install mlflow-skinny`, plus
`alembic` for the SQLite store). A tracking call that fails mid-run (a server gone away) is reported once and
tracking to MLflow stops; the training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tunelab.errors import UserError

MLFLOW_RECORD = "mlflow.json"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
PARAM_CHARS = 6000  # MLflow's limit of a param value's length


class Tracker:
    def __init__(self, run_dir: Path, tensorboard: bool = True, mlflow=None, params: dict | None = None,
                 tags: dict | None = None, resume: bool = False, warn=print):
        """`mlflow`: a `config.MlflowConfig` to record the run in MLflow too (None: not), with `params` (the flat
        config) and `tags`; `resume` continues the MLflow run this run dir recorded, if any."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.ml = MlflowRun(Path(run_dir), mlflow, params or {}, tags or {}, resume, warn) if mlflow else None
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # ~0.15 s more than torch; only with tensorboard on

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, step: int, **values) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace("_", "/", 1), v, step)
        if self.ml:
            self.ml.log(step, scalars, record["time"])

    def close(self, status: str = "FINISHED", model_dir: Path | None = None) -> None:
        """`status`: FINISHED, KILLED (stopped, to be resumed) or FAILED; `model_dir`: the finished model. A second
        close does nothing."""
        if self.file.closed:
            return
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.ml:
            self.ml.close(status, model_dir)


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, **values) -> None:
        pass

    def close(self, status: str = "FINISHED", model_dir: Path | None = None) -> None:
        pass


def _sqlite_uri(path: Path) -> str:
    return "sqlite:///" + str(path.resolve())


class MlflowRun:
    """One MLflow run through the tracking client (see the module docstring)."""

    def __init__(self, run_dir: Path, cfg, params: dict, tags: dict, resume: bool, warn):
        try:  # ~1-2 s to import: only runs that track to MLflow pay it
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("train.tracking includes mlflow, but the MLflow client is not installed: "
                            "pip install mlflow-skinny alembic") from None
        for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are not the run's
            logging.getLogger(name).setLevel(logging.WARNING)
        self.warn, self.run_dir = warn, run_dir
        self.uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(run_dir / "mlflow.db")
        self.log_model = cfg.log_model
        try:
            self.client = self.owner = MlflowClient(tracking_uri=self.uri)  # `client` is dropped after a failure
            earlier = _read_record(run_dir) if resume else None
            if earlier and earlier.get("tracking_uri") == self.uri:
                self.run_id = earlier["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                cfg.experiment, artifact_location=_artifact_location(self.uri))
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={k: str(v) for k, v in tags.items()})
            self.run_id = run.info.run_id
            items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                     for k, v in sorted(params.items())]
            items = [Param(p.key, p.value[:PARAM_CHARS]) for p in items]
            for start in range(0, len(items), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=items[start:start + PARAM_BATCH])
            self.client.log_batch(self.run_id, tags=[RunTag("tunelab.run_dir", str(run_dir.resolve()))])
        except Exception as e:  # noqa: BLE001 - any failure of the store (URI, server, database) is the user's to fix
            raise UserError(f"MLflow tracking at {self.uri} failed before training started: {e}") from None
        (run_dir / MLFLOW_RECORD).write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id,
                                                         "experiment": cfg.experiment}, indent=2), encoding="utf-8")

    def _call(self, what: str, fn) -> None:
        """Runs one tracking call; on failure warns once and stops tracking to MLflow (the training goes on)."""
        if self.client is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the store is outside this process; the run is worth more
            self.warn(f"MLflow tracking stopped ({what} failed at {self.uri}: {e}); metrics.jsonl has everything")
            self.client = None

    def log(self, step: int, scalars: dict, timestamp: float) -> None:
        from mlflow.entities import Metric

        ms = int(timestamp * 1000)
        # MLflow refuses "@" in a name (retrieval's eval_mrr@10 is logged as eval_mrr_at_10)
        metrics = [Metric(k.replace("@", "_at_"), float(v), ms, step) for k, v in scalars.items()]
        if metrics:
            self._call("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def close(self, status: str, model_dir: Path | None) -> None:
        if model_dir is not None and self.log_model:
            self._call("uploading the model dir", lambda: self.client.log_artifacts(self.run_id, str(model_dir),
                                                                                    "model"))
        try:  # tried even after a failure above, so the run does not stay RUNNING
            self.owner.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - as in `_call`
            if self.client is not None:
                self.warn(f"MLflow: ending the run failed at {self.uri}: {e}")


def _read_record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / MLFLOW_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def _artifact_location(uri: str) -> str | None:
    """A new experiment's artifact folder: beside a SQLite database (`mlartifacts/`); else the server's choice
    (None). MLflow's own default is relative to the working directory."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()

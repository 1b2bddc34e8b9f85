"""Experiment trackers: TensorBoard event files for every job; MLflow and Weights & Biases when configured.

Django-free. The worker feeds them from its own progress hook, point by point, with exactly the points it writes
to the database, so ``report_to`` stays "none" in ``training.py``: transformers' callbacks would log the Trainer's
own step numbers (not a continued run's global steps, and a resumed run's replayed steps on top of the lost ones),
only inside the Trainer's loop, and never the evaluation's metrics.

What is configured comes from the libraries' own environment variables: ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_EXPERIMENT_NAME``), ``WANDB_API_KEY`` or ``WANDB_MODE`` (``online``/``offline``; ``disabled`` turns it
off) and ``WANDB_PROJECT``. TensorBoard needs nothing: its event files are written into the job's folder.

A tracker that fails (a server down, a bad key) never fails the job: it is dropped for the rest of the run with
its reason in ``Tracking.errors``, which the job page shows.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger("tuna.tracking")

# The series' names, the same in every tracker (those of transformers' own TensorBoard callback).
LOSS, EVAL_LOSS, LEARNING_RATE, EPOCH = "train/loss", "eval/loss", "train/learning_rate", "train/epoch"
STEP = "global_step"  # W&B's step metric: W&B's own step only grows, and a resumed run logs some steps again
MLFLOW_STATUS = {"completed": "FINISHED", "cancelled": "KILLED", "failed": "FAILED"}
PARAM_MAX = 500  # characters of a parameter's value (the smallest limit of the MLflow servers in use)
# A tracking server that does not answer fails fast (MLflow's defaults retry for minutes), unless you set these.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
WANDB_INIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Point:
    """One logged point, as a LossPoint row holds it; ``step`` is the job's global step."""

    step: int
    epoch: float
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None

    def metrics(self) -> dict[str, float]:
        values = {LOSS: self.loss, EVAL_LOSS: self.eval_loss, LEARNING_RATE: self.learning_rate, EPOCH: self.epoch}
        return {key: float(value) for key, value in values.items() if _number(value)}


@dataclass(frozen=True)
class RunSpec:
    """What one job's runs are: the trackers read it, never the database."""

    name: str  # the run's name: the job's model id ("tuna-job-12")
    group: str  # MLflow's experiment and W&B's group: the runs of one dataset together
    params: Mapping[str, str]  # the settings, and "reason/<setting>" for each one's reason
    tags: Mapping[str, str]
    tensorboard_dir: Path
    work_dir: Path  # where W&B keeps its local files (the job's folder)
    previous: Mapping[str, Any] = field(default_factory=dict)  # the job's stored tracking: the runs to continue
    resumed_at: int | None = None  # the global step a resumed run restarts after: later points are discarded
    history: Sequence[Point] = ()  # written first into a new run: the history a continued job takes over
    parent: Mapping[str, Any] = field(default_factory=dict)  # the continued job's tracking, to link its runs


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def environment_trackers(env: Mapping[str, str] = os.environ) -> list[str]:
    """The trackers configured besides TensorBoard."""
    found = []
    if env.get("MLFLOW_TRACKING_URI", "").strip():
        found.append("mlflow")
    if env.get("WANDB_API_KEY", "").strip() or env.get("WANDB_MODE", "").strip().lower() in ("online", "offline", "run", "dryrun"):
        found.append("wandb")
    return found


def public_uri(uri: str) -> str:
    """The tracking URI without a user name or password, as it may be stored and shown."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "", depth: int = 3) -> dict[str, float]:
    """Numeric leaves of a nested dict as "a/b/c" keys (lists, text and deeper levels left out), with keys
    MLflow accepts (letters, digits, "_", "-", ".", " ", "/")."""
    flat = {}
    for key, value in metrics.items():
        name = prefix + re.sub(r"[^\w\-. /]", "_", str(key))
        if _number(value):
            flat[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1:
            flat.update(flat_metrics(value, f"{name}/", depth - 1))
    return flat


class Tracker:
    name = ""

    def state(self) -> dict[str, Any]:
        return {}

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str | None) -> None:
        """End the run: ``status`` "completed", "failed" or "cancelled"; None leaves the run's state as it is."""


class TensorBoardTracker(Tracker):
    """Event files in ``spec.tensorboard_dir``, written with TensorBoard's own writer (no TensorFlow, no torch).

    A resumed run starts its event file with a SessionLog START at the step after its checkpoint, so TensorBoard
    discards the lost run's later points (as the database does); a new directory starts with ``spec.history``.
    """

    name = "tensorboard"

    def __init__(self, spec: RunSpec) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        fresh = not any(spec.tensorboard_dir.glob("events.out.tfevents.*"))
        self.writer = EventFileWriter(str(spec.tensorboard_dir), flush_secs=5)
        if spec.resumed_at is not None and not fresh:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=spec.resumed_at + 1, session_log=start))
        if fresh:
            for point in spec.history:
                self.log(point.metrics(), point.step, flush=False)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int, flush: bool = True) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in values.items()])
        self.writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        if flush:
            self.writer.flush()

    def close(self, status: str | None) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per job in the experiment ``spec.group`` (or ``MLFLOW_EXPERIMENT_NAME``); a resumed job
    continues its run (the steps it replays appear twice in MLflow's history: MLflow deletes no point)."""

    name = "mlflow"

    def __init__(self, spec: RunSpec, env: Mapping[str, str], *, reopen: bool = True) -> None:
        """``reopen``: a continued run is set back to RUNNING (not when only adding an evaluation's metrics)."""
        uri = env["MLFLOW_TRACKING_URI"].strip()
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store behind this switch; naming a file store is choosing it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = public_uri(uri)
        previous = spec.previous.get("mlflow") or {}
        if previous.get("run_id") and previous.get("tracking_uri") == self.uri:
            self.experiment_id, self.run_id = previous["experiment_id"], previous["run_id"]
            if reopen:
                self.client.update_run(self.run_id, status="RUNNING")
            return
        name = env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or spec.group
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = dict(spec.tags)
        parent = spec.parent.get("mlflow") or {}
        if parent.get("run_id") and parent.get("tracking_uri") == self.uri:
            tags["mlflow.parentRunId"] = parent["run_id"]  # shown nested under the run it continues
        run = self.client.create_run(self.experiment_id, run_name=spec.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:PARAM_MAX]) for key, value in spec.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        for start in range(0, len(spec.history), 100):
            self._log_points(spec.history[start : start + 100])

    def _log_points(self, points: Sequence[Point]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, point.step) for point in points for key, value in point.metrics().items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(key, value, now, step) for key, value in values.items()])

    def close(self, status: str | None) -> None:
        if status is not None:
            self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FINISHED"))


class WandbTracker(Tracker):
    """One W&B run per job (project ``WANDB_PROJECT``, default "llm-tuna"; group ``spec.group``), its local
    files in the job's folder; a resumed job continues it (``resume="allow"`` with the stored id)."""

    name = "wandb"

    def __init__(self, spec: RunSpec, env: Mapping[str, str]) -> None:
        import wandb

        previous = spec.previous.get("wandb") or {}
        config = dict(spec.params)
        parent = spec.parent.get("wandb") or {}
        if parent.get("run_id"):
            config["continues_run"] = parent["run_id"]
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=previous.get("project") or env.get("WANDB_PROJECT", "").strip() or "llm-tuna",
            id=previous.get("run_id") or None,
            resume="allow",
            name=spec.name,
            group=spec.group[:128],
            config=config,
            tags=[f"{key}:{value}"[:64] for key, value in spec.tags.items()],
            dir=str(spec.work_dir),
            reinit="create_new",
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True, console="off", x_disable_stats=True),
        )
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        if not previous.get("run_id"):
            for point in spec.history:
                self.log(point.metrics(), point.step)

    def state(self) -> dict[str, Any]:
        offline = self.run.settings.mode in ("offline", "dryrun")
        return {
            "project": self.run.project,
            "run_id": self.run.id,
            "url": None if offline else self.run.url,
            "offline_dir": str(self.run.settings.sync_dir) if offline else None,
        }

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, STEP: step})

    def close(self, status: str | None) -> None:
        import wandb

        self.run.finish(exit_code=0 if status in ("completed", None) else 1)
        wandb.teardown()  # W&B's service process ends with the run: a worker keeps no process of its own


class Tracking:
    """The job's trackers for one run: TensorBoard always, MLflow and W&B when configured. Never raises."""

    def __init__(self, spec: RunSpec, env: Mapping[str, str] = os.environ, *, only_existing: bool = False) -> None:
        """``only_existing``: continue the runs ``spec.previous`` names, start none (to add an evaluation's metrics)."""
        self.errors: dict[str, str] = {}
        self.trackers: list[Tracker] = []
        wanted: list[tuple[str, Any]] = [("tensorboard", lambda: TensorBoardTracker(spec))]
        kinds = {"mlflow": lambda: MlflowTracker(spec, env, reopen=not only_existing), "wandb": lambda: WandbTracker(spec, env)}
        for name in environment_trackers(env):
            if not only_existing or (spec.previous.get(name) or {}).get("run_id"):
                wanted.append((name, kinds[name]))
        if only_existing and not any(spec.tensorboard_dir.glob("events.out.tfevents.*")):
            wanted = wanted[1:]
        for name, start in wanted:
            try:
                self.trackers.append(start())
            except Exception as exc:  # noqa: BLE001 - a tracker never fails the job
                self._failed(name, exc)

    def _failed(self, name: str, exc: BaseException) -> None:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        logger.warning("%s tracking stopped for this run: %s", name, message)
        self.errors[name] = message
        self.trackers = [tracker for tracker in self.trackers if tracker.name != name]

    def state(self) -> dict[str, Any]:
        """What the job stores (TrainingJob.tracking, with the TensorBoard folder added by the caller)."""
        found: dict[str, Any] = {}
        for tracker in self.trackers:
            try:
                if tracker.state():
                    found[tracker.name] = tracker.state()
            except Exception as exc:  # noqa: BLE001
                self._failed(tracker.name, exc)
        return found

    def log_point(self, point: Point) -> None:
        self.log(point.metrics(), point.step)

    def log(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as exc:  # noqa: BLE001
                self._failed(tracker.name, exc)

    def close(self, status: str | None) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.close(status)
            except Exception as exc:  # noqa: BLE001
                self._failed(tracker.name, exc)
        self.trackers = []

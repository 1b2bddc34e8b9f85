"""Experiment tracking of training jobs: the job rows turned into tuna_llm.tracking's runs, and what the page shows.

Every job writes TensorBoard event files into ``<TUNA_DATA_DIR>/jobs/<id>/tensorboard``; MLflow and W&B get one
run per job when configured (``tuna_llm.tracking.environment_trackers``). ``TrainingJob.tracking`` keeps where:
``{"tensorboard": "jobs/<id>/tensorboard", "mlflow": {"tracking_uri", "experiment_id", "run_id"},
"wandb": {"project", "run_id", "url", "offline_dir"}, "errors": {tracker: why it stopped}}``.

- A resumed job continues its runs (the ids stored here); TensorBoard discards the points after the checkpoint it
  resumes from, as the database does.
- A continued job ("train further") continues its parent's history: its runs start with the parent's points up to
  the step it took over from (the same series as its loss chart), at the same global steps, and its MLflow run is
  nested under the parent's. It gets runs of its own because it takes over from the parent's kept checkpoint,
  which may be before the parent's last step: logged into the parent's run, its steps would overlap the parent's
  later ones (MLflow and W&B delete no point), and a job continued twice would mix two histories.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import FileResponse, Http404

from training_app.models import LossPoint, TrainingJob
from tuna_core import admission
from tuna_core.jobs import JobLost, job_write
from tuna_llm.tracking import Point, RunSpec, Tracking, environment_trackers, flat_metrics

logger = logging.getLogger("tuna.tracking")


def tensorboard_dir(job: TrainingJob) -> Path:
    return Path(settings.TUNA_DATA_DIR) / "jobs" / str(job.pk) / "tensorboard"


def _params(job: TrainingJob) -> dict[str, str]:
    """The job's settings, each with its reason as "reason/<setting>"."""
    params = {key: str(value) for key, value in sorted(job.config.items())}
    params.update({f"reason/{key}": str(reason) for key, reason in sorted(job.config_reasons.items()) if reason})
    params["method"] = job.method
    return params


def _history(job: TrainingJob) -> list[Point]:
    """The points of the runs a continued job continues, up to where each was taken over (global steps)."""
    chain = [job]
    while chain[-1].is_continuation:
        chain.append(TrainingJob.objects.get(pk=chain[-1].parent_id))
    chain.reverse()
    points = []
    for run, successor in zip(chain[:-1], chain[1:], strict=True):
        for p in LossPoint.objects.filter(job=run, step__lte=successor.step_offset - run.step_offset):
            points.append(Point(run.step_offset + p.step, p.epoch, p.loss, p.eval_loss, p.learning_rate))
    return points


def _spec(job: TrainingJob, *, resumed_at: int | None = None, history: list[Point] | None = None) -> RunSpec:
    tags = {
        "llm_tuna.job": str(job.pk),
        "llm_tuna.dataset": str(job.dataset_id),
        "llm_tuna.base_model": job.base_model,
        "llm_tuna.method": job.method,
    }
    if job.experiment_id:
        tags["llm_tuna.sweep"] = str(job.experiment_id)
    parent = job.parent if job.is_continuation else None
    if parent is not None:
        tags["llm_tuna.continues_job"] = str(parent.pk)
    return RunSpec(
        name=job.model_id,
        group=f"LLM Tuna: {job.dataset.name} (dataset #{job.dataset_id})",
        params=_params(job),
        tags=tags,
        tensorboard_dir=tensorboard_dir(job),
        work_dir=tensorboard_dir(job).parent,
        previous=job.tracking or {},
        resumed_at=resumed_at,
        history=history or [],
        parent=(parent.tracking or {}) if parent is not None else {},
    )


def _stored(job: TrainingJob, tracking: Tracking) -> dict[str, Any]:
    """The job's tracking field after a run: the runs it continues stay named even if a tracker failed this time."""
    stored = {key: value for key, value in (job.tracking or {}).items() if key != "errors"}
    stored.update(tracking.state())
    stored["tensorboard"] = str(tensorboard_dir(job).relative_to(Path(settings.TUNA_DATA_DIR)))
    if tracking.errors:
        stored["errors"] = dict(tracking.errors)
    return stored


class JobTracking:
    """A training run's trackers, opened by the worker: feeds them each progress point, ends them with the job.

    Used as a context manager around the training call: a run that raises ends its runs as failed."""

    def __init__(self, job: TrainingJob, resume_from: Path | None) -> None:
        self.job = job
        self.offset = job.step_offset
        resumed_at = self.offset + int(resume_from.name.split("-")[-1]) if resume_from is not None else None
        history = _history(job) if job.is_continuation else []  # each tracker writes it into a new run only
        self.tracking = Tracking(_spec(job, resumed_at=resumed_at, history=history))
        self.ended = False
        self._save(held=True)

    def _save(self, *, held: bool) -> None:
        self.job.tracking = _stored(self.job, self.tracking)
        try:
            if held:
                job_write(TrainingJob, self.job.pk, tracking=self.job.tracking)
            else:
                TrainingJob.objects.filter(pk=self.job.pk).update(tracking=self.job.tracking)
        except JobLost:
            pass  # the row is not this process's any more: the worker's own write says so

    def feeding(self, on_progress):
        """``on_progress`` (which writes the LossPoint), then the same point to every tracker."""

        def feed(p) -> None:
            on_progress(p)
            errors = len(self.tracking.errors)
            self.tracking.log_point(Point(self.offset + p.step, p.epoch, p.loss, p.eval_loss, p.learning_rate))
            if len(self.tracking.errors) != errors:
                self._save(held=True)

        return feed

    def end(self, status: str | None, *, save: bool = True) -> None:
        """End the runs with the job's final status ("completed", "cancelled" or "failed"; None: as they are)."""
        if self.ended:
            return
        self.ended = True
        self.tracking.close(status)
        if save:
            self._save(held=False)

    def __enter__(self) -> JobTracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, JobLost):  # another process holds the job (and its runs) now
            self.end(None, save=False)
        elif exc_type is not None:
            self.end("failed")


def training_tracking(job: TrainingJob, resume_from: Path | None = None) -> JobTracking:
    """Open the trackers of a claimed job's run (``resume_from``: the checkpoint a resumed run starts from)."""
    return JobTracking(job, resume_from)


def log_evaluation(job: TrainingJob, metrics: dict, *, baseline: TrainingJob | None = None) -> None:
    """An evaluation's metrics into the job's runs, at its last step, as "evaluation_vs_base/<side>/<metric>"
    (or "evaluation_vs_job_<id>/..."). Never raises: the evaluation is complete whatever the trackers say."""
    try:
        against = "base" if baseline is None else f"job_{baseline.pk}"
        sides = {key: metrics[key] for key in ("base_model", "finetuned_model", "improvements") if isinstance(metrics.get(key), dict)}
        job = TrainingJob.objects.get(pk=job.pk)
        tracking = Tracking(_spec(job), only_existing=True)
        tracking.log(flat_metrics(sides, prefix=f"evaluation_vs_{against}/"), job.step_offset + job.current_step)
        tracking.close(None)
        if tracking.errors:
            job.tracking = {**(job.tracking or {}), "errors": {**(job.tracking or {}).get("errors", {}), **tracking.errors}}
            TrainingJob.objects.filter(pk=job.pk).update(tracking=job.tracking)
    except Exception:  # noqa: BLE001 - tracking never fails an evaluation
        logger.warning("Could not log the evaluation's metrics of job #%s to its trackers", job.pk, exc_info=True)


# -- what the job page shows ---------------------------------------------------------------------
def _event_files(job: TrainingJob) -> list[Path]:
    folder = tensorboard_dir(job)
    return sorted(path for path in folder.glob("events.out.tfevents.*") if path.is_file()) if folder.is_dir() else []


def tracking_view(job: TrainingJob) -> dict[str, Any]:
    """The job page's Tracking block: where the TensorBoard files are, the MLflow and W&B runs, what failed."""
    stored = job.tracking or {}
    folder = tensorboard_dir(job)
    mlflow = dict(stored.get("mlflow") or {})
    uri = mlflow.get("tracking_uri", "")
    if uri.startswith(("http://", "https://")) and mlflow.get("run_id"):
        mlflow["url"] = f"{uri.rstrip('/')}/#/experiments/{mlflow['experiment_id']}/runs/{mlflow['run_id']}"
    elif uri:
        mlflow["command"] = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    wandb = dict(stored.get("wandb") or {})
    if wandb.get("offline_dir"):
        wandb["command"] = f"wandb sync {shlex.quote(wandb['offline_dir'])}"
    return {
        "tensorboard_dir": str(folder),
        "tensorboard_command": f"tensorboard --logdir {shlex.quote(str(folder))}",
        "has_files": bool(_event_files(job)),
        "mlflow": mlflow,
        "wandb": wandb,
        "errors": stored.get("errors") or {},
        "configured": environment_trackers(),
    }


def tracking_files_download(job: TrainingJob) -> FileResponse:
    """The job's TensorBoard event files as one zip (``tensorboard --logdir`` on the unpacked folder), written to a
    temporary file and sent from it inside one of the owner's download slots (tuna_core.admission)."""
    files = _event_files(job)
    if not files:
        raise Http404("This job has no TensorBoard files yet.")
    name = f"tuna-job-{job.pk}-tensorboard"
    with admission.download_slot(job.owner) as ticket:
        archive_file = tempfile.TemporaryFile()  # noqa: SIM115 (the response closes it)
        try:
            with zipfile.ZipFile(archive_file, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in files:
                    archive.write(path, Path(name) / path.name)
            archive_file.seek(0)
        except BaseException:
            archive_file.close()
            raise
        return admission.file_response(archive_file, ticket, as_attachment=True, filename=f"{name}.zip", content_type="application/zip")

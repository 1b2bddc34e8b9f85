"""LLM Tuna's rows as the objects of OpenAI's fine-tuning API, which the official `openai` client parses.

Files are datasets ("file-<pk>"), fine-tuning jobs are training jobs ("ftjob-<pk>"), checkpoints are a job's kept
checkpoints ("ftckpt-<job>-<step>"), and events are read from a job's row and its loss history, newest first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone

from datasets_app.models import Dataset
from training_app.models import LossPoint, TrainingJob
from tuna_core.errors import Invalid
from tuna_llm.preference import DPO_BETA

FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
CHECKPOINT_PREFIX = "ftckpt-"
EVENT_PREFIX = "ftevent-"
MAX_ID_DIGITS = 18  # 64-bit keys: a longer number cannot be an id

# A training job's status as OpenAI names it. OpenAI's `validating_files` never shows: files are validated when
# they are uploaded, so a job is queued (or refused) the moment it is created.
STATUS = {
    "queued": "queued",
    "training": "running",
    "completed": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}

# What a failed job's `error.code` says when the job has no code of its own (it failed while training).
TRAINING_FAILED = "training_failed"


def unix(moment: datetime | float | int | None) -> int | None:
    if moment is None:
        return None
    if isinstance(moment, (int, float)):
        return int(moment)
    return int(moment.timestamp())


def number_in(identifier: object, prefix: str) -> int | None:
    """The pk in "<prefix><pk>"; None for anything else (ASCII digits only: "²" and "١٢" are not ids)."""
    if not isinstance(identifier, str) or not identifier.startswith(prefix):
        return None
    digits = identifier.removeprefix(prefix)
    if not (digits.isascii() and digits.isdigit() and len(digits) <= MAX_ID_DIGITS):
        return None
    return int(digits)


def file_id(dataset: Dataset | None) -> str | None:
    return f"{FILE_PREFIX}{dataset.pk}" if dataset is not None else None


def job_id(job: TrainingJob) -> str:
    return f"{JOB_PREFIX}{job.pk}"


def file_object(dataset: Dataset) -> dict[str, Any]:
    """Every upload is `processed`: it was validated when it arrived. An invalid one is kept, as OpenAI keeps it, and
    a job that uses it fails with `invalid_training_file` and the first bad line; `status_details` says so already."""
    return {
        "id": file_id(dataset),
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.original_filename,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None if dataset.is_valid else first_error(dataset),
        "expires_at": None,
    }


def first_error(dataset: Dataset) -> str:
    """The file's first refusal, naming its line: what OpenAI's `invalid_training_file` message carries."""
    items = dataset.validation_report.get("errors", {}).get("items", [])
    if not items:
        return f"{dataset.original_filename} cannot be used for training."
    first = items[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    more = dataset.error_count - 1
    return f"{dataset.original_filename}: {where}{first['message']}" + (
        f" ({more} more error{'s' if more != 1 else ''})" if more > 0 else ""
    )


def _hyperparameters(job: TrainingJob) -> dict[str, Any]:
    config = job.config or {}
    values: dict[str, Any] = {
        "n_epochs": config.get("num_epochs", "auto"),
        "batch_size": config.get("batch_size", "auto"),
        "learning_rate_multiplier": config.get("learning_rate_multiplier", 1.0),
    }
    if job.is_preference:
        values["beta"] = config.get("dpo_beta") or DPO_BETA
    return values


def job_status(job: TrainingJob) -> str:
    """A paused job is stored as cancelled with its `paused` flag (while it stops, it is still running)."""
    return "paused" if job.is_paused else STATUS.get(job.status, job.status)


def job_object(job: TrainingJob, *, training_file: Dataset | None = None, validation_file: Dataset | None = None, now=None) -> dict:
    """The job as OpenAI's FineTuningJob. `training_file`/`validation_file`: the files the job was created with
    through this API (openai_api.models.JobFiles); a job made in the pages trains on its dataset."""
    status = job_status(job)
    hyperparameters = _hyperparameters(job)
    method = "dpo" if job.is_preference else "supervised"
    now = now or timezone.now()
    estimated = None
    if status == "running" and job.eta_seconds is not None:
        estimated = unix(now) + int(job.eta_seconds)
    error = None
    if status == "failed":
        error = {
            "code": job.error_code or TRAINING_FAILED,
            "message": job.error_message or "The job failed.",
            "param": job.error_param or None,
        }
    finished = job.completed_at if status in ("succeeded", "failed", "cancelled") else None
    return {
        "id": job_id(job),
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": error,
        "fine_tuned_model": job.fine_tuned_model if status == "succeeded" else None,
        "finished_at": unix(finished),
        "hyperparameters": hyperparameters,
        "method": {"type": method, method: {"hyperparameters": hyperparameters}},
        "model": job.parent.fine_tuned_model if job.parent_id else job.base_model,
        "organization_id": f"user-{job.owner.get_username()}",
        "result_files": [],
        "seed": (job.config or {}).get("seed", 0),
        "status": status,
        "trained_tokens": job.tokens_seen if status == "succeeded" else None,
        "training_file": file_id(training_file or job.dataset),
        "validation_file": file_id(validation_file),
        "estimated_finish": estimated,
        "integrations": [],
        "metadata": job.metadata or None,
        "user_provided_suffix": job.suffix or None,
        # LLM Tuna's own: the same fine-tune under the name the pages and /v1/chat/completions also know.
        "tuna_model_id": job.model_id,
    }


def checkpoint_object(job: TrainingJob, step: int, train_loss, valid_loss, created_at) -> dict[str, Any]:
    return {
        "id": f"{CHECKPOINT_PREFIX}{job.pk}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(created_at),
        "fine_tuned_model_checkpoint": job.checkpoint_model(step),
        "fine_tuning_job_id": job_id(job),
        "step_number": step,
        "metrics": {"step": step, "train_loss": train_loss, "valid_loss": valid_loss},
    }


def _event(job: TrainingJob, key: str, at, message: str, *, level: str = "info", kind: str = "message", data=None) -> dict[str, Any]:
    return {
        "id": f"{EVENT_PREFIX}{job.pk}-{key}",
        "object": "fine_tuning.job.event",
        "created_at": unix(at),
        "level": level,
        "message": message,
        "data": data or {},
        "type": kind,
    }


def _loss_text(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not measured"


def job_events(job: TrainingJob, checkpoints: list[tuple]) -> list[dict[str, Any]]:
    """The job's story as OpenAI's events, newest first: status messages, one `metrics` event per logged step
    (data: step, train_loss, valid_loss, total_steps, epoch, learning_rate) and one per kept checkpoint.
    Ids name what each event is about, so a page's `after` cursor stays valid while the job runs on."""
    training_file = f" {file_id(job.dataset)}" if job.dataset_id else ""
    events = [
        _event(job, "created", job.created_at, f"Created fine-tuning job: {job_id(job)}"),
    ]
    refused = job.status == TrainingJob.Status.FAILED and job.started_at is None and bool(job.error_code)
    if not refused:
        events.append(_event(job, "validated", job.created_at, f"Training file{training_file} was validated at upload; job queued"))
    if job.started_at is not None:
        events.append(_event(job, "started", job.started_at, "Fine-tuning job started"))
    total = job.total_steps
    for point in LossPoint.objects.filter(job=job).order_by("step", "id"):
        parts = []
        if point.loss is not None:
            parts.append(f"training loss={_loss_text(point.loss)}")
        if point.eval_loss is not None:
            parts.append(f"validation loss={_loss_text(point.eval_loss)}")
        data = {
            "step": point.step,
            "train_loss": point.loss,
            "valid_loss": point.eval_loss,
            "total_steps": total,
            "epoch": point.epoch,
            "learning_rate": point.learning_rate,
        }
        message = f"Step {point.step}/{total}: {', '.join(parts)}"
        events.append(_event(job, f"step-{point.step}-{point.pk}", point.created_at, message, kind="metrics", data=data))
    for step, _path, _train, _valid, created_at in checkpoints:
        name = job.checkpoint_model(step)
        events.append(_event(job, f"checkpoint-{step}", created_at, f"Checkpoint created at step {step} with Snapshot ID: {name}"))
    ended = job.completed_at or job.created_at
    status = job_status(job)
    if status == "succeeded":
        events.append(_event(job, "model", ended, f"New fine-tuned model created: {job.fine_tuned_model}"))
        events.append(_event(job, "succeeded", ended, "The job has successfully completed"))
    elif status == "failed":
        events.append(_event(job, "failed", ended, job.error_message or "The job failed.", level="error"))
    elif status == "cancelled":
        events.append(_event(job, "cancelled", ended, "Fine-tuning job cancelled"))
    elif status == "paused":
        events.append(
            _event(job, "paused", ended, f"Fine-tuning job paused at step {job.current_step}; resume it to continue from that checkpoint")
        )
    events.sort(key=lambda event: event["created_at"] or 0)  # stable: same-second events keep the story's order
    return events[::-1]


def cursor_page(items: list[dict[str, Any]], *, after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's list page over items already in the list's order: those after the `after` id, `limit` of them."""
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise Invalid(f"after: no object {after!r} in this list; pass the id of an object the previous page returned.", param="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return {"object": "list", "data": page, "has_more": start + limit < len(items)}

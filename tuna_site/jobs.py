"""One lifecycle for every background job (training jobs and evaluations alike).

A job row is enqueued after its transaction commits, claimed atomically by the worker (a redelivered task
finds it no longer queued and does nothing), heartbeats while it runs, and ends failed with a readable
reason when its work raises. A starting worker reaps what a dead worker left running. The queue position
counts every kind of job, since one worker runs them one at a time.
"""

from __future__ import annotations

import traceback

from django.apps import apps
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone
from django_q.tasks import async_task

from tuna_llm.loading import ModelUnavailable
from tuna_site.models import WorkerJob
from tuna_site.workers import orphaned, worker_host


def job_kinds() -> list[type[WorkerJob]]:
    return [model for model in apps.get_models() if issubclass(model, WorkerJob)]


def job_enqueue(job: WorkerJob) -> None:
    """Hand the job to the worker once the row it reads is committed."""

    def enqueue() -> None:
        async_task(job.TASK, job.pk, task_name=job.task_name())

    transaction.on_commit(enqueue)


def job_claim(model: type[WorkerJob], pk: int) -> bool:
    """Queued -> running, atomically; False when another delivery (or a cancel) got there first."""
    now = timezone.now()
    return bool(
        model.objects.filter(pk=pk, status=model.QUEUED).update(
            status=model.RUNNING, heartbeat_at=now, worker_host=worker_host(), started_at=Coalesce("started_at", now)
        )
    )


def job_heartbeat(model: type[WorkerJob], pk: int, **fields) -> None:
    model.objects.filter(pk=pk).update(heartbeat_at=timezone.now(), **fields)


def job_fail(job: WorkerJob, exc: BaseException, **fields) -> None:
    """End a running job as failed with a readable reason (the traceback goes to the admin)."""
    type(job).objects.filter(pk=job.pk).update(
        status=job.FAILED,
        error_message=readable_error(exc, job.WORK),
        error_traceback=traceback.format_exc(),
        completed_at=timezone.now(),
        **job.stop_fields(),
        **fields,
    )


def jobs_reap_orphans() -> dict[str, int]:
    """Fail the jobs a dead worker left running (called when a worker starts); counts per kind."""
    reaped = {}
    for model in job_kinds():
        rows = model.objects.filter(orphaned(), status=model.RUNNING)
        reaped[model._meta.verbose_name_plural] = rows.update(
            status=model.FAILED, error_message=model.WORKER_STOPPED, completed_at=timezone.now(), **model().stop_fields()
        )
    return reaped


def queue_position(job: WorkerJob) -> int:
    """How many jobs the worker runs before this queued one: every kind queued earlier, and what runs now."""
    return sum(
        model.objects.filter(Q(status=model.QUEUED, created_at__lt=job.created_at) | Q(status=model.RUNNING)).count()
        for model in job_kinds()
    )


def readable_error(exc: BaseException, work: str = "The job") -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return "The machine ran out of memory. Lower batch_size or max_seq_length (or raise gradient_accumulation_steps) and start again."
    if isinstance(exc, (ValueError, ModelUnavailable)) and text:
        return text
    return f"{work} stopped with an error ({name}{': ' + text[:300] if text else ''}). The full traceback is in the admin."

"""What every background job row has: the shared part of training jobs and evaluations."""

from __future__ import annotations

from django.db import models


class WorkerJob(models.Model):
    """A row the worker runs. Subclasses name their statuses and their task; tuna_site.jobs does the rest
    (claim, heartbeat, fail, reap, enqueue, queue position) once for every kind of job."""

    QUEUED: str = "queued"
    RUNNING: str = "running"
    FAILED: str = "failed"
    TASK: str = ""  # dotted path of the django-q2 task that takes the row's id
    WORK: str = "The job"  # how messages name the work ("Training", "The evaluation")
    WORKER_STOPPED: str = ""

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker_host = models.CharField(max_length=200, blank=True, help_text="Machine whose worker runs (or last ran) this row.")
    error_message = models.TextField(blank=True)
    error_traceback = models.TextField(blank=True)

    class Meta:
        abstract = True

    def task_name(self) -> str:
        return f"{type(self).__name__.lower()}-{self.pk}"

    def stop_fields(self) -> dict:
        """Fields cleared when the job stops running (however it stops)."""
        return {}

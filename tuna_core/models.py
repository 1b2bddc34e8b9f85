"""What every background job row has: the shared part of training jobs and evaluations."""

from __future__ import annotations

from django.db import models


class WorkerJob(models.Model):
    """A row the worker runs. Subclasses name their statuses and their work function; tuna_core.jobs does
    the rest (enqueue, fair pick, claim, heartbeat, guarded writes, fail, reap, queue position) once for
    every kind of job. Every subclass has an `owner` (fair scheduling is per user)."""

    QUEUED: str = "queued"
    RUNNING: str = "running"
    FAILED: str = "failed"
    WORK_FUNCTION: str = ""  # dotted path of the function that does the work of a claimed row
    WORK: str = "The job"  # how messages name the work ("Training", "The evaluation")
    WORKER_STOPPED: str = ""

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker_host = models.CharField(max_length=200, blank=True, help_text="Machine whose worker runs (or last ran) this row.")
    # The process that holds the row while it runs: only it may write progress or the final status.
    worker_pid = models.PositiveIntegerField(null=True, blank=True, help_text="Process on worker_host that runs (or last ran) this row.")
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="When a worker last took this row (fair scheduling).")
    claims = models.PositiveIntegerField(default=0, help_text="How many times a worker has taken this row (1 per run or resume).")
    error_message = models.TextField(blank=True)
    error_traceback = models.TextField(blank=True)

    class Meta:
        abstract = True

    def task_name(self) -> str:
        return f"{type(self).__name__.lower()}-{self.pk}"

    def stop_fields(self) -> dict:
        """Fields cleared when the job stops running (however it stops)."""
        return {}

"""What every background job row has: the shared part of training jobs and evaluations."""

from __future__ import annotations

from django.conf import settings
from django.db import models


def job_statuses(running: str = "running", *, qualname: str = "WorkerJob.Status") -> type[models.TextChoices]:
    """The statuses every kind of job has, under the same member names: QUEUED, RUNNING, COMPLETED, FAILED,
    CANCELLED. A kind whose running state is stored under its own name (training jobs: "training") passes it."""
    members = [("QUEUED", "queued"), ("RUNNING", running), ("COMPLETED", "completed"), ("FAILED", "failed"), ("CANCELLED", "cancelled")]
    choices = [(name, (value, value.capitalize())) for name, value in members]
    return models.TextChoices("Status", choices, module=__name__, qualname=qualname)


def status_field(statuses: type[models.TextChoices]) -> models.CharField:
    return models.CharField(max_length=16, choices=statuses.choices, default=statuses.QUEUED, db_index=True)


class WorkerJob(models.Model):
    """A row the worker runs. Subclasses name their work function and what is theirs (their progress
    counts, their fields); the statuses, `is_finished`, `progress_percent` and the run time are here, and
    tuna_core.jobs does the rest (enqueue, fair pick, claim, heartbeat, guarded writes, complete, fail,
    reap, queue position) once for every kind of job. Every subclass has an `owner` (fair scheduling is
    per user)."""

    Status = job_statuses()
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
    status = status_field(Status)
    # Wall-clock seconds the worker spent on the row's run, however it ended (written with its final status
    # by tuna_core.jobs). A kind that keeps its own account sets `run_seconds = None`.
    run_seconds = models.FloatField(default=0)

    class Meta:
        abstract = True

    def task_name(self) -> str:
        return f"{type(self).__name__.lower()}-{self.pk}"

    def stop_fields(self) -> dict:
        """Fields cleared when the job stops running (however it stops)."""
        return {}

    def progress_counts(self) -> tuple[float, float]:
        """(done, total) of the work, in the kind's own unit (steps, examples, share of stages)."""
        return 0.0, 0.0

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.COMPLETED, self.Status.FAILED, self.Status.CANCELLED)

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def progress_percent(self) -> float:
        if self.status == self.Status.COMPLETED:
            return 100.0
        done, total = self.progress_counts()
        return min(100.0, 100.0 * done / total) if total else 0.0


class ApiToken(models.Model):
    """An API key of one user, stored as a digest only: a copy of the database yields no usable key.

    Keys are random (256 bits), so a fast digest is the right one (a slow password hasher guards guessable
    secrets, and would cost every API call); `prefix` finds the row and is what pages show. A user has
    several, each named, shown once at creation, and revoked by deleting the row."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True, help_text="The key's first characters, to recognise it.")
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the key (hex); the key itself is never stored.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

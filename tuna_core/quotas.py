"""Fair sharing as a mechanism: how many jobs one user may have queued or running, whatever their kind, and how big
one sweep may be.

The limits are settings (docs/configuration.md); the services call these checks, so pages, API and admin
obey them alike. What one training job may ask for is training's own rule (training_app.limits).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model

from tuna_core.errors import LimitReached
from tuna_core.jobs import job_kinds

# Rows of a kind with this field, sharing a value in it, are one sweep's runs: they count as one active job.
SWEEP_FIELD = "experiment"


class LimitExceeded(LimitReached):
    """A request over one of the limits; the message names the limit, its setting and the current count."""


def _has_field(model, name: str) -> bool:
    return any(field.name == name for field in model._meta.concrete_fields)


def active_jobs(owner) -> int:
    """The user's training jobs and evaluations that are queued or running; the runs of one sweep count as one."""
    total = 0
    for model in job_kinds():
        rows = model.objects.filter(owner=owner, status__in=[model.Status.QUEUED, model.Status.RUNNING])
        if _has_field(model, SWEEP_FIELD):
            sweeps = rows.exclude(**{f"{SWEEP_FIELD}__isnull": True}).values(SWEEP_FIELD).distinct().count()
            total += rows.filter(**{f"{SWEEP_FIELD}__isnull": True}).count() + sweeps
        else:
            total += rows.count()
    return total


def check_active_jobs(owner) -> None:
    """Call inside the transaction that queues the job: the user's row lock makes two requests count in turn."""
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
    count, limit = active_jobs(owner), settings.TUNA_MAX_ACTIVE_JOBS_PER_USER
    if count >= limit:
        raise LimitExceeded(
            f"You have {count} training job{'s' if count != 1 else ''} and evaluations queued or running; the limit is {limit} "
            "per user (TUNA_MAX_ACTIVE_JOBS_PER_USER). Wait for one to finish or cancel one, then try again (a sweep's "
            "runs count as one)."
        )


def check_sweep_size(*, runs: int, estimated_seconds: float | None) -> None:
    """A sweep of `runs` runs whose training is estimated at `estimated_seconds` in all (None: no speed measured yet, so
    only the number of runs is checked). Call before anything is created."""
    if runs > settings.TUNA_MAX_SWEEP_RUNS:
        raise LimitExceeded(
            f"This sweep has {runs} runs; the limit is {settings.TUNA_MAX_SWEEP_RUNS} runs per sweep (TUNA_MAX_SWEEP_RUNS). "
            "Remove rows from the grid.",
            errors={"grid": f"At most {settings.TUNA_MAX_SWEEP_RUNS} runs (TUNA_MAX_SWEEP_RUNS); got {runs}."},
        )
    limit = settings.TUNA_MAX_SWEEP_HOURS
    if estimated_seconds is not None and estimated_seconds > limit * 3600:
        hours = estimated_seconds / 3600
        raise LimitExceeded(
            f"This sweep's {runs} runs are estimated at {hours:.2f} hours of training in all; the limit is {limit:g} hours per "
            "sweep (TUNA_MAX_SWEEP_HOURS). Remove rows from the grid or lower their epochs.",
            errors={"grid": f"Estimated {hours:.2f} hours; at most {limit:g} (TUNA_MAX_SWEEP_HOURS)."},
        )

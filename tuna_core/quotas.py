"""Fair sharing as a mechanism: how many jobs one user may have queued or running, whatever their kind, how big
one sweep may be, and how much disk one user's files may take (every app registers what it keeps).

The limits are settings (docs/configuration.md); the services call these checks, so pages, API and admin
obey them alike. What one training job may ask for is training's own rule (training_app.limits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

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


# -- storage ------------------------------------------------------------------------------------
# Every app that keeps files for a user registers a counter here (in its AppConfig.ready): owner -> {kind: bytes}.
# The quota is the sum of them all, so the ground app needs no knowledge of the apps above it.
StorageCounter = Callable[[Any], dict[str, int]]
_storage_counters: dict[str, StorageCounter] = {}


def register_storage(name: str, counter: StorageCounter) -> None:
    """Count what `counter(owner)` returns (bytes by kind, e.g. {"datasets": ...}) against the user's storage quota."""
    _storage_counters[name] = counter


def storage_limit_bytes() -> int:
    return int(settings.TUNA_MAX_STORAGE_MB_PER_USER * 1024 * 1024)


def storage_used(owner) -> dict[str, int]:
    """Bytes the user keeps on disk, by kind (datasets, checkpoints, adapters, exports, ...)."""
    used: dict[str, int] = {}
    for counter in _storage_counters.values():
        for kind, size in counter(owner).items():
            used[kind] = used.get(kind, 0) + size
    return used


def size_text(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB" if size >= 102_400 else f"{size / 1024:.0f} KB"


class StorageFull(LimitExceeded):
    """The user's files would take more than TUNA_MAX_STORAGE_MB_PER_USER."""


def check_storage(
    owner, *, adding: int | None = None, action: str = "This", error: type[StorageFull] = StorageFull, estimated: bool = False
) -> None:
    """Refuse (`error`, naming the limit) when the user's files plus `adding` bytes pass the quota, or, with `adding`
    unknown (None: a job whose size cannot be estimated here), when they are at it already. `estimated`: `adding` is an
    estimate of what the work will write (said so in the message). Call inside the transaction that writes: the user's
    row lock makes two requests count in turn."""
    owner_id = getattr(owner, "pk", owner)
    with transaction.atomic():  # a savepoint inside the caller's transaction; alone, a check before anything is read
        get_user_model().objects.select_for_update().filter(pk=owner_id).first()
        used = storage_used(owner_id)
    total, limit = sum(used.values()), storage_limit_bytes()
    if (total >= limit) if adding is None else (adding > 0 and total + adding > limit):
        parts = ", ".join(f"{kind} {size_text(size)}" for kind, size in used.items() if size)
        what = action[:1].lower() + action[1:]
        needs = (
            f"{what} writes more"
            if adding is None
            else f"{what} needs about {size_text(adding)} (an estimate of the files it writes)"
            if estimated
            else f"{what} needs {size_text(adding)}"
        )
        raise error(
            f"Your files use {size_text(total)} of your {size_text(limit)} storage quota (TUNA_MAX_STORAGE_MB_PER_USER)"
            f"{': ' + parts if parts else ''}; {needs}. Delete datasets, jobs or exports you no longer need, then try again."
        )

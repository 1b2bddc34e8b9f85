"""Fair sharing as a mechanism: how many jobs one user may have queued or running, whatever their kind.

The limits are settings (docs/configuration.md); the services call these checks, so pages, API and admin
obey them alike. What one training job may ask for is training's own rule (training_app.limits).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model

from tuna_core.errors import LimitReached
from tuna_core.jobs import job_kinds


class LimitExceeded(LimitReached):
    """A request over one of the limits; the message names the limit, its setting and the current count."""


def active_jobs(owner) -> int:
    """The user's training jobs and evaluations that are queued or running."""
    return sum(model.objects.filter(owner=owner, status__in=[model.Status.QUEUED, model.Status.RUNNING]).count() for model in job_kinds())


def check_active_jobs(owner) -> None:
    """Call inside the transaction that queues the job: the user's row lock makes two requests count in turn."""
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
    count, limit = active_jobs(owner), settings.TUNA_MAX_ACTIVE_JOBS_PER_USER
    if count >= limit:
        raise LimitExceeded(
            f"You have {count} training job{'s' if count != 1 else ''} and evaluations queued or running; the limit is {limit} "
            "per user (TUNA_MAX_ACTIVE_JOBS_PER_USER). Wait for one to finish or cancel one, then try again."
        )

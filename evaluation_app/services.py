"""Writes for evaluations."""

from __future__ import annotations

from django.utils import timezone

from evaluation_app.models import Evaluation

WORKER_STOPPED = "The worker stopped while this evaluation was running. Start the evaluation again."


def evaluations_reap_orphans() -> int:
    return Evaluation.objects.filter(status=Evaluation.Status.RUNNING).update(
        status=Evaluation.Status.FAILED, error_message=WORKER_STOPPED, completed_at=timezone.now()
    )

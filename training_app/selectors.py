"""Reads for training jobs."""

from __future__ import annotations

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from training_app.models import TrainingJob


def jobs_for_user(user) -> QuerySet[TrainingJob]:
    return TrainingJob.objects.filter(owner=user).select_related("dataset")


def get_job_for_user(user, pk: int) -> TrainingJob:
    """Another user's job is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(TrainingJob.objects.select_related("dataset"), pk=pk, owner=user)


def loss_chart_data(job: TrainingJob) -> dict:
    points = list(job.loss_points.values_list("step", "loss", "eval_loss"))
    return {
        "train": [{"x": step, "y": loss} for step, loss, _ in points if loss is not None],
        "eval": [{"x": step, "y": eval_loss} for step, _, eval_loss in points if eval_loss is not None],
        "total_steps": job.total_steps,
    }

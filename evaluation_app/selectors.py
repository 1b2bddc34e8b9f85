"""Reads for evaluations."""

from __future__ import annotations

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from evaluation_app.models import Evaluation


def evaluations_for_user(user) -> QuerySet[Evaluation]:
    return Evaluation.objects.filter(owner=user).select_related("training_job", "training_job__dataset")


def get_evaluation_for_user(user, pk: int) -> Evaluation:
    return get_object_or_404(evaluations_for_user(user), pk=pk)

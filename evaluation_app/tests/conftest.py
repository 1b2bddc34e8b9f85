"""A completed evaluation with stored results (no model needed)."""

import pytest
from django.utils import timezone

from evaluation_app.models import Evaluation, EvaluationExample
from tests.support import job_row


@pytest.fixture
def job(alice, valid_dataset):
    return job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent")


@pytest.fixture
def evaluation(alice, job):
    evaluation = Evaluation.objects.create(
        owner=alice,
        training_job=job,
        status="completed",
        test_size=4,
        done=4,
        completed_at=timezone.now(),
        metrics={"base_model": {"exact_match": 0.0}, "finetuned_model": {"exact_match": 1.0}, "improvements": {}},
    )
    for i, side in enumerate("ABBA"):
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=i,
            messages=[{"role": "user", "content": f"prompt <b>{i}</b>"}],
            reference=f"ref {i}",
            base_output=f"base answer {i}",
            finetuned_output=f"tuned answer {i}",
            finetuned_side=side,
        )
    return evaluation

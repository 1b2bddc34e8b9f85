"""Did the run learn? The job page's verdict and the one-click continue (no training here)."""

import pytest
from django.utils import timezone

from tests.support import job_row
from training_app.models import LossPoint, TrainingJob
from training_app.selectors import learning_verdict

pytestmark = pytest.mark.django_db

CONFIG = {"base_model": "smollm2-135m-instruct", "num_epochs": 3, "batch_size": 4, "eval_examples": 2, "gradient_accumulation_steps": 1}


def finished(alice, dataset, validation: dict[int, float], **fields) -> TrainingJob:
    job = job_row(alice, dataset, status="completed", config=CONFIG, adapter_dir="/nowhere", completed_at=timezone.now(), **fields)
    last = max(validation)
    job.current_step = job.total_steps = last
    job.save()
    for step in range(1, last + 1):
        LossPoint.objects.create(job=job, step=step, epoch=step / last, loss=1.0)
    for step, value in validation.items():
        LossPoint.objects.create(job=job, step=step, epoch=step / last, eval_loss=value)
    return job


def test_it_says_a_run_that_stopped_while_improving_should_continue(alice, alice_client, valid_dataset):
    job = finished(alice, valid_dataset, {0: 2.88, 12: 2.5, 24: 2.3, 36: 2.04}, best_step=36)
    verdict = learning_verdict(job)
    assert (verdict.kind, verdict.still_improving) == ("some", True)
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert "It learned a little." in page and "validation loss 2.88 → 2.04 (-29%)" in page
    assert "still falling when training stopped" in page and 'id="continue-button"' in page
    response = alice_client.post(f"/training/{job.pk}/continue", {"epochs": "4"})
    child = TrainingJob.objects.get(parent=job)
    assert response.status_code == 302 and response["Location"] == child.get_absolute_url()
    assert (child.status, child.config["num_epochs"], child.step_offset) == ("queued", 4, 36)
    assert child.config_reasons["num_epochs"] == f"4 more epochs from job #{job.pk}'s adapter"


def test_it_says_when_a_run_learned_and_then_over_fitted(alice, alice_client, valid_dataset):
    job = finished(alice, valid_dataset, {0: 2.9, 10: 0.3, 20: 0.1, 30: 0.2}, best_step=20)
    verdict = learning_verdict(job)
    assert (verdict.kind, verdict.still_improving) == ("learned", False)
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert "It learned." in page and "lowest at step 20 and rose clearly afterwards" in page
    assert "the checkpoint of step 20 is kept" in page
    assert 'id="continue-button"' not in page


def test_it_says_when_a_run_did_not_learn(alice, valid_dataset):
    verdict = learning_verdict(finished(alice, valid_dataset, {0: 2.9, 10: 2.85, 20: 2.84}))
    assert verdict.kind == "none" and verdict.headline == "It did not learn much."


def test_it_continues_through_the_api_and_refuses_what_cannot_continue(alice, alice_api, bob_api, valid_dataset):
    job = finished(alice, valid_dataset, {0: 2.9, 10: 2.0})
    response = alice_api.post(f"/api/training/{job.pk}/continue", {"epochs": 2}, format="json")
    assert response.status_code == 201 and response.json()["parent_id"] == job.pk and response.json()["status"] == "queued"
    assert alice_api.post(f"/api/training/{job.pk}/continue", {"epochs": 0}, format="json").status_code == 400
    queued = TrainingJob.objects.get(pk=response.json()["id"])
    refused = alice_api.post(f"/api/training/{queued.pk}/continue", {}, format="json")
    assert refused.status_code == 409 and "Only a completed fine-tune" in refused.json()["detail"]
    assert bob_api.post(f"/api/training/{job.pk}/continue", {}, format="json").status_code == 404
    assert TrainingJob.objects.filter(parent=job).count() == 1

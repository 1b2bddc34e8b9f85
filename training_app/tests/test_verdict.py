"""Did the run learn? The job page's verdict and the one-click continue (no training here)."""

import pytest
from django.utils import timezone

from tests.support import job_row
from training_app.models import LossPoint, TrainingJob
from training_app.selectors import learning_verdict

pytestmark = pytest.mark.django_db

CONFIG = {"base_model": "smollm2-135m-instruct", "num_epochs": 3, "batch_size": 4, "eval_examples": 2, "gradient_accumulation_steps": 1}


def finished(alice, dataset, validation: dict[int, float], config=CONFIG, **fields) -> TrainingJob:
    job = job_row(alice, dataset, status="completed", config=config, adapter_dir="/nowhere", completed_at=timezone.now(), **fields)
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
    assert "still falling when training stopped" in page and "more epochs would likely help" in page and 'id="continue-button"' in page
    assert f'href="/training/new/{valid_dataset.pk}" id="sweep-link"' in page  # or try several settings
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


def test_it_does_not_ask_for_more_epochs_when_little_is_left_to_gain(alice, alice_client, valid_dataset):
    # The booking case: two validations (before and after), 2 epochs, a validation loss of 0.007 at the end.
    job = finished(alice, valid_dataset, {0: 2.61, 20: 0.007}, best_step=20, config={**CONFIG, "num_epochs": 2})
    verdict = learning_verdict(job)
    assert (verdict.kind, verdict.still_improving, verdict.trend) == ("learned", False, "little_left")
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert "It learned." in page and "At 0.007 the loss has little left to gain (0.3% of where it started)" in page
    assert "more epochs would likely help" not in page and "still falling" not in page
    assert 'id="continue-button"' not in page and 'id="sweep-link"' not in page
    # Even falling fast over many validations, a loss near zero has nothing left to win.
    assert learning_verdict(finished(alice, valid_dataset, {0: 2.9, 10: 0.5, 20: 0.1, 30: 0.04})).trend == "little_left"


def test_it_wants_more_than_a_before_and_after_to_call_a_run_still_improving(alice, valid_dataset):
    verdict = learning_verdict(finished(alice, valid_dataset, {0: 2.9, 24: 1.6}))
    assert (verdict.kind, verdict.still_improving, verdict.trend) == ("some", False, "too_few")
    assert "Measured only 2 times (before and after training): too few points to tell" in verdict.detail
    assert "more epochs would likely help" not in verdict.detail


def test_it_weighs_the_last_improvement_against_what_was_left(alice, valid_dataset):
    levelled = learning_verdict(finished(alice, valid_dataset, {0: 2.9, 10: 1.2, 20: 1.0, 30: 0.99}))
    assert (levelled.still_improving, levelled.trend) == (False, "levelled")
    assert "levelled off (last 0.99, best before it 1)" in levelled.detail and "would likely help" not in levelled.detail
    # A bounce then a clear new low: still improving (the last measurement is the lowest by 10% of what was left).
    bounced = learning_verdict(finished(alice, valid_dataset, {0: 2.9, 10: 2.0, 20: 2.1, 30: 1.8}))
    assert (bounced.still_improving, bounced.trend) == (True, "falling")
    assert "10% below the best before it (2 → 1.8)" in bounced.detail


def test_it_reads_the_trend_of_the_training_loss_from_stretches_without_validation(alice, valid_dataset):
    job = job_row(alice, valid_dataset, status="completed", config=CONFIG, adapter_dir="/nowhere", completed_at=timezone.now())
    noisy = [3.0, 2.6, 2.8, 2.3, 2.5, 2.1, 2.3, 1.9, 2.1, 1.7, 1.9, 1.5, 1.7, 1.3, 1.6, 1.25, 1.4, 1.2, 1.3, 1.0]
    for step, loss in enumerate(noisy, start=1):
        LossPoint.objects.create(job=job, step=step, epoch=step / 20, loss=loss)
    verdict = learning_verdict(job)
    assert verdict.detail.startswith("training loss (no validation examples) 3 → 1 (-67%).")
    assert (verdict.kind, verdict.still_improving) == ("learned", True)
    # Flat noise whose last two values happen to fall by 20%: no trend.
    flat = job_row(alice, valid_dataset, status="completed", config=CONFIG, adapter_dir="/nowhere", completed_at=timezone.now())
    for step in range(1, 21):
        LossPoint.objects.create(job=flat, step=step, epoch=step / 20, loss=1.5 if step % 2 else 1.2)
    assert (learning_verdict(flat).still_improving, learning_verdict(flat).trend) == (False, "levelled")


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

"""Deleting training jobs and evaluations (page, API, admin): rows and files go together, or nothing goes."""

from pathlib import Path

import pytest
from django.db import transaction
from django.urls import reverse

from evaluation_app.models import Evaluation, EvaluationExample, Rating
from inference_app.models import UsageLog
from tests.support import job_row
from training_app import services
from training_app.models import LossPoint, TrainingJob

pytestmark = pytest.mark.django_db


def job_files(data_dir: Path, job: TrainingJob) -> Path:
    """A job directory as the worker leaves it: adapter, checkpoints and an export."""
    root = data_dir / "jobs" / str(job.pk)
    for name in ("adapter/adapter_model.safetensors", "checkpoints/checkpoint-4/optimizer.pt", "export/model.gguf"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * 1000)
    return root


def completed_job(owner, dataset, data_dir):
    job = job_row(owner, dataset, status="completed")
    job.adapter_dir = str(job_files(data_dir, job) / "adapter")
    job.save()
    LossPoint.objects.create(job=job, step=1, epoch=0.1, loss=2.0)
    return job


def evaluation_of(job, status="completed", votes=True):
    evaluation = Evaluation.objects.create(owner=job.owner, training_job=job, status=status, test_size=2, done=2)
    example = EvaluationExample.objects.create(evaluation=evaluation, index=0, messages=[], reference="r", finetuned_side="A")
    if votes:
        Rating.objects.create(example=example, user=job.owner, preferred_model="finetuned", blind=True)
    return evaluation


def test_it_deletes_a_job_from_its_page_with_its_evaluations_and_files(
    alice_client, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks
):
    job = completed_job(alice, valid_dataset, data_dir)
    evaluation = evaluation_of(job)
    UsageLog.objects.create(user=alice, model_id=job.model_id, endpoint="/api/inference")
    page = alice_client.get(reverse("training-delete", args=[job.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert f"Delete training job #{job.pk}?" in html and f"#{evaluation.pk}" in html and "2.9" in html  # 3000 bytes of files
    assert 'id="confirm-delete"' in html
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(reverse("training-delete", args=[job.pk]))
    assert response.status_code == 302 and response.url == reverse("training-list")
    assert not TrainingJob.objects.filter(pk=job.pk).exists()
    assert not Evaluation.objects.filter(pk=evaluation.pk).exists() and not Rating.objects.exists()
    assert not LossPoint.objects.filter(job_id=job.pk).exists()
    assert not (data_dir / "jobs" / str(job.pk)).exists()
    assert UsageLog.objects.filter(model_id=job.model_id).count() == 1  # the calls that happened stay on record
    assert "Deleted job" in alice_client.get(reverse("training-list")).content.decode()


def test_it_removes_files_only_after_the_transaction_commits(alice, valid_dataset, data_dir):
    job = completed_job(alice, valid_dataset, data_dir)
    with pytest.raises(RuntimeError), transaction.atomic():
        services.training_job_delete(job=job)
        assert (data_dir / "jobs" / str(job.pk)).exists()  # deleted rows, files still there until commit
        raise RuntimeError("something later in the same transaction fails")
    assert TrainingJob.objects.filter(pk=job.pk).exists()
    assert (data_dir / "jobs" / str(job.pk) / "adapter" / "adapter_model.safetensors").exists()


def test_it_refuses_to_delete_a_training_job_until_it_is_cancelled(alice_client, alice_api, alice, valid_dataset, data_dir):
    job = job_row(alice, valid_dataset, status="training")
    root = job_files(data_dir, job)
    page = alice_client.get(reverse("training-delete", args=[job.pk])).content.decode()
    assert "cancel it first" in page and 'id="confirm-delete"' not in page
    response = alice_client.post(reverse("training-delete", args=[job.pk]))
    assert response.status_code == 409 and "is training; cancel it first" in response.content.decode()
    response = alice_api.delete(f"/api/training/{job.pk}?purge=true")
    assert response.status_code == 409 and response.json()["detail"].startswith(f"Job #{job.pk} is training; cancel it first")
    assert TrainingJob.objects.filter(pk=job.pk).exists() and root.exists()
    response = alice_api.delete(f"/api/training/{job.pk}")  # the seed's DELETE: cancel
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    assert TrainingJob.objects.get(pk=job.pk).cancel_requested and root.exists()


def test_it_cancels_a_training_job_with_delete_and_keeps_it_readable(alice_api, alice, valid_dataset, data_dir):
    """A client written against the seed: DELETE /api/training/{id} cancels; the job stays, with its history."""
    job = job_row(alice, valid_dataset)  # queued: cancelled at once
    LossPoint.objects.create(job=job, step=1, epoch=0.1, loss=2.0)
    response = alice_api.delete(f"/api/training/{job.pk}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = alice_api.get(f"/api/training/{job.pk}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert [log["step"] for log in again.json()["training_logs"]] == [1]
    job.refresh_from_db()
    assert job.status == "cancelled" and job.cancel_requested and job.completed_at is not None
    retried = alice_api.delete(f"/api/training/{job.pk}")  # a retry does not destroy it
    assert retried.status_code == 409 and retried.json() == {
        "detail": f"Job #{job.pk} has already finished (cancelled); there is nothing to cancel.",
        "errors": {},
    }
    assert TrainingJob.objects.filter(pk=job.pk, status="cancelled").exists()


@pytest.mark.parametrize("state", ["completed", "failed", "cancelled"])
def test_it_purges_a_finished_job_only_when_asked(alice_api, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks, state):
    job = completed_job(alice, valid_dataset, data_dir)
    TrainingJob.objects.filter(pk=job.pk).update(status=state)
    root = data_dir / "jobs" / str(job.pk)
    response = alice_api.delete(f"/api/training/{job.pk}")
    assert response.status_code == 409 and f"({state})" in response.json()["detail"]
    assert alice_api.delete(f"/api/training/{job.pk}?purge=false").status_code == 409
    assert alice_api.delete(f"/api/training/{job.pk}?purge=perhaps").status_code == 400
    assert TrainingJob.objects.filter(pk=job.pk).exists() and root.exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_api.delete(f"/api/training/{job.pk}?purge=true").status_code == 204
    assert not TrainingJob.objects.filter(pk=job.pk).exists() and not root.exists()
    assert alice_api.get(f"/api/training/{job.pk}").status_code == 404


def test_it_documents_the_purge_of_a_job_in_the_schema(alice_client):
    import yaml

    operation = yaml.safe_load(alice_client.get("/api/schema").content)["paths"]["/api/training/{id}"]["delete"]
    assert operation["summary"].startswith("Cancel a training job")
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["purge"]
    assert {"200", "204", "409"} <= set(operation["responses"])


def test_it_deletes_a_queued_job_through_the_api(alice_api, alice, valid_dataset, django_capture_on_commit_callbacks):
    job = job_row(alice, valid_dataset)
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_api.delete(f"/api/training/{job.pk}?purge=true").status_code == 204
    assert not TrainingJob.objects.filter(pk=job.pk).exists()
    assert alice_api.get(f"/api/training/{job.pk}").status_code == 404


def test_it_refuses_to_delete_a_job_that_another_run_continues(
    alice_api, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks
):
    parent = completed_job(alice, valid_dataset, data_dir)
    child = job_row(alice, valid_dataset, status="completed", parent=parent)
    response = alice_api.delete(f"/api/training/{parent.pk}?purge=true")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"Job #{parent.pk} is continued by job #{child.pk}, which starts from its adapter; delete that one first."
    )
    assert TrainingJob.objects.count() == 2 and (data_dir / "jobs" / str(parent.pk)).exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_api.delete(f"/api/training/{child.pk}?purge=true").status_code == 204
        assert alice_api.delete(f"/api/training/{parent.pk}?purge=true").status_code == 204
    assert not TrainingJob.objects.exists() and not (data_dir / "jobs" / str(parent.pk)).exists()


def test_it_refuses_to_delete_a_job_while_it_is_being_evaluated(alice_api, alice, valid_dataset, data_dir):
    job = completed_job(alice, valid_dataset, data_dir)
    running = evaluation_of(job, status="running", votes=False)
    response = alice_api.delete(f"/api/training/{job.pk}?purge=true")
    assert response.status_code == 409 and f"Evaluation #{running.pk} of job #{job.pk} is running" in response.json()["detail"]
    assert TrainingJob.objects.filter(pk=job.pk).exists()


def test_it_answers_404_for_another_users_job_or_evaluation(alice_client, bob_api, bob, alice, valid_dataset, data_dir):
    job = completed_job(alice, valid_dataset, data_dir)
    evaluation = evaluation_of(job)
    assert bob_api.delete(f"/api/training/{job.pk}").status_code == 404
    assert bob_api.delete(f"/api/training/{job.pk}?purge=true").status_code == 404
    assert bob_api.post(f"/api/training/{job.pk}/cancel").status_code == 404
    assert bob_api.delete(f"/api/evaluation/{evaluation.pk}").status_code == 404
    alice_client.force_login(bob)
    assert alice_client.get(reverse("training-delete", args=[job.pk])).status_code == 404
    assert alice_client.post(reverse("training-delete", args=[job.pk])).status_code == 404
    assert alice_client.post(reverse("evaluation-delete", args=[evaluation.pk])).status_code == 404
    assert TrainingJob.objects.filter(pk=job.pk).exists() and Evaluation.objects.filter(pk=evaluation.pk).exists()


def test_it_asks_anonymous_users_to_log_in_before_deleting(client, alice, valid_dataset):
    job = job_row(alice, valid_dataset, status="completed")
    response = client.post(reverse("training-delete", args=[job.pk]))
    assert response.status_code == 302 and reverse("login") in response.url
    assert client.delete(f"/api/training/{job.pk}").status_code == 401
    assert client.delete(f"/api/training/{job.pk}?purge=true").status_code == 401
    assert TrainingJob.objects.filter(pk=job.pk).exists()


def test_it_deletes_an_evaluation_from_its_page_and_the_api(alice_client, alice_api, alice, valid_dataset, data_dir):
    job = completed_job(alice, valid_dataset, data_dir)
    first, second = evaluation_of(job), evaluation_of(job)
    page = alice_client.get(reverse("evaluation-delete", args=[first.pk])).content.decode()
    assert "1 answer pair" in page and "1 vote" in page
    response = alice_client.post(reverse("evaluation-delete", args=[first.pk]))
    assert response.status_code == 302 and response.url == job.get_absolute_url()
    assert alice_api.delete(f"/api/evaluation/{second.pk}").status_code == 204
    assert not Evaluation.objects.exists() and not Rating.objects.exists()
    assert TrainingJob.objects.filter(pk=job.pk).exists() and (data_dir / "jobs" / str(job.pk)).exists()  # the model stays


def test_it_refuses_to_delete_a_running_evaluation(alice_client, alice_api, alice, valid_dataset):
    job = job_row(alice, valid_dataset, status="completed")
    running = evaluation_of(job, status="running", votes=False)
    response = alice_api.delete(f"/api/evaluation/{running.pk}")
    assert response.status_code == 409 and f"Evaluation #{running.pk} is running (2 of 2 examples done)" in response.json()["detail"]
    assert alice_client.post(reverse("evaluation-delete", args=[running.pk])).status_code == 409
    assert Evaluation.objects.filter(pk=running.pk).exists()


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser(username="root", password="root-pass-123")
    client.force_login(admin)
    return client


def test_it_deletes_jobs_with_their_files_from_the_admin(admin_client, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks):
    parent = completed_job(alice, valid_dataset, data_dir)
    child = completed_job(alice, valid_dataset, data_dir)
    child.parent = parent
    child.save()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:training_app_trainingjob_changelist"),
            {"action": "delete_selected", "_selected_action": [parent.pk, child.pk], "post": "yes"},
        )
    assert response.status_code == 302
    assert not TrainingJob.objects.exists()
    assert not (data_dir / "jobs" / str(parent.pk)).exists() and not (data_dir / "jobs" / str(child.pk)).exists()
    lone = completed_job(alice, valid_dataset, data_dir)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:training_app_trainingjob_delete", args=[lone.pk]), {"post": "yes"})
    assert response.status_code == 302 and not TrainingJob.objects.exists() and not (data_dir / "jobs" / str(lone.pk)).exists()


def test_it_shows_why_the_admin_cannot_delete_a_training_job(admin_client, alice, valid_dataset, data_dir):
    job = job_row(alice, valid_dataset, status="training")
    evaluation = evaluation_of(job_row(alice, valid_dataset, status="completed"), status="running", votes=False)
    page = admin_client.get(reverse("admin:training_app_trainingjob_delete", args=[job.pk])).content.decode()
    assert f"Job #{job.pk} is training: cancel it first" in page
    response = admin_client.post(reverse("admin:training_app_trainingjob_delete", args=[job.pk]), {"post": "yes"})
    assert TrainingJob.objects.filter(pk=job.pk).exists()
    assert response.status_code in (200, 403)
    page = admin_client.get(reverse("admin:evaluation_app_evaluation_delete", args=[evaluation.pk])).content.decode()
    assert f"Evaluation #{evaluation.pk} is running" in page
    admin_client.post(reverse("admin:evaluation_app_evaluation_delete", args=[evaluation.pk]), {"post": "yes"})
    assert Evaluation.objects.filter(pk=evaluation.pk).exists()

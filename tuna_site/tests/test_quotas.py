"""Fair sharing: active jobs per user, what one job may ask for, evaluation size. Each refusal names its limit."""

import pytest
from django.urls import reverse

from evaluation_app.models import Evaluation
from tests.support import job_row
from training_app.limits import limited_settings
from training_app.models import TrainingJob
from tuna_llm.autoconfig import DataFacts

pytestmark = pytest.mark.django_db

CONFIG = {"base_model": "smollm2-135m-instruct", "num_epochs": 2, "batch_size": 2}


def busy(owner, dataset) -> TrainingJob:
    """Three active things: a queued job, a training job and a running evaluation (the default limit)."""
    job_row(owner, dataset)
    job_row(owner, dataset, status="training")
    done = job_row(owner, dataset, status="completed", adapter_dir="/nonexistent")
    Evaluation.objects.create(owner=owner, training_job=done, status="running", test_size=2)
    return done


def test_it_refuses_a_job_over_the_active_jobs_limit_on_every_front_door(alice_api, alice_client, alice, valid_dataset):
    busy(alice, valid_dataset)
    job_row(alice, valid_dataset, status="failed")  # finished jobs do not count
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk}, format="json")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "You have 3 training jobs and evaluations queued or running" in detail
    assert "the limit is 3 per user (TUNA_MAX_ACTIVE_JOBS_PER_USER)" in detail
    page = alice_client.post(reverse("training-new", args=[valid_dataset.pk]), {"num_epochs": "2"})
    assert page.status_code == 409 and "TUNA_MAX_ACTIVE_JOBS_PER_USER" in page.content.decode()
    assert 'value="2"' in page.content.decode()  # the form keeps what was typed
    assert TrainingJob.objects.filter(owner=alice).count() == 4


def test_it_counts_each_user_apart(bob_api, bob, alice, valid_dataset):
    from datasets_app.services import dataset_create
    from tests.support import jsonl_file, pc_rows

    busy(alice, valid_dataset)
    bobs = dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's")
    response = bob_api.post("/api/training/start", {"dataset_id": bobs.pk}, format="json")
    assert response.status_code == 201


def test_it_lets_a_job_start_again_once_one_finishes(alice_api, alice, valid_dataset):
    busy(alice, valid_dataset)
    TrainingJob.objects.filter(status="queued").update(status="cancelled")
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk}, format="json")
    assert response.status_code == 201


def test_it_counts_evaluations_and_continued_runs_against_the_limit(alice_api, alice_client, alice, valid_dataset):
    done = busy(alice, valid_dataset)
    other = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent", config=CONFIG)
    response = alice_api.post("/api/evaluation/run", {"training_job_id": other.pk}, format="json")
    assert response.status_code == 409 and "TUNA_MAX_ACTIVE_JOBS_PER_USER" in response.json()["detail"]
    # The evaluation already running for `done` is returned, not counted twice.
    assert alice_api.post("/api/evaluation/run", {"training_job_id": done.pk}, format="json").status_code == 200
    response = alice_api.post(f"/api/training/{other.pk}/continue", {"epochs": 1}, format="json")
    assert response.status_code == 409 and "TUNA_MAX_ACTIVE_JOBS_PER_USER" in response.json()["detail"]
    response = alice_client.post(reverse("evaluation-start", args=[other.pk]), {"test_size": "2"}, follow=True)
    assert "TUNA_MAX_ACTIVE_JOBS_PER_USER" in response.content.decode()
    assert Evaluation.objects.filter(training_job=other).count() == 0 and TrainingJob.objects.filter(parent=other).count() == 0


@pytest.mark.parametrize(
    ("config", "field", "text"),
    [
        ({"num_epochs": 50}, "num_epochs", "At most 20 on this server (TUNA_MAX_EPOCHS); got 50."),
        ({"batch_size": 128}, "batch_size", "At most 32 on this server (TUNA_MAX_BATCH_SIZE); got 128."),
        ({"max_seq_length": 32768}, "max_seq_length", "At most 4096 on this server (TUNA_MAX_SEQ_LENGTH); got 32768."),
        ({"max_steps": 50000}, "max_steps", "the limit is 10000 per job (TUNA_MAX_STEPS_PER_JOB)"),
    ],
)
def test_it_bounds_what_one_job_may_ask_for(alice_api, valid_dataset, config, field, text):
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": config}, format="json")
    assert response.status_code == 400
    assert text in response.json()["errors"][field][0]
    assert not TrainingJob.objects.exists()


def test_it_refuses_epochs_that_would_run_past_the_update_limit(alice_api, alice_client, valid_dataset, settings):
    settings.TUNA_MAX_STEPS_PER_JOB = 50
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": {"num_epochs": 20}}, format="json")
    assert response.status_code == 400
    assert "updates; the limit is 50 per job (TUNA_MAX_STEPS_PER_JOB)" in response.json()["errors"]["num_epochs"][0]
    page = alice_client.post(reverse("training-new", args=[valid_dataset.pk]), {"num_epochs": "20"})
    assert page.status_code == 400 and "TUNA_MAX_STEPS_PER_JOB" in page.content.decode()


def test_it_lowers_chosen_settings_to_the_limits_and_says_why(alice_api, valid_dataset, settings):
    settings.TUNA_MAX_EPOCHS = 4
    settings.TUNA_MAX_STEPS_PER_JOB = 20
    body = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk}, format="json").json()
    assert body["config"]["num_epochs"] == 4
    assert body["config_reasons"]["num_epochs"] == "4: the most this server allows (TUNA_MAX_EPOCHS)"
    assert body["config"]["max_steps"] == 20
    assert body["config_reasons"]["max_steps"] == "20: the most this server allows (TUNA_MAX_STEPS_PER_JOB)"


def test_it_caps_max_seq_length_at_the_models_context():
    facts = DataFacts(train_pool=40, longest_tokens=100, p95_tokens=90, context=1024)
    config, _, errors = limited_settings({"max_seq_length": 2048}, facts, base_model="smollm2-135m-instruct")
    assert config is None and errors == {"max_seq_length": "At most 1024 on this server (the base model's context); got 2048."}
    config, reasons, errors = limited_settings({}, DataFacts(train_pool=40, longest_tokens=3000, context=1024), base_model="m")
    assert not errors and config.max_seq_length == 1024


def test_it_bounds_the_epochs_of_a_continued_run(alice_api, alice, valid_dataset, settings):
    settings.TUNA_MAX_EPOCHS = 5
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent", config=CONFIG)
    response = alice_api.post(f"/api/training/{job.pk}/continue", {"epochs": 10}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"]["epochs"] == ["At most 5 on this server (TUNA_MAX_EPOCHS); got 10."]
    assert TrainingJob.objects.count() == 1


@pytest.mark.parametrize("raw", ["-5", "0", "201", "abc", "1e3", "9" * 50])
def test_it_answers_400_naming_test_size_on_the_evaluation_page(alice_client, alice, valid_dataset, raw):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent")
    response = alice_client.post(reverse("evaluation-start", args=[job.pk]), {"test_size": raw})
    assert response.status_code == 400
    html = response.content.decode()
    assert "test_size must be a whole number from 1 to 200 (TUNA_MAX_EVAL_EXAMPLES)" in html
    assert f"Training job #{job.pk}" in html  # the job's page, with the error beside the form
    assert not Evaluation.objects.exists()


@pytest.mark.parametrize("raw", [-5, 0, 201, 10**30, "abc", 1.5, True])
def test_it_answers_400_naming_test_size_in_the_api(alice_api, alice, valid_dataset, raw):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent")
    response = alice_api.post("/api/evaluation/run", {"training_job_id": job.pk, "test_size": raw}, format="json")
    assert response.status_code == 400
    assert "test_size" in response.json()["errors"]
    assert not Evaluation.objects.exists()


def test_it_accepts_a_test_size_within_the_limit(alice_api, alice_client, alice, valid_dataset, settings):
    settings.TUNA_MAX_EVAL_EXAMPLES = 3
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent")
    response = alice_api.post("/api/evaluation/run", {"training_job_id": job.pk, "test_size": 3}, format="json")
    assert response.status_code == 201 and response.json()["test_size"] == 3
    Evaluation.objects.update(status="completed")
    response = alice_client.post(reverse("evaluation-start", args=[job.pk]), {"test_size": "4"})
    assert response.status_code == 400 and "from 1 to 3 (TUNA_MAX_EVAL_EXAMPLES)" in response.content.decode()
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert 'name="test_size" min="1" max="3"' in page

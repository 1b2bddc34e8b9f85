"""Sweeps: runs around the chosen settings, queued as ordinary jobs, stopped early when clearly losing, picked on
validation loss, the winner evaluated against the base model. The runs train the real embedded model, tiny settings."""

import pytest
from django.urls import reverse

from datasets_app.models import Dataset
from evaluation_app.models import Evaluation
from tests.support import job_row
from training_app import experiments
from training_app.models import Experiment, LossPoint, ThroughputMeasurement, TrainingJob
from tuna_core.jobs import run_next_job
from tuna_core.quotas import LimitExceeded

pytestmark = pytest.mark.django_db

# Tiny runs: 4 updates of 2 examples, validation on 2 examples before training and every 2 updates.
TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "eval_steps": 2, "eval_examples": 2}


def run_worker() -> int:
    """The worker, unattended: it runs whatever is queued (training runs, then evaluations) until nothing is left."""
    ran = 0
    while run_next_job():
        ran += 1
    return ran


def start(owner, dataset, grid, **kwargs) -> Experiment:
    return experiments.experiment_start(owner=owner, dataset=dataset, config_data=dict(TINY), grid=grid, **kwargs)


@pytest.mark.model
def test_it_runs_a_four_setting_sweep_unattended_and_picks_the_lowest_validation_loss(
    alice, alice_client, alice_api, valid_dataset, settings
):
    settings.TUNA_MAX_EVAL_EXAMPLES = 2  # the winner's evaluation against the base model stays tiny
    grid = [
        {"learning_rate": 2e-3},
        {"learning_rate": 5e-4},
        {"learning_rate": 1e-4, "lora_r": 4},
        {"learning_rate": 1e-3, "lora_layers": "attention"},
    ]
    experiment = start(alice, valid_dataset, grid, early_stopping=False)
    runs = list(experiment.runs.order_by("pk"))
    assert [run.status for run in runs] == ["queued"] * 4
    assert [run.config["learning_rate"] for run in runs] == [2e-3, 5e-4, 1e-4, 1e-3]
    assert runs[2].config["lora_r"] == 4 and runs[2].config["lora_alpha"] == 8
    assert runs[3].config["target_modules"] == ["q_proj", "v_proj"]
    assert "sweep #" in runs[1].config_reasons["learning_rate"]

    run_worker()

    experiment.refresh_from_db()
    runs = list(experiment.runs.order_by("pk"))
    assert [run.status for run in runs] == ["completed"] * 4, [run.error_message for run in runs]
    losses = {run.pk: run.best_eval_loss for run in runs}
    assert all(loss is not None for loss in losses.values())
    assert experiment.status == "completed" and experiment.finished_at is not None
    assert experiment.winner_id == min(losses, key=losses.get)
    assert [entry["job"] for entry in experiment.pick["compared"]] == sorted(losses, key=losses.get)
    assert experiment.pick["left_out"] == []
    assert f"Job #{experiment.winner_id} has the lowest validation loss of the 4 completed runs" in experiment.pick["reason"]

    # The winner was evaluated against the base model, unattended, on the dataset's scoring set.
    evaluation = Evaluation.objects.get(training_job=experiment.winner_id)
    assert evaluation.baseline_job_id is None and evaluation.status == "completed", evaluation.error_message
    assert evaluation.test_size == Dataset.objects.get(pk=valid_dataset.pk).scoring_size == 2

    page = alice_client.get(experiment.get_absolute_url())
    content = page.content.decode()
    assert page.status_code == 200
    assert 'id="sweep-winner-mark"' in content and f'id="sweep-winner-model">tuna-job-{experiment.winner_id}<' in content
    assert f'href="/training/{experiment.winner_id}#export"' in content
    assert f"evaluation #{evaluation.pk}" in content
    data = alice_api.get(f"/api/experiments/{experiment.pk}").json()
    assert data["status"] == "completed" and data["winner_id"] == experiment.winner_id
    assert data["winner_model_id"] == f"tuna-job-{experiment.winner_id}"
    assert [run["id"] for run in data["runs"]] == [run.pk for run in runs]
    assert [run["is_winner"] for run in data["runs"]].count(True) == 1
    assert len(data["pick"]["compared"]) == 4


@pytest.mark.model
def test_it_goes_on_after_a_failed_run_and_says_which_runs_it_compared(alice, valid_dataset, settings):
    settings.TUNA_MAX_EVAL_EXAMPLES = 2
    experiment = start(alice, valid_dataset, [{"learning_rate": 2e-3}, {"learning_rate": 1e-3}, {"learning_rate": 5e-4}])
    first, second, broken = experiment.runs.order_by("pk")
    # The last run breaks when its model is set up (as a bad runtime setting would): the sweep must still end.
    TrainingJob.objects.filter(pk=broken.pk).update(config={**broken.config, "target_modules": ["not_a_layer"]})

    run_worker()

    experiment.refresh_from_db()
    for run in (first, second, broken):
        run.refresh_from_db()
    assert (first.status, second.status, broken.status) == ("completed", "completed", "failed")
    assert "not_a_layer" in broken.error_message and "Traceback" in broken.error_traceback
    assert experiment.status == "completed"
    assert experiment.winner_id in (first.pk, second.pk)
    assert {entry["job"] for entry in experiment.pick["compared"]} == {first.pk, second.pk}
    [left_out] = experiment.pick["left_out"]
    assert left_out["job"] == broken.pk and left_out["why"].startswith("failed:") and "not_a_layer" in left_out["why"]
    assert "of the 2 completed runs compared" in experiment.pick["reason"]
    assert f"Left out: #{broken.pk} (failed:" in experiment.pick["reason"]
    assert Evaluation.objects.filter(training_job=experiment.winner_id, baseline_job=None).exists()


@pytest.mark.model
def test_it_stops_a_clearly_losing_run_early_with_its_reason(alice, alice_client, valid_dataset, settings):
    settings.TUNA_MAX_EVAL_EXAMPLES = 2
    grid = [{"learning_rate": 3e-3}, {"learning_rate": 2e-3}, {"learning_rate": 1e-7}]
    experiment = experiments.experiment_start(
        owner=alice, dataset=valid_dataset, config_data={**TINY, "max_steps": 8}, grid=grid, early_stopping=True
    )
    good, better, losing = experiment.runs.order_by("pk")

    run_worker()

    for run in (good, better, losing):
        run.refresh_from_db()
    assert good.status == better.status == "completed"  # fewer than two completed runs before them: never stopped
    assert losing.status == "cancelled" and losing.adapter_dir == ""
    assert losing.current_step < losing.total_steps == 8
    assert losing.stop_reason.startswith("Stopped early after its validation at step")
    assert f"the completed runs #{good.pk}, #{better.pk}" in losing.stop_reason
    experiment.refresh_from_db()
    assert experiment.winner_id in (good.pk, better.pk)
    assert experiment.pick["left_out"] == [{"job": losing.pk, "why": losing.stop_reason, "settings": experiments.grid_point(losing.config)}]
    content = alice_client.get(experiment.get_absolute_url()).content.decode()
    assert "Stopped early after its validation at step" in content


def test_it_follows_the_median_stopping_rule(alice, valid_dataset):
    """early_stop_reason on recorded validation curves (no training): the rule, its grace and its margin."""
    experiment = Experiment.objects.create(owner=alice, dataset=valid_dataset, base_model="smollm2-135m-instruct", grid=[])

    def run(status, total, curve, best=None):
        job = job_row(alice, valid_dataset, status=status, total_steps=total, experiment=experiment, best_eval_loss=best)
        LossPoint.objects.bulk_create(LossPoint(job=job, step=step, epoch=0, eval_loss=loss) for step, loss in curve)
        return job

    run("completed", 10, [(0, 2.0), (5, 1.0), (10, 0.5)], best=0.5)
    run("completed", 20, [(0, 2.0), (10, 1.2), (20, 0.6)], best=0.6)  # at half its training, 1.2
    losing = run("training", 40, [(0, 2.0)])
    assert experiments.early_stop_reason(losing, 8, 1.9) is None  # 20% of its training: within the grace
    assert experiments.early_stop_reason(losing, 20, 1.2) is None  # median at 50% is 1.1; 1.2 is within 10%
    reason = experiments.early_stop_reason(losing, 20, 1.3)
    assert reason and "1.3000" in reason and "1.1000" in reason and "50% of its training" in reason
    assert experiments.early_stop_reason(losing, 40, 5.0) is None  # its last validation: nothing left to save
    Experiment.objects.filter(pk=experiment.pk).update(early_stopping=False)
    assert experiments.early_stop_reason(losing, 20, 1.3) is None


def test_it_refuses_an_over_limit_grid_before_anything_is_created(alice, alice_api, alice_client, valid_dataset, settings):
    settings.TUNA_MAX_SWEEP_RUNS = 3
    four = [{"learning_rate": lr} for lr in (1e-3, 2e-3, 5e-4, 3e-3)]
    response = alice_api.post("/api/experiments", {"dataset_id": valid_dataset.pk, "config": TINY, "grid": four}, format="json")
    assert response.status_code == 409
    assert "the limit is 3 runs per sweep (TUNA_MAX_SWEEP_RUNS)" in response.json()["detail"]
    assert Experiment.objects.count() == 0 and TrainingJob.objects.count() == 0

    settings.TUNA_MAX_SWEEP_RUNS = 8
    settings.TUNA_MAX_SWEEP_HOURS = 1
    ThroughputMeasurement.objects.create(base_model="smollm2-135m-instruct", device="cpu", tokens_per_second=0.5, source="a slow machine")
    with pytest.raises(LimitExceeded, match=r"the limit is 1 hours per sweep \(TUNA_MAX_SWEEP_HOURS\)"):
        experiments.experiment_start(owner=alice, dataset=valid_dataset, config_data={"eval_examples": 2}, grid=None)
    response = alice_api.post("/api/experiments", {"dataset_id": valid_dataset.pk, "config": {"eval_examples": 2}}, format="json")
    assert response.status_code == 409 and "TUNA_MAX_SWEEP_HOURS" in response.json()["detail"]
    # The training form says so before starting, and refuses it when started anyway.
    url = reverse("training-new", args=[valid_dataset.pk])
    form = alice_client.get(url).content.decode()
    assert 'id="sweep-refused"' in form and "TUNA_MAX_SWEEP_HOURS" in form
    page = alice_client.post(url, {"eval_examples": "2", "sweep": "1", "grid-0-learning_rate": "0.001", "grid-1-learning_rate": "0.002"})
    assert page.status_code == 409 and "TUNA_MAX_SWEEP_HOURS" in page.content.decode()
    assert Experiment.objects.count() == 0 and TrainingJob.objects.count() == 0


def test_it_names_the_row_and_setting_of_a_bad_grid(alice, alice_api, valid_dataset):
    grid = [{"learning_rate": 1e-3}, {"learning_rate": "fast", "dropout": 0.1}, {"learning_rate": 1e-3}]
    response = alice_api.post("/api/experiments", {"dataset_id": valid_dataset.pk, "config": TINY, "grid": grid}, format="json")
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert set(errors) == {"grid[1].learning_rate", "grid[1].dropout"}
    response = alice_api.post(
        "/api/experiments", {"dataset_id": valid_dataset.pk, "config": TINY, "grid": [{"lora_r": 8}, {"lora_r": 8}]}, format="json"
    )
    assert response.status_code == 400 and "grid[1]" in response.json()["errors"]
    assert Experiment.objects.count() == 0 and TrainingJob.objects.count() == 0


def test_it_starts_a_sweep_from_the_training_form_as_one_active_job(alice, alice_client, valid_dataset, settings):
    settings.TUNA_MAX_ACTIVE_JOBS_PER_USER = 2
    url = reverse("training-new", args=[valid_dataset.pk])
    form = alice_client.get(url).content.decode()
    assert "Try several settings" in form and 'name="grid-0-learning_rate"' in form
    default = experiments.default_grid(valid_dataset, {})
    assert len(default) >= 4 and default[0] == experiments.grid_point(
        experiments._services().training_plan(dataset=valid_dataset, config_data={}).config
    )
    assert f'value="{default[1]["learning_rate"]}"' in form

    response = alice_client.post(
        url,
        {
            "max_steps": "4",
            "eval_examples": "2",
            "sweep": "1",
            "early_stopping": "1",
            "grid-0-learning_rate": "0.001",
            "grid-1-learning_rate": "0.002",
            "grid-2-lora_r": "4",
            "grid-3-lora_layers": "attention",
            "grid-5-learning_rate": "",
        },
    )
    experiment = Experiment.objects.get()
    assert response.status_code == 302 and response["Location"] == experiment.get_absolute_url()
    assert experiment.runs.count() == 4 and all(run.config["max_steps"] == 4 for run in experiment.runs.all())
    assert experiment.early_stopping and experiment.base_config == {
        "base_model": "smollm2-135m-instruct",
        "max_steps": 4,
        "eval_examples": 2,
    }
    # The four queued runs count as one active job: one more job fits, a second does not.
    assert alice_client.post(url, {"max_steps": "4"}).status_code == 302
    assert alice_client.post(url, {"max_steps": "4"}).status_code == 409
    page = alice_client.get(experiment.get_absolute_url())
    assert page.status_code == 200 and 'id="sweep-runs"' in page.content.decode() and "hx-get" in page.content.decode()


def test_it_keeps_each_users_sweeps_apart(alice, bob_api, alice_api, valid_dataset, client, bob):
    experiment = start(alice, valid_dataset, [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}])
    assert bob_api.get(f"/api/experiments/{experiment.pk}").status_code == 404
    assert bob_api.get("/api/experiments").json()["count"] == 0
    assert alice_api.get("/api/experiments").json()["results"][0]["id"] == experiment.pk
    client.force_login(bob)
    assert client.get(reverse("experiment-detail", args=[experiment.pk])).status_code == 404
    assert client.post(reverse("experiment-cancel", args=[experiment.pk])).status_code == 404
    response = alice_api.post(f"/api/experiments/{experiment.pk}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert set(experiment.runs.values_list("status", flat=True)) == {"cancelled"}
    assert alice_api.post(f"/api/experiments/{experiment.pk}/cancel").status_code == 409


def test_it_queues_a_sweeps_runs_fairly_with_other_users_jobs(alice, bob, valid_dataset):
    from django.utils import timezone

    from datasets_app.services import dataset_create
    from tests.support import jsonl_file, pc_rows
    from training_app.services import training_job_start
    from tuna_core.jobs import job_pick_order

    experiment = start(alice, valid_dataset, [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}, {"learning_rate": 5e-4}])
    first, second, third = experiment.runs.order_by("pk")
    TrainingJob.objects.filter(pk=first.pk).update(status="completed", claimed_at=timezone.now())  # the worker ran alice's first run
    bobs = training_job_start(owner=bob, dataset=dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's"), config_data={})
    assert [pk for _, pk in job_pick_order()] == [bobs.pk, second.pk, third.pk]


def test_it_keeps_the_grid_following_the_settings_until_it_is_edited(alice_client, valid_dataset):
    import json

    url = reverse("training-new", args=[valid_dataset.pk])
    htmx = {"HX-Request": "true"}
    default = experiments.default_grid(valid_dataset, {})
    typed = {f"grid-{i}-{key}": str(point[key]) for i, point in enumerate(default) for key in experiments.GRID_KEYS}
    # The learning rate above changes while the grid is still the default one: the grid is made again around it.
    preview = alice_client.post(url, {"learning_rate": "0.0004", "preview": "1", "grid_base": json.dumps({}), **typed}, headers=htmx)
    content = preview.content.decode()
    assert preview.status_code == 200 and 'id="sweep-grid" hx-swap-oob="true"' in content
    assert 'name="grid-1-learning_rate" value="0.0002"' in content and 'id="sweep-estimate" hx-swap-oob="true"' in content
    # An edited grid stays as typed: only the estimate comes back.
    edited = {**typed, "grid-1-learning_rate": "0.0007"}
    preview = alice_client.post(url, {"learning_rate": "0.0004", "preview": "1", "grid_base": json.dumps({}), **edited}, headers=htmx)
    content = preview.content.decode()
    assert 'id="sweep-grid"' not in content and 'id="sweep-estimate" hx-swap-oob="true"' in content


def test_it_deletes_a_datasets_sweeps_with_the_dataset(alice, valid_dataset):
    from datasets_app.services import dataset_delete

    emptied = Experiment.objects.create(owner=alice, dataset=valid_dataset, base_model="smollm2-135m-instruct")  # its runs deleted before
    with_run = Experiment.objects.create(owner=alice, dataset=valid_dataset, base_model="smollm2-135m-instruct")
    run = job_row(alice, valid_dataset, status="completed")
    TrainingJob.objects.filter(pk=run.pk).update(experiment=with_run)

    dataset_delete(dataset=valid_dataset, with_jobs=True)

    assert not Dataset.objects.filter(pk=valid_dataset.pk).exists()
    assert not Experiment.objects.filter(pk__in=[emptied.pk, with_run.pk]).exists()
    assert not TrainingJob.objects.filter(pk=run.pk).exists()

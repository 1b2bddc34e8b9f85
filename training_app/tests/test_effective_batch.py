"""The effective batch on a server that trains on several processes: what a job records when it is created, what the
settings table and the API show, and what the estimates count (no training here)."""

import pytest
from django.urls import reverse

from tests.support import job_row
from training_app import experiments, services
from training_app.estimates import training_estimate
from training_app.models import ThroughputMeasurement, TrainingJob

pytestmark = pytest.mark.django_db


def start(api, dataset, config=None):
    response = api.post("/api/training/start", {"dataset_id": dataset.pk, "config": config or {}}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_it_records_the_servers_processes_and_keeps_the_effective_batch(alice_api, valid_dataset, settings):
    one = start(alice_api, valid_dataset)
    settings.TUNA_TRAIN_PROCESSES = "2"
    two = start(alice_api, valid_dataset)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert (one["config"]["processes"], two["config"]["processes"]) == (1, 2)
    # 16 examples: 2 per update; on 2 processes, 1 on each.
    assert (one["config"]["batch_size"], two["config"]["batch_size"]) == (2, 1)
    assert one["effective_batch"] == two["effective_batch"] == 2
    for name in ("num_epochs", "learning_rate", "eval_examples", "save_steps"):
        assert one["config"][name] == two["config"][name], name
    assert "2 processes on this server (TUNA_TRAIN_PROCESSES)" in two["config_reasons"]["processes"]
    assert two["config_reasons"]["batch_size"].endswith(": 1 on each of 2 processes")
    # Two machines of 2 processes each: 4 in all, each still taking at least 1 example.
    settings.TUNA_TRAIN_NNODES = 2
    four = start(alice_api, valid_dataset)
    assert (four["processes"], four["config"]["batch_size"], four["effective_batch"]) == (4, 1, 4)
    assert TrainingJob.objects.count() == 3


def test_it_refuses_processes_set_by_the_user(alice_api, valid_dataset, settings):
    settings.TUNA_TRAIN_PROCESSES = "2"
    response = alice_api.post(
        "/api/training/start", {"dataset_id": valid_dataset.pk, "config": {"processes": 8, "effective_batch": 16}}, format="json"
    )
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert errors["processes"] == ["Chosen by the server (TUNA_TRAIN_PROCESSES), not per job; leave it out. batch_size is per process."]
    assert "set batch_size or gradient_accumulation_steps instead" in errors["effective_batch"][0]
    assert TrainingJob.objects.count() == 0


def test_it_shows_per_process_batch_processes_accumulation_and_effective_batch_in_the_settings_table(
    alice, alice_client, valid_dataset, settings
):
    settings.TUNA_TRAIN_PROCESSES = "2"
    url = reverse("training-new", args=[valid_dataset.pk])
    page = alice_client.post(url, {"batch_size": "3", "preview": "1"}, headers={"HX-Request": "true"}).content.decode()
    assert '<tr data-setting="batch_size"><th>Batch size per process</th><td class="num">3</td>' in page
    assert '<tr data-setting="processes"><th>Processes</th><td class="num">2</td><td class="small muted">auto: 2 processes' in page
    assert '<tr data-setting="gradient_accumulation_steps"><th>Gradient accumulation</th><td class="num">1</td>' in page
    assert (
        '<tr data-setting="effective_batch"><th>Effective batch</th><td class="num">6</td>'
        '<td class="small ">examples per update: 3 per process × 2 processes × 1 accumulated' in page
    )
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={"gradient_accumulation_steps": 2})
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert '<tr data-setting="processes"><th>Processes</th><td class="num">2</td>' in page
    assert '<tr data-setting="effective_batch"><th>Effective batch</th><td class="num">4</td>' in page  # 1 × 2 × 2
    # A job from before several processes trained one: one process, its batch as it was.
    old = job_row(alice, valid_dataset, config={"batch_size": 4, "num_epochs": 1}, status=TrainingJob.Status.COMPLETED)
    page = alice_client.get(f"/training/{old.pk}").content.decode()
    assert '<tr data-setting="processes"><th>Processes</th><td class="num">1</td>' in page
    assert '<tr data-setting="effective_batch"><th>Effective batch</th><td class="num">4</td>' in page


def test_it_estimates_a_run_on_several_processes_from_one_devices_speed(alice_client, valid_dataset, settings):
    one = services.training_plan(dataset=valid_dataset, config_data={}).config
    settings.TUNA_TRAIN_PROCESSES = "2"
    two = services.training_plan(dataset=valid_dataset, config_data={}).config
    assert (one.processes, two.processes, one.effective_batch) == (1, 2, two.effective_batch)
    ThroughputMeasurement.objects.create(base_model=one.base_model, device="cpu", tokens_per_second=400, source="job")
    on_one, on_two = training_estimate(dataset=valid_dataset, config=one), training_estimate(dataset=valid_dataset, config=two)
    # The same work (updates, tokens); on a CPU the processes share its cores: the machine's speed, the same time.
    assert (on_one["updates"], on_one["tokens"]) == (on_two["updates"], on_two["tokens"])
    assert on_two["parallel_factor"] == 1 and on_two["seconds"] == pytest.approx(on_one["seconds"])
    page = alice_client.get(reverse("training-new", args=[valid_dataset.pk])).content.decode()
    assert "on 2 processes (sharing the machine's cores, counted at one process's speed)" in page
    assert f"for {on_two['updates']} updates of 2 examples = " in page
    # On CUDA each process has a GPU of its own: twice the speed, half the time, the same GPU-hours.
    ThroughputMeasurement.objects.create(base_model=one.base_model, device="cuda", tokens_per_second=400, source="job")
    on_one, on_two = training_estimate(dataset=valid_dataset, config=one), training_estimate(dataset=valid_dataset, config=two)
    assert on_two["parallel_factor"] == 2 and on_two["tokens_per_second"] == 2 * on_two["device_tokens_per_second"]
    assert on_two["seconds"] == pytest.approx(on_one["seconds"] / 2)
    assert on_two["cost_usd"] == pytest.approx(on_one["cost_usd"])
    page = alice_client.get(reverse("training-new", args=[valid_dataset.pk])).content.decode()
    assert "tokens/s on 2 processes (400 tokens/s on each one's GPU)" in page


def test_it_keeps_the_parents_processes_when_a_run_goes_on_and_records_the_servers_for_a_sweep(alice, valid_dataset, settings):
    settings.TUNA_TRAIN_PROCESSES = "2"
    plan = services.training_plan(dataset=valid_dataset, config_data={})
    parent = job_row(alice, valid_dataset, config=plan.config.to_dict(), config_reasons=plan.reasons, status=TrainingJob.Status.COMPLETED)
    parent.adapter_dir = str(services.job_dir(parent) / "adapter")
    parent.save()
    settings.TUNA_TRAIN_PROCESSES = "1"
    child = services.training_job_continue(job=parent, epochs=1)
    assert (child.config["processes"], child.config["batch_size"]) == (2, plan.config.batch_size)
    assert child.config_reasons["processes"] == parent.config_reasons["processes"]
    # A sweep's runs are new runs: the server's processes when it starts, the batch per process chosen for them.
    settings.TUNA_TRAIN_PROCESSES = "2"
    experiment = experiments.experiment_start(
        owner=alice, dataset=valid_dataset, config_data={"eval_examples": 2}, grid=[{"learning_rate": 1e-3}, {"learning_rate": 5e-4}]
    )
    runs = list(experiment.runs.all())
    assert len(runs) == 2 and {(run.config["processes"], run.config["batch_size"]) for run in runs} == {(2, 1)}


def test_it_records_one_process_for_preference_tuning_with_the_servers_pairs_per_update(alice, settings):
    from datasets_app.services import dataset_create
    from tests.support import jsonl_file

    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"Order {i} as JSON."}]},
            "preferred_output": [{"role": "assistant", "content": f'{{"order": {i}}}'}],
            "non_preferred_output": [{"role": "assistant", "content": f"Order {i}."}],
        }
        for i in range(12)
    ]
    dataset = dataset_create(owner=alice, upload=jsonl_file(rows), name="Prefs")
    settings.TUNA_TRAIN_PROCESSES = "2"
    job = services.preference_file_job_start(owner=alice, dataset=dataset, config_data={})
    # Supervised runs on 2 processes take 2 examples per update here (1 each); preference tuning runs on one, 2 pairs.
    assert (job.config["processes"], job.config["batch_size"]) == (1, 2)
    assert job.config_reasons["processes"] == "one process: preference tuning does not train on several"

"""Experiment tracking with the real packages: TensorBoard's own reader on the job's event files, an MLflow file
store, W&B offline; training on the real embedded model with tiny settings."""

import io
import socket
import zipfile
from functools import partial
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets_app.services import dataset_create
from evaluation_app.services import evaluation_start
from tests.support import jsonl_file, pc_rows
from training_app import services
from training_app.models import TrainingJob
from training_app.selectors import loss_chart_data
from training_app.tests.test_training import AtStep, SimulatedCrash
from training_app.tracking import tensorboard_dir
from tuna_core.jobs import job_run, jobs_reap, run_next_job
from tuna_llm.tracking import EVAL_LOSS, LEARNING_RATE, LOSS, Point, RunSpec, Tracking, flat_metrics, public_uri

TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "save_steps": 2, "eval_steps": 2, "eval_examples": 2}


def start(owner, dataset, **overrides):
    return services.training_job_start(owner=owner, dataset=dataset, config_data={**TINY, **overrides})


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """A series as TensorBoard itself reads it (orphaned points of a crashed run purged, as TensorBoard does)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def same_series(found: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, same values (an event file holds float32)."""
    assert [step for step, _ in found] == [step for step, _ in expected]
    assert [value for _, value in found] == pytest.approx([value for _, value in expected], rel=1e-6)
    return True


def database_series(job: TrainingJob, field: str) -> list[tuple[int, float]]:
    return [(job.step_offset + step, value) for step, value in job.loss_points.exclude(**{field: None}).values_list("step", field)]


def mlflow_series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return MlflowClient(tracking_uri=uri)


# -- the trackers alone (no model) ----------------------------------------------------------------
def spec(tmp_path, **fields) -> RunSpec:
    return RunSpec(
        **{
            "name": "tuna-job-1",
            "group": "LLM Tuna: Orders (dataset #1)",
            "params": {"learning_rate": "0.0002", "reason/learning_rate": "set by you"},
            "tags": {"llm_tuna.job": "1"},
            "tensorboard_dir": tmp_path / "tb",
            "work_dir": tmp_path,
            **fields,
        }
    )


def test_it_discards_a_lost_runs_later_points_when_a_run_resumes(tmp_path):
    first = Tracking(spec(tmp_path), env={})
    for step in (1, 2, 3, 4):
        first.log_point(Point(step, step / 4, loss=10.0 + step))
    first.close(None)  # a crash after step 4; the checkpoint kept is step 2

    resumed = Tracking(spec(tmp_path, resumed_at=2), env={})
    for step in (3, 4, 5):
        resumed.log_point(Point(step, step / 4, loss=20.0 + step))
    resumed.close("completed")

    assert scalars(tmp_path / "tb", LOSS) == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]


def test_it_drops_a_failing_tracker_and_says_why_without_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    tracking = Tracking(spec(tmp_path), env=env)
    tracking.log_point(Point(1, 0.1, loss=1.5, learning_rate=1e-4))
    tracking.close("completed")
    assert set(tracking.errors) == {"mlflow"} and "127.0.0.1" in tracking.errors["mlflow"]
    assert scalars(tmp_path / "tb", LOSS) == [(1, 1.5)]  # TensorBoard went on


def test_it_flattens_metrics_and_hides_credentials():
    metrics = {"finetuned_model": {"exact_match": 0.5, "labels": {"accuracy": 1, "per_label": {"a": {"total": 2}}}, "note": "x"}}
    assert flat_metrics(metrics, prefix="evaluation_vs_base/") == {
        "evaluation_vs_base/finetuned_model/exact_match": 0.5,
        "evaluation_vs_base/finetuned_model/labels/accuracy": 1.0,
    }
    assert public_uri("https://user:secret@mlflow.example.com:5000/path") == "https://mlflow.example.com:5000/path"
    assert public_uri("file:///data/mlruns") == "file:///data/mlruns"


# -- jobs on the real model -------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.model
def test_it_writes_tensorboard_files_that_tensorboard_reads_as_the_database_has_them(
    alice, alice_client, client, bob, valid_dataset, monkeypatch
):
    # MLflow configured but its server down: the job trains on, TensorBoard's files are written, the page says so.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    job = start(alice, valid_dataset)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert "mlflow" in job.tracking["errors"] and "mlflow" not in job.tracking
    assert job.tracking["tensorboard"] == f"jobs/{job.pk}/tensorboard"
    folder = tensorboard_dir(job)
    train = scalars(folder, LOSS)
    assert [step for step, _ in train] == [1, 2, 3, 4]
    assert same_series(train, database_series(job, "loss"))
    assert same_series(scalars(folder, EVAL_LOSS), database_series(job, "eval_loss"))
    assert same_series(scalars(folder, LEARNING_RATE), database_series(job, "learning_rate"))

    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert f"tensorboard --logdir {folder}" in page and "Download (.zip)" in page
    assert "MLflow stopped recording this job (the training went on)" in page
    response = alice_client.get(f"/training/{job.pk}/tensorboard.zip")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert names and all(name.startswith(f"tuna-job-{job.pk}-tensorboard/events.out.tfevents.") for name in names)
    client.force_login(bob)
    assert client.get(f"/training/{job.pk}/tensorboard.zip").status_code == 404


@pytest.mark.django_db
@pytest.mark.model
def test_it_records_settings_with_reasons_and_every_point_in_an_mlflow_run(alice, valid_dataset, mlflow_store):
    job = start(alice, valid_dataset, learning_rate=3e-4)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    run = mlflow_store.get_run(job.tracking["mlflow"]["run_id"])
    assert run.info.run_name == f"tuna-job-{job.pk}" and run.info.status == "FINISHED"
    assert mlflow_store.get_experiment(run.info.experiment_id).name == f"LLM Tuna: Orders (dataset #{valid_dataset.pk})"
    params = run.data.params
    assert params["learning_rate"] == "0.0003" and params["reason/learning_rate"] == job.config_reasons["learning_rate"]
    assert params["max_steps"] == "4" and params["lora_r"] == str(job.config["lora_r"])
    assert set(job.config) <= set(params)
    assert same_series(mlflow_series(mlflow_store, run.info.run_id, LOSS), database_series(job, "loss"))
    assert same_series(mlflow_series(mlflow_store, run.info.run_id, EVAL_LOSS), database_series(job, "eval_loss"))
    assert same_series(mlflow_series(mlflow_store, run.info.run_id, LEARNING_RATE), database_series(job, "learning_rate"))

    # The evaluation's metrics at the end, at the job's last step: a real evaluation (evaluation_work).
    evaluation, _ = evaluation_start(owner=alice, job=job, test_size=1)
    run_next_job()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    metrics = mlflow_store.get_run(run.info.run_id).data.metrics
    for side in ("base_model", "finetuned_model"):
        assert metrics[f"evaluation_vs_base/{side}/exact_match"] == evaluation.metrics[side]["exact_match"]
    assert mlflow_store.get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow_store.get_metric_history(run.info.run_id, "evaluation_vs_base/finetuned_model/exact_match")[0].step == 4
    assert scalars(tensorboard_dir(job), "evaluation_vs_base/finetuned_model/exact_match") == [
        (4, evaluation.metrics["finetuned_model"]["exact_match"])
    ]


@pytest.mark.django_db
@pytest.mark.model
def test_it_continues_the_same_runs_when_a_job_is_resumed(alice, valid_dataset, mlflow_store):
    job = start(alice, valid_dataset, max_steps=6)

    def crash():
        raise SimulatedCrash()

    with pytest.raises(SimulatedCrash):  # after step 3's point, before step 4's: the checkpoint kept is step 2's
        job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=(AtStep(4, crash),)))
    job.refresh_from_db()
    first = dict(job.tracking)
    assert [step for step, _ in scalars(tensorboard_dir(job), LOSS)] == [1, 2, 3]
    assert jobs_reap()["training jobs"] == 1

    services.training_job_resume(job=job)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert job.tracking["mlflow"] == first["mlflow"]  # the same run, continued
    run = mlflow_store.get_run(first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert len(mlflow_store.search_runs([run.info.experiment_id])) == 1
    # TensorBoard drops the lost run's step 3, as the database did; MLflow keeps every point it was sent.
    assert same_series(scalars(tensorboard_dir(job), LOSS), database_series(job, "loss"))
    assert [step for step, _ in database_series(job, "loss")] == [1, 2, 3, 4, 5, 6]
    assert {step for step, _ in mlflow_series(mlflow_store, run.info.run_id, LOSS)} == {1, 2, 3, 4, 5, 6}


@pytest.mark.django_db
@pytest.mark.model
def test_it_continues_the_history_when_a_job_is_trained_further(alice, mlflow_store):
    small = dataset_create(owner=alice, upload=jsonl_file(pc_rows(10)), name="Orders")  # one epoch: 3 steps
    parent = start(alice, small, max_steps=2)
    run_next_job()
    parent.refresh_from_db()
    assert parent.status == "completed", parent.error_message
    child = services.training_job_continue(job=parent, epochs=1)
    run_next_job()
    child.refresh_from_db()
    assert child.status == "completed", child.error_message

    chart = loss_chart_data(child)  # the parent's points up to the step it took over from, then the child's
    expected = [(point["x"], point["y"]) for point in chart["train"]]
    assert same_series(scalars(tensorboard_dir(child), LOSS), expected)
    run = mlflow_store.get_run(child.tracking["mlflow"]["run_id"])
    assert run.info.run_name == f"tuna-job-{child.pk}"
    assert run.data.tags["mlflow.parentRunId"] == parent.tracking["mlflow"]["run_id"]
    assert same_series(mlflow_series(mlflow_store, run.info.run_id, LOSS), expected)
    assert run.data.params["num_epochs"] == "1"


def test_it_logs_to_weights_and_biases_offline_and_continues_the_run_on_resume(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    env = {"WANDB_MODE": "offline"}
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = Tracking(spec(tmp_path), env=env)
    first.log_point(Point(1, 0.5, loss=1.5, learning_rate=1e-4))
    state = first.state()
    first.close("failed")
    assert not first.errors, first.errors
    run = state["wandb"]
    assert run["project"] == "llm-tuna" and run["url"] is None and Path(run["offline_dir"]).is_dir()
    assert Path(run["offline_dir"]).is_relative_to(tmp_path)  # under the job's folder

    resumed = Tracking(spec(tmp_path, previous=state, resumed_at=1), env=env)
    resumed.log_point(Point(2, 1.0, loss=1.2))
    assert resumed.state()["wandb"]["run_id"] == run["run_id"]
    resumed.close("completed")
    assert not resumed.errors, resumed.errors

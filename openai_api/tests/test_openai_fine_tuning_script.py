"""A script written as OpenAI's fine-tuning guide writes it, run unchanged against the live server with the
official `openai` client (only base_url, api_key and the model name differ), while a worker trains the jobs:
supervised from a chat file and DPO from a preference file, on the embedded model at tiny settings."""

import threading
import time
from pathlib import Path

import pytest
from django.db import connections
from django.utils.module_loading import import_string
from openai import OpenAI

from tests.support import api_key
from training_app.models import TrainingJob
from tuna_core.jobs import job_run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model]

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "openai"
BASE = "smollm2-135m-instruct"
TINY = {"n_epochs": 1, "batch_size": 8}
LINES = 12  # the first lines of each sample file (OpenAI's minimum is 10): with TINY, two updates
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def worker():
    """The worker's training function, run on queued training jobs in a thread while the script polls (the
    evaluation a finished DPO job queues is left alone: this test is about the API)."""
    stop = threading.Event()

    def loop():
        work = import_string(TrainingJob.WORK_FUNCTION)
        try:
            while not stop.is_set():
                queued = TrainingJob.objects.filter(status=TrainingJob.Status.QUEUED).order_by("pk").first()
                if queued is None or not job_run(TrainingJob, queued.pk, work):
                    time.sleep(0.2)
        finally:
            connections.close_all()

    thread = threading.Thread(target=loop, name="test-worker", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=120)


@pytest.fixture
def sample(tmp_path):
    def head(name: str, start: int = 0, count: int = LINES) -> Path:
        lines = (SAMPLES / name).read_bytes().splitlines(keepends=True)[start : start + count]
        path = tmp_path / f"{start}-{name}"
        path.write_bytes(b"".join(lines))
        return path

    return head


@pytest.fixture
def client(live_server, alice):
    return OpenAI(base_url=f"{live_server.url}/v1", api_key=api_key(alice), max_retries=0, timeout=120)


def wait(client: OpenAI, job_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in TERMINAL:
        if time.monotonic() > deadline:
            row = TrainingJob.objects.get(pk=int(job_id.removeprefix("ftjob-")))
            raise AssertionError(f"{job_id} still {job.status}: step {row.current_step}/{row.total_steps}, {row.config}")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def test_it_runs_openai_s_supervised_fine_tuning_script_unchanged(client, worker, sample):
    with open(sample("chat_weight.jsonl"), "rb") as handle:
        training_file = client.files.create(file=handle, purpose="fine-tune")
    with open(sample("chat_weight.jsonl", start=LINES, count=4), "rb") as handle:
        validation_file = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=training_file.id,
        validation_file=validation_file.id,
        suffix="orders",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {**TINY, "learning_rate_multiplier": 2}}},
    )
    other = client.fine_tuning.jobs.create(model=BASE, training_file=training_file.id)
    assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"  # waiting behind the first one

    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert (job.training_file, job.validation_file) == (training_file.id, validation_file.id)
    assert job.fine_tuned_model == f"ft:{BASE}:alice:orders:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size, job.hyperparameters.learning_rate_multiplier) == (1, 8, 2)
    assert client.fine_tuning.jobs.retrieve(other.id).status == "cancelled"

    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=50).data
    assert events[0].message == "The job has successfully completed"
    assert events[1].message == f"New fine-tuned model created: {job.fine_tuned_model}"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    steps = [e.data["step"] for e in metrics if e.data["train_loss"] is not None]
    assert steps == sorted(steps, reverse=True) and steps[-1] == 1  # newest first
    assert all(e.data["train_loss"] > 0 for e in metrics if e.data["train_loss"] is not None)
    assert all(set(e.data) >= {"step", "train_loss", "valid_loss", "total_steps"} for e in metrics)
    newest = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in newest.data] == [e.id for e in events[:2]] and newest.has_more
    assert [e.id for e in newest.get_next_page().data] == [e.id for e in events[2:4]]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "a finished job keeps at least one checkpoint"
    newest_checkpoint = checkpoints[0]
    assert newest_checkpoint.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{newest_checkpoint.step_number}"
    assert newest_checkpoint.fine_tuning_job_id == job.id and newest_checkpoint.metrics.train_loss > 0

    messages = [{"role": "user", "content": "Please send 2 red hat in M."}]
    for model in (job.fine_tuned_model, newest_checkpoint.fine_tuned_model_checkpoint):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content and reply.model == model

    # The same job is an ordinary training job: listed with every other, and known to the pages.
    assert {j.id for j in client.fine_tuning.jobs.list()} == {job.id, other.id}
    row = TrainingJob.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert row.status == "completed" and row.suffix == "orders" and row.config["seed"] == 7


def test_it_runs_openai_s_dpo_script_from_a_preference_file(client, worker, sample):
    with open(sample("preference.jsonl"), "rb") as handle:
        preference_file = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=f"base:{BASE}",
        training_file=preference_file.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {**TINY, "beta": 0.2}}},
    )
    assert job.method.type == "dpo" and job.hyperparameters.beta == 0.2
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}:alice::{job.id}"
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert metrics and all(e.data["step"] <= e.data["total_steps"] for e in metrics)
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Can I get the red hoodie in L? 6 of them."}], max_tokens=16
    )
    assert reply.choices[0].message.content
    row = TrainingJob.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert row.is_preference and row.parent_id is None and row.config["dpo_beta"] == 0.2

    # A supervised job on a preference file fails as OpenAI's would: the file, the reason, nothing trained.
    wrong = client.fine_tuning.jobs.create(model=BASE, training_file=preference_file.id)
    assert wrong.status == "failed" and wrong.error.code == "invalid_training_file" and "dpo" in wrong.error.message

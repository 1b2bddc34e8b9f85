"""PostgreSQL restarted under a real worker while a job trains (issue 32, point 6): the job rides through with no
manual resume and one loss per step, and pages and the API answer 503 (not 500) while the database is away; a
database away for longer than TUNA_DB_RETRY_S fails the job, which the worker resumes once from its checkpoint.

Runs in CI's PostgreSQL stage (marked `postgres`), as root on the machine whose cluster holds the test database
(`pg_ctlcluster`, as .ci/run starts it); skipped anywhere else."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from django.db import connection
from rest_framework.test import APIClient

from tests.support import api_key, wait_for
from training_app import services
from training_app.models import TrainingJob
from tuna_site.tests.test_supervision import Worker, worker_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model, pytest.mark.process, pytest.mark.postgres]

STEPS = 24
CONFIG = {"max_steps": STEPS, "batch_size": 1, "max_seq_length": 64, "save_steps": 4, "eval_examples": 0}
OUTAGE_S = 9


def local_cluster() -> str:
    """The version of this machine's PostgreSQL cluster that holds the test database (skips the test otherwise)."""
    if connection.vendor != "postgresql":
        pytest.skip("restarts PostgreSQL: runs in CI's PostgreSQL stage (DATABASE_URL=postgres://...)")
    db = connection.settings_dict
    if (db["HOST"] or "localhost") not in ("127.0.0.1", "localhost") or str(db["PORT"] or 5432) != "5432":
        pytest.skip("the test database is not on this machine's cluster")
    versions = sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    if not versions or not shutil.which("pg_ctlcluster") or os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster and root, as in CI")
    return versions[0].parent.name


def cluster(version: str, action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True, timeout=120)
    if action in ("start", "restart"):
        wait_for(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]).returncode == 0, 60, "PostgreSQL")
    connection.close()  # this test's own connection went with the server


@pytest.fixture
def start_worker(data_dir, tmp_path):
    env = worker_env(data_dir)  # its heartbeat timeout (5 s) is shorter than the outage: the watchdog must not reap
    log = tmp_path / "worker.log"
    started = []

    def start(retry_s: float) -> Path:
        started.append(Worker({**env, "TUNA_DB_RETRY_S": str(retry_s)}, log))
        return log

    yield start
    for one in started:
        one.stop()
    text = log.read_text(errors="replace") if log.exists() else ""
    print("\n".join(line for line in text.splitlines() if not line.startswith("{'")))  # all but the trainer's dicts


def row(pk: int) -> TrainingJob:
    return TrainingJob.objects.get(pk=pk)


def test_it_rides_through_postgresql_restarts_while_a_job_trains(start_worker, alice, valid_dataset, client):
    version = local_cluster()
    queued = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=CONFIG)
    client.force_login(alice)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(alice)}")
    log = start_worker(retry_s=60)
    wait_for(lambda: (job := row(queued.pk)).status == "training" and job.current_step >= 3, 300, "the job to train past step 3")

    # A restart with the server away long enough to look at the pages meanwhile (stop, then start).
    cluster(version, "stop")
    down_at = time.monotonic()
    try:
        page = client.get(queued.get_absolute_url())  # a fresh connection is refused
        listing = api.get("/api/training")
        models = api.get("/v1/models")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # longer than the heartbeat timeout
    finally:
        cluster(version, "start")
    assert page.status_code == 503 and page["Retry-After"], page.content[:300]
    assert "The database is unreachable for a moment" in page.content.decode()
    assert listing.status_code == 503 and listing.json()["detail"].startswith("The database is unreachable")
    assert models.status_code == 503 and models.json()["error"]["code"] == "database_unavailable"
    assert client.get(queued.get_absolute_url()).status_code == 200  # back
    first = wait_for(lambda: "done on try" in (text := log.read_text(errors="replace")) and text, 120, "the job's write to land")
    assert f"Training job #{queued.pk}" in first and "the database is unreachable" in first  # the job waited, and said so
    assert "The database is unreachable" in first and "The database is back after" in first  # the supervisor rode through
    assert row(queued.pk).status == "training"  # nobody took the waiting job for hung

    # Then a plain restart (what an upgrade or a managed database's maintenance does), a few steps later.
    resumed_at = row(queued.pk).current_step
    wait_for(lambda: row(queued.pk).current_step >= resumed_at + 2, 300, "the job to train on after the outage")
    cluster(version, "restart")

    done = wait_for(lambda: (job := row(queued.pk)).is_finished and job, 600, "the job to finish")
    assert done.status == "completed", (done.error_message, log.read_text(errors="replace")[-3000:])
    assert (done.claims, done.resume_count, done.auto_resumes) == (1, 0, 0)  # it never stopped: no resume, manual or automatic
    losses = list(done.loss_points.exclude(loss=None).values_list("step", flat=True))
    assert losses == list(range(1, STEPS + 1))  # one loss per step, none lost, none twice
    assert Path(done.adapter_dir, "adapter_model.safetensors").is_file()
    after_restart = log.read_text(errors="replace")[len(first) :]
    assert "the database is unreachable" in after_restart and "done on try" in after_restart


def test_it_resumes_a_job_once_from_its_checkpoint_when_the_database_stays_away_past_the_bound(start_worker, alice, valid_dataset):
    version = local_cluster()
    queued = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=CONFIG)
    log = start_worker(retry_s=2)
    # Past the first checkpoint (step 4), so that the resumed run has one to start from.
    wait_for(lambda: (job := row(queued.pk)).status == "training" and job.current_step >= 6, 300, "the job to train past step 6")

    cluster(version, "stop")
    time.sleep(OUTAGE_S)  # longer than TUNA_DB_RETRY_S: the step's write gives up, the failure waits for the database
    cluster(version, "start")

    resumed = wait_for(lambda: (job := row(queued.pk)).claims == 2 and job, 120, "the worker to resume the job by itself")
    assert (resumed.auto_resumes, resumed.resume_count) == (1, 1)
    done = wait_for(lambda: (job := row(queued.pk)).is_finished and job, 600, "the resumed job to finish")
    assert done.status == "completed", (done.error_message, log.read_text(errors="replace")[-3000:])
    assert (done.claims, done.resume_count, done.auto_resumes) == (2, 1, 1)
    losses = list(done.loss_points.exclude(loss=None).values_list("step", flat=True))
    assert losses == list(range(1, STEPS + 1))  # the history joined: one loss per step across both runs
    text = log.read_text(errors="replace")
    assert "still unreachable after" in text and "resumed from its last checkpoint by the worker" in text
    assert "resumed by the worker after a database outage, from checkpoint-" in text

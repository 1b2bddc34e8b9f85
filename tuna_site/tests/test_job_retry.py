"""A database that goes away for a while, at the level of one connection (fast, on any database): a job's writes
retry on a fresh connection within TUNA_DB_RETRY_S, past it the job fails and is resumed once, the supervisor's
loop rides through, and pages and the API answer 503 (not 500) meanwhile.

The outage: every query of this thread's connection fails the way a dropped PostgreSQL connection does
(OperationalError) until the outage ends, and a connection that failed once stays broken for good, as a dropped
one does: only a fresh connection works again. tuna_site/tests/test_database_outage.py restarts a real PostgreSQL under a real worker."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from django_q.models import OrmQ

from tests.support import job_row
from training_app import services
from training_app.models import LossPoint, TrainingJob
from tuna_core import jobs
from tuna_core.supervisor import Supervisor
from tuna_core.workers import worker_host


class Outage:
    """The database unreachable for `seconds` (None: until `end()`), for this thread's connection."""

    def __init__(self, seconds: float | None = None, *, drop: bool = True) -> None:
        self.drop = drop  # a connection that failed stays broken (False: a test's own transaction must survive it)
        self.until = None if seconds is None else time.monotonic() + seconds
        self.ended = False
        self.failures = 0
        self.drivers: list = []  # the driver connection each query was tried on
        self.dropped: list = []

    def end(self) -> None:
        self.ended = True

    def begin(self, seconds: float) -> None:
        self.until, self.ended = time.monotonic() + seconds, False

    def down(self) -> bool:
        return not self.ended and (self.until is None or time.monotonic() < self.until)

    def __call__(self, execute, sql, params, many, context):
        driver = context["connection"].connection
        self.drivers.append(driver)
        if self.down() or any(driver is gone for gone in self.dropped):
            self.failures += 1
            if self.drop and not any(driver is gone for gone in self.dropped):
                self.dropped.append(driver)  # the server dropped it: this connection never works again
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    def __enter__(self) -> Outage:
        self._wrapper = connection.execute_wrapper(self)
        self._wrapper.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._wrapper.__exit__(*exc)


def held_here(row) -> TrainingJob:
    TrainingJob.objects.filter(pk=row.pk).update(
        status="training", worker_host=worker_host(), worker_pid=os.getpid(), heartbeat_at=timezone.now()
    )
    return TrainingJob.objects.get(pk=row.pk)


@pytest.mark.django_db(transaction=True)
def test_it_retries_a_running_jobs_write_on_a_fresh_connection_until_the_database_is_back(alice, valid_dataset, settings, caplog):
    settings.TUNA_DB_RETRY_S = 20
    row = held_here(job_row(alice, valid_dataset))
    caplog.set_level(logging.WARNING, logger="tuna.jobs")

    started = time.monotonic()
    with Outage(seconds=1.2) as outage:
        jobs.job_write(TrainingJob, row.pk, current_step=7, total_steps=60)
    took = time.monotonic() - started

    assert 1.2 <= took < 6  # it waited for the database, not for the whole bound
    assert outage.failures >= 3
    assert outage.drivers[-1] is not outage.drivers[0]  # the write landed on a fresh connection, not the dropped one
    written = TrainingJob.objects.get(pk=row.pk)
    assert (written.current_step, written.total_steps, written.status) == (7, 60, "training")
    retries = [r.getMessage() for r in caplog.records if "database is unreachable" in r.getMessage()]
    assert len(retries) == outage.failures and f"Writing TrainingJob #{row.pk}" in retries[0]
    assert any("done on try" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
def test_it_retries_a_step_and_its_loss_point_together_and_keeps_one_point_per_step(alice, valid_dataset, settings):
    """The step's write and its loss point are one transaction: retried whole, never half, never twice."""
    settings.TUNA_DB_RETRY_S = 20
    row = held_here(job_row(alice, valid_dataset))
    tries = []

    def step(n: int) -> None:
        def write() -> None:
            tries.append(n)
            from django.db import transaction

            with transaction.atomic():
                jobs.job_write(TrainingJob, row.pk, current_step=n)
                if not (len(tries) > 1 and LossPoint.objects.filter(job=row, step=n).exists()):
                    LossPoint.objects.create(job=row, step=n, epoch=0.1 * n, loss=1.0 / n)

        jobs.db_retry(write, f"step {n}")

    step(1)
    with Outage(seconds=0.8):
        step(2)
    step(3)
    assert tries.count(2) >= 2
    assert list(LossPoint.objects.filter(job=row).values_list("step", flat=True)) == [1, 2, 3]
    assert TrainingJob.objects.get(pk=row.pk).current_step == 3


@pytest.mark.django_db(transaction=True)
def test_it_gives_up_after_tuna_db_retry_s_with_the_last_error(alice, valid_dataset, settings):
    settings.TUNA_DB_RETRY_S = 1
    row = held_here(job_row(alice, valid_dataset))
    started = time.monotonic()
    with Outage() as outage, pytest.raises(OperationalError):
        jobs.job_write(TrainingJob, row.pk, current_step=9)
    assert 1 <= time.monotonic() - started < 3
    outage.end()
    assert TrainingJob.objects.get(pk=row.pk).current_step == 0  # nothing half-written


@pytest.mark.django_db(transaction=True)
def test_it_fails_a_job_past_the_bound_and_resumes_it_once_by_itself(alice, valid_dataset, settings, data_dir, caplog):
    """The database stays away longer than TUNA_DB_RETRY_S during a step: the job fails naming the setting once the
    database is back to record it, and the worker queues it again on its own (a task to run it, auto_resumes 1). The
    second time it stays failed."""
    settings.TUNA_DB_RETRY_S = 0.5
    settings.TUNA_HEARTBEAT_SECONDS = 0.1
    row = job_row(alice, valid_dataset)
    checkpoint = services.job_dir(row) / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "tuna-checkpoint-complete").write_text("complete\n")

    outage = Outage()
    outage.end()  # not yet

    def work_during_a_long_outage(job) -> None:
        jobs.job_write(TrainingJob, job.pk, current_step=4)
        outage.begin(1.5)  # past the bound (0.5 s) for the step; the failure waits for the database to be recorded
        jobs.job_write(TrainingJob, job.pk, current_step=5)

    tasks_before = OrmQ.objects.count()
    caplog.set_level(logging.WARNING, logger="tuna")
    started = time.monotonic()
    with outage:
        assert jobs.job_run(TrainingJob, row.pk, work_during_a_long_outage)
    assert time.monotonic() - started >= 1.5
    resumed = TrainingJob.objects.get(pk=row.pk)
    assert resumed.status == "queued", resumed.error_message
    assert (resumed.auto_resumes, resumed.resume_count, resumed.current_step) == (1, 1, 4)
    assert resumed.error_message == "" and resumed.completed_at is None
    assert OrmQ.objects.count() == tasks_before + 1  # its task is queued: nobody has to press Resume
    assert any("resumed from its last checkpoint by the worker" in r.getMessage() for r in caplog.records)

    with outage:
        assert jobs.job_run(TrainingJob, row.pk, work_during_a_long_outage)  # the same again: it is not resumed twice
    failed = TrainingJob.objects.get(pk=row.pk)
    assert failed.status == "failed" and failed.auto_resumes == 1 and failed.resume_count == 1
    assert "the database could not be reached for longer than TUNA_DB_RETRY_S (0.5 s)" in failed.error_message
    assert OrmQ.objects.count() == tasks_before + 1
    assert services.training_job_resume(job=failed).status == "queued"  # the owner still can


@pytest.mark.django_db(transaction=True)
def test_it_does_not_resume_a_job_that_failed_for_another_reason(alice, valid_dataset, settings):
    row = job_row(alice, valid_dataset)

    def broken(job) -> None:
        raise ValueError("max_seq_length is too long for this model")

    assert jobs.job_run(TrainingJob, row.pk, broken)
    failed = TrainingJob.objects.get(pk=row.pk)
    assert (failed.status, failed.auto_resumes, failed.error_message) == ("failed", 0, "max_seq_length is too long for this model")


@pytest.mark.django_db(transaction=True)
def test_the_supervisor_rides_through_and_waits_for_heartbeats_before_reaping(alice, valid_dataset, settings):
    settings.TUNA_HEARTBEAT_TIMEOUT_S = 30
    said: list[str] = []
    supervisor = Supervisor(write=said.append)
    long_ago = timezone.now() - timedelta(seconds=120)  # no heartbeat could land while the database was away
    elsewhere = job_row(alice, valid_dataset, status="training", worker_host="other-machine", worker_pid=1, heartbeat_at=long_ago)
    queued = job_row(alice, valid_dataset)  # its task was lost with the outage: none in the queue
    assert not OrmQ.objects.exists()

    with Outage() as outage:
        supervisor.tick()  # no exception: the loop goes on
        supervisor.tick()
        assert outage.failures >= 2
        outage.end()
        supervisor.tick()
    assert any("database is unreachable" in line for line in said)
    assert any("database is back" in line for line in said)
    assert OrmQ.objects.count() == 1  # the queued job has a task again
    assert TrainingJob.objects.get(pk=elsewhere.pk).status == "training"  # heartbeats get their time to land first
    assert TrainingJob.objects.get(pk=queued.pk).status == "queued"

    supervisor.database_back_at = time.monotonic() - settings.TUNA_HEARTBEAT_TIMEOUT_S - 1
    supervisor.tick()
    reaped = TrainingJob.objects.get(pk=elsewhere.pk)
    assert reaped.status == "failed" and reaped.error_message == TrainingJob.WORKER_STOPPED


@pytest.mark.django_db
def test_pages_and_the_api_answer_503_with_retry_after_while_the_database_is_away(alice, client, settings, caplog):
    from rest_framework.test import APIClient

    from tests.support import api_key

    client.force_login(alice)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(alice)}")
    caplog.set_level(logging.WARNING)

    with Outage(drop=False):
        page = client.get("/")
        listing = api.get("/api/datasets")
        models = api.get("/v1/models")
        # A form post: the page-rate middleware reads the user before any view, and Django's handler makes that a 500
        # first (the test client would raise it again); the outage middleware still answers 503.
        client.raise_request_exception = False
        posted = client.post("/datasets/sample", {"name": "x"})
        client.raise_request_exception = True

    assert page.status_code == 503 and page["Retry-After"] == "10"
    text = page.content.decode()
    assert "The database is unreachable for a moment" in text and "TUNA_DB_RETRY_S" in text
    # Writes made in autocommit before the failure may stay: no answer claims that nothing was changed.
    assert "may not have been saved" in text and "check" in text and "nothing was changed" not in text.lower()
    assert listing.status_code == 503 and listing["Retry-After"] == "10"
    assert listing.json()["detail"].startswith("The database is unreachable") and listing.json()["errors"] == {}
    for detail in (listing.json()["detail"], models.json()["error"]["message"]):
        assert "may not have been saved" in detail and "check before trying again" in detail and "nothing was changed" not in detail
    assert models.status_code == 503
    assert models.json()["error"]["code"] == "database_unavailable" and models.json()["error"]["type"] == "overloaded_error"
    assert posted.status_code == 503 and posted["Retry-After"] == "10"
    tracebacks = [r for r in caplog.records if r.name == "django.request" and (r.exc_info or "Internal Server Error" in r.getMessage())]
    assert [r.getMessage() for r in tracebacks] == ["Internal Server Error: /datasets/sample"]  # the view's errors log none

    assert client.get("/").status_code == 200  # back: the same session works
    assert api.get("/api/datasets").status_code == 200

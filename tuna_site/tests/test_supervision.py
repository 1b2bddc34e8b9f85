"""The worker's supervision with real processes: `manage.py tuna_worker` (supervisor, django-q2 cluster,
a training run on the embedded model) against the test database (a SQLite file, or PostgreSQL). Each
test kills part of it the way an operator or the kernel would, then checks the process tree and the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection

from datasets_app.services import dataset_create
from tests.support import children, group_members, jsonl_file, pc_rows, subprocess_env, wait_for
from training_app import services
from training_app.models import TrainingJob
from tuna_core.workers import process_exists

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[2]
# Long enough never to finish during a test; a checkpoint every 2 updates.
ENDLESS = {"max_steps": 2000, "batch_size": 1, "max_seq_length": 64, "save_steps": 2, "eval_examples": 0}
HEARTBEAT_TIMEOUT = 5


def job(pk: int) -> TrainingJob:
    return TrainingJob.objects.get(pk=pk)


class Worker:
    """`manage.py tuna_worker` in a subprocess, as `make run` and compose start it."""

    def __init__(self, env: dict, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "tuna_worker"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cluster_group(self) -> int:
        """The cluster's process group: the supervisor's one child leads it."""
        return wait_for(lambda: next(iter(children(self.pid)), None), 30, "the supervisor to start its cluster")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for pid in children(self.pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()


def worker_env(data_dir) -> dict[str, str]:
    """A supervised worker of its own machine name, with a fast heartbeat and watchdog."""
    return subprocess_env(
        data_dir,
        TUNA_WORKER_NAME=f"test-worker-{uuid.uuid4().hex[:8]}",
        TUNA_HEARTBEAT_SECONDS="0.5",
        TUNA_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT),
        TUNA_WATCHDOG_SECONDS="0.5",
        PYTHONUNBUFFERED="1",
    )


@pytest.fixture
def start_worker(data_dir, tmp_path):
    env = worker_env(data_dir)
    workers: list[Worker] = []

    def start(name: str | None = None) -> Worker:
        worker = Worker({**env, "TUNA_WORKER_NAME": name} if name else env, tmp_path / "worker.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
    if workers:
        print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def training(pk: int, past_step: int = 2, claims: int = 1) -> TrainingJob:
    return wait_for(
        lambda: (row := job(pk)).status == "training" and row.claims == claims and row.current_step > past_step and row,
        180,
        f"job #{pk} to train past step {past_step} (run {claims})",
    )


def test_it_takes_the_cluster_down_with_a_killed_supervisor_and_a_restart_fails_the_job(start_worker, alice, valid_dataset):
    queued = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=ENDLESS)
    worker = start_worker()
    group = worker.cluster_group()
    running = training(queued.pk)
    members = group_members(group)
    assert running.worker_pid in members and len(members) >= 4  # qcluster, sentinel, pusher, monitor, the job's process

    os.kill(worker.pid, signal.SIGKILL)  # the supervisor dies without a chance to clean up
    worker.proc.wait(timeout=10)
    wait_for(lambda: not any(process_exists(pid) for pid in members), 5, "every cluster process to die with the supervisor")
    frozen = job(queued.pk)
    time.sleep(1.5)
    assert job(queued.pk).current_step == frozen.current_step  # nobody trains it any more
    assert frozen.status == "training"  # and nobody has said so yet: that is the next worker's job

    restarted = start_worker()
    failed = wait_for(lambda: (row := job(queued.pk)).status == "failed" and row, 30, "the restarted worker to fail the job")
    assert failed.error_message == TrainingJob.WORKER_STOPPED
    checkpoint = services.resumable_checkpoint(failed)
    assert checkpoint is not None

    services.training_job_resume(job=failed)
    resumed = training(queued.pk, past_step=int(checkpoint.name.split("-")[-1]), claims=2)
    members = group_members(restarted.cluster_group())
    assert resumed.worker_pid in members

    started = time.monotonic()
    restarted.proc.send_signal(signal.SIGTERM)  # Ctrl-C / `docker stop`
    assert restarted.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 5
    assert not any(process_exists(pid) for pid in members)
    stopped = job(queued.pk)
    assert stopped.status == "failed" and stopped.error_message == TrainingJob.WORKER_STOPPED
    assert services.resumable_checkpoint(stopped) is not None


def test_it_fails_a_job_whose_process_died_or_hung_while_the_worker_stays_up(start_worker, alice, valid_dataset):
    queued = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=ENDLESS)
    worker = start_worker()
    first = training(queued.pk)

    killed_at = time.monotonic()
    os.kill(first.worker_pid, signal.SIGKILL)  # what the out-of-memory killer or a native crash does
    failed = wait_for(lambda: (row := job(queued.pk)).status == "failed" and row, 10, "the watchdog to fail the job")
    assert time.monotonic() - killed_at < 5
    assert failed.error_message == TrainingJob.WORKER_STOPPED
    assert worker.proc.poll() is None  # the worker is still up and takes the next job

    services.training_job_resume(job=failed)
    second = training(queued.pk, past_step=failed.current_step - 2, claims=2)
    assert second.worker_pid != first.worker_pid

    hung_at = time.monotonic()
    os.kill(second.worker_pid, signal.SIGSTOP)  # alive but silent: no heartbeat, no progress
    failed = wait_for(lambda: (row := job(queued.pk)).status == "failed" and row, HEARTBEAT_TIMEOUT + 15, "the watchdog to fail a hung job")
    assert HEARTBEAT_TIMEOUT - 1 < time.monotonic() - hung_at < HEARTBEAT_TIMEOUT + 10
    wait_for(lambda: not process_exists(second.worker_pid), 30, "the hung process to be killed")
    assert worker.proc.poll() is None


@pytest.mark.postgres  # two workers claim from one queue: the database's locks decide
def test_it_runs_each_job_exactly_once_with_two_workers_on_one_database(start_worker, alice, bob, valid_dataset):
    if connection.vendor != "postgresql":
        pytest.skip("two worker machines share a PostgreSQL database; a SQLite file belongs to one machine")
    short = {"max_steps": 3, "batch_size": 1, "max_seq_length": 64, "save_steps": 2, "eval_examples": 0}
    bobs = dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's")
    queued = [
        services.training_job_start(owner=owner, dataset=dataset, config_data=short)
        for owner, dataset in [(alice, valid_dataset), (alice, valid_dataset), (bob, bobs), (bob, bobs)]
    ]
    start_worker("machine-a")
    start_worker("machine-b")
    pks = [row.pk for row in queued]
    wait_for(lambda: all(row.is_finished for row in TrainingJob.objects.filter(pk__in=pks)), 400, "both workers to drain the queue")
    done = TrainingJob.objects.filter(pk__in=pks)
    assert [row.status for row in done] == ["completed"] * 4, [row.error_message for row in done]
    assert [row.claims for row in done] == [1, 1, 1, 1]  # each job was taken exactly once
    for row in done:
        assert list(row.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3]  # one history, no duplicates
        assert Path(row.adapter_dir, "adapter_model.safetensors").is_file()
    assert {row.worker_host for row in done} == {"machine-a", "machine-b"}  # both took part

"""The job lifecycle in one process: fair picking, guarded writes, heartbeats in every phase, stuck jobs,
and checkpoints cut short. (tests/test_supervision.py kills real worker processes.)"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from evaluation_app.models import Evaluation
from tests.support import job_row
from training_app import services
from training_app.models import TrainingJob
from training_app.tests.test_training import AtStep, SimulatedCrash, start, train
from tuna_core import jobs
from tuna_core.workers import worker_host


def claimed_here(row) -> None:
    type(row).objects.filter(pk=row.pk).update(
        status=row.Status.RUNNING, worker_host=worker_host(), worker_pid=os.getpid(), heartbeat_at=timezone.now()
    )


@pytest.mark.django_db
def test_it_picks_the_next_job_fairly_across_users(alice, bob, valid_dataset):
    now = timezone.now()
    alice_jobs = [job_row(alice, valid_dataset, created_at=now) for _ in range(3)]
    bob_job = job_row(bob, valid_dataset)  # queued after all of alice's
    bob_eval = Evaluation.objects.create(owner=bob, training_job=job_row(bob, valid_dataset, status="completed"))
    # Nobody has been served yet: the oldest row first.
    assert jobs.job_pick_order()[0] == (TrainingJob, alice_jobs[0].pk)

    assert jobs.job_claim(TrainingJob, alice_jobs[0].pk)
    # Alice has a job running: bob's rows (of both kinds) come before her other two.
    order = jobs.job_pick_order()
    assert order[:2] == [(TrainingJob, bob_job.pk), (Evaluation, bob_eval.pk)]
    assert order[2:] == [(TrainingJob, alice_jobs[1].pk), (TrainingJob, alice_jobs[2].pk)]
    assert jobs.queue_position(bob_job) == 1 and jobs.queue_position(alice_jobs[2]) == 4

    # Alice's run ended; bob was served more recently than alice: her next job goes first.
    TrainingJob.objects.filter(pk=alice_jobs[0].pk).update(status="completed")
    assert jobs.job_claim(TrainingJob, bob_job.pk)
    TrainingJob.objects.filter(pk=bob_job.pk).update(status="completed")
    assert jobs.job_pick_order()[0] == (TrainingJob, alice_jobs[1].pk)


@pytest.mark.django_db
def test_it_claims_a_row_once_and_records_the_process(alice, valid_dataset):
    row = job_row(alice, valid_dataset)
    assert jobs.job_claim(TrainingJob, row.pk)
    assert not jobs.job_claim(TrainingJob, row.pk)  # a redelivered task does nothing
    row.refresh_from_db()
    assert (row.status, row.worker_pid, row.claims, row.worker_host) == ("training", os.getpid(), 1, worker_host())
    assert row.claimed_at and row.started_at


def test_it_gives_every_kind_the_same_statuses_and_progress():
    from evaluation_app.models import JudgeRun
    from training_app.models import Export

    assert TrainingJob.Status.RUNNING == "training"  # training's running state keeps its stored name
    assert [s.value for s in Evaluation.Status] == [s.value for s in Export.Status] == [s.value for s in JudgeRun.Status]
    assert [s.name for s in TrainingJob.Status] == [s.name for s in Evaluation.Status]
    assert TrainingJob(status="cancelled").is_finished and not TrainingJob(status="training").is_finished
    assert Evaluation(status="failed").is_finished and not JudgeRun(status="running").is_finished
    assert TrainingJob(status="training", current_step=3, total_steps=4).progress_percent == 75.0
    assert Evaluation(status="running", done=1, test_size=4).progress_percent == 25.0
    assert JudgeRun(status="queued").progress_percent == 0.0 and Export(status="running", progress=0.5).progress_percent == 50.0
    assert Export(status="completed", progress=0.9).progress_percent == 100.0


@pytest.mark.django_db
@pytest.mark.parametrize("ending", ["completed", "failed"])
def test_it_records_the_run_time_however_the_work_ends(alice, valid_dataset, ending):
    evaluation = Evaluation.objects.create(owner=alice, training_job=job_row(alice, valid_dataset, status="completed"))

    def work(row):
        time.sleep(0.05)
        if ending == "failed":
            raise ValueError("The examples ran out.")
        jobs.job_complete(row, metrics={"done": True})

    assert jobs.job_run(Evaluation, evaluation.pk, work)
    evaluation.refresh_from_db()
    assert evaluation.status == ending and evaluation.run_seconds >= 0.05 and evaluation.completed_at
    assert evaluation.metrics == ({"done": True} if ending == "completed" else {})
    assert evaluation.error_message == ("" if ending == "completed" else "The examples ran out.")


@pytest.mark.django_db
def test_it_gives_queued_rows_whose_task_is_gone_a_task_at_start_up(alice, valid_dataset):
    from django_q.models import OrmQ
    from django_q.tasks import async_task

    job_row(alice, valid_dataset)
    job_row(alice, valid_dataset)
    async_task("training_app.tasks.training_job_execute", 1)  # queued by an older version: that name is gone
    async_task(jobs.RUN_NEXT_TASK)  # one row still has its task
    assert jobs.jobs_requeue() == 1
    assert sorted(task.func() for task in OrmQ.objects.all()) == ["training_app.tasks.training_job_execute"] + [jobs.RUN_NEXT_TASK] * 2
    assert jobs.jobs_requeue() == 0  # every queued row has a task now


@pytest.mark.django_db
@pytest.mark.model
def test_it_never_flips_a_job_back_once_another_process_holds_it(alice, valid_dataset):
    """A worker that lost its job (reaped as dead, then resumed elsewhere) writes nothing more."""
    job = start(alice, valid_dataset, max_steps=6)

    def taken_elsewhere():
        # The watchdog failed it and a resume handed it to another process.
        TrainingJob.objects.filter(pk=job.pk).update(status="training", worker_pid=os.getpid() + 100000, error_message="")

    train(job, AtStep(3, taken_elsewhere))
    job.refresh_from_db()
    assert job.status == "training" and job.worker_pid == os.getpid() + 100000  # still the other process's
    assert job.adapter_dir == "" and job.completed_at is None
    # Its progress write for step 3 was refused: it stopped there, writing no more history.
    assert job.current_step == 2 and not job.loss_points.filter(step__gt=2).exists()


@pytest.mark.django_db
@pytest.mark.model
def test_it_does_not_record_a_failure_over_a_job_it_lost(alice, valid_dataset):
    job = start(alice, valid_dataset, max_steps=6)

    def reaped_then_crash():
        TrainingJob.objects.filter(pk=job.pk).update(status="failed", error_message=TrainingJob.WORKER_STOPPED)
        raise RuntimeError("late crash")

    train(job, AtStep(2, reaped_then_crash))
    job.refresh_from_db()
    assert job.status == "failed" and job.error_message == TrainingJob.WORKER_STOPPED  # the watchdog's word stands


@pytest.mark.django_db(transaction=True)
def test_it_beats_from_its_own_thread_while_the_work_is_silent(alice, valid_dataset, settings):
    """A long phase that writes nothing (loading a large model) still heartbeats."""
    settings.TUNA_HEARTBEAT_SECONDS = 0.1
    row = job_row(alice, valid_dataset)
    seen = []

    def silent_work(job):
        start = TrainingJob.objects.get(pk=job.pk).heartbeat_at
        time.sleep(0.8)
        seen.append(TrainingJob.objects.get(pk=job.pk).heartbeat_at - start)

    assert jobs.job_run(TrainingJob, row.pk, silent_work)
    assert seen[0] >= timedelta(seconds=0.4)


@pytest.mark.django_db
def test_it_fails_this_machines_dead_processes_and_other_machines_silent_jobs(alice, valid_dataset, settings):
    settings.TUNA_WORKER_NAME = "gpu-a"
    settings.TUNA_HEARTBEAT_TIMEOUT_S = 60
    now = timezone.now()

    def running(host, pid, seconds_ago):
        return job_row(
            alice, valid_dataset, status="training", worker_host=host, worker_pid=pid, heartbeat_at=now - timedelta(seconds=seconds_ago)
        )

    running("gpu-a", 111, 1), running("gpu-a", 222, 1)
    running("gpu-b", 333, 20), running("gpu-c", 444, 120)
    assert jobs.jobs_reap(process_alive=lambda pid: pid == 111)["training jobs"] == 2
    status = dict(TrainingJob.objects.values_list("worker_pid", "status"))
    assert status == {111: "training", 222: "failed", 333: "training", 444: "failed"}
    assert TrainingJob.objects.get(worker_pid=222).error_message == TrainingJob.WORKER_STOPPED


@pytest.mark.django_db
def test_it_cancels_and_resumes_a_job_whose_worker_went_silent(alice, valid_dataset, settings, data_dir):
    """Another machine's worker vanished: cancel takes effect at once and resume is allowed."""
    settings.TUNA_HEARTBEAT_TIMEOUT_S = 60
    silent = timezone.now() - timedelta(minutes=5)
    stuck = job_row(alice, valid_dataset, status="training", worker_host="gone-machine", worker_pid=1, heartbeat_at=silent)
    cancelled = services.training_job_cancel(job=stuck)
    assert cancelled.status == "cancelled" and cancelled.completed_at is not None

    stuck = job_row(alice, valid_dataset, status="training", worker_host="gone-machine", worker_pid=1, heartbeat_at=silent)
    (services.job_dir(stuck) / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (services.job_dir(stuck) / "checkpoints" / "checkpoint-2" / "tuna-checkpoint-complete").write_text("complete\n")
    assert services.training_job_resume(job=stuck).status == "queued"

    live = job_row(alice, valid_dataset, status="training", worker_host="gpu-b", worker_pid=1, heartbeat_at=timezone.now())
    assert services.training_job_cancel(job=live).status == "training"  # a live worker stops it at its next step
    with pytest.raises(services.JobConflict):
        services.training_job_resume(job=live)


@pytest.mark.django_db
@pytest.mark.model
def test_it_resumes_from_the_last_complete_checkpoint_when_the_newest_was_cut_short(alice, valid_dataset):
    job = start(alice, valid_dataset, max_steps=6)

    def crash():
        raise SimulatedCrash()

    with pytest.raises(SimulatedCrash):
        train(job, AtStep(5, crash))
    checkpoints = Path(services.job_dir(job)) / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    # The kill came while checkpoint-4 was being written: half its files, no completion marker.
    cut = checkpoints / "checkpoint-4"
    (cut / "tuna-checkpoint-complete").unlink()
    (cut / "optimizer.pt").write_bytes(b"\x00" * 10)
    (cut / "trainer_state.json").unlink()

    jobs.jobs_reap()
    job.refresh_from_db()
    assert services.resumable_checkpoint(job).name == "checkpoint-2"
    services.training_job_resume(job=job)
    train(job)
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert job.current_step == 6 and list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3, 4, 5, 6]
    assert (checkpoints / "checkpoint-4" / "tuna-checkpoint-complete").is_file()  # written again, whole

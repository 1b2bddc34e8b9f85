"""A training job on two CPU processes (torchrun, DDP on gloo) with real processes: `manage.py tuna_worker` (supervisor,
cluster, the worker process holding the job), torchrun under it and two ranks of `manage.py tuna_train_rank` training
the embedded model. Each test checks the job's rows and the process tree, as the supervision tests do."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.services import dataset_create
from evaluation_app.models import Evaluation, EvaluationExample
from evaluation_app.services import evaluation_start
from tests.support import process_tree, wait_for
from training_app import services
from training_app.distributed import rank_failure
from training_app.models import LossPoint, TrainingJob
from tuna_core.workers import process_exists
from tuna_llm import distributed
from tuna_site.tests.test_supervision import Worker, worker_env

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "orders_to_json.jsonl"
# The sample's first rows, learned in a few steps; 8 held out for the exact match.
SHORT = {"max_steps": 8, "learning_rate_multiplier": 2.0, "max_seq_length": 160, "eval_examples": 0, "save_steps": 1000}
ENDLESS = {"max_steps": 2000, "batch_size": 1, "max_seq_length": 64, "save_steps": 2, "eval_examples": 0}


def row(pk: int) -> TrainingJob:
    return TrainingJob.objects.get(pk=pk)


def ranks_of(worker_pid: int) -> dict[int, int]:
    """rank -> pid of the ranks under a worker process (torchrun's children, each with RANK in its environment)."""
    found = {}
    for pid in process_tree(worker_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"tuna_train_rank" in cmdline:
            rank = next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = pid
    return found


@pytest.fixture
def sample_dataset(alice):
    return dataset_create(owner=alice, upload=SimpleUploadedFile("orders.jsonl", SAMPLE.read_bytes()), name="Orders")


@pytest.fixture
def start_worker(data_dir, tmp_path):
    workers: list[Worker] = []

    def start() -> Worker:
        env = {**worker_env(data_dir), "TUNA_WORKER_NAME": f"test-dist-{uuid.uuid4().hex[:8]}"}
        worker = Worker(env, tmp_path / "worker.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        tree = process_tree(worker.pid)
        worker.stop()
        for pid in tree:  # the ranks die with their launcher (PR_SET_PDEATHSIG), never left behind
            wait_for(lambda pid=pid: not process_exists(pid), 15, f"process {pid} of the stopped worker to end")
    if workers:
        print((tmp_path / "worker.log").read_text(errors="replace")[-4000:])


@pytest.mark.django_db(transaction=True)
@pytest.mark.model
@pytest.mark.process
def test_it_trains_the_sample_on_two_processes_as_well_as_on_one(settings, start_worker, alice, sample_dataset):
    settings.TUNA_TRAIN_PROCESSES = "1"
    one = services.training_job_start(owner=alice, dataset=sample_dataset, config_data={**SHORT, "batch_size": 4})
    settings.TUNA_TRAIN_PROCESSES = "2"
    two = services.training_job_start(owner=alice, dataset=sample_dataset, config_data={**SHORT, "batch_size": 2})
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    worker = start_worker()

    seen: set[int] = set()

    def finished(pk: int) -> TrainingJob | None:
        job = row(pk)
        if job.status == "training" and job.worker_pid:
            seen.update(ranks_of(job.worker_pid))
        return job if job.status in ("completed", "failed", "cancelled") else None

    started = time.monotonic()
    first = wait_for(lambda: finished(one.pk), 600, "the 1-process job to end")
    one_seconds = time.monotonic() - started
    second = wait_for(lambda: finished(two.pk), 600, "the 2-process job to end")
    two_seconds = time.monotonic() - started - one_seconds
    print(f"1 process x batch 4: {one_seconds:.0f} s; 2 processes x batch 2: {two_seconds:.0f} s")
    assert first.status == "completed", first.error_message
    assert second.status == "completed", second.error_message
    assert seen == {0, 1}  # two ranks trained it
    assert second.current_step == second.total_steps == first.total_steps == 8
    steps = list(LossPoint.objects.filter(job=second).values_list("step", flat=True))
    assert steps == sorted(set(steps)) and steps[-1] == 8 and len(steps) == len(LossPoint.objects.filter(job=first))  # one history
    assert (Path(second.adapter_dir) / "adapter_model.safetensors").is_file()
    assert second.tokens_seen > 0

    # One evaluation answers the held-out prompts with both fine-tunes: the 2-process one against the 1-process one.
    evaluation, _ = evaluation_start(owner=alice, job=second, test_size=8, baseline=first)
    done = wait_for(lambda: (e := Evaluation.objects.get(pk=evaluation.pk)).status in ("completed", "failed") and e, 600, "the evaluation")
    assert done.status == "completed", done.error_message
    rows = list(EvaluationExample.objects.filter(evaluation=done))
    assert len(rows) == 8
    matches = {1: sum(r.base_scores["exact_match"] for r in rows), 2: sum(r.finetuned_scores["exact_match"] for r in rows)}
    print(f"held-out exact match of 8: 1 process {matches[1]:g}, 2 processes {matches[2]:g}")
    assert abs(matches[1] - matches[2]) <= 1
    assert worker.proc.poll() is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.model
@pytest.mark.process
def test_it_stops_both_ranks_at_once_on_cancel_and_fails_resumably_when_a_rank_is_killed(settings, start_worker, alice, valid_dataset):
    settings.TUNA_TRAIN_PROCESSES = "2"
    cancelled = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=ENDLESS)
    worker = start_worker()
    job = wait_for(lambda: (j := row(cancelled.pk)).status == "training" and j.current_step >= 2 and j, 240, "2 steps on 2 processes")
    ranks = wait_for(lambda: len(r := ranks_of(job.worker_pid)) == 2 and r, 30, "two ranks")
    tree = process_tree(job.worker_pid) - {job.worker_pid}
    assert set(ranks.values()) <= tree and len(tree) >= 3  # torchrun and its two ranks under the worker process

    services.training_job_cancel(job=row(cancelled.pk))
    asked_at = row(cancelled.pk).current_step
    ended = wait_for(lambda: (j := row(cancelled.pk)).status == "cancelled" and j, 60, "the cancel")
    print(f"cancel asked at step {asked_at}, stopped at step {ended.current_step}")
    assert ended.current_step - asked_at <= 2
    wait_for(lambda: not any(process_exists(pid) for pid in tree), 20, "torchrun and both ranks to end")
    assert process_exists(job.worker_pid)  # the worker process goes on to the next job

    killed = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=ENDLESS)
    job = wait_for(lambda: (j := row(killed.pk)).status == "training" and j.current_step > 2 and j, 240, "a checkpoint on 2 processes")
    ranks = wait_for(lambda: len(r := ranks_of(job.worker_pid)) == 2 and r, 30, "two ranks")
    tree = process_tree(job.worker_pid) - {job.worker_pid}
    started = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    failed = wait_for(lambda: (j := row(killed.pk)).status == "failed" and j, 60, "the job to fail")
    wait_for(lambda: not any(process_exists(pid) for pid in tree), 20, "torchrun and the other rank to end")
    print(f"kill -9 of rank 1: job failed and every rank gone {time.monotonic() - started:.1f} s later")
    assert "rank 1" in failed.error_message and "SIGKILL" in failed.error_message, failed.error_message
    assert "Resume" in failed.error_message
    checkpoint = services.resumable_checkpoint(failed)
    assert checkpoint is not None
    # Each rank's own RNG state is in the checkpoint rank 0 marked whole (it waits for all ranks before marking it).
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert process_exists(job.worker_pid) and worker.proc.poll() is None

    services.training_job_resume(job=failed)  # both ranks go on from rank 0's checkpoint
    # The row keeps the failed run's step until the resumed run logs one past it (its claim alone starts no rank yet).
    stopped_at = failed.current_step
    wait_for(lambda: (j := row(killed.pk)).claims == 2 and j.current_step > stopped_at, 240, "the resumed run to pass the failed one")
    wait_for(lambda: len(ranks_of(row(killed.pk).worker_pid)) == 2, 30, "the resumed run's two ranks")
    steps = list(LossPoint.objects.filter(job=killed.pk).values_list("step", flat=True))
    assert steps == sorted(set(steps))  # one loss per step across the failure and the resume
    services.training_job_cancel(job=row(killed.pk))
    wait_for(lambda: row(killed.pk).status == "cancelled", 60, "the resumed run to stop")


def test_it_names_the_rank_that_took_the_run_down():
    killed = distributed.RankFailure(1, -9, "SIGKILL", "Signal 9 (SIGKILL) received by PID 12")
    lost = distributed.RankFailure(0, 1, None, distributed.PEER_LOST + "Training stopped with an error (DistBackendError).")
    stopped = distributed.RankFailure(0, -15, "SIGTERM", "")
    assert distributed.root_failure([lost, killed, stopped]) == killed
    message = str(rank_failure([lost, killed], 1, processes=2))
    assert message.startswith("Training on 2 processes stopped: rank 1 (process 2 of 2) was killed by SIGKILL")
    own = distributed.RankFailure(1, 1, None, "The machine ran out of memory. Lower batch_size.")
    assert distributed.root_failure([lost, own]) == own
    assert "rank 1 failed: The machine ran out of memory" in str(rank_failure([lost, own], 1, processes=2))


@pytest.mark.django_db
def test_it_lets_the_ranks_write_for_the_worker_process_that_holds_the_job(monkeypatch, alice, valid_dataset):
    from tests.support import job_row
    from tuna_core.jobs import job_held, job_write
    from tuna_core.workers import HOLDER_ENV, worker_host

    running = job_row(alice, valid_dataset, status="training", worker_host=worker_host(), worker_pid=os.getpid() + 100000)
    assert not job_held(TrainingJob, running.pk).exists()  # another process's row
    monkeypatch.setenv(HOLDER_ENV, str(os.getpid() + 100000))  # a rank started by that worker process
    job_write(TrainingJob, running.pk, current_step=3)
    assert row(running.pk).current_step == 3


def test_it_builds_torchrun_s_command_for_one_machine_and_for_several(tmp_path):
    one = distributed.torchrun_arguments(processes=2, entry=["manage.py", "tuna_train_rank", "7"], log_dir=tmp_path)
    assert one == [
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--log-dir",
        str(tmp_path),
        "--nnodes",
        "1",
        "--node-rank",
        "0",
        "--rdzv-backend",
        "static",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "0",
        "--rdzv-id",
        "tuna-local",
        "manage.py",
        "tuna_train_rank",
        "7",
    ]
    node = distributed.torchrun_arguments(
        processes=1, entry=["x"], log_dir=tmp_path, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29400", rdzv_id="tuna-job-7-1"
    )
    assert node[node.index("--node-rank") + 1] == "1" and node[node.index("--rdzv-backend") + 1] == "static"
    assert node[node.index("--master-addr") + 1] == "10.0.0.5" and node[node.index("--master-port") + 1] == "29400"
    with pytest.raises(ValueError, match="TUNA_TRAIN_RDZV_ENDPOINT as host:port"):
        distributed.torchrun_arguments(processes=1, entry=["x"], log_dir=tmp_path, nnodes=2, rdzv_endpoint="")
    assert (
        distributed.threads_per_process(2, cores=2),
        distributed.threads_per_process(2, cores=16),
        distributed.threads_per_process(4, cores=2),
    ) == (1, 8, 1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.model
@pytest.mark.process
def test_it_trains_a_job_on_two_machines_when_a_second_node_joins(settings, data_dir, tmp_path, alice, valid_dataset):
    """Two "machines" of one process each on 127.0.0.1: the worker is node 0, `tuna_train_node` joins as node 1."""
    import subprocess
    import sys

    from tests.support import free_port

    nodes = {"TUNA_TRAIN_PROCESSES": "1", "TUNA_TRAIN_NNODES": "2", "TUNA_TRAIN_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    settings.TUNA_TRAIN_PROCESSES, settings.TUNA_TRAIN_NNODES = "1", 2
    queued = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={**ENDLESS, "max_steps": 3})
    assert queued.config["processes"] == 2
    worker = Worker({**worker_env(data_dir), **nodes}, tmp_path / "worker.log")
    try:
        wait_for(lambda: row(queued.pk).status == "training", 60, "the worker to claim the job")
        with open(tmp_path / "node.log", "wb") as log:
            node = subprocess.run(
                [sys.executable, str(ROOT / "manage.py"), "tuna_train_node", "--job", str(queued.pk), "--node-rank", "1"],
                cwd=ROOT,
                env={**worker_env(data_dir), **nodes},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=300,
            )
        done = wait_for(lambda: (j := row(queued.pk)).status != "training" and j, 60, "the job to end")
        assert node.returncode == 0, (tmp_path / "node.log").read_text()[-2000:]
        assert done.status == "completed", done.error_message
        assert list(LossPoint.objects.filter(job=done).values_list("step", flat=True)) == [1, 2, 3]
    finally:
        tree = process_tree(worker.pid)
        worker.stop()
        wait_for(lambda: not any(process_exists(pid) for pid in tree), 15, "the worker's processes to end")
        print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def test_it_removes_the_launcher_folders_of_worker_processes_that_are_gone(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    from training_app.distributed import WORK_PREFIX, remove_left_behind

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"{WORK_PREFIX}{gone.pid}-7-abc"
    (left / "logs").mkdir(parents=True)
    mine = tmp_path / f"{WORK_PREFIX}{os.getpid()}-8-def"
    mine.mkdir()
    remove_left_behind()
    assert not left.exists() and mine.exists()


def test_it_binds_one_machine_s_rendezvous_store_on_loopback_only(monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    one = distributed.torchrun_arguments(processes=2, entry=["x"], log_dir=tmp_path)
    argv, held = distributed.loopback_store(one)
    port = int(argv[argv.index("--master-port") + 1])
    assert port > 0 and argv[: argv.index("--master-port")] == one[: one.index("--master-port")]
    listener, store = held
    assert listener.getsockname() == ("127.0.0.1", port)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the store answers on loopback
    assert (os.environ["GLOO_SOCKET_IFNAME"], os.environ["NCCL_SOCKET_IFNAME"]) == ("lo", "lo")
    del store
    listener.close()
    several = distributed.torchrun_arguments(
        processes=1, entry=["x"], log_dir=tmp_path, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29400", rdzv_id="j"
    )
    assert distributed.loopback_store(several) == (several, None)  # several machines: as the settings say


def test_it_refuses_more_processes_per_machine_than_the_gpus_cuda_shows(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    problem = distributed.gpu_shortage(4, 2)
    assert "4 processes per machine" in problem and "sees 2 GPUs (CUDA_VISIBLE_DEVICES=0,1)" in problem
    assert "TUNA_TRAIN_PROCESSES" in problem
    assert distributed.gpu_shortage(2, 2) is None and distributed.gpu_shortage(8, 0) is None  # no GPU: the CPU's cores


@pytest.mark.django_db
def test_it_counts_a_run_on_several_gpus_once_per_gpu_in_cost_and_once_in_speed(settings, alice, valid_dataset):
    from tests.support import job_row
    from training_app.estimates import per_device_speed

    settings.TUNA_GPU_HOURLY_USD = 2.0
    one = job_row(alice, valid_dataset, status="completed", device="cuda", train_seconds=3600)
    two = job_row(alice, valid_dataset, status="completed", device="cuda", train_seconds=3600, config={"processes": 2})
    on_cpu = job_row(alice, valid_dataset, status="completed", device="cpu", train_seconds=3600, config={"processes": 2})
    assert row(two.pk).cost_usd == 2 * row(one.pk).cost_usd > 0
    assert row(on_cpu.pk).cost_usd == row(one.pk).cost_usd  # a CPU's processes share one machine
    assert per_device_speed(1000.0, "cuda", 2) == 500.0 and per_device_speed(1000.0, "cpu", 2) == 1000.0

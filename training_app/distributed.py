"""A training job on several processes (config.processes > 1, or TUNA_TRAIN_NNODES > 1): the worker side.

The worker process that claimed the job starts torchrun (tuna_llm.distributed: one rank per process, DDP on gloo on
CPU, NCCL on CUDA), waits for it and keeps holding the row: its heartbeat goes on, the supervisor's watchdog and
process-group kill reach torchrun, and every rank dies with its parent (PR_SET_PDEATHSIG). The ranks act for it
(TUNA_JOB_HOLDER_PID): rank 0 runs the job exactly as one process does (training_app.services._training_run: progress,
loss points, checkpoints, the final status); the other ranks read the job and write nothing to the database (into each
checkpoint the Trainer writes their rng_state_<rank>.pth: rank 0 marks it whole after a barrier). A rank that fails makes
torchrun stop the others; the worker then fails the job, resumable from its last checkpoint, naming the rank.

Why torchrun and not ``accelerate launch``: the Trainer already runs on accelerate, which reads the environment that
torchrun sets; ``accelerate launch`` would run this same torchrun (its multi-GPU path calls torch.distributed.run).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import OperationalError

from training_app.models import TrainingJob
from tuna_core.jobs import JobLost, database_unreachable, db_retry, job_held, readable_error
from tuna_core.workers import HOLDER_ENV, process_exists, worker_host
from tuna_llm import distributed
from tuna_llm.training_config import TrainingConfig

logger = logging.getLogger("tuna.training")

RANK_COMMAND = "tuna_train_rank"
# The launcher's folder (torchrun's log folder with the ranks' error files, its report): <tmp>/tuna-train-<pid>-<job>-*
WORK_PREFIX = "tuna-train-"
# How long the launcher gets to stop its ranks after SIGTERM before it is killed (the worker's own stop).
LAUNCHER_STOP_S = 10


class RankFailed(ValueError):
    """A rank of a job trained on several processes failed; its text is the reason shown to the user (a ValueError's
    text is shown as it is: tuna_core.jobs.readable_error)."""


class TooFewGPUs(ValueError):
    """The job's processes per machine exceed the GPUs this machine's CUDA shows (the text says what to set)."""


def check_gpus(job: TrainingJob) -> None:
    """Refuse to start a CUDA run with more ranks on this machine than GPUs (NCCL ranks cannot share one)."""
    problem = distributed.gpu_shortage(node_processes(job), distributed.visible_gpus())
    if problem:
        raise TooFewGPUs(problem)


class RankTraceback(Exception):
    """The failed rank's own traceback, chained below RankFailed so that the admin's traceback shows it."""


def job_processes(job: TrainingJob) -> int:
    """The processes a job trains on in all (DDP's world size: config.processes, recorded when the job was created).
    Preference tuning (DPO) runs on one."""
    if job.is_preference:
        return 1
    return max(1, TrainingConfig.from_dict({"base_model": job.base_model, **job.config}).processes)


def node_processes(job: TrainingJob) -> int:
    """The processes a job trains on per machine (TUNA_TRAIN_NNODES machines share its processes)."""
    return max(1, job_processes(job) // max(1, settings.TUNA_TRAIN_NNODES))


def runs_distributed(job: TrainingJob) -> bool:
    return not job.is_preference and (job_processes(job) > 1 or settings.TUNA_TRAIN_NNODES > 1)


def rendezvous_id(job: TrainingJob) -> str:
    return f"tuna-job-{job.pk}-{job.claims}"


def launch_command(job: TrainingJob, *, node_rank: int, log_dir: Path) -> list[str]:
    manage = Path(settings.BASE_DIR) / "manage.py"
    arguments = distributed.torchrun_arguments(
        processes=node_processes(job),
        entry=[str(manage), RANK_COMMAND, str(job.pk)],
        log_dir=log_dir,
        nnodes=settings.TUNA_TRAIN_NNODES,
        node_rank=node_rank,
        rdzv_endpoint=settings.TUNA_TRAIN_RDZV_ENDPOINT,
        rdzv_id=rendezvous_id(job),
    )
    return distributed.launcher_command(arguments)


def run_launcher(job: TrainingJob, *, node_rank: int = 0) -> tuple[int, list[distributed.RankFailure]]:
    """Run torchrun for `job` from this process and wait for it: (its exit code, the failed ranks it reported).
    Its files (torchrun's log folder, the report) go when it ends; it never outlives this process. On CUDA, a job
    with more processes per machine than this machine's GPUs fails at once (TooFewGPUs)."""
    check_gpus(job)
    remove_left_behind()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-{job.pk}-"))
    report = work / "report.json"
    env = {
        **os.environ,
        HOLDER_ENV: str(os.getpid()),
        distributed.LAUNCH_REPORT_ENV: str(report),
        "OMP_NUM_THREADS": str(distributed.threads_per_process(node_processes(job))),
        "PYTHONUNBUFFERED": "1",
    }
    command = launch_command(job, node_rank=node_rank, log_dir=work / "logs")
    logger.info("Training job %s on %s process(es) per node: %s", job.pk, node_processes(job), " ".join(command))
    launcher = subprocess.Popen(command, env=env, cwd=settings.BASE_DIR)
    try:
        code = launcher.wait()
    finally:
        if launcher.poll() is None:  # this thread was interrupted: the ranks go with their launcher
            launcher.terminate()
            try:
                launcher.wait(timeout=LAUNCHER_STOP_S)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        failures = distributed.read_report(report)
        shutil.rmtree(work, ignore_errors=True)
    return code, failures


def remove_left_behind() -> None:
    """Remove the launcher folders of worker processes that are gone (killed before they could remove theirs)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*-*-*"):
        pid = folder.name.removeprefix(WORK_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def training_launch(job: TrainingJob) -> None:
    """The worker's work for a job trained on several processes (called by training_job_work): torchrun, then the
    outcome. Rank 0 wrote the final status when the run ended; otherwise the job fails here naming the rank."""
    code, failures = run_launcher(job)
    held = db_retry(lambda: job_held(TrainingJob, job.pk).exists(), f"Reading training job #{job.pk}")
    if not held:
        if code != 0:  # rank 0 stopped because the row was not this worker's any more (reaped, resumed elsewhere, deleted)
            raise JobLost(f"TrainingJob #{job.pk}")
        return
    raise rank_failure(failures, code, processes=node_processes(job) * settings.TUNA_TRAIN_NNODES)


def rank_failure(failures: list[distributed.RankFailure], code: int, *, processes: int) -> Exception:
    """The exception the job fails with: the rank that took the run down and how, readable."""
    root = distributed.root_failure(failures)
    resume = "Resume the job to go on from its last checkpoint."
    if root is None:
        message = f"Training on {processes} processes stopped: torchrun exited with code {code} without naming a rank. {resume}"
    elif root.rank is None:
        message = f"Training on {processes} processes could not start: {root.message[:300]}. {resume}"
    elif root.signal:
        message = (
            f"Training on {processes} processes stopped: rank {root.rank} (process {root.rank + 1} of {processes}) was killed by "
            f"{root.signal}; torchrun stopped the others. {resume}"
        )
    else:
        text = root.message.removeprefix(distributed.PEER_LOST)
        message = f"Training on {processes} processes stopped: rank {root.rank} failed: {text} {resume}"
    failed = RankFailed(message)
    if root is not None and root.database:
        failed.__cause__ = OperationalError(root.message)  # resumed by the worker as a database outage is
    elif root is not None and root.traceback:
        failed.__cause__ = RankTraceback(root.traceback)
    return failed


# -- a rank (manage.py tuna_train_rank <pk>) ---------------------------------------------------------
def training_rank_work(pk: int) -> int:
    """One rank's run of job `pk`, under torchrun; its exit code. Rank 0 runs the job as one process would (its
    writes guarded by the worker's hold on the row); the others train their share and write nothing to the database
    (only the Trainer's rng_state_<rank>.pth into each checkpoint). A failure is written where torchrun reads it,
    for the worker to name (nothing is written to the database from here)."""
    from training_app.services import training_follow, training_rank0

    distributed.rank_start()
    try:
        job = db_retry(lambda: TrainingJob.objects.get(pk=pk), f"Reading training job #{pk}")
        if distributed.is_main_process():
            training_rank0(job)
        else:
            training_follow(job)
    except JobLost:
        logger.warning("Training job %s is not this worker's (%s) any more; rank 0 stops, with the other ranks", pk, worker_host())
        return 1
    except Exception as exc:
        logger.exception("Training job %s: rank %s failed", pk, distributed.rank())
        distributed.rank_error(readable_error(exc, "Training"), exc, database=database_unreachable(exc))
        return 1
    return 0

"""One lifecycle for every background job (training jobs and evaluations alike).

- A row is enqueued after its transaction commits. Each enqueued task runs *one* job, but not
  necessarily the one that enqueued it: the worker takes the fairest queued row of any kind (owners with
  fewer running jobs first, then the owner served longest ago, then the oldest row), so one user's queue
  never blocks everyone else's.
- A claim is atomic (queued -> running) and records the machine and the process that holds the row.
  From then on every write of the job's own progress and its final status is guarded: it only lands
  while the row is still running *in this process*. A process that lost its row (reaped as dead,
  cancelled while its worker was unreachable, resumed elsewhere) gets `JobLost` and writes nothing more,
  so a job is never trained by two processes at once and a finished row is never flipped back.
- While the work runs, a heartbeat thread beats every TUNA_HEARTBEAT_SECONDS whatever the phase
  (loading the model, training, evaluating, saving), so a long model load never looks like a dead worker.
- The worker's supervisor (tuna_core.supervisor) reaps: rows of its machine whose process is gone, and
  rows of any machine whose heartbeat stopped for TUNA_HEARTBEAT_TIMEOUT_S.
- A database that goes away for a while (a restart, a failover) costs a running job nothing: its writes
  (progress, loss points, final status) and its stop checks retry on a fresh connection for up to
  TUNA_DB_RETRY_S (`db_retry`, each try logged), the heartbeat closes its broken connection and beats again.
  Past the bound the job fails, and a kind that names an AUTO_RESUME_FUNCTION is resumed by it once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from django.apps import apps
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Count, F, Max, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.module_loading import import_string
from django_q.models import OrmQ
from django_q.tasks import async_task

from tuna_core.models import WorkerJob
from tuna_core.workers import SUPERVISOR_ENV, holder_pid, process_exists, worker_host
from tuna_llm.loading import ModelUnavailable

logger = logging.getLogger("tuna.jobs")

RUN_NEXT_TASK = "tuna_core.jobs.run_next_job"
# What a database that is not there (restarting, failing over, refusing connections) raises through Django.
DATABASE_UNREACHABLE = (OperationalError, InterfaceError)
# Pauses between the tries of a write while the database is away (the last one repeats up to TUNA_DB_RETRY_S).
RETRY_DELAYS = (0.2, 0.5, 1, 2, 3)
# A job that failed because the database stayed away is resumed by the worker this many times at most.
MAX_AUTO_RESUMES = 1
# A job that failed because the database stayed away waits this many times TUNA_DB_RETRY_S for it to record its failure
# (and resume): without a database the worker has nothing else it could run, and its heartbeat goes on meanwhile, so
# the watchdog does not take it for hung. Past that the row stays for the watchdog (failed as a stopped worker).
FAILURE_RECORD_BOUNDS = 10

T = TypeVar("T")


class JobLost(Exception):
    """This process no longer holds the row: it was reaped, cancelled without it, or taken elsewhere."""


def database_unreachable(exc: BaseException | None) -> bool:
    """The exception (or the one it was raised from) says the database could not be reached."""
    while exc is not None:
        if isinstance(exc, DATABASE_UNREACHABLE):
            return True
        exc = exc.__cause__
    return False


def connection_drop() -> None:
    """Forget this thread's connection (a broken one cannot be used again); the next query opens a fresh one."""
    try:
        connection.close()
    except DatabaseError:  # closing a connection the server already dropped may complain: it is gone either way
        connection.connection = None


def db_retry(attempt: Callable[[], T], what: str, *, bound: float | None = None) -> T:
    """Run `attempt` (a write or a read of the database) until it succeeds, for at most `bound` seconds
    (TUNA_DB_RETRY_S): after each OperationalError/InterfaceError the broken connection is closed and the next
    try opens a fresh one. Each try is logged; past the bound the last error is raised.

    Inside a transaction (the caller's atomic block) nothing can be retried halfway: the error goes up to the
    code that opened the transaction, which retries it whole."""
    if connection.in_atomic_block:
        return attempt()
    bound = settings.TUNA_DB_RETRY_S if bound is None else bound
    started = time.monotonic()
    tries = 0
    while True:
        try:
            result = attempt()
        except DATABASE_UNREACHABLE as exc:
            connection_drop()
            waited = time.monotonic() - started
            left = bound - waited
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if left <= 0:
                logger.error("%s: the database is still unreachable after %.0f s (TUNA_DB_RETRY_S=%s): %s", what, waited, bound, reason)
                raise
            delay = min(RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)], left)
            tries += 1
            logger.warning(
                "%s: the database is unreachable (%s); try %s again in %.1f s on a fresh connection", what, reason, tries + 1, delay
            )
            time.sleep(delay)
            continue
        if tries:
            logger.warning("%s: done on try %s, after %.1f s without the database", what, tries + 1, time.monotonic() - started)
        return result


def job_kinds() -> list[type[WorkerJob]]:
    return [model for model in apps.get_models() if issubclass(model, WorkerJob)]


def job_enqueue(job: WorkerJob) -> None:
    """Hand the worker one more job to run, once the row it reads is committed."""

    def enqueue() -> None:
        async_task(RUN_NEXT_TASK, task_name=job.task_name())

    transaction.on_commit(enqueue)


def jobs_requeue() -> int:
    """Give every queued row a task that will run it; how many tasks were added.

    At a worker's start-up: a row whose task is gone (queued by an older version under a task name that no
    longer exists, or lost with the broker's queue) would otherwise wait until a later job's task picks it.
    Any waiting run_next_job task runs any queued row, so only the shortfall is added (a task too many
    finds nothing to run and ends)."""
    queued = sum(model.objects.filter(status=model.Status.QUEUED).count() for model in job_kinds())
    offered = OrmQ.objects.filter(Q(lock__isnull=True) | Q(lock__lt=timezone.now()))
    waiting = sum(1 for task in offered if task.func() == RUN_NEXT_TASK)
    missing = max(0, queued - waiting)
    for _ in range(missing):
        async_task(RUN_NEXT_TASK, task_name="requeued")
    return missing


# -- picking and claiming ---------------------------------------------------------------------
def job_pick_order() -> list[tuple[type[WorkerJob], int]]:
    """Queued rows of every kind, in the order the worker takes them (fairest first)."""
    queued = []
    for model in job_kinds():
        rows = model.objects.filter(status=model.Status.QUEUED).values_list("pk", "owner_id", "created_at")
        queued += [(model, pk, owner, created) for pk, owner, created in rows]
    owners = {owner for _, _, owner, _ in queued}
    running: Counter[int] = Counter()
    served: dict[int, datetime] = {}
    for model in job_kinds():
        mine = model.objects.filter(owner__in=owners)
        for owner, count in mine.filter(status=model.Status.RUNNING).values("owner").annotate(n=Count("pk")).values_list("owner", "n"):
            running[owner] += count
        last_claims = mine.filter(claimed_at__isnull=False).values("owner").annotate(last=Max("claimed_at")).values_list("owner", "last")
        for owner, last in last_claims:
            served[owner] = max(last, served.get(owner, last))
    never = datetime.min.replace(tzinfo=UTC)
    queued.sort(key=lambda row: (running[row[2]], served.get(row[2], never), row[3], row[1]))
    return [(model, pk) for model, pk, _, _ in queued]


def job_claim(model: type[WorkerJob], pk: int) -> bool:
    """Queued -> running in this process, atomically; False when another worker (or a cancel) got there first."""
    now = timezone.now()
    return bool(
        model.objects.filter(pk=pk, status=model.Status.QUEUED).update(
            status=model.Status.RUNNING,
            heartbeat_at=now,
            claimed_at=now,
            claims=F("claims") + 1,
            worker_host=worker_host(),
            worker_pid=os.getpid(),
            started_at=Coalesce("started_at", now),
        )
    )


def run_next_job() -> bool:
    """The worker's task: claim the fairest queued row of any kind and run it. False when none is left."""
    for model, pk in job_pick_order():
        if job_run(model, pk, import_string(model.WORK_FUNCTION)):
            return True
    logger.info("No queued job left to run")
    return False


def job_run(model: type[WorkerJob], pk: int, work: Callable[[WorkerJob], None]) -> bool:
    """Claim one given row and run its work; False when it was not queued (another worker or a cancel got it)."""
    if not job_claim(model, pk):
        logger.info("%s #%s is not queued any more; nothing to do", model.__name__, pk)
        return False
    job_work(model, pk, work)
    return True


def job_work(model: type[WorkerJob], pk: int, work: Callable[[WorkerJob], None]) -> None:
    """Run a claimed row's work with a heartbeat; any failure ends the row as failed with a readable reason.

    The row's run time is kept however the work ends: `job_complete` and `job_fail` write it with the final
    status (after JobLost nothing is written: the row is not this process's any more)."""
    job = db_retry(lambda: model.objects.get(pk=pk), f"Reading {model.__name__} #{pk}")
    job.work_started = time.monotonic()
    # Another connection cannot see (or write) the row until the caller's transaction commits: inside
    # one (a test's transaction), the work's own writes are the heartbeat.
    heartbeat = None if connection.in_atomic_block else Heartbeat(model, pk)
    if heartbeat:
        heartbeat.start()
    try:
        work(job)
    except JobLost:
        logger.warning(
            "%s #%s was taken from this process (reaped, cancelled or resumed elsewhere); nothing more is written", model.__name__, pk
        )
    except Exception as exc:  # every failure ends as `failed` with a readable reason
        logger.exception("%s #%s failed", model.__name__, pk)
        try:
            job_fail(job, exc)
        except DATABASE_UNREACHABLE as lost:  # still away after FAILURE_RECORD_BOUNDS x TUNA_DB_RETRY_S: the watchdog fails the row
            logger.error(
                "%s #%s: its failure could not be recorded (the database is unreachable: %s); once the database is back, the "
                "worker's watchdog fails the row, whose heartbeat has stopped",
                model.__name__,
                pk,
                lost,
            )
    finally:
        if heartbeat:
            heartbeat.stop()


# -- writes while running ---------------------------------------------------------------------
def job_held(model: type[WorkerJob], pk: int) -> QuerySet:
    """The row, only while it runs in this very process (every write of a running job goes through here), or in the
    worker process this one works for (a rank of a job trained on several processes: tuna_core.workers.holder_pid)."""
    return model.objects.filter(pk=pk, status=model.Status.RUNNING, worker_host=worker_host(), worker_pid=holder_pid())


def job_write(model: type[WorkerJob], pk: int, **fields) -> None:
    """Write progress (or the final status) of a row this process holds; JobLost when it holds it no more.

    Retried on a fresh connection while the database is away (db_retry); inside the caller's transaction the
    caller retries the whole transaction."""
    if not db_retry(lambda: job_held(model, pk).update(heartbeat_at=timezone.now(), **fields), f"Writing {model.__name__} #{pk}"):
        raise JobLost(f"{model.__name__} #{pk}")


def job_run_time(job: WorkerJob) -> dict:
    """The row's run time so far, as the field to write with its final status ({} for a kind that keeps its own)."""
    started = getattr(job, "work_started", None)
    if started is None or not any(field.name == "run_seconds" for field in job._meta.concrete_fields):
        return {}
    return {"run_seconds": time.monotonic() - started}


def job_complete(job: WorkerJob, **fields) -> None:
    """End a running job as completed, with its run time and the given fields, in one guarded write."""
    job_write(type(job), job.pk, status=job.Status.COMPLETED, completed_at=timezone.now(), **job_run_time(job), **fields)


def job_fail(job: WorkerJob, exc: BaseException, **fields) -> None:
    """End a running job as failed with a readable reason (the traceback goes to the admin) and its run time.

    A job that failed because the database stayed away longer than TUNA_DB_RETRY_S is then resumed once by its
    kind's AUTO_RESUME_FUNCTION (from its last checkpoint), when the kind names one."""
    model = type(job)
    try:
        message = readable_error(exc, job.WORK)
    except Exception:  # a failure is recorded whatever happens while its reason is put into words
        logger.exception("%s #%s: the reason of its failure could not be put into words", model.__name__, job.pk)
        message = f"{job.WORK} stopped with an error ({type(exc).__name__}). The full traceback is in the admin."
    failure = {
        "status": job.Status.FAILED,
        "error_message": message,
        "error_traceback": "".join(traceback.format_exception(exc)),
        "completed_at": timezone.now(),
        **job.stop_fields(),
        **job_run_time(job),
        **fields,
    }
    bound = settings.TUNA_DB_RETRY_S * (FAILURE_RECORD_BOUNDS if database_unreachable(exc) else 1)
    written = db_retry(
        lambda: job_held(model, job.pk).update(**failure), f"Recording the failure of {model.__name__} #{job.pk}", bound=bound
    )
    if not written:
        logger.warning("%s #%s failed after this process lost it; the failure is not recorded", model.__name__, job.pk)
        return
    resume = getattr(model, "AUTO_RESUME_FUNCTION", None)
    if resume and database_unreachable(exc):
        if db_retry(lambda: import_string(resume)(job.pk), f"Resuming {model.__name__} #{job.pk}"):
            logger.warning(
                "%s #%s failed while the database was away; resumed from its last checkpoint by the worker", model.__name__, job.pk
            )
        else:
            logger.warning(
                "%s #%s failed while the database was away; not resumed again (it was resumed once already)", model.__name__, job.pk
            )


class Heartbeat(threading.Thread):
    """Beats for a running row from its own thread, so every phase (model loading included) is covered.

    Under the supervisor it also ends the process group when the supervisor is gone: no job keeps
    running without someone watching it.
    """

    def __init__(self, model: type[WorkerJob], pk: int) -> None:
        super().__init__(name=f"heartbeat-{model.__name__}-{pk}", daemon=True)
        self.model, self.pk = model, pk
        self.host, self.pid = worker_host(), holder_pid()
        self._stop_event = threading.Event()
        supervisor = os.environ.get(SUPERVISOR_ENV, "")
        self.supervisor = int(supervisor) if supervisor.isascii() and supervisor.isdigit() else None

    def run(self) -> None:
        try:
            while not self._stop_event.wait(settings.TUNA_HEARTBEAT_SECONDS):
                if self.supervisor and not process_exists(self.supervisor):
                    logger.error("The worker's supervisor (pid %s) is gone: stopping this job's processes", self.supervisor)
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                try:
                    self.model.objects.filter(
                        pk=self.pk, status=self.model.Status.RUNNING, worker_host=self.host, worker_pid=self.pid
                    ).update(heartbeat_at=timezone.now())
                except DatabaseError as exc:  # a busy or unreachable database: the next beat tries again, on a fresh connection
                    logger.warning("Heartbeat of %s #%s not written: %s", self.model.__name__, self.pk, exc)
                    if database_unreachable(exc):
                        connection_drop()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# -- reaping (the supervisor) and the web's view of stuck rows ----------------------------------
def heartbeat_stale_before() -> datetime:
    return timezone.now() - timedelta(seconds=settings.TUNA_HEARTBEAT_TIMEOUT_S)


def job_is_stuck(job: WorkerJob) -> bool:
    """A running row whose heartbeat stopped: no worker will act on it (cancel and resume may)."""
    return job.status == job.Status.RUNNING and (job.heartbeat_at is None or job.heartbeat_at < heartbeat_stale_before())


def jobs_reap(process_alive: Callable[[int], bool] = lambda pid: False, *, stale_heartbeats: bool = True) -> dict[str, int]:
    """Fail the running rows nobody runs any more; counts per kind.

    On this machine: rows whose process is not alive (at a worker's start-up, every row of the machine).
    On any machine: rows whose heartbeat is older than TUNA_HEARTBEAT_TIMEOUT_S (unless `stale_heartbeats` is
    False: just after a database outage no heartbeat could land, so an old one says nothing yet).
    """
    reaped = {}
    me = worker_host()
    stale = Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=heartbeat_stale_before()) | Q(worker_host="")
    if not stale_heartbeats:
        stale = Q(pk__in=[])
    for model in job_kinds():
        running = model.objects.filter(status=model.Status.RUNNING)
        gone = Q(pk__in=[])
        for pk, pid in running.filter(worker_host=me).values_list("pk", "worker_pid"):
            if pid is None or not process_alive(pid):
                gone |= Q(pk=pk, worker_pid=pid)
        reaped[model._meta.verbose_name_plural] = running.filter(gone | stale).update(
            status=model.Status.FAILED, error_message=model.WORKER_STOPPED, completed_at=timezone.now(), **model().stop_fields()
        )
    return reaped


def queue_position(job: WorkerJob) -> int:
    """How many jobs the worker runs before this queued one: what runs now, and the rows picked before it."""
    running = sum(model.objects.filter(status=model.Status.RUNNING).count() for model in job_kinds())
    order = job_pick_order()
    ahead = order.index((type(job), job.pk)) if (type(job), job.pk) in order else len(order)
    return running + ahead


def readable_error(exc: BaseException, work: str = "The job") -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    from tuna_core.disk import disk_full, disk_full_message  # a full disk is named, whatever wrapped it

    if disk_full(exc):
        return disk_full_message(work)
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return "The machine ran out of memory. Lower batch_size or max_seq_length (or raise gradient_accumulation_steps) and start again."
    if database_unreachable(exc):
        return (
            f"{work} stopped: the database could not be reached for longer than TUNA_DB_RETRY_S "
            f"({settings.TUNA_DB_RETRY_S:g} s) ({name}{': ' + text[:200] if text else ''})."
        )
    if isinstance(exc, (ValueError, ModelUnavailable)) and text:
        return text
    return f"{work} stopped with an error ({name}{': ' + text[:300] if text else ''}). The full traceback is in the admin."

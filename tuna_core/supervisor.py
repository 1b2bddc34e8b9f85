"""The worker's supervisor: the django-q2 cluster runs under it, and nothing outlives it.

    tuna_worker (this supervisor) ── tuna_worker --cluster (django-q2's qcluster, its own process group)
                                          └─ sentinel ─ pusher, monitor, the worker process running a job

- The cluster runs in a process group of its own, so the supervisor can end all of it at once with
  SIGKILL: django-q2's own shutdown waits for the running job to finish, which for a training run can
  take hours (a stop that hangs is how `make run` leaked workers). A job killed this way is failed and
  resumable from its last checkpoint.
- If the supervisor itself is killed (even with SIGKILL), the cluster notices within half a second that
  its parent changed and kills its own group; the job's heartbeat thread checks the supervisor too.
- A watchdog pass every TUNA_WATCHDOG_SECONDS: a running row of this machine whose process is gone (an
  out-of-memory kill, a native crash, django-q2's timeout) is failed at once; one whose heartbeat stopped
  for TUNA_HEARTBEAT_TIMEOUT_S (a hung process) has its process killed first. Rows of other machines
  are failed once their heartbeat is that old, so a worker recreated under a new name frees them.
- A cluster that dies on its own is cleaned up and started again.
- A database that goes away does not stop the supervisor: a pass that cannot reach it is logged and skipped,
  and the next one uses a fresh connection. Once it is back, heartbeats get TUNA_HEARTBEAT_TIMEOUT_S to land
  again before a silent job counts as hung (none could be written meanwhile), and queued rows whose task was
  lost with the outage are given one (jobs_requeue).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, close_old_connections

from tuna_core.jobs import connection_drop, db_retry, heartbeat_stale_before, job_kinds, jobs_reap, jobs_requeue
from tuna_core.workers import SUPERVISOR_ENV, process_exists, worker_host

logger = logging.getLogger("tuna.worker")

RESTART_DELAYS = (1, 2, 5, 10, 30)


class Supervisor:
    def __init__(self, write=print) -> None:
        self.write = write
        # Set by the signal handler: a plain attribute, since a handler that takes a lock (Event.set) can
        # deadlock or recurse when signals arrive in a burst (`kill 0` from a shell trap sends several).
        self.stop_requested = False
        self.cluster: subprocess.Popen | None = None
        self.restarts = 0
        # The database: since when (time.monotonic()) a pass could not reach it, and when it was reached again.
        self.database_lost_at: float | None = None
        self.database_back_at: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        # Nothing of this machine runs yet. A database not reachable yet (starting with the worker) is waited for.
        self._report(db_retry(jobs_reap, "Failing the jobs a stopped worker left running"), "left running by a stopped worker")
        if added := db_retry(jobs_requeue, "Queueing tasks for queued jobs"):
            self.write(f"Queued {added} task(s) for queued jobs that had none.")
        self.write(f"Worker {worker_host()} (supervisor pid {os.getpid()}) starting; jobs run in a supervised cluster.")
        self._start_cluster()
        try:
            while not self._sleep(settings.TUNA_WATCHDOG_SECONDS):
                self.tick()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)  # more signals must not interrupt the clean-up
            self._stop_cluster()
            # Every process of the cluster is gone: whatever this machine was running stopped with it.
            try:
                self._report(jobs_reap(), "stopped with the worker")
            except DatabaseError as exc:
                logger.error("The database is unreachable: the jobs this worker ran stay marked running until a worker starts (%s)", exc)
            self.write("Worker stopped.")
        return 0

    def tick(self) -> None:
        """One watchdog pass: restart a cluster that exited, then watch the jobs. A pass that cannot reach the
        database is logged and skipped (the cluster keeps running); the next one opens a fresh connection."""
        try:
            close_old_connections()
            if self.cluster is not None and self.cluster.poll() is not None:
                self._restart_cluster()
            self.watch()
        except DatabaseError as exc:
            connection_drop()
            if self.database_lost_at is None:
                self.database_lost_at = time.monotonic()
                self.write(
                    f"The database is unreachable ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                    "the watchdog waits for it, running jobs retry their writes."
                )
            return
        if self.database_lost_at is not None:
            self.write(f"The database is back after {time.monotonic() - self.database_lost_at:.0f} s.")
            self.database_lost_at = None
            self.database_back_at = time.monotonic()
            try:
                if added := jobs_requeue():  # a task the cluster could not take while the database was away
                    self.write(f"Queued {added} task(s) for queued jobs that had none.")
            except DatabaseError as exc:
                logger.warning("Queueing tasks after the outage failed (the next start does it): %s", exc)

    def heartbeats_due(self) -> bool:
        """Whether a silent heartbeat means a hung job: not while the database is away, nor for
        TUNA_HEARTBEAT_TIMEOUT_S after it came back (no heartbeat could land meanwhile)."""
        if self.database_lost_at is not None:
            return False
        return self.database_back_at is None or time.monotonic() - self.database_back_at >= settings.TUNA_HEARTBEAT_TIMEOUT_S

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _sleep(self, seconds: float) -> bool:
        """Sleep in short steps; True as soon as a stop was asked for."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.stop_requested

    def _start_cluster(self) -> None:
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        manage = Path(settings.BASE_DIR) / "manage.py"
        self.cluster = subprocess.Popen([sys.executable, str(manage), "tuna_worker", "--cluster"], env=env, start_new_session=True)
        logger.info("Cluster started (pid %s)", self.cluster.pid)

    def _restart_cluster(self) -> None:
        code = self.cluster.returncode
        self._stop_cluster()
        self._report(jobs_reap(self.cluster_process, stale_heartbeats=self.heartbeats_due()), "stopped with the cluster")
        delay = RESTART_DELAYS[min(self.restarts, len(RESTART_DELAYS) - 1)]
        self.restarts += 1
        self.write(f"The job cluster exited (code {code}); starting it again in {delay} s.")
        if not self._sleep(delay):
            self._start_cluster()

    def _stop_cluster(self) -> None:
        """SIGKILL to the whole cluster group, then wait until none of its processes is left (at most 10 s)."""
        if self.cluster is None:
            return
        group = self.cluster.pid
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.cluster.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("The cluster (pid %s) did not stop after SIGKILL", group)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.1)

    # -- the watchdog -------------------------------------------------------------------------
    def cluster_process(self, pid: int) -> bool:
        """Whether `pid` is a live process of this supervisor's cluster."""
        if self.cluster is None or self.cluster.poll() is not None:
            return False
        try:
            return os.getpgid(pid) == self.cluster.pid and process_exists(pid)
        except ProcessLookupError:
            return False

    def watch(self) -> None:
        """Kill this machine's hung job processes, then fail every running row nobody runs any more."""
        heartbeats_due = self.heartbeats_due()
        stale_before = heartbeat_stale_before()
        for model in job_kinds() if heartbeats_due else []:
            hung = model.objects.filter(status=model.Status.RUNNING, worker_host=worker_host(), heartbeat_at__lt=stale_before)
            for pk, pid in hung.values_list("pk", "worker_pid"):
                if pid and self.cluster_process(pid):
                    logger.error(
                        "%s #%s sent no heartbeat for %s s: killing its process %s",
                        model.__name__,
                        pk,
                        settings.TUNA_HEARTBEAT_TIMEOUT_S,
                        pid,
                    )
                    os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid)
        self._report(jobs_reap(self.cluster_process, stale_heartbeats=heartbeats_due), "whose process stopped or hung")

    def _report(self, reaped: dict[str, int], why: str) -> None:
        counts = " and ".join(f"{count} {kind}" for kind, count in reaped.items() if count)
        if counts:
            self.write(f"Marked as failed: {counts} {why}.")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(process_exists(pid) for pid in _group_members(group))


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(entry.name)) == group:
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError, ValueError):
            continue
    return members


def _wait_gone(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_exists(pid):
        time.sleep(0.05)


def run_cluster() -> None:
    """The cluster side: die with the supervisor, then run django-q2's cluster in this process."""
    from django.core.management import call_command

    supervisor = int(os.environ[SUPERVISOR_ENV])

    def die_with_supervisor() -> None:
        while os.getppid() == supervisor:
            time.sleep(0.5)
        logger.error("The worker's supervisor (pid %s) is gone: stopping the cluster", supervisor)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=die_with_supervisor, name="die-with-supervisor", daemon=True).start()
    call_command("qcluster")

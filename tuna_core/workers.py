"""Which machine and process run a job, and whether a process is still there.

One worker (one supervisor) runs per machine name: TUNA_WORKER_NAME, or the host name. Two workers
must never share a name (compose sets one), or each would take the other's jobs for dead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from django.conf import settings

# Set by the supervisor for its cluster: every process of the cluster can tell when it is gone.
SUPERVISOR_ENV = "TUNA_SUPERVISOR_PID"
# Set by the worker process that holds a job trained on several processes, for the ranks it starts (torchrun): they
# write the job's progress on its behalf (training_app.distributed).
HOLDER_ENV = "TUNA_JOB_HOLDER_PID"


def worker_host() -> str:
    return settings.TUNA_WORKER_NAME or socket.gethostname()


def holder_pid() -> int:
    """The process that holds the jobs this process works on (the worker_pid of their rows): this process, or, in a
    rank of a job trained on several processes, the worker process that started the ranks (TUNA_JOB_HOLDER_PID)."""
    holder = os.environ.get(HOLDER_ENV, "")
    return int(holder) if holder.isascii() and holder.isdigit() else os.getpid()


def process_exists(pid: int) -> bool:
    """A live process (a zombie, dead but not yet collected by its parent, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_state(pid) not in ("Z", "X", None)


def process_state(pid: int) -> str | None:
    """The one-letter state of a Linux process ("R", "S", "Z"...), None when there is none; "?" off Linux."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        text = stat.read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else "?"
    except OSError:
        return "?"
    return text.rsplit(")", 1)[-1].split()[0]  # the name in brackets may contain spaces

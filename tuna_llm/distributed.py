"""Training on several processes: the launcher (PyTorch's torchrun) and what the ranks agree on. Django-free.

    worker process (holds the job) ── python -m tuna_llm.distributed (torchrun's own code, run as it is)
                                          └─ one process per rank: manage.py tuna_train_rank <pk> (own sessions)

- torchrun (``torch.distributed.run``) starts the ranks, runs the rendezvous (c10d; several machines meet at one
  host:port), and, with ``--max-restarts 0``, stops every other rank when one fails (SIGTERM to each rank's process
  group, SIGKILL after its timeout). It starts each rank in a session of its own, so a signal to the worker's
  process group does not reach them: each process here asks the kernel to kill it when its parent dies
  (``parent_death_signal``, PR_SET_PDEATHSIG), the launcher when the worker process dies, a rank when the launcher
  dies. A worker killed by its supervisor or the watchdog leaves no rank behind.
- A rank's own failure is written where torchrun reads it (TORCHELASTIC_ERROR_FILE, the "message" field), so the
  launcher's report (``LAUNCH_REPORT_ENV``) names each failed rank with its exit code, signal and message.
- Rank 0 decides whether to stop (cancel, pause) and tells the others at the same step (``agreed``): a rank that
  stopped alone would leave the others waiting in their next gradient all-reduce.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The launcher writes its report here (JSON: the failed ranks), for the worker process that started it.
LAUNCH_REPORT_ENV = "TUNA_LAUNCH_REPORT"
# The launcher's own pid, for its ranks: a rank whose parent is not that process any more stops at once.
LAUNCHER_ENV = "TUNA_LAUNCHER_PID"
# The pid of the process that must be the launcher's parent (the worker process holding the job).
HOLDER_ENV = "TUNA_JOB_HOLDER_PID"
PR_SET_PDEATHSIG = 1
# One machine's run listens on this address only (loopback_store).
LOOPBACK = "127.0.0.1"


def rank() -> int:
    """This process's global rank (torchrun sets RANK); 0 outside a distributed run."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Whether this process writes: the only process of a run, or rank 0 of several."""
    return rank() == 0


def parent_death_signal(expected_parent: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit at once if the parent is already not
    `expected_parent` (it died before the request). Does nothing off Linux. Called by the process itself once it
    runs its own program (the launcher's main, a rank's start), never in a preexec_fn between fork and exec, so
    loading libc here is safe."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent is gone already: nobody would stop this process


def _env_pid(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isascii() and value.isdigit() else None


def rank_start() -> None:
    """In a rank, first thing: die with the launcher (torchrun puts ranks in sessions of their own); on CUDA, make
    this rank's GPU (LOCAL_RANK) the current one before anything is loaded, so that "cuda" means it (the model, NCCL,
    the agreed broadcasts) and no rank keeps a context or a copy of the model on GPU 0."""
    parent_death_signal(_env_pid(LAUNCHER_ENV))
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))


def visible_gpus() -> int:
    """The CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_shortage(processes: int, gpus: int) -> str | None:
    """Why `processes` ranks per machine cannot train on a machine where CUDA shows `gpus` GPUs (None when they can,
    or without a GPU: then the ranks share the CPU's cores). On CUDA each rank needs a GPU of its own."""
    if gpus <= 0 or processes <= gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{gpus} GPU{'s' if gpus != 1 else ''}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    return (
        f"This job trains on {processes} processes per machine, each on a GPU of its own, but this worker sees {seen}. "
        "The processes were fixed when the job was created, from TUNA_TRAIN_PROCESSES ('auto' counts the GPUs of the "
        "machine that creates the job): set TUNA_TRAIN_PROCESSES to the GPUs of each worker machine and start a new job."
    )


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """CPU threads (OMP_NUM_THREADS) for each of `processes` ranks on this machine: its cores shared between them.
    torchrun would set 1 otherwise."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def torchrun_arguments(
    *,
    processes: int,
    entry: Sequence[str],
    log_dir: Path,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
    rdzv_id: str = "",
) -> list[str]:
    """torchrun's command line for `processes` ranks per node running `entry` (a Python script and its arguments).

    One machine: the static rendezvous on 127.0.0.1, port 0 (``main`` binds a free port there: ``loopback_store``),
    not --standalone, whose stores listen on every interface. Several: every node names the same rendezvous endpoint
    (host:port of node 0, which serves the store) and its own node rank 0..nnodes-1. --max-restarts 0: one failed
    rank fails the run (the job is resumed from its checkpoint instead)."""
    args = ["--nproc-per-node", str(processes), "--max-restarts", "0", "--log-dir", str(log_dir)]
    if nnodes > 1:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Training on several machines needs TUNA_TRAIN_RDZV_ENDPOINT as host:port of node 0; got {rdzv_endpoint!r}.")
        # The static rendezvous: node K's ranks are K x processes onwards, so global rank 0 (the one that writes) is on
        # node 0, the worker holding the job. Its TCP store listens at host:port.
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static"]
        args += ["--master-addr", host, "--master-port", port, "--rdzv-id", rdzv_id]
    else:
        args += ["--nnodes", "1", "--node-rank", "0", "--rdzv-backend", "static"]
        args += ["--master-addr", LOOPBACK, "--master-port", "0", "--rdzv-id", rdzv_id or "tuna-local"]
    return args + list(entry)


def _flag(argv: Sequence[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def loopback_store(argv: Sequence[str]) -> tuple[list[str], Any]:
    """For torchrun arguments naming ``--master-addr 127.0.0.1 --master-port 0`` (one machine): a free port bound on
    127.0.0.1 only and the rendezvous store's server on it, so that nothing of the run listens beyond this machine.
    torchrun's TCPStore would listen on every interface; a multi-tenant TCPStore on the same port in this process
    is served by the same server (PyTorch's documented multi_tenant), so torchrun's static rendezvous uses this one.
    The ranks' gloo and NCCL sockets go on the loopback interface too. Returns (the arguments with the port, what
    must stay referenced while torchrun runs); other arguments are returned as they are."""
    argv = list(argv)
    if _flag(argv, "--master-addr") != LOOPBACK or _flag(argv, "--master-port") != "0":
        return argv, None
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = TCPStore(
        LOOPBACK,
        port,
        is_master=True,
        multi_tenant=True,
        master_listen_fd=listener.fileno(),
        wait_for_workers=False,
        timeout=timedelta(seconds=300),
    )
    argv[argv.index("--master-port") + 1] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    return argv, (listener, store)


def launcher_command(arguments: Sequence[str]) -> list[str]:
    """The launcher's process: this module's main(), which runs torchrun with `arguments`."""
    return [sys.executable, "-m", "tuna_llm.distributed", *arguments]


# -- the launcher process -----------------------------------------------------------------------
def main(argv: Sequence[str]) -> int:
    """torchrun with `argv` (its own arguments parser and launcher), with PR_SET_PDEATHSIG and a JSON report of
    the failed ranks (LAUNCH_REPORT_ENV): [{"rank", "local_rank", "exitcode", "signal", "message", "time"}]."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    parent_death_signal(_env_pid(HOLDER_ENV))
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    report = os.environ.get(LAUNCH_REPORT_ENV)
    try:
        argv, held = loopback_store(argv)
        run(parse_args(argv))
        del held  # the store's server served the whole run
    except ChildFailedError as exc:
        failures = [
            {
                "rank": global_rank,
                "local_rank": failure.local_rank,
                "exitcode": failure.exitcode,
                "signal": failure.signal_name() if failure.exitcode < 0 else None,
                "message": failure.message if isinstance(failure.message, str) else json.dumps(failure.message),
                "time": failure.timestamp,
                "database": bool(failure.error_file_data.get("database")),
                "traceback": str(failure.error_file_data.get("traceback", "")),
            }
            for global_rank, failure in sorted(exc.failures.items())
        ]
        if report:
            Path(report).write_text(json.dumps(failures), encoding="utf-8")
        print(exc.format_msg(), file=sys.stderr)
        return 1
    except Exception as exc:  # the rendezvous failed (another node never came), an argument torchrun refused...
        if report:
            Path(report).write_text(json.dumps([{"rank": None, "message": f"{type(exc).__name__}: {exc}"}]), encoding="utf-8")
        raise
    return 0


@dataclass(frozen=True)
class RankFailure:
    rank: int | None
    exitcode: int | None
    signal: str | None
    message: str
    database: bool = False  # the rank failed because the database stayed away
    traceback: str = ""


def read_report(path: Path) -> list[RankFailure]:
    """The launcher's report of the failed ranks ([] when it wrote none)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [
        RankFailure(
            row.get("rank"),
            row.get("exitcode"),
            row.get("signal"),
            str(row.get("message") or ""),
            bool(row.get("database")),
            str(row.get("traceback") or ""),
        )
        for row in rows
    ]


def root_failure(failures: Sequence[RankFailure]) -> RankFailure | None:
    """The failure that took the run down: a rank killed by a signal other than the SIGTERM torchrun sends the
    others when it stops them; else a rank that wrote its own error (not the lost connection a collective reports
    when a peer dies: ``rank_error`` marks those); else the first one."""
    if not failures:
        return None
    killed = [f for f in failures if f.signal and f.signal != "SIGTERM"]
    own = [f for f in failures if f.message and not f.message.startswith(PEER_LOST) and f.exitcode and f.exitcode > 0]
    return (killed or own or list(failures))[0]


PEER_LOST = "[peer lost] "


def rank_error(message: str, exc: BaseException, *, database: bool = False) -> None:
    """Write a rank's failure where torchrun reads it (the TORCHELASTIC_ERROR_FILE it gives each rank), in the
    form its ProcessFailure reads ("message" a string); a collective's error (a peer died) is marked as such."""
    import traceback

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    lost = _is_collective_error(exc)
    data = {
        "message": (PEER_LOST if lost else "") + message,
        "timestamp": int(time.time()),
        "database": database,
        "traceback": "".join(traceback.format_exception(exc)),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def _is_collective_error(exc: BaseException) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    while exc is not None:
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text or "connection" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# -- what the ranks agree on ---------------------------------------------------------------------
def agreed(decide: Callable[[], bool]) -> Callable[[], bool]:
    """A yes/no that rank 0 decides (`decide` runs there only) and every rank receives, so that all ranks act on the
    same answer at the same step. Outside a distributed run, `decide` itself. Every rank must call it at the same
    points (it is a collective)."""

    def ask() -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return decide()
        answer = torch.tensor([1 if dist.get_rank() == 0 and decide() else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            answer = answer.cuda()
        dist.broadcast(answer, src=0)
        return bool(answer.item())

    return ask


def all_ranks_here() -> None:
    """Wait until every rank has come here (a barrier); nothing outside a distributed run. A collective: every rank
    must call it at the same points."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_hooks(hooks: Any) -> Any:
    """A run's TrainingHooks as this rank uses them: unchanged in a run of one process; on rank 0, its stop and pause
    decisions sent to every rank (``agreed``); on the other ranks, nothing reported, stop and pause as rank 0 says."""
    import dataclasses

    if world_size() <= 1:
        return hooks
    if is_main_process():
        return dataclasses.replace(hooks, should_stop=agreed(hooks.should_stop), checkpoint_on_stop=agreed(hooks.checkpoint_on_stop))
    return dataclasses.replace(
        hooks,
        on_progress=lambda progress: None,
        on_start=lambda total: None,
        should_stop=agreed(lambda: False),
        checkpoint_on_stop=agreed(lambda: False),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

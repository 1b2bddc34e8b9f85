"""`make run` itself: the production process model (gunicorn threads + the supervised worker), concurrent
requests answered, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings

from tests.support import children, group_members, process_tree, subprocess_database_url, wait_for
from training_app.models import ThroughputMeasurement
from tuna_core.workers import process_exists

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.process]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status
    except OSError as exc:
        return getattr(exc, "code", 0) or -1


def test_it_serves_with_gunicorn_threads_and_leaves_no_process_after_ctrl_c(data_dir, tmp_path):
    # Measured already, so `make run` does not calibrate (a few LoRA steps) before serving.
    ThroughputMeasurement.objects.create(base_model=settings.TUNA_DEFAULT_BASE_MODEL, device="cpu", tokens_per_second=100, source="test")
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tuna_site.settings",
        "DATABASE_URL": subprocess_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,
        "TUNA_DATA_DIR": str(data_dir),
        "TUNA_MODEL_CACHE_DIR": str(settings.TUNA_MODEL_CACHE_DIR),
        "TUNA_ADMIN_PASSWORD": "make-run-test-password",
        "PORT": str(port),
    }
    env.pop("DEBUG", None)
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}/login/"
        wait_for(lambda: _get(url) == 200, 180, "make run to serve")
        tree = process_tree(make.pid)
        commands = [_command(pid) for pid in tree]
        assert not any("runserver" in c for c in commands)
        web = [c for c in commands if "gunicorn tuna_site.wsgi" in c and not c.startswith("/bin/sh")]
        assert len(web) == 2 and all("--worker-class gthread --workers 1 --threads 32" in c for c in web)  # master + one worker process
        supervisor = next(pid for pid in tree if _command(pid).endswith("tuna_worker "))
        leader = wait_for(lambda: next(iter(children(supervisor)), None), 30, "the worker to start its cluster")
        cluster = wait_for(lambda: group_members(leader), 30, "the cluster's processes")
        everything = tree | cluster

        with ThreadPoolExecutor(max_workers=24) as pool:  # concurrent requests: none reset, none lost
            statuses = list(pool.map(_get, [url] * 24))
        assert statuses == [200] * 24

        stopped_at = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal: the foreground group gets SIGINT
        make.wait(timeout=30)
        print({pid: _command(pid)[:60] for pid in everything if process_exists(pid)}, f"{time.monotonic() - stopped_at:.1f} s")
        try:
            wait_for(lambda: not any(process_exists(pid) for pid in everything), 20, "every process of make run to stop")
        except AssertionError:
            left = {pid: _command(pid) for pid in everything if process_exists(pid)}
            raise AssertionError(f"still running {time.monotonic() - stopped_at:.0f} s after Ctrl-C: {left}") from None
        print(f"everything stopped {time.monotonic() - stopped_at:.1f} s after Ctrl-C")
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "make-run.log").read_text(errors="replace")[-3000:])

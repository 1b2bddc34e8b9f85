"""Helpers for tests: small JSONL files built in memory, the database URL and process trees of workers they start."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile

from tuna_core.workers import process_exists


def jsonl_file(rows: list, name: str = "data.jsonl") -> SimpleUploadedFile:
    """Rows may be dicts (dumped as JSON) or raw strings/bytes (written as they are)."""
    lines = []
    for row in rows:
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode("utf-8"))
        else:
            lines.append(json.dumps(row).encode("utf-8"))
    return SimpleUploadedFile(name, b"\n".join(lines) + b"\n", content_type="application/jsonl")


def pc_rows(count: int, start: int = 0) -> list[dict]:
    """Distinct, clean prompt/completion examples."""
    return [
        {
            "prompt": f"Summarise order number {i}: two blue shirts and one red hat for customer {i}.",
            "completion": f"Order {i} contains three items: two blue shirts and a red hat.",
        }
        for i in range(start, start + count)
    ]


def api_key(user, name: str = "Test key") -> str:
    """A new API key for `user` (the key itself: the database keeps only its digest)."""
    from tuna_core.tokens import api_token_create

    return api_token_create(user=user, name=name)[1]


def job_row(owner, dataset, **fields):
    """A training job row in any state, for tests that need one without training: the embedded model and
    an empty config unless ``fields`` say otherwise."""
    from training_app.models import TrainingJob

    return TrainingJob.objects.create(owner=owner, dataset=dataset, **{"base_model": "smollm2-135m-instruct", "config": {}, **fields})


def subprocess_database_url() -> str:
    """A DATABASE_URL for worker processes started by a test: the test database itself (a file on
    SQLite, see settings_test), so they see the rows a transactional test commits."""
    from urllib.parse import quote

    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def subprocess_env(data_dir, **extra: str) -> dict[str, str]:
    """The environment of a server or worker process a test starts: this test's database, data directory, model
    cache and secret key (django-q2 signs queued tasks with it: web and worker must share one), DEBUG on."""
    from django.conf import settings

    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tuna_site.settings",
        "DATABASE_URL": subprocess_database_url(),
        "DEBUG": "1",
        "SECRET_KEY": settings.SECRET_KEY,
        "TUNA_DATA_DIR": str(data_dir),
        "TUNA_MODEL_CACHE_DIR": str(settings.TUNA_MODEL_CACHE_DIR),
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- processes, for the tests that start real servers and workers (Linux /proc) ------------------
def _stat(pid: int) -> list[str] | None:
    """state, ppid, pgrp, session, ... of a Linux process; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()  # state, ppid, pgrp, ...


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def group_members(group: int) -> set[int]:
    members = set()
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields and int(fields[2]) == group and process_exists(int(entry.name)):
            members.add(int(entry.name))
    return members


def process_tree(pid: int) -> set[int]:
    """`pid` and every live process below it."""
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        todo += children(current)
    return {p for p in tree if process_exists(p)}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)

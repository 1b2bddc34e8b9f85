"""Which worker runs a job, and when a running job has lost its worker.

One worker runs per machine (one job per GPU at a time), so when a worker starts, every job still
marked running by *this* machine was left behind by a worker that died. Jobs another machine runs are
only taken for dead once their heartbeat is older than TUNA_WORKER_STALE_SECONDS: starting a second
worker machine never fails a live job on the first.
"""

from __future__ import annotations

import socket
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone


def worker_host() -> str:
    return settings.TUNA_WORKER_NAME or socket.gethostname()


def orphaned() -> Q:
    """Rows (with `worker_host` and `heartbeat_at`) whose worker is gone, as seen from a starting worker."""
    stale_before = timezone.now() - timedelta(seconds=settings.TUNA_WORKER_STALE_SECONDS)
    return Q(worker_host=worker_host()) | Q(worker_host="") | Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale_before)

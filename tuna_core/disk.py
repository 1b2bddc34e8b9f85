"""A full disk, recognised however it surfaces (an OSError with ENOSPC, or a library's error wrapping one)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from django.conf import settings

from tuna_core.errors import Unavailable

FULL_TEXT = "no space left on device"
RETRY_AFTER_S = 300


def disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from or during, is the file system saying it is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if FULL_TEXT in str(current).lower():  # torch and safetensors wrap the OSError in their own errors
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(work: str = "The job") -> str:
    return (
        f"{work} stopped: the disk is full (no space left on device). Its partial files were removed; free space (delete "
        "datasets, jobs or exports you no longer need, or ask the operator) and resume it."
    )


class DiskFull(Unavailable):
    """A write refused because the server's disk is full: nothing was kept, and trying later (once space is freed) helps."""

    def __init__(self, what: str = "The file") -> None:
        super().__init__(
            f"{what} could not be stored: the server's disk is full (no space left on device). Nothing was kept; try again "
            "once space is freed (the operator, or deleting datasets, jobs or exports you no longer need).",
            retry_after=RETRY_AFTER_S,
        )


class DiskLow(Unavailable):
    """Work refused before it writes: the data directory's disk has less free than TUNA_MIN_FREE_DISK_MB plus what the
    work would write (the database and the secret key live there by default, so the disk is never let fill)."""


def free_bytes(folder) -> int:
    """Bytes free to an unprivileged writer on the disk holding `folder`."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def check_free_space(adding: int | None, what: str = "This", *, error: type[DiskLow] = DiskLow) -> None:
    """Refuse (`error`, 503 with Retry-After) when the data directory's disk has less free than the reserve
    (TUNA_MIN_FREE_DISK_MB) plus `adding` bytes (None or 0: the reserve alone)."""
    folder = Path(settings.TUNA_DATA_DIR)
    while not folder.exists() and folder != folder.parent:  # the data directory is made on first use
        folder = folder.parent
    free, reserve, needed = free_bytes(folder), int(settings.TUNA_MIN_FREE_DISK_MB * 1024 * 1024), max(0, adding or 0)
    if free < reserve + needed:
        needs = f"{what[:1].lower() + what[1:]} needs about {_mb(needed)} and " if needed else ""
        raise error(
            f"The server's disk is nearly full: {_mb(free)} free, and {needs}{_mb(reserve)} are kept free for the database "
            "(TUNA_MIN_FREE_DISK_MB). Nothing was written; try again once space is freed (the operator, or deleting "
            "datasets, jobs or exports you no longer need).",
            retry_after=RETRY_AFTER_S,
        )


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB"

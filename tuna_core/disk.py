"""A full disk, recognised however it surfaces (an OSError with ENOSPC, or a library's error wrapping one)."""

from __future__ import annotations

import errno

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

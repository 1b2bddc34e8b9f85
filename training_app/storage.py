"""What one user's files take on disk: the training side's counter for the storage quota (tuna_core.quotas) and the
dashboard's storage line, and the removal of a deleted job's files."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from django.db import DatabaseError, transaction

from training_app.models import TrainingJob
from training_app.services import job_dir
from tuna_core.quotas import storage_limit_bytes, storage_used

logger = logging.getLogger("tuna.training")


@dataclass(frozen=True)
class StorageUse:
    datasets: int
    quota: int
    adapters: int
    checkpoints: int
    exports: int  # anything else a job keeps (exported models)

    @property
    def jobs(self) -> int:
        return self.adapters + self.checkpoints + self.exports

    @property
    def total(self) -> int:
        """Everything counted against the quota (TUNA_MAX_STORAGE_MB_PER_USER)."""
        return self.datasets + self.jobs

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.total / self.quota) if self.quota else 0.0

    @property
    def full(self) -> bool:
        return self.total >= self.quota


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while we looked
                pass
    return total


def job_files_bytes(job: TrainingJob) -> int:
    """Everything the job keeps on disk: checkpoints, adapter, exports."""
    return _tree_bytes(job_dir(job))


def jobs_storage(owner) -> dict[str, int]:
    """tuna_core.quotas counter: bytes under the user's jobs' folders, by kind (adapters, checkpoints, exports)."""
    used = {"adapters": 0, "checkpoints": 0, "exports": 0}
    for job in TrainingJob.objects.filter(owner=owner).only("pk"):
        directory = job_dir(job)
        try:
            entries = list(directory.iterdir())
        except OSError:  # no files (yet, or any more)
            continue
        for entry in entries:
            try:
                size = _tree_bytes(entry) if entry.is_dir() else entry.lstat().st_size
            except OSError:
                continue
            kind = {"adapter": "adapters", "checkpoints": "checkpoints"}.get(entry.name, "exports")
            used[kind] += size
    return used


def storage_use(user) -> StorageUse:
    used = storage_used(user)
    return StorageUse(
        datasets=used.get("datasets", 0),
        quota=storage_limit_bytes(),
        adapters=used.get("adapters", 0),
        checkpoints=used.get("checkpoints", 0),
        exports=used.get("exports", 0),
    )


def remove_tree(directory: Path) -> None:
    def report(function, path, exc_info) -> None:
        logger.warning("Could not remove %s: %s", path, exc_info[1])

    if directory.exists():
        shutil.rmtree(directory, onerror=report)


def job_files_remove_if_deleted(job: TrainingJob) -> bool:
    """For work that stops writing into a job's folder (a run or an export that lost its row): remove the folder when
    the job's row is gone, since what it wrote after the post_delete receiver ran would outlive the job. True when
    removed; a database that cannot say (an outage) keeps the files."""
    try:
        if TrainingJob.objects.filter(pk=job.pk).exists():
            return False
    except DatabaseError:
        return False
    remove_tree(job_dir(job))
    return True


def job_files_remove(sender, *, instance: TrainingJob, **kwargs) -> None:
    """post_delete receiver: a deleted job's folder goes once the deletion is committed, whoever deleted it (a page, the
    admin, or the deletion of its owner with everything they own). An export still writing there removes it again
    when it stops (training_app.exports)."""
    directory = job_dir(instance)
    transaction.on_commit(lambda: remove_tree(directory))

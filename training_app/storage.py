"""What one user's files take on disk, for the dashboard's storage line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datasets_app.selectors import dataset_storage_bytes
from datasets_app.services import storage_limit_bytes
from training_app.models import TrainingJob
from training_app.services import job_dir


@dataclass(frozen=True)
class StorageUse:
    datasets: int  # counted against the quota
    quota: int
    adapters: int
    checkpoints: int
    exports: int  # anything else a job keeps (exported models)

    @property
    def jobs(self) -> int:
        return self.adapters + self.checkpoints + self.exports

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.datasets / self.quota) if self.quota else 0.0


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


def storage_use(user) -> StorageUse:
    adapters = checkpoints = exports = 0
    for job in TrainingJob.objects.filter(owner=user).only("pk"):
        directory = job_dir(job)
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            size = _tree_bytes(entry) if entry.is_dir() else entry.stat().st_size
            if entry.name == "adapter":
                adapters += size
            elif entry.name == "checkpoints":
                checkpoints += size
            else:
                exports += size
    return StorageUse(
        datasets=dataset_storage_bytes(user),
        quota=storage_limit_bytes(),
        adapters=adapters,
        checkpoints=checkpoints,
        exports=exports,
    )

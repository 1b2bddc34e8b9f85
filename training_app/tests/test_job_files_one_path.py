"""A deleted job's folder goes one way: the post_delete receiver (training_app.storage.job_files_remove)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db.models.signals import post_delete

from tests.support import job_row
from training_app import services
from training_app.models import TrainingJob
from training_app.storage import job_files_remove

pytestmark = pytest.mark.django_db


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_it_removes_a_deleted_jobs_folder_through_the_post_delete_receiver_alone(
    alice, valid_dataset, data_dir, django_capture_on_commit_callbacks
):
    """One path removes a deleted job's files (training_app.storage.job_files_remove): without it, the deletion's service
    removes nothing on its own."""
    job = job_row(alice, valid_dataset, status="completed")
    folder = data_dir / "jobs" / str(job.pk)
    write(folder / "adapter" / "adapter_model.safetensors", 1000)
    assert post_delete.disconnect(sender=TrainingJob, dispatch_uid="training_app.job_files_remove")
    try:
        with django_capture_on_commit_callbacks(execute=True):
            services.training_job_delete(job=job)
        assert not TrainingJob.objects.filter(pk=job.pk).exists() and folder.is_dir()
    finally:
        post_delete.connect(job_files_remove, sender=TrainingJob, dispatch_uid="training_app.job_files_remove")
    other = job_row(alice, valid_dataset, status="completed")
    write(data_dir / "jobs" / str(other.pk) / "adapter" / "adapter_model.safetensors", 1000)
    with django_capture_on_commit_callbacks(execute=True):
        services.training_job_delete(job=other)
    assert not (data_dir / "jobs" / str(other.pk)).exists()

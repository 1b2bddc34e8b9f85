"""The data disk's reserve (TUNA_MIN_FREE_DISK_MB): by default the SQLite database and secret_key live in TUNA_DATA_DIR,
so uploads, runs and exports are refused (503) before they write when the disk would keep less than the reserve plus
what they write."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import jsonl_file, pc_rows
from training_app.models import TrainingJob
from training_app.tests.test_storage_estimates import NEEDS, TINY, files_under, jobs_to_go_on_from, requests, rows
from tuna_core.disk import free_bytes

pytestmark = pytest.mark.django_db


def test_it_refuses_uploads_runs_and_exports_while_the_disk_keeps_less_than_its_reserve(
    alice, alice_api, valid_dataset, data_dir, settings
):
    completed, failed = jobs_to_go_on_from(alice, valid_dataset, data_dir)
    settings.TUNA_MIN_FREE_DISK_MB = free_bytes(data_dir) / 1024 / 1024 + 1024  # more than the disk has free
    before, counts = files_under(data_dir), rows()

    answers = requests(alice_api, valid_dataset, completed, failed)
    answers["upload"] = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20))}, format="multipart")
    for action, response in answers.items():
        assert response.status_code == 503 and response["Retry-After"] == "300", (action, response.content)
        detail = response.json()["detail"]
        assert detail.startswith("The server's disk is nearly full: ") and "MB free" in detail, detail
        assert "are kept free for the database (TUNA_MIN_FREE_DISK_MB)" in detail and "Nothing was written" in detail
    assert rows() == counts and files_under(data_dir) == before


@pytest.fixture
def disk_of_700_mb(tmp_path, settings):
    """The data directory on a 700 MB file system of its own (mount needs root, as CI runs); the database elsewhere."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system needs mount (root): {mounted.stderr.decode().strip()}")
    settings.TUNA_DATA_DIR = settings.MEDIA_ROOT = folder
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_it_counts_the_estimate_against_the_free_space_of_a_real_disk(alice, alice_api, valid_dataset, disk_of_700_mb, settings):
    settings.TUNA_MIN_FREE_DISK_MB = 600  # 100 MB free above it on this disk
    upload = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20))}, format="multipart")
    assert upload.status_code == 201, upload.content  # a few KB: fits above the reserve
    start = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json")
    assert start.status_code == 503 and start["Retry-After"] == "300", start.content
    detail = start.json()["detail"]
    assert "700.0 MB free, and a training job needs about" in detail and "(TUNA_MIN_FREE_DISK_MB)" in detail, detail
    assert float(NEEDS.search(detail).group(1)) > 100 and not TrainingJob.objects.exists()
    settings.TUNA_MIN_FREE_DISK_MB = 256
    start = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json")
    assert start.status_code == 201, start.content

"""A hostile user and the disk: one quota over everything a user keeps, file replacement under a row lock, invalid
uploads charged and bounded, a user's files going with the user."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connections
from django.urls import reverse
from rest_framework.test import APIClient

from datasets_app import services
from datasets_app.models import Dataset
from datasets_app.services import dataset_attach_eval_file, dataset_create
from tests.support import api_key, job_row, jsonl_file, pc_rows

pytestmark = pytest.mark.django_db


def files_under(folder) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def job_files(owner, dataset, data_dir, sizes: dict[str, int], **fields):
    job = job_row(owner, dataset, **fields)
    for name, size in sizes.items():
        path = data_dir / "jobs" / str(job.pk) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    return job


@pytest.mark.postgres  # row locks between connections (SQLite: its IMMEDIATE transactions serialize the writers)
@pytest.mark.django_db(transaction=True)
def test_it_leaves_exactly_one_held_out_file_after_concurrent_uploads(alice, data_dir):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(40)), name="Orders")
    key = api_key(alice)
    uploads = 6
    barrier = threading.Barrier(uploads)
    answers: list[int] = []

    def upload(number: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        body = {"file": jsonl_file(pc_rows(10, start=1000 + 100 * number), name=f"held-out-{number}.jsonl")}
        try:
            barrier.wait()
            answers.append(client.post(f"/api/datasets/{dataset.pk}/eval-file", body, format="multipart").status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(answers) == [200] * uploads
    dataset.refresh_from_db()
    stored = files_under(data_dir / "datasets")
    # The training file and exactly one held-out file: the one the row names, whose examples it counts.
    assert len(stored) == 2, stored
    assert str(data_dir / dataset.eval_file.name) in stored and str(data_dir / dataset.file.name) in stored
    number = int(dataset.eval_original_filename.removeprefix("held-out-").removesuffix(".jsonl"))
    first_line = json.loads(dataset.eval_file.open("rb").readline())
    assert first_line == pc_rows(1, start=1000 + 100 * number)[0] and dataset.num_eval == 10


def test_it_replaces_a_held_out_file_and_removes_the_one_it_replaced(alice, data_dir, django_capture_on_commit_callbacks):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(40)), name="Orders")
    with django_capture_on_commit_callbacks(execute=True):
        dataset_attach_eval_file(dataset=dataset, upload=jsonl_file(pc_rows(10, start=500), name="first.jsonl"))
    first = dataset.eval_file.name
    with django_capture_on_commit_callbacks(execute=True):
        dataset_attach_eval_file(dataset=dataset, upload=jsonl_file(pc_rows(12, start=700), name="second.jsonl"))
    dataset.refresh_from_db()
    assert dataset.eval_file.name != first and dataset.eval_original_filename == "second.jsonl" and dataset.num_eval == 12
    assert files_under(data_dir / "datasets") == sorted([str(data_dir / dataset.file.name), str(data_dir / dataset.eval_file.name)])


def test_it_keeps_the_held_out_file_when_its_replacement_is_over_quota(alice, data_dir, settings):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(40)), name="Orders")
    dataset_attach_eval_file(dataset=dataset, upload=jsonl_file(pc_rows(10, start=500), name="first.jsonl"))
    before = files_under(data_dir / "datasets")
    settings.TUNA_MAX_STORAGE_MB_PER_USER = (dataset.size_bytes + dataset.eval_file.size + 100) / 1024 / 1024
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(alice)}")
    response = api.post(f"/api/datasets/{dataset.pk}/eval-file", {"file": jsonl_file(pc_rows(30, start=900))}, format="multipart")
    assert response.status_code == 409 and "TUNA_MAX_STORAGE_MB_PER_USER" in response.json()["detail"]
    dataset.refresh_from_db()
    assert dataset.eval_original_filename == "first.jsonl" and files_under(data_dir / "datasets") == before


def test_it_counts_checkpoints_adapters_and_exports_against_the_upload_quota(alice, alice_api, data_dir, settings):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(20)), name="Orders")
    job_files(
        alice,
        dataset,
        data_dir,
        {"checkpoints/checkpoint-2/optimizer.pt": 40_000, "adapter/adapter_model.safetensors": 20_000, "export/merged-q8_0.gguf": 30_000},
    )
    settings.TUNA_MAX_STORAGE_MB_PER_USER = (dataset.size_bytes + 95_000) / 1024 / 1024  # room for 5 KB more
    response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(60, start=100))}, format="multipart")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "storage quota (TUNA_MAX_STORAGE_MB_PER_USER)" in detail
    assert "checkpoints 39 KB" in detail and "adapters 20 KB" in detail and "exports 29 KB" in detail
    assert Dataset.objects.filter(owner=alice).count() == 1 and len(files_under(data_dir / "datasets")) == 1


def test_it_charges_an_invalid_upload_its_whole_size_before_reading_it(alice, alice_api, data_dir, settings):
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 0.05  # 51 KB
    settings.TUNA_INVALID_UPLOAD_KEEP_KB = 4  # an invalid file keeps 4 KB of itself: yet it is charged its 80 KB first
    body = b"not json\n" + b"".join(json.dumps(row).encode() + b"\n" for row in pc_rows(400))
    assert len(body) > 60_000
    response = alice_api.post("/api/datasets", {"file": SimpleUploadedFile("bad.jsonl", body)}, format="multipart")
    assert response.status_code == 409
    assert (
        f"this file needs {len(body) / 1024:.0f} KB" in response.json()["detail"]
        and "TUNA_MAX_STORAGE_MB_PER_USER" in response.json()["detail"]
    )
    assert not Dataset.objects.exists() and files_under(data_dir / "datasets") == []


def test_it_stops_validating_an_invalid_file_soon_after_its_first_error(alice, monkeypatch):
    monkeypatch.setattr(services, "LINES_AFTER_FIRST_ERROR", 50)
    body = b"".join(json.dumps(row).encode() + b"\n" for row in pc_rows(30)) + b"{oops\n"
    body += b"".join(json.dumps(row).encode() + b"\n" for row in pc_rows(3000, start=100))
    dataset = dataset_create(owner=alice, upload=SimpleUploadedFile("bad.jsonl", body))
    report = dataset.validation_report
    assert dataset.validation_status == "invalid"
    assert report["errors"]["items"][0]["line"] == 31
    stopped = [e["message"] for e in report["errors"]["items"] if e["line"] is None]
    assert any("Validation stopped after line 81" in message and "cannot be trained" in message for message in stopped)
    assert report["valid_examples"] < 100  # the 3,000 lines after the error were not tokenized


def test_it_stops_validating_at_the_error_cap(alice, monkeypatch):
    monkeypatch.setattr(services, "MAX_ERRORS_VALIDATED", 20)
    body = b"{bad\n" * 5000
    started = time.perf_counter()
    dataset = dataset_create(owner=alice, upload=SimpleUploadedFile("bad.jsonl", body))
    assert time.perf_counter() - started < 5
    errors = dataset.validation_report["errors"]
    assert [e["line"] for e in errors["items"] if e["line"]] == list(range(1, 21))  # 20 errors read, 4,980 lines not
    assert any("Validation stopped after line 20" in e["message"] for e in errors["items"] if e["line"] is None)


def users_with_files(data_dir, *, jobs: bool) -> list:
    """alice, bob and carol, each with a dataset (and a held-out file); with `jobs`, a fine-tune and its continuation."""
    users = [get_user_model().objects.create_user(username=name, password="x") for name in ("alice", "bob", "carol")]
    for user in users:
        dataset = dataset_create(owner=user, upload=jsonl_file(pc_rows(20)), name="Orders")
        dataset_attach_eval_file(dataset=dataset, upload=jsonl_file(pc_rows(10, start=500)))
        if jobs:
            parent = job_files(user, dataset, data_dir, {"adapter/adapter_model.safetensors": 100, "checkpoints/checkpoint-1/x": 10})
            job_files(user, dataset, data_dir, {"export/merged/model.safetensors": 100}, parent=parent)
    return users


def delete_two_users(client, alice, bob, data_dir) -> None:
    """alice through the ORM, bob through the admin's delete page."""
    alice.delete()
    admin = get_user_model().objects.create_superuser(username="root", password="root-pass-123")
    client.force_login(admin)
    response = client.post(reverse("admin:auth_user_delete", args=[bob.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not get_user_model().objects.filter(pk__in=[alice.pk, bob.pk]).exists()


@pytest.mark.django_db(transaction=True)
def test_it_removes_a_users_dataset_files_when_the_user_is_deleted_by_the_orm_or_the_admin(data_dir, client):
    alice, bob, carol = users_with_files(data_dir, jobs=False)
    assert len(files_under(data_dir / "datasets")) == 6
    delete_two_users(client, alice, bob, data_dir)
    kept = Dataset.objects.get(owner=carol)
    assert files_under(data_dir / "datasets") == sorted([str(data_dir / kept.file.name), str(data_dir / kept.eval_file.name)])


# TrainingJob.dataset and TrainingJob.parent are on_delete=RESTRICT: deleting a dataset or a parent job alone is refused,
# but the owner's deletion takes them all.
@pytest.mark.django_db(transaction=True)
def test_it_removes_a_users_jobs_folders_when_the_user_is_deleted_by_the_orm_or_the_admin(data_dir, client):
    alice, bob, carol = users_with_files(data_dir, jobs=True)
    assert len(files_under(data_dir / "datasets")) == 6 and len(os.listdir(data_dir / "jobs")) == 6
    delete_two_users(client, alice, bob, data_dir)
    kept = Dataset.objects.get(owner=carol)
    assert files_under(data_dir / "datasets") == sorted([str(data_dir / kept.file.name), str(data_dir / kept.eval_file.name)])
    assert sorted(int(name) for name in os.listdir(data_dir / "jobs")) == sorted(carol.training_jobs.values_list("pk", flat=True))


def test_it_shows_the_whole_storage_on_the_dashboard_and_says_when_it_is_full(alice, alice_client, data_dir, settings):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(20)), name="Orders")
    job_files(alice, dataset, data_dir, {"checkpoints/checkpoint-2/optimizer.pt": 50_000, "export/adapter-f16.gguf": 10_000})
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 1
    html = alice_client.get(reverse("dashboard")).content.decode()
    section = html[html.index('id="storage"') : html.index("</section>", html.index('id="storage"'))]
    assert f'value="{dataset.size_bytes + 60_000}"' in section and 'max="1048576"' in section
    assert "checkpoints 48.8\xa0KB" in section and "exports 9.8\xa0KB" in section and "at your storage quota" not in section
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 0.05
    html = alice_client.get(reverse("dashboard")).content.decode()
    assert "You are at your storage quota (TUNA_MAX_STORAGE_MB_PER_USER)" in html and "(100%)" in html


# -- a full disk, for real: a small tmpfs (mounting needs root, as CI runs) -------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB file system of its own."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system needs mount (root): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_it_refuses_an_upload_that_fills_the_disk_and_keeps_no_partial_file(alice, alice_api, alice_client, small_disk, settings):
    settings.MEDIA_ROOT = settings.TUNA_DATA_DIR = small_disk  # the datasets' disk has 64 KB; the database lives elsewhere
    settings.TUNA_MIN_FREE_DISK_MB = 0  # no reserve: the file alone does not fit, and is refused before it is written
    body = b"".join(json.dumps(row).encode() + b"\n" for row in pc_rows(600))
    assert len(body) > 100_000
    response = alice_api.post("/api/datasets", {"file": SimpleUploadedFile("big.jsonl", body)}, format="multipart")
    assert response.status_code == 503 and response["Retry-After"] == "300"
    detail = response.json()["detail"]
    assert detail.startswith("The server's disk is nearly full: 0.1 MB free, and this file needs about 0.1 MB")
    assert "Nothing was written" in detail
    assert not Dataset.objects.exists() and files_under(small_disk) == []
    page = alice_client.post(reverse("dataset-upload"), {"file": SimpleUploadedFile("big.jsonl", body)}, follow=True)
    assert "disk is nearly full" in page.content.decode() and files_under(small_disk) == []
    # The disk, the database and the next upload are fine.
    small = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20))}, format="multipart")
    assert small.status_code == 201 and Dataset.objects.count() == 1 and len(files_under(small_disk)) == 1


def test_it_refuses_an_upload_that_meets_a_full_disk_while_stored_and_keeps_no_partial_file(alice, alice_api, tmp_path, settings):
    """Free space is checked before the file is read, but the disk can still fill while it is written (another writer):
    a file system out of inodes gives the kernel's ENOSPC at the write although its free space looked enough."""
    disk = tmp_path / "no-inodes"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=8", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system needs mount (root): {mounted.stderr.decode().strip()}")
    try:
        settings.MEDIA_ROOT = settings.TUNA_DATA_DIR = disk
        settings.TUNA_MIN_FREE_DISK_MB = 0.5
        fillers = []
        while True:
            try:
                (disk / f"filler-{len(fillers)}").touch()
            except OSError:
                break
            fillers.append(disk / f"filler-{len(fillers)}")
        response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20))}, format="multipart")
        assert response.status_code == 503 and response["Retry-After"] == "300"
        assert "the server's disk is full (no space left on device). Nothing was kept" in response.json()["detail"]
        assert not Dataset.objects.exists() and files_under(disk) == sorted(str(f) for f in fillers)
        for filler in fillers:  # space freed: the next upload is stored
            filler.unlink()
        again = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20))}, format="multipart")
        assert again.status_code == 201 and len(files_under(disk)) == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_it_refuses_an_upload_whose_temporary_file_fills_the_disk(alice, alice_api, small_disk, settings, data_dir):
    settings.FILE_UPLOAD_TEMP_DIR = str(small_disk)
    body = b"".join(json.dumps(row).encode() + b"\n" for row in pc_rows(600))
    response = alice_api.post("/api/datasets", {"file": SimpleUploadedFile("big.jsonl", body)}, format="multipart")
    assert response.status_code == 503 and "The upload could not be stored: the server's disk is full" in response.json()["detail"]
    assert not Dataset.objects.exists() and os.listdir(small_disk) == [] and files_under(data_dir) == []

"""Disk: storage per user, invalid uploads kept short, no temporary or orphaned files, datasets deleted with their jobs."""

import gc
import os
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from datasets_app.models import Dataset
from datasets_app.services import dataset_create
from evaluation_app.models import Evaluation
from tests.support import job_row, jsonl_file, pc_rows
from training_app.models import TrainingJob

pytestmark = pytest.mark.django_db


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def upload_tmp(settings, tmp_path):
    """Uploads above 1 KB go to a temporary file in a folder of the test's own."""
    folder = tmp_path / "upload-tmp"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1024
    return folder


def test_it_refuses_an_upload_over_the_storage_quota_naming_the_limit(alice_api, alice_client, bob_api, settings, data_dir, upload_tmp):
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 0.01  # 10 KB
    first = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(40))}, format="multipart")  # ~7 KB
    assert first.status_code == 201
    response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(40, start=100))}, format="multipart")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "Your files use 7 KB of your 10 KB storage quota (TUNA_MAX_STORAGE_MB_PER_USER): datasets 7 KB; this file needs 7 KB." in detail
    page = alice_client.post(reverse("dataset-upload"), {"file": jsonl_file(pc_rows(40, start=100))}, follow=True)
    assert "TUNA_MAX_STORAGE_MB_PER_USER" in page.content.decode()
    sample = alice_client.post(reverse("dataset-sample"), follow=True)
    assert sample.status_code == 200 and "TUNA_MAX_STORAGE_MB_PER_USER" in sample.content.decode()
    assert Dataset.objects.filter(owner__username="alice").count() == 1
    assert len(files_under(data_dir / "datasets")) == 1 and os.listdir(upload_tmp) == []
    assert bob_api.post("/api/datasets", {"file": jsonl_file(pc_rows(40))}, format="multipart").status_code == 201  # per user


def test_it_counts_a_held_out_file_against_the_quota(alice_api, valid_dataset, settings):
    settings.TUNA_MAX_STORAGE_MB_PER_USER = (valid_dataset.size_bytes + 500) / 1024 / 1024
    response = alice_api.post(
        f"/api/datasets/{valid_dataset.pk}/eval-file", {"file": jsonl_file(pc_rows(10, start=500))}, format="multipart"
    )
    assert response.status_code == 409 and "TUNA_MAX_STORAGE_MB_PER_USER" in response.json()["detail"]
    valid_dataset.refresh_from_db()
    assert not valid_dataset.has_eval_file


def test_it_keeps_only_the_head_of_an_invalid_upload(alice_api, alice_client, settings, data_dir, upload_tmp):
    settings.TUNA_INVALID_UPLOAD_KEEP_KB = 1
    rows = pc_rows(200)
    rows[150] = '{"prompt": "broken'
    response = alice_api.post("/api/datasets", {"file": jsonl_file(rows, "big.jsonl")}, format="multipart")
    assert response.status_code == 201
    body = response.json()
    assert body["validation_status"] == "invalid"
    assert body["validation_report"]["errors"]["items"][0]["line"] == 151  # the report covers the whole file
    kept = body["validation_report"]["kept"]
    assert body["size_bytes"] == kept["bytes"] <= 1024 < kept["of_bytes"]
    stored = data_dir / "datasets" / files_under(data_dir / "datasets")[0]
    assert stored.stat().st_size == kept["bytes"] and stored.read_bytes().endswith(b"\n")
    assert stored.read_bytes().count(b"\n") == kept["lines"]
    page = alice_client.get(reverse("dataset-detail", args=[body["id"]])).content.decode()
    assert f"Only the first {kept['lines']} lines" in page
    examples = alice_client.get(reverse("dataset-examples", args=[body["id"]]))
    assert examples.status_code == 200
    assert os.listdir(upload_tmp) == []


def test_it_leaves_no_temporary_file_when_an_upload_breaks_off(alice, upload_tmp, data_dir):
    """A body that breaks off mid-file (here: base64 that does not decode) stops Django's parser with an error;
    the temporary file it had started must still go, without waiting for the garbage collector."""
    boundary = "tuna-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + b"eyJwcm9tcHQiOiAiaGkifQo=" * 500
        + b"abc"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    gc.disable()  # the leak only showed until a collection happened to run (or forever, if the server was killed)
    try:
        for url in (reverse("dataset-upload"), "/api/datasets"):
            response = client.post(url, data=body, content_type=f"multipart/form-data; boundary={boundary}")
            assert response.status_code == 400
            assert os.listdir(upload_tmp) == []
    finally:
        gc.enable()
    assert files_under(data_dir) == [] and not Dataset.objects.exists()


@pytest.mark.parametrize("failure", ["too large", "not jsonl", "over quota", "database error"])
def test_it_leaves_no_temporary_or_orphaned_file_when_a_large_upload_fails(alice, settings, upload_tmp, data_dir, monkeypatch, failure):
    rows = pc_rows(300)  # ~45 KB: above FILE_UPLOAD_MAX_MEMORY_SIZE, streamed to a temporary file
    name = "big.jsonl"
    if failure == "too large":
        settings.TUNA_MAX_UPLOAD_MB = 0.02
    elif failure == "not jsonl":
        name = "big.txt"
    elif failure == "over quota":
        settings.TUNA_MAX_STORAGE_MB_PER_USER = 0.03
    else:

        def broken_save(self, *args, **kwargs):
            raise RuntimeError("the database went away")

        monkeypatch.setattr(Dataset, "save", broken_save)
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    page = client.post(reverse("dataset-upload"), {"file": jsonl_file(rows, name)})
    api = client.post("/api/datasets", {"file": jsonl_file(rows, name)})
    expected = {"too large": 413, "not jsonl": 400, "over quota": 409, "database error": 500}[failure]
    assert api.status_code == expected and page.status_code in (302, 500)
    assert os.listdir(upload_tmp) == []
    assert files_under(data_dir) == []
    assert not Dataset.objects.exists()


def test_it_leaves_no_temporary_file_after_a_stored_upload(alice_client, upload_tmp, data_dir):
    response = alice_client.post(reverse("dataset-upload"), {"file": jsonl_file(pc_rows(300), "big.jsonl")})
    assert response.status_code == 302
    assert os.listdir(upload_tmp) == [] and len(files_under(data_dir / "datasets")) == 1


def job_with_files(owner, dataset, data_dir, **fields) -> TrainingJob:
    job = job_row(owner, dataset, **fields)
    for name, size in (("adapter/adapter_model.safetensors", 2000), ("checkpoints/checkpoint-2/optimizer.pt", 5000)):
        path = data_dir / "jobs" / str(job.pk) / name
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * size)
    return job


def test_it_shows_each_users_storage_on_the_dashboard(alice_client, alice, bob, valid_dataset, data_dir, settings):
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 1
    job_with_files(alice, valid_dataset, data_dir, status="completed")
    bobs = dataset_create(owner=bob, upload=jsonl_file(pc_rows(200)), name="Bob's")
    job_with_files(bob, bobs, data_dir, status="completed")
    html = alice_client.get(reverse("dashboard")).content.decode()
    section = html[html.index('id="storage"') :]
    size_kb, total_kb = f"{valid_dataset.size_bytes / 1024:.1f}", f"{(valid_dataset.size_bytes + 7000) / 1024:.1f}"
    assert f"Your files: <strong>{total_kb}\xa0KB</strong> of your 1.0\xa0MB quota" in section  # everything alice keeps, not bob
    assert (
        f"datasets {size_kb}\xa0KB" in section
        and "adapters 2.0\xa0KB" in section
        and "checkpoints 4.9\xa0KB" in section
        and "exports 0\xa0bytes" in section
    )


def test_it_offers_to_delete_a_dataset_with_its_jobs(alice_client, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks):
    parent = job_with_files(alice, valid_dataset, data_dir, status="completed")
    child = job_row(alice, valid_dataset, status="cancelled", parent=parent)
    evaluation = Evaluation.objects.create(owner=alice, training_job=parent, status="completed", test_size=2)
    page = alice_client.get(reverse("dataset-delete", args=[valid_dataset.pk]))
    html = page.content.decode()
    assert page.status_code == 200 and 'id="jobs-to-delete"' in html
    assert f"#{parent.pk}" in html and f"#{child.pk}" in html and f"#{evaluation.pk}" in html
    assert "Delete the dataset and its 2 jobs" in html and 'name="with_jobs" value="1"' in html
    refused = alice_client.post(reverse("dataset-delete", args=[valid_dataset.pk]))  # without with_jobs
    assert refused.status_code == 409 and "used by 2 training jobs" in refused.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(reverse("dataset-delete", args=[valid_dataset.pk]), {"with_jobs": "1"})
    assert response.status_code == 302 and response.url == reverse("dataset-list")
    assert not Dataset.objects.exists() and not TrainingJob.objects.exists() and not Evaluation.objects.exists()
    assert files_under(data_dir) == []


def test_it_deletes_a_dataset_with_its_jobs_through_the_api(alice_api, alice, valid_dataset, data_dir, django_capture_on_commit_callbacks):
    job = job_with_files(alice, valid_dataset, data_dir, status="failed")
    response = alice_api.delete(f"/api/datasets/{valid_dataset.pk}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"This dataset is used by 1 training job (#{job.pk}). Delete it with the dataset (its evaluations and files go too). "
        f"Send DELETE /api/datasets/{valid_dataset.pk}?with_jobs=true to delete them with it."
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_api.delete(f"/api/datasets/{valid_dataset.pk}?with_jobs=true").status_code == 204
    assert not Dataset.objects.exists() and not TrainingJob.objects.exists() and files_under(data_dir) == []


def test_it_deletes_nothing_when_one_of_the_jobs_is_training(alice_api, alice_client, alice, valid_dataset, data_dir):
    done = job_with_files(alice, valid_dataset, data_dir, status="completed")
    training = job_row(alice, valid_dataset, status="training")
    before = files_under(data_dir)
    response = alice_api.delete(f"/api/datasets/{valid_dataset.pk}?with_jobs=true")
    assert response.status_code == 409
    assert f"Job #{training.pk} is training; cancel it first" in response.json()["detail"]
    page = alice_client.post(reverse("dataset-delete", args=[valid_dataset.pk]), {"with_jobs": "1"})
    assert page.status_code == 409 and "cancel it first" in page.content.decode()
    assert Dataset.objects.filter(pk=valid_dataset.pk).exists()
    assert set(TrainingJob.objects.values_list("pk", flat=True)) == {done.pk, training.pk}
    assert files_under(data_dir) == before


def test_it_answers_404_for_another_users_dataset_delete_page(alice_client, bob, valid_dataset):
    alice_client.force_login(bob)
    assert alice_client.get(reverse("dataset-delete", args=[valid_dataset.pk])).status_code == 404
    assert alice_client.post(reverse("dataset-delete", args=[valid_dataset.pk]), {"with_jobs": "1"}).status_code == 404
    assert Dataset.objects.filter(pk=valid_dataset.pk).exists()

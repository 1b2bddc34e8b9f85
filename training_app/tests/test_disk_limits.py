"""The disk against a hostile user and against itself: the storage quota before every run, sweep and export; a bounded
number of checkpoints; a full disk that fails only the job that hit it, resumably; exports that never cost the previous
export's files, and that leave nothing behind a deleted job."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from django.utils import timezone
from transformers import TrainerCallback

from datasets_app.services import dataset_create
from tests.support import job_row, jsonl_file, pc_rows, wait_for
from training_app import exports, services
from training_app.models import Experiment, Export, TrainingJob
from tuna_core.jobs import job_run, readable_error, run_next_job
from tuna_llm.training import COMPLETE_MARKER
from tuna_llm.training_config import TrainingConfig

pytestmark = pytest.mark.django_db

TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "save_steps": 2, "eval_steps": 2, "eval_examples": 2}


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names)


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def tiny_config() -> dict:
    return TrainingConfig(base_model="smollm2-135m-instruct", **TINY).to_dict()


def test_it_refuses_to_start_continue_resume_sweep_or_export_at_the_quota_and_writes_nothing(
    alice, alice_api, alice_client, valid_dataset, data_dir, settings
):
    completed = job_row(alice, valid_dataset, status="completed", config=tiny_config(), completed_at=timezone.now())
    adapter = data_dir / "jobs" / str(completed.pk) / "adapter"
    write(adapter / "adapter_model.safetensors", 30_000)
    completed.adapter_dir = str(adapter)
    completed.save()
    failed = job_row(alice, valid_dataset, status="failed", config=tiny_config(), completed_at=timezone.now())
    checkpoint = data_dir / "jobs" / str(failed.pk) / "checkpoints" / "checkpoint-2"
    write(checkpoint / "optimizer.pt", 20_000)
    write(checkpoint / COMPLETE_MARKER, 0)
    used = valid_dataset.size_bytes + 50_000
    settings.TUNA_MAX_STORAGE_MB_PER_USER = used / 1024 / 1024  # exactly full
    before = files_under(data_dir)
    rows = TrainingJob.objects.count(), Export.objects.count(), Experiment.objects.count()

    answers = {
        "start": alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json"),
        "continue": alice_api.post(f"/api/training/{completed.pk}/continue", {"epochs": 1}, format="json"),
        "resume": alice_api.post(f"/api/training/{failed.pk}/resume", {}, format="json"),
        "sweep": alice_api.post(
            "/api/experiments",
            {"dataset_id": valid_dataset.pk, "config": TINY, "grid": [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}]},
            format="json",
        ),
        "export": alice_api.post(f"/api/training/{completed.pk}/export", {"formats": ["merged_safetensors"]}, format="json"),
    }
    for action, response in answers.items():
        assert response.status_code == 409, (action, response.content)
        detail = response.json()["detail"]
        assert "storage quota (TUNA_MAX_STORAGE_MB_PER_USER)" in detail and "adapters 29 KB" in detail, (action, detail)
    # Each names what it would write, estimated from the base model's files (tuna_llm.sizes).
    assert "a training job needs about" in answers["start"].json()["detail"]
    assert "an export needs about" in answers["export"].json()["detail"]
    page = alice_client.post(f"/training/{completed.pk}/continue", {"epochs": 1}, follow=True)
    assert page.status_code in (200, 409) and "TUNA_MAX_STORAGE_MB_PER_USER" in page.content.decode()

    assert (TrainingJob.objects.count(), Export.objects.count(), Experiment.objects.count()) == rows
    failed.refresh_from_db()
    assert failed.status == "failed" and failed.resume_count == 0
    assert files_under(data_dir) == before

    settings.TUNA_MAX_STORAGE_MB_PER_USER = 2048  # room again (for their estimates too): the same requests go through
    assert alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json").status_code == 201
    assert alice_api.post(f"/api/training/{failed.pk}/resume", {}, format="json").status_code == 202


def test_it_counts_only_the_users_own_files(alice, alice_api, bob, valid_dataset, data_dir, settings):
    bobs = dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's")
    optimizer = data_dir / "jobs" / str(job_row(bob, bobs, status="completed").pk) / "checkpoints" / "checkpoint-9" / "optimizer.pt"
    write(optimizer, 0)
    os.truncate(optimizer, 400 * 1024 * 1024)  # sparse: counted at its size, costs no disk
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 300  # room for alice's run (estimated ~190 MB), not with bob's files counted
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json")
    assert response.status_code == 201


def test_it_bounds_the_checkpoints_a_job_keeps(alice, alice_api, valid_dataset, settings):
    settings.TUNA_MAX_CHECKPOINTS_PER_JOB = 2
    refused = alice_api.post(
        "/api/training/start", {"dataset_id": valid_dataset.pk, "config": {**TINY, "save_total_limit": 20}}, format="json"
    )
    assert refused.status_code == 400
    assert refused.json()["errors"]["save_total_limit"] == [
        "At most 2 checkpoints are kept per job on this server (TUNA_MAX_CHECKPOINTS_PER_JOB); got 20."
    ]
    started = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": TINY}, format="json")
    assert started.status_code == 201
    job = TrainingJob.objects.get(pk=started.json()["id"])
    assert job.config["save_total_limit"] == 2 and "TUNA_MAX_CHECKPOINTS_PER_JOB" in job.config_reasons["save_total_limit"]
    # A row from before the bound is brought under it when resumed.
    old = job_row(alice, valid_dataset, status="cancelled", config={**tiny_config(), "save_total_limit": 20}, paused=True)
    services.training_job_resume(job=old)
    old.refresh_from_db()
    assert old.config["save_total_limit"] == 2 and old.status == "queued"


def test_it_names_a_full_disk_however_it_is_wrapped():
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1 vs 0")
    wrapped.__cause__ = full
    torch_text = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed: No space left on device")
    for exc in (full, wrapped, torch_text):
        message = readable_error(exc, "Training")
        assert message.startswith("Training stopped: the disk is full (no space left on device).") and "resume" in message
    assert "disk is full" not in readable_error(OSError(errno.EACCES, "Permission denied"))


# -- on the real model ----------------------------------------------------------------------------
class DiskFullAtSave(TrainerCallback):
    """From step `step` on, the Trainer's checkpoint save writes part of the checkpoint and then finds the disk full."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and control.should_save:
            real = model.save_pretrained

            def save_then_fill(directory, *a, **kw):
                real(directory, *a, **kw)  # the adapter weights land; the optimizer state would not fit
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "optimizer.pt"))

            model.save_pretrained = save_then_fill


@pytest.mark.model
def test_it_fails_a_job_whose_disk_fills_resumably_and_the_next_job_runs(alice, valid_dataset, data_dir, settings):
    settings.TUNA_MAX_CHECKPOINTS_PER_JOB = 2
    config = {"max_steps": 6, "batch_size": 2, "max_seq_length": 96, "save_steps": 1, "eval_examples": 0}
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=config)
    job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=(DiskFullAtSave(4),)))
    job.refresh_from_db()
    assert job.status == "failed" and "the disk is full (no space left on device)" in job.error_message
    checkpoints = data_dir / "jobs" / str(job.pk) / "checkpoints"
    # The checkpoint cut short is gone; at most TUNA_MAX_CHECKPOINTS_PER_JOB whole ones are kept; no adapter was written.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert all((p / COMPLETE_MARKER).is_file() for p in checkpoints.iterdir())
    assert not (data_dir / "jobs" / str(job.pk) / "adapter").exists() and not job.adapter_dir

    # The next job runs (the worker and the database are fine), then the failed one resumes from step 3 and completes.
    other = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={**config, "max_steps": 2})
    assert run_next_job()
    other.refresh_from_db()
    assert other.status == "completed", other.error_message
    services.training_job_resume(job=job)
    assert run_next_job()
    job.refresh_from_db()
    assert job.status == "completed" and job.current_step == 6, job.error_message
    assert list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3, 4, 5, 6]
    assert len(list(checkpoints.iterdir())) <= 2 and Path(job.adapter_dir).is_dir()


def completed_job_with_an_export(alice, dataset, data_dir, adapter_dir) -> tuple[TrainingJob, Export]:
    """A completed job whose previous export (GGUF files) is on disk and listed."""
    job = job_row(alice, dataset, status="completed", config=tiny_config(), adapter_dir=str(adapter_dir), completed_at=timezone.now())
    folder = exports.export_dir(job)
    files = []
    for name, kind in (("adapter-f16.gguf", "gguf_lora"), ("Modelfile", "modelfile"), ("README.md", "readme")):
        write(folder / name, 1000)
        files.append({"name": name, "kind": kind, "size_bytes": 1000, "path": f"jobs/{job.pk}/export/{name}"})
    export = Export.objects.create(
        owner=alice, training_job=job, formats=["gguf_f16"], status="completed", files=files, completed_at=timezone.now()
    )
    return job, export


@pytest.mark.model
def test_it_keeps_the_previous_export_until_a_new_one_succeeds(alice, alice_api, valid_dataset, data_dir, trained_adapter):
    job, previous = completed_job_with_an_export(alice, valid_dataset, data_dir, data_dir / "missing-adapter")
    before = files_under(exports.export_dir(job))

    failing = exports.export_start(owner=alice, job=job, formats=["merged_safetensors"])
    job_run(Export, failing.pk, exports.export_work)
    failing.refresh_from_db()
    assert failing.status == "failed"
    assert files_under(exports.export_dir(job)) == before and not exports.staging_dir(job).exists()
    assert exports.export_file(previous, "adapter-f16.gguf").read_bytes() == b"x" * 1000  # still served as it was

    job.adapter_dir = str(trained_adapter)
    job.save()
    export = exports.export_start(owner=alice, job=job, formats=["merged_safetensors"])
    job_run(Export, export.pk, exports.export_work)
    export.refresh_from_db()
    assert export.status == "completed", export.error_message
    kept = files_under(exports.export_dir(job))
    assert "merged/config.json" in kept and "adapter-f16.gguf" not in kept  # the new export replaced the old one whole
    assert sorted(os.listdir(data_dir / "jobs" / str(job.pk))) == ["export"]  # no export.next / export.old left
    response = alice_api.get(f"/api/training/{job.pk}/export/files/merged/config.json")
    assert response.status_code == 200 and b"".join(response.streaming_content).startswith(b"{")


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_leaves_no_file_of_a_job_deleted_while_its_export_runs(alice, alice_api, valid_dataset, data_dir, trained_adapter):
    job, _ = completed_job_with_an_export(alice, valid_dataset, data_dir, trained_adapter)
    export = exports.export_start(owner=alice, job=job, formats=["merged_safetensors"])
    worker = threading.Thread(target=job_run, args=(Export, export.pk, exports.export_work))
    worker.start()
    try:
        wait_for(lambda: Export.objects.filter(pk=export.pk, stage__startswith="Merging").exists(), 60, "the export to start merging")
        assert exports.staging_dir(job).is_dir()
        response = alice_api.delete(f"/api/training/{job.pk}?purge=true")
        assert response.status_code == 204
        assert not TrainingJob.objects.filter(pk=job.pk).exists() and not Export.objects.filter(pk=export.pk).exists()
    finally:
        worker.join(300)
    assert not worker.is_alive()
    time.sleep(0.1)
    assert not (data_dir / "jobs" / str(job.pk)).exists(), files_under(data_dir / "jobs")


@pytest.fixture
def real_disk(tmp_path, settings):
    """The data directory on a 768 MB file system of its own (mounting needs root, as CI runs); the database lives
    elsewhere, as the secret key would on a server whose data disk is apart."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system needs mount (root): {mounted.stderr.decode().strip()}")
    settings.TUNA_DATA_DIR = settings.MEDIA_ROOT = folder
    settings.TUNA_MIN_FREE_DISK_MB = 0  # no reserve: the run itself meets the kernel's ENOSPC
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


class FillTheDisk(TrainerCallback):
    """At step `step`, something else (another upload, a log) takes all but 64 KB of the disk: the next checkpoint
    save meets the kernel's ENOSPC wherever it happens to write."""

    def __init__(self, disk: Path, step: int) -> None:
        self.disk, self.step = disk, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            free = os.statvfs(self.disk).f_bavail * os.statvfs(self.disk).f_frsize
            with open(self.disk / "filler", "wb") as handle:
                handle.write(b"\0" * max(0, free - 64 * 1024))


@pytest.mark.model
def test_it_fails_a_job_on_a_really_full_disk_resumably_and_the_worker_goes_on(alice, real_disk, settings):
    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(20)), name="Orders")
    config = {"max_steps": 5, "batch_size": 2, "max_seq_length": 96, "save_steps": 1, "eval_examples": 0}
    job = services.training_job_start(owner=alice, dataset=dataset, config_data=config)
    job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=(FillTheDisk(real_disk, 3),)))
    job.refresh_from_db()
    assert job.status == "failed" and "the disk is full (no space left on device)" in job.error_message, job.error_message
    checkpoints = real_disk / "jobs" / str(job.pk) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert all((p / COMPLETE_MARKER).is_file() for p in checkpoints.iterdir())

    (real_disk / "filler").unlink()  # space freed: the next job runs, and the failed one resumes from step 2
    other = services.training_job_start(owner=alice, dataset=dataset, config_data={**config, "max_steps": 2})
    assert run_next_job()
    other.refresh_from_db()
    assert other.status == "completed", other.error_message
    services.training_job_resume(job=job)
    assert run_next_job()
    job.refresh_from_db()
    assert job.status == "completed" and job.current_step == 5, job.error_message
    assert list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3, 4, 5]

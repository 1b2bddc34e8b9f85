"""The data directory is owner-only: folders 0700 and files 0600, as uploads, training runs and a fresh start make
them, and closed at start-up when something left them open (or a refusal naming the path when it cannot be)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse

from tests.support import jsonl_file, pc_rows
from tuna_site import checks
from tuna_site.env import OWNER_ONLY_UMASK

ROOT = Path(__file__).resolve().parents[2]


def open_paths(root: Path, *, exact: bool = True) -> list[str]:
    """Every folder and file under `root` (itself included) that is not 0700 / 0600 (not exact: that others can
    read, write or enter, or a folder its owner cannot use)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
        mode = stat.S_IMODE(info.st_mode)
        if (mode != want) if exact else (mode & 0o077 or (stat.S_ISDIR(info.st_mode) and mode != 0o700)):
            wrong.append(f"{path.relative_to(root)}: {mode:o}")
    return wrong


def fresh_env(data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY", "TUNA_MODEL_CACHE_DIR", "TUNA_STATIC_ROOT")}
    return {**env, "TUNA_DATA_DIR": str(data), "DJANGO_SETTINGS_MODULE": "tuna_site.settings", "DEBUG": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.django_db
def test_it_stores_uploads_owner_only(alice, alice_client, data_dir):
    assert os.umask(os.umask(0o077)) == OWNER_ONLY_UMASK  # set by the settings for the whole process

    response = alice_client.post(reverse("dataset-upload"), {"file": jsonl_file(pc_rows(20)), "name": "Orders"})
    dataset = alice.datasets.get()
    assert response.status_code == 302 and response["Location"] == reverse("dataset-detail", args=[dataset.pk])
    held_out = alice_client.post(
        reverse("api-dataset-eval-file", args=[dataset.pk]), {"file": jsonl_file(pc_rows(5, start=100), "held.jsonl")}
    )
    assert held_out.status_code in (200, 201), held_out.content
    dataset.refresh_from_db()

    stored = [Path(dataset.file.path), Path(dataset.eval_file.path)]
    assert all(path.is_file() and path.is_relative_to(data_dir) for path in stored)
    assert open_paths(data_dir) == []


@pytest.mark.model
@pytest.mark.django_db
def test_it_keeps_a_training_runs_files_owner_only(alice, valid_dataset, data_dir):
    from training_app import services
    from training_app.models import TrainingJob
    from tuna_core.jobs import job_run

    job = services.training_job_start(
        owner=alice,
        dataset=valid_dataset,
        config_data={"max_steps": 2, "batch_size": 2, "max_seq_length": 96, "save_steps": 1, "eval_steps": 2, "eval_examples": 2},
    )
    job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=()))
    job.refresh_from_db()
    assert job.status == "completed", job.error_message

    adapter = Path(job.adapter_dir)
    assert (adapter / "adapter_model.safetensors").is_file() and any((adapter.parent / "checkpoints").iterdir())
    assert open_paths(data_dir) == []


@pytest.mark.process
def test_it_creates_the_database_and_secret_key_owner_only_on_a_first_start(tmp_path):
    data = tmp_path / "fresh"
    # The shell's usual umask (022): the site must not depend on the operator's.
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=ROOT,
        env=fresh_env(data),
        check=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )
    names = {path.name for path in data.iterdir()}
    assert {"tuna.sqlite3", "secret_key", "staticfiles"} <= names
    assert open_paths(data) == []


@pytest.mark.django_db
def test_it_closes_what_an_older_version_left_open_at_start_up(data_dir, tmp_path):
    (data_dir / "datasets" / "1").mkdir(parents=True)
    (data_dir / "jobs" / "1").mkdir(parents=True)
    for name, mode in (
        ("tuna.sqlite3", 0o644),
        ("secret_key", 0o640),
        ("first-admin.txt", 0o644),
        ("datasets/1/data.jsonl", 0o666),
        ("jobs/1/run.sh", 0o755),
    ):
        (data_dir / name).write_text("x")
        os.chmod(data_dir / name, mode)
    os.chmod(data_dir / "datasets", 0o755)
    os.chmod(data_dir / "datasets" / "1", 0o777)
    os.chmod(data_dir, 0o755)
    os.symlink("/etc/hostname", data_dir / "link")  # a link is not followed (its target is not the site's)
    before = stat.S_IMODE(Path("/etc/hostname").stat().st_mode)
    elsewhere = tmp_path / "elsewhere"  # a folder outside, linked into a folder the site walks: not followed
    elsewhere.mkdir()
    os.chmod(elsewhere, 0o755)  # (mkdir's mode is masked by the site's umask)
    (elsewhere / "shared.txt").write_text("x")
    os.chmod(elsewhere / "shared.txt", 0o644)
    os.symlink(elsewhere, data_dir / "jobs" / "1" / "linked")
    # What the operator keeps beside LLM Tuna's own files is theirs: not walked, not changed.
    (data_dir / "operator" / "deep").mkdir(parents=True)
    os.chmod(data_dir / "operator", 0o755)
    (data_dir / "operator" / "deep" / "notes.txt").write_text("x")
    os.chmod(data_dir / "operator" / "deep" / "notes.txt", 0o644)
    (data_dir / "README.txt").write_text("x")
    os.chmod(data_dir / "README.txt", 0o644)

    call_command("check")  # the system check closes them (and finds nothing left to refuse)

    assert open_paths(data_dir / "datasets", exact=False) == [] and open_paths(data_dir / "jobs", exact=False) == []
    for name in ("tuna.sqlite3", "secret_key", "first-admin.txt"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "jobs" / "1" / "run.sh").stat().st_mode) == 0o700  # the owner keeps its own bits
    assert stat.S_IMODE(Path("/etc/hostname").stat().st_mode) == before
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755 and stat.S_IMODE((elsewhere / "shared.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((data_dir / "operator" / "deep" / "notes.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((data_dir / "operator").stat().st_mode) == 0o755
    assert stat.S_IMODE((data_dir / "README.txt").stat().st_mode) == 0o644
    assert checks.data_dir_owner_only() == []


@pytest.mark.django_db
def test_it_closes_the_model_cache_and_gguf_folders_where_the_settings_put_them_in_the_data_dir(data_dir, settings):
    settings.TUNA_MODEL_CACHE_DIR = data_dir / "cache" / "models"
    settings.TUNA_GGUF_DIR = data_dir / "converted"
    for folder in (settings.TUNA_MODEL_CACHE_DIR / "base", settings.TUNA_GGUF_DIR / "base"):
        folder.mkdir(parents=True)
        os.chmod(folder, 0o755)
        (folder / "config.json").write_text("{}")
        os.chmod(folder / "config.json", 0o644)
    (data_dir / "models").mkdir()  # the default name, not where the settings say: not LLM Tuna's here
    os.chmod(data_dir / "models", 0o755)

    checks.data_dir_close()

    assert open_paths(settings.TUNA_MODEL_CACHE_DIR) == [] and open_paths(settings.TUNA_GGUF_DIR) == []
    assert stat.S_IMODE((data_dir / "models").stat().st_mode) == 0o755


@pytest.mark.process
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to make a file another user owns")
def test_it_refuses_to_start_when_a_file_cannot_be_closed():
    data = Path(tempfile.mkdtemp(prefix="tuna-modes-"))
    try:
        os.chmod(data, 0o700)
        os.chown(data, 65534, 65534)  # the data directory belongs to the site's user (nobody)...
        (data / "datasets").mkdir(mode=0o700)
        os.chown(data / "datasets", 65534, 65534)
        foreign = data / "datasets" / "left-by-root.jsonl"
        foreign.write_text("x")
        os.chmod(foreign, 0o644)  # ...but this file belongs to root, readable by all
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "manage.py", "check"],
            cwd=ROOT,
            env={**fresh_env(data), "TUNA_STATIC_ROOT": str(data / "staticfiles")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        assert "tuna.E001" in result.stderr and "TUNA_DATA_DIR" in result.stderr and "left-by-root.jsonl" in result.stderr
        assert "chmod -R go-rwx" in result.stderr
        assert stat.S_IMODE(foreign.stat().st_mode) == 0o644
    finally:
        shutil.rmtree(data)

"""Settings, the worker configuration, compose.yaml and the web process's footprint."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from evaluation_app.models import Evaluation, JudgeRun
from tests.support import job_row
from training_app.models import TrainingJob
from tuna_core.jobs import jobs_reap

ROOT = Path(__file__).resolve().parents[2]


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tuna_site.settings", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.process
def test_it_runs_with_debug_off_by_default_and_a_secret_key_of_its_own(tmp_path):
    """No DEBUG, no SECRET_KEY: DEBUG is off, and a private key is made once for this installation and kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY")}
    code = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG, settings.SECRET_KEY)"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "DJANGO_SETTINGS_MODULE": "tuna_site.settings", "TUNA_DATA_DIR": str(tmp_path)},
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    (debug, key), (_, again) = (r.stdout.split() for r in runs)
    assert debug == "False" and len(key) >= 50 and key == again  # the same key on every start
    key_file = tmp_path / "secret_key"
    assert key_file.read_text().strip() == key and (key_file.stat().st_mode & 0o777) == 0o600
    assert not list(tmp_path.glob(".secret_key.*"))  # no partial file left


@pytest.mark.process
def test_it_rejects_a_malformed_setting_loudly():
    result = _run_python("import django; django.setup()", TUNA_GPU_HOURLY_USD="cheap")
    assert result.returncode != 0
    assert "TUNA_GPU_HOURLY_USD must be a number" in result.stderr


@pytest.mark.process
def test_it_reads_extra_base_models_from_the_environment():
    code = "import django; django.setup(); from django.conf import settings; print(sorted(settings.TUNA_BASE_MODELS))"
    result = _run_python(code, TUNA_BASE_MODELS="llama-3.1-8b-instruct=meta-llama/Llama-3.1-8B-Instruct")
    assert result.returncode == 0, result.stderr
    assert "'llama-3.1-8b-instruct'" in result.stdout and "'smollm2-135m-instruct'" in result.stdout


def test_it_configures_one_worker_that_never_redelivers_a_running_job():
    q = settings.Q_CLUSTER
    assert q["orm"] == "default"
    assert q["workers"] == 1
    assert q["max_attempts"] == 1
    assert q["retry"] > q["timeout"]


@pytest.mark.process
def test_it_does_not_import_torch_when_the_web_app_loads():
    code = (
        "import sys, django; django.setup();"
        "from django.urls import get_resolver; get_resolver().url_patterns;"
        "import tuna_site.wsgi;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.process
def test_it_keeps_the_web_process_under_200_mb_after_start(tmp_path):
    port = _free_port()
    env = {**os.environ, "TUNA_DATA_DIR": str(tmp_path), "TUNA_MODEL_CACHE_DIR": str(settings.TUNA_MODEL_CACHE_DIR)}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=120)
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        rss = _rss_mb(server.pid)
        print(f"web process RSS after start and one page: {rss:.0f} MB")
        assert rss < 200
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_it_describes_db_web_and_worker_in_compose():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "web", "worker"}
    assert services["db"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert services["web"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "/login/" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["worker"]["depends_on"]["web"]["condition"] == "service_healthy"  # after the migrations
    assert "migrate" in services["web"]["command"] and "gunicorn" in services["web"]["command"]
    assert "tuna_worker" in services["worker"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert {"pgdata", "data", "models"} <= set(compose["volumes"])
    assert any(v.startswith("models:") for v in services["worker"]["volumes"])


@pytest.mark.django_db
def test_it_marks_jobs_left_running_by_a_dead_worker_as_failed(alice, valid_dataset):
    running = job_row(alice, valid_dataset, status="training", started_at=timezone.now())
    queued = job_row(alice, valid_dataset)
    evaluation = Evaluation.objects.create(owner=alice, training_job=running, status="running")
    judge = JudgeRun.objects.create(
        owner=alice, evaluation=evaluation, endpoint="http://j/v1", judge_model="m", rubric="r", status="running"
    )
    assert jobs_reap() == {"training jobs": 1, "evaluations": 1, "exports": 0, "judge runs": 1, "engine checks": 0}
    judge.refresh_from_db()
    assert judge.status == "failed" and judge.error_message == JudgeRun.WORKER_STOPPED
    running.refresh_from_db()
    queued.refresh_from_db()
    evaluation.refresh_from_db()
    assert running.status == "failed" and running.error_message == TrainingJob.WORKER_STOPPED
    assert "worker stopped" in running.error_message and running.eta_seconds is None
    assert queued.status == "queued"
    assert evaluation.status == "failed" and evaluation.error_message == Evaluation.WORKER_STOPPED


@pytest.mark.django_db
def test_it_leaves_jobs_that_another_live_worker_machine_runs(alice, valid_dataset, settings):
    settings.TUNA_WORKER_NAME = "gpu-a"
    settings.TUNA_HEARTBEAT_TIMEOUT_S = 60
    now = timezone.now()

    def running(host, seconds_ago):
        return job_row(
            alice,
            valid_dataset,
            status="training",
            worker_host=host,
            heartbeat_at=now - timedelta(seconds=seconds_ago),
        )

    mine = running("gpu-a", 5)  # this machine's worker is starting, so its last job lost its worker
    live_elsewhere = running("gpu-b", 30)
    dead_elsewhere = running("gpu-c", 3600)
    assert jobs_reap()["training jobs"] == 2
    statuses = {j.worker_host: j.status for j in TrainingJob.objects.filter(pk__in=[mine.pk, live_elsewhere.pk, dead_elsewhere.pk])}
    assert statuses == {"gpu-a": "failed", "gpu-b": "training", "gpu-c": "failed"}


@pytest.mark.django_db
def test_it_creates_the_local_admin_once(capsys, monkeypatch):
    from django.contrib.auth.models import User

    monkeypatch.delenv("TUNA_ADMIN_PASSWORD", raising=False)
    monkeypatch.setenv("TUNA_ADMIN_USER", "root-admin")
    call_command("tuna_bootstrap")
    first = capsys.readouterr().out
    assert "Created the first admin, root-admin." in first and "first-admin.txt" in first  # secrets: test_bootstrap.py
    call_command("tuna_bootstrap")
    assert "exists" in capsys.readouterr().out
    assert User.objects.filter(is_superuser=True).count() == 1


@pytest.mark.process
def test_it_passes_the_deployment_checklist_with_production_settings():
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": "x" * 20 + "-production-like-secret-key-with-enough-entropy-0123456789",
        "ALLOWED_HOSTS": "tuna.example.com",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.process
def test_it_has_every_model_change_in_a_migration():
    result = subprocess.run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout

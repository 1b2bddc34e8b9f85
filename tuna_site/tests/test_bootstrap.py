"""First run: a random admin name, secrets kept out of logs (an owner-only file), a first API key; and compose
trusting no forwarded header while gunicorn is published directly."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from tests.support import subprocess_database_url
from tuna_core.models import ApiToken
from tuna_core.tokens import api_token_find

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _secrets(path: Path) -> dict[str, str]:
    fields = dict(line.split(":", 1) for line in path.read_text().splitlines()[1:])
    return {name.strip(): value.strip() for name, value in fields.items()}


@pytest.fixture
def no_admin_env(monkeypatch):
    monkeypatch.delenv("TUNA_ADMIN_USER", raising=False)
    monkeypatch.delenv("TUNA_ADMIN_PASSWORD", raising=False)


def test_it_makes_a_random_admin_and_keeps_its_secrets_out_of_the_log(no_admin_env, data_dir):
    log = io.StringIO()
    call_command("tuna_bootstrap", stdout=log)
    admin = get_user_model().objects.get(is_superuser=True)
    assert re.fullmatch(r"admin-[0-9a-f]{8}", admin.username)
    path = data_dir / "first-admin.txt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = _secrets(path)
    assert found["user name"] == admin.username
    assert admin.check_password(found["password"])
    assert api_token_find(found["API key"]).user == admin
    assert ApiToken.objects.get(user=admin).name == "First key (tuna_bootstrap)"
    output = log.getvalue()
    assert admin.username in output and str(path) in output
    assert found["password"] not in output and found["API key"] not in output
    assert found["API key"] not in ApiToken.objects.get(user=admin).digest

    again = io.StringIO()
    call_command("tuna_bootstrap", stdout=again)
    assert "An admin exists; leaving it alone." in again.getvalue()
    assert get_user_model().objects.filter(is_superuser=True).count() == 1
    assert _secrets(path) == found


def test_it_shows_the_secrets_on_an_interactive_terminal(no_admin_env, data_dir):
    terminal = Terminal()
    call_command("tuna_bootstrap", stdout=terminal)
    found = _secrets(data_dir / "first-admin.txt")
    assert found["password"] in terminal.getvalue() and found["API key"] in terminal.getvalue()


def test_it_uses_the_chosen_name_and_never_writes_a_chosen_password(monkeypatch, data_dir):
    monkeypatch.setenv("TUNA_ADMIN_USER", "root-admin")
    monkeypatch.setenv("TUNA_ADMIN_PASSWORD", "a-chosen-pass-phrase-1")
    call_command("tuna_bootstrap", stdout=Terminal())
    admin = get_user_model().objects.get(is_superuser=True)
    assert admin.username == "root-admin" and admin.check_password("a-chosen-pass-phrase-1")
    text = (data_dir / "first-admin.txt").read_text()
    assert "a-chosen-pass-phrase-1" not in text and "(the one in TUNA_ADMIN_PASSWORD)" in text


def test_it_makes_no_admin_when_the_file_cannot_be_written(no_admin_env, data_dir):
    (data_dir / "first-admin.txt").mkdir()  # in the way: the secrets cannot be kept
    (data_dir / "first-admin.txt" / "x").write_text("")
    with pytest.raises(OSError):
        call_command("tuna_bootstrap", stdout=io.StringIO())
    assert not get_user_model().objects.exists() and not ApiToken.objects.exists()
    assert [p.name for p in data_dir.iterdir()] == ["first-admin.txt"]  # no temporary file left


@pytest.mark.process
@pytest.mark.django_db(transaction=True)
def test_it_prints_no_secret_into_a_container_log(no_admin_env, data_dir):
    env = {
        **os.environ,
        "DATABASE_URL": subprocess_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,
        "TUNA_DATA_DIR": str(data_dir),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "tuna_bootstrap"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = _secrets(data_dir / "first-admin.txt")
    log = result.stdout + result.stderr
    assert found["user name"] in log and "first-admin.txt" in log
    assert found["password"] not in log and found["API key"] not in log
    assert get_user_model().objects.get(is_superuser=True).check_password(found["password"])


def _is_secure(extra_env: dict[str, str], tmp_path: Path) -> str:
    """request.is_secure() for a request carrying X-Forwarded-Proto: https, in a fresh Python with production settings."""
    env = {**os.environ, "DEBUG": "0", "SECRET_KEY": "k" * 60, "TUNA_DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "tuna_site.settings"}
    env.pop("TUNA_BEHIND_PROXY", None)
    env.update(extra_env)
    code = (
        "import django; django.setup(); from django.test import RequestFactory;"
        "print(RequestFactory().get('/', HTTP_X_FORWARDED_PROTO='https').is_secure())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.process
def test_it_trusts_x_forwarded_proto_only_behind_a_proxy(tmp_path):
    assert _is_secure({}, tmp_path) == "False"  # gunicorn reached directly: a client's header is not believed
    assert _is_secure({"TUNA_BEHIND_PROXY": "0"}, tmp_path) == "False"
    assert _is_secure({"TUNA_BEHIND_PROXY": "1"}, tmp_path) == "True"


def test_it_keeps_compose_off_the_forwarded_headers_and_the_secrets_out_of_its_log():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    web = compose["services"]["web"]
    for service in ("web", "worker"):
        env = compose["services"][service]["environment"]
        assert env["TUNA_BEHIND_PROXY"] == "${TUNA_BEHIND_PROXY:-0}"
        assert env["TUNA_CLIENT_IP_HEADER"] == "${TUNA_CLIENT_IP_HEADER:-}"
        assert "TUNA_ADMIN_PASSWORD" not in env  # a password in the environment shows in `docker inspect`
    assert "tuna_bootstrap" in web["command"]
    assert web["ports"] == ["${TUNA_WEB_BIND:-0.0.0.0}:${TUNA_WEB_PORT:-8000}:8000"]

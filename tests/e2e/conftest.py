"""A live LLM Tuna (web server + worker) for browser and fuzzing tests, started by the tests themselves.

It runs in subprocesses with its own data directory and SQLite database, on the real embedded model.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class LiveSite:
    url: str
    env: dict
    tokens: dict[str, str]

    def manage(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args], env=self.env, check=True, capture_output=True, text=True, timeout=120
        ).stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_site(tmp_path_factory):
    data = tmp_path_factory.mktemp("live")
    env = {
        **os.environ,
        "TUNA_DATA_DIR": str(data),
        "TUNA_MODEL_CACHE_DIR": str(settings.TUNA_MODEL_CACHE_DIR),
        "DATABASE_URL": f"sqlite:///{data / 'live.sqlite3'}",
        "DEBUG": "1",
        "PYTHONUNBUFFERED": "1",
        # Enough for the sample's JSON answers; keeps fuzzed generation calls short on a CPU.
        "TUNA_MAX_TOKENS_LIMIT": "48",
        # An export's parity check on 4 held-out prompts keeps the browser test short.
        "TUNA_PARITY_EXAMPLES": "4",
        # The fuzzer sends thousands of calls a minute: the API rate limit (tested on its own) stays out of its way.
        "TUNA_API_RATE": "off",
        "TUNA_PAGE_RATE": "off",  # the browser tests post pages faster than a person (the limit: test_page_rate.py)
        "TUNA_MIN_PREFERENCE_PAIRS": "2",
    }
    port = _free_port()
    site = LiveSite(url=f"http://127.0.0.1:{port}", env=env, tokens={})
    site.manage("migrate", "-v0")
    site.manage("tuna_models")
    script = (
        "from django.contrib.auth.models import User; from tuna_core.tokens import api_token_create\n"
        "for name in ('alice', 'bob'):\n"
        "    u = User.objects.create_user(name, password=name + '-pass-123')\n"
        "    print('token', name, api_token_create(user=u, name='e2e')[1])\n"
    )
    for line in site.manage("shell", "-c", script).splitlines():
        if line.startswith("token "):
            _, name, key = line.split()
            site.tokens[name] = key
    logs = data / "logs"
    logs.mkdir()
    web = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=open(logs / "web.log", "w"),
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "tuna_worker"], cwd=ROOT, env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{site.url}/login/", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield site
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        ARTIFACTS.mkdir(exist_ok=True)
        for log in logs.iterdir():
            shutil.copy(log, ARTIFACTS / log.name)


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("TUNA_REQUIRE_BROWSER"):  # set by .ci/run: there, a missing browser is a failure
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield instance
        instance.close()


@pytest.fixture
def shots():
    ARTIFACTS.mkdir(exist_ok=True)

    def take(page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    return take

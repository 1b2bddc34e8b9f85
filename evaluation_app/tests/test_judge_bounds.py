"""A judge run is bounded (its whole time, the characters of one example) and keeps the judge's secrets: the URL's
credentials are never shown or stored, and the key never follows a redirect. Against real HTTP servers."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.urls import reverse

from evaluation_app import judging
from evaluation_app.models import JudgeRun, JudgeVerdict
from tuna_core.jobs import job_run
from tuna_llm.judge import redact_url

pytestmark = pytest.mark.django_db

VERDICT = json.dumps({"choices": [{"message": {"role": "assistant", "content": '{"winner": "B", "reason": "closer"}'}}]}).encode()


class Judge(BaseHTTPRequestHandler):
    """A judge endpoint that records what it was sent; `mode` picks how it answers."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        server = self.server
        server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        if server.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if server.mode == "refuse":
            payload = json.dumps({"error": {"message": "bad request"}}).encode()
            self.send_response(400)
        else:
            time.sleep(server.delay)
            payload = VERDICT
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_servers():
    servers = []

    def start(mode="answer", delay=0.0, redirect_to=""):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
        server.mode, server.delay, server.redirect_to, server.seen = mode, delay, redirect_to, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def judge_settings(settings):
    settings.TUNA_JUDGE_MODEL, settings.TUNA_JUDGE_RETRIES, settings.TUNA_JUDGE_API_KEY = "judge", 0, ""
    return settings


def run_judge(owner, evaluation) -> JudgeRun:
    run, created = judging.judge_start(owner=owner, evaluation=evaluation)
    assert created
    job_run(JudgeRun, run.pk, judging.judge_work)
    run.refresh_from_db()
    return run


def test_it_hides_the_urls_credentials_everywhere_and_sends_them_as_basic_auth(
    judge_servers, judge_settings, alice, alice_client, alice_api, evaluation
):
    server = judge_servers()
    judge_settings.TUNA_JUDGE_URL = f"http://judge-user:pa55word@127.0.0.1:{server.server_address[1]}/v1?api-key=qu3rykey"

    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert f"127.0.0.1:{server.server_address[1]}/v1" in page
    assert "pa55word" not in page and "judge-user" not in page and "qu3rykey" not in page

    run = run_judge(alice, evaluation)
    assert run.status == "completed", run.error_message
    assert run.endpoint == f"http://127.0.0.1:{server.server_address[1]}/v1?api-key=***"
    assert server.seen[0]["authorization"] == "Basic " + base64.b64encode(b"judge-user:pa55word").decode()
    assert server.seen[0]["path"] == "/v1/chat/completions?api-key=qu3rykey"  # the query still reaches the judge

    server.mode = "refuse"
    failed = run_judge(alice, evaluation)
    assert failed.status == "failed" and "HTTP 400: bad request" in failed.error_message
    for text in (failed.error_message, failed.error_traceback, failed.endpoint):
        assert "pa55word" not in text and "qu3rykey" not in text
    api = json.dumps(alice_api.get(f"/api/evaluation/{evaluation.pk}/judge").json())
    assert "pa55word" not in api and "qu3rykey" not in api and "api-key=***" in api
    # A row stored before URLs were redacted is shown redacted too.
    JudgeRun.objects.filter(pk=failed.pk).update(endpoint="https://u:old-secret@judge.example/v1")
    assert "old-secret" not in json.dumps(alice_api.get(f"/api/evaluation/{evaluation.pk}/judge").json())


def test_it_never_follows_a_redirect_with_the_key(judge_servers, judge_settings, alice, evaluation):
    elsewhere = judge_servers()
    judge = judge_servers(mode="redirect", redirect_to=f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/chat/completions?k=s")
    judge_settings.TUNA_JUDGE_URL = f"http://127.0.0.1:{judge.server_address[1]}/v1"
    judge_settings.TUNA_JUDGE_API_KEY = "sk-judge-secret"
    judge_settings.TUNA_JUDGE_RETRIES = 2

    run = run_judge(alice, evaluation)

    assert run.status == "failed"
    assert "HTTP 307, a redirect to" in run.error_message and "not followed" in run.error_message and "TUNA_JUDGE_URL" in run.error_message
    assert "k=***" in run.error_message and "sk-judge-secret" not in run.error_message
    assert [seen["authorization"] for seen in judge.seen] == ["Bearer sk-judge-secret"]  # a redirect is final: no retry
    assert elsewhere.seen == []  # the key went nowhere else
    assert JudgeVerdict.objects.count() == 0


def test_it_stops_a_run_at_its_time_limit_and_keeps_what_it_judged(judge_servers, judge_settings, alice, alice_client, evaluation):
    server = judge_servers(delay=0.3)  # 2 requests per example: about 0.6 s each
    judge_settings.TUNA_JUDGE_URL = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge_settings.TUNA_JUDGE_RUN_MAX_S = 2.0  # room for 1 to 3 of the 4 examples, even on a loaded machine

    started = time.monotonic()
    run = run_judge(alice, evaluation)
    took = time.monotonic() - started

    assert took < 2.0 + 1.0, took  # no request waited past the limit
    assert run.status == "completed", run.error_message
    judged = JudgeVerdict.objects.filter(run=run).count()
    assert 1 <= judged < 4 and run.done == judged and run.total == 4
    assert f"{judged} of 4 examples judged, the other {4 - judged} skipped" in run.error_message
    assert "TUNA_JUDGE_RUN_MAX_S" in run.error_message
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert 'id="judge-note"' in page and "TUNA_JUDGE_RUN_MAX_S" in page and 'id="judge-win-rate"' in page


def test_it_fails_a_run_that_judges_nothing_before_its_time_limit(judge_servers, judge_settings, alice, evaluation):
    server = judge_servers(delay=1.0)
    judge_settings.TUNA_JUDGE_URL = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge_settings.TUNA_JUDGE_RUN_MAX_S = 0.3

    started = time.monotonic()
    run = run_judge(alice, evaluation)

    assert time.monotonic() - started < 1.0
    assert run.status == "failed" and "time limit (0.3 s, TUNA_JUDGE_RUN_MAX_S)" in run.error_message
    assert JudgeVerdict.objects.count() == 0


def test_it_cuts_a_long_example_to_its_character_limit_and_says_so(judge_servers, judge_settings, alice, alice_client, evaluation):
    server = judge_servers()
    judge_settings.TUNA_JUDGE_URL = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge_settings.TUNA_JUDGE_MAX_EXAMPLE_CHARS = 400
    long_one = evaluation.examples.get(index=2)
    long_one.finetuned_output = "x" * 200_000
    long_one.save()

    run = run_judge(alice, evaluation)

    assert run.status == "completed" and JudgeVerdict.objects.filter(run=run).count() == 4
    sent = [seen["body"]["messages"][1]["content"] for seen in server.seen]
    assert len(sent) == 8
    cut = [content for content in sent if "characters cut]" in content]
    assert len(cut) == 2  # example 3, in both orders, and only it
    template = len(sent[0]) - len("prompt <b>0</b>") - len("ref 0") - len("base answer 0") - len("tuned answer 0")
    assert all(len(content) - template <= 400 for content in cut)
    assert "1 example was longer than 400 characters (TUNA_JUDGE_MAX_EXAMPLE_CHARS)" in run.error_message
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert "TUNA_JUDGE_MAX_EXAMPLE_CHARS" in page


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@judge.example/v1", "https://judge.example/v1"),
        ("https://judge.example:8443/v1?key=abc&api-version=2", "https://judge.example:8443/v1?key=***&api-version=***"),
        ("http://[::1]:11434/v1#frag", "http://[::1]:11434/v1"),
        ("user:pass@judge.example/v1", "judge.example/v1"),
        ("http://localhost:11434/v1", "http://localhost:11434/v1"),
    ],
)
def test_it_redacts_a_judge_url(url, shown):
    assert redact_url(url) == shown

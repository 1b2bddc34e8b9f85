"""The pairwise judge: this server's own /v1 as the judge, agreement with blind votes, broken endpoints."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.urls import reverse

from evaluation_app import judging
from evaluation_app.models import JudgeRun, JudgeVerdict, Rating
from tests.support import api_key
from tuna_core.jobs import job_run

pytestmark = pytest.mark.django_db


def run_judge(owner, evaluation, rubric: str | None = None) -> JudgeRun:
    run, created = judging.judge_start(owner=owner, evaluation=evaluation, rubric=rubric)
    assert created
    job_run(JudgeRun, run.pk, judging.judge_work)
    run.refresh_from_db()
    return run


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_stores_verdicts_for_both_orders_from_this_servers_own_v1(settings, live_server, alice, evaluation):
    settings.TUNA_JUDGE_URL = f"{live_server.url}/v1"
    settings.TUNA_JUDGE_MODEL = "base:smollm2-135m-instruct"
    settings.TUNA_JUDGE_API_KEY = api_key(alice)
    settings.TUNA_JUDGE_MAX_TOKENS = 6  # the verdict comes first; a short reply keeps the test quick

    run = run_judge(alice, evaluation, rubric="Prefer the answer closest to the reference.")

    assert run.status == "completed", run.error_message
    assert run.rubric == "Prefer the answer closest to the reference." and run.judge_model == "base:smollm2-135m-instruct"
    verdicts = list(JudgeVerdict.objects.filter(run=run).select_related("example"))
    assert [v.example.index for v in verdicts] == [0, 1, 2, 3]
    assert run.done == run.total == 4 and run.requests >= 8  # two orders per example
    for verdict in verdicts:
        assert verdict.base_first in ("base", "finetuned", "tie") and verdict.finetuned_first in ("base", "finetuned", "tie")
        assert verdict.consistent == (verdict.base_first == verdict.finetuned_first)
        assert verdict.winner == (verdict.base_first if verdict.consistent else "tie")
    summary = judging.run_summary(run)
    assert summary["verdicts"] == 4 and summary["inconsistent"] == sum(1 for v in verdicts if not v.consistent)


def verdict_rows(evaluation, run, winners):
    for example, winner in zip(evaluation.examples.order_by("index"), winners, strict=True):
        JudgeVerdict.objects.create(
            run=run, example=example, winner=winner, consistent=True, base_first=winner, finetuned_first=winner, base_first_reason="r"
        )


@pytest.fixture
def judged(alice, evaluation):
    run = JudgeRun.objects.create(
        owner=alice, evaluation=evaluation, endpoint="http://judge/v1", judge_model="m", rubric="r", status="completed"
    )
    verdict_rows(evaluation, run, ["finetuned", "finetuned", "base", "tie"])
    return run


def test_it_computes_agreement_and_kappa_against_hand_checked_votes(alice, evaluation, judged, alice_client, settings):
    examples = list(evaluation.examples.order_by("index"))
    for example, vote in zip(examples, ["finetuned", "base", "base", "both_bad"], strict=True):
        Rating.objects.create(example=example, user=alice, preferred_model=vote, blind=True)
    # By hand: agreement on examples 0, 2 and 3 ("both bad" is a tie) = 3/4. Judge shares finetuned 1/2, base 1/4,
    # tie 1/4; votes finetuned 1/4, base 1/2, tie 1/4; chance = 1/8 + 1/8 + 1/16 = 0.3125; kappa = 0.4375 / 0.6875.
    figures = judging.agreement(judged, alice)
    assert figures["count"] == 4 and figures["agree"] == 3 and figures["rate"] == 0.75
    assert figures["kappa"] == pytest.approx(0.4375 / 0.6875)
    assert judging.trust_text(figures)["key"] == "early"  # substantial, but over 4 examples only

    Rating.objects.filter(example=examples[1]).update(blind=False)  # a vote cast with names shown is not compared
    figures = judging.agreement(judged, alice)
    assert figures["count"] == 3 and figures["agree"] == 3 and figures["kappa"] == pytest.approx(1.0)

    settings.TUNA_JUDGE_URL, settings.TUNA_JUDGE_MODEL = "http://judge.example/v1", "judge-model"
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk]) + "?blind=0").content.decode()
    assert 'id="judge-agreement"' in page and "3 of 3 examples" in page and "Cohen's kappa 1.00" in page
    assert 'id="judge-verdict-0"' in page


class Endpoint(BaseHTTPRequestHandler):
    """A stand-in judge endpoint that misbehaves on purpose: the broken server under test."""

    replies: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if reply == "sleep":
            time.sleep(1.5)
            reply = ("json", "A")
        kind, value = reply
        body = (
            json.dumps({"choices": [{"message": {"role": "assistant", "content": value}}]}).encode() if kind == "json" else value.encode()
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if kind == "json" else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint(settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.TUNA_JUDGE_URL = f"http://127.0.0.1:{server.server_address[1]}/v1"
    settings.TUNA_JUDGE_MODEL = "judge"
    settings.TUNA_JUDGE_RETRIES = 1
    yield Endpoint
    server.shutdown()
    server.server_close()


def test_it_fails_clearly_when_the_judge_refuses_connections(settings, alice, evaluation):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    settings.TUNA_JUDGE_URL, settings.TUNA_JUDGE_MODEL, settings.TUNA_JUDGE_RETRIES = f"http://127.0.0.1:{port}/v1", "judge", 1
    run = run_judge(alice, evaluation)
    assert run.status == "failed"
    assert "failed on example 1: could not reach" in run.error_message and "(after 2 tries)" in run.error_message
    assert "No verdicts were stored" in run.error_message
    assert JudgeVerdict.objects.count() == 0


def test_it_fails_clearly_when_the_judge_answers_something_else_than_json(endpoint, alice, evaluation):
    endpoint.replies = [("html", "<html>502 Bad Gateway</html>")]
    run = run_judge(alice, evaluation)
    assert run.status == "failed" and "did not answer with JSON" in run.error_message and "<html>502" in run.error_message
    assert JudgeVerdict.objects.count() == 0


def test_it_fails_clearly_when_the_judge_times_out(endpoint, settings, alice, evaluation):
    settings.TUNA_JUDGE_TIMEOUT_S = 0.3
    endpoint.replies = ["sleep"]
    run = run_judge(alice, evaluation)
    assert run.status == "failed" and "did not answer within 0.3 s" in run.error_message
    assert JudgeVerdict.objects.count() == 0


def test_it_stores_no_verdicts_when_the_judge_breaks_halfway(endpoint, alice, alice_client, evaluation):
    # Examples 1 and 2 are judged (4 requests), then the judge stops giving verdicts (a refusal), retried once.
    endpoint.replies = [("json", '{"winner": "B", "reason": "closer"}')] * 4 + [("json", "I cannot help with that.")] * 2
    run = run_judge(alice, evaluation)
    assert run.status == "failed" and run.done == 2
    assert "failed on example 3: the reply holds no verdict" in run.error_message and "I cannot help with that." in run.error_message
    assert JudgeVerdict.objects.count() == 0  # none of the two judged examples is half-stored either
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert 'id="judge-error"' in page and "failed on example 3" in page


def test_it_counts_a_verdict_that_flips_with_the_order_as_an_inconsistent_tie(endpoint, alice, evaluation):
    # Always "A": the base answer with it shown first, the fine-tuned one with it shown second.
    endpoint.replies = [("json", '{"winner": "A", "reason": "first is better"}')]
    run = run_judge(alice, evaluation)
    assert run.status == "completed"
    assert set(JudgeVerdict.objects.values_list("winner", "consistent", "base_first", "finetuned_first")) == {
        ("tie", False, "base", "finetuned")
    }
    endpoint.replies = [("json", "B. It matches the reference."), ("json", '```json\n{"winner": "A", "reason": "x"}\n```')] * 4
    run = run_judge(alice, evaluation)
    assert set(run.verdicts.values_list("winner", "consistent")) == {("finetuned", True)}
    assert judging.run_summary(run)["win_rate"]["rate"] == 1.0


def test_it_says_how_to_configure_a_judge_when_there_is_none(settings, alice, alice_client, alice_api, evaluation):
    settings.TUNA_JUDGE_URL = ""
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert 'id="judge-not-configured"' in page and "TUNA_JUDGE_URL" in page
    response = alice_api.post(f"/api/evaluation/{evaluation.pk}/judge", {}, format="json")
    assert response.status_code == 409 and "TUNA_JUDGE_URL" in response.json()["detail"]
    assert JudgeRun.objects.count() == 0


def test_it_serves_judge_runs_over_the_api_to_their_owner_only(endpoint, alice, alice_api, bob_api, evaluation):
    endpoint.replies = [("json", '{"winner": "B", "reason": "closer"}'), ("json", '{"winner": "A", "reason": "closer"}')] * 4
    response = alice_api.post(f"/api/evaluation/{evaluation.pk}/judge", {"rubric": "Prefer valid JSON."}, format="json")
    assert response.status_code == 201 and response.json()["status"] == "queued"
    job_run(JudgeRun, response.json()["id"], judging.judge_work)
    runs = alice_api.get(f"/api/evaluation/{evaluation.pk}/judge").json()
    assert runs[0]["status"] == "completed" and runs[0]["rubric"] == "Prefer valid JSON." and len(runs[0]["verdicts"]) == 4
    assert runs[0]["summary"]["finetuned"] == 4 and runs[0]["agreement"]["count"] == 0
    assert bob_api.get(f"/api/evaluation/{evaluation.pk}/judge").status_code == 404
    assert bob_api.post(f"/api/evaluation/{evaluation.pk}/judge", {}, format="json").status_code == 404
    too_long = alice_api.post(f"/api/evaluation/{evaluation.pk}/judge", {"rubric": "x" * 5000}, format="json")
    assert too_long.status_code == 400 and "under 4,000" in too_long.json()["detail"]


def test_it_keeps_an_evaluation_while_its_judge_is_running(alice, alice_api, evaluation):
    run = JudgeRun.objects.create(owner=alice, evaluation=evaluation, endpoint="http://j/v1", judge_model="m", rubric="r", status="running")
    response = alice_api.delete(f"/api/evaluation/{evaluation.pk}")
    assert response.status_code == 409 and "A judge is working on evaluation" in response.json()["detail"]
    run.status = "completed"
    run.save()
    assert alice_api.delete(f"/api/evaluation/{evaluation.pk}").status_code == 204
    assert not JudgeRun.objects.exists()

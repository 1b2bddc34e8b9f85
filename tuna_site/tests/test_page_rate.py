"""Page rate limit: form posts per user (TUNA_PAGE_RATE), 429 with Retry-After and a readable page; reads,
the API and the log-in pages are limited elsewhere."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.urls import reverse

from datasets_app.models import Dataset
from tests.support import jsonl_file, pc_rows
from tuna_site import throttles
from tuna_site.ratelimit import page_rate_middleware

pytestmark = pytest.mark.django_db


def upload(client, name="orders", **headers):
    return client.post(reverse("dataset-upload"), {"name": name, "file": jsonl_file(pc_rows(12))}, **headers)


@pytest.fixture
def bob_client(bob):
    client = Client()
    client.force_login(bob)
    return client


def test_it_answers_429_with_retry_after_and_a_readable_page_beyond_the_page_rate(alice_client, alice, settings):
    settings.TUNA_PAGE_RATE = "3/min"
    assert [upload(alice_client, f"d{i}").status_code for i in range(3)] == [302, 302, 302]
    assert Dataset.objects.filter(owner=alice).count() == 3
    response = upload(alice_client, "one too many")
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    html = response.content.decode()
    assert "<html" in html and "Slow down" in html
    assert "Too many form posts: the limit is 3 per minute per user (TUNA_PAGE_RATE). Try again in" in html
    assert Dataset.objects.filter(owner=alice).count() == 3  # nothing written
    assert not Dataset.objects.filter(name="one too many").exists()


def test_it_answers_htmx_with_a_fragment(alice_client, settings):
    settings.TUNA_PAGE_RATE = "1/min"
    upload(alice_client, HTTP_HX_REQUEST="true")
    response = upload(alice_client, HTTP_HX_REQUEST="true")
    assert response.status_code == 429 and response["Retry-After"]
    html = response.content.decode()
    assert "<html" not in html and 'id="rate-limited"' in html and "TUNA_PAGE_RATE" in html
    assert (response["HX-Retarget"], response["HX-Reswap"]) == ("main", "afterbegin")  # the form's own target stays


def test_it_counts_each_user_apart(alice_client, bob_client, settings):
    settings.TUNA_PAGE_RATE = "2/min"
    assert [upload(alice_client).status_code for _ in range(3)] == [302, 302, 429]
    assert upload(bob_client).status_code == 302


def test_it_leaves_page_reads_the_api_and_log_ins_alone(alice_client, alice_api, alice, settings):
    settings.TUNA_PAGE_RATE = "1/min"
    upload(alice_client)
    assert upload(alice_client).status_code == 429
    assert alice_client.get(reverse("dashboard")).status_code == 200
    assert alice_client.get(reverse("dataset-list")).status_code == 200
    response = alice_api.post("/api/datasets", {"name": "by api", "file": jsonl_file(pc_rows(12))}, format="multipart")
    assert response.status_code == 201  # the API has its own limit, TUNA_API_RATE
    anonymous = Client()
    for _ in range(3):  # failed log-ins have their own limit (TUNA_LOGIN_FAILURES)
        assert anonymous.post(reverse("login"), {"username": "alice", "password": "wrong"}).status_code == 200
    assert anonymous.post(reverse("login"), {"username": "alice", "password": "alice-pass-123"}).status_code == 302


def test_it_lets_posts_through_again_in_the_next_window(alice_client, settings, monkeypatch):
    settings.TUNA_PAGE_RATE = "2/min"
    now = [60 * 16_667 + 20.0]  # 20 s into a minute
    monkeypatch.setattr(throttles, "_now", lambda: now[0])
    assert [upload(alice_client).status_code for _ in range(3)] == [302, 302, 429]
    assert upload(alice_client)["Retry-After"] == "40"
    now[0] += 40
    assert upload(alice_client).status_code == 302


def test_it_turns_the_page_rate_off(alice_client, settings):
    settings.TUNA_PAGE_RATE = None
    assert {upload(alice_client).status_code for _ in range(8)} == {302}


def test_it_counts_anonymous_posts_per_address(settings):
    settings.TUNA_PAGE_RATE = "2/min"
    statuses = [Client().post(reverse("dataset-upload"), REMOTE_ADDR="203.0.113.5").status_code for _ in range(3)]
    assert statuses == [302, 302, 429]  # the first two go to the log-in page
    assert Client().post(reverse("dataset-upload"), REMOTE_ADDR="203.0.113.6").status_code == 302


def test_it_lets_exactly_the_rate_through_when_posts_arrive_at_once(alice, settings):
    settings.TUNA_PAGE_RATE = "5/min"
    middleware = page_rate_middleware(lambda request: HttpResponse("done"))
    start = threading.Barrier(20)

    def post(_):
        request = RequestFactory().post("/datasets/upload")
        request.user = alice
        start.wait()
        return middleware(request).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(post, range(20)))
    assert sorted(statuses) == [200] * 5 + [429] * 15


def vote_on(alice, valid_dataset):
    """A completed evaluation of four examples to vote on, and a function that votes on one as the page does."""
    from django.utils import timezone

    from evaluation_app.models import Evaluation, EvaluationExample
    from tests.support import job_row

    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nonexistent")
    evaluation = Evaluation.objects.create(
        owner=alice, training_job=job, status="completed", test_size=4, done=4, completed_at=timezone.now(), metrics={}
    )
    for i, side in enumerate("ABBA"):
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=i,
            messages=[{"role": "user", "content": f"q{i}"}],
            reference=f"r{i}",
            base_output=f"b{i}",
            finetuned_output=f"f{i}",
            finetuned_side=side,
        )

    def vote(client, index: int):
        url = reverse("evaluation-vote", args=[evaluation.pk, index % 4])
        return client.post(f"{url}?blind=1", {"choice": "AB"[index % 2]}, HTTP_HX_REQUEST="true")

    return vote


def test_it_counts_blind_votes_in_their_own_generous_bucket(alice_client, alice, valid_dataset, settings):
    """Voting by keyboard is many quick posts: they never meet the page rate nor use up the user's form posts."""
    from evaluation_app.models import Rating

    VOTE_RATE_FACTOR = 10  # noqa: N806 - tuna_site.ratelimit's: votes get 10 x TUNA_PAGE_RATE
    settings.TUNA_PAGE_RATE = "1/min"
    vote = vote_on(alice, valid_dataset)
    assert [vote(alice_client, i).status_code for i in range(VOTE_RATE_FACTOR)] == [200] * VOTE_RATE_FACTOR
    assert Rating.objects.filter(user=alice).count() == 4
    assert upload(alice_client).status_code == 302  # the page rate's one form post is still there
    assert upload(alice_client).status_code == 429

    refused = vote(alice_client, 0)  # the votes' own bound holds too
    assert refused.status_code == 429 and refused["Retry-After"]
    assert f"Too many votes: the limit is {VOTE_RATE_FACTOR} per minute per user ({VOTE_RATE_FACTOR} × TUNA_PAGE_RATE)" in (
        refused.content.decode()
    )

"""A refused vote is answered with the voting panel and its reason, every value in it escaped: the raw choice a
client sent never reaches the page as HTML (htmx swaps the answer into the page, 4xx included)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from evaluation_app.models import Rating

pytestmark = pytest.mark.django_db

PAYLOAD = '<img src=x onerror="alert(document.cookie)">'


def vote(client, evaluation, index: int, choice: str, **headers):
    return client.post(reverse("evaluation-vote", args=[evaluation.pk, index]), {"choice": choice}, **headers)


def test_it_escapes_a_refused_vote_s_value_in_the_htmx_answer(alice_client, alice, evaluation):
    response = vote(alice_client, evaluation, 1, PAYLOAD, HTTP_HX_REQUEST="true")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "<img" not in html
    assert "&lt;img src=x onerror=" in html  # the value is shown, as text
    assert 'id="vote-error"' in html and "preferred_model must be one of" in html
    assert 'data-index="1"' in html  # the same example stays open to vote on again
    assert not Rating.objects.filter(user=alice).exists()


def test_it_escapes_a_refused_vote_on_an_example_that_does_not_exist(alice_client, alice, evaluation):
    response = vote(alice_client, evaluation, 99, PAYLOAD, HTTP_HX_REQUEST="true")

    assert response.status_code == 400
    html = response.content.decode()
    assert "<img" not in html and "&lt;img src=x" in html
    assert 'data-index="0"' in html  # the first example not voted on yet opens instead
    assert not Rating.objects.filter(user=alice).exists()


def test_it_escapes_a_refused_vote_s_value_in_the_page_after_a_plain_post(alice_client, alice, evaluation):
    response = vote(alice_client, evaluation, 1, PAYLOAD, follow=True)

    assert response.status_code == 200
    html = response.content.decode()
    assert PAYLOAD not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=" in html
    assert not Rating.objects.filter(user=alice).exists()


def test_it_still_records_a_valid_vote_after_a_refused_one(alice_client, alice, evaluation):
    assert vote(alice_client, evaluation, 0, PAYLOAD, HTTP_HX_REQUEST="true").status_code == 400
    response = vote(alice_client, evaluation, 0, "A", HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert Rating.objects.get(user=alice, example__index=0).preferred_model == evaluation.examples.get(index=0).model_for_side("A")

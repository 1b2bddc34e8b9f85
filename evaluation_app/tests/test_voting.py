"""Blind voting, win rate, exports and the API, on stored results (no model needed)."""

import json

import pytest
from django.urls import reverse

from evaluation_app import services
from evaluation_app.models import Evaluation, Rating
from tests.support import job_row
from tuna_llm import metrics

pytestmark = pytest.mark.django_db


def test_it_computes_the_wilson_interval_like_by_hand():
    low, high = metrics.wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    low, high = metrics.wilson_interval(0, 4)
    assert low == 0.0 and round(high, 4) == 0.4899
    assert metrics.wilson_interval(0, 0) is None


def test_it_scores_quality_with_the_standard_packages():
    assert metrics.exact_match('{"a": 1}', '{"a":1}') == 0.0
    assert metrics.exact_match(" hello  world\n", "hello world") == 1.0
    assert metrics.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert 0 < metrics.rouge_l("the cat", "the cat sat on the mat") < 1
    assert metrics.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    diff = metrics.improvements({"exact_match": 0.1, "latency_mean_ms": 100}, {"exact_match": 0.9, "latency_mean_ms": 120})
    assert diff["exact_match"]["direction"] == "better" and diff["latency_mean_ms"]["direction"] == "worse"


def test_it_keeps_blind_labels_stable_across_reloads(alice_client, evaluation):
    url = reverse("evaluation-detail", args=[evaluation.pk])
    first = alice_client.get(url, {"example": 1}).content.decode()
    second = alice_client.get(url, {"example": 1}).content.decode()

    def sides(html):
        return html[html.index('id="example-view"') :].split("vote-form")[0]

    assert sides(first) == sides(second)
    # Example 1 has the fine-tuned answer on side B, and the names stay hidden before a vote.
    assert first.index("base answer 1") < first.index("tuned answer 1")
    assert "B: Fine-tuned" not in first and "&lt;b&gt;1&lt;/b&gt;" in first


def test_it_reveals_the_models_after_a_vote_and_lets_me_change_it(alice_client, alice, evaluation):
    url = reverse("evaluation-vote", args=[evaluation.pk, 1])
    response = alice_client.post(url, {"choice": "B"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="last-vote"' in html and "B was the fine-tuned model" in html
    assert 'id="win-rate-card"' in html and 'hx-swap-oob="true"' in html
    assert Rating.objects.get(user=alice).preferred_model == "finetuned"
    # Back on example 1, the names are shown and the vote can be changed.
    back = alice_client.get(reverse("evaluation-example", args=[evaluation.pk, 1]), HTTP_HX_REQUEST="true").content.decode()
    assert "B: Fine-tuned" in back and "A: Base" in back and 'id="your-vote"' in back
    alice_client.post(url, {"choice": "A"}, HTTP_HX_REQUEST="true")
    assert Rating.objects.get(user=alice).preferred_model == "base"
    assert Rating.objects.count() == 1


def test_it_leaves_the_blind_win_rate_alone_for_a_vote_cast_with_names_shown(alice_client, alice, evaluation):
    url = reverse("evaluation-vote", args=[evaluation.pk, 0])
    response = alice_client.post(f"{url}?blind=0", {"choice": "A", "blind": "0"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    rating = Rating.objects.get(user=alice)
    assert rating.preferred_model == "finetuned" and rating.blind is False
    summary = services.vote_summary(evaluation, alice)
    assert summary["win_rate"] is None and summary["decisive"] == 0 and summary["shown"] == 1
    assert summary["cast"] == 1 and summary["remaining"] == 3
    assert "1 vote cast with names shown is not counted in the blind win rate" in response.content.decode()


def test_it_counts_a_vote_cast_blind_in_the_win_rate(alice_client, alice, evaluation):
    response = alice_client.post(reverse("evaluation-vote", args=[evaluation.pk, 0]), {"choice": "A", "blind": "1"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert Rating.objects.get(user=alice).blind is True
    summary = services.vote_summary(evaluation, alice)
    assert summary["win_rate"] == 1.0 and summary["decisive"] == 1 and summary["shown"] == 0
    assert 'id="win-rate">1.00<' in response.content.decode()


def test_it_marks_a_vote_changed_after_the_reveal_as_not_blind(alice_client, alice, evaluation):
    url = reverse("evaluation-vote", args=[evaluation.pk, 0])
    alice_client.post(url, {"choice": "A", "blind": "1"}, HTTP_HX_REQUEST="true")  # example 0: A is the fine-tune
    alice_client.post(url, {"choice": "B", "blind": "1"}, HTTP_HX_REQUEST="true")  # the names were shown after the first vote
    rating = Rating.objects.get(user=alice)
    assert rating.preferred_model == "base" and rating.blind is False
    assert services.vote_summary(evaluation, alice)["win_rate"] is None


def test_it_takes_a_blind_flag_in_the_rate_api(alice_api, alice, evaluation):
    url = f"/api/evaluation/{evaluation.pk}/rate"
    first = alice_api.post(url, {"example_index": 0, "preferred_model": "finetuned"}, format="json")
    assert first.status_code == 201 and first.json()["blind"] is True
    shown = alice_api.post(url, {"example_index": 1, "preferred_model": "base", "blind": False}, format="json")
    assert shown.status_code == 201 and shown.json()["blind"] is False
    assert dict(Rating.objects.values_list("example__index", "blind")) == {0: True, 1: False}
    votes = alice_api.get(f"/api/evaluation/{evaluation.pk}").json()["votes"]
    assert votes["win_rate"] == 1.0 and votes["shown"] == 1 and votes["cast"] == 2


def test_it_rates_through_the_api_one_vote_per_user_per_example(alice_api, alice, evaluation):
    url = f"/api/evaluation/{evaluation.pk}/rate"
    assert alice_api.post(url, {"example_index": 0, "preferred_model": "finetuned"}, format="json").status_code == 201
    assert alice_api.post(url, {"example_index": 0, "preferred_model": "tie"}, format="json").status_code == 201
    assert Rating.objects.get(user=alice, example__index=0).preferred_model == "tie"
    assert Rating.objects.count() == 1
    bad_index = alice_api.post(url, {"example_index": 9, "preferred_model": "base"}, format="json")
    assert bad_index.status_code == 400 and "between 0 and 3" in bad_index.json()["detail"]
    bad_value = alice_api.post(url, {"example_index": 0, "preferred_model": "mine"}, format="json")
    assert bad_value.status_code == 400 and "preferred_model" in bad_value.json()["detail"]


def test_it_summarises_votes_with_win_rate_and_interval(alice, evaluation):
    for index, choice in enumerate(["finetuned", "finetuned", "base", "tie"]):
        services.rating_set(user=alice, evaluation=evaluation, example_index=index, preferred_model=choice, blind=True)
    summary = services.vote_summary(evaluation, alice)
    assert summary["cast"] == 4 and summary["remaining"] == 0 and summary["decisive"] == 3
    assert summary["win_rate"] == pytest.approx(2 / 3)
    # Worked by hand: p = 2/3, n = 3, z = 1.96: centre (p + z²/2n) / (1 + z²/n) = 0.5731,
    # half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.3654.
    assert summary["interval"] == pytest.approx((0.2077, 0.9385), abs=1e-4)
    assert summary["counts"]["tie"] == 1


def test_it_exports_votes_as_a_preference_dataset(alice_client, alice_api, alice, evaluation):
    services.rating_set(user=alice, evaluation=evaluation, example_index=0, preferred_model="finetuned", blind=True)
    services.rating_set(user=alice, evaluation=evaluation, example_index=1, preferred_model="base", blind=True)
    services.rating_set(user=alice, evaluation=evaluation, example_index=2, preferred_model="both_bad", blind=True)
    response = alice_client.get(reverse("evaluation-preferences", args=[evaluation.pk]))
    rows = [json.loads(line) for line in response.content.decode().splitlines()]
    assert rows[0] == {
        "prompt": "prompt <b>0</b>",
        "messages": [{"role": "user", "content": "prompt <b>0</b>"}],
        "chosen": "tuned answer 0",
        "rejected": "base answer 0",
    }
    assert rows[1]["chosen"] == "base answer 1" and len(rows) == 2
    assert alice_api.get(f"/api/evaluation/{evaluation.pk}/preferences.jsonl").content == response.content


def test_it_shows_test_results_and_metrics_in_the_api(alice_api, evaluation):
    body = alice_api.get(f"/api/evaluation/{evaluation.pk}").json()
    assert body["status"] == "completed" and body["progress"] == {"done": 4, "total": 4, "percent": 100.0}
    first = body["test_results"][0]
    assert {
        "prompt",
        "reference",
        "base_output",
        "finetuned_output",
        "base_latency_ms",
        "finetuned_latency_ms",
        "base_tokens",
        "finetuned_tokens",
    } <= set(first)
    assert body["metrics"]["finetuned_model"]["exact_match"] == 1.0
    assert alice_api.get("/api/evaluation").json()["count"] == 1


def test_it_starts_one_run_per_job_however_often_asked(alice_api, job, valid_dataset):
    first = alice_api.post("/api/evaluation/run", {"training_job_id": job.pk, "test_size": 50}, format="json")
    assert first.status_code == 201
    assert first.json()["test_size"] == valid_dataset.num_eval  # capped at the held-out count
    second = alice_api.post("/api/evaluation/run", {"training_job_id": job.pk}, format="json")
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    assert Evaluation.objects.count() == 1


def test_it_refuses_to_evaluate_an_unfinished_job(alice_api, alice, valid_dataset):
    queued = job_row(alice, valid_dataset)
    response = alice_api.post("/api/evaluation/run", {"training_job_id": queued.pk}, format="json")
    assert response.status_code == 409 and "only a completed fine-tune" in response.json()["detail"]


def test_it_polls_progress_until_done(alice_client, alice, job):
    running = Evaluation.objects.create(owner=alice, training_job=job, status="running", test_size=10, done=3)
    url = reverse("evaluation-detail", args=[running.pk])
    fragment = alice_client.get(url, {"fragment": "progress"}, HTTP_HX_REQUEST="true").content.decode()
    assert "3 of 10 examples" in fragment and "every 2s" in fragment
    Evaluation.objects.filter(pk=running.pk).update(status="completed")
    done = alice_client.get(url, {"fragment": "progress"}, HTTP_HX_REQUEST="true")
    assert done["HX-Refresh"] == "true"

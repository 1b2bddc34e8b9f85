"""Every figure a vote changes comes back with the vote (htmx out-of-band swaps), no reload needed."""

import re

import pytest
from django.urls import reverse
from django.utils import timezone

from evaluation_app.models import Evaluation, EvaluationExample, JudgeRun, JudgeVerdict
from tests.support import job_row

pytestmark = pytest.mark.django_db


def vote(client, evaluation, index: int, choice: str, blind: str = "1") -> str:
    url = reverse("evaluation-vote", args=[evaluation.pk, index])
    response = client.post(f"{url}?blind={blind}", {"choice": choice, "blind": blind}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    return response.content.decode()


def out_of_band(html: str, element_id: str) -> str | None:
    """The out-of-band element with this id in a response, or None."""
    found = re.search(
        rf'<(\w+)\b[^>]*\bid="{element_id}"[^>]*\bhx-swap-oob="true"[^>]*>(.*?)</\1>\s*(?=<\w+\b[^>]*\bhx-swap-oob|$)', html, re.S
    )
    return found.group(2) if found else None


def test_it_updates_the_pair_counts_and_the_win_rate_with_each_blind_vote(alice_client, evaluation):
    # Example sides are A, B, B, A for the fine-tune: three decisive blind votes, as in the issue.
    for index, choice in enumerate(["A", "A", "B"]):
        html = vote(alice_client, evaluation, index, choice)
    pairs = out_of_band(html, "train-preferences")
    assert pairs is not None and re.search(r"<strong>3</strong> pairs from your blind votes", pairs)
    assert out_of_band(html, "win-rate-card") is not None and "2 won, 1 lost, 0 ties" in html
    comparison = out_of_band(html, "comparison")
    assert comparison is not None and "Vote on the 1 example left below" in comparison
    # The main swap (the next example to vote on) is still there, outside the out-of-band elements.
    assert 'data-index="3"' in html
    # A tie makes no pair, and the count says so.
    assert "<strong>3</strong> pairs" in out_of_band(vote(alice_client, evaluation, 3, "tie"), "train-preferences")


def test_it_reveals_the_comparison_with_the_last_blind_vote_and_not_again(alice_client, evaluation):
    for index in range(3):
        vote(alice_client, evaluation, index, "A")
    last = vote(alice_client, evaluation, 3, "B")
    comparison = out_of_band(last, "comparison")
    assert comparison is not None and 'id="compare-0"' in comparison and "Hidden while you vote blind" not in comparison
    assert 'id="vote-done"' in last
    # Changing a vote after the reveal leaves the comparison (and the page it is on) alone; the counts still follow.
    changed = vote(alice_client, evaluation, 0, "B")
    assert out_of_band(changed, "comparison") is None and out_of_band(changed, "train-preferences") is not None


def test_it_leaves_the_blind_pair_count_alone_for_a_vote_with_names_shown(alice_client, evaluation):
    html = vote(alice_client, evaluation, 0, "A", blind="0")
    assert "<strong>0</strong> pairs from your blind votes" in out_of_band(html, "train-preferences")
    assert out_of_band(html, "comparison") is None  # nothing is hidden with the names shown


def test_it_updates_the_judges_agreement_with_the_votes(alice, alice_client, evaluation, settings):
    settings.TUNA_JUDGE_URL, settings.TUNA_JUDGE_MODEL = "http://judge.example/v1", "judge-model"
    run = JudgeRun.objects.create(
        owner=alice, evaluation=evaluation, endpoint="http://judge/v1", judge_model="m", rubric="r", status="completed"
    )
    for example in evaluation.examples.order_by("index"):
        JudgeVerdict.objects.create(
            run=run, example=example, winner="finetuned", consistent=True, base_first="finetuned", finetuned_first="finetuned"
        )
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert 'id="judge-agreement"' in page and "0 of 0 examples" in page
    agreement = out_of_band(vote(alice_client, evaluation, 0, "A"), "judge-agreement")
    assert agreement is not None and "1 of 1 example" in agreement


def test_it_updates_a_preference_tuned_jobs_blind_win_rate(alice, alice_client, valid_dataset, evaluation):
    parent = evaluation.training_job
    tuned = job_row(
        alice, valid_dataset, status="completed", method="dpo", parent=parent, adapter_dir="/nonexistent", preference_pairs=[{}]
    )
    against_parent = Evaluation.objects.create(
        owner=alice,
        training_job=tuned,
        baseline_job=parent,
        status="completed",
        test_size=2,
        done=2,
        completed_at=timezone.now(),
        metrics={},
    )
    for i in range(2):
        EvaluationExample.objects.create(
            evaluation=against_parent,
            index=i,
            messages=[{"role": "user", "content": "p"}],
            reference="r",
            base_output="x",
            finetuned_output="y",
            finetuned_side="A",
        )
    result = out_of_band(vote(alice_client, against_parent, 0, "A"), "preference-result")
    assert result is not None and "1 won, 0 lost" in result


def test_it_keeps_another_users_evaluation_out_of_reach(bob, client, evaluation):
    client.force_login(bob)
    response = client.post(reverse("evaluation-vote", args=[evaluation.pk, 0]), {"choice": "A"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 404

"""The comparison page: verdict first, answers against the reference, voting that moves on, queue, re-run."""

import pytest
from django.urls import reverse
from django.utils import timezone

from evaluation_app import selectors
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from tests.support import job_row
from tuna_core.jobs import queue_position

pytestmark = pytest.mark.django_db


def _metrics(base: dict, tuned: dict) -> dict:
    return {"base_model": base, "finetuned_model": tuned, "improvements": {}, "hourly_usd": 2.0}


@pytest.fixture
def scored(evaluation):
    """The shared 4-example evaluation, with the fine-tune right on all four and the base on none."""
    evaluation.metrics = _metrics(
        {"exact_match": 0.0, "rouge_l": 0.31, "bleu": 0.1, "heldout_loss": 2.5, "count": 4},
        {"exact_match": 1.0, "rouge_l": 1.0, "bleu": 1.0, "heldout_loss": 0.4, "count": 4},
    )
    evaluation.save()
    for example in evaluation.examples.all():
        example.finetuned_output = example.reference
        example.save()
    return evaluation


@pytest.mark.parametrize(
    ("base", "tuned", "expected"),
    [
        # exact matches out of 20: the bar is max(1, 10% of 20) = 2 more (or fewer)
        ((0.0, 0.40), (0.10, 0.40), "better"),
        ((0.10, 0.40), (0.0, 0.40), "worse"),
        ((0.10, 0.40), (0.15, 0.40), "no_difference"),  # one more exact match out of 20
        ((0.10, 0.40), (0.10, 0.46), "better"),  # ROUGE-L up 0.06, exact matches held
        ((0.10, 0.40), (0.05, 0.50), "no_difference"),  # ROUGE-L up but an exact match lost
        ((0.10, 0.40), (0.10, 0.36), "no_difference"),
        ((0.10, 0.40), (0.10, 0.34), "worse"),
    ],
)
def test_it_calls_the_verdict_from_exact_matches_and_rouge_l(base, tuned, expected):
    evaluation = Evaluation(
        test_size=20,
        metrics=_metrics(
            {"exact_match": base[0], "rouge_l": base[1], "heldout_loss": 1.0, "count": 20},
            {"exact_match": tuned[0], "rouge_l": tuned[1], "heldout_loss": 0.9, "count": 20},
        ),
    )
    assert selectors.comparison_verdict(evaluation)["key"] == expected


def test_it_says_whether_fine_tuning_helped_before_anything_else(alice_client, scored):
    html = alice_client.get(reverse("evaluation-detail", args=[scored.pk]), {"blind": "0"}).content.decode()
    assert "Better" in html and "0/4 → 4/4" in html and "0.31 → 1.00" in html and "2.500 → 0.400" in html
    verdict, comparison = html.index('class="card verdict'), html.index('id="comparison"')
    voting, details = html.index('id="example-view"'), html.index("<h2>Metrics</h2>")
    assert verdict < comparison < voting < details


def test_it_shows_each_answer_against_the_reference_with_a_word_diff(alice_client, scored):
    EvaluationExample.objects.filter(evaluation=scored, index=0).update(
        reference="ship <b>two</b> red hats", base_output="ship three red hats"
    )
    html = alice_client.get(reverse("evaluation-detail", args=[scored.pk]), {"blind": "0"}).content.decode()
    comparison = html[html.index('id="comparison"') : html.index('id="example-view"')]
    assert "<del>&lt;b&gt;two&lt;/b&gt;</del><ins>three</ins>" in comparison  # escaped, never |safe
    assert "✓ exact" in comparison and "ROUGE-L 1.00" in comparison
    assert selectors.word_diff("the cat sat", "the dog sat") == [("same", "the "), ("del", "cat"), ("ins", "dog"), ("same", " sat")]
    assert selectors.word_diff("订单两件", "订单三件") == [("same", "订单"), ("del", "两"), ("ins", "三"), ("same", "件")]


def test_it_keeps_the_named_answers_hidden_while_voting_blind(alice_client, scored):
    html = alice_client.get(reverse("evaluation-detail", args=[scored.pk])).content.decode()
    comparison = html[html.index('id="comparison"') : html.index('id="example-view"')]
    assert "base answer" not in comparison and "Show model names" in comparison


def test_it_moves_on_to_the_next_unvoted_example_after_a_vote(alice_client, alice, evaluation):
    Rating.objects.create(example=evaluation.examples.get(index=1), user=alice, preferred_model="tie", blind=True)
    page = alice_client.get(reverse("evaluation-detail", args=[evaluation.pk])).content.decode()
    assert 'data-shortcut="a"' in page and 'data-shortcut="x"' in page and "js/voting.js" in page

    def vote(index):
        response = alice_client.post(reverse("evaluation-vote", args=[evaluation.pk, index]), {"choice": "A"}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        return response.content.decode()

    assert 'data-index="2"' in vote(0)  # 1 is already voted
    assert 'data-index="3"' in vote(2)
    done = vote(3)
    assert "data-index" not in done and "You have voted on all 4 examples" in done
    assert Rating.objects.filter(user=alice).count() == 4


def test_it_shows_how_many_jobs_are_ahead_of_a_queued_evaluation(alice_client, alice, job, valid_dataset):
    job_row(alice, valid_dataset, status="training")  # running now
    job_row(alice, valid_dataset)  # queued before
    earlier = Evaluation.objects.create(owner=alice, training_job=job, test_size=4)
    mine = Evaluation.objects.create(owner=alice, training_job=job, test_size=4)
    Evaluation.objects.create(owner=alice, training_job=job, test_size=4)  # queued after: not ahead
    assert queue_position(earlier) == 2 and queue_position(mine) == 3
    html = alice_client.get(reverse("evaluation-detail", args=[mine.pk])).content.decode()
    assert "3 jobs ahead of this one" in html
    fragment = alice_client.get(reverse("evaluation-detail", args=[mine.pk]), {"fragment": "progress"}, HTTP_HX_REQUEST="true")
    assert "3 jobs ahead of this one" in fragment.content.decode()


def test_it_runs_a_failed_evaluation_again(alice_client, alice, job):
    failed = Evaluation.objects.create(
        owner=alice, training_job=job, status="failed", test_size=3, error_message="Out of memory.", completed_at=timezone.now()
    )
    html = alice_client.get(reverse("evaluation-detail", args=[failed.pk])).content.decode()
    rerun_url = reverse("evaluation-rerun", args=[failed.pk])
    assert "Out of memory." in html and f'action="{rerun_url}"' in html and "Run again" in html
    response = alice_client.post(rerun_url)
    fresh = Evaluation.objects.exclude(pk=failed.pk).get()
    assert (fresh.status, fresh.test_size, fresh.training_job_id) == ("queued", 3, job.pk)
    assert response.status_code == 302 and response["Location"] == fresh.get_absolute_url()


def test_it_answers_404_for_another_users_evaluation(client, bob, evaluation):
    client.force_login(bob)
    assert client.get(reverse("evaluation-detail", args=[evaluation.pk])).status_code == 404
    assert client.get(reverse("evaluation-example", args=[evaluation.pk, 0]), HTTP_HX_REQUEST="true").status_code == 404
    assert client.post(reverse("evaluation-vote", args=[evaluation.pk, 0]), {"choice": "A"}).status_code == 404
    assert client.post(reverse("evaluation-rerun", args=[evaluation.pk])).status_code == 404
    assert not Rating.objects.exists() and Evaluation.objects.count() == 1

"""Votes that train: blind votes on a real evaluation -> a DPO job on top of the adapter -> evaluated against its parent."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.urls import reverse

from evaluation_app import services
from evaluation_app.models import Evaluation, EvaluationExample, JudgeRun, JudgeVerdict, Rating
from evaluation_app.selectors import training_pairs
from training_app import services as training_services
from training_app.models import TrainingJob
from training_app.tests.test_training import AtStep, SimulatedCrash, train
from tuna_core.jobs import job_run, jobs_reap, run_next_job
from tuna_llm import metrics

pytestmark = pytest.mark.django_db


@pytest.mark.model
def test_it_trains_on_votes_changes_the_answers_and_evaluates_against_the_parent(alice, valid_dataset, alice_client, alice_api, settings):
    settings.TUNA_MIN_PREFERENCE_PAIRS = 3
    parent = training_services.training_job_start(
        owner=alice,
        dataset=valid_dataset,
        config_data={"max_steps": 6, "batch_size": 4, "max_seq_length": 128, "learning_rate": 1e-3, "eval_examples": 0},
    )
    run_next_job()
    source, _ = services.evaluation_start(owner=alice, job=TrainingJob.objects.get(pk=parent.pk), test_size=4)
    job_run(Evaluation, source.pk, services.evaluation_work)
    source.refresh_from_db()
    assert source.status == "completed", source.error_message

    # Blind votes for the base model's answers: the preference-tuned adapter should move towards them.
    examples = list(EvaluationExample.objects.filter(evaluation=source))
    for example in examples:
        services.rating_set(user=alice, evaluation=source, example_index=example.index, preferred_model="base", blind=True)
    voted = [e for e in examples if e.base_output != e.finetuned_output]
    assert len(voted) >= 3

    # 30 updates (the default for more pairs; 4 pairs alone would get 10, which at the cautious default rate of
    # 5e-5 leaves these answers as they were).
    response = alice_api.post(f"/api/evaluation/{source.pk}/train-on-preferences", {"epochs": 30}, format="json")
    child = TrainingJob.objects.get(method="dpo")
    assert response.status_code == 201 and response.json()["id"] == child.pk and child.config["num_epochs"] == 30
    assert (child.parent_id, child.source_evaluation_id, child.step_offset) == (parent.pk, source.pk, 0)
    assert [p["chosen"] for p in child.preference_pairs] == [e.base_output for e in voted]
    assert [p["rejected"] for p in child.preference_pairs] == [e.finetuned_output for e in voted]

    # A crash mid-run, then a resume from the last checkpoint, as for any training job.
    def crash():
        raise SimulatedCrash()

    with pytest.raises(SimulatedCrash):
        train(child, AtStep(5, crash))  # after checkpoint-3
    assert jobs_reap()["training jobs"] == 1
    child.refresh_from_db()
    training_services.training_job_resume(job=child)
    run_next_job()
    child.refresh_from_db()
    assert child.status == "completed", child.error_message
    steps = list(child.loss_points.exclude(loss=None).values_list("step", "loss"))
    assert [s for s, _ in steps] == list(range(1, child.total_steps + 1))
    assert steps[0][1] >= 0.69  # DPO's part starts at ln 2 (no preference yet), plus the chosen answers' own loss
    assert steps[-1][1] < steps[0][1]
    adapter = Path(child.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "ref").exists()  # the frozen reference is not kept
    assert child.cost_usd > 0 and child.tokens_seen > 0

    # Evaluated against its parent automatically, on the same held-out examples.
    comparison = Evaluation.objects.get(training_job=child)
    assert (comparison.baseline_job_id, comparison.status, comparison.test_size) == (parent.pk, "queued", 4)
    job_run(Evaluation, comparison.pk, services.evaluation_work)
    comparison.refresh_from_db()
    assert comparison.status == "completed", comparison.error_message
    rows = list(EvaluationExample.objects.filter(evaluation=comparison))
    assert [r.messages for r in rows] == [e.messages for e in examples]
    assert [r.base_output for r in rows] == [e.finetuned_output for e in examples]  # the parent answers as it did
    changed = [r for r, e in zip(rows, examples, strict=True) if r.finetuned_output != e.finetuned_output]
    assert changed, "preference tuning changed no answer"
    towards = sum(metrics.rouge_l(r.finetuned_output, e.base_output) for r, e in zip(rows, examples, strict=True))
    before = sum(metrics.rouge_l(e.finetuned_output, e.base_output) for e in examples)
    assert towards > before  # closer to the chosen answers than the parent was

    page = alice_client.get(comparison.get_absolute_url() + "?blind=0").content.decode()
    assert f"preference-tuned job #{child.pk} vs its parent, job #{parent.pk}" in page
    assert 'id="preference-result"' in page and "of these 4 prompts were among them" in page
    for row in rows:
        services.rating_set(user=alice, evaluation=comparison, example_index=row.index, preferred_model="finetuned", blind=True)
    page = alice_client.get(comparison.get_absolute_url() + "?blind=0").content.decode()
    assert "4 won, 0 lost" in page and "Better: the whole 95% interval is above 0.5." in page
    job_page = alice_client.get(child.get_absolute_url()).content.decode()
    assert "Preference-tuning job" in job_page and f"against job #{parent.pk}" in job_page


@pytest.fixture
def voted(alice, evaluation):
    """The stored 4-example evaluation, with a blind vote for each side, a tie and a vote cast with names shown."""
    votes = [("finetuned", True), ("base", True), ("tie", True), ("base", False)]
    for example, (choice, blind) in zip(evaluation.examples.order_by("index"), votes, strict=True):
        Rating.objects.create(example=example, user=alice, preferred_model=choice, blind=blind)
    return evaluation


def test_it_refuses_too_few_pairs_with_the_number_needed(alice, alice_api, alice_client, voted):
    response = alice_api.post(f"/api/evaluation/{voted.pk}/train-on-preferences", {}, format="json")
    assert response.status_code == 400
    assert "needs at least 8 pairs; this evaluation gives 2" in response.json()["detail"] and "Vote on 6 more" in response.json()["detail"]
    page = alice_client.post(reverse("evaluation-train-preferences", args=[voted.pk]), follow=True).content.decode()
    assert "needs at least 8 pairs" in page
    assert TrainingJob.objects.filter(method="dpo").count() == 0


def test_it_takes_judge_verdicts_only_when_asked_and_only_where_nobody_voted(alice, voted):
    run = JudgeRun.objects.create(owner=alice, evaluation=voted, endpoint="http://j/v1", judge_model="m", rubric="r", status="completed")
    for example, (winner, consistent) in zip(
        voted.examples.order_by("index"), [("base", True), ("base", True), ("finetuned", True), ("finetuned", False)], strict=True
    ):
        JudgeVerdict.objects.create(
            run=run, example=example, winner=winner, consistent=consistent, base_first=winner, finetuned_first=winner
        )
    pairs = training_pairs(voted, alice)
    assert [(p["example_index"], p["source"], p["chosen"]) for p in pairs] == [(0, "vote", "tuned answer 0"), (1, "vote", "base answer 1")]
    with_judge = training_pairs(voted, alice, include_judge=True)
    # Example 2: the user's tie stands; example 3: voted with names shown, so neither the vote nor the judge counts.
    assert [(p["example_index"], p["source"]) for p in with_judge] == [(0, "vote"), (1, "vote")]
    Rating.objects.filter(example__index=2).delete()
    with_judge = training_pairs(voted, alice, include_judge=True)
    assert [(p["example_index"], p["source"], p["chosen"]) for p in with_judge][-1] == (2, "judge", "tuned answer 2")


def test_it_starts_a_preference_job_over_the_api_for_the_owner_only(alice, settings, alice_api, bob_api, voted):
    settings.TUNA_MIN_PREFERENCE_PAIRS = 2
    voted.training_job.config = {"base_model": "smollm2-135m-instruct", "batch_size": 4, "learning_rate": 1e-3}
    voted.training_job.save()
    assert bob_api.post(f"/api/evaluation/{voted.pk}/train-on-preferences", {}, format="json").status_code == 404
    response = alice_api.post(f"/api/evaluation/{voted.pk}/train-on-preferences", {"epochs": 3}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["method"] == "dpo" and body["preference_pairs"] == 2 and body["source_evaluation_id"] == voted.pk
    assert body["parent_id"] == voted.training_job_id and body["config"]["num_epochs"] == 3 and body["status"] == "queued"
    bad = alice_api.post(f"/api/evaluation/{voted.pk}/train-on-preferences", {"epochs": 0}, format="json")
    assert bad.status_code == 400 and "epochs" in bad.json()["errors"]
    again = alice_api.post(f"/api/training/{body['id']}/continue", {}, format="json")
    assert again.status_code == 409  # a preference-tuned job is not trained further on the dataset


def test_it_starts_a_preference_job_from_the_page_with_the_epochs_asked_for(alice, settings, alice_client, voted):
    settings.TUNA_MIN_PREFERENCE_PAIRS = 2
    voted.training_job.config = {"base_model": "smollm2-135m-instruct", "batch_size": 4, "learning_rate": 1e-3}
    voted.training_job.save()
    url = reverse("evaluation-train-preferences", args=[voted.pk])
    page = alice_client.post(url, {"epochs": "many"}, follow=True).content.decode()
    assert "Must be a whole number from 1 to 50; got &#x27;many&#x27;" in page
    assert TrainingJob.objects.filter(method="dpo").count() == 0
    response = alice_client.post(url, {"epochs": "3"})
    child = TrainingJob.objects.get(method="dpo")
    assert response.status_code == 302 and response["Location"] == child.get_absolute_url()
    assert child.config["num_epochs"] == 3 and child.config_reasons["num_epochs"] == "set by you"
    assert alice_client.post(url, {"epochs": ""}).status_code == 302  # blank: chosen for about 30 updates
    assert TrainingJob.objects.filter(method="dpo").latest("pk").config_reasons["num_epochs"].endswith("about 30 updates")

"""Runs compared on the same examples: the Runs page and API, scoring, and two fine-tunes side by side.

The tests marked `model` score real runs with the session's trained adapter (conftest.trained_adapter, tiny
settings) on a scoring set of two held-out examples; the others use stored rows.
"""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone

from datasets_app.examples import held_out_examples
from datasets_app.services import dataset_create
from evaluation_app import runs, services
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from tests.support import job_row, jsonl_file, pc_rows
from training_app.models import LossPoint, TrainingJob
from tuna_core.jobs import run_next_job

pytestmark = pytest.mark.django_db


def _run(owner, dataset, adapter="/nonexistent", **fields):
    """A completed fine-tune of ``dataset``."""
    return job_row(owner, dataset, status="completed", adapter_dir=str(adapter), completed_at=timezone.now(), **fields)


def _scored(job, *, size: int, exact: float, task: dict | None = None) -> Evaluation:
    """A completed scoring evaluation of ``job`` (against the base, on the first ``size`` held-out examples)."""
    tuned = {"exact_match": exact, "rouge_l": exact, "heldout_loss": 1 - exact, "count": size, **(task or {})}
    evaluation = Evaluation.objects.create(
        owner=job.owner,
        training_job=job,
        status="completed",
        test_size=size,
        done=size,
        completed_at=timezone.now(),
        metrics={"base_model": {"exact_match": 0.0, "rouge_l": 0.1, "count": size}, "finetuned_model": tuned, "improvements": {}},
    )
    for index, example in enumerate(held_out_examples(job.dataset)[:size]):
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=index,
            messages=list(example[:-1]),
            reference=example[-1]["content"],
            base_output="base",
            finetuned_output="tuned",
            finetuned_side="AB"[index % 2],
        )
    return evaluation


@pytest.fixture
def scoring_two(settings, valid_dataset):
    """Every run of the test dataset is scored on its first two held-out examples."""
    settings.TUNA_MAX_EVAL_EXAMPLES = 2
    settings.TUNA_MAX_ACTIVE_JOBS_PER_USER = 10
    assert runs.scoring_size(valid_dataset) == 2
    return valid_dataset


# -- the scoring set -------------------------------------------------------------------------------
def test_it_fixes_the_scoring_set_the_first_time_it_is_used(settings, valid_dataset):
    assert valid_dataset.scoring_size is None and valid_dataset.num_eval == 4
    settings.TUNA_MAX_EVAL_EXAMPLES = 3
    assert runs.scoring_size(valid_dataset) == 3
    valid_dataset.refresh_from_db()
    assert valid_dataset.scoring_size == 3
    settings.TUNA_MAX_EVAL_EXAMPLES = 2  # a later change of the limit does not move the runs' common examples
    assert runs.scoring_size(valid_dataset) == 3


def test_it_queues_one_scoring_evaluation_per_run_against_the_base(alice, scoring_two):
    parent = _run(alice, scoring_two)
    dpo = _run(alice, scoring_two, method="dpo", parent=parent)
    evaluation, created = runs.scoring_start(owner=alice, job=dpo)
    assert created and evaluation.status == "queued"
    assert (evaluation.test_size, evaluation.baseline_job_id) == (2, None)  # a DPO run is scored against the base too
    again, created = runs.scoring_start(owner=alice, job=dpo)
    assert again == evaluation and not created
    # The usual evaluation of a preference-tuned job is still against its parent, and is not its scoring evaluation.
    usual, created = services.evaluation_start(owner=alice, job=dpo, test_size=2)
    assert created and usual.baseline_job_id == parent.pk
    assert runs.scoring_evaluations([dpo]) == {dpo.pk: evaluation}


def test_it_does_not_count_an_evaluation_on_other_examples(alice, scoring_two):
    job = _run(alice, scoring_two)
    _scored(job, size=1, exact=1.0)  # on fewer examples than the scoring set
    assert runs.scoring_evaluations([job]) == {}
    other = _scored(job, size=2, exact=1.0)
    other.examples.filter(index=1).update(messages=[{"role": "user", "content": "an example of an older held-out file"}])
    assert runs.scoring_evaluations([job]) == {}
    evaluation, created = runs.scoring_start(owner=alice, job=job)
    assert created and evaluation != other


def test_it_says_when_a_run_is_being_evaluated_on_other_examples(alice, alice_api, scoring_two):
    busy = _run(alice, scoring_two)
    free = _run(alice, scoring_two)
    running = Evaluation.objects.create(owner=alice, training_job=busy, status="running", test_size=1)
    response = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {"jobs": [busy.pk]}, format="json")
    assert response.status_code == 409
    assert f"already being evaluated against the base model on 1 examples (evaluation #{running.pk})" in response.json()["detail"]
    # Score all starts the others and says which one waits.
    results = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {}, format="json").json()
    assert [(r["job_id"], r["created"], bool(r["refused"])) for r in results] == [(busy.pk, False, True), (free.pk, True, False)]


# -- the Runs table ----------------------------------------------------------------------------------
def test_it_shows_every_run_with_its_figures_on_identical_example_ids(alice_client, alice, alice_api, scoring_two):
    first = _run(alice, scoring_two, config={"learning_rate": 2e-4, "num_epochs": 3}, best_eval_loss=0.5, best_step=8, train_seconds=60)
    second = _run(alice, scoring_two, config={"learning_rate": 1e-3, "num_epochs": 3}, best_eval_loss=0.4, best_step=6)
    unscored = _run(alice, scoring_two, config={"learning_rate": 5e-5, "num_epochs": 3})
    job_row(alice, scoring_two, status="training")  # not a run yet
    _scored(first, size=2, exact=0.5, task={"task_score": 0.75, "task_score_label": "JSON field accuracy"})
    _scored(second, size=2, exact=1.0)
    LossPoint.objects.create(job=first, step=4, epoch=1, eval_loss=0.7)
    LossPoint.objects.create(job=first, step=8, epoch=2, eval_loss=0.5)

    body = alice_api.get(f"/api/datasets/{scoring_two.pk}/runs").json()
    assert body["scoring_size"] == 2
    assert [s["name"] for s in body["settings_compared"]] == ["learning_rate"]  # only the settings that differ
    rows = {row["job_id"]: row for row in body["runs"]}
    assert set(rows) == {first.pk, second.pk, unscored.pk}
    assert rows[first.pk]["example_ids"] == rows[second.pk]["example_ids"] == [0, 1]
    assert rows[first.pk]["task_score"] == 0.75 and rows[first.pk]["task_score_label"] == "JSON field accuracy"
    assert rows[second.pk]["task_score"] is None and rows[second.pk]["task_score_label"] == ""
    assert rows[first.pk]["eval_loss"] == 0.5 and rows[first.pk]["settings"] == {"learning_rate": 2e-4}
    assert rows[unscored.pk]["scoring"] == "unscored" and rows[unscored.pk]["example_ids"] is None
    by_exact = alice_api.get(f"/api/datasets/{scoring_two.pk}/runs", {"sort": "-exact_match"}).json()
    assert [row["job_id"] for row in by_exact["runs"]] == [second.pk, first.pk, unscored.pk]  # unscored last
    by_loss = alice_api.get(f"/api/datasets/{scoring_two.pk}/runs", {"sort": "eval_loss"}).json()
    assert [row["job_id"] for row in by_loss["runs"]] == [second.pk, first.pk, unscored.pk]

    html = alice_client.get(reverse("dataset-runs", args=[scoring_two.pk]), {"sort": "-exact_match", "show": [first.pk]}).content.decode()
    assert html.index(f'data-run="{second.pk}"') < html.index(f'data-run="{first.pk}"')
    assert "JSON field accuracy" in html and 'data-col="task_score">—' in html
    assert html.count(">Score</button>") == 1 and "Score all" in html
    assert f'"label": "Job #{first.pk}", "job": {first.pk}, "data": [{{"x": 4, "y": 0.7}}' in html
    assert f'"label": "Job #{second.pk}"' not in html  # only the chosen run is drawn
    assert f'value="{second.pk}"' in html and "Compare side by side" in html


def test_it_scores_all_unscored_runs_up_to_the_users_limit(alice_client, alice, alice_api, scoring_two, settings):
    scored = _run(alice, scoring_two)
    _scored(scored, size=2, exact=1.0)
    waiting = [_run(alice, scoring_two) for _ in range(3)]
    settings.TUNA_MAX_ACTIVE_JOBS_PER_USER = 2
    response = alice_client.post(reverse("dataset-runs-score", args=[scoring_two.pk]), follow=True)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Scoring 2 runs on the same 2 examples" in html and f"Not started yet: job #{waiting[2].pk}" in html
    assert "TUNA_MAX_ACTIVE_JOBS_PER_USER" in html
    queued = Evaluation.objects.filter(status="queued")
    assert {e.training_job_id for e in queued} == {waiting[0].pk, waiting[1].pk}
    assert {(e.test_size, e.baseline_job_id) for e in queued} == {(2, None)}
    # The table follows the scoring by itself while a run is being scored (htmx polling of its own fragment).
    fragment = alice_client.get(reverse("dataset-runs", args=[scoring_two.pk]), {"fragment": "table"}, HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert html.startswith('<div id="runs-table"') and "every 2s" in html and "<h1>" not in html
    assert html.count('data-scoring="queued"') == 2
    # Over the limit and nothing startable: a clear refusal, not a 500.
    refused = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {}, format="json")
    assert refused.status_code == 409 and "TUNA_MAX_ACTIVE_JOBS_PER_USER" in refused.json()["detail"]
    settings.TUNA_MAX_ACTIVE_JOBS_PER_USER = 10
    one = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {"jobs": [waiting[0].pk, waiting[2].pk]}, format="json")
    assert one.status_code == 200
    assert [(r["job_id"], r["created"]) for r in one.json()] == [(waiting[0].pk, False), (waiting[2].pk, True)]


def test_it_refuses_to_score_what_is_not_a_run_of_the_dataset(alice, alice_api, scoring_two, sample_upload):
    other = dataset_create(owner=alice, upload=sample_upload, name="Other")
    elsewhere = _run(alice, other)
    training = job_row(alice, scoring_two, status="training")
    url = f"/api/datasets/{scoring_two.pk}/runs/score"
    assert alice_api.post(url, {"jobs": [elsewhere.pk]}, format="json").status_code == 400
    unfinished = alice_api.post(url, {"jobs": [training.pk]}, format="json")
    assert unfinished.status_code == 409 and "only completed fine-tunes" in unfinished.json()["detail"]
    assert alice_api.post(url, {"jobs": ["x"]}, format="json").status_code == 400
    assert alice_api.post(url, {"jobs": [999999]}, format="json").status_code == 404
    assert not Evaluation.objects.exists()


def test_it_hides_another_users_runs(client, bob, bob_api, alice, scoring_two):
    job = _run(alice, scoring_two)
    other = _run(alice, scoring_two)
    client.force_login(bob)
    assert client.get(reverse("dataset-runs", args=[scoring_two.pk])).status_code == 404
    assert client.post(reverse("dataset-runs-score", args=[scoring_two.pk])).status_code == 404
    assert client.post(reverse("dataset-runs-compare", args=[scoring_two.pk]), {"job": job.pk, "baseline_job": other.pk}).status_code == 404
    assert bob_api.get(f"/api/datasets/{scoring_two.pk}/runs").status_code == 404
    assert bob_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {}, format="json").status_code == 404
    bobs = dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's")
    mine = _run(bob, bobs)
    assert bob_api.post("/api/evaluation/compare", {"job": mine.pk, "baseline_job": job.pk}, format="json").status_code == 404
    assert not Evaluation.objects.exists()


def test_it_needs_a_login(client, scoring_two):
    response = client.get(reverse("dataset-runs", args=[scoring_two.pk]))
    assert response.status_code == 302 and "/login" in response["Location"]


# -- two fine-tunes side by side -------------------------------------------------------------------
def test_it_refuses_pairs_that_cannot_be_compared_clearly(alice, alice_api, alice_client, scoring_two, sample_upload):
    job = _run(alice, scoring_two)
    other_dataset = _run(alice, dataset_create(owner=alice, upload=sample_upload, name="Other"))
    other_model = _run(alice, scoring_two, base_model="qwen2.5-0.5b-instruct")
    training = job_row(alice, scoring_two, status="training")

    def compare(a, b):
        return alice_api.post("/api/evaluation/compare", {"job": a.pk, "baseline_job": b.pk}, format="json")

    response = compare(job, other_dataset)
    assert response.status_code == 400 and "same dataset" in response.json()["detail"]
    response = compare(job, other_model)
    assert response.status_code == 400 and "same base model" in response.json()["detail"]
    response = compare(job, training)
    assert response.status_code == 409 and "only a completed fine-tune" in response.json()["detail"]
    response = compare(training, job)
    assert response.status_code == 409 and f"Job #{training.pk} is training" in response.json()["detail"]
    response = compare(job, job)
    assert response.status_code == 400 and "itself" in response.json()["detail"]
    assert alice_api.post("/api/evaluation/compare", {"job": job.pk}, format="json").status_code == 400
    # The page says why where the user acted.
    page = alice_client.post(
        reverse("dataset-runs-compare", args=[scoring_two.pk]), {"job": job.pk, "baseline_job": other_model.pk}, follow=True
    )
    assert page.status_code == 200 and "same base model" in page.content.decode()
    assert not Evaluation.objects.exists()


def test_it_picks_the_other_side_of_an_evaluation(alice, scoring_two):
    parent = _run(alice, scoring_two)
    dpo = _run(alice, scoring_two, method="dpo", parent=parent)
    sibling = _run(alice, scoring_two)
    usual, _ = services.evaluation_start(owner=alice, job=dpo, test_size=1)
    base, _ = services.evaluation_start(owner=alice, job=dpo, test_size=1, baseline=None)
    pair, _ = services.evaluation_start(owner=alice, job=dpo, test_size=1, baseline=sibling)
    assert (usual.baseline_job_id, base.baseline_job_id, pair.baseline_job_id) == (parent.pk, None, sibling.pk)
    assert len({usual.pk, base.pk, pair.pk}) == 3
    assert services.evaluation_start(owner=alice, job=dpo, test_size=1, baseline=sibling) == (pair, False)


@pytest.fixture
def second_adapter(trained_adapter, tmp_path):
    """Another fine-tune's adapter: the trained one with its LoRA B matrices zeroed, so it answers like the base model."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "zeroed"
    shutil.copytree(trained_adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: t.zero_() if "lora_B" in name else t for name, t in tensors.items()}, weights)
    return out


@pytest.mark.model
def test_it_scores_every_run_on_the_same_examples(alice, alice_api, alice_client, scoring_two, trained_adapter, second_adapter):
    first = _run(alice, scoring_two, trained_adapter, config={"learning_rate": 2e-3})
    dpo = _run(alice, scoring_two, second_adapter, method="dpo", parent=first, config={"learning_rate": 1e-3})

    started = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {}, format="json")
    assert started.status_code == 200 and [r["created"] for r in started.json()] == [True, True]
    for _ in range(2):
        run_next_job()
    body = alice_api.get(f"/api/datasets/{scoring_two.pk}/runs").json()
    rows = {row["job_id"]: row for row in body["runs"]}
    assert set(rows) == {first.pk, dpo.pk}
    assert all(row["scoring"] == "scored" for row in rows.values()), rows
    assert {tuple(row["example_ids"]) for row in rows.values()} == {(0, 1)}
    prompts = {
        tuple(
            str(messages)
            for messages in EvaluationExample.objects.filter(evaluation_id=row["evaluation_id"]).values_list("messages", flat=True)
        )
        for row in rows.values()
    }
    assert len(prompts) == 1  # the same prompts, in the same order, for every run
    assert all(row["exact_match"] is not None and row["heldout_loss"] is not None for row in rows.values())
    assert body["base"]["exact_match"] is not None
    # Scoring again starts nothing: every run has its scoring evaluation.
    again = alice_api.post(f"/api/datasets/{scoring_two.pk}/runs/score", {}, format="json")
    assert again.status_code == 200 and again.json() == []
    html = alice_client.get(reverse("dataset-runs", args=[scoring_two.pk])).content.decode()
    assert "Score all" not in html and html.count("Evaluation #") == 2


@pytest.mark.model
def test_it_compares_two_fine_tunes_side_by_side_with_blind_votes(
    alice, alice_api, alice_client, scoring_two, trained_adapter, second_adapter
):
    first = _run(alice, scoring_two, trained_adapter)
    second = _run(alice, scoring_two, second_adapter)
    response = alice_api.post("/api/evaluation/compare", {"job": first.pk, "baseline_job": second.pk}, format="json")
    assert response.status_code == 201
    evaluation = Evaluation.objects.get(pk=response.json()["id"])
    assert (evaluation.training_job_id, evaluation.baseline_job_id, evaluation.test_size) == (first.pk, second.pk, 2)
    run_next_job()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    assert [e.index for e in evaluation.examples.all()] == [0, 1]
    # The page's form finds the same comparison instead of starting another.
    page = alice_client.post(reverse("dataset-runs-compare", args=[scoring_two.pk]), {"job": first.pk, "baseline_job": second.pk})
    assert page.status_code == 302 and page["Location"] == evaluation.get_absolute_url()
    assert Evaluation.objects.count() == 1

    html = alice_client.get(evaluation.get_absolute_url()).content.decode()
    assert f"Job #{first.pk}" in html and f"Job #{second.pk}" in html
    example = evaluation.examples.get(index=0)
    vote = alice_client.post(
        reverse("evaluation-vote", args=[evaluation.pk, 0]), {"choice": example.finetuned_side}, HTTP_HX_REQUEST="true"
    )
    assert vote.status_code == 200
    assert f"{example.finetuned_side} was job #{first.pk}" in vote.content.decode()
    rating = Rating.objects.get(user=alice)
    assert rating.blind and rating.preferred_model == "finetuned"
    summary = alice_api.get(f"/api/evaluation/{evaluation.pk}").json()["votes"]
    assert (summary["blind"], summary["counts"]["finetuned"]) == (1, 1)
    assert TrainingJob.objects.count() == 2

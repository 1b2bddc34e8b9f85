"""Task-aware scores on the evaluation page and API: JSON field accuracy with the fields that differ, labels with a
confusion table, the user's own checks, and the verdict they decide (stored evaluations scored by the real functions;
the @pytest.mark.model tests run the real embedded model with tiny settings)."""

import json
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from datasets_app.examples import held_out_examples
from datasets_app.services import dataset_create
from evaluation_app import selectors
from evaluation_app.models import Evaluation, EvaluationExample
from tests.support import job_row, jsonl_file
from tuna_core.jobs import run_next_job
from tuna_llm import metrics
from tuna_llm.task_scores import json_fields, parse_json

pytestmark = pytest.mark.django_db

ORDER = {"product": "sweater", "color": "black", "size": "S", "quantity": 12, "shipping": "express"}


def stored_evaluation(owner, job, references: list[str], base: list[str], tuned: list[str], checks=()) -> Evaluation:
    """A completed evaluation whose examples, scores and summaries are what evaluation_work stores for these answers."""
    summaries = {}
    scores = {}
    for side, answers in (("base", base), ("finetuned", tuned)):
        scores[side] = [
            metrics.answer_quality(a, {"role": "assistant", "content": r}, checks) for a, r in zip(answers, references, strict=True)
        ]
        run = metrics.ModelRun(scores[side], [100.0] * len(answers), [10] * len(answers), 1.0, answers=answers, references=references)
        summaries[side] = metrics.summarise(run, hourly_usd=2.0)
    evaluation = Evaluation.objects.create(
        owner=owner,
        training_job=job,
        status="completed",
        test_size=len(references),
        done=len(references),
        completed_at=timezone.now(),
        metrics={
            "base_model": summaries["base"],
            "finetuned_model": summaries["finetuned"],
            "improvements": metrics.improvements(summaries["base"], summaries["finetuned"]),
            "hourly_usd": 2.0,
        },
    )
    for i, reference in enumerate(references):
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=i,
            messages=[{"role": "user", "content": f"order {i}"}],
            reference=reference,
            base_output=base[i],
            finetuned_output=tuned[i],
            base_scores=scores["base"][i],
            finetuned_scores=scores["finetuned"][i],
            finetuned_side="AB"[i % 2],
        )
    return evaluation


def page(client, evaluation) -> str:
    response = client.get(reverse("evaluation-detail", args=[evaluation.pk]), {"blind": "0"})
    assert response.status_code == 200
    return response.content.decode()


def metrics_table(html: str) -> str:
    return html[html.index("<h2>Metrics</h2>") : html.index("</table>", html.index("<h2>Metrics</h2>"))]


def test_it_calls_json_answers_with_the_fields_reordered_better_where_exact_match_sees_no_difference(alice, alice_client, job):
    references = [json.dumps({**ORDER, "quantity": i + 1}) for i in range(4)]
    base = ["Sure! A black sweater, size S, express.", json.dumps({**ORDER, "quantity": 2}), "{oops", "I cannot help."]
    reordered = [json.dumps(dict(reversed(list({**ORDER, "quantity": i + 1}.items()))), indent=1) for i in range(4)]
    tuned = [*reordered[:3], json.dumps({**ORDER, "quantity": 4, "color": "navy"})]
    evaluation = stored_evaluation(alice, job, references, base, tuned)

    m = evaluation.metrics
    assert (m["base_model"]["exact_match"], m["finetuned_model"]["exact_match"]) == (0.25, 0.0)  # blind to the task
    assert m["base_model"]["field_accuracy"] == pytest.approx(0.25) and m["finetuned_model"]["field_accuracy"] == pytest.approx(0.95)
    assert (m["base_model"]["json_valid_rate"], m["finetuned_model"]["json_valid_rate"]) == (0.25, 1.0)
    assert m["finetuned_model"]["task_score_label"] == "JSON field accuracy"
    verdict = selectors.comparison_verdict(evaluation)
    assert verdict["key"] == "better" and verdict["decided_by"] == "JSON field accuracy"
    assert verdict["task"]["scores"] == (pytest.approx(0.25), pytest.approx(0.95))

    html = page(alice_client, evaluation)
    assert "Decided by JSON field accuracy" in html and "0.25 → 0.95" in html
    table = metrics_table(html)
    assert "Exact match" in table and "Valid JSON" in table
    row = table[table.index('data-metric="field_accuracy"') :]
    assert (
        "decides the verdict" in row[: row.index("</tr>")] and "0.250" in row[: row.index("</tr>")] and "0.950" in row[: row.index("</tr>")]
    )
    comparison = html[html.index('id="comparison"') : html.index('id="example-view"')]
    assert '<code class="field-differ">color</code>' in comparison  # the one wrong field of example 4, named
    assert "✓ every JSON field right" in comparison and "✗ not valid JSON" in comparison


def test_it_shows_label_accuracy_per_label_and_a_confusion_table_for_a_classification_task(alice, alice_client, job):
    references = ["positive", "negative", "positive", "neutral", "negative", "positive"]
    base = ["Positive", "The review is negative", "negative", "positive", "neutral", "positive."]
    tuned = ["positive", "negative", "positive", "neutral", "negative", "negative"]
    evaluation = stored_evaluation(alice, job, references, base, tuned)
    base_labels, tuned_labels = evaluation.metrics["base_model"]["labels"], evaluation.metrics["finetuned_model"]["labels"]
    assert base_labels["accuracy"] == pytest.approx(2 / 6) and tuned_labels["accuracy"] == pytest.approx(5 / 6)
    assert base_labels["confusion"]["negative"] == {"(other)": 1, "neutral": 1}
    assert tuned_labels["per_label"]["positive"] == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3)}
    assert selectors.comparison_verdict(evaluation)["decided_by"] == "Label accuracy"

    html = page(alice_client, evaluation)
    assert "Decided by Label accuracy" in html
    assert 'data-metric="label_accuracy"' in metrics_table(html)
    labels = html[html.index('id="labels"') :]
    per_label = labels[labels.index('id="per-label"') : labels.index("</table>")]
    assert re.search(
        r"<td>positive</td><td class=\"num\">3</td><td class=\"num\">2/3 \(0.67\)</td><td class=\"num\">2/3 \(0.67\)</td>", per_label
    )
    tables = labels.split('class="table confusion"')
    assert len(tables) == 3  # one per side
    assert '<th class="num">(other)</th>' in tables[1]  # the base answered something that is no label
    base_negative = tables[1][tables[1].index('<th scope="row">negative</th>') :].split("</tr>")[0]
    # columns positive, negative, neutral, (other): the base answered one "negative" neutral and one nothing
    assert re.findall(r"<td class=\"num\">(?:<[^>]+>)?(\d+)", base_negative) == ["0", "0", "1", "1"]


def test_it_scores_a_users_regex_check_per_example_and_shows_it_beside_exact_match(alice, alice_client, job):
    checks = [{"name": "polite", "kind": "regex", "value": r"(?i)\b(please|thanks?)\b"}]
    references = ["Thanks, your order is on its way.", "Please wait for the courier.", "It ships today, thanks."]
    base = ["Your order is on its way.", "Wait.", "It ships today."]
    tuned = ["Thanks, your order is on its way.", "Please wait.", "Ships today."]
    evaluation = stored_evaluation(alice, job, references, base, tuned, checks)
    assert [e.finetuned_scores["checks"] for e in evaluation.examples.all()] == [{"polite": 1.0}, {"polite": 1.0}, {"polite": 0.0}]
    tuned_summary = evaluation.metrics["finetuned_model"]
    assert tuned_summary["checks"] == {"polite": pytest.approx(2 / 3)} and evaluation.metrics["base_model"]["checks"] == {"polite": 0.0}
    assert tuned_summary["task_score_label"] == "Checks passed"
    assert selectors.comparison_verdict(evaluation)["key"] == "better"

    html = page(alice_client, evaluation)
    row = metrics_table(html)
    row = row[row.index('data-metric="check:polite"') :]
    assert "Check “polite”" in row and "decides the verdict" in row.split("</tr>")[0] and "+66.7 pts" in row.split("</tr>")[0]
    comparison = html[html.index('id="comparison"') : html.index('id="example-view"')]
    assert '<span class="score-exact">✓ polite</span>' in comparison and '<span class="muted">✗ polite</span>' in comparison

    api = alice_client.get(reverse("api-evaluation-detail", args=[evaluation.pk])).json()
    assert api["metrics"]["finetuned_model"]["checks"] == {"polite": pytest.approx(2 / 3)}
    assert api["metrics"]["finetuned_model"]["task_score"] == pytest.approx(2 / 3)
    assert api["test_results"][2]["finetuned_scores"]["checks"] == {"polite": 0.0}


@pytest.mark.parametrize(
    ("base", "tuned", "expected"),
    [
        # 20 examples: the bar is the worth of max(1, 10% of 20) = 2 examples, a change of 0.10
        (0.50, 0.60, "better"),
        (0.50, 0.59, "no_difference"),
        (0.50, 0.40, "worse"),
        (0.50, 0.45, "no_difference"),
    ],
)
def test_it_lets_the_task_score_decide_the_verdict_with_the_bar_of_exact_match(base, tuned, expected):
    def summary(score: float, exact: float) -> dict:
        return {
            "exact_match": exact,
            "rouge_l": 0.5,
            "count": 20,
            "task_score": score,
            "task_score_key": "labels",
            "task_score_label": "Label accuracy",
        }

    # exact match moves the other way, by a lot: the task score decides alone
    evaluation = Evaluation(test_size=20, metrics={"base_model": summary(base, 0.9), "finetuned_model": summary(tuned, 0.0)})
    verdict = selectors.comparison_verdict(evaluation)
    assert verdict["key"] == expected and verdict["decided_by"] == "Label accuracy" and verdict["task"]["bar"] == 2


def test_it_says_exact_match_and_rouge_l_decided_when_no_task_score_applies(alice, alice_client, job):
    evaluation = stored_evaluation(alice, job, ["It is sunny.", "It rains."], ["It is sunny.", "Snow."], ["It is sunny.", "It rains."])
    assert "task_score" not in evaluation.metrics["finetuned_model"]
    verdict = selectors.comparison_verdict(evaluation)
    assert verdict["task"] is None and verdict["decided_by"] == "Exact match and ROUGE-L" and verdict["key"] == "better"
    html = page(alice_client, evaluation)
    assert "Decided by exact match and ROUGE-L" in html and 'id="labels"' not in html
    table = metrics_table(html)
    exact_row = table[table.index('data-metric="exact_match"') :].split("</tr>")[0]
    assert "decides the verdict" in exact_row and "JSON" not in table


@pytest.mark.model
def test_it_scores_json_field_accuracy_and_a_regex_check_on_the_sample_dataset(alice, alice_client, sample_upload, trained_adapter):
    dataset = dataset_create(owner=alice, upload=sample_upload, name="Orders")
    dataset.answer_checks = [{"name": "has quantity", "kind": "regex", "value": r'"quantity":\s*\d+'}]
    dataset.save(update_fields=["answer_checks"])
    job = job_row(alice, dataset, status="completed", adapter_dir=str(trained_adapter), completed_at=timezone.now())
    from evaluation_app.services import evaluation_start

    evaluation, _ = evaluation_start(owner=alice, job=job, test_size=3)
    run_next_job()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message

    examples = list(evaluation.examples.order_by("index"))
    for example, messages in zip(examples, held_out_examples(dataset)[:3], strict=True):
        reference = json.loads(messages[-1]["content"])
        for output, scores in ((example.base_output, example.base_scores), (example.finetuned_output, example.finetuned_scores)):
            assert {"exact_match", "rouge_l", "bleu", "json_valid", "field_accuracy", "fields_differ", "checks"} == set(scores)
            paths = set(json_fields(reference)) | (set(json_fields(parse_json(output))) if parse_json(output) is not None else set())
            assert 0.0 <= scores["field_accuracy"] <= 1.0 and set(scores["fields_differ"]) <= paths
            assert scores["checks"] == {"has quantity": 1.0 if re.search(r'"quantity":\s*\d+', output) else 0.0}
    for side, prefix in (("base_model", "base"), ("finetuned_model", "finetuned")):
        summary = evaluation.metrics[side]
        rows = [getattr(e, f"{prefix}_scores") for e in examples]
        assert summary["field_accuracy"] == pytest.approx(sum(r["field_accuracy"] for r in rows) / 3)
        assert summary["json_valid_rate"] == pytest.approx(sum(r["json_valid"] for r in rows) / 3)
        assert summary["checks"] == {"has quantity": pytest.approx(sum(r["checks"]["has quantity"] for r in rows) / 3)}
        assert (summary["task_score"], summary["task_score_label"]) == (summary["field_accuracy"], "JSON field accuracy")
    assert "field_accuracy" in evaluation.metrics["improvements"]

    html = page(alice_client, evaluation)
    assert "Decided by JSON field accuracy" in html
    table = metrics_table(html)
    row = table[table.index('data-metric="field_accuracy"') :].split("</tr>")[0]
    assert f"{evaluation.metrics['base_model']['field_accuracy']:.3f}" in row
    assert f"{evaluation.metrics['finetuned_model']['field_accuracy']:.3f}" in row
    assert 'data-metric="check:has quantity"' in table


@pytest.mark.model
def test_it_finds_the_labels_of_a_classification_dataset_in_a_real_evaluation(alice, alice_client, trained_adapter):
    labels = ["positive", "negative", "neutral"]
    rows = [{"prompt": f"Review {i}: the parcel number {i} arrived.\nSentiment?", "completion": labels[i % 3]} for i in range(30)]
    dataset = dataset_create(owner=alice, upload=jsonl_file(rows), name="Sentiment")
    assert dataset.num_eval == 6, dataset.validation_report  # the last 6: each label twice
    job = job_row(alice, dataset, status="completed", adapter_dir=str(trained_adapter), completed_at=timezone.now())
    from evaluation_app.services import evaluation_start

    evaluation, _ = evaluation_start(owner=alice, job=job, test_size=6)
    run_next_job()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    references = [e.reference for e in evaluation.examples.order_by("index")]
    for side in ("base_model", "finetuned_model"):
        found = evaluation.metrics[side]["labels"]
        assert set(found["per_label"]) == set(references)
        assert all(row["total"] == 2 for row in found["per_label"].values())
        assert sum(sum(counts.values()) for counts in found["confusion"].values()) == 6
        assert evaluation.metrics[side]["task_score_label"] == "Label accuracy"
    html = page(alice_client, evaluation)
    assert 'id="per-label"' in html and html.count('class="table confusion"') == 2

"""Task-aware scores as pure functions: JSON field accuracy, labels, the user's checks, the headline score."""

import json

import pytest

from tuna_llm import metrics, task_scores
from tuna_llm.task_scores import label_set, summary_task_score

ORDER = {"product": "sweater", "color": "black", "size": "S", "quantity": 12, "shipping": "express"}
REFERENCE = json.dumps(ORDER)


def test_it_ignores_key_order_and_whitespace_in_a_json_answer():
    answer = '{\n  "shipping": "express",\n  "quantity": 12.0, "size":"S", "color": "black",\n"product": "sweater"}'
    assert metrics.exact_match(answer, REFERENCE) == 0.0  # what exact match sees
    assert task_scores.task_scores(answer, REFERENCE) == {"json_valid": 1.0, "field_accuracy": 1.0, "fields_differ": []}


def test_it_scores_one_wrong_field_out_of_five_as_four_fifths_and_names_it():
    scores = task_scores.task_scores(json.dumps({**ORDER, "color": "navy"}), REFERENCE)
    assert scores == {"json_valid": 1.0, "field_accuracy": pytest.approx(0.8), "fields_differ": ["color"]}


def test_it_counts_missing_and_extra_fields_and_types_against_the_answer():
    answer = {k: v for k, v in ORDER.items() if k != "size"} | {"quantity": "12", "note": "gift"}
    scores = task_scores.task_scores(json.dumps(answer), REFERENCE)
    # 6 fields in either: size missing, quantity "12" is not 12, note extra; 3 right.
    assert scores["fields_differ"] == ["size", "quantity", "note"]
    assert scores["field_accuracy"] == pytest.approx(3 / 6)


def test_it_walks_nested_objects_and_arrays_by_path():
    reference = json.dumps({"customer": {"name": "Ada", "vip": True}, "items": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}]})
    answer = json.dumps({"items": [{"qty": 2, "sku": "A1"}, {"sku": "B2", "qty": 3}], "customer": {"vip": 1, "name": "Ada"}})
    scores = task_scores.task_scores(answer, reference)
    assert scores["fields_differ"] == ["customer.vip", "items[1].qty"]  # true is not 1
    assert scores["field_accuracy"] == pytest.approx(4 / 6)
    assert task_scores.json_fields([{"a": []}, {}]) == {"[0].a": [], "[1]": {}}


def test_it_scores_an_answer_that_is_not_json_as_invalid_with_every_field_differing():
    for answer in ("The order is a black sweater.", '{"product": "sweater",', "42", '```json\n{"product": "sweater"}\n```'):
        scores = task_scores.task_scores(answer, REFERENCE)
        assert scores["json_valid"] == 0.0 and scores["field_accuracy"] == 0.0
        assert scores["fields_differ"] == list(ORDER)


def test_it_adds_no_json_scores_when_the_reference_is_not_a_json_object_or_array():
    for reference in ("Order 3 contains three items.", "42", '"a string"', "true"):
        assert task_scores.task_scores('{"a": 1}', reference) == {}


def test_it_scores_each_kind_of_user_check_per_example():
    checks = [
        {"name": "has quantity", "kind": "regex", "value": r'"quantity":\s*\d+'},
        {"name": "whole answer is JSON-ish", "kind": "regex", "value": r"^\{.*\}$"},
        {"name": "mentions express", "kind": "contains", "value": "express"},
        {"name": "no apology", "kind": "not_contains", "value": "Sorry"},
        {"name": "a size", "kind": "one_of", "value": ["S", "M", "L"]},
    ]
    scores = task_scores.task_scores(REFERENCE, REFERENCE, checks)["checks"]
    assert scores == {"has quantity": 1.0, "whole answer is JSON-ish": 1.0, "mentions express": 1.0, "no apology": 1.0, "a size": 0.0}
    assert task_scores.task_scores(" M \n", "M", checks)["checks"] == {
        "has quantity": 0.0,
        "whole answer is JSON-ish": 0.0,
        "mentions express": 0.0,
        "no apology": 1.0,
        "a size": 1.0,
    }
    assert task_scores.task_scores("Sorry, Express", "x", checks[2:4])["checks"] == {"mentions express": 0.0, "no apology": 0.0}


def test_it_leaves_out_a_check_it_cannot_apply():
    checks = [{"name": "bad", "kind": "regex", "value": "("}, {"name": "odd", "kind": "shout", "value": "x"}]
    assert task_scores.task_scores("anything", "ref", checks) == {}


def test_it_detects_a_classification_task_from_a_small_set_of_repeated_short_labels():
    assert label_set(["positive", "negative", "Positive.", "neutral", "negative", "positive"]) == {
        "positive": "positive",
        "negative": "negative",
        "neutral": "neutral",
    }
    assert label_set(["yes", "no", "yes"]) is None  # too few examples to tell
    assert label_set(["spam"] * 6) is None  # one label is no classification
    assert label_set(["a", "b", "c", "d", "a", "b"]) is None  # more labels than half the references: most do not repeat
    assert label_set([f"label {i % 21}" for i in range(84)]) is None  # over 20 labels
    long = "a label that is rather too long to be one, surely"
    assert label_set([long, "no", long, "no"]) is None
    assert label_set([REFERENCE, "no", REFERENCE, "no"]) is None  # JSON is never a label


def test_it_gives_label_accuracy_per_label_and_a_confusion_table():
    references = ["positive", "negative", "positive", "neutral", "negative", "positive", "neutral", "positive"]
    answers = ["Positive.", "negative", "negative", "neutral", "I think negative", "positive", "positive", "'positive'"]
    summary = summary_task_score(answers, references)
    labels = summary["labels"]
    assert labels["accuracy"] == pytest.approx(5 / 8)
    assert labels["per_label"] == {
        "positive": {"correct": 3, "total": 4, "accuracy": 0.75},
        "negative": {"correct": 1, "total": 2, "accuracy": 0.5},
        "neutral": {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert labels["confusion"] == {
        "positive": {"positive": 3, "negative": 1},
        "negative": {"negative": 1, "(other)": 1},
        "neutral": {"neutral": 1, "positive": 1},
    }
    assert (summary["task_score"], summary["task_score_label"], summary["task_score_key"]) == (
        labels["accuracy"],
        "Label accuracy",
        "labels",
    )
    assert "field_accuracy" not in summary and "checks" not in summary


def test_it_summarises_json_runs_with_field_accuracy_as_the_headline_and_checks_beside_it():
    checks = [{"name": "express", "kind": "contains", "value": "express"}]
    answers = [REFERENCE, json.dumps({**ORDER, "color": "navy"}), "not json at all"]
    summary = summary_task_score(answers, [REFERENCE] * 3, checks)
    assert summary["json_valid_rate"] == pytest.approx(2 / 3)
    assert summary["field_accuracy"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert summary["json_examples"] == 3
    assert summary["checks"] == {"express": pytest.approx(2 / 3)}
    assert summary["task_score"] == summary["field_accuracy"] and summary["task_score_label"] == "JSON field accuracy"
    assert "labels" not in summary


def test_it_makes_checks_the_headline_only_when_nothing_else_applies():
    checks = [{"name": "ends well", "kind": "regex", "value": r"\.$"}, {"name": "short", "kind": "regex", "value": r"^.{0,20}$"}]
    summary = summary_task_score(["Fine.", "A much longer answer without a stop"], ["one reference", "another one"], checks)
    assert summary["checks"] == {"ends well": 0.5, "short": 0.5}
    assert (summary["task_score"], summary["task_score_label"]) == (0.5, "Checks passed")
    assert summary_task_score(["a", "b"], ["c", "d"]) == {}  # nothing applies: no task score at all


def test_it_merges_task_scores_into_each_examples_scores_and_the_models_summary():
    reference = {"role": "assistant", "content": REFERENCE}
    checks = [{"name": "json object", "kind": "regex", "value": r"^\{"}]
    answers = [json.dumps({**ORDER, "size": "M"}), "no"]
    qualities = [metrics.answer_quality(answer, reference, checks) for answer in answers]
    assert qualities[0]["exact_match"] == 0.0 and qualities[0]["fields_differ"] == ["size"]
    assert qualities[0]["checks"] == {"json object": 1.0} and qualities[1]["json_valid"] == 0.0
    run = metrics.ModelRun(qualities, [10.0, 20.0], [5, 1], None, answers=answers, references=[REFERENCE] * 2)
    summary = metrics.summarise(run, hourly_usd=1.0)
    assert summary["field_accuracy"] == pytest.approx(0.4) and summary["json_valid_rate"] == 0.5
    assert summary["task_score"] == pytest.approx(0.4) and summary["checks"] == {"json object": 0.5}
    tuned = {**summary, "task_score": 0.9, "field_accuracy": 0.9}
    change = metrics.improvements(summary, tuned)
    assert change["task_score"]["direction"] == change["field_accuracy"]["direction"] == "better"

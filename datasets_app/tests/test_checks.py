"""The user's own checks of an answer: validation, the Checks block on the dataset page, and the API."""

import pytest
from django.urls import reverse

from datasets_app.checks import MAX_CHECKS, ChecksInvalid, dataset_checks_set, validate_checks
from datasets_app.models import Dataset
from tuna_llm.task_scores import check_scores

pytestmark = pytest.mark.django_db

TOTAL = {"name": "Has a total", "kind": "regex", "value": r'"total":\s*\d+'}
SORRY = {"name": "No apology", "kind": "not_contains", "value": "I'm sorry"}


def refusal(checks) -> list[str]:
    with pytest.raises(ChecksInvalid) as caught:
        validate_checks(checks)
    return caught.value.errors["answer_checks"]


def test_it_keeps_good_checks_trimmed_and_scorable():
    checks = validate_checks(
        [
            TOTAL,
            {"name": "  Sentiment ", "kind": "one_of", "value": [" positive", "negative", "positive", ""]},
            {**SORRY, "value": " I'm sorry "},
        ]
    )
    assert checks[1] == {"name": "Sentiment", "kind": "one_of", "value": ["positive", "negative"]}
    assert checks[2]["value"] == "I'm sorry"
    assert check_scores('{"total": 12}', checks) == {"Has a total": 1.0, "Sentiment": 0.0, "No apology": 1.0}


def test_it_refuses_each_bad_check_with_a_message_naming_it():
    assert refusal([TOTAL, {"name": "Broken", "kind": "regex", "value": "(unclosed"}]) == [
        "Check 2 (“Broken”): the regular expression does not compile: missing ), unterminated subpattern at position 0."
    ]
    assert refusal([{"name": "Starts", "kind": "startswith", "value": "{"}]) == [
        "Check 1 (“Starts”): unknown kind “startswith”; the kinds are regex, contains, not_contains, one_of."
    ]
    assert refusal([TOTAL, SORRY, {**SORRY, "name": "has a TOTAL"}]) == [
        "Check 3 (“has a TOTAL”): the name is already used by check 1; each check needs its own name."
    ]
    too_many = [{"name": f"c{i}", "kind": "contains", "value": "x"} for i in range(MAX_CHECKS + 1)]
    assert refusal(too_many) == ["At most 20 checks per dataset; 21 were given. Remove 1."]
    assert validate_checks(too_many[:MAX_CHECKS])[-1]["name"] == "c19"


def test_it_refuses_a_regex_that_could_run_for_hours_and_one_too_long():
    (message,) = refusal([{"name": "Words", "kind": "regex", "value": r"^(\w+\s?)+$"}])
    assert message.startswith("Check 1 (“Words”): the regular expression repeats something that itself repeats")
    assert validate_checks([{"name": "List", "kind": "regex", "value": r"^\d+(?:\s*,\s*\d+)*$"}])  # a fixed comma between: fine
    (message,) = refusal([{"name": "Long", "kind": "regex", "value": "a" * 301}])
    assert message == "Check 1 (“Long”): the regular expression is 301 characters; at most 300."


def test_it_refuses_malformed_checks_all_at_once():
    problems = refusal(
        ["x", {"name": "", "kind": "contains", "value": "a"}, {"name": "n", "kind": "contains", "value": " "}, {**SORRY, "weight": 2}]
    )
    assert problems == [
        "Check 1 must be an object with a name, a kind and a value.",
        "Check 2 needs a name (it labels the check's score in every evaluation).",
        "Check 3 (“n”): needs a text as its value.",
        "Check 4: unknown field weight (a check has name, kind and value).",
    ]
    assert refusal([{"name": "Label", "kind": "one_of", "value": "positive"}]) == [
        "Check 1 (“Label”): “one of” needs a list of texts (on the page: one per line)."
    ]


def test_it_saves_all_or_nothing(valid_dataset):
    dataset_checks_set(valid_dataset, [TOTAL])
    with pytest.raises(ChecksInvalid):
        dataset_checks_set(valid_dataset, [SORRY, {"name": "Bad", "kind": "regex", "value": "["}])
    assert Dataset.objects.get(pk=valid_dataset.pk).answer_checks == [TOTAL]


def test_it_adds_and_removes_checks_on_the_dataset_page(alice_client, valid_dataset):
    page = alice_client.get(valid_dataset.get_absolute_url()).content.decode()
    assert 'id="checks"' in page and 'id="no-checks"' in page
    add = reverse("dataset-check-add", args=[valid_dataset.pk])
    response = alice_client.post(add, {"name": "Sentiment", "kind": "one_of", "value": "positive\r\nnegative\r\n"}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert response.status_code == 200 and 'data-check="Sentiment"' in html and "<code>positive</code>, <code>negative</code>" in html
    assert Dataset.objects.get(pk=valid_dataset.pk).answer_checks == [
        {"name": "Sentiment", "kind": "one_of", "value": ["positive", "negative"]}
    ]
    # A refused check keeps what was typed and says why; nothing is saved.
    refused = alice_client.post(add, {"name": "sentiment", "kind": "regex", "value": "<b>("}, HTTP_HX_REQUEST="true")
    html = refused.content.decode()
    assert refused.status_code == 400 and 'id="checks-error"' in html and "does not compile" in html
    assert "&lt;b&gt;(" in html and "<b>(" not in html  # escaped
    assert len(Dataset.objects.get(pk=valid_dataset.pk).answer_checks) == 1
    # Without htmx: back to the page, with the message.
    plain = alice_client.post(add, {"name": "Total", "kind": "contains", "value": '"total"'})
    assert plain.status_code == 302 and plain["Location"] == f"{valid_dataset.get_absolute_url()}#checks"
    removed = alice_client.post(reverse("dataset-check-remove", args=[valid_dataset.pk]), {"name": "Sentiment"}, HTTP_HX_REQUEST="true")
    assert removed.status_code == 200 and 'data-check="Sentiment"' not in removed.content.decode()
    assert [c["name"] for c in Dataset.objects.get(pk=valid_dataset.pk).answer_checks] == ["Total"]


def test_it_reads_and_writes_checks_over_the_api(alice_api, valid_dataset):
    url = f"/api/datasets/{valid_dataset.pk}"
    assert alice_api.get(url).json()["answer_checks"] == []
    response = alice_api.patch(url, {"answer_checks": [TOTAL, SORRY]}, format="json")
    assert response.status_code == 200 and response.json()["answer_checks"] == [TOTAL, SORRY]
    refused = alice_api.patch(url, {"answer_checks": [TOTAL, {"name": "x", "kind": "regex", "value": "(a+)+"}]}, format="json")
    body = refused.json()
    assert refused.status_code == 400 and body["detail"].startswith("Check 2 (“x”): the regular expression repeats")
    assert body["errors"]["answer_checks"] == [body["detail"]]
    assert alice_api.patch(url, {"name": "Renamed"}, format="json").status_code == 400
    assert alice_api.get(url).json()["answer_checks"] == [TOTAL, SORRY] and alice_api.get(url).json()["name"] == "Orders"
    assert alice_api.patch(url, {"answer_checks": []}, format="json").json()["answer_checks"] == []


def test_it_keeps_another_users_dataset_out_of_reach(bob_api, client, bob, valid_dataset):
    assert bob_api.patch(f"/api/datasets/{valid_dataset.pk}", {"answer_checks": [TOTAL]}, format="json").status_code == 404
    client.force_login(bob)
    assert (
        client.post(reverse("dataset-check-add", args=[valid_dataset.pk]), {"name": "a", "kind": "contains", "value": "b"}).status_code
        == 404
    )
    assert client.post(reverse("dataset-check-remove", args=[valid_dataset.pk]), {"name": "a"}).status_code == 404
    assert Dataset.objects.get(pk=valid_dataset.pk).answer_checks == []

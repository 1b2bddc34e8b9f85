"""A storm of malformed and hostile requests across every endpoint: never a 5xx, never another user's data.

Bodies are sent as raw JSON text, so that what a JSON library would refuse to write (NaN, 1e309, lone
surrogates as escapes, nesting a thousand deep) reaches the server exactly as an attacker would send it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.signals import got_request_exception
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from datasets_app.models import Dataset
from evaluation_app.models import Evaluation, EvaluationExample
from inference_app.models import UsageLog
from tests.support import api_key, job_row

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model, pytest.mark.postgres]

BASE = "base:smollm2-135m-instruct"
HUGE_ID = 10**20  # beyond a 64-bit database integer
NUL, SURROGATE = "\x00", "\ud800"
# Raw JSON literals a strict encoder would never write.
NON_FINITE = ["1e309", "-1e309", "NaN", "Infinity", '"inf"', '"nan"', '"1e309"']
WRONG_TYPES = ['"abc"', "true", "null", "[]", "{}", "[1, 2]", '{"a": 1}', "-1", "0.5", '""', f'"{"9" * 5000}"']
HUGE_NUMBERS = [str(10**30), str(-(10**30)), str(2**63), str(2**64), "1e30", str(HUGE_ID)]
BAD_TEXT = [
    json.dumps(f"a{NUL}b"),
    json.dumps(f"a{SURROGATE}b"),
    '"\\udfff"',
    json.dumps("tuna-job-²"),
    json.dumps("tuna-job-١٢"),
    json.dumps("tuna-job-" + "9" * 30),
    json.dumps("tuna-job--1"),
    json.dumps(" " * 3),
    json.dumps("x" * 5000),
]


def deep(depth: int, kind: str = "[") -> str:
    """JSON text nested ``depth`` levels deep: [[[...]]] or {"a": {"a": ...}}."""
    if kind == "{":
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


GARBAGE_BODIES = [
    "",
    "{",
    "not json",
    "\x00",
    '{"a": 1,}',
    "[" * 100000,
    deep(1000),
    deep(1000, "{"),
    deep(70),
    deep(70, "{"),
    '{"\\u0000": 1}',
    '{"\\ud800": 1}',
    '{"a": "\\ud83d"}',
    "[]",
    "123",
    '"text"',
    "null",
]


@pytest.fixture
def world(alice, bob, valid_dataset, settings):
    """Alice's objects (every kind that has an id) and bob's clients."""
    settings.TUNA_API_RATE = "100000/min"  # the storm is about bad input, not about the rate limit
    settings.TUNA_MAX_TOKENS_LIMIT = 4  # answers stay a few tokens long, even where max_tokens is left out
    job = job_row(alice, valid_dataset, status="completed", config={"num_epochs": 1})
    queued = job_row(alice, valid_dataset)
    evaluation = Evaluation.objects.create(owner=alice, training_job=job, status="completed", test_size=1, done=1)
    EvaluationExample.objects.create(
        evaluation=evaluation,
        index=0,
        messages=[{"role": "user", "content": "hi"}],
        reference="hello",
        base_output="hey",
        finetuned_output="hello",
        finetuned_side="A",
    )
    clients = {}
    for name, user in (("alice", alice), ("bob", bob)):
        api = APIClient(raise_request_exception=False)
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(user)}")
        page = Client(raise_request_exception=False)
        page.force_login(user)
        clients[name] = (api, page)
    return {"dataset": valid_dataset, "job": job, "queued": queued, "evaluation": evaluation, "clients": clients}


class Storm:
    """Sends requests, keeps every status, and the exception behind each 5xx."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.server_errors: list[str] = []
        self._exception: BaseException | None = None
        got_request_exception.connect(self._caught)

    def _caught(self, sender, request=None, **kwargs) -> None:
        self._exception = sys.exc_info()[1]

    def send(self, client, method: str, path: str, label: str = "", **kwargs):
        self._exception = None
        response = getattr(client, method)(path, **kwargs)
        if getattr(response, "streaming", False):
            b"".join(response.streaming_content)
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{response.status_code} {method.upper()} {path} {label}: {self._exception!r}")
        return response

    def json(self, client, path: str, body: str, label: str = ""):
        return self.send(client, "post", path, label or body[:60], data=body, content_type="application/json")

    def close(self) -> None:
        got_request_exception.disconnect(self._caught)


@pytest.fixture
def storm():
    storm = Storm()
    yield storm
    storm.close()


def _object(fields: dict[str, str]) -> str:
    """A JSON object from raw JSON value texts."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def test_it_answers_a_storm_of_hostile_requests_without_a_server_error(world, storm):
    api, page = world["clients"]["alice"]
    job, dataset, evaluation = world["job"], world["dataset"], world["evaluation"]
    tiny = {"max_tokens": "1"}
    generation = {
        "/api/inference": {"model_id": json.dumps(BASE), "prompt": '"hi"', **tiny},
        "/v1/chat/completions": {"model": json.dumps(BASE), "messages": '[{"role": "user", "content": "hi"}]', **tiny},
        "/v1/completions": {"model": json.dumps(BASE), "prompt": '"hi"', **tiny},
    }
    json_posts = {
        **generation,
        "/api/training/start": {"dataset_id": str(dataset.pk), "config": '{"num_epochs": 1}'},
        f"/api/training/{job.pk}/continue": {"epochs": "1"},
        "/api/evaluation/run": {"training_job_id": str(job.pk), "test_size": "1"},
        f"/api/evaluation/{evaluation.pk}/rate": {"example_index": "0", "preferred_model": '"finetuned"'},
    }

    # Garbage bodies at every JSON endpoint.
    for path in json_posts:
        for body in GARBAGE_BODIES:
            storm.json(api, path, body)

    # One hostile value at a time in each field; the other fields stay valid.
    values = [*NON_FINITE, *WRONG_TYPES[:6], *HUGE_NUMBERS[:3], *BAD_TEXT[:5], deep(200)]
    for path, fields in json_posts.items():
        for field in fields:
            for value in values:
                storm.json(api, path, _object({**fields, field: value}), f"{field}={value[:40]}")

    # Values deeper inside: messages, stop lists, stream options, training settings.
    chat = generation["/v1/chat/completions"]
    for messages in [
        json.dumps([{"role": "user", "content": f"hi{NUL}"}]),
        json.dumps([{"role": "user", "content": SURROGATE}]),
        json.dumps([{"role": f"user{NUL}", "content": "hi"}]),
        json.dumps([{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
        json.dumps([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        json.dumps([{"role": "user"}]),
        json.dumps([{"role": "user", "content": "hi", NUL: 1}]),
        json.dumps(["hi"]),
    ]:
        storm.json(api, "/v1/chat/completions", _object({**chat, "messages": messages}), f"messages={messages[:40]}")
    for extra in [
        {"stop": json.dumps([NUL])},
        {"stop": json.dumps([SURROGATE])},
        {"stop": json.dumps(["a"] * 50)},
        {"stream_options": json.dumps({NUL: True})},
        {"stream_options": '"yes"'},
        {"stream": '"maybe"'},
        {"n": "2"},
        {"user": json.dumps(NUL)},
        {"seed": str(10**30), "temperature": "0.7"},
        {"seed": "-1", "temperature": "0.7"},
        {"max_completion_tokens": "1e309"},
    ]:
        storm.json(api, "/v1/chat/completions", _object({**chat, **extra}), f"{extra}")
    for config in [
        {"num_epochs": "1e309"},
        {"num_epochs": '"inf"'},
        {"num_epochs": "NaN"},
        {"learning_rate": '"nan"'},
        {"batch_size": str(10**30)},
        {"seed": str(10**30)},
        {"base_model": json.dumps(NUL)},
        {"base_model": json.dumps(SURROGATE)},
        {"target_modules": json.dumps([NUL])},
        {"target_modules": json.dumps([SURROGATE])},
        {NUL: "1"},
        {SURROGATE: "1"},
        {"max_seq_length": '"²"'},
    ]:
        body = _object({"dataset_id": str(dataset.pk), "config": json.dumps(config)})
        storm.json(api, "/api/training/start", body, f"config={body[:50]}")

    # Ids: absurd and foreign ones in URLs.
    for suffix in (str(HUGE_ID), "0", "99999"):
        for path in (
            f"/api/datasets/{suffix}",
            f"/api/training/{suffix}",
            f"/api/training/{suffix}/adapter",
            f"/api/evaluation/{suffix}",
            f"/api/evaluation/{suffix}/preferences.jsonl",
            f"/datasets/{suffix}",
            f"/datasets/{suffix}/examples",
            f"/training/{suffix}",
            f"/evaluations/{suffix}",
        ):
            storm.send(api if path.startswith("/api/") else page, "get", path)
        for path in (f"/api/training/{suffix}/resume", f"/api/datasets/{suffix}/eval-file"):
            storm.send(api, "post", path)
        storm.send(page, "post", f"/evaluations/{suffix}/examples/0/vote", data={"choice": "A"})
        storm.send(page, "post", f"/training/{suffix}/continue", data={"epochs": "1"})

    # Pages with hostile query strings and form fields.
    for value in ["-1", str(HUGE_ID), "abc", "1e309", "²", NUL, "%00", "inf"]:
        storm.send(page, "get", f"/datasets/{dataset.pk}/examples", data={"page": value})
        storm.send(page, "get", f"/evaluations/{evaluation.pk}", data={"example": value, "page": value})
        storm.send(page, "post", "/playground", data={"model": value, "prompt": "hi"})
        storm.send(page, "post", f"/training/{job.pk}/continue", data={"epochs": value})
        storm.send(page, "post", f"/training/new/{dataset.pk}", data={"num_epochs": value, "preview": "1"})
        storm.send(page, "post", f"/evaluations/{evaluation.pk}/examples/0/vote", data={"choice": value})
    for value in ["-5", "0", "1e309", "inf", str(HUGE_ID), "²", NUL]:
        storm.send(page, "post", f"/evaluations/start/{job.pk}", data={"test_size": value}, label=f"test_size={value!r}")
    for username, password in [(NUL, "x"), ("alice", NUL), ("a" * 10000, "x"), ("²", "")]:
        storm.send(Client(raise_request_exception=False), "post", "/login/", data={"username": username, "password": password})
    for value in ["abc", "-1", str(HUGE_ID), "1e309", NUL]:
        for path in ("/api/datasets", "/api/training", "/api/evaluation"):
            storm.send(api, "get", path, data={"page": value}, label=f"page={value!r}")

    # Headers: wrong credentials, odd content types and charsets.
    chat_body = _object(generation["/v1/chat/completions"])
    for header in ["Bearer", "Bearer a b", "Bearer " + "x" * 5000, "Bearer \xe9\xe9", "Basic abc", "Token ²"]:
        storm.send(
            APIClient(raise_request_exception=False),
            "post",
            "/v1/chat/completions",
            HTTP_AUTHORIZATION=header,
            data=chat_body,
            content_type="application/json",
        )
    for content_type in [
        "application/json; charset=nonsense",
        "application/json; charset=utf-16",
        "text/plain",
        "application/xml",
        "multipart/form-data",
    ]:
        storm.send(api, "post", "/api/inference", label=content_type, data=chat_body, content_type=content_type)
    storm.send(api, "post", "/api/inference", label="latin-1 bytes", data=b'{"model_id": "\xe9"}', content_type="application/json")

    for field, value in [("base_model", NUL), ("target_modules", f"q_proj,{NUL}"), ("learning_rate", "nan"), ("lora_dropout", "-inf")]:
        storm.send(page, "post", f"/training/new/{dataset.pk}", data={field: value}, label=f"{field}={value!r}")
    for model in [f"tuna-job-{NUL}", "tuna-job-²", "tuna-job-١٢", f"tuna-job-{HUGE_ID}", f"base:{NUL}"]:
        storm.send(page, "post", "/playground", data={"model": model, "prompt": "hi"}, label=repr(model))
    storm.send(page, "post", "/playground", data={"model": BASE, "prompt": f"hi{NUL}"}, label="prompt NUL")

    # Uploads: hostile lines in otherwise good files, hostile form fields.
    good = [json.dumps({"prompt": f"Question {i} about orders?", "completion": f"Answer {i} about orders."}) for i in range(12)]
    for bad_line in [
        '{"prompt": "a\\u0000b", "completion": "fine answer"}',
        '{"prompt": "a\\ud800b", "completion": "fine answer"}',
        '{"\\ud800": "x", "completion": "fine answer"}',
        '{"\\u0000": "x"}',
        '{"messages": [{"role": "\\ud800", "content": "x"}]}',
        deep(5000),
        deep(5000, "{"),
        '{"prompt": 1e309, "completion": "x"}',
        f'{{"prompt": "{SURROGATE} written as UTF-8 bytes", "completion": "x"}}',  # not UTF-8 at all
    ]:
        content = ("\n".join([*good, bad_line]) + "\n").encode("utf-8", "surrogatepass")
        upload = SimpleUploadedFile("data.jsonl", content)
        storm.send(api, "post", "/api/datasets", label=f"upload {bad_line[:30]}", data={"file": upload}, format="multipart")
        upload = SimpleUploadedFile("data.jsonl", content)
        storm.send(page, "post", "/datasets/upload", label=f"page upload {bad_line[:30]}", data={"file": upload})
        upload = SimpleUploadedFile("held-out.jsonl", content)
        storm.send(
            api,
            "post",
            f"/api/datasets/{dataset.pk}/eval-file",
            label=f"eval file {bad_line[:30]}",
            data={"file": upload},
            format="multipart",
        )
    for name, fraction in [(NUL, "0.1"), ("ok", "nan"), ("ok", "inf"), ("ok", "1e309"), ("x" * 500, "0.1"), ("ok", "-1")]:
        upload = SimpleUploadedFile("data.jsonl", ("\n".join(good) + "\n").encode())
        storm.send(
            api,
            "post",
            "/api/datasets",
            label=f"upload name/fraction {fraction}",
            data={"file": upload, "name": name, "eval_fraction": fraction},
            format="multipart",
        )

    # Whatever was stored is shown without a hitch.
    for stored in Dataset.objects.filter(owner=dataset.owner):
        for path in (f"/datasets/{stored.pk}", f"/datasets/{stored.pk}/examples", f"/training/new/{stored.pk}"):
            storm.send(page, "get", path)
        storm.send(api, "get", f"/api/datasets/{stored.pk}")
    for path in ("/datasets", "/training", "/evaluations", "/usage", "/", "/api/datasets", "/api/training", "/api/evaluation"):
        storm.send(api if path.startswith("/api/") else page, "get", path)

    print(f"\n{sum(storm.statuses.values())} hostile requests on {connection.vendor}, by status: {dict(sorted(storm.statuses.items()))}")
    assert not storm.server_errors, "\n".join(storm.server_errors)


def test_it_never_shows_bob_alice_s_objects(world, storm):
    api, page = world["clients"]["bob"]
    job, queued, dataset, evaluation = world["job"], world["queued"], world["dataset"], world["evaluation"]
    not_found = [
        (api, "get", f"/api/datasets/{dataset.pk}", {}),
        (api, "delete", f"/api/datasets/{dataset.pk}", {}),
        (api, "post", f"/api/datasets/{dataset.pk}/eval-file", {}),
        (api, "get", f"/api/training/{job.pk}", {}),
        (api, "delete", f"/api/training/{queued.pk}", {}),
        (api, "post", f"/api/training/{job.pk}/resume", {}),
        (api, "post", f"/api/training/{job.pk}/continue", {"data": {"epochs": 1}, "format": "json"}),
        (api, "get", f"/api/training/{job.pk}/adapter", {}),
        (api, "post", "/api/training/start", {"data": {"dataset_id": dataset.pk}, "format": "json"}),
        (api, "post", "/api/evaluation/run", {"data": {"training_job_id": job.pk}, "format": "json"}),
        (api, "get", f"/api/evaluation/{evaluation.pk}", {}),
        (api, "post", f"/api/evaluation/{evaluation.pk}/rate", {"data": {"example_index": 0, "preferred_model": "base"}, "format": "json"}),
        (api, "get", f"/api/evaluation/{evaluation.pk}/preferences.jsonl", {}),
        (api, "post", "/api/inference", {"data": {"model_id": job.pk, "prompt": "hi", "max_tokens": 1}, "format": "json"}),
        (api, "post", "/api/inference", {"data": {"model_id": job.model_id, "prompt": "hi", "max_tokens": 1}, "format": "json"}),
        (
            api,
            "post",
            "/v1/chat/completions",
            {"data": {"model": job.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, "format": "json"},
        ),
        (api, "post", "/v1/completions", {"data": {"model": job.model_id, "prompt": "hi", "max_tokens": 1}, "format": "json"}),
        (page, "get", f"/datasets/{dataset.pk}", {}),
        (page, "get", f"/datasets/{dataset.pk}/examples", {}),
        (page, "post", f"/datasets/{dataset.pk}/delete", {}),
        (page, "get", f"/training/new/{dataset.pk}", {}),
        (page, "get", f"/training/{job.pk}", {}),
        (page, "post", f"/training/{queued.pk}/cancel", {}),
        (page, "post", f"/training/{job.pk}/continue", {}),
        (page, "get", f"/training/{job.pk}/adapter.zip", {}),
        (page, "post", f"/evaluations/start/{job.pk}", {}),
        (page, "get", f"/evaluations/{evaluation.pk}", {}),
        (page, "get", f"/evaluations/{evaluation.pk}/examples/0", {}),
        (page, "post", f"/evaluations/{evaluation.pk}/examples/0/vote", {"data": {"choice": "A"}}),
        (page, "get", f"/evaluations/{evaluation.pk}/preferences.jsonl", {}),
        (page, "post", "/playground", {"data": {"model": job.model_id, "prompt": "hi"}}),
    ]
    leaks = []
    for client, method, path, kwargs in not_found:
        response = storm.send(client, method, path, **kwargs)
        if response.status_code != 404:
            leaks.append(f"{method.upper()} {path}: {response.status_code}")
    models = storm.send(api, "get", "/v1/models").json()
    lists = [storm.send(api, "get", path).json() for path in ("/api/datasets", "/api/training", "/api/evaluation")]
    print(
        f"\n{sum(storm.statuses.values())} requests by bob for alice's objects on {connection.vendor}, by status: {dict(sorted(storm.statuses.items()))}"
    )
    assert not storm.server_errors, "\n".join(storm.server_errors)
    assert not leaks, leaks
    assert job.model_id not in {m["id"] for m in models["data"]}
    assert all(listing["count"] == 0 for listing in lists)
    # Alice's objects are untouched.
    queued.refresh_from_db()
    assert queued.status == "queued" and not queued.cancel_requested
    assert dataset.__class__.objects.filter(pk=dataset.pk).exists()
    assert not UsageLog.objects.filter(user=world["dataset"].owner).exists()


def test_it_names_the_field_and_the_limit_in_each_refusal(world, alice):
    api, page = world["clients"]["alice"]
    dataset = world["dataset"]
    chat = {"model": json.dumps(BASE), "messages": '[{"role": "user", "content": "hi"}]', "max_tokens": "1"}
    seed_range = f"from {-(2**63)} to {2**63 - 1}"
    cases = [
        ("/v1/chat/completions", {**chat, "model": json.dumps(f"tuna-job-1{NUL}")}, "model", "NUL character"),
        (
            "/v1/chat/completions",
            {**chat, "messages": json.dumps([{"role": "user", "content": SURROGATE}])},
            "messages[0].content",
            "lone UTF-16 surrogate (\\ud800)",
        ),
        (
            "/v1/chat/completions",
            {**chat, "stream_options": json.dumps({NUL: True})},
            'stream_options."\\u0000"',
            "This key contains a NUL",
        ),
        ("/v1/chat/completions", {**chat, "temperature": "1e309"}, "temperature", "must be finite"),
        ("/v1/chat/completions", {**chat, "seed": str(10**30)}, "seed", seed_range),
        ("/api/inference", {"model_id": json.dumps(f"a{SURROGATE}"), "prompt": '"hi"'}, "model_id", "surrogate"),
        (
            "/api/training/start",
            {"dataset_id": str(dataset.pk), "config": '{"num_epochs": "inf"}'},
            "num_epochs",
            "finite number between 1 and 50",
        ),
        (
            "/api/training/start",
            {"dataset_id": str(dataset.pk), "config": f'{{"batch_size": {10**400}}}'},
            "batch_size",
            "Must be a number",
        ),
        ("/api/training/start", {"dataset_id": str(dataset.pk), "config": '{"seed": 1e309}'}, "config.seed", "must be finite"),
    ]
    for path, fields, field, message in cases:
        response = api.post(path, data=_object(fields), content_type="application/json")
        assert response.status_code == 400, (path, fields, response.content)
        body = response.json()
        if path.startswith("/v1/"):
            assert body["error"]["param"] == field and message in body["error"]["message"], body
        else:
            errors = body.get("errors", {})
            assert field in errors or field in body["detail"], body
            assert message in body["detail"], body
    deep_body = _object({**chat, "messages": deep(100)})
    response = api.post("/v1/chat/completions", data=deep_body, content_type="application/json")
    assert response.status_code == 400 and "nested more than 64 levels deep (at messages[0][0]" in response.json()["error"]["message"]
    response = api.post("/api/inference", data=deep(5000), content_type="application/json")
    assert response.status_code == 400 and "nested more than 64 levels deep" in response.json()["detail"]
    for model in ("tuna-job-²", "tuna-job-١٢", f"tuna-job-{HUGE_ID}"):
        response = api.post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}, format="json")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", model
        response = page.post("/playground", {"model": model, "prompt": "hi"}, HTTP_HX_REQUEST="true")
        assert response.status_code == 404 and "does not exist" in response.content.decode()
    # A refused model id is logged as sent (here in a form body), escaped where a database column could not hold it.
    response = api.post("/api/inference", {"model_id": f"tuna-job-{NUL}", "prompt": "hi"}, format="multipart")
    assert response.status_code == 400 and "model_id" in response.json()["errors"]
    assert UsageLog.objects.filter(user=alice, model_id="tuna-job-\\x00", status="error").exists()

    good = [json.dumps({"prompt": f"Question {i} about orders?", "completion": f"Answer {i} about orders."}) for i in range(12)]
    bad = ['{"prompt": "a\\ud800b", "completion": "fine"}', '{"messages": [{"role": "user", "content": "x\\u0000"}]}', deep(3000)]
    upload = SimpleUploadedFile("data.jsonl", ("\n".join([*good, *bad]) + "\n").encode())
    response = api.post("/api/datasets", {"file": upload}, format="multipart")
    assert response.status_code == 201, response.content
    errors = {item["line"]: item["message"] for item in response.json()["validation_report"]["errors"]["items"]}
    assert "lone UTF-16 surrogate (\\ud800)" in errors[13] and '"prompt"' in errors[13]
    assert "NUL character" in errors[14] and '"messages[0].content"' in errors[14]
    assert "nested more than 64 levels deep" in errors[15]

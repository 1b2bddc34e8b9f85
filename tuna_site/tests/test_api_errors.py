"""One error path: every operation of the OpenAPI schema, called with bad input, answers 4xx in the one shape
(``{"detail": str, "errors": {field: [str]}}`` under /api, OpenAI's ``{"error": {...}}`` under /v1), and no API
view catches a service error itself. Bad input is refused before any model loads: no model here."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from datasets_app.services import dataset_create
from evaluation_app.models import Evaluation
from tests.support import job_row, jsonl_file, pc_rows
from training_app.models import Experiment
from tuna_core import errors as tuna_errors
from tuna_core.errors import UserError

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
API_MODULES = [
    "datasets_app/api.py",
    "training_app/api.py",
    "training_app/export_api.py",
    "evaluation_app/api.py",
    "inference_app/api/base.py",
    "inference_app/api/openai.py",
    "inference_app/api/seed.py",
]
MISSING_ID = 987654
# A value of the wrong type for each schema type.
WRONG = {"string": {"not": "text"}, "integer": "seven", "number": "many", "boolean": "perhaps", "array": 5, "object": 5}


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    with django_db_blocker.unblock():
        return SchemaGenerator().get_schema(request=None, public=True)


def operations(schema, prefix: str) -> list[tuple[str, str, dict]]:
    return [
        (method, path, operation)
        for path, methods in schema["paths"].items()
        if path.startswith(prefix)
        for method, operation in methods.items()
    ]


def json_body_schema(schema, operation) -> dict | None:
    content = operation.get("requestBody", {}).get("content", {})
    body = content.get("application/json", {}).get("schema")
    if body and "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    return body


def call(client: APIClient, method: str, path: str, **kwargs):
    return getattr(client, method)(path, **kwargs)


def assert_one_shape(response, where) -> dict:
    assert 400 <= response.status_code < 500, (where, response.status_code, response.content[:300])
    body = response.json()
    assert set(body) == {"detail", "errors"}, (where, body)
    assert isinstance(body["detail"], str) and body["detail"], (where, body)
    assert isinstance(body["errors"], dict), (where, body)
    for field, messages in body["errors"].items():
        assert isinstance(field, str) and isinstance(messages, list) and messages, (where, body)
        assert all(isinstance(message, str) and message for message in messages), (where, body)
    return body


def assert_openai_shape(response, where) -> dict:
    assert 400 <= response.status_code < 500, (where, response.status_code, response.content[:300])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (where, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], (where, body)
    assert isinstance(body["error"]["type"], str), (where, body)
    return body["error"]


@pytest.fixture
def objects(alice, bob, valid_dataset):
    """Alice's own dataset, job and evaluation, and bob's, by the first word of the path after /api/."""
    bobs_dataset = dataset_create(owner=bob, upload=jsonl_file(pc_rows(20)), name="Bob's")
    own_job = job_row(alice, valid_dataset, status="completed")
    bobs_job = job_row(bob, bobs_dataset, status="completed")
    return {
        "own": {
            "datasets": valid_dataset.pk,
            "training": own_job.pk,
            "evaluation": Evaluation.objects.create(owner=alice, training_job=own_job, status="completed", test_size=2).pk,
            "experiments": Experiment.objects.create(owner=alice, dataset=valid_dataset, base_model=own_job.base_model).pk,
        },
        "bob": {
            "datasets": bobs_dataset.pk,
            "training": bobs_job.pk,
            "evaluation": Evaluation.objects.create(owner=bob, training_job=bobs_job, status="completed", test_size=2).pk,
            "experiments": Experiment.objects.create(owner=bob, dataset=bobs_dataset, base_model=bobs_job.base_model).pk,
        },
    }


def concrete(path: str, pk: int) -> str:
    return path.replace("{id}", str(pk)).replace("{name}", "model.gguf")


def test_it_answers_an_unknown_or_another_users_id_with_404_in_the_one_shape(schema, alice_api, objects):
    walked = 0
    for method, path, _ in operations(schema, "/api/"):
        if "{id}" not in path:
            continue
        kind = path.split("/")[2]
        for pk in (MISSING_ID, objects["bob"][kind]):
            response = call(alice_api, method, concrete(path, pk), data={}, format="json")
            assert response.status_code == 404, (method, path, pk, response.content[:300])
            assert_one_shape(response, (method, path, pk))
            walked += 1
    assert walked >= 2 * 20  # every operation on an object was walked


def test_it_refuses_a_body_that_is_not_json_in_the_one_shape(schema, alice_api, objects):
    walked = 0
    for method, path, operation in operations(schema, "/api/"):
        if "requestBody" not in operation:
            continue
        url = concrete(path, objects["own"].get(path.split("/")[2], MISSING_ID))
        response = call(alice_api, method, url, data='{"dataset_id": 1,', content_type="application/json")
        body = assert_one_shape(response, (method, path))
        if json_body_schema(schema, operation) is not None:
            assert response.status_code == 400 and "JSON parse error" in body["detail"], (method, path, body)
        else:  # multipart only (uploads): JSON is not accepted at all
            assert response.status_code == 415, (method, path, body)
        walked += 1
    assert walked >= 10


def test_it_refuses_missing_and_wrong_typed_fields_in_the_one_shape(schema, alice_api, objects):
    walked = 0
    for method, path, operation in operations(schema, "/api/"):
        body_schema = json_body_schema(schema, operation)
        if body_schema is None:
            continue
        url = concrete(path, objects["own"].get(path.split("/")[2], MISSING_ID))
        response = call(alice_api, method, url, data=[], format="json")  # not an object at all
        assert response.status_code == 400, (method, path, response.content[:300])
        assert_one_shape(response, (method, path, "[]"))
        required = body_schema.get("required", [])
        if required:
            response = call(alice_api, method, url, data={}, format="json")
            assert response.status_code == 400, (method, path, response.content[:300])
            errors = assert_one_shape(response, (method, path, "{}"))["errors"]
            assert set(required) <= set(errors), (method, path, errors)
        for field, spec in body_schema.get("properties", {}).items():
            kind = spec.get("type")
            if kind not in WRONG or spec.get("readOnly"):
                continue
            response = call(alice_api, method, url, data={field: WRONG[kind]}, format="json")
            assert response.status_code == 400, (method, path, field, response.content[:300])
            body = assert_one_shape(response, (method, path, field))
            assert field in body["errors"] or any(key.startswith(f"{field}") for key in body["errors"]), (method, path, field, body)
            walked += 1
    assert walked >= 15


def test_it_asks_anonymous_callers_to_log_in_in_the_one_shape(schema):
    anonymous = APIClient()
    for method, path, _ in operations(schema, "/api/"):
        response = call(anonymous, method, concrete(path, MISSING_ID), data={}, format="json")
        assert response.status_code == 401, (method, path)
        assert_one_shape(response, (method, path))
    for method, path, _ in operations(schema, "/v1/"):
        response = call(anonymous, method, path, data={}, format="json")
        assert response.status_code == 401, (method, path)
        assert assert_openai_shape(response, (method, path))["type"] == "authentication_error"


def test_it_answers_v1_operations_in_openai_shape(schema, alice_api):
    # The generation endpoints; the fine-tuning API's bodies are walked by openai_api's own tests.
    posts = [
        (method, path) for method, path, operation in operations(schema, "/v1/") if path in ("/v1/chat/completions", "/v1/completions")
    ]
    assert len(posts) == 2
    for method, path in posts:
        response = call(alice_api, method, path, data='{"model":', content_type="application/json")
        assert response.status_code == 400 and assert_openai_shape(response, path)["type"] == "invalid_request_error"
        response = call(alice_api, method, path, data={"model": "base:smollm2-135m-instruct", "max_tokens": "many"}, format="json")
        assert response.status_code == 400 and assert_openai_shape(response, path)["param"] in ("max_tokens", "messages", "prompt")
        response = call(alice_api, method, path, data=[], format="json")
        assert response.status_code == 400 and assert_openai_shape(response, path)
        if "chat" in path:  # a nested refusal names its field, as OpenAI's param does
            response = call(alice_api, method, path, data={"model": "base:smollm2-135m-instruct", "messages": []}, format="json")
            assert response.status_code == 400 and assert_openai_shape(response, path)["param"] == "messages"
            response = call(alice_api, method, path, data={"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, format="json")
            assert response.status_code == 400 and assert_openai_shape(response, path)["param"] == "messages[0].role"
        prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
        response = call(alice_api, method, path, data={"model": f"tuna-job-{MISSING_ID}", **prompt, "max_tokens": 1}, format="json")
        error = assert_openai_shape(response, path)
        assert response.status_code == 404 and error["code"] == "model_not_found" and error["type"] == "not_found_error"
    error = assert_openai_shape(alice_api.get("/v1/nope"), "/v1/nope")
    assert error["type"] == "not_found_error" and error["code"] is None


def test_it_sends_retry_after_with_a_refusal_that_says_when(rf, alice):
    """A UserError with retry_after, rendered by the handler as /api and as /v1 would."""
    exc = tuna_errors.Unavailable("Busy; try again in about 3 s.", retry_after=3)
    request = rf.post("/api/inference")
    response = tuna_errors.exception_handler(exc, {"request": request, "view": None})
    assert response.status_code == 503 and response["Retry-After"] == "3"
    assert response.data == {"detail": "Busy; try again in about 3 s.", "errors": {}}
    v1 = tuna_errors.exception_handler(exc, {"request": rf.post("/v1/completions"), "view": None})
    assert v1.status_code == 503 and v1["Retry-After"] == "3"
    assert v1.data == {
        "error": {"message": "Busy; try again in about 3 s.", "type": "overloaded_error", "param": None, "code": "engine_overloaded"}
    }


def test_it_documents_the_one_shape_in_the_schema(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["detail", "errors"]
    assert error["properties"]["errors"]["additionalProperties"] == {"type": "array", "items": {"type": "string"}}
    for method, path, operation in operations(schema, "/api/"):
        ref = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/Error"), (method, path)
    for method, path, operation in operations(schema, "/v1/"):
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError"), (method, path)


def user_error_names() -> set[str]:
    """The names of every UserError subclass the API modules can see (services, quotas, exports, ...)."""
    names = set()
    for relative in API_MODULES:
        module = importlib.import_module(relative.removesuffix(".py").replace("/", "."))
        for value in vars(module).values():
            candidates = [value] if inspect.isclass(value) else []
            if inspect.ismodule(value):
                candidates = [v for v in vars(value).values() if inspect.isclass(v)]
            names.update(c.__name__ for c in candidates if issubclass(c, UserError))
    return names | {"UserError", "LimitExceeded", "Exception", "BaseException"}


def is_stream(function: ast.AST) -> bool:
    """A generator: its errors come after the status line has gone out, so it reports them in the stream."""
    return any(isinstance(node, (ast.Yield, ast.YieldFrom)) for node in ast.walk(function))


def test_it_finds_no_api_view_that_catches_a_service_error_itself():
    forbidden = user_error_names()
    assert {"JobConflict", "UploadRejected", "InferenceRefused", "ExportRefused", "LimitExceeded"} <= forbidden
    caught = []
    for relative in API_MODULES:
        tree = ast.parse((ROOT / relative).read_text(), filename=relative)
        streamed = {
            id(handler)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef) and is_stream(function)
            for handler in ast.walk(function)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler) or node.type is None or id(node) in streamed:
                continue
            kinds = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            for kind in kinds:
                name = kind.attr if isinstance(kind, ast.Attribute) else getattr(kind, "id", "")
                if name in forbidden:
                    caught.append(f"{relative}:{node.lineno} except {name}")
    assert caught == []

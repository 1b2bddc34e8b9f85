"""What one request may ask of the model, refused before the work it would cost: TUNA_MAX_CHAT_MESSAGES and
TUNA_MAX_PROMPT_TOKENS (a 60k-message chat or a 2 MB prompt is refused in well under 100 ms, before anything is
rendered, tokenized or loaded), a chat template's own rules (400 naming the rule, never a 500), and a JSON body over
DATA_UPLOAD_MAX_MEMORY_SIZE (413 with the usual error object, read through a real server: not a reset connection).
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from django.urls import reverse

from inference_app import services
from inference_app.models import UsageLog
from tests.support import api_key
from tuna_llm import loading
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import prepare_embedded_model
from tuna_llm.prompting import ChatTemplateRefused, render_chat
from tuna_llm.serving.registry import registry

pytestmark = pytest.mark.django_db

BASE = "base:smollm2-135m-instruct"
FAST_S = 0.100  # the bound for refusing a 60k-message chat


def timed_post(api, path: str, body: bytes):
    """POST an already encoded JSON body (the client's encoding is not counted): the answer, and the CPU seconds the
    server's work took. The test client runs the request in this thread, so the thread's CPU time is the request's
    own work, whatever else the machine runs (wall time on a shared CI machine measures its neighbours too)."""
    started = time.thread_time()
    response = api.post(path, data=body, content_type="application/json")
    return response, time.thread_time() - started


def sixty_thousand_messages() -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(60_000)]


@pytest.fixture
def nothing_loaded():
    """The test refuses before any model is loaded: no weights are read while it runs."""
    before = loading.weights_loaded
    yield
    assert loading.weights_loaded == before, "a model was loaded to refuse the request"


def best_of(runs: int, attempt) -> tuple[object, float]:
    """The last answer and the fastest of a few runs: the bound is about the work done, not a run's bad moment."""
    results = [attempt() for _ in range(runs)]
    return results[-1][0], min(seconds for _, seconds in results)


# -- message count and prompt size: refused before any work -----------------------------------------------
def test_it_refuses_a_60k_message_chat_in_under_100_ms_through_v1(alice_api, alice, settings, nothing_loaded):
    body = json.dumps({"model": BASE, "messages": sixty_thousand_messages(), "max_tokens": 8}).encode()
    assert 1_500_000 < len(body) < settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # the issue's ~2 MB chat, under the body cap

    response, seconds = best_of(5, lambda: timed_post(alice_api, "/v1/chat/completions", body))

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "at most 512 messages (TUNA_MAX_CHAT_MESSAGES)" in error["message"] and "60000" in error["message"]
    assert seconds < FAST_S, f"refused in {seconds * 1000:.0f} ms"
    refused = UsageLog.objects.filter(user=alice, status="error", endpoint="v1/chat/completions")
    assert refused.count() == 5 and "TUNA_MAX_CHAT_MESSAGES" in refused.first().error


def test_it_refuses_a_2_mb_prompt_in_under_100_ms_through_the_native_api_and_v1_completions(alice_api, alice, settings, nothing_loaded):
    prompt = "word " * 420_000  # 2.1 MB: tokenizing it alone takes seconds
    native = json.dumps({"model_id": BASE, "prompt": prompt, "max_tokens": 8}).encode()
    v1 = json.dumps({"model": BASE, "prompt": prompt, "max_tokens": 8}).encode()

    response, seconds = best_of(5, lambda: timed_post(alice_api, "/api/inference", native))
    assert response.status_code == 400, response.content
    body = response.json()
    assert list(body["errors"]) == ["prompt"]
    assert "TUNA_MAX_PROMPT_TOKENS" in body["detail"] and "2,100,000 characters" in body["detail"]
    assert seconds < FAST_S, f"/api/inference refused in {seconds * 1000:.0f} ms"

    response, seconds = best_of(5, lambda: timed_post(alice_api, "/v1/completions", v1))
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert seconds < FAST_S, f"/v1/completions refused in {seconds * 1000:.0f} ms"
    assert UsageLog.objects.filter(user=alice, status="error").count() == 10


def test_it_counts_a_chat_s_characters_before_rendering_it(alice_api, settings, nothing_loaded):
    settings.TUNA_MAX_PROMPT_TOKENS = 100  # 1,600 characters before anything is rendered
    messages = [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y" * 700}, {"role": "user", "content": "z"}]
    response = alice_api.post("/v1/chat/completions", {"model": BASE, "messages": messages}, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "1,701 characters" in error["message"] and "(TUNA_MAX_PROMPT_TOKENS)" in error["message"]


def test_it_takes_a_chat_of_exactly_the_message_limit_past_the_count(alice_api, settings, nothing_loaded):
    settings.TUNA_MAX_CHAT_MESSAGES = 3
    settings.TUNA_MAX_PROMPT_TOKENS = 16  # refused next, by its size: the count let it through
    messages = [{"role": "user", "content": "a" * 100}, {"role": "assistant", "content": "b" * 100}, {"role": "user", "content": "c" * 100}]
    at_limit = alice_api.post("/v1/chat/completions", {"model": BASE, "messages": messages}, format="json")
    over = alice_api.post("/v1/chat/completions", {"model": BASE, "messages": [*messages, messages[0]]}, format="json")

    assert at_limit.status_code == 400 and "TUNA_MAX_PROMPT_TOKENS" in at_limit.json()["error"]["message"]
    assert over.status_code == 400 and "at most 3 messages (TUNA_MAX_CHAT_MESSAGES); this one has 4" in over.json()["error"]["message"]


def test_it_checks_the_message_count_in_the_service_too(alice, settings, nothing_loaded):
    settings.TUNA_MAX_CHAT_MESSAGES = 2
    model = services.resolve_model(alice, BASE)
    with pytest.raises(services.InferenceInvalid, match=r"at most 2 messages \(TUNA_MAX_CHAT_MESSAGES\); this one has 3") as refused:
        services.prepare_call(user=alice, model=model, endpoint="test", messages=[{"role": "user", "content": "hi"}] * 3)
    assert refused.value.param == "messages"


# -- the JSON parser's quick path refuses what its walk refuses ------------------------------------------
def raw_chat(content_json: str, extra: str = "") -> bytes:
    """A chat body written by hand, so escapes reach the server exactly as typed."""
    return ('{"model": "base:no-such-model", "messages": [{"role": "user", "content": ' + content_json + "}]" + extra + "}").encode()


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        (raw_chat('"a\\u0000b"'), 400, "messages[0].content: This text contains a NUL character"),
        (raw_chat('"a\\ud800b"'), 400, "messages[0].content: This text contains a lone UTF-16 surrogate (\\ud800)"),
        (raw_chat('"a\\udc00"'), 400, "lone UTF-16 surrogate (\\udc00)"),
        (raw_chat('"\\ud83d\\ude00 \\udc00"'), 400, "lone UTF-16 surrogate (\\udc00)"),  # a pair, then a lone half
        # an escaped backslash, the text uD800, then a lone second half: escapes counted in the raw text pair up
        (raw_chat('"\\\\uD800\\uDC00"'), 400, "lone UTF-16 surrogate (\\udc00)"),
        (raw_chat('"hi"', ', "temperature": 1e309'), 400, "temperature: This number is too large"),
        (raw_chat('"hi"', ', "temperature": 1' + "0" * 320 + ".5"), 400, "temperature: This number is too large"),
        (raw_chat('"hi"', ', "metadata": ' + "[" * 64 + "]" * 64), 400, "nested more than 64 levels deep"),
        (raw_chat('"\\ud83d\\ude00 is fine"'), 404, "does not exist"),  # an escaped emoji: a whole pair
        (raw_chat('"a\\\\u0000b"'), 404, "does not exist"),  # an escaped backslash, then the text u0000
        (raw_chat('"hi"', ', "metadata": ' + "[" * 63 + "]" * 63), 404, "does not exist"),  # 64 levels with the body's own
        (raw_chat('"page100e200"', ', "temperature": 1e2'), 404, "does not exist"),
    ],
)
def test_it_refuses_in_the_parser_what_no_field_can_hold_and_passes_the_rest(alice_api, body, status, said):
    response = alice_api.post("/v1/chat/completions", data=body, content_type="application/json")

    assert response.status_code == status, response.content
    assert said in response.json()["error"]["message"]


def test_it_walks_a_60k_message_chat_that_hides_a_nul_and_names_where(alice_api):
    messages = sixty_thousand_messages()
    messages[-1]["content"] = "a\x00"
    response = alice_api.post(
        "/v1/chat/completions", data=json.dumps({"model": BASE, "messages": messages}).encode(), content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[59999].content"


# -- chat templates that refuse messages -----------------------------------------------------------------
# Mistral's and Gemma's templates refuse a conversation whose roles do not alternate, with raise_exception.
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TWO_USERS = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Are you there?"}]


@pytest.fixture
def strict_base(settings, tmp_path) -> str:
    """A catalog base model: the embedded model's files with a chat template that refuses non-alternating roles."""
    source = Path(prepare_embedded_model(get_base_model_spec()))
    folder = tmp_path / "strict-chat"
    folder.mkdir()
    for item in source.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
            (folder / item.name).symlink_to(item.resolve())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = ALTERNATING
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(ALTERNATING)
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "strict-chat": str(folder)}
    yield "strict-chat"
    registry.clear()
    shutil.rmtree(folder, ignore_errors=True)


def test_it_turns_a_template_s_raise_exception_into_a_refusal_naming_the_rule(strict_base, settings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.TUNA_BASE_MODELS[strict_base])  # the tokenizer only: no weights
    assert render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True).endswith("[INST] Hi [/INST]")
    with pytest.raises(ChatTemplateRefused) as refused:
        render_chat(tokenizer, TWO_USERS, add_generation_prompt=True)
    assert refused.value.rule == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert isinstance(refused.value, ValueError)


@pytest.mark.model
def test_it_answers_400_naming_the_rule_when_a_chat_template_refuses_the_messages(alice_api, alice, strict_base):
    response = alice_api.post(
        "/v1/chat/completions", {"model": f"base:{strict_base}", "messages": TWO_USERS, "max_tokens": 4}, format="json"
    )

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "chat template refuses these messages: Conversation roles must alternate user/assistant" in error["message"]
    streamed = alice_api.post(
        "/v1/chat/completions", {"model": f"base:{strict_base}", "messages": TWO_USERS, "stream": True}, format="json"
    )
    assert streamed.status_code == 400 and "roles must alternate" in streamed.json()["error"]["message"]
    page = alice_api.post(
        "/v1/chat/completions", {"model": f"base:{strict_base}", "messages": TWO_USERS[:1], "max_tokens": 4}, format="json"
    )
    assert page.status_code == 200, page.content  # the same model answers messages its template accepts
    assert UsageLog.objects.filter(user=alice, status="error", error__contains="roles must alternate").count() == 2


@pytest.mark.model
def test_it_refuses_a_prompt_over_the_token_limit_by_its_exact_count(alice_api, settings):
    settings.TUNA_MAX_PROMPT_TOKENS = 48  # 768 characters pass the early check; the tokens decide (the chat template's
    # default system message is about 20 of them)
    response = alice_api.post("/api/inference", {"model_id": BASE, "prompt": "one two three " * 12, "max_tokens": 4}, format="json")

    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    assert "this server takes at most 48 prompt tokens (TUNA_MAX_PROMPT_TOKENS)" in detail
    assert alice_api.post("/api/inference", {"model_id": BASE, "prompt": "Hi", "max_tokens": 4}, format="json").status_code == 200


# -- a body over DATA_UPLOAD_MAX_MEMORY_SIZE -------------------------------------------------------------
def oversized_chat(settings) -> bytes:
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE}]}).encode()
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return body


def test_it_answers_413_with_the_error_object_for_a_json_body_over_the_cap(alice_api, settings, caplog):
    caplog.set_level(logging.DEBUG)
    body = oversized_chat(settings)

    v1 = alice_api.post("/v1/chat/completions", data=body, content_type="application/json")
    native = alice_api.post("/api/inference", data=body, content_type="application/json")
    other = alice_api.post("/v1/fine_tuning/jobs", data=body, content_type="application/json")

    assert v1.status_code == 413
    error = v1.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert f"{len(body):,} bytes" in error["message"] and "DATA_UPLOAD_MAX_MEMORY_SIZE" in error["message"]
    assert native.status_code == 413 and native.json()["errors"] == {} and "DATA_UPLOAD_MAX_MEMORY_SIZE" in native.json()["detail"]
    assert other.status_code == 413 and "DATA_UPLOAD_MAX_MEMORY_SIZE" in other.json()["error"]["message"]  # any API view
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"


@pytest.mark.django_db(transaction=True)
def test_it_answers_413_through_a_real_server_instead_of_closing_the_connection(live_server, alice, settings):
    body = oversized_chat(settings)
    host, port = live_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {api_key(alice)}", "Content-Type": "application/json"}

    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = connection.getresponse()

    assert response.status == 413
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_it_documents_the_413_answer(alice_api):
    schema = alice_api.get(reverse("api-schema"), HTTP_ACCEPT="application/json").json()
    answer = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["413"]
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in answer["description"]

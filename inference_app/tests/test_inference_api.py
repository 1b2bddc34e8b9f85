"""The seed's /api/inference and the OpenAI-compatible /v1, on the real embedded model."""

import pytest
from django.urls import reverse

from inference_app.models import UsageLog
from training_app.models import TrainingJob

pytestmark = [pytest.mark.django_db, pytest.mark.model]

ORDER = "Extract the order as JSON with keys product, color, size, quantity, shipping.\nOrder: Please send 2 hoodies, red, large. no rush"


def test_it_answers_the_seed_contract_from_a_fine_tuned_adapter(alice_api, alice, finetuned_job):
    # As the seed README's curl example, plus the token.
    response = alice_api.post("/api/inference", {"model_id": finetuned_job.pk, "prompt": ORDER, "max_tokens": 64}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) >= {"output", "latency_ms", "tokens_used", "prompt_tokens", "completion_tokens", "cost_usd", "model_id"}
    assert body["model_id"] == f"tuna-job-{finetuned_job.pk}"
    assert body["output"].startswith("{")  # the fine-tune answers in the learned JSON shape
    assert body["tokens_used"] == body["prompt_tokens"] + body["completion_tokens"]
    assert body["latency_ms"] > 0 and body["cost_usd"] > 0
    log = UsageLog.objects.get(user=alice)
    assert (log.model_id, log.endpoint, log.status, log.completion_tokens) == (
        body["model_id"],
        "api/inference",
        "ok",
        body["completion_tokens"],
    )
    base = alice_api.post(
        "/api/inference", {"model_id": "base:smollm2-135m-instruct", "prompt": ORDER, "max_tokens": 64}, format="json"
    ).json()
    assert base["model_id"] == "base:smollm2-135m-instruct" and base["output"] != body["output"]


def test_it_refuses_bad_inference_requests_clearly(alice_api, bob, alice, finetuned_job, valid_dataset):
    other = TrainingJob.objects.create(
        owner=bob,
        dataset=valid_dataset,
        base_model="smollm2-135m-instruct",
        config={},
        status="completed",
        adapter_dir=finetuned_job.adapter_dir,
    )
    queued = TrainingJob.objects.create(owner=alice, dataset=valid_dataset, base_model="smollm2-135m-instruct", config={})
    cases = [
        ({"model_id": 999, "prompt": "hi"}, 404, "does not exist"),
        ({"model_id": other.pk, "prompt": "hi"}, 404, "does not exist"),
        ({"model_id": "base:gpt-5", "prompt": "hi"}, 404, "does not exist"),
        ({"model_id": queued.pk, "prompt": "hi"}, 409, "not ready"),
        ({"model_id": finetuned_job.pk}, 400, "prompt"),
        ({"model_id": finetuned_job.pk, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be a whole number from 1 to 2048"),
        ({"model_id": finetuned_job.pk, "prompt": "hi", "max_tokens": 4096}, 400, "max_tokens"),
        ({"model_id": finetuned_job.pk, "prompt": "word " * 9000}, 400, "context holds 8192"),
        ({"model_id": finetuned_job.pk, "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ]
    for payload, status, message in cases:
        response = alice_api.post("/api/inference", payload, format="json")
        assert response.status_code == status, (payload, response.content)
        assert message in response.json()["detail"], payload
        assert "Traceback" not in response.content.decode()
    assert UsageLog.objects.filter(user=alice, status="error").count() >= 6


def test_it_refuses_a_wrong_token(client):
    response = client.post(
        "/api/inference", {"model_id": 1, "prompt": "hi"}, content_type="application/json", HTTP_AUTHORIZATION="Bearer nope"
    )
    assert response.status_code == 401
    v1 = client.post("/v1/chat/completions", {}, content_type="application/json", HTTP_AUTHORIZATION="Bearer nope")
    assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"


def test_it_answers_openai_errors_in_openai_shape(alice_api, finetuned_job):
    response = alice_api.post(
        "/v1/chat/completions", {"model": "tuna-job-999", "messages": [{"role": "user", "content": "hi"}]}, format="json"
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = alice_api.post("/v1/chat/completions", {"model": finetuned_job.model_id, "messages": []}, format="json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_it_batches_concurrent_requests_with_the_same_answers_as_alone():
    import threading

    from inference_app.batching import BatchingEngine, GenerationRequest
    from inference_app.engine import generate_chat
    from inference_app.prompting import render_chat
    from inference_app.registry import registry

    loaded = registry.get()
    prompts = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish.", "What is 2 + 2?"]
    alone = [generate_chat(loaded, [{"role": "user", "content": p}], max_new_tokens=24).text for p in prompts]
    engine = BatchingEngine(loaded, window_s=0.2)
    requests = [
        GenerationRequest(
            text=render_chat(loaded.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True), max_new_tokens=24
        )
        for p in prompts
    ]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert engine.largest_batch == 4 and engine.batches_run == 1
    assert [r.result.text for r in requests] == alone


def test_it_keeps_a_bounded_adapter_cache_without_reloading_the_base(settings, trained_adapter):
    from inference_app.registry import registry

    settings.TUNA_ADAPTER_CACHE_SIZE = 2
    loaded = registry.get()
    base = loaded.base_model
    for name in ("lru-a", "lru-b", "lru-c"):
        loaded.attach_adapter(name, trained_adapter)
    assert list(loaded.adapters)[-2:] == ["lru-b", "lru-c"] and "lru-a" not in loaded.adapters
    assert registry.get() is loaded and loaded.base_model is base
    for name in list(loaded.adapters):
        loaded.detach_adapter(name)


def test_it_shows_usage_totals_and_the_playground(alice_client, alice, finetuned_job):
    response = alice_client.post(reverse("playground"), {"model": finetuned_job.model_id, "prompt": ORDER}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Base model" in html and f"Fine-tuned ({finetuned_job.model_id})" in html and " ms" in html
    page = alice_client.get(reverse("playground")).content.decode()
    assert "from openai import OpenAI" in page and "/api/inference" in page
    usage = alice_client.get(reverse("usage")).content.decode()
    assert finetuned_job.model_id in usage and "usage-chart-data" in usage
    assert UsageLog.objects.filter(user=alice, endpoint="playground").count() == 2

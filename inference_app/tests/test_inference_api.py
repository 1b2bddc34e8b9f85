"""The seed's /api/inference and the OpenAI-compatible /v1, on the real embedded model."""

import threading

import pytest
from django.urls import reverse

from inference_app import services
from inference_app.models import UsageLog
from tests.support import job_row
from tuna_llm.prompting import render_chat
from tuna_llm.serving import batching
from tuna_llm.serving.batching import BatchingEngine, GenerationRequest, generate_chat
from tuna_llm.serving.registry import registry

pytestmark = [pytest.mark.django_db, pytest.mark.model]

ORDER = (
    "Extract the order as JSON with keys product, color, size, quantity, shipping.\nOrder: Please send hoodie (red, L), quantity 2. no rush"
)


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
    other = job_row(bob, valid_dataset, status="completed", adapter_dir=finetuned_job.adapter_dir)
    queued = job_row(alice, valid_dataset)
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
    # Every refused call is in the usage log with its reason, including bodies refused by validation.
    assert UsageLog.objects.filter(user=alice, status="error").count() == len(cases)
    assert UsageLog.objects.filter(user=alice, status="error", error__contains="prompt").exists()


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


def test_it_names_the_faulty_parameter_on_v1(alice_api, alice, valid_dataset, finetuned_job):
    queued = job_row(alice, valid_dataset)
    chat = {"model": finetuned_job.model_id, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/chat/completions", {**chat, "max_tokens": 5000}, 400, "max_tokens", None),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "prompt", None),
        ("/v1/completions", {"model": finetuned_job.model_id, "prompt": "word " * 9000}, 400, "prompt", None),
        ("/v1/completions", {"model": finetuned_job.model_id, "prompt": "hi", "temperature": 3}, 400, "temperature", None),
        ("/v1/chat/completions", {**chat, "model": queued.model_id}, 409, None, "model_not_ready"),
        ("/v1/completions", {"model": queued.model_id, "prompt": "hi"}, 409, None, "model_not_ready"),
    ]
    for path, payload, status, param, code in cases:
        response = alice_api.post(path, payload, format="json")
        assert response.status_code == status, (path, response.content)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (path, error)
        assert error["message"] and "Traceback" not in error["message"]


def test_it_answers_409_for_a_configured_base_model_that_cannot_be_loaded(alice_api, alice_client, settings, tmp_path):
    (tmp_path / "empty-model").mkdir()
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "gone": str(tmp_path / "gone"), "empty": str(tmp_path / "empty-model")}
    for name, reason in (("gone", "does not exist"), ("empty", "could not be loaded")):
        response = alice_api.post(
            "/v1/chat/completions", {"model": f"base:{name}", "messages": [{"role": "user", "content": "hi"}]}, format="json"
        )
        assert response.status_code == 409, response.content
        assert reason in response.json()["error"]["message"]
        response = alice_api.post("/api/inference", {"model_id": f"base:{name}", "prompt": "hi"}, format="json")
        assert response.status_code == 409 and reason in response.json()["detail"]
        page = alice_client.post(reverse("playground"), {"model": f"base:{name}", "prompt": "hi"}, HTTP_HX_REQUEST="true")
        assert page.status_code == 409 and reason in page.content.decode()
    assert UsageLog.objects.filter(status="error", model_id="base:gone").count() == 3


def test_it_refuses_a_playground_prompt_longer_than_the_context(alice_client, alice, finetuned_job):
    response = alice_client.post(reverse("playground"), {"model": finetuned_job.model_id, "prompt": "word " * 9000}, HTTP_HX_REQUEST="true")
    assert response.status_code == 400
    assert "context holds 8192" in response.content.decode()
    assert not UsageLog.objects.filter(user=alice, status="ok").exists()  # nothing was generated


def test_it_refuses_playground_calls_it_cannot_answer(alice_client, alice, bob, valid_dataset):
    cases = [
        ({"model": "tuna-job-999", "prompt": "hi"}, 404, "does not exist"),
        ({"model": job_row(bob, valid_dataset, status="completed").model_id, "prompt": "hi"}, 404, "does not exist"),
        ({"model": job_row(alice, valid_dataset).model_id, "prompt": "hi"}, 409, "not ready"),
        ({"model": "base:smollm2-135m-instruct", "prompt": "  "}, 400, "Type a prompt first."),
    ]
    for payload, status, message in cases:
        response = alice_client.post(reverse("playground"), payload, HTTP_HX_REQUEST="true")
        assert response.status_code == status, payload
        assert message in response.content.decode()


def generate_concurrently(loaded, rows, *, max_new_tokens: int, window_s: float, adapter_path: str | None = None):
    """Send one (prompt, adapter) request per thread to a fresh batching engine; return it and the requests."""
    engine = BatchingEngine(loaded, window_s=window_s)
    requests = [
        GenerationRequest(
            text=render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True),
            max_new_tokens=max_new_tokens,
            adapter=adapter,
            adapter_path=adapter_path if adapter else None,
        )
        for prompt, adapter in rows
    ]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return engine, requests


def test_it_batches_concurrent_requests_with_the_same_answers_as_alone():
    loaded = registry.get()
    prompts = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish.", "What is 2 + 2?"]
    alone = [generate_chat(loaded, [{"role": "user", "content": p}], max_new_tokens=24).text for p in prompts]
    engine, requests = generate_concurrently(loaded, [(p, None) for p in prompts], max_new_tokens=24, window_s=0.2)
    assert engine.largest_batch == 4 and engine.batches_run == 1
    assert [r.result.text for r in requests] == alone


def test_it_batches_base_and_fine_tuned_requests_together_with_the_same_answers_as_alone(trained_adapter):
    loaded = registry.get()
    loaded.attach_adapter("mixed-a", trained_adapter)
    other = ORDER.replace("hoodie (red, L), quantity 2", "cap (navy, M), quantity 5")
    rows = [(ORDER, None), (ORDER, "mixed-a"), (other, "mixed-a"), (other, None)]
    alone = [generate_chat(loaded, [{"role": "user", "content": p}], adapter=a, max_new_tokens=40).text for p, a in rows]
    assert alone[0] != alone[1]  # the adapter changes the answer, so routing rows to it matters
    try:
        engine, requests = generate_concurrently(loaded, rows, max_new_tokens=40, window_s=0.3, adapter_path=str(trained_adapter))
    finally:
        loaded.detach_adapter("mixed-a")
    assert engine.batches_run == 1 and engine.largest_batch == 4
    assert [r.result.text for r in requests] == alone


def test_it_splits_a_shared_batch_s_time_between_its_rows(alice, settings, monkeypatch):
    loaded = registry.get()
    engine = BatchingEngine(loaded, max_batch=4, window_s=0.3)
    # The services' calls go to this fresh engine, so its counters are theirs alone.
    monkeypatch.setitem(batching._engines, id(loaded), engine)
    base = services.resolve_model(alice, "base:smollm2-135m-instruct")
    prompts = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish.", "Count from one to twenty."]
    # Different token limits, so rows leave the batch at different steps.
    calls = [
        services.prepare_call(user=alice, model=base, endpoint="api/inference", messages=[{"role": "user", "content": p}], max_tokens=n)
        for p, n in zip(prompts, (8, 16, 24, 32), strict=True)
    ]
    results = services.run_calls(calls)
    assert engine.batches_run == 1 and engine.largest_batch == 4
    assert len({c.request.started for c in calls}) == 1  # one batch start for every row
    wall_ms = max(r.latency_ms for r in results)  # batch start to its last row's finish
    compute_ms = [r.compute_ms for r in results]
    print(f"batch wall {wall_ms:.1f} ms; compute {[round(c, 1) for c in compute_ms]}, sum {sum(compute_ms):.1f} ms")
    assert sum(compute_ms) == pytest.approx(wall_ms, rel=0.15)  # not 4x the batch's time
    for result in results:
        assert 0 < result.compute_ms <= result.latency_ms and result.queue_ms >= 0
    logs = UsageLog.objects.filter(user=alice, status="ok").order_by("id")
    assert [log.compute_ms for log in logs] == pytest.approx(compute_ms)
    for log in logs:
        assert log.cost_usd == pytest.approx(log.compute_ms / 3_600_000 * settings.TUNA_GPU_HOURLY_USD)
        assert log.queue_ms >= 0 and log.latency_ms >= log.compute_ms


def test_it_keeps_a_bounded_adapter_cache_without_reloading_the_base(settings, trained_adapter):
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
    assert "from openai import OpenAI" in page and "/api/inference" in page and "data-snippet-model" in page
    usage = alice_client.get(reverse("usage")).content.decode()
    assert finetuned_job.model_id in usage and "usage-chart-data" in usage
    assert UsageLog.objects.filter(user=alice, endpoint="playground").count() == 2


def test_it_times_a_playground_answer_from_its_own_batch_start(alice_client, alice, finetuned_job, settings):
    response = alice_client.post(reverse("playground"), {"model": finetuned_job.model_id, "prompt": ORDER}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    base, tuned = UsageLog.objects.filter(user=alice, endpoint="playground").order_by("id")
    assert (base.model_id, tuned.model_id) == ("base:smollm2-135m-instruct", finetuned_job.model_id)
    print(
        f"base {base.latency_ms:.0f} ms (compute {base.compute_ms:.0f}, queue {base.queue_ms:.0f}); "
        f"fine-tune {tuned.latency_ms:.0f} ms (compute {tuned.compute_ms:.0f}, queue {tuned.queue_ms:.0f})"
    )
    # Had the fine-tune's clock started while the base generated, its latency would be at least the base's
    # latency plus its own compute time.
    assert tuned.latency_ms < base.latency_ms + tuned.compute_ms
    for log in (base, tuned):
        assert 0 < log.compute_ms <= log.latency_ms and log.queue_ms >= 0
        assert log.cost_usd == pytest.approx(log.compute_ms / 3_600_000 * settings.TUNA_GPU_HOURLY_USD)
    html = response.content.decode()
    assert "queue" in html and f"${tuned.cost_usd:.6f}" in html


def test_it_answers_a_near_zero_temperature_greedily_instead_of_failing(alice_api):
    # Found by schemathesis: dividing the logits by 4.7e-62 overflowed to inf and the request answered 500.
    body = {"model_id": "base:smollm2-135m-instruct", "prompt": ORDER, "max_tokens": 8}
    cold = alice_api.post("/api/inference", {**body, "temperature": 4.735931520927907e-62}, format="json")
    greedy = alice_api.post("/api/inference", body, format="json")
    assert cold.status_code == 200, cold.content
    assert cold.json()["output"] == greedy.json()["output"]


def test_it_answers_503_with_retry_after_beyond_the_inference_queue_limit(alice_api, alice, settings):
    """Waiting calls hold server threads: beyond the limit a call is refused at once, streams before their 200."""
    settings.TUNA_MAX_INFERENCE_QUEUE = 2
    engine = batching.engine_for(registry.get())
    body = {"model_id": "base:smollm2-135m-instruct", "prompt": "Say hi.", "max_tokens": 4}
    with services.admissions.admitted(engine, 2):  # two calls are waiting for the model
        busy = alice_api.post("/api/inference", body, format="json")
        stream = alice_api.post(
            "/v1/chat/completions",
            {"model": "base:smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
            format="json",
        )
    assert busy.status_code == 503 and int(busy["Retry-After"]) >= 1
    assert "TUNA_MAX_INFERENCE_QUEUE" in busy.json()["detail"] and "limit is 2" in busy.json()["detail"]
    assert stream.status_code == 503 and stream["Retry-After"]
    assert stream.json()["error"]["type"] == "overloaded_error"
    assert UsageLog.objects.filter(user=alice, status="error").count() == 2  # refusals are logged
    assert services.admissions.count == 0
    assert alice_api.post("/api/inference", body, format="json").status_code == 200  # room again
    assert services.admissions.count == 0

"""Remote engines by URL (TUNA_REMOTE_ENGINES): the configuration checked at start-up, an engine that is down, and
the whole path against a real llama-server at a URL (the protocol vLLM and SGLang speak too): answers and usage rows
naming the engine, adapters it was not started with refused with what to do, and the engine check gating auto."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.urls import reverse
from django.utils import timezone

from inference_app import remote_engines
from inference_app.models import EngineCheck, UsageLog
from tests.support import free_port, job_row
from training_app import exports
from training_app.models import Export
from tuna_core.jobs import job_run
from tuna_llm.serving.llama_server import LlamaServer
from tuna_llm.serving.remote import RemoteConfigError, config_problems, health, parse_engines

pytestmark = pytest.mark.django_db

BASE_NAME = "smollm2-135m-instruct"
BASE = f"base:{BASE_NAME}"
KEY_ENV = "TUNA_TEST_REMOTE_KEY"
MAX_TOKENS = 24
PROMPTS = 4


def chat(api, model: str, messages: list[dict], **extra):
    return api.post("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, **extra}, format="json")


def test_it_refuses_a_bad_configuration_at_start_up_naming_every_problem(settings, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    raw = {
        "no-such-base": {"kind": "vllm", "url": "http://gpu-1:8000", "model": "m"},
        BASE_NAME: {"kind": "tgi", "url": "http://gpu-1:8000/v1", "api_key_env": "NO_SUCH_KEY", "timeout_s": -1, "adapter_root": "jobs"},
    }
    problems = config_problems(raw, [BASE_NAME])
    assert any("'no-such-base' is not a base model of this server" in p for p in problems)
    assert any("kind must be one of vllm, sglang, llama-server, got 'tgi'" in p for p in problems)
    assert any("without /v1" in p for p in problems)
    assert any("NO_SUCH_KEY, which is not set" in p for p in problems)
    assert any("timeout_s must be a number of seconds above 0" in p for p in problems)
    assert any("adapter_root must be an absolute path" in p for p in problems)
    with pytest.raises(RemoteConfigError, match="TUNA_REMOTE_ENGINES: "):
        parse_engines(raw, [BASE_NAME])
    assert config_problems({BASE_NAME: {"kind": "vllm", "url": "http://gpu-1:8000"}}, [BASE_NAME]) == [
        f"'{BASE_NAME}': model must name the base model as the engine knows it (its served model name)"
    ]

    settings.TUNA_REMOTE_ENGINES = raw
    with pytest.raises(SystemCheckError) as failed:
        call_command("check")
    assert "tuna.E330" in str(failed.value) and "'no-such-base' is not a base model" in str(failed.value)

    settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "sglang", "url": "http://gpu-1:30000", "model": "HuggingFaceTB/SmolLM2"}}
    call_command("check")  # a good one passes
    assert parse_engines(settings.TUNA_REMOTE_ENGINES, [BASE_NAME])[BASE_NAME].key == "sglang http://gpu-1:30000 HuggingFaceTB/SmolLM2"


def test_it_answers_503_at_once_when_the_remote_engine_is_unreachable(settings, alice, alice_api, valid_dataset):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.TUNA_SERVING_ENGINE = "remote"
    settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "vllm", "url": url, "model": "smollm2", "timeout_s": 30}}
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nowhere/adapter", completed_at=timezone.now())

    report = health(remote_engines.config_for(BASE_NAME))
    assert not report.ok and "cannot be reached" in report.detail and report.checked_s < 5

    for model in (job.model_id, BASE):  # a fine-tune (its adapter load fails) and the base (its completion fails)
        started = time.monotonic()
        response = chat(alice_api, model, [{"role": "user", "content": "Say hi."}])
        assert response.status_code == 503, response.content
        assert response.headers["Retry-After"]
        assert "cannot be reached" in response.json()["error"]["message"] or "unreachable" in response.json()["error"]["message"]
        assert time.monotonic() - started < 10
    assert UsageLog.objects.filter(user=alice, status="error").count() == 2


def test_it_starts_an_engine_check_only_where_a_remote_engine_can_take_the_adapter(
    settings, alice, alice_api, bob_api, valid_dataset, admin_client
):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir="/nowhere/adapter", completed_at=timezone.now())
    url = f"/api/training/{job.pk}/engine-check"
    assert alice_api.get(url).status_code == 404  # no engine, no check
    refused = alice_api.post(url)
    assert refused.status_code == 409 and "No remote engine is configured" in refused.json()["detail"]

    down = f"http://127.0.0.1:{free_port()}"
    settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "llama-server", "url": down}}
    refused = alice_api.post(url)
    assert refused.status_code == 409 and "export it first" in refused.json()["detail"]

    settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "vllm", "url": down, "model": "smollm2"}}
    started = alice_api.post(url)
    assert started.status_code == 202 and started.json()["engine_kind"] == "vllm" and started.json()["status"] == "queued"
    state = alice_api.get(url).json()
    assert state["check"]["id"] == started.json()["id"] and state["engine"]["ok"] is False
    assert "cannot be reached" in state["engine"]["detail"]
    assert bob_api.get(url).status_code == 404 and bob_api.post(url).status_code == 404
    assert EngineCheck.objects.filter(training_job=job).count() == 1
    listed = admin_client.get(reverse("admin:inference_app_enginecheck_changelist"))
    assert listed.status_code == 200 and f"vllm {down} smollm2" in listed.content.decode()


# -- against a real llama-server at a URL -------------------------------------------------------------------


def export_job(owner, job, settings) -> Export:
    settings.TUNA_PARITY_EXAMPLES = PROMPTS
    export = exports.export_start(owner=owner, job=job, formats=["gguf_f16"])
    job_run(Export, export.pk, exports.export_work)
    export.refresh_from_db()
    assert export.status == "completed", export.error_message
    return export


@pytest.fixture
def remote_llama_server(settings, alice, finetuned_job, monkeypatch):
    """The fine-tune exported, and a llama-server "someone else runs" with its base GGUF and LoRA GGUF, configured as
    the base model's remote engine (the key in the environment, as an operator would set it)."""
    export = export_job(alice, finetuned_job, settings)
    base = settings.TUNA_DATA_DIR / export.file("gguf_base_f16")["path"]
    lora = settings.TUNA_DATA_DIR / export.file("gguf_lora")["path"]
    server = LlamaServer(base, [lora], parallel=2, threads=2, ctx_per_slot=2048).start()
    monkeypatch.setenv(KEY_ENV, server.api_key)
    settings.TUNA_REMOTE_ENGINES = {
        BASE_NAME: {"kind": "llama-server", "url": server.url, "api_key_env": KEY_ENV, "adapter_root": "/srv/tuna/jobs", "timeout_s": 60}
    }
    try:
        yield server
    finally:
        server.stop()


def served_by(api, model: str) -> str:
    response = api.post("/api/inference", {"model_id": model, "prompt": "Say hi.", "max_tokens": 8}, format="json")
    assert response.status_code == 200, response.content
    return response.json()["engine"]


@pytest.mark.model
@pytest.mark.process
def test_it_serves_through_a_remote_llama_server_and_gates_auto_on_an_engine_check(
    settings, alice, alice_api, finetuned_job, valid_dataset, remote_llama_server, fp32
):
    from datasets_app.examples import held_out_examples

    prompts = [messages[:-1] for messages in held_out_examples(finetuned_job.dataset)[:PROMPTS]]
    model = finetuned_job.model_id
    settings.TUNA_SERVING_ENGINE = "transformers"
    torch_answers = [chat(alice_api, model, messages).json()["choices"][0]["message"]["content"] for messages in prompts]

    settings.TUNA_SERVING_ENGINE = "remote"
    remote = [chat(alice_api, model, messages) for messages in prompts]
    for response in remote:
        assert response.status_code == 200, response.content
        answer = response.json()
        assert answer["engine"] == answer["system_fingerprint"] == "llama-server" and answer["model"] == model
        assert answer["usage"]["completion_tokens"] > 0
    # Rendered by us with the base's chat template, greedy, through the job's LoRA GGUF: the transformers answers.
    assert [r.json()["choices"][0]["message"]["content"] for r in remote] == torch_answers
    rows = UsageLog.objects.filter(user=alice, status="ok", engine="llama-server")
    assert rows.count() == len(prompts) and {r.precision for r in rows} == {"gguf"} and all(r.compute_ms > 0 for r in rows)

    # A fine-tune whose LoRA the server was not started with: 409 saying how to start it.
    other = job_row(alice, valid_dataset, status="completed", adapter_dir=finetuned_job.adapter_dir, completed_at=timezone.now())
    refused = chat(alice_api, other.model_id, prompts[0])
    assert refused.status_code == 409 and "export it first" in refused.json()["error"]["message"]
    lora = {"kind": "gguf_lora", "name": "adapter-f16.gguf", "path": f"jobs/{other.pk}/export/adapter-f16.gguf", "size_bytes": 1}
    base = {**lora, "kind": "gguf_base_f16", "name": "base-f16.gguf", "path": "gguf/base-f16.gguf"}
    Export.objects.create(owner=alice, training_job=other, formats=["gguf_f16"], status="completed", files=[base, lora])
    refused = chat(alice_api, other.model_id, prompts[0])
    assert refused.status_code == 409, refused.content
    message = refused.json()["error"]["message"]
    assert "was not started with" in message and f"--lora /srv/tuna/jobs/{other.pk}/export/adapter-f16.gguf" in message

    # auto: not through the remote engine before a check passed; through it after; not after a failed one.
    settings.TUNA_SERVING_ENGINE = "auto"
    settings.TUNA_LLAMA_SERVER_BIN = "/nonexistent/llama-server"  # the local llama.cpp route out of the way
    assert served_by(alice_api, model) == "transformers"
    started = alice_api.post(f"/api/training/{finetuned_job.pk}/engine-check")
    assert started.status_code == 202 and started.json()["status"] == "queued", started.content
    assert alice_api.post(f"/api/training/{finetuned_job.pk}/engine-check").json()["id"] == started.json()["id"]  # one at a time
    job_run(EngineCheck, started.json()["id"], remote_engines.engine_check_work)
    check = EngineCheck.objects.get(pk=started.json()["id"])
    state = alice_api.get(f"/api/training/{finetuned_job.pk}/engine-check").json()
    assert state["check"]["passed"] and state["engine"]["ok"] and state["engine"]["kind"] == "llama-server"
    assert check.status == "completed", check.error_message
    assert check.total == PROMPTS and check.identical == PROMPTS and check.passed and check.done == PROMPTS
    assert check.report["gguf"] == remote_engines.config_for(BASE_NAME).key and check.report["mismatches"] == []
    assert served_by(alice_api, model) == "llama-server"
    assert served_by(alice_api, BASE) == "llama-server"  # the check ran the engine's base weights under the LoRA
    EngineCheck.objects.filter(pk=check.pk).update(identical=0)
    assert served_by(alice_api, model) == "transformers"
    assert served_by(alice_api, BASE) == "transformers"

    # The engine gone: a clear 503 with Retry-After, not a hang.
    settings.TUNA_SERVING_ENGINE = "remote"
    remote_llama_server.stop()
    started = time.monotonic()
    down = chat(alice_api, model, prompts[0])
    assert down.status_code == 503 and down.headers["Retry-After"], down.content
    assert time.monotonic() - started < 15
    assert not health(remote_engines.config_for(BASE_NAME)).ok

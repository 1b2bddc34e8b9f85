"""Remote engines by URL (TUNA_REMOTE_ENGINES): the configuration checked at start-up, an engine that is down, and
the whole path against a real llama-server at a URL (the protocol vLLM and SGLang speak too): answers and usage rows
naming the engine, adapters it was not started with refused with what to do, and the engine check gating auto."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def test_it_refuses_an_engine_url_with_credentials_at_start_up_without_repeating_them(settings):
    secret = "s3cret-pass"
    raw = {BASE_NAME: {"kind": "vllm", "url": f"http://tuna:{secret}@gpu-1:8000", "model": "smollm2"}}
    problems = config_problems(raw, [BASE_NAME])
    assert len(problems) == 1 and "url must not hold credentials" in problems[0] and "api_key_env" in problems[0]
    assert secret not in problems[0]
    assert config_problems({BASE_NAME: {**raw[BASE_NAME], "url": "https://token@gpu-1:8000"}}, [BASE_NAME]) == problems

    settings.TUNA_REMOTE_ENGINES = raw
    with pytest.raises(SystemCheckError) as failed:
        call_command("check")
    assert "tuna.E330" in str(failed.value) and "url must not hold credentials" in str(failed.value)
    assert secret not in str(failed.value)


# -- a tiny HTTP server answering as vLLM documents it (vLLM itself needs a GPU) -----------------------------


class FakeVllm(BaseHTTPRequestHandler):
    """vLLM's OpenAI server as far as LLM Tuna uses it: POST /v1/load_lora_adapter (200 "Success: ...", 400 "has
    already been loaded"), POST /v1/completions (SSE chunks with usage; 404 NotFoundError "The model `job-N` does
    not exist." for an adapter it has not loaded), GET /health, GET /v1/models. ``restart()`` forgets the adapters."""

    loaded: set[str]
    seen: list[tuple[str, dict]]

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if content_type == "application/json" else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, "", "text/plain")
        elif self.path == "/v1/models":
            self._answer(200, {"object": "list", "data": [{"id": "smollm2", "object": "model"}] + [{"id": n} for n in sorted(self.loaded)]})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        if self.path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.loaded:
                message = f"The lora adapter '{body['lora_name']}' has already been loaded."
                self._answer(400, {"error": {"message": message, "type": "InvalidUserInput", "param": None, "code": 400}})
            else:
                self.loaded.add(body["lora_name"])
                self._answer(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.", "text/plain")
        elif self.path == "/v1/completions":
            model = body["model"]
            if model != "smollm2" and model not in self.loaded:
                message = f"The model `{model}` does not exist."
                self._answer(404, {"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}})
                return
            chunks = [
                {"choices": [{"index": 0, "text": f"Hello from {model}.", "finish_reason": None}]},
                {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}},
            ]
            stream = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
            self._answer(200, stream, "text/event-stream")
        else:
            self._answer(404, {"detail": "Not Found"})


@contextmanager
def fake_vllm():
    handler = type("Handler", (FakeVllm,), {"loaded": set(), "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_it_loads_a_vllm_adapter_again_when_the_restarted_engine_has_forgotten_it(settings, alice, alice_api, valid_dataset):
    with fake_vllm() as (url, vllm):
        settings.TUNA_SERVING_ENGINE = "remote"
        settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "vllm", "url": url, "model": "smollm2", "adapter_root": "/mnt/tuna/jobs"}}
        job = job_row(alice, valid_dataset, status="completed", completed_at=timezone.now())
        job.adapter_dir = str(settings.TUNA_DATA_DIR / "jobs" / str(job.pk) / "adapter")
        job.save(update_fields=["adapter_dir"])
        name = f"job-{job.pk}"
        loads = [("/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/mnt/tuna/jobs/{job.pk}/adapter"})]

        first = chat(alice_api, job.model_id, [{"role": "user", "content": "Say hi."}])
        assert first.status_code == 200, first.content
        assert first.json()["choices"][0]["message"]["content"] == f"Hello from {name}."
        assert [seen for seen in vllm.seen if seen[0] != "/v1/completions"] == loads

        vllm.loaded.clear()  # the engine restarted: it forgot the adapter, LLM Tuna still thinks it loaded
        vllm.seen.clear()
        again = chat(alice_api, job.model_id, [{"role": "user", "content": "Say hi again."}])
        assert again.status_code == 200, again.content
        assert again.json()["choices"][0]["message"]["content"] == f"Hello from {name}."
        assert [(path, body.get("model")) for path, body in vllm.seen] == [
            ("/v1/completions", name),  # 404 "does not exist"
            ("/v1/load_lora_adapter", None),
            ("/v1/completions", name),  # answered
        ]
        assert vllm.seen[1] == loads[0]
        assert list(UsageLog.objects.filter(user=alice).values_list("status", "engine")) == [("ok", "vllm"), ("ok", "vllm")]

        vllm.seen.clear()  # a live engine: no load, one call
        assert chat(alice_api, job.model_id, [{"role": "user", "content": "Once more."}]).status_code == 200
        assert [path for path, _ in vllm.seen] == ["/v1/completions"]

        assert health(remote_engines.config_for(BASE_NAME)).models == ("smollm2", name)


def test_it_answers_503_when_a_remote_engine_answers_what_it_should_not(settings, alice_api):
    """A URL that is not the engine it is said to be (here an HTTP server answering vLLM's routes where llama-server's
    are expected): its malformed answers are a 503 naming the engine, never a 500."""
    with fake_vllm() as (url, server):
        settings.TUNA_SERVING_ENGINE = "remote"
        settings.TUNA_REMOTE_ENGINES = {BASE_NAME: {"kind": "llama-server", "url": url}}
        answer_get = server.do_GET
        server.do_GET = lambda self: self._answer(200, [{"id": 0}]) if self.path == "/lora-adapters" else answer_get(self)
        response = chat(alice_api, BASE, [{"role": "user", "content": "Say hi."}])
        assert response.status_code == 503, response.content
        assert response.headers["Retry-After"]
        assert "answered GET /lora-adapters with something other than its list of adapters" in response.json()["error"]["message"]

        config = remote_engines.config_for(BASE_NAME)
        report = health(config)  # /health and /v1/models answer: up
        assert report.ok and report.models == ("smollm2",)
    with fake_vllm() as (url, vllm):
        vllm.do_GET = lambda self: self._answer(200, {"data": "not a list"})
        report = health(parse_engines({BASE_NAME: {"kind": "vllm", "url": url, "model": "smollm2"}}, [BASE_NAME])[BASE_NAME])
        assert not report.ok and "something other than a model list" in report.detail


def test_it_answers_409_when_the_base_models_tokenizer_cannot_be_loaded(settings, alice_api, tmp_path):
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "mine": str(tmp_path / "missing-model")}
    settings.TUNA_SERVING_ENGINE = "remote"
    settings.TUNA_REMOTE_ENGINES = {"mine": {"kind": "vllm", "url": f"http://127.0.0.1:{free_port()}", "model": "mine"}}
    response = chat(alice_api, "base:mine", [{"role": "user", "content": "Say hi."}])
    assert response.status_code == 409, response.content
    message = response.json()["error"]["message"]
    assert "could not load that base model's tokenizer" in message and str(tmp_path) not in message


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

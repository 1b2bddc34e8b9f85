"""Serving through llama.cpp (TUNA_SERVING_ENGINE) on the real embedded model, real exports and the real
pinned llama.cpp: the same answers as transformers, every answer and usage row naming its engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from datasets_app.examples import held_out_examples
from inference_app import engines, services
from inference_app.models import UsageLog
from tests.support import job_row
from training_app import exports
from training_app.models import Export
from tuna_core.jobs import job_run
from tuna_llm import gguf_export
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.serving import llama_server
from tuna_llm.serving.registry import registry

pytestmark = [pytest.mark.django_db, pytest.mark.model]

BASE = "base:smollm2-135m-instruct"
MAX_TOKENS = 24
PROMPTS = 4


def export_job(owner, job, settings) -> Export:
    """An f16 GGUF export of the job, run as the worker runs it (a short parity check)."""
    settings.TUNA_PARITY_EXAMPLES = PROMPTS
    export = exports.export_start(owner=owner, job=job, formats=["gguf_f16"])
    job_run(Export, export.pk, exports.export_work)
    export.refresh_from_db()
    assert export.status == "completed", export.error_message
    return export


def held_out_prompts(job) -> list[list[dict]]:
    return [messages[:-1] for messages in held_out_examples(job.dataset)[:PROMPTS]]


def chat(api, model: str, messages: list[dict], **extra):
    return api.post("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, **extra}, format="json")


def inference(api, model: str | int, prompt: str):
    return api.post("/api/inference", {"model_id": model, "prompt": prompt, "max_tokens": MAX_TOKENS}, format="json")


def events(chunks) -> list[dict]:
    lines = b"".join(chunks).decode().split("\n\n")
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]


def served_by(api, model: str) -> str:
    response = inference(api, model, "Say hi.")
    assert response.status_code == 200, response.content
    return response.json()["engine"]


@pytest.fixture
def base_gguf(settings) -> Path:
    """The embedded base model's f16 GGUF, as the first export of any of its fine-tunes converts it."""
    path = exports.base_gguf_dir(settings.TUNA_DEFAULT_BASE_MODEL) / engines.BASE_GGUF
    if not path.is_file():
        registry.get()  # the embedded model is prepared on first load
        gguf_export.convert_model(Path(get_base_model_spec().load_path), path, "f16")
    return path.resolve()


def test_it_serves_an_exported_job_through_llama_cpp_with_the_transformers_answers(
    settings, alice, alice_api, alice_client, finetuned_job, fp32
):
    # Transformers in fp32 (the fp32 fixture), as the export's parity check runs: an f16 GGUF and a bf16 model round
    # differently, and on a near-tie their greedy answers part (measured on a CPU with AMX: 1 of the held-out prompts).
    export_job(alice, finetuned_job, settings)
    model = finetuned_job.model_id
    prompts = held_out_prompts(finetuned_job)
    assert prompts

    settings.TUNA_SERVING_ENGINE = "transformers"
    torch_chat = [chat(alice_api, model, messages).json() for messages in prompts]
    torch_seed = [inference(alice_api, finetuned_job.pk, messages[-1]["content"]).json() for messages in prompts]
    assert {a["engine"] for a in torch_chat} == {a["engine"] for a in torch_seed} == {"transformers"}

    settings.TUNA_SERVING_ENGINE = "llamacpp"
    llama_chat = [chat(alice_api, model, messages).json() for messages in prompts]
    llama_seed = [inference(alice_api, finetuned_job.pk, messages[-1]["content"]).json() for messages in prompts]
    for answer in llama_chat:
        assert answer["engine"] == answer["system_fingerprint"] == "llama.cpp" and answer["model"] == model
        assert answer["usage"]["completion_tokens"] > 0
    for answer in llama_seed:
        assert answer["engine"] == "llama.cpp" and answer["model_id"] == model
        assert answer["compute_ms"] > 0 and answer["cost_usd"] > 0 and answer["queue_ms"] >= 0
        assert answer["finish_reason"] in ("stop", "length")
    # Greedy, the exported GGUF + LoRA answers the held-out prompts as transformers + peft do.
    assert [a["choices"][0]["message"]["content"] for a in llama_chat] == [a["choices"][0]["message"]["content"] for a in torch_chat]
    assert [a["output"] for a in llama_seed] == [a["output"] for a in torch_seed]

    stream = chat(alice_api, model, prompts[0], stream=True, stream_options={"include_usage": True})
    assert stream.status_code == 200 and stream.streaming
    chunks = events(stream.streaming_content)
    assert {c["engine"] for c in chunks} == {c["system_fingerprint"] for c in chunks} == {"llama.cpp"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip() == llama_chat[0]["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == llama_chat[0]["usage"]

    rows = UsageLog.objects.filter(user=alice, status="ok")
    assert rows.filter(engine="transformers").count() == 2 * len(prompts)
    assert rows.filter(engine="llama.cpp").count() == 2 * len(prompts) + 1
    streamed = rows.filter(engine="llama.cpp", endpoint="v1/chat/completions").latest("id")
    assert streamed.finish_reason in ("stop", "length") and streamed.compute_ms > 0
    assert streamed.cost_usd == pytest.approx(services.cost_for(streamed.compute_ms))
    usage = alice_client.get(reverse("usage")).content.decode()
    assert "llama.cpp" in usage and "transformers" in usage

    # The playground compares the base and the fine-tune, both from llama.cpp, and says so.
    page = alice_client.post(reverse("playground"), {"model": model, "prompt": prompts[0][-1]["content"]}, HTTP_HX_REQUEST="true")
    assert page.status_code == 200
    assert page.content.decode().count("llama.cpp</span>") == 2
    assert list(UsageLog.objects.filter(endpoint="playground").values_list("model_id", "engine").order_by("id")) == [
        (BASE, "llama.cpp"),
        (model, "llama.cpp"),
    ]


def test_it_serves_through_llama_cpp_in_auto_only_what_passed_its_parity_check(settings, alice, alice_api, finetuned_job, valid_dataset):
    settings.TUNA_SERVING_ENGINE = "auto"
    unexported = job_row(alice, valid_dataset, status="completed", adapter_dir=finetuned_job.adapter_dir, completed_at=timezone.now())
    export = export_job(alice, finetuned_job, settings)
    assert export.parity_passed

    assert served_by(alice_api, finetuned_job.model_id) == "llama.cpp"
    assert served_by(alice_api, unexported.model_id) == "transformers"
    assert served_by(alice_api, BASE) == "llama.cpp"  # its GGUF passed the check under the fine-tune

    # An export whose GGUF answered differently is not served by llama.cpp; nor is its base any more.
    failed = {**export.parity, "f16": {**export.parity["f16"], "identical": 0}}
    Export.objects.filter(pk=export.pk).update(parity=failed)
    assert served_by(alice_api, finetuned_job.model_id) == "transformers"
    assert served_by(alice_api, BASE) == "transformers"
    assert list(UsageLog.objects.order_by("id").values_list("engine", flat=True)) == [
        "llama.cpp",
        "transformers",
        "llama.cpp",
        "transformers",
        "transformers",
    ]


def test_it_refuses_forced_llama_cpp_for_a_model_without_its_export_and_says_how(settings, alice, alice_api, valid_dataset, tmp_path):
    settings.TUNA_SERVING_ENGINE = "llamacpp"
    settings.TUNA_GGUF_DIR = tmp_path / "no-gguf-yet"
    job = job_row(alice, valid_dataset, status="completed", adapter_dir=str(tmp_path), completed_at=timezone.now())

    refused = inference(alice_api, job.pk, "Hi")
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "has no GGUF export yet" in detail and f"POST /api/training/{job.pk}/export" in detail and "Export button" in detail
    v1 = chat(alice_api, job.model_id, [{"role": "user", "content": "Hi"}], stream=True)
    assert v1.status_code == 409 and v1.json()["error"]["type"] == "conflict_error" and "/export" in v1.json()["error"]["message"]
    base = inference(alice_api, BASE, "Hi")
    assert base.status_code == 409 and "has not been converted to GGUF yet" in base.json()["detail"]
    errors = UsageLog.objects.filter(user=alice, status="error")
    assert errors.count() == 3 and all("export" in log.error.lower() for log in errors)


def test_it_answers_409_when_llama_server_is_not_installed_and_503_when_it_cannot_start_naming_no_path(
    settings, alice, alice_api, tmp_path
):
    settings.TUNA_SERVING_ENGINE = "llamacpp"
    settings.TUNA_GGUF_DIR = tmp_path / "gguf"
    broken = exports.base_gguf_dir(settings.TUNA_DEFAULT_BASE_MODEL) / engines.BASE_GGUF
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a GGUF")  # llama-server exits while loading it

    installed = settings.TUNA_LLAMA_SERVER_BIN
    settings.TUNA_LLAMA_SERVER_BIN = str(tmp_path / "no-llama-server")
    missing = inference(alice_api, BASE, "Hi")
    assert missing.status_code == 409 and "llama-server is not installed" in missing.json()["detail"]
    assert "make install" in missing.json()["detail"] and str(tmp_path) not in missing.json()["detail"]

    settings.TUNA_LLAMA_SERVER_BIN = installed
    for _ in range(2):  # the second: the remembered failure, at once
        started = time.monotonic()
        failed = inference(alice_api, BASE, "Hi")
        assert failed.status_code == 503 and int(failed["Retry-After"]) >= 1, failed.content
        detail = failed.json()["detail"]
        assert "exited while loading the model" in detail and "Try again" in detail and str(tmp_path) not in detail
    assert time.monotonic() - started < 2


@pytest.mark.django_db(transaction=True)  # closing a response closes its database connection, as a server does
def test_it_stops_llama_cpp_decoding_when_a_stream_s_client_goes_away(settings, alice, alice_api, base_gguf):
    settings.TUNA_SERVING_ENGINE = "llamacpp"
    body = {"messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}], "max_tokens": 400, "stream": True}
    response = alice_api.post("/v1/chat/completions", {"model": BASE, **body}, format="json")
    assert response.status_code == 200 and response.streaming
    chunks = iter(response.streaming_content)
    assert all(next(chunks).startswith(b"data: {") for _ in range(4))  # the role, then three pieces
    response.close()  # what the WSGI server does when the client disconnects
    log = UsageLog.objects.get(user=alice)
    assert (log.engine, log.status, log.finish_reason) == ("llama.cpp", "ok", "cancelled")
    assert 3 <= log.completion_tokens < 100 and log.compute_ms > 0
    engine, _ = llama_server.pool.engine_for(base_gguf, None)
    assert engine.in_flight == 0  # its request ended: llama-server stopped decoding for nobody

    # The admission limit holds for llama.cpp calls too: beyond it, 503 with Retry-After, before any 200.
    settings.TUNA_MAX_INFERENCE_QUEUE = 1
    with services.admissions.admitted(engine, 1):
        busy = alice_api.post("/v1/chat/completions", {"model": BASE, **body}, format="json")
    assert busy.status_code == 503 and int(busy["Retry-After"]) >= 1
    started = time.monotonic()
    answered = inference(alice_api, BASE, "Say hi.")
    assert answered.status_code == 200 and answered.json()["engine"] == "llama.cpp"
    print(f"llama.cpp answered {answered.json()['completion_tokens']} tokens in {time.monotonic() - started:.2f} s")
    assert services.admissions.count == 0


@pytest.mark.process
@pytest.mark.django_db(transaction=True)  # the call in flight runs on another thread, with its own connection
def test_it_answers_503_for_calls_in_flight_when_llama_server_dies_and_serves_the_next_from_its_restart(
    settings, alice, alice_api, base_gguf
):
    import os
    import signal
    import threading

    from tests.support import wait_for

    settings.TUNA_SERVING_ENGINE = "llamacpp"
    assert served_by(alice_api, BASE) == "llama.cpp"
    engine, _ = llama_server.pool.engine_for(base_gguf, None)
    [server] = [s for s in llama_server.pool.servers() if s.engine is engine]
    body = {"model": BASE, "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}], "max_tokens": 400}
    answers = []
    caller = threading.Thread(target=lambda: answers.append(alice_api.post("/v1/chat/completions", body, format="json")))
    caller.start()
    wait_for(lambda: engine.in_flight == 1, 30, "the call to reach llama-server")
    time.sleep(0.5)  # decoding
    os.kill(server.pid, signal.SIGKILL)
    caller.join(10)
    assert not caller.is_alive(), "the call in flight hung"
    [failed] = answers
    assert failed.status_code == 503 and int(failed["Retry-After"]) >= 1
    error = failed.json()["error"]
    assert "llama.cpp engine" in error["message"] and "Try again" in error["message"]

    wait_for(lambda: server.restarts == 1, 60, "llama-server's restart")
    assert served_by(alice_api, BASE) == "llama.cpp"
    rows = list(UsageLog.objects.filter(user=alice).order_by("id").values_list("status", "engine"))
    assert rows == [("ok", "llama.cpp"), ("error", "llama.cpp"), ("ok", "llama.cpp")]

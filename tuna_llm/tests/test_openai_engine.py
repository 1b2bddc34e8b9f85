"""The OpenAI-protocol client (tuna_llm.serving.openai_engine) against an engine that answers out of protocol: a
real HTTP server on 127.0.0.1 sending the streamed lines a broken or foreign engine could send. Each one ends
the call as EngineUnavailable (the service's 503) with a readable message, at once, never an unmapped error."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuna_llm.serving.engine import EngineInfo, result_of
from tuna_llm.serving.openai_engine import Endpoint, EngineUnavailable, OpenAIEngine, OpenAIRequest

# prompt -> the stream's lines the engine sends for it
ANSWERS = {
    "error-text": ['data: {"error": "the model crashed"}'],
    "error-object": ['data: {"error": {"message": "out of memory", "code": 500}}'],
    "not-json": ['data: {"choices": [{"text": "a"'],
    "not-an-object": ["data: [1, 2]"],
    "text-not-a-string": ['data: {"choices": [{"text": 5}]}'],
    "choices-not-a-list": ['data: {"choices": "a"}'],
    "usage-not-numbers": ['data: {"choices": [{"text": "a", "finish_reason": "stop"}], "usage": {"prompt_tokens": "many"}}'],
    "fine": ['data: {"choices": [{"text": "Hello", "finish_reason": "stop"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}'],
}


class Foreign(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for line in [*ANSWERS[body["prompt"]], "data: [DONE]"]:
            self.wfile.write(f"{line}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args):
        pass


class Prompts:
    context = 512

    def render(self, spec):
        return spec.text

    def count(self, text: str) -> int:
        return len(text.split())


class NoAdapters:
    def fields(self, adapter) -> dict:
        return {}


@pytest.fixture
def engine():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = OpenAIEngine(
        Endpoint(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5),
        info=EngineInfo("foreign", "gguf", "cpu"),
        prompts=Prompts(),
        adapters=NoAdapters(),
    )
    yield engine
    engine.close()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("error-text", "failed mid-answer: the model crashed"),
        ("error-object", "failed mid-answer: out of memory"),
        ("not-json", "sent an answer this client cannot read"),
        ("not-an-object", "sent an answer this client cannot read"),
        ("text-not-a-string", "sent an answer this client cannot read"),
        ("choices-not-a-list", "sent an answer this client cannot read"),
        ("usage-not-numbers", "sent figures this client cannot read"),
    ],
)
def test_it_ends_a_call_as_engine_unavailable_when_the_engine_answers_out_of_protocol(engine, prompt, message):
    started = time.monotonic()
    handle = engine.submit(OpenAIRequest(prompt=prompt, prompt_tokens=1, max_tokens=4))
    with pytest.raises(EngineUnavailable) as caught:
        result_of(handle)
    assert message in str(caught.value) and "The foreign engine" in str(caught.value)
    assert handle.done.is_set() and time.monotonic() - started < 3
    assert engine.in_flight == 0

    answer = result_of(engine.submit(OpenAIRequest(prompt="fine", prompt_tokens=1, max_tokens=4)))  # the next call is served
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == ("Hello", 2, 1, "stop")

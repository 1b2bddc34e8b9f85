"""A judge request is cut at its time limit in all (TUNA_JUDGE_TIMEOUT_S, or what is left of the run), not per socket
read: a judge that sends a byte now and then cannot hold a request past it. Against a real HTTP server."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuna_llm.judge import JudgeEndpoint, JudgeError, JudgeTimeUp, ask

MESSAGES = [{"role": "user", "content": "A or B?"}]
TRICKLE_S = 6.0  # how long the server keeps sending, a space every 0.1 s (far below any per-read timeout)


class Trickle(BaseHTTPRequestHandler):
    """Answers 200 at once, then a space of its JSON body every 0.1 s for TRICKLE_S seconds."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        ends = time.monotonic() + TRICKLE_S
        try:
            while time.monotonic() < ends:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client went

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_it_cuts_a_trickling_request_at_the_runs_deadline(trickling_judge):
    endpoint = JudgeEndpoint(url=trickling_judge, model="judge", timeout_s=60, retries=0)
    started = time.monotonic()
    with pytest.raises(JudgeTimeUp):
        ask(endpoint, MESSAGES, deadline=started + 1.0)
    assert time.monotonic() - started < 2.5


def test_it_cuts_a_trickling_request_at_tuna_judge_timeout_s(trickling_judge):
    endpoint = JudgeEndpoint(url=trickling_judge, model="judge", timeout_s=1.0, retries=1)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"did not answer within 1 s \(TUNA_JUDGE_TIMEOUT_S"):
        ask(endpoint, MESSAGES)
    assert time.monotonic() - started < 4.5  # two tries of 1 s and the pause between them


def test_it_still_reads_a_judge_that_answers_in_time():
    body = b'{"choices": [{"message": {"content": "{\\"winner\\": \\"A\\", \\"reason\\": \\"ok\\"}"}}]}'

    class Quick(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quick)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = JudgeEndpoint(url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="judge", timeout_s=5, retries=0)
        verdict = ask(endpoint, MESSAGES, deadline=time.monotonic() + 5)
        assert (verdict.winner, verdict.reason, verdict.tries) == ("A", "ok", 1)
    finally:
        server.shutdown()
        server.server_close()

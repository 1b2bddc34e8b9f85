"""Fair inference slots: one user holds at most TUNA_MAX_INFERENCE_PER_USER of the process's TUNA_MAX_INFERENCE_QUEUE
(streams included), so one user's streams never leave the others a 503."""

from __future__ import annotations

import json
import threading
import time

import pytest
from rest_framework.test import APIClient

from inference_app import services
from inference_app.models import UsageLog
from tests.support import api_key
from tuna_core.admission import Slots, Ticket

BASE = "base:smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def no_slot_held():
    assert services.admissions.count == 0
    yield
    assert services.admissions.count == 0


def test_it_gives_each_key_its_share_and_the_rest_to_the_others():
    slots = Slots()
    taken = [slots.take("alice", per_key=4, total=16) for _ in range(16)]
    assert [refusal is None for refusal in taken].count(True) == 4
    assert {(r.scope, r.held, r.limit) for r in taken if r is not None} == {("user", 4, 4)}
    for user in ("bob", "carol", "dave"):
        assert [slots.take(user, per_key=4, total=16) for _ in range(4)] == [None] * 4
    assert slots.total == 16
    refused = slots.take("erin", per_key=4, total=16)
    assert (refused.scope, refused.held, refused.limit) == ("all", 16, 16)
    ticket = Ticket(slots, "alice")
    ticket.release()
    ticket.release()  # once, however often it is called
    assert slots.held_by("alice") == 3 and slots.total == 15
    assert slots.take("erin", per_key=4, total=16) is None


def test_it_lets_a_user_holding_nothing_take_several_rows_at_once():
    """The playground runs base and fine-tune in one batch: two rows of one request, even with a share of one."""
    slots = Slots()
    assert slots.take("alice", 2, per_key=1, total=16) is None
    assert slots.take("alice", 1, per_key=1, total=16).scope == "user"
    assert slots.take("bob", 15, per_key=1, total=16).scope == "all"


def test_it_never_passes_either_limit_under_concurrent_takes():
    slots, most, lock = Slots(), {"user": 0, "all": 0}, threading.Lock()
    start = threading.Barrier(48)

    def worker(user: str) -> None:
        start.wait()
        for _ in range(40):
            if slots.take(user, per_key=3, total=10) is None:
                with lock:
                    most["user"] = max(most["user"], slots.held_by(user))
                    most["all"] = max(most["all"], slots.total)
                time.sleep(0.002)  # held a while, as a call is
                slots.give(user)

    threads = [threading.Thread(target=worker, args=(f"user-{i % 6}",)) for i in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most["user"] <= 3 and most["all"] == 10  # the total reached, neither limit passed
    assert slots.total == 0


def stream(api, content="Count from one to fifty, one number a line."):
    body = {"model": BASE, "messages": [{"role": "user", "content": content}], "max_tokens": 48, "stream": True}
    return api.post("/v1/chat/completions", body, format="json")


def started(response) -> str:
    """Read the role chunk and the first generated one: the stream now holds its slot (it is never read further)."""
    chunks = response.streaming_content
    return next(chunks).decode() + next(chunks).decode()


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_leaves_a_slot_for_a_second_user_while_one_user_opens_16_streams(alice, bob, alice_api, bob_api, settings):
    assert (settings.TUNA_MAX_INFERENCE_QUEUE, settings.TUNA_MAX_INFERENCE_PER_USER) == (16, 8)
    held, refused = [], []
    for _ in range(16):
        response = stream(alice_api)
        if response.status_code == 200:
            started(response)
            held.append(response)
        else:
            refused.append(response)
    assert len(held) == 8 and len(refused) == 8
    assert services.admissions.count == 8 and services.admissions.slots.held_by(alice.pk) == 8
    for response in refused:
        error = response.json()["error"]
        assert response.status_code == 429 and int(response["Retry-After"]) >= 1
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "TUNA_MAX_INFERENCE_PER_USER" in error["message"] and "limit is 8 per user" in error["message"]
    assert UsageLog.objects.filter(user=alice, status="error", error__contains="TUNA_MAX_INFERENCE_PER_USER").count() == 8

    # bob's stream and call are answered while alice's eight streams hold their slots
    second = stream(bob_api, "Say hi.")
    assert second.status_code == 200
    events = [line for line in b"".join(second.streaming_content).decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[0].removeprefix("data: "))["choices"]
    call = bob_api.post("/api/inference", {"model_id": BASE, "prompt": "Say hi.", "max_tokens": 4}, format="json")
    assert call.status_code == 200 and call.json()["output"]
    native = alice_api.post("/api/inference", {"model_id": BASE, "prompt": "Say hi.", "max_tokens": 4}, format="json")
    assert native.status_code == 429 and "TUNA_MAX_INFERENCE_PER_USER" in native.json()["detail"]

    for response in held:  # alice's clients go away: their slots come back
        response.close()
    assert services.admissions.count == 0
    unread = stream(alice_api, "Say hi.")
    assert unread.status_code == 200 and services.admissions.count == 1
    unread.close()  # the client went away before the first piece: the server's close gives the slot back
    assert services.admissions.count == 0


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_still_answers_503_when_everyone_together_fills_the_queue(alice, bob, alice_api, bob_api, settings):
    settings.TUNA_MAX_INFERENCE_QUEUE, settings.TUNA_MAX_INFERENCE_PER_USER = 2, 1
    first, second = stream(alice_api), stream(bob_api)
    assert (first.status_code, second.status_code) == (200, 200)
    assert services.admissions.count == 2  # taken before the 200, held until the stream ends
    carol = type(alice).objects.create_user(username="carol", password="carol-pass-123")
    carol_api = APIClient()
    carol_api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(carol)}")
    busy = stream(carol_api)
    assert busy.status_code == 503 and "TUNA_MAX_INFERENCE_QUEUE" in busy.json()["error"]["message"]
    for response in (first, second):
        b"".join(response.streaming_content)
    assert services.admissions.count == 0

"""One request never hurts another: batch mates of a bad request, tokenizer users on other threads, and a
stream whose client went away stops decoding (and is still logged)."""

import threading
import time

import pytest

from inference_app import services
from inference_app.models import UsageLog
from tuna_llm.prompting import render_chat
from tuna_llm.serving.batching import BatchingEngine, GenerationRequest, RequestInvalid, engine_for, generate_chat
from tuna_llm.serving.registry import registry

pytestmark = [pytest.mark.model]

BASE = "base:smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish please, my friend.", "What is 2 + 2?"]


def _request(loaded, prompt: str, **fields) -> GenerationRequest:
    text = render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return GenerationRequest(text=text, **{"max_new_tokens": 2, **fields})


def _hammer(work, *, threads: int, seconds: float) -> list[BaseException]:
    """Run ``work(n)`` in a loop on ``threads`` threads for ``seconds``; the exceptions they raised."""
    stop, errors = threading.Event(), []

    def loop(n: int) -> None:
        try:
            while not stop.is_set():
                work(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            stop.set()

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    return errors


def test_it_tokenizes_on_its_own_copy_while_request_threads_count_tokens():
    # Request threads count prompt tokens with the model's tokenizer (services.prepare_call) while the engine
    # encodes admitted prompts and decodes new tokens. Sharing one fast tokenizer (one Rust object) between
    # them broke once: padding switched under the request threads ("Unable to create tensor", or with older
    # tokenizers "RuntimeError: Already borrowed"). The engine has its own copy.
    loaded = registry.get()
    engine = BatchingEngine(loaded)
    assert engine.scheduler.tokenizer is not loaded.tokenizer
    texts = [f"{p} " * (1 + i) for i, p in enumerate(PROMPTS)]
    padding_side, padding = loaded.tokenizer.padding_side, loaded.tokenizer.backend_tokenizer.padding

    def work(n: int) -> None:
        tokenizer = engine.scheduler.tokenizer if n == 0 else loaded.tokenizer  # the engine's, or a request thread's
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids).strip() == text.strip()

    errors = _hammer(work, threads=3, seconds=3)
    assert not errors, errors[:3]
    # A real batch, on the engine thread, leaves the shared tokenizer as it found it.
    batch = [_request(loaded, p, max_new_tokens=1) for p in PROMPTS]
    engine.submit_all(batch)
    for request in batch:
        assert request.done.wait(60) and request.error is None, request.error
    assert loaded.tokenizer.padding_side == padding_side
    assert loaded.tokenizer.backend_tokenizer.padding == padding


def test_it_fails_only_the_bad_request_of_a_batch(tmp_path):
    loaded = registry.get()
    alone = [generate_chat(loaded, [{"role": "user", "content": p}], max_new_tokens=6).text for p in PROMPTS[:3]]
    engine = BatchingEngine(loaded, window_s=0.3)
    good = [_request(loaded, p, max_new_tokens=6) for p in PROMPTS[:3]]
    # An adapter whose files are gone fails inside the batch (when it is attached); a seed beyond 64 bits
    # would fail inside it too (torch.manual_seed), so it is refused before it gets there.
    gone = _request(loaded, PROMPTS[3], max_new_tokens=6, adapter="gone", adapter_path=str(tmp_path / "gone"))
    huge_seed = _request(loaded, PROMPTS[3], max_new_tokens=6, temperature=0.7, seed=10**30)
    requests = [good[0], gone, good[1], huge_seed, good[2]]
    engine.submit_all(requests)
    for request in requests:
        assert request.done.wait(120)
    # The bad adapter failed when its request was admitted; the good ones were admitted and decoded together.
    assert engine.largest_batch == 3 and engine.batches_run == 1
    assert [r.error for r in good] == [None, None, None]
    assert [r.result.text for r in good] == alone  # the same answers as alone
    assert all(r.result.finish_reason in ("stop", "length") and r.result.completion_tokens > 0 for r in good)
    assert gone.result is None and gone.error is not None and "gone" not in loaded.adapters
    assert isinstance(huge_seed.error, RequestInvalid) and "seed must be a whole number from" in str(huge_seed.error)
    # The engine goes on serving.
    after = engine.generate(_request(loaded, PROMPTS[0], max_new_tokens=6))
    assert after.text == alone[0]


@pytest.mark.django_db(transaction=True)  # closing a response closes its database connection, as a server does
def test_it_stops_decoding_and_logs_the_call_when_a_stream_s_client_goes_away(alice_api, alice):
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "max_tokens": 400,
        "stream": True,
    }
    response = alice_api.post("/v1/chat/completions", body, format="json")
    assert response.status_code == 200 and response.streaming
    chunks = iter(response.streaming_content)
    received = [next(chunks) for _ in range(4)]  # the role, then three pieces
    assert all(chunk.startswith(b"data: {") for chunk in received)
    response.close()  # what the WSGI server does when the client disconnects
    log = UsageLog.objects.get(user=alice)
    assert (log.status, log.finish_reason, log.endpoint) == ("ok", "cancelled", "v1/chat/completions")
    assert 3 <= log.completion_tokens < 100 and log.prompt_tokens > 0 and log.compute_ms > 0
    engine = engine_for(registry.get())
    deadline = time.monotonic() + 5
    while engine.current and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.current  # nothing is decoding for nobody
    # Gone before the first piece: nothing is generated, and the call is logged all the same.
    response = alice_api.post("/v1/chat/completions", body, format="json")
    next(iter(response.streaming_content))  # the role chunk only
    response.close()
    early = UsageLog.objects.filter(user=alice).exclude(pk=log.pk).get()
    assert (early.finish_reason, early.completion_tokens, early.compute_ms) == ("cancelled", 0, 0)
    assert not engine.current


@pytest.mark.django_db
def test_it_refuses_a_seed_beyond_64_bits_before_it_reaches_a_batch(alice_api, alice):
    body = {"model_id": BASE, "prompt": "Say hi.", "max_tokens": 2, "temperature": 0.7}
    for seed in (10**30, 2**63, -(2**63) - 1):
        response = alice_api.post("/api/inference", {**body, "seed": seed}, format="json")
        assert response.status_code == 400, response.content
        assert response.json()["errors"]["seed"] == [
            f"seed must be a whole number from {-(2**63)} to {2**63 - 1} (a signed 64-bit integer)."
        ]
        v1 = alice_api.post("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 2, "seed": seed}, format="json")
        assert v1.status_code == 400 and v1.json()["error"]["param"] == "seed"
    with pytest.raises(services.InferenceInvalid, match="seed must be a whole number from") as caught:
        services.checked_call(user=alice, model_id=BASE, endpoint="api/inference", text="Hi", max_tokens=2, seed=10**30)
    assert caught.value.param == "seed"
    for seed in (2**63 - 1, -(2**63)):
        assert alice_api.post("/api/inference", {**body, "seed": seed}, format="json").status_code == 200

"""One client for every engine that speaks OpenAI's completions protocol (llama-server, vLLM, SGLang). Django-free.

The product keeps what it owns (authentication, validation, quotas, the usage log, the ``/api`` and ``/v1``
contracts, our tool-call parsing) and forwards generation: the prompt is rendered by us (``PromptRenderer``:
the chat template the fine-tune was trained and exported with) and sent as text to ``POST {url}/v1/completions``
with ``stream: true`` and usage; the adapter is chosen by fields merged into the body (``AdapterMapper``:
``"model"`` on vLLM / SGLang, ``"lora"`` on llama-server). Each submitted request streams on its own thread,
so requests in flight at once are batched by the engine.

Errors: an engine that cannot be reached, drops the connection mid-answer, answers 5xx or streams what the
protocol does not allow (a line that is not JSON, an ``"error"`` event, fields of the wrong type) raises
``EngineUnavailable`` (the service answers 503 with Retry-After); connect and read waits are bounded
(CONNECT_S, Endpoint.timeout_s between two chunks), so a call never hangs. The engine's 4xx raises
``EngineRefused`` (a RequestInvalid: 400 with the engine's message).

Measured, not assumed: ``latency_ms`` is the engine's own prompt + decoding time where it reports ``timings``
(llama-server does), the request's wall time otherwise; ``queue_ms`` is the rest of its wall time (waiting
for a slot, the network); ``compute_ms`` is the request's share of the time the engine was busy: time during
which N requests were in flight is split between them equally.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from tuna_llm.serving.engine import (
    Adapter,
    CallSpec,
    EngineInfo,
    Generation,
    RequestInvalid,
    check_fits,
    check_prompt_text,
    check_unicode,
    result_of,
    stream_pieces,
)

CONNECT_S = 5.0  # how long connecting to an engine may take before it counts as unavailable
RETRY_AFTER_S = 5  # what a 503 for an unavailable engine tells the client to wait


class EngineUnavailable(RuntimeError):
    """The engine cannot be reached, lost the connection mid-answer, timed out or answered 5xx."""

    retry_after = RETRY_AFTER_S


class EngineRefused(RequestInvalid):
    """The engine refused the request (its 4xx); the message is the engine's."""


@dataclass(frozen=True)
class Endpoint:
    url: str  # e.g. http://127.0.0.1:8081 (no /v1)
    api_key: str | None = None
    timeout_s: float = 600.0  # the longest wait for the engine's next chunk


class PromptRenderer(Protocol):
    """The prompt as the model was trained on it, and its size in the engine's tokens."""

    context: int | None  # the context one request may fill (None: unknown, the engine checks)

    def render(self, spec: CallSpec) -> str:
        """``spec.messages`` rendered by the chat template (ToolsUnsupported / ChatTemplateRefused when it cannot)."""

    def count(self, text: str) -> int:
        """How many tokens the engine will see for the prompt ``text``."""


class AdapterMapper(Protocol):
    def fields(self, adapter: Adapter | None) -> dict:
        """JSON fields merged into the request body that select ``adapter`` (or the base model) on the engine."""


@dataclass
class OpenAIRequest:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: Adapter | None = None


@dataclass(eq=False)
class OpenAIHandle:
    """A request submitted to an ``OpenAIEngine`` (see tuna_llm.serving.engine.Handle)."""

    request: OpenAIRequest
    deltas: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    response: httpx.Response | None = None


class _BusyClock:
    """The time requests were in flight, each one's share: an interval with N in flight is split N ways."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shares: dict[int, float] = {}
        self._mark = time.perf_counter()

    def _advance(self, now: float) -> None:
        if self._shares:
            step = (now - self._mark) / len(self._shares)
            for key in self._shares:
                self._shares[key] += step
        self._mark = now

    def enter(self, key: int) -> None:
        with self._lock:
            self._advance(time.perf_counter())
            self._shares[key] = 0.0

    def leave(self, key: int) -> float:
        with self._lock:
            self._advance(time.perf_counter())
            return self._shares.pop(key, 0.0)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._shares)


class OpenAIEngine:
    """An engine at ``endpoint`` behind tuna_llm.serving.engine's interface. ``slots``: how many requests it
    decodes at once (for the wait estimate); ``sampling``: engine-specific fields sent with every request
    (e.g. llama-server's ``top_k``/``min_p`` off, so that sampling is plain temperature + top_p)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        info: EngineInfo,
        prompts: PromptRenderer,
        adapters: AdapterMapper,
        slots: int = 1,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint, self.info, self.prompts, self.adapters = endpoint, info, prompts, adapters
        self.slots = max(1, slots)
        self.sampling = dict(sampling or {})
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self.client = httpx.Client(
            base_url=endpoint.url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(endpoint.timeout_s, connect=CONNECT_S),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._busy = _BusyClock()
        self.last_call_s = 1.0
        self.closed = False

    # -- the engine interface (tuna_llm.serving.engine) -----------------------------------------
    def describe(self) -> EngineInfo:
        return self.info

    def prepare(self, spec: CallSpec) -> OpenAIRequest:
        """Render and count the prompt; refuse it when empty, not Unicode, or too long (RequestInvalid)."""
        if spec.messages is None:
            check_prompt_text(spec.text)
            prompt = spec.text
        else:
            check_unicode("".join(m.get("content") or "" for m in spec.messages if isinstance(m.get("content"), str)))
            prompt = self.prompts.render(spec)
            check_unicode(prompt)
        tokens = self.prompts.count(prompt)
        context = self.prompts.context
        check_fits(tokens, context, spec.max_prompt_tokens)
        max_tokens = min(spec.max_tokens, context - tokens) if context else spec.max_tokens
        return OpenAIRequest(
            prompt=prompt,
            prompt_tokens=tokens,
            max_tokens=max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop=tuple(spec.stop),
            adapter=spec.adapter,
        )

    def submit(self, request: OpenAIRequest) -> OpenAIHandle:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[OpenAIRequest]) -> list[OpenAIHandle]:
        handles = [OpenAIHandle(request) for request in requests]
        for handle in handles:
            threading.Thread(target=self._run, args=(handle,), name="tuna-openai-request", daemon=True).start()
        return handles

    def stream(self, handle: OpenAIHandle) -> Iterator[str]:
        return stream_pieces(self, handle)

    def cancel(self, handle: OpenAIHandle) -> None:
        """Stop the request: its connection is closed, which stops its decoding on the engine."""
        handle.cancelled.set()
        response = handle.response
        if response is not None:
            try:
                response.close()
            except Exception:  # noqa: BLE001 - closed under a reader; the reader sees the cancel flag
                pass

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended."""
        return self._busy.in_flight

    def wait_estimate_s(self, rows: int = 1) -> float:
        """Requests decode ``slots`` at a time: rounds of the last call's duration until these have started."""
        return math.ceil((self._busy.in_flight + rows) / self.slots) * self.last_call_s

    def chat(self, request: OpenAIRequest) -> Generation:
        return result_of(self.submit(request))

    def close(self) -> None:
        """Stop using the engine: calls after this (or cut by it) fail with EngineUnavailable."""
        self.closed = True
        self.client.close()

    # -- one request, on its own thread -----------------------------------------------------------
    def body(self, request: OpenAIRequest) -> dict[str, Any]:
        greedy = request.temperature <= 0
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0.0 if greedy else request.temperature,
            "top_p": 1.0 if greedy else request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.sampling,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        body.update(self.adapters.fields(request.adapter))
        return body

    def _run(self, handle: OpenAIHandle) -> None:
        key = id(handle)
        self._busy.enter(key)
        pieces: list[str] = []
        state: dict[str, Any] = {"finish": None, "usage": None, "timings": None}
        try:
            body = self.body(handle.request)
            if not handle.cancelled.is_set():
                self._exchange(handle, body, pieces, state)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the handle
            if not handle.cancelled.is_set():
                handle.error = exc
        finally:
            share = self._busy.leave(key)
            if handle.error is None:
                try:
                    handle.result = self._generation(handle, pieces, state, share)
                except (TypeError, ValueError) as exc:  # usage or timings that are not numbers
                    handle.error = EngineUnavailable(f"The {self.info.name} engine sent figures this client cannot read ({exc}).")
                else:
                    if handle.result.finish_reason != "cancelled" and share > 0:
                        self.last_call_s = share
            handle.deltas.put(None)
            handle.done.set()

    def _exchange(self, handle: OpenAIHandle, body: dict, pieces: list[str], state: dict) -> None:
        where = self.endpoint.url
        stopped = EngineUnavailable(f"The {self.info.name} engine at {where} was stopped (replaced or shut down).")
        if self.closed:
            raise stopped
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                handle.response = response
                if response.status_code >= 400:
                    raise _refusal(response, self.info.name)
                if handle.cancelled.is_set():
                    return
                for line in response.iter_lines():
                    if handle.cancelled.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._read_chunk(data, handle, pieces, state)
        except httpx.TimeoutException as exc:
            if handle.cancelled.is_set():
                return
            raise EngineUnavailable(f"The {self.info.name} engine at {where} did not answer in time ({type(exc).__name__}).") from None
        except RuntimeError:  # httpx: the client was closed under the call
            if handle.cancelled.is_set():
                return
            if self.closed:
                raise stopped from None
            raise
        except (httpx.TransportError, httpx.StreamError) as exc:
            if handle.cancelled.is_set():
                return
            raise EngineUnavailable(f"The {self.info.name} engine at {where} is unreachable or dropped the answer ({exc}).") from None
        if state["finish"] is None and not handle.cancelled.is_set():
            raise EngineUnavailable(f"The {self.info.name} engine at {where} ended the answer before it was complete.")

    def _read_chunk(self, data: str, handle: OpenAIHandle, pieces: list[str], state: dict) -> None:
        """One ``data:`` line of the stream; anything not shaped as the protocol says is the engine's failure."""
        malformed = EngineUnavailable(f"The {self.info.name} engine sent an answer this client cannot read: {data[:200]!r}")
        try:
            chunk = json.loads(data)
        except ValueError:
            raise malformed from None
        if not isinstance(chunk, dict):
            raise malformed
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise EngineUnavailable(f"The {self.info.name} engine failed mid-answer: {message or error}")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise malformed
        for choice in choices:
            text = choice.get("text")
            if text:
                if not isinstance(text, str):
                    raise malformed
                pieces.append(text)
                handle.deltas.put(text)
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]
        for name in ("usage", "timings"):
            value = chunk.get(name)
            if value:
                if not isinstance(value, dict):
                    raise malformed
                state[name] = value

    def _generation(self, handle: OpenAIHandle, pieces: list[str], state: dict, share_s: float) -> Generation:
        wall_ms = (time.perf_counter() - handle.submitted) * 1000
        usage, timings = state["usage"] or {}, state["timings"] or {}
        engine_ms = (timings.get("prompt_ms") or 0.0) + (timings.get("predicted_ms") or 0.0)
        latency_ms = min(engine_ms, wall_ms) if engine_ms > 0 else wall_ms
        finish = "cancelled" if handle.cancelled.is_set() else state["finish"] or "stop"
        return Generation(
            text="".join(pieces).strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or handle.request.prompt_tokens),
            completion_tokens=int(usage.get("completion_tokens") or timings.get("predicted_n") or len(pieces)),
            latency_ms=latency_ms,
            queue_ms=max(0.0, wall_ms - latency_ms),
            compute_ms=share_s * 1000,
            finish_reason=finish if finish in ("stop", "length", "cancelled") else "stop",
        )


def _refusal(response: httpx.Response, name: str) -> Exception:
    """The engine's error answer as ours: 4xx -> EngineRefused (its message), otherwise EngineUnavailable."""
    response.read()
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else str(error or "")
    except (ValueError, AttributeError):
        message = ""
    message = message or response.text[:300] or response.reason_phrase
    if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 408, 429):  # not the deployment's or load's
        return EngineRefused(f"The {name} engine refused the request: {message}", "prompt" if "prompt" in message.lower() else None)
    return EngineUnavailable(f"The {name} engine failed ({response.status_code}): {message}")

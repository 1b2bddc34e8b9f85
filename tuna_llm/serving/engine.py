"""The engine interface: what serving asks of a runtime (transformers, llama.cpp). Django-free.

An engine is loaded once per base model and process (by its constructor, on the device thread:
tuna_llm.serving.compute) and then answers calls: ``prepare`` checks a call and turns it into the engine's
own request, ``submit`` queues requests (submitted together, they may share a batch) and returns handles,
``stream`` hands out a submitted request's text pieces as they are decoded, ``cancel`` stops one,
``wait_estimate_s`` says how long more rows would wait (for the 503 + Retry-After admission), and
``describe`` names the engine, its precision and device. Which engine answers a call is decided in one
place, above this layer (inference_app.engines).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuna_llm.prompting import Message

CANCEL_WAIT_S = 10.0  # how long a closed stream waits for its row to stop, so that its usage is known
SURROGATE = "The prompt contains a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text."


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # from the start of its prefill to its own end
    queue_ms: float  # waiting to be admitted, before latency_ms starts
    compute_ms: float  # its share of the steps it was decoded in: what it is billed
    finish_reason: str  # "stop", "length", or "cancelled" (its client went away)


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "transformers" or "llama.cpp": stored with every usage row
    precision: str  # "bf16" / "fp32" on transformers (the deployment's), "gguf" on llama.cpp
    device: str  # "cpu", "cuda", ...


@dataclass(frozen=True)
class Adapter:
    """A fine-tune's weights on top of the base: a name and its files (a PEFT folder, or a LoRA GGUF)."""

    name: str
    path: Path | str


@dataclass(frozen=True)
class CallSpec:
    """One call as a client asked for it: messages (rendered by the engine's chat template) or a raw text."""

    messages: list[Message] | None = None
    text: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: Adapter | None = None
    max_prompt_tokens: int | None = None  # the server's limit on prompt tokens (TUNA_MAX_PROMPT_TOKENS), below the context


class RequestInvalid(ValueError):
    """A request the engine refuses before decoding (it would fail, and fail its batch mates); ``param``
    names the request field at fault where there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Handle(Protocol):
    """A submitted request: its text pieces arrive on ``deltas`` (then None); ``done`` is set once ``result``
    (or ``error``) is."""

    deltas: queue.Queue
    done: threading.Event
    result: Generation | None
    error: BaseException | None


class Engine(Protocol):
    def describe(self) -> EngineInfo: ...

    def prepare(self, spec: CallSpec) -> Any:
        """The engine's own request for ``spec``, checked (RequestInvalid: empty, not Unicode, too long)."""

    def submit(self, request: Any) -> Handle: ...

    def submit_all(self, requests: list[Any]) -> list[Handle]:
        """Queue requests in one go, so that they can start together."""

    def stream(self, handle: Handle) -> Iterator[str]:
        """The text pieces of a submitted request; closing it early cancels the request."""

    def cancel(self, handle: Handle) -> None: ...

    def wait_estimate_s(self, rows: int = 1) -> float:
        """Roughly how long ``rows`` more requests would wait before they start."""


def stream_pieces(engine: Engine, handle: Handle) -> Iterator[str]:
    """``handle``'s pieces as they come; closed early, the request is cancelled and waited for (its usage known)."""
    try:
        while True:
            piece = handle.deltas.get()
            if piece is None:
                break
            yield piece
    except GeneratorExit:  # the consumer went away: stop decoding for nobody
        engine.cancel(handle)
        handle.done.wait(CANCEL_WAIT_S)
        raise
    if handle.error is not None:
        raise handle.error


def result_of(handle: Handle) -> Generation:
    """Wait for a submitted request's end: its Generation, or its error raised."""
    handle.done.wait()
    if handle.error is not None:
        raise handle.error
    return handle.result


def check_prompt_text(text: str | None) -> None:
    """Refuse an empty prompt or one that is not Unicode (a lone surrogate), naming the field."""
    if not text or not text.strip():
        raise RequestInvalid("The prompt is empty.", "prompt")
    check_unicode(text)


def check_unicode(text: str) -> None:
    """Refuse text that is not Unicode (a lone surrogate cannot be tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestInvalid(SURROGATE, "prompt") from None


def check_fits(prompt_tokens: int, context: int | None, limit: int | None = None) -> None:
    """Refuse a prompt that leaves the context no room, or one over the server's limit (``limit``: TUNA_MAX_PROMPT_TOKENS)."""
    if context and prompt_tokens >= context:
        raise RequestInvalid(f"The prompt is {prompt_tokens} tokens; this model's context holds {context}.", "prompt")
    if limit and prompt_tokens > limit:
        raise RequestInvalid(
            f"The prompt is {prompt_tokens} tokens; this server takes at most {limit} prompt tokens (TUNA_MAX_PROMPT_TOKENS).",
            "prompt",
        )

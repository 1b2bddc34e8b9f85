"""Request batching: concurrent requests for one base model share one decoding loop, continuously.

Each loaded base model gets one engine, a ``Scheduler`` over a ``DecodeBatch``, stepped on the process's
one compute thread (tuna_llm.serving.compute). A request
that arrives while others decode joins at the next step: it is prefilled (with any others that arrived
together) and from then on decodes with the rows already running; a row that ends leaves at once and its
place is free for the next request. Rows may each use a different adapter (or none): they go through
peft's mixed-adapter forward, each row through its own LoRA weights on the one copy of the base. Each
row's new text is handed to its own request as it is produced, and each row ends at its own token limit,
stop token or stop string. Greedy answers are the same as when a request runs alone (tested).

Isolation: values that cannot be decoded are refused when a request is submitted, so they never reach a
batch; a request whose adapter cannot be attached fails alone; if a step still fails, its rows are run
again one at a time, so only the row at fault fails. The engine tokenizes with its own copy of the
tokenizer: request threads keep using the shared one. A row whose client went away (``cancel``) stops at
its next token with finish_reason "cancelled".

Timing: a request's clock starts when its prefill starts (``started``); the wait before is its queue time.
Its prefill's time is its own (split between the rows prefilled together); each decoding step's wall time
is split equally between the rows in that step. A row's ``compute_ms`` (what it is billed) is the sum of
its shares.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tuna_llm.prompting import Message, render_chat
from tuna_llm.serving.compute import compute_thread
from tuna_llm.serving.decoding import DecodeBatch, Row
from tuna_llm.serving.engine import (
    CallSpec,
    EngineInfo,
    Generation,
    RequestInvalid,
    check_fits,
    check_prompt_text,
    result_of,
    stream_pieces,
)
from tuna_llm.serving.registry import LoadedBaseModel
from tuna_llm.settings import current

logger = logging.getLogger("tuna.inference")

MAX_BATCH = 8
WINDOW_S = 0.02
# torch.manual_seed takes a signed or unsigned 64-bit integer; OpenAI's API documents int64.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
ENGINE_NAME = "transformers"


def stop_token_ids(loaded: LoadedBaseModel) -> set[int]:
    """End-of-turn and end-of-text ids: generation ends on any of them."""
    eos = loaded.base_model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return ids | {loaded.tokenizer.eos_token_id}


@dataclass(eq=False)
class GenerationRequest:
    text: str  # the prompt, already rendered
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    adapter_path: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch began: queue wait before, latency after
    compute_ms: float = 0.0  # its share of the batch's time so far
    deltas: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then None
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None
    # filled while decoding
    tokens: list[int] = field(default_factory=list)
    decoder: Any = field(default=None, repr=False)  # its tokenizers.decoders.DecodeStream, where the tokenizer has one
    decoded: str = ""  # the text of ``tokens`` so far, as the DecodeStream gave it
    emitted: str = ""
    finished: bool = False
    finish_reason: str = "length"
    cancelled: bool = False  # its client went away: stop decoding it

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a batch (one decoding setting per ``generate`` call)."""
        return (self.temperature, self.top_p, self.seed) if self.temperature > 0 else (0.0, 1.0, None)

    def check(self) -> None:
        """Refuse values that would make ``generate`` fail (RequestInvalid, naming the value)."""
        if not isinstance(self.text, str) or not self.text:
            raise RequestInvalid("The prompt must be a non-empty string.")
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestInvalid(f"The prompt contains a lone UTF-16 surrogate ({ascii(exc.object[exc.start])}).") from None
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestInvalid(f"max_new_tokens must be a whole number of at least 1; got {self.max_new_tokens!r}.")
        if not _number(self.temperature) or self.temperature < 0:
            raise RequestInvalid(f"temperature must be a finite number of at least 0; got {self.temperature!r}.")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestInvalid(f"top_p must be greater than 0 and at most 1; got {self.top_p!r}.")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not MIN_SEED <= self.seed <= MAX_SEED
        ):
            raise RequestInvalid(f"seed must be a whole number from {MIN_SEED} to {MAX_SEED}; got {self.seed!r}.")

    def finish(self, reason: str, prompt_tokens: int) -> None:
        """Set the result, then release the caller (deltas, then done); a finished request stays as it is."""
        if self.finished:
            return
        self.finished = True
        self.finish_reason = reason
        now = time.perf_counter()
        started = self.started if self.started is not None else now
        self.result = Generation(
            text=self.emitted.strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(self.tokens),
            latency_ms=(now - started) * 1000,
            queue_ms=(started - self.submitted) * 1000,
            compute_ms=self.compute_ms,
            finish_reason=reason,
        )
        self.deltas.put(None)
        self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.done.is_set():
            return
        self.finished = True
        self.error = error
        self.deltas.put(None)
        self.done.set()

    def restart(self) -> None:
        """Decode again from the prompt. What was already streamed is not sent again: greedy decoding
        gives the same tokens, so the stream goes on where it stopped."""
        self.tokens, self.compute_ms, self.started = [], 0.0, None
        self.decoder, self.decoded = None, ""
        self.finished, self.finish_reason = False, "length"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Scheduler:
    """Continuous batching of ``GenerationRequest`` rows on one loaded model (see ``DecodeBatch``).

    Between two decoding steps, ``admit`` prefills the requests that can join and they decode from the next
    step on with the rows already running. Used by the engine thread (requests arriving at any time) and by
    ``decode_all`` (a known list of requests, as an evaluation has).
    """

    def __init__(self, loaded: LoadedBaseModel, tokenizer, *, max_batch: int = MAX_BATCH) -> None:
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stop_ids = stop_token_ids(loaded)
        self.backend = incremental_backend(tokenizer)
        self.batch = DecodeBatch(loaded, tokenizer.pad_token_id)
        self.running: dict[Row, GenerationRequest] = {}
        self.next_tokens: dict[Row, int] = {}
        self.prompt_tokens: dict[GenerationRequest, int] = {}
        self.admissions = 0
        self.largest_batch = 0
        self._ended_rows: list[Row] = []
        self.last_latency_s = 0.0  # of the last request that ended, for wait estimates

    @property
    def active(self) -> list[GenerationRequest]:
        return list(self.running.values())

    def joinable(self, pending: list[GenerationRequest]) -> list[GenerationRequest]:
        """The pending requests that can join now, oldest first: free rows, and no more distinct adapters
        than the adapter cache holds (all of them stay attached while they decode)."""
        if self.running and not self.batch.can_join:
            return []
        room = max(1, current().adapter_cache_size)
        adapters = {r.adapter for r in self.running.values() if r.adapter is not None}
        chosen: list[GenerationRequest] = []
        for request in pending:
            if len(self.running) + len(chosen) >= self.max_batch:
                break
            if request.adapter is not None and request.adapter not in adapters:
                if len(adapters) == room:
                    continue
                adapters.add(request.adapter)
            chosen.append(request)
        return chosen

    def admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill ``requests`` into the batch (their first token comes out of it). A request that fails
        alone (its adapter cannot be attached, its prompt cannot be encoded) fails without the others."""
        ready = []
        for request in requests:
            try:
                if request.adapter_path is not None:  # may have been evicted since it was queued
                    self.loaded.attach_adapter(request.adapter, request.adapter_path)
                ids = self.tokenizer(request.text, add_special_tokens=False)["input_ids"]
            except Exception as exc:
                logger.exception("Generation failed")
                request.fail(exc)
                continue
            ready.append((request, ids))
        if not ready:
            return
        started = time.perf_counter()
        for request, ids in ready:
            request.started = started
            self.prompt_tokens[request] = len(ids)
        rows = [Row(ids, r.adapter, r.temperature, r.top_p, r.seed) for r, ids in ready]
        try:
            tokens = self.batch.admit(rows)
        except Exception as exc:
            if len(rows) == 1:
                logger.exception("Generation failed")
                self._end(ready[0][0], error=exc)
                return
            logger.warning("Prefilling %d rows failed (%s: %s); admitting them one at a time", len(rows), type(exc).__name__, exc)
            for request, _ in ready:
                request.restart()
                self.admit([request])
            return
        self.admissions += 1
        self._charge([r for r, _ in ready], started)
        for row, (request, _), token in zip(rows, ready, tokens, strict=True):
            self.running[row] = request
            self._take(row, request, token)
        self.largest_batch = max(self.largest_batch, len(self.running))
        self._drop_ended()

    def step(self) -> None:
        """Decode one token for every running row. If the step fails, its rows start again one at a time
        (greedy rows give the same tokens, so their streams go on where they were), so only a row at fault fails."""
        rows = list(self.batch.rows)
        started = time.perf_counter()
        try:
            tokens = self.batch.step([self.next_tokens[row] for row in rows])
        except Exception as exc:
            requests = [self.running[row] for row in rows]
            self.batch.drop(rows)
            self.running.clear()
            if len(requests) == 1:
                logger.exception("Generation failed")
                self._end(requests[0], error=exc)
                return
            logger.warning("A batch of %d failed (%s: %s); running its rows one at a time", len(requests), type(exc).__name__, exc)
            for request in requests:
                request.restart()
                decode_all(self.loaded, [request], max_batch=1, tokenizer=self.tokenizer)
            return
        self._charge([self.running[row] for row in rows], started)
        for row, token in zip(rows, tokens, strict=True):
            self._take(row, self.running[row], token)
        self._drop_ended()

    def cancel_all(self, error: BaseException) -> None:
        for request in self.active:
            self._end(request, error=error)
        self.batch.drop(list(self.batch.rows))
        self.running.clear()

    # -- internals ----------------------------------------------------------------------------
    def _charge(self, requests: list[GenerationRequest], since: float) -> None:
        """Split the time since ``since`` equally between ``requests`` (those that were in the step)."""
        share = (time.perf_counter() - since) * 1000 / len(requests)
        for request in requests:
            request.compute_ms += share

    def _take(self, row: Row, request: GenerationRequest, token: int) -> None:
        """A row's new token: stream its text, or end it (stop token, stop string, token limit, client gone)."""
        self.next_tokens[row] = token
        if request.cancelled:
            return self._finish(row, request, "cancelled")
        if token in self.stop_ids:
            return self._finish(row, request, "stop")
        request.tokens.append(token)
        text = self._text(request, token)
        cut = _first_stop(text, request.stop)
        if cut is not None:
            text = text[:cut]
        if not text.endswith("\ufffd") and len(text) > len(request.emitted):  # wait for whole characters
            request.deltas.put(text[len(request.emitted) :])
            request.emitted = text
        if cut is not None:
            self._finish(row, request, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(row, request, "length")

    def _text(self, request: GenerationRequest, token: int) -> str:
        """The text of the request's tokens so far: from its DecodeStream (each token decoded once), or, for a
        tokenizer without one, the whole answer decoded again."""
        if self.backend is None:
            return self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if request.decoder is None:
            from tokenizers.decoders import DecodeStream

            request.decoder = DecodeStream(skip_special_tokens=True)
        piece = request.decoder.step(self.backend, token)
        if piece:
            request.decoded += piece
        return request.decoded

    def _finish(self, row: Row, request: GenerationRequest, reason: str) -> None:
        request.finish(reason, prompt_tokens=self.prompt_tokens.pop(request, 0))
        self.last_latency_s = request.result.latency_ms / 1000
        self._ended_rows.append(row)

    def _end(self, request: GenerationRequest, *, error: BaseException) -> None:
        self.prompt_tokens.pop(request, None)
        request.fail(error)

    def _drop_ended(self) -> None:
        ended, self._ended_rows = self._ended_rows, []
        for row in ended:
            self.running.pop(row, None)
            self.next_tokens.pop(row, None)
        self.batch.drop(ended)


def decode_all(
    loaded: LoadedBaseModel,
    requests: list[GenerationRequest],
    *,
    max_batch: int = MAX_BATCH,
    tokenizer=None,
    on_end: Callable[[GenerationRequest], None] = lambda request: None,
) -> None:
    """Decode ``requests`` to their ends in this thread, continuously batched: as rows end, the next ones
    join. Each request's ``result`` (or ``error``) is set, then ``on_end`` is called with it; its timing is
    its own share of the steps."""
    scheduler = Scheduler(loaded, tokenizer or padding_tokenizer(loaded), max_batch=max_batch)
    pending = checked(requests)
    unreported = list(requests)
    while pending or scheduler.running:
        joining = scheduler.joinable(pending)
        if joining:
            pending = [r for r in pending if r not in joining]
            scheduler.admit(joining)
        if scheduler.running:
            scheduler.step()
        for request in [r for r in unreported if r.done.is_set()]:
            unreported.remove(request)
            on_end(request)
    for request in unreported:
        on_end(request)


def checked(requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """The requests that can be decoded; each of the others fails at once, alone (RequestInvalid)."""
    accepted = []
    for request in requests:
        try:
            request.check()
        except RequestInvalid as exc:
            request.fail(exc)
        else:
            accepted.append(request)
    return accepted


def incremental_backend(tokenizer) -> Any:
    """The ``tokenizers.Tokenizer`` a DecodeStream steps on, where its pieces join to exactly what
    ``tokenizer.decode`` gives (a fast tokenizer that does not clean up spaces after decoding); else None."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return tokenizer.backend_tokenizer


def padding_tokenizer(loaded: LoadedBaseModel):
    """A copy of the model's tokenizer for a decoding loop: request threads keep using the shared one."""
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


class BatchingEngine:
    """The requests of one loaded model, decoded continuously batched on the process's compute thread
    (tuna_llm.serving.compute: every engine of the process steps there in turn)."""

    def __init__(self, loaded: LoadedBaseModel, *, max_batch: int = MAX_BATCH, window_s: float = WINDOW_S) -> None:
        self.loaded = loaded
        self.max_batch = max_batch
        self.window_s = window_s
        self.scheduler = Scheduler(loaded, padding_tokenizer(loaded), max_batch=max_batch)
        self._pending: list[GenerationRequest] = []
        self._cond = threading.Condition()
        compute_thread.add(self)

    @property
    def current(self) -> list[GenerationRequest]:
        """The requests decoding now."""
        return self.scheduler.active

    @property
    def batches_run(self) -> int:
        """How many times rows were admitted (prefilled together)."""
        return self.scheduler.admissions

    @property
    def largest_batch(self) -> int:
        return self.scheduler.largest_batch

    def waiting(self) -> int:
        """Rows queued or being decoded."""
        return len(self._pending) + len(self.scheduler.running)

    def wait_estimate_s(self, rows: int = 1) -> float:
        """Roughly how long until `rows` more could start: a free row opens as running ones end."""
        ahead = self.waiting() + rows - self.max_batch
        if ahead <= 0:
            return 0.0
        return math.ceil(ahead / self.max_batch) * (self.scheduler.last_latency_s or 1.0)

    # -- the engine interface (tuna_llm.serving.engine) -------------------------------------
    def describe(self) -> EngineInfo:
        return EngineInfo(ENGINE_NAME, self.loaded.plan.precision, self.loaded.device)

    def prepare(self, spec: CallSpec) -> GenerationRequest:
        """Render the prompt (the tokenizer's chat template for messages, raw for text) and check it fits the context."""
        loaded = self.loaded
        prompt = render_chat(loaded.tokenizer, spec.messages, add_generation_prompt=True) if spec.messages is not None else spec.text
        check_prompt_text(prompt)
        context = getattr(loaded.base_model.config, "max_position_embeddings", None)
        check_fits(len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]), context, spec.max_prompt_tokens)
        request = GenerationRequest(
            text=prompt,
            max_new_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop=tuple(spec.stop),
            adapter=spec.adapter.name if spec.adapter else None,
            adapter_path=str(spec.adapter.path) if spec.adapter else None,
        )
        request.check()  # what the engine would refuse is refused here, before it can reach a batch
        return request

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Queue requests in one step, so that they join together. A request with values that cannot be
        decoded fails at once, alone. The requests are their own handles."""
        accepted = checked(requests)
        with self._cond:
            self._pending.extend(accepted)
        compute_thread.wake()
        return list(requests)

    def cancel(self, request: GenerationRequest) -> None:
        """Stop decoding ``request``: still queued, it ends now; decoding, at its next token."""
        with self._cond:
            request.cancelled = True
            queued = request in self._pending
            if queued:
                self._pending.remove(request)
        if queued:
            request.finish("cancelled", prompt_tokens=0)

    def generate(self, request: GenerationRequest) -> Generation:
        return result_of(self.submit(request))

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield a submitted request's text pieces as they are decoded; ``request.result`` is set once it ends."""
        return stream_pieces(self, request)

    # -- on the compute thread -------------------------------------------------------------
    def due_in(self, now: float) -> float | None:
        """Rows decoding: a step is due now. Requests waiting while idle: once the oldest has waited
        ``window_s`` (requests sent together start together). Nothing: None."""
        if self.scheduler.running:
            return 0.0
        with self._cond:
            if not self._pending:
                return None
            return self._pending[0].submitted + self.window_s - now

    def tick(self) -> None:
        scheduler = self.scheduler
        with self._cond:
            joining = scheduler.joinable(self._pending)
            self._pending = [r for r in self._pending if r not in joining]
        try:
            if joining:
                scheduler.admit(joining)
            if scheduler.running:
                scheduler.step()
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must be released
            logger.exception("Decoding failed")
            scheduler.cancel_all(exc)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


_engines: dict[int, BatchingEngine] = {}
_engines_lock = threading.Lock()


def engine_for(loaded: LoadedBaseModel) -> BatchingEngine:
    with _engines_lock:
        engine = _engines.get(id(loaded))
        if engine is None or engine.loaded is not loaded:
            engine = _engines[id(loaded)] = BatchingEngine(loaded)
        return engine


def generate_chat(
    loaded: LoadedBaseModel,
    messages: list[Message],
    *,
    adapter: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Generation:
    """One conversation's answer, decoded alone in this thread (``adapter`` must be attached)."""
    request = GenerationRequest(
        text=render_chat(loaded.tokenizer, messages, add_generation_prompt=True),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        adapter=adapter,
    )
    decode_all(loaded, [request], max_batch=1)
    if request.error is not None:
        raise request.error
    return request.result

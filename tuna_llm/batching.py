"""Request batching: concurrent requests for one base model share one generation loop.

Each loaded base model gets one engine thread. Requests that arrive within a short window and share
decoding settings are left-padded into one batch and decoded together by ``model.generate``, whatever
adapter each asks for: rows for different adapters (or none) go through peft's mixed-adapter forward,
each row through its own LoRA weights on the one copy of the base; a streamer hands each row's new tokens to its own request as they are produced,
and a stopping criterion ends each row at its own token limit or stop string. Greedy answers are the
same as when a request runs alone (tested).

Isolation: values that cannot be decoded are refused when a request is submitted, so they never reach a
batch; if a batch still fails, its rows are run again one at a time, so only the row at fault fails. The
engine pads with its own copy of the tokenizer: request threads keep using the shared one, whose padding
state a batch would otherwise switch under them. A row whose client went away (``cancel``) stops at its
next token with finish_reason "cancelled".

Timing: a request's clock starts when its batch starts (``started``); the wait before is its queue time.
Rows decoded together share the batch's time: each step's wall time is split equally between the rows
still decoding in it, and a row's ``compute_ms`` (what it is billed) is the sum of its shares.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tuna_llm.engine import Generation, stop_token_ids
from tuna_llm.registry import LoadedBaseModel
from tuna_llm.settings import current

logger = logging.getLogger("tuna.inference")

MAX_BATCH = 8
WINDOW_S = 0.02
# torch.manual_seed takes a signed or unsigned 64-bit integer; OpenAI's API documents int64.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
CANCEL_WAIT_S = 10.0  # how long a closed stream waits for its row to stop, so that its usage is known


class RequestInvalid(ValueError):
    """A request the engine refuses before batching: decoding it would fail, and fail its batch mates."""


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
        self.finished, self.finish_reason = False, "length"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class BatchingEngine:
    def __init__(self, loaded: LoadedBaseModel, *, max_batch: int = MAX_BATCH, window_s: float = WINDOW_S) -> None:
        self.loaded = loaded
        # Padding switches a fast tokenizer's state; request threads tokenize with the shared one meanwhile.
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self.tokenizer.padding_side = "left"
        self.max_batch = max_batch
        self.window_s = window_s
        self.current: list[GenerationRequest] = []  # the batch being decoded
        self._pending: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{loaded.name}", daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.largest_batch = 0
        self.last_batch_s = 0.0  # wall time of the last batch, for wait estimates

    def waiting(self) -> int:
        """Rows queued or being decoded."""
        return len(self._pending) + len(self.current)

    def wait_estimate_s(self, rows: int = 1) -> float:
        """Roughly how long until `rows` more could start: the batches ahead, at the last batch's duration."""
        batches_ahead = math.ceil((self.waiting() + rows) / self.max_batch)
        return batches_ahead * (self.last_batch_s or 1.0)

    # -- callers ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[GenerationRequest]) -> None:
        """Queue requests in one step, so that they are waiting together when the next batch is formed.
        A request with values that cannot be decoded fails at once, alone."""
        accepted = []
        for request in requests:
            try:
                request.check()
            except RequestInvalid as exc:
                request.fail(exc)
            else:
                accepted.append(request)
        with self._cond:
            self._pending.extend(accepted)
            self._cond.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Stop decoding ``request``: still queued, it ends now; in a batch, at its next token."""
        with self._cond:
            request.cancelled = True
            queued = request in self._pending
            if queued:
                self._pending.remove(request)
        if queued:
            request.finish("cancelled", prompt_tokens=0)

    def generate(self, request: GenerationRequest) -> Generation:
        self.submit(request).done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text pieces as they are decoded; ``request.result`` is set once it ends."""
        self.submit(request)
        try:
            while True:
                piece = request.deltas.get()
                if piece is None:
                    break
                yield piece
        except GeneratorExit:  # the consumer went away: stop decoding for nobody
            self.cancel(request)
            request.done.wait(CANCEL_WAIT_S)
            raise
        if request.error is not None:
            raise request.error

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(self.window_s)  # let concurrent requests arrive
            with self._cond:
                batch = self._next_batch()
                self._pending = [r for r in self._pending if r not in batch]
            batch_started = time.perf_counter()
            try:
                self._run_isolated(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller must be released
                logger.exception("Batch generation failed")
                for request in batch:
                    request.fail(exc)
            finally:
                self.current = []
                self.last_batch_s = time.perf_counter() - batch_started

    def _run_isolated(self, batch: list[GenerationRequest]) -> None:
        """Run a batch; if it fails, run its unfinished rows one at a time, so only the row at fault fails."""
        try:
            self._run(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("Generation failed")
                batch[0].fail(exc)
                return
            logger.warning("A batch of %d failed (%s: %s); running its rows one at a time", len(batch), type(exc).__name__, exc)
        for request in batch:
            if request.finished:
                continue
            request.restart()
            try:
                self._run([request])
            except Exception as exc:
                logger.exception("Generation failed")
                request.fail(exc)

    def _next_batch(self) -> list[GenerationRequest]:
        """The oldest request and those that can join it: same decoding settings, and no more distinct
        adapters than the adapter cache holds (all of them must be attached at once)."""
        key = self._pending[0].key
        room = max(1, current().adapter_cache_size)
        batch: list[GenerationRequest] = []
        adapters: set[str] = set()
        for request in self._pending:
            if len(batch) == self.max_batch:
                break
            if request.key != key:
                continue
            if request.adapter is not None and request.adapter not in adapters:
                if len(adapters) == room:
                    continue
                adapters.add(request.adapter)
            batch.append(request)
        return batch

    def encode(self, texts: list[str]):
        """Left-padded input ids and attention mask for a batch of rendered prompts."""
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def _run(self, batch: list[GenerationRequest]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        started = time.perf_counter()
        for request in batch:
            request.started = started
        loaded, tokenizer = self.loaded, self.tokenizer
        self.current = batch
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        encoded = self.encode([r.text for r in batch]).to(loaded.device)
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        stop_ids = stop_token_ids(loaded)
        first = batch[0]

        def finish(request: GenerationRequest, reason: str) -> None:
            request.finish(reason, prompt_tokens=prompt_lengths[batch.index(request)])

        class RowStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False
                self.clock = started

            def charge(self) -> None:
                """Split the time since the last step between the rows that were still decoding in it.
                The first new token's share covers the prefill (and setup) since the batch started."""
                now = time.perf_counter()
                active = [r for r in batch if not r.finished]
                for request in active:
                    request.compute_ms += (now - self.clock) * 1000 / len(active)
                self.clock = now

            def put(self, value) -> None:
                if not self.prompt_seen:  # the first call carries the prompts
                    self.prompt_seen = True
                    return
                self.charge()
                for request, token in zip(batch, value.reshape(-1).tolist(), strict=True):
                    if request.finished:
                        continue
                    if request.cancelled:
                        finish(request, "cancelled")
                        continue
                    if token in stop_ids:
                        finish(request, "stop")
                        continue
                    request.tokens.append(token)
                    text = tokenizer.decode(request.tokens, skip_special_tokens=True)
                    cut = _first_stop(text, request.stop)
                    if cut is not None:
                        text = text[:cut]
                    if not text.endswith("\ufffd") and len(text) > len(request.emitted):  # wait for whole characters
                        request.deltas.put(text[len(request.emitted) :])
                        request.emitted = text
                    if cut is not None:
                        finish(request, "stop")
                    elif len(request.tokens) >= request.max_new_tokens:
                        finish(request, "length")

            def end(self) -> None:
                self.charge()
                for request in batch:
                    finish(request, "length")

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([r.finished for r in batch], device=input_ids.device)

        kwargs = {"do_sample": first.temperature > 0}
        if first.temperature > 0:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        for request in batch:
            if request.adapter is not None:  # may have been evicted since it was queued
                loaded.attach_adapter(request.adapter, request.adapter_path)
        with loaded.using_per_row([r.adapter for r in batch]) as (model, routing), torch.inference_mode():
            if first.seed is not None and first.temperature > 0:  # greedy rows share a batch whatever their seed
                torch.manual_seed(first.seed)
            model.generate(
                **encoded,
                **routing,
                max_new_tokens=max(r.max_new_tokens for r in batch),
                pad_token_id=tokenizer.pad_token_id,
                streamer=RowStreamer(),
                stopping_criteria=StoppingCriteriaList([RowsDone()]),
                **kwargs,
            )


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

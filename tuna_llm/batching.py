"""Request batching: concurrent requests for one base model share one generation loop.

Each loaded base model gets one engine thread. Requests that arrive within a short window and share
decoding settings are left-padded into one batch and decoded together by ``model.generate``, whatever
adapter each asks for: rows for different adapters (or none) go through peft's mixed-adapter forward,
each row through its own LoRA weights on the one copy of the base; a streamer hands each row's new tokens to its own request as they are produced,
and a stopping criterion ends each row at its own token limit or stop string. Greedy answers are the
same as when a request runs alone (tested).

Timing: a request's clock starts when its batch starts (``started``); the wait before is its queue time.
Rows decoded together share the batch's time: each step's wall time is split equally between the rows
still decoding in it, and a row's ``compute_ms`` (what it is billed) is the sum of its shares.
"""

from __future__ import annotations

import logging
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

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a batch (one decoding setting per ``generate`` call)."""
        return (self.temperature, self.top_p, self.seed) if self.temperature > 0 else (0.0, 1.0, None)


class BatchingEngine:
    def __init__(self, loaded: LoadedBaseModel, *, max_batch: int = MAX_BATCH, window_s: float = WINDOW_S) -> None:
        self.loaded = loaded
        self.max_batch = max_batch
        self.window_s = window_s
        self._pending: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{loaded.name}", daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.largest_batch = 0

    # -- callers ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[GenerationRequest]) -> None:
        """Queue requests in one step, so that they are waiting together when the next batch is formed."""
        with self._cond:
            self._pending.extend(requests)
            self._cond.notify()

    def generate(self, request: GenerationRequest) -> Generation:
        self.submit(request).done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text pieces as they are decoded; ``request.result`` is set once it ends."""
        self.submit(request)
        while True:
            piece = request.deltas.get()
            if piece is None:
                break
            yield piece
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
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller must be released
                logger.exception("Batch generation failed")
                for request in batch:
                    if not request.done.is_set():
                        request.error = exc
                        request.deltas.put(None)
                        request.done.set()

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

    def _run(self, batch: list[GenerationRequest]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        started = time.perf_counter()
        for request in batch:
            request.started = started
        loaded, tokenizer = self.loaded, self.loaded.tokenizer
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        tokenizer.padding_side = "left"
        encoded = tokenizer([r.text for r in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        stop_ids = stop_token_ids(loaded)
        first = batch[0]

        def finish(request: GenerationRequest, reason: str) -> None:
            if request.finished:
                return
            request.finished = True
            request.finish_reason = reason
            text = request.emitted
            # Every field is set before the caller is released (deltas, then done).
            request.result = Generation(
                text=text.strip(),
                prompt_tokens=prompt_lengths[batch.index(request)],
                completion_tokens=len(request.tokens),
                latency_ms=(time.perf_counter() - request.started) * 1000,
                queue_ms=(request.started - request.submitted) * 1000,
                compute_ms=request.compute_ms,
                finish_reason=reason,
            )
            request.deltas.put(None)
            request.done.set()

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
            if first.seed is not None:
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

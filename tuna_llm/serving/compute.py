"""The device thread: one thread for all of a serving process's in-process model work (the transformers engine,
tuna_llm.serving.batching).

Model loads, adapter loads and every transformers decoding step run here, in turn: an engine is a ``Steppable``
the thread ticks while it has work, and a load asked for from a request thread is handed over and waited for
(``call``). llama.cpp does not run in this process: exported GGUF models are served by llama-server processes
(tuna_llm.serving.llama_server), spoken to over HTTP from request threads.

Why one thread: torch's CPU kernels run on an OpenMP team that belongs to the calling thread. While a process
has one team, its worker threads spin between the many small products of a decoding step and pick up the next
one at once; once a second thread has run such code (a request thread that loaded a model), libgomp sees more
threads than cores and throttles every team's spinning, and each product then waits for sleeping threads to
wake (docs/performance.md has the figures).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

logger = logging.getLogger("tuna.inference")


class Steppable(Protocol):
    def due_in(self, now: float) -> float | None:
        """Seconds until it has work (0: now), or None when it has none."""

    def tick(self) -> None:
        """Admit what can join and decode one step."""


class ComputeThread:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tasks: list[tuple[Callable[[], Any], Future]] = []
        self._engines: list[Steppable] = []
        self._thread: threading.Thread | None = None

    @property
    def is_current(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the compute thread (between two decoding steps) and return its result or raise its error."""
        if self.is_current:
            return fn()
        future: Future = Future()
        with self._cond:
            self._start()
            self._tasks.append((fn, future))
            self._cond.notify()
        return future.result()

    def add(self, engine: Steppable) -> None:
        with self._cond:
            self._start()
            self._engines.append(engine)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="device", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                tasks, self._tasks = self._tasks, []
                engines = list(self._engines)
            for fn, future in tasks:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            now = time.perf_counter()
            dues = [(engine, engine.due_in(now)) for engine in engines]
            waits = [due for _, due in dues if due is not None]
            ready = [engine for engine, due in dues if due is not None and due <= 0]
            for engine in ready:
                engine.tick()
            if ready:
                continue
            with self._cond:
                if not self._tasks:
                    self._cond.wait(timeout=min(waits) if waits else None)


compute_thread = ComputeThread()

"""Which runtime answers a call (TUNA_SERVING_ENGINE), and this process's llama.cpp models.

- ``transformers``: every model is served by transformers + peft (the weights as trained).
- ``llamacpp``: every model is served by llama.cpp from its exported GGUF files: a fine-tune needs a
  completed f16 export (the base GGUF and the job's LoRA GGUF), a base model its f16 GGUF (made by the
  first export of any fine-tune of that base). Without them the call is refused (409) with how to export.
- ``auto`` (the default): llama.cpp where the export is known to answer as PyTorch does, transformers
  otherwise. A fine-tune: its newest serving export passed its parity check. A base model: its f16 GGUF
  is present and some export of a fine-tune of that base passed its parity check (that check ran this
  very base GGUF, with the fine-tune's LoRA on top).

One ``LlamaCppModel`` per base GGUF per process, shared by the base model and all its fine-tunes (each
call applies its own LoRA GGUF). llama.cpp decodes one call at a time per model; calls queue on its lock.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from training_app.exports import base_gguf_dir, serving_export
from training_app.models import Export, TrainingJob
from tuna_core.errors import Conflict
from tuna_llm.serving.engine import Generation
from tuna_llm.serving.llamacpp import ENGINE_NAME as LLAMACPP
from tuna_llm.serving.llamacpp import LlamaCall

TRANSFORMERS = "transformers"
ENGINES = (TRANSFORMERS, LLAMACPP)
BASE_GGUF = "base-f16.gguf"


class NotServable(Conflict):
    """The chosen engine cannot serve this model (yet); the message says what to do."""


@dataclass(frozen=True)
class Route:
    engine: str
    base_gguf: Path | None = None
    lora_gguf: Path | None = None


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def route_for(*, base_model: str, job: TrainingJob | None) -> Route:
    mode = settings.TUNA_SERVING_ENGINE
    if mode == "transformers":
        return Route(TRANSFORMERS)
    if job is not None:
        route, passed = _job_route(job)
    else:
        route, passed = _base_route(base_model)
    if mode == "auto":
        return route if route is not None and passed and llama_cpp_installed() else Route(TRANSFORMERS)
    if route is None:
        raise NotServable(_how_to_export(base_model, job))
    return route


def _job_route(job: TrainingJob) -> tuple[Route | None, bool]:
    export = serving_export(job)
    if export is None:
        return None, False
    base, lora = _data_path(export.file("gguf_base_f16")["path"]), _data_path(export.file("gguf_lora")["path"])
    if not (base.is_file() and lora.is_file()):
        return None, False
    return Route(LLAMACPP, base, lora), export.parity_passed


def _base_route(base_model: str) -> tuple[Route | None, bool]:
    path = base_gguf_dir(base_model) / BASE_GGUF
    if not path.is_file():
        return None, False
    exports = Export.objects.filter(status=Export.Status.COMPLETED, training_job__base_model=base_model).only("status", "parity")
    return Route(LLAMACPP, path.resolve()), any(export.parity_passed for export in exports)


def _data_path(stored: str) -> Path:
    return (Path(settings.TUNA_DATA_DIR) / stored).resolve()  # an absolute stored path stays as it is


def _how_to_export(base_model: str, job: TrainingJob | None) -> str:
    forced = "TUNA_SERVING_ENGINE=llamacpp serves models from their GGUF export"
    if job is not None:
        return (
            f"{job.model_id} has no GGUF export yet ({forced}). Export it first: the Export button on its job page "
            f'(/training/{job.pk}) or POST /api/training/{job.pk}/export with {{"formats": ["gguf_f16"]}}, '
            "then call it again once the export has completed."
        )
    return (
        f"The base model {base_model} has not been converted to GGUF yet ({forced}). Export any completed fine-tune "
        "of it (the Export button on its job page, or POST /api/training/{id}/export): the first export converts its base model."
    )


# -- llama.cpp models of this process ------------------------------------------------------------
class LlamaServer:
    """One base GGUF loaded in this process; its calls decode on the process's llama.cpp thread.

    Why one thread: ggml runs each decode on an OpenMP team that belongs to the calling thread, and every
    further calling thread (a server has 32) adds a team that competes for the cores. Measured on 2 cores,
    the embedded model decoded at 63 tokens/s from one thread and at 26-32 tokens/s once calls had come from
    several threads. So every llama.cpp call of the process (loading included) runs on one thread, one
    at a time, and the server threads wait for it (their queue time)."""

    def __init__(self, path: Path) -> None:
        from tuna_llm.serving.llamacpp import LlamaCppModel

        self.model = _llama_thread.submit(LlamaCppModel, path).result()

    @staticmethod
    def wait_estimate_s(rows: int = 1) -> float:
        """Calls decode one at a time: those ahead, and these, at the last call's duration."""
        return (_load.busy + rows) * _load.last_call_s

    def chat(self, call: LlamaCall) -> Generation:
        submitted = time.perf_counter()
        with _load.counted():
            started, result = _llama_thread.submit(_timed_chat, self.model, call).result()
        return _load.record(_with_queue(result, started - submitted))

    def stream(self, call: LlamaCall) -> LlamaPieces:
        return LlamaPieces(self.model, call)


class LlamaPieces:
    """A call's text pieces, decoded on the llama.cpp thread and handed over as they come; ``result`` once it
    ended. ``close()`` stops decoding at the next token (finish_reason "cancelled")."""

    _END = object()

    def __init__(self, model, call: LlamaCall) -> None:
        self.result: Generation | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._ended = threading.Event()
        self._submitted = time.perf_counter()
        _load.begin()
        _llama_thread.submit(self._decode, model, call)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self._pieces.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._cancelled.set()
        self._ended.wait()

    def _decode(self, model, call: LlamaCall) -> None:
        started = time.perf_counter()
        stream = model.stream(call)
        try:
            if self._cancelled.is_set():  # closed while it waited for the thread: nothing decoded
                self.result = Generation("", 0, 0, 0.0, (started - self._submitted) * 1000, 0.0, "cancelled")
                return
            for piece in stream:
                if self._cancelled.is_set():
                    break
                self._pieces.put(piece)
        except Exception as exc:
            self._pieces.put(exc)
        finally:
            stream.close()
            if stream.result is not None:
                self.result = _load.record(_with_queue(stream.result, started - self._submitted))
            _load.end()
            self._pieces.put(self._END)
            self._ended.set()


class _Load:
    """Calls waiting for the llama.cpp thread or decoding on it, and how long the last one took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = 0
        self.last_call_s = 1.0

    def begin(self) -> None:
        with self._lock:
            self.busy += 1

    def end(self) -> None:
        with self._lock:
            self.busy -= 1

    @contextmanager
    def counted(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def record(self, result: Generation) -> Generation:
        if result.compute_ms > 0:
            self.last_call_s = result.compute_ms / 1000
        return result


def _timed_chat(model, call: LlamaCall) -> tuple[float, Generation]:
    return time.perf_counter(), model.chat(call)


def _with_queue(result: Generation, waited_s: float) -> Generation:
    """The result with the wait for the llama.cpp thread counted as queue time (never billed)."""
    return dataclasses.replace(result, queue_ms=result.queue_ms + waited_s * 1000)


_llama_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp")
_load = _Load()
_servers: dict[Path, LlamaServer] = {}
_servers_lock = threading.Lock()


def llama_server(path: Path) -> LlamaServer:
    """This process's model for a base GGUF, loaded on first use (once, whichever thread asks first)."""
    with _servers_lock:
        server = _servers.get(path)
        if server is None:
            if not _servers:
                atexit.register(_close_servers)
            server = _servers[path] = LlamaServer(path)
        return server


def _close_servers() -> None:
    """Free the models before the interpreter tears down the modules llama-cpp-python's own clean-up needs."""
    with _servers_lock:
        for server in _servers.values():
            server.model.llm.close()
        _servers.clear()

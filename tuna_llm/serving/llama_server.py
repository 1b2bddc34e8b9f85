"""llama.cpp's own server (llama-server, built from the pinned source by `make install`) started and supervised
by the product, for exported GGUF models. Django-free.

``LlamaServer`` runs one base GGUF with the LoRA GGUFs asked for (loaded unapplied; each request applies its
own at scale 1 through the request's ``"lora"`` field), ``parallel`` slots with continuous batching, on
127.0.0.1 with a random API key (handed over in its environment, LLAMA_API_KEY, not on its command line, which
any local user can read). It is supervised: a server that dies is started again (with backoff) on the
same address; the calls it was answering fail with EngineUnavailable (503), the next are answered by the new
one. A server never outlives its process: PR_SET_PDEATHSIG (set in the child, from a long-lived thread: the
signal follows the thread that started it) and an atexit hook stop it. Its log (a temporary file named after the
owning process) is kept to its last LOG_KEEP_BYTES while it runs, removed when it stops, and removed by the next
start in any process when its owner was killed before it could remove it.

The server is spoken to through ``tuna_llm.serving.openai_engine.OpenAIEngine`` (its /v1/completions), with the
prompt rendered by the GGUF's own chat template (what the export wrote, and what its parity check rendered) and
counted by the server's own tokenizer (/tokenize).

``launched(base_gguf, loras)`` gives an engine for the time of a ``with`` (the export's parity check, benches);
``pool`` keeps this process's servers: one per base GGUF, with at most TUNA_ADAPTER_CACHE_SIZE LoRAs; a LoRA it
does not hold starts a new server beside the old one, new calls go to the new one once it is healthy and the
old one is stopped once its calls have ended.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
from jinja2 import TemplateError

from tuna_llm import llama_tools
from tuna_llm.prompting import ChatTemplateRefused, ToolsUnsupported, has_tool_content, template_tools
from tuna_llm.serving.engine import Adapter, CallSpec, EngineInfo, RequestInvalid
from tuna_llm.serving.openai_engine import CONNECT_S, Endpoint, EngineUnavailable, OpenAIEngine
from tuna_llm.settings import current

ENGINE_NAME = "llama.cpp"
START_TIMEOUT_S = 120.0  # loading a GGUF and its LoRAs
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_RESET_S = 60.0  # a server up this long starts its backoff from the beginning again
RETIRE_GRACE_S = 5.0  # a replaced server is stopped once it has had no call in flight for this long
# Sampling as plain temperature + top_p (what the transformers engine does): llama-server's own top_k and min_p
# defaults off. A greedy call is greedy either way.
SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}

LOG_MAX_BYTES = 8 * 1024 * 1024  # a server's log grows past this: only its last LOG_KEEP_BYTES are kept
LOG_KEEP_BYTES = 1024 * 1024
LOG_CHECK_S = 5.0
LOG_PREFIX = "tuna-llama-server-"  # + the owning process's pid + "-" + random + ".log"
START_FAILURE_S = 10.0  # a failed start is the answer, for this long, to the calls that would start it again

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuna-llama-server-spawn")  # lives as long as the process
_alive: set[LlamaServer] = set()
_alive_lock = threading.Lock()


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the atexit hook remains
        return None


_prctl = _load_prctl()  # loaded here, in the parent: between fork and exec the child only calls it


def _die_with(parent: int):
    """The child's step between fork and exec: die with ``parent`` (no loading, no allocating beyond the call),
    and exit at once if the parent already went before that took effect."""

    def die_with_parent() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return die_with_parent


def remove_left_behind() -> None:
    """Remove the logs of servers whose owning process is gone (killed before it could remove them)."""
    for log in Path(tempfile.gettempdir()).glob(f"{LOG_PREFIX}*-*.log"):
        pid = log.name.removeprefix(LOG_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            log.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    def __init__(
        self,
        base_gguf: Path,
        loras: Sequence[Path] = (),
        *,
        parallel: int,
        threads: int | None = None,
        ctx_per_slot: int = 4096,
    ) -> None:
        self.base_gguf = Path(base_gguf)
        self.loras = [Path(path) for path in loras]
        self.parallel, self.ctx_per_slot = max(1, parallel), ctx_per_slot
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.api_key: str | None = None
        self.port: int | None = None
        self.engine: OpenAIEngine | None = None
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def lora_id(self, path: Path | str) -> int:
        """The server's id of a LoRA GGUF it was started with (its position)."""
        wanted = Path(path).resolve()
        for index, lora in enumerate(self.loras):
            if lora.resolve() == wanted:
                return index
        raise RequestInvalid(f"The LoRA {Path(path).name} is not loaded on this llama-server.")

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LlamaServer:
        """Start the server and wait until it answers (EngineUnavailable, with its log's end, when it cannot)."""
        for path in [self.base_gguf, *self.loras]:
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "No such GGUF file", str(path))
        binary = llama_tools.binary(llama_tools.SERVER)
        remove_left_behind()
        self._stopping.clear()
        self.api_key = secrets.token_urlsafe(24)
        self.port = _free_port()
        fd, log = tempfile.mkstemp(prefix=f"{LOG_PREFIX}{os.getpid()}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        with _alive_lock:
            if not _alive:
                atexit.register(_stop_all)
            _alive.add(self)
        try:
            self._spawn(binary)
            self._wait_healthy()
            self.engine = self._make_engine()
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._supervise, args=(binary,), name="tuna-llama-server-watch", daemon=True)
        self._monitor.start()
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its log; calls in flight fail (EngineUnavailable).
        No start follows: _spawn checks ``_stopping`` under the lock taken here."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.engine is not None:
            self.engine.close()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        with _alive_lock:
            _alive.discard(self)

    def _command(self, binary: Path) -> list[str]:
        command = [str(binary), "-m", str(self.base_gguf)]
        for lora in self.loras:
            command += ["--lora", str(lora)]
        if self.loras:
            command.append("--lora-init-without-apply")
        return command + [
            "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(self.parallel), "-c", str(self.parallel * self.ctx_per_slot),
            "-t", str(self.threads), "-tb", str(self.threads),
            "--no-webui", "--no-slots", "--log-colors", "off",
        ]  # fmt: skip

    def _spawn(self, binary: Path) -> None:
        """Start the process from the long-lived spawner thread (PR_SET_PDEATHSIG fires when the starting thread
        ends); never once stop() has begun (EngineUnavailable then)."""
        command = self._command(binary)
        environment = {**os.environ, "LLAMA_API_KEY": self.api_key or ""}  # llama-server reads its --api-key from here

        def spawn() -> subprocess.Popen:
            with open(self.log_path, "ab") as log:
                return subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    preexec_fn=_die_with(os.getpid()),
                    start_new_session=True,
                )

        with self._lock:
            if self._stopping.is_set():
                raise EngineUnavailable("llama-server was stopped while it started.")
            self._process = _spawner.submit(spawn).result()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                raise EngineUnavailable("llama-server was stopped while it started.")
            if self._process.poll() is not None:
                logger.warning(
                    "llama-server for %s exited with code %s while starting; its log ends: %s",
                    self.base_gguf,
                    self._process.returncode,
                    self.log_tail(),
                )
                raise EngineUnavailable(f"llama.cpp's server exited while loading the model (code {self._process.returncode}).")
            try:
                if httpx.get(f"{self.url}/health", timeout=CONNECT_S).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        logger.warning("llama-server for %s was not healthy in %.0f s; its log ends: %s", self.base_gguf, START_TIMEOUT_S, self.log_tail())
        raise EngineUnavailable(f"llama.cpp's server did not become ready in {START_TIMEOUT_S:.0f} s.")

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def _cap_log(self) -> None:
        """Keep only the end of a log grown past LOG_MAX_BYTES (the server appends: it goes on at the new end)."""
        try:
            if self.log_path is None or self.log_path.stat().st_size <= LOG_MAX_BYTES:
                return
            with open(self.log_path, "r+b") as log:
                log.seek(-LOG_KEEP_BYTES, os.SEEK_END)
                tail = log.read()
                log.seek(0)
                log.write(tail)
                log.truncate()
        except OSError:  # removed meanwhile (stopped)
            pass

    def _supervise(self, binary: Path) -> None:
        """Start the server again when it dies (not when stopped), with a growing pause between tries; meanwhile
        keep its log within bounds."""
        attempt = 0
        while not self._stopping.is_set():
            process = self._process
            started = time.monotonic()
            while True:
                try:
                    process.wait(LOG_CHECK_S)
                    break
                except subprocess.TimeoutExpired:
                    self._cap_log()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_RESET_S:
                attempt = 0
            time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            attempt += 1
            if self._stopping.is_set():
                return
            try:
                self._spawn(binary)
                self._wait_healthy()
                self.restarts += 1
            except EngineUnavailable:
                if self._stopping.is_set():
                    return
                if self._process.poll() is None:  # up but not healthy in time: try again from the start
                    self._process.kill()
                self._move()  # e.g. its port was taken meanwhile: the next try listens on another
            except Exception:  # noqa: BLE001 - e.g. the binary was removed: keep trying with backoff
                time.sleep(RESTART_BACKOFF_S[-1])

    def _move(self) -> None:
        """Listen on a new port from the next start on; the engine follows."""
        self.port = _free_port()
        if self.engine is not None:
            self.engine.endpoint = replace(self.engine.endpoint, url=self.url)
            self.engine.client.base_url = self.url

    # -- the engine -----------------------------------------------------------------------------
    def _make_engine(self) -> OpenAIEngine:
        endpoint = Endpoint(self.url, self.api_key)
        prompts = GgufPrompts(self)
        engine = OpenAIEngine(
            endpoint,
            info=EngineInfo(ENGINE_NAME, "gguf", "cpu"),
            prompts=prompts,
            adapters=LoraFields(self),
            slots=self.parallel,
            sampling=SAMPLING,
        )
        prompts.load(engine.client)
        return engine


class LoraFields:
    """The request's ``"lora"`` field: its LoRA at scale 1, every other loaded one at 0 (none: the base model)."""

    def __init__(self, server: LlamaServer) -> None:
        self.server = server

    def fields(self, adapter: Adapter | None) -> dict:
        active = self.server.lora_id(adapter.path) if adapter is not None else None
        return {"lora": [{"id": index, "scale": 1.0 if index == active else 0.0} for index in range(len(self.server.loras))]}


class NoChatTemplate(ValueError):
    """The GGUF carries no chat template: its messages cannot be rendered as the model was trained on them."""


_PROBE_NAME, _PROBE_RESULT = "tuna_probe_lookup", "tuna-probe-result-7d1c"


class GgufPrompts:
    """The GGUF's own chat template (read from the server's /props), rendered as llama-cpp-python's Jinja2
    formatter renders it; prompts counted by the server's tokenizer (/tokenize, as it tokenizes a text prompt)."""

    def __init__(self, server: LlamaServer) -> None:
        self.server = server
        self.context: int | None = server.ctx_per_slot
        self.formatter = None
        self.renders_tools = False
        self._client: httpx.Client | None = None

    def load(self, client: httpx.Client) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._client = client
        props = self._get("/props")
        template = props.get("chat_template")
        if not template:
            raise NoChatTemplate(f"{self.server.base_gguf.name} has no chat template in its metadata.")
        self.context = (props.get("default_generation_settings") or {}).get("n_ctx") or self.context
        self.formatter = Jinja2ChatFormatter(
            template=template, eos_token=props.get("eos_token") or "", bos_token=props.get("bos_token") or ""
        )
        self.renders_tools = _renders_tools(self.formatter)

    def _get(self, path: str) -> dict:
        try:
            response = self._client.get(path)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"llama-server at {self.server.url} did not answer {path}: {exc}") from None

    def render(self, spec: CallSpec) -> str:
        messages = list(spec.messages or [])  # a plain list for the template; the tools are read from spec.messages
        if has_tool_content(spec.messages) and not self.renders_tools:
            raise ToolsUnsupported(
                f"The chat template in {self.server.base_gguf.name} does not render tools or tool calls; export the fine-tune "
                "again so that its GGUF carries LLM Tuna's tools-capable template."
            )
        try:
            return self.formatter(messages=messages, tools=template_tools(spec.messages)).prompt
        except (TemplateError, ValueError) as exc:  # llama-cpp-python's raise_exception raises a ValueError
            raise ChatTemplateRefused(str(exc) or type(exc).__name__) from None

    def count(self, text: str) -> int:
        try:
            response = self._client.post("/tokenize", json={"content": text, "add_special": True, "parse_special": True})
            response.raise_for_status()
            return len(response.json()["tokens"])
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"llama-server at {self.server.url} could not count the prompt: {exc}") from None


def _renders_tools(formatter) -> bool:
    """Whether a chat template writes a conversation's tools, calls and tool results into the prompt."""
    tools = [{"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object", "properties": {}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": _PROBE_NAME, "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": _PROBE_RESULT},
    ]
    try:
        prompt = formatter(messages=messages, tools=tools).prompt
    except Exception:  # noqa: BLE001 - jinja2's errors, or the template's own raise_exception
        return False
    return prompt.count(_PROBE_NAME) >= 2 and _PROBE_RESULT in prompt  # offered and called, and the result


@contextmanager
def launched(base_gguf: Path, loras: Sequence[Path] = (), **options) -> Iterator[OpenAIEngine]:
    """A llama-server for the time of the ``with``: its engine (an Adapter whose path is one of ``loras`` selects
    that LoRA). ``options``: LlamaServer's (parallel: TUNA_LLAMA_SERVER_PARALLEL by default)."""
    options.setdefault("parallel", current().llama_server_parallel)
    server = LlamaServer(base_gguf, loras, **options).start()
    try:
        yield server.engine
    finally:
        server.stop()


def _stop_all() -> None:
    with _alive_lock:
        servers = list(_alive)
    for server in servers:
        server.stop()


# -- this process's servers -------------------------------------------------------------------------
class LlamaServerPool:
    """One llama-server per base GGUF, holding the LoRAs asked for (at most TUNA_ADAPTER_CACHE_SIZE, the least
    recently asked for dropped first). ``options``: LlamaServer's (parallel: TUNA_LLAMA_SERVER_PARALLEL)."""

    def __init__(self, **options) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._current: dict[Path, LlamaServer] = {}
        self._starting: dict[Path, threading.Event] = {}
        # per base: its last start's error, when, the LoRA that start was asked for, and the event its waiters waited on
        self._failed: dict[Path, tuple[BaseException, float, Path | None, threading.Event]] = {}
        self._retired: list[tuple[LlamaServer, float]] = []
        self._used: dict[Path, list[Path]] = {}  # per base: LoRAs, least recently asked for first
        self._reaper: threading.Thread | None = None

    def engine_for(self, base_gguf: Path, lora: Path | None) -> tuple[OpenAIEngine, Adapter | None]:
        base = Path(base_gguf).resolve()
        lora = Path(lora).resolve() if lora is not None else None
        waited: threading.Event | None = None
        while True:
            with self._lock:
                server = self._current.get(base)
                if lora is not None:
                    used = self._used.setdefault(base, [])
                    if lora in used:
                        used.remove(lora)
                    used.append(lora)
                    del used[: -max(1, current().adapter_cache_size)]  # only the most recent can be held
                if server is not None and (lora is None or lora in server.loras) and server.engine is not None:
                    return server.engine, _adapter(lora)
                failed = self._failed.get(base)
                if failed is not None and (failed[3] is waited or (failed[2] == lora and time.monotonic() - failed[1] < START_FAILURE_S)):
                    raise _again(failed[0])  # the calls that waited for that start, and those for its LoRA just after it
                starting = self._starting.get(base)
                if starting is None:
                    starting = self._starting[base] = threading.Event()
                    loras = self._wanted(base, server, lora)
                    break
            starting.wait(START_TIMEOUT_S + 5)  # another call is starting this base's server: use it when ready
            waited = starting
        try:
            new = LlamaServer(base, loras, **self._options()).start()
        except BaseException as exc:
            with self._lock:
                event = self._starting.pop(base)
                if isinstance(exc, Exception) and not isinstance(exc, (llama_tools.LlamaToolMissing, FileNotFoundError)):
                    self._failed[base] = (exc, time.monotonic(), lora, event)  # (those two are found before any start)
                event.set()
            raise
        with self._lock:
            self._failed.pop(base, None)
            old = self._current.get(base)
            self._current[base] = new
            if old is not None:
                self._retired.append((old, time.monotonic()))
                self._start_reaper()
            self._starting.pop(base).set()
        return new.engine, _adapter(lora)

    def _options(self) -> dict:
        options = dict(self.options)
        options.setdefault("parallel", current().llama_server_parallel)
        return options

    def _wanted(self, base: Path, server: LlamaServer | None, lora: Path | None) -> list[Path]:
        """The LoRAs the next server of ``base`` holds: the most recently asked for, up to the cache size."""
        size = max(1, current().adapter_cache_size)
        held = [path for path in self._used.get(base, []) if path.is_file()]
        if lora is not None and lora not in held:
            held.append(lora)
        return held[-size:]

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="tuna-llama-server-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Stop the replaced servers once no call has been in flight on them for RETIRE_GRACE_S."""
        idle_since: dict[int, float] = {}
        while True:
            time.sleep(0.5)
            with self._lock:
                retired = list(self._retired)
            if not retired:
                return
            now = time.monotonic()
            for server, _ in retired:
                busy = server.engine is not None and server.engine.in_flight > 0
                if busy:
                    idle_since.pop(id(server), None)
                    continue
                if now - idle_since.setdefault(id(server), now) >= RETIRE_GRACE_S:
                    server.stop()
                    with self._lock:
                        self._retired = [(s, t) for s, t in self._retired if s is not server]

    def servers(self) -> list[LlamaServer]:
        with self._lock:
            return list(self._current.values()) + [server for server, _ in self._retired]

    def close(self) -> None:
        with self._lock:
            servers = list(self._current.values()) + [server for server, _ in self._retired]
            self._current.clear()
            self._retired.clear()
            self._used.clear()
        for server in servers:
            server.stop()


def _again(exc: BaseException) -> BaseException:
    """A copy of a remembered start error to raise in another call (each raise writes its own traceback)."""
    try:
        return copy.copy(exc).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied: raised as it is
        return exc


def _adapter(lora: Path | None) -> Adapter | None:
    return Adapter(lora.stem, lora) if lora is not None else None


pool = LlamaServerPool()

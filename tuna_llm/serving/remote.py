"""Remote engines by URL: an OpenAI-compatible server someone else runs (vLLM, SGLang, or llama-server), one per
base model (TUNA_REMOTE_ENGINES). Django-free.

What is ours here: the configuration (checked with clear errors), the prompt (rendered by us with the base model's
own tokenizer and chat template, counted with that tokenizer: the prompt the fine-tune was trained on), the mapping of
a fine-tune to the engine's name for it, and the health check. The generation itself goes through the one client of
tuna_llm.serving.openai_engine (POST {url}/v1/completions, streamed, usage included).

How each kind of engine is told which adapter a call applies (docs/export-and-serving.md, "Remote engines"):

- ``vllm`` (``vllm serve <base> --enable-lora`` with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): the job's PEFT folder
  is loaded at first use, POST {url}/v1/load_lora_adapter ``{"lora_name": "job-<pk>", "lora_path": "<adapter_root>/
  <pk>/adapter"}``, then called as ``"model": "job-<pk>"``. An engine that restarted has forgotten it: the call meets
  vLLM's 404 "The model `job-<pk>` does not exist.", and is sent once more after the adapter is loaded again
  (``RemoteEngine``); "has already been loaded" counts as loaded (another web process loaded it).
- ``sglang`` (``--enable-lora`` with ``--max-lora-rank`` / ``--lora-target-modules``): POST {url}/load_lora_adapter
  with the same body, then ``"model": "<base>:job-<pk>"`` (SGLang's ``base-model:adapter-name`` syntax).
- ``llama-server`` (started by someone else with ``--lora <job's adapter-f16.gguf> ... --lora-init-without-apply``):
  the job's LoRA GGUF is found among its GET {url}/lora-adapters by its path under the jobs folder, and each call
  names every adapter's scale (``"lora": [{"id": i, "scale": 1.0}, ...]``, the others 0), so the server's global
  scales never leak into a call.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx

from tuna_llm.prompting import render_chat
from tuna_llm.serving.engine import Adapter, CallSpec, EngineInfo, RequestInvalid
from tuna_llm.serving.llama_server import SAMPLING
from tuna_llm.serving.openai_engine import Endpoint, EngineRefused, EngineUnavailable, OpenAIEngine

VLLM, SGLANG, LLAMA_SERVER = "vllm", "sglang", "llama-server"
KINDS = (VLLM, SGLANG, LLAMA_SERVER)
FIELDS = ("kind", "url", "model", "api_key_env", "adapter_root", "timeout_s", "precision", "context", "slots")
# llama-server samples with top_k, min_p and a repeat penalty unless told otherwise: plain temperature + top_p, as
# the llama-server LLM Tuna starts itself.
LLAMA_SERVER_SAMPLING = SAMPLING
ADAPTER_RECHECK_S = 10.0  # a llama-server's adapter list is read again when older than this (a restart renumbers)
HEALTH_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
CONTROL_TIMEOUT = httpx.Timeout(120.0, connect=5.0)  # loading an adapter reads its files on the engine


class RemoteConfigError(ValueError):
    """TUNA_REMOTE_ENGINES is not usable; the message lists every problem."""


class AdapterUnknown(RequestInvalid):
    """The engine cannot find or load a fine-tune's adapter; the message says what to do (routing answers 409; met
    mid-call, e.g. an engine restarted without it, 400)."""


@dataclass(frozen=True)
class RemoteEngineConfig:
    """One base model's remote engine, as TUNA_REMOTE_ENGINES gives it (``parse_engines`` checks it)."""

    base_model: str  # the catalog name it serves
    kind: str  # vllm | sglang | llama-server
    url: str  # http(s)://host:port, without /v1
    model: str = ""  # the engine's name of the base model (vLLM's --served-model-name, SGLang's --model-path)
    api_key_env: str = ""  # the environment variable holding the engine's API key ("" : none)
    adapter_root: str = ""  # TUNA_DATA_DIR/jobs as the engine sees it ("" : the same path as here)
    timeout_s: float = 600.0
    precision: str = ""  # what usage rows record ("" : "gguf" for llama-server, "auto" for the others: their --dtype)
    context: int | None = None  # the engine's context length (None: the base model's max_position_embeddings)
    slots: int = 8  # requests the engine decodes at once (the wait estimate behind 503 + Retry-After)

    @property
    def key(self) -> str:
        """What an engine check is recorded against: a check of another engine (or another base on it) does not count."""
        return f"{self.kind} {self.url} {self.model}".strip()

    @property
    def engine_name(self) -> str:
        return self.kind

    @property
    def recorded_precision(self) -> str:
        return self.precision or ("gguf" if self.kind == LLAMA_SERVER else "auto")

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        return environ.get(self.api_key_env) or None if self.api_key_env else None

    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, api_key=self.api_key(), timeout_s=self.timeout_s)

    def engine_path(self, relative: PurePosixPath | str) -> str:
        """A path under the jobs folder as the engine reads it."""
        root = self.adapter_root.rstrip("/")
        return f"{root}/{relative}" if root else str(relative)


def parse_engines(
    raw: Mapping[str, Any], known_bases: Iterable[str], environ: Mapping[str, str] = os.environ
) -> dict[str, RemoteEngineConfig]:
    """TUNA_REMOTE_ENGINES checked: every problem named in one RemoteConfigError."""
    problems = config_problems(raw, known_bases, environ)
    if problems:
        raise RemoteConfigError("TUNA_REMOTE_ENGINES: " + "; ".join(problems))
    return {name: _config(name, entry) for name, entry in raw.items()}


def config_problems(raw: Any, known_bases: Iterable[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """What is wrong with TUNA_REMOTE_ENGINES, one readable sentence per problem ([] when it is usable)."""
    if not isinstance(raw, Mapping):
        return [f"must be a JSON object of base model name -> engine, got {type(raw).__name__}"]
    known = sorted(known_bases)
    problems = []
    for name, entry in raw.items():
        where = f"{name!r}"
        if name not in known:
            problems.append(f"{where} is not a base model of this server (TUNA_BASE_MODELS: {', '.join(known) or 'none'})")
        if not isinstance(entry, Mapping):
            problems.append(f"{where} must be an object with kind, url and model, got {type(entry).__name__}")
            continue
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            problems.append(f"{where} has unknown fields {', '.join(unknown)} (known: {', '.join(FIELDS)})")
        kind = entry.get("kind")
        if kind not in KINDS:
            problems.append(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        url = entry.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is not None and "@" in parts.netloc:  # never repeated: it holds a password
            problems.append(
                f"{where}: url must not hold credentials (user:password@host): the URL is shown in errors, usage rows and "
                "engine checks; put the engine's API key in an environment variable and name it in api_key_env"
            )
        elif parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(f"{where}: url must be http(s)://host:port of the engine, got {url!r}")
        elif parts.path.rstrip("/").endswith("/v1"):
            problems.append(f"{where}: url is the engine's address without /v1 (got {url!r})")
        model = entry.get("model", "")
        if not isinstance(model, str) or (kind in (VLLM, SGLANG) and not model.strip()):
            problems.append(f"{where}: model must name the base model as the engine knows it (its served model name)")
        for text_field in ("api_key_env", "adapter_root", "precision"):
            if not isinstance(entry.get(text_field, ""), str):
                problems.append(f"{where}: {text_field} must be a string")
        key_env = entry.get("api_key_env", "")
        if isinstance(key_env, str) and key_env and not environ.get(key_env):
            problems.append(f"{where}: api_key_env names {key_env}, which is not set in this environment")
        root = entry.get("adapter_root", "")
        if isinstance(root, str) and root and not root.startswith("/"):
            problems.append(f"{where}: adapter_root must be an absolute path (the jobs folder as the engine sees it), got {root!r}")
        timeout = entry.get("timeout_s", 600.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            problems.append(f"{where}: timeout_s must be a number of seconds above 0, got {timeout!r}")
        context = entry.get("context")
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
            problems.append(f"{where}: context must be a whole number of tokens, got {context!r}")
        slots = entry.get("slots", 8)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            problems.append(f"{where}: slots must be a whole number of requests decoded at once (>= 1), got {slots!r}")
    return problems


def _config(name: str, entry: Mapping[str, Any]) -> RemoteEngineConfig:
    return RemoteEngineConfig(
        base_model=name,
        kind=entry["kind"],
        url=entry["url"].rstrip("/"),
        model=entry.get("model", "").strip(),
        api_key_env=entry.get("api_key_env", ""),
        adapter_root=entry.get("adapter_root", ""),
        timeout_s=float(entry.get("timeout_s", 600.0)),
        precision=entry.get("precision", ""),
        context=entry.get("context"),
        slots=entry.get("slots", 8),
    )


# -- talking to the engine outside generation (adapters, health) -----------------------------------


def _headers(config: RemoteEngineConfig) -> dict[str, str]:
    key = config.api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _send(
    config: RemoteEngineConfig, method: str, path: str, *, json: Any = None, timeout: httpx.Timeout = CONTROL_TIMEOUT
) -> httpx.Response:
    """One control request; EngineUnavailable when the engine cannot be reached, fails (5xx) or refuses our key."""
    try:
        response = httpx.request(method, config.url + path, json=json, headers=_headers(config), timeout=timeout)
    except httpx.HTTPError as exc:
        raise EngineUnavailable(f"The {config.kind} engine at {config.url} cannot be reached: {exc or type(exc).__name__}.") from exc
    if response.status_code >= 500:
        raise EngineUnavailable(f"The {config.kind} engine at {config.url} failed ({response.status_code}): {engine_message(response)}")
    if response.status_code in (401, 403):
        raise EngineUnavailable(
            f"The {config.kind} engine at {config.url} refused LLM Tuna's API key ({response.status_code}): check api_key_env "
            f"({config.api_key_env or 'not set'}) in TUNA_REMOTE_ENGINES."
        )
    return response


def engine_message(response: httpx.Response) -> str:
    """The engine's own words for an error: OpenAI's {"error": {"message"}}, vLLM's {"message"}, SGLang's
    {"error_message"}, FastAPI's {"detail"}, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for name in ("message", "error_message", "detail", "error"):
            if body.get(name):
                return str(body[name])[:500]
    return response.text.strip()[:500]


class LoadedAdapters:
    """vLLM's and SGLang's adapters: loaded through the engine's load_lora_adapter at first use; loaded again when a
    call finds the engine has forgotten it (``forgotten``: it restarted), by RemoteEngine. An engine's "already
    loaded" (loaded by another web process, or before a restart of ours) is success."""

    def __init__(self, config: RemoteEngineConfig) -> None:
        self.config = config
        self.load_path = "/v1/load_lora_adapter" if config.kind == VLLM else "/load_lora_adapter"
        self._loaded: dict[str, float] = {}  # adapter name -> when the engine confirmed it (time.monotonic())
        self._lock = threading.Lock()

    def model_name(self, adapter: Adapter | None) -> str:
        if adapter is None:
            return self.config.model
        return adapter.name if self.config.kind == VLLM else f"{self.config.model}:{adapter.name}"

    def fields(self, adapter: Adapter | None) -> dict:
        if adapter is not None:
            self.prepare(adapter)
        body: dict[str, Any] = {"model": self.model_name(adapter)}
        if self.config.kind == VLLM:
            body["add_special_tokens"] = False  # the chat template already wrote them, as transformers tokenizes it
        return body

    def prepare(self, adapter: Adapter) -> None:
        """Make sure the engine has ``adapter`` (its path as the engine reads it); AdapterUnknown when it cannot load it."""
        with self._lock:
            if adapter.name in self._loaded:
                return
            body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
            response = _send(self.config, "POST", self.load_path, json=body)
            message = engine_message(response)
            if response.status_code == 200 and not (isinstance(_json(response), dict) and _json(response).get("success") is False):
                self._loaded[adapter.name] = time.monotonic()
                return
            if "already" in message.lower():  # loaded before (by this process or another web process)
                self._loaded[adapter.name] = time.monotonic()
                return
            raise AdapterUnknown(self._load_refused(adapter, response.status_code, message))

    def forget(self, name: str, confirmed_before: float | None = None) -> None:
        """Load ``name`` again at its next use. ``confirmed_before`` (time.monotonic()): only if the engine confirmed
        it before then (calls that met the same restart together reload it once)."""
        with self._lock:
            if confirmed_before is None or self._loaded.get(name, confirmed_before) <= confirmed_before:
                self._loaded.pop(name, None)

    def forgotten(self, refusal: str, adapter: Adapter) -> bool:
        """Whether an engine's refusal of a call says it does not know ``adapter`` (vLLM: 404 "The model `job-42` does
        not exist."; SGLang's wording may say "not found" or "not loaded")."""
        text = refusal.lower()
        return adapter.name.lower() in text and any(words in text for words in ("does not exist", "not found", "not loaded"))

    def _load_refused(self, adapter: Adapter, status: int, message: str) -> str:
        engine = f"The {self.config.kind} engine at {self.config.url}"
        if status in (404, 405) and message.lower() in ("not found", "method not allowed"):
            enable = (
                "start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                if self.config.kind == VLLM
                else "start SGLang with --enable-lora (and --max-lora-rank / --lora-target-modules)"
            )
            return f"{engine} does not load adapters at run time ({self.load_path}: {status}): {enable}."
        return (
            f"{engine} could not load {adapter.name} from {adapter.path} ({status}: {message}). Check that the engine can "
            "read that folder: adapter_root in TUNA_REMOTE_ENGINES must be this server's jobs folder as the engine sees it, "
            "and the engine's LoRA limits (rank, target modules) must admit the adapter."
        )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class LlamaServerAdapters:
    """A llama-server someone else runs: the job's LoRA GGUF must be one of its ``--lora`` files; found by its path
    under the jobs folder (``<pk>/export/adapter-f16.gguf``) among GET /lora-adapters."""

    def __init__(self, config: RemoteEngineConfig) -> None:
        self.config = config
        self._ids: dict[str, int] | None = None  # adapter path (as the server lists it) -> id
        self._read_at = 0.0  # read again after ADAPTER_RECHECK_S: a server restarted with other --lora files renumbers them
        self._lock = threading.Lock()

    def fields(self, adapter: Adapter | None) -> dict:
        ids = self._adapter_ids()
        wanted = self.prepare(adapter) if adapter is not None else None
        body: dict[str, Any] = {"lora": [{"id": i, "scale": 1.0 if i == wanted else 0.0} for i in sorted(set(ids.values()))]}
        if self.config.model:
            body["model"] = self.config.model
        return body

    def prepare(self, adapter: Adapter) -> int:
        """The server's id of ``adapter`` (its path relative to the jobs folder); AdapterUnknown when it was not started with it."""
        wanted = PurePosixPath(str(adapter.path))
        for refresh in (False, True):
            for path, index in self._adapter_ids(refresh=refresh).items():
                listed = PurePosixPath(path)
                if listed == wanted or (len(listed.parts) >= len(wanted.parts) and listed.parts[-len(wanted.parts) :] == wanted.parts):
                    return index
        raise AdapterUnknown(
            f"The llama-server at {self.config.url} was not started with {adapter.name}'s LoRA GGUF ({wanted}). Restart it with "
            f"--lora {self.config.engine_path(wanted)} among its adapters (and --lora-init-without-apply)."
        )

    def _adapter_ids(self, refresh: bool = False) -> dict[str, int]:
        with self._lock:
            if self._ids is None or refresh or time.monotonic() - self._read_at > ADAPTER_RECHECK_S:
                response = _send(self.config, "GET", "/lora-adapters", timeout=HEALTH_TIMEOUT)
                if response.status_code != 200:
                    raise EngineRefused(f"The llama-server at {self.config.url} refused GET /lora-adapters: {engine_message(response)}")
                self._ids = _lora_ids(response, self.config.url)
                self._read_at = time.monotonic()
            return self._ids

    def forget(self, name: str, confirmed_before: float | None = None) -> None:
        with self._lock:
            self._ids = None


def _lora_ids(response: httpx.Response, url: str) -> dict[str, int]:
    """llama-server's GET /lora-adapters (``[{"id": 0, "path": "...", "scale": 0.0}, ...]``) as path -> id;
    EngineUnavailable (503) when the answer is not that list: not a llama-server, or a proxy's page."""
    body = _json(response)
    try:
        if not isinstance(body, list):
            raise TypeError(type(body).__name__)
        return {str(item["path"]): int(item["id"]) for item in body}
    except (TypeError, KeyError, ValueError) as exc:
        raise EngineUnavailable(
            f"The llama-server at {url} answered GET /lora-adapters with something other than its list of adapters "
            f"(id and path of each; {type(exc).__name__}): is the url a llama-server?"
        ) from None


def adapters_for(config: RemoteEngineConfig) -> LoadedAdapters | LlamaServerAdapters:
    return LlamaServerAdapters(config) if config.kind == LLAMA_SERVER else LoadedAdapters(config)


def adapter_path(config: RemoteEngineConfig, relative: PurePosixPath | str) -> str:
    """What a call's Adapter.path is for this engine: for vLLM and SGLang, the PEFT folder as the engine reads it
    (adapter_root + ``<pk>/adapter``); for llama-server, the LoRA GGUF's path relative to the jobs folder (matched
    against the paths it was started with)."""
    return str(relative) if config.kind == LLAMA_SERVER else config.engine_path(relative)


# -- prompts -----------------------------------------------------------------------------------------


class TokenizerPrompts:
    """The prompt of a call rendered with the base model's tokenizer and chat template (tuna_llm.prompting.render_chat,
    as training and the transformers engine render it), and counted with that tokenizer."""

    def __init__(self, tokenizer: Any, context: int | None) -> None:
        self.tokenizer = tokenizer
        self.context = context

    def render(self, spec: CallSpec) -> str:
        if spec.messages is not None:
            return render_chat(self.tokenizer, spec.messages, add_generation_prompt=True)
        return spec.text or ""

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(load_path: str, *, hub: bool, hf_token: str | None = None, context: int | None = None) -> TokenizerPrompts:
    """The base model's tokenizer (no weights) and its context (``context`` or its config's max_position_embeddings)."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {"token": hf_token} if hub else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(load_path, **kwargs)
    if context is None:
        context = getattr(AutoConfig.from_pretrained(load_path, **kwargs), "max_position_embeddings", None)
    return TokenizerPrompts(tokenizer, context)


class RemoteEngine(OpenAIEngine):
    """The one client (OpenAIEngine), plus: a call refused because the engine no longer knows its adapter (vLLM's
    404 "The model `job-42` does not exist." once it restarted) loads the adapter again and is sent once more."""

    def _exchange(self, handle: Any, body: dict, pieces: list[str], state: dict) -> None:
        sent = time.monotonic()
        try:
            super()._exchange(handle, body, pieces, state)
        except EngineRefused as exc:
            adapter, adapters = handle.request.adapter, self.adapters
            if adapter is None or pieces or not isinstance(adapters, LoadedAdapters) or not adapters.forgotten(str(exc), adapter):
                raise
            adapters.forget(adapter.name, confirmed_before=sent)
            body.update(adapters.fields(adapter))  # loads it (AdapterUnknown when the engine cannot)
            super()._exchange(handle, body, pieces, state)


def remote_engine(config: RemoteEngineConfig, prompts: TokenizerPrompts) -> RemoteEngine:
    """The engine that answers ``config.base_model``'s calls (and its fine-tunes') through the remote server."""
    info = EngineInfo(name=config.engine_name, precision=config.recorded_precision, device="remote")
    sampling = LLAMA_SERVER_SAMPLING if config.kind == LLAMA_SERVER else None
    return RemoteEngine(config.endpoint(), info=info, prompts=prompts, adapters=adapters_for(config), slots=config.slots, sampling=sampling)


# -- health ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str  # one sentence: what is up, or what is wrong
    models: tuple[str, ...] = field(default=())  # what /v1/models lists (the base, loaded adapters)
    checked_s: float = 0.0  # how long the check took


def health(config: RemoteEngineConfig) -> Health:
    """GET /health, then /v1/models (bounded timeouts: an engine that does not answer is reported, never waited for)."""
    started = time.monotonic()

    def done(ok: bool, detail: str, models: tuple[str, ...] = ()) -> Health:
        return Health(ok, detail, models, round(time.monotonic() - started, 3))

    try:
        response = _send(config, "GET", "/health", timeout=HEALTH_TIMEOUT)
        if response.status_code != 200:
            return done(False, f"GET {config.url}/health answered {response.status_code}: {engine_message(response)}")
        response = _send(config, "GET", "/v1/models", timeout=HEALTH_TIMEOUT)
    except EngineUnavailable as exc:
        return done(False, str(exc))
    if response.status_code != 200:
        return done(False, f"GET {config.url}/v1/models answered {response.status_code}: {engine_message(response)}")
    body = _json(response)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return done(
            False, f"GET {config.url}/v1/models answered something other than a model list: is the url an OpenAI-compatible engine?"
        )
    models = tuple(str(item["id"]) for item in data if isinstance(item, dict) and item.get("id"))
    if config.model and config.kind != LLAMA_SERVER and config.model not in models:
        return done(
            False, f"The {config.kind} engine at {config.url} serves {', '.join(models) or 'no model'}, not {config.model}.", models
        )
    return done(True, f"The {config.kind} engine at {config.url} is up ({', '.join(models) or 'its model'}).", models)


def local_relative(path: Path, jobs_root: Path) -> PurePosixPath:
    """A job file's path relative to the jobs folder (what adapter_root is prefixed to)."""
    return PurePosixPath(Path(path).resolve().relative_to(Path(jobs_root).resolve()).as_posix())
